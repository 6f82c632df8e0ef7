"""``python -m services.operator`` as a process, against the API emulator: ready once it
watches, ``kill -9`` while it works and started again, it finishes the job (and mends
what went missing meanwhile); SIGTERM stops it cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from services.devnet.procs import free_port, ready
from tests.operator.conftest import (
    NS,
    WORKLOADS,
    Api,
    all_exist,
    eventually,
    example,
    phase_is,
)


def _start(server: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "OPERATOR_KUBE_SERVER": server,
        "OPERATOR_HTTP_ADDR": f"127.0.0.1:{port}",
        "OPERATOR_RESYNC_S": "1",
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services.operator"], env=env, stdout=out, stderr=out
        )


async def test_the_operator_process_survives_kill_9(api: Api, tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "operator.log"
    first = _start(api.url, port, log)
    try:
        await eventually(lambda: ready(port), "the operator is ready")
        keys, peers, guild = example()
        await api.secret(keys)
        await api.secret(peers)
        await api.create_guild(guild)
        await eventually(lambda: api.kube.get("StatefulSet", NS, "g1-nats"), "it works")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    # It was killed mid-work; while none runs, a machine's StatefulSet goes too.
    await api.kube.delete("StatefulSet", NS, "g1-machine-0")
    second = _start(api.url, port, log)
    try:
        await eventually(lambda: all_exist(api, WORKLOADS), "the machine is back")
        await api.settle(WORKLOADS)
        await eventually(lambda: phase_is(api, "Running"), "the Guild is Running")
        assert ready(port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
            assert 'operator_reconciles_total{phase="Running"}' in r.read().decode()
    finally:
        second.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(second.wait, 30)
    assert code == 0, log.read_text()[-2000:]
    assert '"stopped"' in log.read_text()
