"""The backend's verdicts against the simulated network's truth, under random faults at
the payer's node (lost replies, delays, an outage) and the payee's (held HTLCs,
refusals): a payment said settled was paid, one said failed never is, and once the
faults are gone, looking each one up tells exactly what happened
(``notes/lightning.md`` §5, invariant 8: crash and reconcile)."""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from constellation.lightning import Outcome
from services.gateway import lightning
from services.gateway.lightning import ClnBackend
from services.lnsim.sim import Simulator, socket_path


@dataclass(frozen=True)
class Try:
    payee: str
    amount_msat: int
    lose_reply: bool
    hold: bool
    refuse: bool
    delay: bool
    payer_down: bool


tries = st.lists(
    st.builds(
        Try,
        payee=st.sampled_from(["b", "c"]),
        amount_msat=st.integers(1_000, 300_000_000),
        lose_reply=st.booleans(),
        hold=st.booleans(),
        refuse=st.booleans(),
        delay=st.booleans(),
        payer_down=st.integers(0, 9).map(lambda n: n == 0),
    ),
    min_size=1,
    max_size=6,
)


async def scenario(plan: list[Try]) -> None:
    sim = Simulator(Path(tempfile.mkdtemp(prefix="ln", dir="/tmp")), seed=5)
    await sim.mesh(["a", "b", "c"], 1_000_000, 3_000_000)
    payer = ClnBackend(socket_path(sim.directory, "a"))
    payees = {n: ClnBackend(socket_path(sim.directory, n)) for n in ("b", "c")}
    net = sim.network
    try:
        await payer.connect()
        for p in payees.values():
            await p.connect()
        said = []
        for i, t in enumerate(plan):
            inv = await payees[t.payee].create_invoice(t.amount_msat, f"t{i}", "x", 600)
            faults_b = net.nodes[t.payee].faults
            faults_b.hold, faults_b.fail_next = t.hold, int(t.refuse)
            faults_a = net.nodes["a"].faults
            faults_a.lose_replies, faults_a.delay_s = int(t.lose_reply), 0.05 * t.delay
            if t.payer_down:
                await sim.set_online("a", False)
            state = await payer.pay(inv.bolt11, 10_000, inv.payment_hash)
            said.append((t, inv, state.outcome))
            if t.payer_down:
                await sim.set_online("a", True)
            faults_a.lose_replies, faults_a.delay_s = 0, 0.0
            invoice_paid = net.nodes[t.payee].invoices[f"t{i}"].status == "paid"
            if state.outcome is Outcome.SETTLED:
                assert invoice_paid and state.preimage is not None
            if state.outcome is Outcome.FAILED:
                assert not invoice_paid and (inv.payment_hash, "a") not in {
                    (a.part.payment_hash, a.payer) for a in net.attempts.values()
                }
        for name in ("b", "c"):  # the faults end: what was held settles or fails now
            sim.release(name)
        for t, inv, outcome in said:
            truth = net.nodes[t.payee].invoices[inv.label].status == "paid"
            final = await payer.payment(inv.payment_hash)
            assert final.outcome in (Outcome.SETTLED, Outcome.FAILED, Outcome.UNKNOWN)
            assert (final.outcome is Outcome.SETTLED) == truth, (t, outcome, final)
            if outcome is Outcome.FAILED:
                assert not truth  # failed was final
            if final.outcome is Outcome.UNKNOWN:
                # the node has no record of an attempt: the call never reached it, or it
                # failed before trying a route (none for the amount), its reply perhaps lost
                assert not [p for p in net.nodes["a"].parts if p.payment_hash == inv.payment_hash]
        assert net.books()["missing_msat"] == 0
    finally:
        await sim.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tries)
def test_the_backend_s_verdicts_match_what_the_network_did(plan: list[Try]) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lightning, "PAY_S", 0.3)  # a held payment's call gives up soon
        asyncio.run(scenario(plan))
