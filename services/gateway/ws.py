"""Websocket pushes: a socket subscribes to addresses and is told of each coin they
receive or spend, as each block with it is written.

While some socket subscribes, the gateway follows the workers' events logs from their
ends (``services.follow``): published events at once, and what a worker wrote but did
not publish (it crashed) from its log, so a subscriber misses nothing that commits
after its subscription is answered. With no subscriber, the gateway follows nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import msgspec
from aiohttp import WSCloseCode, WSMsgType, web
from prometheus_client import CollectorRegistry

from constellation.address import Network, decode_address, encode_address
from constellation.errors import DecodeError
from constellation.protocol import ledger as proto
from services.follow import QUERY_TIMEOUT_S, Follower, FollowMetrics
from services.gateway.errors import TOO_LARGE
from services.gateway.metrics import GatewayMetrics
from services.partition.client import LedgerClient
from services.runtime import Tasks

MAX_SUBSCRIPTIONS = 1000
WS_QUEUE = 1000
TASK = "pushes"

log = logging.getLogger("gateway.ws")

Queue = asyncio.Queue[dict[str, Any]]


class Subscription(msgspec.Struct, forbid_unknown_fields=True):
    subscribe: list[str] = []
    unsubscribe: list[str] = []


class Pushes:
    """The sockets subscribed to each owner, and the following that feeds them."""

    def __init__(
        self,
        ledger: LedgerClient,
        network: Network,
        metrics: GatewayMetrics,
        registry: CollectorRegistry,
        tasks: Tasks,
    ) -> None:
        self.ledger = ledger
        self.network = network
        self.metrics = metrics
        self.follow_metrics = FollowMetrics(registry, "gateway_pushes")
        self.tasks = tasks
        self.sockets: dict[bytes, set[Queue]] = {}
        self.cut: set[Queue] = set()  # sockets told they are too slow: closing, not served
        self.follower: Follower | None = None
        self._following = asyncio.Lock()

    async def _follow(self) -> None:
        """Follow the logs while, and only while, some socket subscribes to an address;
        once following, every log's end is known, so what commits from then on is pushed."""
        async with self._following:
            if self.sockets and self.follower is None:
                ledger = self.ledger
                follower = self.follower = Follower(
                    ledger.nc,
                    ledger.operator,
                    ledger.pmap.workers,
                    None,
                    self._deliver,
                    self.follow_metrics,
                )
                self.tasks.start(TASK, follower.run)
                try:  # a worker that does not answer is read from where it is once it does
                    async with asyncio.timeout(QUERY_TIMEOUT_S + 1):
                        await follower.started.wait()
                except TimeoutError:
                    log.warning("pushes follow without every log's end")
            elif not self.sockets and self.follower is not None:
                self.follower = None
                await self.tasks.stop(TASK)

    async def _deliver(self, blocks: list[proto.BlockEvents]) -> None:
        """Push the blocks' changes to the sockets subscribed to their owners."""
        sockets = self.sockets
        for events in blocks:
            for c in events.changes:
                queues = sockets.get(c.owner)
                if queues and not c.ledger:  # an output paid to another ledger is not here
                    self._push(queues, events, c)

    def _push(self, queues: set[Queue], events: proto.BlockEvents, c: proto.CoinChange) -> None:
        note = {
            "type": "coin",
            "address": encode_address(c.owner, self.network),
            "txid": c.txid.hex(),
            "coin_id": c.coin_id.hex(),
            "value_msat": c.value_msat,
            "kind": "received" if c.created else "spent",
            "block": {"worker": events.worker, "height": events.height},
        }
        for queue in list(queues):
            if queue.qsize() < WS_QUEUE:
                queue.put_nowait(note)
            else:  # the last slot is kept for this
                queue.put_nowait({"type": "error", "code": "overloaded"})
                self.cut.add(queue)
                self._unsubscribe_all(queue)

    def _unsubscribe(self, queue: Queue, owners: Iterable[bytes]) -> None:
        for owner in owners:
            queues = self.sockets.get(owner)
            if queues is not None:
                queues.discard(queue)
                if not queues:
                    del self.sockets[owner]

    def _unsubscribe_all(self, queue: Queue) -> None:
        self._unsubscribe(queue, [o for o, qs in self.sockets.items() if queue in qs])

    async def _subscription(self, text: str, queue: Queue, mine: set[bytes]) -> dict[str, Any]:
        """Apply one subscription message of a socket; the answer to send it."""
        try:
            sub = msgspec.json.decode(text, type=Subscription)
            add = [bytes(decode_address(a, self.network)) for a in sub.subscribe]
            drop = [bytes(decode_address(a, self.network)) for a in sub.unsubscribe]
        except (msgspec.ValidationError, msgspec.DecodeError, DecodeError) as exc:
            return {"type": "error", "code": "malformed", "message": str(exc)}
        if queue in self.cut:
            return {"type": "error", "code": "overloaded", "message": "too slow: reconnect"}
        if len(mine | set(add)) > MAX_SUBSCRIPTIONS:
            message = f"at most {MAX_SUBSCRIPTIONS} addresses"
            return {"type": "error", "code": TOO_LARGE, "message": message}
        for owner in add:
            mine.add(owner)
            self.sockets.setdefault(owner, set()).add(queue)
        mine.difference_update(drop)
        self._unsubscribe(queue, drop)
        await self._follow()
        return {"type": "subscribed", "count": len(mine)}

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=64 << 10)
        await ws.prepare(request)
        queue: Queue = asyncio.Queue(WS_QUEUE + 1)
        mine: set[bytes] = set()

        async def pump() -> None:
            while True:
                note = await queue.get()
                if not await _send(ws, note):
                    return
                if note["type"] == "error":
                    await ws.close(message=b"subscriber too slow")
                    return

        sender = asyncio.create_task(pump())
        self.tasks.watch("websocket", sender)
        self.metrics.websockets.inc()
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    answer = await self._subscription(msg.data, queue, mine)
                elif msg.type == WSMsgType.BINARY:
                    answer = {"type": "error", "code": "malformed", "message": "text only"}
                else:  # ERROR (a frame over the size limit, a protocol error) or closing:
                    # aiohttp has begun the close handshake; there is nobody to answer.
                    why = {"type": msg.type.name, "error": str(msg.data)}
                    log.debug("websocket ends", extra=why)
                    break
                if not await _send(ws, answer):
                    break
        except Exception:  # a bug: said once; the socket, already upgraded, is closed
            log.exception("websocket handler failed")
            await ws.close(code=WSCloseCode.INTERNAL_ERROR)
        finally:
            sender.cancel()
            self.cut.discard(queue)
            self._unsubscribe_all(queue)
            self.metrics.websockets.dec()
            await self._follow()
        return ws


async def _send(ws: web.WebSocketResponse, doc: dict[str, Any]) -> bool:
    """Send ``doc``; False (and nothing logged above debug) once the socket is closing."""
    if ws.closed:
        return False
    try:
        await ws.send_json(doc)
    except ConnectionResetError as exc:  # aiohttp's ClientConnectionResetError among them
        log.debug("websocket closing", extra={"error": str(exc)})
        return False
    return True
