"""One operator's ledger as real processes: nats-server, Redis, PostgreSQL, two partition
workers and the gateway, driven through the public API (and NATS where a test plays a
worker)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import nats
import pytest

from constellation.address import Network, encode_address
from constellation.keys import SigningKey
from constellation.protocol import ledger as proto
from constellation.tx import MAX_OUTPUTS, Issuance, TxOutput
from services import devnet
from services.api_client import Gateway, GatewayError
from services.bus import GATEWAY, worker_subject
from services.gateway.errors import IN_DOUBT
from services.indexer.store import Index
from tests.system.operator import Operator, pay, post


@pytest.fixture(scope="module")
def op() -> Iterator[Operator]:
    operator = Operator(workers=2)
    yield operator
    operator.close()


async def ledger(gw: Gateway) -> dict[str, Any]:
    return await gw.get("/v1/ledger")


async def settled(gw: Gateway, timeout_s: float = 15) -> dict[str, Any]:
    """The ledger's totals once no lock is held and nothing is in doubt."""
    doc = await gw.settled(timeout_s)
    assert doc["locks"] == 0 and doc["in_doubt"] == 0, f"locks or doubts remain: {doc}"
    return doc


async def test_cross_worker_payment_commits_in_both_workers_blocks(
    op: Operator, gw: Gateway
) -> None:
    alice, bob = SigningKey(os.urandom(32)), SigningKey(os.urandom(32))
    coin = await op.fund(gw, alice, 100_000, worker=0)
    # Two outputs, one on each worker: pick the split until the ids land that way.
    for amount in range(1, 10_000):
        tx = pay(
            [(coin, 100_000, alice)],
            [TxOutput(amount, bob.pubkey), TxOutput(99_000 - amount, alice.pubkey)],
            1_000,
        )
        if {op.owner_of(c) for c in tx.output_ids} == {0, 1}:
            break
    receipt = await gw.submit(tx)
    assert receipt["txid"] == tx.txid.hex()
    assert {b["worker"] for b in receipt["blocks"]} == {0, 1}
    spent = await gw.get(f"/v1/coin/{coin.hex()}")
    assert spent["status"] == "spent" and spent["spent_by"] == tx.txid.hex()
    for cid, (value, owner) in zip(tx.output_ids, tx.outputs, strict=True):
        doc = await gw.get(f"/v1/coin/{cid.hex()}")
        assert doc["status"] == "unspent" and doc["value_msat"] == value
        assert doc["address"] == encode_address(owner, Network.REGTEST)
    await settled(gw)


async def test_racing_double_spends_exactly_one_wins(op: Operator, gw: Gateway) -> None:
    alice = SigningKey(os.urandom(32))
    coin = await op.fund(gw, alice, 50_000)
    payees = [SigningKey(os.urandom(32)) for _ in range(24)]
    txs = [pay([(coin, 50_000, alice)], [TxOutput(49_000, p.pubkey)], 1_000) for p in payees]
    async with aiohttp.ClientSession() as session:
        answers = await asyncio.gather(*(post(session, op.url + "/v1/tx", t.encode()) for t in txs))
    won = [doc for status, doc, _ in answers if status == 200]
    lost = [doc["error"]["code"] for status, doc, _ in answers if status == 409]
    assert len(won) == 1, answers
    assert len(lost) == len(txs) - 1 and set(lost) <= {"ledger.conflict", "ledger.spent"}
    winner = won[0]["txid"]
    assert (await gw.get(f"/v1/coin/{coin.hex()}"))["spent_by"] == winner
    await settled(gw)


async def test_bad_inputs_get_clear_errors_and_change_nothing(op: Operator, gw: Gateway) -> None:
    alice, mallory = SigningKey(os.urandom(32)), SigningKey(os.urandom(32))
    coin = await op.fund(gw, alice, 10_000)
    before = await settled(gw)
    good = pay([(coin, 10_000, alice)], [TxOutput(9_000, mallory.pubkey)], 1_000)
    forged = pay([(coin, 10_000, mallory)], [TxOutput(9_000, mallory.pubkey)], 1_000)
    unknown = pay([(os.urandom(32), 10_000, alice)], [TxOutput(9_000, alice.pubkey)], 1_000)
    mismatch = pay([(coin, 20_000, alice)], [TxOutput(19_000, alice.pubkey)], 1_000)
    too_many = pay(
        [(coin, 10_000, alice)],
        [TxOutput(1, alice.pubkey)] * (MAX_OUTPUTS - 1)
        + [TxOutput(10_000 - MAX_OUTPUTS + 1, alice.pubkey)],
    )
    bad_json = json.dumps({"inputs": [], "outputs": [], "witnesses": [], "extra": 1}).encode()
    cases: list[tuple[bytes, str, int, str]] = [
        (b"\x01\x00", "application/octet-stream", 400, "malformed.truncated"),
        (good.encode() + b"\x00", "application/octet-stream", 400, "malformed.trailing_bytes"),
        (b"\x07" + good.encode()[1:], "application/octet-stream", 400, "malformed.version"),
        (forged.encode(), "application/octet-stream", 400, "invalid.signature"),
        (unknown.encode(), "application/octet-stream", 422, "ledger.unknown_coin"),
        (mismatch.encode(), "application/octet-stream", 422, "ledger.value_mismatch"),
        (b"{not json", "application/json", 400, "malformed.json"),
        (bad_json, "application/json", 400, "malformed.json"),
        (good.encode(), "text/plain", 400, "malformed.content_type"),
        (b"\x00" * (200 << 10), "application/octet-stream", 413, "too_large"),
        (b"\x00" * (8 << 20), "application/octet-stream", 413, "too_large"),
    ]
    async with aiohttp.ClientSession() as session:
        for body, ctype, status, code in cases:
            got, doc, _ = await post(session, op.url + "/v1/tx", body, ctype)
            assert (got, doc["error"]["code"]) == (status, code), (code, doc)
            assert doc["error"]["message"]
        assert (await post(session, op.url + "/v1/tx", too_many.encode()))[0] == 200
        got, doc, _ = await post(session, op.url + "/v1/tx", good.encode())
        assert got == 409 and doc["error"]["code"] == "ledger.spent"
        assert "already spent" in doc["error"]["message"]
        rogue = SigningKey(os.urandom(32))
        forged_issue = Issuance(rogue.pubkey, 1, [TxOutput(5, rogue.pubkey)]).signed_by(
            rogue.secret
        )
        got, doc, _ = await post(session, op.url + "/v1/issuance", forged_issue.encode())
        assert got == 403 and doc["error"]["code"] == "ledger.bad_issuance"
        got, doc, _ = await post(session, op.url + "/v1/txs", b"\x00\x00\x00\x09abc")
        assert got == 400 and doc["error"]["code"] == "malformed.batch"
        for path in ("/v1/coin/zz", "/v1/tx/00", "/v1/address/nope/coins"):
            async with session.get(op.url + path) as resp:
                assert resp.status == 400, path
                assert (await resp.json())["error"]["code"].startswith("malformed")
        async with session.get(op.url + "/v1/coin/" + os.urandom(32).hex()) as resp:
            assert resp.status == 404
    after = await settled(gw)
    assert (
        after["held_msat"] == before["held_msat"] and after["issued_msat"] == before["issued_msat"]
    )


async def test_json_form_batch_and_idempotency(op: Operator, gw: Gateway) -> None:
    alice, bob = SigningKey(os.urandom(32)), SigningKey(os.urandom(32))
    c1 = await op.fund(gw, alice, 30_000)
    tx = pay([(c1, 30_000, alice)], [TxOutput(29_000, bob.pubkey)], 1_000)
    doc = {
        "inputs": [{"coin_id": c1.hex(), "value_msat": 30_000}],
        "outputs": [{"address": encode_address(bob.pubkey, Network.REGTEST), "value_msat": 29_000}],
        "fee_msat": 1_000,
        "witnesses": [tx.witnesses[0].hex()],
    }
    body = json.dumps(doc).encode()
    async with aiohttp.ClientSession() as session:
        key = {"Idempotency-Key": os.urandom(8).hex()}
        first = await post(session, op.url + "/v1/tx", body, "application/json", key)
        again = await post(session, op.url + "/v1/tx", body, "application/json", key)
        other = await post(session, op.url + "/v1/tx", body + b" ", "application/json", key)
        assert first[0] == 200 and first[1]["txid"] == tx.txid.hex()
        assert again[0] == 200 and again[1] == first[1]
        assert again[2].get("Idempotent-Replayed") == "true"
        assert other[0] == 422 and other[1]["error"]["code"] == "idempotency.key_reused"
        # A batch: two good payments and one garbage entry, answered in order.
        c2 = await op.fund(gw, bob, 5_000)
        c3 = await op.fund(gw, bob, 6_000)
        t2 = pay([(c2, 5_000, bob)], [TxOutput(5_000, alice.pubkey)])
        t3 = pay([(c3, 6_000, bob)], [TxOutput(6_000, alice.pubkey)])
        items = [t2.encode(), b"\x01", t3.encode()]
        batch = b"".join(struct.pack(">I", len(i)) + i for i in items)
        status, answer, _ = await post(session, op.url + "/v1/txs", batch)
        assert status == 200
        results = answer["results"]
        assert results[0]["txid"] == t2.txid.hex() and results[2]["txid"] == t3.txid.hex()
        assert results[1]["error"]["code"].startswith("malformed")
        status, _found, _ = await post(session, op.url + "/v1/txs", b"", "text/plain")
        assert status == 400


async def test_history_coins_and_websocket_pushes(op: Operator, gw: Gateway) -> None:
    alice, bob = SigningKey(os.urandom(32)), SigningKey(os.urandom(32))
    bob_addr = encode_address(bob.pubkey, Network.REGTEST)
    async with aiohttp.ClientSession() as session, session.ws_connect(op.url + "/v1/ws") as ws:
        await ws.send_str(json.dumps({"subscribe": [bob_addr]}))
        assert (await ws.receive_json(timeout=5))["type"] == "subscribed"
        await ws.send_str(json.dumps({"subscribe": ["garbage"]}))
        assert (await ws.receive_json(timeout=5))["type"] == "error"
        coin = await op.fund(gw, alice, 40_000)
        tx = pay([(coin, 40_000, alice)], [TxOutput(39_000, bob.pubkey)], 1_000)
        await gw.submit(tx)
        note = await ws.receive_json(timeout=10)
        assert note["type"] == "coin" and note["address"] == bob_addr
        assert note["txid"] == tx.txid.hex() and note["kind"] == "received"
        assert note["value_msat"] == 39_000
    # Each worker's events reach the index on their own: wait for both sides.
    alice_addr = encode_address(alice.pubkey, Network.REGTEST)
    end = time.monotonic() + 10
    while not (history := await gw.history(bob_addr)) or len(await gw.history(alice_addr)) < 2:
        assert time.monotonic() < end, "the index never caught up"
        await asyncio.sleep(0.1)
    assert history[0]["txid"] == tx.txid.hex() and history[0]["kind"] == "received"
    coins = await gw.coins(bob_addr)
    assert list(coins) == [tx.output_ids[0]]
    alice_history = await gw.history(alice_addr)
    assert {e["kind"] for e in alice_history} == {"received", "spent"}
    status = await gw.get(f"/v1/tx/{tx.txid.hex()}")
    assert status["status"] == "committed"
    with pytest.raises(GatewayError) as err:
        await gw.get(f"/v1/tx/{os.urandom(32).hex()}")
    assert err.value.status == 404
    spec = await gw.get("/openapi.json")
    assert spec["openapi"].startswith("3.") and "/v1/tx" in spec["paths"]


async def test_rate_limit_answers_429_with_retry_after(op: Operator) -> None:
    alice = SigningKey(os.urandom(32))
    with op.gateway_settings(GATEWAY_RATE_PER_S="5"):
        async with aiohttp.ClientSession() as session:
            issuance = op.net.issuance([TxOutput(1_000, alice.pubkey)] * 6)
            await Gateway(op.url, session).issue(issuance)
            txs = [
                pay([(c, 1_000, alice)], [TxOutput(1_000, alice.pubkey)])
                for c in issuance.output_ids
            ]
            batch = b"".join(struct.pack(">I", len(t.encode())) + t.encode() for t in txs)
            status, body, headers = await post(session, op.url + "/v1/txs", batch)
            assert status == 429 and body["error"]["code"] == "rate_limited"
            assert headers["Retry-After"] == "1"
            # The refused batch was not counted: one transaction still fits.
            status, body, _ = await post(session, op.url + "/v1/tx", txs[0].encode())
            assert status == 200 and body["txid"] == txs[0].txid.hex()


async def test_no_answer_in_time_is_504_and_sending_again_tells_the_outcome(op: Operator) -> None:
    alice = SigningKey(os.urandom(32))
    with op.gateway_settings(GATEWAY_TIMEOUT_MS="500"):
        async with aiohttp.ClientSession() as session:
            gw = Gateway(op.url, session)
            coin = await op.fund(gw, alice, 1_000, worker=0)
            tx = pay([(coin, 1_000, alice)], [TxOutput(1_000, alice.pubkey)])
            op.freeze(0)
            try:
                status, body, _ = await post(session, op.url + "/v1/tx", tx.encode())
                # Looked up meanwhile, at any gateway, it is not "not found" for good.
                with pytest.raises(GatewayError) as looked_up:
                    await gw.get(f"/v1/tx/{tx.txid.hex()}")
            finally:
                op.thaw(0)
            assert status == 504 and body["error"]["code"] == "timeout"
            message = body["error"]["message"]
            assert tx.txid.hex() in message and "send it again" in message, message
            assert looked_up.value.status == 404 and looked_up.value.code == IN_DOUBT
            assert not looked_up.value.final and "may still commit" in str(looked_up.value)
            # The coordinator was only slow: sent again, the ledger says it committed it,
            # and the coin says by what; a rival spend of that coin is refused for good.
            assert await gw.outcome(tx, 10)
            doc = await gw.get(f"/v1/coin/{coin.hex()}")
            assert doc["status"] == "spent" and doc["spent_by"] == tx.txid.hex()
            bob = SigningKey(os.urandom(32))
            rival = pay([(coin, 1_000, alice)], [TxOutput(1_000, bob.pubkey)])
            assert not await gw.outcome(rival, 10)
            # never sent before: sending it is its outcome
            fresh = pay([(tx.output_ids[0], 1_000, alice)], [TxOutput(1_000, alice.pubkey)])
            assert await gw.outcome(fresh, 10) and await gw.outcome(fresh, 10)


async def test_worker_refuses_partitions_it_does_not_hold(op: Operator, gw: Gateway) -> None:
    alice = SigningKey(os.urandom(32))
    coin = await op.fund(gw, alice, 1_000, worker=0)
    tx = pay([(coin, 1_000, alice)], [TxOutput(1_000, alice.pubkey)])
    nc = await nats.connect(op.net.nats_url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        pkg = proto.Package(
            proto.PROTOCOL_VERSION, GATEWAY, inbox, 1, [proto.Submit(7, tx.encode())]
        )
        await nc.publish(worker_subject(op.net.operator, 1), proto.encode(pkg))
        answer = proto.decode_package((await sub.next_msg(timeout=5)).data)
        await nc.publish(worker_subject(op.net.operator, 1), b"\x93garbage")
    finally:
        await nc.close()
    (result,) = answer.items
    assert isinstance(result, proto.Result) and result.rid == 7
    assert result.code == "ledger.wrong_partition"
    assert "held by worker 0" in result.detail and "map v1" in result.detail


async def test_participant_keeps_its_lock_through_a_restart_until_it_learns_the_outcome(
    op: Operator, gw: Gateway
) -> None:
    """Play coordinator 0 towards worker 1: PREPARE, get YES, kill -9 worker 1 while
    worker 0 is frozen; the restarted participant still holds the lock, then asks the
    real coordinator, which never decided, and learns abort (presumed abort)."""
    alice = SigningKey(os.urandom(32))
    c0 = await op.fund(gw, alice, 1_000, worker=0)
    c1 = await op.fund(gw, alice, 2_000, worker=1)
    tx = pay([(c0, 1_000, alice), (c1, 2_000, alice)], [TxOutput(3_000, alice.pubkey)])
    nc = await nats.connect(op.net.nats_url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        prepare = proto.Prepare(tx.encode(), 7)
        pkg = proto.Package(proto.PROTOCOL_VERSION, 0, inbox, 1, [prepare])
        op.freeze(0)
        await nc.publish(worker_subject(op.net.operator, 1), proto.encode(pkg))
        (vote,) = proto.decode_package((await sub.next_msg(timeout=5)).data).items
    finally:
        await nc.close()
    assert isinstance(vote, proto.Vote) and vote.code == "" and vote.txid == tx.txid
    assert vote.attempt == 7
    op.kill(1)
    op.restart(1)
    assert (await gw.get(f"/v1/coin/{c1.hex()}"))["status"] == "locked"
    assert "in_doubt" in op.worker_log(1)
    op.thaw(0)
    await settled(gw)
    assert (await gw.get(f"/v1/coin/{c1.hex()}"))["status"] == "unspent"


async def test_kill_9_of_a_worker_under_load_then_restart(op: Operator, gw: Gateway) -> None:
    """Payments race while worker 1 is killed and restarted. Afterwards every
    acknowledged transaction is there, nothing is spent twice, value is conserved,
    and no lock is held."""
    keys = [SigningKey(os.urandom(32)) for _ in range(8)]
    coins: list[tuple[bytes, int, SigningKey]] = []
    for i in range(120):
        coins.append((await op.fund(gw, keys[i % 8], 10_000), 10_000, keys[i % 8]))
    before = await settled(gw)
    acked: list[Any] = []
    failed: list[str] = []

    async def client(mine: list[tuple[bytes, int, SigningKey]]) -> None:
        async with aiohttp.ClientSession() as session:
            for cid, value, key in mine:
                dst = keys[(keys.index(key) + 1) % 8]
                tx = pay([(cid, value, key)], [TxOutput(value - 100, dst.pubkey)], 100)
                status, doc, _ = await post(session, op.url + "/v1/tx", tx.encode())
                if status == 200:
                    acked.append(tx)
                else:
                    failed.append(doc["error"]["code"])
                await asyncio.sleep(0.005)

    load = asyncio.gather(*(client(coins[i::6]) for i in range(6)))
    await asyncio.sleep(0.3)
    op.kill(1)
    await asyncio.sleep(0.3)
    op.restart(1)
    await load
    assert acked, "nothing committed"
    assert set(failed) <= {"timeout", "ledger.timeout", "unavailable"}, failed
    after = await settled(gw)
    for tx in acked:
        ((cid, _),) = tx.inputs
        doc = await gw.get(f"/v1/coin/{cid.hex()}")
        assert doc["status"] == "spent" and doc["spent_by"] == tx.txid.hex()
        out = await gw.get(f"/v1/coin/{tx.output_ids[0].hex()}")
        assert out["status"] == "unspent"
    fees = after["fees_msat"] - before["fees_msat"]
    assert after["issued_msat"] == before["issued_msat"]
    assert after["held_msat"] + fees == before["held_msat"]
    assert fees >= 100 * len(acked)
    assert "recovered" in op.worker_log(1)


async def test_index_stores_each_change_once_however_often_it_is_delivered(op: Operator) -> None:
    """The indexer may see a block's events again (a redelivery, a restart): the rows
    are keyed by (coin, created), so history lists each change once. (Worker 200 is no
    worker of this operator: its cursor moves nothing the indexer follows.)"""
    owner, txid = os.urandom(32), os.urandom(32)
    coin, spent = os.urandom(32), os.urandom(32)
    block = proto.BlockEvents(
        200,
        10**9,
        10**9 - 1,
        [
            proto.CoinChange(txid, spent, owner, 2**64 - 1, False),
            proto.CoinChange(txid, coin, owner, 5, True),
        ],
        [proto.Commit(txid, 7)],
    )
    index = await Index.open(op.net.database_url)
    try:
        await index.store([block])
        await index.store([block, block])  # again, and twice within one batch
        history = await index.history(owner, 10, None)
        assert sorted((e["kind"], e["value_msat"]) for e in history) == [
            ("received", 5),
            ("spent", 2**64 - 1),
        ]
        assert [(c, v) for _, c, v in await index.unspent(owner, 10)] == [(coin, 5)]
        found = await index.tx(txid)
        assert found is not None and found["fee_msat"] == 7
        assert (await index.cursors())[200] == 10**9
        # spent in a later block, or its spend stored first: no longer listed unspent
        # (the list reads an index of the coins not spent, not every coin ever spent)
        later, first = os.urandom(32), os.urandom(32)

        def change(coin_id: bytes, created: bool) -> proto.CoinChange:
            return proto.CoinChange(os.urandom(32), coin_id, owner, 5, created)

        def at(height: int, *changes: proto.CoinChange) -> proto.BlockEvents:
            return proto.BlockEvents(200, height, height - 1, list(changes), [])

        await index.store([at(10**9 + 1, change(later, True), change(first, False))])
        listed = [c for _, c, _ in await index.unspent(owner, 10)]
        assert later in listed and first not in listed
        await index.store([at(10**9 + 2, change(coin, False), change(later, False))])
        await index.store([at(10**9 + 3, change(first, True))])
        assert await index.unspent(owner, 10) == []
    finally:
        await index.close()


async def test_verifier_processes_check_signatures_and_stop_with_their_worker(
    op: Operator, gw: Gateway
) -> None:
    """Worker 1 with ``WORKER_VERIFIERS=2``: forged signatures it holds are refused, as
    coordinator and as participant, naming the input; honest payments commit; its
    verifier processes end with it."""
    alice, mallory = SigningKey(os.urandom(32)), SigningKey(os.urandom(32))
    with op.worker_settings(1, WORKER_VERIFIERS="2"):
        verifiers = devnet.child_pids(op.worker_pid(1))
        assert len(verifiers) >= 2
        c0 = await op.fund(gw, alice, 1_000, worker=0)
        c1 = await op.fund(gw, alice, 2_000, worker=1)
        before = await settled(gw)
        out = [TxOutput(2_990, alice.pubkey)]
        async with aiohttp.ClientSession() as session:
            for coins, bad in (
                ([(c1, 2_000, mallory), (c0, 1_000, alice)], 0),  # checked by the coordinator
                ([(c0, 1_000, alice), (c1, 2_000, mallory)], 1),  # by the participant
            ):
                forged = pay(coins, out, fee=10)
                status, doc, _ = await post(session, op.url + "/v1/tx", forged.encode())
                assert status == 400 and doc["error"]["code"] == "invalid.signature", doc
                assert f"input {bad}: signature does not verify" in doc["error"]["message"]
            assert await settled(gw) == before
            honest = pay([(c1, 2_000, alice), (c0, 1_000, alice)], out, fee=10)
            status, doc, _ = await post(session, op.url + "/v1/tx", honest.encode())
        assert status == 200 and doc["status"] == "committed", doc
        after = await settled(gw)
        assert after["held_msat"] + after["fees_msat"] == before["held_msat"] + before["fees_msat"]
    end = time.monotonic() + 5  # the verifiers are joined; the resource tracker follows
    while [p for p in verifiers if os.path.exists(f"/proc/{p}")] and time.monotonic() < end:
        time.sleep(0.1)
    run = op.worker_log(1).split("worker ready")[-2]
    assert '"stopped"' in run, f"no clean drain: {run[-1500:]}"
    assert not [p for p in verifiers if os.path.exists(f"/proc/{p}")]


class RawWebsocket:
    """A websocket client that reads only when asked, with a small receive buffer, so
    that it can fall behind the gateway."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, url: str) -> RawWebsocket:
        host, port = url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET /v1/ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    def send_text(self, text: str) -> None:
        data, mask = text.encode(), os.urandom(4)
        assert len(data) < 126
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.writer.write(bytes([0x81, 0x80 | len(data)]) + mask + masked)

    async def frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next frame from the gateway."""
        first, size = await self.reader.readexactly(2)
        size &= 0x7F
        if size == 126:
            (size,) = struct.unpack(">H", await self.reader.readexactly(2))
        elif size == 127:
            (size,) = struct.unpack(">Q", await self.reader.readexactly(8))
        return first & 0x0F, await self.reader.readexactly(size)


async def test_a_websocket_subscriber_that_falls_behind_is_told_and_cut_off(
    op: Operator, gw: Gateway
) -> None:
    """The gateway keeps a bounded queue per socket: a subscriber that cannot keep up
    (it does not read, and thousands of its coins are created at once) gets the queued
    notes, then an ``overloaded`` note, then the socket closes; the gateway serves
    everyone else as before."""
    carol = SigningKey(os.urandom(32))
    address = encode_address(carol.pubkey, Network.REGTEST)
    ws = await RawWebsocket.connect(op.url)
    ws.send_text(json.dumps({"subscribe": [address]}))
    opcode, payload = await ws.frame()
    assert json.loads(payload)["type"] == "subscribed"
    # 16,384 coins: about 5 MB of notes, more than the kernel's buffers and the
    # socket's queue hold.
    for _ in range(8):
        issuances = [
            op.net.issuance([TxOutput(1_000, carol.pubkey)] * MAX_OUTPUTS) for _ in range(8)
        ]
        for receipt in await asyncio.gather(*(gw.issue(i) for i in issuances)):
            assert receipt["status"] == "committed"
    notes: list[dict[str, Any]] = []
    closed = b""
    while not closed:
        try:
            opcode, payload = await asyncio.wait_for(ws.frame(), 10)
        except TimeoutError:
            raise AssertionError(f"{len(notes)} notes, {notes[-1:]}") from None
        if opcode == 0x8:  # close: status code, then the reason
            closed = payload[2:]
        else:
            notes.append(json.loads(payload))
    ws.writer.close()
    assert closed == b"subscriber too slow"
    assert notes[-1] == {"type": "error", "code": "overloaded"}
    assert all(n["type"] == "coin" and n["address"] == address for n in notes[:-1])
    assert len(notes) - 1 < 64 * MAX_OUTPUTS
    async with aiohttp.ClientSession() as session, session.ws_connect(op.url + "/v1/ws") as other:
        await other.send_str(json.dumps({"subscribe": [address]}))
        assert (await other.receive_json(timeout=5))["type"] == "subscribed"
