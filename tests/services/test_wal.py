"""The worker's logs: durable frames, a torn or corrupt tail cut with a log line, and the
events log read by height in bounded pages."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from constellation.protocol.ledger import (
    Aborted,
    Block,
    BlockEvents,
    CoinChange,
    decode_block_events,
    encode,
    encode_block_events,
)
from services import runtime
from services.partition import wal
from services.partition.wal import BlockLog, EventLog


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
