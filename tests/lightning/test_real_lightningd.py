"""The backend against a real ``lightningd`` on regtest, where Core Lightning and Bitcoin
Core are installed (``lightningd`` and ``bitcoind`` on the PATH); skipped elsewhere.
It keeps the simulated network's shapes honest: the same calls, the same fields."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from constellation.lightning import Outcome
from services.devnet.procs import free_port
from services.gateway.lightning import ClnBackend, LightningError

pytestmark = pytest.mark.skipif(
    not (shutil.which("lightningd") and shutil.which("bitcoind")),
    reason="Core Lightning and Bitcoin Core are not installed (lightningd, bitcoind)",
)
USER, PASSWORD = "cst", "cst-regtest"


def bitcoin_rpc(port: int, method: str, *params: Any, wallet: str = "") -> Any:
    body = json.dumps({"jsonrpc": "1.0", "id": "t", "method": method, "params": list(params)})
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/" + (f"wallet/{wallet}" if wallet else ""),
        data=body.encode(),
        headers={"Authorization": f"Basic {auth}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)["result"]


def wait(condition: Any, what: str, timeout_s: float = 60) -> None:
    end = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except OSError:
            pass
        assert time.monotonic() < end, f"{what}: not within {timeout_s} s"
        time.sleep(0.2)


@pytest.fixture
async def node() -> AsyncIterator[ClnBackend]:
    root = Path(tempfile.mkdtemp(prefix="cln", dir="/tmp"))
    rpc_port = free_port()
    bitcoind = subprocess.Popen(
        [
            "bitcoind",
            "-regtest",
            f"-datadir={root}",
            "-server",
            f"-rpcuser={USER}",
            f"-rpcpassword={PASSWORD}",
            f"-rpcport={rpc_port}",
            f"-port={free_port()}",
            "-listen=0",
            "-fallbackfee=0.0002",
        ],
        stdout=subprocess.DEVNULL,
    )
    lightningd = None
    try:
        wait(lambda: bitcoin_rpc(rpc_port, "getblockchaininfo"), "bitcoind")
        bitcoin_rpc(rpc_port, "createwallet", "miner")
        address = bitcoin_rpc(rpc_port, "getnewaddress", wallet="miner")
        bitcoin_rpc(rpc_port, "generatetoaddress", 101, address)
        ln_dir = root / "ln"
        lightningd = subprocess.Popen(
            [
                "lightningd",
                "--network=regtest",
                f"--lightning-dir={ln_dir}",
                f"--bitcoin-datadir={root}",
                f"--bitcoin-rpcuser={USER}",
                f"--bitcoin-rpcpassword={PASSWORD}",
                f"--bitcoin-rpcport={rpc_port}",
                "--bitcoin-rpcconnect=127.0.0.1",
                f"--addr=127.0.0.1:{free_port()}",
                f"--log-file={root / 'lightningd.log'}",
            ],
            stdout=subprocess.DEVNULL,
        )
        socket = ln_dir / "regtest" / "lightning-rpc"
        wait(socket.exists, "lightningd's socket")
        backend = ClnBackend(socket)
        await backend.connect()
        yield backend
    finally:
        for proc in (lightningd, bitcoind):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)


async def test_the_backend_s_calls_have_lightningd_s_shapes(node: ClnBackend) -> None:
    info = await node.info()
    assert info.network == "regtest" and info.blockheight >= 101
    assert node.version >= (23, 5)
    inv = await node.create_invoice(1_000, f"test-{os.getpid()}", "a test", 600)
    assert inv.status == "unpaid" and inv.bolt11.startswith("lnbcrt")
    assert await node.create_invoice(1_000, inv.label, "a test", 600) == inv
    assert await node.cancel_invoice(inv.label) is True
    assert await node.invoice(inv.label) is None
    address = await node.new_address()
    assert address.startswith("bcrt1p")
    balances = await node.balances()
    assert balances.lightning_local_msat == 0 and await node.channels() == []
    unknown = hashlib.sha256(b"never paid").digest()
    assert (await node.payment(unknown)).outcome is Outcome.UNKNOWN  # asked, nothing seen
    assert (await node.pay("lnbcrt1garbage", 0)).outcome is Outcome.FAILED
    with pytest.raises(LightningError):
        await node.withdraw(address, 10**9)  # an empty wallet cannot
