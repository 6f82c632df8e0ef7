"""The public HTTP API: transactions in, receipts and lookups out, websocket pushes.

Every error is JSON ``{"error": {"code", "message"}}`` with the status of its kind:
400 malformed or invalid, 404 not found, 409 spent or conflicting, 413 too large, 422
unknown coin or a value that does not match, 429 overloaded or rate limited (with
``Retry-After``), 503 unavailable, 504 outcome unknown (look the txid up).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgspec
from aiohttp import WSMsgType, web
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from redis.exceptions import RedisError

from constellation.address import Network, decode_address, encode_address
from constellation.errors import ConstellationError, DecodeError, MessageError
from constellation.protocol import ledger as proto
from constellation.tx import (
    Transaction,
    TxInput,
    TxOutput,
    decode_issuance,
    decode_transaction,
)
from services.gateway.index import Index
from services.gateway.ledger import LedgerClient, LedgerUnavailable
from services.gateway.limits import KeyReused, Limits
from services.gateway.metrics import GatewayMetrics
from services.gateway.openapi import openapi
from services.partition.transport import events_subject

log = logging.getLogger("gateway.api")

MAX_TX_BYTES = 128 << 10
MAX_BATCH = 4096
MAX_SUBSCRIPTIONS = 1000
WS_QUEUE = 1000
HISTORY_LIMIT = 500
_LEN = struct.Struct(">I")

STATUS = {
    "malformed": 400,
    "invalid": 400,
    "not_found": 404,
    "ledger.unknown_coin": 422,
    "ledger.value_mismatch": 422,
    "idempotency.key_reused": 422,
    "ledger.spent": 409,
    "ledger.conflict": 409,
    "ledger.already_committed": 409,
    "ledger.in_flight": 409,
    "idempotency.in_progress": 409,
    "ledger.bad_issuance": 403,
    "too_large": 413,
    "overloaded": 429,
    "rate_limited": 429,
    "ledger.timeout": 503,
    "ledger.wrong_partition": 503,
    "unavailable": 503,
    "timeout": 504,
}


def status_of(code: str) -> int:
    return STATUS.get(code) or STATUS.get(code.split(".", 1)[0], 400)


class ApiError(Exception):
    def __init__(self, code: str, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        return status_of(self.code)

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": str(self)}}


def json_response(
    doc: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON answer, encoded by msgspec (several times faster than the json module)."""
    body = msgspec.json.encode(doc)
    return web.Response(body=body, status=status, headers=headers, content_type="application/json")


def error_response(err: ApiError) -> web.Response:
    headers = {}
    if err.retry_after:
        headers["Retry-After"] = str(max(1, round(err.retry_after)))
    return json_response(err.body(), status=err.status, headers=headers)


# -- the JSON form of a transaction -------------------------------------------------------


class JsonInput(msgspec.Struct, forbid_unknown_fields=True):
    coin_id: str
    value_msat: int


class JsonOutput(msgspec.Struct, forbid_unknown_fields=True):
    address: str
    value_msat: int


class JsonTx(msgspec.Struct, forbid_unknown_fields=True):
    inputs: list[JsonInput]
    outputs: list[JsonOutput]
    witnesses: list[str]
    fee_msat: int = 0


class Subscription(msgspec.Struct, forbid_unknown_fields=True):
    subscribe: list[str] = []
    unsubscribe: list[str] = []


def _hex(text: str, what: str, size: int) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ApiError("malformed", f"{what} is not hex") from None
    if len(raw) != size:
        raise ApiError("malformed", f"{what} must be {size} bytes, got {len(raw)}")
    return raw


def tx_from_json(body: bytes, network: Network) -> Transaction:
    try:
        doc = msgspec.json.decode(body, type=JsonTx)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ApiError("malformed.json", f"not a transaction: {exc}") from None
    try:
        return Transaction(
            [TxInput(_hex(i.coin_id, "coin_id", 32), i.value_msat) for i in doc.inputs],
            [TxOutput(o.value_msat, decode_address(o.address, network)) for o in doc.outputs],
            doc.fee_msat,
            [_hex(w, "witness", 64) for w in doc.witnesses],
        )
    except ConstellationError as exc:
        raise ApiError(exc.code, str(exc)) from None


def tx_to_json(tx: Transaction, network: Network) -> dict[str, Any]:
    return {
        "inputs": [{"coin_id": c.hex(), "value_msat": v} for c, v in tx.inputs],
        "outputs": [
            {"address": encode_address(k, network), "value_msat": v} for v, k in tx.outputs
        ],
        "fee_msat": tx.fee_msat,
        "witnesses": [w.hex() for w in tx.witnesses],
    }


class Api:
    def __init__(
        self,
        ledger: LedgerClient,
        index: Index,
        limits: Limits,
        metrics: GatewayMetrics,
        network: Network,
        max_in_flight: int,
        timeout_s: float,
    ) -> None:
        self.ledger = ledger
        self.index = index
        self.limits = limits
        self.metrics = metrics
        self.network = network
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.pending: dict[bytes, float] = {}
        self.sockets: dict[bytes, set[asyncio.Queue[dict[str, Any]]]] = {}
        self._events: NatsSubscription | None = None
        self._following = asyncio.Lock()

    def install(self, app: web.Application) -> None:
        app.middlewares.append(self._errors)
        r = app.router
        r.add_post("/v1/tx", self.post_tx)
        r.add_post("/v1/txs", self.post_txs)
        r.add_post("/v1/issuance", self.post_issuance)
        r.add_get("/v1/tx/{txid}", self.get_tx)
        r.add_get("/v1/coin/{coin_id}", self.get_coin)
        r.add_get("/v1/address/{address}/coins", self.get_coins)
        r.add_get("/v1/address/{address}/history", self.get_history)
        r.add_get("/v1/ledger", self.get_ledger)
        r.add_get("/v1/ws", self.websocket)
        r.add_get("/openapi.json", self.get_openapi)

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        try:
            response = await handler(request)
        except ApiError as err:
            response = error_response(err)
        except RedisError as exc:
            log.warning("redis failed", extra={"error": str(exc)})
            response = error_response(ApiError("unavailable", "limits store unavailable", 1))
        except web.HTTPRequestEntityTooLarge as exc:
            response = error_response(ApiError("too_large", exc.text or "request too large"))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = "not_found" if exc.status == 404 else "malformed"
            response = json_response(
                {"error": {"code": code, "message": exc.reason}}, status=exc.status
            )
        self.metrics.http.labels(name, str(response.status)).inc()
        return response

    # -- transactions --------------------------------------------------------------------

    async def _body(self, request: web.Request, limit: int) -> bytes:
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(
                "too_large", f"the body is {request.content_length} bytes; at most {limit}"
            )
        body = await request.read()
        if len(body) > limit:
            raise ApiError("too_large", f"the body is {len(body)} bytes; at most {limit}")
        return body

    def _parse(self, request: web.Request, body: bytes) -> tuple[Transaction, bytes]:
        if request.content_type == "application/octet-stream":
            try:
                tx = decode_transaction(body, check_owners=False)  # the coordinator checks
            except ConstellationError as exc:
                raise ApiError(exc.code, str(exc)) from None
            return tx, body
        if request.content_type == "application/json":
            tx = tx_from_json(body, self.network)
            return tx, tx.encode()
        raise ApiError(
            "malformed.content_type",
            "send application/octet-stream (canonical encoding) or application/json",
        )

    def _admit(self, request: web.Request, count: int) -> None:
        if self.ledger.in_flight + count > self.max_in_flight:
            raise ApiError("overloaded", "too many transactions in flight; retry", 1.0)
        wait = self.limits.admit(request.remote or "unknown", count)
        if wait:
            raise ApiError("rate_limited", f"over {self.limits.rate_per_s} tx/s", wait)

    async def _run(self, txs: list[tuple[Transaction, bytes]]) -> list[tuple[int, dict[str, Any]]]:
        """Submit and wait; (HTTP status, receipt or error body) for each, in order."""
        started = time.monotonic()
        pending = self.pending
        for tx, _ in txs:
            pending[tx.txid] = started
        try:
            results = await self.ledger.submit(txs, self.timeout_s)
        finally:
            for tx, _ in txs:
                pending.pop(tx.txid, None)
        took = time.monotonic() - started
        codes: Counter[str] = Counter()
        answers = []
        for (tx, _), result in zip(txs, results, strict=True):
            if result is None:
                err = ApiError(
                    "timeout",
                    f"no answer from the ledger in {self.timeout_s:g} s; look up"
                    f" /v1/tx/{tx.txid.hex()} for the outcome",
                )
            elif result.code:
                err = ApiError(result.code, result.detail)
            else:
                codes["committed"] += 1
                self.metrics.confirm_seconds.observe(took)
                answers.append((200, self._receipt(tx, result)))
                continue
            codes[err.code] += 1
            answers.append((err.status, err.body()))
        for code, n in codes.items():
            self.metrics.submitted.labels(code).inc(n)
        return answers

    def _receipt(self, tx: Transaction, result: proto.Result) -> dict[str, Any]:
        return {
            "txid": tx.txid.hex(),
            "status": "committed",
            "blocks": [{"worker": w, "height": h} for w, h in result.blocks],
            "outputs": [
                {"coin_id": cid.hex(), "value_msat": v}
                for cid, (v, _) in zip(tx.output_ids, tx.outputs, strict=True)
            ],
        }

    async def post_tx(self, request: web.Request) -> web.Response:
        body = await self._body(request, MAX_TX_BYTES)
        key = request.headers.get("Idempotency-Key")
        client = request.remote or "unknown"
        if key is not None:
            if not 1 <= len(key) <= 128:
                raise ApiError("malformed.idempotency_key", "Idempotency-Key must be 1..128 chars")
            try:
                stored = await self.limits.begin(client, key, body)
            except KeyReused as exc:
                raise ApiError(exc.code, str(exc)) from None
            if stored is not None:
                if stored.status == 0:
                    raise ApiError("idempotency.in_progress", "the first request is running", 1)
                return json_response(
                    stored.body, status=stored.status, headers={"Idempotent-Replayed": "true"}
                )
        try:
            tx, raw = self._parse(request, body)
            self._admit(request, 1)
            [(status, answer)] = await self._run([(tx, raw)])
        except ApiError as err:
            if key is not None:
                await self.limits.finish(client, key, body, err.status, err.body())
            raise
        if key is not None:
            await self.limits.finish(client, key, body, status, answer)
        return json_response(answer, status=status)

    async def post_txs(self, request: web.Request) -> web.Response:
        """A batch: ``(length:u32 transaction)*`` in, one answer per transaction out."""
        if request.content_type != "application/octet-stream":
            raise ApiError("malformed.content_type", "a batch is application/octet-stream")
        body = await self._body(request, MAX_BATCH * MAX_TX_BYTES)
        parsed: list[tuple[Transaction, bytes] | ApiError] = []
        at = 0
        while at < len(body):
            if len(body) - at < _LEN.size:
                raise ApiError("malformed.batch", f"a length prefix is cut short at byte {at}")
            (n,) = _LEN.unpack_from(body, at)
            at += _LEN.size
            if n > MAX_TX_BYTES or at + n > len(body):
                raise ApiError("malformed.batch", f"transaction {len(parsed)} overruns the body")
            raw = body[at : at + n]
            try:
                parsed.append((decode_transaction(raw, check_owners=False), raw))
            except ConstellationError as exc:
                parsed.append(ApiError(exc.code, str(exc)))
            at += n
            if len(parsed) > MAX_BATCH:
                raise ApiError("too_large", f"at most {MAX_BATCH} transactions per batch")
        self._admit(request, len(parsed))
        answers = iter(await self._run([p for p in parsed if not isinstance(p, ApiError)]))
        results = [p.body() if isinstance(p, ApiError) else next(answers)[1] for p in parsed]
        return json_response({"results": results})

    async def post_issuance(self, request: web.Request) -> web.Response:
        body = await self._body(request, MAX_TX_BYTES)
        try:
            issuance = decode_issuance(body)
        except ConstellationError as exc:
            raise ApiError(exc.code, str(exc)) from None
        self._admit(request, 1)
        try:
            results = await self.ledger.issue(issuance, body, self.timeout_s)
        except LedgerUnavailable as exc:
            raise ApiError("timeout", f"{exc}; issuing again is safe") from None
        for result in results:
            if result.code:
                raise ApiError(result.code, result.detail)
        return json_response(
            {
                "issuance_id": issuance.issuance_id.hex(),
                "status": "committed",
                "blocks": [{"worker": w, "height": h} for r in results for w, h in r.blocks],
                "outputs": [
                    {
                        "coin_id": c.hex(),
                        "value_msat": v,
                        "address": encode_address(k, self.network),
                    }
                    for c, (v, k) in zip(issuance.output_ids, issuance.outputs, strict=True)
                ],
            }
        )

    # -- lookups -------------------------------------------------------------------------

    async def get_tx(self, request: web.Request) -> web.Response:
        txid = _hex(request.match_info["txid"], "txid", 32)
        if txid in self.pending:
            return json_response({"txid": txid.hex(), "status": "pending"})
        found = await self.index.tx(txid)
        if found is None:
            raise ApiError("not_found", "no committed transaction with this id (yet)")
        return json_response({"txid": txid.hex(), "status": "committed", **found})

    async def _coin_infos(self, coin_ids: list[bytes]) -> dict[bytes, proto.CoinInfo]:
        try:
            return await self.ledger.coins(coin_ids, self.timeout_s)
        except LedgerUnavailable as exc:
            raise ApiError("unavailable", str(exc)) from None

    async def get_coin(self, request: web.Request) -> web.Response:
        coin_id = _hex(request.match_info["coin_id"], "coin_id", 32)
        info = (await self._coin_infos([coin_id]))[coin_id]
        if info.status == "unknown":
            raise ApiError("not_found", "no such coin")
        doc: dict[str, Any] = {"coin_id": coin_id.hex(), "status": info.status}
        if info.owner:
            doc["value_msat"] = info.value_msat
            doc["address"] = encode_address(info.owner, self.network)
        if info.spent_by:
            doc["spent_by"] = info.spent_by.hex()
        return json_response(doc)

    def _owner(self, request: web.Request) -> bytes:
        try:
            return bytes(decode_address(request.match_info["address"], self.network))
        except DecodeError as exc:
            raise ApiError(exc.code, str(exc)) from None

    def _limit(self, request: web.Request) -> int:
        raw = request.query.get("limit", "50")
        if not raw.isdigit() or not 1 <= int(raw) <= HISTORY_LIMIT:
            raise ApiError("malformed.limit", f"limit must be 1..{HISTORY_LIMIT}")
        return int(raw)

    async def get_coins(self, request: web.Request) -> web.Response:
        """The address's unspent coins: found in the index, confirmed by their workers."""
        owner = self._owner(request)
        indexed = await self.index.unspent(owner, self._limit(request))
        infos = await self._coin_infos([cid for cid, _ in indexed]) if indexed else {}
        coins = [
            {"coin_id": cid.hex(), "value_msat": infos[cid].value_msat, "status": infos[cid].status}
            for cid, _ in indexed
            if infos[cid].status in ("unspent", "locked")
        ]
        return json_response({"address": request.match_info["address"], "coins": coins})

    async def get_history(self, request: web.Request) -> web.Response:
        owner = self._owner(request)
        before_raw = request.query.get("before")
        if before_raw is not None and not before_raw.isdigit():
            raise ApiError("malformed.before", "before must be a sequence number")
        entries = await self.index.history(
            owner, self._limit(request), int(before_raw) if before_raw else None
        )
        return json_response({"address": request.match_info["address"], "history": entries})

    async def get_ledger(self, _: web.Request) -> web.Response:
        """The operator's totals, summed over its workers (and each worker's)."""
        try:
            states = await asyncio.gather(
                *(self.ledger.state(w, self.timeout_s) for w in self.ledger.pmap.workers)
            )
        except LedgerUnavailable as exc:
            raise ApiError("unavailable", str(exc)) from None
        fields = ("held_msat", "issued_msat", "fees_msat", "coins", "locks", "in_doubt")
        doc: dict[str, Any] = {f: sum(getattr(st, f) for st in states) for f in fields}
        doc["map_version"] = self.ledger.pmap.version
        doc["workers"] = [msgspec.structs.asdict(st) for st in states]
        return json_response(doc)

    async def get_openapi(self, _: web.Request) -> web.Response:
        return json_response(openapi())

    # -- websocket -----------------------------------------------------------------------

    async def _follow_events(self) -> None:
        """Receive the workers' events while, and only while, some socket subscribes
        to an address: each events message wakes the gateway."""
        async with self._following:
            nc = self.ledger.nc
            if self.sockets and self._events is None:
                subject = events_subject(self.ledger.operator)
                self._events = await nc.subscribe(subject, cb=self._on_events)
                await nc.flush()  # what commits after the "subscribed" answer is pushed
            elif not self.sockets and self._events is not None:
                events, self._events = self._events, None
                await events.unsubscribe()

    async def _on_events(self, msg: Msg) -> None:
        """Push committed changes to the sockets subscribed to their owners."""
        try:
            blocks = proto.decode_events(msg.data)
        except MessageError as exc:
            log.warning("undecodable events", extra={"error": str(exc)})
            return
        sockets = self.sockets
        for events in blocks:
            for c in events.changes:
                queues = sockets.get(c.owner)
                if queues:
                    self._push(queues, events, c)

    def _push(
        self,
        queues: set[asyncio.Queue[dict[str, Any]]],
        events: proto.BlockEvents,
        c: proto.CoinChange,
    ) -> None:
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
                self._unsubscribe_all(queue)

    def _unsubscribe(self, queue: asyncio.Queue[dict[str, Any]], owners: Iterable[bytes]) -> None:
        for owner in owners:
            queues = self.sockets.get(owner)
            if queues is not None:
                queues.discard(queue)
                if not queues:
                    del self.sockets[owner]

    def _unsubscribe_all(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._unsubscribe(queue, [o for o, qs in self.sockets.items() if queue in qs])

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=64 << 10)
        await ws.prepare(request)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(WS_QUEUE + 1)
        mine: set[bytes] = set()

        async def pump() -> None:
            while True:
                note = await queue.get()
                await ws.send_json(note)
                if note["type"] == "error":
                    await ws.close(message=b"subscriber too slow")
                    return

        sender = asyncio.create_task(pump())
        self.metrics.websockets.inc()
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    await ws.send_json(
                        {"type": "error", "code": "malformed", "message": "text only"}
                    )
                    continue
                try:
                    sub = msgspec.json.decode(msg.data, type=Subscription)
                    add = [bytes(decode_address(a, self.network)) for a in sub.subscribe]
                    drop = [bytes(decode_address(a, self.network)) for a in sub.unsubscribe]
                except (msgspec.ValidationError, msgspec.DecodeError, DecodeError) as exc:
                    await ws.send_json({"type": "error", "code": "malformed", "message": str(exc)})
                    continue
                if len(mine | set(add)) > MAX_SUBSCRIPTIONS:
                    await ws.send_json(
                        {
                            "type": "error",
                            "code": "too_large",
                            "message": f"at most {MAX_SUBSCRIPTIONS} addresses",
                        }
                    )
                    continue
                for owner in add:
                    mine.add(owner)
                    self.sockets.setdefault(owner, set()).add(queue)
                mine.difference_update(drop)
                self._unsubscribe(queue, drop)
                await self._follow_events()
                await ws.send_json({"type": "subscribed", "count": len(mine)})
        finally:
            sender.cancel()
            self._unsubscribe_all(queue)
            self.metrics.websockets.dec()
            await self._follow_events()
        return ws
