"""``python -m services.lnsim`` as a process: its nodes' sockets answer pyln-client, its
control API sets faults, its ops port says how it is, and SIGTERM stops it cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyln.client import LightningRpc, RpcError

from constellation.lightning import Outcome
from services.devnet.procs import free_port, wait_ready
from services.gateway.lightning import ClnBackend
from services.lnsim.sim import socket_path


class Proc:
    def __init__(self, directory: Path, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.directory, self.port, self.proc = directory, port, proc

    def call(self, method: str, path: str, doc: Any = None) -> Any:
        data = json.dumps(doc).encode() if doc is not None else None
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, method=method
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            body = r.read().decode()
        return json.loads(body) if body.startswith(("{", "[")) else body


@pytest.fixture(scope="module")
def lnsim() -> Iterator[Proc]:
    directory = Path(tempfile.mkdtemp(prefix="lns", dir="/tmp"))
    port = free_port()
    env = {
        **os.environ,
        "LNSIM_DIR": str(directory),
        "LNSIM_NODES": "op0,op1,op2",
        "LNSIM_CHANNEL_SAT": "1000000",
        "LNSIM_BLOCK_S": "1",
        "LNSIM_HTTP_ADDR": f"127.0.0.1:{port}",
    }
    proc = subprocess.Popen([sys.executable, "-m", "services.lnsim"], env=env)
    try:
        wait_ready(port, proc.pid, 30)
        yield Proc(directory, port, proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_bad_configuration_is_refused_with_its_reason() -> None:
    env = {**os.environ, "LNSIM_DIR": "/tmp", "LNSIM_NODES": "a,a"}
    done = subprocess.run(
        [sys.executable, "-m", "services.lnsim"],
        check=False,
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 2 and b"LNSIM_NODES" in done.stderr


async def test_every_node_answers_pyln_and_pays_across_the_mesh(lnsim: Proc) -> None:
    nodes = lnsim.call("GET", "/v1/nodes")
    assert [n["name"] for n in nodes] == ["op0", "op1", "op2"] and all(n["online"] for n in nodes)
    rpc = LightningRpc(str(socket_path(lnsim.directory, "op0")))
    info = await asyncio.to_thread(rpc.getinfo)
    assert info["id"] == nodes[0]["id"] and info["num_active_channels"] == 2
    op0 = ClnBackend(socket_path(lnsim.directory, "op0"))
    op2 = ClnBackend(socket_path(lnsim.directory, "op2"))
    await op0.connect()
    await op2.connect()
    inv = await op2.create_invoice(123_000, "settle:1", "a settlement", 600)
    assert (await op0.pay(inv.bolt11, 0)).outcome is Outcome.SETTLED
    # faults over the control API: a payee that fails, then one that holds
    lnsim.call("POST", "/v1/faults/op2", {"fail_next": 1})
    inv2 = await op2.create_invoice(1_000, "settle:2", "x", 600)
    assert (await op0.pay(inv2.bolt11, 0)).outcome is Outcome.FAILED
    assert (await op0.pay(inv2.bolt11, 0)).outcome is Outcome.SETTLED
    lnsim.call("POST", "/v1/faults/op2", {"hold": True})
    inv3 = await op2.create_invoice(2_000, "settle:3", "x", 600)
    paying = asyncio.ensure_future(op0.pay(inv3.bolt11, 0))
    await asyncio.sleep(0.3)
    assert (await op0.payment(inv3.payment_hash)).outcome is Outcome.PENDING
    lnsim.call("POST", "/v1/release/op2", {})
    assert (await asyncio.wait_for(paying, 10)).outcome is Outcome.SETTLED
    lnsim.call("POST", "/v1/faults/op1", {"offline": True})
    assert not os.path.exists(socket_path(lnsim.directory, "op1"))
    with pytest.raises(RpcError):  # op1 is down: op0 cannot reach it
        await asyncio.to_thread(rpc.call, "connect", {"id": nodes[1]["id"]})
    lnsim.call("POST", "/v1/faults/op1", {"offline": False})
    assert os.path.exists(socket_path(lnsim.directory, "op1"))
    assert lnsim.call("GET", "/v1/books")["missing_msat"] == 0
    with pytest.raises(urllib.error.HTTPError) as bad:
        lnsim.call("POST", "/v1/faults/op0", {"hold": "yes"})
    assert bad.value.code == 400
    with pytest.raises(urllib.error.HTTPError) as unknown:
        lnsim.call("POST", "/v1/faults/op9", {"hold": True})
    assert unknown.value.code == 404
    height = lnsim.call("POST", "/v1/mine", {"blocks": 3})["height"]
    assert height >= 104
    metrics = lnsim.call("GET", "/metrics")
    assert 'lnsim_payments{node="op0",status="complete"} 3.0' in metrics
    assert "lnsim_books_missing_msat 0.0" in metrics


async def test_a_node_joins_with_a_channel_to_every_node_and_pays(lnsim: Proc) -> None:
    joined = lnsim.call("POST", "/v1/nodes/op3", {})
    assert joined["socket"] == str(socket_path(lnsim.directory, "op3"))
    op3 = ClnBackend(socket_path(lnsim.directory, "op3"))
    await op3.connect()
    info = await asyncio.to_thread(LightningRpc(joined["socket"]).getinfo)
    assert info["id"] == joined["id"] and info["num_active_channels"] == 3
    op1 = ClnBackend(socket_path(lnsim.directory, "op1"))
    await op1.connect()
    inv = await op3.create_invoice(50_000, "settle:join", "to the joiner", 600)
    assert (await op1.pay(inv.bolt11, 0)).outcome is Outcome.SETTLED
    assert lnsim.call("GET", "/v1/books")["missing_msat"] == 0
    for bad, code in [("op3", 409), ("no%20such", 400)]:
        with pytest.raises(urllib.error.HTTPError) as refused:
            lnsim.call("POST", f"/v1/nodes/{bad}", {})
        assert refused.value.code == code


def test_sigterm_stops_it_cleanly(lnsim: Proc) -> None:
    lnsim.proc.send_signal(signal.SIGTERM)
    assert lnsim.proc.wait(timeout=15) == 0
    assert not os.path.exists(socket_path(lnsim.directory, "op0"))


def _started(directory: Path, port: int, nodes: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "LNSIM_DIR": str(directory),
        "LNSIM_NODES": nodes,
        "LNSIM_CHANNEL_SAT": "1000000",
        "LNSIM_BLOCK_S": "0",
        "LNSIM_HTTP_ADDR": f"127.0.0.1:{port}",
    }
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.lnsim"], env=env, stdout=out, stderr=out
        )
    wait_ready(port, proc.pid, 30)
    return proc


async def test_a_restart_keeps_the_network_as_lightningd_keeps_its_state() -> None:
    """SIGTERM, then start again: the same nodes, channels, wallets, invoices and
    payments (a devnet stopped and started again keeps its Lightning balances with its
    ledgers' coins); a node named since joins; a long poll open at the stop is dropped
    without an error."""
    directory = Path(tempfile.mkdtemp(prefix="lns", dir="/tmp"))  # unix socket paths: short
    port, log = free_port(), directory / "lnsim.log"
    proc = _started(directory, port, "op0,op1", log)
    lnsim = Proc(directory, port, proc)
    try:
        op0 = ClnBackend(socket_path(directory, "op0"))
        op1 = ClnBackend(socket_path(directory, "op1"))
        await op0.connect()
        await op1.connect()
        inv = await op1.create_invoice(42_000, "kept", "a payment kept", 600)
        assert (await op0.pay(inv.bolt11, 0)).outcome is Outcome.SETTLED
        lnsim.call("POST", "/v1/fund/op1", {"sat": 5_000})
        before = (lnsim.call("GET", "/v1/nodes"), lnsim.call("GET", "/v1/books"))
        rpc = LightningRpc(str(socket_path(directory, "op1")))
        polling = asyncio.ensure_future(asyncio.to_thread(rpc.waitanyinvoice, 1, 30))
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        with pytest.raises((RpcError, OSError, ValueError)):  # the connection was dropped
            await asyncio.wait_for(polling, 10)

        lnsim.proc = proc = _started(directory, port, "op0,op1", log)
        assert (lnsim.call("GET", "/v1/nodes"), lnsim.call("GET", "/v1/books")) == before
        op0, op1 = (
            ClnBackend(socket_path(directory, "op0")),
            ClnBackend(socket_path(directory, "op1")),
        )
        await op0.connect()
        await op1.connect()
        assert (await op0.payment(inv.payment_hash)).outcome is Outcome.SETTLED
        paid = await asyncio.to_thread(rpc.listinvoices, "kept")
        assert [i["status"] for i in paid["invoices"]] == ["paid"]
        again = await op1.create_invoice(7_000, "after", "a payment after", 600)
        assert (await op0.pay(again.bolt11, 0)).outcome is Outcome.SETTLED
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0

        lnsim.proc = proc = _started(directory, port, "op0,op1,op2", log)
        nodes = lnsim.call("GET", "/v1/nodes")
        assert [n["id"] for n in nodes[:2]] == [n["id"] for n in before[0]]
        info = await asyncio.to_thread(LightningRpc(nodes[2]["socket"]).getinfo)
        assert nodes[2]["name"] == "op2" and info["num_active_channels"] == 2
        assert lnsim.call("GET", "/v1/books")["missing_msat"] == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "unhandled error" not in log.read_text(errors="replace")
