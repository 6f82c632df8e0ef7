"""The kopf shell: Guild events and a periodic resync call ``reconcile_guild``, which
reads the cluster, asks ``reconcile`` what to do, applies it and writes the status.

Level-based: every call starts from what the cluster holds now, so a restarted operator
(or a missed event) is caught up by the next call; handlers for one Guild never overlap.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import json
import logging
import secrets
from collections.abc import Callable
from typing import Any

import kopf
import nats
from nats.errors import Error as NatsError

from constellation.errors import MessageError
from constellation.replication.placement import Placement
from services.bus import load_placement
from services.operator.kube import Connection, Kube, KubeError
from services.operator.metrics import Metrics
from services.operator.reconcile import (
    Key,
    Moves,
    key_of,
    moves,
    placement_status,
    plan,
    status,
)
from services.operator.render import (
    GUILD,
    NATS_PORT,
    NATS_SELF,
    Obj,
    Renderer,
    generated_keys,
    generated_value,
    owner_reference,
)
from services.operator.spec import GROUP, VERSION, BadGuild, GuildSpec, check_keys, read_spec
from services.replica.moves import advance

PLURAL = "guilds"
OBSERVED = ("ConfigMap", "Service", "StatefulSet", "PodDisruptionBudget")
_log = logging.getLogger("operator")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _quiet(exc: Exception) -> None:
    """nats-py's error callback: an unreachable NATS is said once, by ``_moves``."""


def _secret_data(secret: Obj) -> dict[str, str]:
    try:
        return {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise BadGuild(f"Secret {secret['metadata']['name']}: {exc}") from None


class Reconciler:
    def __init__(
        self, kube: Kube, metrics: Metrics, nats_addr: str = "", stall_s: float = 120.0
    ) -> None:
        """``nats_addr``: where every Guild's NATS is reached (host:port), for an
        operator outside the cluster; "": its Service in the Guild's namespace.
        ``stall_s``: a change of machines none of whose moves ends for this long is
        stuck (the Guild is Degraded, saying which moves wait)."""
        self.kube = kube
        self.metrics = metrics
        self.nats_addr = nats_addr
        self.stall_s = stall_s
        self._locks: dict[str, asyncio.Lock] = {}

    async def _user_secrets(self, spec: GuildSpec, namespace: str) -> list[str]:
        """Check the member's keys; the peers whose credentials it holds."""
        keys = await self.kube.get("Secret", namespace, spec.secrets.keys)
        if keys is None:
            raise BadGuild(f"Secret {spec.secrets.keys} (the member's keys) does not exist")
        data = _secret_data(keys)
        if "operator-key" not in data or "issuer-key" not in data:
            raise BadGuild(f"Secret {spec.secrets.keys} needs operator-key and issuer-key")
        check_keys(spec, data["operator-key"], data["issuer-key"])
        peers = await self.kube.get("Secret", namespace, spec.secrets.peers)
        if peers is None:
            raise BadGuild(f"Secret {spec.secrets.peers} (the peers' credentials) does not exist")
        try:
            doc = json.loads(_secret_data(peers).get("peers.json", ""))
        except json.JSONDecodeError:
            raise BadGuild(f"Secret {spec.secrets.peers}: peers.json is not JSON") from None
        if not isinstance(doc, dict):
            raise BadGuild(f"Secret {spec.secrets.peers}: peers.json is not an object")
        missing = [m.name for m in spec.members if m.name != spec.operator and m.name not in doc]
        if missing:
            raise BadGuild(f"Secret {spec.secrets.peers}: no credentials from {', '.join(missing)}")
        return sorted(doc)

    async def _generated(self, renderer: Renderer) -> None:
        """The Secret of random values the operator makes once per Guild (passwords, the
        signer's and the mint's storage keys): keys are added, never changed. It has no
        owner: deleting the Guild keeps it, with the volumes it unlocks."""
        name, ns = renderer.n.generated, renderer.namespace
        have = await self.kube.get("Secret", ns, name)
        data = dict(have.get("data", {})) if have else {}
        missing = [k for k in generated_keys(renderer.spec) if k not in data]
        if not missing:
            return
        for k in missing:
            value = generated_value(k, secrets.token_bytes(32))
            data[k] = base64.b64encode(value.encode()).decode()
        obj = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": {GUILD: renderer.n.guild},
            },
            "data": data,
        }
        await (self.kube.patch(obj) if have else self.kube.create(obj))

    async def observe(self, renderer: Renderer) -> dict[Key, Obj]:
        """The Guild's objects, and its pods (read only: their controllers own them)."""
        found = await asyncio.gather(
            *(
                self.kube.list(kind, renderer.namespace, {GUILD: renderer.n.guild})
                for kind in (*OBSERVED, "Pod")
            )
        )
        return {key_of(o): o for objs in found for o in objs}

    async def reconcile(self, body: Any) -> Obj:
        """Bring one Guild's objects to what it renders; its new status."""
        meta = body["metadata"]
        lock = self._locks.setdefault(meta["uid"], asyncio.Lock())
        async with lock:
            st = await self._reconcile(body)
        self.metrics.reconciles.labels(st["phase"]).inc()
        return st

    async def _reconcile(self, body: Any) -> Obj:
        meta = body["metadata"]
        previous = body.get("status") or {}
        generation = int(meta.get("generation", 1))
        try:
            spec = read_spec(body["spec"])
        except BadGuild as exc:
            return status(None, {}, previous, generation, str(exc), _now(), [])
        owner = owner_reference(body)
        renderer = Renderer(meta["name"], meta["namespace"], spec, owner)
        problem: str | None = None
        observed: dict[Key, Obj] = {}
        peers: list[str] = []
        queued: list[str] = []
        found: Placement | None = None
        now = _now()
        try:
            peers = await self._user_secrets(spec, renderer.namespace)
            await self._generated(renderer)
            observed = await self.observe(renderer)
            mv, found = await self._moves(renderer, observed)
            renderer = Renderer(meta["name"], meta["namespace"], spec, owner, mv.machines)
            todo = plan(renderer, observed, mv.remove)
            problem, queued = todo.refused, todo.waiting
            for obj in todo.create:
                observed[key_of(obj)] = await self.kube.create(obj)
                self._event(body, "Created", obj)
            for obj in todo.patch:
                observed[key_of(obj)] = await self.kube.patch(obj)
                self._event(body, "Updated", obj)
            for name in todo.delete:
                await self.kube.delete("StatefulSet", renderer.namespace, name)
                observed.pop(("StatefulSet", name), None)
                self._event(body, "Removed", {"kind": "StatefulSet", "metadata": {"name": name}})
            self.metrics.applied.inc(len(todo.create) + len(todo.patch) + len(todo.delete))
        except BadGuild as exc:
            problem = str(exc)
        except KubeError as exc:
            problem = f"the API server refused: {exc}"
        placed, moving, stuck = placement_status(found, previous, spec.machines, now, self.stall_s)
        return status(
            renderer,
            observed,
            previous,
            generation,
            problem or stuck,
            now,
            peers,
            queued,
            placed,
            moving,
        )

    async def _nats_url(self, renderer: Renderer) -> str:
        """The member's NATS, as its own services reach it (user ``self``)."""
        ext = renderer.spec.nats.external
        if ext is not None:
            secret = await self.kube.get("Secret", renderer.namespace, ext.secret)
            url = _secret_data(secret).get(ext.key) if secret else None
            if not url:
                raise BadGuild(f"Secret {ext.secret} has no {ext.key} (the NATS URL)")
            return url
        generated = await self.kube.get("Secret", renderer.namespace, renderer.n.generated)
        password = _secret_data(generated or {}).get(NATS_SELF, "")
        addr = self.nats_addr or f"{renderer.n.nats}.{renderer.namespace}.svc:{NATS_PORT}"
        return f"nats://self:{password}@{addr}"

    async def _moves(
        self, renderer: Renderer, observed: dict[Key, Obj]
    ) -> tuple[Moves, Placement | None]:
        """The member's placement (None where its NATS does not answer, or no machine
        has started yet) and what it asks of the machines; one step of a change of
        their number, where one may be taken now."""
        spec = renderer.spec
        try:
            nc = await nats.connect(
                await self._nats_url(renderer),
                connect_timeout=2,
                allow_reconnect=False,
                max_reconnect_attempts=1,  # fails at once where nothing answers (0 hangs)
                reconnect_time_wait=0,
                error_cb=_quiet,
            )
        except (NatsError, OSError, TimeoutError) as exc:
            _log.info("NATS not reached", extra={"guild": renderer.n.guild, "error": str(exc)})
            return moves(renderer, None, observed), None
        try:
            found = await load_placement(nc, spec.operator)
            placement = found[0] if found else None
            mv = moves(renderer, placement, observed)
            if mv.drive:
                placement = await advance(nc, spec.operator, spec.machines)
                mv = moves(renderer, placement, observed)
            return mv, placement
        except (NatsError, TimeoutError, MessageError) as exc:
            _log.warning("placement not read", extra={"guild": renderer.n.guild, "error": str(exc)})
            return moves(renderer, None, observed), None
        finally:
            await nc.close()

    def _event(self, body: Any, reason: str, obj: Obj) -> None:
        message = f"{reason.lower()} {obj['kind']} {obj['metadata']['name']}"
        _log.info(message, extra={"guild": body["metadata"]["name"]})
        kopf.info(body, reason=reason, message=message)

    async def delete(self, body: Any) -> None:
        """Remove the Guild's workloads and configuration. Its volumes and its generated
        Secret stay: they hold the ledger's copies and the keys that unlock them."""
        meta = body["metadata"]
        async with self._locks.setdefault(meta["uid"], asyncio.Lock()):
            kept = f"{meta['name']}-generated and the volumes of {meta['name']}"
            for kind in reversed(OBSERVED):
                for obj in await self.kube.list(kind, meta["namespace"], {GUILD: meta["name"]}):
                    await self.kube.delete(kind, meta["namespace"], obj["metadata"]["name"])
            kopf.info(body, reason="Deleted", message=f"workloads removed; kept {kept}")
            self._locks.pop(meta["uid"], None)


def registry(
    conn: Connection, reconciler: Callable[[], Reconciler], resync_s: float
) -> kopf.OperatorRegistry:
    """The operator's handlers, in a registry of their own (so that an embedding, or a
    test, runs exactly these)."""
    reg = kopf.OperatorRegistry()
    resource = (GROUP, VERSION, PLURAL)

    @kopf.on.login(registry=reg)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return conn.for_kopf()

    async def changed(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        patch.status.update(await reconciler().reconcile(body))

    kopf.on.resume(*resource, registry=reg, id="resume")(changed)
    kopf.on.create(*resource, registry=reg, id="create")(changed)
    kopf.on.update(*resource, registry=reg, id="update")(changed)
    kopf.timer(*resource, registry=reg, id="resync", interval=resync_s, initial_delay=resync_s)(
        changed
    )

    @kopf.on.delete(*resource, registry=reg)
    async def deleted(body: kopf.Body, **_: Any) -> None:
        await reconciler().delete(body)

    return reg
