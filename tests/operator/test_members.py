"""Members leave and join real local guilds, a GuildChange walking each at op0 (the
Kubernetes API is the emulator; the machines are the guilds' own processes).

op2 leaves a guild of three. Each phase waits for its approval; a second change of the
same guild waits for the first; Voting writes the member's agreement, and once every
member agreed (this test plays op1's and op2's operators) every shard confirms the new
voters, which the change observes from op0's machines; an operator restarted in the
middle resumes from the resource's status. Resharing agrees to the new members' key
(op0's services and op1's make it by their DKG), Moving to the move of the coins (none
held here), and the change is Done.

op2 joins a guild of two (``constellation devnet join``, doing every member's part,
the machines' restarts on the layout naming it included), while op0's Guild names it
and its operator walks the change: Learning, Voting, Resharing, Moving, Done, each seen
from op0's machines and services. No payment is lost or applied twice and the books
balance; every copy at every member names the new voters, confirmed, and nobody holds a
proof against anybody; a light client pinned before the join follows the handover, and
the joiner's ledger takes payments.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from nats.aio.client import Client
from nats.errors import Error as NatsError

from constellation.lightclient import proof as pf
from constellation.lightclient.checkpointer import Announced
from constellation.membership import KeyPlan
from constellation.protocol.signer import KeyRequest
from constellation.replication.members import Agreement
from services.bus import load_agreement, publish_agreement, publish_key_plan
from services.devnet import Devnet, DevnetError, guild
from services.light import LightClient
from services.operator.render import Obj
from services.operator.spec import GROUP, VERSION
from services.runtime import connect_nats
from tests.operator.conftest import NS, Api, Running, eventually
from tests.operator.localguild import documents, op0
from tests.system.guild import local_guild, pay
from tests.system.test_guild_members import _get, _latest_above, gauges

T = TypeVar("T")
CHANGES = f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/guildchanges"
VOTING_S = 60


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    with local_guild("cst-opmembers-", operators=3) as directory:
        yield directory


def change(name: str, member: str, kind: str = "leave", approve: Sequence[str] = ()) -> Obj:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "GuildChange",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "guild": "g1",
            "kind": kind,
            "member": member,
            "threshold": 2,
            "approve": list(approve),
        },
    }


async def status(api: Api, name: str) -> dict[str, Any]:
    async with api.http.get(f"{api.url}{CHANGES}/{name}") as resp:
        assert resp.status == 200, await resp.text()
        found: dict[str, Any] = (await resp.json()).get("status", {})
        return found


async def approve(api: Api, name: str, phases: list[str]) -> None:
    headers = {"Content-Type": "application/merge-patch+json"}
    body = json.dumps({"spec": {"approve": phases}})
    async with api.http.patch(f"{api.url}{CHANGES}/{name}", data=body, headers=headers) as r:
        assert r.status < 300, await r.text()


async def at(where: Path, operator: int, act: Callable[[Client, str], Awaitable[T]]) -> T:
    """``act`` on an operator's NATS, as its operator would (``act(nc, name)``)."""
    net = guild.load(where)[operator]
    nc = await connect_nats(net.nats_url, "test-members")
    try:
        return await act(nc, net.operator)
    finally:
        await nc.close()


async def agreement_at(where: Path, operator: int) -> Agreement | None:
    return await at(where, operator, load_agreement)


async def agreement_seen(where: Path, operator: int) -> Agreement | None:
    """``agreement_at``, polled: a server too busy to answer in time (while the join
    rolls machines on a loaded machine) has not shown an agreement yet."""
    try:
        return await agreement_at(where, operator)
    except NatsError:
        return None


async def agree_at(where: Path, operator: int, agreement: Agreement) -> None:
    await at(where, operator, lambda nc, name: publish_agreement(nc, name, agreement))


def running(k8s: Any, where: Path) -> Running:
    addr = f"127.0.0.1:{op0(where).nats_port}"
    return Running(str(k8s.url).rstrip("/"), OPERATOR_NATS_ADDR=addr)


@pytest.fixture(scope="module")
def founders() -> Iterator[Path]:
    """A guild of two, that op2 joins."""
    with local_guild("cst-opjoin-", operators=2) as directory:
        yield directory


@asynccontextmanager
async def op0_operator(api: Api, k8s: Any, where: Path) -> AsyncIterator[list[Running]]:
    """op0's Guild and its operator (restartable: the list's one element)."""
    docs = documents(where)
    for doc in docs[:-1]:
        await api.secret(doc)
    await api.create_guild(docs[-1])
    op = [running(k8s, where)]
    await op[0].start()
    try:
        yield op
    finally:
        await op[0].stop()


@pytest.fixture
async def operator(api: Api, k8s: Any, where: Path) -> AsyncIterator[list[Running]]:
    async with op0_operator(api, k8s, where) as op:
        yield op


async def test_a_member_leaves_through_approved_phases(
    api: Api, k8s: Any, where: Path, operator: list[Running]
) -> None:
    async with api.http.post(f"{api.url}{CHANGES}", json=change("op2-leaves", "op2")) as r:
        assert r.status < 300, await r.text()
    waiting = await eventually(
        lambda: _waiting(api, "op2-leaves", "approval of Voting"), "the change waits"
    )
    assert waiting["phase"] == "Proposed" and waiting["voters"] == [0, 1]
    assert await agreement_at(where, 0) is None  # nothing agreed before the approval

    await asyncio.sleep(1.1)  # made a second later (creation times are to the second)
    async with api.http.post(f"{api.url}{CHANGES}", json=change("op1-leaves", "op1")) as r:
        assert r.status < 300, await r.text()
    second = await eventually(
        lambda: _waiting(api, "op1-leaves", "op2-leaves to finish"), "the second change waits"
    )
    assert [c["status"] for c in second["conditions"] if c["type"] == "Degraded"] == ["True"]

    await approve(api, "op2-leaves", ["Voting"])
    agreed = await eventually(lambda: agreement_seen(where, 0), "op0 agreed", VOTING_S)
    assert agreed.voters == [[0, 1, 2], [0, 1]]
    for other in (1, 2):  # the other members' operators approve on their side
        await agree_at(where, other, agreed)
    voted = await eventually(
        lambda: _waiting(api, "op2-leaves", "approval of Resharing"), "voted", VOTING_S
    )
    assert voted["phase"] == "Voting" and voted["shardsVoted"] == "6/6"
    # every copy at op0 and op1 too (a follower hears of its leader's confirmation with
    # the next append: the leaders' votes were counted)
    await eventually(lambda: asyncio.to_thread(_all_copies_voted, where), "every copy", VOTING_S)
    await eventually(lambda: _voting(api, [True, True, False]), "the Guild shows op2 out")

    await operator[0].stop()  # restarted in the middle: it resumes from the status
    operator[0] = running(k8s, where)
    await operator[0].start()
    await approve(api, "op2-leaves", ["Voting", "Resharing"])
    resharing = await eventually(
        lambda: _waiting(api, "op2-leaves", "new members' key"), "resharing", VOTING_S
    )
    assert [h["phase"] for h in resharing["history"]] == ["Proposed", "Voting", "Resharing"]
    await plan_at(where, 1, KeyPlan([0, 1], 2))  # op1's operator agrees on its side
    made = await eventually(
        lambda: _waiting(api, "op2-leaves", "approval of Moving"), "the key made", VOTING_S
    )
    key = bytes.fromhex(made["newKey"])
    assert made["handedOver"] is False  # the old key signs until the coins moved
    held = await asyncio.to_thread(guild.signer_request, guild.load(where)[1], KeyRequest())
    assert [k.key for k in held.keys][-1] == key and held.keys[-1].members == [0, 1]
    await approve(api, "op2-leaves", ["Voting", "Resharing", "Moving"])
    await plan_at(where, 1, KeyPlan([0, 1], 2, move=True))
    done = await eventually(lambda: _phase(api, "op2-leaves", "Done"), "done", VOTING_S)
    assert [h["phase"] for h in done["history"]][-2:] == ["Moving", "Done"]
    assert done["moves"] == [] and done["keyPlan"] == "" and done["newKey"] == key.hex()
    assert done["handedOver"] is True  # the checkpoints signed by the new key alone


async def plan_at(where: Path, operator: int, plan: KeyPlan) -> None:
    await at(where, operator, lambda nc, name: publish_key_plan(nc, name, plan))


async def _phase(api: Api, name: str, phase: str) -> dict[str, Any] | None:
    found = await status(api, name)
    return found if found.get("phase") == phase else None


async def _waiting(api: Api, name: str, what: str) -> dict[str, Any] | None:
    found = await status(api, name)
    return found if what in found.get("waitingFor", "") else None


async def _voting(api: Api, expected: list[bool]) -> bool:
    have = await api.guild()
    members = (have or {}).get("status", {}).get("members", [])
    return [m.get("voting") for m in members] == expected


async def test_a_member_joins_and_votes_signs_and_takes_payments(
    api: Api, k8s: Any, founders: Path
) -> None:
    where = founders
    before = guild.load(where)
    assert all(await asyncio.gather(*(pay(net, 60) for net in before)))
    old = (await asyncio.to_thread(guild.signer_request, before[0], KeyRequest())).first
    assert old is not None
    descriptor = pf.Descriptor.decode((await _get(before[0], "/v1/lc/descriptor"))["descriptor"])
    with pytest.raises(DevnetError, match="name taken"):
        await asyncio.to_thread(guild.join, where, "op1")

    async with op0_operator(api, k8s, where):
        joining = asyncio.create_task(asyncio.to_thread(guild.join, where, "op2"))
        await eventually(lambda: _admitted(where), "op2 admitted", VOTING_S)
        # op0's Guild names the joiner after its founders (its machines roll onto it),
        # and op0 holds what the joiner issued it
        docs = documents(where)
        await api.kube.patch(docs[1])
        await api.patch_spec({"members": docs[-1]["spec"]["members"], "founders": 2})
        learning = await eventually(lambda: _learning(where), "op0 agreed op2 learns", VOTING_S)
        assert learning == Agreement([[0, 1]], learning=[2])
        phases = ["Learning", "Voting", "Resharing", "Moving"]
        async with api.http.post(
            f"{api.url}{CHANGES}", json=change("op2-joins", "op2", "join", phases)
        ) as r:
            assert r.status < 300, await r.text()
        joined = await joining
        print(f"-- {joined}")
        done = await eventually(lambda: _phase(api, "op2-joins", "Done"), "done", VOTING_S)
        assert [h["phase"] for h in done["history"]] == ["Proposed", *phases, "Done"]
        assert done["voters"] == [0, 1, 2] and done["newKey"] == joined.key
        assert done["shardsVoted"] == "6/6" and done["handedOver"] is True
        await eventually(lambda: _voting(api, [True, True, True]), "the Guild shows op2 in")
        assert (await api.condition("Degraded"))["status"] == "False"  # the layout taken

    assert joined.voters == ["op0", "op1", "op2"]
    nets = guild.load(where)
    assert [n.operator for n in nets] == ["op0", "op1", "op2"]
    rows = guild.copies(nets)
    assert len(rows) == 2 * 3 * 3 * 2  # 2 copies x 3 members x 3 owners x 2 workers
    assert all(r["voters"] == [0, 1, 2] and r["members_confirmed"] for r in rows)
    assert not [r for r in rows if r["evidence"]], "a proof against an operator"
    assert set(gauges(nets, "replica_voters")) == {3.0}
    for worker in range(2):
        assert guild.leader(nets, f"op2/{worker}") is not None
    assert await agreement_at(where, 2) == Agreement([[0, 1], [0, 1, 2]])

    await _handed_over_to(nets, descriptor, bytes.fromhex(joined.key))
    # Payments on every ledger, the joiner's too, and through the joiner's gateway.
    assert all(await asyncio.gather(*(pay(net, 60) for net in nets)))
    assert await pay(nets[0], 30, via=nets[2])


async def _handed_over_to(nets: list[Devnet], descriptor: pf.Descriptor, new: bytes) -> None:
    """The three made the ``new`` key; the founders' signers retired the old one, and the
    joiner's holds only the new one (the chain still starts at the old)."""
    for net in nets:
        held = await asyncio.to_thread(guild.signer_request, net, KeyRequest())
        assert held.threshold_pubkey == new and [k.key for k in held.keys] == [new]
        assert held.keys[0].members == [0, 1, 2]

    # Every member, the joiner too, serves the handover and checkpoints above it; a
    # light client pinned before the join follows it.
    served = [(await _get(net, "/v1/lc/handovers", 60))["handovers"] for net in nets]
    assert served[0] == served[1] == served[2] and len(served[0]) == 1, served
    [doc] = served[0]
    assert doc["next_key"] == new[1:].hex()
    latest = await _latest_above(nets[2], doc["height"], 60)
    signed = Announced.decode(bytes.fromhex(latest["encoded"])).signed
    pin = descriptor.pin.follow(pf.SignedCheckpoint.decode(bytes.fromhex(doc["encoded"])))
    assert pf.verify_checkpoint(pin, signed) == signed.checkpoint
    assert (await _get(nets[2], "/v1/lc/descriptor"))["descriptor"] == descriptor.encode()
    async with aiohttp.ClientSession() as session:
        client = LightClient(descriptor, [nets[2].gateway_url], session)
        _, found = await client.latest()
        assert client.pin.handed == doc["height"] and found.signed.checkpoint.height > doc["height"]


async def _admitted(where: Path) -> bool:
    return len(guild.load(where)) == 3


async def _learning(where: Path) -> Agreement | None:
    found = await agreement_seen(where, 0)
    return found if found is not None and found.learning else None


def _all_copies_voted(where: Path) -> bool:
    """Whether every copy at op0 and op1 has members [0, 1], confirmed."""
    rows = guild.copies(guild.load(where)[:2])
    return bool(rows) and all(r["voters"] == [0, 1] and r["members_confirmed"] for r in rows)
