"""The read side never loses a payment: under load, with every kind of process killed
with ``kill -9`` (and restarted by the devnet's supervisor), every committed transaction
ends up in the index, the index agrees with the ledger, and every service is ready.

The truth is the ledger: a payment is committed if and only if the worker holding its
input says the coin is spent by it. The index must then answer, for every payment and
every address, exactly what the ledger implies: ``/v1/tx`` finds every committed payment
and no other, an address's ``/coins`` are exactly its unspent coins, and its
``/history`` holds exactly one entry per coin received and per coin spent.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import pytest

from constellation.address import Network, encode_address
from constellation.keys import SigningKey
from constellation.tx import Issuance, Transaction, TxOutput
from constellation.wallet import CHANGE, RECEIVE, new_mnemonic
from services import devnet
from services.api_client import Gateway, GatewayError
from services.follow import QUERY_TIMEOUT_S
from services.wallet import WalletFile, _history
from tests.system.operator import Operator, environment, pay, post

CLIENTS = 48
COINS_PER_CLIENT = 16
PAYEES = 240
CALM_S = 2.0  # between a process being back and the next kill


@pytest.fixture(scope="module")
def op() -> Iterator[Operator]:
    # The indexer says it is stalled after 3 s without progress (15 s by default).
    with environment({"INDEXER_STALL_S": "3"}):
        operator = Operator(workers=2, supervise=True)
    yield operator
    operator.close()


@dataclass
class Book:
    """What the clients did: every payment sent, and which were acknowledged."""

    keys: list[SigningKey]  # the clients'
    payees: list[SigningKey]  # who they pay (each address holds at most /coins' 500 coins)
    funded: dict[bytes, tuple[int, bytes]] = field(default_factory=dict)  # coin -> (v, owner)
    sent: dict[bytes, Transaction] = field(default_factory=dict)
    acked: set[bytes] = field(default_factory=set)
    acked_at: list[float] = field(default_factory=list)
    answers: dict[str, int] = field(default_factory=dict)

    def count(self, what: str) -> None:
        self.answers[what] = self.answers.get(what, 0) + 1


async def fund(op: Operator, gw: Gateway, book: Book) -> list[list[tuple[bytes, int]]]:
    """``COINS_PER_CLIENT`` coins for each client, in one issuance per client."""
    wallets = []
    for key in book.keys:
        outputs = [TxOutput(1_000_000, key.pubkey)] * COINS_PER_CLIENT
        issuance: Issuance = op.net.issuance(outputs)
        assert (await gw.issue(issuance))["status"] == "committed"
        for cid in issuance.output_ids:
            book.funded[cid] = (1_000_000, key.pubkey)
        wallets.append([(cid, 1_000_000) for cid in issuance.output_ids])
    return wallets


async def client(
    url: str,
    me: int,
    coins: list[tuple[bytes, int]],
    book: Book,
    until: list[float],
    count: int = 1 << 30,
) -> None:
    """Pay other clients from my coins (``count`` payments at most), going on with the
    change of what was acknowledged; a coin whose payment had no clear answer is not
    used again."""
    rng = random.Random(me)
    key = book.keys[me]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        for _ in range(count):
            if not coins or time.monotonic() > until[0]:
                return
            cid, value = coins.pop(0)
            if value < 1_000:
                continue  # spent down: kept as it is
            payee = book.payees[rng.randrange(len(book.payees))]
            amount = rng.randrange(1, value // 4)
            tx = pay(
                [(cid, value, key)],
                [TxOutput(amount, payee.pubkey), TxOutput(value - amount - 10, key.pubkey)],
                10,
            )
            book.sent[tx.txid] = tx
            try:
                status, doc, _ = await post(session, url + "/v1/tx", tx.encode())
            except (aiohttp.ClientError, TimeoutError):
                book.count("no answer")
                await asyncio.sleep(0.2)  # the gateway is down: its supervisor restarts it
                continue
            if status == 200:
                book.acked.add(tx.txid)
                book.acked_at.append(time.monotonic())
                book.count("committed")
                coins.append((tx.output_ids[1], value - amount - 10))
            else:
                book.count(doc["error"]["code"])
                if doc["error"]["code"] in ("overloaded", "rate_limited"):
                    coins.append((cid, value))  # refused before the ledger saw it
                    await asyncio.sleep(0.05)


def keys(n: int) -> list[SigningKey]:
    return [SigningKey(os.urandom(32)) for _ in range(n)]


def kill(op: Operator, name: str) -> None:
    """``kill -9`` of a process that is up and ready, and wait until it is back."""
    pid = op.pid(name)
    assert devnet.alive(pid)
    os.kill(pid, signal.SIGKILL)
    op.wait_restarted(name, pid)


async def kills(op: Operator) -> list[str]:
    """Each worker three times; the indexer, the gateway, NATS, PostgreSQL and Redis once;
    spread over the load."""
    plan = ["worker-0", "worker-1", "indexer", "worker-0", "nats", "gateway", "worker-1"]
    plan += ["postgres", "worker-0", "redis", "worker-1"]
    done = []
    for name in plan:
        await asyncio.sleep(CALM_S)
        await asyncio.to_thread(kill, op, name)
        done.append(name)
    await asyncio.sleep(CALM_S)
    return done


async def wait_indexed(op: Operator, gw: Gateway, timeout_s: float = 60) -> None:
    """Until no lock is held, nothing is in doubt, and the index has stored every
    worker's events log to its end."""
    end = time.monotonic() + timeout_s
    conn = await asyncpg.connect(op.net.database_url)
    try:
        while True:
            doc = await gw.get("/v1/ledger")
            logs = {w["worker"]: w["events_height"] for w in doc["workers"]}
            rows = await conn.fetch("SELECT worker, height FROM index_cursors")
            stored = {r["worker"]: r["height"] for r in rows}
            if (
                doc["locks"] == 0
                and doc["in_doubt"] == 0
                and all(stored.get(w, -1) == h for w, h in logs.items())
            ):
                return
            assert time.monotonic() < end, f"not indexed: logs {logs}, stored {stored}"
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


async def gathered(gw: Gateway, paths: list[str]) -> list[tuple[int, dict[str, Any]]]:
    """(status, body) of each GET, 32 at a time."""
    out: list[tuple[int, dict[str, Any]]] = []

    async def one(path: str) -> tuple[int, dict[str, Any]]:
        async with gw.session.get(gw.url + path) as resp:
            return resp.status, await resp.json()

    for i in range(0, len(paths), 32):
        out += await asyncio.gather(*(one(p) for p in paths[i : i + 32]))
    return out


async def all_coins(gw: Gateway, address: str) -> set[bytes]:
    """An address's unspent coins, read in pages of 50 (each page's ``next``)."""
    found: set[bytes] = set()
    after = 0
    while True:
        page = await gw.get(f"/v1/address/{address}/coins?limit=50&after={after}")
        assert len(page["coins"]) <= 50
        found |= {bytes.fromhex(c["coin_id"]) for c in page["coins"]}
        if "next" not in page:
            return found
        after = page["next"]


async def history(gw: Gateway, address: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    before = ""
    while True:
        page = await gw.get(f"/v1/address/{address}/history?limit=500{before}")
        entries += page["history"]
        if len(page["history"]) < 500:
            return entries
        before = f"&before={page['history'][-1]['seq']}"


async def test_kill_9_under_load_loses_no_payment_from_the_index(op: Operator, gw: Gateway) -> None:
    book = Book(keys(CLIENTS), keys(PAYEES))
    wallets = await fund(op, gw, book)
    started = time.monotonic()
    until = [started + 600.0]  # until the kills are done
    load = asyncio.gather(*(client(op.url, i, w, book, until) for i, w in enumerate(wallets)))
    killed = await kills(op)
    until[0] = 0
    await load
    took = time.monotonic() - started
    per_s = [0] * (int(took) + 1)
    for at in book.acked_at:
        per_s[int(at - started)] += 1
    print(f"\ncommitted per second: {per_s}")
    print(
        f"\n{len(book.sent)} payments in {took:.1f} s ({len(book.sent) / took:.0f}/s);"
        f" answers {book.answers}; killed {killed}"
    )
    assert len(book.acked) >= 1_000, book.answers
    await wait_indexed(op, gw)

    # The ledger's truth: which payments committed, and so which coins exist.
    inputs = [tx.inputs[0].coin_id for tx in book.sent.values()]
    coins = await gathered(gw, [f"/v1/coin/{cid.hex()}" for cid in inputs])
    assert all(status == 200 and doc["status"] in ("spent", "unspent") for status, doc in coins)
    spent_by = {
        cid: bytes.fromhex(doc["spent_by"])
        for cid, (_, doc) in zip(inputs, coins, strict=True)
        if doc["status"] == "spent"
    }
    committed = {
        txid: tx for txid, tx in book.sent.items() if spent_by.get(tx.inputs[0].coin_id) == txid
    }
    assert book.acked <= set(committed), "an acknowledged payment is not in the ledger"

    # Every committed payment is found; no other is.
    txids = list(book.sent)
    found = await gathered(gw, [f"/v1/tx/{txid.hex()}" for txid in txids])
    for txid, (status, doc) in zip(txids, found, strict=True):
        if txid in committed:
            assert status == 200 and doc["status"] == "committed", (txid.hex(), doc)
            assert doc["complete"] and all("block" in c for c in doc["changes"]), doc
        else:
            assert status == 404, (txid.hex(), doc)

    # Each address: its coins and its history, exactly as the ledger implies.
    created = dict(book.funded)
    spends: dict[bytes, bytes] = {}  # coin -> txid
    for txid, tx in committed.items():
        for cid, (value, owner) in zip(tx.output_ids, tx.outputs, strict=True):
            created[cid] = (value, owner)
        spends[tx.inputs[0].coin_id] = txid
    for key in book.keys + book.payees:
        address = encode_address(key.pubkey, Network.REGTEST)
        mine = {cid for cid, (_, owner) in created.items() if owner == key.pubkey}
        unspent = {cid for cid in mine if cid not in spends}
        assert await all_coins(gw, address) == unspent, address
        entries = await history(gw, address)
        got = sorted((e["coin_id"], e["kind"]) for e in entries)
        want = sorted(
            [(c.hex(), "received") for c in mine]
            + [(c.hex(), "spent") for c in mine if c in spends]
        )
        assert got == want, address


async def test_a_transaction_shows_every_part_while_a_participant_is_not_indexed(
    op: Operator, gw: Gateway
) -> None:
    """A payment whose payee's coin is created at another worker than its input: the
    coordinator's block (the commit) is indexed first, the participant's later. From
    its first answer on, ``/v1/tx`` shows every part (the payee's coin among them, "not
    indexed yet" until its block is), the values add up, and "complete" says whether
    all are indexed. The payee's coin was once left out: a payment that lost its payee."""
    first: list[bool] = []  # whether each first answer was complete
    for _ in range(12):
        alice, bob = SigningKey(os.urandom(32)), SigningKey(os.urandom(32))
        coin = await op.fund(gw, alice, 100_000, worker=0)
        for change in range(1, 10_000):  # bob's coin at worker 1, the change at worker 0
            outputs = [TxOutput(99_000 - change, bob.pubkey), TxOutput(change, alice.pubkey)]
            tx = pay([(coin, 100_000, alice)], outputs, 1_000)
            if [op.owner_of(c) for c in tx.output_ids] == [1, 0]:
                break
        await gw.submit(tx)
        answers = 0
        while True:
            try:
                doc = await gw.get(f"/v1/tx/{tx.txid.hex()}")
            except GatewayError as exc:  # its commit not indexed yet
                assert not exc.final, exc
                await asyncio.sleep(0.005)
                continue
            answers += 1
            parts = {(c["kind"], c["coin_id"]): c for c in doc["changes"]}
            want = {("spent", coin.hex())} | {("created", c.hex()) for c in tx.output_ids}
            assert set(parts) == want, doc
            spent = sum(c["value_msat"] for (kind, _), c in parts.items() if kind == "spent")
            made = sum(c["value_msat"] for (kind, _), c in parts.items() if kind == "created")
            assert spent == made + doc["fee_msat"] == 100_000, doc
            bobs = parts["created", tx.output_ids[0].hex()]
            assert bobs["address"] == encode_address(bob.pubkey, Network.REGTEST)
            assert doc["complete"] == all(c.get("indexed", True) for c in parts.values())
            assert doc["complete"] == all("block" in c for c in parts.values()), doc
            if answers == 1:
                first.append(doc["complete"])
            if doc["complete"]:
                break
            await asyncio.sleep(0.005)
    print(f"\nfirst answers complete: {first}")


async def test_wallet_history_shows_a_payment_of_several_coins_whole(
    op: Operator, gw: Gateway
) -> None:
    """A payment spending two coins of one address, then 19 coins received there: a
    history of 20 transactions per address's page once ended between the payment's two
    spends, and showed it as -51,000 msat (not -151,000), and the fundings not at all."""
    doc = WalletFile(new_mnemonic(), "regtest", op.url, receive=1, change=1)
    w = doc.wallet()
    key, change = w.key(RECEIVE, 0), w.key(CHANGE, 0)
    address = encode_address(key.pubkey, Network.REGTEST)
    bob = SigningKey(os.urandom(32))
    c1, c2 = await op.fund(gw, key, 100_000), await op.fund(gw, key, 100_000)
    paid = pay(
        [(c1, 100_000, key), (c2, 100_000, key)],
        [TxOutput(150_000, bob.pubkey), TxOutput(49_000, change.pubkey)],
        1_000,
    )
    await gw.submit(paid)
    await gw.issue(op.net.issuance([TxOutput(1_000, key.pubkey)] * 19))
    while len(await gw.history(address, 500)) < 23:  # all indexed
        await asyncio.sleep(0.05)
    out = io.StringIO()
    await _history(gw, doc, 20, out)  # `constellation wallet history`'s default
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines  # the coins received, the payment, two fundings
    nets = {line.split()[-1]: int(line.split()[1]) for line in lines}
    assert nets.pop(paid.txid.hex()) == -151_000, lines
    assert sorted(nets.values()) == [19_000, 100_000, 100_000], lines


async def payments(url: str, book: Book, wallets: list[list[tuple[bytes, int]]], n: int) -> None:
    """``n`` payments from each wallet, one after the other."""
    until = [time.monotonic() + 30]
    await asyncio.gather(*(client(url, i, w, book, until, n) for i, w in enumerate(wallets)))


async def readyz(port: int) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/readyz") as resp,
    ):
        return resp.status, (await resp.json())["reason"]


async def all_found(gw: Gateway, book: Book) -> None:
    assert book.acked
    found = await gathered(gw, [f"/v1/tx/{txid.hex()}" for txid in book.acked])
    assert all(status == 200 for status, _ in found), found


async def test_an_indexer_starved_of_its_event_loop_catches_up(op: Operator, gw: Gateway) -> None:
    """Frozen (SIGSTOP) for longer than its requests' deadlines while payments go on:
    once it runs again, its late timers and timed-out requests do not stop it."""
    book = Book(keys(8), keys(8))
    wallets = await fund(op, gw, book)
    pid = op.pid("indexer")
    os.kill(pid, signal.SIGSTOP)
    try:
        await payments(op.url, book, wallets, 3)
        await asyncio.sleep(QUERY_TIMEOUT_S + 1)
    finally:
        os.kill(pid, signal.SIGCONT)
    await wait_indexed(op, gw)
    await all_found(gw, book)
    assert op.pid("indexer") == pid  # it was not restarted: it went on
    assert (await readyz(op.net.indexer_port))[0] == 200


async def test_an_indexer_whose_database_hangs_says_so_and_recovers(
    op: Operator, gw: Gateway
) -> None:
    book = Book(keys(8), keys(8))
    wallets = await fund(op, gw, book)
    # The server and every backend (each of which is a process group of its own).
    postgres = [op.pid("postgres"), *devnet.child_pids(op.pid("postgres"))]
    for pid in postgres:
        os.kill(pid, signal.SIGSTOP)
    try:
        await payments(op.url, book, wallets, 2)  # committing needs no database
        end = time.monotonic() + 20
        while (answer := await readyz(op.net.indexer_port))[0] == 200:
            assert time.monotonic() < end, "the indexer says it is ready while stuck"
            await asyncio.sleep(0.1)
        assert answer[0] == 503 and "stalled" in answer[1], answer
    finally:
        for pid in postgres:
            os.kill(pid, signal.SIGCONT)
    end = time.monotonic() + 60
    while (await readyz(op.net.indexer_port))[0] != 200:
        assert time.monotonic() < end, "the indexer did not recover"
        await asyncio.sleep(0.1)
    await wait_indexed(op, gw)
    await all_found(gw, book)
