"""Websocket pushes: a subscriber that cannot keep up is told once and served no more,
even if it subscribes again; the following that feeds the sockets never fails for it."""

from __future__ import annotations

import json
import os
from typing import cast

from aiohttp import web
from prometheus_client import CollectorRegistry

from constellation.address import Network, encode_address
from constellation.keys import SigningKey
from constellation.protocol import ledger as proto
from services.gateway.metrics import GatewayMetrics
from services.gateway.ws import OVERLOADED, WS_QUEUE, Pushes, Socket
from services.partition.client import LedgerClient
from services.runtime import Tasks


def block(owner: bytes, changes: int, height: int) -> proto.BlockEvents:
    change = proto.CoinChange(os.urandom(32), os.urandom(32), owner, 5, True)
    return proto.BlockEvents(0, height, height - 1, [change] * changes, [])


async def test_a_subscriber_too_slow_is_cut_off_and_stays_cut_off() -> None:
    # The ledger client is only needed to follow the logs, which this test does not.
    pushes = Pushes(
        cast(LedgerClient, None),
        Network.REGTEST,
        GatewayMetrics(),
        CollectorRegistry(),
        Tasks(CollectorRegistry()),
    )
    owner = SigningKey(os.urandom(32)).pubkey
    # the sockets are never sent to here: what is queued for them is looked at instead
    slow = Socket(cast(web.WebSocketResponse, None), OVERLOADED)
    quick = Socket(cast(web.WebSocketResponse, None), OVERLOADED)
    pushes.sockets[owner] = {slow}
    await pushes._deliver([block(owner, WS_QUEUE + 10, 1)])
    notes = [slow.queue.get_nowait() for _ in range(slow.queue.qsize())]
    assert len(notes) == WS_QUEUE + 1 and notes[-1] == {"type": "error", "code": "overloaded"}
    assert slow.cut and owner not in pushes.sockets
    pushes.sockets[owner] = {quick}  # another subscriber, who keeps up
    again = json.dumps({"subscribe": [encode_address(owner, Network.REGTEST)]})
    answer = await pushes._subscription(slow, again, set())
    assert answer["code"] == "overloaded" and pushes.sockets[owner] == {quick}
    await pushes._deliver([block(owner, 3, 2)])  # nothing raises; only the quick one hears
    assert slow.queue.empty() and quick.queue.qsize() == 3
