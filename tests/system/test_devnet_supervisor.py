"""A supervised devnet: a process killed with ``kill -9`` comes back on its port, the
restart is logged and counted by ``devnet status``, and ``devnet down`` leaves nothing."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import time
from contextlib import redirect_stdout
from pathlib import Path

import aiohttp
import asyncpg

from constellation.address import Network, encode_address
from constellation.keys import SigningKey
from services import devnet
from services.api_client import Gateway
from services.cli import main
from tests.system.operator import Operator

KILLED = ("worker-0", "gateway", "indexer")
# minutes of CPU in one backend, which waits for nothing (a set-returning function in the
# select list streams its rows: nothing goes to disk)
BUSY = "SELECT count(*) FROM (SELECT generate_series(1, 10000000000::bigint)) AS s"


def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


async def test_killed_processes_come_back_and_down_stops_everything() -> None:
    op = Operator(workers=2, supervise=True)
    directory = Path(op.net.dir)
    supervisor = devnet.read_status(directory)
    assert supervisor is not None and supervisor["state"] == "running"
    supervisor_pid = supervisor["pid"]
    try:
        for name in KILLED:
            old = op.pid(name)
            os.kill(old, signal.SIGKILL)
            new = op.wait_restarted(name, old)  # alive and /readyz 200 on the same port
            assert new != old and not devnet.alive(old)
        async with aiohttp.ClientSession() as session:  # the ledger works through them
            await op.fund(Gateway(op.url, session), SigningKey(os.urandom(32)), 5_000, worker=0)

        lines = [json.loads(line) for line in (directory / devnet.LOG_FILE).open()]
        restarts = {line["proc"]: line for line in lines if line["event"] == "restarted"}
        assert set(restarts) == set(KILLED)
        for name, line in restarts.items():
            assert line["service"] == "devnet-supervisor" and line["exit"] == "SIGKILL"
            assert line["restarts"] == 1 and line["backoff_s"] == devnet.DEVNET_POLICY.initial_s
            assert line["pid"] == op.pid(name) != line["old_pid"]

        # A frozen process is alive: it is shown as frozen, never restarted.
        op.freeze(1)
        frozen_pid = op.worker_pid(1)
        time.sleep(1)
        st = op.status()
        procs = {p.name: p for p in st.processes}
        assert procs["worker-1"].state == "frozen" and procs["worker-1"].restarts == 0
        assert op.worker_pid(1) == frozen_pid
        op.thaw(1)

        code, out = cli("devnet", "status", "--dir", str(directory))
        assert code == 0, out
        assert f"supervisor pid {supervisor_pid} running" in out
        rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
        assert set(rows) == {name for name, _ in op.net.processes()}
        for name, row in rows.items():
            pid, state, count, last_exit = row[1:5]
            assert pid == str(op.pid(name)) and state == "up", row
            assert (count, last_exit) == (("1", "SIGKILL") if name in KILLED else ("0", "-"))
        code, out = cli("devnet", "status", "--json", "--dir", str(directory))
        doc = json.loads(out)
        assert code == 0 and doc["supervisor"] == "running" and doc["supervisor_pid"] > 0
        counted = {p["name"]: p["restarts"] for p in doc["processes"]}
        assert counted == {name: int(name in KILLED) for name, _ in op.net.processes()}
    finally:
        net = op.refresh()
        every = {supervisor_pid, *(pid for _, pid in net.processes())}
        every |= {p for pid in list(every) for p in devnet.child_pids(pid)}  # PostgreSQL's
        op.close()
    assert not [pid for pid in every if devnet.alive(pid)]


async def test_postgresql_killed_alone_comes_back_though_a_backend_still_runs() -> None:
    """kill -9 of PostgreSQL's postmaster alone: a backend busy in a query does not see
    it gone until it next waits, attached to the dead server's shared memory meanwhile,
    and a new postmaster refuses to start beside it. The supervisor's restart stops it
    first (``clear_stale_lock``): PostgreSQL is back at its first restart, and the
    gateway reads its index again."""
    op = Operator(workers=1, supervise=True)
    try:
        conn = await asyncpg.connect(op.net.database_url)
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        busy = asyncio.create_task(conn.fetchval(BUSY))
        await asyncio.sleep(0.5)  # it runs
        old = op.pid("postgres")
        os.kill(old, signal.SIGKILL)
        new = await asyncio.to_thread(op.wait_restarted, "postgres", old, 30)
        assert not devnet.alive(backend)
        with contextlib.suppress(asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
            await busy  # its connection went with its backend
        # the pids file names the new postmaster before supervisor.json counts it
        deadline = time.monotonic() + 10
        while {p.name: p.restarts for p in op.status().processes}["postgres"] != 1:
            assert time.monotonic() < deadline, op.status().processes
            await asyncio.sleep(0.05)
        address = encode_address(bytes(SigningKey(os.urandom(32)).pubkey), Network.REGTEST)
        end = time.monotonic() + 30
        async with aiohttp.ClientSession() as session:  # its index answers again
            while True:
                async with session.get(f"{op.url}/v1/address/{address}/history") as r:
                    if r.status == 200:
                        break
                    assert time.monotonic() < end, (r.status, await r.text())
                await asyncio.sleep(0.3)
        assert devnet.alive(new) and op.pid("postgres") == new
    finally:
        op.close()
