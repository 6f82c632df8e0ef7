"""The mint's on-chain books (``services.ecash.onchain``) against a real PostgreSQL: a
deposit credited, reorganised out and mined again is credited to its quote once; one
from a coinbase only once Bitcoin lets it be spent; a melt whose withdrawal is recorded
is never refunded. The chain is a scripted bitcoind (the
three calls the follower makes), since no bitcoind runs here and the simulated one never
reorganises."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from nats.errors import NoServersError

from constellation.bitcoin import p2tr_script, parse_tx
from constellation.crypto.dkg import hostpubkey_gen
from constellation.ecash import onchain as oc
from constellation.ecash.mint import ONCHAIN, MeltQuote, Mint
from constellation.errors import DecodeError
from constellation.keys import SigningKey
from constellation.protocol.cashu import BlindedMessage, BlindSignature
from constellation.protocol.envelope import Membership
from services.ecash import onchain
from services.ecash.metrics import MintMetrics
from services.ecash.onchain import (
    FOLLOW_LOCK,
    BitcoindError,
    ChainSettings,
    Moved,
    Onchain,
    ask_move,
    moved,
)
from services.ecash.store import MintStore
from services.signer.config import SignerAccess
from tests.services.postgres import throwaway_postgres

CONFIRMATIONS = 3
SCRIPT = bytes.fromhex("5120" + "ab" * 32)  # the quote's P2TR address
GUILD_KEY = b"\x02"  # the key the quote's address is under
DEPOSIT = {
    "txid": "dd" * 32,
    "vin": [{"txid": "cc" * 32, "vout": 0}],
    "vout": [{"n": 0, "value": Decimal("0.001"), "scriptPubKey": {"hex": SCRIPT.hex()}}],
}
# a miner's payout from its pool, in the coinbase (bitcoind's shape: no outpoint spent)
DESTINATION = bytes.fromhex("0014" + "11" * 20)  # a withdrawal's P2WPKH payee
COINBASE = {**DEPOSIT, "txid": "cb" * 32, "vin": [{"coinbase": "016600", "sequence": 2**32 - 1}]}


class Chain:
    """bitcoind's getblockcount, getblockhash, getblock (verbosity 2), estimatesmartfee
    (``estimate``), sendrawtransaction, getmempoolentry, getrawtransaction (as without
    ``-txindex``) and gettxout over a list of blocks (hash, transactions) that a test
    replaces to reorganise it, and a mempool of what was sent and is in none of them. A
    block of a branch left behind is still served by its hash, as bitcoind does;
    ``after[hash]`` runs once that block was served. A transaction in a block is "already
    in the chain" (-27) while an output of it is unspent, and its inputs missing (-25)
    once ``spent`` names it (every output spent in a block), as Bitcoin Core answers."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, list[dict[str, Any]]]] = [("h0", [])]
        self.known: dict[str, tuple[str | None, list[dict[str, Any]]]] = {}
        self.after: dict[str, Callable[[], None]] = {}
        self.sent: list[str] = []  # raw transactions, as sendrawtransaction took them
        self.mempool: set[str] = set()  # txids taken (those a block holds are not in it)
        self.spent: set[str] = set()  # txids in a block whose every output is spent
        self.estimate: Any = {"errors": ["Insufficient data or no feerate found"], "blocks": 0}

    def depth(self, txid: str) -> int:
        """Its confirmations on the chain (0: in no block of it)."""
        for i, (_, txs) in enumerate(self.blocks):
            if any(t["txid"] == txid for t in txs):
                return len(self.blocks) - i
        return 0

    async def call(self, method: str, *params: Any) -> Any:
        for i, (h, txs) in enumerate(self.blocks):
            self.known.setdefault(h, (self.blocks[i - 1][0] if i else None, txs))
        if method == "getblockcount":
            return len(self.blocks) - 1
        if method == "getblockhash":
            return self.blocks[params[0]][0]
        if method == "estimatesmartfee":
            return self.estimate
        if method == "sendrawtransaction":
            self.sent.append(params[0])
            try:
                txid = parse_tx(bytes.fromhex(params[0])).txid
            except DecodeError:  # a test's stand-in for a transaction
                return None
            if self.depth(txid) and txid in self.spent:
                raise BitcoindError(-25, "bad-txns-inputs-missingorspent")
            if self.depth(txid):
                raise BitcoindError(-27, "Transaction already in block chain")
            self.mempool.add(txid)
            return txid
        if method == "getmempoolentry":
            if params[0] not in self.mempool or self.depth(params[0]):
                raise BitcoindError(-5, "Transaction not in mempool")
            return {"vsize": 0, "fees": {}}
        if method == "getrawtransaction":
            return self._getrawtransaction(*params)
        if method == "gettxout":
            txid, _, mempool = params
            if self.depth(txid) and txid not in self.spent:
                return {"confirmations": self.depth(txid)}
            in_mempool = txid in self.mempool and not self.depth(txid)
            return {"confirmations": 0} if in_mempool and mempool else None
        if method == "getblock":
            parent, txs = self.known[params[0]]
            block = {"hash": params[0], "tx": txs}
            if parent is not None:
                block["previousblockhash"] = parent
            if then := self.after.pop(params[0], None):
                then()
            return block
        raise AssertionError(f"the follower does not call {method}")

    def _getrawtransaction(self, txid: str, verbose: bool, block: str | None = None) -> Any:
        if block is None:
            if txid in self.mempool and not self.depth(txid):
                return {"txid": txid}
            raise BitcoindError(
                -5,
                "No such mempool transaction. Use -txindex or provide a block hash to enable"
                " blockchain transaction queries. Use gettransaction for wallet transactions.",
            )
        if block not in self.known:
            raise BitcoindError(-5, "Block hash not found")
        if not any(t["txid"] == txid for t in self.known[block][1]):
            raise BitcoindError(
                -5,
                "No such transaction found in the provided block."
                " Use gettransaction for wallet transactions.",
            )
        active = [h for h, _ in self.blocks]
        depth = len(active) - active.index(block) if block in active else 0
        return {
            "txid": txid,
            "blockhash": block,
            "confirmations": depth,
            "in_active_chain": bool(depth),
        }


@pytest.fixture
async def store() -> AsyncIterator[MintStore]:
    async with throwaway_postgres("chain-follow") as url:
        s = await MintStore.open(url)
        await Onchain.create_schema(s.pool)
        yield s
        await s.close()


async def test_a_deposit_reorganised_out_and_mined_again_is_credited_once(
    store: MintStore,
) -> None:
    follower, chain = await _following(store)
    try:
        await follower.follow()  # a new mint follows from the tip
        chain.blocks += [("h1", [DEPOSIT]), ("h2", []), ("h3", [])]
        await follower.follow()
        assert await _books(store) == (100_000, 100_000)  # three confirmations: credited
        # the last three blocks reorganised away; the deposit is in the new branch's first
        chain.blocks = [("h0", []), ("h1b", [DEPOSIT]), ("h2b", []), ("h3b", [])]
        await follower.follow()  # the reorg seen: the coin is gone from the funds
        assert await _books(store) == (100_000, 0)
        for _ in range(2):
            await follower.follow()
        assert await _books(store) == (100_000, 100_000)  # held again, credited once
        chain.blocks.append(("h4b", []))
        await follower.follow()
        assert await _books(store) == (100_000, 100_000)
    finally:
        await follower.close()


async def test_a_deposit_under_its_quote_s_minimum_is_not_credited_nor_added_up(
    store: MintStore,
) -> None:
    """NUT-30's min_amount (10,000 sat here): each output to a quote's address is judged
    on its own; two of 6,000 are not credited, apart or together, nor held, nor do they
    hold back a key's retirement; the 100,000 one beside them is credited. A quote made
    before the mint had a minimum (0) credits every output while open; once expired, the
    mint's minimum holds for it too."""
    follower, chain = await _following(store)
    out = {"value": Decimal("0.00006"), "scriptPubKey": {"hex": SCRIPT.hex()}}
    small = {**DEPOSIT, "txid": "d1" * 32, "vout": [{"n": 0, **out}, {"n": 1, **out}]}
    try:
        await follower.follow()
        chain.blocks += [("h1", [DEPOSIT, small]), ("h2", []), ("h3", [])]
        await follower.follow()
        assert await _books(store) == (100_000, 100_000)
        assert await store.pool.fetchval("SELECT count(*) FROM chain_coins") == 1
        below = "mint_chain_deposits_below_min_total"
        assert follower.metrics.registry.get_sample_value(below) == 2
        async with store.pool.acquire() as conn:
            moves = await moved(conn, b"\x03")
        assert moves.deposits_elsewhere == 0 and moves.confirmed_elsewhere == 1
        await store.pool.execute(
            "UPDATE chain_quotes SET min_sat = 0, expiry = extract(epoch FROM now())::bigint + 600"
        )
        chain.blocks += [("h4", [{**small, "txid": "d2" * 32}]), ("h5", []), ("h6", [])]
        await follower.follow()
        assert await _books(store) == (112_000, 112_000)
        assert follower.metrics.registry.get_sample_value(below) == 2
        await store.pool.execute("UPDATE chain_quotes SET expiry = 0")
        chain.blocks += [("h7", [{**small, "txid": "d3" * 32}]), ("h8", []), ("h9", [])]
        await follower.follow()
        assert await _books(store) == (112_000, 112_000)
        assert follower.metrics.registry.get_sample_value(below) == 4
    finally:
        await follower.close()


@pytest.mark.parametrize("retired", [False, True])
async def test_a_deposit_from_a_coinbase_is_credited_once_it_can_be_spent(
    store: MintStore, retired: bool
) -> None:
    """Bitcoin spends a coinbase's outputs from its 100th confirmation on, and a
    reorganisation takes its reward away for good: until then it backs no ecash and is
    no coin to spend, though a deposit beside it is credited at 3. To a retired key, it
    is said to be uncredited only then too."""
    follower, chain = await _following(store)
    if retired:
        follower.usable = [b"\x03"]

    async def held() -> int:
        async with store.pool.acquire() as conn, conn.transaction():
            return len(await follower._held(conn, "true"))

    try:
        await follower.follow()
        chain.blocks += [("c1", [COINBASE, DEPOSIT]), ("c2", []), ("c3", [])]
        await follower.follow()  # 3 confirmations: enough for the deposit alone
        assert await _books(store) == ((0, 0) if retired else (100_000, 100_000))
        chain.blocks += [(f"c{n}", []) for n in range(4, 100)]
        await follower.follow()  # 99
        assert await _books(store) == ((0, 0) if retired else (100_000, 100_000))
        assert await held() == (0 if retired else 1)  # the deposit's coin alone
        assert follower.unusable == ({("dd" * 32, 0)} if retired else set())
        chain.blocks.append(("c100", []))
        await follower.follow()
        assert await _books(store) == ((0, 0) if retired else (200_000, 200_000))
        assert await held() == (0 if retired else 2)
        assert follower.unusable == ({("dd" * 32, 0), ("cb" * 32, 0)} if retired else set())
    finally:
        await follower.close()


async def test_a_reorganisation_while_blocks_are_read_credits_nothing_of_the_branch_left(
    store: MintStore,
) -> None:
    """The chain moves to another branch after the deposit's block was read and before
    the next one is: the next block read is no child of it, so the deposit (spent
    otherwise in the new branch) is not taken for confirmed under the new blocks."""
    follower, chain = await _following(store)
    try:
        await follower.follow()
        chain.blocks += [("a1", [DEPOSIT]), ("a2", []), ("a3", [])]

        def reorganise() -> None:
            chain.blocks[1:] = [("b1", []), ("b2", []), ("b3", []), ("b4", [])]

        chain.after["a1"] = reorganise
        await follower.follow()
        assert await _books(store) == (0, 0)
        for _ in range(4):  # the fork found, the new branch read, and it grows
            await follower.follow()
            chain.blocks.append((f"b{len(chain.blocks)}", []))
        assert await _books(store) == (0, 0)
        heights = await store.pool.fetch("SELECT height, hash FROM chain_blocks ORDER BY height")
        assert [r["hash"] for r in heights] == [h for h, _ in chain.blocks[: len(heights)]]
    finally:
        await follower.close()


async def test_one_process_of_the_mint_reads_the_chain_at_a_time(store: MintStore) -> None:
    """Two processes' passes interleaved would record blocks of two branches as one."""
    follower, chain = await _following(store)
    try:
        async with store.pool.acquire() as other:  # another process, in its pass
            await other.execute(f"SELECT pg_advisory_lock({FOLLOW_LOCK})")
            chain.blocks.append(("h1", [DEPOSIT]))
            await follower.follow()
            assert await store.pool.fetchval("SELECT count(*) FROM chain_blocks") == 0
            await other.execute(f"SELECT pg_advisory_unlock({FOLLOW_LOCK})")
        await follower.follow()
        assert await store.pool.fetchval("SELECT count(*) FROM chain_blocks") == 1
    finally:
        await follower.close()


async def test_a_key_retires_once_no_deposit_can_come_to_it_and_a_later_one_is_not_credited(
    store: MintStore,
) -> None:
    """A quote open under the old key, or its deposit in a block and not credited yet,
    holds the old key's retirement back (``moved``); a deposit to the old address once
    the signers no longer sign with its key is not credited: it backs no ecash."""
    new_key = b"\x03"
    follower, chain = await _following(store)

    async def to_come() -> Moved:
        async with store.pool.acquire() as conn:
            return await moved(conn, new_key)

    try:
        await follower.follow()
        await store.pool.execute(
            "UPDATE chain_quotes SET expiry = extract(epoch FROM now())::bigint + 600"
        )
        assert (await to_come()).deposits_elsewhere == 1 and not (await to_come()).done
        await store.pool.execute("UPDATE chain_quotes SET expiry = 0")  # expired
        chain.blocks.append(("h1", [DEPOSIT]))
        await follower.follow()  # in a block, short of its confirmations
        assert (await to_come()).deposits_elsewhere == 1 and not (await to_come()).done
        chain.blocks += [("h2", []), ("h3", [])]
        await follower.follow()
        assert await _books(store) == (100_000, 100_000)
        moves = await to_come()  # credited: a coin to move now
        assert moves.deposits_elsewhere == 0 and moves.confirmed_elsewhere == 1
        follower.usable = [new_key]  # the old key retired
        late = {**DEPOSIT, "txid": "ee" * 32}
        chain.blocks += [("h4", [late]), ("h5", []), ("h6", [])]
        await follower.follow()
        assert await _books(store) == (100_000, 100_000)
        late_coin = await store.pool.fetchrow(
            "SELECT held FROM chain_coins WHERE txid = $1", "ee" * 32
        )
        assert late_coin is not None and not late_coin["held"]
    finally:
        await follower.close()


async def test_a_withdrawal_is_sent_again_until_a_block_holds_it(
    store: MintStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its melt PAID once the node took it; a node that restarted with an empty mempool,
    or evicted it, would otherwise never mine it, and the user would go unpaid."""
    monkeypatch.setattr(onchain, "RESEND_S", 0.0)
    follower, chain = await _following(store)
    await store.pool.execute(
        "INSERT INTO melt_quotes (quote, request, payment_hash, amount, fee_reserve, unit,"
        " state, expiry, amount_msat, attempt, pending_since, method)"
        " VALUES ('w', 'bcrt1q', 'w', 1000, 200, 'sat', 'PAID', 0, 1000000, 1, 0, $1)",
        ONCHAIN,
    )
    await store.pool.execute(
        "INSERT INTO chain_withdrawals (quote, attempt, tx, txid, fee_sat, spent, state)"
        " VALUES ('w', 1, '\\x0102', 't1', 200, '[]', 'SENT')"
    )
    try:
        await follower.follow()
        await follower.send_again()
        await follower.send_again()
        assert chain.sent == ["0102", "0102"]  # in no block: sent again
        chain.blocks.append(("h1", [{"txid": "t1", "vout": []}]))
        await follower.follow()
        await follower.send_again()
        assert len(chain.sent) == 2  # a block holds it
        chain.blocks[1:] = [("h1b", []), ("h2b", [])]  # ...and then none
        await follower.follow()
        await follower.send_again()
        assert len(chain.sent) == 3
    finally:
        await follower.close()


async def test_a_melt_is_paid_once_its_withdrawal_is_confirmations_deep(store: MintStore) -> None:
    """NUT-30: a melt stays PENDING, its outpoint shown, while its withdrawal is in no
    block or in one short of ``confirmations``; then it is PAID once, its proofs spent
    and the mint's margin booked. A reorganisation after leaves it PAID and sends the
    transaction again."""
    follower, chain = await _following(store)
    w = await _withdrawal(store, follower, GUILD_KEY, 0)
    await store.pool.execute(
        "INSERT INTO mint_proofs (y, keyset, amount, secret, c, state, reserved_by)"
        " VALUES ('\\x01', '00', 20654, 's', 'c', 'PENDING', 'w')"
    )
    await store.pool.execute("UPDATE chain_withdrawals SET state = 'SIGNED'")  # as signed
    mined: dict[str, Any] = {"txid": w.tx.txid, "vout": []}
    try:
        await follower.follow()
        assert (await follower.melt_state("w"))["outpoint"] is None  # not sent yet
        await follower.complete("w")
        assert chain.sent == [w.tx.serialize().hex()]
        for block in [("h1", [mined]), ("h2", [])]:
            chain.blocks.append(block)
            await follower.follow()
            doc = await follower.melt_state("w")
            assert doc["state"] == "PENDING" and doc["outpoint"] == f"{w.tx.txid}:0"
        chain.blocks.append(("h3", []))
        await follower.follow()
        doc = await follower.melt_state("w")
        assert doc["state"] == "PAID" and doc["outpoint"] == f"{w.tx.txid}:0"
        assert await store.pool.fetchval("SELECT state FROM mint_proofs") == "SPENT"
        kept = await store.pool.fetchval("SELECT msat FROM mint_fees WHERE kind = 'melt'")
        assert kept == (654 - w.fee_sat) * 1000  # no blank outputs: no change
        chain.blocks[1:] = [("h1b", []), ("h2b", []), ("h3b", []), ("h4b", [])]
        await follower.follow()
        await follower.send_again()
        assert chain.sent == [w.tx.serialize().hex()] * 2
        assert (await follower.melt_state("w"))["state"] == "PAID"
        assert await store.pool.fetchval("SELECT count(*) FROM mint_fees") == 1
    finally:
        await follower.close()


async def test_a_database_of_before_sent_withdrawals_is_taken_up(store: MintStore) -> None:
    """Made again over a database of before: a PAID melt's withdrawal left SIGNED (a sent
    one was so then) is SENT, so it is sent again and bumped until a block holds it; a
    PENDING melt's with ``mined`` 0 (what every withdrawal got when that column came, sent
    or not) is in no block known, so the follower does not take it for confirmed."""
    for quote, state in (("a", "PAID"), ("b", "PENDING")):
        await store.pool.execute(
            "INSERT INTO melt_quotes (quote, request, payment_hash, amount, fee_reserve, unit,"
            " state, expiry, amount_msat, attempt, pending_since, method)"
            " VALUES ($1, 'bcrt1q', $1, 1000, 200, 'sat', $2, 0, 1000000, 1, 0, $3)",
            quote,
            state,
            ONCHAIN,
        )
    await store.pool.execute(
        "INSERT INTO chain_withdrawals (quote, attempt, tx, txid, fee_sat, spent, state, mined)"
        " VALUES ('a', 1, '\\x01', 'ta', 200, '[]', 'SIGNED', NULL),"
        " ('b', 1, '\\x02', 'tb', 200, '[]', 'SIGNING', 0)"
    )
    await Onchain.create_schema(store.pool)
    rows = await store.pool.fetch("SELECT quote, state, mined FROM chain_withdrawals ORDER BY 1")
    assert [tuple(r) for r in rows] == [("a", "SENT", None), ("b", "SIGNING", None)]
    with pytest.raises(asyncpg.CheckViolationError):
        await store.pool.execute("UPDATE chain_withdrawals SET state = 'PAID'")


async def _following(store: MintStore) -> tuple[Onchain, Chain]:
    """A follower of a scripted chain (it signs nothing), and a quote it watches."""
    no_signer = SignerAccess("nats://unused", Membership("chain-follow", []), bytes(33), b"")
    settings = ChainSettings("http://unused", no_signer, CONFIRMATIONS, 2, 1_000, 6, 1, "bcrt")
    follower = Onchain(settings, store, _no_rules, _no_signing, MintMetrics())
    chain = Chain()
    follower.rpc = chain  # type: ignore[assignment]
    follower.usable = [GUILD_KEY]  # as the signers say
    await store.pool.execute(
        "INSERT INTO chain_quotes (quote, address, script, derivation, guild_key, pubkey,"
        " expiry, min_sat) VALUES ('q', 'bcrt1p', $1, '\\x00', $2, '02', 0, 10000)",
        SCRIPT,
        GUILD_KEY,
    )
    return follower, chain


async def _withdrawal(
    store: MintStore, follower: Onchain, key: bytes, height: int
) -> oc.Withdrawal:
    """Melt 'w' of 20,000 sat (its fee reserve 654) PENDING, and its withdrawal recorded
    (SIGNING) at 2 sat/vB from a 1,000,000-sat coin the mint holds under ``key`` in the
    block at ``height``, its change to an address of the guild's."""
    deposit = oc.Coin("aa" * 32, 0, 1_000_000, SCRIPT, b"\x05" * 32, key)
    await store.pool.execute(
        "INSERT INTO chain_coins (txid, vout, amount_sat, script, derivation, key, height,"
        " held) VALUES ($1, 0, $2, $3, $4, $5, $6, true)",
        deposit.txid,
        deposit.amount_sat,
        deposit.script,
        deposit.label,
        key,
        height,
    )
    await store.pool.execute(
        "INSERT INTO melt_quotes (quote, request, payment_hash, amount, fee_reserve, unit,"
        " state, expiry, amount_msat, attempt, pending_since, method)"
        " VALUES ('w', 'bcrt1q', 'w', 20000, 654, 'sat', 'PENDING', 0, 20000000, 1, 0, $1)",
        ONCHAIN,
    )
    change = p2tr_script(b"\x55" * 32)
    w = oc.plan([deposit], DESTINATION, 20_000, change, 2, 654)
    assert w is not None
    async with store.pool.acquire() as conn, conn.transaction():
        quote = MeltQuote("w", "x", "w", 20_000, 654, "sat", "PENDING", 0, method=ONCHAIN)
        await follower._record(conn, quote, 1, w, change, b"\x06" * 32, key)
    return w


async def _books(store: MintStore) -> tuple[int, int]:
    """(sat credited to the quote, sat of deposits the mint holds)."""
    paid = await store.pool.fetchval("SELECT amount_paid FROM chain_quotes")
    held = await store.pool.fetchval(
        "SELECT coalesce(sum(amount), 0) FROM mint_totals WHERE kind = 'chain_sat'"
    )
    return paid, held


def _no_rules() -> Mint:
    raise AssertionError("the follower issues nothing")


async def _no_signing(_: Sequence[BlindedMessage]) -> list[BlindSignature]:
    raise AssertionError("the follower signs nothing")


async def test_a_melt_taken_for_abandoned_is_not_refunded_once_its_withdrawal_is_recorded(
    store: MintStore,
) -> None:
    """The resolver found an on-chain melt PENDING with no withdrawal recorded; before it
    freed the proofs, the melt's own process recorded one (which it then sends)."""
    await store.pool.execute(
        "INSERT INTO melt_quotes (quote, request, payment_hash, amount, fee_reserve, unit,"
        " state, expiry, amount_msat, attempt, pending_since, method)"
        " VALUES ('w', 'bcrt1q', 'w', 1000, 200, 'sat', 'PENDING', 0, 1000000, 1, 0, $1)",
        ONCHAIN,
    )
    await store.pool.execute(
        "INSERT INTO mint_proofs (y, keyset, amount, secret, c, state, reserved_by)"
        " VALUES ('\\x01', '00', 1024, 's', 'c', 'PENDING', 'w')"
    )
    await store.pool.execute(
        "INSERT INTO chain_withdrawals (quote, attempt, tx, txid, fee_sat, spent, state)"
        " VALUES ('w', 1, '\\x00', 't', 200, '[]', 'SIGNING')"
    )

    async def melt() -> tuple[str, int]:
        state = await store.pool.fetchval("SELECT state FROM melt_quotes WHERE quote = 'w'")
        reserved = await store.pool.fetchval(
            "SELECT count(*) FROM mint_proofs WHERE reserved_by = 'w'"
        )
        return state, reserved

    assert not await store.fail_melt("w", 1, onchain=True)
    assert await melt() == ("PENDING", 1)  # it is sent: never refunded as well
    # with no withdrawal recorded, the same call frees the proofs
    await store.pool.execute("DELETE FROM chain_withdrawals")
    assert await store.fail_melt("w", 1, onchain=True)
    assert await melt() == ("UNPAID", 0)


async def test_the_feerate_is_bitcoind_s_estimate_within_the_floor_and_the_cap(
    store: MintStore,
) -> None:
    """Nothing is built before bitcoind answered; then its estimate (BTC/kvB) rounded up
    to sat/vB, the floor where it has none (regtest's answer), the cap above it; an
    answer that is no estimate is refused and the last one kept."""
    follower, chain = await _following(store)
    with pytest.raises(onchain.BitcoindError, match="no fee estimate yet"):
        follower.feerate()
    await follower.estimate()
    assert follower.feerate() == 2  # the floor: regtest's "Insufficient data"
    chain.estimate = {"feerate": Decimal("0.00012345"), "blocks": 6}
    await follower.estimate()
    assert follower.feerate() == 13  # 12.345 sat/vB, rounded up
    chain.estimate = {"feerate": Decimal("0.5"), "blocks": 2}
    await follower.estimate()
    assert follower.feerate() == 1_000  # the cap
    answers: list[Any] = [{"feerate": "fast"}, [], {"feerate": Decimal("NaN")}]
    for bad in answers:
        chain.estimate = bad
        with pytest.raises(onchain.BitcoindError, match="estimatesmartfee answered"):
            await follower.estimate()
        assert follower.feerate() == 1_000


async def test_a_stuck_withdrawal_gets_one_child_within_the_budgets_and_holds_the_key(
    store: MintStore,
) -> None:
    """A withdrawal sent at 2 sat/vB, two blocks missed, the market at 50: two mint
    processes bumping at once record one child of its change (its signer unreachable
    here, it stays SIGNING), which moves its fee from the mint's funds to its fees and
    holds back the old key's retirement until signed. Over the day's budget, no child."""
    key = b"\x02" + SigningKey(b"\x31" * 32).pubkey
    first, chain = await _following(store)
    await first.close()
    signer = hostpubkey_gen(b"\x32" * 32)  # a member's, whose NATS server is down
    down = SignerAccess("nats://127.0.0.1:1", Membership("g", [signer]), signer, b"\x33" * 32)
    first = Onchain(replace(first.s, signer=down), store, _no_rules, _no_signing, MintMetrics())
    second = Onchain(first.s, store, _no_rules, _no_signing, MintMetrics())
    w = await _withdrawal(store, first, key, 1)
    signed = oc.signed(w.tx, [b"\x01" * 64])  # as the guild signed and the node took it
    await store.pool.execute(
        "UPDATE chain_withdrawals SET tx = $1, state = 'SENT'", signed.serialize()
    )
    chain.mempool.add(signed.txid)
    before = await _totals(store)
    for follower in (first, second):
        follower.guild_key, follower.estimated, follower.rpc = key, 50, chain  # type: ignore[assignment]
    await first.bump_stuck()
    assert await store.pool.fetchval("SELECT count(*) FROM chain_bumps") == 0  # no block missed
    await store.pool.execute("INSERT INTO chain_blocks VALUES (1, 'h1'), (2, 'h2')")
    # recorded, then not signed (the signer's NATS down: said, and given up, not waited for)
    await asyncio.wait_for(asyncio.gather(first.bump_stuck(), second.bump_stuck()), 20)
    [bump] = await store.pool.fetch("SELECT * FROM chain_bumps")
    assert bump["state"] == "SIGNING" and json.loads(bump["spent"])[0][:2] == [signed.txid, 1]
    child = parse_tx(bytes(bump["tx"]))
    assert w.fee_sat + bump["fee_sat"] >= 50 * (
        signed.vsize + oc.vsize(1, [child.outputs[0].script_pubkey])
    )
    after = await _totals(store)
    assert after["chain_sat"] == before["chain_sat"] - bump["fee_sat"]
    assert after["chain_fees_sat"] == before.get("chain_fees_sat", 0) + bump["fee_sat"]
    async with store.pool.acquire() as conn:
        assert (await moved(conn, b"\x03" + bytes(32))).signing == 1
    # the day's budget spent: no child
    await store.pool.execute("DELETE FROM chain_coins WHERE txid = $1", bump["txid"])
    await store.pool.execute("UPDATE chain_coins SET spent_by = NULL WHERE txid = $1", signed.txid)
    await store.pool.execute("UPDATE chain_bumps SET quote = 'earlier', state = 'SENT'")
    poor = Onchain(
        replace(first.s, bump_budget_sat=bump["fee_sat"] + 100),
        store,
        _no_rules,
        _no_signing,
        MintMetrics(),
    )
    poor.guild_key, poor.estimated, poor.rpc = key, 50, chain  # type: ignore[assignment]
    await asyncio.wait_for(poor.bump_stuck(), 3)  # nothing recorded to sign: it returns
    assert await store.pool.fetchval("SELECT count(*) FROM chain_bumps WHERE quote = 'w'") == 0
    for follower in (first, second, poor):
        await follower.close()


async def test_a_mint_with_more_coins_than_a_transaction_takes_moves_them_in_several(
    store: MintStore,
) -> None:
    """700 coins under the old key: a move takes 500 of them (one transaction holds
    no more), recorded as spent by it; once it is sent, the coins left ask another move
    (as the indexer does), which takes them; then none is left to move."""
    old, new = b"\x02" + SigningKey(b"\x41" * 32).pubkey, b"\x03" + SigningKey(b"\x42" * 32).pubkey
    first, _ = await _following(store)
    await first.close()
    signer = hostpubkey_gen(b"\x32" * 32)  # a member's, whose NATS server is down
    down = SignerAccess("nats://127.0.0.1:1", Membership("g", [signer]), signer, b"\x33" * 32)
    follower = Onchain(replace(first.s, signer=down), store, _no_rules, _no_signing, MintMetrics())
    follower.guild_key, follower.usable, follower.estimated = new, [new, old], 1
    await store.pool.executemany(
        "INSERT INTO chain_coins (txid, vout, amount_sat, script, derivation, key, height,"
        " held) VALUES ($1, 0, $2, $3, $4, $5, 1, true)",
        [(f"{i:064x}", 20_000 + i, SCRIPT, b"\x05" * 32, old) for i in range(700)],
    )
    sizes: list[int] = []
    try:
        while True:
            async with store.pool.acquire() as conn:
                moves = await moved(conn, new)
                if moves.confirmed_elsewhere == 0 or moves.open:
                    break
                await ask_move(conn, new)
                move = await conn.fetchval("SELECT id FROM chain_moves WHERE state = 'ASKED'")
            with pytest.raises(NoServersError):  # recorded, then not signed: its NATS down
                await asyncio.wait_for(follower._move_on(move), 20)
            r = await store.pool.fetchrow("SELECT * FROM chain_moves WHERE id = $1", move)
            spent = json.loads(r["spent"])
            signed = oc.signed(parse_tx(bytes(r["tx"])), [bytes(64)] * len(spent))
            assert r["state"] == "SIGNING" and r["fee_sat"] == signed.vsize  # at 1 sat/vB
            assert await store.pool.fetchval(
                "SELECT count(*) FROM chain_coins WHERE spent_by = $1", "move:" + new.hex()
            ) == sum(sizes) + len(spent)
            sizes.append(len(spent))
            await store.pool.execute("UPDATE chain_moves SET state = 'SENT' WHERE id = $1", move)
        assert sizes == [500, 200]
        assert (
            await store.pool.fetchval(
                "SELECT count(*) FROM chain_coins WHERE key = $1 AND spent_by IS NULL", old
            )
            == 0
        )
        async with store.pool.acquire() as conn:
            moves = await moved(conn, new)
        assert moves.confirmed_elsewhere == 0 and moves.unconfirmed == 2 and len(moves.txids) == 2
    finally:
        await follower.close()


async def _totals(store: MintStore) -> dict[str, int]:
    rows = await store.pool.fetch("SELECT kind, sum(amount) AS a FROM mint_totals GROUP BY kind")
    return {r["kind"]: int(r["a"]) for r in rows}
