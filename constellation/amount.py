"""Amounts are integers of millisatoshi, unsigned 64-bit."""

from __future__ import annotations

from constellation.errors import ValueOutOfRange

MSAT_PER_SAT = 1000
MAX_MSAT = 2**64 - 1


def check_msat(value_msat: int, what: str = "amount") -> int:
    """Return ``value_msat`` if it is an int within u64, else raise ``ValueOutOfRange``."""
    if type(value_msat) is not int:
        raise ValueOutOfRange(f"{what} must be an integer number of msat")
    if not 0 <= value_msat <= MAX_MSAT:
        raise ValueOutOfRange(f"{what} {value_msat} msat is outside 0..2^64-1")
    return value_msat


def format_msat(value_msat: int) -> str:
    """Render msat for people: whole sats with thousands separators, msat only if present."""
    sats, msat = divmod(value_msat, MSAT_PER_SAT)
    return f"{sats:,} sat" if msat == 0 else f"{sats:,}.{msat:03d} sat"


def parse_sat(text: str) -> int:
    """Parse a user's amount in sat (``"1500"``, ``"1,500"`` or ``"0.25"``) into msat."""
    cleaned = text.replace(",", "").replace("_", "").strip()
    whole, _, frac = cleaned.partition(".")
    if not whole.isdigit() or (frac and (not frac.isdigit() or len(frac) > 3)):
        raise ValueOutOfRange(f"not an amount in sat: {text!r}")
    return check_msat(int(whole) * MSAT_PER_SAT + int(frac.ljust(3, "0") or 0))
