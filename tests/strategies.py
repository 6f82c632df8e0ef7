"""Hypothesis strategies and builders shared by the tests."""

from __future__ import annotations

from hypothesis import strategies as st

from constellation.amount import MAX_MSAT
from constellation.keys import SigningKey
from constellation.tx import Transaction, TxInput, TxOutput

KEYS = [SigningKey(bytes([i + 1]) * 32) for i in range(8)]


@st.composite
def transactions(draw: st.DrawFn, max_inputs: int = 4, max_outputs: int = 4) -> Transaction:
    """Balanced, well-formed transactions with random (unsigned-valid) witnesses."""
    n_in = draw(st.integers(1, max_inputs))
    coin_ids = draw(
        st.lists(st.binary(min_size=32, max_size=32), min_size=n_in, max_size=n_in, unique=True)
    )
    outs = draw(
        st.lists(
            st.tuples(st.integers(1, 2**40), st.sampled_from(KEYS)),
            min_size=1,
            max_size=max_outputs,
        )
    )
    fee = draw(st.integers(0, 2**20))
    total = sum(v for v, _ in outs) + fee
    # split the total over the inputs, each at least 1 msat
    cuts = (
        sorted(
            draw(
                st.lists(
                    st.integers(1, total - 1), min_size=n_in - 1, max_size=n_in - 1, unique=True
                )
            )
        )
        if total > n_in
        else []
    )
    if len(cuts) != n_in - 1:
        n_in, coin_ids, cuts = 1, coin_ids[:1], []
    values = [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]
    assert all(0 < v <= MAX_MSAT for v in values)
    witnesses = [draw(st.binary(min_size=64, max_size=64)) for _ in range(n_in)]
    return Transaction(
        [TxInput(c, v) for c, v in zip(coin_ids, values, strict=True)],
        [TxOutput(v, k.pubkey) for v, k in outs],
        fee,
        witnesses,
    )
