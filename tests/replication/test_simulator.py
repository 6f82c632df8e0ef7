"""The guild simulator (``tests/sim``) over many seeds: every invariant after every
event, under the fault schedules of ``notes/replication.md`` §6.

``CST_SIM_SEEDS`` (default 300) seeds of a 3-operator guild, a sixth as many of a
4-operator guild and a fifth as many of the real ledger (``tests/sim/ledger.py``: two
workers' shards, two-phase commit across them) run in CI; a long hunt runs
``python -m tests.sim --seeds N [--operators 4] [--ledger]``. A seed that ever failed
goes into ``regressions.txt``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.sim.guild import Guild, Violation, replay_command
from tests.sim.ledger import LedgerGuild

SEEDS = int(os.environ.get("CST_SIM_SEEDS", "300"))
REGRESSIONS = [
    (int(seed), int(operators), kind == "ledger")
    for seed, operators, kind in (
        [*line.split(), "replication"][:3]
        for line in (Path(__file__).parent / "regressions.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
]
CASES = sorted(
    {(seed, 3, False) for seed in range(SEEDS)}
    | {(10_000 + seed, 4, False) for seed in range(SEEDS // 6)}
    | {(20_000 + seed, 3, True) for seed in range(SEEDS // 5)}
    | set(REGRESSIONS)
)


@pytest.mark.parametrize(("seed", "operators", "ledger"), CASES)
def test_the_guild_keeps_every_invariant_under_faults(
    seed: int, operators: int, ledger: bool
) -> None:
    guild = (LedgerGuild if ledger else Guild)(seed, operators=operators)
    try:
        guild.run()
    except Violation as exc:
        faults = "\n".join(guild.log[-30:])
        pytest.fail(f"{exc}\nreplay: {replay_command(seed, operators, ledger)}\n{faults}")
    if isinstance(guild, LedgerGuild):
        assert any(p.done for p in guild.payments.values()), "no payment was answered"
        assert guild.outbound > 0, "no payment paid another ledger"
    else:
        assert guild.acked, "no payment was acknowledged"
