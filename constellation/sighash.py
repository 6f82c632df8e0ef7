"""What an input's signature commits to.

``sighash = tagged_hash("constellation/sighash", txid || index:u16 || value_msat:u64 ||
owner:32)``. The txid already covers the whole transaction without witnesses (every
input with its stated value, every output, the fee); the index binds the signature to
one input, and the spent coin's value and owner bind it to that coin, so a signature
can be neither moved to another input nor replayed against another coin. The tag keeps
it apart from every other hash the project signs.
"""

from __future__ import annotations

from constellation.codec import u16, u64
from constellation.hashing import tagged_hasher
from constellation.keys import SigningKey, schnorr_verify
from constellation.tx import Transaction

_sighash = tagged_hasher("constellation/sighash")


def sighash(txid: bytes, index: int, value_msat: int, owner: bytes) -> bytes:
    """The 32-byte message that input ``index`` of ``txid`` signs."""
    return _sighash(txid + u16(index) + u64(value_msat) + owner)


def sign_transaction(tx: Transaction, keys: list[SigningKey]) -> Transaction:
    """Sign every input of ``tx``; ``keys[i]`` owns the coin spent by input ``i``."""
    if len(keys) != len(tx.inputs):
        raise ValueError(f"{len(keys)} keys for {len(tx.inputs)} inputs")
    sigs = [
        key.sign(sighash(tx.txid, i, inp.value_msat, key.pubkey))
        for i, (inp, key) in enumerate(zip(tx.inputs, keys, strict=True))
    ]
    return tx.with_witnesses(sigs)


def input_signature_valid(tx: Transaction, index: int, owner: bytes) -> bool:
    """True if input ``index``'s witness is ``owner``'s signature over its sighash."""
    msg = sighash(tx.txid, index, tx.inputs[index].value_msat, owner)
    return schnorr_verify(owner, msg, tx.witnesses[index])
