"""Copies moving between two machines of one operator
(``constellation.replication.placement``): their files, and the driver of a change.

The machine a copy leaves stops it, then marks its folder released, durably: from then
on it never runs it again, and it serves the folder, read-only, on ``move_subject`` of
its operator's own NATS (no peer may publish there). The machine it goes to fetches every
file into ``<folder>.incoming``, syncs them, and renames that folder into place; only a
whole folder is ever opened. What a machine asks for names a folder and a file of it,
checked against the folder's own listing; a folder not released is not served.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
from pathlib import Path

import msgspec
from nats.aio.client import Client
from nats.errors import Error as NatsError

from constellation.errors import MessageError
from constellation.replication.placement import BATCH, Placement, decode_placement
from services.bus import Stale, load_placement, update_placement
from services.runtime import sync_dir, write_atomic

log = logging.getLogger("replica.moves")

RELEASED = "released"
PLACEMENT_FILE = "placement.json"  # the last placement the machine followed
INCOMING = ".incoming"
DROPPING = ".dropping"
CHUNK = 512 * 1024
ASK_S = 5.0
_FOLDER = re.compile(r"[A-Za-z0-9_-]{1,64}-[0-9]{1,3}-[01]")
_FILE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def move_subject(operator: str, machine: int) -> str:
    """Where machine ``machine`` of ``operator`` serves the folders it released."""
    return f"cst.{operator}.mv.{machine}"


def folder_name(owner: str, worker: int, copy: int) -> str:
    """The folder of an operator's copy ``copy`` (``2 * operator + k``) of a shard."""
    return f"{owner}-{worker}-{copy % 2}"


class Ask(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    folder: str
    file: str  # "": the folder's listing
    offset: int


class Answer(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    why: str  # "": served
    files: list[tuple[str, int]]  # (name, size), for a listing
    data: bytes


_ask = msgspec.msgpack.Decoder(Ask)
_answer = msgspec.msgpack.Decoder(Answer)
_encode = msgspec.msgpack.Encoder().encode


def record(state_dir: Path, placement: Placement) -> None:
    """Keep the placement a machine follows on its own disk, durably: should the NATS KV
    lose it, or go back to an older version, the machine will not follow that."""
    write_atomic(state_dir / PLACEMENT_FILE, placement.encode())


def recorded(state_dir: Path) -> Placement | None:
    path = state_dir / PLACEMENT_FILE
    return decode_placement(path.read_bytes()) if path.exists() else None


def is_released(folder: Path) -> bool:
    return (folder / RELEASED).exists()


def release(folder: Path) -> None:
    """Mark ``folder`` released, durably (its copy no longer runs here)."""
    if not folder.is_dir() or is_released(folder):
        return
    fd = os.open(folder / RELEASED, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    sync_dir(folder)


def drop(folder: Path) -> None:
    """Delete a released folder (its copy runs on another machine now): renamed first,
    so that a crash midway leaves no part of it under its name (taken for a whole copy,
    its term and vote gone)."""
    assert is_released(folder), f"{folder} is not released"
    dropping = folder.with_name(folder.name + DROPPING)  # (none left: ``clear_drops``)
    folder.rename(dropping)
    sync_dir(folder.parent)
    shutil.rmtree(dropping)


def clear_drops(state_dir: Path) -> None:
    """Delete what crashes left of drops in ``state_dir`` (a machine starting)."""
    for left in state_dir.glob(f"*{DROPPING}"):
        shutil.rmtree(left, ignore_errors=True)


def _files(folder: Path) -> list[tuple[str, int]]:
    return sorted(
        (p.name, p.stat().st_size) for p in folder.iterdir() if p.is_file() and p.name != RELEASED
    )


def serve(state_dir: Path, data: bytes) -> bytes:
    """The answer to an ``Ask`` for a folder released in ``state_dir``."""
    try:
        ask = _ask.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return _encode(Answer(f"not a request: {exc}", [], b""))
    if not _FOLDER.fullmatch(ask.folder):
        return _encode(Answer("no such folder", [], b""))
    folder = state_dir / ask.folder
    if not is_released(folder):
        return _encode(Answer(f"{ask.folder} is not released here", [], b""))
    files = dict(_files(folder))
    if not ask.file:
        return _encode(Answer("", sorted(files.items()), b""))
    if ask.file not in files or not 0 <= ask.offset <= files[ask.file]:
        return _encode(Answer(f"no {ask.file!r} at {ask.offset} in {ask.folder}", [], b""))
    with open(folder / ask.file, "rb") as f:
        f.seek(ask.offset)
        return _encode(Answer("", [], f.read(CHUNK)))


class NotYet(Exception):
    """The folder is not there to fetch yet (not released, or its machine not answering)."""


async def _ask_for(nc: Client, subject: str, ask: Ask) -> Answer:
    try:
        reply = await nc.request(subject, _encode(ask), timeout=ASK_S)
        answer = _answer.decode(reply.data)
    except (NatsError, TimeoutError) as exc:
        raise NotYet(f"{subject} does not answer: {exc!r}") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MessageError(f"a malformed answer on {subject}: {exc}") from None
    if answer.why:
        raise NotYet(answer.why)
    return answer


async def fetch(nc: Client, subject: str, folder: Path) -> int:
    """Fetch the released folder of ``folder``'s name from the machine serving on
    ``subject``, into ``folder`` (replacing one there); the bytes fetched. Raises
    ``NotYet`` where it is not released yet: nothing is in place then."""
    incoming = folder.with_name(folder.name + INCOMING)
    shutil.rmtree(incoming, ignore_errors=True)
    listing = await _ask_for(nc, subject, Ask(folder.name, "", 0))
    incoming.mkdir(parents=True)
    total = 0
    for name, size in listing.files:
        if not _FILE.fullmatch(name) or name in (RELEASED, ".", ".."):
            raise MessageError(f"a file named {name!r} is not one of a copy's")
        with open(incoming / name, "wb") as f:
            while f.tell() < size:
                chunk = await _ask_for(nc, subject, Ask(folder.name, name, f.tell()))
                if not chunk.data:
                    raise MessageError(f"{name} ends before the size listed")
                f.write(chunk.data[: size - f.tell()])
            f.flush()
            os.fsync(f.fileno())
        total += size
    sync_dir(incoming)
    if folder.exists():
        drop(folder)  # a stale copy, released here earlier: the fetched one is newer
    incoming.rename(folder)
    sync_dir(folder.parent)
    return total


class Stuck(Exception):
    """A change of machines makes no progress: the reason says which moves wait on whom."""


async def advance(nc: Client, operator: str, machines: int, batch: int = BATCH) -> Placement:
    """One step of the driver of a change to ``machines`` machines: the placement after
    it (written where it changed; a write that lost a race is made again next time)."""
    found = await load_placement(nc, operator)
    if found is None:
        raise Stuck(f"operator {operator} has no placement yet: are its machines up?")
    placement, revision = found
    nxt = placement.step(machines, batch)
    if nxt is placement:
        return placement
    try:
        await update_placement(nc, operator, nxt, revision)
    except Stale:
        return placement
    log.info("placement", extra={"version": nxt.version, "moving": waiting(nxt)})
    return nxt


def waiting(placement: Placement) -> list[str]:
    """The moves under way, as ``slot: from -> to``."""
    return [
        f"{slot}: {spot.machine} -> {spot.to}"
        for slot, spot in enumerate(placement.spots)
        if spot.moving
    ]


async def drive(
    nc: Client,
    operator: str,
    machines: int,
    batch: int = BATCH,
    stalled_s: float = 60.0,
    poll_s: float = 0.1,
) -> tuple[Placement, int]:
    """Drive the operator's placement to ``machines`` machines, ``batch`` moves at a
    time; (the placement at the end, the slots it moved). Raises ``Stuck`` where no move
    ends for ``stalled_s``: a machine that does not release (or serve) its copies, or one
    that does not fetch them, keeps its moves waiting, and the moves name them."""
    loop = asyncio.get_running_loop()
    progress = loop.time()
    version, first = -1, None
    while True:
        placement = await advance(nc, operator, machines, batch)
        if first is None:
            first = [spot.machine for spot in placement.spots]
        if placement.done(machines):
            moved = sum(1 for s, spot in enumerate(placement.spots) if spot.machine != first[s])
            return placement, moved
        if placement.version != version:
            version, progress = placement.version, loop.time()
        elif loop.time() - progress > stalled_s:
            raise Stuck(
                f"no move of {operator}'s copies ended in {stalled_s:g} s; waiting: "
                + ", ".join(waiting(placement))
            )
        await asyncio.sleep(poll_s)
