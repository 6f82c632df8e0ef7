"""The replica shell (``services.replica.host.HostedCopy``) around the pure protocol:
six real copies of one shard (three operators, two each) in one event loop, messages
delivered a turn of the loop later as NATS delivers them, disks real.

The simulator processes what a step asks for at once; the shell processes it a turn
later (one write and fsync for every message that arrived), so other tasks run between
the step that wins an election and the ``Ready`` that says so. A package relayed to the
new leader in between was applied to the engine and then thrown out with the old log:
its state change stayed, the next block's state root was one no follower computes, and
the shard stalled under a leader whose blocks every copy refused."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from constellation.keys import SigningKey
from constellation.protocol import ledger as proto
from constellation.protocol import replication as rp
from constellation.replication.replica import Role, Settings
from constellation.tx import Issuance, TxOutput
from services.replica.config import Layout
from services.replica.host import HostedCopy

KEYS = [SigningKey(hashlib.sha256(b"operator %d" % i).digest()) for i in range(3)]
ISSUER = SigningKey(hashlib.sha256(b"issuer").digest())
OWNER = SigningKey(hashlib.sha256(b"wallet").digest())
LAYOUT = Layout.from_json(
    {
        "guild": "g",
        "workers": 1,
        "members": [
            {
                "name": f"op{i}",
                "key": k.pubkey.hex(),
                "issuers": [ISSUER.pubkey.hex()],
                "nats": "nats://127.0.0.1:1",
            }
            for i, k in enumerate(KEYS)
        ],
    }
)
SETTINGS = Settings(heartbeat_s=0.05, election_s=0.3, authenticated=True)


class _Nowhere:
    async def publish(self, subject: str, data: bytes) -> None:
        pass


def _issue(nonce: int) -> proto.Package:
    issuance = Issuance(ISSUER.pubkey, nonce, [TxOutput(1000, OWNER.pubkey)])
    item = proto.Issue(nonce, issuance.signed_by(ISSUER.secret).encode())
    return proto.Package(proto.PROTOCOL_VERSION, -1, "cst.op0.gw.test", 1, [item])


def _copy(
    me: int, folder: Path, deliver: Callable[[Sequence[int], rp.Envelope], None]
) -> HostedCopy:
    return HostedCopy(
        layout=LAYOUT,
        owner=0,
        worker=0,
        me=me,
        key=KEYS[me // 2],
        folder=folder / f"copy-{me}",
        replication=SETTINGS,
        prepare_timeout_ms=1000,
        nc=None,  # type: ignore[arg-type]  # no NATS: the test delivers
        publisher=_Nowhere(),
        deliver=deliver,
        publish_events=lambda owner, payload: None,
        members=[],
    )


async def _until(done: Callable[[], bool], timeout_s: float = 10) -> None:
    end = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < end, "not in time"
        await asyncio.sleep(0.01)


async def test_a_package_in_the_turn_an_election_is_won_waits_for_the_new_leaders_log(
    tmp_path: Path,
) -> None:
    loop = asyncio.get_running_loop()
    copies: dict[int, HostedCopy] = {}

    def deliver_from(me: int) -> Callable[[Sequence[int], rp.Envelope], None]:
        def deliver(dests: Sequence[int], env: rp.Envelope) -> None:
            for d in dests:
                loop.call_soon(copies[d].step, me, env.msg)

        return deliver

    for me in range(6):
        copies[me] = _copy(me, tmp_path, deliver_from(me))

    async def ticks() -> None:
        while True:
            await asyncio.sleep(0.02)
            for c in copies.values():
                c.tick(time.monotonic())

    ticking = asyncio.create_task(ticks())
    try:

        def leader() -> HostedCopy | None:
            return next((c for c in copies.values() if c.shard.accepting(c.replica)), None)

        await _until(lambda: leader() is not None)
        first = leader()
        assert first is not None
        height = first.replica.last
        first.take(_issue(1))
        await _until(lambda: first.replica.confirmed > height)
        # The twin wins the next election; a package reaches it in that very turn.
        heir = copies[first.me ^ 1]
        in_the_turn: list[bool] = []
        step = heir.step

        def step_and_take(sender: int, msg: rp.Message) -> None:
            was = heir.replica.role
            step(sender, msg)
            if was is not Role.LEADER and heir.replica.role is Role.LEADER:
                in_the_turn.append(heir.shard.accepting(heir.replica))
                heir.take(_issue(2))

        heir.step = step_and_take  # type: ignore[method-assign]
        first.resign()
        await _until(lambda: heir.shard.accepting(heir.replica))
        assert in_the_turn == [False]  # not before it knows it leads, its log settled
        height = heir.replica.last
        heir.take(_issue(2))  # the package's sender sends it again
        await _until(lambda: heir.replica.confirmed > height)
        assert all(c.replica.counters.refused_blocks == 0 for c in copies.values())
        await _until(lambda: all(c.replica.confirmed >= height + 1 for c in copies.values()))
        assert len({c.shard.engine.root() for c in copies.values()}) == 1  # one state
    finally:
        ticking.cancel()
        for c in copies.values():
            c.close()
    # The new leader's copy opens again from its disk (a bad block of its own would not).
    _copy(heir.me, tmp_path, lambda dests, env: None).close()
