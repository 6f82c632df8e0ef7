"""The gateway's Lightning node: ``LightningBackend``, and Core Lightning behind it.

The interface is shaped like the Cashu mints' (nutshell's ``cashu/lightning/base.py``):
invoices in (create, look up, cancel, a stream of paid ones), payments out (pay with a
fee limit, look up by hash) with a four-valued outcome (``constellation.lightning``),
and the node's money: balances, channels, opening and splicing channels, on-chain
addresses and withdrawals.

``ClnBackend`` talks to Core Lightning through pyln-client over lightningd's unix socket,
the same code whether a real lightningd or the simulated network
(``services/lnsim``) serves it. pyln-client blocks: each call runs on a thread of its
own, a bounded number at once (``Threads``), under a timeout (pyln sets none on its
socket, so a call that times out keeps its thread, and its place, until lightningd
answers or goes). Payments have places of their own, so that stuck ones never starve
the lookups; and a payment whose call outlived its timeout (a payee holding the HTLC,
for hours perhaps) leaves its place for the next payment, its thread counted among the
held ones (``HELD_PAYMENTS`` at most; past that it keeps its place). The threads are
daemons: a stopping gateway does not wait for a long poll or a payment in flight (the
settlement's journal and ``listpays`` find what became of it).
``getinfo``'s version picks ``xpay`` (v24.11) over ``pay`` and ``splicein``/``spliceout``
(v26.04) over the three-step splice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pyln.client import LightningRpc, RpcError

from constellation.lightning import (
    ALREADY_PAID,
    IN_PROGRESS,
    Outcome,
    PaymentState,
    msat,
    nothing_sent,
    outgoing,
    preimage_of,
)
from constellation.liquidity import DEFAULT, ChannelView, Limits, Splice, plan

log = logging.getLogger("gateway.lightning")

CALL_S = 30.0  # an ordinary call
PAY_S = 60.0  # a payment's call: past it the payment is looked up, not given up
WAIT_S = 30  # a long poll for paid invoices (waitanyinvoice's own timeout)
RETRY_FOR_S = 30  # how long lightningd keeps trying routes for a payment
PLACE_S = 15.0  # a payment with a last moment to be sent waits this long for a place
DEFAULT_EXPIRY_S = 3600  # an invoice's expiry where it names none (BOLT 11)
THREADS = 8  # for calls, and as many again for payments
# payments whose calls outlived their timeout, each on a thread blocked until lightningd
# answers (a held HTLC: until its payee resolves it or it expires)
HELD_PAYMENTS = 256
CAN_ADD_HTLC = ("CHANNELD_NORMAL", "CHANNELD_AWAITING_SPLICE")
# A channel holds our side from its funding (while it waits for lock-in) until its
# closing transaction is mined: money that left the wallet and is not back in it.
# lightningd adds a close's output to its wallet (``listfunds``) from the block that
# holds it, not when it broadcasts it (as it does its own withdrawals' and fundings'
# change); from that block on the channel is FUNDING_SPEND_SEEN, then ONCHAIN.
HOLDS_OUR_SIDE = (
    *CAN_ADD_HTLC,
    "CHANNELD_AWAITING_LOCKIN",
    "DUALOPEND_AWAITING_LOCKIN",
    "CHANNELD_SHUTTING_DOWN",
    "CLOSINGD_SIGEXCHANGE",
    "CLOSINGD_COMPLETE",  # a mutual close broadcast, not mined
    "AWAITING_UNILATERAL",  # our commitment broadcast, not mined
)
SPLICE_ROUNDS = 10  # splice_update calls before the commitments must be secured


class LightningError(RuntimeError):
    """The node refused a call, or did not answer it."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    version: str
    network: str
    blockheight: int


@dataclass(frozen=True)
class Invoice:
    label: str
    bolt11: str
    payment_hash: bytes
    status: str  # unpaid, paid, expired
    amount_msat: int | None
    expires_at: int
    pay_index: int | None = None
    amount_received_msat: int | None = None
    preimage: bytes | None = None


@dataclass(frozen=True)
class Channel:
    channel_id: str
    peer_id: str
    state: str
    connected: bool
    capacity_msat: int
    local_msat: int
    spendable_msat: int
    receivable_msat: int
    splicing: bool
    # what a splice in flight moves: into the channel from the wallet (> 0), or out to
    # it (< 0); one side holds it before the splice confirms, the other after
    splice_msat: int = 0

    @property
    def usable(self) -> bool:
        return self.connected and self.state in CAN_ADD_HTLC

    @property
    def holds_our_side(self) -> bool:
        return self.state in HOLDS_OUR_SIDE


def our_side_msat(channels: Iterable[Channel]) -> int:
    """What the node's channels hold of its money (the reserve invariant's count)."""
    return sum(c.local_msat for c in channels if c.holds_our_side)


@dataclass(frozen=True)
class Balances:
    lightning_local_msat: int  # ours in channels that can carry payments
    spendable_msat: int
    receivable_msat: int
    onchain_confirmed_msat: int
    onchain_unconfirmed_msat: int


@dataclass(frozen=True)
class Income:
    onchain_fees_msat: int  # paid to miners: opens, splices, withdrawals
    routed_msat: int  # earned forwarding others' payments


class LightningBackend(ABC):
    @abstractmethod
    async def info(self) -> NodeInfo: ...

    @abstractmethod
    async def create_invoice(
        self,
        amount_msat: int,
        label: str,
        description: str,
        expiry_s: int,
        preimage: bytes | None = None,
    ) -> Invoice:
        """An invoice under ``label``; creating it again answers the same one (a retry
        after a lost reply), and a different one under that label is refused."""

    @abstractmethod
    async def invoice(self, label: str) -> Invoice | None: ...

    @abstractmethod
    async def cancel_invoice(self, label: str) -> bool:
        """Delete an unpaid invoice; False where it was paid meanwhile."""

    @abstractmethod
    def paid_invoices(self, after_pay_index: int) -> AsyncIterator[Invoice]:
        """Every invoice paid after ``after_pay_index``, in order, for ever (persist
        each one's ``pay_index`` to resume after a restart)."""

    @abstractmethod
    async def decode(self, bolt11: str) -> Decoded:
        """What a BOLT11 invoice says, checked by the node (``LightningError`` if it is
        not a valid one)."""

    @abstractmethod
    async def pay(
        self,
        bolt11: str,
        fee_limit_msat: int,
        payment_hash: bytes | None = None,
        may_send: Callable[[], Awaitable[bool]] | None = None,
    ) -> PaymentState:
        """Pay ``bolt11`` (whose hash the caller may know from decoding it already):
        settled, failed, pending or unknown (never failed unless it is). Paying it again
        after any outcome but failed pays nothing twice. ``may_send``: asked right before
        the command goes (it waits ``PLACE_S`` at most for its turn); where it says no,
        or no turn came, the command is never sent (what the node says of the payment
        then is that of its earlier attempts, if any). ``sent`` False in the answer: this
        call sent nothing (not sent, or refused as paid already or being paid), and its
        state is that of the hash's other payments, whoever asked for them."""

    @abstractmethod
    async def payment(self, payment_hash: bytes, attempted: bool = True) -> PaymentState:
        """What became of a payment this node was asked to make. ``attempted`` False:
        the caller knows no attempt can appear any more, so none seen is a failure
        (else unknown: a call may not have reached the node yet)."""

    @abstractmethod
    async def channels(self) -> list[Channel]: ...

    @abstractmethod
    async def balances(self) -> Balances: ...

    @abstractmethod
    async def income(self) -> Income:
        """What the node's own bookkeeping says it paid miners and earned forwarding."""

    @abstractmethod
    async def open_channel(self, peer_id: str, sat: int, push_msat: int = 0) -> str: ...

    @abstractmethod
    async def splice_in(self, channel_id: str, sat: int) -> str: ...

    @abstractmethod
    async def splice_out(self, channel_id: str, sat: int) -> str: ...

    @abstractmethod
    async def new_address(self) -> str: ...

    @abstractmethod
    async def withdraw(self, address: str, sat: int) -> str: ...


@dataclass(frozen=True)
class Decoded:
    payment_hash: bytes
    amount_msat: int | None
    payee: str  # the node id that signed it
    expires_at: int  # unix seconds (its creation time and expiry): no node pays it after


def version_tuple(version: str) -> tuple[int, int]:
    m = re.match(r"v?(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _code(exc: RpcError) -> int | None:
    """The error's code; None where the connection was lost (pyln gives a string)."""
    error = exc.error
    return error.get("code") if isinstance(error, dict) else None


def _message(exc: RpcError) -> str:
    error = exc.error
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)


def _invoice(doc: dict[str, Any]) -> Invoice:
    payment_hash = bytes.fromhex(doc["payment_hash"])
    return Invoice(
        label=str(doc["label"]),
        bolt11=doc.get("bolt11", ""),
        payment_hash=payment_hash,
        status=doc["status"],
        amount_msat=msat(doc["amount_msat"]) if "amount_msat" in doc else None,
        expires_at=int(doc["expires_at"]),
        pay_index=doc.get("pay_index"),
        amount_received_msat=(
            msat(doc["amount_received_msat"]) if "amount_received_msat" in doc else None
        ),
        preimage=preimage_of(doc.get("payment_preimage"), payment_hash),
    )


class NotSent(Exception):
    """A call never sent: no place was free in time, or its caller said not to send it."""


class Threads:
    """Runs blocking calls each on a daemon thread, at most ``size`` at once (the others
    wait their turn); a call's place is freed when its thread ends, not when its caller
    stops waiting, except that up to ``held`` calls that outlived their timeout leave
    their places then (their threads run on, outside the ``size``)."""

    def __init__(self, size: int, name: str, held: int = 0) -> None:
        self.name = name
        self.places = asyncio.Semaphore(size)
        self.held_max = held
        self.held = 0  # calls past their timeout whose threads still run, places freed

    async def run(
        self,
        call: Callable[[], Any],
        timeout: float,
        wait_s: float | None = None,
        ready: Callable[[], Awaitable[bool]] | None = None,
    ) -> Any:
        """``call()``'s result or exception, or ``TimeoutError`` after ``timeout`` s (from
        its start). ``wait_s``: how long it may wait for a place (None: as long as it
        takes); ``ready``: asked once it has one, right before the call starts (False, or
        an error: it does not). Either way, nothing was called: ``NotSent``."""
        loop = asyncio.get_running_loop()
        await self._take_place(wait_s, ready)
        done: asyncio.Future[Any] = loop.create_future()
        held = False  # its place given up while its thread runs on
        ended = False

        def end(result: Any, error: BaseException | None) -> None:
            nonlocal ended
            ended = True
            if held:
                self.held -= 1
            else:
                self.places.release()
            if done.done():  # its caller stopped waiting
                return
            if error is None:
                done.set_result(result)
            else:
                done.set_exception(error)

        def work() -> None:
            try:
                result, error = call(), None
            except Exception as exc:
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(end, result, error)

        try:
            threading.Thread(target=work, name=self.name, daemon=True).start()
        except BaseException:
            self.places.release()
            raise
        try:
            return await asyncio.wait_for(done, timeout)
        except TimeoutError:
            # (``end`` runs on this loop: nothing changes between these lines)
            if not ended and self.held < self.held_max:
                held = True
                self.held += 1
                self.places.release()
            raise

    async def _take_place(
        self, wait_s: float | None, ready: Callable[[], Awaitable[bool]] | None
    ) -> None:
        """A place, taken; or ``NotSent`` (none free within ``wait_s``, or ``ready`` did
        not say yes), no place taken."""
        try:
            await asyncio.wait_for(self.places.acquire(), wait_s)
        except TimeoutError:
            raise NotSent(f"no place free within {wait_s} s") from None
        try:
            if ready is not None and not await ready():
                raise NotSent("its caller said not to send it")
        except NotSent:
            self.places.release()
            raise
        except Exception as exc:
            self.places.release()
            raise NotSent(f"whether it may be sent is not known ({exc!r})") from exc
        except BaseException:
            self.places.release()
            raise


class ClnBackend(LightningBackend):
    """Core Lightning at ``socket`` (``<lightning-dir>/<network>/lightning-rpc``)."""

    def __init__(self, socket: Path) -> None:
        self.rpc = LightningRpc(str(socket))
        self.calls = Threads(THREADS, "lightning")
        self.payments = Threads(THREADS, "lightning-pay", HELD_PAYMENTS)
        self.version = (0, 0)

    async def connect(self) -> NodeInfo:
        """``getinfo``, and the methods its version offers."""
        info = await self.info()
        self.version = version_tuple(info.version)
        return info

    @property
    def xpay(self) -> bool:
        return self.version >= (24, 11)

    @property
    def splice_v2(self) -> bool:
        return self.version >= (26, 4)

    async def _call(
        self,
        method: str,
        params: dict[str, Any],
        timeout: float = CALL_S,
        threads: Threads | None = None,
    ) -> Any:
        """The result, or ``RpcError`` (lightningd refused, or the connection was lost),
        ``OSError`` (no socket) or ``TimeoutError``."""
        call = functools.partial(self.rpc.call, method, params)
        return await (threads or self.calls).run(call, timeout)

    async def _ask(self, method: str, params: dict[str, Any], timeout: float = CALL_S) -> Any:
        """Like ``_call``, every failure a ``LightningError``."""
        try:
            return await self._call(method, params, timeout)
        except RpcError as exc:
            raise LightningError(f"{method}: {_message(exc)}", _code(exc)) from None
        except (OSError, TimeoutError) as exc:
            raise LightningError(f"{method}: the node did not answer ({exc!r})") from None

    async def info(self) -> NodeInfo:
        doc = await self._ask("getinfo", {})
        return NodeInfo(doc["id"], doc["version"], doc["network"], int(doc["blockheight"]))

    # -- invoices ---------------------------------------------------------------------

    async def create_invoice(
        self,
        amount_msat: int,
        label: str,
        description: str,
        expiry_s: int,
        preimage: bytes | None = None,
    ) -> Invoice:
        params: dict[str, Any] = {
            "amount_msat": amount_msat,
            "label": label,
            "description": description,
            "expiry": expiry_s,
            "preimage": preimage.hex() if preimage is not None else None,
        }
        try:
            await self._call("invoice", params)
        except RpcError as exc:
            if _code(exc) != 900:  # 900: the label exists (created before a lost reply)
                raise LightningError(f"invoice: {_message(exc)}", _code(exc)) from None
        except (OSError, TimeoutError) as exc:
            raise LightningError(f"invoice: the node did not answer ({exc!r})") from None
        found = await self.invoice(label)
        if found is None:
            raise LightningError(f"invoice {label!r} was created but is not listed")
        if found.amount_msat != amount_msat or (
            preimage is not None and found.payment_hash != hashlib.sha256(preimage).digest()
        ):
            raise LightningError(f"label {label!r} holds another invoice", 900)
        return found

    async def invoice(self, label: str) -> Invoice | None:
        doc = await self._ask("listinvoices", {"label": label})
        found = [_invoice(i) for i in doc["invoices"]]
        return found[0] if found else None

    async def cancel_invoice(self, label: str) -> bool:
        try:
            await self._call("delinvoice", {"label": label, "status": "unpaid"})
            return True
        except RpcError as exc:
            if _code(exc) == 906:  # not unpaid any more: paid, or expired
                current = (exc.error.get("data") or {}).get("current_status")
                if current not in ("paid", "expired"):
                    raise LightningError(f"delinvoice: status {current!r}", 906) from None
                return bool(current != "paid")
            if _code(exc) == 905:  # gone: deleted before (a retry after a lost reply)
                return True
            raise LightningError(f"delinvoice: {_message(exc)}", _code(exc)) from None
        except (OSError, TimeoutError) as exc:
            raise LightningError(f"delinvoice: the node did not answer ({exc!r})") from None

    async def paid_invoices(self, after_pay_index: int) -> AsyncIterator[Invoice]:
        backoff = 0.5
        while True:
            try:
                doc = await self._call(
                    "waitanyinvoice",
                    {"lastpay_index": after_pay_index, "timeout": WAIT_S},
                    WAIT_S + CALL_S,
                )
            except RpcError as exc:
                if _code(exc) == 904:  # nothing paid within the timeout: wait again
                    continue
                log.warning("waiting for invoices failed", extra={"error": _message(exc)})
            except (OSError, TimeoutError) as exc:
                log.warning("waiting for invoices failed", extra={"error": repr(exc)})
            else:
                backoff = 0.5
                inv = _invoice(doc)
                if inv.pay_index is not None:
                    after_pay_index = inv.pay_index
                yield inv
                continue
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    # -- payments ---------------------------------------------------------------------

    async def decode(self, bolt11: str) -> Decoded:
        """lightningd's ``decode`` (its C parser: the Python ``bolt11`` package takes
        milliseconds an invoice)."""
        try:
            doc = await self._call("decode", {"string": bolt11})
        except RpcError as exc:
            if _code(exc) is None:  # the connection was lost
                raise LightningError(f"decode: {_message(exc)}") from None
            raise LightningError(f"not a BOLT11 invoice: {_message(exc)}", -32602) from None
        except (OSError, TimeoutError) as exc:
            raise LightningError(f"decode: the node did not answer ({exc!r})") from None
        if (
            doc.get("type") != "bolt11 invoice"
            or not doc.get("valid")
            or "payment_hash" not in doc
            or "created_at" not in doc
        ):
            raise LightningError("not a valid BOLT11 invoice", -32602)
        amount = msat(doc["amount_msat"]) if "amount_msat" in doc else None
        expires_at = int(doc["created_at"]) + int(doc.get("expiry", DEFAULT_EXPIRY_S))
        return Decoded(bytes.fromhex(doc["payment_hash"]), amount, str(doc["payee"]), expires_at)

    async def pay(
        self,
        bolt11: str,
        fee_limit_msat: int,
        payment_hash: bytes | None = None,
        may_send: Callable[[], Awaitable[bool]] | None = None,
    ) -> PaymentState:
        if payment_hash is None:
            try:
                payment_hash = (await self.decode(bolt11)).payment_hash
            except LightningError as exc:  # not asked to pay: nothing was sent
                return PaymentState(Outcome.FAILED, b"", reason=str(exc))
        method, invoice = ("xpay", "invstring") if self.xpay else ("pay", "bolt11")
        params = {invoice: bolt11, "maxfee": fee_limit_msat, "retry_for": RETRY_FOR_S}
        wait_s = PLACE_S if may_send is not None else None
        call = functools.partial(self.rpc.call, method, params)
        try:
            doc = await self.payments.run(call, PAY_S, wait_s, may_send)
            preimage = preimage_of(doc.get("payment_preimage"), payment_hash)
            amount, sent = msat(doc["amount_msat"]), msat(doc["amount_sent_msat"])
        except NotSent as exc:
            log.warning(
                "payment not sent", extra={"payment_hash": payment_hash.hex(), "error": str(exc)}
            )
            # this command never went: what the node says is that of earlier ones, ended
            return replace(await self._lookup(payment_hash, asked=False, over=-1), sent=False)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            # the node's socket is not there, or nobody listens on it: the command never
            # got in (what could say more of earlier ones is that node)
            log.warning(
                "payment not sent: the node is not reachable",
                extra={"payment_hash": payment_hash.hex(), "error": repr(exc)},
            )
            why = f"not sent, the node not reachable ({exc!r})"
            return PaymentState(Outcome.UNKNOWN, payment_hash, reason=why, sent=False)
        except RpcError as exc:
            code = _code(exc)
            if code not in (ALREADY_PAID, IN_PROGRESS, None):
                log.info(
                    "payment error: looking it up",
                    extra={"payment_hash": payment_hash.hex(), "error": _message(exc)},
                )
            # lightningd ended the command: what listpays says is final, and where the
            # error proves no HTLC was offered, no attempt is a failure
            state = await self._lookup(payment_hash, asked=not nothing_sent(code), over=code)
            if code in (ALREADY_PAID, IN_PROGRESS):
                # refused: the node paid this hash before, or is paying it, and this
                # command sent nothing (the payment listpays shows is that other one,
                # whoever asked for it)
                return replace(state, sent=False)
            return state
        except Exception as exc:
            log.info(
                "payment not answered: looking it up",
                extra={"payment_hash": payment_hash.hex(), "error": repr(exc)},
            )
            # the command may still be running (a pay between its retries shows every
            # attempt failed): failed is not final here
            return await self._lookup(payment_hash, asked=True, over=None)
        if preimage is None:  # a success without proof settles nothing
            return await self.payment(payment_hash)
        return PaymentState(Outcome.SETTLED, payment_hash, preimage, amount, sent - amount, sent)

    async def payment(self, payment_hash: bytes, attempted: bool = True) -> PaymentState:
        return await self._lookup(payment_hash, asked=attempted, over=-1)

    async def _lookup(self, payment_hash: bytes, asked: bool, over: int | None) -> PaymentState:
        """``listpays``' verdict. ``over``: the code the payment's command ended with
        (-1: not this call's), or None where it may still run: then failed is unknown."""
        try:
            doc = await self._call("listpays", {"payment_hash": payment_hash.hex()})
            state = outgoing(doc["pays"], payment_hash, asked)
        except Exception as exc:
            reason = _message(exc) if isinstance(exc, RpcError) else repr(exc)
            return PaymentState(Outcome.UNKNOWN, payment_hash, reason=f"listpays: {reason}")
        if over is None and state.outcome is Outcome.FAILED:
            return PaymentState(Outcome.UNKNOWN, payment_hash, reason="its command may still run")
        return state

    # -- the node's money -------------------------------------------------------------

    async def channels(self) -> list[Channel]:
        doc = await self._ask("listpeerchannels", {})
        return [
            Channel(
                channel_id=c.get("channel_id", ""),
                peer_id=c["peer_id"],
                state=c["state"],
                connected=bool(c.get("peer_connected")),
                capacity_msat=msat(c.get("total_msat", 0)),
                local_msat=msat(c.get("to_us_msat", 0)),
                spendable_msat=msat(c.get("spendable_msat", 0)),
                receivable_msat=msat(c.get("receivable_msat", 0)),
                splicing=bool(c.get("inflight")),
                splice_msat=1000
                * max(
                    (int(i.get("splice_amount", 0)) for i in c.get("inflight", [])),
                    key=abs,
                    default=0,
                ),
            )
            for c in doc["channels"]
        ]

    async def balances(self) -> Balances:
        channels = await self.channels()
        funds = await self._ask("listfunds", {})
        open_ = [c for c in channels if c.state in CAN_ADD_HTLC]
        outputs = [o for o in funds["outputs"] if o["status"] != "spent"]
        return Balances(
            lightning_local_msat=sum(c.local_msat for c in open_),
            spendable_msat=sum(c.spendable_msat for c in open_ if c.connected),
            receivable_msat=sum(c.receivable_msat for c in open_ if c.connected),
            onchain_confirmed_msat=sum(
                msat(o["amount_msat"]) for o in outputs if o["status"] == "confirmed"
            ),
            onchain_unconfirmed_msat=sum(
                msat(o["amount_msat"]) for o in outputs if o["status"] == "unconfirmed"
            ),
        )

    async def income(self) -> Income:
        """From the bookkeeper plugin (``bkpr-listincome``, built into lightningd)."""
        doc = await self._ask("bkpr-listincome", {"consolidate_fees": False})
        fees = routed = 0
        for e in doc["income_events"]:
            if e["tag"] == "onchain_fee":
                fees += msat(e["debit_msat"]) - msat(e["credit_msat"])
            elif e["tag"] == "routed":
                routed += msat(e["credit_msat"]) - msat(e["debit_msat"])
        return Income(fees, routed)

    async def open_channel(self, peer_id: str, sat: int, push_msat: int = 0) -> str:
        await self._ask("connect", {"id": peer_id})
        params = {"id": peer_id, "amount": sat, "push_msat": push_msat or None}
        doc = await self._ask("fundchannel", params)
        return str(doc["channel_id"])

    async def splice_in(self, channel_id: str, sat: int) -> str:
        return await self._splice(channel_id, sat)

    async def splice_out(self, channel_id: str, sat: int) -> str:
        return await self._splice(channel_id, -sat)

    async def _splice(self, channel_id: str, relative_sat: int) -> str:
        if self.splice_v2:
            if relative_sat > 0:
                doc = await self._ask("splicein", {"channel": channel_id, "amount": relative_sat})
            else:
                params = {"channel": channel_id, "amount": -relative_sat}
                doc = await self._ask("spliceout", params)
            return str(doc["txid"])
        # before v26.04: a PSBT with the wallet's inputs (in) or an output to the wallet
        # (out); initiate; update until both commitments are secured; sign
        if relative_sat > 0:
            funds = {"satoshi": relative_sat, "feerate": "normal", "startweight": 0}
            initial = (await self._ask("fundpsbt", funds))["psbt"]
        else:
            initial = (await self._ask("addpsbtoutput", {"satoshi": -relative_sat}))["psbt"]
        init = {"channel_id": channel_id, "relative_amount": relative_sat, "initialpsbt": initial}
        psbt = (await self._ask("splice_init", init))["psbt"]
        for _ in range(SPLICE_ROUNDS):
            doc = await self._ask("splice_update", {"channel_id": channel_id, "psbt": psbt})
            psbt = doc["psbt"]
            if doc.get("commitments_secured"):
                break
        else:
            raise LightningError(f"splice of {channel_id}: commitments not secured")
        signed = (await self._ask("signpsbt", {"psbt": psbt}))["signed_psbt"]
        doc = await self._ask("splice_signed", {"channel_id": channel_id, "psbt": signed})
        return str(doc["txid"])

    async def new_address(self) -> str:
        doc = await self._ask("newaddr", {"addresstype": "p2tr"})
        return str(doc["p2tr"])

    async def withdraw(self, address: str, sat: int) -> str:
        doc = await self._ask("withdraw", {"destination": address, "satoshi": sat})
        return str(doc["txid"])


async def rebalance(
    backend: LightningBackend,
    floor_msat: int,
    expected: Mapping[str, int],
    limits: Limits = DEFAULT,
) -> list[tuple[Splice, str | None]]:
    """Splice the channels that cannot carry what their peer (by node id) is expected to
    be sent, at least ``floor_msat`` (``headroom`` times), from the wallet, or from a
    channel with far more than it needs (``constellation.liquidity``); each splice with
    its error, or None."""
    channels = await backend.channels()
    balances = await backend.balances()
    # the busiest channel to each peer carries its payments (the others stay as they are)
    best: dict[str, Channel] = {}
    for c in channels:
        if c.usable and (
            c.peer_id not in best or c.spendable_msat > best[c.peer_id].spendable_msat
        ):
            best[c.peer_id] = c
    views = [
        ChannelView(c.channel_id, c.peer_id, c.spendable_msat, c.usable, c.splicing)
        for c in best.values()
    ]
    wanted = {peer: max(floor_msat, expected.get(peer, 0)) for peer in best}
    # what splices out in flight bring the wallet: no other splice out for it
    coming = sum(-c.splice_msat for c in channels if c.splice_msat < 0) // 1000
    done: list[tuple[Splice, str | None]] = []
    onchain = balances.onchain_confirmed_msat // 1000
    for splice in plan(views, wanted, onchain, limits, coming):
        try:
            if splice.relative_sat > 0:
                await backend.splice_in(splice.channel_id, splice.relative_sat)
            else:
                await backend.splice_out(splice.channel_id, -splice.relative_sat)
        except LightningError as exc:
            done.append((splice, str(exc)))
        else:
            done.append((splice, None))
    return done
