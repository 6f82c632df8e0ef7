"""The operator, running (kopf, its handlers, its ops server), against the Kubernetes API
emulator: a Guild created, rolled out, changed, refused, recovered, resumed after a
restart, and deleted through its finalizer."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import threading
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from services.operator.app import OperatorNode
from services.operator.config import Settings
from services.operator.kube import Connection, Kube
from services.operator.reconcile import CONFIG_HASH
from services.operator.render import generated_keys
from services.operator.spec import GROUP, VERSION, read_spec
from tests.operator.conftest import VersionedEmulator, example

NS = "default"
GUILDS = f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/guilds"
WAIT_S = 30


class Running:
    """The operator's process (``OperatorNode``), in a thread with its own event loop,
    as ``python -m services.operator`` runs it."""

    def __init__(self, server: str) -> None:
        self.settings = Settings.from_env(
            {
                "OPERATOR_KUBE_SERVER": server,
                "OPERATOR_HTTP_ADDR": "127.0.0.1:0",
                "OPERATOR_RESYNC_S": "1",
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
        data = {k: base64.b64encode(v.encode()).decode() for k, v in doc["stringData"].items()}
        body = {k: v for k, v in doc.items() if k != "stringData"} | {"data": data}
        await self.kube.create(body)

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


async def _create_example(api: Api) -> dict[str, Any]:
    keys, peers, guild = example()
    await api.secret(keys)
    await api.secret(peers)
    await api.create_guild(guild)
    return guild


async def test_a_guild_is_rolled_out_and_becomes_ready(api: Api, running: Running) -> None:
    guild = await _create_example(api)
    await eventually(lambda: _all_exist(api, WORKLOADS), "every workload exists")
    await eventually(lambda: _phase_is(api, "Progressing"), "the Guild is Progressing")
    layout = await api.kube.get("ConfigMap", NS, "g1-layout")
    assert layout is not None
    spec = read_spec(guild["spec"])
    assert json.loads(layout["data"]["layout.json"]) == spec.layout().to_json()
    generated = await api.kube.get("Secret", NS, "g1-generated")
    assert generated is not None and set(generated["data"]) == set(generated_keys(spec))
    assert "ownerReferences" not in generated["metadata"]  # kept when the Guild goes
    # The finalizer holds a deletion until the operator has cleaned up.
    have = await api.guild()
    assert have is not None and "constellation.dev/operator" in have["metadata"]["finalizers"]

    await api.settle(WORKLOADS)
    await eventually(lambda: _phase_is(api, "Running"), "the Guild is Running")
    ready = await api.condition("Ready")
    assert ready["status"] == "True" and ready["observedGeneration"] == 1
    have = await api.guild()
    assert have is not None
    status = have["status"]
    assert status["observedGeneration"] == 1 and status["partitionMapVersion"] == 1
    assert [m["ready"] for m in status["machines"]] == [True, True]
    assert [(m["name"], m["self"], m["credentials"]) for m in status["members"]] == [
        ("op0", True, True),
        ("op1", False, True),
        ("op2", False, True),
    ]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{running.node.ops.port}/metrics")
    text = metrics.read().decode()
    assert 'operator_reconciles_total{phase="Running"}' in text
    ready_probe = urllib.request.urlopen(f"http://127.0.0.1:{running.node.ops.port}/readyz")
    assert json.loads(ready_probe.read())["ready"] is True


async def test_a_new_neighbour_rolls_the_machines(api: Api, running: Running) -> None:
    await _create_example(api)
    await eventually(lambda: _all_exist(api, WORKLOADS), "every workload exists")
    await api.settle(WORKLOADS)
    await eventually(lambda: _phase_is(api, "Running"), "the Guild is Running")
    before = await api.kube.get("StatefulSet", NS, "g1-machine-0")
    assert before is not None
    neighbour = {
        "name": "nb0",
        "guild": "g2",
        "key": "e493dbf1c10d80f3581e4904930b1404cc6c13900ee0758474fa94abe8c4cd13",
        "nats": "nats://nats.nb0.example:4222",
    }
    await api.patch_spec({"neighbours": [neighbour]})

    async def rolled() -> bool:
        after = await api.kube.get("StatefulSet", NS, "g1-machine-0")
        assert after is not None
        return _hash(after) != _hash(before)

    await eventually(rolled, "the machines' pods are to be replaced")
    layout = await api.kube.get("ConfigMap", NS, "g1-layout")
    assert layout is not None and "nb0" in layout["data"]["layout.json"]
    nats_config = await api.kube.get("ConfigMap", NS, "g1-nats")
    assert nats_config is not None and '"nb0"' in nats_config["data"]["nats.conf"]
    await eventually(lambda: _phase_is(api, "Progressing"), "the Guild rolls out")
    generated = await api.kube.get("Secret", NS, "g1-generated")
    assert generated is not None and "issued-nb0" in generated["data"]
    await api.settle(WORKLOADS)
    await eventually(lambda: _phase_is(api, "Running"), "the Guild is Running again")


async def test_a_membership_change_is_refused_and_nothing_changes(
    api: Api, running: Running
) -> None:
    guild = await _create_example(api)
    await eventually(lambda: _all_exist(api, WORKLOADS), "every workload exists")
    await api.settle(WORKLOADS)
    await eventually(lambda: _phase_is(api, "Running"), "the Guild is Running")
    layout = await api.kube.get("ConfigMap", NS, "g1-layout")
    members = copy.deepcopy(guild["spec"]["members"])[:2]
    await api.patch_spec({"members": members, "threshold": 2})
    await eventually(lambda: _phase_is(api, "Degraded"), "the Guild is Degraded")
    degraded = await api.condition("Degraded")
    assert "members removed: op2" in degraded["message"] and degraded["reason"] == "Refused"
    assert (await api.condition("Ready"))["status"] == "False"
    after = await api.kube.get("ConfigMap", NS, "g1-layout")
    assert layout is not None and after is not None
    assert after["data"] == layout["data"]
    # Back to the running layout: Running again.
    await api.patch_spec({"members": guild["spec"]["members"], "threshold": 2})
    await eventually(lambda: _phase_is(api, "Running"), "the Guild is Running again")


async def test_a_missing_secret_degrades_until_it_comes(api: Api, running: Running) -> None:
    keys, peers, guild = example()
    await api.secret(keys)
    await api.create_guild(guild)
    await eventually(lambda: _phase_is(api, "Degraded"), "the Guild is Degraded")
    degraded = await api.condition("Degraded")
    assert "op0-peers" in degraded["message"]
    assert await api.kube.get("StatefulSet", NS, "g1-machine-0") is None
    await api.secret(peers)  # the resync picks it up: no event on the Guild is needed
    await eventually(lambda: _all_exist(api, WORKLOADS), "every workload exists")


async def test_a_guild_that_cannot_be_read_says_why(api: Api, running: Running) -> None:
    keys, peers, guild = example()
    guild["spec"]["threshold"] = 5
    await api.secret(keys)
    await api.secret(peers)
    await api.create_guild(guild)
    await eventually(lambda: _phase_is(api, "Degraded"), "the Guild is Degraded")
    assert "threshold" in (await api.condition("Degraded"))["message"]


async def test_a_restarted_operator_resumes(k8s: VersionedEmulator, api: Api) -> None:
    first = Running(api.url)
    await first.start()
    await _create_example(api)
    await eventually(lambda: _all_exist(api, WORKLOADS), "every workload exists")
    await first.stop()
    # While no operator runs, a machine's StatefulSet goes (a mistaken kubectl delete).
    await api.kube.delete("StatefulSet", NS, "g1-machine-1")
    second = Running(api.url)
    await second.start()
    try:
        await eventually(lambda: _all_exist(api, WORKLOADS), "the machine is back")
        await api.settle(WORKLOADS)
        await eventually(lambda: _phase_is(api, "Running"), "the Guild is Running")
    finally:
        await second.stop()


async def test_deleting_a_guild_keeps_its_data(api: Api, running: Running) -> None:
    await _create_example(api)
    await eventually(lambda: _all_exist(api, WORKLOADS), "every workload exists")
    await api.delete_guild()
    await eventually(lambda: _gone(api), "the Guild is gone")
    for name in WORKLOADS:
        assert await api.kube.get("StatefulSet", NS, name) is None, name
    assert await api.kube.get("ConfigMap", NS, "g1-layout") is None
    assert await api.kube.get("Secret", NS, "g1-generated") is not None


async def _all_exist(api: Api, names: list[str]) -> bool:
    found = [await api.kube.get("StatefulSet", NS, n) for n in names]
    return all(f is not None for f in found)


async def _phase_is(api: Api, phase: str) -> bool:
    return await api.phase() == phase


async def _gone(api: Api) -> bool:
    return await api.guild() is None


def _hash(obj: dict[str, Any]) -> str:
    return str(obj["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH])
