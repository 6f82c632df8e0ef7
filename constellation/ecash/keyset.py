"""A Cashu mint's keysets (NUT-01, NUT-02): one key per power-of-two amount, an id
derived from the public keys, the unit and the input fee, and the fee rule.

A mint's keysets come from one master secret: the key of amount ``a`` in keyset number
``index`` of unit ``u`` is HMAC-SHA256(master, domain || u || index || a) taken mod n
(``derive``), so the keys need no storage of their own beyond the sealed master secret,
and a rotation is a new index. Ids are version 2 (NUT-02): ``01`` followed by
SHA256("a1:K1,a2:K2,...|unit:u|input_fee_ppk:f|final_expiry:t") in hex, each optional
part present only when it is not zero; version 1 ids (``00`` and 7 bytes) are computed
for the vectors and old keysets.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from functools import cached_property

from coincurve import PublicKey

from constellation.crypto.bdhke import public_key
from constellation.crypto.point import N

ORDERS = 64  # amounts 2^0 .. 2^63
AMOUNTS = tuple(1 << i for i in range(ORDERS))
UNITS = ("sat", "msat")  # units real wallets accept that this mint issues
MAX_FEE_PPK = 10_000
KEY_DOMAIN = b"constellation/cashu/keyset/v1"


def keyset_id_v1(keys: dict[int, PublicKey]) -> str:
    """``00`` and the first 7 bytes of SHA256 over the keys, by amount."""
    data = b"".join(keys[a].format() for a in sorted(keys))
    return "00" + hashlib.sha256(data).hexdigest()[:14]


def keyset_id_v2(
    keys: dict[int, PublicKey], unit: str, input_fee_ppk: int = 0, final_expiry: int = 0
) -> str:
    """``01`` and SHA256 over the amounts and keys, the unit, and the fee and final
    expiry where they are not zero (NUT-02 version 2)."""
    text = ",".join(f"{a}:{keys[a].format().hex()}" for a in sorted(keys))
    text += f"|unit:{unit}"
    if input_fee_ppk:
        text += f"|input_fee_ppk:{input_fee_ppk}"
    if final_expiry:
        text += f"|final_expiry:{final_expiry}"
    return "01" + hashlib.sha256(text.encode()).hexdigest()


def parse_keys(doc: dict[str, str]) -> dict[int, PublicKey]:
    """A keyset's keys as a mint serves them (NUT-01): each amount a power of two up to
    2^63, each key a compressed point; ValueError otherwise."""
    keys = {}
    for amount, key in doc.items():
        a = int(amount)
        if a not in AMOUNTS:
            raise ValueError(f"amount {amount!r} is not a power of two up to 2^63")
        raw = bytes.fromhex(key)
        if len(raw) != 33 or raw[0] not in (2, 3):
            raise ValueError(f"the key of amount {a} is not a compressed point")
        keys[a] = PublicKey(raw)
    return keys


def input_fee(ppks: list[int]) -> int:
    """The fee for spending inputs of keysets with these fees (parts per thousand of one
    unit per input), rounded up."""
    return (sum(ppks) + 999) // 1000


def ecash_for(amount: int, ppk: int) -> int:
    """The least value of fresh ecash, of a keyset charging ``ppk``, that pays ``amount``
    and the fee for spending it (which grows with the number of proofs it is in)."""
    total = amount
    while total - input_fee([ppk] * len(split(total))) < amount:
        total += 1
    return total


def split(amount: int) -> list[int]:
    """The powers of two that sum to ``amount``, smallest first."""
    if amount < 0:
        raise ValueError("a negative amount")
    return [a for a in AMOUNTS if amount & a]


def derive(master: bytes, unit: str, index: int, amount: int) -> int:
    """The secret key of ``amount`` in keyset ``index`` of ``unit``."""
    msg = KEY_DOMAIN + unit.encode() + b"|" + index.to_bytes(4, "big") + amount.to_bytes(8, "big")
    k = int.from_bytes(hmac.new(master, msg, hashlib.sha256).digest()) % N
    assert k != 0, "a zero key (probability 2^-256)"
    return k


@dataclass(frozen=True)
class Keyset:
    """One keyset with its secret keys (the mint's view)."""

    unit: str
    index: int
    input_fee_ppk: int
    secrets: dict[int, int] = field(repr=False)  # amount -> k
    active: bool = True

    @staticmethod
    def derive(master: bytes, unit: str, index: int, input_fee_ppk: int) -> Keyset:
        if unit not in UNITS:
            raise ValueError(f"unit {unit!r} is not one of {', '.join(UNITS)}")
        if not 0 <= input_fee_ppk <= MAX_FEE_PPK:
            raise ValueError(f"input_fee_ppk must be 0 to {MAX_FEE_PPK}")
        secrets = {a: derive(master, unit, index, a) for a in AMOUNTS}
        return Keyset(unit, index, input_fee_ppk, secrets)

    @cached_property
    def keys(self) -> dict[int, PublicKey]:
        return {amount: public_key(k) for amount, k in self.secrets.items()}

    @cached_property
    def id(self) -> str:
        return keyset_id_v2(self.keys, self.unit, self.input_fee_ppk)

    def public(self) -> dict[str, str]:
        """The keys as NUT-01 serves them: amount (a decimal string) -> compressed hex."""
        return {str(a): self.keys[a].format().hex() for a in sorted(self.keys)}
