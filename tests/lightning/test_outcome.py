"""The four-valued outcome of a payment, from every ``listpays`` shape the research note
lists (``notes/lightning.md`` §1.6, §4): unknown is never failed."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from constellation.lightning import (
    NOTHING_SENT,
    Outcome,
    failure_final,
    msat,
    nothing_sent,
    outgoing,
    spent_at_most,
)

PREIMAGE = hashlib.sha256(b"preimage").digest()
H = hashlib.sha256(PREIMAGE).digest()
OTHER = hashlib.sha256(b"another payment").digest()


def row(status: str, **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"payment_hash": H.hex(), "status": status, "amount_sent_msat": 1010}
    if status == "complete":
        doc.update(preimage=PREIMAGE.hex(), amount_msat=1000)
    doc.update(fields)
    return doc


@pytest.mark.parametrize(
    ("pays", "asked", "outcome"),
    [
        ([row("complete")], True, Outcome.SETTLED),
        # a retry after a failure: decided on the union, not on the first or last row
        # (breez-sdk-greenlight #1050, getAlby/hub #1587)
        ([row("failed"), row("complete")], True, Outcome.SETTLED),
        ([row("complete"), row("failed")], True, Outcome.SETTLED),
        # a stale failure from an earlier attempt while a new one is in flight
        # (nutshell #1170): pending, not failed
        ([row("failed"), row("pending")], True, Outcome.PENDING),
        ([row("pending")], True, Outcome.PENDING),
        ([row("failed"), row("failed")], True, Outcome.FAILED),
        # nothing yet: our call may still be on its way (lightningd runs a command after
        # its client went), unless we never asked
        ([], True, Outcome.UNKNOWN),
        ([], False, Outcome.FAILED),
        # a complete row with a preimage that is not the hash's settles nothing
        # (nutshell #614: an all-zero preimage taken as paid)
        ([row("complete", preimage="00" * 32)], True, Outcome.UNKNOWN),
        ([row("complete", preimage="zz")], True, Outcome.UNKNOWN),
        ([row("complete", preimage="00" * 32), row("pending")], True, Outcome.UNKNOWN),
        # a status this code does not know is not a failure
        ([row("failed"), row("weird")], True, Outcome.UNKNOWN),
        # rows of other payments are not this one's
        ([{**row("complete"), "payment_hash": OTHER.hex()}], True, Outcome.UNKNOWN),
        ([{**row("failed"), "payment_hash": OTHER.hex()}, row("pending")], True, Outcome.PENDING),
    ],
)
def test_the_outcome_of_a_payment_is_decided_on_every_attempt(
    pays: list[dict[str, Any]], asked: bool, outcome: Outcome
) -> None:
    assert outgoing(pays, H, asked).outcome is outcome


def test_a_settled_payment_carries_its_proof_and_fee() -> None:
    state = outgoing([row("failed"), row("complete", amount_sent_msat="1010msat")], H, True)
    assert state.preimage == PREIMAGE
    assert (state.amount_msat, state.fee_msat) == (1000, 10)


def test_a_payment_whose_fee_the_node_does_not_say_never_costs_no_fee() -> None:
    """Core Lightning v24.11's xpay lists no ``amount_msat`` (lightning#7881): what was
    sent is what it cost; where that is not said either, the whole fee limit."""
    state = outgoing([{k: v for k, v in row("complete").items() if k != "amount_msat"}], H, True)
    assert state.outcome is Outcome.SETTLED and state.fee_msat is None
    assert state.sent_msat == 1010 and spent_at_most(state, 1000, 50) == 1010
    bare = {k: v for k, v in row("complete").items() if k != "amount_sent_msat"}
    state = outgoing([bare], H, True)
    assert state.outcome is Outcome.SETTLED and (state.sent_msat, state.fee_msat) == (None, None)
    assert spent_at_most(state, 1000, 50) == 1050  # never 1000: an unknown fee is not 0
    full = outgoing([row("complete")], H, True)
    assert spent_at_most(full, 1000, 50) == 1010


def test_a_failure_is_final_only_once_no_command_can_still_try() -> None:
    failed = outgoing([row("failed", created_at=1000), row("failed", created_at=1100)], H, True)
    assert failed.last_attempt_at == 1100
    assert not failure_final(failed, now=1100, sent_by=900, attempting_s=60)  # fence open
    assert not failure_final(failed, now=1159, sent_by=900, attempting_s=60)  # newest trying
    assert failure_final(failed, now=1160, sent_by=900, attempting_s=60)
    assert not failure_final(failed, now=1200, sent_by=1150, attempting_s=60)  # sent late
    never = outgoing([], H, False)
    assert failure_final(never, now=1000, sent_by=900, attempting_s=60)
    assert not failure_final(never, now=950, sent_by=900, attempting_s=60)
    undated = outgoing([{k: v for k, v in row("failed").items()}], H, True)
    assert not failure_final(undated, now=10**12, sent_by=0, attempting_s=60)
    pending = outgoing([row("pending")], H, True)
    assert not failure_final(pending, now=10**12, sent_by=0, attempting_s=60)


def test_amounts_in_both_of_lightningd_s_formats() -> None:
    assert msat(5) == 5 and msat("5msat") == 5
    for bad in ("5sat", "5", -0.5, True, None):
        with pytest.raises(ValueError):
            msat(bad)


def test_only_errors_where_no_htlc_was_offered_prove_nothing_was_sent() -> None:
    assert all(nothing_sent(c) for c in (-32602, 205, 206, 207, 210))
    # the catch-all, plugin deaths, a destination's refusal (xpay returns at the first
    # failure, other parts may live), "in progress", "already paid", "other": look up
    for code in (-1, -3, -4, -5, 200, 201, 203, 204, 209, 219, None):
        assert not nothing_sent(code)
    assert len(NOTHING_SENT) == 5
