"""On-chain deposits and withdrawals (NUT-30) over real processes: a local guild of 3
operators, each with its own NATS and signer, the guild key made by their DKG; the
simulated network's chain, followed by op0's mint over bitcoind's JSON-RPC; the outside
node a user's own Bitcoin wallet.

A deposit to a quote's address is credited once it has 3 confirmations, and only the
quote's key mints, no more than was credited; a withdrawal is signed by ROAST with one
operator's signer frozen, is valid by Bitcoin's rules (the chain checks every
signature), reaches the address, returns the unused fee reserve as change, and keeps
the books: the simulated network loses nothing and op0's reserve invariant holds with the
guild's coins counted. A withdrawal the mint's coins do not cover is refused with its
proofs untouched. After a change of members, the guild's coins move to the new key the
members that stay made, through a kill -9 of the mint, and the new key alone then signs.
A deposit from a coinbase is credited once Bitcoin lets it be spent, at 100
confirmations, and is spent then.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest
from pyln.client import LightningRpc

from constellation.ecash import client
from constellation.ecash import mint as m
from constellation.guild import Statement
from constellation.keys import SigningKey
from constellation.membership import KeyPlan
from constellation.protocol.signer import ActivateKey, KeyRequest, SignRequest
from services.crossload import reserve
from services.devnet import guild
from services.devnet.state import Devnet
from services.ecash.client import MintClient, MintError
from services.lnsim.chain import COINBASE_SAT
from services.wallet import PENDING_EXIT
from tests.system.guild import cli, local_guild
from tests.system.test_wallet_money import balance

KEY = SigningKey(b"\x31" * 32)
DEPOSIT_SAT = 60_000
DEPOSITED: list[Any] = []  # the first test's ecash, which the second withdraws
KEYS: list[bytes] = []  # the guild's key before the move, and the key moved to


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    """The guild, its chain mined only when a test says (confirmations are counted)."""
    saved = os.environ.get("LNSIM_BLOCK_S")
    os.environ["LNSIM_BLOCK_S"] = "0"
    try:
        with local_guild("cst-onchain-", operators=3) as directory:
            yield directory
    finally:
        if saved is None:
            os.environ.pop("LNSIM_BLOCK_S")
        else:
            os.environ["LNSIM_BLOCK_S"] = saved


@pytest.fixture
async def mint(where: Path) -> AsyncIterator[MintClient]:
    async with aiohttp.ClientSession() as session:
        mc = MintClient(guild.load(where)[0].mint_url, session)
        await mc.load()
        yield mc


def mine(where: Path, blocks: int) -> None:
    guild.lightning(where, "/v1/mine", {"blocks": blocks})


async def followed(where: Path, mc: MintClient) -> None:
    """Until the mint's chain follower has read the chain's last block."""
    tip = guild.lightning(where, "/bitcoind", {"method": "getblockcount"})["result"]
    await until_metric(mc, "mint_chain_height", lambda height: height >= tip)


async def melt_until(
    mc: MintClient, quote: str, until: Callable[[dict[str, Any]], bool], within_s: float = 30
) -> dict[str, Any]:
    """The melt quote's state once ``until`` takes it (``within_s`` at most; the mint
    may be restarting meanwhile)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            doc: dict[str, Any] = await mc.ok(f"/v1/melt/quote/onchain/{quote}")
        except (aiohttp.ClientError, MintError):
            doc = {"state": "the mint restarting"}
        if until(doc):
            return doc
        assert time.monotonic() < deadline, doc
        await asyncio.sleep(0.2)


async def confirmed(
    where: Path, mc: MintClient, quote: str, within_s: float = 30
) -> dict[str, Any]:
    """A melt answered PENDING (NUT-30): once its withdrawal is sent (its outpoint shown,
    still PENDING), three blocks are mined and it is PAID."""
    sent = await melt_until(mc, quote, lambda d: bool(d.get("outpoint")), within_s)
    assert sent["state"] == "PENDING", sent
    mine(where, 3)
    paid = await melt_until(mc, quote, lambda d: d["state"] == "PAID")
    assert paid["outpoint"] == sent["outpoint"]
    return paid


async def until_metric(mc: MintClient, name: str, until: Callable[[float], bool]) -> None:
    """Until the mint's gauge ``name`` reads a value ``until`` takes (30 s at most)."""
    deadline = time.monotonic() + 30
    while True:
        async with mc.s.get(f"{mc.url}/metrics") as r:
            text = await r.text()
        [line] = [x for x in text.splitlines() if x.startswith(f"{name} ")]
        if until(float(line.split()[1])):
            return
        assert time.monotonic() < deadline, f"the mint's {line}"
        await asyncio.sleep(0.2)


async def paid(mc: MintClient, quote: str, at_least: int) -> dict[str, Any]:
    """The quote once at least ``at_least`` is credited (or after 30 s, as it is)."""
    deadline = time.monotonic() + 30
    while True:
        doc: dict[str, Any] = await mc.ok(f"/v1/mint/quote/onchain/{quote}")
        if doc["amount_paid"] >= at_least or time.monotonic() > deadline:
            return doc
        await asyncio.sleep(0.3)


async def mint_onchain(mc: MintClient, quote: str, amounts: list[int], key: SigningKey) -> Any:
    outputs, secrets = client.outputs_of(amounts, mc.active)
    body = {"quote": quote, "outputs": outputs}
    body["signature"] = client.sign_mint_request(key, quote, outputs)
    doc = await mc.ok("/v1/mint/onchain", body)
    return mc.unblind(doc["signatures"], outputs, secrets)


async def deposited(where: Path, mc: MintClient, quote: str, address: str, key: SigningKey) -> Any:
    """30,000 sat paid from the outside node to a quote's address, confirmed, credited
    and minted as ecash."""
    LightningRpc(guild.outside_rpc(where)).withdraw(address, 30_000)
    mine(where, 3)
    assert (await paid(mc, quote, 30_000))["amount_paid"] == 30_000
    return await mint_onchain(mc, quote, [16384, 8192, 4096, 1024, 256, 32, 16], key)


async def withdrawn(where: Path, mc: MintClient, proofs: list[Any], amount: int) -> None:
    """``amount`` withdrawn from ``proofs`` to a new address of the outside node, its
    transaction confirmed and the melt PAID, the simulated network's books whole."""
    outside = LightningRpc(guild.outside_rpc(where))
    address = outside.newaddr()["p2tr"]
    mq = await mc.ok(
        "/v1/melt/quote/onchain", {"request": address, "unit": "sat", "amount": amount}
    )
    melt = {"quote": mq["quote"], "fee_index": 0, "inputs": proofs}
    status, done = await mc.call("/v1/melt/onchain", melt, timeout_s=60)
    assert status == 200 and done["state"] == "PENDING", done  # signed and sent meanwhile
    status, again = await mc.call("/v1/melt/onchain", melt)  # as a wallet that lost it
    assert status == 200 and again["state"] == "PENDING", again
    await confirmed(where, mc, mq["quote"])
    got = [o for o in outside.listfunds()["outputs"] if o["address"] == address]
    assert [o["amount_msat"] for o in got] == [amount * 1000]
    assert guild.lightning(where, "/v1/books")["missing_msat"] == 0


async def until_move(net: Devnet, state: str) -> None:
    """Until the operator's mint has a move in ``state`` (30 s at most)."""
    await until_counted(net, "SELECT count(*) FROM chain_moves WHERE state = $1", state)


async def until_counted(net: Devnet, query: str, *args: Any) -> None:
    """Until ``query`` counts a row in the operator's mint database (30 s at most)."""
    conn = await asyncpg.connect(net.database_url)
    try:
        deadline = time.monotonic() + 30
        while not await conn.fetchval(query, *args):
            assert time.monotonic() < deadline, f"none: {query} {args}"
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def reserve_holds(net: Devnet) -> None:
    """Until the operator's reserve invariant holds with no drift (30 s at most)."""
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 30
        while True:
            terms = await reserve(net, session)
            if (terms.get("ok") == 1 and terms.get("drift") == 0) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    assert terms["ok"] == 1 and terms["drift"] == 0, terms


async def under_key(net: Devnet, quote: str) -> bytes:
    """The guild key a deposit quote's address is under."""
    conn = await asyncpg.connect(net.database_url)
    try:
        return bytes(
            await conn.fetchval("SELECT guild_key FROM chain_quotes WHERE quote = $1", quote)
        )
    finally:
        await conn.close()


async def test_a_deposit_is_credited_after_confirmations_and_only_its_key_mints(
    where: Path, mint: MintClient
) -> None:
    outside = LightningRpc(guild.outside_rpc(where))
    q = await mint.ok("/v1/mint/quote/onchain", {"unit": "sat", "pubkey": "02" + KEY.pubkey.hex()})
    assert q["request"].startswith("bcrt1p") and q["amount_paid"] == 0
    other = await mint.ok(
        "/v1/mint/quote/onchain", {"unit": "sat", "pubkey": "02" + KEY.pubkey.hex()}
    )
    assert other["request"] != q["request"]  # an address per quote
    off_curve = {"unit": "sat", "pubkey": "02" + "ff" * 32}  # no deposit could be minted
    status, doc = await mint.call("/v1/mint/quote/onchain", off_curve)
    assert status == 400 and doc["code"] == 20009, doc
    info = await mint.ok("/v1/info")
    [onchain] = [d for d in info["nuts"]["4"]["methods"] if d["method"] == "onchain"]
    assert onchain["min_amount"] == 10_000 and onchain["options"] == {"confirmations": 3}
    [onchain] = [d for d in info["nuts"]["5"]["methods"] if d["method"] == "onchain"]
    assert onchain["min_amount"] == 330
    outside.withdraw(q["request"], DEPOSIT_SAT)
    mine(where, 2)
    await followed(where, mint)
    assert (await mint.ok(f"/v1/mint/quote/onchain/{q['quote']}"))["amount_paid"] == 0  # 2 of 3
    outside.withdraw(other["request"], 9_999)  # under the minimum: never credited
    mine(where, 1)
    assert (await paid(mint, q["quote"], DEPOSIT_SAT))["amount_paid"] == DEPOSIT_SAT
    mine(where, 3)
    await followed(where, mint)
    assert (await mint.ok(f"/v1/mint/quote/onchain/{other['quote']}"))["amount_paid"] == 0
    await until_metric(mint, "mint_chain_deposits_below_min_total", lambda n: n == 1)
    with pytest.raises(MintError) as refused:
        await mint_onchain(mint, q["quote"], [32], SigningKey(b"\x32" * 32))
    assert refused.value.code == m.SIGNATURE_INVALID
    with pytest.raises(MintError) as refused:
        await mint_onchain(mint, q["quote"], [65536], KEY)
    assert refused.value.code == m.UNBALANCED
    first = await mint_onchain(mint, q["quote"], [32768, 8192], KEY)
    rest = await mint_onchain(mint, q["quote"], [16384, 2048, 512, 64, 32], KEY)
    assert sum(p.amount for p in first + rest) == DEPOSIT_SAT
    with pytest.raises(MintError) as refused:
        await mint_onchain(mint, q["quote"], [1], KEY)
    assert refused.value.code == m.QUOTE_ISSUED
    doc = await mint.ok(f"/v1/mint/quote/onchain/{q['quote']}")
    assert doc["amount_issued"] == DEPOSIT_SAT
    DEPOSITED.extend(first + rest)


async def test_withdrawals_that_cannot_be_paid_touch_nothing(where: Path, mint: MintClient) -> None:
    proofs = list(DEPOSITED)
    assert proofs, "the deposit test runs first"
    outside = LightningRpc(guild.outside_rpc(where))
    address = outside.newaddr()["p2tr"]
    quote = await mint.ok(
        "/v1/melt/quote/onchain", {"request": address, "unit": "sat", "amount": 40_000}
    )
    status, doc = await mint.call(  # the inputs fall short: refused, nothing reserved
        "/v1/melt/onchain", {"quote": quote["quote"], "fee_index": 0, "inputs": proofs[:1]}
    )
    assert status == 400 and doc["code"] == m.UNBALANCED
    assert await mint.states(proofs) == ["UNSPENT"] * len(proofs)
    # ecash bought over Lightning, more than the mint's coins on-chain: refused as such
    ln = await mint.mint_quote(70_000)
    outside.pay(ln["request"])
    await mint.wait_paid(ln["quote"])
    over = await mint.mint(ln["quote"], [65536, 4096, 256, 64, 32, 16])
    status, doc = await mint.call(  # refused at the quote, before the wallet pays for it
        "/v1/melt/quote/onchain", {"request": address, "unit": "sat", "amount": 65_000}
    )
    assert status == 400 and "holds 60000 sat on-chain: not enough" in doc["detail"], doc
    assert await mint.states(over) == ["UNSPENT"] * len(over)
    status, doc = await mint.call(
        "/v1/melt/quote/onchain", {"request": "bc1qnotanaddress", "unit": "sat", "amount": 500}
    )
    assert status == 400 and "address" in doc["detail"]


async def test_a_withdrawal_is_signed_by_the_guild_with_a_signer_frozen(
    where: Path, mint: MintClient
) -> None:
    proofs = list(DEPOSITED)
    outside = LightningRpc(guild.outside_rpc(where))
    address = outside.newaddr()["p2tr"]
    q = await mint.ok(
        "/v1/melt/quote/onchain", {"request": address, "unit": "sat", "amount": 40_000}
    )
    reserve_sat = q["fee_options"][0]["fee_reserve"]
    status, doc = await mint.call("/v1/melt/bolt11", {"quote": q["quote"], "inputs": proofs})
    assert status == 400 and "no bolt11 quote" in doc["detail"]  # not paid over Lightning
    assert 0 < reserve_sat < 2_000
    blanks, secrets = client.outputs_of([1] * 12, mint.active)
    signer2 = guild.load(where)[2].signers[0].pid
    os.kill(signer2, signal.SIGSTOP)  # ROAST: 2 of 3 respond
    try:
        status, done = await mint.call(
            "/v1/melt/onchain",
            {"quote": q["quote"], "fee_index": 0, "inputs": proofs, "outputs": blanks},
        )
        assert status == 200 and done["state"] == "PENDING", done
        assert await mint.states(proofs) == ["PENDING"] * len(proofs)
        sent = await melt_until(mint, q["quote"], lambda d: bool(d.get("outpoint")), 120)
    finally:
        os.kill(signer2, signal.SIGCONT)
    mine(where, 2)
    await followed(where, mint)
    assert (await mint.ok(f"/v1/melt/quote/onchain/{q['quote']}"))["state"] == "PENDING"  # 2 of 3
    mine(where, 1)
    done = await melt_until(mint, q["quote"], lambda d: d["state"] == "PAID")
    assert done["outpoint"] == sent["outpoint"]
    txid, vout = done["outpoint"].split(":")
    [got] = [o for o in outside.listfunds()["outputs"] if o["address"] == address]
    assert got["amount_msat"] == 40_000_000 and got["txid"] == txid and got["output"] == int(vout)
    n = len(done["change"])
    change = mint.unblind(done["change"], blanks[:n], secrets[:n], change=True)
    fee = DEPOSIT_SAT - 40_000 - sum(p.amount for p in change)
    assert 0 < fee <= reserve_sat
    assert await mint.states(proofs) == ["SPENT"] * len(proofs)
    books = guild.lightning(where, "/v1/books")
    assert books["missing_msat"] == 0
    await reserve_holds(guild.load(where)[0])


async def test_the_wallet_deposits_and_pays_on_chain(where: Path) -> None:
    """``wallet deposit --onchain`` and ``wallet pay <bitcoin address>``: the address
    shown is paid from the outside node's wallet, credited as an L3 coin after the
    confirmations; then a Bitcoin address (in a BIP21 URI) is paid on-chain from coins."""
    op0 = guild.load(where)[0]
    file = str(where.parent / "wallet-onchain.json")
    create = ["wallet", "create", "--file", file, "--gateway", op0.gateway_url]
    assert (await cli(*create, "--mint", op0.mint_url))[0] == 0
    deposit = ["wallet", "deposit", "--onchain", "--wait", "0", "--no-qr", "--file", file]
    code, out = await cli(*deposit, "9999")  # NUT-30's min_amount: never credited
    assert code == 1 and "no on-chain deposit under 10000 sat" in out, out
    code, out = await cli(*deposit, "25000")
    assert code == PENDING_EXIT, out
    uri = next(line for line in out.splitlines() if line.startswith("bitcoin:"))
    address = uri.removeprefix("bitcoin:").split("?")[0]
    outside = LightningRpc(guild.outside_rpc(where))
    outside.withdraw(address, 25_000)
    mine(where, 3)
    deadline = time.monotonic() + 30
    while (held := (await balance(file))[0]) == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert held == 25_000_000, held

    to = outside.newaddr()["p2tr"]
    code, out = await cli("wallet", "pay", f"bitcoin:{to}?amount=0.0001", "--yes", "--file", file)
    assert code == PENDING_EXIT and "PENDING" in out, out  # NUT-30: PAID once confirmed
    assert "miner fee: at most" in out
    for then in ("sent on-chain as outpoint", "PAID on-chain"):  # sent in the background
        deadline = time.monotonic() + 30
        while then not in (said := (await balance(file))[1]):
            assert time.monotonic() < deadline, said
            await asyncio.sleep(0.5)
        if then.startswith("sent"):
            mine(where, 3)
    [got] = [o for o in outside.listfunds()["outputs"] if o["address"] == to]
    assert got["amount_msat"] == 10_000_000
    spent = 25_000_000 - (await balance(file))[0]
    assert 10_000_000 < spent < 10_000_000 + 1_000_000  # the amount, the fees: no more


async def test_a_withdrawal_pays_the_feerate_the_market_asks(where: Path, mint: MintClient) -> None:
    """A busy market (the chain's blocks take 25 sat/vB and up, and bitcoind estimates
    so): a withdrawal's quote reserves for that feerate, its transaction pays it and the
    next block would take it (at the feerate once set, 2 sat/vB, it would wait in the
    mempool for as long as the market stays busy); a quote made before the market rose
    is refused, its proofs free. The market busier still before a block takes it, the
    withdrawal misses two blocks, and the mint bumps it: a child of its change pays for
    both (CPFP, on the mint's account: the books still hold), and the next block takes
    the two. The market calm again, quotes reserve less."""
    q = await mint.ok("/v1/mint/quote/onchain", {"unit": "sat", "pubkey": "02" + KEY.pubkey.hex()})
    proofs = await deposited(where, mint, q["quote"], q["request"], KEY)
    outside = LightningRpc(guild.outside_rpc(where))
    address = outside.newaddr()["p2tr"]
    ask = {"request": address, "unit": "sat", "amount": 10_000}
    calm_doc = await mint.ok("/v1/melt/quote/onchain", ask)
    calm, calm_q = calm_doc["fee_options"][0]["fee_reserve"], calm_doc["quote"]
    guild.lightning(where, "/v1/feerate", {"sat_per_vb": 25})
    try:
        await until_metric(mint, "mint_chain_feerate", lambda rate: rate == 25)
        busy = await mint.ok("/v1/melt/quote/onchain", ask)
        assert busy["fee_options"][0]["fee_reserve"] == calm // 2 * 25  # calm: the least, 2
        blanks, _ = client.outputs_of([1] * 14, mint.active)
        status, doc = await mint.call(
            "/v1/melt/onchain",
            {"quote": calm_q, "fee_index": 0, "inputs": proofs, "outputs": blanks},
        )
        assert status == 400 and "ask a new quote" in doc["detail"], doc
        assert await mint.states(proofs) == ["UNSPENT"] * len(proofs)
        status, done = await mint.call(
            "/v1/melt/onchain",
            {"quote": busy["quote"], "fee_index": 0, "inputs": proofs, "outputs": blanks},
        )
        assert status == 200 and done["state"] == "PENDING", done
        done = await melt_until(mint, busy["quote"], lambda d: bool(d.get("outpoint")), 120)
        guild.lightning(where, "/v1/feerate", {"sat_per_vb": 60})
        mine(where, 2)  # it misses two blocks: bumped then
        await followed(where, mint)
        [got] = [o for o in outside.listfunds()["outputs"] if o["address"] == address]
        assert got["status"] == "unconfirmed"
        await until_counted(
            guild.load(where)[0],
            "SELECT count(*) FROM chain_bumps WHERE quote = $1 AND state = 'SENT'",
            busy["quote"],
        )
        mine(where, 1)
        [got] = [o for o in outside.listfunds()["outputs"] if o["address"] == address]
        assert got["txid"] == done["outpoint"].split(":")[0] and got["status"] == "confirmed"
        mine(where, 2)
        await melt_until(mint, busy["quote"], lambda d: d["state"] == "PAID")
    finally:
        guild.lightning(where, "/v1/feerate", {"sat_per_vb": 1})
    await until_metric(mint, "mint_chain_feerate", lambda rate: rate == 2)
    again = await mint.ok("/v1/melt/quote/onchain", ask)
    assert again["fee_options"][0]["fee_reserve"] == calm
    await reserve_holds(guild.load(where)[0])


async def test_a_withdrawal_survives_kill_9_of_the_mint_while_the_guild_signs(
    where: Path, mint: MintClient
) -> None:
    """The mint dies (``kill -9``) after recording a withdrawal (the melt answered
    PENDING), while two signers are frozen so the guild cannot sign: its successor signs
    and sends the same transaction once they are back, the melt is PAID once confirmed,
    the books balance."""
    outside = LightningRpc(guild.outside_rpc(where))
    key = SigningKey(b"\x33" * 32)
    q = await mint.ok("/v1/mint/quote/onchain", {"unit": "sat", "pubkey": "02" + key.pubkey.hex()})
    proofs = await deposited(where, mint, q["quote"], q["request"], key)
    address = outside.newaddr()["p2tr"]
    mq = await mint.ok(
        "/v1/melt/quote/onchain", {"request": address, "unit": "sat", "amount": 20_000}
    )
    nets = guild.load(where)
    frozen = [nets[1].signers[0].pid, nets[2].signers[0].pid]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        status, done = await mint.call(
            "/v1/melt/onchain", {"quote": mq["quote"], "fee_index": 0, "inputs": proofs}
        )
        assert status == 200 and done["state"] == "PENDING" and not done["outpoint"], done
        await asyncio.sleep(1)  # its signing under way, waiting for the frozen signers
        os.kill(Devnet.load(Path(nets[0].dir)).mint_pid, signal.SIGKILL)
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    await confirmed(where, mint, mq["quote"], within_s=90)
    got = [o for o in outside.listfunds()["outputs"] if o["address"] == address]
    assert [o["amount_msat"] for o in got] == [20_000_000]  # paid once
    assert await mint.states(proofs) == ["SPENT"] * len(proofs)
    assert guild.lightning(where, "/v1/books")["missing_msat"] == 0


async def test_the_guild_coins_move_to_a_new_key_through_kill_9_of_the_mint(
    where: Path,
) -> None:
    """A change of members re-makes the guild key: op0 and op1 make a new one (op2 takes
    no part), op0's mint moves every coin it holds to it in one spend the old key signs
    (the chain checks each signature), once, though it is killed (``kill -9``) while the
    old key's signers are frozen; the miner's fee is booked (the reserve holds, no
    drift)."""
    nets = guild.load(where)
    old = (await asyncio.to_thread(guild.signer_request, nets[0], KeyRequest())).threshold_pubkey
    plan = KeyPlan([0, 1], 2)  # as the operators agree to it, in their NATS KV
    new = (await asyncio.to_thread(guild.plan_key, nets[:2], plan))[0].key
    assert new != old
    for net in nets[:2]:  # an hour on: the quotes under the old key expired (while one is
        # open, its address may be paid, and the old key is not retired: ``moved``)
        conn = await asyncpg.connect(net.database_url)
        try:
            await conn.execute("UPDATE chain_quotes SET expiry = 0")
        finally:
            await conn.close()
    frozen = [nets[1].signers[0].pid, nets[2].signers[0].pid]  # the old key cannot sign
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        moving = asyncio.create_task(
            asyncio.to_thread(guild.plan_key, nets[:2], msgspec.structs.replace(plan, move=True))
        )
        await until_move(nets[0], "SIGNING")  # recorded: the coins are the move's
        os.kill(Devnet.load(Path(nets[0].dir)).mint_pid, signal.SIGKILL)
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    while not moving.done():  # the restarted mint signs and sends the same move
        mine(where, 1)
        await asyncio.sleep(0.5)
    [txid] = [t for seen in await moving for t in seen.txids]  # op1's mint held no coin
    conn = await asyncpg.connect(nets[0].database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM chain_moves") == 1
        coins = await conn.fetch(
            "SELECT txid, key, amount_sat FROM chain_coins WHERE held AND spent_by IS NULL"
        )
        assert [(r["txid"], bytes(r["key"])) for r in coins] == [(txid, new)]
        fee = await conn.fetchval("SELECT fee_sat FROM chain_moves WHERE key = $1", new)
        assert 0 < fee < 1_000
    finally:
        await conn.close()
    await reserve_holds(nets[0])
    KEYS[:] = [old, new]


async def test_with_the_old_key_retired_the_new_one_alone_signs(
    where: Path, mint: MintClient
) -> None:
    """New deposits go to addresses under the new key; with the old key retired at op0
    and op1, a withdrawal spends the moved coin and a new deposit, signed by the new
    key alone."""
    old, new = KEYS
    nets = guild.load(where)
    for net in nets[:2]:
        activated = await asyncio.to_thread(guild.signer_request, net, ActivateKey(new))
        assert [k.key for k in activated.keys] == [new]
    refused = await asyncio.to_thread(
        guild.signer_request, nets[0], SignRequest(Statement("x"), key=old)
    )
    assert not refused.ok and "no usable guild key" in refused.error

    key = SigningKey(b"\x34" * 32)
    deadline = time.monotonic() + 30
    while True:  # the mint asks its signer for the newest key as its resolver goes round
        q = await mint.ok(
            "/v1/mint/quote/onchain", {"unit": "sat", "pubkey": "02" + key.pubkey.hex()}
        )
        if await under_key(nets[0], q["quote"]) == new:
            break
        assert time.monotonic() < deadline, "the mint's new addresses are not under the new key"
        await asyncio.sleep(0.5)
    proofs = await deposited(where, mint, q["quote"], q["request"], key)
    await withdrawn(where, mint, proofs, 29_000)


async def test_a_deposit_from_a_coinbase_is_credited_once_it_can_be_spent(
    where: Path, mint: MintClient
) -> None:
    """A miner paid by its pool in the coinbase, straight to a quote's address: Bitcoin
    spends it from its 100th confirmation on (a reorganisation would take it away for
    good), so the mint neither credits it nor counts it as funds at 3 confirmations, nor
    at 99; at 100 it is credited, and a withdrawal spending it is taken by the chain."""
    key = SigningKey(b"\x35" * 32)
    q = await mint.ok("/v1/mint/quote/onchain", {"unit": "sat", "pubkey": "02" + key.pubkey.hex()})
    generated = guild.lightning(
        where, "/bitcoind", {"method": "generatetoaddress", "params": [1, q["request"]]}
    )
    assert len(generated["result"]) == 1, generated
    outside = LightningRpc(guild.outside_rpc(where))
    address = outside.newaddr()["p2tr"]
    for blocks in (2, 96):  # 3 confirmations, then 99
        mine(where, blocks)
        await followed(where, mint)
        assert (await mint.ok(f"/v1/mint/quote/onchain/{q['quote']}"))["amount_paid"] == 0
    status, doc = await mint.call(  # not the mint's funds yet
        "/v1/melt/quote/onchain", {"request": address, "unit": "sat", "amount": 1_000_000}
    )
    assert status == 400 and "not enough" in doc["detail"], doc
    mine(where, 1)
    assert (await paid(mint, q["quote"], COINBASE_SAT))["amount_paid"] == COINBASE_SAT
    await withdrawn(where, mint, await mint_onchain(mint, q["quote"], [2**20], key), 1_000_000)
