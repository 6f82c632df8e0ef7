"""A machine's ticks (``services.replica.app.Machine._tick``): a copy whose tick raises
(a bug) is said and keeps the machine from being ready, and every other copy on the
machine ticks on."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from nats.aio.client import Client

from services.replica import app
from services.replica.app import Machine
from services.replica.config import Settings
from services.replica.host import HostedCopy
from tests.services.test_hosted_copy import KEYS, LAYOUT


class _Copy:
    """Stands in for a ``HostedCopy`` as the machine's ticks and readiness see it."""

    def __init__(self, name: str) -> None:
        self.name, self.gap, self.serving = name, None, False
        self.ticks = 0
        self.broken = False

    def tick(self, now: float) -> None:
        if self.broken:
            raise RuntimeError("a bug")
        self.ticks += 1

    def caught_up(self, now: float) -> bool:
        return True


def _machine(tmp_path: Path) -> Machine:
    settings = Settings(
        layout=LAYOUT,
        operator=0,
        machine=0,
        key=KEYS[0],
        nats_url="nats://127.0.0.1:1",
        peers={},
        state_dir=tmp_path,
        http_host="127.0.0.1",
        http_port=0,
        heartbeat_ms=50,
        election_ms=300,
        prepare_timeout_ms=1000,
        snapshot_every=1024,
        keep=256,
        log_level="info",
    )
    machine = Machine(settings)
    machine.nc = cast(Client, SimpleNamespace(is_connected=True))
    machine._started = True
    return machine


async def test_one_copy_s_failing_tick_stops_no_other_copy_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(app, "TICK_S", 0.001)
    machine = _machine(tmp_path)
    bad, good = _Copy("op0/0"), _Copy("op0/1")
    machine.copies = cast(list[HostedCopy], [bad, good])
    bad.broken = True
    ticking = asyncio.create_task(machine._tick())
    try:
        async with asyncio.timeout(5):  # the others tick on
            while good.ticks < 20:
                await asyncio.sleep(0.005)
        ok, why = machine.ready()
        assert not ok and why == "ticks failing: op0/0: RuntimeError: a bug"
        said = [r for r in caplog.records if r.getMessage() == "a copy's tick failed"]
        assert len(said) == 1 and said[0].exc_info is not None  # once, with its traceback
        bad.broken = False
        async with asyncio.timeout(5):
            while bad.ticks < 2:
                await asyncio.sleep(0.005)
        assert machine.ready()[0]
    finally:
        ticking.cancel()
    machine.copies = []  # the stand-ins have no replicas for the copies' metrics
    failures = machine.metrics.registry.get_sample_value(
        "replica_tick_failures_total", {"shard": "op0/0"}
    )
    assert failures is not None and failures >= 20
