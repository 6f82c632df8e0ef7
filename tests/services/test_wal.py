"""The worker's block log: durable frames, and a torn or corrupt tail cut with a log line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from constellation.protocol.ledger import Aborted, Block, encode
from services.partition.wal import BlockLog


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
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: object, kept: int
) -> None:
    path = tmp_path / "blocks.log"
    write(path, 5)
    assert callable(damage)
    path.write_bytes(damage(path.read_bytes()))
    with caplog.at_level(logging.WARNING, "partition.wal"):
        assert heights(path) == list(range(kept))
    assert "cut the block log's tail" in caplog.text
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
