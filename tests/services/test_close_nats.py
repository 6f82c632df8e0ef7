"""Closing a NATS connection whose server died, as services do on the way out (a guild
stopped one process at a time): against a real nats-server, under uvloop as services
run. A plain close raised there, and the task that closed it was said to have failed."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop
from nats.aio.client import Client

from services import devnet
from services.runtime import close_nats, connect_nats

PENDING = 100  # publishes left unflushed when the server dies
LOST_S = 0.05


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A nats-server's URL and pid (killed here if the test did not)."""
    port = devnet.free_port()
    argv = [devnet.nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)]
    pid = devnet.spawn(argv, dict(os.environ), tmp_path / "nats.log")
    devnet.wait_tcp(port, 10)
    yield f"nats://127.0.0.1:{port}", pid
    devnet.stop_pid(pid, 5)


async def _dead_with_pending(url: str, pid: int) -> Client:
    """A client connected to ``url``, its server then killed, publishes pending."""
    client = await connect_nats(url, "test-close")
    devnet.stop_pid(pid, 0, signal.SIGKILL)
    await asyncio.sleep(LOST_S)  # the client saw it: it is reconnecting
    for i in range(PENDING):
        await client.publish("test.close", str(i).encode())
    return client


@pytest.mark.parametrize("drain", [False, True], ids=["close", "drain"])
def test_a_connection_whose_server_died_closes_without_raising(
    server: tuple[str, int], drain: bool
) -> None:
    url, pid = server

    async def run() -> Client:
        client = await _dead_with_pending(url, pid)
        await close_nats(client, drain=drain)
        return client

    client = uvloop.run(run())
    assert client.is_closed  # it no longer reconnects to the dead server


def test_a_plain_close_after_the_server_died_raises_under_uvloop(
    server: tuple[str, int],
) -> None:
    """What ``close_nats`` is for: if nats-py or uvloop stop raising here, it can go."""
    url, pid = server

    async def run() -> None:
        client = await _dead_with_pending(url, pid)
        await client.close()

    with pytest.raises(RuntimeError, match="handler is closed"):
        uvloop.run(run())
