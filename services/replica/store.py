"""One copy's durable state on local disk: what a ``Replica`` needs after a restart.

Three files in the copy's folder:

* ``hard``: the term, the vote and the damaged mark, rewritten whole (a temporary file,
  fsync, rename, fsync of the folder), so a crash leaves the old or the new one;
* ``snapshot``: the latest snapshot (its block's signed header, the state, and the proof
  that its block is confirmed), the same way;
* ``blocks.log``: the blocks after (or a little before) the snapshot, one frame each
  (``services.partition.wal``'s frames: length, crc32, payload), appended and fsynced
  once per ``Ready``; a truncation cuts the file, a compaction rewrites it.

Opening reads every frame. A frame cut short is a write a crash interrupted: nothing
in it was acked (acks follow the fsync), so it is dropped quietly, as is a tail of zeros
(the file grew, its data never came) and blocks of a history a snapshot replaced (a
leader's snapshot installed, the crash before the log's cut). A complete frame that
fails its checksum, a frame length no writer writes, or blocks that do not chain, are
damage: the copy may have acked what is gone, so the cut is made and the copy is marked
damaged (``Replica(damaged=)``) until the replica says it is whole again
(``Ready.repaired``); the mark is persisted at once so that another restart does not
forget it, and cleared only once the blocks that repair the copy are durable.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from constellation.protocol import replication as rp
from constellation.replication.replica import Ready, Snapshot
from services.partition.wal import (
    FRAME_HEAD,
    IMPOSSIBLE,
    MISMATCH,
    Frames,
    frame,
    open_log,
    unframe,
    write_all,
)
from services.runtime import make_dirs, sync_dir, write_atomic

log = logging.getLogger("replica.store")


class _Hard(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    term: int
    vote: int
    damaged: bool


class _Snapshot(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    signed: rp.Signed
    data: bytes
    after: list[rp.Header] = []  # the proof that its block is confirmed (none: not kept)
    acks: list[rp.Ack] = []


_block_decoder = msgspec.msgpack.Decoder(rp.Block)
_encoder = msgspec.msgpack.Encoder()


@dataclass
class Loaded:
    """What a copy persisted: ``Replica``'s ``hard``, ``snapshot``, ``blocks``, ``damaged``."""

    hard: tuple[int, int] = (0, -1)
    snapshot: Snapshot | None = None
    blocks: list[rp.Block] = field(default_factory=list)
    damaged: bool = False


class CopyStore:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        make_dirs(folder)
        self.hard = _Hard(0, -1, False)
        self._fd = -1
        self._heights: list[int] = []  # the blocks in the file, in order
        self._ends: list[int] = []  # the offset after each

    # -- opening -------------------------------------------------------------------------

    def load(self) -> Loaded:
        """Read everything back, cutting a torn or damaged tail (see the module doc)."""
        hard = self._read_whole("hard")
        if hard is not None:
            self.hard = msgspec.msgpack.decode(hard, type=_Hard)
        loaded = Loaded((self.hard.term, self.hard.vote))
        snap = self._read_whole("snapshot")
        if snap is not None:
            s = msgspec.msgpack.decode(snap, type=_Snapshot)
            h = s.signed.header
            proof = (s.after, s.acks) if s.acks else None
            loaded.snapshot = Snapshot(h.height, h.term, rp.header_hash(h), s.signed, s.data, proof)
        self._fd, data = open_log(self.folder / "blocks.log")
        # Synced first: a block written but not synced when the copy was killed is read
        # back from the page cache, and would be acked while a power loss could take it.
        os.fdatasync(self._fd)
        frames = Frames(data)
        damaged = False
        prev: rp.Header | None = None
        at = 0
        for payload in frames:
            start, at = at, at + FRAME_HEAD + len(payload)
            if not payload and not any(data[start:]):
                frames.why = "a tail of zeros"  # the file grew, its data never came: torn
                break
            try:
                block = _block_decoder.decode(payload)
            except msgspec.DecodeError:
                frames.why, damaged = "an undecodable block", True
                break
            header = block.signed.header
            if prev is not None and (
                header.height != prev.height + 1 or header.prev != rp.header_hash(prev)
            ):
                frames.why, damaged = f"block {header.height} does not chain", True
                break
            loaded.blocks.append(block)
            self._heights.append(header.height)
            self._ends.append(at)
            prev = header
        if loaded.snapshot is not None and not _agree(loaded.blocks, loaded.snapshot):
            # a leader's snapshot installed in place of them, the crash before their cut
            frames.why = "blocks of a history the snapshot replaced"
            loaded.blocks.clear()
            del self._heights[:], self._ends[:]
        end = self._ends[-1] if self._ends else 0
        if end < len(data):
            damaged = damaged or frames.why in (MISMATCH, IMPOSSIBLE)
            log.warning(
                "blocks.log cut at byte %d of %d: %s%s",
                end,
                len(data),
                frames.why,
                " (damaged: acked blocks may be gone)" if damaged else "",
            )
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
        os.lseek(self._fd, end, os.SEEK_SET)
        if damaged and not self.hard.damaged:
            self.hard.damaged = True
            self._write_whole("hard", _encoder.encode(self.hard))
        loaded.damaged = self.hard.damaged
        return loaded

    # -- writing -------------------------------------------------------------------------

    def write(self, ready: Ready) -> None:
        """Make a ``Ready``'s writes durable, in its order; raises ``OSError``. The
        damaged mark is cleared last, once the blocks that repair the copy are durable."""
        self._write_hard(
            _Hard(*(ready.hard or (self.hard.term, self.hard.vote)), self.hard.damaged)
        )
        if ready.snapshot is not None and ready.snapshot.signed is not None:
            after, acks = ready.snapshot.proof or ([], [])
            snap = _Snapshot(ready.snapshot.signed, ready.snapshot.data, after, acks)
            self._write_whole("snapshot", _encoder.encode(snap))
        if ready.truncate is not None:
            self._truncate(ready.truncate)
        if ready.append:
            framed = [frame(_encoder.encode(b)) for b in ready.append]
            write_all(self._fd, b"".join(framed))
            size = self._ends[-1] if self._ends else 0
            for b, f in zip(ready.append, framed, strict=True):
                size += len(f)
                self._heights.append(b.signed.header.height)
                self._ends.append(size)
        if ready.truncate is not None or ready.append:
            os.fdatasync(self._fd)
        if ready.repaired:
            self._write_hard(_Hard(self.hard.term, self.hard.vote, False))
        if ready.compact:
            self._compact(ready.compact)

    def _write_hard(self, hard: _Hard) -> None:
        if hard != self.hard:
            self._write_whole("hard", _encoder.encode(hard))
            self.hard = hard

    def _truncate(self, height: int) -> None:
        keep = sum(1 for h in self._heights if h <= height)
        end = self._ends[keep - 1] if keep else 0
        del self._heights[keep:], self._ends[keep:]
        os.ftruncate(self._fd, end)
        os.lseek(self._fd, end, os.SEEK_SET)

    def _compact(self, upto: int) -> None:
        """Rewrite the log without the blocks at or below ``upto``."""
        drop = sum(1 for h in self._heights if h <= upto)
        if not drop:
            return
        start = self._ends[drop - 1]
        size = self._ends[-1]
        rest = os.pread(self._fd, size - start, start)
        tmp = self.folder / "blocks.log.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            write_all(fd, rest)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.folder / "blocks.log")
        sync_dir(self.folder)
        os.close(self._fd)
        self._fd = os.open(self.folder / "blocks.log", os.O_RDWR)
        os.lseek(self._fd, 0, os.SEEK_END)
        self._ends = [end - start for end in self._ends[drop:]]
        del self._heights[:drop]

    def _write_whole(self, name: str, payload: bytes) -> None:
        write_atomic(self.folder / name, frame(payload))

    def _read_whole(self, name: str) -> bytes | None:
        path = self.folder / name
        if not path.exists():
            return None
        payload = unframe(path.read_bytes())
        if payload is None:
            # Written whole and renamed into place: only the disk can break it.
            raise OSError(f"{path} is corrupt")
        return payload

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _agree(blocks: list[rp.Block], snapshot: Snapshot) -> bool:
    """Whether the log's blocks (chained) are of the history ``snapshot`` is of: they
    hold its block, or start just above it and follow it. A log that holds another block
    at its height, one that does not follow it, or blocks below it only, is what a
    leader's snapshot was installed over (its cut lost to a crash)."""
    if not blocks:
        return True
    first = blocks[0].signed.header
    at = snapshot.height - first.height
    if 0 <= at < len(blocks):
        return rp.header_hash(blocks[at].signed.header) == snapshot.hash
    if at == -1:
        return first.prev == snapshot.hash
    return at < -1  # above it (never written so): kept, the replica judges them
