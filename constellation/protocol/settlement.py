"""Messages between two operators that settle with each other (``constellation.settlement``).

Each is sealed in an envelope signed with the sender's operator key, like replication's
(``services.replica.transport``), and carries the pair's direction: a ``Payer`` message
comes from the operator that owes, a ``Payee`` message from the one owed::

    payer  --Announce (pending outputs seq..seq+n, each with what the payee needs)--->  payee
    payer  <--Announced (every obligation up to ``upto`` is held)------------------   payee
    payer  --AskInvoice (batch first..last, amount)---------------------------------->  payee
    payer  <--Offer (the batch's invoice) / Refuse (and why)------------------------   payee
    payer  --AskCancel (the batch's invoice: delete it, or say it was paid)--------->  payee
    payer  <--Cancelled (paid or not)-----------------------------------------------   payee

Everything here is another operator's input: ``decode`` refuses malformed bytes, unknown
kinds or fields, and values out of range (``MessageError``).
"""

from __future__ import annotations

from typing import Annotated, Union

import msgspec

from constellation.amount import MAX_MSAT
from constellation.errors import MessageError
from constellation.keys import is_valid_xonly

MAX_ENTRIES = 1024  # obligations announced in one message
MAX_BOLT11 = 2048
MAX_REASON = 256

U63 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Msat = Annotated[int, msgspec.Meta(ge=1)]  # u64: checked where the ledger takes it
Id = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]


class Entry(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One output paid from the payer's ledger into the payee's: obligation ``seq``."""

    seq: U63
    coin_id: Id  # the output's id in the payer's ledger (its txid and index)
    txid: Id
    owner: Id
    value_msat: Msat


class _Msg(msgspec.Struct, frozen=True, array_like=True, tag_field="k", forbid_unknown_fields=True):
    pass


class Announce(_Msg, frozen=True, tag="n"):
    entries: Annotated[list[Entry], msgspec.Meta(min_length=1, max_length=MAX_ENTRIES)]


class Announced(_Msg, frozen=True, tag="N"):
    upto: U63


class AskInvoice(_Msg, frozen=True, tag="i"):
    batch: U63
    first: U63
    last: U63
    amount_msat: Msat


class Offer(_Msg, frozen=True, tag="I"):
    batch: U63
    bolt11: Annotated[str, msgspec.Meta(max_length=MAX_BOLT11)]


class Refuse(_Msg, frozen=True, tag="R"):
    batch: U63
    reason: Annotated[str, msgspec.Meta(max_length=MAX_REASON)]


class AskCancel(_Msg, frozen=True, tag="c"):
    batch: U63


class Cancelled(_Msg, frozen=True, tag="C"):
    batch: U63
    paid: bool


FromPayer = Union[Announce, AskInvoice, AskCancel]  # noqa: UP007
FromPayee = Union[Announced, Offer, Refuse, Cancelled]  # noqa: UP007
Message = Union[FromPayer, FromPayee]  # noqa: UP007

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Message:
    """A settlement message, or ``MessageError`` saying what is wrong with it."""
    try:
        msg = _decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise MessageError(f"malformed settlement message: {exc}") from None
    if isinstance(msg, Announce):
        seqs = [e.seq for e in msg.entries]
        if seqs != list(range(seqs[0], seqs[0] + len(seqs))) or seqs[0] < 1:
            raise MessageError("announced obligations are not consecutive from 1 up")
        if any(e.value_msat > MAX_MSAT for e in msg.entries):
            raise MessageError("an announced output's value is beyond 2^64-1 msat")
        if not all(is_valid_xonly(e.owner) for e in msg.entries):
            raise MessageError("an announced output's owner is not a BIP340 key")
    if isinstance(msg, AskInvoice):
        if not 1 <= msg.first <= msg.last:
            raise MessageError(f"a batch of obligations {msg.first}..{msg.last}")
        if msg.amount_msat > MAX_MSAT * (msg.last - msg.first + 1):
            raise MessageError("a batch's amount beyond what its obligations can sum to")
    return msg
