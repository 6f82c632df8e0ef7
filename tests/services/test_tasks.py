"""Supervised tasks (``services.runtime.Tasks``): a long-running task that dies is logged
with its traceback, counted, reported down while it waits, and restarted with a backoff
that doubles; a short-lived task's failure is logged and counted too."""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys

import pytest
from nats.errors import UnexpectedEOF
from prometheus_client import CollectorRegistry

from services import runtime
from services.runtime import Tasks, nats_error, raise_lost_cancel


def failures(registry: CollectorRegistry, task: str) -> float:
    return registry.get_sample_value("task_failures_total", {"task": task}) or 0.0


async def test_a_dying_task_is_restarted_with_backoff_and_reported_down_meanwhile(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "TASK_BACKOFF_S", 0.02)
    registry = CollectorRegistry()
    tasks = Tasks(registry)
    runs: list[float] = []
    healthy = asyncio.Event()

    async def flaky() -> None:
        runs.append(asyncio.get_running_loop().time())
        if len(runs) <= 3:
            raise RuntimeError(f"failure {len(runs)}")
        healthy.set()
        await asyncio.Event().wait()

    with caplog.at_level(logging.INFO, "runtime"):
        tasks.start("flaky", flaky)
        await asyncio.sleep(0.005)
        assert "task flaky failed (RuntimeError: failure 1)" in tasks.down["flaky"]
        await asyncio.wait_for(healthy.wait(), 5)
    assert not tasks.down and failures(registry, "flaky") == 3
    waits = [b - a for a, b in itertools.pairwise(runs)]
    assert waits[0] >= 0.02 and waits[1] >= 0.04 and waits[2] >= 0.08  # doubling
    failed = [r for r in caplog.records if r.getMessage() == "task failed"]
    assert len(failed) == 3 and all(r.exc_info for r in failed)
    assert sum(r.getMessage() == "task restarted" for r in caplog.records) == 3
    await tasks.stop()
    assert failures(registry, "flaky") == 3  # stopping is no failure


async def test_a_task_that_returns_counts_as_dead(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    tasks = Tasks(registry)

    async def quits() -> None:
        return

    with caplog.at_level(logging.ERROR, "runtime"):
        tasks.start("quits", quits)
        await asyncio.sleep(0.01)
    assert "task quits failed (it returned)" in tasks.down["quits"]
    assert failures(registry, "quits") >= 1
    await tasks.stop("quits")


async def test_a_short_lived_task_that_fails_is_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    tasks = Tasks(registry)

    async def fails() -> None:
        raise ValueError("boom")

    async def cancelled() -> None:
        await asyncio.Event().wait()

    with caplog.at_level(logging.ERROR, "runtime"):
        bad = asyncio.create_task(fails())
        tasks.watch("request", bad)
        quiet = asyncio.create_task(cancelled())
        tasks.watch("request", quiet)
        await asyncio.sleep(0)
        quiet.cancel()
        await asyncio.gather(bad, quiet, return_exceptions=True)
        await asyncio.sleep(0)
    assert failures(registry, "request") == 1
    [record] = [r for r in caplog.records if r.getMessage() == "task failed"]
    assert record.exc_info is not None and "boom" in str(record.exc_info[1])


async def test_a_task_stopped_while_it_waits_to_restart_is_no_longer_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runtime, "TASK_BACKOFF_S", 10.0)
    tasks = Tasks(CollectorRegistry())

    async def fails() -> None:
        raise RuntimeError("once")

    tasks.start("fails", fails)
    await asyncio.sleep(0.01)
    assert "fails" in tasks.down
    await tasks.stop("fails")
    assert not tasks.down  # a service that stopped it is not kept unready by it


async def test_nats_errors_say_a_lost_connection_in_a_line_and_a_callbacks_bug_in_full(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, "runtime"):
        await nats_error(UnexpectedEOF())
        await nats_error(ConnectionRefusedError("refused"))
        await nats_error(ValueError("a subscription callback's bug"))
    lines = [(r.levelname, r.getMessage(), bool(r.exc_info)) for r in caplog.records]
    assert lines == [
        ("WARNING", "nats connection", False),
        ("WARNING", "nats connection", False),
        ("ERROR", "unhandled error", True),
    ]


async def test_a_task_that_lost_its_cancel_is_cancelled_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As when an await returns a result that came with the cancel (Python 3.11): the
    task goes on; stopping cancels it again a second later, and says so."""
    tasks = Tasks(CollectorRegistry())
    lost: list[int] = []

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if lost:
                    raise
                lost.append(1)

    tasks.start("stubborn", stubborn)
    await asyncio.sleep(0.01)
    with caplog.at_level(logging.WARNING, "runtime"):
        await asyncio.wait_for(tasks.stop(), 5)
    assert lost == [1]
    [said] = caplog.records
    assert said.getMessage() == "tasks still stopping"
    [where] = [w for w in said.__dict__["waiting"] if w.startswith("stubborn:")]
    assert "_keep > stubborn > wait (" in where and "locks.py" in where  # the line it waits on


async def test_a_task_of_a_task_group_that_lost_its_cancel_is_cancelled_again() -> None:
    """A task group cancels its tasks once and waits for them: one whose cancel was lost
    (it came with the reply its await returned) held its group, the task that runs it
    and the service's stop for ever. Stopping cancels again every task that was
    cancelled and still runs."""
    tasks = Tasks(CollectorRegistry())
    lost: list[int] = []

    async def reader() -> None:
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if lost:
                    raise
                lost.append(1)  # as wait_for returns a result that came with the cancel

    async def group() -> None:
        async with asyncio.TaskGroup() as g:
            g.create_task(reader())

    tasks.start("group", group)
    await asyncio.sleep(0.05)
    await asyncio.wait_for(tasks.stop(), 5)
    assert lost == [1]


async def test_a_cancel_an_await_returned_through_is_raised() -> None:
    """Python 3.11's wait_for (a NATS request's) returns a result that came with a
    cancel, and drops the cancel: ``raise_lost_cancel`` after it stops the task."""
    loop = asyncio.get_running_loop()

    async def read(reply: asyncio.Future[int], check: bool) -> int:
        value = await asyncio.wait_for(reply, 10)
        if check:
            raise_lost_cancel()
        return value

    outcomes = []
    for check in (False, True):
        reply: asyncio.Future[int] = loop.create_future()
        task = asyncio.create_task(read(reply, check))
        await asyncio.sleep(0)  # it waits for its reply
        reply.set_result(7)
        task.cancel()  # in the same turn as the reply
        await asyncio.wait([task])
        outcomes.append("cancelled" if task.cancelled() else task.result())
    if sys.version_info < (3, 12):
        assert outcomes == [7, "cancelled"]  # without it, the task reads on
    else:
        assert outcomes[1] == "cancelled"
