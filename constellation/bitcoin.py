"""Bitcoin transactions as the guild key signs them: BIP341 key-path sighash.

Only what a guild signer needs to derive, by itself, the message of an on-chain spend of
guild funds: the SIGHASH_DEFAULT signature message of BIP341 for a key-path input, from
the transaction and every output it spends.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import msgspec

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
