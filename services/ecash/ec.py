"""The mint's elliptic-curve work in a process of its own.

A swap's checks and signatures (six multiplications and two by G, with DLEQ proofs) are
most of the CPU the mint's event loop spends on it; done in the loop, they bound one
process to one core however many the machine has, and every request behind them waits
(a thread does not help: the GIL). So the loop hands them to a child process: ``EC``
sends each call (``CALLS``: a swap checked and signed, outputs signed, proofs checked)
down a pipe and goes on serving; the child runs them one after the other against its
own copy of the keysets and sends each answer back as soon as it has it. The calls a
loop turn makes go down in one write.

The child is the mint's own: it gets the keysets' secrets over the pipe (never through
its command line or environment), takes nothing from anyone else, and stops when the
pipe closes (its parent stopped, however). A child that dies fails the calls it held
with ``Stopped`` (the request is answered "retry": nothing of it happened, as nothing is
stored before its signatures come back) and the next call starts another; where children
keep stopping before they answer anything (they crash as they start), the next starts
only after a pause that doubles each time (``BACKOFF_S``), and calls meanwhile fail at once.

Frames both ways are a 4-byte big-endian length and a pickle; to the child: the
keysets (``("keysets", [(unit, index, input_fee_ppk, secrets, active)], max_amount)``)
and calls (``(call id, name, args)``); from it: ``(call id, True, result)``, or
``(call id, False, (code, detail))`` for a ``CashuError``, or ``(call id, None, why)``
for anything else.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import pickle
import signal
import struct
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

from constellation.ecash import mint as m
from constellation.ecash.keyset import Keyset

log = logging.getLogger("mint")


def _swap(rules: m.Mint, request: Any, now: int) -> tuple[m.Spend, m.Outputs, list[Any]]:
    """A swap checked (``Mint.swap``), then its outputs signed."""
    spend, out = rules.swap(request, now)
    return spend, out, rules.sign(request.outputs)


CALLS: dict[str, Callable[..., Any]] = {"swap": _swap, "sign": m.Mint.sign, "spend": m.Mint.spend}
_LENGTH = struct.Struct(">I")
STUCK_S = 30.0  # no answer this long to the oldest call: the child is stuck (a request of
# 1,000 inputs and 1,000 outputs takes it about 0.2 s)
UNSTEADY = (3, 60.0)  # children stopped, within seconds: the mint says it is not ready
# After the second child in a row that stopped before it answered anything (it crashes
# as it starts), the next starts this long after the last stopped, then twice as long
# each time, at most the second figure; calls meanwhile fail at once.
BACKOFF_S = (0.5, 30.0)
CHILD = (sys.executable, "-m", "services.ecash.ec")


class Stopped(Exception):
    """The EC process stopped before it answered: the call did nothing."""


def _frame(message: object) -> bytes:
    data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


def _keysets(mint: m.Mint) -> tuple[str, list[tuple[Any, ...]], int]:
    described = [
        (k.unit, k.index, k.input_fee_ppk, k.secrets, k.active) for k in mint.keysets.values()
    ]
    return ("keysets", described, mint.max_amount)


class EC:
    """The child process, as the mint's event loop calls it; ``on_stop`` is told of each
    child that stopped unasked. ``argv`` starts a child."""

    def __init__(
        self, on_stop: Callable[[], None] = lambda: None, argv: Sequence[str] = CHILD
    ) -> None:
        self.on_stop = on_stop
        self.argv = argv
        self.stops: collections.deque[float] = collections.deque(maxlen=UNSTEADY[0])
        self.fruitless = 0  # children in a row that stopped before they answered anything
        self.answered = False  # whether the child now running has answered anything
        self.proc: asyncio.subprocess.Process | None = None
        self.rules: m.Mint | None = None  # the keysets the child has
        # calls sent and not answered, oldest first: (answer, when sent)
        self.waiting: dict[int, tuple[asyncio.Future[Any], float]] = {}
        self.outbox: list[bytes] = []
        self.next_id = 0
        self.tasks: list[asyncio.Task[None]] = []  # the children's readers and watchdogs
        self.starting: asyncio.Lock | None = None
        self.closed = False
        self.lost: set[asyncio.subprocess.Process] = set()  # killed, maybe not yet gone

    async def start(self) -> None:
        """Start the child, where none runs."""
        if self.starting is None:
            self.starting = asyncio.Lock()
        async with self.starting:
            if self.proc is not None:
                return
            if self.closed:
                raise Stopped("the mint is stopping")
            wait = self.backoff()
            if wait > 0:
                why = f"the EC process keeps stopping as it starts; next try in {wait:.1f} s"
                raise Stopped(why)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
                )
            except OSError as exc:  # out of processes or files, for now
                raise Stopped(f"the EC process did not start ({exc!r})") from None
            self.proc, self.rules, self.answered = proc, None, False
            tasks = [asyncio.create_task(self._read(proc)), asyncio.create_task(self._watch(proc))]
            for task in tasks:
                task.add_done_callback(functools.partial(self._ended, proc))
            self.tasks = [t for t in self.tasks if not t.done()] + tasks
            log.info("EC process started", extra={"pid": proc.pid})

    async def call(self, rules: m.Mint, name: str, *args: Any) -> Any:
        """``CALLS[name](rules, *args)``, run by the child (with its copy of ``rules``)."""
        assert name in CALLS
        if self.proc is None:
            await self.start()
        frame = _frame((self.next_id + 1, name, args))
        if rules is not self.rules:  # new, or a rotation: the child takes the keysets first
            self._send(_frame(_keysets(rules)))
            self.rules = rules
        self.next_id += 1
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.waiting[self.next_id] = (done, loop.time())
        self._send(frame)
        return await done

    def _send(self, frame: bytes) -> None:
        if not self.outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self.outbox.append(frame)

    def _flush(self) -> None:
        frames, self.outbox = self.outbox, []
        stdin = self.proc.stdin if self.proc is not None else None
        if stdin is None or stdin.is_closing():  # the child is gone: the reader says so
            return
        try:
            stdin.write(b"".join(frames))
        except (RuntimeError, OSError) as exc:  # uvloop: the pipe closed just now
            log.debug("EC process not written to", extra={"error": repr(exc)})

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        why = "it stopped"
        try:
            while True:
                (length,) = _LENGTH.unpack(await proc.stdout.readexactly(_LENGTH.size))
                cid, ok, result = pickle.loads(await proc.stdout.readexactly(length))
                if not self.answered and self.proc is proc:  # its first answer
                    self.answered, self.fruitless = True, 0
                done, _ = self.waiting.pop(cid, (None, 0.0))
                if done is None or done.done():  # its caller was cancelled
                    continue
                if ok:
                    done.set_result(result)
                elif ok is False:
                    done.set_exception(m.CashuError(*result))
                else:
                    done.set_exception(RuntimeError(f"the EC process failed: {result}"))
        except Exception as exc:  # its end, or what is not a frame: it is done with
            why = repr(exc)
        finally:
            self._lost(proc, why)

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        """A child that answers nothing for ``STUCK_S`` (stopped, wedged) is killed: the
        calls it held fail, the next call starts another."""
        loop = asyncio.get_running_loop()
        while self.proc is proc:
            await asyncio.sleep(STUCK_S / 4)
            oldest = next(iter(self.waiting.values()), None)
            if oldest is not None and loop.time() - oldest[1] > STUCK_S:
                self._lost(proc, f"no answer in {STUCK_S:.0f} s")

    def _ended(self, proc: asyncio.subprocess.Process, task: asyncio.Task[None]) -> None:
        """A child's reader or watchdog that failed takes the child with it (said, and
        counted as its stop): the next call starts both again."""
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("EC process task failed", exc_info=exc, extra={"pid": proc.pid})
            self._lost(proc, f"its task failed ({exc!r})")

    def _lost(self, proc: asyncio.subprocess.Process, why: str) -> None:
        if self.proc is not proc:
            return
        self.proc = None
        self.outbox = []  # none of it for the next child
        self._fail(f"the EC process stopped ({why})")
        if proc.returncode is None:
            proc.kill()
        _close_pipe(proc)
        self.lost = {p for p in self.lost if p.returncode is None} | {proc}
        if not self.answered:
            self.fruitless += 1
        log.warning(
            "EC process stopped",
            extra={"pid": proc.pid, "why": why, "in_a_row_unanswered": self.fruitless},
        )
        self.stops.append(time.monotonic())
        self.on_stop()

    def backoff(self) -> float:
        """Seconds before the next child may start (``BACKOFF_S``)."""
        if self.fruitless < 2:
            return 0.0
        first, most = BACKOFF_S
        delay = min(most, first * 2.0 ** min(self.fruitless - 2, 32))
        return self.stops[-1] + delay - time.monotonic()

    def unsteady(self) -> bool:
        """Whether children stopped ``UNSTEADY`` times in a short while (killed for
        memory, say), or keep stopping before they answer anything (crashing as they
        start: paused between, they may stop less often than that): the mint is not
        ready."""
        count, within_s = UNSTEADY
        often = len(self.stops) == count and time.monotonic() - self.stops[0] < within_s
        return often or self.fruitless >= 2

    def _fail(self, why: str) -> None:
        waiting, self.waiting = self.waiting, {}
        for done, _ in waiting.values():
            if not done.done():
                done.set_exception(Stopped(why))

    async def close(self) -> None:
        """Stop the child (it finishes what it was sent); a call still waiting, or made
        after, fails."""
        self.closed = True
        proc, self.proc = self.proc, None
        if proc is not None:
            _close_pipe(proc)  # the child's end of file: it stops
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for gone in self.lost:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gone.wait(), 5)
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail("the mint is stopping")


def _close_pipe(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(RuntimeError, OSError):  # uvloop: it closed just now
        if proc.stdin is not None:
            proc.stdin.close()


def _read_frame(stream: BinaryIO) -> Any:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(head)
    data = stream.read(length)
    if len(data) < length:
        return None
    return pickle.loads(data)


def serve(inbox: BinaryIO, outbox: BinaryIO) -> None:
    """The child: calls from ``inbox`` run in order, each answered at once on
    ``outbox``; returns at the end of ``inbox``."""
    rules: m.Mint | None = None
    while (message := _read_frame(inbox)) is not None:
        if message[0] == "keysets":
            _, described, max_amount = message
            rules = m.Mint([Keyset(*d) for d in described], max_amount)
            continue
        cid, name, args = message
        try:
            if rules is None or name not in CALLS:
                raise RuntimeError(f"{name} before any keysets, or not a call")
            answer: tuple[Any, ...] = (cid, True, CALLS[name](rules, *args))
        except m.CashuError as exc:
            answer = (cid, False, (exc.code, exc.detail))
        except Exception as exc:  # the caller is told; the child goes on
            answer = (cid, None, repr(exc))
        outbox.write(_frame(answer))
        outbox.flush()


if __name__ == "__main__":
    # A signal to the mint's process group (Ctrl-C, a service manager) stops the mint,
    # which closes the pipe when it is done with this process: until then it answers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with (
        open(sys.stdin.fileno(), "rb", closefd=False) as inbox,  # buffered both ways,
        open(sys.stdout.fileno(), "wb", closefd=False) as outbox,  # even unbuffered stdio
    ):
        serve(inbox, outbox)
