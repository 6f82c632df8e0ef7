"""What a scanned or pasted payment request is: an L3 address, a BOLT11 invoice, a Bitcoin
address, or a BIP21 URI (``bitcoin:ADDRESS?amount=BTC&lightning=INVOICE``) naming either.

``parse`` decides, and takes what the text says of the amount; the wallet then pays it
the way it must be paid (an L3 payment; a withdrawal through the mint and a melt; an
on-chain withdrawal). A BIP21 URI with a ``lightning=`` invoice is paid over Lightning
(the BOLT11 invoice is the stronger commitment: it names the payee's node and hash).
Anything ambiguous or unknown is refused with the reason, never guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from urllib.parse import parse_qsl

from bolt11 import decode as decode_bolt11
from bolt11.exceptions import Bolt11Exception

from constellation.address import Network, decode_destination, decode_segwit
from constellation.errors import ConstellationError, InvalidAddress

MSAT_PER_BTC = 100_000_000_000
MAX_MSAT = 21_000_000 * MSAT_PER_BTC
AMOUNT = re.compile(r"(?=\.?[0-9])[0-9]*(\.[0-9]*)?", re.ASCII)  # BIP21: *digit ["." *digit]
INVOICE_PREFIX = {Network.MAIN: "lnbc", Network.TEST: "lntb", Network.REGTEST: "lnbcrt"}
BITCOIN_HRP = {Network.MAIN: "bc", Network.TEST: "tb", Network.REGTEST: "bcrt"}
MAX_LENGTH = 4096  # an invoice with many route hints fits; a pasted book does not


class Kind(Enum):
    L3 = "an L3 address"
    BOLT11 = "a BOLT11 invoice"
    ONCHAIN = "a Bitcoin address"


class PayToError(ConstellationError):
    code = "invalid.payto"


@dataclass(frozen=True)
class PayTo:
    kind: Kind
    target: str  # the address or invoice, as it is paid
    amount_msat: int | None  # what the request asks for, where it says
    payment_hash: str = ""  # an invoice's
    description: str = ""  # an invoice's, or a URI's label or message


def parse(text: str, network: Network) -> PayTo:
    """What ``text`` asks to be paid, on ``network``; ``PayToError`` says why not."""
    text = text.strip()
    if not text or len(text) > MAX_LENGTH:
        raise PayToError(f"a payment request is 1 to {MAX_LENGTH} characters")
    scheme, colon, rest = text.partition(":")
    if colon and scheme.lower() == "lightning":
        return _invoice(rest, network)
    if colon and scheme.lower() == "bitcoin":
        return _bip21(rest, network)
    if colon:
        raise PayToError(f"unknown scheme {scheme!r}: bitcoin: or lightning: URIs")
    if text.lower().startswith("ln"):
        return _invoice(text, network)
    if text[: text.rfind("1")].lower() in BITCOIN_HRP.values():
        return _onchain(text, network, None)
    try:
        decode_destination(text, network)
    except InvalidAddress as exc:
        raise PayToError(f"neither an invoice nor an address: {exc}") from None
    return PayTo(Kind.L3, text, None)


def _invoice(text: str, network: Network) -> PayTo:
    try:
        inv = decode_bolt11(text.lower())
    except (Bolt11Exception, ValueError, KeyError, IndexError) as exc:
        raise PayToError(f"not a valid BOLT11 invoice: {exc}") from None
    prefix = INVOICE_PREFIX[network]
    if inv.currency != prefix[2:]:
        raise PayToError(f"an invoice for network {inv.currency!r}, expected {prefix!r}")
    if inv.has_expired():
        raise PayToError("the invoice has expired: ask the payee for a new one")
    return PayTo(
        Kind.BOLT11, text.lower(), inv.amount_msat, inv.payment_hash, inv.description or ""
    )


def _onchain(text: str, network: Network, amount_msat: int | None, label: str = "") -> PayTo:
    try:
        hrp, _, _ = decode_segwit(text)
    except InvalidAddress as exc:
        raise PayToError(f"not a Bitcoin address: {exc}") from None
    if hrp != BITCOIN_HRP[network]:
        raise PayToError(f"a Bitcoin address for {hrp!r}, expected {BITCOIN_HRP[network]!r}")
    return PayTo(Kind.ONCHAIN, text.lower(), amount_msat, description=label)


def _bip21(rest: str, network: Network) -> PayTo:
    address, _, query = rest.partition("?")
    params: dict[str, str] = {}
    try:
        fields = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise PayToError(f"the URI's parameters are malformed: {exc}") from None
    for key, value in fields:
        if key.lower() in params:
            raise PayToError(f"the URI names {key!r} twice")
        params[key.lower()] = value
    unknown = [k for k in params if k.startswith("req-")]
    if unknown:  # BIP21: a required parameter the wallet does not know is not paid
        raise PayToError(f"the URI requires what this wallet does not know: {unknown}")
    amount = _btc(params["amount"]) if "amount" in params else None
    label = params.get("message") or params.get("label") or ""
    if "lightning" in params:
        paid = _invoice(params["lightning"], network)
        if amount is not None and paid.amount_msat not in (None, amount):
            raise PayToError(
                f"the URI asks {amount} msat, its invoice {paid.amount_msat} msat: which?"
            )
        return paid
    if not address:
        raise PayToError("a bitcoin: URI with neither an address nor an invoice")
    return _onchain(address, network, amount, label)


def _btc(text: str) -> int:
    """A BIP21 amount (decimal BTC: digits, maybe a point and more) in msat, refused
    where it is not a whole msat, is none, or is more BTC than there will ever be."""
    if not AMOUNT.fullmatch(text):
        raise PayToError(f"not an amount of BTC: {text[:40]!r}")
    whole, _, fraction = text.partition(".")
    whole, fraction = whole.lstrip("0"), fraction.rstrip("0")
    if len(fraction) > 11:
        raise PayToError(f"an amount not in whole msat: {text[:40]!r}")
    if len(whole) > 8:  # more BTC than there will ever be
        raise PayToError(f"not an amount of BTC: {text[:40]!r}")
    msat = int(whole or "0") * MSAT_PER_BTC + int(fraction.ljust(11, "0"))
    if not 0 < msat <= MAX_MSAT:
        raise PayToError(f"not an amount of BTC: {text[:40]!r}")
    return msat
