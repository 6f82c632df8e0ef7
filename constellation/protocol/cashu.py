"""The Cashu mint API's JSON bodies (NUT-00 to NUT-09, NUT-12, NUT-15, NUT-20), as msgspec
structs.

Requests tolerate unknown fields, and the nulls real wallets send (nutshell sends
``witness: null``, ``C_: null``, ``signature``, ``options: null``, ``prefer_async``):
a mint that refused them would not serve the wallets the NUTs are for. Everything else
is bounded: counts, lengths, amounts (``decode`` raises ``CashuError`` 10001... with a
clear detail, never a stack trace).
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

import msgspec

MAX_ITEMS = 1000  # inputs or outputs in one request (NUT-06 advertises it)
MAX_SECRET = 1024  # characters of a proof's secret
MAX_WITNESS = 4096
MAX_REQUEST = 4096  # characters of a payment request (a BOLT11 invoice)
MAX_AMOUNT = 2**63 - 1

NO_NUL = "^[^\\x00]*$"  # text that PostgreSQL stores (it takes no NUL character)

Amount = Annotated[int, msgspec.Meta(ge=0, le=MAX_AMOUNT)]
Hex33 = Annotated[str, msgspec.Meta(min_length=66, max_length=66, pattern="^[0-9a-fA-F]+$")]
Hex32 = Annotated[str, msgspec.Meta(min_length=64, max_length=64, pattern="^[0-9a-fA-F]+$")]
KeysetId = Annotated[str, msgspec.Meta(min_length=16, max_length=66, pattern="^[0-9a-f]+$")]
Unit = Annotated[str, msgspec.Meta(max_length=16, pattern=NO_NUL)]
QuoteId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=NO_NUL)]


class _In(msgspec.Struct, forbid_unknown_fields=False, omit_defaults=True):
    pass


class _Out(msgspec.Struct, omit_defaults=False):
    pass


class BlindedMessage(_In):
    amount: Amount
    id: KeysetId
    B_: Hex33


class Dleq(_Out):
    e: str
    s: str


class ProofDleq(_In):  # a wallet's business: the mint takes it and ignores it
    e: Hex32
    s: Hex32
    r: Hex32 | None = None


class Proof(_In):
    amount: Amount
    id: KeysetId
    secret: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_SECRET, pattern=NO_NUL)]
    C: Hex33
    witness: Annotated[str, msgspec.Meta(max_length=MAX_WITNESS, pattern=NO_NUL)] | None = None
    dleq: ProofDleq | None = None


class BlindSignature(_Out):
    amount: int
    id: str
    C_: str
    dleq: Dleq


Outputs = Annotated[list[BlindedMessage], msgspec.Meta(max_length=MAX_ITEMS)]
Inputs = Annotated[list[Proof], msgspec.Meta(min_length=1, max_length=MAX_ITEMS)]


class SwapRequest(_In):
    inputs: Inputs
    outputs: Annotated[list[BlindedMessage], msgspec.Meta(min_length=1, max_length=MAX_ITEMS)]


class MintQuoteRequest(_In):
    amount: Annotated[int, msgspec.Meta(ge=1, le=MAX_AMOUNT)]
    unit: Unit
    description: Annotated[str, msgspec.Meta(max_length=640, pattern=NO_NUL)] | None = None
    pubkey: Hex33 | None = None  # NUT-20: only the key's holder may mint


class MintRequest(_In):
    quote: QuoteId
    outputs: Annotated[list[BlindedMessage], msgspec.Meta(min_length=1, max_length=MAX_ITEMS)]
    signature: Annotated[str, msgspec.Meta(max_length=128)] | None = None


class MppOption(_In):
    """NUT-15: pay ``amount`` (msat) of the invoice, the rest paid by other mints."""

    amount: Annotated[int, msgspec.Meta(ge=1, le=MAX_AMOUNT)]


class AmountlessOption(_In):
    """NUT-23: the amount (msat) to pay an invoice that names none."""

    amount_msat: Annotated[int, msgspec.Meta(ge=1, le=MAX_AMOUNT)]


class MeltQuoteOptions(_In):
    mpp: MppOption | None = None
    amountless: AmountlessOption | None = None


class MeltQuoteRequest(_In):
    request: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_REQUEST, pattern=NO_NUL)]
    unit: Unit
    options: MeltQuoteOptions | None = None  # decoded so that the mint refuses what it asks


class MeltRequest(_In):
    quote: QuoteId
    inputs: Inputs
    outputs: Outputs | None = None  # NUT-08: blank outputs for the fee's change


class MintQuoteOnchainRequest(_In):
    """NUT-30: an address to pay on-chain; only the key's holder mints (NUT-20)."""

    unit: Unit
    pubkey: Hex33


class MeltQuoteOnchainRequest(_In):
    """NUT-30: pay ``amount`` to a Bitcoin address on-chain."""

    request: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_REQUEST, pattern=NO_NUL)]
    unit: Unit
    amount: Annotated[int, msgspec.Meta(ge=1, le=MAX_AMOUNT)]


class MeltOnchainRequest(_In):
    quote: QuoteId
    fee_index: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
    inputs: Inputs
    outputs: Outputs | None = None

    def melt(self) -> MeltRequest:
        return MeltRequest(self.quote, self.inputs, self.outputs)


class CheckStateRequest(_In):
    Ys: Annotated[list[Hex33], msgspec.Meta(min_length=1, max_length=MAX_ITEMS)]


class RestoreRequest(_In):
    outputs: Annotated[list[BlindedMessage], msgspec.Meta(min_length=1, max_length=MAX_ITEMS)]


class RedeemRequest(_In):
    """Ecash into an L3 coin at ``address`` (Constellation's own endpoint)."""

    inputs: Inputs
    address: Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=NO_NUL)]


class WithdrawRequest(_In):
    """Ecash for an L3 transaction paying the mint (canonical encoding, hex)."""

    tx: Annotated[str, msgspec.Meta(max_length=1 << 20, pattern="^([0-9a-fA-F]{2})+$")]
    outputs: Annotated[list[BlindedMessage], msgspec.Meta(min_length=1, max_length=MAX_ITEMS)]


# -- NUT-17: subscriptions over a websocket (JSON-RPC 2.0) ------------------------------

WS_KINDS = ("bolt11_mint_quote", "bolt11_melt_quote", "proof_state")
MAX_FILTERS = 100  # quotes or Ys in one subscription


class WsRequest(_In):
    """A JSON-RPC request; its params are read by its method (``subscribe``,
    ``unsubscribe``)."""

    jsonrpc: Annotated[str, msgspec.Meta(pattern="^2\\.0$")]
    method: Annotated[str, msgspec.Meta(max_length=32)]
    id: Annotated[int, msgspec.Meta(ge=0, le=MAX_AMOUNT)]
    params: msgspec.Raw = msgspec.Raw(b"{}")


SubId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class Subscribe(_In):
    kind: Annotated[str, msgspec.Meta(max_length=32)]
    sub_id: SubId = msgspec.field(name="subId")
    filters: Annotated[
        list[Annotated[str, msgspec.Meta(min_length=1, max_length=66)]],
        msgspec.Meta(min_length=1, max_length=MAX_FILTERS),
    ]


class Unsubscribe(_In):
    sub_id: SubId = msgspec.field(name="subId")


class DecodeError(ValueError):
    """A request body that is not what the endpoint takes (its detail says why)."""


T = TypeVar("T")


def decode(data: bytes, kind: type[T]) -> T:
    """``data`` as a ``kind``; unknown fields are skipped (wallets add their own), and one
    nested deeper than the decoder goes is refused like any malformed body."""
    try:
        return msgspec.json.decode(data, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise DecodeError(str(exc)) from None
    except RecursionError:
        raise DecodeError("JSON nested too deeply") from None


def encode(doc: Any) -> bytes:
    return msgspec.json.encode(doc)
