"""The worker's logs: durable frames, a torn or corrupt tail cut with a log line (damage
before the end refused, nothing cut), synced before they are read back, and the events
log read by height in bounded pages."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from constellation.protocol.ledger import (
    MAX_BLOCK_BYTES,
    Aborted,
    Block,
    BlockEvents,
    CoinChange,
    Prepared,
    decode_block_events,
    encode,
    encode_block_events,
)
from services import runtime
from services.bus import Batching
from services.partition import wal
from services.partition.metrics import WorkerMetrics
from services.partition.wal import MAX_FRAME, BlockLog, DamagedLog, EventLog
from services.partition.worker import BlockWriter


def write(path: Path, count: int) -> None:
    wal = BlockLog(path)
    assert list(wal.replay()) == []
    for h in range(count):
        wal.append(encode(Block(0, h, [Aborted(bytes([h]) * 32)])))
    wal.close()


def heights(path: Path) -> list[int]:
    wal = BlockLog(path)
    found = [b.height for b in wal.replay()]
    wal.close()
    return found


def test_blocks_come_back_in_order(tmp_path: Path) -> None:
    path = tmp_path / "blocks.log"
    write(path, 5)
    assert heights(path) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("damage", "kept"),
    [
        (lambda data: data[:-3], 4),  # a torn last frame
        (lambda data: data + b"\x00\x00", 5),  # a torn next header
        (lambda data: data[:-10] + b"\xff" * 10, 4),  # a corrupt last frame
        (lambda data: data + b"\x00\x00\x00\x05\x00\x00\x00\x00hello", 5),  # bad checksum
    ],
)
def test_a_bad_tail_is_cut_and_logged(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[bytes], bytes],
    kept: int,
) -> None:
    path = tmp_path / "blocks.log"
    write(path, 5)
    path.write_bytes(damage(path.read_bytes()))
    with caplog.at_level(logging.WARNING, "partition.wal"):
        assert heights(path) == list(range(kept))
    assert "cut a log's tail" in caplog.text
    size = path.stat().st_size
    # The cut is durable: the next open reads the same blocks and cuts nothing more.
    caplog.clear()
    assert heights(path) == list(range(kept))
    assert caplog.text == "" and path.stat().st_size == size
    # And appending continues at the right height.
    wal = BlockLog(path)
    list(wal.replay())
    wal.append(encode(Block(0, kept, [])))
    wal.close()
    assert heights(path) == list(range(kept + 1))


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


@pytest.mark.parametrize(
    "damage",
    [
        lambda data, second: flip(data, second + 20),  # a bit of block 1's payload
        lambda data, second: flip(data, second + 3),  # block 1's length, one byte off
        lambda data, second: data[:second] + b"\xff" * 4 + data[second + 4 :],  # impossible
    ],
)
def test_damage_before_the_end_is_refused_and_nothing_cut(
    tmp_path: Path, damage: Callable[[bytes, int], bytes]
) -> None:
    """Blocks after the damage were durable and acknowledged: cutting there (as a torn
    tail is) once lost them, a spent coin unspent again and spendable twice."""
    path = tmp_path / "blocks.log"
    write(path, 5)
    data = path.read_bytes()
    second = len(data) // 5  # the blocks are the same size: where block 1's frame starts
    path.write_bytes(damage(data, second))
    size = path.stat().st_size
    with pytest.raises(DamagedLog, match="damaged at byte"):
        heights(path)
    assert path.stat().st_size == size  # nothing cut


def test_the_log_is_synced_before_a_block_is_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block written but not synced when its worker was killed is in the page cache:
    read back, it would be answered for while a power loss could still take it."""
    path = tmp_path / "blocks.log"
    write(path, 2)
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    blocks = BlockLog(path).replay()
    assert next(blocks).height == 0 and len(synced) == 1


def test_a_block_no_reader_could_read_back_is_not_written(tmp_path: Path) -> None:
    path = tmp_path / "blocks.log"
    write(path, 1)
    log = BlockLog(path)
    list(log.replay())
    with pytest.raises(ValueError, match="at most"):
        log.append(b"x" * (MAX_FRAME + 1))
    log.close()
    assert heights(path) == [0]


def test_a_block_out_of_sequence_ends_the_log(tmp_path: Path) -> None:
    path = tmp_path / "blocks.log"
    write(path, 2)
    wal = BlockLog(path)
    list(wal.replay())
    wal.append(encode(Block(0, 7, [])))  # what a bug or a foreign file would leave
    wal.close()
    assert heights(path) == [0, 1]


def events(height: int, prev: int, changes: int = 1) -> bytes:
    change = CoinChange(b"t" * 32, bytes([height % 256]) * 32, b"o" * 32, 5, True)
    return encode_block_events(BlockEvents(0, height, prev, [change] * changes, []))


def read_heights(log: EventLog, after: int, max_bytes: int) -> list[int]:
    return [decode_block_events(p).height for p in log.read_after(after, max_bytes)]


def test_events_are_read_by_height_in_bounded_pages(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.log")
    log.open()
    assert log.last == -1 and log.read_after(-1, 1 << 20) == []
    prev = -1
    for h in (0, 3, 4, 9, 10):
        log.append(h, events(h, prev))
        prev = h
    assert log.last == 10
    assert read_heights(log, -1, 1 << 20) == [0, 3, 4, 9, 10]
    assert read_heights(log, 3, 1 << 20) == [4, 9, 10]
    assert read_heights(log, 5, 1 << 20) == [9, 10]  # a height without events
    assert read_heights(log, 10, 1 << 20) == []
    one = len(log.read_after(-1, 1 << 20)[0]) + 8  # a frame: header and payload
    assert read_heights(log, -1, 2 * one) == [0, 3]  # whole frames within the limit
    assert read_heights(log, -1, 2 * one - 1) == [0]
    assert read_heights(log, -1, 1) == [0]  # at least one
    assert read_heights(log, 9, 1) == [10]  # the last alone
    with pytest.raises(AssertionError):
        log.append(10, events(10, 9))  # heights only grow
    log.close()


def test_events_log_cut_at_a_torn_tail_and_beyond_the_block_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "events.log"
    log = EventLog(path)
    log.open()
    for h in range(6):
        log.append(h, events(h, h - 1, changes=h + 1))
    log.close()
    path.write_bytes(path.read_bytes()[:-5])  # a machine's crash lost the last write
    log = EventLog(path)
    with caplog.at_level(logging.WARNING):
        log.open()
    assert log.last == 4 and "cut a log's tail" in caplog.text
    log.cut_from(3)  # the block log ends at height 3
    assert log.last == 2 and read_heights(log, -1, 1 << 20) == [0, 1, 2]
    log.append(3, events(3, 2))  # appending goes on where the cut was
    log.close()
    log = EventLog(path)
    log.open()
    assert read_heights(log, -1, 1 << 20) == [0, 1, 2, 3]
    log.close()


def test_a_new_log_and_its_folders_are_created_durably(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A log's name, and the folders above it that were made for it, are fsynced in their
    parents when made: fsynced blocks do not vanish with their file in a power loss. A
    log that exists is opened without it."""
    synced: list[Path] = []
    monkeypatch.setattr(runtime, "sync_dir", synced.append)
    monkeypatch.setattr(wal, "sync_dir", synced.append)
    path = tmp_path / "a" / "b" / "blocks.log"
    write(path, 1)
    assert synced == [tmp_path, tmp_path / "a", tmp_path / "a" / "b"]
    synced.clear()
    assert heights(path) == [0]
    assert synced == []


async def test_a_block_closes_at_its_bytes(tmp_path: Path) -> None:
    """Large participants' records handled in one turn of the loop (NATS runs queued
    callbacks without yielding) once made one block of 70 MB: over ``MAX_FRAME``, so
    the next start cut it and every block after it, votes already given."""
    log, events = BlockLog(tmp_path / "blocks.log"), EventLog(tmp_path / "events.log")
    list(log.replay())
    events.open()
    writer = BlockWriter(log, events, 0, Batching(4096, 0), WorkerMetrics(), lambda _: None)
    durable: list[int] = []
    for n in range(40):
        writer.add(Prepared(bytes([n]) * 37_000, 1, 1), durable.append)
    await asyncio.sleep(0)
    log.close()
    events.close()
    sizes = [len(encode(b)) for b in BlockLog(tmp_path / "blocks.log").replay()]
    assert len(durable) == 40 and len(sizes) >= 5
    assert max(sizes) <= MAX_BLOCK_BYTES + 40_000
