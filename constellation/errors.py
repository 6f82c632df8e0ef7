"""Errors that callers can cause, each with a stable code for the API edge.

Broken invariants of our own state are ``assert``s, never these.
"""

from __future__ import annotations


class ConstellationError(ValueError):
    """Base of every rejection the core can return to a caller."""

    code = "error"


# -- decoding: malformed bytes or strings -------------------------------------------------


class DecodeError(ConstellationError):
    """The bytes are not a canonical encoding of the expected type."""

    code = "malformed"


class Truncated(DecodeError):
    code = "malformed.truncated"


class TrailingBytes(DecodeError):
    code = "malformed.trailing_bytes"


class UnsupportedVersion(DecodeError):
    code = "malformed.version"


class CountOutOfRange(DecodeError):
    code = "malformed.count"


class ValueOutOfRange(DecodeError):
    code = "malformed.value"


class NonCanonical(DecodeError):
    code = "malformed.non_canonical"


class InvalidKey(DecodeError):
    code = "malformed.key"


class InvalidAddress(DecodeError):
    code = "malformed.address"


# -- stateless transaction rules ----------------------------------------------------------


class InvalidTransaction(ConstellationError):
    code = "invalid"


class DuplicateInput(InvalidTransaction):
    code = "invalid.duplicate_input"


class Unbalanced(InvalidTransaction):
    code = "invalid.unbalanced"


class BadSignature(InvalidTransaction):
    code = "invalid.signature"


# -- stateful rules: the partition state machine ------------------------------------------


class LedgerError(ConstellationError):
    code = "ledger"


class UnknownCoin(LedgerError):
    code = "ledger.unknown_coin"


class CoinSpent(LedgerError):
    code = "ledger.spent"


class InputLocked(LedgerError):
    """Another transaction holds a lock on an input: a conflict, never a wait."""

    code = "ledger.conflict"


class ValueMismatch(LedgerError):
    code = "ledger.value_mismatch"


class AlreadyCommitted(LedgerError):
    code = "ledger.already_committed"


class UnknownTransaction(LedgerError):
    code = "ledger.unknown_transaction"


class NotHeldHere(LedgerError):
    """A request touched a partition that this state does not hold."""

    code = "ledger.wrong_partition"


class BadIssuance(LedgerError):
    code = "ledger.bad_issuance"


# -- wallets ------------------------------------------------------------------------------


class InsufficientFunds(ConstellationError):
    code = "wallet.insufficient_funds"
