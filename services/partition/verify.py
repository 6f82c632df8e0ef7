"""Signature checks in separate processes, for a worker started with ``WORKER_VERIFIERS``.

A worker's partition logic runs on one core; the signature checks, its largest cost
per transaction, may run on others. What one turn of the event loop asks for goes out
as one batch per verifier process (a transaction's checks stay together), and each
answer comes back to the loop as a callback. Whether this pays depends on spare cores:
``bench/engine.py`` measures it.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial

from constellation.keys import schnorr_verify
from constellation.ledger.commit import Check

# The position of the first check that failed, -1 if none did; None if it went unchecked.
Done = Callable[[int | None], None]

log = logging.getLogger("partition.verify")


def _exit_with(parent: int) -> None:
    """In a verifier process: exit once the worker that started it is gone, even by
    kill -9 (the pool's pipes stay open in its other processes)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def _warm() -> None:
    """Busy long enough that the pool starts a process for each of ``start``'s calls (it
    starts one only where none is idle)."""
    time.sleep(0.1)


def first_bad(batch: list[list[Check]]) -> list[int]:
    """In a verifier process: for each transaction, the position of its first signature
    that does not verify, or -1."""
    answers = []
    for checks in batch:
        bad = (i for i, (key, msg, sig) in enumerate(checks) if not schnorr_verify(key, msg, sig))
        answers.append(next(bad, -1))
    return answers


class Verifiers:
    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.in_flight = 0
        self._batch: list[tuple[list[Check], Done]] = []
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn: a fork would copy the event loop and the NATS connection.
        return ProcessPoolExecutor(
            self.processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_exit_with,
            initargs=(os.getpid(),),
        )

    async def start(self) -> None:
        """Start every process (each imports the curve library) before work arrives."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(self._pool, _warm) for _ in range(self.processes))
        )

    def check(self, checks: list[Check], done: Done) -> None:
        """Verify ``checks`` elsewhere; ``done`` runs on the loop with the answer."""
        if not self._batch:
            asyncio.get_running_loop().call_soon(self._send)
        self._batch.append((checks, done))
        self.in_flight += 1

    def _send(self) -> None:
        batch, self._batch = self._batch, []
        share = -(-len(batch) // self.processes)
        loop = asyncio.get_running_loop()
        pool = self._pool
        for at in range(0, len(batch), share):
            part = batch[at : at + share]
            future = pool.submit(first_bad, [checks for checks, _ in part])
            future.add_done_callback(partial(self._relay, loop, pool, part))

    def _relay(
        self,
        loop: asyncio.AbstractEventLoop,
        pool: ProcessPoolExecutor,
        part: list[tuple[list[Check], Done]],
        future: Future[list[int]],
    ) -> None:
        """In the pool's thread, when a batch is done: hand the answer to the loop."""
        loop.call_soon_threadsafe(self._answer, pool, part, future)

    def _answer(
        self,
        pool: ProcessPoolExecutor,
        part: list[tuple[list[Check], Done]],
        future: Future[list[int]],
    ) -> None:
        self.in_flight -= len(part)
        try:
            answers: list[int | None] = list(future.result())
        except (BrokenProcessPool, CancelledError) as exc:
            if pool is self._pool:
                log.error("a verifier process died; starting new ones", extra={"error": repr(exc)})
                pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
            answers = [None] * len(part)
        for (_, done), answer in zip(part, answers, strict=True):
            done(answer)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
