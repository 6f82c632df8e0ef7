"""Cashu mint throughput: an operator's mint against nutshell's own mint, on this machine,
in the same run.

    python bench/mint.py --json bench/results/mint.json

The project's mint runs as in a local guild of 2 operators (``constellation devnet``):
its own process, PostgreSQL, and a simulated Lightning node; the other operator's node
pays its invoices and is paid by its melts. nutshell 0.20.2 (``.venv-cashu``, from
``scripts/setup``) runs with its FakeWallet backend, on SQLite and on PostgreSQL (the
guild's server, a database of its own), input fees 0 for both. The load, from this
process, is the same client code (``services/ecash/client.py``) against each; a swap's
DLEQ proofs are checked after the timed window (``swaps``).

Figures:
  swap_per_s, swap_p50_ms,    2-in-2-out swaps of 1-sat proofs, --clients at once,
  swap_p95_ms                 closed loop for --seconds (each client swaps its outputs)
  swap2_per_s, swap2_p95_ms   the same, half the clients at a second mint process on
                              the same database
  mint_per_s                  quote, the invoice paid by another node, mint: --flows at
                              once (the project's mint only: FakeWallet pays itself)
  melt_per_s                  quote, melt to another node's invoice: --flows at once
  nutshell_{sqlite,pg}_swap_per_s, _swap_p95_ms
  swap_ratio_{sqlite,pg}      swap_per_s / nutshell's (target >= 20)
Targets: swap_per_s >= 20 x nutshell's, swap_p95_ms <= 50.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import uvloop
from coincurve import PublicKey
from pyln.client import LightningRpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, write_json
from constellation.crypto.point import N, add, mul
from constellation.ecash import client
from constellation.protocol import cashu as nut
from services.devnet import Devnet, free_port, guild, spawn, start_postgres, stop_pid, wait_ready
from services.ecash.client import MintClient
from services.workload import percentile

NUTSHELL = Path(__file__).resolve().parent.parent / ".venv-cashu" / "bin" / "mint"


async def closed_loop(
    seconds: float, clients: int, step: Callable[[int], Awaitable[bool]]
) -> tuple[float, list[float]]:
    """``clients`` running ``step(i)`` back to back for ``seconds``: (steps done a
    second, their latencies in ms; a step that returns False was refused)."""
    end = time.monotonic() + seconds
    lat: list[float] = []

    async def run(i: int) -> None:
        while time.monotonic() < end:
            started = time.perf_counter()
            if await step(i):
                lat.append((time.perf_counter() - started) * 1000)

    started = time.monotonic()
    await asyncio.gather(*(run(i) for i in range(clients)))
    return len(lat) / (time.monotonic() - started), sorted(lat)


async def swaps(
    mints: list[MintClient], seconds: float, clients: int, fund: Any
) -> dict[str, float]:
    """2-in-2-out swaps: each client holds two 1-sat proofs and swaps them again and
    again (``fund(amounts)`` mints the starting proofs), client i at ``mints[i % n]``
    (processes of one mint, on one database). The load shares the mint's cores, so it
    does inside the window only what the next swap needs: its outputs are blinded
    before (``blanks``), each signature unblinded by one addition as it comes, over a
    light client (``Wire``), and every signature's DLEQ proof is checked after (by the
    wallet's own ``unblind``, which must give the same proofs); a bad one fails the
    run."""
    mint = mints[0]
    proofs = await fund([1] * (2 * clients))
    held = [proofs[2 * i : 2 * i + 2] for i in range(clients)]
    key = mint.keys[mint.active][1]
    ready = [blanks(key, mint.active) for _ in range(int(seconds * 4000))]
    answered: list[
        tuple[list[dict[str, Any]], list[nut.BlindedMessage], list[client.Secret], list[nut.Proof]]
    ] = []
    refused = [0]

    wires = [Wire(mints[i % len(mints)].url) for i in range(clients)]

    async def step(i: int) -> bool:
        outputs, secrets, unblinding = ready.pop() if ready else blanks(key, mint.active)
        body = nut.encode({"inputs": held[i], "outputs": outputs})
        status, doc = await wires[i].post("/v1/swap", body)
        if status != 200:  # nutshell's SQLite under load: "failed to acquire database lock"
            refused[0] += 1
            return False
        sigs = doc["signatures"]
        held[i] = [
            nut.Proof(1, sig["id"], s.secret, _unblind(sig["C_"], neg))
            for sig, s, neg in zip(sigs, secrets, unblinding, strict=True)
        ]
        answered.append((sigs, outputs, secrets, held[i]))
        return True

    try:
        rate, lat = await closed_loop(seconds, clients, step)
    finally:
        for w in wires:
            w.close()
    for sigs, outputs, secrets, unblinded in answered:
        if mint.unblind(sigs, outputs, secrets) != unblinded:
            raise AssertionError("a swap's proofs differ from the wallet's own unblinding")
    return {
        "per_s": rate,
        "p50_ms": percentile(lat, 0.5),
        "p95_ms": percentile(lat, 0.95),
        "refused": refused[0],
    }


class Wire:
    """One keep-alive HTTP/1.1 connection to a mint, for the swap load: it shares the
    mint's two cores, and aiohttp's client cost it about a third of one at 1,300 swaps
    a second."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, Any]:
        """(HTTP status, JSON body) of a POST of ``body``."""
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        status, *lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines if line)
        if "content-length" not in headers:  # chunked: not what these mints send
            raise RuntimeError(f"an answer without Content-Length: {headers}")
        doc = json.loads(await reader.readexactly(int(headers["content-length"])))
        if headers.get("connection") == "close":
            self.close()
        return int(status.split()[1]), doc

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


def blanks(
    key: PublicKey, keyset: str
) -> tuple[list[nut.BlindedMessage], list[client.Secret], list[PublicKey]]:
    """Two fresh 1-sat outputs, their secrets, and -r·K of each: a signature C_ is
    unblinded by one addition, C = C_ + (-r·K), as a wallet that made its outputs ahead
    may."""
    outputs, secrets = client.outputs_of([1, 1], keyset)
    unblinding = []
    for s in secrets:
        neg = mul(key, N - s.r)
        assert neg is not None  # 0 < r < n
        unblinding.append(neg)
    return outputs, secrets, unblinding


def _unblind(c_: str, neg: PublicKey) -> str:
    c = add(PublicKey(bytes.fromhex(c_)), neg)
    assert c is not None
    return c.format().hex()


async def ours(directory: Path, args: argparse.Namespace) -> dict[str, float]:
    nets = await asyncio.to_thread(guild.up, directory, 2, 2, "bench")
    op0, op1 = nets
    payer = LightningRpc(op1.lightning_rpc)
    try:
        conn = aiohttp.TCPConnector(limit=args.clients + 8)
        async with aiohttp.ClientSession(connector=conn) as s:
            mint = MintClient(op0.mint_url, s)
            await mint.load()

            async def fund(amounts: list[int]) -> list[Any]:
                quote = await mint.mint_quote(sum(amounts))
                await asyncio.to_thread(payer.pay, quote["request"])
                await mint.wait_paid(quote["quote"])
                return await mint.mint(quote["quote"], amounts)

            swap = await swaps([mint], args.seconds, args.clients, fund)
            async with second_process(op0) as url:
                other = MintClient(url, s)
                await other.load()
                swap2 = await swaps([mint, other], args.seconds, args.clients, fund)

            async def mint_one(_: int) -> bool:
                await fund([1])
                return True

            mint_rate, _ = await closed_loop(args.seconds, args.flows, mint_one)
            pool: list[Any] = []
            while len(pool) < args.seconds * 150 * args.flows / 8:  # more than melts can use
                pool += await fund([4] * 1000)

            async def melt_one(_: int) -> bool:
                label = f"bench-{os.urandom(8).hex()}"
                bolt11 = (await asyncio.to_thread(payer.invoice, 1000, label, "bench"))["bolt11"]
                quote = await mint.ok("/v1/melt/quote/bolt11", {"request": bolt11, "unit": "sat"})
                blanks = [client.Secret.fresh().output(mint.active, 1) for _ in range(2)]
                body = {"quote": quote["quote"], "inputs": [pool.pop()], "outputs": blanks}
                await mint.ok("/v1/melt/bolt11", body)
                return True

            melt_rate, _ = await closed_loop(args.seconds, args.flows, melt_one)
    finally:
        await asyncio.to_thread(guild.down, directory)
    return {
        "swap_per_s": swap["per_s"],
        "swap_p50_ms": swap["p50_ms"],
        "swap_p95_ms": swap["p95_ms"],
        "swap2_per_s": swap2["per_s"],
        "swap2_p95_ms": swap2["p95_ms"],
        "mint_per_s": mint_rate,
        "melt_per_s": melt_rate,
    }


async def nutshell(directory: Path, database: str, args: argparse.Namespace) -> dict[str, float]:
    """nutshell's mint (FakeWallet, fees 0, no rate limit) on ``database``."""
    port = free_port()
    env = {
        **os.environ,
        "MINT_BACKEND_BOLT11_SAT": "FakeWallet",
        "MINT_PRIVATE_KEY": "constellation-bench",
        "MINT_LISTEN_HOST": "127.0.0.1",
        "MINT_LISTEN_PORT": str(port),
        "MINT_DATABASE": database,
        "CASHU_DIR": str(directory / "cashu"),
        "MINT_RATE_LIMIT": "FALSE",
        "MINT_INPUT_FEE_PPK": "0",
        "FAKEWALLET_DELAY_INCOMING_PAYMENT": "0",
        "FAKEWALLET_DELAY_OUTGOING_PAYMENT": "0",
        "DEBUG": "FALSE",
        "LOG_LEVEL": "WARNING",
    }
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "mint.log", "ab") as log:
        proc = subprocess.Popen(
            [str(NUTSHELL)], env=env, cwd=directory, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        await asyncio.to_thread(wait_ready_nutshell, port)
        conn = aiohttp.TCPConnector(limit=args.clients + 8)
        async with aiohttp.ClientSession(connector=conn) as s:
            mint = MintClient(f"http://127.0.0.1:{port}", s)
            await mint.load()

            async def fund(amounts: list[int]) -> list[Any]:
                quote = await mint.mint_quote(sum(amounts))
                await mint.wait_paid(quote["quote"], 30)
                return await mint.mint(quote["quote"], amounts)

            return await swaps([mint], args.seconds, args.clients, fund)
    finally:
        stop_pid(proc.pid, 10)


@contextlib.asynccontextmanager
async def second_process(net: Devnet) -> AsyncIterator[str]:
    """Another process of ``net``'s mint, on its database (as an operator scales its
    mint: pods behind one Service), up for the block: its URL."""
    port = free_port()
    env = {**net.mint_env(), "MINT_HTTP_ADDR": f"127.0.0.1:{port}"}
    pid = spawn([sys.executable, "-m", "services.ecash"], env, Path(net.dir) / "mint-2.log")
    try:
        await asyncio.to_thread(wait_ready, port, pid, 60)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_pid(pid, 10)


def wait_ready_nutshell(port: int) -> None:
    """nutshell has no /readyz: wait until it answers /v1/info."""
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/info", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("nutshell's mint did not start") from None
            time.sleep(0.2)


async def nutshell_pg_database(pg_url: str) -> str:
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("CREATE DATABASE nutshell")
    finally:
        await conn.close()
    return pg_url.rsplit("/", 1)[0] + "/nutshell"


async def measure(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    f: dict[str, Any] = dict(await ours(tmp / "guild", args))
    sqlite = await nutshell(tmp / "nutshell-sqlite", str(tmp / "nutshell-sqlite" / "db"), args)
    f["nutshell_sqlite_swap_per_s"] = sqlite["per_s"]
    f["nutshell_sqlite_swap_p95_ms"] = sqlite["p95_ms"]
    f["nutshell_sqlite_swap_refused"] = sqlite["refused"]
    # nutshell on PostgreSQL: a server like the guild's, started for it alone
    server = Devnet(str(tmp / "pg"), "bench", 0, os.urandom(32).hex())
    Path(server.dir).mkdir()
    server.pg_port = free_port()
    await asyncio.to_thread(start_postgres, server)
    try:
        url = await nutshell_pg_database(server.database_url)
        pg = await nutshell(tmp / "nutshell-pg", url, args)
    finally:
        stop_pid(server.pg_pid, 10, signal.SIGINT)
    f["nutshell_pg_swap_per_s"] = pg["per_s"]
    f["nutshell_pg_swap_p95_ms"] = pg["p95_ms"]
    f["nutshell_pg_swap_refused"] = pg["refused"]
    f["swap_ratio_sqlite"] = f["swap_per_s"] / max(sqlite["per_s"], 1e-9)
    f["swap_ratio_pg"] = f["swap_per_s"] / max(pg["per_s"], 1e-9)
    return f


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--seconds", type=float, default=8.0, help="per load phase")
    parser.add_argument("--clients", type=int, default=64, help="concurrent swappers")
    parser.add_argument("--flows", type=int, default=8, help="concurrent mints, melts")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-mint-", dir="/tmp") as tmp:
        os.chmod(tmp, 0o755)  # PostgreSQL runs as its own user where we are root
        # the load's loop as the services' (uvloop): it shares their cores
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            f = runner.run(measure(Path(tmp), args))
    rows = [
        ("swap_per_s", f"{f['swap_per_s']:,.0f}", f"2-in-2-out, {args.clients} clients"),
        (
            "swap p50 / p95 ms",
            f"{f['swap_p50_ms']:.1f} / {f['swap_p95_ms']:.1f}",
            "target p95 <= 50",
        ),
        (
            "2 processes: swaps/s, p95",
            f"{f['swap2_per_s']:,.0f}, {f['swap2_p95_ms']:.1f} ms",
            "one database, half the clients each",
        ),
        ("mint_per_s", f"{f['mint_per_s']:,.1f}", f"quote, pay, mint; {args.flows} at once"),
        ("melt_per_s", f"{f['melt_per_s']:,.1f}", f"quote, melt; {args.flows} at once"),
        (
            "nutshell sqlite swaps/s, p95",
            f"{f['nutshell_sqlite_swap_per_s']:,.1f}, {f['nutshell_sqlite_swap_p95_ms']:.0f} ms",
            f"FakeWallet, same load; {f['nutshell_sqlite_swap_refused']} refused",
        ),
        (
            "nutshell pg swaps/s, p95",
            f"{f['nutshell_pg_swap_per_s']:,.1f}, {f['nutshell_pg_swap_p95_ms']:.0f} ms",
            f"FakeWallet, same load; {f['nutshell_pg_swap_refused']} refused",
        ),
        ("swap_ratio_sqlite", f"{f['swap_ratio_sqlite']:.1f}", "target >= 20"),
        ("swap_ratio_pg", f"{f['swap_ratio_pg']:.1f}", "target >= 20"),
    ]
    print_table(f"Cashu mints, this machine ({time.monotonic() - started:.0f} s)", rows)
    if args.json:
        write_json(str(args.json), f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
