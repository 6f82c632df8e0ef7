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
  (nutshell #614 took an all-zero preimage as paid): it is UNKNOWN, for an operator.
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


@dataclass(frozen=True)
class PaymentState:
    outcome: Outcome
    payment_hash: bytes
    preimage: bytes | None = None
    amount_msat: int | None = None  # what the payee got
    fee_msat: int | None = None  # what the routes took
    reason: str = ""


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
            sent = msat(row.get("amount_sent_msat", 0))
            amount = msat(row["amount_msat"]) if "amount_msat" in row else None
            fee = sent - amount if amount is not None else None
            return PaymentState(Outcome.SETTLED, payment_hash, preimage, amount, fee)
    if wrong:
        return PaymentState(Outcome.UNKNOWN, payment_hash, reason=wrong)
    if any(r.get("status") == "pending" for r in rows):
        return PaymentState(Outcome.PENDING, payment_hash, reason="in flight")
    if rows and all(r.get("status") == "failed" for r in rows):
        return PaymentState(Outcome.FAILED, payment_hash, reason=f"{len(rows)} attempts failed")
    if rows:
        return PaymentState(Outcome.UNKNOWN, payment_hash, reason="an unknown payment status")
    if asked:
        return PaymentState(Outcome.UNKNOWN, payment_hash, reason="no attempt seen yet")
    return PaymentState(Outcome.FAILED, payment_hash, reason="never sent")


def nothing_sent(code: int | None) -> bool:
    """Whether a ``pay``/``xpay`` error with ``code`` proves no HTLC was offered."""
    return code in NOTHING_SENT
