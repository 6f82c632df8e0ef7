"""The replica shell (``services.replica.host.HostedCopy``) around the pure protocol:
six real copies of one shard (three operators, two each) in one event loop, messages
delivered a turn of the loop later as NATS delivers them, disks real.

The simulator processes what a step asks for at once; the shell processes it a turn
later (one write and fsync for every message that arrived), so other tasks run between
the step that wins an election and the ``Ready`` that says so. A package relayed to the
new leader in between was applied to the engine and then thrown out with the old log:
its state change stayed, the next block's state root was one no follower computes, and
the shard stalled under a leader whose blocks every copy refused.

A leader answers what a coin's state is once the block after what it read is confirmed:
a leader cut off never says a coin exists that its successor does not hold."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from constellation.keys import SigningKey
from constellation.protocol import ledger as proto
from constellation.protocol import replication as rp
from constellation.replication.replica import Ready, Role, Settings
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


def _issuance(nonce: int) -> Issuance:
    return Issuance(ISSUER.pubkey, nonce, [TxOutput(1000, OWNER.pubkey)])


def _issue(nonce: int) -> proto.Package:
    item = proto.Issue(nonce, _issuance(nonce).signed_by(ISSUER.secret).encode())
    return proto.Package(proto.PROTOCOL_VERSION, -1, "cst.op0.gw.test", 1, [item])


def _copy(
    me: int,
    folder: Path,
    deliver: Callable[[Sequence[int], rp.Envelope], None],
    settings: Settings = SETTINGS,
) -> HostedCopy:
    return HostedCopy(
        layout=LAYOUT,
        owner=0,
        worker=0,
        me=me,
        key=KEYS[me // 2],
        folder=folder / f"copy-{me}",
        replication=settings,
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


class _Shard:
    """Six copies ticking in one loop; what a copy in ``cut`` sends or is sent is lost,
    and of the rest a share ``loss`` (drawn from ``rng``)."""

    def __init__(
        self,
        folder: Path,
        settings: Settings = SETTINGS,
        loss: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self.copies: dict[int, HostedCopy] = {}
        self.cut: set[int] = set()
        self.loss, self.rng = loss, rng or random.Random(0)
        for me in range(6):
            self.copies[me] = _copy(me, folder, self._deliver_from(me), settings)

    def _deliver_from(self, me: int) -> Callable[[Sequence[int], rp.Envelope], None]:
        loop = asyncio.get_running_loop()

        def deliver(dests: Sequence[int], env: rp.Envelope) -> None:
            if me not in self.cut:
                for d in dests:
                    if d not in self.cut and self.rng.random() >= self.loss:
                        loop.call_soon(self.copies[d].step, me, env.msg)

        return deliver

    def leader(self) -> HostedCopy | None:
        return next((c for c in self.copies.values() if c.shard.accepting(c.replica)), None)

    async def elected(self) -> HostedCopy:
        await _until(lambda: self.leader() is not None)
        leader = self.leader()
        assert leader is not None
        return leader


@contextlib.asynccontextmanager
async def _shard(folder: Path, **how: Any) -> AsyncIterator[_Shard]:
    shard = _Shard(folder, **how)

    async def ticks() -> None:
        while True:
            await asyncio.sleep(0.02)
            for c in shard.copies.values():
                c.tick(time.monotonic())

    ticking = asyncio.create_task(ticks())
    try:
        yield shard
    finally:
        ticking.cancel()
        for c in shard.copies.values():
            c.close()


async def test_a_package_in_the_turn_an_election_is_won_waits_for_the_new_leaders_log(
    tmp_path: Path,
) -> None:
    async with _shard(tmp_path) as shard:
        copies = shard.copies
        first = await shard.elected()
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
    # The new leader's copy opens again from its disk (a bad block of its own would not).
    _copy(heir.me, tmp_path, lambda dests, env: None).close()


async def _coin(copy: HostedCopy, coin_id: bytes) -> str | None:
    """What ``copy`` answers of ``coin_id``: its status, or None where it says nothing."""
    answer = await copy.answer("coins", msgspec.msgpack.encode(proto.CoinQuery([coin_id])))
    if answer is None:
        return None
    (info,) = msgspec.msgpack.decode(answer, type=list[proto.CoinInfo])
    return info.status


async def test_a_coin_is_said_to_exist_only_once_the_block_that_made_it_is_confirmed(
    tmp_path: Path,
) -> None:
    coin = _issuance(3).output_ids[0]
    async with _shard(tmp_path) as shard:
        first = await shard.elected()
        first.take(_issue(1))
        await _until(lambda: first.replica.confirmed == first.replica.last > 0)
        # Cut off, the leader makes the coin in a block no other copy gets.
        shard.cut.add(first.me)
        first.take(_issue(3))
        asked = asyncio.create_task(_coin(first, coin))
        await asyncio.sleep(SETTINGS.heartbeat_s * 2)
        assert first.replica.last > first.replica.confirmed  # the block is proposed
        assert not asked.done()  # and the coin not said to exist on its strength
        await _until(lambda: shard.leader() not in (None, first))
        successor = await shard.elected()
        assert await asked is None  # the deposed leader never says it
        assert await _coin(successor, coin) == "unknown"  # the coin's block is lost
        shard.cut.clear()
        successor.take(_issue(3))  # the issuer sends it again
        assert await _coin(successor, coin) == "unspent"
        assert successor.replica.confirmed == successor.replica.last


def _watch(copy: HostedCopy, unconfirmed: list[int], lost: list[tuple[int, int]]) -> None:
    """Check, as ``copy`` writes a snapshot of its own (which drops the blocks below
    it), that the events of those blocks are synced to its events log or covered by the
    gap its twin fills: else a power loss, or a restart with a gap, loses them for good
    (their blocks are gone); ``lost`` gets (copy, snapshot) where not. Counts in
    ``unconfirmed`` the snapshots taken in a Ready that confirmed nothing new (a
    follower's, as the leader's acks came). (It runs in the loop's callbacks, where an
    exception would only be logged.)"""
    unsynced: set[int] = set()
    append, sync, write = copy.events.append, copy.events.sync, copy.store.write

    def appended(height: int, payload: bytes) -> None:
        append(height, payload)
        unsynced.add(height)

    def synced() -> None:
        sync()
        unsynced.clear()

    def written(ready: Ready) -> None:
        snap = ready.snapshot
        if snap is not None and ready.truncate != 0:  # its own, not a leader's installed
            if not ready.confirmed:
                unconfirmed.append(snap.height)
            waiting = [h for h in [*unsynced, *copy.pending] if h <= snap.height]
            if waiting and (copy.gap is None or copy.gap < snap.height):
                lost.append((copy.me, snap.height))
        write(ready)

    copy.events.append = appended  # type: ignore[method-assign]
    copy.events.sync = synced  # type: ignore[method-assign]
    copy.store.write = written  # type: ignore[method-assign]


async def test_a_copys_own_snapshot_drops_no_block_whose_events_are_not_durable(
    tmp_path: Path,
) -> None:
    """Snapshots every 6 blocks, 30% of messages lost, copy 3 away at first (back, it
    installs the leader's snapshot: its events log has a gap until its twin fills it).
    A follower also takes its snapshot when the leader's acks come in a step that
    confirms nothing new; those of its events were once left unsynced (a power loss
    then lost them, their blocks compacted away), and the gap was not grown over them
    (a restart then lost them). Every own snapshot is checked as it is written."""
    settings = Settings(
        heartbeat_s=0.05, election_s=0.3, authenticated=True, snapshot_every=6, keep=1
    )
    unconfirmed: list[int] = []
    lost: list[tuple[int, int]] = []
    for seed in range(3):
        folder = tmp_path / str(seed)
        how = {"settings": settings, "loss": 0.3, "rng": random.Random(seed)}
        async with _shard(folder, **how) as shard:
            for c in shard.copies.values():
                _watch(c, unconfirmed, lost)
            shard.cut.add(3)
            start, nonce = time.monotonic(), 0
            while time.monotonic() - start < 4:
                if time.monotonic() - start > 1.5:
                    shard.cut.clear()
                leader = shard.leader()
                if leader is not None:
                    nonce += 1
                    leader.take(_issue(nonce))
                await asyncio.sleep(0.03)
    assert unconfirmed, "no snapshot was taken as acks came"
    assert not lost, lost


async def test_a_copy_far_behind_its_leader_is_not_ready_until_it_caught_up(
    tmp_path: Path,
) -> None:
    """A copy cut off while its leader wrote 150 blocks hears the leader at once when it
    is back: it said it was ready then (its machine's ``/readyz``), and the operator's
    roll went on to restart the machine of its twin, the operator's only copy up to
    date. It is ready once it holds its leader's confirmed blocks."""
    async with _shard(tmp_path) as shard:
        behind = shard.copies[5]  # operator 2's: the owner's copies lead
        shard.cut.add(behind.me)
        nonce = 0
        while (leader := await shard.elected()).replica.confirmed < 150:
            nonce += 1
            leader.take(_issue(nonce))
            await asyncio.sleep(0.002)
            assert nonce < 5_000
        await asyncio.sleep(3 * SETTINGS.election_s)  # what it heard last is old now
        assert not behind.caught_up(time.monotonic())
        shard.cut.clear()
        seen: list[tuple[bool, int, int]] = []  # (ready, its confirmed, the leader's)

        def looked() -> bool:
            r = behind.replica
            seen.append((behind.caught_up(time.monotonic()), r.confirmed, r.leader_confirmed))
            return seen[-1][0]

        await _until(looked, 30)
    assert not seen[0][0] and seen[-1][0]
    assert all(confirmed >= told - 64 for ready, confirmed, told in seen if ready)
    assert any(told - confirmed > 64 for _, confirmed, told in seen), seen[:3]  # far behind


NATS_MAX_PAYLOAD = 1 << 20  # nats-server's default, as the devnet and the chart run it
# a record's worth past the limits: one item's (a transaction of 256 inputs, 256 outputs;
# a vote's Committed carries one, a Decide or an Issue hundreds of coin changes)
ITEM_BYTES = 40_000
ITEM_CHANGES = 512


def _check_blocks(copy: HostedCopy, above: int) -> None:
    """The leader sealed a block while taking a package, and every block above
    ``above``, and what gathers for the next, ends within one item of a block's limits:
    what NATS carries of it (its Append, its events) fits in a message."""
    replica, log = copy.replica, copy.shard.log
    assert replica.last > above
    for prev, block in enumerate(replica.blocks(above, replica.last), above):
        assert len(block.body) < proto.MAX_BLOCK_BYTES + ITEM_BYTES
        append = rp.Append(replica.term, prev, replica.hash_at(prev), [block], prev, [], [])
        assert len(rp.encode(rp.Envelope(0, 0, copy.me, append))) < NATS_MAX_PAYLOAD
        changes, _ = log.events.get(prev + 1, ([], []))
        assert len(changes) < proto.MAX_BLOCK_CHANGES + ITEM_CHANGES
    assert log.size < proto.MAX_BLOCK_BYTES + ITEM_BYTES
    assert len(log.changes) < proto.MAX_BLOCK_CHANGES + ITEM_CHANGES


async def test_one_package_of_large_issuances_makes_blocks_nats_carries(tmp_path: Path) -> None:
    """40 issuances of 256 coins each, one gateway package (under its limit): the
    package's items spread over blocks, each within the limits (before: one block whose
    events were 1.15 MB, over what NATS carries: the events pages of the shard were
    never answered, its readers stuck for ever)."""
    items: list[proto.Item] = []
    for nonce in range(40):
        outputs = [TxOutput(1000 + i, OWNER.pubkey) for i in range(256)]
        issuance = Issuance(ISSUER.pubkey, nonce, outputs).signed_by(ISSUER.secret)
        items.append(proto.Issue(nonce, issuance.encode()))
    assert sum(proto.size_of(i) for i in items) < proto.MAX_PACKAGE_BYTES
    async with _shard(tmp_path) as shard:
        leader = await shard.elected()
        before = leader.replica.last
        leader.take(proto.Package(proto.PROTOCOL_VERSION, -1, "cst.op0.gw.test", 1, items))
        _check_blocks(leader, before)
