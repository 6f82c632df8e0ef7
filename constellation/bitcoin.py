"""Bitcoin transactions as the guild key signs and sends them.

What a guild signer needs to derive, by itself, the message of an on-chain spend of
guild funds (the SIGHASH_DEFAULT signature message of BIP341 for a key-path input, from
the transaction and every output it spends), and what the mint needs to send one and
to read the chain: the BIP144 serialization (with witnesses) and its parser, txids,
and the scriptPubKey of a segwit address.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import msgspec

from constellation.address import decode_segwit
from constellation.codec import Reader
from constellation.errors import DecodeError, InvalidAddress
from constellation.hashing import tagged_hasher

_tap_sighash = tagged_hasher("TapSighash")


class SpendInput(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An input and the output it spends (BIP341 signs every spent amount and script)."""

    txid: bytes  # 32 bytes, in transaction byte order
    vout: int
    sequence: int
    amount_sat: int
    script_pubkey: bytes


class SpendOutput(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    amount_sat: int
    script_pubkey: bytes


def compact_size(n: int) -> bytes:
    if n < 0xFD:
        return bytes([n])
    if n <= 0xFFFF:
        return b"\xfd" + n.to_bytes(2, "little")
    if n <= 0xFFFFFFFF:
        return b"\xfe" + n.to_bytes(4, "little")
    return b"\xff" + n.to_bytes(8, "little")


def p2tr_script(output_xonly: bytes) -> bytes:
    """The scriptPubKey of a segwit v1 (taproot) output: OP_1 PUSH32 <key>."""
    return b"\x51\x20" + output_xonly


def address_script(address: str, hrp: str) -> bytes:
    """The scriptPubKey a segwit address (BIP173/BIP350) of network ``hrp`` pays."""
    got, version, program = decode_segwit(address)
    if got != hrp:
        raise InvalidAddress(f"a {got!r} address, not one of this chain ({hrp!r})")
    return bytes([0x50 + version if version else 0, len(program)]) + program


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def taproot_sighash(
    version: int,
    locktime: int,
    inputs: Sequence[SpendInput],
    outputs: Sequence[SpendOutput],
    index: int,
) -> bytes:
    """BIP341 ``SigMsg`` for SIGHASH_DEFAULT, key path, no annex, hashed with TapSighash."""
    msg = (
        b"\x00"  # epoch
        + b"\x00"  # hash type SIGHASH_DEFAULT
        + version.to_bytes(4, "little")
        + locktime.to_bytes(4, "little")
        + _sha(b"".join(i.txid + i.vout.to_bytes(4, "little") for i in inputs))
        + _sha(b"".join(i.amount_sat.to_bytes(8, "little") for i in inputs))
        + _sha(b"".join(compact_size(len(i.script_pubkey)) + i.script_pubkey for i in inputs))
        + _sha(b"".join(i.sequence.to_bytes(4, "little") for i in inputs))
        + _sha(
            b"".join(
                o.amount_sat.to_bytes(8, "little")
                + compact_size(len(o.script_pubkey))
                + o.script_pubkey
                for o in outputs
            )
        )
        + b"\x00"  # spend type: key path, no annex
        + index.to_bytes(4, "little")
    )
    return _tap_sighash(msg)


# -- transactions (BIP144 serialization) ---------------------------------------------------

MAX_TX_BYTES = 400_000
MAX_ITEMS = 10_000  # inputs, outputs or witness items of one transaction


class TxIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    txid: bytes  # 32 bytes, in transaction byte order (the reverse of how txids are shown)
    vout: int
    sequence: int
    witness: list[bytes] = []


class BitcoinTx(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    locktime: int
    inputs: list[TxIn]
    outputs: list[SpendOutput]

    def serialize(self, witness: bool = True) -> bytes:
        """The transaction's bytes: BIP144 (marker, flag, witnesses) when any input has
        a witness and ``witness`` is asked for, the legacy form otherwise."""
        with_witness = witness and any(i.witness for i in self.inputs)
        out = [self.version.to_bytes(4, "little")]
        if with_witness:
            out.append(b"\x00\x01")
        out.append(compact_size(len(self.inputs)))
        for i in self.inputs:
            out.append(i.txid + i.vout.to_bytes(4, "little") + b"\x00")
            out.append(i.sequence.to_bytes(4, "little"))
        out.append(compact_size(len(self.outputs)))
        for o in self.outputs:
            out.append(o.amount_sat.to_bytes(8, "little"))
            out.append(compact_size(len(o.script_pubkey)) + o.script_pubkey)
        if with_witness:
            for i in self.inputs:
                out.append(compact_size(len(i.witness)))
                out.extend(compact_size(len(item)) + item for item in i.witness)
        out.append(self.locktime.to_bytes(4, "little"))
        return b"".join(out)

    @property
    def txid(self) -> str:
        """The txid as Bitcoin shows it (hex, reversed): of the bytes without witnesses."""
        return _sha(_sha(self.serialize(witness=False)))[::-1].hex()

    @property
    def vsize(self) -> int:
        """Virtual size (BIP141): weight / 4, rounded up."""
        base = len(self.serialize(witness=False))
        return (base * 3 + len(self.serialize()) + 3) // 4


class _Reader(Reader):
    """Bitcoin's fields: little-endian integers, CompactSize counts."""

    def le(self, n: int) -> int:
        return int.from_bytes(self.bytes(n), "little")

    def compact(self) -> int:
        first = self.u8()
        size = {0xFD: 2, 0xFE: 4, 0xFF: 8}.get(first)
        n = first if size is None else self.le(size)
        if size is not None and n < (0xFD, 0x10000, 0x100000000)[(2, 4, 8).index(size)]:
            raise DecodeError("a count is not in its shortest form")
        if n > MAX_ITEMS:
            raise DecodeError(f"a count of {n} is over the limit")
        return n

    def blob(self) -> bytes:
        return self.bytes(self.compact())


def parse_tx(raw: bytes) -> BitcoinTx:
    """A transaction from its bytes (legacy or BIP144); anything else raises DecodeError.
    Inputs must have empty scriptSigs: only segwit spends are read."""
    if len(raw) > MAX_TX_BYTES:
        raise DecodeError(f"a transaction of {len(raw)} bytes is over the limit")
    r = _Reader(raw, "transaction")
    version = r.le(4)
    segwit = r.peek(2) == b"\x00\x01"
    if segwit:
        r.bytes(2)
    inputs = []
    for _ in range(r.compact()):
        txid, vout = r.bytes(32), r.le(4)
        if r.blob():
            raise DecodeError("an input with a scriptSig: only segwit spends are read")
        inputs.append(TxIn(txid, vout, r.le(4)))
    if not inputs:
        raise DecodeError("a transaction without inputs")
    outputs = []
    for _ in range(r.compact()):
        amount = r.le(8)
        outputs.append(SpendOutput(amount, r.blob()))
    if segwit:
        inputs = [
            msgspec.structs.replace(i, witness=[r.blob() for _ in range(r.compact())])
            for i in inputs
        ]
        if not any(i.witness for i in inputs):
            raise DecodeError("a segwit marker without witnesses")
    tx = BitcoinTx(version, r.le(4), inputs, outputs)
    r.finish()
    return tx
