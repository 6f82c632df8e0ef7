"""A worker's block log: append-only frames on local disk, one fsync per block.

Frame: ``length:u32 crc32:u32 payload`` (big-endian), payload an encoded ``Block``.
Opening the log reads every frame; a frame cut short by a crash, or whose checksum or
contents are wrong, ends the log there: the rest is cut off and the cut logged (nothing
after it was ever acknowledged, since a block is acknowledged only once it and every
block before it are on disk).
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from constellation.errors import MessageError
from constellation.protocol.ledger import Block, decode_block

_HEAD = struct.Struct(">II")
MAX_FRAME = 64 << 20

log = logging.getLogger("partition.wal")


class BlockLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.height = 0  # blocks in the log; the next block's height
        self._fd = -1

    def replay(self) -> Iterator[Block]:
        """Yield the log's blocks in order, cutting a bad tail; then open for appending."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
        at = 0
        why = ""
        while at < len(data):
            if len(data) - at < _HEAD.size:
                why = "a torn frame header"
                break
            length, crc = _HEAD.unpack_from(data, at)
            payload = data[at + _HEAD.size : at + _HEAD.size + length]
            if length > MAX_FRAME or len(payload) < length:
                why = "a torn frame"
                break
            if zlib.crc32(payload) != crc:
                why = "a checksum mismatch"
                break
            try:
                block = decode_block(payload)
            except MessageError as exc:
                why = str(exc)
                break
            if block.height != self.height:
                why = f"block height {block.height} where {self.height} was due"
                break
            yield block
            self.height += 1
            at += _HEAD.size + length
        if at < len(data):
            log.warning(
                "cut the block log's tail",
                extra={"path": str(self.path), "offset": at, "bytes": len(data) - at, "why": why},
            )
            os.ftruncate(fd, at)
            os.fsync(fd)
        os.lseek(fd, at, os.SEEK_SET)
        self._fd = fd

    def append(self, payload: bytes) -> None:
        """Write one block and make it durable."""
        os.write(self._fd, _HEAD.pack(len(payload), zlib.crc32(payload)) + payload)
        os.fdatasync(self._fd)
        self.height += 1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
