"""The mint's wiring: the Cashu HTTP API (NUT-01 to NUT-12, NUT-17, NUT-19, NUT-20) over the
pure rules (``constellation.ecash.mint``), the store, and the operator's Lightning node.

Mint quotes are paid by invoices of the operator's node; a follower of the node's paid
invoices marks them paid (and a quote's own lookup does, where the follower lags).
Melts pay through the node with the four-valued outcome: a payment whose fate is not
known leaves its melt PENDING and its proofs reserved, and a resolver looks it up until
it settles (the proofs are spent, the change signed) or fails (the proofs are free);
nothing is both paid out and released. Each melt attempt is numbered, so that a late
answer about an earlier attempt never undoes a later one; an attempt whose own pay call
sent nothing fails, whatever the node says of the invoice (a payment of it is another's:
the gateway pays invoices on the same node). So does one never given leave to send
(``MintStore.may_pay``: its process stopped, or it waited for a place) once it can be
given none: the resolver takes nothing from the node's payments of its hash until leave
was given. A command goes only where the node says it has not paid the invoice and is
not paying it (where it cannot say: not). One payee has at most ``PER_PAYEE`` melts
in flight: a payee holding its HTLCs holds only so many, and many users paying one
popular payee at once are not refused.

The bridge to the operator's L3 ledger (through its gateway's public API): a redemption
reserves its proofs, then issues one coin whose issuance is derived from the proofs (a
retry, or the resolver after a crash, issues the same coin, which the ledger takes
once), then spends the proofs; a ledger that refuses frees them. A withdrawal takes an
L3 transaction paying the mint's key tweaked by the outputs it buys
(``mint.withdrawal_key``), has the ledger commit it, then signs those outputs, once per
transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from constellation.address import decode_destination
from constellation.ecash import mint as m
from constellation.ecash.onchain import DUST_SAT
from constellation.errors import AlreadyCommitted, ConstellationError
from constellation.keys import SigningKey
from constellation.lightning import Outcome, PaymentState, failure_final, spent_at_most
from constellation.protocol import cashu as nut
from constellation.tx import AnyIssuance, Issuance, TxOutput, decode_issuance, decode_transaction
from services.api_client import Gateway, GatewayError
from services.database import DATABASE_DOWN
from services.ecash.cache import CACHED, Cache
from services.ecash.config import Settings
from services.ecash.ec import EC, Stopped
from services.ecash.metrics import MintMetrics
from services.ecash.onchain import CHAIN_DOWN, Onchain
from services.ecash.store import MeltStarted, MintStore, PayeeLimit, Redeem, listen_forever
from services.ecash.ws import CHANNELS, Hub
from services.gateway.lightning import (
    PAY_S,
    RETRY_FOR_S,
    THREADS,
    ClnBackend,
    LightningBackend,
    LightningError,
)
from services.gateway.limits import Limits
from services.runtime import OpsServer

log = logging.getLogger("mint")

UNIT = "sat"
GATEWAY_S = 15.0  # a call to the operator's gateway
RESOLVE_EVERY_S = 2.0
# A melt's pay command is sent within SEND_WINDOW_S of its start (pending_since), on the
# database's clock, or never (``MintStore.may_pay``, asked right before it goes); one runs
# RETRY_FOR_S at most, and the margin covers the node's clock and a slow send. So every
# attempt having failed is the payment's failure only ATTEMPTING_S past both the window's
# end and the newest attempt's start (``constellation.lightning.failure_final``).
SEND_WINDOW_S = 30.0
ATTEMPTING_S = RETRY_FOR_S + 30.0
EXPIRED_MARGIN_S = 600.0  # an invoice this long expired is paid by no node (clocks differ)
# melts in flight to one payee (the node that signed the invoice): those pending past a
# pay call (held by the payee) no more than half the node's payment places, all of them
# no more than four times its places
PER_PAYEE = PayeeLimit(held=THREADS // 2, held_after_s=PAY_S, in_flight=4 * THREADS)
DEADLOCK_RETRIES = 3
REDIS_S = 0.5  # a slow Redis costs a request this much at most, per call
BOOKS_EVERY_S = 5.0
# a redemption refused after a send whose answer was lost is freed only where its coin is
# not there this long after the first send (the gateway's and the ledger's waits are shorter)
ISSUE_SETTLE_S = 600.0
ISSUED_STATES = frozenset({"unspent", "locked", "spent"})  # a coin the issuance created
MALFORMED = 0  # no NUT code: a body that is not what the endpoint takes
RATE_LIMITED = 0  # nor for a client over its rate (HTTP 429, Retry-After)
PROOF_REFUSED = m.PROOF_INVALID  # an L3 transaction the ledger did not commit
VERSION = "constellation/0.1"


async def _retried(handler: Callable[[web.Request], Awaitable[Any]], request: web.Request) -> Any:
    """``handler(request)``, again where PostgreSQL broke a deadlock by aborting it (the
    transaction rolled back: nothing of it happened)."""
    for _ in range(DEADLOCK_RETRIES - 1):
        try:
            return await handler(request)
        except asyncpg.DeadlockDetectedError:
            log.warning("deadlock: the operation runs again", extra={"path": request.path})
    return await handler(request)


@contextlib.contextmanager
def _chain_reached() -> Iterator[None]:
    """bitcoind not reachable: the request is answered "retry" (503), nothing done."""
    try:
        yield
    except CHAIN_DOWN as exc:
        raise RetryLater(f"the chain is not reachable ({exc!r}): retry") from None


class RetryLater(Exception):
    """Answered HTTP 503: what became of the request is not known yet (its transaction
    may still commit), or what it needs is not reachable now."""


def _error(code: int, detail: str) -> web.Response:
    return web.json_response({"detail": detail, "code": code}, status=400)


class MintApp:
    def __init__(self, settings: Settings, backend: LightningBackend | None = None) -> None:
        self.settings = settings
        self.metrics = MintMetrics()
        self.ops = OpsServer(self.metrics.registry, self.ready, 4 << 20, settings.trusted_proxies)
        self.backend = backend or ClnBackend(settings.lightning_rpc)
        self.store: MintStore | None = None
        self.mint: m.Mint | None = None
        self.pubkey = ""
        self.master = b""
        self.paying: set[tuple[str, int]] = set()  # melt attempts this process is paying
        self.session: aiohttp.ClientSession | None = None
        self.ledger_id = b""  # the operator's ledger's (asked of its gateway once)
        self.hub = Hub(self._states_of, self.metrics)
        self.rotated = asyncio.Event()  # another process changed the keysets
        self.cache: Cache | None = None
        self.limits: Limits | None = None  # per client address, where there is Redis
        self.onchain: Onchain | None = None  # deposits and withdrawals on-chain (NUT-30)
        self.database_down: str | None = None  # why it failed last, until a task reaches it
        self.ec = EC(self.metrics.ec_stops.inc)  # checks and signs in a process of its own

    def ready(self) -> tuple[bool, str]:
        if self.mint is None:
            return False, "starting"
        if self.database_down is not None:
            return False, f"database not reachable: {self.database_down}"
        if self.ec.unsteady():
            return False, "the EC process keeps stopping (see the log)"
        return True, ""

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        store = self.store = await MintStore.open(s.database_url, self.metrics.swap_groups.observe)
        master = self.master = await store.master(s.storage_key)
        self.pubkey = self._key(b"constellation/cashu/info").pubkey.hex()
        keysets = await store.keysets(master, UNIT, s.input_fee_ppk)
        self.mint = m.Mint(keysets, s.max_amount_sat)
        await self.ec.start()
        if s.redis_url:
            redis = Limits.client(s.redis_url, REDIS_S)  # one pool: the cache's, the limits'
            self.cache = Cache(redis, s.cache_ttl_s, self.metrics)
            self.limits = Limits(redis, s.rate_per_s, prefix="mint-rate")
            self.ops.tasks.start("limits", self.limits.sync_forever)
        if s.chain is not None:
            await Onchain.create_schema(store.pool)
            self.onchain = Onchain(s.chain, store, lambda: self.rules, self._sign, self.metrics)
            self.ops.tasks.start("chain", self.onchain.follow_forever)
            self.ops.tasks.start("withdrawals", self.onchain.resolve_forever)
        self._routes(self.ops.app.router)
        self.ops.tasks.start("paid", self._follow_paid)
        self.ops.tasks.start("resolve", self._every(RESOLVE_EVERY_S, "resolve", self._resolve))
        self.ops.tasks.start("books", self._every(BOOKS_EVERY_S, "books", self._books))
        handlers: dict[str, Callable[[str], None]] = {
            ch: functools.partial(self.hub.heard, kind) for ch, kind in CHANNELS.items()
        }
        handlers["mint_keysets"] = lambda _: self.rotated.set()
        self.ops.tasks.start(
            "listen", functools.partial(listen_forever, s.database_url, handlers, self._heard_all)
        )
        self.ops.tasks.start("tell", self.hub.tell_forever)
        self.ops.tasks.start("keysets", self._keysets_forever)
        if s.gateway_url:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=GATEWAY_S))
            self.ops.tasks.start("redeem", self._every(RESOLVE_EVERY_S, "redeem", self._redeem))
        await self.ops.start(s.http_host, s.http_port)
        log.info(
            "mint ready",
            extra={
                "http_port": self.ops.port,
                "keysets": [k.id for k in keysets if k.active],
            },
        )
        await stop.wait()
        await self.ops.stop()
        await self.ops.tasks.stop()
        if self.session is not None:
            await self.session.close()
        if self.limits is not None:
            await self.limits.close()  # and the cache's: one client
        if self.onchain is not None:
            await self.onchain.close()
        await self.ec.close()
        await store.close()

    async def _heard_all(self) -> None:
        """Listening (again): what changed meanwhile is read anew."""
        self.rotated.set()
        await self.hub.everything()

    async def _keysets_forever(self) -> None:
        """Take up the keysets as stored when another mint process rotated them: this
        one signs only with the active keyset, whoever made it active."""
        while True:
            await self.rotated.wait()
            keysets = await self.db.stored_keysets(self.master)
            self.rotated.clear()  # only now: a read that failed is made again
            if {k.id: k.active for k in keysets} != {
                k.id: k.active for k in self.rules.keysets.values()
            }:
                self.mint = m.Mint(keysets, self.settings.max_amount_sat)
                log.info("keysets taken up", extra={"active": [k.id for k in keysets if k.active]})

    def _key(self, purpose: bytes) -> SigningKey:
        """A key of the mint's for one purpose, derived from its master secret."""
        assert self.master
        return SigningKey(hmac.new(self.master, purpose, "sha256").digest())

    @property
    def l3_key(self) -> SigningKey:
        """The mint's own L3 key: withdrawals pay it, tweaked by what they buy."""
        return self._key(b"constellation/cashu/l3")

    def _routes(self, r: web.UrlDispatcher) -> None:
        r.add_get("/v1/info", self.info)
        r.add_get("/v1/keys", self.keys)
        r.add_get("/v1/keys/{id}", self.keys)
        r.add_get("/v1/keysets", self.keysets)
        self._post(r, "/v1/swap", "swap", self.swap)
        self._post(r, "/v1/mint/quote/bolt11", "mint_quote", self.mint_quote)
        r.add_get("/v1/mint/quote/bolt11/{quote}", self._op("mint_quote_state", self.mint_state))
        self._post(r, "/v1/mint/bolt11", "mint", self.mint_ecash)
        self._post(r, "/v1/melt/quote/bolt11", "melt_quote", self.melt_quote)
        r.add_get("/v1/melt/quote/bolt11/{quote}", self._op("melt_quote_state", self.melt_state))
        self._post(r, "/v1/melt/bolt11", "melt", self.melt)
        self._post(r, "/v1/checkstate", "checkstate", self.checkstate)
        self._post(r, "/v1/restore", "restore", self.restore)
        r.add_get("/v1/ws", self.hub.handle)
        r.add_get("/v1/l3/info", self._op("l3_info", self.l3_info))
        self._post(r, "/v1/l3/redeem", "redeem", self.redeem)
        self._post(r, "/v1/l3/withdraw", "withdraw", self.withdraw)
        if self.onchain is not None:
            self._post(r, "/v1/mint/quote/onchain", "mint_quote", self.mint_quote_onchain)
            r.add_get(
                "/v1/mint/quote/onchain/{quote}",
                self._op("mint_quote_state", self.mint_state_onchain),
            )
            self._post(r, "/v1/mint/onchain", "mint", self.mint_onchain)
            self._post(r, "/v1/melt/quote/onchain", "melt_quote", self.melt_quote_onchain)
            r.add_get(
                "/v1/melt/quote/onchain/{quote}",
                self._op("melt_quote_state", self.melt_state_onchain),
            )
            self._post(r, "/v1/melt/onchain", "melt", self.melt_onchain)

    def _post(
        self,
        r: web.UrlDispatcher,
        path: str,
        op: str,
        handler: Callable[[web.Request], Awaitable[Any]],
    ) -> None:
        r.add_post(path, self._op(op, handler))

    def _op(
        self, op: str, handler: Callable[[web.Request], Awaitable[Any]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """Time and count ``handler``; its ``CashuError`` (or a malformed body) is the
        NUT error body, HTTP 400."""

        async def run(request: web.Request) -> web.Response:
            started = time.perf_counter()
            wait = self.limits.admit(request.remote or "unknown", 1) if self.limits else 0.0
            if wait:
                why = f"over {self.settings.rate_per_s} requests a second: retry in {wait:.2f} s"
                limited = web.json_response({"detail": why, "code": RATE_LIMITED}, status=429)
                limited.headers["Retry-After"] = str(max(1, round(wait)))
                return self._done(op, started, "429", limited)
            cache = self.cache if request.path in CACHED else None
            body = await request.read()
            try:
                doc = await _retried(handler, request)
                answer = nut.encode(doc)
                if cache is not None and doc.get("state", "PAID") == "PAID":  # final
                    await cache.put(request.path, body, answer)
            except m.CashuError as exc:  # spent, issued, paid: by this very request, before?
                found = await cache.get(request.path, body) if cache is not None else None
                if found is None:
                    return self._done(op, started, str(exc.code), _error(exc.code, exc.detail))
                answer = found
            except nut.DecodeError as exc:
                why = f"malformed request: {exc}"
                return self._done(op, started, "malformed", _error(MALFORMED, why))
            except (RetryLater, Stopped) as exc:
                unknown = web.json_response({"detail": str(exc), "code": MALFORMED}, status=503)
                return self._done(op, started, "unknown", unknown)
            except DATABASE_DOWN as exc:  # done or not as the database says: a retry knows
                self.database_down = repr(exc)
                log.warning("database not reachable", extra={"op": op, "error": repr(exc)})
                why = f"the mint's database is not reachable ({type(exc).__name__}): retry"
                down = web.json_response({"detail": why, "code": MALFORMED}, status=503)
                return self._done(op, started, "unavailable", down)
            ok = web.Response(body=answer, content_type="application/json")
            return self._done(op, started, "ok", ok)

        return run

    def _done(self, op: str, started: float, outcome: str, response: web.Response) -> web.Response:
        self.metrics.operations.labels(op, outcome).inc()
        self.metrics.seconds.labels(op).observe(time.perf_counter() - started)
        return response

    async def _sign(self, outputs: Sequence[nut.BlindedMessage]) -> list[nut.BlindSignature]:
        signatures: list[nut.BlindSignature] = await self.ec.call(self.rules, "sign", outputs)
        return signatures

    @property
    def rules(self) -> m.Mint:
        assert self.mint is not None
        return self.mint

    @property
    def db(self) -> MintStore:
        assert self.store is not None
        return self.store

    # -- keys and info -----------------------------------------------------------------

    async def info(self, _: web.Request) -> web.Response:
        s = self.settings
        method = {"method": "bolt11", "unit": UNIT, "min_amount": 1, "max_amount": s.max_amount_sat}
        mints: list[dict[str, Any]] = [method]
        melts: list[dict[str, Any]] = [method]
        if self.onchain:  # NUT-30: a deposit (each output) of less is not credited
            chain = self.onchain.s
            mints.append(
                {
                    "method": m.ONCHAIN,
                    "unit": UNIT,
                    "min_amount": chain.min_deposit_sat,
                    "max_amount": None,
                    "options": {"confirmations": chain.confirmations},
                }
            )
            melts.append({**method, "method": m.ONCHAIN, "min_amount": DUST_SAT})
        cached = [{"method": "POST", "path": path} for path in CACHED]
        doc = {
            "name": s.name,
            "pubkey": "02" + self.pubkey,
            "version": VERSION,
            "description": f"the ecash mint of Constellation operator {s.operator}",
            "nuts": {
                "4": {"methods": mints, "disabled": False},
                "5": {"methods": melts, "disabled": False},
                **{n: {"supported": True} for n in ("7", "8", "9", "10", "11", "12", "20")},
                **(
                    {"19": {"ttl": s.cache_ttl_s, "cached_endpoints": cached}}
                    if self.cache is not None
                    else {}
                ),
                "17": {
                    "supported": [
                        {"method": "bolt11", "unit": UNIT, "commands": list(nut.WS_KINDS)}
                    ]
                },
            },
        }
        return web.json_response(doc)

    def _keyset(self, kid: str, keys: bool) -> dict[str, Any]:
        k = self.rules.keysets[kid]
        doc: dict[str, Any] = {
            "id": k.id,
            "unit": k.unit,
            "active": k.active,
            "input_fee_ppk": k.input_fee_ppk,
        }
        if keys:
            doc["keys"] = k.public()
        return doc

    async def keys(self, request: web.Request) -> web.Response:
        kid = request.match_info.get("id")
        if kid is None:
            ids = [k.id for k in self.rules.keysets.values() if k.active]
        elif kid in self.rules.keysets:
            ids = [kid]
        else:
            return _error(m.KEYSET_UNKNOWN, f"keyset {kid[:66]} is not known")
        return web.json_response({"keysets": [self._keyset(i, True) for i in ids]})

    async def keysets(self, _: web.Request) -> web.Response:
        return web.json_response({"keysets": [self._keyset(i, False) for i in self.rules.keysets]})

    # -- swap, state, restore ----------------------------------------------------------

    async def swap(self, request: web.Request) -> dict[str, Any]:
        req = nut.decode(await request.read(), nut.SwapRequest)
        # checked and signed before the transaction, not in it: its group commits sooner
        spend, out, signatures = await self.ec.call(self.rules, "swap", req, int(time.time()))
        return {"signatures": await self.db.swap(spend, out, req, signatures)}

    async def checkstate(self, request: web.Request) -> dict[str, Any]:
        req = nut.decode(await request.read(), nut.CheckStateRequest)
        return {"states": await self._proof_states(req.Ys)}

    async def _proof_states(self, ys: list[str]) -> list[dict[str, Any]]:
        states = await self.db.states([bytes.fromhex(y) for y in ys])
        found = [states.get(bytes.fromhex(y), ("UNSPENT", None)) for y in ys]
        return [{"Y": y, "state": st, "witness": w} for y, (st, w) in zip(ys, found, strict=True)]

    async def _states_of(self, kind: str, things: list[str]) -> dict[str, Any]:
        """NUT-17's payloads: each proof's state, or each quote's (where it exists)."""
        if kind == "proof_state":
            return {doc["Y"]: doc for doc in await self._proof_states(things)}
        found: dict[str, Any] = {}
        for quote in things:
            if kind == "bolt11_mint_quote" and (q := await self.db.mint_quote(quote)):
                found[quote] = _mint_quote_doc(q)
            elif kind == "bolt11_melt_quote" and (
                pair := await self.db.melt_quote(quote, m.BOLT11)
            ):
                found[quote] = _melt_quote_doc(*pair)
        return found

    async def restore(self, request: web.Request) -> dict[str, Any]:
        req = nut.decode(await request.read(), nut.RestoreRequest)
        found = await self.db.restore([bytes.fromhex(o.B_) for o in req.outputs])
        pairs = [
            (o, found[bytes.fromhex(o.B_)]) for o in req.outputs if bytes.fromhex(o.B_) in found
        ]
        return {
            "outputs": [o for o, _ in pairs],
            "signatures": [s for _, s in pairs],
            "promises": [s for _, s in pairs],  # the name older wallets read
        }

    # -- minting -----------------------------------------------------------------------

    def _check_amount(self, amount: int) -> None:
        if not 0 < amount <= self.settings.max_amount_sat:
            raise m.CashuError(
                m.AMOUNT_LIMIT, f"amount {amount} outside 1..{self.settings.max_amount_sat}"
            )

    def _check_unit(self, unit: str) -> None:
        if unit != UNIT:
            raise m.CashuError(m.UNIT_UNSUPPORTED, f"unit {unit[:16]!r}: this mint takes {UNIT}")

    async def mint_quote(self, request: web.Request) -> dict[str, Any]:
        req = nut.decode(await request.read(), nut.MintQuoteRequest)
        self._check_unit(req.unit)
        self._check_amount(req.amount)
        if req.pubkey is not None:
            m.check_quote_key(req.pubkey)
        quote = str(uuid.uuid4())
        try:
            invoice = await self.backend.create_invoice(
                req.amount * 1000,
                f"mint:{quote}",
                req.description or f"ecash from {self.settings.name}",
                self.settings.quote_expiry_s,
            )
        except (LightningError, OSError, TimeoutError) as exc:
            raise m.CashuError(
                m.PAYMENT_FAILED, f"the mint's node made no invoice: {exc}"
            ) from None
        q = m.MintQuote(
            quote,
            invoice.bolt11,
            invoice.payment_hash.hex(),
            req.amount,
            req.unit,
            m.UNPAID,
            invoice.expires_at,
            req.pubkey,
        )
        await self.db.add_mint_quote(q)
        return _mint_quote_doc(q)

    async def mint_state(self, request: web.Request) -> dict[str, Any]:
        q = await self.db.mint_quote(request.match_info["quote"])
        if q is None:
            raise m.CashuError(m.QUOTE_UNPAID, "no such quote")
        return _mint_quote_doc(await self._paid_at_node(q))

    async def _paid_at_node(self, q: m.MintQuote) -> m.MintQuote:
        """``q``, PAID if it is UNPAID here and its node says its invoice is paid (the
        follower of paid invoices may lag)."""
        if q.state != m.UNPAID:
            return q
        try:
            invoice = await self.backend.invoice(f"mint:{q.quote}")
        except (LightningError, OSError, TimeoutError):
            return q
        if invoice is not None and invoice.status == "paid" and invoice.pay_index:
            await self.db.paid(q.payment_hash, 0, invoice.amount_received_msat)
            return await self.db.mint_quote(q.quote) or q
        return q

    async def mint_ecash(self, request: web.Request) -> dict[str, Any]:
        req = nut.decode(await request.read(), nut.MintRequest)
        now = int(time.time())

        def check(q: m.MintQuote) -> m.Outputs:
            return self.rules.check_mint(q, req, now)

        try:
            signatures = await self.db.mint(req, check, self._sign)
        except m.CashuError as exc:
            # "unpaid" or "expired" where the follower has not yet seen it paid (before:
            # a deposit paid near its expiry was refused "expired")
            if exc.code not in (m.QUOTE_UNPAID, m.QUOTE_EXPIRED):
                raise
            q = await self.db.mint_quote(req.quote)
            if q is None or (await self._paid_at_node(q)).state == m.UNPAID:
                raise
            signatures = await self.db.mint(req, check, self._sign)
        return {"signatures": signatures}

    async def _follow_paid(self) -> None:
        """Mark quotes paid as their invoices are (the backend's stream waits out a node
        that is down, saying so in its log: the mint serves its ecash meanwhile)."""
        async for invoice in self.backend.paid_invoices(await self.db.pay_index()):
            if invoice.label.startswith("mint:") and invoice.pay_index is not None:
                quote = await self.db.paid(
                    invoice.payment_hash.hex(), invoice.pay_index, invoice.amount_received_msat
                )
                if quote:
                    log.info("mint quote paid", extra={"quote": quote})

    # -- melting -----------------------------------------------------------------------

    async def melt_quote(self, request: web.Request) -> dict[str, Any]:
        req = nut.decode(await request.read(), nut.MeltQuoteRequest)
        self._check_unit(req.unit)
        try:
            decoded = await self.backend.decode(req.request)
        except (LightningError, OSError, TimeoutError) as exc:
            raise m.CashuError(MALFORMED, f"not a BOLT11 invoice this node reads: {exc}") from None
        m.check_melt_options(req.options, decoded.amount_msat)
        if decoded.amount_msat is None:
            raise m.CashuError(m.AMOUNTLESS, "an invoice without an amount")
        await self._not_paid_by_node(decoded.payment_hash)
        amount = -(-decoded.amount_msat // 1000)
        self._check_amount(amount)
        s = self.settings
        reserve = max(s.fee_reserve_min_sat, amount * s.fee_reserve_ppm // 1_000_000)
        q = m.MeltQuote(
            str(uuid.uuid4()),
            req.request,
            decoded.payment_hash.hex(),
            amount,
            reserve,
            req.unit,
            m.MELT_UNPAID,
            int(time.time()) + s.quote_expiry_s,
            amount_msat=decoded.amount_msat,
        )
        await self.db.add_melt_quote(q, decoded.payee)
        return _melt_quote_doc(q, [])

    async def _not_paid_by_node(self, payment_hash: bytes) -> None:
        """Refuse a quote of an invoice the node paid or is paying outside any melt of it
        (the gateway, on the same node, pays invoices for L3 withdrawals): the node would
        not pay it again. A node that does not answer (unknown) refuses nothing here. A
        melt asks the same right before its payment goes (the gateway may pay it after
        the quote), and takes a payment its own call did not send for another's."""
        state = await self.backend.payment(payment_hash, attempted=False)
        if state.outcome is Outcome.SETTLED:
            raise m.CashuError(m.INVOICE_PAID, "this invoice is paid already")
        if state.outcome is Outcome.PENDING:
            raise m.CashuError(m.QUOTE_PENDING, "this invoice is being paid")

    async def melt_state(self, request: web.Request, quote: str = "") -> dict[str, Any]:
        found = await self.db.melt_quote(quote or request.match_info["quote"], m.BOLT11)
        if found is None:
            raise m.CashuError(m.QUOTE_UNPAID, "no such quote")
        return _melt_quote_doc(*found)

    async def melt(self, request: web.Request) -> dict[str, Any]:
        req = nut.decode(await request.read(), nut.MeltRequest)
        now = int(time.time())
        try:
            quote, attempt = await self.db.start_melt(
                req, m.BOLT11, lambda q: self.rules.check_melt(q, req, now), PER_PAYEE
            )
        except MeltStarted:
            return await self.melt_state(request, req.quote)
        payment_hash = bytes.fromhex(quote.payment_hash)

        async def may_send() -> bool:
            # not where the node paid or is paying the invoice for another (the gateway,
            # for an L3 withdrawal) since the quote was made, or cannot say whether it
            # did, nor after the resolver's fence opened (asked last: right before the
            # command goes)
            node = await self.backend.payment(payment_hash, attempted=False)
            if node.outcome is not Outcome.FAILED:
                return False
            return await self.db.may_pay(quote.quote, attempt, SEND_WINDOW_S)

        self.paying.add((quote.quote, attempt))
        try:
            state = await self.backend.pay(
                quote.request, quote.fee_reserve * 1000, payment_hash, may_send
            )
        except (LightningError, OSError, TimeoutError) as exc:  # its fate is not known
            state = PaymentState(Outcome.UNKNOWN, payment_hash, reason=str(exc))
        finally:
            self.paying.discard((quote.quote, attempt))
        others = None
        if not state.sent:
            # Nothing of this attempt reached the node, or the node refused it (it paid
            # the hash before), and the quote's earlier attempts failed for good (it
            # began from UNPAID, which only a final failure makes a melt): what the node
            # says of the hash is of another's payment (the gateway's), never this
            # melt's. It fails now, not once its invoice expired.
            others = state.outcome
            state = replace(state, outcome=Outcome.FAILED)
        await self._settle(quote, attempt, state)
        found = await self.db.melt_quote(quote.quote, m.BOLT11)
        assert found is not None
        if found[0].state == m.MELT_UNPAID and state.outcome is not Outcome.SETTLED:
            if others is Outcome.SETTLED:
                raise m.CashuError(m.INVOICE_PAID, "this invoice is paid already")
            if others is Outcome.PENDING:
                raise m.CashuError(m.QUOTE_PENDING, "this invoice is being paid")
            raise m.CashuError(
                m.PAYMENT_FAILED, f"the payment failed: {state.reason or 'no route'}"
            )
        return _melt_quote_doc(*found)

    async def _settle(self, quote: m.MeltQuote, attempt: int, state: PaymentState) -> None:
        """Act on what became of a melt's payment: spend its proofs and sign its change,
        free them, or (pending, unknown) leave them reserved for the resolver."""
        if state.outcome is Outcome.SETTLED:
            # what left the node; where the node does not say, the whole reserve
            sent = spent_at_most(state, quote.amount_msat, quote.fee_reserve * 1000)
            preimage = state.preimage.hex() if state.preimage else ""
            if await self.db.finish_melt(quote.quote, attempt, preimage, sent, self._sign):
                return
            found = await self.db.melt_quote(quote.quote, m.BOLT11)
            if found is not None and found[0].state == m.MELT_UNPAID:
                # the melt was failed and its proofs freed, and the invoice paid all the same
                log.critical(
                    "a melt's payment settled after the melt was failed: paid out and"
                    " refunded, a loss",
                    extra={
                        "quote": quote.quote,
                        "attempt": attempt,
                        "payment_hash": quote.payment_hash,
                        "sent_msat": sent,
                    },
                )
        elif state.outcome is Outcome.FAILED:
            await self.db.fail_melt(quote.quote, attempt)

    def _every(
        self, seconds: float, what: str, step: Callable[[], Awaitable[None]]
    ) -> Callable[[], Awaitable[None]]:
        """A task running ``step()`` every ``seconds``: a PostgreSQL outage is waited
        out (said, not a failure of the task) and makes the mint not ready until a step
        (each reads the database) goes through again."""

        async def run() -> None:
            while True:
                try:
                    await step()
                    self.database_down = None
                except DATABASE_DOWN as exc:
                    self.database_down = repr(exc)
                    log.warning("waits for the database", extra={"task": what, "error": repr(exc)})
                await asyncio.sleep(seconds)

        return run

    async def _resolve(self) -> None:
        """Pending melts, each settled once its payment's fate is known. Its ages are
        the database's (the clock ``may_pay`` fences the sending with), never this
        host's time less the database's."""
        now, pending = await self.db.pending_melts(m.BOLT11)
        self.metrics.pending_melts.set(len(pending))
        self.metrics.oldest_pending_melt.set(
            max((now - since for _, _, since, _ in pending), default=0)
        )
        for quote, attempt, since, unsent in pending:
            if (quote.quote, attempt) in self.paying:
                continue  # its pay call answers for it
            if unsent:
                # its command has not gone (``may_pay``): a payment the node shows for its
                # hash is another payer's. It fails once it can go no more.
                if now - since >= SEND_WINDOW_S:
                    unsent_failed = self.db.fail_unsent(quote.quote, attempt, SEND_WINDOW_S)
                    await self._resolve_one(quote.quote, unsent_failed)
                continue
            try:
                attempted = True
                if now - since >= SEND_WINDOW_S + ATTEMPTING_S:  # no pay call runs any more
                    expires_at = (await self.backend.decode(quote.request)).expires_at
                    # nor can one begin (a process stopped before its call): none seen is
                    # a payment never sent, not one still to appear
                    attempted = time.time() < expires_at + EXPIRED_MARGIN_S
                state = await self.backend.payment(bytes.fromhex(quote.payment_hash), attempted)
            except (LightningError, OSError, TimeoutError):
                continue
            if state.outcome is Outcome.FAILED and not failure_final(
                state, now, since + SEND_WINDOW_S, ATTEMPTING_S
            ):
                # every attempt so far failed, but a pay call (of another process, or
                # one sent late) may still be trying routes: final only after it ends
                continue
            await self._resolve_one(quote.quote, self._settle(quote, attempt, state))

    @staticmethod
    async def _resolve_one(quote: str, step: Awaitable[Any]) -> None:
        try:
            await step
        except Exception:  # one melt's trouble holds up no other
            log.exception("a melt not resolved", extra={"quote": quote})

    # -- on-chain (NUT-30) ---------------------------------------------------------------

    @property
    def chain(self) -> Onchain:
        assert self.onchain is not None
        return self.onchain

    async def mint_quote_onchain(self, request: web.Request) -> dict[str, Any]:
        req = nut.decode(await request.read(), nut.MintQuoteOnchainRequest)
        self._check_unit(req.unit)
        with _chain_reached():
            return await self.chain.mint_quote(req, self.settings.quote_expiry_s)

    async def mint_state_onchain(self, request: web.Request) -> dict[str, Any]:
        return await self.chain.mint_quote_state(request.match_info["quote"])

    async def mint_onchain(self, request: web.Request) -> dict[str, Any]:
        req = nut.decode(await request.read(), nut.MintRequest)
        return {"signatures": await self.chain.mint(req)}

    async def melt_quote_onchain(self, request: web.Request) -> dict[str, Any]:
        req = nut.decode(await request.read(), nut.MeltQuoteOnchainRequest)
        self._check_unit(req.unit)
        self._check_amount(req.amount)
        with _chain_reached():  # its fee comes from the chain's market
            q = await self.chain.melt_quote(req, self.settings.quote_expiry_s)
        return self.chain.melt_doc(q, [])

    async def melt_state_onchain(self, request: web.Request) -> dict[str, Any]:
        return await self.chain.melt_state(request.match_info["quote"])

    async def melt_onchain(self, request: web.Request) -> dict[str, Any]:
        req = nut.decode(await request.read(), nut.MeltOnchainRequest)
        if req.fee_index != 0:
            raise m.CashuError(MALFORMED, "fee_index: this mint offers option 0 only")
        melt = req.melt()
        now = int(time.time())
        # The chain not reached refuses it before its proofs are reserved (after,
        # ``withdraw`` takes up what fails); the same request again is answered with the
        # quote as it stands.
        with _chain_reached(), contextlib.suppress(MeltStarted):
            await self.chain.withdraw(
                req.quote,
                lambda: self.db.start_melt(
                    melt, m.ONCHAIN, lambda q: self.rules.check_melt(q, melt, now)
                ),
            )
        return await self.chain.melt_state(req.quote)  # PENDING: sent in the background

    # -- the bridge to L3 ----------------------------------------------------------------

    def _gateway(self) -> Gateway:
        if self.session is None:
            raise m.CashuError(MALFORMED, "this mint has no bridge to an L3 ledger")
        return Gateway(self.settings.gateway_url, self.session)

    async def _ledger_id(self) -> bytes:
        if not self.ledger_id:
            try:
                totals = await self._gateway().totals()
            except (GatewayError, aiohttp.ClientError, TimeoutError) as exc:
                raise m.CashuError(MALFORMED, f"the L3 ledger is not reachable: {exc}") from None
            self.ledger_id = bytes.fromhex(totals["ledger_id"])
        return self.ledger_id

    async def l3_info(self, _: web.Request) -> dict[str, Any]:
        lid = await self._ledger_id()
        key = self.l3_key.pubkey
        return {"key": key.hex(), "ledger_id": lid.hex()}

    async def redeem(self, request: web.Request) -> dict[str, Any]:
        req = nut.decode(await request.read(), nut.RedeemRequest)
        gw = self._gateway()
        try:
            owner, named = decode_destination(req.address, self.settings.network)
        except ConstellationError as exc:
            raise m.CashuError(MALFORMED, f"not an L3 address: {exc}") from None
        if named is not None and named != await self._ledger_id():
            raise m.CashuError(MALFORMED, "the address names another operator's ledger")
        now = int(time.time())
        spend = await self.ec.call(self.rules, "spend", req.inputs, now, (), req.address)
        value = m.check_redeem(spend)
        rid = m.redeem_id(spend.ys)
        issuer = self.settings.issuer
        assert issuer is not None
        try:
            issuance = Issuance(issuer.pubkey, m.redeem_nonce(rid), [TxOutput(value, owner)])
        except ConstellationError as exc:
            raise m.CashuError(m.AMOUNT_LIMIT, f"not a coin the ledger takes: {exc}") from None
        row = Redeem(
            req.address, value, spend.fee * 1000, issuance.signed_by(issuer.secret).encode().hex()
        )
        row = await self.db.start_redeem(rid, spend, req.inputs, row)
        state = await self._issue(gw, rid, row)
        issued = decode_issuance(bytes.fromhex(row.issuance))
        return {
            "state": state,
            "coin_id": issued.output_ids[0].hex(),
            "value_msat": row.value_msat,
            "address": row.address,
        }

    async def _issue(self, gw: Gateway, rid: bytes, row: Redeem) -> str:
        """Issue a redemption's coin (again: the ledger takes an issuance once), then
        spend its proofs; ISSUED, PENDING (not known yet: the resolver asks again), or a
        ``CashuError`` where the ledger refused it and has no coin of it (its proofs
        freed)."""
        issuance = decode_issuance(bytes.fromhex(row.issuance))
        first = await self.db.send_redeem(rid, time.time())  # before it may be applied
        try:
            await gw.issue(issuance)
        except GatewayError as exc:
            if exc.code != AlreadyCommitted.code and exc.final:
                return await self._refused(gw, rid, issuance, first, exc)
            if exc.code != AlreadyCommitted.code:
                return "PENDING"
        except (aiohttp.ClientError, TimeoutError):
            return "PENDING"
        await self.db.finish_redeem(rid)
        return "ISSUED"

    async def _refused(
        self, gw: Gateway, rid: bytes, issuance: AnyIssuance, first: float | None, exc: GatewayError
    ) -> str:
        """A redemption whose issuance was refused for good. The ledger's own refusal of
        its first send says it was never applied: its proofs are freed. After an earlier
        send whose answer was lost (or a refusal that is not the ledger's: a proxy's), it
        may have been applied all the same (an issuer key since retired is refused before
        "already applied" by an older ledger): its coin is asked for. Issued, the proofs
        are spent; freed only where the ledger shows no such coin ``ISSUE_SETTLE_S``
        after the first send (one still on its way may yet be applied); else it stays
        PENDING, an alert."""
        if first is None and exc.code != "http":
            await self.db.fail_redeem(rid)
            raise m.CashuError(MALFORMED, f"the L3 ledger refused the coin: {exc}")
        coin_id = issuance.output_ids[0]
        try:
            coin = await gw.coin(coin_id)
        except (GatewayError, aiohttp.ClientError, TimeoutError) as gone:
            coin = {"status": f"not known ({gone})"}
        if coin is not None and coin.get("status") in ISSUED_STATES:
            await self.db.finish_redeem(rid)
            return "ISSUED"
        sent_s = time.time() - (first if first is not None else time.time())
        if coin is None and sent_s >= ISSUE_SETTLE_S:
            await self.db.fail_redeem(rid)
            raise m.CashuError(MALFORMED, f"the L3 ledger refused the coin: {exc}")
        self.metrics.redeems_in_doubt.inc()
        log.error(
            "a redemption refused after a send whose answer was lost: kept PENDING",
            extra={"redeem": rid.hex(), "coin": coin_id.hex(), "refusal": str(exc)},
        )
        return "PENDING"

    async def _redeem(self) -> None:
        """Redeems whose coin is not issued yet, issued."""
        for rid, row in await self.db.pending_redeems():
            with contextlib.suppress(m.CashuError):
                await self._issue(self._gateway(), rid, row)

    async def withdraw(self, request: web.Request) -> dict[str, Any]:
        req = nut.decode(await request.read(), nut.WithdrawRequest)
        gw = self._gateway()
        try:
            tx = decode_transaction(bytes.fromhex(req.tx))
        except ConstellationError as exc:
            raise m.CashuError(MALFORMED, f"not an L3 transaction: {exc}") from None
        done = await self.db.withdrawn(tx.txid, req.outputs)
        if done is not None:  # a retry: answered as first, whatever changed since (keysets)
            return {"signatures": done}
        out = self.rules.outputs(req.outputs, inactive=True)
        # a retry of one that may have been sent names its outputs as reserved (signed
        # then even by a keyset retired since, or as what the wallet signed them as since)
        retry = await self.db.withdraw_reserved(tx.txid, req.outputs)
        if not retry:
            self.rules.outputs(req.outputs)  # a first try: active keysets only
        key = m.withdrawal_key(self.l3_key.pubkey, out.blinded)
        paid = sum(v for i, (v, owner) in enumerate(tx.outputs) if owner == key and tx.here(i))
        m.check_withdraw(paid, out)
        if not retry:
            await self.db.reserve_withdraw(tx.txid, req.outputs)  # refused here: nothing sent
        try:
            await gw.submit(tx)
        except GatewayError as exc:
            if exc.code != AlreadyCommitted.code:  # committed before (a retry), or not
                await self._committed(gw, tx.txid, exc)
        except (aiohttp.ClientError, TimeoutError) as exc:
            await self._committed(gw, tx.txid, exc)
        signatures = await self.db.withdraw(tx.txid, paid, req.outputs, self._sign)
        return {"signatures": signatures}

    async def _committed(self, gw: Gateway, txid: bytes, exc: Exception) -> None:
        """Go on with a withdrawal whose submission was not answered "committed" only
        where its transaction is committed after all (a refusal of a retry says nothing:
        the ledger may have forgotten who spent its inputs). Refused (HTTP 400, its
        outputs free) where the ledger refused it for good and has no record of it; else
        its fate is not known yet (HTTP 503: the wallet asks again, and the ledger may
        still take it)."""
        try:
            found = await gw.get(f"/v1/tx/{txid.hex()}")
        except GatewayError as gone:
            # only "not found" for good says it did not commit: not while the index is
            # behind, nor where a submission of it timed out (it may still commit)
            refused = isinstance(exc, GatewayError) and exc.final
            if refused and gone.status == 404 and gone.final:
                await self.db.release_withdraw(txid)
                raise m.CashuError(PROOF_REFUSED, f"the L3 ledger refused it: {exc}") from None
            found = {}
        except (aiohttp.ClientError, TimeoutError):
            found = {}
        if found.get("status") != "committed":
            raise RetryLater(f"the L3 ledger has not committed it (yet?): {exc}") from None

    async def _books(self) -> None:
        for kid, amount in (await self.db.outstanding()).items():
            self.metrics.outstanding.labels(kid).set(amount)


def _mint_quote_doc(q: m.MintQuote) -> dict[str, Any]:
    return {
        "quote": q.quote,
        "request": q.request,
        "amount": q.amount,
        "unit": q.unit,
        "state": q.state,
        "paid": q.state != m.UNPAID,
        "expiry": q.expiry,
        "pubkey": q.pubkey,
    }


def _melt_quote_doc(q: m.MeltQuote, change: list[nut.BlindSignature]) -> dict[str, Any]:
    return {
        "quote": q.quote,
        "request": q.request,
        "amount": q.amount,
        "fee_reserve": q.fee_reserve,
        "unit": q.unit,
        "state": q.state,
        "paid": q.state == m.MELT_PAID,
        "expiry": q.expiry,
        "payment_preimage": q.preimage or None,
        "change": change,
    }
