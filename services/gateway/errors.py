"""The API's error model, in one place: each code's HTTP status, the error body, and the
prose that the OpenAPI document says for each status.

Every error is JSON ``{"error": {"code", "message"}}``. Codes of the core are keyed by
their classes' ``code`` (a renamed class code is a failing test, never a silent 400);
the few codes with no class are the API edge's own. A code not listed takes the status
of its family (the part before the first dot), then 400.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from constellation import errors as e

# What each status means to a client; the OpenAPI document's descriptions come from here.
STATUS_TEXT = {
    400: "malformed or invalid",
    401: "the operator console's token is missing or wrong",
    403: "not allowed: not an issuer of this ledger, or not a member",
    404: "not found",
    409: "a coin is spent or locked by another transaction, or the request is running",
    413: "too large",
    422: "an unknown coin, a stated value that does not match, or a reused idempotency key",
    429: "overloaded or rate limited; see Retry-After",
    500: "a bug in the gateway (logged with its traceback); the outcome is unknown",
    503: "unavailable or aborted; retry",
    504: (
        "no answer in time: the outcome is unknown; send the same request again (a"
        " transaction commits once: the answer is its receipt, ledger.already_committed,"
        " or ledger.spent where its input's spent_by names it)"
    ),
}

# Codes that only the API edge uses (no class of the core raises them).
NOT_FOUND = "not_found"
NOT_INDEXED = "not_found.not_indexed_yet"  # the index is behind the ledger: look again
IN_DOUBT = "not_found.in_doubt"  # its submission timed out: it may still commit
TOO_LARGE = "too_large"
RATE_LIMITED = "rate_limited"
TIMEOUT = "timeout"
INTERNAL = "internal"
IN_PROGRESS = "idempotency.in_progress"
UNAUTHORIZED = "unauthorized"

STATUS: dict[str, int] = {
    # -- the request itself is wrong
    e.ConstellationError.code: 400,
    e.DecodeError.code: 400,
    e.Truncated.code: 400,
    e.TrailingBytes.code: 400,
    e.UnsupportedVersion.code: 400,
    e.CountOutOfRange.code: 400,
    e.ValueOutOfRange.code: 400,
    e.NonCanonical.code: 400,
    e.InvalidKey.code: 400,
    e.InvalidAddress.code: 400,
    e.InvalidTransaction.code: 400,
    e.DuplicateInput.code: 400,
    e.Unbalanced.code: 400,
    e.BadSignature.code: 400,
    e.Unsigned.code: 400,
    e.UnknownLedger.code: 400,
    e.TooLargeToSettle.code: 400,
    # -- the ledger's state refuses it
    e.LedgerError.code: 409,
    e.CoinSpent.code: 409,
    e.InputLocked.code: 409,
    e.AlreadyCommitted.code: 409,
    e.InFlight.code: 409,
    e.UnknownTransaction.code: 409,
    e.UnknownCoin.code: 422,
    e.ValueMismatch.code: 422,
    e.BadIssuance.code: 403,
    # -- retry later
    e.NotHeldHere.code: 503,  # the partition map moved under the request
    e.CommitTimeout.code: 503,
    e.Unavailable.code: 503,
    e.Overloaded.code: 429,
    # -- the API edge
    e.KeyReused.code: 422,
    IN_PROGRESS: 409,
    UNAUTHORIZED: 401,
    NOT_FOUND: 404,
    NOT_INDEXED: 404,
    IN_DOUBT: 404,
    TOO_LARGE: 413,
    RATE_LIMITED: 429,
    TIMEOUT: 504,
    INTERNAL: 500,
    # -- codes of other services, mapped so that none falls through if it ever travels here
    e.InsufficientFunds.code: 422,
    e.SigningError.code: 400,
    e.InvalidContribution.code: 400,
    e.UnknownNonce.code: 400,
    e.NonceReuse.code: 409,
    e.RequestRefused.code: 403,
    e.Equivocation.code: 409,
    e.CheckpointBound.code: 409,
    e.DKGError.code: 400,
    e.HostSeckeyError.code: 400,
    e.RandomnessError.code: 400,
    e.ThresholdOrCountError.code: 400,
    e.InvalidHostPubkeyError.code: 400,
    e.DuplicateHostPubkeyError.code: 400,
    e.DKGProtocolError.code: 400,
    e.FaultyParticipantOrCoordinatorError.code: 400,
    e.FaultyParticipantError.code: 400,
    e.FaultyCoordinatorError.code: 400,
    e.MessageError.code: 400,
    e.NotAMember.code: 403,
    e.BadMessageSignature.code: 400,
    e.Misdirected.code: 400,
    e.StaleMessage.code: 400,
    e.Replayed.code: 409,
    e.InvalidBlock.code: 400,
    e.InvalidSnapshot.code: 400,
    # (a light client's: a proof it was served does not verify)
    e.ProofRefused.code: 400,
    e.WrongGuild.code: 400,
    e.WrongMembers.code: 400,
    e.BadCheckpointSignature.code: 400,
    e.BadHandover.code: 400,
    e.StaleCheckpoint.code: 400,
    e.BadEntryPath.code: 400,
    e.BadRecordPath.code: 400,
    e.BadCoinPath.code: 400,
    e.WrongSubject.code: 400,
    e.Unconfirmed.code: 400,
}
assert set(STATUS.values()) <= STATUS_TEXT.keys(), "a status without its prose"

# The families whose codes this API answers with (the others are other services').
API_FAMILIES = frozenset(
    {"malformed", "invalid", "ledger", "idempotency", "overloaded", "unavailable"}
    | {NOT_FOUND, TOO_LARGE, RATE_LIMITED, TIMEOUT, INTERNAL}
)


# Refusals under 500 that the same request sent again may change: the transaction is
# being committed already, an input is locked by one that may still abort, the first
# request with this idempotency key still runs, or a lookup found nothing yet where
# the index is behind or the transaction may still commit.
PASSING = frozenset({e.InFlight.code, e.InputLocked.code, IN_PROGRESS, NOT_INDEXED, IN_DOUBT})


def is_final(status: int, code: str) -> bool:
    """Whether an answer is for good: sending the request again changes nothing (not a
    timeout, an overload, an outage, a bug, or a transaction still being committed)."""
    return status < 500 and status != 429 and code not in PASSING


def status_of(code: str) -> int:
    """The HTTP status of ``code``: its own, else its family's, else 400."""
    status = STATUS.get(code)
    if status is None:
        status = STATUS.get(code.split(".", 1)[0], 400)
    return status


def describe(status: int) -> str:
    """The OpenAPI description of ``status``: what it means, and the codes it carries
    (``family.*`` where every code of a family has this status)."""
    codes = {c for c, s in STATUS.items() if s == status and _family(c) in API_FAMILIES}
    members = {f: [s for c, s in STATUS.items() if _family(c) == f] for f in map(_family, codes)}
    whole = {f for f, ss in members.items() if f in codes and len(ss) > 1 and set(ss) == {status}}
    shown = sorted({f"{f}.*" for f in whole} | {c for c in codes if _family(c) not in whole})
    text = STATUS_TEXT[status]
    return f"{text} (codes: {', '.join(shown)})" if shown else text


def _family(code: str) -> str:
    return code.split(".", 1)[0]


class ApiError(Exception):
    """A refusal at the API edge: a stable ``code``, a message, and maybe a Retry-After."""

    def __init__(self, code: str, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.code = code
        # A 429 always says when to come back (1 s unless the refusal knows better).
        self.retry_after = retry_after or (1.0 if status_of(code) == 429 else 0.0)

    @classmethod
    def of(cls, exc: e.ConstellationError) -> ApiError:
        """The API's form of a rejection by the core."""
        return cls(exc.code, str(exc))

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
