"""The mint's listening connection (NUT-17 and keyset changes, from the tables'
triggers) while its PostgreSQL is down, starting or stopping: each way asyncpg fails to
connect is waited out and tried again, never the end of the listener."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from services.ecash import store

# what asyncpg raises connecting to a server killed, starting or stopping mid-handshake
FAILURES: list[Exception] = [
    ConnectionRefusedError(111, "refused"),
    asyncpg.CannotConnectNowError("the database system is starting up"),
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.InterfaceError("cannot perform operation: connection is closed"),
    asyncpg.exceptions.InternalClientError("cannot switch to state 11"),
    TimeoutError(),
]


async def test_every_way_a_connect_fails_is_waited_out_and_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tried: list[str] = []
    done = asyncio.Event()

    async def connect(url: str) -> Any:
        tried.append(url)
        if len(tried) <= len(FAILURES):
            raise FAILURES[len(tried) - 1]
        done.set()
        await asyncio.Event().wait()  # the last try hangs: the test ends it

    monkeypatch.setattr(asyncpg, "connect", connect)
    monkeypatch.setattr(store, "RELISTEN_S", 0.01)
    listener = asyncio.create_task(store.listen_forever("postgresql://db", {}, _nothing))
    waiting = asyncio.create_task(done.wait())
    await asyncio.wait({listener, waiting}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    if listener.done():
        listener.result()  # what it raised: the listener's end, the test's failure
    assert waiting.done() and len(tried) == len(FAILURES) + 1
    listener.cancel()


async def _nothing() -> None:
    return None
