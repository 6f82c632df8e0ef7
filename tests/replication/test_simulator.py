"""The guild simulator (``tests/sim``) over many seeds: every invariant after every
event, under the fault schedules of ``notes/replication.md`` §6.

``CST_SIM_SEEDS`` (default 300) seeds of a 3-operator guild, a sixth as many of a
4-operator guild, a fifth as many of the real ledger (``tests/sim/ledger.py``: two
workers' shards, two-phase commit across them), a tenth as many each of a fourth
operator joining and of one of three leaving, and a twentieth as many each of a fourth
joining then leaving and of one leaving the real ledger run in CI; a long hunt runs
``python -m tests.sim --seeds N [--operators 4] [--ledger] [--change join|leave|join-leave]``.
A seed that ever failed goes into ``regressions.txt`` (seed, operators, kind: "ledger",
"join", "leave", "join-leave" or "ledger-leave").
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.sim.guild import Guild, Violation, replay_command
from tests.sim.ledger import LedgerGuild

SEEDS = int(os.environ.get("CST_SIM_SEEDS", "300"))
REGRESSIONS = [
    (int(seed), int(operators), kind)
    for seed, operators, kind in (
        [*line.split(), "replication"][:3]
        for line in (Path(__file__).parent / "regressions.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
]
CASES = sorted(
    {(seed, 3, "replication") for seed in range(SEEDS)}
    | {(10_000 + seed, 4, "replication") for seed in range(SEEDS // 6)}
    | {(20_000 + seed, 3, "ledger") for seed in range(SEEDS // 5)}
    | {(30_000 + seed, 3, "join") for seed in range(SEEDS // 10)}
    | {(40_000 + seed, 3, "leave") for seed in range(SEEDS // 10)}
    | {(60_000 + seed, 3, "join-leave") for seed in range(SEEDS // 20)}
    | {(50_000 + seed, 3, "ledger-leave") for seed in range(SEEDS // 20)}
    | set(REGRESSIONS)
)


@pytest.mark.parametrize(("seed", "operators", "kind"), CASES)
def test_the_guild_keeps_every_invariant_under_faults(seed: int, operators: int, kind: str) -> None:
    ledger = kind.startswith("ledger")
    change = kind.removeprefix("ledger").strip("-") if kind != "replication" else ""
    guild = (LedgerGuild if ledger else Guild)(seed, operators=operators, change=change)
    try:
        guild.run()
    except Violation as exc:
        faults = "\n".join(guild.log[-30:])
        replay = replay_command(seed, operators, ledger, change)
        pytest.fail(f"{exc}\nreplay: {replay}\n{faults}")
    if isinstance(guild, LedgerGuild):
        assert any(p.done for p in guild.payments.values()), "no payment was answered"
        assert guild.outbound > 0, "no payment paid another ledger"
    else:
        assert guild.acked, "no payment was acknowledged"
