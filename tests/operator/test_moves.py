"""The operator changes its member's machines over a real local guild: the Kubernetes API
is the emulator, the machines are the guild's own processes (``services.devnet``), and
this test plays the kubelet (a machine StatefulSet the operator makes is started by the
guild's supervisor and reported ready once its process is; one it deletes is stopped).

A machine added: created, then the copies move to it. A machine removed: the copies move
off first, then its StatefulSet goes. An operator restarted in the middle of a change
carries on from the placement. A change whose moves wait on a machine that does not
answer is Degraded with the reason, and the machine that still holds copies is kept. A
GuildRebalance shows its plan and changes nothing until approved, then walks to Done."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from constellation.replication.placement import Placement
from services.bus import load_placement
from services.devnet import guild
from services.devnet.procs import ready
from services.devnet.supervisor import want_machines
from services.operator.rebalance import planned
from services.operator.render import MACHINE
from services.operator.spec import API_VERSION
from services.runtime import connect_nats
from tests.operator.conftest import NS, Api, Running, eventually
from tests.operator.localguild import documents, op0
from tests.system.guild import local_guild

MOVES_S = 90  # a change of machines on this machine, moves included
OTHERS = ["g1-nats", "g1-redis", "g1-postgres", "g1-services"]


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    with local_guild("cst-opmoves-", operators=2) as directory:
        yield directory


async def kubelet(api: Api, where: Path) -> None:
    """Run op0's machines as their StatefulSets say, and report the ready ones (and the
    guild's other workloads, which the local guild runs already) ready."""
    folder = where / "op0"
    while True:
        sets = await api.kube.list("StatefulSet", NS, {})
        machines = {
            int(o["metadata"]["labels"][MACHINE]): o
            for o in sets
            if MACHINE in o["metadata"].get("labels", {})
        }
        if machines and len(op0(where).machines) != max(machines) + 1:
            await asyncio.to_thread(want_machines, folder, max(machines) + 1)
        running = {m.index: m for m in op0(where).machines}
        up = [o for o in sets if o["metadata"]["name"] in OTHERS]
        for index, obj in machines.items():
            have = running.get(index)
            if have is not None and ready(have.http_port):
                up.append(obj)
        for obj in up:
            st = obj.get("status", {})
            if st.get("observedGeneration", 0) < obj["metadata"]["generation"] or not st.get(
                "readyReplicas"
            ):
                await api.settle([obj["metadata"]["name"]])
        await asyncio.sleep(0.2)


async def placement(where: Path) -> Placement:
    net = op0(where)
    nc = await connect_nats(net.nats_url, "test-operator-moves")
    try:
        found = await load_placement(nc, "op0")
    finally:
        await nc.close()
    assert found is not None
    return found[0]


@pytest.fixture
async def playing(api: Api, where: Path) -> AsyncIterator[None]:
    task = asyncio.create_task(kubelet(api, where))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def set_machines(api: Api, where: Path, count: int) -> None:
    doc = documents(where)[-1]["spec"]
    doc["members"][0]["machines"] = count
    await api.patch_spec({"members": doc["members"]})


async def settled_at(api: Api, where: Path, count: int) -> bool:
    have = await api.guild()
    status = (have or {}).get("status", {})
    names = {o["metadata"]["name"] for o in await api.kube.list("StatefulSet", NS, {})}
    machines = {n for n in names if n.startswith("g1-machine-")}
    return (
        (await placement(where)).done(count)
        and machines == {f"g1-machine-{m}" for m in range(count)}
        and len(op0(where).machines) == count
        and status.get("phase") == "Running"
        and not status.get("placement", {}).get("moving")
    )


class Operator:
    """op0's operator, running against the emulator, restartable."""

    def __init__(self, k8s: Any, where: Path) -> None:
        self.k8s, self.where = k8s, where
        self.running = self._new()

    def _new(self) -> Running:
        addr = f"127.0.0.1:{op0(self.where).nats_port}"
        server = str(self.k8s.url).rstrip("/")
        return Running(server, OPERATOR_NATS_ADDR=addr, OPERATOR_STALL_S="4")

    async def restart(self) -> None:
        await self.running.stop()
        self.running = self._new()
        await self.running.start()


@pytest.fixture
async def operator(api: Api, k8s: Any, where: Path, playing: None) -> AsyncIterator[Operator]:
    """The Guild of op0 (2 machines) and its operator; both gone afterwards."""
    docs = documents(where)
    for doc in docs[:-1]:
        await api.secret(doc)
    op = Operator(k8s, where)
    await op.running.start()
    await api.create_guild(docs[-1])
    yield op
    await op.running.stop()
    await api.delete_guild()


async def test_machines_added_and_removed_move_the_copies_and_a_restart_resumes(
    api: Api, where: Path, operator: Operator
) -> None:
    await eventually(lambda: settled_at(api, where, 2), "the Guild runs on 2 machines")
    have = await api.guild()
    assert have is not None and have["status"]["placement"]["version"] >= 1

    await set_machines(api, where, 3)
    await eventually(lambda: settled_at(api, where, 3), "3 machines", MOVES_S)
    assert {r["machine"] for r in guild.copies([op0(where)])} == {0, 1, 2}

    leaving = op0(where).machines[2].pid
    os.kill(leaving, signal.SIGSTOP)  # the change waits on it: its moves stay begun
    try:
        await set_machines(api, where, 2)
        await eventually(lambda: _moving(where), "copies moving off machine 2", MOVES_S)
        await operator.restart()  # an operator restarted in the middle of the change
    finally:
        os.kill(leaving, signal.SIGCONT)
    await eventually(lambda: settled_at(api, where, 2), "2 machines again", MOVES_S)
    assert {r["machine"] for r in guild.copies([op0(where)])} == {0, 1}


async def _moving(where: Path) -> bool:
    p = await placement(where)
    return p.goal_machines == 2 and any(spot.moving for spot in p.spots)


async def test_a_removal_that_cannot_be_drained_is_refused_with_the_reason(
    api: Api, where: Path, operator: Operator
) -> None:
    await set_machines(api, where, 3)
    await eventually(lambda: settled_at(api, where, 3), "3 machines", MOVES_S)
    frozen = op0(where).machines[0].pid  # the copies leaving machine 2 go to 0 and 1
    os.kill(frozen, signal.SIGSTOP)
    try:
        await set_machines(api, where, 2)
        degraded = await eventually(lambda: _degraded(api), "the Guild is Degraded", MOVES_S)
        assert "waiting: " in degraded["message"] and "-> 0" in degraded["message"]
        assert await api.kube.get("StatefulSet", NS, "g1-machine-2") is not None  # kept
    finally:
        os.kill(frozen, signal.SIGCONT)
    await eventually(lambda: settled_at(api, where, 2), "2 machines", MOVES_S)
    assert (await api.condition("Degraded"))["status"] == "False"


async def _degraded(api: Api) -> dict[str, Any] | None:
    found = await api.condition("Degraded")
    return found if found["status"] == "True" else None


def rebalance(name: str, machines: int, approve: bool = False) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "GuildRebalance",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"guild": "g1", "machines": machines, "approve": approve},
    }


async def _rebalance(api: Api, name: str, phase: str, waiting: str) -> dict[str, Any] | None:
    found = await api.kube.get("GuildRebalance", NS, name)
    st: dict[str, Any] = (found or {}).get("status", {})
    return st if st.get("phase") == phase and st.get("waitingFor", "").startswith(waiting) else None


async def test_a_rebalance_shows_its_plan_and_moves_the_copies_once_approved(
    api: Api, where: Path, operator: Operator
) -> None:
    await eventually(lambda: settled_at(api, where, 2), "the Guild runs on 2 machines")
    before = await placement(where)
    await api.kube.create(rebalance("g1-three", 3))
    proposed = await eventually(
        lambda: _rebalance(api, "g1-three", "Proposed", "approval"), "the plan, to approve"
    )
    assert proposed["plan"] == planned(before, 3) and proposed["plan"]
    assert {m["to"] for m in proposed["plan"]} == {2}
    await asyncio.sleep(2)  # not approved: nothing changes
    assert (await placement(where)).version == before.version and len(op0(where).machines) == 2

    await api.kube.patch(rebalance("g1-three", 3, approve=True))
    done = await eventually(lambda: _rebalance(api, "g1-three", "Done", ""), "Done", MOVES_S)
    assert [h["phase"] for h in done["history"]] == ["Proposed", "Moving", "Done"]
    assert done["plan"] == proposed["plan"]
    await eventually(lambda: settled_at(api, where, 3), "3 machines", MOVES_S)
    guild_now = await api.guild()
    assert guild_now is not None and guild_now["spec"]["members"][0]["machines"] == 3

    await api.kube.create(rebalance("g1-two", 2, approve=True))  # approved at once
    await eventually(lambda: _rebalance(api, "g1-two", "Done", ""), "back to 2", MOVES_S)
    await eventually(lambda: settled_at(api, where, 2), "2 machines", MOVES_S)
    for name in ("g1-three", "g1-two"):
        await api.kube.delete("GuildRebalance", NS, name)
