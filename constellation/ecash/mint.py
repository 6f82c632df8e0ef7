"""A Cashu mint's rules, pure: which proofs may be spent, which outputs signed, whether
a swap balances, what a mint or melt quote allows, the change a melt returns (NUT-03,
NUT-04, NUT-05, NUT-08, NUT-20), each refusal a ``CashuError`` with its NUT code; and
the bridge to the operator's L3 ledger: ecash redeemed into an L3 coin (its issuance
derived from the proofs, so that a retry issues the same coin), and L3 coins paid to the
mint's key withdrawn as ecash.

What no rule here can decide is whether a proof was spent before or an output signed
before: that is the store's, in one database transaction per operation
(``services/ecash/store.py``), so that of two requests sharing a proof exactly one
wins, whatever the interleaving and however many mint processes there are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from coincurve import PublicKey

from constellation.crypto import bdhke
from constellation.crypto.point import N, add, base_mul
from constellation.ecash import conditions
from constellation.ecash.conditions import ConditionError
from constellation.ecash.keyset import Keyset, input_fee, split
from constellation.keys import schnorr_verify
from constellation.protocol import cashu as nut

# NUT error codes (cashubtc/nuts error_codes.md)
PROOF_INVALID = 10001
# nutshell's TransactionError: a request its mint does not serve ("backend does not
# support mpp"); error_codes.md names no code for it
NOT_SERVED = 11000
SPENT = 11001
PENDING = 11002
OUTPUTS_SIGNED = 11003
UNBALANCED = 11005
AMOUNT_LIMIT = 11006
DUPLICATE_INPUTS = 11007
DUPLICATE_OUTPUTS = 11008
MULTIPLE_UNITS = 11009
UNIT_MISMATCH = 11010
AMOUNTLESS = 11011
AMOUNT_MISMATCH = 11012
UNIT_UNSUPPORTED = 11013
KEYSET_UNKNOWN = 12001
KEYSET_INACTIVE = 12002
QUOTE_UNPAID = 20001
QUOTE_ISSUED = 20002
PAYMENT_FAILED = 20004
QUOTE_PENDING = 20005
INVOICE_PAID = 20006
QUOTE_EXPIRED = 20007
SIGNATURE_INVALID = 20008
PUBKEY_INVALID = 20009


class CashuError(Exception):
    """A refusal a wallet caused, with its NUT error code (HTTP 400)."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{detail} (code {code})")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Spend:
    """Proofs that verified: their Ys (the nullifiers the store records), value and fee."""

    ys: list[bytes]
    amount: int
    fee: int
    unit: str


@dataclass(frozen=True)
class Outputs:
    """Outputs that may be signed: their blinded messages and total."""

    blinded: list[bytes]
    amount: int
    unit: str


def _hex(text: str, what: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise CashuError(PROOF_INVALID, f"{what} is not hex") from None


def _point(hex33: str, what: str) -> PublicKey:
    try:
        return PublicKey(bytes.fromhex(hex33))
    except ValueError:
        raise CashuError(PROOF_INVALID, f"{what} is not a point on the curve") from None


class Mint:
    """The keysets and the rules. Every keyset can be spent from; only the active keyset
    of a unit signs."""

    def __init__(self, keysets: Sequence[Keyset], max_amount: int = 2**40) -> None:
        self.keysets = {k.id: k for k in keysets}
        self.max_amount = max_amount  # sat, per mint or melt

    def active(self, unit: str) -> Keyset:
        found = [k for k in self.keysets.values() if k.active and k.unit == unit]
        if not found:
            raise CashuError(UNIT_UNSUPPORTED, f"no active keyset of unit {unit!r}")
        return max(found, key=lambda k: k.index)

    def keyset(self, kid: str) -> Keyset:
        found = self.keysets.get(kid)
        if found is None:
            raise CashuError(KEYSET_UNKNOWN, f"keyset {kid[:66]} is not known")
        return found

    # -- proofs in -------------------------------------------------------------------

    def spend(
        self,
        proofs: Sequence[nut.Proof],
        now: int,
        outputs: Sequence[nut.BlindedMessage] = (),
        signed: str = "",
    ) -> Spend:
        """Check every proof: a known keyset and amount, one unit, no duplicate, the
        mint's signature on its secret (C = k·Y), and its spending conditions met by
        this request (NUT-11; ``outputs`` and ``signed``, a melt's quote id or a
        redemption's address, are what a SIG_ALL signature covers)."""
        ys: list[bytes] = []
        units = set()
        ppks = []
        for p in proofs:
            keyset = self.keyset(p.id)
            k = keyset.secrets.get(p.amount)
            if k is None:
                raise CashuError(PROOF_INVALID, f"keyset {p.id} has no amount {p.amount}")
            y = bdhke.hash_to_curve(p.secret.encode())
            if not bdhke.verify(k, y, _hex(p.C, "a proof's C")):
                raise CashuError(PROOF_INVALID, "a proof's signature is not the mint's")
            ys.append(y.format())
            units.add(keyset.unit)
            ppks.append(keyset.input_fee_ppk)
        if len(set(ys)) != len(ys):
            raise CashuError(DUPLICATE_INPUTS, "a proof is given twice")
        try:
            conditions.check(proofs, outputs, now, signed)
        except ConditionError as exc:
            raise CashuError(PROOF_INVALID, str(exc)) from None
        if len(units) > 1:
            raise CashuError(MULTIPLE_UNITS, "inputs of several units")
        amount = sum(p.amount for p in proofs)
        return Spend(ys, amount, input_fee(ppks), units.pop())

    # -- outputs ---------------------------------------------------------------------

    def outputs(self, outputs: Sequence[nut.BlindedMessage], inactive: bool = False) -> Outputs:
        """Check outputs to sign: an active keyset (any of the mint's with ``inactive``:
        for what it owes since before the keyset retired), an amount it has, one unit, no
        duplicate."""
        if not outputs:
            raise CashuError(UNBALANCED, "no outputs")
        units = set()
        blinded = []
        for o in outputs:
            keyset = self.keyset(o.id)
            if not keyset.active and not inactive:
                raise CashuError(KEYSET_INACTIVE, f"keyset {o.id} is inactive: it signs nothing")
            if o.amount not in keyset.secrets:
                raise CashuError(AMOUNT_LIMIT, f"keyset {o.id} has no amount {o.amount}")
            _point(o.B_, "an output's B_")
            blinded.append(bytes.fromhex(o.B_))
            units.add(keyset.unit)
        if len(set(blinded)) != len(blinded):
            raise CashuError(DUPLICATE_OUTPUTS, "an output is given twice")
        if len(units) > 1:
            raise CashuError(MULTIPLE_UNITS, "outputs of several units")
        return Outputs(blinded, sum(o.amount for o in outputs), units.pop())

    def sign(self, outputs: Sequence[nut.BlindedMessage]) -> list[nut.BlindSignature]:
        """Blind signatures, each with its DLEQ proof (NUT-12); ``outputs`` checked."""
        signed = []
        for o in outputs:
            keyset = self.keysets[o.id]
            k = keyset.secrets[o.amount]
            blinded = PublicKey(bytes.fromhex(o.B_))
            c_ = bdhke.sign(k, blinded)
            e, s = bdhke.prove(k, blinded, key=keyset.keys[o.amount], signature=c_)
            dleq = nut.Dleq(e.hex(), s.hex())
            signed.append(nut.BlindSignature(o.amount, o.id, c_.format().hex(), dleq))
        return signed

    # -- operations -----------------------------------------------------------------

    def swap(self, request: nut.SwapRequest, now: int) -> tuple[Spend, Outputs]:
        """NUT-03: inputs - fee == outputs, one unit."""
        spend = self.spend(request.inputs, now, request.outputs)
        out = self.outputs(request.outputs)
        if spend.unit != out.unit:
            raise CashuError(UNIT_MISMATCH, f"inputs in {spend.unit}, outputs in {out.unit}")
        if spend.amount - spend.fee != out.amount:
            raise CashuError(
                UNBALANCED,
                f"inputs {spend.amount} - fee {spend.fee} != outputs {out.amount}",
            )
        return spend, out

    def check_mint(self, quote: MintQuote, request: nut.MintRequest, now: int) -> Outputs:
        """NUT-04 and NUT-20: a paid quote, not issued, outputs for exactly its amount,
        and the quote key's signature where it has one."""
        if quote.state == ISSUED:
            raise CashuError(QUOTE_ISSUED, "this quote's ecash was issued already")
        if quote.state != PAID:
            why = "expired" if now >= quote.expiry else "not paid yet"
            code = QUOTE_EXPIRED if now >= quote.expiry else QUOTE_UNPAID
            raise CashuError(code, f"the quote's invoice is {why}")
        out = self.outputs(request.outputs)
        if out.unit != quote.unit:
            raise CashuError(UNIT_MISMATCH, f"the quote is in {quote.unit}, outputs in {out.unit}")
        if out.amount != quote.amount:
            raise CashuError(UNBALANCED, f"outputs {out.amount} != the quote's {quote.amount}")
        if quote.pubkey and not check_mint_signature(quote.pubkey, request):
            raise CashuError(SIGNATURE_INVALID, "the mint request's signature is not valid")
        return out

    def check_melt(self, quote: MeltQuote, request: nut.MeltRequest, now: int) -> tuple[Spend, int]:
        """NUT-05: an unpaid quote, not expired, inputs of its unit covering its amount,
        its fee reserve and the input fee, blank outputs of its unit. Returns the spend
        and the blank outputs' count (NUT-08)."""
        if quote.state == MELT_PAID:
            raise CashuError(INVOICE_PAID, "this quote's invoice is paid already")
        if quote.state == MELT_PENDING:
            raise CashuError(QUOTE_PENDING, "this quote's payment is in flight")
        if now >= quote.expiry:
            raise CashuError(QUOTE_EXPIRED, "the quote is expired")
        spend = self.spend(request.inputs, now, request.outputs or [], quote.quote)
        if spend.unit != quote.unit:
            raise CashuError(UNIT_MISMATCH, f"the quote is in {quote.unit}, inputs in {spend.unit}")
        needed = quote.amount + quote.fee_reserve + spend.fee
        if spend.amount < needed:
            raise CashuError(UNBALANCED, f"inputs {spend.amount} < {needed} (amount, reserve, fee)")
        blanks = request.outputs or []
        if blanks:
            out = self.outputs([nut.BlindedMessage(1, b.id, b.B_) for b in blanks])
            if out.unit != quote.unit:
                raise CashuError(UNIT_MISMATCH, f"blank outputs in {out.unit}, not {quote.unit}")
        return spend, len(blanks)


def check_melt_options(options: nut.MeltQuoteOptions | None, invoice_msat: int | None) -> None:
    """A melt quote's options (NUT-15 ``mpp``, NUT-23 ``amountless``), none of which this
    mint offers yet: each is refused, never ignored (a quote for part of an invoice would
    be quoted, and paid, for all of it). ``invoice_msat``: the invoice's own amount."""
    if options is None:
        return
    if options.mpp is not None:
        raise CashuError(NOT_SERVED, "this mint does not pay part of an invoice (NUT-15 mpp)")
    if options.amountless is not None:
        if invoice_msat is not None:
            raise CashuError(
                AMOUNT_MISMATCH, "an amount for an invoice that names its own (amountless)"
            )
        raise CashuError(AMOUNTLESS, "this mint does not pay invoices without an amount")


def change(overpaid: int, blanks: Sequence[nut.BlindedMessage]) -> list[nut.BlindedMessage]:
    """NUT-08: the blank outputs given amounts that return ``overpaid`` (as much of it as
    ``len(blanks)`` powers of two can carry, the largest first)."""
    amounts = sorted(split(overpaid), reverse=True)[: len(blanks)]
    return [nut.BlindedMessage(a, b.id, b.B_) for a, b in zip(amounts, blanks, strict=False)]


def check_quote_key(pubkey: str) -> None:
    """NUT-20: a quote's key is a compressed point of the curve (20009), else a paid quote
    could never be minted: no signature verifies under it."""
    try:
        key = bytes.fromhex(pubkey)
        ok = len(key) == 33 and key[0] in (2, 3)
        PublicKey(key)
    except ValueError:
        ok = False
    if not ok:
        raise CashuError(PUBKEY_INVALID, f"the quote's pubkey is not a public key: {pubkey[:66]!r}")


def check_mint_signature(pubkey: str, request: nut.MintRequest) -> bool:
    """NUT-20: BIP340 by the quote's key over SHA256(quote id || B_0 || ... || B_n-1)."""
    msg = request.quote + "".join(o.B_ for o in request.outputs)
    try:
        sig = bytes.fromhex(request.signature or "")
    except ValueError:
        return False
    key = bytes.fromhex(pubkey)[1:]
    return len(sig) == 64 and schnorr_verify(key, hashlib.sha256(msg.encode()).digest(), sig)


# -- quotes ---------------------------------------------------------------------------

UNPAID, PAID, ISSUED = "UNPAID", "PAID", "ISSUED"
BOLT11, ONCHAIN = "bolt11", "onchain"  # payment methods (NUT-04, NUT-05; NUT-30)
MELT_UNPAID, MELT_PENDING, MELT_PAID = "UNPAID", "PENDING", "PAID"


@dataclass(frozen=True)
class MintQuote:
    quote: str
    request: str  # the BOLT11 invoice to pay
    payment_hash: str
    amount: int
    unit: str
    state: str
    expiry: int  # unix seconds
    pubkey: str | None = None


@dataclass(frozen=True)
class MeltQuote:
    quote: str
    request: str
    payment_hash: str
    amount: int
    fee_reserve: int
    unit: str
    state: str
    expiry: int
    preimage: str | None = None
    fee_paid: int = 0  # the routing fee, rounded up to the unit
    amount_msat: int = 0  # the invoice's exact amount
    method: str = BOLT11  # how it is paid: BOLT11, or ONCHAIN (NUT-30)


# -- the bridge to L3 ---------------------------------------------------------------------

REDEEM_DOMAIN = b"constellation/cashu/redeem/v1"


def redeem_id(ys: Sequence[bytes]) -> bytes:
    """A redemption's id: what its proofs are (a retry with the same proofs is the same
    redemption, whatever order they come in)."""
    return hashlib.sha256(REDEEM_DOMAIN + b"".join(sorted(ys))).digest()


def redeem_nonce(rid: bytes) -> int:
    """The issuance nonce of a redemption (a 63-bit number from its id): the same
    issuance, hence the same coin, however often it is issued."""
    return int.from_bytes(rid[:8]) >> 1


def check_redeem(spend: Spend) -> int:
    """The L3 coin's value, in msat, for these proofs: their value less the input fee."""
    value = (spend.amount - spend.fee) * 1000
    if value <= 0:
        raise CashuError(UNBALANCED, f"{spend.amount} sat does not cover the fee {spend.fee}")
    if spend.unit != "sat":
        raise CashuError(UNIT_UNSUPPORTED, f"only sat ecash is redeemed, not {spend.unit}")
    return value


WITHDRAW_DOMAIN = b"constellation/cashu/withdraw/v1"


def withdrawal_key(mint_key: bytes, blinded: Sequence[bytes]) -> bytes:
    """The L3 key a withdrawal pays: the mint's x-only key tweaked by the outputs it buys
    (P + SHA256(domain || P || B_0 || ...)·G, x-only). A transaction paying it buys those
    outputs and no others, so whoever sees the transaction cannot claim what it paid
    (and the same outputs again get signatures only their maker can unblind)."""
    digest = hashlib.sha256(WITHDRAW_DOMAIN + mint_key + b"".join(blinded)).digest()
    tweaked = add(PublicKey(b"\x02" + mint_key), base_mul(int.from_bytes(digest) % N))
    assert tweaked is not None, "a tweak that is the key's negation (probability 2^-256)"
    return tweaked.format()[1:]


def check_withdraw(paid_msat: int, outputs: Outputs) -> None:
    """An L3 payment of ``paid_msat`` to the mint's key buys outputs of exactly that
    value (in sat)."""
    if outputs.unit != "sat":
        raise CashuError(UNIT_UNSUPPORTED, f"L3 is withdrawn as sat ecash, not {outputs.unit}")
    if paid_msat != outputs.amount * 1000:
        raise CashuError(
            UNBALANCED,
            f"the transaction pays the mint {paid_msat} msat, outputs {outputs.amount} sat",
        )
