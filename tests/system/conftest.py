"""Fixtures for the system tests: guilds of real processes, stopped after each test."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from services import devnet
from services.api_client import Gateway
from services.devnet import Devnet
from tests.system.guild import Guild
from tests.system.liar import Liar
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


@pytest.fixture
async def liar(where: Path) -> AsyncIterator[tuple[Liar, str]]:
    """A lying gateway in front of op0's (the module's guild, ``where``), and its URL."""
    op0 = Devnet.load(where / "op0")
    lie = Liar(op0.gateway_url, "op1")
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", lie.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    async with aiohttp.ClientSession() as session:
        lie.session = session
        yield lie, f"http://127.0.0.1:{port}"
    await runner.cleanup()
