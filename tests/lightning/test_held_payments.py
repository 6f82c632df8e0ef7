"""Payment places (``services.gateway.lightning.Threads``): a call that outlives its
timeout leaves its place to the next one while there is room for held calls, and keeps it
once that room is full; either way its thread runs on until lightningd answers."""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.gateway.lightning import NotSent, Threads


async def test_a_call_past_its_timeout_leaves_its_place_while_there_is_room_for_it() -> None:
    threads = Threads(1, "test", held=1)
    gates = [threading.Event(), threading.Event()]
    ran: list[int] = []

    def blocked(i: int) -> int:
        ran.append(i)
        gates[i].wait(10)
        return i

    with pytest.raises(TimeoutError):  # held: its place is free for the next call
        await threads.run(lambda: blocked(0), 0.05)
    assert threads.held == 1 and not threads.places.locked()
    with pytest.raises(TimeoutError):  # no room for another held one: it keeps its place
        await threads.run(lambda: blocked(1), 0.05)
    assert threads.held == 1 and threads.places.locked()
    with pytest.raises(NotSent):
        await threads.run(lambda: 7, 1, wait_s=0.1)
    assert ran == [0, 1]
    gates[0].set()  # the held call ends: its room, not a place, is given back
    await asyncio.sleep(0.1)
    assert threads.held == 0 and threads.places.locked()
    gates[1].set()  # the other ends: its place is free
    await asyncio.sleep(0.1)
    assert not threads.places.locked()
    assert await threads.run(lambda: 7, 1, wait_s=0.1) == 7


async def test_without_room_for_held_calls_a_call_keeps_its_place_until_it_ends() -> None:
    threads = Threads(1, "test")
    gate = threading.Event()
    with pytest.raises(TimeoutError):
        await threads.run(lambda: gate.wait(10), 0.05)
    assert threads.places.locked() and threads.held == 0
    gate.set()
    await asyncio.sleep(0.1)
    assert not threads.places.locked()
