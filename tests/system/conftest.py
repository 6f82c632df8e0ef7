"""Fixtures for the system tests: guilds of real processes, stopped after each test."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from services import devnet
from services.api_client import Gateway
from tests.system.guild import Guild
from tests.system.operator import Operator

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


@pytest.fixture
async def gw(op: Operator) -> AsyncIterator[Gateway]:
    """The gateway of the module's operator (its ``op`` fixture)."""
    async with aiohttp.ClientSession() as session:
        yield Gateway(op.url, session)


@pytest.fixture
def devnet_root() -> Iterator[Path]:
    """A folder for devnets that PostgreSQL's own user can reach (pytest's tmp_path is
    private to root where the tests run as root); running devnets in it are stopped."""
    path = Path(tempfile.mkdtemp(prefix="cst-devnets-"))
    path.chmod(0o755)
    yield path
    for state in path.glob("*/devnet.json"):
        if state.parent.exists():
            devnet.down(state.parent, purge=True)
    shutil.rmtree(path, ignore_errors=True)
