"""Amounts are integers of millisatoshi, unsigned 64-bit."""

from __future__ import annotations

MSAT_PER_SAT = 1000
MAX_MSAT = 2**64 - 1


def format_msat(value_msat: int) -> str:
    """Render msat for people: whole sats with thousands separators, msat only if present."""
    sats, msat = divmod(value_msat, MSAT_PER_SAT)
    return f"{sats:,} sat" if msat == 0 else f"{sats:,}.{msat:03d} sat"
