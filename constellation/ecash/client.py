"""What a wallet does with a mint's keys (NUT-00, NUT-12, NUT-13): blind secrets into
outputs, unblind the mint's signatures into proofs, and check each signature's DLEQ
proof before keeping it. The project's wallet derives its secrets from its seed (NUT-13),
so that a wallet restored from its words can ask the mint for their signatures again
(NUT-09); the tests, acting as other wallets, use fresh random ones."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from coincurve import PublicKey

from constellation.crypto import bdhke
from constellation.crypto.point import N
from constellation.ecash.keyset import split
from constellation.keys import ExtendedKey, SigningKey, schnorr_sign
from constellation.protocol import cashu as nut

NUT13_KDF = b"Cashu_KDF_HMAC_SHA256"
NUT13_PURPOSE = 129372  # BIP32 paths of version 1 keysets: UTF-8 for the peanut emoji
DERIVED_VERSIONS = ("00", "01")  # keyset id versions NUT-13 derives secrets for here


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

    @staticmethod
    def derived(seed: bytes, keyset_id: str, counter: int) -> Secret:
        """NUT-13: secret number ``counter`` of keyset ``keyset_id`` from a wallet's BIP39
        seed. Version 2 keyset ids (``01``) take HMAC-SHA256 of the id and the counter;
        version 1 ids (``00``, older mints) the BIP32 path
        m/129372'/0'/(id mod 2^31-1)'/counter'/{0: secret, 1: r}."""
        if not 0 <= counter < 2**64:
            raise ValueError(f"a NUT-13 counter is a u64, not {counter}")
        if keyset_id[:2] == "01":
            base = NUT13_KDF + bytes.fromhex(keyset_id) + counter.to_bytes(8, "big")
            secret = hmac.new(seed, base + b"\x00", hashlib.sha256).digest()
            r = int.from_bytes(hmac.new(seed, base + b"\x01", hashlib.sha256).digest()) % N
        elif keyset_id[:2] == "00":
            kid = int(keyset_id, 16) % (2**31 - 1)
            node = ExtendedKey.from_seed(seed).derive(f"m/{NUT13_PURPOSE}'/0'/{kid}'/{counter}'")
            secret_key, r_key = node.child(0).secret, node.child(1).secret
            assert secret_key is not None and r_key is not None, "a private node's children"
            secret, r = secret_key, int.from_bytes(r_key)
        else:
            raise ValueError(f"NUT-13 derives no secrets for keyset {keyset_id[:16]}'s version")
        assert r != 0, "a zero blinding factor (probability 2^-256)"
        return Secret(secret.hex(), r)

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
    return _outputs(amounts, keyset_id, [Secret.fresh() for _ in amounts])


def derived_outputs(
    amounts: Sequence[int], keyset_id: str, seed: bytes, counter: int
) -> tuple[list[nut.BlindedMessage], list[Secret]]:
    """Outputs of these amounts made of NUT-13 secrets ``counter``, ``counter + 1``, ...
    of ``keyset_id`` (``Secret.derived``), and those secrets."""
    secrets = [Secret.derived(seed, keyset_id, counter + i) for i in range(len(amounts))]
    return _outputs(amounts, keyset_id, secrets)


def _outputs(
    amounts: Sequence[int], keyset_id: str, secrets: list[Secret]
) -> tuple[list[nut.BlindedMessage], list[Secret]]:
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
