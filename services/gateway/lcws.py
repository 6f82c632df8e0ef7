"""The light-client protocol over a websocket (``/v1/lc/ws``): JSON-RPC 2.0, electrum-like.

A client calls the methods of ``PARAMS`` (the answers are those of the HTTP API,
``services.gateway.lightclient``) and subscribes to checkpoints, addresses and coins.
Each signed checkpoint this operator's indexer stores (``services.bus.lc_taken_subject``)
is pushed to the sockets subscribed to checkpoints (``checkpoints.new``), and what it did
to each subscribed address or coin is asked of the indexer and pushed with its proof
(``address.update``, ``coin.update``): a transaction that changed the key, and a proof
of it up to that checkpoint, which the client checks against the guild it pinned.

A client that subscribes and then reads the address's history misses nothing: what a
later checkpoint makes provable is pushed. ``SCHEMA`` (served at
``/v1/lc/ws/schema.json``) is the JSON Schema of every message.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from constellation.errors import ConstellationError
from constellation.lightclient.checkpointer import Announced
from constellation.protocol import lightclient as lcp
from services.bus import lc_taken_subject
from services.gateway.api import Api, parse_hex
from services.gateway.errors import TOO_LARGE, ApiError
from services.gateway.lightclient import (
    MAX_COUNT,
    MAX_HEIGHT,
    MAX_HISTORY,
    MAX_SUBSCRIPTIONS,
    PROTOCOL,
    VERSION,
    LightClientApi,
    checkpoint_doc,
)
from services.gateway.metrics import GatewayMetrics
from services.gateway.ws import Socket, serve
from services.runtime import Tasks

MAX_KEYS = 1000  # keys in one push query to the indexer (its limit)
CATCH_UP = 64  # checkpoints not heard of, pushed late (the indexer keeps that many)
TASK = "lc-pushes"

log = logging.getLogger("gateway.lcws")

Key = tuple[str, bytes]

# JSON-RPC 2.0's codes, and the server's: the API's own code is in the error's data
PARSE_ERROR, INVALID_REQUEST, NO_METHOD, INVALID_PARAMS, INTERNAL_ERROR, SERVER_ERROR = (
    -32700,
    -32600,
    -32601,
    -32602,
    -32603,
    -32000,
)
MAX_BATCH = 100  # calls in one message
OVERLOADED = {
    "jsonrpc": "2.0",
    "method": "error",
    "params": {"code": "overloaded", "message": "too slow to keep up: reconnect"},
}


class Request(msgspec.Struct, forbid_unknown_fields=True):
    jsonrpc: str
    method: str
    id: int | str | msgspec.UnsetType | None = msgspec.UNSET  # absent: a notification
    params: dict[str, Any] | list[Any] = {}


class _Params(msgspec.Struct, forbid_unknown_fields=True):
    pass


class NoParams(_Params):
    pass


class HeightParams(_Params):
    height: int


class RangeParams(_Params):
    start: int = 0
    count: int = MAX_COUNT


class StartParams(_Params):
    start: int = 0


class TxParams(_Params):
    txid: str


class CoinParams(_Params):
    coin_id: str
    ledger: str = ""


class CoinIdParams(_Params):
    coin_id: str


class AddressParams(_Params):
    address: str


class HistoryParams(_Params):
    address: str
    before: str = ""
    limit: int = MAX_HISTORY


class CoinsParams(_Params):
    address: str
    after: str = ""
    limit: int = MAX_HISTORY


class SubmitParams(_Params):
    tx: str  # hex of the canonical encoding


PARAMS: dict[str, type[_Params]] = {
    "server.version": NoParams,
    "guild.descriptor": NoParams,
    "guild.handovers": StartParams,
    "checkpoints.latest": NoParams,
    "checkpoints.get": HeightParams,
    "checkpoints.range": RangeParams,
    "checkpoints.subscribe": NoParams,
    "tx.proof": TxParams,
    "tx.submit": SubmitParams,
    "coin.proof": CoinParams,
    "coin.subscribe": CoinIdParams,
    "coin.unsubscribe": CoinIdParams,
    "address.history": HistoryParams,
    "address.coins": CoinsParams,
    "address.subscribe": AddressParams,
    "address.unsubscribe": AddressParams,
}


# -- what the server pushes (``params`` of its notifications) ---------------------------------


class Entry(msgspec.Struct):
    owner: int
    worker: int
    height: int
    records: int


class CheckpointNew(msgspec.Struct):
    """A signed checkpoint (``encoded``: the bytes a client checks)."""

    guild: str
    height: int
    time_ms: int
    prev_hash: str
    shards: str
    members: str
    signature: str
    entries: list[Entry]
    encoded: str
    next_key: str = ""  # a handover's: the key that signs from the next height on
    next_members: str = ""


class AddressUpdate(msgspec.Struct):
    """A transaction that changed the address, and its proof up to ``checkpoint``."""

    address: str
    checkpoint: int
    txid: str
    proof: str


class CoinUpdate(msgspec.Struct):
    """A transaction that created or spent the coin, and its proof up to ``checkpoint``."""

    coin_id: str
    checkpoint: int
    txid: str
    proof: str


class Overloaded(msgspec.Struct):
    code: str
    message: str


NOTIFICATIONS: dict[str, type[msgspec.Struct]] = {
    "checkpoints.new": CheckpointNew,
    "address.update": AddressUpdate,
    "coin.update": CoinUpdate,
    "error": Overloaded,
}


def _schema() -> dict[str, Any]:
    """The JSON Schema of every message of the protocol, both ways."""
    kinds = [*PARAMS.values(), *NOTIFICATIONS.values()]
    refs, defs = msgspec.json.schema_components(kinds, ref_template="#/$defs/{name}")
    by_kind = dict(zip(kinds, refs, strict=True))

    def call(method: str, params: dict[str, Any], with_id: bool) -> dict[str, Any]:
        props: dict[str, Any] = {
            "jsonrpc": {"const": "2.0"},
            "method": {"const": method},
            "params": params,
        }
        required = ["jsonrpc", "method"]
        if with_id:
            props["id"] = {"type": ["integer", "string", "null"]}
        else:
            required.append("params")
        return {
            "type": "object",
            "properties": props,
            "required": required,
            "additionalProperties": False,
        }

    error = {
        "type": "object",
        "properties": {
            "code": {"type": "integer"},
            "message": {"type": "string"},
            "data": {
                "type": "object",
                "properties": {"code": {"type": "string"}},
                "required": ["code"],
            },
        },
        "required": ["code", "message", "data"],
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"{PROTOCOL} v{VERSION} over a websocket (JSON-RPC 2.0)",
        "$defs": {
            **defs,
            "request": {"oneOf": [call(m, by_kind[k], True) for m, k in PARAMS.items()]},
            "response": {
                "type": "object",
                "properties": {
                    "jsonrpc": {"const": "2.0"},
                    "id": {"type": ["integer", "string", "null"]},
                    "result": {},
                    "error": error,
                },
                "required": ["jsonrpc", "id"],
                "oneOf": [{"required": ["result"]}, {"required": ["error"]}],
                "additionalProperties": False,
            },
            "notification": {
                "oneOf": [call(m, by_kind[k], False) for m, k in NOTIFICATIONS.items()]
            },
        },
        "oneOf": [
            {"$ref": "#/$defs/request"},
            {"$ref": "#/$defs/response"},
            {"$ref": "#/$defs/notification"},
            {"type": "array", "items": {"$ref": "#/$defs/request"}, "minItems": 1},
            {"type": "array", "items": {"$ref": "#/$defs/response"}, "minItems": 1},
        ],
    }


SCHEMA = _schema()


class Conn:
    """One socket's subscriptions."""

    def __init__(self, sock: Socket, remote: str) -> None:
        self.sock = sock
        self.remote = remote
        self.keys: dict[Key, str] = {}  # each as the client named it
        self.checkpoints = False


def _in(value: int, low: int, high: int, name: str) -> int:
    if not low <= value <= high:
        raise ApiError(f"malformed.{name}", f"{name} is from {low} to {high}")
    return value


class LightSockets:
    def __init__(self, lc: LightClientApi, api: Api, metrics: GatewayMetrics, tasks: Tasks) -> None:
        self.lc = lc
        self.api = api
        self.metrics = metrics
        self.tasks = tasks
        self.conns: set[Conn] = set()
        self.by_key: dict[Key, set[Conn]] = {}
        handlers: dict[str, Callable[[Conn, Any], Awaitable[Any]]] = {
            "server.version": self._version,
            "guild.descriptor": self._descriptor,
            "guild.handovers": self._handovers,
            "checkpoints.latest": self._latest,
            "checkpoints.get": self._checkpoint,
            "checkpoints.range": self._range,
            "checkpoints.subscribe": self._subscribe_checkpoints,
            "tx.proof": self._tx_proof,
            "tx.submit": self._submit,
            "coin.proof": self._coin_proof,
            "coin.subscribe": self._subscribe_coin,
            "coin.unsubscribe": self._unsubscribe_coin,
            "address.history": self._history,
            "address.coins": self._coins,
            "address.subscribe": self._subscribe_address,
            "address.unsubscribe": self._unsubscribe_address,
        }
        assert handlers.keys() == PARAMS.keys()
        self.methods = {name: (PARAMS[name], handler) for name, handler in handlers.items()}

    def install(self, app: web.Application) -> None:
        app.router.add_get("/v1/lc/ws", self.websocket)
        app.router.add_get("/v1/lc/ws/schema.json", self.get_schema)
        if self.lc.members:
            self.tasks.start(TASK, self._feed)

    async def get_schema(self, _: web.Request) -> web.Response:
        return web.json_response(SCHEMA)

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        conns: dict[Socket, Conn] = {}

        async def answer(sock: Socket, text: str) -> Any:
            conn = conns.get(sock)
            if conn is None:
                conn = conns[sock] = Conn(sock, request.remote or "unknown")
                self.conns.add(conn)
            return await self._call(conn, text)

        async def ended(sock: Socket) -> None:
            conn = conns.pop(sock, None)
            if conn is not None:
                self._drop(conn)

        binary = _error(None, INVALID_REQUEST, "malformed", "text messages only")
        return await serve(request, self.tasks, self.metrics, OVERLOADED, binary, answer, ended)

    # -- calls ---------------------------------------------------------------------------

    async def _call(self, conn: Conn, text: str) -> Any:
        """The answer to a message: a call's, a batch's (a list, without those of its
        notifications), or None (a notification, or a batch of them)."""
        try:
            doc = msgspec.json.decode(text)
        except (msgspec.DecodeError, RecursionError) as exc:
            return _error(None, PARSE_ERROR, "malformed", str(exc))
        if not isinstance(doc, list):
            return await self._one(conn, doc)
        if not 1 <= len(doc) <= MAX_BATCH:
            return _error(None, INVALID_REQUEST, "malformed", f"a batch of 1 to {MAX_BATCH} calls")
        answers = [await self._one(conn, call) for call in doc]
        return [a for a in answers if a is not None] or None

    async def _one(self, conn: Conn, doc: Any) -> dict[str, Any] | None:
        try:
            req = msgspec.convert(doc, type=Request)
        except msgspec.ValidationError as exc:
            found = doc.get("id") if isinstance(doc, dict) else None
            call_id = found if isinstance(found, int | str) else None
            return _error(call_id, INVALID_REQUEST, "malformed", str(exc))
        answer = await self._answer(conn, req)
        if req.id is msgspec.UNSET:  # a notification: never answered, even its errors
            return None
        if "error" in answer:
            return _error(req.id, *answer["error"])
        return {"jsonrpc": "2.0", "id": req.id, "result": answer["result"]}

    async def _answer(self, conn: Conn, req: Request) -> dict[str, Any]:
        """``{"result": ...}`` or ``{"error": (code, api code, message)}``."""
        if req.jsonrpc != "2.0":
            return {"error": (INVALID_REQUEST, "malformed", 'jsonrpc is "2.0"')}
        found = self.methods.get(req.method)
        if found is None:
            return {"error": (NO_METHOD, "not_found", f"no method {req.method[:64]!r}")}
        kind, method = found
        if isinstance(req.params, list):
            return {"error": (INVALID_PARAMS, "malformed", "params by name (an object)")}
        try:
            params = msgspec.convert(req.params, type=kind)
        except msgspec.ValidationError as exc:
            return {"error": (INVALID_PARAMS, "malformed", str(exc))}
        try:
            return {"result": await method(conn, params)}
        except ApiError as err:
            code = INVALID_PARAMS if err.code.startswith("malformed") else SERVER_ERROR
            return {"error": (code, err.code, str(err))}
        except ConstellationError as exc:  # the ledger refused a transaction
            return {"error": (SERVER_ERROR, exc.code, str(exc))}
        except Exception:  # a bug: said once, and answered
            log.exception("a call failed", extra={"method": req.method})
            return {"error": (INTERNAL_ERROR, "internal", "an unexpected error; it is logged")}

    async def _version(self, _: Conn, __: NoParams) -> dict[str, Any]:
        return {**self.lc.server(), "transport": "websocket"}

    async def _descriptor(self, _: Conn, __: NoParams) -> dict[str, Any]:
        return await self.lc.descriptor()

    async def _handovers(self, _: Conn, p: StartParams) -> dict[str, Any]:
        return await self.lc.handovers(_in(p.start, 0, MAX_HEIGHT, "start"))

    async def _latest(self, _: Conn, __: NoParams) -> dict[str, Any]:
        return await self.lc.latest()

    async def _checkpoint(self, _: Conn, p: HeightParams) -> dict[str, Any]:
        return await self.lc.checkpoint(_in(p.height, 0, MAX_HEIGHT, "height"))

    async def _range(self, _: Conn, p: RangeParams) -> dict[str, Any]:
        start = _in(p.start, 0, MAX_HEIGHT, "start")
        return await self.lc.checkpoints(start, _in(p.count, 1, MAX_COUNT, "count"))

    async def _tx_proof(self, _: Conn, p: TxParams) -> dict[str, Any]:
        return await self.lc.tx_proof(parse_hex(p.txid, "txid", 32))

    async def _coin_proof(self, _: Conn, p: CoinParams) -> dict[str, Any]:
        coin_id = parse_hex(p.coin_id, "coin_id", 32)
        return await self.lc.coin_proof(coin_id, p.ledger or self.lc.operator)

    async def _history(self, _: Conn, p: HistoryParams) -> dict[str, Any]:
        return await self.lc.history(p.address, p.before, _in(p.limit, 1, MAX_HISTORY, "limit"))

    async def _coins(self, _: Conn, p: CoinsParams) -> dict[str, Any]:
        return await self.lc.coins(p.address, p.after, _in(p.limit, 1, MAX_HISTORY, "limit"))

    async def _submit(self, conn: Conn, p: SubmitParams) -> dict[str, Any]:
        try:
            raw = bytes.fromhex(p.tx)
        except ValueError:
            raise ApiError(
                "malformed.tx", "tx is the transaction's canonical encoding, in hex"
            ) from None
        status, answer = await self.api.submit(raw, conn.remote)
        return {"status": status, **answer}

    # -- subscriptions -------------------------------------------------------------------

    async def _subscribe_checkpoints(self, conn: Conn, _: NoParams) -> dict[str, Any] | None:
        """The latest checkpoint (None before the first), and every next one pushed."""
        conn.checkpoints = True
        try:
            return await self.lc.latest()
        except ApiError as err:
            if err.code == "not_found":
                return None
            raise

    def _add(self, conn: Conn, key: Key, name: str) -> dict[str, Any]:
        if conn.sock.cut:
            raise ApiError("overloaded", "too slow to keep up: reconnect")
        if key not in conn.keys and len(conn.keys) >= MAX_SUBSCRIPTIONS:
            raise ApiError(TOO_LARGE, f"at most {MAX_SUBSCRIPTIONS} addresses and coins")
        conn.keys[key] = name
        self.by_key.setdefault(key, set()).add(conn)
        return {"subscriptions": len(conn.keys)}

    def _remove(self, conn: Conn, key: Key) -> dict[str, Any]:
        conn.keys.pop(key, None)
        conns = self.by_key.get(key)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self.by_key[key]
        return {"subscriptions": len(conn.keys)}

    def _drop(self, conn: Conn) -> None:
        for key in list(conn.keys):
            self._remove(conn, key)
        self.conns.discard(conn)

    async def _subscribe_address(self, conn: Conn, p: AddressParams) -> dict[str, Any]:
        return self._add(conn, ("address", self.lc.owner(p.address)), p.address)

    async def _unsubscribe_address(self, conn: Conn, p: AddressParams) -> dict[str, Any]:
        return self._remove(conn, ("address", self.lc.owner(p.address)))

    async def _subscribe_coin(self, conn: Conn, p: CoinIdParams) -> dict[str, Any]:
        return self._add(conn, ("coin", parse_hex(p.coin_id, "coin_id", 32)), p.coin_id)

    async def _unsubscribe_coin(self, conn: Conn, p: CoinIdParams) -> dict[str, Any]:
        return self._remove(conn, ("coin", parse_hex(p.coin_id, "coin_id", 32)))

    # -- pushes --------------------------------------------------------------------------

    async def _feed(self) -> None:
        """Each checkpoint the indexer stores, pushed in order (a task of the gateway)."""
        subject = lc_taken_subject(self.lc.operator)
        sub = await self.lc.nc.subscribe(subject)
        last = -1  # the last checkpoint pushed
        try:
            async for msg in sub.messages:
                try:
                    announced = Announced.decode(msg.data)
                except ConstellationError as exc:  # our own indexer: a bug
                    log.error("a stored checkpoint does not decode", extra={"error": str(exc)})
                    continue
                height = announced.signed.checkpoint.height
                if height <= last:
                    continue
                if last >= 0:  # what was not heard (NATS does not promise it), asked for
                    for missed in range(max(last + 1, height - CATCH_UP), height):
                        await self._missed(missed)
                await self._pushes(announced)
                last = height
        finally:
            await sub.unsubscribe()

    async def _missed(self, height: int) -> None:
        try:
            found = await self.lc.ask(lcp.Checkpoints(height, 1))
        except ApiError as err:
            log.warning(
                "a missed checkpoint not pushed", extra={"height": height, "error": str(err)}
            )
            return
        announced = [Announced.decode(a) for a in found.items]
        if announced and announced[0].signed.checkpoint.height == height:
            await self._pushes(announced[0])

    async def _pushes(self, announced: Announced) -> None:
        height = announced.signed.checkpoint.height
        doc: dict[str, Any] | None = None
        for conn in list(self.conns):
            if conn.checkpoints:
                doc = doc or {
                    "jsonrpc": "2.0",
                    "method": "checkpoints.new",
                    "params": checkpoint_doc(announced),
                }
                self._send(conn, doc)
        keys = sorted(self.by_key)
        for start in range(0, len(keys), MAX_KEYS):
            chunk, skip = keys[start : start + MAX_KEYS], 0
            while chunk:
                try:
                    answer = await self.lc.ask(lcp.PushQuery(height, chunk, skip))
                except ApiError as err:  # these keys' pushes are lost: said and counted
                    log.warning("pushes not asked", extra={"height": height, "error": str(err)})
                    self.metrics.lc_pushes.labels("failed").inc()
                    self._lost(height, chunk)
                    break
                for item in answer.items:
                    self._deliver(height, msgspec.msgpack.decode(item, type=lcp.Pushed))
                more = answer.more or answer.skip  # stopped short of its size limit
                chunk, skip = (chunk[answer.more :] if more else []), answer.skip

    def _lost(self, height: int, keys: list[Key]) -> None:
        """Tell each socket following one of ``keys`` that its pushes of checkpoint
        ``height`` are lost: it was told of the checkpoint, and would take the changes
        under it as none. It reads them again (a client leaves the gateway on an error,
        and reads the history from the last checkpoint it followed)."""
        note = {
            "jsonrpc": "2.0",
            "method": "error",
            "params": {
                "code": "unavailable",
                "message": f"the changes under checkpoint {height} could not be read: read"
                " the history again",
            },
        }
        for conn in {c for key in keys for c in self.by_key.get(key, ())}:
            self._send(conn, note)

    def _deliver(self, height: int, pushed: lcp.Pushed) -> None:
        key = (pushed.kind, pushed.key)
        method, name = (
            ("address.update", "address")
            if key[0] == "address"
            else (
                "coin.update",
                "coin_id",
            )
        )
        for conn in list(self.by_key.get(key, ())):
            doc = {
                "jsonrpc": "2.0",
                "method": method,
                "params": {
                    name: conn.keys[key],  # as it subscribed
                    "checkpoint": height,
                    "txid": pushed.txid.hex(),
                    "proof": pushed.proof.hex(),
                },
            }
            self._send(conn, doc)

    def _send(self, conn: Conn, doc: dict[str, Any]) -> None:
        if conn.sock.push(doc):
            self.metrics.lc_pushes.labels(doc["method"]).inc()
        else:
            self._drop(conn)
            self.metrics.lc_pushes.labels("cut").inc()


def _error(req_id: int | str | None, code: int, api_code: str, message: str) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": req_id,
        "error": {"code": code, "message": message, "data": {"code": api_code}},
    }
