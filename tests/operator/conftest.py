"""The operator's tests run it against kmock's Kubernetes API emulator, with the fix-ups
a kopf operator and kubectl need from it (kmock 0.8 sets no resourceVersion, uid or
generation, answers a failed JSON-patch ``test`` with 500 where an API server says 422,
keeps a Secret's ``stringData`` apart, keeps quantities as written where an API server
writes them in their canonical form, keeps an environment variable's empty value where
an API server leaves it out, leaves ``kind`` out of list replies, and names the core
group ``/v1``), and the refusals of an API server the operator must live with
(a StatefulSet's immutable fields; what an admission webhook denies, as a test says)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime
import itertools
import json
import math
import re
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import jsonpatch
import kmock
import pytest
import yaml
from aiohttp import web

from services.operator.app import OperatorNode
from services.operator.config import Settings
from services.operator.kube import KINDS, Connection, Kube
from services.operator.reconcile import CONFIG_HASH, is_quantity, quantity
from services.operator.render import MACHINE
from services.operator.spec import GROUP, VERSION

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "constellation"
EXAMPLE = CHART / "examples" / "guild.yaml"


@attrs.frozen
class Invalid(kmock.KubernetesError):
    status: int = 422
    reason: str = "Invalid"
    message: str = "the patch's test failed: the object changed"


# What an update may change in a StatefulSet's spec (ValidateStatefulSetUpdate, in
# kubernetes' pkg/apis/apps/validation): an API server refuses any other change.
STATEFULSET_MUTABLE = (
    "replicas",
    "ordinals",
    "template",
    "updateStrategy",
    "persistentVolumeClaimRetentionPolicy",
    "minReadySeconds",
)
FORBIDDEN = (
    "spec: Forbidden: updates to statefulset spec for fields other than 'replicas', "
    "'ordinals', 'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' "
    "and 'minReadySeconds' are forbidden"
)


# The suffixes of 1024 to the power of each place, and of 1000 to the power of each key.
BINARY = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
DECIMAL = {-3: "n", -2: "u", -1: "m", 0: "", 1: "k", 2: "M", 3: "G", 4: "T", 5: "P", 6: "E"}


def canonical(text: Any) -> Any:
    """A quantity as an API server writes it back (``CanonicalizeBytes`` in apimachinery's
    resource package): in the form it was written in (binary, decimal, exponent), with
    the largest suffix that keeps the number whole (1024Mi: 1Gi, 1000m: 1, 0.5: 500m,
    1.5Gi: 1536Mi); a binary one below 1024, or not whole, is written as decimal. Not a
    quantity: as it was (an API server refuses it)."""
    value = quantity(text)
    if value is None:
        return text
    if value == 0:
        return "0"
    written = str(text)
    if written.endswith("i") and abs(value) >= 1024 and value % 1 == 0:
        power = max(p for p in range(len(BINARY)) if value % 1024**p == 0)
        return f"{int(value) // 1024**power}{BINARY[power]}"
    # Below a nano it is rounded up.
    power = max((p for p in DECIMAL if value % Decimal(1000) ** p == 0), default=-3)
    number = math.ceil(value / Decimal(1000) ** power)
    if re.search(r"\d[eE][+-]?\d+$", written):
        return f"{number}e{3 * power}" if power else str(number)
    return f"{number}{DECIMAL[power]}"


def as_stored(obj: Any, path: tuple[str, ...] = ()) -> None:
    """Writes ``obj`` (an object, or a merge patch of one) as an API server stores it and
    answers with it: each quantity in its canonical form, and an environment variable's
    empty value left out (the field is ``omitempty``: the variable is set, empty)."""
    if isinstance(obj, list):
        for item in obj:
            as_stored(item, path)
    elif isinstance(obj, dict):
        if path[-1:] == ("env",) and obj.get("value") == "":
            del obj["value"]
        for k, v in obj.items():
            if is_quantity((*path, k)) and isinstance(v, (str, int)):
                obj[k] = canonical(v)
            else:
                as_stored(v, (*path, k))


def _precondition(request: Any, current: dict[str, Any]) -> None:
    """A change naming a resourceVersion is made over that version only, as an API
    server does (else 409 Conflict)."""
    wanted = request.data.get("metadata", {}) if isinstance(request.data, dict) else {}
    version = current["metadata"]["resourceVersion"]
    if wanted.get("resourceVersion", version) != version:
        message = (
            f'Operation cannot be fulfilled on {request.resource.plural} "{request.name}":'
            " the object has been modified; please apply your changes to the latest"
            " version and try again"
        )
        raise kmock.KubernetesError(status=409, reason="Conflict", message=message)


class VersionedEmulator(kmock.KubernetesEmulator):
    """kmock's emulator, keeping the bookkeeping an API server keeps. ``denied`` (plural,
    name) -> why: the objects whose creation or change an admission webhook refuses."""

    _versions = itertools.count(1)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.denied: dict[tuple[str, str], str] = {}

    def _key(self, request: Any) -> Any:
        return (request.resource, request.namespace, request.name)

    async def _handle(self, request: Any) -> web.StreamResponse:
        if request.resource is not None and isinstance(request.data, (dict, list)):
            try:
                self._bookkeep(request)
            except kmock.KubernetesError as exc:
                return await self._render_error(exc)
        response = await super()._handle(request)
        return response

    def _bookkeep(self, request: Any) -> None:
        version = str(next(self._versions))
        if isinstance(request.data, dict) and "stringData" in request.data:
            # An API server folds a Secret's stringData into its data.
            plain = request.data.pop("stringData")
            data = request.data.setdefault("data", {})
            data.update({k: base64.b64encode(v.encode()).decode() for k, v in plain.items()})
        if isinstance(request.data, dict) and request.resource.group != GROUP:
            as_stored(request.data)  # the kinds it knows; a CRD's are as written
        if request.action in (kmock.action.CREATE, kmock.action.UPDATE):
            name = request.name or request.data.get("metadata", {}).get("name")
            why = self.denied.get((request.resource.plural, name))
            if why is not None:
                message = f'admission webhook "policy.example.com" denied the request: {why}'
                raise kmock.KubernetesError(status=400, reason="BadRequest", message=message)
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if "name" not in meta and "generateName" in meta:  # kopf's events
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:8]
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("namespace", request.namespace)
            meta["resourceVersion"] = version
            meta["generation"] = 1
            meta["creationTimestamp"] = datetime.datetime.now(datetime.UTC).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            )
            return
        if request.action != kmock.action.UPDATE or request.name is None:
            return
        key = self._key(request)
        if key not in self.objects or self.objects[key].deleted:
            return
        current = copy.deepcopy(dict(self.objects[key].raw))
        _precondition(request, current)
        if isinstance(request.data, list):
            try:
                after = jsonpatch.apply_patch(current, request.data, in_place=False)
            except jsonpatch.JsonPatchTestFailed:
                raise Invalid() from None
        else:
            after = kmock.KubernetesEmulator.Object(current)
            after.patch(request.data)
            after = dict(after.raw)
        if request.resource.plural == "statefulsets":
            fixed = [
                {k: v for k, v in o.get("spec", {}).items() if k not in STATEFULSET_MUTABLE}
                for o in (current, after)
            ]
            if fixed[0] != fixed[1]:
                raise Invalid(message=f'StatefulSet.apps "{request.name}" is invalid: {FORBIDDEN}')
        generation = current["metadata"].get("generation", 1)
        if after.get("spec") != current.get("spec"):
            generation += 1
        if isinstance(request.data, list):
            request.data[:] = [op for op in request.data if op.get("op") != "test"]
            request.data.extend(
                [
                    {"op": "add", "path": "/metadata/resourceVersion", "value": version},
                    {"op": "add", "path": "/metadata/generation", "value": generation},
                ]
            )
        else:
            meta = request.data.setdefault("metadata", {})
            meta["resourceVersion"] = version
            meta["generation"] = generation

    async def _serve_list(self, request: Any) -> Any:
        reply: Any = await super()._serve_list(request)
        kind = KIND_OF.get(request.resource.plural)
        if kind:
            for item in reply["items"]:
                item.setdefault("kind", kind)
                item.setdefault("apiVersion", API_OF[kind])
        reply["kind"] = f"{kind}List" if kind else "List"
        reply["apiVersion"] = "v1"
        return reply

    async def _serve_version(self, request: Any) -> Any:
        reply: Any = await super()._serve_version(request)
        if reply["groupVersion"].startswith("/"):
            reply["groupVersion"] = reply["groupVersion"][1:]
        return reply


KIND_OF = {plural: kind for kind, (_, plural) in KINDS.items()}
API_OF = {
    kind: (prefix.removeprefix("/api/").removeprefix("/apis/"))
    for kind, (prefix, _) in KINDS.items()
}


@pytest.fixture
async def k8s() -> AsyncIterator[VersionedEmulator]:
    """A running emulator that knows the built-in kinds and the project's own."""
    emulator = VersionedEmulator()
    emulator.resources.load_bundled()
    for kind in ("Guild", "GuildChange", "GuildRebalance"):
        singular = kind.lower()
        emulator.resources[f"{GROUP}/{VERSION}/{singular}s"] = kmock.ResourceInfo(
            kind=kind,
            singular=singular,
            namespaced=True,
            verbs={"list", "watch", "get", "create", "update", "patch", "delete"},
            subresources={"status"},
        )
    async with emulator, kmock.Server(emulator):
        yield emulator


def example() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]


NS = "default"
GUILDS = f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/guilds"
WAIT_S = 30
ROLL_S = 120  # a whole roll (NATS, then each machine, on a loaded machine)


class Running:
    """The operator's process (``OperatorNode``), in a thread with its own event loop,
    as ``python -m services.operator`` runs it."""

    def __init__(self, server: str, **env: str) -> None:
        self.settings = Settings.from_env(
            {
                "OPERATOR_KUBE_SERVER": server,
                "OPERATOR_HTTP_ADDR": "127.0.0.1:0",
                "OPERATOR_RESYNC_S": "1",
                **env,
            }
        )
        self.node = OperatorNode(self.settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await self.node.run(self._stop)

        asyncio.run(main())

    async def start(self) -> None:
        self._thread.start()
        await eventually(self.node.ready.is_set, "the operator is ready")

    async def stop(self) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        await asyncio.to_thread(self._thread.join, WAIT_S)
        assert not self._thread.is_alive(), "the operator did not stop"


async def eventually(check: Callable[[], Any], what: str, wait_s: float = WAIT_S) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.1)


class Api:
    """The test's own client: what `kubectl` would do."""

    def __init__(self, k8s: VersionedEmulator) -> None:
        self.url = str(k8s.url).rstrip("/")
        self.kube = Kube(Connection(self.url))
        self.http = aiohttp.ClientSession()

    async def close(self) -> None:
        await self.kube.close()
        await self.http.close()

    async def guild(self, name: str = "g1") -> dict[str, Any] | None:
        async with self.http.get(f"{self.url}{GUILDS}/{name}") as resp:
            return None if resp.status == 404 else await resp.json()

    async def create_guild(self, guild: dict[str, Any]) -> None:
        async with self.http.post(f"{self.url}{GUILDS}", json=guild) as resp:
            assert resp.status < 300, await resp.text()

    async def patch_spec(self, spec: dict[str, Any], name: str = "g1") -> None:
        headers = {"Content-Type": "application/merge-patch+json"}
        body = json.dumps({"spec": spec})
        async with self.http.patch(f"{self.url}{GUILDS}/{name}", data=body, headers=headers) as r:
            assert r.status < 300, await r.text()

    async def delete_guild(self, name: str = "g1") -> None:
        async with self.http.delete(f"{self.url}{GUILDS}/{name}") as resp:
            assert resp.status < 300, await resp.text()

    async def secret(self, doc: dict[str, Any]) -> None:
        await self.kube.create(copy.deepcopy(doc))

    async def phase(self, name: str = "g1") -> str | None:
        guild = await self.guild(name)
        phase = (guild or {}).get("status", {}).get("phase")
        return None if phase is None else str(phase)

    async def condition(self, kind: str) -> dict[str, Any]:
        guild = await self.guild()
        assert guild is not None
        (found,) = [c for c in guild["status"]["conditions"] if c["type"] == kind]
        return dict(found)

    async def settle(self, names: list[str]) -> None:
        """What the StatefulSet controller would report once each one's pods are up."""
        for name in names:
            have = await self.kube.get("StatefulSet", NS, name)
            assert have is not None, name
            generation = have["metadata"]["generation"]
            status = {"readyReplicas": 1, "updatedReplicas": 1, "observedGeneration": generation}
            await self.kube.patch(
                {
                    "kind": "StatefulSet",
                    "metadata": {"name": name, "namespace": NS},
                    "status": status,
                }
            )


class Kubelet:
    """Plays the StatefulSet controller and the kubelets for the Guild's StatefulSets, as
    a cluster would: a new spec replaces the pod, pending for ``restart_s``, then running;
    a machine's is ready (its /readyz) only once connected to NATS, ``reconnect_s`` after
    NATS is ready again. Of NATS and the machines, it records each replacement with
    those of them that were not ready as it began, and the most replaced at once."""

    def __init__(self, api: Api, restart_s: float = 0.3, reconnect_s: float = 0.5) -> None:
        self.api = api
        self.restart_s, self.reconnect_s = restart_s, reconnect_s
        self.replacing: dict[str, float] = {}  # name -> since
        self.nats_since: float | None = None  # NATS ready since
        self.began: list[tuple[str, list[str]]] = []  # (replaced, others not ready)
        self.most = 0
        self._task: asyncio.Task[None] | None = None

    def forget(self) -> None:
        """Record from now on (a Guild's creation starts every pod at once)."""
        self.began, self.most = [], 0

    async def __aenter__(self) -> Kubelet:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._tick(loop.time())
            await asyncio.sleep(0.05)

    async def _tick(self, now: float) -> None:
        sets = {o["metadata"]["name"]: o for o in await self.api.kube.list("StatefulSet", NS, {})}
        machines = {n for n, o in sets.items() if MACHINE in o["metadata"].get("labels", {})}
        members = machines | ({"g1-nats"} & sets.keys())
        ready = {n: sets[n].get("status", {}).get("readyReplicas", 0) >= 1 for n in members}
        for name, obj in sets.items():
            if obj.get("status", {}).get("observedGeneration", 0) < obj["metadata"]["generation"]:
                self.replacing[name] = now
                if name in members:
                    ready[name] = False
                    self.began.append((name, sorted(n for n in members - {name} if not ready[n])))
            elif name in self.replacing and now - self.replacing[name] >= self.restart_s:
                del self.replacing[name]
        self.most = max(self.most, len(members & self.replacing.keys()))
        nats_up = "g1-nats" not in self.replacing
        self.nats_since = (self.nats_since or now) if nats_up else None
        connected = self.nats_since is not None and now - self.nats_since >= self.reconnect_s
        for name, obj in sets.items():
            up = name not in self.replacing and (connected or name not in machines)
            await self._pod(obj, name not in self.replacing, up)
            status = {
                "observedGeneration": obj["metadata"]["generation"],
                "updatedReplicas": 0 if name in self.replacing else 1,
                "readyReplicas": int(up),
            }
            if obj.get("status") != status:
                meta = {"name": name, "namespace": NS}
                await self.api.kube.patch(
                    {"kind": "StatefulSet", "metadata": meta, "status": status}
                )

    async def _pod(self, sts: dict[str, Any], running: bool, ready: bool) -> None:
        """The StatefulSet's one pod: pending while it is replaced, then running."""
        template = sts["spec"]["template"]
        status: dict[str, Any] = {"phase": "Pending"}
        if running:
            status = {
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": str(ready)}],
                "containerStatuses": [
                    {"name": c["name"], "ready": ready, "state": {"running": {}}}
                    for c in template["spec"]["containers"]
                ],
            }
        name = f"{sts['metadata']['name']}-0"
        have = await self.api.kube.get("Pod", NS, name)
        if have is None:
            meta = {"name": name, "namespace": NS, "labels": template["metadata"]["labels"]}
            spec = {"containers": [{"name": "c", "image": "x"}]}
            await self.api.kube.create(
                {"kind": "Pod", "metadata": meta, "spec": spec, "status": status}
            )
        elif have.get("status") != status:
            meta = {"name": name, "namespace": NS}
            await self.api.kube.patch({"kind": "Pod", "metadata": meta, "status": status})


MACHINES = ["g1-machine-0", "g1-machine-1"]
WORKLOADS = ["g1-nats", "g1-redis", "g1-postgres", "g1-machine-0", "g1-machine-1", "g1-services"]


@pytest.fixture
async def api(k8s: VersionedEmulator) -> AsyncIterator[Api]:
    client = Api(k8s)
    yield client
    await client.close()


@pytest.fixture
async def running(k8s: VersionedEmulator) -> AsyncIterator[Running]:
    op = Running(str(k8s.url).rstrip("/"))
    await op.start()
    yield op
    await op.stop()


async def all_exist(api: Api, names: list[str]) -> bool:
    found = [await api.kube.get("StatefulSet", NS, n) for n in names]
    return all(f is not None for f in found)


async def phase_is(api: Api, phase: str) -> bool:
    return await api.phase() == phase


async def gone(api: Api) -> bool:
    return await api.guild() is None


def template_hash(obj: dict[str, Any]) -> str:
    return str(obj["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH])
