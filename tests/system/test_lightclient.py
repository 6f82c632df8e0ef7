"""Light clients on a local guild of 3 operators: the guild signs checkpoints through its
members' indexers and signers, every gateway serves them and their proofs, and a wallet
that pinned the guild's descriptor verifies what it is served, moving past a gateway
that forges a transaction's proof, serves a stale checkpoint, or withholds a coin (a
true proof of its absence from another shard)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from constellation.lightclient import proof as pf
from constellation.lightclient.checkpointer import Announced
from services.devnet import Devnet
from tests.system.guild import cli, local_guild

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    with local_guild("cst-lc-") as directory:
        yield directory


class Liar:
    """A gateway that forwards to an honest one, and lies where ``mode`` says."""

    def __init__(self, upstream: str, other_ledger: str) -> None:
        self.upstream = upstream
        self.other_ledger = other_ledger
        self.mode = "honest"
        self.session: aiohttp.ClientSession | None = None

    async def _get(self, path: str) -> tuple[int, bytes]:
        assert self.session is not None
        async with self.session.get(self.upstream + path) as r:
            return r.status, await r.read()

    async def handle(self, request: web.Request) -> web.Response:
        assert self.session is not None
        path = request.path_qs
        if request.method == "GET" and self.mode == "forge" and path.startswith("/v1/lc/tx/"):
            status, body = await self._get(path)
            doc = __import__("json").loads(body)
            proof = pf.decode_tx_proof(bytes.fromhex(doc["proof"]))
            part = proof.parts[0]
            record = pf.Record.decode(part.record)
            forged = record._replace(fee_msat=record.fee_msat + 1)
            parts = [part._replace(record=forged.encode()), *proof.parts[1:]]
            doc["proof"] = pf.encode_tx_proof(proof._replace(parts=parts)).hex()
            return web.json_response(doc, status=status)
        if request.method == "GET" and self.mode == "stale" and path == "/v1/lc/checkpoints/latest":
            status, body = await self._get("/v1/lc/checkpoints/0")
            return web.Response(body=body, status=status, content_type="application/json")
        if request.method == "GET" and self.mode == "withhold" and path.startswith("/v1/lc/coin/"):
            # a true proof that the coin is not in another ledger's shard
            status, body = await self._get(path.split("?")[0] + f"?ledger={self.other_ledger}")
            return web.Response(body=body, status=status, content_type="application/json")
        async with self.session.request(
            request.method,
            self.upstream + path,
            data=await request.read(),
            headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
        ) as r:
            return web.Response(body=await r.read(), status=r.status, content_type=r.content_type)


@pytest.fixture
async def liar(where: Path) -> AsyncIterator[tuple[Liar, str]]:
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


async def _until(what: str, check: object, seconds: float = 20.0) -> str:
    end = time.monotonic() + seconds
    while True:
        code, out = await check()  # type: ignore[operator]
        if code == 0 and what in out:
            return str(out)
        assert time.monotonic() < end, out
        await asyncio.sleep(0.3)


async def test_every_member_takes_the_same_signed_checkpoints(where: Path) -> None:
    nets = [Devnet.load(where / f"op{i}") for i in range(3)]
    async with aiohttp.ClientSession() as s:
        docs = []
        for net in nets:  # once the guild signed its first checkpoint, every member has it
            end = time.monotonic() + 20
            while True:
                async with s.get(net.gateway_url + "/v1/lc/descriptor") as r:
                    if r.status == 200:
                        docs.append(await r.json())
                        break
                    assert time.monotonic() < end, await r.text()
                await asyncio.sleep(0.3)
        assert len({d["descriptor"] for d in docs}) == 1, docs
        descriptor = pf.Descriptor.decode(docs[0]["descriptor"])
        async with s.get(nets[2].gateway_url + "/v1/lc/checkpoints?start=0&count=5") as r:
            chain = [
                Announced.decode(bytes.fromhex(c["encoded"]))
                for c in (await r.json())["checkpoints"]
            ]
        assert chain and chain[0].signed.checkpoint.message() == descriptor.first
        prev = b""
        for a in chain:  # each signed by the guild key, each chained to the one before
            c = pf.verify_checkpoint(descriptor.pin, a.signed)
            assert not prev or c.prev_hash == prev
            prev = c.message()
        async with s.get(nets[1].gateway_url + "/v1/lc/checkpoints/999999") as r:
            assert r.status == 404
        async with s.get(nets[1].gateway_url + "/v1/lc/tx/zz") as r:
            assert r.status == 400


async def test_a_wallet_verifies_its_payment_and_moves_past_a_lying_gateway(
    where: Path, liar: tuple[Liar, str]
) -> None:
    lie, liar_url = liar
    op0, op1 = (Devnet.load(where / f"op{i}") for i in range(2))
    wallet = str(where.parent / "light.json")
    assert (await cli("wallet", "create", "--file", wallet, "--gateway", liar_url))[0] == 0
    address = (await cli("wallet", "address", "--file", wallet))[1].strip()
    assert (await cli("devnet", "fund", address, "3000000", "--dir", op0.dir))[0] == 0
    await _until("3000000 msat in 1 coins", lambda: cli("wallet", "balance", "--file", wallet))
    code, out = await cli("wallet", "pay", address, "1000000", "--file", wallet, "--yes")
    assert code == 0, out
    txid = out.split("txid ")[1].split()[0]
    code, out = await cli("wallet", "pin", "--file", wallet, "--server", op1.gateway_url)
    assert code == 0 and "pinned guild 'test'" in out, out

    # honest: verified (once a checkpoint covers it), from the wallet's own gateway
    out = await _until("verdict: VERIFIED", lambda: cli("wallet", "verify", txid, "--file", wallet))
    assert f"proof from {liar_url}" in out and "committed here" in out, out

    # a forged record: refused by its check, verified through the next gateway
    lie.mode = "forge"
    code, out = await cli("wallet", "verify", txid, "--file", wallet)
    assert code == 0 and f"! {liar_url}: [proof.record_path]" in out, out
    assert f"proof from {op1.gateway_url}" in out and "verdict: VERIFIED" in out, out

    # a stale checkpoint (the first, when the wallet has seen later ones)
    lie.mode = "stale"
    code, out = await cli("wallet", "balance", "--file", wallet)
    assert code == 0 and f"! {liar_url}: [proof.stale]" in out, out
    assert "coins verified as of checkpoint" in out, out

    # a withheld coin: a true proof of absence, from a shard that does not hold it
    lie.mode = "withhold"
    code, out = await cli("wallet", "balance", "--file", wallet)
    assert code == 0 and f"! {liar_url}: [proof.subject]" in out, out
    assert "2 of 2 coins verified" in out or "of 2 coins verified" in out, out

    # every gateway lying or down: not verified, and each failure named
    lie.mode = "forge"
    code, out = await cli(
        "wallet",
        "pin",
        "--file",
        wallet,
        "--gateway",
        liar_url,  # only the liar now
    )
    assert code == 0, out
    code, out = await cli("wallet", "verify", txid, "--file", wallet)
    assert code == 1 and "verdict: NOT VERIFIED" in out and "[proof.record_path]" in out, out


async def test_a_member_whose_indexer_was_killed_adopts_the_guilds_checkpoints(
    where: Path,
) -> None:
    """kill -9 of a member's indexer while the guild goes on checkpointing: restarted by
    its supervisor, it rebuilds its index, takes what it stored, adopts the guild's
    latest checkpoint once the gap lasts (not ready meanwhile), and follows again."""
    nets = [Devnet.load(where / f"op{i}") for i in range(3)]
    wallet = str(where.parent / "killed.json")
    assert (await cli("wallet", "create", "--file", wallet, "--gateway", nets[0].gateway_url))[
        0
    ] == 0
    address = (await cli("wallet", "address", "--file", wallet))[1].strip()
    assert (await cli("devnet", "fund", address, "2000000", "--dir", nets[0].dir))[0] == 0
    await _until("2000000 msat in 1 coins", lambda: cli("wallet", "balance", "--file", wallet))
    os.kill(nets[1].indexer_pid, signal.SIGKILL)
    for _ in range(3):  # the guild moves on meanwhile
        code, out = await cli("wallet", "pay", address, "1000", "--file", wallet, "--yes")
        assert code == 0, out
        await asyncio.sleep(1.2)
    end = time.monotonic() + 60
    async with aiohttp.ClientSession() as s:
        while True:
            heights = []
            for net in nets:
                async with s.get(net.gateway_url + "/v1/lc/checkpoints/latest") as r:
                    heights.append((await r.json())["height"] if r.status == 200 else -1)
            op1 = Devnet.load(where / "op1")
            async with s.get(f"http://127.0.0.1:{op1.indexer_port}/readyz") as r:
                ready = r.status == 200
            if ready and len(set(heights)) == 1 and op1.indexer_pid != nets[1].indexer_pid:
                break
            assert time.monotonic() < end, (heights, ready)
            await asyncio.sleep(0.5)
    # and it vouches again: the next checkpoint needs it no less than the others
    code, out = await cli("wallet", "pay", address, "1000", "--file", wallet, "--yes")
    assert code == 0, out
    txid = out.split("txid ")[1].split()[0]
    async with aiohttp.ClientSession() as s:
        end = time.monotonic() + 20
        while True:
            async with s.get(op1.gateway_url + f"/v1/lc/tx/{txid}") as r:
                if r.status == 200:
                    break
            assert time.monotonic() < end, await r.text()
            await asyncio.sleep(0.3)
