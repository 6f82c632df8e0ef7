"""NUT-17: wallets subscribe over a websocket (``/v1/ws``, JSON-RPC 2.0) to mint quotes,
melt quotes and proofs, and are told every change of their state.

A change is made by whichever mint process served it (or by a resolver); the tables'
triggers notify every process through PostgreSQL on commit (LISTEN/NOTIFY, heard by
``store.listen_forever``), and each process tells its own sockets. A notification names
what changed, never what it became: the state is read anew, so a late notification
tells nothing stale. A subscription is answered with the current state of each thing
first. Where the listening connection breaks it is made again, and every subscriber is
told the current state of all it watches (what changed meanwhile is not missed).

Every request is bounded (its size, subscriptions per socket, things per subscription,
sockets per process), and a socket that does not read what it is sent is closed rather
than queued for without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
from aiohttp import WSCloseCode, WSMsgType, web

from constellation.protocol import cashu as nut
from services.ecash.metrics import MintMetrics

log = logging.getLogger("mint.ws")

CHANNELS = {
    "mint_proofs": "proof_state",
    "mint_quotes": "bolt11_mint_quote",
    "melt_quotes": "bolt11_melt_quote",
}
MAX_SOCKETS = 1000
MAX_SUBSCRIPTIONS = 100  # per socket
MAX_WATCHED = 1000  # quotes and proofs, all a socket's subscriptions together
MAX_MESSAGE = 64 << 10
QUEUE = 256  # messages a socket may be behind before it is closed
HEARTBEAT_S = 30.0
PARSE_ERROR, INVALID_REQUEST, NO_METHOD, INVALID_PARAMS = -32700, -32600, -32601, -32602

# (kind, the things) -> each thing's current state, as the NUT's payload (absent: unknown)
Fetch = Callable[[str, list[str]], Awaitable[dict[str, Any]]]


class RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(eq=False)
class Socket:
    ws: web.WebSocketResponse
    queue: asyncio.Queue[str] = field(default_factory=lambda: asyncio.Queue(QUEUE))
    subs: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # subId: kind, things

    def send(self, doc: Any) -> bool:
        """Queue ``doc`` for the socket; False where it is too far behind."""
        try:
            self.queue.put_nowait(nut.encode(doc).decode())
        except asyncio.QueueFull:
            return False
        return True


class Hub:
    """One mint process's subscribed sockets, told what the database's notifications
    (``store.listen_forever``) say changed."""

    def __init__(self, fetch: Fetch, metrics: MintMetrics) -> None:
        self.fetch = fetch
        self.metrics = metrics
        self.watch: dict[tuple[str, str], set[tuple[Socket, str]]] = {}
        self.sockets: set[Socket] = set()
        # what to tell, in order: (kind, things, the one subscription to tell or None: all)
        self.changes: asyncio.Queue[tuple[str, list[str], tuple[Socket, str] | None]] = (
            asyncio.Queue()
        )
        self.closing: set[asyncio.Task[bool]] = set()  # slow sockets being closed

    # -- a socket ----------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if len(self.sockets) >= MAX_SOCKETS:
            raise web.HTTPServiceUnavailable(text="too many subscribers: try again later")
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=MAX_MESSAGE)
        await ws.prepare(request)
        sock = Socket(ws)
        self.sockets.add(sock)
        self.metrics.ws_sockets.set(len(self.sockets))
        writer = asyncio.ensure_future(self._write(sock))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    break
                reply = await self._answer(sock, msg.data)
                if not sock.send(reply):
                    break
                result = reply.get("result")
                if result is not None and result["subId"] in sock.subs:  # its current state
                    kind, things = sock.subs[result["subId"]]
                    self.changes.put_nowait((kind, things, (sock, result["subId"])))
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            self._drop(sock)
            await ws.close(code=WSCloseCode.POLICY_VIOLATION if sock.queue.full() else 1000)
        return ws

    async def _write(self, sock: Socket) -> None:
        while True:
            await sock.ws.send_str(await sock.queue.get())

    async def _answer(self, sock: Socket, text: str) -> dict[str, Any]:
        """The JSON-RPC answer to one message (its error, where it is not right)."""
        rid = None
        try:
            try:
                doc = msgspec.json.decode(text)
            except (msgspec.DecodeError, RecursionError) as exc:
                raise RpcError(PARSE_ERROR, f"not JSON: {exc}") from None
            if isinstance(doc, dict) and isinstance(doc.get("id"), int):
                rid = doc["id"]
            try:
                req = nut.decode(text.encode(), nut.WsRequest)
            except nut.DecodeError as exc:
                raise RpcError(INVALID_REQUEST, f"not a JSON-RPC 2.0 request: {exc}") from None
            if req.method == "subscribe":
                result = self._subscribe(sock, _params(req, nut.Subscribe))
            elif req.method == "unsubscribe":
                result = self._unsubscribe(sock, _params(req, nut.Unsubscribe))
            else:
                raise RpcError(NO_METHOD, f"no method {req.method!r}: subscribe, unsubscribe")
        except RpcError as exc:
            error = {"code": exc.code, "message": exc.message}
            return {"jsonrpc": "2.0", "error": error, "id": rid}
        return {"jsonrpc": "2.0", "result": result, "id": rid}

    def _subscribe(self, sock: Socket, p: nut.Subscribe) -> dict[str, str]:
        if p.kind not in nut.WS_KINDS:
            raise RpcError(INVALID_PARAMS, f"kind {p.kind!r}: one of {', '.join(nut.WS_KINDS)}")
        if p.sub_id in sock.subs:
            raise RpcError(INVALID_PARAMS, f"subId {p.sub_id!r} is subscribed already")
        if len(sock.subs) >= MAX_SUBSCRIPTIONS:
            raise RpcError(INVALID_PARAMS, f"at most {MAX_SUBSCRIPTIONS} subscriptions a socket")
        things = list(dict.fromkeys(f.lower() if p.kind == "proof_state" else f for f in p.filters))
        if p.kind == "proof_state" and not all(_is_point(y) for y in things):
            raise RpcError(INVALID_PARAMS, "a proof_state filter is a Y: 33 bytes, hex")
        if sum(len(t) for _, t in sock.subs.values()) + len(things) > MAX_WATCHED:
            raise RpcError(INVALID_PARAMS, f"at most {MAX_WATCHED} things watched a socket")
        sock.subs[p.sub_id] = (p.kind, things)
        for thing in things:
            self.watch.setdefault((p.kind, thing), set()).add((sock, p.sub_id))
        return {"status": "OK", "subId": p.sub_id}

    def _unsubscribe(self, sock: Socket, p: nut.Unsubscribe) -> dict[str, str]:
        found = sock.subs.pop(p.sub_id, None)
        if found is None:
            raise RpcError(INVALID_PARAMS, f"no subscription {p.sub_id!r}")
        kind, things = found
        for thing in things:
            self._unwatch((kind, thing), (sock, p.sub_id))
        return {"status": "OK", "subId": p.sub_id}

    def _unwatch(self, key: tuple[str, str], who: tuple[Socket, str]) -> None:
        watchers = self.watch.get(key)
        if watchers is not None:
            watchers.discard(who)
            if not watchers:
                del self.watch[key]

    def _drop(self, sock: Socket) -> None:
        for sub, (kind, things) in sock.subs.items():
            for thing in things:
                self._unwatch((kind, thing), (sock, sub))
        sock.subs.clear()
        self.sockets.discard(sock)
        self.metrics.ws_sockets.set(len(self.sockets))

    # -- what changed ------------------------------------------------------------------

    def heard(self, kind: str, payload: str) -> None:
        """A notification of the tables' triggers: ``kind``'s things that changed (those
        some socket here watches are told)."""
        watched = [t for t in payload.split(",") if (kind, t) in self.watch]
        if watched:
            self.changes.put_nowait((kind, watched, None))

    async def tell_forever(self) -> None:
        """Tell each change to the sockets that watch it."""
        while True:
            kind, things, only = await self.changes.get()
            try:
                await self._tell(kind, things, only)
            except (OSError, asyncpg.PostgresError) as exc:  # read again on the next change
                log.warning("a change not told", extra={"error": repr(exc)})

    async def _tell(
        self, kind: str, things: list[str], only: tuple[Socket, str] | None = None
    ) -> None:
        """Tell the state of ``things`` as it is now to the subscriptions watching them
        (or to ``only``, a new one). One task tells everything, in order: a state read
        later is told later, so the last told is the newest."""
        watched = [t for t in things if (kind, t) in self.watch]
        if not watched:
            return
        found = await self.fetch(kind, watched)
        for thing in watched:
            if thing not in found:
                continue
            for sock, sub in [only] if only else list(self.watch.get((kind, thing), ())):
                if sub not in sock.subs:
                    continue  # unsubscribed meanwhile
                if sock.send(_notification(sub, found[thing])):
                    self.metrics.ws_notifications.inc()
                else:  # too far behind: its subscriptions gone, closed aside
                    self._drop(sock)
                    task = asyncio.ensure_future(
                        sock.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"too slow")
                    )
                    self.closing.add(task)
                    task.add_done_callback(self.closing.discard)

    async def everything(self) -> None:
        """Tell every subscriber the current state of all it watches (after the listening
        connection was made again: what changed meanwhile was not heard)."""
        by_kind: dict[str, list[str]] = {}
        for kind, thing in list(self.watch):
            by_kind.setdefault(kind, []).append(thing)
        for kind, things in by_kind.items():
            await self._tell(kind, things)


def _params(req: nut.WsRequest, kind: type[nut.T]) -> nut.T:
    try:
        return nut.decode(bytes(req.params), kind)
    except nut.DecodeError as exc:
        raise RpcError(INVALID_PARAMS, f"params: {exc}") from None


def _notification(sub: str, payload: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": "subscribe", "params": {"subId": sub, "payload": payload}}


def _is_point(y: str) -> bool:
    return len(y) == 66 and y[:2] in ("02", "03") and all(c in "0123456789abcdef" for c in y)
