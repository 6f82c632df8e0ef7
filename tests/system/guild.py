"""A real local guild for system tests and benchmarks: nats-server and signer processes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from pyln.client import LightningRpc

from constellation.address import Network, decode_destination
from constellation.guild import SignTarget
from constellation.lightning import msat
from constellation.protocol import signer as proto
from services import devnet
from services.api_client import Gateway
from services.cli import main as cli_main
from services.devnet import Devnet
from services.signer.client import SignerClient, call
from services.signer.config import load_members
from services.signer.store import KeyStore
from services.workload import run_workload

FAULTY = Path(__file__).with_name("faulty_signer.py")


class Guild:
    def __init__(
        self, directory: Path, n: int, faults: dict[int, str] | None, timeout_ms: int
    ) -> None:
        self.faults = faults or {}
        self.net = devnet.create(directory, n, "test", workers=0)
        self.net.request_timeout_ms = timeout_ms
        self.frozen: set[int] = set()
        devnet.start_nats(self.net)
        for proc in self.net.signers:
            self.start(proc.index)
        self.members = load_members(self.net.members_path)

    @property
    def n(self) -> int:
        return len(self.net.signers)

    def start(self, i: int, fault: str | None = None) -> None:
        fault = self.faults.get(i) if fault is None else fault
        argv = [sys.executable, str(FAULTY), fault] if fault else None
        devnet.start_signer(self.net, self.net.signers[i], argv)

    def identity(self, i: int) -> bytes:
        proc = self.net.signers[i]
        return KeyStore(Path(proc.state_dir), bytes.fromhex(proc.storage_key)).load_identity()

    async def request(self, request: proto.OpRequest, operator: int = 0) -> proto.OpReply:
        """``operator``'s request to its own signer."""
        return await call(self.net.signer_access(operator), request, 60)

    async def keygen(self, t: int, operator: int = 0) -> proto.OpReply:
        return await self.request(proto.KeygenRequest(t), operator)

    async def sign(self, target: SignTarget, operator: int = 0, key: bytes = b"") -> proto.OpReply:
        return await self.request(proto.SignRequest(target, key=key), operator)

    def client(self, operator: int = 0) -> SignerClient:
        return SignerClient(self.net.signer_access(operator))

    def pid(self, i: int) -> int:
        return self.net.signers[i].pid

    def freeze(self, i: int) -> None:
        os.kill(self.pid(i), signal.SIGSTOP)
        self.frozen.add(i)

    def kill(self, i: int) -> None:
        os.kill(self.pid(i), signal.SIGKILL)
        os.waitpid(self.pid(i), 0)

    def stop(self, i: int) -> None:
        devnet.stop_pid(self.pid(i), 10)

    def http(self, i: int, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.net.signers[i].http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, i: int, name: str) -> float:
        _, text = self.http(i, "/metrics")
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def log(self, i: int) -> str:
        return (Path(self.net.signers[i].state_dir) / "signer.log").read_text()

    def close(self) -> None:
        for i in self.frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid(i), signal.SIGCONT)
        for proc in self.net.signers:
            devnet.stop_pid(proc.pid, 5)
        devnet.stop_pid(self.net.nats_pid, 5)


@contextlib.contextmanager
def local_guild(
    prefix: str, operators: int = 3, neighbours: int = 0, machines: int = 2
) -> Iterator[Path]:
    """A local guild of ``operators`` operators with 2 workers and ``machines`` machines
    each, and a neighbouring guild of ``neighbours`` (``services.devnet.guild``), up for
    the block, in a fresh directory."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)  # PostgreSQL runs as its own user where tests run as root
    devnet.guild.up(root / "g", operators, 2, "test", neighbours, machines)
    try:
        yield root / "g"
    finally:
        devnet.guild.down(root / "g")
        shutil.rmtree(root, ignore_errors=True)


def errors_logged(where: Path) -> list[str]:
    """Every line a process of the guild in ``where`` logged at level error, by log: its
    fields but the traceback, then the traceback's last lines (where it was raised)."""
    found = []
    for log in where.rglob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if '"level": "error"' not in line:
                continue
            try:
                fields = json.loads(line)
            except ValueError:  # cut short as its process died
                found.append(f"{log.relative_to(where)}: {line[:2000]}")
                continue
            trace = "\n".join(str(fields.pop("exc", "")).splitlines()[-12:])
            found.append(f"{log.relative_to(where)}: {fields}\n{trace}")
    return found


async def pay(net: Devnet, payments: int = 150, via: Devnet | None = None) -> bool:
    """A workload on ``net``'s ledger, at its gateway or at ``via``'s; its report goes to
    the test's output."""
    out = io.StringIO()
    ok = await run_workload(net, 6, 6, payments, 16, out, via)
    where = f" through {via.operator}'s gateway" if via else ""
    print(f"-- payments at {net.operator}{where}:\n{out.getvalue()}")
    return ok


async def kill_the_leader_under_payments(
    where: Path, shard: str, payments: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``kill -9`` of ``shard``'s leader (a copy of its owner's) while its owner's ledger
    takes payments: its twin leads next, and every payment is in the books. The old
    leader's and the new one's rows (``devnet.guild.copies``)."""
    owner = shard.split("/", maxsplit=1)[0]
    lead = devnet.guild.leader(devnet.guild.load(where), shard)
    assert lead is not None and lead["operator"] == owner
    net = next(n for n in devnet.guild.load(where) if n.operator == owner)
    paying = asyncio.create_task(pay(net, payments))
    await asyncio.sleep(0.5)
    os.kill(lead["pid"], signal.SIGKILL)
    new = await asyncio.to_thread(
        devnet.guild.wait_new_leader, devnet.guild.load(where), shard, lead["confirmed"]
    )
    assert new["operator"] == owner and new["copy"] == 1 - lead["copy"]  # the twin
    assert await paying
    return lead, new


async def cli(*argv: str) -> tuple[int, str]:
    """``constellation ARGV``, its exit code and what it printed."""

    def run() -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = cli_main(list(argv))
        return code, out.getvalue()

    return await asyncio.to_thread(run)


async def each_release_was_paid_for(nets: list[Devnet]) -> None:
    """At every payee: each batch that released outputs has its invoice paid, once, for
    exactly their sum; every output is released in one batch; the node was paid nothing
    under a settlement label that released nothing."""
    for net in nets:
        conn = await asyncpg.connect(net.database_url)
        try:
            rows = await conn.fetch(
                "SELECT peer, batch, sum(value_msat) AS msat, count(*) AS n,"
                " bool_and(released_at IS NOT NULL) AS released FROM settle_pending"
                " GROUP BY peer, batch"
            )
        finally:
            await conn.close()
        released = {(r["peer"], r["batch"]): int(r["msat"]) for r in rows}
        assert all(r["released"] and r["batch"] is not None for r in rows), rows
        node = LightningRpc(net.lightning_rpc)
        paid: dict[tuple[str, int], int] = {}
        for inv in node.listinvoices()["invoices"]:
            parts = inv["label"].split(":")
            if parts[0] == "settle" and inv["status"] == "paid":
                paid[(parts[1], int(parts[2]))] = msat(inv["amount_received_msat"])
        assert paid == released, f"{net.operator}: paid {paid}, released {released}"


async def a_wallet_pays_a_user_of_another_operator(where: Path, at: Devnet, to: Devnet) -> None:
    """Alice at operator ``at`` pays Bob at operator ``to`` with ``constellation wallet``:
    Bob sees the payment pending while ``to``'s node holds the settlement, then a coin he
    spends back to Alice (``where``: the local guild that runs the Lightning network)."""
    alice, bob = str(where.parent / "alice.json"), str(where.parent / "bob.json")
    for file, net in ((alice, at), (bob, to)):
        assert (await cli("wallet", "create", "--file", file, "--gateway", net.gateway_url))[0] == 0
    funding = (await cli("wallet", "address", "--file", alice))[1].strip()
    assert (await cli("devnet", "fund", funding, "5000000", "--dir", at.dir))[0] == 0
    # bob's address names his operator's ledger: alice's payment goes there, settled by hers
    to_bob = (await cli("wallet", "address", "--file", bob))[1].strip()
    _, named = decode_destination(to_bob, Network.REGTEST)
    async with aiohttp.ClientSession() as s:
        assert named == bytes.fromhex((await Gateway(to.gateway_url, s).totals())["ledger_id"])
    end = time.monotonic() + 10
    while "5000000 msat in 1 coins" not in (await cli("wallet", "balance", "--file", alice))[1]:
        assert time.monotonic() < end, f"the funded coin is not in {at.operator}'s index"
        await asyncio.sleep(0.2)
    # hold the payee's node's incoming payments: bob sees the payment pending meanwhile
    devnet.guild.lightning_faults(where, to.operator, {"hold": True})
    try:
        code, out = await cli("wallet", "pay", to_bob, "1000000", "--file", alice)
        assert code == 0 and f"pending at {to.operator}" in out, out
        end = time.monotonic() + 10
        while f"1000000 msat pending in 1 payments from {at.operator}" not in (
            out := (await cli("wallet", "balance", "--file", bob))[1]
        ):
            assert time.monotonic() < end, out
            await asyncio.sleep(0.2)
        assert out.startswith("0 msat in 0 coins"), out  # not spendable yet
    finally:
        devnet.guild.lightning_faults(where, to.operator, {"hold": False})
        devnet.guild.lightning(where, f"/v1/release/{to.operator}", {})
    end = time.monotonic() + 20
    while not (out := (await cli("wallet", "balance", "--file", bob))[1]).startswith(
        "1000000 msat in 1 coins"
    ):
        assert time.monotonic() < end, out
        await asyncio.sleep(0.3)
    assert "pending" not in out
    # and bob spends it in his operator's ledger, to alice's address (naming hers)
    code, out = await cli("wallet", "pay", funding, "500000", "--file", bob)
    assert code == 0 and f"pending at {at.operator}" in out, out
