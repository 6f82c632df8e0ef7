"""Threshold cryptography: FROST signing for BIP340 (BIP445) and the ROAST coordinator."""
