"""Fixtures for the system tests: guilds of real processes, stopped after each test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.system.guild import Guild

GuildFactory = Callable[..., Guild]


@pytest.fixture
def guild_factory(tmp_path: Path) -> Iterator[GuildFactory]:
    made: list[Guild] = []

    def make(n: int, faults: dict[int, str] | None = None, timeout_ms: int = 30_000) -> Guild:
        guild = Guild(tmp_path / f"guild-{len(made)}", n, faults, timeout_ms)
        made.append(guild)
        return guild

    yield make
    for guild in made:
        guild.close()
