"""Transactions, issuances, coin ids and partitions, with their canonical encodings.

Layout of a transaction (all integers big-endian)::

    body    = version:u8 (1 or 2)
              n_inputs:u16   { coin_id:32  value_msat:u64 }*
              n_outputs:u16  { value_msat:u64  owner:32  [ledger:8] }*   -- ledger: v2 only
              fee_msat:u64
    witness = { kind:u8 (=0, BIP340 key path)  signature:64 }*   -- one per input
    encoded = body || witness

``txid = tagged_hash("constellation/tx", body)``: witnesses are not part of the id.
Inputs state the value of the coin they spend, so balance is checked without state
and every partition checks the claim against the coin it holds. Witness kinds other
than 0 are reserved for script spends (hash- and time-locks).

Version 2 names, for each output, the ledger that will hold it: eight zero bytes for the
ledger of the inputs, else another operator's ledger id (``ledger_id``). Such an output
is not created here: the ledger of the inputs records it as owed to that ledger, where
it is pending until settled over Lightning (``constellation.settlement``). A
transaction whose outputs all stay in the ledger is version 1 (version 2 with no other
ledger is not canonical), so one meaning has one encoding.

The ledger does not know which ledgers exist: every entry point (the gateways) refuses an
output to a ledger its operator does not settle with, and an output paid to one all the
same stays untaken by settlement, in plain sight (``gateway_settle_untaken_outputs``).
"""

from __future__ import annotations

import copy
import struct
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple, Self

from constellation.amount import MAX_MSAT
from constellation.codec import Reader, u16, u64
from constellation.errors import (
    BadIssuance,
    CountOutOfRange,
    DuplicateInput,
    InvalidKey,
    NonCanonical,
    TrailingBytes,
    Truncated,
    Unbalanced,
    UnsupportedVersion,
    ValueOutOfRange,
)
from constellation.hashing import tagged_hasher
from constellation.keys import (
    SIGNATURE_LEN,
    XOnlyPubKey,
    is_valid_xonly,
    schnorr_sign,
    schnorr_verify,
)

TX_VERSION = 1
TX_VERSION_LEDGERS = 2
ISSUANCE_VERSION = 1
ISSUANCE_BATCH_VERSION = 2
WITNESS_KEY_PATH = 0
MAX_INPUTS = 256
MAX_OUTPUTS = 256
PARTITIONS = 1 << 16

_txid_hash = tagged_hasher("constellation/tx")
_coin_hash = tagged_hasher("constellation/coin")
_issue_hash = tagged_hasher("constellation/issue")
_ledger_hash = tagged_hasher("constellation/ledger")
_INPUT = struct.Struct(">32sQ")
_OUTPUT = struct.Struct(">Q32s")
_OUTPUT_LEDGER = struct.Struct(">Q32s8s")
LEDGER_ID_LEN = 8
HERE = bytes(LEDGER_ID_LEN)  # an output that stays in the ledger of the inputs
_FEE = struct.Struct(">Q")
_WITNESS_LEN = 1 + SIGNATURE_LEN


class TxInput(NamedTuple):
    coin_id: bytes
    value_msat: int


class TxOutput(NamedTuple):
    value_msat: int
    owner: XOnlyPubKey


_INDEX_BYTES = [u16(i) for i in range(MAX_OUTPUTS)]


def ledger_id(operator_key: bytes) -> bytes:
    """The id of the ledger an operator keeps, from its x-only operator key (8 bytes:
    a collision between two operators that settle with each other is what matters)."""
    return _ledger_hash(operator_key)[:LEDGER_ID_LEN]


def coin_id(txid: bytes, index: int) -> bytes:
    """The id of output ``index`` of transaction (or issuance) ``txid``."""
    return _coin_hash(txid + u16(index))


def coin_ids(txid: bytes, count: int) -> tuple[bytes, ...]:
    """``coin_id(txid, i)`` for i in ``0..count-1``, sharing the hash of the txid."""
    base = _coin_hash.midstate.copy()
    base.update(txid)
    ids = []
    for index_bytes in _INDEX_BYTES[:count]:
        h = base.copy()
        h.update(index_bytes)
        ids.append(h.digest())
    return tuple(ids)


def partition_of(coin_id: bytes) -> int:
    """The partition holding a coin: the big-endian u16 of its first two bytes."""
    return (coin_id[0] << 8) | coin_id[1]


def _check_outputs(outputs: Sequence[TxOutput], what: str, check_owners: bool = True) -> int:
    if not 1 <= len(outputs) <= MAX_OUTPUTS:
        raise CountOutOfRange(f"{what}: {len(outputs)} outputs, allowed 1..{MAX_OUTPUTS}")
    total = 0
    for i, (value, owner) in enumerate(outputs):
        if type(value) is not int or not 1 <= value <= MAX_MSAT:
            raise ValueOutOfRange(f"{what}: output {i} value {value!r} not in 1..2^64-1 msat")
        if check_owners and not is_valid_xonly(owner):
            raise InvalidKey(f"{what}: output {i} owner is not a BIP340 public key")
        total += value
    return total


def _check_values(
    inputs: tuple[TxInput, ...], outputs: tuple[TxOutput, ...], fee_msat: int, check_owners: bool
) -> None:
    """Input values, distinct inputs, outputs, and ``sum(in) == sum(out) + fee``."""
    total_in = 0
    for i, (_, value) in enumerate(inputs):
        if type(value) is not int or not 1 <= value <= MAX_MSAT:
            raise ValueOutOfRange(f"input {i} value {value!r} not in 1..2^64-1 msat")
        total_in += value
    if len({cid for cid, _ in inputs}) != len(inputs):
        raise DuplicateInput("a coin appears twice among the inputs")
    total_out = _check_outputs(outputs, "transaction", check_owners)
    if total_in != total_out + fee_msat:
        raise Unbalanced(f"inputs {total_in} msat != outputs {total_out} + fee {fee_msat} msat")


def _encode_outputs(outputs: Sequence[TxOutput]) -> bytes:
    return u16(len(outputs)) + b"".join(_OUTPUT.pack(v, k) for v, k in outputs)


def _decode_outputs(r: Reader) -> list[TxOutput]:
    n = r.count(1, MAX_OUTPUTS, "outputs")
    outs = []
    for _ in range(n):
        value = r.u64()
        outs.append(TxOutput(value, XOnlyPubKey(r.bytes(32))))
    return outs


class Transaction:
    """A transfer: spends coins, creates outputs, pays a fee. Well-formed by construction.

    Construction checks everything that needs no ledger state: counts, value ranges,
    owner keys, duplicate inputs and ``sum(in) == sum(out) + fee``. ``txid`` and the
    encoded body are computed once.
    """

    __slots__ = (
        "body",
        "fee_msat",
        "inputs",
        "ledgers",
        "output_ids",
        "outputs",
        "txid",
        "witnesses",
    )

    inputs: tuple[TxInput, ...]
    outputs: tuple[TxOutput, ...]
    fee_msat: int
    witnesses: tuple[bytes, ...]
    ledgers: tuple[bytes, ...]  # per output (version 2); empty: every output stays here
    body: bytes
    txid: bytes
    output_ids: tuple[bytes, ...]

    def __init__(
        self,
        inputs: Sequence[TxInput],
        outputs: Sequence[TxOutput],
        fee_msat: int = 0,
        witnesses: Sequence[bytes] = (),
        *,
        ledgers: Sequence[bytes] = (),
        check_owners: bool = True,
    ) -> None:
        """``ledgers``: the ledger of each output (``HERE``, or none at all, for every
        output that stays in this ledger)."""
        if not 1 <= len(inputs) <= MAX_INPUTS:
            raise CountOutOfRange(f"{len(inputs)} inputs, allowed 1..{MAX_INPUTS}")
        for i, (cid, _) in enumerate(inputs):
            if len(cid) != 32:
                raise NonCanonical(f"input {i} coin id is {len(cid)} bytes, not 32")
        if type(fee_msat) is not int or not 0 <= fee_msat <= MAX_MSAT:
            raise ValueOutOfRange(f"fee {fee_msat!r} not in 0..2^64-1 msat")
        if witnesses and len(witnesses) != len(inputs):
            raise CountOutOfRange(f"{len(witnesses)} witnesses for {len(inputs)} inputs")
        for i, sig in enumerate(witnesses):
            if len(sig) != SIGNATURE_LEN:
                raise NonCanonical(f"witness {i} is {len(sig)} bytes, not 64")
        ins = tuple(TxInput(c, v) for c, v in inputs)
        outs = tuple(TxOutput(v, k) for v, k in outputs)
        _check_values(ins, outs, fee_msat, check_owners)
        if ledgers and len(ledgers) != len(outs):
            raise CountOutOfRange(f"{len(ledgers)} ledgers for {len(outs)} outputs")
        for i, ledger in enumerate(ledgers):
            if len(ledger) != LEDGER_ID_LEN:
                raise NonCanonical(f"output {i} ledger id is {len(ledger)} bytes, not 8")
        lids = tuple(bytes(x) for x in ledgers) if any(x != HERE for x in ledgers) else ()
        if lids:
            version = TX_VERSION_LEDGERS
            encoded = u16(len(outs)) + b"".join(
                _OUTPUT_LEDGER.pack(v, k, x) for (v, k), x in zip(outs, lids, strict=True)
            )
        else:
            version, encoded = TX_VERSION, _encode_outputs(outs)
        body = (
            bytes((version,))
            + u16(len(ins))
            + b"".join(_INPUT.pack(c, v) for c, v in ins)
            + encoded
            + u64(fee_msat)
        )
        self._fill(ins, outs, fee_msat, tuple(witnesses), body, lids)

    def _fill(
        self,
        inputs: tuple[TxInput, ...],
        outputs: tuple[TxOutput, ...],
        fee_msat: int,
        witnesses: tuple[bytes, ...],
        body: bytes,
        ledgers: tuple[bytes, ...],
    ) -> None:
        self.ledgers = ledgers
        self.inputs = inputs
        self.outputs = outputs
        self.fee_msat = fee_msat
        self.witnesses = witnesses
        self.body = body
        self.txid = _txid_hash(body)
        # Computed here, in the stateless stage, so partitions only look them up.
        self.output_ids = coin_ids(self.txid, len(outputs))

    def with_witnesses(self, witnesses: Sequence[bytes]) -> Transaction:
        """The same transaction (same txid) carrying one signature per input."""
        return Transaction(
            self.inputs, self.outputs, self.fee_msat, witnesses, ledgers=self.ledgers
        )

    def remote(self) -> list[tuple[int, bytes]]:
        """``(output index, ledger id)`` of each output that goes to another ledger."""
        return [(i, x) for i, x in enumerate(self.ledgers) if x != HERE]

    def here(self, index: int) -> bool:
        """Whether output ``index`` is created in the ledger of the inputs."""
        return not self.ledgers or self.ledgers[index] == HERE

    def encode(self) -> bytes:
        """The canonical encoding: body, then one key-path witness per input."""
        if not self.witnesses:
            raise ValueError("an unsigned transaction has no transport encoding")
        return self.body + b"".join(b"\x00" + sig for sig in self.witnesses)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Transaction)
            and self.txid == other.txid
            and self.witnesses == other.witnesses
        )

    def __hash__(self) -> int:
        return hash(self.txid)

    def __repr__(self) -> str:
        return (
            f"Transaction(txid={self.txid.hex()[:16]}…, {len(self.inputs)} in, "
            f"{len(self.outputs)} out, fee={self.fee_msat} msat)"
        )


# Built by tuple's own constructor: a named tuple's ``_make`` is a Python call per record.
_new_input = partial(tuple.__new__, TxInput)
_new_output = partial(tuple.__new__, TxOutput)


def _truncated(need: int, size: int) -> Truncated:
    return Truncated(f"transaction: needs {need} bytes, got {size}")


def decode_transaction(data: bytes, check_owners: bool = True) -> Transaction:
    """Decode a canonical transaction; any deviation raises a specific ``DecodeError``.

    ``check_owners=False`` skips checking that each output's owner is a curve point (a
    square root per output): for a transaction a trusted stage already checked.

    This runs for every transaction at the gateway and at each involved worker, so it
    reads the fixed-size records with ``iter_unpack`` and hashes the body as received.
    """
    size = len(data)
    if size < 1:
        raise _truncated(1, size)
    version = data[0]
    if version not in (TX_VERSION, TX_VERSION_LEDGERS):
        raise UnsupportedVersion(f"transaction version {version}, expected 1 or 2")
    out_format = _OUTPUT if version == TX_VERSION else _OUTPUT_LEDGER
    if size < 3:
        raise _truncated(3, size)
    n_in = (data[1] << 8) | data[2]
    if not 1 <= n_in <= MAX_INPUTS:
        raise CountOutOfRange(f"transaction: {n_in} inputs, allowed 1..{MAX_INPUTS}")
    at = 3 + _INPUT.size * n_in
    if size < at + 2:
        raise _truncated(at + 2, size)
    n_out = (data[at] << 8) | data[at + 1]
    if not 1 <= n_out <= MAX_OUTPUTS:
        raise CountOutOfRange(f"transaction: {n_out} outputs, allowed 1..{MAX_OUTPUTS}")
    fee_at = at + 2 + out_format.size * n_out
    body_end = fee_at + 8
    if size < body_end:
        raise _truncated(body_end, size)
    inputs = tuple(map(_new_input, _INPUT.iter_unpack(data[3:at])))
    ledgers: tuple[bytes, ...] = ()
    if version == TX_VERSION:
        outputs = tuple(map(_new_output, _OUTPUT.iter_unpack(data[at + 2 : fee_at])))
    else:
        rows = list(_OUTPUT_LEDGER.iter_unpack(data[at + 2 : fee_at]))
        outputs = tuple(_new_output((v, k)) for v, k, _ in rows)
        ledgers = tuple(x for _, _, x in rows)
        if all(x == HERE for x in ledgers):
            raise NonCanonical("a version 2 transaction that names no other ledger")
    fee = int(_FEE.unpack_from(data, fee_at)[0])
    witnesses = []
    pos = body_end
    for i in range(n_in):
        if size < pos + _WITNESS_LEN:
            raise _truncated(pos + _WITNESS_LEN, size)
        if data[pos] != WITNESS_KEY_PATH:
            raise UnsupportedVersion(f"input {i}: witness kind {data[pos]} is not supported")
        witnesses.append(data[pos + 1 : pos + _WITNESS_LEN])
        pos += _WITNESS_LEN
    if pos != size:
        raise TrailingBytes(f"transaction: {size - pos} bytes after the end")
    _check_values(inputs, outputs, fee, check_owners)
    tx = Transaction.__new__(Transaction)
    tx._fill(inputs, outputs, fee, tuple(witnesses), data[:body_end], ledgers)
    return tx


class _Signed:
    """What every issuance shares: its issuer signs its id, and it travels as its body
    and that signature."""

    __slots__ = ("signature",)
    issuer: XOnlyPubKey
    issuance_id: bytes
    signature: bytes
    body: bytes

    def signed_by(self, secret: bytes, aux_rand: bytes | None = None) -> Self:
        """This issuance with its issuer's signature (checked already: not again)."""
        signed = copy.copy(self)
        signed.signature = schnorr_sign(secret, self.issuance_id, aux_rand)
        return signed

    def verify(self) -> None:
        """Raise ``BadIssuance`` unless the issuer signed this issuance's id."""
        if not schnorr_verify(self.issuer, self.issuance_id, self.signature):
            raise BadIssuance("issuance signature does not verify under its issuer key")

    def encode(self) -> bytes:
        if not self.signature:
            raise ValueError("an unsigned issuance has no transport encoding")
        return self.body + self.signature


class Issuance(_Signed):
    """New coins created by an operator's issuing key (genesis, local funding, tests).

    The ledger accepts an issuance only from keys it is configured to trust, once per
    id; the id covers the issuer, a nonce and the outputs::

        body = version:u8 (=1) issuer:32 nonce:u64 n_outputs:u16 { value:u64 owner:32 }*
        encoded = body || signature:64
    """

    __slots__ = ("body", "issuance_id", "issuer", "nonce", "output_ids", "outputs")

    def __init__(
        self,
        issuer: bytes,
        nonce: int,
        outputs: Sequence[TxOutput],
        signature: bytes = b"",
        *,
        check_keys: bool = True,
    ) -> None:
        """``check_keys=False`` skips checking that the issuer and owners are curve points
        (a square root each): for keys checked already; the ledger checks them again."""
        if check_keys and not is_valid_xonly(issuer):
            raise InvalidKey("issuer is not a BIP340 public key")
        if type(nonce) is not int or not 0 <= nonce <= MAX_MSAT:
            raise ValueOutOfRange(f"issuance nonce {nonce!r} outside u64")
        _check_outputs(outputs, "issuance", check_keys)
        if signature and len(signature) != SIGNATURE_LEN:
            raise NonCanonical("issuance signature must be 64 bytes")
        self.issuer = XOnlyPubKey(issuer)
        self.nonce = nonce
        self.outputs = tuple(TxOutput(v, k) for v, k in outputs)
        self.signature = signature
        self.body = bytes((ISSUANCE_VERSION,)) + issuer + u64(nonce) + _encode_outputs(outputs)
        self.issuance_id = _issue_hash(self.body)
        self.output_ids = coin_ids(self.issuance_id, len(outputs))

    @property
    def total_msat(self) -> int:
        return sum(v for v, _ in self.outputs)

    def entries(self) -> list[tuple[bytes, bytes, TxOutput]]:
        """``(issued id, coin id, coin)`` of each output: the ledger applies each issued
        id once (here, one for all the outputs)."""
        iid = self.issuance_id
        return [(iid, cid, out) for cid, out in zip(self.output_ids, self.outputs, strict=True)]


class IssuanceBatch(_Signed):
    """Outputs issued under one signature, each its own entry (settlement's releases)::

        body  = version:u8 (=2) issuer:32 n:u16 { nonce:32 value:u64 owner:32 }*
        encoded = body || signature:64   -- over tagged_hash("constellation/issue", body)
        entry = version:u8 (=2) issuer:32 nonce:32 value:u64 owner:32
        issued id of an entry = tagged_hash("constellation/issue", entry); its coin is
        coin_id(issued id, 0)

    An entry's ids depend on the issuer, its 32-byte nonce and its output, not on the
    batch, so a coin's id is known before the batch that issues it exists; the ledger
    applies each entry once (a batch issued again issues only what it has not seen). An
    entry and a batch never share an id with a version 1 issuance (the version byte) or
    with each other (their lengths differ).
    """

    __slots__ = ("body", "ids", "issuance_id", "issuer", "outputs")

    def __init__(
        self,
        issuer: bytes,
        entries: Sequence[tuple[bytes, TxOutput]],
        signature: bytes = b"",
        *,
        check_keys: bool = True,
    ) -> None:
        """``entries``: (nonce, output) each. ``check_keys=False``: for keys checked
        already (the ledger checks them again)."""
        if not 1 <= len(entries) <= MAX_OUTPUTS:
            raise CountOutOfRange(f"issuance batch: {len(entries)} entries, allowed 1..256")
        if check_keys and not is_valid_xonly(issuer):
            raise InvalidKey("issuer is not a BIP340 public key")
        if any(len(nonce) != 32 for nonce, _ in entries):
            raise NonCanonical("a batch entry's nonce is 32 bytes")
        outputs = tuple(TxOutput(v, k) for _, (v, k) in entries)
        _check_outputs(outputs, "issuance batch", check_keys)
        if signature and len(signature) != SIGNATURE_LEN:
            raise NonCanonical("issuance signature must be 64 bytes")
        rows = [nonce + _OUTPUT.pack(v, k) for nonce, (v, k) in entries]
        head = bytes((ISSUANCE_BATCH_VERSION,)) + issuer
        ids = tuple(_issue_hash(head + row) for row in rows)
        if len(set(ids)) != len(ids):
            raise DuplicateInput("an entry appears twice in the issuance batch")
        self.issuer = XOnlyPubKey(issuer)
        self.outputs = outputs
        self.ids = ids
        self.signature = signature
        self.body = head + u16(len(rows)) + b"".join(rows)
        self.issuance_id = _issue_hash(self.body)

    @staticmethod
    def coin_of(issuer: bytes, nonce: bytes, output: TxOutput) -> bytes:
        """The coin an entry issues, known before any batch holds it."""
        entry = bytes((ISSUANCE_BATCH_VERSION,)) + issuer + nonce + _OUTPUT.pack(*output)
        return coin_id(_issue_hash(entry), 0)

    @property
    def output_ids(self) -> tuple[bytes, ...]:
        return tuple(coin_id(iid, 0) for iid in self.ids)

    def entries(self) -> list[tuple[bytes, bytes, TxOutput]]:
        return [
            (iid, coin_id(iid, 0), out) for iid, out in zip(self.ids, self.outputs, strict=True)
        ]


AnyIssuance = Issuance | IssuanceBatch


def decode_issuance(data: bytes) -> AnyIssuance:
    r = Reader(data, "issuance")
    version = r.u8()
    if version not in (ISSUANCE_VERSION, ISSUANCE_BATCH_VERSION):
        raise UnsupportedVersion(f"issuance version {version}, expected 1 or 2")
    issuer = r.bytes(32)
    if version == ISSUANCE_BATCH_VERSION:
        n = r.count(1, MAX_OUTPUTS, "batch entries")
        entries = []
        for _ in range(n):
            entry_nonce = r.bytes(32)
            value = r.u64()
            entries.append((entry_nonce, TxOutput(value, XOnlyPubKey(r.bytes(32)))))
        signature = r.bytes(SIGNATURE_LEN)
        r.finish()
        return IssuanceBatch(issuer, entries, signature)
    nonce = r.u64()
    outputs = _decode_outputs(r)
    signature = r.bytes(SIGNATURE_LEN)
    r.finish()
    return Issuance(issuer, nonce, outputs, signature)
