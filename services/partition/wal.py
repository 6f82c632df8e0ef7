"""A worker's logs on local disk: the block log, and the events log derived from it.

Frame: ``length:u32 crc32:u32 payload`` (big-endian). Opening a log reads every frame;
a frame cut short by a crash, or whose checksum or contents are wrong, ends the log
there: the rest is cut off and the cut logged.

The block log (payload: an encoded ``Block``) is the truth, one fsync per block: nothing
after a cut was ever acknowledged, since a block is acknowledged only once it and every
block before it are on disk. The events log (payload: an encoded ``BlockEvents``, one
frame per block that changed coins) is what readers follow by height; it is written
after its block, without an fsync, and recovery writes again whatever a crash cut from
its tail, from the block log.
"""

from __future__ import annotations

import bisect
import logging
import os
import struct
import zlib
from array import array
from collections.abc import Iterator
from pathlib import Path

from constellation.errors import MessageError
from constellation.protocol.ledger import Block, decode_block, decode_events_head
from services.runtime import make_dirs, sync_dir

_HEAD = struct.Struct(">II")
FRAME_HEAD = _HEAD.size  # bytes before a frame's payload
MAX_FRAME = 64 << 20
# why frames ended where it cannot be a write a crash cut short
MISMATCH, IMPOSSIBLE = "a checksum mismatch", "a frame length no writer writes"

log = logging.getLogger("partition.wal")


class Frames:
    """The payloads of a log's bytes, in order, up to the first bad frame. ``end`` is the
    offset after the last payload taken; ``why`` says what ended the frames early."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.end = 0
        self.why = ""

    def __iter__(self) -> Iterator[bytes]:
        data, at = self.data, 0
        while at < len(data):
            if len(data) - at < _HEAD.size:
                self.why = "a torn frame header"
                return
            length, crc = _HEAD.unpack_from(data, at)
            if length > MAX_FRAME:  # no writer writes one: the length itself is damaged
                self.why = IMPOSSIBLE
                return
            payload = data[at + _HEAD.size : at + _HEAD.size + length]
            if len(payload) < length:
                self.why = "a torn frame"
                return
            if zlib.crc32(payload) != crc:
                self.why = MISMATCH
                return
            yield payload
            at += _HEAD.size + length
            self.end = at


def frame(payload: bytes) -> bytes:
    return _HEAD.pack(len(payload), zlib.crc32(payload)) + payload


def unframe(data: bytes) -> bytes | None:
    """The payload of ``data`` framed whole (a file written at once, of any size up to
    4 GiB: no ``MAX_FRAME``), or None where it is not exactly one good frame."""
    if len(data) < _HEAD.size:
        return None
    length, crc = _HEAD.unpack_from(data)
    payload = data[_HEAD.size :]
    return payload if len(payload) == length and zlib.crc32(payload) == crc else None


def write_all(fd: int, data: bytes) -> None:
    """All of ``data``, or ``OSError`` (a short write is a failed one)."""
    written = os.write(fd, data)
    if written != len(data):
        raise OSError(f"wrote {written} of {len(data)} bytes")


def open_log(path: Path) -> tuple[int, bytes]:
    """The log at ``path`` (created, durably, where there is none yet: what is then
    appended and fsynced does not vanish with its file's name in a power loss), open for
    reading and writing, and its bytes."""
    make_dirs(path.parent)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        sync_dir(path.parent)
    with os.fdopen(os.dup(fd), "rb") as f:
        return fd, f.read()


def _cut(fd: int, path: Path, frames: Frames, why: str) -> None:
    """Keep what ``frames`` took; cut the rest (if any), saying ``why``."""
    at, size = frames.end, len(frames.data)
    if at < size:
        log.warning(
            "cut a log's tail",
            extra={"path": str(path), "offset": at, "bytes": size - at, "why": why},
        )
        os.ftruncate(fd, at)
        os.fsync(fd)
    os.lseek(fd, at, os.SEEK_SET)


class DamagedLog(Exception):
    """A block log damaged before its end: blocks after the damage were durable (and
    acknowledged), so nothing may be cut; the worker refuses to start."""


def _after_bad_frame(data: bytes, at: int, why: str) -> bytes:
    """What follows the frame at ``at`` that ended a log's good frames (for ``why``):
    nothing, or zeros, where that frame is a torn tail; else damage before the end."""
    if at >= len(data) or why in ("a torn frame header", "a torn frame"):
        return b""
    if why == IMPOSSIBLE:
        return data[at + _HEAD.size :]
    length, _ = _HEAD.unpack_from(data, at)
    return data[at + _HEAD.size + length :]


class BlockLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.height = 0  # blocks in the log; the next block's height
        self._fd = -1

    def replay(self) -> Iterator[Block]:
        """Yield the log's blocks in order, cutting a torn tail; then open for
        appending. The file is synced first: a block written but not yet synced when
        the last run was killed is read back from the page cache, and would be answered
        for (committed, its vote given) while a power loss could still take it. A
        frame that fails its checksum or decoding before the log's end (data other than
        zeros after it) is damage, not a torn write: ``DamagedLog``, nothing cut (the
        blocks after it were acknowledged)."""
        fd, data = open_log(self.path)
        os.fdatasync(fd)
        frames = Frames(data)
        why = ""
        for payload in frames:
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
        why = why or frames.why
        if any(_after_bad_frame(data, frames.end, why)):
            os.close(fd)
            raise DamagedLog(
                f"{self.path} is damaged at byte {frames.end} of {len(data)} ({why}) after"
                f" block {self.height - 1}, with blocks after it: restore it from a copy"
                " of the disk; nothing was cut"
            )
        _cut(fd, self.path, frames, why)
        self._fd = fd

    def append(self, payload: bytes) -> None:
        """Write one block and make it durable (one no reader could read back refused)."""
        if len(payload) > MAX_FRAME:
            raise ValueError(f"a block of {len(payload)} bytes: at most {MAX_FRAME}")
        write_all(self._fd, frame(payload))
        os.fdatasync(self._fd)
        self.height += 1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class EventLog:
    """The committed coin changes of a worker's blocks, by height, for readers to follow."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._heights = array("q")  # the height of each frame, ascending
        self._offsets = array("q")  # where each frame starts
        self._size = 0
        self._fd = -1

    @property
    def last(self) -> int:
        """The height of the latest block with events here; -1 while there is none."""
        return self._heights[-1] if self._heights else -1

    def open(self) -> None:
        """Read the log, cutting a bad tail."""
        fd, data = open_log(self.path)
        frames = Frames(data)
        why = ""
        for payload in frames:
            try:
                height = decode_events_head(payload).height
            except MessageError as exc:
                why = str(exc)
                break
            if height <= self.last:
                why = f"events of block {height} after those of block {self.last}"
                break
            self._heights.append(height)
            self._offsets.append(frames.end)  # where this frame starts
        _cut(fd, self.path, frames, why or frames.why)
        self._size = frames.end
        self._fd = fd

    def cut_from(self, height: int) -> None:
        """Forget the events of blocks from ``height`` on (the block log ends before)."""
        keep = bisect.bisect_left(self._heights, height)
        if keep == len(self._heights):
            return
        at = self._offsets[keep]
        log.warning(
            "cut the events log's tail beyond the block log",
            extra={"path": str(self.path), "height": height, "bytes": self._size - at},
        )
        del self._heights[keep:], self._offsets[keep:]
        os.ftruncate(self._fd, at)
        os.lseek(self._fd, at, os.SEEK_SET)
        self._size = at

    def append(self, height: int, payload: bytes) -> None:
        """Add the events of block ``height`` (above every height here); not synced."""
        assert height > self.last, f"events of block {height} after {self.last}"
        framed = frame(payload)
        write_all(self._fd, framed)
        self._heights.append(height)
        self._offsets.append(self._size)
        self._size += len(framed)

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def read_after(self, height: int, max_bytes: int) -> list[bytes]:
        """The events of the blocks above ``height``, in order: as many as fit in
        ``max_bytes``, and at least one if there is any."""
        first = bisect.bisect_right(self._heights, height)
        if first == len(self._heights):
            return []
        offsets = self._offsets
        start = offsets[first]
        limit = start + max_bytes
        if self._size <= limit:
            end = self._size
        else:  # up to the last frame that ends within the limit, or the first alone
            last = max(first, bisect.bisect_right(offsets, limit, lo=first + 1) - 2)
            end = offsets[last + 1] if last + 1 < len(offsets) else self._size
        return list(Frames(os.pread(self._fd, end - start, start)))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
