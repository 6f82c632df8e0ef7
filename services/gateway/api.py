"""The public HTTP API: transactions in, receipts and lookups out, websocket pushes.

Every error is JSON ``{"error": {"code", "message"}}`` with the status of its code, as
``services/gateway/errors.py`` maps them once (and the OpenAPI document says).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import msgspec
from aiohttp import web
from redis.exceptions import RedisError

from constellation.address import Network, decode_address, decode_destination, encode_address
from constellation.errors import ConstellationError, TooLargeToSettle, UnknownLedger, Unsigned
from constellation.protocol import ledger as proto
from constellation.settlement import MAX_SETTLE_MSAT, check_settleable, release_coin
from constellation.tx import (
    HERE,
    Transaction,
    TxInput,
    TxOutput,
    decode_issuance,
    decode_transaction,
)
from services.database import DATABASE_DOWN
from services.gateway.errors import (
    IN_DOUBT,
    IN_PROGRESS,
    INTERNAL,
    NOT_FOUND,
    NOT_INDEXED,
    TIMEOUT,
    TOO_LARGE,
    ApiError,
    error_response,
    json_response,
)
from services.gateway.limits import Limits
from services.gateway.metrics import GatewayMetrics
from services.gateway.openapi import openapi
from services.gateway.settle import Settler
from services.gateway.settle_store import SettleStore
from services.gateway.ws import Pushes
from services.indexer.store import Index
from services.partition.client import LedgerClient, LedgerUnavailable

log = logging.getLogger("gateway.api")

MAX_TX_BYTES = 128 << 10
MAX_BATCH = 4096
HISTORY_LIMIT = 500
STATE_TIMEOUT_S = 1.0  # for a worker to say how far its log is, when a lookup finds nothing
MAX_CURSOR = 2**63 - 1  # history cursors are PostgreSQL bigints
IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,128}")  # printable ASCII, as a Redis key part
_DECIMAL = re.compile(r"[0-9]{1,20}")  # ASCII digits only: str.isdigit also takes "²"
_HEX = re.compile(r"[0-9a-fA-F]*")
_LEN = struct.Struct(">I")

# A dependency that failed on the way (PostgreSQL, a socket): 503, retry; not a bug.
_UNAVAILABLE = (*DATABASE_DOWN, TimeoutError, asyncpg.TooManyConnectionsError)

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


def parse_hex(text: str, what: str, size: int) -> bytes:
    if len(text) != 2 * size or not _HEX.fullmatch(text):
        raise ApiError("malformed", f"{what} must be {size} bytes in hex")
    return bytes.fromhex(text)


def tx_from_json(body: bytes, network: Network, here: bytes | None = None) -> Transaction:
    """A signed transaction from its JSON form; ``ApiError`` or a ``ConstellationError``
    says what is wrong with it. An output to an address that names ledger ``here`` (the
    ledger of the inputs) stays in it; one that names another goes there."""
    try:
        doc = msgspec.json.decode(body, type=JsonTx)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ApiError("malformed.json", f"not a transaction: {exc}") from None
    if len(doc.witnesses) != len(doc.inputs):
        raise Unsigned(
            f"{len(doc.witnesses)} witnesses for {len(doc.inputs)} inputs:"
            " a transaction carries one signature per input"
        )
    outputs, ledgers = [], []
    for o in doc.outputs:
        owner, ledger = decode_destination(o.address, network)
        outputs.append(TxOutput(o.value_msat, owner))
        ledgers.append(HERE if ledger is None or ledger == here else ledger)
    return Transaction(
        [TxInput(parse_hex(i.coin_id, "coin_id", 32), i.value_msat) for i in doc.inputs],
        outputs,
        doc.fee_msat,
        [parse_hex(w, "witness", 64) for w in doc.witnesses],
        ledgers=ledgers,
    )


Parsed = tuple[Transaction, bytes] | ApiError


def parse_batch(body: bytes) -> list[Parsed]:
    """A batch's ``(length:u32 transaction)*``: each transaction with its encoding, or
    the error that refuses it alone; ``ApiError`` if the framing itself is broken."""
    parsed: list[Parsed] = []
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
            parsed.append(ApiError.of(exc))
        at += n
        if len(parsed) > MAX_BATCH:
            raise ApiError(TOO_LARGE, f"at most {MAX_BATCH} transactions per batch")
    return parsed


def query_int(request: web.Request, name: str, low: int, high: int, default: int) -> int:
    """Query parameter ``name``: a decimal in ``low..high``, ``default`` when absent."""
    raw = request.query.get(name)
    if raw is None:
        return default
    return parse_int(raw, name, low, high)


def parse_int(raw: str, name: str, low: int, high: int) -> int:
    """A decimal in ``low..high``."""
    if not _DECIMAL.fullmatch(raw) or not low <= int(raw) <= high:
        raise ApiError(f"malformed.{name}", f"{name} must be an integer in {low}..{high}")
    return int(raw)


class Api:
    def __init__(
        self,
        ledgers: dict[str, LedgerClient],
        operator: str,
        index: Index,
        limits: Limits,
        metrics: GatewayMetrics,
        pushes: Pushes,
        network: Network,
        max_in_flight: int,
        timeout_s: float,
        ledger_ids: dict[str, bytes],
        neighbour_ids: dict[str, bytes],
        issuers: dict[str, frozenset[bytes]],
    ) -> None:
        self.ledgers = ledgers  # every ledger served, by its operator's name
        # the ledger id of each guild member (none without a layout), and of each
        # operator of another guild the members settle with: an output may go from a
        # member's ledger to any of these but its own, settled between the two
        self.ledger_ids = ledger_ids
        self.settled_ids = {**ledger_ids, **neighbour_ids}
        self.ledger_names = {lid: name for name, lid in self.settled_ids.items()}
        self.issuers = issuers  # each member's ledger's issuer keys (releases are theirs)
        self.settle_store: SettleStore | None = None  # set where this gateway settles
        self.settler: Settler | None = None
        self.ledger = ledgers[operator]  # this operator's: the index and pushes are its
        self.index = index
        self.limits = limits
        self.metrics = metrics
        self.pushes = pushes
        self.network = network
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.pending: dict[bytes, float] = {}

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
        r.add_get("/v1/address/{address}/incoming", self.get_incoming)
        r.add_get("/v1/settlement", self.get_settlement)
        r.add_get("/v1/ledger", self.get_ledger)
        r.add_get("/v1/ws", self.pushes.websocket)
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
        except ConstellationError as exc:  # the core refused: each code has its status
            response = error_response(ApiError.of(exc))
        except RedisError as exc:
            log.warning("redis failed", extra={"error": str(exc)})
            response = error_response(ApiError("unavailable", "limits store unavailable", 1))
        except _UNAVAILABLE as exc:
            log.warning("a dependency failed", extra={"route": name, "error": repr(exc)})
            response = error_response(ApiError("unavailable", "a dependency is unavailable", 1))
        except web.HTTPRequestEntityTooLarge as exc:
            response = error_response(ApiError(TOO_LARGE, exc.text or "request too large"))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = NOT_FOUND if exc.status == 404 else "malformed"
            response = json_response(
                {"error": {"code": code, "message": exc.reason}}, status=exc.status
            )
        except Exception:  # a bug: said once, with its traceback; the client still gets JSON
            log.exception("unexpected error", extra={"route": name, "method": request.method})
            response = error_response(ApiError(INTERNAL, "an unexpected error; it is logged"))
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

    def _parse(
        self, request: web.Request, body: bytes, ledger: LedgerClient
    ) -> tuple[Transaction, bytes]:
        if request.content_type == "application/octet-stream":
            tx = decode_transaction(body, check_owners=False)  # the coordinator checks
            raw = body
        elif request.content_type == "application/json":
            tx = tx_from_json(body, self.network, self.ledger_ids.get(ledger.operator))
            raw = tx.encode()
        else:
            raise ApiError(
                "malformed.content_type",
                "send application/octet-stream (canonical encoding) or application/json",
            )
        self._check_ledgers(ledger, tx)
        return tx, raw

    def _check_ledgers(self, ledger: LedgerClient, tx: Transaction) -> None:
        """Every output to another ledger names one that ``ledger`` settles with: a guild
        member other than itself, or a neighbour (the ledger itself does not know its
        peers), and is one a batch carries: at most ``MAX_SETTLE_MSAT``, the limit every
        ledger enforces where it admits a transaction, whichever ledger it is from (a
        member's ledger sent through this gateway too: its settler would batch one worth
        more alone, ahead of every later one, for ever); from this operator's ledger, at
        most its own batch size where smaller (another member's is that member's)."""
        remote = tx.remote()
        if not remote:
            return
        limit = MAX_SETTLE_MSAT
        if ledger is self.ledger:
            if self.settler is None:
                raise UnknownLedger(
                    f"output {remote[0][0]} goes to another ledger, and this operator does"
                    " not settle with others (no operator key or Lightning node configured)"
                )
            limit = min(limit, self.settler.settings.max_batch_msat)
        check_settleable(tx, limit)
        for i, lid in remote:
            name = self.ledger_names.get(lid)
            if name is None or name == ledger.operator:
                known = ", ".join(
                    f"{n} {x.hex()}" for n, x in self.settled_ids.items() if n != ledger.operator
                )
                raise UnknownLedger(
                    f"output {i} goes to ledger {lid.hex()}, which {ledger.operator}"
                    f" does not settle with (it does with: {known or 'none configured'})"
                )

    def _ledger(self, request: web.Request) -> LedgerClient:
        """The ledger a request is for: ``?ledger=NAME`` (a guild member's), else ours."""
        name = request.query.get("ledger")
        if name is None:
            return self.ledger
        client = self.ledgers.get(name)
        if client is None:
            raise ApiError(
                "malformed.ledger",
                f"no ledger {name[:64]!r} here; this gateway serves {', '.join(self.ledgers)}",
            )
        return client

    def _admit(self, client: str, count: int) -> None:
        if sum(c.in_flight for c in self.ledgers.values()) + count > self.max_in_flight:
            raise ApiError("overloaded", "too many transactions in flight; retry", 1.0)
        wait = self.limits.admit(client, count)
        if wait:
            raise ApiError("rate_limited", f"over {self.limits.rate_per_s} tx/s", wait)

    async def _run(
        self, ledger: LedgerClient, txs: list[tuple[Transaction, bytes]]
    ) -> list[tuple[int, dict[str, Any]]]:
        """Submit and wait; (HTTP status, receipt or error body) for each, in order."""
        started = time.monotonic()
        pending = self.pending
        for tx, _ in txs:
            pending[tx.txid] = started
        try:
            results = await ledger.submit(txs, self.timeout_s)
        finally:
            for tx, _ in txs:
                pending.pop(tx.txid, None)
        took = time.monotonic() - started
        codes: Counter[str] = Counter()
        answers = []
        timed_out = []
        for (tx, _), result in zip(txs, results, strict=True):
            if result is None:
                timed_out.append(tx.txid)
                err = ApiError(
                    TIMEOUT,
                    f"no answer from the ledger in {self.timeout_s:g} s for transaction"
                    f" {tx.txid.hex()}; it may still commit: send it again for its outcome"
                    " (it commits once)",
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
        if timed_out:  # kept before the 504s go out: a lookup after one says "in doubt"
            try:
                await self.limits.timed_out(timed_out)
            except RedisError as exc:  # their lookups say "not found" meanwhile
                log.warning("timed-out transactions not kept", extra={"error": str(exc)})
        return answers

    def _receipt(self, tx: Transaction, result: proto.Result) -> dict[str, Any]:
        return {
            "txid": tx.txid.hex(),
            "status": "committed",
            "blocks": [{"worker": w, "height": h} for w, h in result.blocks],
            "outputs": [
                {"coin_id": cid.hex(), "value_msat": v}
                if tx.here(i)
                else {
                    "coin_id": cid.hex(),
                    "value_msat": v,
                    "ledger": self.ledger_names.get(tx.ledgers[i], tx.ledgers[i].hex()),
                    "status": "pending",
                }
                for i, (cid, (v, _)) in enumerate(zip(tx.output_ids, tx.outputs, strict=True))
            ],
        }

    async def post_tx(self, request: web.Request) -> web.Response:
        body = await self._body(request, MAX_TX_BYTES)
        ledger = self._ledger(request)
        key = request.headers.get("Idempotency-Key")
        client = request.remote or "unknown"
        if key is not None:
            if not IDEMPOTENCY_KEY.fullmatch(key):
                raise ApiError(
                    "malformed.idempotency_key", "Idempotency-Key must be 1..128 printable ASCII"
                )
            key = f"{ledger.operator}/{key}"  # a key is the client's, per ledger
            stored = await self.limits.begin(client, key, body)
            if stored is not None:
                if stored.status == 0:
                    raise ApiError(IN_PROGRESS, "the first request is running", 1)
                return json_response(
                    stored.body, status=stored.status, headers={"Idempotent-Replayed": "true"}
                )
        try:
            tx, raw = self._parse(request, body, ledger)
            self._admit(client, 1)
            [(status, answer)] = await self._run(ledger, [(tx, raw)])
        except (ApiError, ConstellationError) as exc:
            if key is not None:
                err = exc if isinstance(exc, ApiError) else ApiError.of(exc)
                await self.limits.finish(client, key, body, err.status, err.body())
            raise
        if key is not None:
            await self.limits.finish(client, key, body, status, answer)
        return json_response(answer, status=status)

    async def submit(self, raw: bytes, client: str) -> tuple[int, dict[str, Any]]:
        """A transaction in its canonical encoding, sent over a light client's websocket
        (``services.gateway.lcws``): run in this operator's ledger as ``POST /v1/tx``
        runs it; the HTTP status it would have, and the receipt or error body."""
        if len(raw) > MAX_TX_BYTES:
            raise ApiError(
                TOO_LARGE, f"the transaction is {len(raw)} bytes; at most {MAX_TX_BYTES}"
            )
        tx = decode_transaction(raw, check_owners=False)  # the coordinator checks
        self._check_ledgers(self.ledger, tx)
        self._admit(client, 1)
        [(status, answer)] = await self._run(self.ledger, [(tx, raw)])
        return status, answer

    async def post_txs(self, request: web.Request) -> web.Response:
        """A batch: ``(length:u32 transaction)*`` in, one answer per transaction out."""
        if request.content_type != "application/octet-stream":
            raise ApiError("malformed.content_type", "a batch is application/octet-stream")
        body = await self._body(request, MAX_BATCH * MAX_TX_BYTES)
        ledger = self._ledger(request)
        parsed = [self._checked(ledger, p) for p in parse_batch(body)]
        self._admit(request.remote or "unknown", len(parsed))
        txs = [p for p in parsed if not isinstance(p, ApiError)]
        answers = iter(await self._run(ledger, txs))
        results = [p.body() if isinstance(p, ApiError) else next(answers)[1] for p in parsed]
        return json_response({"results": results})

    def _checked(self, ledger: LedgerClient, parsed: Parsed) -> Parsed:
        if isinstance(parsed, ApiError):
            return parsed
        try:
            self._check_ledgers(ledger, parsed[0])
        except (UnknownLedger, TooLargeToSettle) as exc:
            return ApiError.of(exc)
        return parsed

    async def post_issuance(self, request: web.Request) -> web.Response:
        body = await self._body(request, MAX_TX_BYTES)
        ledger = self._ledger(request)
        issuance = decode_issuance(body)
        self._admit(request.remote or "unknown", 1)
        try:
            results = await ledger.issue(issuance, body, self.timeout_s)
        except LedgerUnavailable as exc:
            raise ApiError(TIMEOUT, f"{exc}; issuing again is safe") from None
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
        txid = parse_hex(request.match_info["txid"], "txid", 32)
        if txid in self.pending:
            return json_response({"txid": txid.hex(), "status": "pending"})
        found = await self.index.tx(txid)
        if found is None:
            refusal = await self._not_found(txid)
            if refusal.code == NOT_FOUND:
                # indexed after the first look and before the cursors were read: the
                # cursors say so, and the index holds it now
                found = await self.index.tx(txid)
            if found is None:
                raise refusal
        raw = found.pop("tx")
        found["changes"] = [self.described(c) for c in found["changes"]]
        if raw is not None:  # the parts whose blocks are not indexed yet, as it says
            unindexed = self._unindexed(decode_transaction(raw), found["changes"])
            found["changes"] += unindexed
            found["complete"] = not unindexed
        await self._settlements([c for c in found["changes"] if c["kind"] == "paid_out"])
        return json_response({"txid": txid.hex(), "status": "committed", **found})

    def _unindexed(self, tx: Transaction, changes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The parts of committed ``tx`` that ``changes`` (those indexed) lack: a
        participant's, committed in its worker's block after the coordinator's, whose
        block the index has not stored yet: an input with its coin and value, an output
        with its address too. Outputs paid to other ledgers are the coordinator's
        (in its block with the commit): never among them."""
        seen = {(c["kind"], c["coin_id"]) for c in changes}
        parts: list[dict[str, Any]] = [
            {
                "kind": "spent",
                "coin_id": i.coin_id.hex(),
                "value_msat": i.value_msat,
                "indexed": False,
            }
            for i in tx.inputs
            if ("spent", i.coin_id.hex()) not in seen
        ]
        for n, (value, owner) in enumerate(tx.outputs):
            coin_id = tx.output_ids[n].hex()
            if tx.here(n) and ("created", coin_id) not in seen:
                parts.append(
                    {
                        "kind": "created",
                        "coin_id": coin_id,
                        "address": encode_address(owner, self.network),
                        "value_msat": value,
                        "indexed": False,
                    }
                )
        return parts

    async def _settlements(self, paid_out: list[dict[str, Any]]) -> None:
        """Each output paid to another member's ledger gets its ``settlement``:
        "settled" once its batch was paid and it was released there as a coin (that
        coin its ``released_as``), "pending" until then, "unknown" where that ledger is
        not a member's or does not answer. One question to each ledger, all at once
        (a transaction may pay hundreds of outputs to one)."""
        payer = self.ledger_ids.get(self.ledger.operator)
        asks: dict[str, list[tuple[dict[str, Any], list[bytes]]]] = {}
        for change in paid_out:
            change["settlement"] = "unknown"
            name = change.get("ledger")
            if name not in self.ledgers or payer is None:
                continue
            owner = decode_address(change["address"], self.network)
            coin = bytes.fromhex(change["coin_id"])
            value = change["value_msat"]
            # the release is issued by one of the payee's issuer keys: ask for each's coin
            candidates = [release_coin(i, payer, coin, value, owner) for i in self.issuers[name]]
            asks.setdefault(name, []).append((change, candidates))

        async def ask(name: str, outputs: list[tuple[dict[str, Any], list[bytes]]]) -> None:
            try:
                infos = await self._coin_infos(
                    self.ledgers[name], [c for _, cs in outputs for c in cs]
                )
            except ApiError:
                return
            for change, candidates in outputs:
                released = [c for c in candidates if infos[c].status != "unknown"]
                change["settlement"] = "settled" if released else "pending"
                if released:
                    change["released_as"] = released[0].hex()

        await asyncio.gather(*(ask(name, outputs) for name, outputs in asks.items()))

    def described(self, change: dict[str, Any]) -> dict[str, Any]:
        """An indexed change (``Index.tx``, ``Index.blocks``) with its owner as an
        address, and the ledger an output is paid to by its operator's name."""
        doc = dict(change)
        doc["address"] = encode_address(bytes.fromhex(doc.pop("owner")), self.network)
        name = self.ledger_names.get(bytes.fromhex(doc.get("ledger_id", "")))
        if name is not None:
            doc["ledger"] = name
        return doc

    async def _not_found(self, txid: bytes) -> ApiError:
        """Not in the index: whether that is final, or the index is behind the ledger,
        or a submission of ``txid`` timed out (it may still commit)."""
        with contextlib.suppress(RedisError):  # none: as if it never timed out
            if (at := await self.limits.timed_out_at(txid)) is not None:
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
                return ApiError(
                    IN_DOUBT,
                    f"not in the index yet, and a submission of it timed out at {when}: it"
                    " may still commit; send it again for its outcome (it commits once)",
                )
        workers = self.ledger.pmap.workers
        indexed = await self.index.cursors()
        states = await asyncio.gather(
            *(self.ledger.state(w, STATE_TIMEOUT_S) for w in workers), return_exceptions=True
        )
        behind, unknown = [], []
        for w, st in zip(workers, states, strict=True):
            if not isinstance(st, proto.StateInfo):
                unknown.append(str(w))
            elif st.events_height > indexed.get(w, -1):
                behind.append(
                    f"worker {w}: indexed to height {indexed.get(w, -1)}, its log at"
                    f" {st.events_height}"
                )
        if behind:
            why = "; ".join(behind)
            return ApiError(NOT_INDEXED, f"not in the index yet; it is behind the ledger ({why})")
        if unknown:
            why = f"worker {', '.join(unknown)} did not say how far its log is"
            return ApiError(NOT_INDEXED, f"not in the index; it may be behind the ledger ({why})")
        mine = self.ledger.operator
        elsewhere = " (other members' are proved under /v1/lc/tx)" if len(self.ledgers) > 1 else ""
        return ApiError(
            NOT_FOUND, f"no committed transaction with this id in {mine}'s ledger{elsewhere}"
        )

    async def _coin_infos(
        self, ledger: LedgerClient, coin_ids: list[bytes]
    ) -> dict[bytes, proto.CoinInfo]:
        try:
            infos = await ledger.coins(coin_ids, self.timeout_s)
        except LedgerUnavailable as exc:
            raise ApiError("unavailable", str(exc)) from None
        unknown = proto.CoinInfo(b"", "unknown", 0, b"", b"")
        return {cid: infos.get(cid, unknown) for cid in coin_ids}

    async def get_coin(self, request: web.Request) -> web.Response:
        coin_id = parse_hex(request.match_info["coin_id"], "coin_id", 32)
        ledger = self._ledger(request)
        info = (await self._coin_infos(ledger, [coin_id]))[coin_id]
        if info.status == "unknown":
            incoming = None
            if self.settle_store is not None and ledger is self.ledger:
                incoming = await self.settle_store.by_release_id(coin_id)
            if incoming is None:
                raise ApiError(NOT_FOUND, "no such coin")
            # paid from another operator's ledger: a coin here once its batch is paid
            return json_response(
                {
                    "coin_id": coin_id.hex(),
                    "status": "pending",
                    "value_msat": int(incoming["value_msat"]),
                    "address": encode_address(incoming["owner"], self.network),
                    "from": {"ledger": incoming["peer"], "txid": incoming["txid"].hex()},
                }
            )
        doc: dict[str, Any] = {"coin_id": coin_id.hex(), "status": info.status}
        if info.owner:
            doc["value_msat"] = info.value_msat
            doc["address"] = encode_address(info.owner, self.network)
        if info.spent_by:
            doc["spent_by"] = info.spent_by.hex()
        return json_response(doc)

    def _owner(self, request: web.Request) -> bytes:
        return bytes(decode_address(request.match_info["address"], self.network))

    def _limit(self, request: web.Request) -> int:
        return query_int(request, "limit", 1, HISTORY_LIMIT, 50)

    async def get_coins(self, request: web.Request) -> web.Response:
        """The address's unspent coins, a page at a time (``after``: the previous page's
        ``next``): found in the index, confirmed by their workers."""
        owner = self._owner(request)
        limit = self._limit(request)
        after = query_int(request, "after", 0, MAX_CURSOR, 0)
        indexed = await self.index.unspent(owner, limit, after)
        infos = (
            await self._coin_infos(self.ledger, [cid for _, cid, _ in indexed]) if indexed else {}
        )
        coins = [
            {"coin_id": cid.hex(), "value_msat": infos[cid].value_msat, "status": infos[cid].status}
            for _, cid, _ in indexed
            if infos[cid].status in ("unspent", "locked")
        ]
        doc: dict[str, Any] = {"address": request.match_info["address"], "coins": coins}
        if len(indexed) == limit:
            doc["next"] = indexed[-1][0]
        return json_response(doc)

    async def get_history(self, request: web.Request) -> web.Response:
        owner = self._owner(request)
        before = query_int(request, "before", 0, MAX_CURSOR, MAX_CURSOR)
        entries = await self.index.history(owner, self._limit(request), before)
        return json_response({"address": request.match_info["address"], "history": entries})

    async def get_incoming(self, request: web.Request) -> web.Response:
        """Outputs paid to the address from other operators' ledgers, newest first, a
        page at a time (``before``: the previous page's ``next``): pending until the
        paying operator settles over Lightning, then released, a coin here. Released
        once marked so, or once its coin is in the index (the coin is made before it is
        marked): a wallet that adds the pending ones to the coins the index shows counts
        each once. ``status=pending``: only those."""
        owner = self._owner(request)
        limit = self._limit(request)
        before = query_int(request, "before", 0, MAX_CURSOR, MAX_CURSOR)
        status = request.query.get("status")
        if status not in (None, "pending"):
            raise ApiError("malformed.status", "status: only pending may be asked for")
        pending = status is not None
        # an operator that does not settle with others is paid nothing from their ledgers
        store = self.settle_store
        rows = await store.incoming(owner, limit, before, pending) if store else []
        unmarked = [r["release_id"] for r in rows if r["released_at"] is None]
        indexed = await self.index.created(unmarked) if unmarked else set()
        entries = []
        for r in rows:
            released = r["released_at"] is not None or r["release_id"] in indexed
            if pending and released:
                continue
            entries.append(
                {
                    "from": r["peer"],
                    "txid": r["txid"].hex(),
                    "output": r["coin_id"].hex(),
                    "coin_id": r["release_id"].hex(),
                    "value_msat": int(r["value_msat"]),
                    "status": "released" if released else "pending",
                    "batch": r["batch"],
                    "seen_at": r["at"].timestamp(),
                    "released_at": None
                    if r["released_at"] is None
                    else r["released_at"].timestamp(),
                }
            )
        doc: dict[str, Any] = {"address": request.match_info["address"], "incoming": entries}
        if len(rows) == limit:
            doc["next"] = rows[-1]["n"]
        return json_response(doc)

    async def get_settlement(self, _: web.Request) -> web.Response:
        """Each peer: what this operator owes it and holds for it, and the batches."""
        settler = self.settler
        if settler is None:
            return json_response({"settling": False, "peers": {}})
        if not settler.leading:
            raise ApiError("unavailable", "another gateway of this operator settles now", 1)
        return json_response({"settling": True, "peers": settler.summary()})

    async def get_ledger(self, request: web.Request) -> web.Response:
        """A ledger's totals, summed over its workers (and each worker's)."""
        ledger = self._ledger(request)
        try:
            states = await asyncio.gather(
                *(ledger.state(w, self.timeout_s) for w in ledger.pmap.workers)
            )
        except LedgerUnavailable as exc:
            raise ApiError("unavailable", str(exc)) from None
        fields = (
            "held_msat",
            "issued_msat",
            "fees_msat",
            "outbound_msat",
            "coins",
            "locks",
            "in_doubt",
        )
        doc: dict[str, Any] = {f: sum(getattr(st, f) for st in states) for f in fields}
        doc["ledger"] = ledger.operator
        if ledger.operator in self.ledger_ids:
            doc["ledger_id"] = self.ledger_ids[ledger.operator].hex()
        doc["map_version"] = ledger.pmap.version
        doc["workers"] = [msgspec.structs.asdict(st) for st in states]
        return json_response(doc)

    async def get_openapi(self, _: web.Request) -> web.Response:
        return json_response(openapi())
