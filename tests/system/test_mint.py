"""Each operator's Cashu mint over real processes: a local guild of 2 operators, each
with its mint (``python -m services.ecash``) on its own PostgreSQL and Lightning node.

Ecash is minted for an invoice paid from the other operator's node, swapped, checked,
melted to the other node's invoice with its fee's change (NUT-08), and restored
(NUT-09); every signature's DLEQ proof checks (NUT-12). Concurrent swaps sharing proofs:
exactly one wins each proof. A melt whose payment hangs stays PENDING with its proofs
reserved until the payment settles; one whose payment fails frees them; none is both.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest
from aiohttp import web
from pyln.client import LightningRpc

from constellation.address import Network, encode_address
from constellation.crypto import bdhke
from constellation.ecash import client
from constellation.ecash import mint as m
from constellation.ecash.keyset import Keyset, split
from constellation.keys import SigningKey
from constellation.ledger.partition import Coin
from constellation.protocol import cashu as nut
from constellation.wallet import Wallet
from services.api_client import Gateway, GatewayError
from services.crossload import reserve
from services.devnet import Devnet, free_port, guild, spawn, stop_pid, wait_ready
from services.devnet.procs import child_pids
from services.ecash.app import ISSUE_SETTLE_S
from services.ecash.client import MintClient, MintError
from services.ecash.store import SWAP_GROUPS, MintBooks, MintStore, mint_books
from services.workload import FEE_MSAT
from tests.system.guild import local_guild


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    with local_guild("cst-mint-", operators=2) as directory:
        yield directory


class Mint(MintClient):
    """The wallet's client of a mint, with the tests' checks."""

    async def refused(self, path: str, body: Any) -> int:
        """The NUT code of a request the mint must refuse (HTTP 400)."""
        status, doc = await self.call(path, body)
        assert status == 400, doc
        return int(doc["code"])

    async def mint_paid(self, amount: int, payer: LightningRpc) -> list[nut.Proof]:
        """A quote locked to a key (NUT-20), its invoice paid from ``payer``'s node, then
        minted: refused unsigned, and refused a second time."""
        key = SigningKey(os.urandom(32))
        quote = await self.mint_quote(amount, key)
        assert quote["state"] == "UNPAID"
        await asyncio.to_thread(payer.pay, quote["request"])
        await self.wait_paid(quote["quote"])
        outputs, _ = client.outputs_for(amount, self.active)
        unsigned = {"quote": quote["quote"], "outputs": outputs}
        assert await self.refused("/v1/mint/bolt11", unsigned) == m.SIGNATURE_INVALID
        proofs = await self.mint(quote["quote"], split(amount), key)  # each DLEQ checked
        again, _ = client.outputs_for(amount, self.active)
        signed = {"quote": quote["quote"], "outputs": again}
        signed["signature"] = client.sign_mint_request(key, quote["quote"], again)
        assert await self.refused("/v1/mint/bolt11", signed) == m.QUOTE_ISSUED
        return proofs

    async def ones(self, count: int, where: Path) -> list[nut.Proof]:
        """``count`` 1-sat proofs, their invoice paid from the outside node."""
        quote = await self.mint_quote(count)
        await asyncio.to_thread(LightningRpc(guild.outside_rpc(where)).pay, quote["request"])
        await self.wait_paid(quote["quote"])
        return await self.mint(quote["quote"], [1] * count)


@contextlib.asynccontextmanager
async def another_mint(op0: Devnet, log: str, **env: str) -> AsyncIterator[str]:
    """A second mint process on op0's database (``env`` over op0's settings), up for
    the block: its URL."""
    port = free_port()
    settings = {**op0.mint_env(), "MINT_HTTP_ADDR": f"127.0.0.1:{port}", **env}
    pid = spawn([sys.executable, "-m", "services.ecash"], settings, Path(op0.dir) / log)
    try:
        await asyncio.to_thread(wait_ready, port, pid, 30)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_pid(pid, 5)


def nets(where: Path) -> list[Devnet]:
    return guild.load(where)


async def test_mint_swap_melt_and_restore(where: Path) -> None:
    op0, op1 = nets(where)
    payer, payee = LightningRpc(op1.lightning_rpc), LightningRpc(op1.lightning_rpc)
    async with aiohttp.ClientSession() as s:
        mint = Mint(op0.mint_url, s)
        info = await mint.ok("/v1/info")
        assert {"4", "5", "7", "8", "9", "12", "20"} <= set(info["nuts"])
        await mint.load()
        proofs = await mint.mint_paid(1000, payer)
        assert sum(p.amount for p in proofs) == 1000
        # a swap, and the same proofs again: spent
        swapped = await mint.swap(proofs, split(1000))
        assert await mint.states(proofs) == ["SPENT"] * len(proofs)
        assert set(await mint.states(swapped)) == {"UNSPENT"}
        outputs, _ = client.outputs_for(1000, mint.active)
        again = {"inputs": proofs, "outputs": outputs}
        assert await mint.refused("/v1/swap", again) == m.SPENT
        # melt 300 sat to op1's node: inputs for the amount and the fee reserve, and
        # blank outputs for what the routing fee leaves of the reserve (NUT-08)
        invoice = payee.invoice(300_000, f"melt-{os.urandom(4).hex()}", "a melt")["bolt11"]
        quote = await mint.ok("/v1/melt/quote/bolt11", {"request": invoice, "unit": "sat"})
        reserve = quote["fee_reserve"]
        assert quote["amount"] == 300 and reserve >= 2
        outputs, secrets = client.outputs_for(300 + reserve, mint.active)
        rest, rest_secrets = client.outputs_for(1000 - 300 - reserve, mint.active)
        # NUT-07: the witness a proof was spent with, once it is spent (none before)
        witness = '{"signatures": []}'
        ys = [bdhke.hash_to_curve(p.secret.encode()).format().hex() for p in swapped]
        spending = [msgspec.structs.replace(swapped[0], witness=witness), *swapped[1:]]
        before = await mint.ok("/v1/checkstate", {"Ys": ys})
        assert [s["witness"] for s in before["states"]] == [None] * len(ys)
        doc = await mint.ok("/v1/swap", {"inputs": spending, "outputs": outputs + rest})
        after = await mint.ok("/v1/checkstate", {"Ys": ys})
        assert [s["witness"] for s in after["states"]] == [witness] + [None] * (len(ys) - 1)
        exact = mint.unblind(doc["signatures"], outputs + rest, secrets + rest_secrets)
        exact = exact[: len(outputs)]
        blanks = [client.Secret.fresh() for _ in range(max(reserve.bit_length(), 1))]
        outputs = [b.output(mint.active, 1) for b in blanks]
        doc = await mint.ok(
            "/v1/melt/bolt11", {"quote": quote["quote"], "inputs": exact, "outputs": outputs}
        )
        assert doc["state"] == "PAID" and doc["payment_preimage"]
        n = len(doc["change"])
        change = mint.unblind(doc["change"], outputs[:n], blanks[:n], change=True)
        sent = [
            p for p in LightningRpc(op0.lightning_rpc).listpays()["pays"] if p["bolt11"] == invoice
        ]
        fee_msat = int(sent[0]["amount_sent_msat"]) - int(sent[0]["amount_msat"])
        assert sum(p.amount for p in change) == reserve - -(-fee_msat // 1000)
        paid = [i for i in payee.listinvoices()["invoices"] if i["bolt11"] == invoice]
        assert paid[0]["status"] == "paid"
        # restore: the mint gives back its signatures on outputs it signed
        status, restored = await mint.call("/v1/restore", {"outputs": outputs})
        assert status == 200 and len(restored["signatures"]) == len(doc["change"])
        async with s.get(f"{op0.mint_url}/metrics") as r:
            metrics = await r.text()
        for line in (
            'mint_operations_total{op="swap",outcome="ok"} 2.0',
            'mint_operations_total{op="swap",outcome="11001"} 1.0',
            'mint_operations_total{op="melt",outcome="ok"} 1.0',
            'mint_operations_total{op="mint",outcome="20008"} 1.0',
        ):
            assert line in metrics, line


async def test_what_is_malformed_is_refused_with_its_code_not_a_500(where: Path) -> None:
    op0, _ = nets(where)
    async with aiohttp.ClientSession() as s:
        mint = Mint(op0.mint_url, s)
        await mint.load()
        proof = {
            "amount": 8,
            "id": mint.active,
            "secret": os.urandom(32).hex(),
            "C": "02" + "11" * 32,
        }
        outputs = client.outputs_for(8, mint.active)[0]
        # text PostgreSQL cannot store (a NUL)
        nul = {"inputs": [{**proof, "witness": "\x00"}], "outputs": outputs}
        assert await mint.refused("/v1/swap", nul) == 0
        # NUT-20: a quote whose key is no point could never be minted once paid
        off_curve = {"amount": 1, "unit": "sat", "pubkey": "02" + "ff" * 32}
        assert await mint.refused("/v1/mint/quote/bolt11", off_curve) == 20009
        # an unknown field nested deeper than the decoder goes
        deep = {"Ys": ["02" + "11" * 32], "x": msgspec.Raw(b"[" * 3000 + b"]" * 3000)}
        assert await mint.refused("/v1/checkstate", deep) == 0


async def test_concurrent_swaps_sharing_proofs_spend_each_once(where: Path) -> None:
    op0, op1 = nets(where)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as s:
        mint = Mint(op0.mint_url, s)
        await mint.load()
        proofs = await mint.mint_paid(2**10 - 1, LightningRpc(op1.lightning_rpc))  # 10 proofs
        rng = random.Random(os.urandom(8))

        async def one() -> tuple[int, list[nut.Proof]]:
            inputs = rng.sample(proofs, rng.randint(1, 3))
            outputs, _ = client.outputs_for(sum(p.amount for p in inputs), mint.active)
            status, doc = await mint.call("/v1/swap", {"inputs": inputs, "outputs": outputs})
            return (200 if status == 200 else int(doc["code"])), inputs

        results = await asyncio.gather(*(one() for _ in range(64)))
    won = [inputs for code, inputs in results if code == 200]
    assert {code for code, _ in results} <= {200, m.SPENT, m.PENDING}
    spent = [p.secret for inputs in won for p in inputs]
    assert won and len(spent) == len(set(spent))  # no proof in two winning swaps


async def test_swaps_committed_together_each_win_or_leave_nothing(where: Path) -> None:
    """64 swaps at once (committed in groups) of 2 of 32 proofs each, to 2 of 24 shared
    outputs: the winners share no proof and no output; exactly their inputs are spent
    and exactly their outputs signed: a swap refused in a group left nothing behind."""
    op0, _ = nets(where)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as s:
        mint = Mint(op0.mint_url, s)
        await mint.load()
        proofs = await mint.ones(32, where)
        outputs, _ = client.outputs_of([1] * 24, mint.active)
        rng = random.Random(os.urandom(8))

        async def one() -> tuple[int, list[nut.Proof], list[nut.BlindedMessage]]:
            inputs, chosen = rng.sample(proofs, 2), rng.sample(outputs, 2)
            status, doc = await mint.call("/v1/swap", {"inputs": inputs, "outputs": chosen})
            return (200 if status == 200 else int(doc["code"])), inputs, chosen

        results = await asyncio.gather(*(one() for _ in range(64)))
        assert {code for code, _, _ in results} <= {200, m.SPENT, m.OUTPUTS_SIGNED}
        won = [(inputs, chosen) for code, inputs, chosen in results if code == 200]
        spent = [p.secret for inputs, _ in won for p in inputs]
        signed = [o.B_ for _, chosen in won for o in chosen]
        assert won and len(spent) == len(set(spent)) and len(signed) == len(set(signed))
        states = dict(zip([p.secret for p in proofs], await mint.states(proofs), strict=True))
        assert {p for p, state in states.items() if state == "SPENT"} == set(spent)
        assert set(states.values()) == {"SPENT", "UNSPENT"}
        restored = (await mint.ok("/v1/restore", {"outputs": outputs}))["outputs"]
        assert {o["B_"] for o in restored} == set(signed)
        async with s.get(f"{op0.mint_url}/metrics") as resp:
            metrics = await resp.text()
    grouped = {
        line.split('le="')[1].split('"')[0]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("mint_swap_group_swaps_bucket")
    }
    assert grouped["1.0"] < grouped["+Inf"], grouped  # some groups held several swaps


async def test_large_requests_are_signed_and_checked_off_the_event_loop(where: Path) -> None:
    """40 outputs minted and 40 proofs swapped (in the mint's EC process), every
    signature's DLEQ proof checked, while a small request is answered meanwhile."""
    op0, _ = nets(where)
    async with aiohttp.ClientSession() as s:
        mint = Mint(op0.mint_url, s)
        await mint.load()
        proofs = await mint.ones(40, where)
        swapped, keys = await asyncio.gather(mint.swap(proofs, [1] * 40), mint.ok("/v1/keys"))
        assert len(swapped) == 40 and keys["keysets"]
        assert set(await mint.states(proofs)) == {"SPENT"}


async def ecash_and_a_melt_quote(
    mint: Mint, where: Path, ecash_sat: int, invoice_sat: int
) -> tuple[list[nut.Proof], dict[str, Any]]:
    """Ecash from ``mint`` (op0's), and a melt quote for an invoice of op1's node."""
    payee = LightningRpc(nets(where)[1].lightning_rpc)
    await mint.load()
    proofs = await mint.mint_paid(ecash_sat, payee)
    label = f"melt-{os.urandom(4).hex()}"
    invoice = payee.invoice(invoice_sat * 1000, label, "a melt")["bolt11"]
    quote = await mint.ok("/v1/melt/quote/bolt11", {"request": invoice, "unit": "sat"})
    return proofs, quote


async def test_a_melt_whose_payment_hangs_stays_pending_then_settles(where: Path) -> None:
    op0 = nets(where)[0]
    async with aiohttp.ClientSession() as s:
        mint = Mint(op0.mint_url, s)
        proofs, quote = await ecash_and_a_melt_quote(mint, where, 500, 100)
        guild.lightning_faults(where, "op1", {"hold": True})
        try:
            melting = asyncio.ensure_future(
                mint.call("/v1/melt/bolt11", {"quote": quote["quote"], "inputs": proofs})
            )
            deadline = time.monotonic() + 10
            while set(await mint.states(proofs)) != {"PENDING"}:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            outputs, _ = client.outputs_for(500, mint.active)
            swap = {"inputs": proofs, "outputs": outputs}
            assert await mint.refused("/v1/swap", swap) == m.PENDING  # reserved
            state = await mint.ok(f"/v1/melt/quote/bolt11/{quote['quote']}")
            assert state["state"] == "PENDING"
        finally:
            guild.lightning(where, "/v1/release/op1", {})
            guild.lightning_faults(where, "op1", {"hold": False})
        _, doc = await melting  # paid, or still pending when it answered
        deadline = time.monotonic() + 15
        while (await mint.ok(f"/v1/melt/quote/bolt11/{quote['quote']}"))["state"] != "PAID":
            assert time.monotonic() < deadline, doc
            await asyncio.sleep(0.2)
        assert set(await mint.states(proofs)) == {"SPENT"}


async def test_a_melt_whose_payment_fails_frees_its_proofs(where: Path) -> None:
    op0 = nets(where)[0]
    async with aiohttp.ClientSession() as s:
        mint = Mint(op0.mint_url, s)
        proofs, quote = await ecash_and_a_melt_quote(mint, where, 200, 50)
        guild.lightning_faults(where, "op1", {"fail_next": 1})
        melt = {"quote": quote["quote"], "inputs": proofs}
        assert await mint.refused("/v1/melt/bolt11", melt) == m.PAYMENT_FAILED
        assert set(await mint.states(proofs)) == {"UNSPENT"}
        # and the quote can be melted again, now that the payee takes it
        doc = await mint.ok("/v1/melt/bolt11", melt)
        assert doc["state"] == "PAID" and set(await mint.states(proofs)) == {"SPENT"}


async def test_two_mint_processes_and_kill_9_lose_no_proof_and_sign_nothing_twice(
    where: Path,
) -> None:
    """Swaps sent at random to op0's supervised mint and to a second mint process on the
    same database, while the first is killed with ``kill -9`` (its supervisor restarts
    it). Afterwards each swap is all or nothing: its inputs spent and its outputs signed
    (restorable), or neither; no proof was spent by two swaps that both got answers."""
    op0, op1 = nets(where)
    async with (
        another_mint(op0, "mint-2.log") as url,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s,
    ):
        first = Mint(op0.mint_url, s)
        await first.load()
        proofs = await first.mint_paid(2**12 - 1, LightningRpc(op1.lightning_rpc))  # 12
        mints = [first, Mint(url, s)]
        rng = random.Random(os.urandom(8))
        sent: list[tuple[list[nut.Proof], list[nut.BlindedMessage], int]] = []

        async def one() -> None:
            inputs = rng.sample(proofs, rng.randint(1, 3))
            outputs, _ = client.outputs_for(sum(p.amount for p in inputs), first.active)
            try:
                status, doc = await rng.choice(mints).call(
                    "/v1/swap", {"inputs": inputs, "outputs": outputs}
                )
                code = 200 if status == 200 else int(doc["code"])
            except (aiohttp.ClientError, TimeoutError):
                code = -1  # no answer: committed or not
            sent.append((inputs, outputs, code))

        async def killer() -> None:
            await asyncio.sleep(0.05)
            os.kill(guild.load(where)[0].mint_pid, signal.SIGKILL)

        await asyncio.gather(killer(), *(one() for _ in range(48)))
        await back(first)
        committed: list[list[nut.Proof]] = []
        for inputs, outputs, code in sent:
            states = set(await first.states(inputs))
            _, restored = await first.call("/v1/restore", {"outputs": outputs})
            signed = len(restored["signatures"])
            if code == 200:
                assert states == {"SPENT"} and signed == len(outputs)
            if signed:  # committed (answered, its answer lost, or refused for a later reason)
                assert signed == len(outputs) and states == {"SPENT"}
                committed.append(inputs)
        # every proof is spent by exactly one committed swap, or by none and unspent
        spenders = Counter(p.secret for inputs in committed for p in inputs)
        assert max(spenders.values(), default=0) <= 1, "a proof spent by two committed swaps"
        for proof, state in zip(proofs, await first.states(proofs), strict=True):
            assert (state == "SPENT") == (proof.secret in spenders), (proof.amount, state)
        codes = Counter(code for *_, code in sent)
        print("swaps by outcome:", dict(codes), "committed:", len(committed))
        # the answers lost to the kill may include every commit; some swap committed
        assert set(codes) <= {200, -1, m.SPENT, m.PENDING} and committed


async def test_the_ec_process_killed_during_swaps_fails_them_whole_and_another_serves(
    where: Path,
) -> None:
    """``kill -9`` of the mint's EC process while swaps wait on it: each is answered,
    signed and spent, or "retry" (503) with nothing of it done; the mint goes on with a
    new EC process."""
    op0, op1 = nets(where)
    ec = child_pids(op0.mint_pid)
    assert len(ec) == 1, ec
    async with aiohttp.ClientSession() as s:
        mint = Mint(op0.mint_url, s)
        await mint.load()
        proofs = await mint.mint_paid(2**8 - 1, LightningRpc(op1.lightning_rpc))  # 8
        swaps = []
        for p in proofs:
            outputs, _ = client.outputs_for(p.amount, mint.active)
            swaps.append(([p], outputs, mint.call("/v1/swap", {"inputs": [p], "outputs": outputs})))
        answers = asyncio.gather(*(call for *_, call in swaps))
        await asyncio.sleep(0)  # the requests are on their way
        os.kill(ec[0], signal.SIGKILL)
        codes = [status for status, _ in await answers]
        for (inputs, outputs, _), status in zip(swaps, codes, strict=True):
            _, restored = await mint.call("/v1/restore", {"outputs": outputs})
            done = (await mint.states(inputs), len(restored["signatures"]))
            assert done == ((["SPENT"], len(outputs)) if status == 200 else (["UNSPENT"], 0))
        assert set(codes) <= {200, 503}, codes
        print("swaps answered:", Counter(codes))
        again = [p for p, status in zip(proofs, codes, strict=True) if status != 200]
        if again:  # a new EC process serves the retries
            assert len(await mint.swap(again, [p.amount for p in again])) == len(again)
        assert child_pids(op0.mint_pid) not in ([], ec)
        async with s.get(f"{op0.mint_url}/metrics") as resp:
            assert "mint_ec_process_stops_total 1.0" in await resp.text()
        async with s.get(f"{op0.mint_url}/readyz") as resp:
            assert resp.status == 200  # one stop: still ready


Sent = tuple[str, list[nut.Proof], list[nut.BlindedMessage], int]  # quote ("": a swap)


def y_of(proof: nut.Proof) -> bytes:
    return bdhke.hash_to_curve(proof.secret.encode()).format()


async def race(
    mints: list[Mint], proofs: list[nut.Proof], quotes: list[dict[str, Any]], clients: int
) -> list[Sent]:
    """``clients`` concurrent swaps and melts of random, overlapping proofs, each at a
    random mint; what each sent and its answer (its NUT code; -1: no answer)."""
    rng = random.Random(os.urandom(8))
    keyset = mints[0].active
    sent: list[Sent] = []

    async def one(i: int) -> None:
        await asyncio.sleep(rng.random() * 0.5)
        quote: dict[str, Any] | None = None if i % 2 else rng.choice(quotes)
        if quote is None:
            inputs = rng.sample(proofs, rng.randint(1, 3))
            outputs, _ = client.outputs_for(sum(p.amount for p in inputs), keyset)
            path, body = "/v1/swap", {"inputs": inputs, "outputs": outputs}
        else:
            inputs, need = [], quote["amount"] + quote["fee_reserve"]
            for p in rng.sample(proofs, len(proofs)):
                if sum(x.amount for x in inputs) < need:
                    inputs.append(p)
            outputs, _ = client.outputs_of([1, 1, 1], keyset)  # blanks for the change
            path = "/v1/melt/bolt11"
            body = {"quote": quote["quote"], "inputs": inputs, "outputs": outputs}
        try:
            status, doc = await rng.choice(mints).call(path, body)
            code = 200 if status == 200 else int(doc["code"])
        except (aiohttp.ClientError, TimeoutError):
            code = -1  # no answer: its fate is the mint's to tell
        sent.append((quote["quote"] if quote is not None else "", inputs, outputs, code))

    await asyncio.gather(*(one(i) for i in range(clients)))
    return sent


async def faults(where: Path, op0: Devnet) -> None:
    """The payees hold their HTLCs, op0's node loses 3 replies, op0's mint is killed."""
    guild.lightning_faults(where, guild.OUTSIDE, {"hold": True})
    guild.lightning_faults(where, op0.operator, {"lose_replies": 3})
    try:
        await asyncio.sleep(0.8)
        os.kill(guild.load(where)[0].mint_pid, signal.SIGKILL)
        await asyncio.sleep(1.5)
    finally:
        guild.lightning_faults(where, guild.OUTSIDE, {"hold": False})
        guild.lightning(where, f"/v1/release/{guild.OUTSIDE}", {})


async def back(mint: Mint) -> None:
    """Wait until a mint killed with ``kill -9`` answers again (its supervisor starts it)."""
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            if (await mint.call("/v1/keysets"))[0] == 200:
                return
        assert time.monotonic() < deadline, "the mint did not come back"
        await asyncio.sleep(0.2)


async def fates(mint: Mint, proofs: list[nut.Proof], quotes: list[dict[str, Any]]) -> list[str]:
    """Each quote's state once no melt is pending and no proof reserved."""
    deadline = time.monotonic() + 40
    while True:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, MintError):
            states = [
                (await mint.ok(f"/v1/melt/quote/bolt11/{q['quote']}"))["state"] for q in quotes
            ]
            if "PENDING" not in states and "PENDING" not in await mint.states(proofs):
                return states
        assert time.monotonic() < deadline, "a melt still pending"
        await asyncio.sleep(0.5)


async def melted(
    op0: Devnet,
    outside: LightningRpc,
    quotes: list[dict[str, Any]],
    states: list[str],
    sent: list[Sent],
) -> set[bytes]:
    """The proofs the melts spent, each quote's checked: its invoice paid exactly when
    it says PAID, by one payment of op0's node; its proofs one request's for it."""
    conn = await asyncpg.connect(op0.database_url)
    found: set[bytes] = set()
    try:
        for q, state in zip(quotes, states, strict=True):
            [inv] = outside.listinvoices(q["label"])["invoices"]
            assert (inv["status"] == "paid") == (state == "PAID"), (q, inv)
            pays = LightningRpc(op0.lightning_rpc).listpays(payment_hash=q["payment_hash"])
            done = [p for p in pays["pays"] if p["status"] == "complete"]
            assert len(done) == (state == "PAID")  # paid once, or not at all
            rows = await conn.fetch("SELECT y FROM mint_proofs WHERE reserved_by = $1", q["quote"])
            ys = {bytes(r["y"]) for r in rows}
            requests = [{y_of(p) for p in i} for quote, i, *_ in sent if quote == q["quote"]]
            assert ys in requests if state == "PAID" else not ys, q
            found |= ys
    finally:
        await conn.close()
    return found


async def test_64_clients_swap_and_melt_overlapping_proofs_at_two_mints_through_faults(
    where: Path,
) -> None:
    """64 clients swap and melt overlapping proofs at op0's mint and at a second mint
    process on its database, while the payees hold their HTLCs, op0's node loses the
    replies to some of its calls, and the first mint is killed with ``kill -9``. Every
    refusal is a NUT error; once every payment's fate is known: each proof is spent by
    one operation at most (and a spent one by one), each invoice is paid at most once and
    exactly when its quote says PAID, and the proofs of a paid quote are one request's."""
    op0, _ = nets(where)
    outside = LightningRpc(guild.outside_rpc(where))
    async with (
        another_mint(op0, "mint-3.log") as url,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=8)) as s,
    ):
        first = Mint(op0.mint_url, s)
        await first.load()
        proofs = await first.mint_paid(2**11 - 1, outside)  # 11 proofs
        proofs += await first.mint_paid(2**11 - 1, outside)
        quotes = []
        for sat in (60, 120, 250, 400, 700, 90):
            label = f"race-{os.urandom(4).hex()}"
            inv = outside.invoice(sat * 1000, label, "a race")
            body = {"request": inv["bolt11"], "unit": "sat"}
            quote = await first.ok("/v1/melt/quote/bolt11", body)
            quotes.append({**quote, "label": label, "payment_hash": inv["payment_hash"]})
        mints = [first, Mint(url, s)]
        try:
            _, sent = await asyncio.gather(faults(where, op0), race(mints, proofs, quotes, 64))
        finally:
            guild.lightning_faults(where, op0.operator, {"lose_replies": 0})
        codes = Counter(code for *_, code in sent)
        print("operations by outcome:", dict(codes))
        refused = {m.SPENT, m.PENDING, m.QUOTE_PENDING, m.INVOICE_PAID, m.PAYMENT_FAILED}
        assert set(codes) <= {200, -1} | refused and codes[200] > 0
        states = await fates(mints[1], proofs, quotes)
        spent_by: Counter[bytes] = Counter()
        for quote, inputs, outputs, _ in sent:  # swaps: committed where signed
            _, restored = await mints[1].call("/v1/restore", {"outputs": outputs})
            if not quote and restored["signatures"]:
                assert len(restored["signatures"]) == len(outputs)
                spent_by.update(y_of(p) for p in inputs)
        spent_by.update(await melted(op0, outside, quotes, states, sent))
        assert max(spent_by.values()) == 1, "a proof spent by two operations"
        states_now = await mints[1].states(proofs)
        spent = {y_of(p) for p, st in zip(proofs, states_now, strict=True) if st == "SPENT"}
        assert spent == set(spent_by), "a proof spent by no operation"
        await back(first)  # the tests after this one use it


async def test_ecash_redeems_into_an_l3_coin_and_l3_withdraws_as_ecash(where: Path) -> None:
    op0, op1 = nets(where)
    network = Network.from_name(op0.network)
    async with aiohttp.ClientSession() as s:
        mint = Mint(op0.mint_url, s)
        await mint.load()
        gw = Gateway(op0.gateway_url, s)
        info = await mint.ok("/v1/l3/info")
        proofs = await mint.mint_paid(700, LightningRpc(op1.lightning_rpc))
        # redeem: one coin at the user's address, the same on a retry, never two
        user = Wallet(os.urandom(32), network)
        key = user.fresh_key().pubkey
        address = encode_address(key, network, bytes.fromhex(info["ledger_id"]))
        redeem = {"inputs": proofs, "address": address}
        doc = await mint.ok("/v1/l3/redeem", redeem)
        assert doc["state"] == "ISSUED" and doc["value_msat"] == 700_000
        assert await mint.ok("/v1/l3/redeem", redeem) == doc  # a retry: the same coin
        assert set(await mint.states(proofs)) == {"SPENT"}
        coin_id = bytes.fromhex(doc["coin_id"])
        coin = await gw.coin(coin_id)
        assert coin is not None and coin["status"] == "unspent" and coin["value_msat"] == 700_000
        elsewhere = {"inputs": proofs, "address": encode_address(key, network)}
        assert await mint.ok("/v1/l3/redeem", elsewhere) == doc  # redeemed once, there
        # withdraw: the coin paid to the mint's L3 address, ecash for exactly that
        here = bytes.fromhex(info["ledger_id"])
        coins = {coin_id: Coin(700_000, key)}
        # the outputs first: the key the payment goes to names them
        outputs, secrets = client.outputs_for(600, mint.active)
        blinded = [bytes.fromhex(o.B_) for o in outputs]
        to = m.withdrawal_key(bytes.fromhex(info["key"]), blinded)
        tx = user.pay(coins, encode_address(to, network, here), 600_000, FEE_MSAT, here=here)
        body = {"tx": tx.encode().hex(), "outputs": outputs}
        signed = await mint.ok("/v1/l3/withdraw", body)
        ecash = mint.unblind(signed["signatures"], outputs, secrets)
        assert sum(p.amount for p in ecash) == 600
        assert await mint.ok("/v1/l3/withdraw", body) == signed  # a retry: the same
        # whoever sees the transaction cannot claim what it paid with outputs of its own:
        # it was withdrawn, with these outputs only
        other, _ = client.outputs_for(600, mint.active)
        again = {"tx": tx.encode().hex(), "outputs": other}
        assert await mint.refused("/v1/l3/withdraw", again) == m.OUTPUTS_SIGNED
        short, _ = client.outputs_for(601, mint.active)
        bad = {"tx": tx.encode().hex(), "outputs": short}
        assert await mint.refused("/v1/l3/withdraw", bad) == m.OUTPUTS_SIGNED
        assert set(await mint.states(ecash)) == {"UNSPENT"}
        await mint.swap(ecash, split(600))  # the mint's own ecash
        spent = {"inputs": ecash, "address": address}
        assert await mint.refused("/v1/l3/redeem", spent) == m.SPENT  # swapped already


async def test_the_reserve_counts_the_mint_s_ecash(where: Path) -> None:
    """After every mint, swap, melt, redemption and withdrawal above, op0's reserve
    invariant holds with no drift: the ecash out there is a liability like L3 coins
    (the L3 coins paid to the mint are its own), what the mint kept a fee."""
    op0, _ = nets(where)
    async with aiohttp.ClientSession() as s:
        await asyncio.sleep(2.5)  # checks made after everything above
        deadline, steady = time.monotonic() + 20, 0
        while steady < 3:  # three checks in a row, a second apart
            r = await reserve(op0, s)
            steady = steady + 1 if r.get("ok") == 1 and r.get("drift") == 0 else 0
            assert time.monotonic() < deadline, str(r)
            await asyncio.sleep(1.0)
    assert r["in_flight"] == 0 and r["ecash"] > 0
    conn = await asyncpg.connect(op0.database_url)
    try:  # the running sums are the sums of the tables, and what the books are read from
        books = await mint_books(conn)
        found = await conn.fetchrow(
            "SELECT (SELECT sum(amount) FROM mint_promises) AS signed,"
            " (SELECT sum(amount) FROM mint_proofs WHERE state = 'SPENT') AS spent,"
            " (SELECT count(*) FROM mint_proofs WHERE state = 'PENDING') AS pending,"
            " (SELECT coalesce(sum(amount), 0) FROM mint_quotes WHERE state = 'PAID') AS paid,"
            " (SELECT sum(msat) FROM mint_fees) AS fees,"
            " (SELECT sum(value_msat) FROM mint_withdrawals) AS l3"
        )
    finally:
        await conn.close()
    assert books is not None and found["pending"] == 0 and books.reserved_msat == 0
    assert books.outstanding_msat == (found["signed"] - found["spent"]) * 1000 > 0
    assert books.unissued_msat == found["paid"] * 1000
    assert books.fees_msat == found["fees"] > 0 and books.l3_msat == found["l3"] > 0


async def test_a_mint_s_books_start_from_its_tables_once(where: Path) -> None:
    """A mint whose database predates the running sums: they start from its tables on the
    first open, and a second open adds nothing."""
    op0, _ = nets(where)
    admin = await asyncpg.connect(op0.database_url)
    name = f"old_{os.urandom(4).hex()}"
    await admin.execute(f"CREATE DATABASE {name}")
    url = op0.database_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        store = await MintStore.open(url)
        async with store.pool.acquire() as conn:
            tables = ("mint_proofs", "mint_promises", "mint_quotes", "mint_fees")
            for table in tables:  # as a mint without the sums kept them
                await conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
            await conn.execute(
                "INSERT INTO mint_proofs (y, keyset, amount, secret, c, state) VALUES"
                " ('\\x01', 'k', 8, 's1', 'c', 'SPENT'), ('\\x02', 'k', 2, 's2', 'c', 'PENDING')"
            )
            await conn.execute(
                "INSERT INTO mint_promises (b_, keyset, amount, c_, e, s) VALUES"
                " ('\\x01', 'k', 8, 'c', 'e', 's'), ('\\x02', 'k', 32, 'c', 'e', 's')"
            )
            await conn.execute(
                "INSERT INTO mint_quotes (quote, request, payment_hash, amount, unit, state,"
                " expiry) VALUES ('q', 'lnbc', 'h', 5, 'sat', 'PAID', 0)"
            )
            await conn.execute("INSERT INTO mint_fees (kind, msat) VALUES ('swap', 3000)")
            await conn.execute("DELETE FROM mint_totals")
            for table in tables:
                await conn.execute(f"ALTER TABLE {table} ENABLE TRIGGER USER")
        await store.close()
        for _ in range(2):
            store = await MintStore.open(url)
            books = await store.books()
            await store.close()
            assert books == MintBooks(32_000, 5_000, 3_000, 2_000, 0)
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


@contextlib.asynccontextmanager
async def fresh_store(op0: Devnet, grouped: list[int]) -> AsyncIterator[MintStore]:
    """A mint's store on a database of its own on op0's server, for the block."""
    admin = await asyncpg.connect(op0.database_url)
    name = f"groups_{os.urandom(4).hex()}"
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        store = await MintStore.open(
            op0.database_url.rsplit("/", 1)[0] + f"/{name}", grouped.append
        )
        try:
            yield store
        finally:
            await store.close()
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


KEYSET = Keyset.derive(b"groups" * 6, "sat", 0, 0)


def a_swap(
    secret: str = "",
    fee: int = 0,
    seen: nut.Proof | None = None,
    signed: nut.BlindedMessage | None = None,
) -> tuple[m.Spend, m.Outputs, nut.SwapRequest]:
    """A swap of two 1-sat proofs as the store takes it (the rules checked them before:
    the store checks no signature), to two fresh outputs; ``seen`` is its first proof
    instead of a fresh one, ``signed`` its first output."""
    inputs = [
        nut.Proof(1, KEYSET.id, secret or os.urandom(16).hex(), "02" + "11" * 32) for _ in range(2)
    ]
    inputs[0] = seen or inputs[0]
    ys = [bdhke.hash_to_curve(p.secret.encode()).format() for p in inputs]
    outputs, _ = client.outputs_of([1, 1], KEYSET.id)
    outputs[0] = signed or outputs[0]
    checked = m.Outputs([bytes.fromhex(o.B_) for o in outputs], 2, "sat")
    return m.Spend(ys, 2, fee, "sat"), checked, nut.SwapRequest(inputs, outputs)


def hold_groups(store: MintStore) -> tuple[asyncio.Event, list[int]]:
    """A spy on ``store``'s group transactions: the first ``SWAP_GROUPS`` wait for the
    event (the swaps that come meanwhile gather for the next); the list: each
    transaction's swaps."""
    release = asyncio.Event()
    tried: list[int] = []
    commit = store._swap_group

    async def spied(group: list[Any]) -> None:
        tried.append(len(group))
        if len(tried) <= SWAP_GROUPS:
            await release.wait()
        await commit(group)

    store._swap_group = spied  # type: ignore[method-assign]
    return release, tried


async def test_a_swap_postgresql_refuses_fails_alone_and_a_given_up_one_spends_nothing(
    where: Path,
) -> None:
    """In a group with swaps of good data, one whose text PostgreSQL refuses (a NUL in a
    secret, past the rules as no request can bring it since they refuse it) fails alone:
    the group goes again one swap a transaction. A swap whose request was given up while
    it waited (cancelled) is dropped: its proofs stay unspent."""
    op0, _ = nets(where)
    rules = m.Mint([KEYSET])
    grouped: list[int] = []
    async with fresh_store(op0, grouped) as store:
        release, tried = hold_groups(store)

        async def swap(sw: tuple[m.Spend, m.Outputs, nut.SwapRequest]) -> list[Any]:
            return await store.swap(*sw, rules.sign(sw[2].outputs))

        good = [a_swap() for _ in range(6)]
        bad = a_swap("\x00")
        busy = []
        for _ in range(SWAP_GROUPS):  # each group holds one swap, waiting
            busy.append(asyncio.create_task(swap(a_swap())))
            await asyncio.sleep(0.3)
        waiting = [asyncio.create_task(swap(sw)) for sw in [*good[:3], bad, *good[3:]]]
        given_up = a_swap()
        dropped = asyncio.create_task(swap(given_up))
        await asyncio.sleep(0.1)
        dropped.cancel()
        release.set()
        results = await asyncio.gather(*busy, *waiting, return_exceptions=True)
        assert isinstance(results[SWAP_GROUPS + 3], asyncpg.CharacterNotInRepertoireError)
        assert all(
            isinstance(r, list) and len(r) == 2
            for i, r in enumerate(results)
            if i != SWAP_GROUPS + 3
        ), results
        # the seven that waited went together, PostgreSQL refused it, then each alone
        assert tried == [1] * SWAP_GROUPS + [7] + [1] * 7, tried
        assert grouped == [1] * (SWAP_GROUPS + 6), grouped
        states = await store.states([y for sw, _, _ in good for y in sw.ys] + given_up[0].ys)
        assert len(states) == 12 and {st for st, _ in states.values()} == {"SPENT"}
        assert await store.restore([bytes.fromhex(o.B_) for o in given_up[2].outputs]) == {}
        async with store.pool.acquire() as conn:
            rows = await conn.fetchval("SELECT count(*) FROM mint_promises")
            proofs = await conn.fetchval("SELECT count(*) FROM mint_proofs")
        assert rows == proofs == 2 * (SWAP_GROUPS + 6)
        assert (await store.books()).outstanding_msat == 0  # the sums agree: as many spent


async def test_a_group_commits_its_good_swaps_and_leaves_nothing_of_its_refused_ones(
    where: Path,
) -> None:
    """One group's transaction: a swap with a fee commits (its fee kept); one with a proof
    spent before (11001), one with a proof a melt reserves (11002) and one with an output
    signed before (11003) are refused, and of each nothing stays: its fresh proofs
    unspent, its fresh outputs unsigned, no fee. The books agree with the tables."""
    op0, _ = nets(where)
    rules = m.Mint([KEYSET])
    async with fresh_store(op0, []) as store:

        async def swap(sw: tuple[m.Spend, m.Outputs, nut.SwapRequest]) -> Any:
            return await store.swap(*sw, rules.sign(sw[2].outputs))

        before, signed = a_swap(), a_swap()
        await asyncio.gather(*(swap(sw) for sw in (before, signed)))
        paying = a_swap(fee=1)
        async with store.pool.acquire() as conn:  # as a melt in flight reserves its proof
            await conn.execute(
                "INSERT INTO mint_proofs (y, keyset, amount, secret, c, state, reserved_by)"
                " VALUES ($1, $2, 1, 's', 'c', 'PENDING', 'quote')",
                paying[0].ys[0],
                KEYSET.id,
            )
        release, tried = hold_groups(store)
        busy = []
        for _ in range(SWAP_GROUPS):  # each group holds one swap, waiting
            busy.append(asyncio.create_task(swap(a_swap())))
            await asyncio.sleep(0.3)
        good = a_swap(fee=1)
        spent_one = a_swap(fee=1, seen=before[2].inputs[0])
        twice = a_swap(fee=1, signed=signed[2].outputs[0])
        waiting = [asyncio.create_task(swap(sw)) for sw in (good, spent_one, paying, twice)]
        await asyncio.sleep(0.1)
        release.set()
        results = await asyncio.gather(*busy, *waiting, return_exceptions=True)
        assert tried[SWAP_GROUPS:] == [4], tried  # the four went in one transaction
        won = results[SWAP_GROUPS]
        assert isinstance(won, list) and len(won) == 2, won
        codes = [getattr(r, "code", None) for r in results[SWAP_GROUPS + 1 :]]
        assert codes == [m.SPENT, m.PENDING, m.OUTPUTS_SIGNED], results
        fresh = [spent_one[0].ys[1], paying[0].ys[1], *twice[0].ys]
        assert await store.states(fresh) == {}
        assert len(await store.states(good[0].ys)) == 2
        unsigned = [*spent_one[1].blinded, *paying[1].blinded, twice[1].blinded[1]]
        assert await store.restore(unsigned) == {}
        assert len(await store.restore(good[1].blinded)) == 2
        async with store.pool.acquire() as conn:
            fees = await conn.fetch("SELECT kind, msat FROM mint_fees")
            proofs = await conn.fetchval("SELECT count(*) FROM mint_proofs WHERE state = 'SPENT'")
            promises = await conn.fetchval("SELECT count(*) FROM mint_promises")
        assert [tuple(r) for r in fees] == [("swap", 1000)]
        books = await store.books()
        assert books.fees_msat == 1000 and books.reserved_msat == 1000
        # 2 swaps before, SWAP_GROUPS meanwhile and the good one: 2 proofs and 2 outputs each
        assert proofs == promises == 2 * (3 + SWAP_GROUPS)
        assert books.outstanding_msat == (promises - proofs) * 1000  # the sums: as the rows


async def ask(
    ws: aiohttp.ClientWebSocketResponse, method: str, params: Any, rid: int
) -> dict[str, Any]:
    """A JSON-RPC request over the mint's websocket, and its answer."""
    await ws.send_json({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
    return dict(await ws.receive_json(timeout=5))


async def told(ws: aiohttp.ClientWebSocketResponse, sub: str) -> dict[str, Any]:
    """The next notification, of subscription ``sub``: its payload."""
    doc = await ws.receive_json(timeout=10)
    assert doc["method"] == "subscribe" and doc["params"]["subId"] == sub, doc
    return dict(doc["params"]["payload"])


async def test_nut17_subscribers_are_told_every_change_whichever_process_made_it(
    where: Path,
) -> None:
    """A wallet subscribed at op0's mint over its websocket is told a quote's and its
    proofs' current state first, then each change, made there or by a second mint
    process on the same database; an unsubscribed subscription is told nothing more."""
    op0, _ = nets(where)
    outside = LightningRpc(guild.outside_rpc(where))
    async with (
        another_mint(op0, "mint-4.log") as url,
        aiohttp.ClientSession() as s,
        s.ws_connect(f"{op0.mint_url}/v1/ws") as ws,
    ):
        mint, other = Mint(op0.mint_url, s), Mint(url, s)
        await mint.load()
        await other.load()
        quote = await mint.mint_quote(64)
        sub = {"kind": "bolt11_mint_quote", "subId": "q", "filters": [quote["quote"]]}
        assert (await ask(ws, "subscribe", sub, 1))["result"] == {"status": "OK", "subId": "q"}
        assert (await told(ws, "q"))["state"] == "UNPAID"  # the current state first
        await asyncio.to_thread(outside.pay, quote["request"])
        assert (await told(ws, "q"))["state"] == "PAID"
        proofs = await other.mint(quote["quote"], [64])  # at the other process
        assert (await told(ws, "q"))["state"] == "ISSUED"
        ys = [y_of(p).hex() for p in proofs]
        sub = {"kind": "proof_state", "subId": "p", "filters": ys}
        assert (await ask(ws, "subscribe", sub, 2))["result"]["subId"] == "p"
        assert await told(ws, "p") == {"Y": ys[0], "state": "UNSPENT", "witness": None}
        await other.swap(proofs, [32, 32])
        assert (await told(ws, "p"))["state"] == "SPENT"
        assert (await ask(ws, "unsubscribe", {"subId": "p"}, 3))["result"]["subId"] == "p"
        quote = await mint.mint_quote(8)
        await asyncio.to_thread(outside.pay, quote["request"])
        await mint.wait_paid(quote["quote"])
        await mint.swap(await mint.mint(quote["quote"], [8]), [8])
        with pytest.raises(TimeoutError):  # told nothing of what it no longer watches
            print(await ws.receive_json(timeout=1))


async def test_nut17_a_melt_quote_is_told_in_order_until_paid(where: Path) -> None:
    """A subscriber of a melt quote is told its states as they come, never an older one
    after a newer: UNPAID, then (PENDING and) PAID, with the preimage."""
    op0, _ = nets(where)
    order = [m.MELT_UNPAID, m.MELT_PENDING, m.MELT_PAID]
    async with aiohttp.ClientSession() as s, s.ws_connect(f"{op0.mint_url}/v1/ws") as ws:
        mint = Mint(op0.mint_url, s)
        proofs, quote = await ecash_and_a_melt_quote(mint, where, 100, 40)
        sub = {"kind": "bolt11_melt_quote", "subId": "m", "filters": [quote["quote"]]}
        assert (await ask(ws, "subscribe", sub, 1))["result"]["subId"] == "m"
        states = [(await told(ws, "m"))["state"]]
        await mint.ok("/v1/melt/bolt11", {"quote": quote["quote"], "inputs": proofs})
        while states[-1] != m.MELT_PAID:
            payload = await told(ws, "m")
            states.append(payload["state"])
        assert states[0] == m.MELT_UNPAID and payload["payment_preimage"]
        assert [order.index(x) for x in states] == sorted(order.index(x) for x in states)


async def test_nut17_is_advertised_and_refuses_bad_requests_with_json_rpc_errors(
    where: Path,
) -> None:
    op0, _ = nets(where)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{op0.mint_url}/v1/info") as r:
            info = await r.json()
        [method] = info["nuts"]["17"]["supported"]
        assert set(method["commands"]) == {"bolt11_mint_quote", "bolt11_melt_quote", "proof_state"}
        async with s.ws_connect(f"{op0.mint_url}/v1/ws") as ws:
            await ws.send_str("{not json")
            assert (await ws.receive_json(timeout=5))["error"]["code"] == -32700
            await ws.send_str('{"id": 3, "x": ' + "[" * 3000 + "]" * 3000 + "}")
            assert (await ws.receive_json(timeout=5))["error"]["code"] == -32700
            await ws.send_str('{"jsonrpc": "1.0", "id": 9, "method": "subscribe"}')
            doc = await ws.receive_json(timeout=5)
            assert doc["error"]["code"] == -32600 and doc["id"] == 9, doc
            assert (await ask(ws, "publish", {}, 4))["error"]["code"] == -32601
            for bad in (
                {"kind": "bolt12_offer", "subId": "x", "filters": ["a"]},
                {"kind": "proof_state", "subId": "x", "filters": ["ab"]},
                {"kind": "proof_state", "subId": "x", "filters": []},
                {"kind": "proof_state", "subId": "x"},
            ):
                assert (await ask(ws, "subscribe", bad, 5))["error"]["code"] == -32602, bad
            assert (await ask(ws, "unsubscribe", {"subId": "p"}, 7))["error"]["code"] == -32602
            sub = {"kind": "bolt11_melt_quote", "subId": "m", "filters": ["no-such-quote"]}
            assert (await ask(ws, "subscribe", sub, 8))["result"]["subId"] == "m"
            assert (await ask(ws, "subscribe", sub, 9))["error"]["code"] == -32602  # taken


async def test_nut19_a_lost_answer_is_given_again_and_redis_down_loses_nothing(
    where: Path,
) -> None:
    """A wallet that sends the very same mint, swap or melt request again (its answer
    lost) gets the same answer from the cache, not "spent" or "issued"; another request
    with those proofs is still refused. A mint whose Redis is down serves the same."""
    op0, _ = nets(where)
    outside = LightningRpc(guild.outside_rpc(where))
    async with aiohttp.ClientSession() as s:
        mint = Mint(op0.mint_url, s)
        await mint.load()
        info = await mint.ok("/v1/info")
        assert info["nuts"]["19"]["ttl"] > 0
        assert {e["path"] for e in info["nuts"]["19"]["cached_endpoints"]} == {
            "/v1/mint/bolt11",
            "/v1/swap",
            "/v1/melt/bolt11",
        }
        quote = await mint.mint_quote(300)
        await asyncio.to_thread(outside.pay, quote["request"])
        await mint.wait_paid(quote["quote"])
        outputs, secrets = client.outputs_for(300, mint.active)
        body = {"quote": quote["quote"], "outputs": outputs}
        first = await mint.ok("/v1/mint/bolt11", body)
        assert await mint.ok("/v1/mint/bolt11", body) == first  # not 20002
        proofs = mint.unblind(first["signatures"], outputs, secrets)
        outputs, _ = client.outputs_for(300, mint.active)
        swap = {"inputs": proofs, "outputs": outputs}
        first = await mint.ok("/v1/swap", swap)
        assert await mint.ok("/v1/swap", swap) == first  # not 11001
        other, _ = client.outputs_for(300, mint.active)
        assert await mint.refused("/v1/swap", {"inputs": proofs, "outputs": other}) == m.SPENT
        proofs, quote = await ecash_and_a_melt_quote(mint, where, 200, 50)
        melt = {"quote": quote["quote"], "inputs": proofs}
        first = await mint.ok("/v1/melt/bolt11", melt)
        assert first["state"] == "PAID" and await mint.ok("/v1/melt/bolt11", melt) == first
    # a mint whose Redis is not there: served all the same, with no cache
    async with (
        another_mint(op0, "mint-5.log", MINT_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0") as url,
        aiohttp.ClientSession() as s,
    ):
        mint = Mint(url, s)
        await mint.load()
        proofs = await mint.mint_paid(16, outside)
        outputs, _ = client.outputs_for(16, mint.active)
        swap = {"inputs": proofs, "outputs": outputs}
        await mint.ok("/v1/swap", swap)
        assert await mint.refused("/v1/swap", swap) == m.SPENT  # no cache: refused
        async with s.get(f"{url}/metrics") as r:
            assert 'mint_cache_total{outcome="error"}' in await r.text()


async def test_a_client_over_its_rate_is_told_when_to_come_back(where: Path) -> None:
    """A mint allowing 5 requests a second per client: a burst of 30 gets 5 answers and
    25 HTTP 429s with Retry-After; a second later the client is served again."""
    op0, _ = nets(where)
    async with another_mint(op0, "mint-6.log", MINT_RATE_PER_S="5") as url:
        checkstate = f"{url}/v1/checkstate"
        body = {"Ys": ["02" + "11" * 32]}
        async with aiohttp.ClientSession() as s:
            await asyncio.sleep(1.0 - time.time() % 1.0 + 0.05)  # a fresh one-second window

            async def one() -> tuple[int, str]:
                async with s.post(checkstate, json=body) as r:
                    return r.status, r.headers.get("Retry-After", "")

            answers = await asyncio.gather(*(one() for _ in range(30)))
            assert sorted(status for status, _ in answers) == [200] * 5 + [429] * 25
            assert all(after == "1" for status, after in answers if status == 429)
            await asyncio.sleep(1.1)
            assert (await one())[0] == 200


async def test_a_new_input_fee_rotates_the_keyset(where: Path) -> None:
    """A mint started with another input fee retires the active keyset and makes the next
    one: ecash of the old keyset is still spent there (paying the old fee), outputs of it
    are refused (12002), and every keyset is listed with whether it is active. The mint
    process already running takes the new keyset up: it signs with it alone. (Last in
    this module: op0's mint charges the new fee from here.)"""
    op0, op1 = nets(where)
    async with aiohttp.ClientSession() as s:
        old = Mint(op0.mint_url, s)
        await old.load()
        proofs = await old.mint_paid(64, LightningRpc(op1.lightning_rpc))
        async with another_mint(op0, "mint-7.log", MINT_INPUT_FEE_PPK="1000") as url:
            new = Mint(url, s)
            await new.load()
            assert new.active != old.active
            listed = (await new.ok("/v1/keysets"))["keysets"]
            by_id = {k["id"]: k for k in listed}
            assert by_id[old.active]["active"] is False and by_id[new.active]["active"] is True
            assert by_id[new.active]["input_fee_ppk"] == 1000
            stale, _ = client.outputs_for(64, old.active)
            swap = {"inputs": proofs, "outputs": stale}
            assert await new.refused("/v1/swap", swap) == m.KEYSET_INACTIVE
            fresh = await new.swap(proofs, split(64))  # the old keyset's fee: 0
            assert {p.id for p in fresh} == {new.active}
            assert sum(p.amount for p in fresh) == 64
            kept = await new.swap(fresh, split(64 - len(fresh)))  # 1 sat per input now
            assert sum(p.amount for p in kept) == 64 - len(fresh)
            deadline = time.monotonic() + 10
            while (await old.ok("/v1/keysets"))["keysets"] != listed:
                assert time.monotonic() < deadline, "the running mint kept the old keyset"
                await asyncio.sleep(0.1)
            stale, _ = client.outputs_for(sum(p.amount for p in kept) - 1, old.active)
            swap = {"inputs": kept, "outputs": stale}
            assert await old.refused("/v1/swap", swap) == m.KEYSET_INACTIVE
            await old.load()
            assert old.active == new.active


class Faulty:
    """op0's real gateway behind a proxy that loses what ``script`` says: each POST to
    ``path`` takes its next step, "lose" (sent on, its answer lost: the connection
    dropped), "drop" (dropped unsent), "refuse" (answered HTTP 403 in plain text, as a
    proxy may) or "pass" (sent on); after the script's end, ``then``. While ``behind``,
    reads of what was posted there (GET ``path``/...) are answered HTTP 503, as by an
    index that has not caught up. Everything else is sent on."""

    def __init__(self, gateway: str, session: aiohttp.ClientSession, path: str) -> None:
        self.gateway, self.session, self.path = gateway, session, path
        self.script: list[str] = []
        self.then = "pass"
        self.seen: list[str] = []
        self.behind = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        step = ""
        if request.method == "POST" and request.path == self.path:
            step = self.script.pop(0) if self.script else self.then
            self.seen.append(step)
        if self.behind and request.method == "GET" and request.path.startswith(self.path + "/"):
            return web.Response(status=503, text="Service Unavailable", content_type="text/plain")
        if step == "refuse":
            return web.Response(status=403, text="Forbidden", content_type="text/plain")
        if step != "drop":
            headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
            async with self.session.request(
                request.method, self.gateway + request.path_qs, data=body, headers=headers
            ) as resp:
                answer = await resp.read()
                kind = resp.content_type
                status = resp.status
        if step in ("lose", "drop"):
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)  # never reaches the mint
        return web.Response(status=status, body=answer, content_type=kind)


@contextlib.asynccontextmanager
async def bridged_mint(
    op0: Devnet, session: aiohttp.ClientSession, path: str
) -> AsyncIterator[tuple[Mint, Faulty, asyncpg.Connection, dict[str, str]]]:
    """A second mint process of op0's (its keys, its gateway, its issuer) on a database
    of its own, reaching the gateway through a ``Faulty`` proxy (of POSTs to ``path``),
    for the block: its client, the proxy, a connection to its database, and its settings
    over op0's."""
    proxy = Faulty(op0.gateway_url.rstrip("/"), session, path)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    admin = await asyncpg.connect(op0.database_url)
    name = f"bridge_{os.urandom(4).hex()}"
    await admin.execute(f"CREATE DATABASE {name}")
    url = op0.database_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        env = {
            "MINT_DATABASE_URL": url,
            "MINT_GATEWAY_URL": f"http://127.0.0.1:{port}",
            "MINT_REDIS_URL": "",
        }
        async with another_mint(op0, f"mint-{name}.log", **env) as mint_url:
            mint = Mint(mint_url, session)
            await mint.load()
            conn = await asyncpg.connect(url)
            try:
                yield mint, proxy, conn, env
            finally:
                await conn.close()
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()
        await runner.cleanup()


async def test_a_redemption_whose_answer_was_lost_is_never_freed_while_its_coin_may_exist(
    where: Path,
) -> None:
    """A redemption's issuance applied by the ledger, its answer lost, then refused (a
    proxy's HTTP 403; an older ledger's refusal of a retired issuer key): its coin is
    there, so its proofs are spent, never freed (that would make the coin and the ecash
    both). One lost before the ledger saw it, then refused, stays PENDING while its coin
    may still come (an alert), and is freed once the ledger still has no coin of it
    ``ISSUE_SETTLE_S`` after its first send."""
    op0, op1 = nets(where)
    network = Network.from_name(op0.network)
    async with (
        aiohttp.ClientSession() as s,
        bridged_mint(op0, s, "/v1/issuance") as (mint, proxy, db, _),
    ):
        info = await mint.ok("/v1/l3/info")
        here = bytes.fromhex(info["ledger_id"])
        address = encode_address(SigningKey(os.urandom(32)).pubkey, network, here)
        gw = Gateway(op0.gateway_url, s)
        # applied, its answer lost, then refused
        proofs = await mint.mint_paid(300, LightningRpc(op1.lightning_rpc))
        redeem = {"inputs": proofs, "address": address}
        proxy.script, proxy.then = ["lose"], "refuse"
        doc = await mint.ok("/v1/l3/redeem", redeem)
        assert doc["state"] == "PENDING"
        coin = await gw.coin(bytes.fromhex(doc["coin_id"]))
        assert coin is not None and coin["value_msat"] == 300_000  # the ledger made it
        status, again = await mint.call("/v1/l3/redeem", redeem)  # refused by the proxy
        assert status == 200, again
        assert again == {**doc, "state": "ISSUED"} and "refuse" in proxy.seen
        assert set(await mint.states(proofs)) == {"SPENT"}
        # lost before the ledger, then refused: kept while its coin may come, then freed
        proofs = await mint.mint_paid(200, LightningRpc(op1.lightning_rpc))
        redeem = {"inputs": proofs, "address": address}
        proxy.script, proxy.seen = ["drop"], []
        doc = await mint.ok("/v1/l3/redeem", redeem)
        assert doc["state"] == "PENDING"
        assert await mint.ok("/v1/l3/redeem", redeem) == doc  # refused, kept
        assert "refuse" in proxy.seen and set(await mint.states(proofs)) == {"PENDING"}
        assert await gw.coin(bytes.fromhex(doc["coin_id"])) is None
        await db.execute("UPDATE mint_redeems SET sent_at = sent_at - $1", ISSUE_SETTLE_S)
        assert await mint.refused("/v1/l3/redeem", redeem) == 0
        assert set(await mint.states(proofs)) == {"UNSPENT"}  # freed: no coin was made
        assert await gw.coin(bytes.fromhex(doc["coin_id"])) is None


class L3User:
    """A wallet with one L3 coin at op0's ledger, redeemed from ecash of ``mint``'s; it
    pays ``mint`` for withdrawals."""

    def __init__(self, mint: Mint, info: dict[str, Any], network: Network) -> None:
        self.mint, self.info, self.network = mint, info, network
        self.here = bytes.fromhex(info["ledger_id"])
        self.wallet = Wallet(os.urandom(32), network)
        self.key = self.wallet.fresh_key().pubkey
        self.coins: dict[bytes, Coin] = {}

    async def redeem(self, sat: int, payer: LightningRpc) -> bytes:
        proofs = await self.mint.mint_paid(sat, payer)
        address = encode_address(self.key, self.network, self.here)
        doc = await self.mint.ok("/v1/l3/redeem", {"inputs": proofs, "address": address})
        assert doc["state"] == "ISSUED"
        coin_id = bytes.fromhex(doc["coin_id"])
        self.coins = {coin_id: Coin(sat * 1000, self.key)}
        return coin_id

    def withdrawal(
        self, sat: int, keyset: str | None = None
    ) -> tuple[dict[str, Any], list[Any], list[Any], Any]:
        """A withdrawal's body paying its coin (its change the next one), its outputs
        (of ``keyset``, else the mint's active one), their secrets, and its transaction."""
        outputs, secrets = client.outputs_for(sat, keyset or self.mint.active)
        blinded = [bytes.fromhex(o.B_) for o in outputs]
        to = m.withdrawal_key(bytes.fromhex(self.info["key"]), blinded)
        address = encode_address(to, self.network, self.here)
        tx = self.wallet.pay(self.coins, address, sat * 1000, FEE_MSAT, here=self.here)
        self.coins = {
            tx.output_ids[i]: Coin(value, owner)
            for i, (value, owner) in enumerate(tx.outputs)
            if owner != to  # its change
        }
        return {"tx": tx.encode().hex(), "outputs": outputs}, outputs, secrets, tx


async def test_a_withdrawal_of_outputs_signed_before_is_refused_before_it_is_sent(
    where: Path,
) -> None:
    """Outputs signed before (another copy of the wallet swapped them): refused before
    the transaction is sent, so it never commits and the coin stays the user's (refused
    after it committed, the wallet would take it as nothing spent)."""
    op0, op1 = nets(where)
    async with aiohttp.ClientSession() as s, bridged_mint(op0, s, "/v1/tx") as (mint, *_):
        user = L3User(mint, await mint.ok("/v1/l3/info"), Network.from_name(op0.network))
        gw = Gateway(op0.gateway_url, s)
        coin_id = await user.redeem(1000, LightningRpc(op1.lightning_rpc))
        body, outputs, _, tx = user.withdrawal(300)
        ecash = await mint.mint_paid(300, LightningRpc(op1.lightning_rpc))
        await mint.ok("/v1/swap", {"inputs": ecash, "outputs": outputs})
        assert await mint.refused("/v1/l3/withdraw", body) == m.OUTPUTS_SIGNED
        with pytest.raises(GatewayError) as gone:
            await gw.get(f"/v1/tx/{tx.txid.hex()}")
        assert gone.value.status == 404  # never sent: nothing spent
        coin = await gw.coin(coin_id)
        assert coin is not None and coin["status"] == "unspent"


async def test_a_withdrawal_that_committed_is_signed_whatever_its_retry_is_told(
    where: Path,
) -> None:
    """A withdrawal whose first answer was lost and whose retry is refused for good (a
    proxy's HTTP 403; the ledger's "no such coin" once it forgot who spent the inputs)
    but whose transaction committed is signed; one whose keyset retired meanwhile is
    signed by that keyset."""
    op0, op1 = nets(where)
    async with (
        aiohttp.ClientSession() as s,
        bridged_mint(op0, s, "/v1/tx") as (mint, proxy, _, env),
    ):
        user = L3User(mint, await mint.ok("/v1/l3/info"), Network.from_name(op0.network))
        gw = Gateway(op0.gateway_url, s)
        await user.redeem(1000, LightningRpc(op1.lightning_rpc))
        body, outputs, secrets, tx = user.withdrawal(300)
        proxy.script, proxy.then, proxy.behind = ["lose"], "refuse", True
        status, _ = await mint.call("/v1/l3/withdraw", body)  # its fate not known yet
        assert status == 503 and proxy.seen == ["lose"]
        proxy.behind = False
        deadline = time.monotonic() + 10
        while True:  # it committed: once the gateway's index shows it
            with contextlib.suppress(GatewayError):
                if (await gw.get(f"/v1/tx/{tx.txid.hex()}"))["status"] == "committed":
                    break
            assert time.monotonic() < deadline, "the withdrawal did not commit"
            await asyncio.sleep(0.1)
        signed = await mint.ok("/v1/l3/withdraw", body)
        assert proxy.seen == ["lose", "refuse"]
        assert sum(p.amount for p in mint.unblind(signed["signatures"], outputs, secrets)) == 300
        assert await mint.ok("/v1/l3/withdraw", body) == signed
        # committed, its answer lost, then the keyset retired: the retry is signed by it
        body, outputs, secrets, _ = user.withdrawal(200)
        proxy.script, proxy.seen, proxy.then, proxy.behind = ["lose"], [], "pass", True
        status, _ = await mint.call("/v1/l3/withdraw", body)
        assert status == 503
        proxy.behind = False
        async with another_mint(op0, "mint-rotated.log", **env, MINT_INPUT_FEE_PPK="1000") as url:
            rotated = Mint(url, s)
            await rotated.load()
            assert rotated.active != mint.active
            signed = await rotated.ok("/v1/l3/withdraw", body)
            ecash = rotated.unblind(signed["signatures"], outputs, secrets)
            assert {p.id for p in ecash} == {mint.active} and sum(p.amount for p in ecash) == 200
            # sent, its answer lost; the "retry" names the retired keyset (its input fee
            # is lower) for the same outputs: refused, and they are signed as reserved
            body, outputs, secrets, _ = user.withdrawal(100, rotated.active)
            proxy.script, proxy.seen, proxy.behind = ["lose"], [], True
            status, _ = await rotated.call("/v1/l3/withdraw", body)
            assert status == 503
            proxy.behind = False
            cheaper = [msgspec.structs.replace(o, id=mint.active) for o in outputs]
            assert (
                await rotated.refused("/v1/l3/withdraw", {**body, "outputs": cheaper})
                == m.KEYSET_INACTIVE
            )
            signed = await rotated.ok("/v1/l3/withdraw", body)
            ecash = rotated.unblind(signed["signatures"], outputs, secrets)
            assert {p.id for p in ecash} == {rotated.active} and sum(p.amount for p in ecash) == 100


async def test_a_withdrawal_answers_for_an_output_the_wallet_also_swapped_as_restore_does(
    where: Path,
) -> None:
    """A withdrawal sent, its answer lost; then the wallet gives the same outputs, as
    other amounts, to a swap, which signs them. The withdrawal's retry answers with what
    was recorded for them (the swap's signatures), as a restore (NUT-09) does, not with
    signatures nobody recorded."""
    op0, op1 = nets(where)
    async with (
        aiohttp.ClientSession() as s,
        bridged_mint(op0, s, "/v1/tx") as (mint, proxy, _, _),
    ):
        user = L3User(mint, await mint.ok("/v1/l3/info"), Network.from_name(op0.network))
        await user.redeem(1000, LightningRpc(op1.lightning_rpc))
        body, outputs, _, _ = user.withdrawal(300)
        assert len({o.amount for o in outputs}) > 1
        proxy.script, proxy.then, proxy.behind = ["lose"], "pass", True
        status, _ = await mint.call("/v1/l3/withdraw", body)
        assert status == 503
        proxy.behind = False
        amounts = [o.amount for o in outputs][::-1]
        again = [
            msgspec.structs.replace(o, amount=a) for o, a in zip(outputs, amounts, strict=True)
        ]
        ecash = await mint.mint_paid(300, LightningRpc(op1.lightning_rpc))
        swapped = await mint.ok("/v1/swap", {"inputs": ecash, "outputs": again})
        signed = await mint.ok("/v1/l3/withdraw", body)
        assert signed["signatures"] == swapped["signatures"]
        restored = await mint.ok("/v1/restore", {"outputs": outputs})
        assert restored["signatures"] == swapped["signatures"]
