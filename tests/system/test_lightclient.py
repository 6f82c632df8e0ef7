"""Light clients on a local guild of 3 operators: the guild signs checkpoints through its
members' indexers and signers, every gateway serves them and their proofs, and a wallet
that pinned the guild's descriptor verifies what it is served, moving past a gateway
that forges a transaction's proof, serves a stale checkpoint, or withholds a coin (a
true proof of its absence from another shard)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema_rs
import pytest

from constellation.lightclient import proof as pf
from constellation.lightclient.checkpointer import Announced
from services import devnet
from services.devnet import Devnet
from services.light import LightClient, NoServer, Update
from services.wallet import WalletFile
from tests.system.guild import cli, local_guild
from tests.system.liar import Liar


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    with local_guild("cst-lc-") as directory:
        yield directory


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
    out = await _until(
        f"proof from {liar_url}", lambda: cli("wallet", "verify", txid, "--file", wallet)
    )
    assert "verdict: VERIFIED" in out and "committed here" in out, out

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


async def _funded(where: Path, name: str, nets: list[Devnet]) -> tuple[str, str]:
    """A wallet of op0's, and its address, holding a funded coin."""
    wallet = str(where.parent / f"{name}.json")
    assert (await cli("wallet", "create", "--file", wallet, "--gateway", nets[0].gateway_url))[
        0
    ] == 0
    address = (await cli("wallet", "address", "--file", wallet))[1].strip()
    assert (await cli("devnet", "fund", address, "2000000", "--dir", nets[0].dir))[0] == 0
    await _until("2000000 msat in 1 coins", lambda: cli("wallet", "balance", "--file", wallet))
    return wallet, address


async def _pay_self(wallet: str, address: str, times: int) -> list[str]:
    """Payments a checkpoint apart; their txids."""
    txids = []
    for _ in range(times):
        code, out = await cli("wallet", "pay", address, "1000", "--file", wallet, "--yes")
        assert code == 0, out
        txids.append(out.split("txid ")[1].split()[0])
        await asyncio.sleep(1.2)
    return txids


async def _proves_the_guilds_chain(member: Devnet, other: Devnet, txids: list[str]) -> None:
    """``member``'s gateway proves each of ``txids`` (of ``other``'s ledger: its own
    index does not hold them, and says where they are) and serves the chain ``other``'s
    does."""
    async with aiohttp.ClientSession() as s:
        end = time.monotonic() + 30
        while True:  # 503 while its database is coming back: it is asked again
            async with s.get(member.gateway_url + f"/v1/tx/{txids[0]}") as r:
                error = (await r.json())["error"]
            if r.status != 503 or time.monotonic() > end:
                break
            await asyncio.sleep(0.3)
        assert r.status == 404 and error["message"] == (
            f"no committed transaction with this id in {member.operator}'s ledger"
            " (other members' are proved under /v1/lc/tx)"
        ), error
        for wanted in txids:
            end = time.monotonic() + 30
            while True:
                async with s.get(member.gateway_url + f"/v1/lc/tx/{wanted}") as r:
                    if r.status == 200:
                        break
                assert time.monotonic() < end, await r.text()
                await asyncio.sleep(0.3)
        chains = []
        for net in (other, member):
            async with s.get(net.gateway_url + "/v1/lc/checkpoints?start=0&count=100") as r:
                chains.append([c["encoded"] for c in (await r.json())["checkpoints"]])
        shorter = min(len(c) for c in chains)
        assert chains[0][:shorter] == chains[1][:shorter] and shorter >= 4, chains


async def test_a_member_whose_indexer_was_killed_adopts_the_guilds_checkpoints(
    where: Path,
) -> None:
    """kill -9 of a member's indexer while the guild goes on checkpointing: restarted by
    its supervisor, it rebuilds its index, takes what it stored, adopts the guild's
    latest checkpoint once the gap lasts (not ready meanwhile), and follows again."""
    nets = [Devnet.load(where / f"op{i}") for i in range(3)]
    wallet, address = await _funded(where, "killed", nets)
    os.kill(nets[1].indexer_pid, signal.SIGKILL)
    missed = await _pay_self(wallet, address, 3)  # the guild moves on meanwhile
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
    # and it vouches again: the next checkpoint needs it no less than the others; and
    # the checkpoints it missed come from another member, records and all: it proves
    # what was paid while it was down, and serves the guild's whole chain
    await _proves_the_guilds_chain(op1, nets[0], [*await _pay_self(wallet, address, 1), *missed])


async def test_a_member_whose_postgresql_was_killed_fills_the_checkpoints_it_missed(
    where: Path,
) -> None:
    """kill -9 of a member's PostgreSQL, kept down while the guild checkpoints: its
    indexer goes on taking, says it could not store what it took (and its gateway that
    a proof is unavailable, not missing), stores it once its database is back (not
    waiting for the guild's next checkpoint), and holds the guild's whole chain; no
    error escapes its tasks or callbacks."""
    nets = [Devnet.load(where / f"op{i}") for i in range(3)]
    wallet, address = await _funded(where, "pg-killed", nets)
    status = devnet.read_status(Path(nets[2].dir))
    assert status is not None
    indexer_log = Path(nets[2].dir) / "indexer.log"
    end = time.monotonic() + 60  # it checkpoints (it loads its pin from its database first)
    while '"checkpointing"' not in indexer_log.read_text(errors="replace"):
        assert time.monotonic() < end, "op2's indexer never started checkpointing"
        await asyncio.sleep(0.3)
    os.kill(status["pid"], signal.SIGSTOP)  # its supervisor brings PostgreSQL back later
    try:
        os.killpg(nets[2].pg_pid, signal.SIGKILL)  # its backends go when they see it gone
        paid = await _pay_self(wallet, address, 4)
        end = time.monotonic() + 60
        while '"checkpoints not stored"' not in indexer_log.read_text(errors="replace"):
            assert time.monotonic() < end, "the outage was not seen"
            paid += await _pay_self(wallet, address, 1)  # the guild checkpoints meanwhile
        why = await _readyz(nets[2].mint_url, 503, 20)  # its mint says it is not ready
        assert "database not reachable" in why, why
        # its gateway takes payments still (ready), and says it cannot read
        await _readyz(nets[2].gateway_url, 200, 20, lambda why: "index database does not" in why)
        # a proof it cannot read now is unavailable (retry), not "not found"
        proof = f"{nets[2].gateway_url}/v1/lc/tx/{paid[0]}"
        async with aiohttp.ClientSession() as s, s.get(proof) as r:
            refusal = await r.json()
            assert r.status == 503 and "Retry-After" in r.headers, (r.status, refusal)
        assert refusal["error"]["code"] == "unavailable", refusal
    finally:
        os.kill(status["pid"], signal.SIGCONT)
    # its PostgreSQL back, ready again, and its gateway reads again
    await _readyz(nets[2].gateway_url, 200, 60, lambda why: "index database" not in why)
    await _readyz(nets[2].mint_url, 200, 60)
    await _proves_the_guilds_chain(nets[2], nets[0], paid)
    log = indexer_log.read_text(errors="replace").splitlines()
    assert any('"checkpoints taken in the outage stored"' in line for line in log)
    errors = [line for line in log if '"level": "error"' in line]
    assert not errors, errors[:2]


async def _readyz(
    url: str, status: int, seconds: float, says: Callable[[str], bool] = lambda _: True
) -> str:
    """The body of ``url``'s ``/readyz`` once it answers ``status`` with a body that
    ``says``, asking each 0.3 s."""
    end = time.monotonic() + seconds
    async with aiohttp.ClientSession() as s:
        while True:
            async with s.get(url + "/readyz") as r:
                body = await r.text()
                if r.status == status and says(body):
                    return body
                assert time.monotonic() < end, (r.status, body)
            await asyncio.sleep(0.3)


async def test_a_wallet_follows_an_address_over_the_websocket_and_leaves_a_forging_gateway(
    where: Path, liar: tuple[Liar, str]
) -> None:
    """Every change of the address is pushed with its proof and verified before it is
    told; a gateway that pushes a forged proof is left for the next, which tells the
    change; every message both ways is one the protocol's schema describes."""
    lie, liar_url = liar
    op0, op1 = (Devnet.load(where / f"op{i}") for i in range(2))
    async with following(where, liar_url, "follow") as (client, wallet, address, updates):
        session = client.session
        # honest: the issuance, pushed by the first gateway, verified
        assert (await cli("devnet", "fund", address, "3000000", "--dir", op0.dir))[0] == 0
        first = await asyncio.wait_for(updates.get(), 30)
        assert first.server == liar_url and first.address == address
        [change] = [c for p in first.placed for c in p.record.changes]
        assert change.value_msat == 3000000 and change.kind is pf.ChangeKind.CREATED
        # forged: refused by its check, and the change told by the next gateway
        lie.mode = "forge"
        code, out = await cli("wallet", "pay", address, "1000000", "--file", wallet, "--yes")
        assert code == 0, out
        txid = bytes.fromhex(out.split("txid ")[1].split()[0])
        second = await asyncio.wait_for(updates.get(), 30)
        assert second.server == op1.gateway_url and second.txid == txid
        kinds = {c.kind for p in second.placed for c in p.record.changes}
        assert kinds == {pf.ChangeKind.SPENT, pf.ChangeKind.CREATED}
        assert [f.server for f in client.failures] == [liar_url]
        assert client.failures[0].check == "proof.record_path"
        await coins_listed_anywhere(Devnet.load(where / "op2"), client, address)
        async with session.get(op1.gateway_url + "/v1/lc/ws/schema.json") as r:
            schema = jsonschema_rs.validator_for(await r.json())
        # a latest checkpoint too old is stale (here: any)
        impatient = LightClient(client.descriptor, [op1.gateway_url], session, max_age_s=0.0)
        with pytest.raises(NoServer) as refused:
            await impatient.latest()
        [failure] = refused.value.failures
        assert failure.check == "proof.stale" and "s old" in failure.message, failure
    assert lie.messages
    for message in lie.messages:
        schema.validate(message)

    # the command: the history since the first checkpoint, each change verified
    code, out = await cli(
        "wallet", "follow", "--file", wallet, "--address", address, "--since", "0", "--count", "2"
    )
    assert code == 0 and out.count("VERIFIED via") == 3, out  # the payment: 2 changes
    assert "created 3000000 msat" in out and "spent 3000000 msat" in out, out
    assert "created 1000000 msat" in out, out


@contextlib.asynccontextmanager
async def following(
    where: Path, first: str, name: str
) -> AsyncIterator[tuple[LightClient, str, str, asyncio.Queue[Update]]]:
    """A new wallet, pinned, following its first address through ``first`` then op1's
    gateway: its light client, file, address, and the changes it is told."""
    op0, op1 = (Devnet.load(where / f"op{i}") for i in range(2))
    wallet = str(where.parent / f"{name}.json")
    assert (await cli("wallet", "create", "--file", wallet, "--gateway", op0.gateway_url))[0] == 0
    address = (await cli("wallet", "address", "--file", wallet))[1].strip()
    await _until("pinned guild", lambda: cli("wallet", "pin", "--file", wallet))
    doc = WalletFile.load(Path(wallet))
    updates: asyncio.Queue[Update] = asyncio.Queue()

    async def told(update: Update) -> bool:
        await updates.put(update)
        return True

    async with aiohttp.ClientSession() as session:
        descriptor = pf.Descriptor.decode(doc.descriptor)
        client = LightClient(descriptor, [first, op1.gateway_url], session)
        since = (await client.latest())[1].signed.checkpoint.height
        task = asyncio.create_task(client.follow([address], doc.wallet().network, since, told))
        try:
            yield client, wallet, address, updates
        finally:
            task.cancel()


async def coins_listed_anywhere(net: Devnet, client: LightClient, address: str) -> None:
    """Any member lists the address's coins in op0's ledger (one left, of 1,000,000
    msat); its proof verifies."""
    path = f"/v1/lc/address/{address}/coins"
    end = time.monotonic() + 20
    while True:
        async with client.session.get(net.gateway_url + path) as r:
            coins = (await r.json())["coins"]
        if [c["value_msat"] for c in coins] == [1000000]:
            break
        assert time.monotonic() < end, coins
        await asyncio.sleep(0.3)
    assert coins[0]["ledger"] == "op0", coins
    _, verdict = await client.coin(bytes.fromhex(coins[0]["coin_id"]), "op0", 0)
    assert verdict.leaf is not None and verdict.leaf.state is pf.CoinState.UNSPENT


async def test_the_websocket_refuses_what_is_malformed_and_says_why(where: Path) -> None:
    op1 = Devnet.load(where / "op1")
    async with aiohttp.ClientSession() as s:
        async with s.get(op1.gateway_url + "/v1/lc/ws/schema.json") as r:
            schema = jsonschema_rs.validator_for(await r.json())
        async with s.ws_connect(op1.gateway_url.replace("http", "ws") + "/v1/lc/ws") as ws:

            async def send(text: str) -> dict[str, Any]:
                await ws.send_str(text)
                doc: dict[str, Any] = await ws.receive_json(timeout=10)
                schema.validate(doc)
                return doc

            def call(method: str, **params: Any) -> str:
                return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})

            cases = [
                ("{not json", -32700, "malformed"),
                ('{"jsonrpc": "2.0", "id": 1}', -32600, "malformed"),
                ('{"jsonrpc": "1.0", "id": 1, "method": "server.version"}', -32600, "malformed"),
                (call("no.such"), -32601, "not_found"),
                (call("tx.proof", txid="zz"), -32602, "malformed"),
                (call("tx.proof", txid="00" * 32, extra=1), -32602, "malformed"),
                (call("checkpoints.range", count=101), -32602, "malformed.count"),
                (call("address.history", address="nope"), -32602, "malformed.address"),
                (call("address.coins", address="nope"), -32602, "malformed.address"),
                (call("tx.proof", txid="00" * 32), -32000, "not_found"),
                (call("tx.submit", tx="0011"), -32000, "malformed"),
                (
                    '{"jsonrpc": "2.0", "id": 1, "method": "tx.proof", "params": ["00"]}',
                    -32602,
                    "malformed",
                ),
                ("[]", -32600, "malformed"),
            ]
            for text, code, api_code in cases:
                doc = await send(text)
                assert doc["error"]["code"] == code, (text, doc)
                assert doc["error"]["data"]["code"].startswith(api_code), (text, doc)
            # a notification (no id) gets no answer, not even an error; the next call's
            # answer comes first
            await ws.send_str(json.dumps({"jsonrpc": "2.0", "method": "checkpoints.latest"}))
            await ws.send_str(json.dumps({"jsonrpc": "2.0", "method": "no.such"}))
            doc = await send(call("server.version"))
            assert doc["result"]["protocol"] == "constellation-lc", doc
            # a batch: an answer for each call, none for its notifications, in order
            batch = [
                {"jsonrpc": "2.0", "id": "a", "method": "server.version"},
                {"jsonrpc": "2.0", "method": "server.version"},
                {"jsonrpc": "2.0", "id": None, "method": "no.such"},
            ]
            await ws.send_str(json.dumps(batch))
            answers = await ws.receive_json(timeout=10)
            schema.validate(answers)
            assert [a["id"] for a in answers] == ["a", None], answers
            assert "result" in answers[0] and answers[1]["error"]["code"] == -32601
            # at most 1000 subscriptions a socket
            for i in range(1000):
                await ws.send_str(call("coin.subscribe", coin_id=i.to_bytes(32, "big").hex()))
            answers = [await ws.receive_json(timeout=10) for _ in range(1000)]
            assert answers[-1]["result"] == {"subscriptions": 1000}
            doc = await send(call("coin.subscribe", coin_id="ff" * 32))
            assert doc["error"]["data"]["code"] == "too_large", doc
            await ws.send_bytes(b"\x00")
            doc = await ws.receive_json(timeout=10)
            assert doc["error"]["code"] == -32600, doc


async def test_a_wallet_pins_no_member_names_its_descriptor_does_not_commit_to(
    where: Path, liar: tuple[Liar, str]
) -> None:
    lie, liar_url = liar
    wallet = str(where.parent / "names.json")
    assert (await cli("wallet", "create", "--file", wallet, "--gateway", liar_url))[0] == 0
    lie.mode = "members"  # op0 and op1 swapped: each coin would be looked for elsewhere
    code, out = await cli("wallet", "pin", "--file", wallet)
    assert code != 0 and "names members the descriptor's member set is not" in out, out
    lie.mode = "honest"
    code, out = await cli("wallet", "pin", "--file", wallet)
    assert code == 0 and "members op0, op1, op2" in out, out


async def test_a_wallet_leaves_a_gateway_that_skips_a_checkpoint(
    where: Path, liar: tuple[Liar, str]
) -> None:
    """A checkpoint not pushed (and what it did withheld with it) is a gap the wallet
    sees at the next one: it leaves the gateway, and the next tells it what changed."""
    lie, liar_url = liar
    op0 = Devnet.load(where / "op0")
    async with following(where, liar_url, "gap") as (client, _, address, updates):
        await asyncio.sleep(1)  # subscribed
        lie.mode = "skip"
        assert (await cli("devnet", "fund", address, "5000", "--dir", op0.dir))[0] == 0
        await asyncio.sleep(2)  # its checkpoint withheld, and its push
        assert (await cli("devnet", "fund", address, "7000", "--dir", op0.dir))[0] == 0
        values: set[int] = set()
        while len(values) < 2:
            update = await asyncio.wait_for(updates.get(), 30)
            values |= {c.value_msat for p in update.placed for c in p.record.changes}
        assert values == {5000, 7000}, values
        assert [(f.server, f.check) for f in client.failures][:1] == [(liar_url, "gap")]


def test_a_guild_stopped_cleanly_logs_no_failed_task() -> None:
    """SIGTERM to every process of a guild whose gateways push checkpoints: no task of
    any service says it failed or ended on the way out (the gateway's checkpoint feed
    did, its NATS connection closed under it)."""
    root = Path(tempfile.mkdtemp(prefix="cst-stop-"))
    root.chmod(0o755)  # PostgreSQL runs as its own user where tests run as root
    try:
        devnet.guild.up(root / "g", 2, 2, "test")
        try:
            time.sleep(3.0)  # checkpoints made and pushed
        finally:
            devnet.guild.down(root / "g")
        failed = [
            line
            for log in sorted(root.rglob("*.log"))
            for line in log.read_text(errors="replace").splitlines()
            if '"task failed"' in line or '"task ended"' in line
        ]
        assert not failed, failed[:3]
    finally:
        shutil.rmtree(root, ignore_errors=True)
