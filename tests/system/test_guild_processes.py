"""kill -9 of each of an operator's supporting processes while its ledger takes payments:
its NATS server (every one of its processes and its peers' connections to it), Redis,
a signer, the indexer, the mint and PostgreSQL (its postmaster: the backends, each in
its own session, live on until they see it gone or its next start stops them), each
started again by the devnet's supervisor.

After each: every payment is committed and in the books (the workload checks that value
is conserved and its wallets' books, read from the index, equal the ledger), every copy
of every shard holds the same confirmed log and state root, every process of the
operator is ready again, and none logged an error. Then an operator's power lost (every
process of it killed at once) under payments between operators, and the operator
started again. The tests share one guild, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from services import devnet
from services.crossload import CrossWorkload, settled_books_agree
from services.devnet import Devnet, guild
from tests.system.guild import each_release_was_paid_for, errors_logged, local_guild, pay


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


@pytest.mark.parametrize("kind", ["redis", "signer-0", "indexer", "mint", "nats", "postgres"])
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
    assert not errors, "\n".join(errors[:3])


async def test_power_loss_of_an_operator_under_payments_between_operators(where: Path) -> None:
    """Every process of op2 killed at once (its supervisor first), while wallets at every
    operator pay each other; op2 started again: what was paid to and from it is released
    exactly once after paying, the books agree, and the copies converge."""
    out = io.StringIO()
    async with aiohttp.ClientSession() as s:
        work = CrossWorkload(guild.load(where), s, 6, out)
        await work.setup(4)
        paying = asyncio.create_task(work.run(120, 6, cross=True))
        await asyncio.sleep(1.0)
        op2 = guild.load(where)[2]
        status = devnet.read_status(Path(op2.dir))
        assert status is not None
        os.kill(status["pid"], signal.SIGKILL)  # no supervisor to start anything again
        for name, pid in op2.processes():
            with contextlib.suppress(ProcessLookupError):
                (os.killpg if name == "postgres" else os.kill)(pid, signal.SIGKILL)
        guild.lightning_faults(where, "op2", {"offline": True})  # its node went with it
        await paying
        await asyncio.to_thread(guild.start_operator, where, "op2")
        await work.run(60, 6, cross=True)
        left = await work.wait_released(180)
        print(out.getvalue(), dict(work.codes))
        assert left == 0, f"{left} outputs never released"
        assert await work.spendable()
        assert await settled_books_agree(guild.load(where), s, out, 60), out.getvalue()
    await each_release_was_paid_for(guild.load(where))
    by_shard = await asyncio.to_thread(guild.wait_converged, guild.load(where), 90)
    assert len(by_shard) == 6 and all(len(cs) == 6 for cs in by_shard.values())
    errors = errors_logged(where)
    assert not errors, "\n".join(errors[:3])
