"""The mint's on-chain books (``services.ecash.onchain``) against a real PostgreSQL: a
deposit credited, reorganised out and mined again is credited to its quote once; a melt
whose withdrawal is recorded is never refunded. The chain is a scripted bitcoind (the
three calls the follower makes), since no bitcoind runs here and the simulated one never
reorganises."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from constellation.ecash.mint import ONCHAIN, Mint
from constellation.protocol.cashu import BlindedMessage, BlindSignature
from constellation.protocol.envelope import Membership
from services import devnet
from services.devnet import Devnet
from services.ecash.metrics import MintMetrics
from services.ecash.onchain import ChainSettings, Onchain
from services.ecash.store import MintStore
from services.signer.config import SignerAccess

CONFIRMATIONS = 3
SCRIPT = bytes.fromhex("5120" + "ab" * 32)  # the quote's P2TR address
DEPOSIT = {
    "txid": "dd" * 32,
    "vout": [{"n": 0, "value": Decimal("0.001"), "scriptPubKey": {"hex": SCRIPT.hex()}}],
}


class Chain:
    """bitcoind's getblockcount, getblockhash and getblock (verbosity 2) over a list of
    blocks (hash, transactions) that a test replaces to reorganise it."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, list[dict[str, Any]]]] = [("h0", [])]

    async def call(self, method: str, *params: Any) -> Any:
        if method == "getblockcount":
            return len(self.blocks) - 1
        if method == "getblockhash":
            return self.blocks[params[0]][0]
        if method == "getblock":
            [txs] = [t for h, t in self.blocks if h == params[0]]
            return {"hash": params[0], "tx": txs}
        raise AssertionError(f"the follower does not call {method}")


@pytest.fixture
async def store() -> AsyncIterator[MintStore]:
    with tempfile.TemporaryDirectory(prefix="chain-follow-", dir="/tmp") as tmp:
        os.chmod(tmp, 0o755)  # PostgreSQL runs as its own user where we are root
        server = Devnet(str(Path(tmp) / "pg"), "chain", 0, os.urandom(32).hex())
        Path(server.dir).mkdir()
        server.pg_port = devnet.free_port()
        await asyncio.to_thread(devnet.start_postgres, server)
        try:
            s = await MintStore.open(server.database_url)
            await Onchain.create_schema(s.pool)
            yield s
            await s.close()
        finally:
            devnet.stop_pid(server.pg_pid, 10, signal.SIGINT)


async def test_a_deposit_reorganised_out_and_mined_again_is_credited_once(
    store: MintStore,
) -> None:
    # the follower signs nothing
    no_signer = SignerAccess("nats://unused", Membership("chain-follow", []), bytes(33), b"")
    settings = ChainSettings("http://unused", no_signer, CONFIRMATIONS, 2, 1, "bcrt")
    follower = Onchain(settings, store, _no_rules, _no_signing, MintMetrics())
    chain = Chain()
    follower.rpc = chain  # type: ignore[assignment]
    await store.pool.execute(
        "INSERT INTO chain_quotes (quote, address, script, derivation, guild_key, pubkey,"
        " expiry) VALUES ('q', 'bcrt1p', $1, '\\x00', '\\x02', '02', 0)",
        SCRIPT,
    )

    async def books() -> tuple[int, int]:
        paid = await store.pool.fetchval("SELECT amount_paid FROM chain_quotes")
        held = await store.pool.fetchval(
            "SELECT coalesce(sum(amount), 0) FROM mint_totals WHERE kind = 'chain_sat'"
        )
        return paid, held

    try:
        await follower.follow()  # a new mint follows from the tip
        chain.blocks += [("h1", [DEPOSIT]), ("h2", []), ("h3", [])]
        await follower.follow()
        assert await books() == (100_000, 100_000)  # three confirmations: credited
        # the last three blocks reorganised away; the deposit is in the new branch's first
        chain.blocks = [("h0", []), ("h1b", [DEPOSIT]), ("h2b", []), ("h3b", [])]
        await follower.follow()  # the reorg seen: the coin is gone from the funds
        assert await books() == (100_000, 0)
        for _ in range(2):
            await follower.follow()
        assert await books() == (100_000, 100_000)  # held again, credited once
        chain.blocks.append(("h4b", []))
        await follower.follow()
        assert await books() == (100_000, 100_000)
    finally:
        await follower.close()


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
