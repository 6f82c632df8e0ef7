"""Addresses: bech32m (BIP350) over an owner key, laid out like a P2TR address.

An address is ``hrp`` + ``1`` + data, where data is a witness-style version (1: a
BIP340 key-path owner key) followed by the 32-byte key. Version 1 with HRP ``bc``
gives exactly Bitcoin's P2TR address for the same key; other versions are reserved
for script spends.

Version 2 also names the ledger that holds the owner's coins: data is ``2`` followed by
the 32-byte key and the 8-byte ledger id (``constellation.tx.ledger_id`` of the
operator's key). A payment to it from another operator's coins is settled between the
two operators; a version 1 address means "in the payer's own ledger", and still decodes.
"""

from __future__ import annotations

from enum import Enum

from constellation.errors import InvalidAddress
from constellation.keys import XOnlyPubKey, is_valid_xonly

CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_CHARSET_REV = {c: i for i, c in enumerate(CHARSET)}
BECH32M_CONST = 0x2BC830A3
BECH32_CONST = 1  # BIP173: segwit version 0 addresses
MAX_LENGTH = 90
KEY_VERSION = 1
LEDGER_VERSION = 2
LEDGER_ID_LEN = 8


class Network(Enum):
    """Each network has its own human-readable prefix, so coins never cross by mistake."""

    MAIN = "cst"
    TEST = "tcst"
    REGTEST = "rcst"

    @classmethod
    def from_name(cls, name: str) -> Network:
        for net in cls:
            if name in (net.name.lower(), net.value):
                return net
        raise InvalidAddress(f"unknown network {name!r} (main, test or regtest)")


def _polymod(values: list[int]) -> int:
    gen = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            if (top >> i) & 1:
                chk ^= gen[i]
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def bech32m_encode(hrp: str, data: list[int]) -> str:
    """Encode 5-bit values under ``hrp`` with a bech32m checksum."""
    values = _hrp_expand(hrp) + data
    polymod = _polymod([*values, 0, 0, 0, 0, 0, 0]) ^ BECH32M_CONST
    checksum = [(polymod >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(CHARSET[d] for d in data + checksum)


def bech32m_decode(
    text: str, const: int = BECH32M_CONST, limit: int = MAX_LENGTH
) -> tuple[str, list[int]]:
    """Decode a bech32m string (or, with ``BECH32_CONST``, a bech32 one) into its HRP and
    5-bit data, checking every BIP350 rule (but the length, up to ``limit``: longer
    strings, like BOLT11's, keep the checksum with weaker guarantees)."""
    if len(text) > limit:
        raise InvalidAddress(f"longer than {limit} characters")
    if any(ord(c) < 33 or ord(c) > 126 for c in text):
        raise InvalidAddress("contains a character outside printable ASCII")
    if text.lower() != text and text.upper() != text:
        raise InvalidAddress("mixes upper and lower case")
    text = text.lower()
    pos = text.rfind("1")
    if pos < 1 or pos + 7 > len(text):
        raise InvalidAddress("missing prefix, separator or checksum")
    hrp, rest = text[:pos], text[pos + 1 :]
    try:
        data = [_CHARSET_REV[c] for c in rest]
    except KeyError as exc:
        raise InvalidAddress(f"invalid character {exc.args[0]!r}") from None
    if _polymod(_hrp_expand(hrp) + data) != const:
        raise InvalidAddress("checksum does not match (a typo?)")
    return hrp, data[:-6]


def encode_bytes(hrp: str, data: bytes) -> str:
    """Bytes under ``hrp`` as bech32m."""
    return bech32m_encode(hrp, _convert_bits(data, 8, 5, True))


def decode_bytes(text: str, hrp: str, limit: int) -> bytes:
    """``encode_bytes``'s inverse, for strings under ``hrp`` up to ``limit`` characters."""
    found, data = bech32m_decode(text, limit=limit)
    if found != hrp:
        raise InvalidAddress(f"expected the prefix {hrp!r}, got {found!r}")
    return bytes(_convert_bits(data, 5, 8, False))


def _convert_bits(data: bytes | list[int], from_bits: int, to_bits: int, pad: bool) -> list[int]:
    acc = bits = 0
    out = []
    maxv = (1 << to_bits) - 1
    for value in data:
        acc = (acc << from_bits) | value
        bits += from_bits
        while bits >= to_bits:
            bits -= to_bits
            out.append((acc >> bits) & maxv)
    if pad:
        if bits:
            out.append((acc << (to_bits - bits)) & maxv)
    elif bits >= from_bits or (acc << (to_bits - bits)) & maxv:
        raise InvalidAddress("non-zero or excess padding")
    return out


def encode_address(
    key: bytes, network: Network | str = Network.MAIN, ledger: bytes | None = None
) -> str:
    """The address of an owner key on ``network`` (or under a raw HRP string); with
    ``ledger``, one that also names the ledger holding the owner's coins."""
    if not is_valid_xonly(key):
        raise InvalidAddress(f"not a BIP340 public key: {key.hex()}")
    hrp = network.value if isinstance(network, Network) else network
    if ledger is None:
        return bech32m_encode(hrp, [KEY_VERSION, *_convert_bits(key, 8, 5, pad=True)])
    if len(ledger) != LEDGER_ID_LEN or ledger == bytes(LEDGER_ID_LEN):
        raise InvalidAddress(f"a ledger id is 8 bytes, not all zero: {ledger.hex()}")
    return bech32m_encode(hrp, [LEDGER_VERSION, *_convert_bits(key + ledger, 8, 5, pad=True)])


def decode_destination(
    text: str, network: Network | str = Network.MAIN
) -> tuple[XOnlyPubKey, bytes | None]:
    """The owner key of an address and the ledger it names (None: version 1, no ledger);
    the address must belong to ``network``."""
    hrp, data = bech32m_decode(text)
    expected = network.value if isinstance(network, Network) else network
    if hrp != expected:
        raise InvalidAddress(f"address is for network {hrp!r}, expected {expected!r}")
    version = data[0] if data else None
    if version not in (KEY_VERSION, LEDGER_VERSION):
        raise InvalidAddress(f"unsupported address version {version}")
    raw = bytes(_convert_bits(data[1:], 5, 8, pad=False))
    size = 32 if version == KEY_VERSION else 32 + LEDGER_ID_LEN
    if len(raw) != size:
        raise InvalidAddress(f"a version {version} address holds {size} bytes, not {len(raw)}")
    key, ledger = raw[:32], raw[32:] or None
    if not is_valid_xonly(key):
        raise InvalidAddress("the address does not hold a valid BIP340 key")
    if ledger == bytes(LEDGER_ID_LEN):
        raise InvalidAddress("the address names the all-zero ledger")
    return XOnlyPubKey(key), ledger


def encode_segwit(hrp: str, version: int, program: bytes) -> str:
    """A Bitcoin segwit address (bech32m: version 1 and up, BIP350)."""
    if not 1 <= version <= 16:
        raise InvalidAddress("only segwit version 1 and up are encoded here (bech32m)")
    return bech32m_encode(hrp, [version, *_convert_bits(program, 8, 5, pad=True)])


def decode_segwit(text: str) -> tuple[str, int, bytes]:
    """A Bitcoin segwit address (BIP173 for version 0, BIP350 for 1 to 16): its HRP
    (``bc``, ``tb`` or ``bcrt``), witness version and program."""
    version0 = text[text.rfind("1") + 1 : text.rfind("1") + 2] in ("q", "Q")
    hrp, data = bech32m_decode(text, BECH32_CONST if version0 else BECH32M_CONST)
    if hrp not in ("bc", "tb", "bcrt") or not data or data[0] > 16:
        raise InvalidAddress(f"not a Bitcoin segwit address: {text!r}")
    program = bytes(_convert_bits(data[1:], 5, 8, pad=False))
    if not 2 <= len(program) <= 40 or (data[0] == 0 and len(program) not in (20, 32)):
        raise InvalidAddress(f"a witness program of {len(program)} bytes")
    return hrp, data[0], program


def decode_address(text: str, network: Network | str = Network.MAIN) -> XOnlyPubKey:
    """The owner key of an address (either version), which must belong to ``network``."""
    return decode_destination(text, network)[0]
