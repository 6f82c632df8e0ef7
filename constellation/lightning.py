"""What a Lightning payment became, decided from what the node says about it.

An outgoing payment is settled, failed, pending or unknown, and unknown is never
failed: money was lost in nutshell (#988, #1170), LNbits (#1640) and at users of Core
Lightning (#2521) by refunding a payment that then went through. So:

- the outcome is decided from ``listpays`` for the payment hash, over every attempt
  (group) at once: any ``complete`` whose preimage hashes to the payment hash is
  SETTLED; else any ``pending`` is PENDING; else, where there are attempts and all
  ``failed``, FAILED. No attempt at all is FAILED only where we never asked the node
  to pay (else it is UNKNOWN: the call may still be on its way);
- an error from ``pay``/``xpay`` proves nothing was sent only for the codes where
  lightningd offers no HTLC (bad parameters, no route, too expensive, expired, gave up
  before sending); for every other error, a lost connection or a timeout, the outcome
  is what ``listpays`` says;
- a "complete" whose preimage does not hash to the payment hash settles nothing
  (nutshell #614 took an all-zero preimage as paid): it is UNKNOWN, for an operator;
- what a settled payment cost is what left the node (``amount_sent_msat``), never an
  unknown fee taken as 0: Core Lightning v24.11's ``xpay`` leaves ``amount_msat`` out of
  ``listpays`` (ElementsProject/lightning#7881, fixed in v24.11.1), so the fee is not known
  there though what was sent is; where that is not said either, the payment is counted
  as having spent its whole fee limit (``spent_at_most``);
- a failure is final only once no pay command can still be trying routes
  (``failure_final``): every attempt failed so far says nothing of a command that was sent
  late or is between two routes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Outcome(Enum):
    SETTLED = "settled"
    FAILED = "failed"
    PENDING = "pending"
    UNKNOWN = "unknown"


# lightningd errors after which no HTLC was offered for the call (common/jsonrpc_errors.h)
NOTHING_SENT = frozenset(
    {
        -32602,  # invalid parameters: a bad invoice, the wrong network, a wrong amount
        205,  # no route
        206,  # the route is too expensive for the fee limit
        207,  # the invoice expired
        210,  # gave up retrying with nothing in flight
    }
)
ALREADY_PAID = 219
IN_PROGRESS = 200  # a payment of the hash is in flight: the command refused, sending nothing


@dataclass(frozen=True)
class PaymentState:
    outcome: Outcome
    payment_hash: bytes
    preimage: bytes | None = None
    amount_msat: int | None = None  # what the payee got
    fee_msat: int | None = None  # what the routes took
    sent_msat: int | None = None  # what left the node: the amount and the fee
    reason: str = ""
    last_attempt_at: int | None = None  # the newest attempt's start (the node's unix seconds)
    # False: the pay call that answered this sent nothing (it never reached the node);
    # what the state says is that of the hash's earlier payments
    sent: bool = True


def msat(value: Any) -> int:
    """An amount from lightningd: an integer, or a ``"123msat"`` string (before v23.05)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"(\d+)msat", value)
        if m is not None:
            return int(m.group(1))
    raise ValueError(f"not an amount in msat: {value!r}")


def preimage_of(value: Any, payment_hash: bytes) -> bytes | None:
    """The preimage, where it is one of ``payment_hash``."""
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        return None
    preimage = bytes.fromhex(value)
    return preimage if hashlib.sha256(preimage).digest() == payment_hash else None


def outgoing(pays: Iterable[Mapping[str, Any]], payment_hash: bytes, asked: bool) -> PaymentState:
    """The outcome of paying ``payment_hash``, from ``listpays``'s entries (others are
    ignored); ``asked``: whether we ever asked the node to pay it."""
    rows = [r for r in pays if r.get("payment_hash") == payment_hash.hex()]
    wrong = ""
    for row in rows:
        if row.get("status") == "complete":
            preimage = preimage_of(row.get("preimage"), payment_hash)
            if preimage is None:
                wrong = "a complete payment whose preimage is not the payment hash's"
                continue
            sent = msat(row["amount_sent_msat"]) if "amount_sent_msat" in row else None
            amount = msat(row["amount_msat"]) if "amount_msat" in row else None
            fee = sent - amount if sent is not None and amount is not None else None
            return PaymentState(Outcome.SETTLED, payment_hash, preimage, amount, fee, sent)
    if wrong:
        return PaymentState(Outcome.UNKNOWN, payment_hash, reason=wrong)
    if any(r.get("status") == "pending" for r in rows):
        return PaymentState(Outcome.PENDING, payment_hash, reason="in flight")
    if rows and all(r.get("status") == "failed" for r in rows):
        return PaymentState(
            Outcome.FAILED,
            payment_hash,
            reason=f"{len(rows)} attempts failed",
            last_attempt_at=max(_started(r) for r in rows),
        )
    if rows:
        return PaymentState(Outcome.UNKNOWN, payment_hash, reason="an unknown payment status")
    if asked:
        return PaymentState(Outcome.UNKNOWN, payment_hash, reason="no attempt seen yet")
    return PaymentState(Outcome.FAILED, payment_hash, reason="never sent")


def _started(row: Mapping[str, Any]) -> int:
    """When an attempt began; one that does not say is taken as begun now (never old)."""
    at = row.get("created_at")
    return at if isinstance(at, int) and not isinstance(at, bool) else 2**62


def spent_at_most(state: PaymentState, amount_msat: int, fee_limit_msat: int) -> int:
    """What a settled payment of ``amount_msat`` took from the node: what the node says it
    sent, else the amount and the fee where both are said, else the most it could have
    sent, the amount and the whole fee limit (an unknown fee is never 0: that would hand
    the payer back the fee its payment cost)."""
    if state.sent_msat is not None:
        return state.sent_msat
    if state.amount_msat is not None and state.fee_msat is not None:
        return state.amount_msat + state.fee_msat
    return amount_msat + fee_limit_msat


def failure_final(state: PaymentState, now: float, sent_by: float, attempting_s: float) -> bool:
    """Whether a FAILED ``state`` is the payment's end, at ``now``: no pay command of ours
    is sent after ``sent_by`` (the caller's fence), and one runs ``attempting_s`` at most
    (lightningd's ``retry_for``, with a margin); nor did the newest attempt the node lists
    begin within ``attempting_s`` (a command we know nothing of may still try routes).
    ``now`` and ``sent_by`` on one clock; the attempt's start is the node's (the margin
    covers what the two differ)."""
    if state.outcome is not Outcome.FAILED or now < sent_by + attempting_s:
        return False
    return state.last_attempt_at is None or now >= state.last_attempt_at + attempting_s


def nothing_sent(code: int | None) -> bool:
    """Whether a ``pay``/``xpay`` error with ``code`` proves no HTLC was offered."""
    return code in NOTHING_SENT
