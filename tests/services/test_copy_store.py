"""A copy's durable state: what a restart reads back is what was written, a torn tail
is dropped quietly, a damaged one marks the copy damaged until it is repaired (and the
repairing blocks are on disk), and a snapshot installed before a crash is what it
restarts on."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import services.replica.store as st
from constellation.replication.replica import Ready, Replica
from services.partition import wal
from services.partition.wal import MAX_FRAME
from services.replica import moves
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
    assert again.snap.proof == live.snap.proof and live.snap.proof is not None
    assert again.last == live.last
    assert again.hash_at(again.last) == live.hash_at(live.last)
    assert again.state_root() == live.state_root()
    assert not again.damaged
    assert len(list(tmp_path.glob("*.tmp"))) == 0


def test_the_log_is_synced_before_its_blocks_are_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block written but not synced when the copy was killed is in the page cache:
    read back unsynced, it would be acked while a power loss could still take it."""
    written(tmp_path)
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    store = CopyStore(tmp_path)
    assert store.load().blocks and synced == [store._fd]


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


class PowerLost(Exception):
    """The machine lost power: what was not fsynced is not on the disk."""


def test_the_damaged_mark_is_cleared_only_once_the_repairing_blocks_are_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard = written(tmp_path)
    log = tmp_path / "blocks.log"
    data = bytearray(log.read_bytes())
    data[-3] ^= 0x40
    log.write_bytes(bytes(data))
    again = restarted(shard, tmp_path)
    store = CopyStore(tmp_path)
    assert store.load().damaged
    shard.replicas[2] = again

    def write(ready: Ready, upto: int | None = None) -> None:
        if ready.repaired:  # power lost as the blocks that repair it go to the log
            monkeypatch.setattr(st, "write_all", in_the_log)
        store.write(ready)

    def in_the_log(fd: int, data: bytes) -> None:
        if fd == store._fd:
            raise PowerLost
        wal.write_all(fd, data)

    shard.disks[2].write = write  # type: ignore[method-assign,assignment]
    shard.stop(0)
    with pytest.raises(PowerLost):
        shard.until(lambda: shard.leader() == 1)
        height = shard.pay()
        shard.until(lambda: shard.confirmed_everywhere(height))
    store.close()
    assert CopyStore(tmp_path).load().damaged  # it does not vote as if whole


def _lost(fd: int, data: bytes) -> None:
    raise PowerLost


def test_a_frame_length_no_writer_writes_is_damage_not_a_torn_write(tmp_path: Path) -> None:
    written(tmp_path)
    log = tmp_path / "blocks.log"
    data = bytearray(log.read_bytes())
    data[0] ^= 0x80  # the first frame's length: past any frame written
    log.write_bytes(bytes(data))
    loaded = CopyStore(tmp_path).load()
    assert loaded.damaged and not loaded.blocks


def test_a_tail_of_zeros_is_a_torn_write_not_damage(tmp_path: Path) -> None:
    shard = written(tmp_path)
    with open(tmp_path / "blocks.log", "ab") as f:
        f.write(bytes(4096))  # the file grew, its data never came
    loaded = CopyStore(tmp_path).load()
    assert not loaded.damaged
    assert loaded.blocks[-1].signed.header.height == shard.replicas[2].last


def test_a_snapshot_larger_than_a_log_frame_reads_back(tmp_path: Path) -> None:
    store = CopyStore(tmp_path)
    store.load()
    big = os.urandom(1024) * ((MAX_FRAME >> 10) + 1)
    store._write_whole("snapshot", big)
    assert store._read_whole("snapshot") == big
    store.close()


def test_a_snapshot_installed_before_a_crash_cut_the_log_restarts_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy's own blocks on disk, a leader's snapshot of another history installed
    over them, power lost before the log was cut: it restarts on the snapshot alone."""
    mine = written(tmp_path, payments=20)
    other = Shard(seed=7)
    other.until(lambda: other.leader() == 0)
    for _ in range(18):
        height = other.pay(count=2)
        other.until(lambda h=height: other.confirmed_everywhere(h))  # type: ignore[misc]
    snap = other.replicas[0].snap
    store = CopyStore(tmp_path)
    assert store.load().blocks[-1].signed.header.height > snap.height
    monkeypatch.setattr(store, "_truncate", lambda _: _lost(0, b""))
    with pytest.raises(PowerLost):
        store.write(Ready(snapshot=snap, truncate=0, confirmed=snap.height))
    store.close()
    loaded = CopyStore(tmp_path).load()
    assert loaded.snapshot is not None and loaded.snapshot.hash == snap.hash
    assert not loaded.blocks and not loaded.damaged
    again = restarted(mine, tmp_path)
    assert again.snap.height == snap.height and again.last == snap.height
    # it goes on from the snapshot: the leader's next block, and another restart
    [above] = [b for b in other.replicas[0].log if b.signed.header.height == snap.height + 1]
    store = CopyStore(tmp_path)
    store.load()
    store.write(Ready(append=[above]))
    store.close()
    loaded = CopyStore(tmp_path).load()
    assert not loaded.damaged and [b.signed.header.height for b in loaded.blocks] == [
        snap.height + 1
    ]


def test_a_drop_cut_short_leaves_no_part_of_the_copy_under_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A released folder being deleted when the power goes: what is left is never
    taken for the copy (hosted, it would have forgotten its term and vote)."""
    folder = tmp_path / "0.0.2"
    written(folder)
    moves.release(folder)

    def cut_short(path: Path, ignore_errors: bool = False) -> None:
        for name in sorted(p.name for p in path.iterdir())[::-1][:2]:  # released first
            (path / name).unlink()
        raise PowerLost

    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", cut_short)
        with pytest.raises(PowerLost):
            moves.drop(folder)
    assert not folder.exists()  # not hosted, nor fetched over: gone
    moves.clear_drops(tmp_path)  # the machine, starting again
    assert list(tmp_path.iterdir()) == []
    written(folder)  # fetched here again later, released and dropped again
    moves.release(folder)
    moves.drop(folder)
    assert list(tmp_path.iterdir()) == []
