"""Payments to an address from other operators' ledgers (``/incoming``), as a wallet
sees them: every pending one found however many came after it, and each counted once
around its release (pending until its coin is in the index or it is marked released;
marked before its coin is indexed, it is missing from the balance only as long as the
index lags, as any coin is).

The gateway's real handler over a real PostgreSQL holding the real index and settlement
tables; the wallet's balance code reads it over HTTP."""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from constellation.address import Network, encode_address
from constellation.keys import SigningKey
from constellation.protocol import ledger as proto
from constellation.protocol.settlement import Entry
from services.api_client import Gateway
from services.gateway.api import Api
from services.gateway.metrics import GatewayMetrics
from services.gateway.settle_store import SettleStore
from services.indexer.store import Index
from services.wallet import _pending
from tests.services.postgres import throwaway_postgres

NET = Network.REGTEST


@pytest.fixture
async def stores() -> AsyncIterator[tuple[Index, SettleStore]]:
    async with throwaway_postgres("incoming") as url:
        index = await Index.open(url)
        store = await SettleStore.open(url)
        try:
            yield index, store
        finally:
            await store.close()
            await index.close()


async def serve(index: Index, store: SettleStore) -> TestServer:
    stand_ins: Any = [{"op": None}, "op", index, None, GatewayMetrics(), None, NET, 1, 1.0]
    api = Api(*stand_ins, *[{}] * 3)
    api.settle_store = store
    app = web.Application(middlewares=[api._errors])
    app.router.add_get("/v1/address/{address}/incoming", api.get_incoming)
    return TestServer(app)


def entries(n: int, owner: bytes, value: int) -> list[tuple[Entry, bytes]]:
    return [
        (Entry(seq, os.urandom(32), os.urandom(32), owner, value), os.urandom(32))
        for seq in range(1, n + 1)
    ]


async def balance_line(gw: Gateway, address: str) -> str:
    out = io.StringIO()
    await _pending(gw, SimpleNamespace(addresses=lambda: [address]), out)  # type: ignore[arg-type]
    return out.getvalue()


async def test_every_pending_payment_is_found_past_a_page_and_pages_are_whole(
    stores: tuple[Index, SettleStore],
) -> None:
    """op1's payment waits for op1 to settle; 600 from op2 came after it, settled: the
    wallet once read only the newest 50 (and a page could reach no further than 500)."""
    index, store = stores
    owner = SigningKey(os.urandom(32)).pubkey
    address = encode_address(owner, NET)
    await store.add_pending("op1", entries(1, bytes(owner), 7_000))
    await store.add_pending("op2", entries(600, bytes(owner), 10))
    await store.released("op2", 1, 600, 1)
    async with await serve(index, store) as server, aiohttp.ClientSession() as s:
        gw = Gateway(str(server.make_url("")), s)
        assert "+ 7000 msat pending in 1 payments from op1" in await balance_line(gw, address)
        seen: list[str] = []
        cursor = ""
        while True:  # every entry once, newest first, a page of 128 at a time
            doc = await gw.get(f"/v1/address/{address}/incoming?limit=128{cursor}")
            seen += [e["output"] for e in doc["incoming"]]
            if "next" not in doc:
                break
            cursor = f"&before={doc['next']}"
        assert len(seen) == len(set(seen)) == 601
        assert [e["status"] for e in await gw.incoming(address, 3)] == ["released"] * 3
        async with s.get(server.make_url(f"/v1/address/{address}/incoming?status=x")) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "malformed.status"


async def test_a_payment_whose_coin_is_indexed_is_released_before_it_is_marked(
    stores: tuple[Index, SettleStore],
) -> None:
    """The release makes the coin, then marks the payment released (a database down
    between the two, or a later chunk refused, holds the mark back for a while): once
    the coin is in the index the wallet counts it there, and no longer as pending."""
    index, store = stores
    owner = SigningKey(os.urandom(32)).pubkey
    address = encode_address(owner, NET)
    ((_, release_id),) = paid = entries(1, bytes(owner), 7_000)
    await store.add_pending("op1", paid)
    async with await serve(index, store) as server, aiohttp.ClientSession() as s:
        gw = Gateway(str(server.make_url("")), s)
        assert "+ 7000 msat pending" in await balance_line(gw, address)
        made = proto.CoinChange(os.urandom(32), release_id, bytes(owner), 7_000, True)
        await index.store([proto.BlockEvents(0, 1, -1, [made], [])])  # issued, indexed
        assert await balance_line(gw, address) == ""
        (shown,) = await gw.incoming(address)
        assert shown["status"] == "released" and shown["released_at"] is None
