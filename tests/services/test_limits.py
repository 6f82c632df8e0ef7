"""Rate limits against a real redis-server: local decisions, shared counts, Redis down."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from constellation.errors import (
    CoinSpent,
    CommitTimeout,
    InFlight,
    InputLocked,
    KeyReused,
)
from services import devnet
from services.gateway.errors import INTERNAL, RATE_LIMITED, TIMEOUT
from services.gateway.limits import Limits, Stored

RATE = 100


class Clock:
    """A clock the test moves: windows change only when it says so."""

    def __init__(self) -> None:
        self.now = 1_000_000.25

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def redis_port(tmp_path: Path) -> Iterator[int]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is missing: run scripts/setup")
    port = devnet.free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir"]
    pid = devnet.spawn([*argv, str(tmp_path)], dict(os.environ), tmp_path / "redis.log")
    devnet.wait_tcp(port, 10)
    yield port
    devnet.stop_pid(pid, 5, signal.SIGTERM)


@pytest.fixture
async def gateways(redis_port: int) -> AsyncIterator[tuple[Limits, Limits, Clock]]:
    """Two gateways' limits sharing one Redis and one clock."""
    clock = Clock()
    url = f"redis://127.0.0.1:{redis_port}"
    a = Limits(aioredis.Redis.from_url(url), RATE, clock)
    b = Limits(aioredis.Redis.from_url(url), RATE, clock)
    yield a, b, clock
    await a.close()
    await b.close()


async def test_one_gateway_admits_the_rate_and_no_more(
    gateways: tuple[Limits, Limits, Clock],
) -> None:
    a, _, clock = gateways
    assert a.admit("alice", 60) == 0
    assert a.admit("alice", 40) == 0
    wait = a.admit("alice", 1)
    assert wait == pytest.approx(0.75)  # until the window ends
    assert a.admit("bob", RATE) == 0  # per client
    await a.sync()
    assert a.admit("alice", 1) > 0  # the synced count still counts
    assert await a.redis.get("rate:alice:1000000") == str(RATE).encode()
    clock.now += 1
    assert a.admit("alice", RATE) == 0  # a new window


async def test_a_refused_batch_is_not_counted(gateways: tuple[Limits, Limits, Clock]) -> None:
    a, _, _ = gateways
    assert a.admit("alice", 90) == 0
    assert a.admit("alice", 20) > 0
    assert a.admit("alice", 10) == 0


async def test_gateways_share_counts_through_redis(
    gateways: tuple[Limits, Limits, Clock],
) -> None:
    a, b, _ = gateways
    assert a.admit("alice", 80) == 0
    await a.sync()
    assert b.admit("alice", 10) == 0  # b has not heard of a's 80 yet
    await b.sync()  # and now has: 90 in this window
    assert b.admit("alice", 20) > 0
    assert b.admit("alice", 10) == 0
    await b.sync()
    await a.sync()
    assert a.admit("alice", 1) == 0  # a learns only with its own next sync
    await a.sync()
    assert a.admit("alice", 1) > 0
    assert await a.redis.get("rate:alice:1000000") == str(RATE + 1).encode()


async def test_counts_stay_local_while_redis_is_down(
    gateways: tuple[Limits, Limits, Clock], redis_port: int
) -> None:
    a, _, _ = gateways
    await a.redis.shutdown(nosave=True)
    assert a.admit("alice", 70) == 0
    with pytest.raises(RedisError):
        await a.sync()
    assert a.admit("alice", 40) > 0  # the 70 still count
    assert a.admit("alice", 30) == 0


async def test_only_final_answers_are_kept_for_an_idempotency_key(
    gateways: tuple[Limits, Limits, Clock],
) -> None:
    a, b, _ = gateways
    body = b"a transaction"

    def refusal(code: str) -> dict[str, Any]:
        return {"error": {"code": code, "message": "..."}}

    # An answer that a retry may change is forgotten: the retry reaches the ledger again.
    for status, code in (
        (409, InFlight.code),
        (409, InputLocked.code),
        (429, RATE_LIMITED),
        (500, INTERNAL),
        (503, CommitTimeout.code),
        (504, TIMEOUT),
    ):
        assert await a.begin("alice", "k", body) is None
        await a.finish("alice", "k", body, status, refusal(code))
        assert await b.begin("alice", "k", body) is None, code  # claimed anew
        await b.finish("alice", "k", body, 504, refusal(TIMEOUT))
    # A refusal for good and a receipt are replayed, by every gateway.
    assert await a.begin("alice", "spent", body) is None
    await a.finish("alice", "spent", body, 409, refusal(CoinSpent.code))
    assert await b.begin("alice", "spent", body) == Stored(409, refusal(CoinSpent.code))
    receipt = {"txid": "ab", "status": "committed"}
    assert await a.begin("alice", "paid", body) is None
    await a.finish("alice", "paid", body, 200, receipt)
    assert await b.begin("alice", "paid", body) == Stored(200, receipt)
    with pytest.raises(KeyReused):
        await b.begin("alice", "paid", b"another transaction")
