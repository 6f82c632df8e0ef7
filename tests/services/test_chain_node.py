"""The mint's on-chain side asks the node, not only its own records, where that decides
money (``services.ecash.onchain``, against a real PostgreSQL and the scripted bitcoind
of ``test_chain_books``): a quote's address and the key it records are one; a coin too
small to pay for its own move does not hold a key's retirement back for ever; no child
pays for a withdrawal a block already holds; a withdrawal whose outputs are all spent
is found in its block."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest
from nats.errors import NoServersError

from constellation.bitcoin import BitcoinTx, p2tr_script, parse_tx
from constellation.crypto.dkg import hostpubkey_gen
from constellation.ecash import onchain as oc
from constellation.ecash.mint import CashuError
from constellation.guild import derive, guild_output, owned_derivation
from constellation.keys import SigningKey
from constellation.protocol.cashu import MintQuoteOnchainRequest
from constellation.protocol.envelope import Membership
from services.ecash.metrics import MintMetrics
from services.ecash.onchain import BitcoindError, Onchain, ask_move, moved
from services.ecash.store import MintStore
from services.signer.config import SignerAccess
from tests.services.test_chain_books import (
    DESTINATION,
    Chain,
    _following,
    _no_rules,
    _no_signing,
    _totals,
    _withdrawal,
    store,
)

__all__ = ["store"]  # the fixture, a real PostgreSQL

OLD = b"\x02" + SigningKey(b"\x41" * 32).pubkey
NEW = b"\x02" + SigningKey(b"\x42" * 32).pubkey


async def _down(store: MintStore) -> tuple[Onchain, Chain]:
    """A mint whose operator's signer is unreachable (its NATS down: what it records
    stays unsigned), over a scripted chain, at 2 sat/vB (its least feerate too)."""
    first, chain = await _following(store)
    await first.close()
    signer = hostpubkey_gen(b"\x32" * 32)
    down = SignerAccess("nats://127.0.0.1:1", Membership("g", [signer]), signer, b"\x33" * 32)
    mint = Onchain(replace(first.s, signer=down), store, _no_rules, _no_signing, MintMetrics())
    mint.rpc = chain  # type: ignore[assignment]
    mint.guild_key, mint.usable, mint.estimated = NEW, [NEW, OLD], 2
    return mint, chain


async def test_a_mint_quote_records_the_key_its_address_is_under(store: MintStore) -> None:
    """The resolver finds a new guild key (a change of members) while a quote asks the
    chain's tip: its address and its recorded key are the key read first, so its
    deposit is credited under the key its address is under, and signed for."""
    mint, chain = await _following(store)
    mint.guild_key, mint.usable = OLD, [OLD]

    class Turning(Chain):
        async def call(self, method: str, *params: Any) -> Any:
            if method == "getblockcount":  # the resolver's pass, between two awaits
                mint.guild_key, mint.usable = NEW, [OLD, NEW]
            return await super().call(method, *params)

    chain = Turning()
    mint.rpc = chain  # type: ignore[assignment]
    try:
        pubkey = (b"\x02" + SigningKey(b"\x09" * 32).pubkey).hex()
        doc = await mint.mint_quote(MintQuoteOnchainRequest(unit="sat", pubkey=pubkey), 600)
        r = await store.pool.fetchrow("SELECT * FROM chain_quotes WHERE quote = $1", doc["quote"])
        key, label = bytes(r["guild_key"]), bytes(r["derivation"])
        assert key == OLD
        assert bytes(r["script"]) == p2tr_script(
            guild_output(key, owned_derivation(mint.me, label)).xonly
        )
        deposit = {
            "txid": "de" * 32,
            "vin": [{"txid": "cc" * 32, "vout": 0}],
            "vout": [
                {"n": 0, "value": Decimal("0.001"), "scriptPubKey": {"hex": r["script"].hex()}}
            ],
        }
        chain.blocks += [("h1", [deposit]), ("h2", []), ("h3", [])]
        await mint.follow()
        await mint.follow()
        c = await store.pool.fetchrow("SELECT * FROM chain_coins WHERE txid = $1", "de" * 32)
        assert c["held"] and bytes(c["key"]) == OLD
        coin = oc.Coin(c["txid"], 0, c["amount_sat"], bytes(c["script"]), label, bytes(c["key"]))
        w = oc.plan([coin], DESTINATION, 50_000, p2tr_script(b"\x55" * 32), 2, 10_000)
        assert w is not None
        [request] = oc.spend_requests(w.tx, w.spent)
        derive(request, coin.key, mint.me)  # each signer's own check: it signs
        async with store.pool.acquire() as conn:
            assert (await moved(conn, NEW)).confirmed_elsewhere == 1  # OLD retires after it
    finally:
        await mint.close()


async def test_a_coin_too_small_to_move_alone_moves_beside_one_under_the_new_key(
    store: MintStore,
) -> None:
    """500 sat under the old key cannot pay for its own move even at the least feerate
    (330 + 111 vB x 2 sat/vB): it waits for a confirmed coin under the new key, then
    moves with it, the whole of both in the move's output but its fee, booked as the
    mint's chain fees; the old key then has nothing left."""
    mint, _ = await _down(store)
    insert = (
        "INSERT INTO chain_coins (txid, vout, amount_sat, script, derivation, key, height,"
        " held) VALUES ($1, 1, $2, $3, $4, $5, $6, true)"
    )
    await store.pool.execute(
        insert, "c1" * 32, 500, p2tr_script(b"\x01" * 32), b"\x06" * 32, OLD, 5
    )
    try:
        async with store.pool.acquire() as conn:
            await ask_move(conn, NEW)
        move = await store.pool.fetchval("SELECT id FROM chain_moves")
        with pytest.raises(CashuError, match=r"worth too little .* even at 2 sat/vB"):
            await mint._move_on(move)
        assert await store.pool.fetchval("SELECT state FROM chain_moves") == "ASKED"
        await store.pool.execute(
            insert, "c2" * 32, 100_000, p2tr_script(b"\x02" * 32), b"\x07" * 32, NEW, 6
        )
        before = await _totals(store)
        with pytest.raises(NoServersError):  # recorded, then not signed: its NATS down
            await asyncio.wait_for(mint._move_on(move), 20)
        r = await store.pool.fetchrow("SELECT * FROM chain_moves WHERE id = $1", move)
        tx = parse_tx(bytes(r["tx"]))
        assert r["state"] == "SIGNING"
        assert sorted(c[2] for c in json.loads(r["spent"])) == [500, 100_000]
        assert r["fee_sat"] == oc.fee_sat(2, [tx.outputs[0].script_pubkey], 2)
        assert [o.amount_sat for o in tx.outputs] == [100_500 - r["fee_sat"]]
        after = await _totals(store)
        assert after["chain_sat"] == before["chain_sat"] - r["fee_sat"] == 100_500 - r["fee_sat"]
        assert after.get("chain_fees_sat", 0) == before.get("chain_fees_sat", 0) + r["fee_sat"]
        async with store.pool.acquire() as conn:
            left = await moved(conn, NEW)
        assert left.confirmed_elsewhere == left.pending_elsewhere == 0
    finally:
        await mint.close()


async def _stuck(store: MintStore, mint: Onchain, chain: Chain) -> BitcoinTx:
    """Withdrawal 'w' at 2 sat/vB, sent, in the node's mempool, two blocks missed (read by
    the follower), the market at 50 sat/vB: it is due a child."""
    await mint.follow()  # from h0
    w = await _withdrawal(store, mint, NEW, 0)
    signed = oc.signed(w.tx, [b"\x01" * 64])
    await store.pool.execute(
        "UPDATE chain_withdrawals SET tx = $1, state = 'SENT'", signed.serialize()
    )
    chain.mempool.add(signed.txid)
    chain.blocks += [("h1", []), ("h2", [])]
    await mint.follow()
    mint.estimated = 50
    return signed


async def test_no_child_for_a_withdrawal_a_block_holds_that_the_follower_has_not_read(
    store: MintStore,
) -> None:
    """The follower has not read the block that holds the withdrawal when the resolver
    looks: the node's mempool no longer holds it, so no child is built (it would pay
    thousands of sat for nothing)."""
    mint, chain = await _down(store)
    try:
        signed = await _stuck(store, mint, chain)
        chain.blocks.append(("h3", [{"txid": signed.txid, "vin": [], "vout": []}]))
        before = await _totals(store)
        await asyncio.wait_for(mint.bump_stuck(), 20)
        assert await store.pool.fetchval("SELECT count(*) FROM chain_bumps") == 0
        assert await _totals(store) == before
    finally:
        await mint.close()


@pytest.mark.parametrize("state", ["SIGNING", "SIGNED", "SIGNED at the node"])
async def test_a_child_recorded_for_a_withdrawal_a_block_now_holds_is_dropped(
    store: MintStore, state: str
) -> None:
    """A child recorded and not sent (its signer was down; or signed, and its process
    died before it sent it) when a block takes the withdrawal: it is dropped, undone in
    the books (the change unspent again, its fee no longer the mint's), and its
    withdrawal holds no key back. One the node took before its process died is kept,
    and said SENT."""
    mint, chain = await _down(store)
    try:
        signed = await _stuck(store, mint, chain)
        before = await _totals(store)
        await asyncio.wait_for(mint.bump_stuck(), 20)  # recorded; not signed (NATS down)
        [bump] = await store.pool.fetch("SELECT * FROM chain_bumps")
        assert bump["state"] == "SIGNING"
        assert (await _totals(store))["chain_fees_sat"] == bump["fee_sat"]
        if state != "SIGNING":
            child = oc.signed(parse_tx(bytes(bump["tx"])), [b"\x02" * 64])
            await store.pool.execute(
                "UPDATE chain_bumps SET tx = $1, state = 'SIGNED'", child.serialize()
            )
        if state == "SIGNED at the node":
            chain.mempool.add(bump["txid"])
        chain.blocks.append(("h3", [{"txid": signed.txid, "vin": [], "vout": []}]))
        await asyncio.wait_for(mint.bump_stuck(), 20)
        bumps = await store.pool.fetch("SELECT state FROM chain_bumps")
        if state == "SIGNED at the node":
            assert [r["state"] for r in bumps] == ["SENT"]
            return
        assert bumps == []
        assert await _totals(store) == {**before, "chain_fees_sat": 0}
        change = await store.pool.fetchrow(
            "SELECT spent_by FROM chain_coins WHERE txid = $1 AND vout = 1", signed.txid
        )
        assert change["spent_by"] is None
        assert (
            await store.pool.fetchval(
                "SELECT count(*) FROM chain_coins WHERE txid = $1", bump["txid"]
            )
            == 0
        )
        async with store.pool.acquire() as conn:
            assert (await moved(conn, NEW)).signing == 0
    finally:
        await mint.close()


async def test_a_signed_withdrawal_whose_outputs_are_all_spent_is_found_in_its_block(
    store: MintStore,
) -> None:
    """A withdrawal signed and taken by the node, its process dead before it said SENT;
    by the time it is sent again, a block holds it and every output of it is spent, so
    Bitcoin Core finds its inputs missing (-25) rather than it in the chain (-27). Asked
    with the block the follower read (a node without -txindex finds it no other way), it
    is SENT; before the follower read it, it is not known yet, and stays SIGNED."""
    mint, chain = await _down(store)
    try:
        await mint.follow()
        w = await _withdrawal(store, mint, NEW, 0)
        signed = oc.signed(w.tx, [b"\x01" * 64])
        await store.pool.execute(
            "UPDATE chain_withdrawals SET tx = $1, state = 'SIGNED'", signed.serialize()
        )
        chain.blocks.append(("h1", [{"txid": signed.txid, "vin": [], "vout": []}]))
        chain.spent.add(signed.txid)
        with pytest.raises(BitcoindError, match="missingorspent"):
            await mint.complete("w")
        assert await store.pool.fetchval("SELECT state FROM chain_withdrawals") == "SIGNED"
        await mint.follow()
        await mint.complete("w")
        assert await store.pool.fetchval("SELECT state FROM chain_withdrawals") == "SENT"
    finally:
        await mint.close()
