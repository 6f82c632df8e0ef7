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
from collections.abc import Callable
from typing import Any

import kopf
import msgspec
import nats
from nats.aio.client import Client
from nats.errors import Error as NatsError

from constellation.errors import MessageError
from constellation.membership import Change, KeyPlan, KeysSeen, Observed, Phase
from constellation.replication.members import Agreement
from constellation.replication.placement import Placement
from services.bus import (
    load_agreement,
    load_key_plan,
    load_keys_seen,
    load_members_seen,
    load_placement,
    publish_agreement,
    publish_key_plan,
)
from services.operator import rebalance as rb
from services.operator.changes import PLURAL as CHANGES
from services.operator.changes import (
    began,
    change_status,
    final_voters,
    key_status,
    learnt,
    observed,
    read_change,
    to_agree,
    voted,
)
from services.operator.kube import Connection, Kube, KubeError
from services.operator.metrics import Metrics
from services.operator.reconcile import (
    STORAGE,
    Key,
    Moves,
    Plan,
    key_of,
    moves,
    placement_status,
    plan,
    status,
)
from services.operator.render import (
    GUILD,
    MAX_NAME,
    NATS_PORT,
    NATS_SELF,
    Obj,
    Renderer,
    generated_keys,
    generated_values,
    owner_reference,
)
from services.operator.spec import (
    API_VERSION,
    GROUP,
    VERSION,
    BadGuild,
    GuildSpec,
    Image,
    check_keys,
    read_spec,
)
from services.replica.moves import advance
from services.runtime import close_nats

PLURAL = "guilds"
OBSERVED = ("ConfigMap", "Service", "StatefulSet", "PodDisruptionBudget")
_log = logging.getLogger("operator")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _quiet(exc: Exception) -> None:
    """nats-py's error callback: an unreachable NATS is said once, by ``_moves``."""


def _condition(status: Any, kind: str) -> Obj:
    """The condition ``kind`` of a status, without its times ({} where there is none)."""
    for c in (status or {}).get("conditions", []):
        if c["type"] == kind:
            return {k: c.get(k) for k in ("status", "reason", "message")}
    return {}


def _secret_data(secret: Obj) -> dict[str, str]:
    try:
        return {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise BadGuild(f"Secret {secret['metadata']['name']}: {exc}") from None


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        metrics: Metrics,
        image: Image,
        nats_addr: str = "",
        stall_s: float = 120.0,
    ) -> None:
        """``image``: the operator's own, which a Guild's services run unless it names
        another. ``nats_addr``: where every Guild's NATS is reached (host:port), for an
        operator outside the cluster; "": its Service in the Guild's namespace.
        ``stall_s``: a change of machines none of whose moves ends for this long is
        stuck (the Guild is Degraded, saying which moves wait)."""
        self.kube = kube
        self.metrics = metrics
        self.image = image
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
        have = {k: base64.b64decode(v).decode() for k, v in data.items()}
        for k, value in generated_values(missing, have).items():
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
        storage = _condition(st, STORAGE)
        if storage.get("status") == "False" and storage != _condition(body.get("status"), STORAGE):
            _log.warning(
                "a manual step is needed", extra={"guild": meta["name"], "step": storage["message"]}
            )
            kopf.warn(body, reason=storage["reason"], message=storage["message"])
        return st

    async def _reconcile(self, body: Any) -> Obj:
        meta = body["metadata"]
        previous = body.get("status") or {}
        generation = int(meta.get("generation", 1))
        try:
            spec = read_spec(body["spec"])
            if len(meta["name"]) > MAX_NAME:
                # the API server would refuse its pods' labels: none would ever run
                raise BadGuild(f"a Guild's name is at most {MAX_NAME} characters")
        except BadGuild as exc:
            return status(None, {}, previous, generation, str(exc), _now(), [])
        owner = owner_reference(body)
        renderer = Renderer(meta["name"], meta["namespace"], spec, owner, image=self.image)
        problem: str | None = None
        observed: dict[Key, Obj] = {}
        peers: list[str] = []
        queued: list[str] = []
        held: list[str] = []
        found: Placement | None = None
        voters: list[int] | None = None
        now = _now()
        try:
            peers = await self._user_secrets(spec, renderer.namespace)
            await self._generated(renderer)
            observed = await self.observe(renderer)
            mv, found, voters = await self._moves(renderer, observed)
            renderer = Renderer(
                meta["name"], meta["namespace"], spec, owner, mv.machines, image=self.image
            )
            todo = plan(renderer, observed, mv.remove)
            queued, held = todo.waiting, todo.held
            refused = await self._apply(body, renderer.namespace, todo, observed)
            problem = todo.refused or (
                f"the API server refused: {'; '.join(refused)} (tried again at the next reconcile)"
                if refused
                else None
            )
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
            voters,
            held,
        )

    async def _apply(
        self, body: Any, namespace: str, todo: Plan, observed: dict[Key, Obj]
    ) -> list[str]:
        """Create, patch and delete what ``todo`` says, each on its own: what the API server
        refuses is said (and tried again at the next reconcile), and the rest still goes. The
        configuration goes first, and while a ConfigMap is refused no StatefulSet changes:
        its pods would start on the configuration before under the new one's hash, and
        not restart once it comes."""
        refused: list[str] = []

        def refuse(exc: KubeError) -> None:
            refused.append(str(exc))
            _log.warning("refused", extra={"guild": body["metadata"]["name"], "error": str(exc)})

        writes = [(self.kube.create, "Created", o) for o in todo.create]
        writes += [(self.kube.patch, "Updated", o) for o in todo.patch]
        writes.sort(key=lambda w: w[2]["kind"] != "ConfigMap")  # stable: in render order
        unconfigured = False
        for write, reason, obj in writes:
            if unconfigured and obj["kind"] == "StatefulSet":
                continue
            try:
                observed[key_of(obj)] = await write(obj)
            except KubeError as exc:
                refuse(exc)
                unconfigured = unconfigured or obj["kind"] == "ConfigMap"
                continue
            self._event(body, reason, obj)
            self.metrics.applied.inc()
        if unconfigured:
            refused.append("no StatefulSet changes until the configuration is applied")
        for name in todo.delete:
            try:
                await self.kube.delete("StatefulSet", namespace, name)
            except KubeError as exc:
                refuse(exc)
                continue
            observed.pop(("StatefulSet", name), None)
            self._event(body, "Removed", {"kind": "StatefulSet", "metadata": {"name": name}})
            self.metrics.applied.inc()
        return refused

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

    async def _connect(self, renderer: Renderer) -> Client:
        return await nats.connect(
            await self._nats_url(renderer),
            connect_timeout=2,
            allow_reconnect=False,
            max_reconnect_attempts=1,  # fails at once where nothing answers (0 hangs)
            reconnect_time_wait=0,
            error_cb=_quiet,
        )

    async def _moves(
        self, renderer: Renderer, observed: dict[Key, Obj]
    ) -> tuple[Moves, Placement | None, list[int] | None]:
        """The member's placement (None where its NATS does not answer, or no machine
        has started yet) and what it asks of the machines; one step of a change of
        their number, where one may be taken now; and the members that vote, as the
        member agreed (None where its NATS does not answer)."""
        spec = renderer.spec
        try:
            nc = await self._connect(renderer)
        except (NatsError, OSError, TimeoutError) as exc:
            _log.info("NATS not reached", extra={"guild": renderer.n.guild, "error": str(exc)})
            return moves(renderer, None, observed), None, None
        try:
            found = await load_placement(nc, spec.operator)
            placement = found[0] if found else None
            mv = moves(renderer, placement, observed)
            if mv.drive:
                placement = await advance(nc, spec.operator, spec.machines)
                mv = moves(renderer, placement, observed)
            agreement = await load_agreement(nc, spec.operator)
            voters = agreement.voters[-1] if agreement else spec.layout().founding
            return mv, placement, voters
        except (NatsError, TimeoutError, MessageError) as exc:
            _log.warning("placement not read", extra={"guild": renderer.n.guild, "error": str(exc)})
            return moves(renderer, None, observed), None, None
        finally:
            await close_nats(nc)

    # -- GuildChange -------------------------------------------------------------------

    async def reconcile_change(self, body: Any) -> Obj:
        """One look at a GuildChange (``changes.py``): what its Guild's member observes
        of the change's work, the phase that lets it take, and its new status."""
        meta = body["metadata"]
        async with self._locks.setdefault(meta["uid"], asyncio.Lock()):
            st = await self._reconcile_change(body)
        self.metrics.changes.labels(st["phase"]).inc()
        if st["phase"] != (body.get("status") or {}).get("phase"):
            kopf.info(body, reason=st["phase"], message=f"phase {st['phase']}")
        return st

    async def _reconcile_change(self, body: Any) -> Obj:
        meta, ns = body["metadata"], body["metadata"]["namespace"]
        previous = body.get("status") or {}
        generation = int(meta.get("generation", 1))
        now = _now()
        change: Change | None = None
        before: list[int] | None = previous.get("before")
        at: int | None = previous.get("agreedAt")
        final: list[int] | None = None
        approved: list[str] = []
        seen, shards, problem = Observed(), (0, 0), ""
        keys: KeysSeen | None = None
        try:
            name = str(body.get("spec", {}).get("guild", ""))
            guild = await self.kube.get("Guild", ns, name)
            if guild is None:
                raise BadGuild(f"no Guild {name!r} in namespace {ns}")
            gspec = read_spec(guild["spec"])
            renderer = Renderer(
                guild["metadata"]["name"], ns, gspec, owner_reference(guild), image=self.image
            )
            earlier = await self._earlier(body, "GuildChange", name)
            nc = await self._connect(renderer)
            try:
                agreement = await load_agreement(nc, gspec.operator)
                agreed = agreement or Agreement([gspec.layout().founding])
                if before is None or at is None:
                    before, at = began(agreed, body["spec"], gspec)
                spec, change = read_change(body["spec"], gspec, before)
                final, approved = final_voters(change, gspec), spec.approve
                phase = Phase(previous.get("phase", Phase.PROPOSED.value))
                if earlier and phase is Phase.PROPOSED:
                    raise BadGuild(f"waiting for GuildChange {earlier} to finish first")
                extended = to_agree(agreed, at, final, phase, sorted(set(final) - set(before)))
                if extended is not None:
                    await publish_agreement(nc, gspec.operator, extended)
                    _log.info("members agreed", extra={"guild": name, "agreement": extended})
                machines = gspec.members[gspec.me].machines
                reported = await load_members_seen(nc, gspec.operator, machines)
                shards = voted(final, gspec, reported)
                keys = await self._key_plan(nc, gspec.operator, change, final, phase)
            finally:
                await close_nats(nc)
            seen = observed(shards, learnt(change, gspec, reported), keys)
        except BadGuild as exc:
            problem = str(exc)
        except KubeError as exc:
            problem = f"the API server refused: {exc}"
        except (NatsError, OSError, TimeoutError, MessageError, ValueError) as exc:
            problem = f"the member's NATS: {exc}"
        st = change_status(
            previous, generation, now, change, before, final, approved, seen, shards, problem
        )
        return st | {"agreedAt": at} | key_status(keys)

    async def _key_plan(
        self, nc: Client, operator: str, change: Change, final: list[int], phase: Phase
    ) -> KeysSeen | None:
        """From Resharing on, the member agrees (in its NATS KV) that the new voters make
        the new key, and from Moving on, that its coins move to it: its own services act
        on that (``services.indexer.keys``); a move agreed is never taken back (the
        coins may be moving). What they report of it."""
        if phase not in (Phase.RESHARING, Phase.MOVING, Phase.DONE):
            return None
        plan = KeyPlan(final, change.threshold, move=phase is not Phase.RESHARING)
        moving = msgspec.structs.replace(plan, move=True)
        if await load_key_plan(nc, operator) not in (plan, moving):  # no move taken back
            await publish_key_plan(nc, operator, plan)
            _log.info("key plan agreed", extra={"voters": final, "move": plan.move})
        found = await load_keys_seen(nc, operator)
        return found if found is not None and found.of(plan) else None

    async def _earlier(self, body: Any, kind: str, guild: str) -> str | None:
        """The name of an unfinished change of ``kind`` (GuildChange, GuildRebalance) of
        ``guild`` that goes before this one, if any: one at a time. A change under way
        goes first; then the one made first (then by name: creation times are to the
        second)."""

        def order(obj: Obj) -> tuple[bool, str, str]:
            m = obj["metadata"]
            proposed = obj.get("status", {}).get("phase", Phase.PROPOSED.value) == "Proposed"
            return proposed, m.get("creationTimestamp", ""), m["name"]

        mine = order(body)
        for other in await self.kube.list(kind, body["metadata"]["namespace"], {}):
            if (
                other.get("spec", {}).get("guild") == guild
                and other["metadata"]["name"] != body["metadata"]["name"]
                and other.get("status", {}).get("phase") != Phase.DONE.value
                and order(other) < mine
            ):
                return str(other["metadata"]["name"])
        return None

    # -- GuildRebalance ----------------------------------------------------------------

    async def reconcile_rebalance(self, body: Any) -> Obj:
        """One look at a GuildRebalance (``rebalance.py``): its plan from the member's
        placement, the phase it may take, and its new status."""
        meta = body["metadata"]
        async with self._locks.setdefault(meta["uid"], asyncio.Lock()):
            st = await self._reconcile_rebalance(body)
        self.metrics.rebalances.labels(st["phase"]).inc()
        if st["phase"] != (body.get("status") or {}).get("phase"):
            kopf.info(body, reason=st["phase"], message=f"phase {st['phase']}")
        return st

    async def _reconcile_rebalance(self, body: Any) -> Obj:
        meta, ns = body["metadata"], body["metadata"]["namespace"]
        previous = body.get("status") or {}
        was = rb.Phase(previous.get("phase", rb.Phase.PROPOSED.value))
        phase, waiting, problem = was, "", ""
        plan: list[Obj] | None = None
        placement: Placement | None = None
        try:
            spec = rb.read_rebalance(body.get("spec"))
            guild = await self.kube.get("Guild", ns, spec.guild)
            if guild is None:
                raise BadGuild(f"no Guild {spec.guild!r} in namespace {ns}")
            gspec = read_spec(guild["spec"])
            renderer = Renderer(
                guild["metadata"]["name"], ns, gspec, owner_reference(guild), image=self.image
            )
            placement = await self._placement(renderer)
            if was is rb.Phase.PROPOSED:
                plan = rb.planned(placement, spec.machines)
            earlier = await self._earlier(body, "GuildRebalance", spec.guild)
            now, waiting = rb.next_phase(was, spec, placement, gspec.machines, earlier)
            if was is rb.Phase.PROPOSED and now is not was and gspec.machines != spec.machines:
                members = [dict(m) for m in guild["spec"]["members"]]
                members[gspec.me]["machines"] = spec.machines
                # the whole list is written: only over the Guild as read (an edit since,
                # a joiner appended, refused as a conflict and read again, not undone)
                version = guild["metadata"]["resourceVersion"]
                target = {"name": spec.guild, "namespace": ns, "resourceVersion": version}
                await self.kube.patch(
                    {
                        "apiVersion": API_VERSION,
                        "kind": "Guild",
                        "metadata": target,
                        "spec": {"members": members},
                    }
                )
                _log.info(
                    "rebalance approved", extra={"guild": spec.guild, "machines": spec.machines}
                )
            phase = now  # taken only once the Guild asks for its machines
        except BadGuild as exc:
            problem = str(exc)
        except KubeError as exc:
            problem = f"the API server refused: {exc}"
        return rb.rebalance_status(
            previous,
            int(meta.get("generation", 1)),
            _now(),
            phase,
            waiting,
            plan,
            placement,
            problem,
        )

    async def _placement(self, renderer: Renderer) -> Placement:
        """The member's placement, from its NATS KV; BadGuild where it cannot be read."""
        try:
            nc = await self._connect(renderer)
            try:
                found = await load_placement(nc, renderer.spec.operator)
            finally:
                await close_nats(nc)
        except (NatsError, OSError, TimeoutError, MessageError) as exc:
            raise BadGuild(f"the member's NATS: {exc}") from None
        if found is None:
            raise BadGuild("the member's placement is not known yet: no machine has started")
        return found[0]

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

    async def change(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        patch.status.update(await reconciler().reconcile_change(body))

    async def rebalance(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        patch.status.update(await reconciler().reconcile_rebalance(body))

    for plural, handler, name in ((CHANGES, change, "change"), (rb.PLURAL, rebalance, "rebalance")):
        kind = (GROUP, VERSION, plural)
        kopf.on.resume(*kind, registry=reg, id=f"{name}-resume")(handler)
        kopf.on.create(*kind, registry=reg, id=f"{name}-create")(handler)
        kopf.on.update(*kind, registry=reg, id=f"{name}-update")(handler)
        kopf.timer(*kind, registry=reg, id=f"{name}-resync", interval=resync_s)(handler)

    return reg
