"""The mint's NUT-19 cache against a real redis-server: answers put at once share a
write, each is kept once its put returns, and Redis down loses nothing but the cache."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from services import devnet
from services.ecash.cache import Cache
from services.ecash.metrics import MintMetrics
from tests.services.test_limits import redis_port  # noqa: F401  (a fixture)

SWAP = "/v1/swap"


@pytest.fixture
async def cache(redis_port: int) -> AsyncIterator[tuple[Cache, list[int]]]:  # noqa: F811
    """A cache on a real Redis, and the number of answers each write it made carried."""
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{redis_port}")
    c = Cache(client, 60, MintMetrics())
    writes: list[int] = []
    keep = c._keep

    async def counted(keys: list[str], args: list[Any]) -> Any:
        writes.append(len(keys))
        return await keep(keys, args)

    c._keep = counted  # type: ignore[assignment]
    yield c, writes
    await client.aclose()


async def test_answers_put_at_once_share_a_write_and_each_is_kept(
    cache: tuple[Cache, list[int]],
) -> None:
    c, writes = cache
    bodies = [os.urandom(8) for _ in range(200)]
    await asyncio.gather(*(c.put(SWAP, b, b"answer " + b) for b in bodies))
    assert writes == [200]
    # puts made while a write is on its way go together in the next one
    first = asyncio.create_task(c.put(SWAP, b"first", b"1"))
    await asyncio.sleep(0)  # put: the writer it started takes it before the puts below
    later = [os.urandom(8) for _ in range(50)]
    await asyncio.gather(first, *(c.put(SWAP, b, b"answer " + b) for b in later))
    assert writes == [200, 1, 50]
    for b in [*bodies, *later]:
        assert await c.get(SWAP, b) == b"answer " + b
    assert await c.get(SWAP, b"first") == b"1" and await c.get("/v1/melt/bolt11", b"first") is None
    assert 50 < await c.client.ttl(Cache.key(SWAP, b"first")) <= 60
    # a Redis that forgot the script (restarted) is given it again
    await c.client.script_flush()
    await c.put(SWAP, b"after", b"2")
    assert await c.get(SWAP, b"after") == b"2"


async def test_a_put_given_up_leaves_the_others_written(cache: tuple[Cache, list[int]]) -> None:
    c, writes = cache
    puts = [asyncio.create_task(c.put(SWAP, bytes([i]), bytes([i]))) for i in range(10)]
    await asyncio.sleep(0)
    puts[3].cancel()
    done = await asyncio.gather(*puts, return_exceptions=True)
    assert [isinstance(d, asyncio.CancelledError) for d in done] == [i == 3 for i in range(10)]
    assert writes == [10]  # its answer was on its way all the same
    assert [await c.get(SWAP, bytes([i])) for i in range(10)] == [bytes([i]) for i in range(10)]


async def test_redis_down_fails_no_put_and_counts_the_error() -> None:
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{devnet.free_port()}")
    c = Cache(client, 60, MintMetrics())
    await asyncio.gather(*(c.put(SWAP, bytes([i]), b"x") for i in range(5)))
    assert await c.get(SWAP, bytes([1])) is None
    assert c.metrics.registry.get_sample_value("mint_cache_total", {"outcome": "error"}) == 2
    await client.aclose()


async def test_a_write_that_fails_unexpectedly_is_said_and_the_next_goes(
    cache: tuple[Cache, list[int]], caplog: pytest.LogCaptureFixture
) -> None:
    """A write that raises what Redis never does (a bug): its puts return, it is logged
    with its traceback and counted, and the puts made meanwhile are written all the same
    (the writer stopped with it once, and they waited for ever)."""
    c, writes = cache
    keep = c._keep
    made: list[int] = []

    async def broken_once(keys: list[str], args: list[Any]) -> Any:
        made.append(len(keys))
        if len(made) == 1:
            raise ValueError("a bug")
        return await keep(keys, args)

    c._keep = broken_once  # type: ignore[assignment]
    first = asyncio.create_task(c.put(SWAP, b"first", b"1"))
    await asyncio.sleep(0)  # the writer takes it, and fails
    later = asyncio.gather(*(c.put(SWAP, bytes([i]), bytes([i])) for i in range(5)))
    await asyncio.wait_for(asyncio.gather(first, later), 5)
    assert made == [1, 5] and writes == [5]  # the first write failed before it was sent
    assert await c.get(SWAP, b"first") is None
    assert [await c.get(SWAP, bytes([i])) for i in range(5)] == [bytes([i]) for i in range(5)]
    [record] = [r for r in caplog.records if r.getMessage() == "NUT-19 answers not kept"]
    assert record.exc_info is not None and "a bug" in str(record.exc_info[1])
    assert c.metrics.registry.get_sample_value("mint_cache_total", {"outcome": "error"}) == 1
