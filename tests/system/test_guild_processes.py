"""kill -9 of each of an operator's supporting processes while its ledger takes payments:
its NATS server (every one of its processes and its peers' connections to it), Redis,
a signer, the indexer and the mint, each started again by the devnet's supervisor.

After each: every payment is committed and in the books (the workload checks that value
is conserved and its wallets' books, read from the index, equal the ledger), every copy
of every shard holds the same confirmed log and state root, every process of the
operator is ready again, and none logged an error. The tests share one guild, in order.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.devnet import Devnet, guild
from tests.system.guild import errors_logged, local_guild, pay


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    with local_guild("cst-procs-") as directory:
        yield directory


def op1(where: Path) -> Devnet:
    return guild.load(where)[1]  # the current pids (its supervisor restarts what dies)


def not_ready(net: Devnet) -> dict[str, str]:
    """Each of ``net``'s processes that is not ready, and why."""
    found: dict[str, str] = {}
    for name, port in net.ops_ports():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5):
                pass
        except urllib.error.HTTPError as e:
            found[name] = f"{e.code} {e.read().decode()[:200]}"
        except OSError as e:
            found[name] = repr(e)
    return found


@pytest.mark.parametrize("kind", ["redis", "signer-0", "indexer", "mint", "nats"])
async def test_kill_9_of_a_process_under_payments_loses_nothing(where: Path, kind: str) -> None:
    net = op1(where)
    pid = net.pid_of(kind)
    paying = asyncio.create_task(pay(net, 300))
    await asyncio.sleep(1.0)
    os.kill(pid, signal.SIGKILL)
    assert await paying
    by_shard = await asyncio.to_thread(guild.wait_converged, guild.load(where), 90)
    assert len(by_shard) == 6 and all(len(cs) == 6 for cs in by_shard.values())
    end = time.monotonic() + 60
    while op1(where).pid_of(kind) in (0, pid):  # started again
        assert time.monotonic() < end, f"{kind} not started again"
        await asyncio.sleep(0.5)
    while waiting := await asyncio.to_thread(not_ready, op1(where)):
        assert time.monotonic() < end, waiting
        await asyncio.sleep(0.5)
    assert await pay(op1(where), 60)  # and it takes payments as before
    errors = errors_logged(where)
    assert not errors, errors[:3]
