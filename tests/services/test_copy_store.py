"""A copy's durable state: what a restart reads back is what was written, a torn tail
is dropped quietly, a damaged one marks the copy damaged until it is repaired."""

from __future__ import annotations

from pathlib import Path

from constellation.replication.replica import Replica
from services.replica.store import CopyStore
from tests.replication.harness import SETTINGS, Shard
from tests.sim.guild import restart


def written(folder: Path, payments: int = 6) -> Shard:
    """A shard whose copy 2 writes through a ``CopyStore`` in ``folder``."""
    shard = Shard()
    store = CopyStore(folder)
    store.load()
    disk_write = shard.disks[2].write

    def write(ready, upto=None):  # type: ignore[no-untyped-def]
        store.write(ready)
        disk_write(ready, upto)

    shard.disks[2].write = write  # type: ignore[method-assign]
    shard.until(lambda: shard.leader() == 0)
    for _ in range(payments):
        height = shard.pay()
        shard.until(lambda h=height: shard.confirmed_everywhere(h))  # type: ignore[misc]
    store.close()
    return shard


def restarted(shard: Shard, folder: Path) -> Replica:
    loaded = CopyStore(folder).load()
    return restart(loaded, 0, 0, 2, shard.keys, shard.make(), shard.clock, lambda: 0.5, SETTINGS)


def test_a_restart_reads_back_the_term_the_vote_the_snapshot_and_the_log(tmp_path: Path) -> None:
    shard = written(tmp_path, payments=SETTINGS.snapshot_every + SETTINGS.keep + 4)
    live = shard.replicas[2]
    again = restarted(shard, tmp_path)
    assert (again.term, again.vote) == (live.term, live.vote)
    assert again.snap.height == live.snap.height > 0
    assert again.last == live.last
    assert again.hash_at(again.last) == live.hash_at(live.last)
    assert again.state_root() == live.state_root()
    assert not again.damaged
    assert len(list(tmp_path.glob("*.tmp"))) == 0


def test_a_torn_last_write_is_dropped_quietly(tmp_path: Path) -> None:
    shard = written(tmp_path)
    log = tmp_path / "blocks.log"
    data = log.read_bytes()
    log.write_bytes(data[:-7])  # the last block's frame, cut short by a crash
    again = restarted(shard, tmp_path)
    assert again.last == shard.replicas[2].last - 1
    assert not again.damaged
    assert log.stat().st_size < len(data) - 7  # the torn frame is gone from the file


def test_a_corrupt_block_marks_the_copy_damaged_until_it_is_repaired(tmp_path: Path) -> None:
    shard = written(tmp_path)
    log = tmp_path / "blocks.log"
    data = bytearray(log.read_bytes())
    data[-3] ^= 0x40  # a bit flips in the last block
    log.write_bytes(bytes(data))
    again = restarted(shard, tmp_path)
    assert again.damaged
    assert again.last == shard.replicas[2].last - 1
    # Another restart before any repair still knows.
    store = CopyStore(tmp_path)
    assert store.load().damaged
    # Caught up by the leader of a later term (its own disk may hold blocks of the
    # current one, but not all): the replica says it is whole again.
    shard.replicas[2] = again
    shard.disks[2].write = store.write  # type: ignore[assignment]
    shard.stop(0)
    shard.until(lambda: shard.leader() == 1)
    height = shard.pay()
    shard.until(lambda: shard.confirmed_everywhere(height))
    store.close()
    assert not again.damaged
    assert not CopyStore(tmp_path).load().damaged
