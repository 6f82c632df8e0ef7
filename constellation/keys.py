"""BIP340 keys and signatures, BIP32 HD derivation, and contact key tweaks.

Every curve operation goes through ``coincurve`` (libsecp256k1). Signing and
verification call libsecp256k1's schnorrsig functions through coincurve's bindings
directly: coincurve's ``sign_schnorr`` accepts only 32-byte messages, BIP340 allows any
length, and verification is the ledger's hot path.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from typing import Any, NewType

from coincurve import PrivateKey, PublicKey, PublicKeyXOnly
from coincurve._libsecp256k1 import ffi, lib
from coincurve.context import GLOBAL_CONTEXT

from constellation.errors import InvalidKey
from constellation.hashing import tagged_hasher

XOnlyPubKey = NewType("XOnlyPubKey", bytes)
"""A 32-byte BIP340 public key (the x coordinate of a point with even y)."""

CURVE_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
SIGNATURE_LEN = 64
XONLY_LEN = 32

_CTX = GLOBAL_CONTEXT.ctx
_EXTRAPARAMS_MAGIC = b"\xda\x6f\xb3\x8c"


@functools.lru_cache(maxsize=4096)
def _parsed(pubkey: bytes) -> Any:
    """libsecp256k1's form of an x-only key (None: not one), kept for the keys seen last:
    the operators' keys sign every message between them, and parsing costs as much as a
    sixth of a check."""
    buf = ffi.new("secp256k1_xonly_pubkey *")
    return buf if lib.secp256k1_xonly_pubkey_parse(_CTX, buf, pubkey) else None


def is_valid_xonly(data: bytes) -> bool:
    """True if ``data`` is the x coordinate of a point on secp256k1."""
    return len(data) == XONLY_LEN and _parsed(bytes(data)) is not None


def xonly(data: bytes) -> XOnlyPubKey:
    """Check that ``data`` is a valid x-only public key and return it typed."""
    if not is_valid_xonly(data):
        raise InvalidKey(f"not a BIP340 public key: {data.hex()}")
    return XOnlyPubKey(data)


def schnorr_verify(pubkey: bytes, msg: bytes, sig: bytes) -> bool:
    """Verify a BIP340 signature over a message of any length; never raises."""
    if len(sig) != SIGNATURE_LEN or len(pubkey) != XONLY_LEN:
        return False
    buf = _parsed(bytes(pubkey))
    if buf is None:
        return False
    return bool(lib.secp256k1_schnorrsig_verify(_CTX, sig, msg, len(msg), buf))


def schnorr_sign(secret: bytes, msg: bytes, aux_rand: bytes | None = None) -> bytes:
    """Create a BIP340 signature over ``msg`` (any length).

    ``aux_rand`` is 32 bytes of auxiliary randomness; fresh randomness is used when it is
    None. Pass explicit bytes only for deterministic tests and test vectors.
    """
    return _sign(_keypair(secret), msg, aux_rand)


def _keypair(secret: bytes) -> Any:
    keypair = ffi.new("secp256k1_keypair *")
    if not lib.secp256k1_keypair_create(_CTX, keypair, secret):
        raise InvalidKey("secret key is zero or not below the curve order")
    return keypair


def _sign(keypair: Any, msg: bytes, aux_rand: bytes | None) -> bytes:
    if aux_rand is None:
        aux_rand = os.urandom(32)
    if len(aux_rand) != 32:
        raise ValueError("aux_rand must be 32 bytes")
    params = ffi.new("secp256k1_schnorrsig_extraparams *")
    params.magic = _EXTRAPARAMS_MAGIC
    params.noncefp = ffi.NULL
    aux_buf = ffi.new("unsigned char[32]", aux_rand)
    params.ndata = aux_buf
    sig = ffi.new("unsigned char[64]")
    if not lib.secp256k1_schnorrsig_sign_custom(_CTX, sig, msg, len(msg), keypair, params):
        raise AssertionError("libsecp256k1 failed to sign with a valid keypair")
    return bytes(ffi.buffer(sig, SIGNATURE_LEN))


class SigningKey:
    """A secret key with its BIP340 public key."""

    __slots__ = ("_pair", "pubkey", "secret")

    def __init__(self, secret: bytes) -> None:
        if len(secret) != 32 or not 0 < int.from_bytes(secret, "big") < CURVE_ORDER:
            raise InvalidKey("secret key must be 32 bytes in 1..n-1")
        self.secret = secret
        self.pubkey = XOnlyPubKey(PublicKeyXOnly.from_secret(secret).format())
        self._pair: Any = None  # libsecp256k1's keypair, made at the first signature

    def sign(self, msg: bytes, aux_rand: bytes | None = None) -> bytes:
        if self._pair is None:
            self._pair = _keypair(self.secret)
        return _sign(self._pair, msg, aux_rand)

    def __repr__(self) -> str:
        return f"SigningKey(pubkey={self.pubkey.hex()})"


def _even_secret(secret: bytes) -> bytes:
    """The secret whose public point is the even-y lift of ``secret``'s x-only key."""
    if PrivateKey(secret).public_key.format()[0] == 0x03:
        return (CURVE_ORDER - int.from_bytes(secret, "big")).to_bytes(32, "big")
    return secret


# -- BIP32 hierarchical deterministic keys -----------------------------------------------

HARDENED = 0x80000000


@dataclass(frozen=True)
class ExtendedKey:
    """A BIP32 extended key; ``secret`` is None for a public-only (neutered) key."""

    public: bytes  # 33-byte compressed point
    chain_code: bytes
    secret: bytes | None = None
    depth: int = 0

    @classmethod
    def from_seed(cls, seed: bytes) -> ExtendedKey:
        """The BIP32 master key of ``seed`` (16 to 64 bytes)."""
        if not 16 <= len(seed) <= 64:
            raise InvalidKey("a BIP32 seed is 16 to 64 bytes")
        digest = hmac.new(b"Bitcoin seed", seed, hashlib.sha512).digest()
        secret, chain_code = digest[:32], digest[32:]
        if not 0 < int.from_bytes(secret, "big") < CURVE_ORDER:
            raise InvalidKey("this seed gives an invalid master key; use another seed")
        return cls(PrivateKey(secret).public_key.format(), chain_code, secret)

    def child(self, index: int) -> ExtendedKey:
        """Derive child ``index`` (add ``HARDENED`` for a hardened child)."""
        if not 0 <= index < 2**32:
            raise InvalidKey(f"child index {index} is outside u32")
        if index >= HARDENED:
            if self.secret is None:
                raise InvalidKey("a public key cannot derive hardened children")
            data = b"\x00" + self.secret + struct.pack(">I", index)
        else:
            data = self.public + struct.pack(">I", index)
        digest = hmac.new(self.chain_code, data, hashlib.sha512).digest()
        tweak, chain_code = digest[:32], digest[32:]
        if int.from_bytes(tweak, "big") >= CURVE_ORDER:
            raise InvalidKey(f"child {index} is invalid (probability 2^-127); skip to the next")
        if self.secret is not None:
            child = PrivateKey(self.secret).add(tweak)
            return ExtendedKey(child.public_key.format(), chain_code, child.secret, self.depth + 1)
        point = PublicKey(self.public).add(tweak)
        return ExtendedKey(point.format(), chain_code, None, self.depth + 1)

    def derive(self, path: str) -> ExtendedKey:
        """Derive along a path like ``m/86'/0'/0'/0/5`` (``'`` or ``h`` marks hardened)."""
        parts = path.split("/")
        if parts[0] != "m":
            raise InvalidKey(f"a derivation path starts with m/: {path!r}")
        key = self
        for part in parts[1:]:
            hardened = part[-1:] in ("'", "h", "H")
            digits = part[:-1] if hardened else part
            if not (digits.isascii() and digits.isdigit()) or int(digits) >= HARDENED:
                raise InvalidKey(f"bad path element {part!r} in {path!r}")
            key = key.child(int(digits) + (HARDENED if hardened else 0))
        return key

    def neuter(self) -> ExtendedKey:
        """The same key without its secret: derives the same non-hardened public keys."""
        return ExtendedKey(self.public, self.chain_code, None, self.depth)

    @property
    def xonly(self) -> XOnlyPubKey:
        return XOnlyPubKey(self.public[1:])

    def signing_key(self) -> SigningKey:
        if self.secret is None:
            raise InvalidKey("this extended key has no secret")
        return SigningKey(self.secret)


# -- contact keys: fresh addresses from one shared public key ----------------------------
#
# A contact publishes one x-only key C (secret c). A payer with key A (secret a) derives
# the n-th address for that contact as  C + t_n·G,  t_n = H(x(a·C) || C || A || n).
# The contact computes the same x(c·A) and so finds and spends every such address with
# c + t_n; an observer who knows C cannot link the addresses without a or c.

_contact_tag = tagged_hasher("constellation/contact")


def _contact_tweak(shared_x: bytes, contact: bytes, payer: bytes, index: int) -> bytes:
    if not 0 <= index < 2**32:
        raise InvalidKey(f"contact address index {index} is outside u32")
    tweak = _contact_tag(shared_x + contact + payer + struct.pack(">I", index))
    if int.from_bytes(tweak, "big") >= CURVE_ORDER:
        raise InvalidKey(f"contact tweak {index} is invalid (probability 2^-128); skip it")
    return tweak


def _lift_even(key: bytes) -> PublicKey:
    try:
        return PublicKey(b"\x02" + xonly(key))
    except ValueError as exc:
        raise InvalidKey(f"not a BIP340 public key: {key.hex()}") from exc


def contact_address_key(payer: SigningKey, contact: bytes, index: int) -> XOnlyPubKey:
    """The payer's ``index``-th fresh key for ``contact`` (an x-only public key)."""
    point = _lift_even(contact)
    shared_x = point.multiply(_even_secret(payer.secret)).format()[1:]
    tweak = _contact_tweak(shared_x, contact, payer.pubkey, index)
    return XOnlyPubKey(point.add(tweak).format()[1:])


def contact_spending_key(contact: SigningKey, payer: bytes, index: int) -> SigningKey:
    """The key that spends the ``index``-th address that ``payer`` derived for ``contact``."""
    own = _even_secret(contact.secret)
    shared_x = _lift_even(payer).multiply(own).format()[1:]
    tweak = _contact_tweak(shared_x, contact.pubkey, payer, index)
    return SigningKey(PrivateKey(own).add(tweak).secret)
