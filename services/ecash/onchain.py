"""The mint's on-chain side (NUT-30): deposits to addresses of the guild's key, credited
after confirmations, and withdrawals the guild signs with ROAST.

* A mint quote (``onchain``) gets an address of its own: the guild key moved by a
  derivation of this operator's, labelled after the quote
  (``constellation.guild.owned_derivation``): the guild signs a spend of it only at this
  operator's request, as of every address the mint holds (change, moves). The chain
  follower reads every block through bitcoind's JSON-RPC; an output to a quote's address
  is recorded as a coin of the guild's that this mint holds, and credited to the quote
  (``amount_paid``) once it has ``confirmations`` (a coinbase's once it can be spent:
  ``COINBASE_MATURITY``). The quote's key (NUT-20) then mints up to what was credited
  and not yet issued, as often as the wallet likes.
* A melt quote (``onchain``) names an address and an amount, with a fee reserve for a
  transaction of up to ``MAX_INPUTS`` inputs. The melt reserves the proofs, then in one
  database transaction picks the coins, builds the transaction (change to a fresh guild
  address) and records it: from that moment the withdrawal is never refunded. Each
  input is signed by the guild (the operator's signer coordinates ROAST; every signer
  derives the BIP341 sighash itself), the signed transaction is recorded, then sent. As
  NUT-30 asks, the melt is answered PENDING once its withdrawal is recorded (it is
  signed and sent in the background), shows its ``outpoint`` once sent, and is PAID
  (the outpoint in ``payment_preimage`` too, the unused fee reserve returned as NUT-08
  change) once a block ``confirmations`` deep holds it. A withdrawal not signed or not
  sent (signers unreachable, chain down, a crash) is taken up again by the resolver with
  the very same transaction, until it is sent. A melt that reserved its proofs and
  recorded nothing (its process died in between) has them freed by the resolver.
* Books: the tables' triggers keep the running sums, as the mint's other tables do: the
  guild coins the mint holds are its on-chain funds (``chain_sat``); what deposits were
  credited and is not issued yet is owed ecash (``unissued``), as paid Lightning quotes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
from nats.errors import Error as NatsError

from constellation.address import encode_segwit
from constellation.bitcoin import BitcoinTx, address_script, p2tr_script, parse_tx
from constellation.ecash import mint as m
from constellation.ecash import onchain as oc
from constellation.errors import ConstellationError
from constellation.guild import derive, guild_output, owned_derivation
from constellation.hashing import tagged_hasher
from constellation.keys import schnorr_verify
from constellation.membership import move_funds, move_label
from constellation.protocol import cashu as nut
from constellation.protocol import signer as sp
from services.database import DATABASE_DOWN
from services.ecash.metrics import MintMetrics
from services.ecash.store import SCHEMA_LOCK, MintStore, Sign
from services.signer.client import SignerClient, call
from services.signer.config import SignerAccess

log = logging.getLogger("mint.onchain")

FOLLOW_LOCK = 7415  # the advisory lock of the process that reads the chain
MAX_INPUTS = 4  # a withdrawal's fee reserve covers a transaction of this many inputs
SIGN_S = 30.0
# connections to the operator's signer tried before a request is given up (said, and the
# resolver asks again): the mint's quotes and resolver never wait for ever on a NATS down
SIGNER_ATTEMPTS = 3
RPC_S = 10.0
RESEND_S = 60.0  # a transaction sent and in no block is sent again this often
ABANDONED_S = 60.0  # a melt PENDING this long with no withdrawal recorded: its process died
MOVE_MAX_FEE_SAT = 50_000  # a move to a new key costing more waits (for a lower feerate)
# A withdrawal in no block is bumped once it pays less than the market's feerate over
# BUMP_BELOW (a market that moves a little does not make a child each time) and
# BUMP_AFTER_BLOCKS blocks went by without it since it (or its last child) was built;
# its children cost the mint at most BUMP_MAX_FEE_SAT in all.
BUMP_BELOW = 1.25
BUMP_AFTER_BLOCKS = 2
BUMP_MAX_FEE_SAT = 50_000
_READ_HEIGHT = "(SELECT coalesce(max(height), 0) FROM chain_blocks)"  # the follower's last
# Bitcoin spends a coinbase's outputs from its block's 100th confirmation on, and a
# reorganisation takes its reward away for good: a deposit from one (a miner paid by its
# pool in the coinbase) backs ecash only from then, whatever ``confirmations`` says
COINBASE_MATURITY = 100
_label = tagged_hasher("Constellation/deposit-label")
_CHANGE = p2tr_script(bytes(32))  # a change output's script, for its size

SCHEMA = """
CREATE TABLE IF NOT EXISTS chain_quotes (  -- NUT-30 mint quotes: an address each
    quote text PRIMARY KEY,
    address text NOT NULL UNIQUE,
    script bytea NOT NULL UNIQUE,
    derivation bytea NOT NULL,  -- its address's label (guild.owned_derivation's, ours)
    guild_key bytea NOT NULL,  -- the guild key its address is under (33 bytes)
    pubkey text NOT NULL,
    amount_paid bigint NOT NULL DEFAULT 0,
    amount_issued bigint NOT NULL DEFAULT 0 CHECK (amount_issued <= amount_paid),
    expiry bigint NOT NULL
);
-- NUT-30's min_amount when the quote was made: an output to it of less is not credited
-- (0: every one, as for quotes made before the mint had a minimum, or by a process of
-- before, still running: once expired, the mint's minimum now holds for those)
ALTER TABLE chain_quotes ADD COLUMN IF NOT EXISTS min_sat bigint NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS chain_coins (  -- the guild's outputs this mint holds
    txid text NOT NULL,
    vout int NOT NULL,
    amount_sat bigint NOT NULL,
    script bytea NOT NULL,
    derivation bytea NOT NULL,  -- its address's label (guild.owned_derivation's, ours)
    key bytea NOT NULL,  -- the guild key it is under: the one that signs for it
    height int,  -- NULL: not in a block yet
    quote text,  -- the deposit's mint quote (NULL: a withdrawal's change)
    held bool NOT NULL,  -- counted in the mint's funds: a credited deposit, or change
    spent_by text,  -- the withdrawal (melt quote), move ('move:' key) or bump ('bump:' quote)
    PRIMARY KEY (txid, vout)
);
CREATE TABLE IF NOT EXISTS chain_withdrawals (
    quote text PRIMARY KEY,  -- the melt quote
    attempt int NOT NULL,
    tx bytea NOT NULL,  -- unsigned, then signed
    txid text NOT NULL,
    fee_sat bigint NOT NULL,
    spent jsonb NOT NULL,  -- the coins it spends: txid, vout, amount_sat, script, derivation
    -- SENT: taken by the node (its melt PAID once a block deep enough holds it)
    state text NOT NULL CHECK (state IN ('SIGNING', 'SIGNED', 'SENT'))
);
-- the height of the block that holds it (NULL: in none yet: sent again until one does;
-- 0: sent before the mint kept it)
ALTER TABLE chain_withdrawals ADD COLUMN IF NOT EXISTS mined int DEFAULT 0;
ALTER TABLE chain_withdrawals ALTER COLUMN mined DROP DEFAULT;
-- the chain's height the follower had read when it was built (BUMP_AFTER_BLOCKS)
ALTER TABLE chain_withdrawals ADD COLUMN IF NOT EXISTS built_at int NOT NULL DEFAULT 0;
-- (before SENT was, a sent withdrawal stayed SIGNED, its melt PAID at once)
ALTER TABLE chain_withdrawals DROP CONSTRAINT IF EXISTS chain_withdrawals_state_check;
UPDATE chain_withdrawals w SET state = 'SENT' FROM melt_quotes q
    WHERE q.quote = w.quote AND q.state = 'PAID' AND w.state = 'SIGNED';
-- (mined 0, "sent before the mint kept it", was given to every withdrawal then, sent or
-- not: one whose melt is not PAID is in no block the mint knows of)
UPDATE chain_withdrawals w SET mined = NULL FROM melt_quotes q
    WHERE q.quote = w.quote AND q.state = 'PENDING' AND w.mined = 0;
ALTER TABLE chain_withdrawals ADD CONSTRAINT chain_withdrawals_state_check
    CHECK (state IN ('SIGNING', 'SIGNED', 'SENT'));
-- a coinbase's output: credited at COINBASE_MATURITY confirmations, not before
ALTER TABLE chain_coins ADD COLUMN IF NOT EXISTS coinbase bool NOT NULL DEFAULT false;
CREATE TABLE IF NOT EXISTS chain_moves (  -- coins moved to a new guild key
    id bigserial PRIMARY KEY,
    key bytea NOT NULL,  -- the new key, made by the members after a change of members
    asked_at bigint NOT NULL,
    tx bytea,  -- unsigned, then signed (NULL: not built yet)
    txid text,
    fee_sat bigint,  -- the guild's: booked as chain_fees_sat
    spent jsonb,  -- the coins it spends: txid, vout, amount_sat, script, derivation, key
    state text NOT NULL CHECK (state IN ('ASKED', 'SIGNING', 'SIGNED', 'SENT', 'NONE'))
);
CREATE TABLE IF NOT EXISTS chain_bumps (  -- children that take a stuck withdrawal (CPFP)
    id bigserial PRIMARY KEY,
    quote text NOT NULL,  -- the withdrawal's melt quote
    tx bytea NOT NULL,  -- unsigned, then signed
    txid text NOT NULL,
    fee_sat bigint NOT NULL,  -- the mint's: booked as chain_fees_sat
    spent jsonb NOT NULL,  -- the coin it spends: the withdrawal's change, or the bump before's
    state text NOT NULL CHECK (state IN ('SIGNING', 'SIGNED', 'SENT')),
    built_at int NOT NULL,  -- the chain's height the follower had read (BUMP_AFTER_BLOCKS)
    created_at timestamptz NOT NULL DEFAULT now()  -- for the day's budget
);
CREATE INDEX IF NOT EXISTS chain_bumps_quote ON chain_bumps (quote);
CREATE TABLE IF NOT EXISTS chain_blocks (  -- what the follower read, to find a reorg
    height int PRIMARY KEY,
    hash text NOT NULL
);
CREATE TABLE IF NOT EXISTS chain_credited (  -- deposits credited to their quote: once each
    txid text NOT NULL,
    vout int NOT NULL,
    PRIMARY KEY (txid, vout)
);
-- (those credited before this table was: a reorg must not credit them again either)
INSERT INTO chain_credited SELECT txid, vout FROM chain_coins WHERE held AND quote IS NOT NULL
    ON CONFLICT DO NOTHING;
-- the books' running sums (``store.py``'s mint_count), kept by the tables' triggers
CREATE OR REPLACE FUNCTION mint_count_chain_coins() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'DELETE' THEN
        PERFORM mint_count('chain_sat', '', coalesce(sum(amount_sat), 0)) FROM new_rows
            WHERE held AND spent_by IS NULL;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        PERFORM mint_count('chain_sat', '', -coalesce(sum(amount_sat), 0)) FROM old_rows
            WHERE held AND spent_by IS NULL;
    END IF;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION mint_count_chain_quotes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM mint_count('unissued', '', coalesce(sum(amount_paid - amount_issued), 0))
        FROM new_rows;
    PERFORM mint_count('unissued', '', -coalesce(sum(amount_paid - amount_issued), 0))
        FROM old_rows;
    RETURN NULL;
END $$;
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'chain_quotes_up') THEN
        CREATE TRIGGER chain_coins_in AFTER INSERT ON chain_coins
            REFERENCING NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION mint_count_chain_coins();
        CREATE TRIGGER chain_coins_up AFTER UPDATE ON chain_coins
            REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
            FOR EACH STATEMENT EXECUTE FUNCTION mint_count_chain_coins();
        CREATE TRIGGER chain_coins_out AFTER DELETE ON chain_coins
            REFERENCING OLD TABLE AS old_rows
            FOR EACH STATEMENT EXECUTE FUNCTION mint_count_chain_coins();
        CREATE TRIGGER chain_quotes_up AFTER UPDATE ON chain_quotes
            REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
            FOR EACH STATEMENT EXECUTE FUNCTION mint_count_chain_quotes();
    END IF;
END $$;
"""


class Uncovered(m.CashuError):
    """A withdrawal the mint's on-chain funds do not cover: refused before anything was
    recorded, its proofs free again."""


class BitcoindError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# bitcoind's error codes that the mint reads
RPC_INVALID_ADDRESS_OR_KEY = -5  # no such transaction (in the mempool, or the block named)
RPC_VERIFY_ERROR = -25  # sendrawtransaction: its inputs missing or spent
RPC_VERIFY_ALREADY_IN_CHAIN = -27  # sendrawtransaction: in a block, an output unspent

CHAIN_DOWN = (BitcoindError, aiohttp.ClientError, OSError, TimeoutError)
# what may go wrong with a withdrawal after it was recorded: said, and taken up again (the
# database gone mid-statement too: asyncpg's InterfaceError and InternalClientError are
# no OSError, and ended the task with an error)
NOT_SENT = (*CHAIN_DOWN, *DATABASE_DOWN, m.CashuError, NatsError, asyncpg.PostgresError)


class Bitcoind:
    """bitcoind's JSON-RPC (user and password in the URL where it asks for them)."""

    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self.session = session
        self._id = 0

    async def call(self, method: str, *params: Any) -> Any:
        self._id += 1
        body = {"jsonrpc": "1.0", "id": self._id, "method": method, "params": list(params)}
        async with self.session.post(self.url, json=body) as r:
            raw = await r.read()
        try:
            doc = json.loads(raw, parse_float=Decimal)
            error = doc.get("error")
            if error:
                raise BitcoindError(int(error.get("code", -1)), str(error.get("message")))
            return doc["result"]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise BitcoindError(-1, f"not a JSON-RPC answer: {raw[:200]!r}") from None


@dataclass(frozen=True)
class ChainSettings:
    bitcoind_url: str
    signer: SignerAccess  # the operator's own signer
    confirmations: int
    min_feerate: int  # sat/vB: the least, and what is used where bitcoind has no estimate
    max_feerate: int  # sat/vB: the most, whatever bitcoind estimates
    fee_target: int  # blocks: transactions are built to confirm within this many
    poll_s: float
    hrp: str
    bump_budget_sat: int = 1_000_000  # what bumps may cost the mint in a day, all together
    # NUT-30's min_amount: a deposit (one output) of less is not credited; spending one
    # costs the mint INPUT_WU of fee, so a flood of small ones would cost it more than
    # they bring (10,000 sat pays for its spend up to about 170 sat/vB)
    min_deposit_sat: int = 10_000


def _coins_json(coins: list[oc.Coin]) -> str:
    return json.dumps(
        [[c.txid, c.vout, c.amount_sat, c.script.hex(), c.label.hex(), c.key.hex()] for c in coins]
    )


async def _record_own(
    conn: asyncpg.Connection, w: oc.Withdrawal, by: str, label: bytes, key: bytes
) -> None:
    """A transaction of the mint's to itself (a move, a bump) recorded with the coins it
    spends (``by`` it): its one output held (our address ``label`` under ``key``), its
    fee booked as the mint's own."""
    await conn.execute(
        "UPDATE chain_coins SET spent_by = $3 WHERE (txid, vout) IN"
        " (SELECT * FROM unnest($1::text[], $2::int[]))",
        [c.txid for c in w.spent],
        [c.vout for c in w.spent],
        by,
    )
    [out] = w.tx.outputs
    await conn.execute(
        "INSERT INTO chain_coins (txid, vout, amount_sat, script, derivation, key, held)"
        " VALUES ($1, 0, $2, $3, $4, $5, true)",
        w.tx.txid,
        out.amount_sat,
        out.script_pubkey,
        label,
        key,
    )
    await conn.execute("SELECT mint_count('chain_fees_sat', '', $1)", w.fee_sat)


def _coin(r: asyncpg.Record) -> oc.Coin:
    """A coin from its ``chain_coins`` row."""
    return oc.Coin(
        r["txid"],
        r["vout"],
        r["amount_sat"],
        bytes(r["script"]),
        bytes(r["derivation"]),
        bytes(r["key"]),
    )


def _coins_of(spent: list[list[Any]]) -> list[oc.Coin]:
    return [
        oc.Coin(t, v, a, bytes.fromhex(s), bytes.fromhex(d), bytes.fromhex(k))
        for t, v, a, s, d, k in spent
    ]


async def ask_move(conn: asyncpg.Connection, key: bytes) -> None:
    """Ask the mint to move the coins it holds under another key to ``key`` (a new
    guild key, made after a change of members), unless a move to it is under way: as
    many as one transaction takes; asked again while coins are left (``moved``)."""
    await conn.execute(
        "INSERT INTO chain_moves (key, asked_at, state) SELECT $1, $2, 'ASKED' WHERE NOT EXISTS"
        " (SELECT 1 FROM chain_moves WHERE key = $1 AND state IN ('ASKED', 'SIGNING', 'SIGNED'))",
        key,
        int(time.time()),
    )


@dataclass(frozen=True)
class Moved:
    """Where the moves to a key are."""

    txids: list[str]  # every move sent or under way
    open: int  # moves asked for and not sent yet
    unconfirmed: int  # moves sent and in no block yet
    confirmed_elsewhere: int  # coins held under another key, confirmed: to move
    pending_elsewhere: int  # ...and not confirmed yet (a deposit, a withdrawal's change)
    signing: int  # withdrawals and bumps not signed yet (they may spend coins under another key)
    # deposits still to come under another key: quotes not expired (their address may be
    # paid), deposits in a block and not credited yet (held once credited)
    deposits_elsewhere: int = 0

    @property
    def done(self) -> bool:
        """Every coin is under the key, in a block, and none is still to come under
        another: the keys before it may be retired."""
        counts = (self.open, self.unconfirmed, self.confirmed_elsewhere, self.pending_elsewhere)
        return not any(counts) and not self.signing and not self.deposits_elsewhere


async def moved(conn: asyncpg.Connection, key: bytes) -> Moved:
    moves = await conn.fetch(
        "SELECT m.state, m.txid, c.height FROM chain_moves m"
        " LEFT JOIN chain_coins c ON c.txid = m.txid AND c.vout = 0 WHERE m.key = $1",
        key,
    )
    left = await conn.fetch(
        "SELECT height IS NOT NULL AS confirmed FROM chain_coins"
        " WHERE held AND spent_by IS NULL AND key <> $1",
        key,
    )
    signing = await conn.fetchval(
        "SELECT (SELECT count(*) FROM chain_withdrawals WHERE state = 'SIGNING')"
        " + (SELECT count(*) FROM chain_bumps WHERE state = 'SIGNING')"
    )
    to_come = await conn.fetchval(
        "SELECT (SELECT count(*) FROM chain_quotes WHERE guild_key <> $1"
        "  AND expiry > extract(epoch FROM now()))"
        " + (SELECT count(*) FROM chain_coins WHERE key <> $1 AND quote IS NOT NULL"
        "  AND NOT held AND height IS NOT NULL)",
        key,
    )
    return Moved(
        [r["txid"] for r in moves if r["txid"]],
        sum(r["state"] in ("ASKED", "SIGNING", "SIGNED") for r in moves),
        sum(r["state"] == "SENT" and r["height"] is None for r in moves),
        sum(r["confirmed"] for r in left),
        sum(not r["confirmed"] for r in left),
        signing,
        to_come,
    )


def _coinbase(tx: Any) -> bool:
    """Whether a block's transaction is its coinbase: its input spends no output, and
    bitcoind shows its script (``coinbase``) instead of one. (The simulated chain shows
    a spend from a node's wallet with no input.)"""
    vin = tx["vin"]
    return bool(vin) and "coinbase" in vin[0]


def sat(value: Decimal) -> int:
    amount = int(value * 100_000_000)
    if not 0 <= amount <= 21_000_000 * 100_000_000:
        raise ValueError(f"an amount of {value} BTC")
    return amount


class Onchain:
    def __init__(
        self,
        settings: ChainSettings,
        store: MintStore,
        rules: Callable[[], m.Mint],
        sign: Sign,
        metrics: MintMetrics,
    ) -> None:
        self.s = settings
        self.metrics = metrics
        self.store = store
        self.rules = rules
        self.sign = sign
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=RPC_S))
        self.rpc = Bitcoind(settings.bitcoind_url, self.session)
        self.guild_key = b""  # the newest key (33 bytes), asked of the signer
        self.usable: list[bytes] = []  # every key the signers sign with (a move's, too)
        self.unusable: set[tuple[str, int]] = set()  # deposits to a retired key: said once
        self.below_min: set[tuple[str, int]] = set()  # deposits under a minimum: said once
        self.sent_at: dict[str, float] = {}  # transactions sent again (``send_again``)
        self.refused: set[str] = set()  # ...and refused by the node: said once
        self.me = settings.signer.signer[1:]  # the addresses we hold: its member's
        self.working: set[str] = set()  # withdrawals this process is signing or sending
        self.sending: set[asyncio.Task[None]] = set()  # ...that a melt left to the background
        self.estimated: int | None = None  # sat/vB (``estimate``)
        self.unbumpable: set[str] = set()  # withdrawals in no block that no child helps: said

    @staticmethod
    async def create_schema(pool: asyncpg.Pool) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
            await conn.execute(SCHEMA)

    async def close(self) -> None:
        for task in self.sending:  # the resolver takes them up again
            task.cancel()
        await asyncio.gather(*self.sending, return_exceptions=True)
        await self.session.close()

    def _signer(self) -> SignerClient:
        return SignerClient(self.s.signer, SIGNER_ATTEMPTS)

    async def key(self) -> bytes:
        """The guild's newest key: new addresses are under it (asked of the signer once,
        then again each time the resolver looks: a change of members makes another)."""
        if not self.guild_key:
            await self._ask_keys()
        return self.guild_key

    async def _ask_keys(self) -> None:
        try:
            reply = await call(self.s.signer, sp.KeyRequest(), SIGN_S, SIGNER_ATTEMPTS)
        except (NatsError, OSError, TimeoutError) as exc:
            raise m.CashuError(
                m.PAYMENT_FAILED, f"the operator's signer did not answer: {exc!r}"
            ) from None
        if not reply.ok:
            raise m.CashuError(m.PAYMENT_FAILED, f"the guild has no key yet: {reply.error}")
        newest = reply.keys[-1].key
        if self.guild_key and newest != self.guild_key:
            log.info("the guild key changed", extra={"key": newest.hex()})
        self.guild_key, self.usable = newest, [k.key for k in reply.keys]

    def address(self, label: bytes, key: bytes) -> tuple[str, bytes]:
        """Our address ``label`` under the guild key ``key`` (the guild signs for it at
        our request only). The caller reads the key once (``key``) and records that same
        key with the address: the resolver may swap in a newer key at any await, and an
        address recorded under a key it is not under is never signed for."""
        derivation = owned_derivation(self.me, label)
        xonly = guild_output(key, derivation).xonly
        return encode_segwit(self.s.hrp, 1, xonly), p2tr_script(xonly)

    # -- deposits ------------------------------------------------------------------------

    async def mint_quote(self, req: nut.MintQuoteOnchainRequest, expiry_s: int) -> dict[str, Any]:
        m.check_quote_key(req.pubkey)
        key = await self.key()
        quote = str(uuid.uuid4())
        label = _label(quote.encode())
        address, script = self.address(label, key)
        expiry = int(time.time()) + expiry_s
        tip = int(await self.rpc.call("getblockcount"))
        tip_hash = await self.rpc.call("getblockhash", tip)
        async with self.store.pool.acquire() as conn:
            # the follower reads on from here at least: a deposit to this address can be
            # in no block before it, and none after it is missed
            await conn.execute(
                "INSERT INTO chain_blocks SELECT $1, $2"
                " WHERE NOT EXISTS (SELECT 1 FROM chain_blocks)",
                tip,
                tip_hash,
            )
            await conn.execute(
                "INSERT INTO chain_quotes (quote, address, script, derivation, guild_key, pubkey,"
                " expiry, min_sat) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                quote,
                address,
                script,
                label,
                key,
                req.pubkey,
                expiry,
                self.s.min_deposit_sat,
            )
        return await self.mint_quote_state(quote)

    async def mint_quote_state(self, quote: str) -> dict[str, Any]:
        async with self.store.pool.acquire() as conn:
            r = await conn.fetchrow("SELECT * FROM chain_quotes WHERE quote = $1", quote)
        if r is None:
            raise m.CashuError(m.QUOTE_UNPAID, "no such quote")
        return _mint_doc(r)

    async def mint(self, req: nut.MintRequest) -> list[nut.BlindSignature]:
        """Sign outputs for up to what the quote was credited and has not issued."""
        async with self.store.pool.acquire() as conn, conn.transaction():
            r = await conn.fetchrow(
                "SELECT * FROM chain_quotes WHERE quote = $1 FOR UPDATE", req.quote
            )
            if r is None:
                raise m.CashuError(m.QUOTE_UNPAID, f"no quote {req.quote[:64]!r}")
            if not m.check_mint_signature(r["pubkey"], req):
                raise m.CashuError(m.SIGNATURE_INVALID, "the mint request's signature is not valid")
            out = self.rules().outputs(req.outputs)
            left = r["amount_paid"] - r["amount_issued"]
            if left == 0:
                code = m.QUOTE_ISSUED if r["amount_paid"] else m.QUOTE_UNPAID
                raise m.CashuError(code, "nothing credited to this quote is left to issue")
            if out.amount > left:
                raise m.CashuError(m.UNBALANCED, f"outputs {out.amount} > {left} left to issue")
            signatures = await self.sign(req.outputs)
            await self.store.record_signatures(conn, req.outputs, signatures)
            await conn.execute(
                "UPDATE chain_quotes SET amount_issued = amount_issued + $2 WHERE quote = $1",
                req.quote,
                out.amount,
            )
        return signatures

    # -- following the chain ---------------------------------------------------------------

    async def follow_forever(self) -> None:
        while True:
            try:  # a chain that gives no estimate is still read
                await self.estimate()
            except CHAIN_DOWN as exc:
                log.warning("no fee estimate", extra={"error": repr(exc)})
            try:
                await self.follow()
            except CHAIN_DOWN as exc:
                log.warning("chain not read", extra={"error": repr(exc)})
            except DATABASE_DOWN as exc:
                log.warning("chain not read: the database is down", extra={"error": repr(exc)})
            await asyncio.sleep(self.s.poll_s)

    async def follow(self) -> None:
        """Read the blocks since the last one read, record outputs to the quotes'
        addresses and the withdrawals' confirmations, and credit what has enough: by one
        of the mint's processes at a time (the holder of an advisory lock), so that the
        blocks recorded are one chain."""
        tip = int(await self.rpc.call("getblockcount"))
        async with self.store.pool.acquire() as conn:
            if not await conn.fetchval(f"SELECT pg_try_advisory_lock({FOLLOW_LOCK})"):
                return  # another process of the mint reads the chain now
            try:
                credited = await self._follow(conn, tip)
            finally:  # the pool's connections go back as they are (``_keep_session``)
                await conn.execute(f"SELECT pg_advisory_unlock({FOLLOW_LOCK})")
        self.metrics.chain_height.set(tip)
        for quote, amount in credited:
            log.info("deposit credited", extra={"quote": quote, "sat": amount})
        await self._confirmed()

    async def _confirmed(self) -> None:
        """Melts whose withdrawal a block read ``confirmations`` deep holds: PAID, with
        their NUT-08 change (once: ``finish_melt`` settles only a PENDING melt's
        attempt)."""
        async with self.store.pool.acquire() as conn:
            deep = await conn.fetch(
                "SELECT w.quote, w.attempt, w.txid, w.fee_sat, q.amount FROM chain_withdrawals w"
                " JOIN melt_quotes q USING (quote) WHERE q.state = 'PENDING'"
                f" AND w.mined > 0 AND w.mined <= {_READ_HEIGHT} - $1 + 1",
                self.s.confirmations,
            )
        for r in deep:  # one melt's trouble (its change's signing) holds up no other
            sent_msat = (r["amount"] + r["fee_sat"]) * 1000
            outpoint = f"{r['txid']}:0"
            try:
                if await self.store.finish_melt(
                    r["quote"], r["attempt"], outpoint, sent_msat, self.sign
                ):
                    log.info(
                        "withdrawal confirmed", extra={"quote": r["quote"], "outpoint": outpoint}
                    )
            except NOT_SENT as exc:  # the next pass tries again
                log.warning(
                    "a confirmed withdrawal's melt not settled yet",
                    extra={"quote": r["quote"], "error": repr(exc)},
                )
            except Exception:  # a bug: said with its traceback; the others still settle
                log.exception("a confirmed withdrawal's melt not settled", extra=dict(r))

    async def _follow(self, conn: asyncpg.Connection, tip: int) -> list[tuple[str, int]]:
        """The blocks up to ``tip``, each the child of the one recorded before it, and
        the deposits credited then."""
        last = await conn.fetchrow("SELECT * FROM chain_blocks ORDER BY height DESC LIMIT 1")
        start = tip if last is None else last["height"] + 1  # a new mint: from now
        if last is not None and await self.rpc.call("getblockhash", last["height"]) != last["hash"]:
            await self._reorg(conn, last["height"])
            return []
        below = None if last is None else str(last["hash"])
        for height in range(start, tip + 1):
            block = await self.rpc.call("getblock", await self.rpc.call("getblockhash", height), 2)
            try:  # the chain's answer is read as untrusted input
                outputs = [
                    (
                        t["txid"],
                        o["n"],
                        sat(o["value"]),
                        bytes.fromhex(o["scriptPubKey"]["hex"]),
                        _coinbase(t),
                    )
                    for t in block["tx"]
                    for o in t["vout"]
                ]
                txids, block_hash = [str(t["txid"]) for t in block["tx"]], str(block["hash"])
                parent = block.get("previousblockhash")
            except (AttributeError, LookupError, TypeError, ValueError, ArithmeticError) as exc:
                raise BitcoindError(-1, f"block {height} malformed: {exc!r}") from None
            if below is not None and parent != below:
                # the chain reorganised while it was read: nothing is credited on what
                # was read, and the next pass finds the fork from the block read last
                log.info("the chain moved while it was read", extra={"height": height})
                return []
            async with conn.transaction():
                await self._block(conn, height, block_hash, txids, outputs)
            below = block_hash
        return await self._credit(conn, tip)

    async def _block(
        self,
        conn: asyncpg.Connection,
        height: int,
        block_hash: str,
        txids: list[str],
        outputs: list[tuple[str, int, int, bytes, bool]],
    ) -> None:
        # an expired quote's minimum is the mint's now, if higher: one made with none (by
        # a mint of before) does not take small deposits for ever. (NUT-30 credits
        # nothing first seen after expiry; a mint that reads blocks, not the mempool,
        # cannot tell a late payment from a slow one, and credits both.)
        watched = await conn.fetch(
            "SELECT quote, script, derivation, guild_key, CASE WHEN expiry < $2"
            " THEN greatest(min_sat, $3) ELSE min_sat END AS min_sat FROM chain_quotes"
            " WHERE script = ANY($1::bytea[])",
            list({o[3] for o in outputs}),
            int(time.time()),
            self.s.min_deposit_sat,
        )
        by_script = {bytes(w["script"]): w for w in watched}
        for txid, vout, amount, script, coinbase in outputs:
            w = by_script.get(script)
            if w is not None and amount < w["min_sat"]:
                self._below_min(txid, vout, amount, w)
            elif w is not None:
                await conn.execute(
                    "INSERT INTO chain_coins (txid, vout, amount_sat, script, derivation, key,"
                    " height, quote, held, coinbase)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, false, $9)"
                    " ON CONFLICT (txid, vout) DO UPDATE SET height = $7",
                    txid,
                    vout,
                    amount,
                    script,
                    w["derivation"],
                    w["guild_key"],
                    height,
                    w["quote"],
                    coinbase,
                )
                if coinbase:
                    log.info(
                        "a deposit from a coinbase: credited once it can be spent",
                        extra={
                            "txid": txid,
                            "vout": vout,
                            "quote": w["quote"],
                            "sat": amount,
                            "height": height,
                            "confirmations": max(self.s.confirmations, COINBASE_MATURITY),
                        },
                    )
        await conn.execute(
            "UPDATE chain_coins SET height = $2 WHERE txid = ANY($1::text[]) AND height IS NULL",
            txids,
            height,
        )
        await conn.execute(
            "UPDATE chain_withdrawals SET mined = $2"
            " WHERE txid = ANY($1::text[]) AND mined IS NULL",
            txids,
            height,
        )
        await conn.execute(
            "INSERT INTO chain_blocks (height, hash) VALUES ($1, $2)"
            " ON CONFLICT (height) DO UPDATE SET hash = $2",
            height,
            block_hash,
        )

    def _below_min(self, txid: str, vout: int, amount: int, quote: asyncpg.Record) -> None:
        """A deposit of less than its quote's minimum (NUT-30's ``min_amount``, each
        output on its own, never added up): not recorded, credited or held (a coin the
        mint would pay more to spend than it brings). Said once, for the operator."""
        if (txid, vout) in self.below_min:
            return
        self.below_min.add((txid, vout))
        self.metrics.deposits_below_min.inc()
        log.warning(
            "a deposit under the quote's minimum: not credited",
            extra={
                "txid": txid,
                "vout": vout,
                "quote": quote["quote"],
                "sat": amount,
                "min_sat": quote["min_sat"],
            },
        )

    async def _credit(self, conn: asyncpg.Connection, tip: int) -> list[tuple[str, int]]:
        """Deposits with enough confirmations: held by the mint, credited to their quote
        (as ecash owed), in one transaction. A coinbase's has enough once Bitcoin lets it
        be spent (``COINBASE_MATURITY``): until then nothing could spend it, and a
        reorganisation would take it away for good. A deposit credited before,
        reorganised out and mined again, is held again and not credited twice. One to a
        key the guild's signers no longer sign with (retired after a change of members:
        ``moved`` holds the retirement back while a quote under it is open or a deposit
        to it is not credited yet, but a saved address may be paid later) is not
        credited: nothing could spend it, so it backs no ecash; it is said, for the
        operator."""
        credited: list[tuple[str, int]] = []
        if not self.usable:  # the signers not asked yet: which keys they sign with
            return credited
        deep = tip - self.s.confirmations + 1
        mature = tip - max(self.s.confirmations, COINBASE_MATURITY) + 1
        deep_enough = "height <= CASE WHEN coinbase THEN $3::int ELSE $1::int END"
        unusable = await conn.fetch(
            "SELECT txid, vout, quote, amount_sat, key FROM chain_coins WHERE NOT held"
            f" AND quote IS NOT NULL AND height IS NOT NULL AND {deep_enough}"
            " AND NOT key = ANY($2::bytea[])",
            deep,
            self.usable,
            mature,
        )
        for r in unusable:  # a retired key's: nobody would sign it away; not ecash's backing
            if (r["txid"], r["vout"]) not in self.unusable:
                self.unusable.add((r["txid"], r["vout"]))
                log.error(
                    "a deposit to a key the guild no longer signs with: not credited",
                    extra={
                        "txid": r["txid"],
                        "vout": r["vout"],
                        "quote": r["quote"],
                        "sat": r["amount_sat"],
                        "key": bytes(r["key"]).hex(),
                    },
                )
        async with conn.transaction():
            rows = await conn.fetch(
                "UPDATE chain_coins SET held = true WHERE NOT held AND quote IS NOT NULL"
                f" AND height IS NOT NULL AND {deep_enough} AND key = ANY($2::bytea[])"
                " RETURNING txid, vout, quote, amount_sat",
                deep,
                self.usable,
                mature,
            )
            for r in rows:
                first = await conn.fetchval(
                    "INSERT INTO chain_credited (txid, vout) VALUES ($1, $2)"
                    " ON CONFLICT DO NOTHING RETURNING true",
                    r["txid"],
                    r["vout"],
                )
                if not first:
                    log.warning("a deposit mined again after a reorg: held again", extra=dict(r))
                    continue
                await conn.execute(
                    "UPDATE chain_quotes SET amount_paid = amount_paid + $2 WHERE quote = $1",
                    r["quote"],
                    r["amount_sat"],
                )
                credited.append((r["quote"], r["amount_sat"]))
        return credited

    async def _reorg(self, conn: asyncpg.Connection, height: int) -> None:
        """The block last read is no longer the chain's: forget what was read from the
        fork on and read again. A credited deposit reorganised away is gone from the
        mint's funds too, and said loudly: ecash may have been issued against it, so the
        reserve invariant breaks, as it should, until the deposit is mined again (then
        held again, its quote credited once: ``_credit``)."""
        fork = height
        while fork > 0:
            stored = await conn.fetchval("SELECT hash FROM chain_blocks WHERE height = $1", fork)
            if stored is None or stored == await self.rpc.call("getblockhash", fork):
                break
            fork -= 1
        async with conn.transaction():
            lost = await conn.fetch(
                "DELETE FROM chain_coins WHERE quote IS NOT NULL AND height > $1"
                " AND spent_by IS NULL RETURNING txid, vout, quote, amount_sat, held",
                fork,
            )
            for r in lost:
                if r["held"]:
                    log.error("a credited deposit was reorganised out of the chain", extra=dict(r))
            await conn.execute("UPDATE chain_coins SET height = NULL WHERE height > $1", fork)
            await conn.execute("UPDATE chain_withdrawals SET mined = NULL WHERE mined > $1", fork)
            await conn.execute("DELETE FROM chain_blocks WHERE height > $1", fork)
        log.warning("chain reorganisation", extra={"fork": fork, "was": height})

    # -- withdrawals -----------------------------------------------------------------------

    async def estimate(self) -> None:
        """Ask bitcoind what feerate confirms within ``fee_target`` blocks now (at every
        pass of the chain follower, in every process of the mint): rounded up, held
        within ``min_feerate`` and ``max_feerate``; the least where bitcoind has no
        estimate (a node that has seen too few blocks: regtest). A feerate set once goes
        stale in a busy market and leaves withdrawals in no block for as long as it
        lasts."""
        doc = await self.rpc.call("estimatesmartfee", self.s.fee_target)
        try:  # BTC/kvB, read as untrusted input; "errors" instead where there is none
            found = doc.get("feerate")
            rate = self.s.min_feerate if found is None else math.ceil(Decimal(found) * 100_000)
        except (AttributeError, TypeError, ValueError, ArithmeticError) as exc:
            raise BitcoindError(-1, f"estimatesmartfee answered {doc!r}: {exc!r}") from None
        self.estimated = min(self.s.max_feerate, max(self.s.min_feerate, rate))
        self.metrics.chain_feerate.set(self.estimated)

    def feerate(self) -> int:
        """sat/vB to build a transaction at (``estimate``'s last); CHAIN_DOWN where
        bitcoind has not answered since the process started: nothing is built blind."""
        if self.estimated is None:
            raise BitcoindError(-1, "no fee estimate yet: bitcoind has not answered")
        return self.estimated

    @staticmethod
    def fee_reserve(destination: bytes, feerate: int) -> int:
        """What a withdrawal to ``destination`` may cost: a transaction of MAX_INPUTS at
        ``feerate``."""
        return oc.fee_sat(MAX_INPUTS, [destination, _CHANGE], feerate)

    @staticmethod
    def quoted_feerate(destination: bytes, reserve: int) -> int:
        """The feerate a quote's ``reserve`` was made at (``fee_reserve``)."""
        return reserve // oc.vsize(MAX_INPUTS, [destination, _CHANGE])

    def destination(self, address: str) -> bytes:
        try:
            script = address_script(address, self.s.hrp)
        except ConstellationError as exc:
            raise m.CashuError(0, f"not an address of this chain: {exc}") from None
        try:
            oc.check_destination(script)
        except ValueError as exc:
            raise m.CashuError(0, f"{address} {exc}") from None
        return script

    async def melt_quote(self, req: nut.MeltQuoteOnchainRequest, expiry_s: int) -> m.MeltQuote:
        script = self.destination(req.request)
        if req.amount < oc.DUST_SAT:
            raise m.CashuError(m.AMOUNT_LIMIT, f"an output of less than {oc.DUST_SAT} sat")
        reserve = self.fee_reserve(script, self.feerate())
        async with self.store.pool.acquire() as conn:  # checked again when it is melted
            held = int(
                await conn.fetchval(
                    "SELECT coalesce(sum(amount_sat), 0) FROM chain_coins"
                    " WHERE held AND spent_by IS NULL AND height IS NOT NULL"
                )
            )
        if held < req.amount + reserve:
            raise Uncovered(m.PAYMENT_FAILED, f"the mint holds {held} sat on-chain: not enough")
        quote = str(uuid.uuid4())
        q = m.MeltQuote(
            quote,
            req.request,
            quote,  # no payment hash: the quote names its one payment
            req.amount,
            reserve,
            req.unit,
            m.MELT_UNPAID,
            int(time.time()) + expiry_s,
            amount_msat=req.amount * 1000,
            method=m.ONCHAIN,
        )
        await self.store.add_melt_quote(q)
        return q

    async def withdraw(
        self, quote_id: str, start: Callable[[], Awaitable[tuple[m.MeltQuote, int]]]
    ) -> None:
        """A melt: ``start`` reserves its proofs; then the transaction is built and
        recorded (from here it is never refunded), and returns: it is signed and sent in
        the background (the melt PENDING meanwhile, as NUT-30 asks). What may fail before
        the record raises, with the proofs free; what fails after it is said, and the
        resolver takes it up."""
        change_label = _label(b"change:" + quote_id.encode())
        key = await self.key()  # before any proof
        _, change = self.address(change_label, key)
        market = self.feerate()
        quote, attempt = await start()
        destination = self.destination(quote.request)
        quoted = self.quoted_feerate(destination, quote.fee_reserve)
        async with self.store.pool.acquire() as conn, conn.transaction():
            # under a key that signs now: a move's coin is spent before the move confirms
            coins = await self._held(conn, "key = ANY($1::bytea[])", self.usable)
            # at the market's feerate now, within the reserve (fewer inputs than it was
            # made for leave room where the market rose a little)
            least = oc.movable_sat(self.s.min_feerate)  # change the mint can always move
            w = oc.plan(coins, destination, quote.amount, change, market, quote.fee_reserve, least)
            if w is not None:
                await self._record(conn, quote, attempt, w, change, change_label, key)
        if w is None:  # nothing was recorded: the proofs are free again
            await self.store.fail_melt(quote.quote, attempt)
            if market > quoted:  # at the quote's feerate it would wait in no block
                raise m.CashuError(
                    m.PAYMENT_FAILED,
                    f"the market's feerate rose to {market} sat/vB since the quote"
                    f" ({quoted}): ask a new quote",
                )
            raise Uncovered(m.PAYMENT_FAILED, "the mint's on-chain coins do not cover it now")
        log.info(
            "withdrawal built",
            extra={"quote": quote.quote, "txid": w.tx.txid, "fee_sat": w.fee_sat},
        )
        task = asyncio.create_task(self._complete_soon(quote.quote))
        self.sending.add(task)
        task.add_done_callback(self.sending.discard)

    async def _complete_soon(self, quote: str) -> None:
        """``complete`` for a melt answered PENDING meanwhile (NUT-30: signed and sent in
        the background)."""
        try:
            await self.complete(quote)
        except NOT_SENT as exc:
            log.warning("withdrawal not sent yet", extra={"quote": quote, "error": repr(exc)})
        except Exception:  # a bug: said with its traceback, not lost with the task
            log.exception("withdrawal not sent", extra={"quote": quote})

    async def _record(
        self,
        conn: asyncpg.Connection,
        quote: m.MeltQuote,
        attempt: int,
        w: oc.Withdrawal,
        change: bytes,
        change_label: bytes,
        key: bytes,
    ) -> None:
        """Record a withdrawal in the transaction that picked its coins, if its melt is
        still this attempt's (the resolver may have freed a melt it took for dead)."""
        r = await conn.fetchrow(
            "SELECT state, attempt FROM melt_quotes WHERE quote = $1 FOR UPDATE", quote.quote
        )
        if r["state"] != m.MELT_PENDING or r["attempt"] != attempt:
            raise m.CashuError(m.QUOTE_PENDING, "the melt was given up meanwhile: nothing sent")
        await conn.execute(
            "UPDATE chain_coins SET spent_by = $3 WHERE (txid, vout) IN"
            " (SELECT * FROM unnest($1::text[], $2::int[]))",
            [c.txid for c in w.spent],
            [c.vout for c in w.spent],
            quote.quote,
        )
        if w.change_sat:
            await conn.execute(
                "INSERT INTO chain_coins (txid, vout, amount_sat, script, derivation, key, held)"
                " VALUES ($1, 1, $2, $3, $4, $5, true)",
                w.tx.txid,
                w.change_sat,
                change,
                change_label,
                key,
            )
        await conn.execute(
            "INSERT INTO chain_withdrawals (quote, attempt, tx, txid, fee_sat, spent, state,"
            f" built_at) VALUES ($1, $2, $3, $4, $5, $6, 'SIGNING', {_READ_HEIGHT})",
            quote.quote,
            attempt,
            w.tx.serialize(),
            w.tx.txid,
            w.fee_sat,
            _coins_json(w.spent),
        )

    async def complete(self, quote: str) -> None:
        """Sign (where not yet) and send a recorded withdrawal (its melt is PAID once a
        block deep enough holds it: ``_confirmed``). Whatever fails is taken up again by
        the resolver."""
        if quote in self.working:
            return
        self.working.add(quote)
        try:
            async with self.store.pool.acquire() as conn:
                r = await conn.fetchrow("SELECT * FROM chain_withdrawals WHERE quote = $1", quote)
            assert r is not None
            tx = parse_tx(bytes(r["tx"]))
            if r["state"] == "SIGNING":
                tx = await self._sign(tx, _coins_of(json.loads(r["spent"])))
                async with self.store.pool.acquire() as conn:
                    signed = await conn.fetchval(
                        "UPDATE chain_withdrawals SET tx = $2, state = 'SIGNED' WHERE quote = $1"
                        " AND state = 'SIGNING' RETURNING true",
                        quote,
                        tx.serialize(),
                    )
                if not signed:  # another process signed it meanwhile: it sends it
                    return
            await self._send(tx.serialize(), tx.txid)
            async with self.store.pool.acquire() as conn:
                await conn.execute(
                    "UPDATE chain_withdrawals SET state = 'SENT' WHERE quote = $1", quote
                )
            log.info("withdrawal sent", extra={"quote": quote, "txid": tx.txid})
        finally:
            self.working.discard(quote)

    async def _sign(self, tx: BitcoinTx, coins: list[oc.Coin]) -> BitcoinTx:
        """Each input signed by the guild key its coin is under (a ROAST session each,
        over one connection to the operator's signer), every signature checked against
        the sighash derived here."""
        signatures = []
        async with self._signer() as client:
            for coin, request in zip(coins, oc.spend_requests(tx, coins), strict=True):
                expected = derive(request, coin.key, self.me)
                reply = await client.request(sp.SignRequest(request, key=coin.key), SIGN_S)
                if not reply.ok or not schnorr_verify(
                    expected.pubkey, expected.msg, reply.signature
                ):
                    raise m.CashuError(
                        m.PAYMENT_FAILED, f"the guild did not sign: {reply.code} {reply.error}"
                    )
                signatures.append(reply.signature)
        return oc.signed(tx, signatures)

    async def _send(self, raw: bytes, txid: str, conn: asyncpg.Connection | None = None) -> None:
        """``sendrawtransaction``, where one a block holds counts as sent (before, by
        this process or another that died before it said so). Bitcoin Core says so
        (-27) only while an output of it is unspent; once every one is spent in a block
        it checks it as a new one and finds its inputs spent (-25): then the block is
        asked (``_in_block``)."""
        try:
            await self.rpc.call("sendrawtransaction", raw.hex())
        except BitcoindError as exc:
            if exc.code == RPC_VERIFY_ALREADY_IN_CHAIN:
                return
            if exc.code == RPC_VERIFY_ERROR and await self._in_block(txid, conn):
                return
            raise

    async def _in_block(self, txid: str, conn: asyncpg.Connection | None = None) -> bool:
        """Whether a block of the chain holds our transaction ``txid``, as bitcoind's
        ``getrawtransaction`` says: asked with the hash of the block the follower found
        it in, since a node without ``-txindex`` (Bitcoin Core's default) finds a
        transaction of a block no other way; where the follower has not read that block
        yet, by its txid alone (found by a node with ``-txindex``; else not, until the
        follower has read it). Over ``conn`` where the caller holds one."""
        if conn is None:
            async with self.store.pool.acquire() as own:
                return await self._in_block(txid, own)
        block = await conn.fetchval(
            "SELECT hash FROM chain_blocks WHERE height IN"
            " (SELECT mined FROM chain_withdrawals WHERE txid = $1 AND mined > 0"
            " UNION SELECT height FROM chain_coins WHERE txid = $1) LIMIT 1",
            txid,
        )
        try:
            doc = await self.rpc.call("getrawtransaction", txid, True, *([block] if block else []))
        except BitcoindError as exc:
            if exc.code == RPC_INVALID_ADDRESS_OR_KEY:
                return False
            raise
        try:  # read as untrusted input (0: in a block of another branch)
            return int(doc.get("confirmations", 0)) > 0
        except (AttributeError, TypeError, ValueError) as exc:
            raise BitcoindError(-1, f"getrawtransaction answered {doc!r}: {exc!r}") from None

    async def _in_mempool(self, txid: str) -> bool:
        """Whether bitcoind's mempool holds ``txid`` (``getmempoolentry``): one there is in
        no block; one not there is in a block, or the node does not have it (it is sent
        again: ``send_again``)."""
        try:
            await self.rpc.call("getmempoolentry", txid)
        except BitcoindError as exc:
            if exc.code == RPC_INVALID_ADDRESS_OR_KEY:
                return False
            raise
        return True

    async def _held(self, conn: asyncpg.Connection, where: str, *args: Any) -> list[oc.Coin]:
        """The confirmed coins the mint holds and spends nowhere yet that also meet
        ``where``, locked (concurrent spends wait for each other's coins). None is a
        coinbase's too young to spend: a deposit is held only once ``_credit`` found it
        deep enough, a coinbase's at ``COINBASE_MATURITY``, and the mint's other coins
        (change, moves) are outputs of its own transactions."""
        rows = await conn.fetch(
            "SELECT * FROM chain_coins WHERE held AND spent_by IS NULL AND height IS NOT NULL"
            f" AND {where} FOR UPDATE",
            *args,
        )
        return [_coin(r) for r in rows]

    # -- bumps of withdrawals in no block ----------------------------------------------------

    async def bump_stuck(self) -> None:
        """Withdrawals sent and in no block that pay less than the market asks now (by
        BUMP_BELOW) and missed blocks: each gets a child of its change that pays for it
        (CPFP), on the mint's account (a withdrawal is built at the market's feerate, so
        the mint pays only for a market that rose after), and again if the market rises
        on. A withdrawal without change the mint cannot bump (its payee can, from its
        output). Children recorded and not sent yet (a signer or the chain was down, a
        process died) are signed and sent first. Sent one by one (``sendrawtransaction``),
        a child needs its parent in the node's mempool: a node that evicted the parent
        takes neither until they go as a package (``submitpackage``), which this does not
        do yet. Whether a withdrawal is still in no block is the node's answer, not the
        follower's (a block it has not read yet may hold it): a child is built, signed
        and sent only while the node's mempool holds its withdrawal; one recorded for a
        withdrawal no longer there is dropped (``_drop_bump``)."""
        async with self.store.pool.acquire() as conn:
            unsent = await conn.fetch("SELECT * FROM chain_bumps WHERE state <> 'SENT' ORDER BY id")
            stuck = await conn.fetch(
                "SELECT quote FROM chain_withdrawals WHERE state = 'SENT' AND mined IS NULL"
            )
        for r in unsent:  # one's trouble holds up no other
            try:
                await self._sign_and_send("chain_bumps", r)
            except NOT_SENT as exc:
                log.warning("a bump not sent yet", extra={"quote": r["quote"], "error": repr(exc)})
        for r in stuck:
            try:
                await self._bump(r["quote"])
            except NOT_SENT as exc:
                log.warning(
                    "a withdrawal not bumped", extra={"quote": r["quote"], "error": repr(exc)}
                )

    async def _bump(self, quote: str) -> None:
        """A child of withdrawal ``quote``'s last output of ours in no block (its change,
        or its last child's), recorded with the coin it spends in one transaction, then
        signed and sent: where the withdrawal and its children so far pay less than the
        market's feerate over BUMP_BELOW, missed BUMP_AFTER_BLOCKS blocks, and the
        children's fees stay within BUMP_MAX_FEE_SAT, and all bumps' of the last day
        within ``bump_budget_sat``."""
        market, key = self.feerate(), await self.key()
        async with self.store.pool.acquire() as conn, conn.transaction():
            # not while the chain is read (it locks the coins, then the withdrawals: the
            # other way round from here)
            await conn.execute(f"SELECT pg_advisory_xact_lock({FOLLOW_LOCK})")
            w = await conn.fetchrow(
                "SELECT tx, txid, fee_sat, mined, built_at FROM chain_withdrawals"
                " WHERE quote = $1 FOR UPDATE",
                quote,
            )
            bumps = await conn.fetch(
                "SELECT tx, txid, fee_sat, state, built_at FROM chain_bumps WHERE quote = $1"
                " ORDER BY id",
                quote,
            )
            if w["mined"] is not None or any(b["state"] != "SENT" for b in bumps):
                return
            read = await conn.fetchval(f"SELECT {_READ_HEIGHT}")
            if read - (bumps[-1] if bumps else w)["built_at"] < BUMP_AFTER_BLOCKS:
                return  # not missed yet
            package = [w, *bumps]  # in no block: a child is mined with its parent or after
            fee = sum(int(r["fee_sat"]) for r in package)
            size = sum(parse_tx(bytes(r["tx"])).vsize for r in package)
            if fee * BUMP_BELOW >= market * size:
                return
            if not await self._in_mempool(w["txid"]):
                return  # in a block the follower has not read yet, or not at the node
            last = (bumps[-1]["txid"], 0) if bumps else (w["txid"], 1)
            r = await conn.fetchrow(
                "SELECT * FROM chain_coins WHERE txid = $1 AND vout = $2 AND held"
                " AND spent_by IS NULL FOR UPDATE",
                *last,
            )
            label = _label(b"bump:%s:%d" % (last[0].encode(), last[1]))
            _, script = self.address(label, key)
            today = await conn.fetchval(
                "SELECT coalesce(sum(fee_sat), 0) FROM chain_bumps"
                " WHERE created_at > now() - interval '1 day'"
            )
            most = min(
                BUMP_MAX_FEE_SAT - sum(int(b["fee_sat"]) for b in bumps),
                self.s.bump_budget_sat - int(today),
            )
            child = None
            if r is not None:  # else: no change (all went to the payee and the miner)
                least = oc.movable_sat(self.s.min_feerate)
                child = oc.bump(_coin(r), script, fee, size, market, most, least)
            if child is None:
                if quote not in self.unbumpable:
                    self.unbumpable.add(quote)
                    log.error(
                        "a withdrawal in no block pays less than the market asks, and"
                        " cannot be bumped: no change, too little, or its bumps would pass"
                        " BUMP_MAX_FEE_SAT or the day's MINT_CHAIN_BUMP_BUDGET_SAT",
                        extra={"quote": quote, "txid": w["txid"], "sat_per_vb": fee / size},
                    )
                return
            await _record_own(conn, child, "bump:" + quote, label, key)
            r = await conn.fetchrow(
                "INSERT INTO chain_bumps (quote, tx, txid, fee_sat, spent, state, built_at)"
                f" VALUES ($1, $2, $3, $4, $5, 'SIGNING', {_READ_HEIGHT}) RETURNING *",
                quote,
                child.tx.serialize(),
                child.tx.txid,
                child.fee_sat,
                _coins_json(child.spent),
            )
        log.info(
            "a withdrawal in no block bumped",
            extra={"quote": quote, "txid": child.tx.txid, "fee_sat": child.fee_sat},
        )
        await self._sign_and_send("chain_bumps", r)

    # -- moves to a new key -----------------------------------------------------------------

    async def _move_on(self, move: int) -> None:
        """Take a move on to the chain: built and recorded with the coins it spends
        (held coins under another key, confirmed: as many as one transaction takes,
        ``move_funds``; the indexer asks another move for those left) in one database
        transaction, signed by the keys those coins are under, then sent; the same
        transaction each time."""
        async with self.store.pool.acquire() as conn, conn.transaction():
            r = await conn.fetchrow("SELECT * FROM chain_moves WHERE id = $1 FOR UPDATE", move)
            if r["state"] == "ASKED":
                r = await self._build_move(conn, move, bytes(r["key"]))
        if await self._sign_and_send("chain_moves", r):
            log.info("the guild's coins moved", extra={"key": r["key"].hex(), "txid": r["txid"]})

    async def _sign_and_send(self, table: str, r: asyncpg.Record) -> bool:
        """A move's or a bump's transaction (its row ``r`` of ``table``), recorded with
        the coins it spends: signed where not yet, then sent; whether it was sent now. A
        bump whose withdrawal left the node's mempool is dropped instead, before it is
        signed and again before it is sent (``_drop_bump``): the row is locked while it
        is sent, so no process drops one that another sends."""
        if r["state"] == "SIGNING":
            if table == "chain_bumps":
                async with self.store.pool.acquire() as conn, conn.transaction():
                    locked = await conn.fetchrow(
                        "SELECT * FROM chain_bumps WHERE id = $1 FOR UPDATE", r["id"]
                    )
                    if locked is None or locked["state"] != "SIGNING":
                        return False  # another process dropped or signed it meanwhile
                    if await self._drop_bump(conn, locked):
                        return False
            tx = await self._sign(parse_tx(bytes(r["tx"])), _coins_of(json.loads(r["spent"])))
            async with self.store.pool.acquire() as conn:
                signed = await conn.fetchrow(
                    f"UPDATE {table} SET tx = $2, state = 'SIGNED' WHERE id = $1"
                    " AND state = 'SIGNING' RETURNING *",
                    r["id"],
                    tx.serialize(),
                )
            if signed is None:  # another process signed it meanwhile: it sends it
                return False
            r = signed
        if r["state"] != "SIGNED":
            return False
        async with self.store.pool.acquire() as conn, conn.transaction():
            r = await conn.fetchrow(f"SELECT * FROM {table} WHERE id = $1 FOR UPDATE", r["id"])
            if r is None or r["state"] != "SIGNED":
                return False
            if table == "chain_bumps" and await self._drop_bump(conn, r):
                return False
            await self._send(bytes(r["tx"]), r["txid"], conn)
            await conn.execute(f"UPDATE {table} SET state = 'SENT' WHERE id = $1", r["id"])
        return True

    async def _drop_bump(self, conn: asyncpg.Connection, r: asyncpg.Record) -> bool:
        """Drop bump ``r`` (its row locked, not sent) where the node's mempool no longer
        holds its withdrawal: in a block, the withdrawal needs no child; not at the node,
        no child would be taken. Dropped, it is undone as ``_record_own`` did it: its
        output's coin deleted, the coin it spends held unspent again, its fee taken off
        the mint's chain fees (and the day's bump budget). A signed one may have gone
        out before its process died: one the node holds, in its mempool or a block, is
        kept (and sent, to say SENT). Whether it was dropped."""
        parent = await conn.fetchval(
            "SELECT txid FROM chain_withdrawals WHERE quote = $1", r["quote"]
        )
        assert parent is not None, "a bump of no withdrawal"
        if await self._in_mempool(parent):
            return False
        if r["state"] == "SIGNED" and await self._at_node(r["txid"], conn):
            return False
        [spent] = _coins_of(json.loads(r["spent"]))
        lost = await conn.fetchval(
            "DELETE FROM chain_coins WHERE txid = $1 AND vout = 0 AND spent_by IS NULL"
            " RETURNING amount_sat",
            r["txid"],
        )
        assert lost == spent.amount_sat - r["fee_sat"], "a bump's output spent, or not its own"
        freed = await conn.execute(
            "UPDATE chain_coins SET spent_by = NULL WHERE txid = $1 AND vout = $2"
            " AND spent_by = $3",
            spent.txid,
            spent.vout,
            "bump:" + r["quote"],
        )
        assert freed == "UPDATE 1", "the coin a bump spends is not recorded as spent by it"
        await conn.execute("SELECT mint_count('chain_fees_sat', '', $1)", -r["fee_sat"])
        await conn.execute("DELETE FROM chain_bumps WHERE id = $1", r["id"])
        log.info(
            "a bump dropped: its withdrawal is no longer in the node's mempool",
            extra={"quote": r["quote"], "txid": r["txid"], "fee_sat": r["fee_sat"]},
        )
        return True

    async def _at_node(self, txid: str, conn: asyncpg.Connection) -> bool:
        """Whether the node holds our transaction ``txid`` not recorded as sent: in its
        mempool, or in a block (its output 0, ours, in the UTXO set: nothing of ours
        spends an output of a transaction not sent, nor one the follower has not seen
        in a block, when ``_in_block`` finds it)."""
        if await self._in_mempool(txid):
            return True
        if await self.rpc.call("gettxout", txid, 0, False) is not None:
            return True
        return await self._in_block(txid, conn)

    async def _build_move(self, conn: asyncpg.Connection, move: int, key: bytes) -> asyncpg.Record:
        """The move of the coins held under other keys to ``key``, recorded. Coins that
        do not pay for their own move at the market's feerate wait for a lower one; those
        that would not even at the least the mint builds at (``min_feerate``: a deposit
        to a quote of a small minimum, change made before ``oc.movable_sat``) would wait
        for ever, and the keys before ``key`` never retire (``moved``): they are moved
        beside the largest coin the mint holds under ``key``, which pays for them. Its
        whole value goes to the move's output, less the fee, which is booked as every
        move's (``chain_fees_sat``): nothing is lost from the books."""
        coins = await self._held(conn, "key <> $1", key)
        feerate = self.feerate()
        w = move_funds(coins, key, self.me, feerate, MOVE_MAX_FEE_SAT)
        never = bool(coins) and (
            move_funds(coins, key, self.me, self.s.min_feerate, MOVE_MAX_FEE_SAT) is None
        )
        if w is None and never:
            payer = await conn.fetchrow(
                "SELECT * FROM chain_coins WHERE held AND spent_by IS NULL"
                " AND height IS NOT NULL AND key = $1"
                " ORDER BY amount_sat DESC, txid, vout LIMIT 1 FOR UPDATE",
                key,
            )
            if payer is None:
                raise m.CashuError(
                    m.PAYMENT_FAILED,
                    f"the {len(coins)} coins left under another key are worth too little to"
                    f" pay for their move even at {self.s.min_feerate} sat/vB: they wait for"
                    " a confirmed coin under the new key to pay for it",
                )
            w = move_funds([*coins, _coin(payer)], key, self.me, feerate, MOVE_MAX_FEE_SAT)
        if w is None and coins:
            raise m.CashuError(
                m.PAYMENT_FAILED,
                f"the {len(coins)} coins left under another key do not pay for their move at"
                f" {feerate} sat/vB within {MOVE_MAX_FEE_SAT} sat: it waits for a"
                " lower feerate",
            )
        if w is None:
            return await conn.fetchrow(
                "UPDATE chain_moves SET state = 'NONE' WHERE id = $1 RETURNING *", move
            )
        await _record_own(conn, w, "move:" + key.hex(), move_label(key), key)
        log.info(
            "the guild's coins' move built",
            extra={
                "key": key.hex(),
                "txid": w.tx.txid,
                "coins": len(w.spent),
                "fee_sat": w.fee_sat,
            },
        )
        return await conn.fetchrow(
            "UPDATE chain_moves SET tx = $2, txid = $3, fee_sat = $4, spent = $5,"
            " state = 'SIGNING' WHERE id = $1 RETURNING *",
            move,
            w.tx.serialize(),
            w.tx.txid,
            w.fee_sat,
            _coins_json(w.spent),
        )

    async def resolve_forever(self) -> None:
        """Withdrawals recorded and not sent yet (a signer or the chain was down, a
        process died): signed and sent, the same transaction. Melts that reserved their
        proofs and recorded nothing for ``ABANDONED_S`` (their process died before): the
        proofs freed, as nothing can have been sent."""
        while True:
            try:
                await self._resolve()
            except NOT_SENT as exc:
                log.warning("withdrawals not resolved", extra={"error": repr(exc)})
            await asyncio.sleep(self.s.poll_s)

    async def _resolve(self) -> None:
        try:
            await self._ask_keys()  # a change of members may have made another
        except m.CashuError as exc:
            log.warning("the guild's keys not asked", extra={"error": str(exc)})
        async with self.store.pool.acquire() as conn:
            moves = await conn.fetch(
                "SELECT id, key FROM chain_moves WHERE state IN ('ASKED', 'SIGNING', 'SIGNED')"
                " ORDER BY id"
            )
            open_ = await conn.fetch("SELECT quote FROM chain_withdrawals WHERE state <> 'SENT'")
            abandoned = await conn.fetch(
                "SELECT q.quote, q.attempt FROM melt_quotes q"
                " LEFT JOIN chain_withdrawals w USING (quote)"
                " WHERE q.method = $1 AND q.state = 'PENDING' AND w.quote IS NULL"
                " AND q.pending_since < extract(epoch FROM now()) - $2",
                m.ONCHAIN,
                ABANDONED_S,
            )
        self.metrics.withdrawals_open.set(len(open_))
        for r in abandoned:  # (unless its process recorded one since: then it is sent)
            if await self.store.fail_melt(r["quote"], r["attempt"], onchain=True):
                log.warning(
                    "an on-chain melt recorded no withdrawal: its proofs freed", extra=dict(r)
                )
        for r in open_:
            try:
                await self.complete(r["quote"])
            except NOT_SENT as exc:  # one withdrawal's trouble holds up no other
                log.warning(
                    "withdrawal not sent yet", extra={"quote": r["quote"], "error": repr(exc)}
                )
        for r in moves:
            try:
                await self._move_on(r["id"])
            except NOT_SENT as exc:
                log.warning(
                    "the move not sent yet", extra={"key": r["key"].hex(), "error": repr(exc)}
                )
        await self.bump_stuck()
        await self.send_again()

    async def send_again(self) -> None:
        """Withdrawals, moves and bumps sent and in no block yet: sent again every ``RESEND_S``
        (the same transaction: a node restarted with an empty mempool, or one that
        evicted it, has it again) until a block holds them. One its node refuses (its
        fee below what the mempool takes now) is said once: it needs a bump."""
        async with self.store.pool.acquire() as conn:
            unmined = await conn.fetch(
                "SELECT w.txid, w.tx, 0 AS kind, 0 AS id FROM chain_withdrawals w"
                " WHERE w.state = 'SENT' AND w.mined IS NULL"
                " UNION ALL SELECT m.txid, m.tx, 1, m.id FROM chain_moves m"
                " JOIN chain_coins c ON c.txid = m.txid AND c.vout = 0"
                " WHERE m.state = 'SENT' AND c.height IS NULL"
                " UNION ALL SELECT b.txid, b.tx, 2, b.id FROM chain_bumps b"
                " JOIN chain_coins c ON c.txid = b.txid AND c.vout = 0"
                " WHERE b.state = 'SENT' AND c.height IS NULL"
                " ORDER BY kind, id"  # a bump after its parent, and after the bump before it
            )
        self.metrics.withdrawals_unmined.set(len(unmined))
        now = time.monotonic()
        for r in unmined:
            if now - self.sent_at.get(r["txid"], -RESEND_S) < RESEND_S:
                continue
            self.sent_at[r["txid"]] = now
            try:  # one in a block already (the follower has not read it yet) is fine
                await self._send(bytes(r["tx"]), r["txid"])
            except BitcoindError as exc:
                if r["txid"] not in self.refused:
                    self.refused.add(r["txid"])
                    log.error(
                        "a transaction sent is in no block, and its node refuses it now",
                        extra={"txid": r["txid"], "error": str(exc)},
                    )

    async def melt_state(self, quote: str) -> dict[str, Any]:
        """A melt quote's NUT-30 answer: its ``outpoint`` from when its withdrawal was
        sent (PAID once a block deep enough holds it)."""
        found = await self.store.melt_quote(quote, m.ONCHAIN)
        if found is None:
            raise m.CashuError(m.QUOTE_UNPAID, "no such quote")
        async with self.store.pool.acquire() as conn:
            txid = await conn.fetchval(
                "SELECT txid FROM chain_withdrawals WHERE quote = $1 AND state = 'SENT'", quote
            )
        return self.melt_doc(*found, sent=f"{txid}:0" if txid else None)

    def melt_doc(
        self, q: m.MeltQuote, change: list[nut.BlindSignature], sent: str | None = None
    ) -> dict[str, Any]:
        return {
            "quote": q.quote,
            "amount": q.amount,
            "unit": q.unit,
            "method": m.ONCHAIN,
            "state": q.state,
            "expiry": q.expiry,
            "request": q.request,
            "fee_options": [
                {
                    "fee_index": 0,
                    "fee_reserve": q.fee_reserve,
                    "estimated_blocks": self.s.fee_target,  # what its feerate is estimated for
                }
            ],
            "selected_fee_index": None if q.state == m.MELT_UNPAID else 0,
            "outpoint": q.preimage or sent,
            "change": change,
        }


def _mint_doc(r: asyncpg.Record) -> dict[str, Any]:
    return {
        "quote": r["quote"],
        "request": r["address"],
        "unit": "sat",
        "method": m.ONCHAIN,
        "expiry": r["expiry"],
        "pubkey": r["pubkey"],
        "amount_paid": r["amount_paid"],
        "amount_issued": r["amount_issued"],
    }
