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
from collections.abc import Awaitable, Callable, Iterable
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
MAX_MESSAGE = 64 << 10  # bytes of one message a client sends
WS_QUEUE = 1000
OVERLOADED = {"type": "error", "code": "overloaded"}
TASK = "pushes"

log = logging.getLogger("gateway.ws")


class Socket:
    """A subscriber's websocket: what is pushed to it queued (at most ``WS_QUEUE``) and
    sent in order by a task of its own; one too slow to keep up is sent ``overflow``
    once, unsubscribed, and closed."""

    def __init__(self, ws: web.WebSocketResponse, overflow: dict[str, Any]) -> None:
        self.ws = ws
        self.overflow = overflow
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(WS_QUEUE + 1)
        self.cut = False

    def push(self, doc: dict[str, Any]) -> bool:
        """Queue ``doc``; False where the socket is (now) cut."""
        if self.cut:
            return False
        if self.queue.qsize() < WS_QUEUE:
            self.queue.put_nowait(doc)
            return True
        self.queue.put_nowait(self.overflow)  # the last slot is kept for this
        self.cut = True
        return False

    async def pump(self) -> None:
        while True:
            doc = await self.queue.get()
            if not await send(self.ws, doc):
                return
            if doc is self.overflow:
                await self.ws.close(message=b"subscriber too slow")
                return


async def serve(
    request: web.Request,
    tasks: Tasks,
    metrics: GatewayMetrics,
    overflow: dict[str, Any],
    binary: dict[str, Any],
    answer: Callable[[Socket, str], Awaitable[Any]],
    ended: Callable[[Socket], Awaitable[None]],
) -> web.WebSocketResponse:
    """A websocket: each text message answered in turn (``answer``; None: no answer), a
    binary one with ``binary``, pushes sent as they are queued, ``ended`` once it
    closes."""
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=MAX_MESSAGE)
    await ws.prepare(request)
    sock = Socket(ws, overflow)
    sender = asyncio.create_task(sock.pump())
    tasks.watch("websocket", sender)
    metrics.websockets.inc()
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                doc = await answer(sock, msg.data)
            elif msg.type == WSMsgType.BINARY:
                doc = binary
            else:  # ERROR (a frame over the size limit, a protocol error) or closing:
                # aiohttp has begun the close handshake; there is nobody to answer.
                why = {"type": msg.type.name, "error": str(msg.data)}
                log.debug("websocket ends", extra=why)
                break
            if doc is not None and not await send(ws, doc):
                break
    except Exception:  # a bug: said once; the socket, already upgraded, is closed
        log.exception("websocket handler failed")
        await ws.close(code=WSCloseCode.INTERNAL_ERROR)
    finally:
        sender.cancel()
        metrics.websockets.dec()
        await ended(sock)
    return ws


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
        self.sockets: dict[bytes, set[Socket]] = {}
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
                socks = sockets.get(c.owner)
                if socks and not c.ledger:  # an output paid to another ledger is not here
                    self._push(socks, events, c)

    def _push(self, socks: set[Socket], events: proto.BlockEvents, c: proto.CoinChange) -> None:
        note = {
            "type": "coin",
            "address": encode_address(c.owner, self.network),
            "txid": c.txid.hex(),
            "coin_id": c.coin_id.hex(),
            "value_msat": c.value_msat,
            "kind": "received" if c.created else "spent",
            "block": {"worker": events.worker, "height": events.height},
        }
        for sock in list(socks):
            if not sock.push(note):
                self._unsubscribe_all(sock)

    def _unsubscribe(self, sock: Socket, owners: Iterable[bytes]) -> None:
        for owner in owners:
            socks = self.sockets.get(owner)
            if socks is not None:
                socks.discard(sock)
                if not socks:
                    del self.sockets[owner]

    def _unsubscribe_all(self, sock: Socket) -> None:
        self._unsubscribe(sock, [o for o, socks in self.sockets.items() if sock in socks])

    async def _subscription(self, sock: Socket, text: str, mine: set[bytes]) -> dict[str, Any]:
        """Apply one subscription message of a socket; the answer to send it."""
        try:
            sub = msgspec.json.decode(text, type=Subscription)
            add = [bytes(decode_address(a, self.network)) for a in sub.subscribe]
            drop = [bytes(decode_address(a, self.network)) for a in sub.unsubscribe]
        except (msgspec.ValidationError, msgspec.DecodeError, DecodeError) as exc:
            return {"type": "error", "code": "malformed", "message": str(exc)}
        if sock.cut:
            return {"type": "error", "code": "overloaded", "message": "too slow: reconnect"}
        if len(mine | set(add)) > MAX_SUBSCRIPTIONS:
            message = f"at most {MAX_SUBSCRIPTIONS} addresses"
            return {"type": "error", "code": TOO_LARGE, "message": message}
        for owner in add:
            mine.add(owner)
            self.sockets.setdefault(owner, set()).add(sock)
        mine.difference_update(drop)
        self._unsubscribe(sock, drop)
        await self._follow()
        return {"type": "subscribed", "count": len(mine)}

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        mine: set[bytes] = set()

        async def answer(sock: Socket, text: str) -> dict[str, Any]:
            return await self._subscription(sock, text, mine)

        async def ended(sock: Socket) -> None:
            self._unsubscribe_all(sock)
            await self._follow()

        binary = {"type": "error", "code": "malformed", "message": "text only"}
        return await serve(request, self.tasks, self.metrics, OVERLOADED, binary, answer, ended)


async def send(ws: web.WebSocketResponse, doc: Any) -> bool:
    """Send ``doc``; False (and nothing logged above debug) once the socket is closing."""
    if ws.closed:
        return False
    try:
        await ws.send_json(doc)
    except ConnectionResetError as exc:  # aiohttp's ClientConnectionResetError among them
        log.debug("websocket closing", extra={"error": str(exc)})
        return False
    return True
