"""An indexer applies a page of a shard's blocks without holding its event loop: an
indexer catching up once took seconds a page, did not stop on SIGTERM within its grace,
and so held up the stop of its operator's machines (elections measured 12 s, not 2)."""

from __future__ import annotations

import asyncio
import random
from collections import deque

import pytest

from constellation.lightclient import index as lc
from constellation.protocol.ledger import BlockEvents, CoinChange
from services.indexer.checkpoints import apply_blocks

BLOCKS, CHANGES = 60, 40


def page(worker: int, rng: random.Random) -> list[BlockEvents]:
    blocks = []
    for height in range(1, BLOCKS + 1):
        changes = [
            CoinChange(rng.randbytes(32), rng.randbytes(32), rng.randbytes(32), 5, True)
            for _ in range(CHANGES)
        ]
        prev = height - 1 or -1
        blocks.append(BlockEvents(worker, height, prev, changes, [], rng.randbytes(32), b"r" * 32))
    return blocks


def test_the_loop_runs_between_the_blocks_of_a_page() -> None:
    index, seen = lc.ShardIndex(0, 1), deque[tuple[int, float]]()
    turns: list[int] = []  # the index's height each time another task ran

    async def run() -> None:
        applying = asyncio.create_task(apply_blocks(index, page(1, random.Random(7)), seen))
        while not applying.done():
            turns.append(index.height)
            await asyncio.sleep(0)
        await applying

    asyncio.run(run())
    assert index.height == BLOCKS and [h for h, _ in seen] == list(range(1, BLOCKS + 1))
    # Another task ran after every block, not only once the page was done.
    assert sorted(set(turns)) == list(range(BLOCKS + 1))


def test_a_page_is_cancelled_between_two_blocks() -> None:
    """What SIGTERM does: the task stops at the next block, the index whole up to it."""
    index, seen = lc.ShardIndex(0, 1), deque[tuple[int, float]]()

    async def run() -> None:
        applying = asyncio.create_task(apply_blocks(index, page(1, random.Random(8)), seen))
        while index.height < 5:
            await asyncio.sleep(0)
        applying.cancel()
        with pytest.raises(asyncio.CancelledError):
            await applying

    asyncio.run(run())
    assert 5 <= index.height < BLOCKS and len(seen) == index.height


def test_a_block_of_another_worker_is_refused() -> None:
    index, seen = lc.ShardIndex(0, 1), deque[tuple[int, float]]()
    with pytest.raises(ValueError, match="a block of worker 2"):
        asyncio.run(apply_blocks(index, page(2, random.Random(9)), seen))
    assert index.height == 0 and not seen
