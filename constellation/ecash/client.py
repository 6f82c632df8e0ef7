"""What a wallet does with a mint's keys (NUT-00, NUT-12): blind fresh secrets into
outputs, unblind the mint's signatures into proofs, and check each signature's DLEQ
proof before keeping it. The project's wallet uses it, and the tests act as one."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from coincurve import PublicKey

from constellation.crypto import bdhke
from constellation.crypto.point import N
from constellation.ecash.keyset import split
from constellation.keys import SigningKey, schnorr_sign
from constellation.protocol import cashu as nut


class BadSignature(ValueError):
    """A mint's signature whose DLEQ proof does not check: the mint cheated, or erred."""


@dataclass(frozen=True)
class Secret:
    """One output's secret (a 64-character hex string, hashed as its text) and blinding
    factor."""

    secret: str
    r: int

    @staticmethod
    def fresh() -> Secret:
        return Secret(os.urandom(32).hex(), int.from_bytes(os.urandom(32)) % (N - 1) + 1)

    @cached_property
    def blinded(self) -> PublicKey:
        """B_ = Y + r·G (made once: the output, then the signature's check)."""
        return bdhke.blind(self.secret.encode(), self.r)

    def output(self, keyset_id: str, amount: int) -> nut.BlindedMessage:
        return nut.BlindedMessage(amount, keyset_id, self.blinded.format().hex())


def outputs_of(
    amounts: Sequence[int], keyset_id: str
) -> tuple[list[nut.BlindedMessage], list[Secret]]:
    """Fresh outputs of these amounts (each a power of two), and their secrets."""
    secrets = [Secret.fresh() for _ in amounts]
    return [s.output(keyset_id, a) for s, a in zip(secrets, amounts, strict=True)], secrets


def outputs_for(amount: int, keyset_id: str) -> tuple[list[nut.BlindedMessage], list[Secret]]:
    """Fresh outputs worth ``amount`` (one per power of two in it)."""
    return outputs_of(split(amount), keyset_id)


def unblind(
    signatures: list[nut.BlindSignature],
    outputs: list[nut.BlindedMessage],
    secrets: list[Secret],
    keys: dict[str, dict[int, PublicKey]],
    change: bool = False,
) -> list[nut.Proof]:
    """Proofs from the mint's signatures on our ``outputs`` (in their order), each of
    the keyset and amount asked (a DLEQ proof checks a signature by the key the mint
    names: one by the key of a smaller amount would pass it), its DLEQ proof checked
    against the keyset's published key for that amount. ``change``: blank outputs
    (NUT-08), whose amounts are the mint's to give."""
    proofs = []
    for sig, out, s in zip(signatures, outputs, secrets, strict=True):
        if sig.id != out.id or (sig.amount != out.amount and not change):
            raise BadSignature(
                f"a signature of {sig.amount} in keyset {sig.id} for an output of"
                f" {out.amount} in keyset {out.id}"
            )
        key = keys.get(sig.id, {}).get(sig.amount)
        if key is None:
            raise BadSignature(f"keyset {sig.id} has no key for {sig.amount}")
        c_ = PublicKey(bytes.fromhex(sig.C_))
        e, z = bytes.fromhex(sig.dleq.e), bytes.fromhex(sig.dleq.s)
        if not bdhke.check(key, s.blinded, c_, e, z):
            raise BadSignature(f"the DLEQ proof of a {sig.amount} signature does not check")
        c = bdhke.unblind(c_, s.r, key)
        proofs.append(nut.Proof(sig.amount, sig.id, s.secret, c.format().hex()))
    return proofs


def sign_mint_request(key: SigningKey, quote: str, outputs: Sequence[nut.BlindedMessage]) -> str:
    """NUT-20: the quote key's BIP340 signature over SHA256(quote id || B_0 || ...)."""
    msg = quote + "".join(o.B_ for o in outputs)
    return schnorr_sign(key.secret, hashlib.sha256(msg.encode()).digest()).hex()
