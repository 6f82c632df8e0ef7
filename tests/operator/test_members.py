"""A GuildChange walked by the operator over a real local guild of three (the Kubernetes
API is the emulator; the machines are the guild's own processes): op2 leaves. Each phase
waits for its approval; a second change of the same guild waits for the first; Voting
writes the member's agreement, and once every member agreed (this test plays op1's and
op2's operators) every shard confirms the new voters, which the change observes from
op0's machines; an operator restarted in the middle resumes from the resource's status.
Resharing agrees to the new members' key (op0's services and op1's make it by their DKG),
Moving to the move of the coins (none held here), and the change is Done."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from nats.aio.client import Client

from constellation.membership import KeyPlan
from constellation.protocol.signer import KeyRequest
from constellation.replication.members import Agreement
from services.bus import load_agreement, publish_agreement, publish_key_plan
from services.devnet import guild
from services.operator.spec import GROUP, VERSION
from services.runtime import connect_nats
from tests.operator.conftest import NS, Api, Running, eventually
from tests.operator.localguild import documents, op0
from tests.system.guild import local_guild

T = TypeVar("T")
CHANGES = f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/guildchanges"
VOTING_S = 60


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    with local_guild("cst-opmembers-", operators=3) as directory:
        yield directory


def change(name: str, member: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "GuildChange",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"guild": "g1", "kind": "leave", "member": member, "threshold": 2, "approve": []},
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


async def agree_at(where: Path, operator: int, agreement: Agreement) -> None:
    await at(where, operator, lambda nc, name: publish_agreement(nc, name, agreement))


def running(k8s: Any, where: Path) -> Running:
    addr = f"127.0.0.1:{op0(where).nats_port}"
    return Running(str(k8s.url).rstrip("/"), OPERATOR_NATS_ADDR=addr)


@pytest.fixture
async def operator(api: Api, k8s: Any, where: Path) -> AsyncIterator[list[Running]]:
    """op0's Guild and its operator (restartable: the list's one element)."""
    docs = documents(where)
    for doc in docs[:-1]:
        await api.secret(doc)
    await api.create_guild(docs[-1])
    op = [running(k8s, where)]
    await op[0].start()
    yield op
    await op[0].stop()


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
    agreed = await eventually(lambda: agreement_at(where, 0), "op0 agreed", VOTING_S)
    assert agreed.voters == [[0, 1, 2], [0, 1]]
    for other in (1, 2):  # the other members' operators approve on their side
        await agree_at(where, other, agreed)
    voted = await eventually(
        lambda: _waiting(api, "op2-leaves", "approval of Resharing"), "voted", VOTING_S
    )
    assert voted["phase"] == "Voting" and voted["shardsVoted"] == "6/6"
    rows = guild.copies(guild.load(where)[:2])
    assert rows and all(r["voters"] == [0, 1] and r["members_confirmed"] for r in rows)
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
