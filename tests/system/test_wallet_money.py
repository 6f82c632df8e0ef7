"""``constellation wallet deposit`` and ``wallet pay`` over real processes: a local guild
of 2 operators, the wallet at op0 (its gateway and its mint), the simulated network's
outside node the world that pays the wallet's invoices and issues those it pays.

A deposit is credited as an L3 coin once its invoice is paid; an invoice (bare, or in a
BIP21 URI) is paid through a withdrawal and a melt, the fee reserve's change coming back
as a coin; a payment that fails comes back whole; one whose payment hangs is PENDING
until its fate is known, and the next ``wallet balance`` finishes it; a wallet that
stopped mid-flow takes it up where it was; a wallet whose file is lost is restored from
its words, its coins and its ecash. The reserve invariant holds at the end.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis
from pyln.client import LightningRpc

from constellation.address import Network, encode_address
from constellation.ecash import mint as m
from constellation.ecash.client import Secret
from constellation.keys import SigningKey
from constellation.ledger.partition import Coin
from constellation.payto import parse
from constellation.protocol import cashu as nut
from constellation.tx import decode_transaction
from services.api_client import Gateway, GatewayError
from services.crossload import reserve
from services.devnet import guild
from services.ecash.client import MintClient, MintError
from services.gateway.errors import IN_DOUBT
from services.wallet import PENDING_EXIT, WalletFile, unspent
from services.wallet_money import GIVE_UP_S, MAX_BLANKS, Flows, MoneyError
from tests.system.guild import cli, local_guild

DEPOSIT_SAT = 20_000
L3_FEE_MSAT = 1_000


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    with local_guild("cst-money-", operators=2) as directory:
        yield directory


@pytest.fixture(scope="module")
def alice(where: Path) -> str:
    """Alice's wallet at op0 (its gateway, its mint)."""
    op0, _ = guild.load(where)
    file = str(where.parent / "alice.json")
    code, _ = asyncio.run(
        cli(
            "wallet", "create", "--file", file, "--gateway", op0.gateway_url, "--mint", op0.mint_url
        )
    )
    assert code == 0
    return file


async def balance(file: str) -> tuple[int, str]:
    """The wallet's coins in msat (after it took up its flows), and what it said."""
    code, out = await cli("wallet", "balance", "--file", file)
    assert code == 0, out
    line = next(x for x in out.splitlines() if " msat in " in x and x.endswith("coins"))
    return int(line.split(" msat in ", 1)[0]), out


async def settled(file: str) -> int:
    """The balance once the gateway's index shows what the ledger committed (it follows
    the blocks a moment behind): the same twice in a row, a moment apart."""
    last, _ = await balance(file)
    while True:
        await asyncio.sleep(0.3)
        now, _ = await balance(file)
        if now == last:
            return now
        last = now


def op0_mint(where: Path) -> str:
    return guild.load(where)[0].mint_url.rstrip("/")


def outside(where: Path) -> LightningRpc:
    return LightningRpc(guild.outside_rpc(where))


def invoice(where: Path, sat: int) -> dict[str, str]:
    """A merchant's invoice, at the outside node."""
    label = f"bill-{os.urandom(4).hex()}"
    found: dict[str, str] = outside(where).invoice(sat * 1000, label, "a bill")
    return {**found, "label": label}


def status(where: Path, label: str) -> str:
    [inv] = outside(where).listinvoices(label)["invoices"]
    return str(inv["status"])


async def test_a_deposit_is_credited_as_a_coin_once_its_invoice_is_paid(
    where: Path, alice: str
) -> None:
    # not paid within --wait: the deposit stays in the wallet, waiting
    code, out = await cli("wallet", "deposit", "500", "--file", alice, "--wait", "0")
    assert code == PENDING_EXIT and "waiting" in out and "█" in out, out  # with its QR code
    [flow] = WalletFile.load(Path(alice)).flows
    assert flow["request"] in out and flow["mint"] == op0_mint(where)
    # A mint that is down: the balance is the ledger's all the same (the flow waits,
    # taken up at its own mint by the next balance).
    code, out = await cli("wallet", "balance", "--file", alice, "--mint", "http://127.0.0.1:9")
    assert code == 0 and "not reachable" in out and " msat in " in out, out
    code, out = await cli("wallet", "balance", "--file", alice)
    assert code == 0 and "waiting" in out, out
    # paid meanwhile: the next balance mints, redeems, credits it
    await asyncio.to_thread(outside(where).pay, flow["request"])
    _, out = await balance(alice)
    assert "deposit of 500 sat: credited 500000 msat" in out, out
    assert await settled(alice) == 500_000
    assert WalletFile.load(Path(alice)).flows == []
    # and the usual way: the command waits, the invoice is paid while it does
    deposit = asyncio.ensure_future(
        cli("wallet", "deposit", str(DEPOSIT_SAT), "--file", alice, "--no-qr", "--wait", "30")
    )
    while not (flows := WalletFile.load(Path(alice)).flows):
        await asyncio.sleep(0.05)
    await asyncio.to_thread(outside(where).pay, flows[0]["request"])
    code, out = await deposit
    assert code == 0 and f"credited {DEPOSIT_SAT * 1000} msat as coin" in out, out
    assert "█" not in out
    assert await settled(alice) == (DEPOSIT_SAT + 500) * 1000


async def test_an_invoice_is_paid_through_the_mint(where: Path, alice: str) -> None:
    before = await settled(alice)
    bill = invoice(where, 3_000)
    code, out = await cli("wallet", "pay", bill["bolt11"], "--file", alice, "--yes")
    assert code == 0 and "PAID" in out and "Lightning routing fee: at most" in out, out
    assert status(where, bill["label"]) == "paid"
    fee_sat = int(out.split("Lightning fee ", 1)[1].split(" sat", 1)[0])
    after = await settled(alice)
    assert before - after == 3_000_000 + fee_sat * 1000 + L3_FEE_MSAT  # the change came back
    # a BIP21 URI with an invoice is paid over Lightning
    bill = invoice(where, 1_000)
    uri = f"bitcoin:?amount=0.00001&lightning={bill['bolt11']}"
    code, out = await cli("wallet", "pay", uri, "--file", alice)
    assert code == 0 and "PAID" in out and status(where, bill["label"]) == "paid", out
    # paid once: the same invoice again is refused by the mint, nothing spent
    again = await settled(alice)
    code, out = await cli("wallet", "pay", bill["bolt11"], "--file", alice)
    assert code == 1 and f"[{m.INVOICE_PAID}]" in out, out
    assert (await balance(alice))[0] == again and WalletFile.load(Path(alice)).flows == []


async def test_what_wallet_pay_refuses_costs_nothing(where: Path, alice: str) -> None:
    before = await settled(alice)
    amountless = outside(where).invoice("any", "free", "any amount")
    for thing, why in (
        ("bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0", "expected 'bcrt'"),
        (encode_address(bytes(SigningKey(os.urandom(32)).pubkey), "bcrt"), "address says no"),
        (amountless["bolt11"], "no amount"),
        ("hello", "neither an invoice nor an address"),
    ):
        code, out = await cli("wallet", "pay", thing, "--file", alice)
        assert code == 1 and why in out, (thing, out)
    bill = invoice(where, 100)
    code, out = await cli("wallet", "pay", bill["bolt11"], "--file", alice, "--max-fee-msat", "1")
    assert code == 1 and "over --max-fee-msat" in out, out
    assert (await balance(alice))[0] == before and status(where, bill["label"]) == "unpaid"


async def test_a_payment_that_fails_comes_back_whole(where: Path, alice: str) -> None:
    before = await settled(alice)
    bill = invoice(where, 2_000)
    guild.lightning_faults(where, guild.OUTSIDE, {"fail_next": 1})
    code, out = await cli("wallet", "pay", bill["bolt11"], "--file", alice)
    assert code == 1 and "FAILED" in out and status(where, bill["label"]) == "unpaid", out
    assert await settled(alice) == before - L3_FEE_MSAT  # only the L3 fee is gone


async def test_a_hanging_payment_is_pending_until_its_fate_is_known(
    where: Path, alice: str
) -> None:
    before = await settled(alice)
    bill = invoice(where, 1_500)
    guild.lightning_faults(where, guild.OUTSIDE, {"hold": True})
    try:
        code, out = await cli("wallet", "pay", bill["bolt11"], "--file", alice, "--wait", "1")
        assert code == PENDING_EXIT and "PENDING" in out, out
        _, out = await balance(alice)  # still: the ecash stays reserved, nothing refunded
        assert "PENDING" in out and len(WalletFile.load(Path(alice)).flows) == 1, out
    finally:
        guild.lightning(where, f"/v1/release/{guild.OUTSIDE}", {})
        guild.lightning_faults(where, guild.OUTSIDE, {"hold": False})
    end = time.monotonic() + 20
    while WalletFile.load(Path(alice)).flows:  # a balance finishes it, once it is known
        _, out = await balance(alice)
        assert time.monotonic() < end, out
        await asyncio.sleep(0.3)
    assert "PAID" in out and status(where, bill["label"]) == "paid", out
    after = await settled(alice)
    assert before - after >= 1_500_000 + L3_FEE_MSAT


async def test_a_wallet_stopped_mid_payment_takes_it_up(where: Path, alice: str) -> None:
    """The flow recorded, its withdrawal sent but its reply lost (the wallet stopped):
    the next balance sends it again, gets the same ecash, and pays the invoice once."""
    op0, _ = guild.load(where)
    before = await settled(alice)
    bill = invoice(where, 700)
    doc = WalletFile.load(Path(alice))
    async with aiohttp.ClientSession() as s:
        gw, mint = Gateway(op0.gateway_url, s), MintClient(op0.mint_url, s)
        flows = Flows(doc, Path(alice), gw, mint, io.StringIO())
        await mint.load()
        flow = await flows.quote(parse(bill["bolt11"], Network.REGTEST))
        await flows.pay(flow, await unspent(flows.gw, doc), L3_FEE_MSAT)
        body = {"tx": flow["tx"], "outputs": flow["outputs"]}
        await flows.mint.ok("/v1/l3/withdraw", body)  # sent; the reply never read
    assert json.loads(Path(alice).read_text())["flows"][0]["quote"] == flow["quote"]
    _, out = await balance(alice)
    assert "PAID" in out and status(where, bill["label"]) == "paid", out
    after = await settled(alice)
    assert before - after >= 700_000 + L3_FEE_MSAT and WalletFile.load(Path(alice)).flows == []


async def test_a_withdrawal_the_ledger_refused_costs_nothing_one_not_known_is_kept(
    where: Path, alice: str
) -> None:
    """Refused at its first try (the ledger has no such coin): the flow goes, nothing
    spent. A withdrawal whose answer is not clear (the mint, rate limited, answered
    HTTP 429) stays in the wallet file, its value safe, and is taken up later."""
    op0, _ = guild.load(where)
    doc = WalletFile.load(Path(alice))
    key = doc.wallet().key(0, 0).pubkey
    async with aiohttp.ClientSession() as s:
        gw, mint = Gateway(op0.gateway_url, s), MintClient(op0.mint_url, s)
        flows = Flows(doc, Path(alice), gw, mint, io.StringIO())
        await mint.load()
        bill = invoice(where, 300)
        flow = await flows.quote(parse(bill["bolt11"], Network.REGTEST))
        await flows.pay(flow, {os.urandom(32): Coin(10_000_000, key)}, L3_FEE_MSAT)
        with pytest.raises(MoneyError, match="nothing was spent"):
            await flows.resume(flow)
        assert WalletFile.load(Path(alice)).flows == []
        before = await settled(alice)
        flow = await flows.quote(parse(bill["bolt11"], Network.REGTEST))
        await flows.pay(flow, await unspent(gw, doc), L3_FEE_MSAT)
        flow["tries"] = 1  # as if a first try's answer had been lost
        refused = MintError(429, 0, "over its rate")
        assert await flows._not_withdrawn(flow, refused) == "withdrawing"
        flows._save()
    [kept] = WalletFile.load(Path(alice)).flows
    assert kept["quote"] == flow["quote"] and "refused_at" in kept
    # Long after, the ledger's word is still not final: a submission of it timed out
    # (as the gateway keeps it, in Redis): the flow waits; "not found" for good ends it.
    txid = decode_transaction(bytes.fromhex(flow["tx"])).txid
    redis = aioredis.from_url(op0.redis_url)
    async with aiohttp.ClientSession() as s:
        flows.gw = Gateway(op0.gateway_url, s)
        late = {**flow, "refused_at": time.time() - GIVE_UP_S}
        doc.flows.append(late)
        await redis.set(f"doubt:{txid.hex()}", str(time.time()))
        with pytest.raises(GatewayError) as in_doubt:
            await flows._not_withdrawn(late, MintError(503, 0, "not committed (yet?)"))
        assert in_doubt.value.code == IN_DOUBT and late in doc.flows
        await redis.delete(f"doubt:{txid.hex()}")
        with pytest.raises(MoneyError, match="nothing was spent"):
            await flows._not_withdrawn(late, MintError(503, 0, "not committed (yet?)"))
        assert late not in doc.flows and doc.archive[-1]["tx"] == flow["tx"]  # kept whole
    await redis.aclose()
    _, out = await balance(alice)  # taken up: withdrawn, melted, paid
    assert "PAID" in out and status(where, bill["label"]) == "paid", out
    assert before - await settled(alice) >= 300_000 + L3_FEE_MSAT


async def test_a_lost_wallet_file_is_restored_from_its_words_coins_and_ecash(
    where: Path, alice: str
) -> None:
    """Alice pays herself at a receive key past the few a balance looks ahead (her
    change at a change key), then buys ecash for an invoice and the wallet file is lost
    before the melt: restored from her words, the wallet finds every coin and the
    ecash the mint signed for it (NUT-13 secrets, NUT-09), redeems that, and pays."""
    op0, _ = guild.load(where)
    for _ in range(7):
        _, late = await cli("wallet", "address", "--file", alice)
    code, out = await cli("wallet", "pay", late.strip(), "1000000", "--file", alice, "--yes")
    assert code == 0 and "committed" in out, out
    held = await settled(alice)
    lost = WalletFile.load(Path(alice))
    async with aiohttp.ClientSession() as s:
        gw, mint = Gateway(op0.gateway_url, s), MintClient(op0.mint_url, s)
        flows = Flows(lost, Path(alice), gw, mint, io.StringIO())
        await mint.load()
        flow = await flows.quote(parse(invoice(where, 800)["bolt11"], Network.REGTEST))
        await flows.pay(flow, await unspent(gw, lost), L3_FEE_MSAT)
        await mint.ok("/v1/l3/withdraw", {"tx": flow["tx"], "outputs": flow["outputs"]})
        change = decode_transaction(bytes.fromhex(flow["tx"])).outputs[1].owner
        while not await gw.history(encode_address(bytes(change), Network.REGTEST), 1):
            await asyncio.sleep(0.1)  # the gateway's index follows the blocks
    Path(alice).unlink()  # the file is lost: with it the flow, its secrets and its proofs
    code, out = await cli(
        "wallet", "restore", *lost.mnemonic.split(), "--file", alice,
        "--gateway", op0.gateway_url, "--mint", op0.mint_url,
    )  # fmt: skip
    redeemed = flow["ecash"] - flow["input_fee"]  # the withdrawal's ecash, back as a coin
    assert code == 0 and f"keys in use: {lost.receive - 1} to receive" in out, out
    assert f"{flow['ecash']} sat unspent recovered" in out and "back as a coin" in out, out
    withdrawn = flow["ecash"] * 1000 + L3_FEE_MSAT
    assert await settled(alice) == held - withdrawn + redeemed * 1000
    restored = WalletFile.load(Path(alice))
    assert restored.change == lost.change and restored.flows == []
    # past the lost flow's blank outputs too (the mint signs those only as its melt
    # settles: made again for another flow, that melt's change would be lost)
    assert lost.counters[mint.active] <= restored.counters[mint.active]
    assert restored.counters[mint.active] <= lost.counters[mint.active] + MAX_BLANKS
    # found once: what the restore redeemed is spent, a rescan finds nothing more
    code, out = await cli("wallet", "rescan", "--file", alice)
    assert code == 0 and " 0 sat unspent recovered" in out, out
    # ecash recovered but spent before it was redeemed (by another copy of the wallet,
    # here the restore's redemption of it with the others): the flow goes
    doc = WalletFile.load(Path(alice))
    async with aiohttp.ClientSession() as s:
        mint = MintClient(op0.mint_url, s)
        flows = Flows(doc, Path(alice), Gateway(op0.gateway_url, s), mint, io.StringIO())
        await mint.load()
        outputs = msgspec.convert(flow["outputs"], list[nut.BlindedMessage])
        secrets = [Secret(x, int(r, 16)) for x, r in flow["secrets"]]
        [spent, *_] = await mint.restore(outputs, secrets)
        taken = {"kind": "recovered", "mint": mint.url, "amount": spent.amount}
        doc.flows.append(
            {**taken, "proofs": [msgspec.to_builtins(spent)], "refund_to": late.strip()}
        )
        [said] = await flows.resume()
        assert "spent meanwhile" in said and doc.flows == [], said
    # and it pays, its ecash secrets past those the mint signed
    bill = invoice(where, 900)
    code, out = await cli("wallet", "pay", bill["bolt11"], "--file", alice, "--yes")
    assert code == 0 and "PAID" in out and status(where, bill["label"]) == "paid", out


async def test_the_books_hold_after_the_money_moved(where: Path) -> None:
    """At both operators: the money came from, and went to, the outside world."""
    async with aiohttp.ClientSession() as s:
        for net in guild.load(where):
            deadline, steady = time.monotonic() + 20, 0
            while steady < 3:
                r = await reserve(net, s)
                steady = steady + 1 if r.get("ok") == 1 and r.get("drift") == 0 else 0
                assert time.monotonic() < deadline, (net.operator, r)
                await asyncio.sleep(1.0)
            assert r["in_flight"] == 0
