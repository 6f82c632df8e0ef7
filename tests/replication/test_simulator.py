"""The guild simulator (``tests/sim``) over many seeds: every invariant after every
event, under the fault schedules of ``notes/replication.md`` §6.

``CST_SIM_SEEDS`` (default 300) seeds of a 3-operator guild and a sixth as many of a
4-operator guild run in CI; a long hunt runs ``python -m tests.sim --seeds N``. A seed
that ever failed goes into ``regressions.txt``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.sim.guild import Guild, Violation, replay_command

SEEDS = int(os.environ.get("CST_SIM_SEEDS", "300"))
REGRESSIONS = [
    tuple(int(x) for x in line.split())
    for line in (Path(__file__).parent / "regressions.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]
CASES = sorted(
    {(seed, 3) for seed in range(SEEDS)}
    | {(10_000 + seed, 4) for seed in range(SEEDS // 6)}
    | set(REGRESSIONS)
)


@pytest.mark.parametrize(("seed", "operators"), CASES)
def test_the_guild_keeps_every_invariant_under_faults(seed: int, operators: int) -> None:
    guild = Guild(seed, operators=operators)
    try:
        guild.run()
    except Violation as exc:
        faults = "\n".join(guild.log[-30:])
        pytest.fail(f"{exc}\nreplay: {replay_command(seed, operators)}\n{faults}")
    assert guild.acked, "no payment was acknowledged"
