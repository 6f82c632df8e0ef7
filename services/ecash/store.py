"""The mint's state in PostgreSQL: its sealed master key and keysets, the proofs it has
seen spent or reserved by a melt (by Y), the blind signatures it issued (by B_, for
NUT-09 restore, and so that no output is signed twice), and its quotes.

Each operation is one transaction whose inserts decide the races: the primary key on Y
makes of two requests sharing a proof exactly one the winner, whichever mint process
serves them; the one on B_ makes a second signature of an output impossible. A crash
before the commit leaves nothing, after it everything: the wallet's retry is answered
from what was stored.

Swaps, the mint's busiest operation, commit in groups: the swaps that arrive while
others are committing go together in the next transaction (at most ``SWAP_GROUPS`` in
flight), each one all or nothing in it. A group goes first as one statement (one round
trip; PostgreSQL refuses it whole where one of its proofs was seen or one of its outputs
signed before), then, so refused, as a transaction in which a swap refused (that proof,
that output) takes back what it inserted before the commit; two swaps that
share a proof or an output never go in one group: the later one goes in a later
transaction, which decides between them as between any two. Where PostgreSQL refuses a
group's transaction, its swaps go again one a transaction, so that one swap's failure is
not the others'. A swap whose request was given up before its group began is dropped.
A swap's outputs are signed before it waits for its group (the signatures of a swap
refused go nowhere): a group's transaction holds its connection and its proofs' rows for
the database's work alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

import asyncpg

from constellation.ecash import mint as m
from constellation.ecash.keyset import Keyset, input_fee
from constellation.protocol import cashu as nut
from services.database import DATABASE_DOWN
from services.signer.store import seal, unseal

log = logging.getLogger("mint.store")

# signs outputs (NUT-12 signatures), in the operation's transaction: awaited, so a large
# batch's EC work may run off the event loop
Sign = Callable[[Sequence[nut.BlindedMessage]], Awaitable[list[nut.BlindSignature]]]

RELISTEN_S = 1.0
SCHEMA_LOCK = 7414  # an advisory lock: one process of the mint changes its schema at once
SWAP_GROUPS = 2  # swap transactions in flight at once, each taking what waits
SWAP_GROUP_ITEMS = 2048  # proofs and outputs in one (a single larger swap goes alone)
ALIVE_S = 5.0  # the listening connection answers within this, or is made again
# the listening connection is not made, or breaks: its server down, starting, stopping
NOT_LISTENING = (*DATABASE_DOWN, asyncpg.PostgresError)

SCHEMA = """
CREATE TABLE IF NOT EXISTS mint_master (
    id int PRIMARY KEY CHECK (id = 1),
    sealed bytea NOT NULL
);
CREATE TABLE IF NOT EXISTS mint_keysets (
    id text PRIMARY KEY,
    unit text NOT NULL,
    idx int NOT NULL,
    input_fee_ppk int NOT NULL,
    active bool NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (unit, idx)
);
CREATE TABLE IF NOT EXISTS mint_proofs (
    y bytea PRIMARY KEY,
    keyset text NOT NULL,
    amount bigint NOT NULL,
    secret text NOT NULL,
    c text NOT NULL,
    witness text,
    state text NOT NULL CHECK (state IN ('SPENT', 'PENDING')),
    reserved_by text,  -- the melt quote or redemption in flight
    at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS mint_proofs_reserved ON mint_proofs (reserved_by)
    WHERE reserved_by IS NOT NULL;
CREATE TABLE IF NOT EXISTS mint_promises (
    b_ bytea PRIMARY KEY,
    keyset text NOT NULL,
    amount bigint NOT NULL,
    c_ text NOT NULL,
    e text NOT NULL,
    s text NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS mint_quotes (
    quote text PRIMARY KEY,
    request text NOT NULL,
    payment_hash text NOT NULL UNIQUE,
    amount bigint NOT NULL,
    unit text NOT NULL,
    state text NOT NULL,
    expiry bigint NOT NULL,
    pubkey text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS melt_quotes (
    quote text PRIMARY KEY,
    request text NOT NULL,
    payment_hash text NOT NULL,
    amount bigint NOT NULL,
    fee_reserve bigint NOT NULL,
    unit text NOT NULL,
    state text NOT NULL,
    expiry bigint NOT NULL,
    preimage text,
    fee_paid bigint NOT NULL DEFAULT 0,
    amount_msat bigint NOT NULL,
    change jsonb,
    attempt int NOT NULL DEFAULT 0,  -- each melt of the quote: a late answer names its own
    blanks jsonb,  -- the attempt's blank outputs (NUT-08), for its change
    pending_since double precision,
    created_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE melt_quotes ADD COLUMN IF NOT EXISTS method text NOT NULL DEFAULT 'bolt11';
-- the attempt while it has not been given leave to send its payment (``may_pay``): what
-- the node says of its hash then is another payer's (NULL: given, or begun before this)
ALTER TABLE melt_quotes ADD COLUMN IF NOT EXISTS unsent_attempt int;
-- the node that signed a bolt11 quote's invoice: its melts in flight are counted
ALTER TABLE melt_quotes ADD COLUMN IF NOT EXISTS payee text;
CREATE INDEX IF NOT EXISTS melt_quotes_payee_pending ON melt_quotes (payee)
    WHERE state = 'PENDING';
-- one invoice is paid by one melt: no second quote of it in flight or paid
CREATE UNIQUE INDEX IF NOT EXISTS melt_quotes_one_payment ON melt_quotes (payment_hash)
    WHERE state <> 'UNPAID';
CREATE TABLE IF NOT EXISTS mint_fees (  -- what the mint kept: input fees, melt margins
    id bigserial PRIMARY KEY,
    kind text NOT NULL,
    msat bigint NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS mint_redeems (  -- ecash redeemed into L3 coins
    id bytea PRIMARY KEY,
    address text NOT NULL,
    value_msat bigint NOT NULL,
    fee_msat bigint NOT NULL,
    issuance text NOT NULL,  -- the issuance (hex), the same on every retry
    state text NOT NULL CHECK (state IN ('PENDING', 'DONE'))
);
CREATE TABLE IF NOT EXISTS mint_withdrawals (  -- L3 coins paid to the mint, as ecash
    txid bytea PRIMARY KEY,
    value_msat bigint NOT NULL,
    outputs bytea[] NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
-- from its first send on, a redemption's issuance may be applied: its proofs are freed
-- only where the ledger shows no coin of it
ALTER TABLE mint_redeems ADD COLUMN IF NOT EXISTS sent_at double precision;
CREATE TABLE IF NOT EXISTS mint_withdraw_outputs (  -- each B_ a withdrawal may sign
    b_ bytea PRIMARY KEY,  -- one withdrawal's, reserved before its transaction is sent
    txid bytea NOT NULL
);
CREATE INDEX IF NOT EXISTS mint_withdraw_outputs_txid ON mint_withdraw_outputs (txid);
-- what each reserved B_ is to be signed as: a retry signs it so or not at all (NULL: a
-- reservation from before these columns, which a retry matches by its B_ alone, as then)
ALTER TABLE mint_withdraw_outputs ADD COLUMN IF NOT EXISTS keyset text;
ALTER TABLE mint_withdraw_outputs ADD COLUMN IF NOT EXISTS amount bigint;
CREATE TABLE IF NOT EXISTS mint_cursor (
    id int PRIMARY KEY CHECK (id = 1),
    pay_index bigint NOT NULL
);
-- The books as running sums, kept by the tables' own triggers in each operation's
-- transaction, so reading them costs the same however many proofs the mint has seen. Each
-- connection adds to rows of its own shard (of its backend's pid): concurrent operations
-- do not queue on one row.
CREATE TABLE IF NOT EXISTS mint_totals (
    kind text NOT NULL,  -- spent, pending, signed, unissued, fees_msat, l3_msat, chain_sat,
    -- chain_fees_sat
    keyset text NOT NULL,  -- '' where the sum is not per keyset
    shard int NOT NULL,
    amount bigint NOT NULL,
    PRIMARY KEY (kind, keyset, shard)
);
CREATE OR REPLACE FUNCTION mint_count(k text, ks text, delta numeric) RETURNS void
LANGUAGE sql AS $$  -- numeric: what sum() of bigints is
    INSERT INTO mint_totals SELECT k, ks, pg_backend_pid() % 1024, delta WHERE delta <> 0
    ON CONFLICT (kind, keyset, shard) DO UPDATE SET amount = mint_totals.amount + delta
$$;
-- ...and tell the mint processes of every change of a proof's state and a quote's (NUT-17
-- subscribers), and of the keysets (a rotation), on commit: Ys in batches of 100 (a
-- notification carries 8000 bytes)
CREATE OR REPLACE FUNCTION mint_count_proofs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'DELETE' THEN
        PERFORM mint_count(lower(state), keyset, sum(amount)) FROM new_rows
            GROUP BY state, keyset;
        PERFORM pg_notify('mint_proofs', string_agg(encode(y, 'hex'), ','))
            FROM (SELECT y, (row_number() OVER ()) / 100 AS batch FROM new_rows) b
            GROUP BY batch;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        PERFORM mint_count(lower(state), keyset, -sum(amount)) FROM old_rows
            GROUP BY state, keyset;
    END IF;
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('mint_proofs', string_agg(encode(y, 'hex'), ','))
            FROM (SELECT y, (row_number() OVER ()) / 100 AS batch FROM old_rows) b
            GROUP BY batch;
    END IF;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION mint_count_promises() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM mint_count('signed', keyset, sum(amount)) FROM new_rows GROUP BY keyset;
    RETURN NULL;
END $$;
-- deleted only by a swap refused in its group, in that transaction (a function of its
-- own: a mint process of an older version redefines the one above)
CREATE OR REPLACE FUNCTION mint_uncount_promises() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM mint_count('signed', keyset, -sum(amount)) FROM old_rows GROUP BY keyset;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION mint_count_quotes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM mint_count('unissued', '', coalesce(sum(amount), 0)) FROM new_rows
        WHERE state = 'PAID';
    IF TG_OP = 'UPDATE' THEN
        PERFORM mint_count('unissued', '', -coalesce(sum(amount), 0)) FROM old_rows
            WHERE state = 'PAID';
        PERFORM pg_notify('mint_quotes', quote) FROM new_rows;
    END IF;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION mint_notify_melts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('melt_quotes', quote) FROM new_rows;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION mint_count_fees() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM mint_count('fees_msat', '', coalesce(sum(msat), 0)) FROM new_rows;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION mint_count_withdrawals() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM mint_count('l3_msat', '', coalesce(sum(value_msat), 0)) FROM new_rows;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION mint_notify_keysets() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('mint_keysets', '');
    RETURN NULL;
END $$;
-- the triggers, where they are not yet (made again, each would lock its table)
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'mint_withdrawals_in') THEN
        CREATE TRIGGER mint_proofs_in AFTER INSERT ON mint_proofs
            REFERENCING NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION mint_count_proofs();
        CREATE TRIGGER mint_proofs_up AFTER UPDATE ON mint_proofs
            REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
            FOR EACH STATEMENT EXECUTE FUNCTION mint_count_proofs();
        CREATE TRIGGER mint_proofs_out AFTER DELETE ON mint_proofs
            REFERENCING OLD TABLE AS old_rows
            FOR EACH STATEMENT EXECUTE FUNCTION mint_count_proofs();
        CREATE TRIGGER mint_promises_in AFTER INSERT ON mint_promises
            REFERENCING NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION mint_count_promises();
        CREATE TRIGGER mint_quotes_in AFTER INSERT ON mint_quotes
            REFERENCING NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION mint_count_quotes();
        CREATE TRIGGER mint_quotes_up AFTER UPDATE ON mint_quotes
            REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
            FOR EACH STATEMENT EXECUTE FUNCTION mint_count_quotes();
        CREATE TRIGGER mint_keysets_changed AFTER INSERT OR UPDATE ON mint_keysets
            FOR EACH STATEMENT EXECUTE FUNCTION mint_notify_keysets();
        CREATE TRIGGER melt_quotes_up AFTER UPDATE ON melt_quotes
            REFERENCING NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION mint_notify_melts();
        CREATE TRIGGER mint_fees_in AFTER INSERT ON mint_fees
            REFERENCING NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION mint_count_fees();
        CREATE TRIGGER mint_withdrawals_in AFTER INSERT ON mint_withdrawals
            REFERENCING NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION mint_count_withdrawals();
    END IF;
END $$;
DO $$ BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_trigger
        WHERE tgname = 'mint_promises_out' AND tgrelid = 'mint_promises'::regclass
    ) THEN
        CREATE TRIGGER mint_promises_out AFTER DELETE ON mint_promises
            REFERENCING OLD TABLE AS old_rows
            FOR EACH STATEMENT EXECUTE FUNCTION mint_uncount_promises();
    END IF;
END $$;
-- a mint that kept its books before the sums were: they start from its tables, once
INSERT INTO mint_totals
SELECT kind, keyset, -1, amount FROM (
    SELECT 'tracked' AS kind, '' AS keyset, 0::bigint AS amount
    UNION ALL SELECT lower(state), keyset, sum(amount) FROM mint_proofs GROUP BY state, keyset
    UNION ALL SELECT 'signed', keyset, sum(amount) FROM mint_promises GROUP BY keyset
    UNION ALL SELECT 'unissued', '', sum(amount) FROM mint_quotes WHERE state = 'PAID'
    UNION ALL SELECT 'fees_msat', '', sum(msat) FROM mint_fees
    UNION ALL SELECT 'l3_msat', '', sum(value_msat) FROM mint_withdrawals
) s
WHERE amount IS NOT NULL AND NOT EXISTS (SELECT 1 FROM mint_totals WHERE kind = 'tracked');
"""


class MeltStarted(Exception):
    """A melt request whose inputs are the very proofs its quote holds: it was made
    before (its answer lost, or the request run again after a deadlock), and is answered
    with the quote as it stands (NUT-19), never refused as "pending" or "paid"."""


async def _holds(conn: asyncpg.Connection, quote: str, inputs: Sequence[nut.Proof]) -> bool:
    """Whether ``inputs`` are exactly the proofs melt ``quote`` reserved."""
    rows = await conn.fetch("SELECT secret, c FROM mint_proofs WHERE reserved_by = $1", quote)
    return bool(rows) and {(r["secret"], r["c"]) for r in rows} == {(p.secret, p.C) for p in inputs}


def _proofs(state: str, reserved_by: str) -> str:
    """The rows of ``INSERT INTO mint_proofs`` from ``_proof_columns`` ($1 to $6), in
    Y's order."""
    return (
        "(y, keyset, amount, secret, c, witness, state, reserved_by)"
        f" SELECT y, k, a, s, c, w, {state}, {reserved_by} FROM unnest($1::bytea[],"
        " $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[])"
        " AS t(y, k, a, s, c, w) ORDER BY y"
    )


def _promises(first: int) -> str:
    """The rows of ``INSERT INTO mint_promises`` from ``_promise_columns`` (from
    ``$first``), in B_'s order."""
    a, b, c, d, e, f = (f"${first + i}" for i in range(6))
    return (
        "(b_, keyset, amount, c_, e, s)"
        f" SELECT * FROM unnest({a}::bytea[], {b}::text[], {c}::bigint[], {d}::text[],"
        f" {e}::text[], {f}::text[]) AS t(b, k, a, c, e, s) ORDER BY b"
    )


# a group of swaps in one statement: it fails as a whole (a unique violation) where one
# proof was seen or one output signed before. Its two inserts run in PostgreSQL's order,
# not ours: it and a group's transaction (proofs, then outputs) that share a proof and an
# output (one request sent twice at once) may deadlock, which PostgreSQL breaks (a
# second later), and their swaps go again, each alone
_SPENT_ROWS = _proofs("'SPENT'", "NULL")
SWAP_GROUP = (
    f"WITH proofs AS (INSERT INTO mint_proofs {_SPENT_ROWS}),"
    f" promises AS (INSERT INTO mint_promises {_promises(7)})"
    " INSERT INTO mint_fees (kind, msat) SELECT 'swap', f FROM unnest($13::bigint[]) AS f"
    " WHERE f > 0"
)


@dataclass
class _Swap:
    """A swap waiting for its group's transaction."""

    spend: m.Spend
    request: nut.SwapRequest
    blinded: list[bytes]
    signatures: list[nut.BlindSignature]
    done: asyncio.Future[list[nut.BlindSignature]]

    @property
    def items(self) -> int:
        return len(self.spend.ys) + len(self.blinded)


async def _keep_session(_: asyncpg.Connection) -> None:
    """A pooled connection goes back as it is (an open transaction is still rolled
    back): the mint sets nothing on them that a reset would undo (no LISTEN, settings
    or advisory lock outlives the call that made it), so it saves that round trip."""


def _states(rows: Sequence[asyncpg.Record]) -> dict[bytes, str]:
    return {bytes(r["y"]): r["state"] for r in rows}


def _seen_error(states: dict[bytes, str]) -> m.CashuError:
    """Proofs seen before: reserved by an operation in flight (11002), or spent."""
    if "PENDING" in states.values():
        return m.CashuError(m.PENDING, "a proof is reserved by a melt or redemption in flight")
    return m.CashuError(m.SPENT, "proofs already spent")


def _fail(group: list[_Swap], exc: Exception) -> None:
    for e in group:
        if not e.done.done():
            e.done.set_exception(exc)


def _proof_columns(ys: Sequence[bytes], proofs: Sequence[nut.Proof]) -> list[Sequence[Any]]:
    return [
        ys,
        [p.id for p in proofs],
        [p.amount for p in proofs],
        [p.secret for p in proofs],
        [p.C for p in proofs],
        [p.witness for p in proofs],
    ]


def _promise_columns(
    blinded: Sequence[bytes], signatures: Sequence[nut.BlindSignature]
) -> list[Sequence[Any]]:
    return [
        blinded,
        [s.id for s in signatures],
        [s.amount for s in signatures],
        [s.C_ for s in signatures],
        [s.dleq.e for s in signatures],
        [s.dleq.s for s in signatures],
    ]


async def _insert_proofs(
    conn: asyncpg.Connection,
    ys: Sequence[bytes],
    proofs: Sequence[nut.Proof],
    state: str,
    reserved_by: str | None,
) -> set[bytes]:
    """Insert the proofs not seen before; the Ys inserted. Rows go in by Y, so that two
    transactions sharing proofs wait for each other in one order and never deadlock."""
    rows = await conn.fetch(
        f"INSERT INTO mint_proofs {_proofs('$7', '$8')} ON CONFLICT (y) DO NOTHING RETURNING y",
        *_proof_columns(ys, proofs),
        state,
        reserved_by,
    )
    return {bytes(r["y"]) for r in rows}


async def _insert_promises(
    conn: asyncpg.Connection,
    blinded: Sequence[bytes],
    signatures: Sequence[nut.BlindSignature],
) -> set[bytes]:
    """Record blind signatures of outputs not signed before; the B_s recorded (in B_'s
    order, as proofs go in by Y)."""
    rows = await conn.fetch(
        f"INSERT INTO mint_promises {_promises(1)} ON CONFLICT (b_) DO NOTHING RETURNING b_",
        *_promise_columns(blinded, signatures),
    )
    return {bytes(r["b_"]) for r in rows}


async def _recorded(
    conn: asyncpg.Connection, blinded: Sequence[bytes]
) -> dict[bytes, nut.BlindSignature]:
    """The blind signatures recorded of ``blinded``, by B_ (those signed)."""
    rows = await conn.fetch(
        "SELECT * FROM mint_promises WHERE b_ = ANY($1::bytea[])", list(blinded)
    )
    return {
        bytes(r["b_"]): nut.BlindSignature(
            r["amount"], r["keyset"], r["c_"], nut.Dleq(r["e"], r["s"])
        )
        for r in rows
    }


def _reserved_columns(
    outputs: Sequence[nut.BlindedMessage],
) -> tuple[list[bytes], list[str], list[int]]:
    return (
        [bytes.fromhex(o.B_) for o in outputs],
        [o.id for o in outputs],
        [o.amount for o in outputs],
    )


async def _reserved_as(
    conn: asyncpg.Connection, txid: bytes, outputs: Sequence[nut.BlindedMessage]
) -> int:
    """How many of ``outputs`` are reserved for withdrawal ``txid`` as their keyset and
    amount (as anything, where a reservation from before those were kept)."""
    blinded, keysets, amounts = _reserved_columns(outputs)
    found: int = await conn.fetchval(
        "SELECT count(*) FROM mint_withdraw_outputs w"
        " JOIN unnest($1::bytea[], $3::text[], $4::bigint[]) AS t(b, k, a)"
        " ON w.b_ = t.b AND (w.keyset IS NULL OR (w.keyset = t.k AND w.amount = t.a))"
        " WHERE w.txid = $2",
        blinded,
        txid,
        keysets,
        amounts,
    )
    return found


async def _refuse_paid_or_paying(conn: asyncpg.Connection, payment_hash: str) -> None:
    """Refuse a melt of an invoice that another quote paid (20006) or is paying (20005)."""
    state = await conn.fetchval(
        "SELECT state FROM melt_quotes WHERE payment_hash = $1 AND state <> 'UNPAID'",
        payment_hash,
    )
    if state == m.MELT_PAID:
        raise m.CashuError(m.INVOICE_PAID, "this invoice is paid already")
    if state is not None:
        raise m.CashuError(m.QUOTE_PENDING, "another quote of this invoice is paying it")


@dataclass(frozen=True)
class PayeeLimit:
    """Melts to one payee (the node that signed the invoice) in flight at once: at most
    ``held`` pending longer than ``held_after_s`` (past a pay call: the payee holds
    their HTLCs, for hours maybe, each keeping a held payment's place at the node), and
    ``in_flight`` in all (a burst, all held a pay call later)."""

    held: int
    held_after_s: float
    in_flight: int


async def _refuse_busy_payee(conn: asyncpg.Connection, payee: str, limit: PayeeLimit) -> None:
    """Refuse a melt to ``payee`` past ``limit``. The melts of one payee start one at a
    time (a lock until the transaction ends), so that two at once never both count one
    less than the limit."""
    assert limit.held >= 1 and limit.in_flight >= limit.held
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"payee:{payee}")
    in_flight, held = await conn.fetchrow(
        "SELECT count(*), count(*) FILTER (WHERE pending_since < extract(epoch FROM now()) - $2)"
        " FROM melt_quotes WHERE payee = $1 AND state = 'PENDING'",
        payee,
        limit.held_after_s,
    )
    if held >= limit.held or in_flight >= limit.in_flight:
        raise m.CashuError(
            m.PAYMENT_FAILED,
            f"{in_flight} payments to this payee are in flight ({held} of them held by the"
            " payee): retry once one of them ends",
        )


def _keysets(master: bytes, rows: Sequence[asyncpg.Record]) -> list[Keyset]:
    found = []
    for r in rows:
        k = Keyset.derive(master, r["unit"], r["idx"], r["input_fee_ppk"])
        assert k.id == r["id"], "a stored keyset id that its keys do not make"
        found.append(Keyset(k.unit, k.index, k.input_fee_ppk, k.secrets, r["active"]))
    return found


class MintStore:
    def __init__(self, pool: asyncpg.Pool, grouped: Callable[[int], None] = lambda _: None) -> None:
        self.pool = pool
        self.grouped = grouped  # told how many swaps each group committed
        self._swaps: deque[_Swap] = deque()  # waiting for a group
        self._groups: set[asyncio.Task[None]] = set()

    @staticmethod
    async def open(url: str, grouped: Callable[[int], None] = lambda _: None) -> MintStore:
        pool = await asyncpg.create_pool(url, min_size=2, max_size=16, reset=_keep_session)
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
            await conn.execute(SCHEMA)
        return MintStore(pool, grouped)

    async def close(self) -> None:
        await asyncio.gather(*self._groups)
        await self.pool.close()

    # -- keys ----------------------------------------------------------------------------

    async def master(self, storage_key: bytes) -> bytes:
        """The mint's master secret, made (and stored sealed) the first time."""
        fresh = os.urandom(32)
        async with self.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO mint_master VALUES (1, $1) ON CONFLICT DO NOTHING",
                seal(storage_key, "mint master", fresh),
            )
            sealed = await conn.fetchval("SELECT sealed FROM mint_master WHERE id = 1")
        return unseal(storage_key, "mint master", bytes(sealed))

    async def keysets(self, master: bytes, unit: str, input_fee_ppk: int) -> list[Keyset]:
        """Every keyset; the first time, keyset 0 of ``unit``. A keyset whose fee is not
        ``input_fee_ppk`` any more is retired and the next made (a rotation)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("LOCK TABLE mint_keysets IN EXCLUSIVE MODE")
            rows = await conn.fetch("SELECT * FROM mint_keysets ORDER BY unit, idx")
            current = [r for r in rows if r["unit"] == unit and r["active"]]
            if not current or current[-1]["input_fee_ppk"] != input_fee_ppk:
                idx = max((r["idx"] for r in rows if r["unit"] == unit), default=-1) + 1
                fresh = Keyset.derive(master, unit, idx, input_fee_ppk)
                await conn.execute("UPDATE mint_keysets SET active = false WHERE unit = $1", unit)
                await conn.execute(
                    "INSERT INTO mint_keysets (id, unit, idx, input_fee_ppk, active)"
                    " VALUES ($1, $2, $3, $4, true)",
                    fresh.id,
                    unit,
                    idx,
                    input_fee_ppk,
                )
                rows = await conn.fetch("SELECT * FROM mint_keysets ORDER BY unit, idx")
        return _keysets(master, rows)

    async def stored_keysets(self, master: bytes) -> list[Keyset]:
        """Every keyset as stored (another mint process may have rotated them)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch("SELECT * FROM mint_keysets ORDER BY unit, idx")
        return _keysets(master, rows)

    # -- spending and signing ------------------------------------------------------------

    async def _spend(
        self,
        conn: asyncpg.Connection,
        spend: m.Spend,
        proofs: Sequence[nut.Proof],
        state: str,
        reserved_by: str | None,
    ) -> None:
        """Record the proofs (SPENT, or PENDING for a melt or redemption in flight); a
        proof seen before refuses the whole operation (the caller's transaction rolls
        back)."""
        inserted = await _insert_proofs(conn, spend.ys, proofs, state, reserved_by)
        if len(inserted) != len(spend.ys):
            seen = [y for y in spend.ys if y not in inserted]
            rows = await conn.fetch(
                "SELECT y, state FROM mint_proofs WHERE y = ANY($1::bytea[])", seen
            )
            raise _seen_error(_states(rows))

    async def record_signatures(
        self,
        conn: asyncpg.Connection,
        outputs: Sequence[nut.BlindedMessage],
        signatures: Sequence[nut.BlindSignature],
    ) -> None:
        blinded = [bytes.fromhex(o.B_) for o in outputs]
        if len(await _insert_promises(conn, blinded, signatures)) != len(outputs):
            raise m.CashuError(m.OUTPUTS_SIGNED, "outputs already signed")

    async def swap(
        self,
        spend: m.Spend,
        outputs: m.Outputs,
        request: nut.SwapRequest,
        signatures: list[nut.BlindSignature],
    ) -> list[nut.BlindSignature]:
        """Spend the inputs and record the outputs' ``signatures`` (``outputs``: as the
        rules checked them; signed ahead, outside the transaction, they go back only
        once the spend commits), in the next group's transaction."""
        done: asyncio.Future[list[nut.BlindSignature]] = asyncio.get_running_loop().create_future()
        self._swaps.append(_Swap(spend, request, outputs.blinded, signatures, done))
        if sum(not t.done() for t in self._groups) < SWAP_GROUPS:
            task = asyncio.create_task(self._swap_groups())
            self._groups.add(task)
            task.add_done_callback(self._groups.discard)
        return await done

    async def _swap_groups(self) -> None:
        """Commit groups of waiting swaps until none waits."""
        while self._swaps:
            group = self._next_group()
            try:
                await self._commit_swaps(group)
            finally:  # stopped (cancelled) on the way: what became of them is not known
                for e in group:
                    if not e.done.done():
                        e.done.set_exception(asyncpg.InterfaceError("the mint is stopping"))

    def _next_group(self) -> list[_Swap]:
        """The waiting swaps that go together next, in order, up to ``SWAP_GROUP_ITEMS``:
        one that shares a proof or an output with an earlier one of the group waits for a
        later group; one whose request was given up (cancelled) is dropped."""
        group: list[_Swap] = []
        later: list[_Swap] = []
        ys: set[bytes] = set()
        blinded: set[bytes] = set()
        items = 0
        while self._swaps and (not group or items + self._swaps[0].items <= SWAP_GROUP_ITEMS):
            e = self._swaps.popleft()
            if e.done.done():
                continue
            if ys.isdisjoint(e.spend.ys) and blinded.isdisjoint(e.blinded):
                group.append(e)
                ys.update(e.spend.ys)
                blinded.update(e.blinded)
                items += e.items
            else:
                later.append(e)
        self._swaps.extendleft(reversed(later))
        return group

    async def _commit_swaps(self, group: list[_Swap]) -> None:
        """``group`` in one transaction; where PostgreSQL refused it (rolled back: one
        swap's data it does not take, a deadlock), each swap again alone, so that one
        swap's failure is not the others'."""
        if not group:
            return
        try:
            await self._swap_group(group)
        except asyncpg.PostgresError as exc:
            if len(group) == 1 or isinstance(exc, asyncpg.PostgresConnectionError):
                _fail(group, exc)
            else:
                for e in group:
                    await self._commit_swaps([e])
        except Exception as exc:  # a broken connection: the commit's fate is not known
            _fail(group, exc)

    async def _swap_group(self, group: list[_Swap]) -> None:
        """Swaps that share no proof and no output, each one all or nothing: first all in
        one statement (its own transaction, one round trip); where a proof was seen or an
        output signed before, that statement changed nothing, and a transaction finds
        which swaps to refuse (``_sort_group``)."""
        signatures = [s for e in group for s in e.signatures]
        try:
            async with self.pool.acquire() as conn:
                await conn.execute(
                    SWAP_GROUP,
                    *_proof_columns(
                        [y for e in group for y in e.spend.ys],
                        [p for e in group for p in e.request.inputs],
                    ),
                    *_promise_columns([b for e in group for b in e.blinded], signatures),
                    [e.spend.fee * 1000 for e in group],
                )
            refused: dict[int, m.CashuError] = {}
        except asyncpg.UniqueViolationError:
            refused = await self._sort_group(group)
        for i, e in enumerate(group):
            if not e.done.done():
                if i in refused:
                    e.done.set_exception(refused[i])
                else:
                    e.done.set_result(e.signatures)
        self.grouped(len(group))

    async def _sort_group(self, group: list[_Swap]) -> dict[int, m.CashuError]:
        """``group`` in one transaction where some of its swaps are refused: those
        swaps (by index in the group) with why, the others committed."""
        refused: dict[int, m.CashuError] = {}
        async with self.pool.acquire() as conn, conn.transaction():
            inserted = await _insert_proofs(
                conn,
                [y for e in group for y in e.spend.ys],
                [p for e in group for p in e.request.inputs],
                "SPENT",
                None,
            )
            if len(inserted) < sum(len(e.spend.ys) for e in group):
                states = _states(
                    await conn.fetch(
                        "SELECT y, state FROM mint_proofs WHERE y = ANY($1::bytea[])",
                        [y for e in group for y in e.spend.ys if y not in inserted],
                    )
                )
                for i, e in enumerate(group):
                    if seen := {y: states.get(y, "SPENT") for y in e.spend.ys if y not in inserted}:
                        refused[i] = _seen_error(seen)
            kept = [e for i, e in enumerate(group) if i not in refused]
            fresh: set[bytes] = set()
            if kept:
                fresh = await _insert_promises(
                    conn,
                    [b for e in kept for b in e.blinded],
                    [s for e in kept for s in e.signatures],
                )
            for i, e in enumerate(group):
                if i not in refused and not fresh.issuperset(e.blinded):
                    refused[i] = m.CashuError(m.OUTPUTS_SIGNED, "outputs already signed")
            # what the refused swaps inserted goes: as if they never came
            if gone := [y for i in refused for y in group[i].spend.ys if y in inserted]:
                await conn.execute("DELETE FROM mint_proofs WHERE y = ANY($1::bytea[])", gone)
            if gone := [b for i in refused for b in group[i].blinded if b in fresh]:
                await conn.execute("DELETE FROM mint_promises WHERE b_ = ANY($1::bytea[])", gone)
            fees = [e.spend.fee * 1000 for i, e in enumerate(group) if i not in refused]
            if any(fees):
                await conn.execute(
                    "INSERT INTO mint_fees (kind, msat)"
                    " SELECT 'swap', f FROM unnest($1::bigint[]) AS f WHERE f > 0",
                    fees,
                )
        return refused

    async def states(self, ys: Sequence[bytes]) -> dict[bytes, tuple[str, str | None]]:
        """Each proof seen: its state, and the witness that spent it (NUT-07; None while
        it is not SPENT: a wallet reads a witness as the proof spent)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT y, state, witness FROM mint_proofs WHERE y = ANY($1::bytea[])", list(ys)
            )
        return {
            bytes(r["y"]): (r["state"], r["witness"] if r["state"] == "SPENT" else None)
            for r in rows
        }

    async def restore(self, blinded: Sequence[bytes]) -> dict[bytes, nut.BlindSignature]:
        async with self.pool.acquire() as conn:
            return await _recorded(conn, blinded)

    # -- mint quotes -------------------------------------------------------------------

    async def add_mint_quote(self, q: m.MintQuote) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO mint_quotes (quote, request, payment_hash, amount, unit, state,"
                " expiry, pubkey) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                *asdict(q).values(),
            )

    async def mint_quote(self, quote: str) -> m.MintQuote | None:
        async with self.pool.acquire() as conn:
            r = await conn.fetchrow("SELECT * FROM mint_quotes WHERE quote = $1", quote)
        return _quote(m.MintQuote, r) if r else None

    async def paid(
        self, payment_hash: str, pay_index: int, received_msat: int | None
    ) -> str | None:
        """An invoice was paid: its quote becomes PAID (once), what was paid beyond its
        amount (BOLT11 allows it) is booked as the mint's, and the stream's cursor
        moves (``pay_index`` 0: a look-up, not the stream)."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "UPDATE mint_quotes SET state = 'PAID' WHERE payment_hash = $1"
                " AND state = 'UNPAID' RETURNING quote, amount",
                payment_hash,
            )
            extra = (received_msat or 0) - row["amount"] * 1000 if row else 0
            if extra > 0:
                await conn.execute(
                    "INSERT INTO mint_fees (kind, msat) VALUES ('overpaid', $1)", extra
                )
            await conn.execute(
                "INSERT INTO mint_cursor VALUES (1, $1) ON CONFLICT (id) DO UPDATE"
                " SET pay_index = greatest(mint_cursor.pay_index, $1)",
                pay_index,
            )
        return str(row["quote"]) if row else None

    async def pay_index(self) -> int:
        async with self.pool.acquire() as conn:
            return int(await conn.fetchval("SELECT pay_index FROM mint_cursor") or 0)

    async def mint(
        self,
        request: nut.MintRequest,
        check: Callable[[m.MintQuote], Any],
        sign: Sign,
    ) -> list[nut.BlindSignature]:
        async with self.pool.acquire() as conn, conn.transaction():
            r = await conn.fetchrow(
                "SELECT * FROM mint_quotes WHERE quote = $1 FOR UPDATE", request.quote
            )
            if r is None:
                raise m.CashuError(m.QUOTE_UNPAID, f"no quote {request.quote[:64]!r}")
            check(_quote(m.MintQuote, r))
            signatures = await sign(request.outputs)
            await self.record_signatures(conn, request.outputs, signatures)
            await conn.execute(
                "UPDATE mint_quotes SET state = 'ISSUED' WHERE quote = $1", request.quote
            )
        return signatures

    # -- melt quotes -------------------------------------------------------------------

    async def add_melt_quote(self, q: m.MeltQuote, payee: str | None = None) -> None:
        """Store a new melt quote; ``payee``: the node its invoice pays (bolt11)."""
        async with self.pool.acquire() as conn:
            await _refuse_paid_or_paying(conn, q.payment_hash)  # no quote to melt in vain
            await conn.execute(
                "INSERT INTO melt_quotes (quote, request, payment_hash, amount, fee_reserve,"
                " unit, state, expiry, preimage, fee_paid, amount_msat, method, payee)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
                *asdict(q).values(),
                payee,
            )

    async def melt_quote(
        self, quote: str, method: str
    ) -> tuple[m.MeltQuote, list[nut.BlindSignature]] | None:
        """A melt quote of ``method`` and its change, if there is one."""
        async with self.pool.acquire() as conn:
            r = await conn.fetchrow(
                "SELECT * FROM melt_quotes WHERE quote = $1 AND method = $2", quote, method
            )
        return (_quote(m.MeltQuote, r), _change(r)) if r else None

    async def start_melt(
        self,
        request: nut.MeltRequest,
        method: str,
        check: Callable[[m.MeltQuote], tuple[m.Spend, int]],
        per_payee: PayeeLimit | None = None,
    ) -> tuple[m.MeltQuote, int]:
        """Reserve the inputs (PENDING) and mark the quote (of ``method``) PENDING, in
        one transaction: from here the payment may go out. Returns the quote and the
        attempt's number. ``per_payee``: refused where the quote's payee has as many
        melts in flight as it allows."""
        async with self.pool.acquire() as conn, conn.transaction():
            r = await conn.fetchrow(
                "SELECT * FROM melt_quotes WHERE quote = $1 AND method = $2 FOR UPDATE",
                request.quote,
                method,
            )
            if r is None:
                raise m.CashuError(m.QUOTE_UNPAID, f"no {method} quote {request.quote[:64]!r}")
            quote = _quote(m.MeltQuote, r)
            if quote.state != m.MELT_UNPAID and await _holds(conn, quote.quote, request.inputs):
                raise MeltStarted(quote.quote)
            spend, _ = check(quote)
            if per_payee is not None and r["payee"] is not None:
                await _refuse_busy_payee(conn, r["payee"], per_payee)
            blanks = [bytes.fromhex(o.B_) for o in request.outputs or []]
            if blanks and await conn.fetchval(
                "SELECT 1 FROM mint_promises WHERE b_ = ANY($1::bytea[])", blanks
            ):
                raise m.CashuError(m.OUTPUTS_SIGNED, "a blank output is signed already")
            await self._spend(conn, spend, request.inputs, "PENDING", quote.quote)
            await _refuse_paid_or_paying(conn, quote.payment_hash)
            try:
                attempt = await conn.fetchval(
                    "UPDATE melt_quotes SET state = 'PENDING', attempt = attempt + 1,"
                    " unsent_attempt = attempt + 1, blanks = $2,"
                    " pending_since = extract(epoch FROM now())"
                    " WHERE quote = $1 RETURNING attempt",
                    quote.quote,
                    nut.encode(request.outputs or []).decode(),
                )
            except asyncpg.UniqueViolationError:  # another quote of it, at the same time
                raise m.CashuError(
                    m.QUOTE_PENDING, "another quote of this invoice is paying it"
                ) from None
        return quote, int(attempt)

    async def finish_melt(
        self,
        quote: str,
        attempt: int,
        preimage: str,
        sent_msat: int,
        sign: Sign,
    ) -> bool:
        """Attempt ``attempt``'s payment settled, ``sent_msat`` leaving the node (the
        invoice and the routing fee): the reserved proofs are spent, the quote PAID, the
        change (NUT-08) signed on the attempt's blank outputs, and what the mint kept
        booked as its fee, once (for a melt settled already, or another attempt,
        nothing changes). Whether it was so."""
        async with self.pool.acquire() as conn, conn.transaction():
            r = await conn.fetchrow("SELECT * FROM melt_quotes WHERE quote = $1 FOR UPDATE", quote)
            assert r is not None
            if r["state"] != m.MELT_PENDING or r["attempt"] != attempt:
                return False
            blanks = nut.decode((r["blanks"] or "[]").encode(), list[nut.BlindedMessage])
            reserved = await conn.fetchval(
                "SELECT coalesce(sum(amount), 0) FROM mint_proofs WHERE reserved_by = $1"
                " AND state = 'PENDING'",
                quote,
            )
            ppk = await conn.fetchval(
                "SELECT coalesce(sum(k.input_fee_ppk), 0) FROM mint_proofs p"
                " JOIN mint_keysets k ON k.id = p.keyset WHERE p.reserved_by = $1",
                quote,
            )
            fee = input_fee([int(ppk)])
            fee_paid = max(0, -(-(sent_msat - r["amount_msat"]) // 1000))
            overpaid = int(reserved) - r["amount"] - fee_paid - fee
            assert overpaid >= 0, "a melt paid more than its inputs"
            taken = await conn.fetch(  # signed since the melt began: no change on those
                "SELECT b_ FROM mint_promises WHERE b_ = ANY($1::bytea[])",
                [bytes.fromhex(b.B_) for b in blanks],
            )
            used = {bytes(t["b_"]) for t in taken}
            outputs = m.change(overpaid, [b for b in blanks if bytes.fromhex(b.B_) not in used])
            # the proofs, then the signatures: the order of a group of swaps, whose totals
            # rows (``mint_count``) a melt may share (else a deadlock aborts one of them)
            await conn.execute(
                "UPDATE mint_proofs SET state = 'SPENT' WHERE reserved_by = $1", quote
            )
            change = await sign(outputs) if outputs else []
            if outputs:
                await self.record_signatures(conn, outputs, change)
            kept = (int(reserved) - sum(o.amount for o in outputs)) * 1000 - sent_msat
            await conn.execute("INSERT INTO mint_fees (kind, msat) VALUES ('melt', $1)", kept)
            await conn.execute(
                "UPDATE melt_quotes SET state = 'PAID', preimage = $2, fee_paid = $3,"
                " change = $4 WHERE quote = $1",
                quote,
                preimage,
                fee_paid,
                nut.encode(change).decode(),
            )
        return True

    async def may_pay(self, quote: str, attempt: int, window_s: float) -> bool:
        """Whether attempt ``attempt`` of melt ``quote`` may still send its payment: it is
        the quote's attempt in flight, begun less than ``window_s`` ago on the database's
        clock (the resolver's fence counts from there, on the same clock). Where it may,
        that is recorded (``fail_unsent`` no longer fails it)."""
        async with self.pool.acquire() as conn:
            return bool(
                await conn.fetchval(
                    "UPDATE melt_quotes SET unsent_attempt = NULL"
                    " WHERE quote = $1 AND state = 'PENDING' AND attempt = $2"
                    " AND extract(epoch FROM clock_timestamp()) - pending_since < $3"
                    " RETURNING true",
                    quote,
                    attempt,
                    window_s,
                )
            )

    async def fail_unsent(self, quote: str, attempt: int, window_s: float) -> bool:
        """Fail attempt ``attempt`` of melt ``quote`` (its proofs free again, the quote
        UNPAID) where it was never given leave to send (``may_pay``) and can be no more
        (begun ``window_s`` or longer ago): its payment was never sent, whatever the node
        says of its hash. Whether it was failed; under the row's lock, so a ``may_pay``
        that gives leave is either before (nothing failed) or after (no leave)."""
        async with self.pool.acquire() as conn, conn.transaction():
            unsent = await conn.fetchval(
                "SELECT true FROM melt_quotes WHERE quote = $1 AND state = 'PENDING'"
                " AND attempt = $2 AND unsent_attempt = $2"
                " AND extract(epoch FROM clock_timestamp()) - pending_since >= $3 FOR UPDATE",
                quote,
                attempt,
                window_s,
            )
            if not unsent:
                return False
            await _free_melt(conn, quote)
            return True

    async def fail_melt(self, quote: str, attempt: int, onchain: bool = False) -> bool:
        """Attempt ``attempt``'s payment failed, for certain: its reserved proofs are free
        again, the quote UNPAID. Whether it was so: not for another attempt or one
        resolved, nor, where ``onchain``, for a melt whose withdrawal was recorded
        meanwhile (from its record on, a withdrawal is sent, never refunded)."""
        async with self.pool.acquire() as conn, conn.transaction():
            r = await conn.fetchrow(
                "SELECT state, attempt FROM melt_quotes WHERE quote = $1 FOR UPDATE", quote
            )
            if r is None or r["state"] != m.MELT_PENDING or r["attempt"] != attempt:
                return False
            # (recorded under the same row lock: committed before this one was taken)
            if onchain and await conn.fetchval(
                "SELECT true FROM chain_withdrawals WHERE quote = $1", quote
            ):
                return False
            await _free_melt(conn, quote)
            return True

    async def pending_melts(
        self, method: str
    ) -> tuple[float, list[tuple[m.MeltQuote, int, float, bool]]]:
        """The database's time now, and each melt in flight paid by ``method``: its
        quote, attempt, since when (unix seconds, on the database's clock), and whether
        the attempt has not been given leave to send (``may_pay``) yet."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            now = await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())")
            rows = await conn.fetch(
                "SELECT * FROM melt_quotes WHERE state = 'PENDING' AND method = $1", method
            )
        melts = [
            (
                _quote(m.MeltQuote, r),
                r["attempt"],
                r["pending_since"],
                r["unsent_attempt"] == r["attempt"],
            )
            for r in rows
        ]
        return float(now), melts

    # -- the bridge to L3 --------------------------------------------------------------

    async def start_redeem(
        self, rid: bytes, spend: m.Spend, proofs: Sequence[nut.Proof], row: Redeem
    ) -> Redeem:
        """Reserve the proofs for redemption ``rid`` and record it, in one transaction;
        a redemption recorded already (a retry) is returned as it is, spending nothing."""
        async with self.pool.acquire() as conn, conn.transaction():
            found = await conn.fetchrow("SELECT * FROM mint_redeems WHERE id = $1", rid)
            if found is not None:
                return _redeem(found)
            await self._spend(conn, spend, proofs, "PENDING", f"redeem:{rid.hex()}")
            await conn.execute(
                "INSERT INTO mint_redeems VALUES ($1, $2, $3, $4, $5, 'PENDING')",
                rid,
                row.address,
                row.value_msat,
                row.fee_msat,
                row.issuance,
            )
        return row

    async def finish_redeem(self, rid: bytes) -> None:
        """The coin is issued: the proofs are spent and the fee booked, once."""
        async with self.pool.acquire() as conn, conn.transaction():
            r = await conn.fetchrow("SELECT * FROM mint_redeems WHERE id = $1 FOR UPDATE", rid)
            if r is None or r["state"] == "DONE":
                return
            await conn.execute(
                "UPDATE mint_proofs SET state = 'SPENT' WHERE reserved_by = $1",
                f"redeem:{rid.hex()}",
            )
            if r["fee_msat"]:
                await conn.execute(
                    "INSERT INTO mint_fees (kind, msat) VALUES ('redeem', $1)", r["fee_msat"]
                )
            await conn.execute("UPDATE mint_redeems SET state = 'DONE' WHERE id = $1", rid)

    async def fail_redeem(self, rid: bytes) -> None:
        """The ledger refused the issuance: the proofs are free, the redemption gone."""
        async with self.pool.acquire() as conn, conn.transaction():
            state = await conn.fetchval(
                "SELECT state FROM mint_redeems WHERE id = $1 FOR UPDATE", rid
            )
            if state != "PENDING":
                return
            await conn.execute(
                "DELETE FROM mint_proofs WHERE reserved_by = $1", f"redeem:{rid.hex()}"
            )
            await conn.execute("DELETE FROM mint_redeems WHERE id = $1", rid)

    async def send_redeem(self, rid: bytes, now: float) -> float | None:
        """Mark redemption ``rid``'s issuance sent (from ``now``, unix seconds) before it
        is sent; when it was first sent where it was before (None: this is its first)."""
        async with self.pool.acquire() as conn, conn.transaction():
            first: float | None = await conn.fetchval(
                "SELECT sent_at FROM mint_redeems WHERE id = $1 FOR UPDATE", rid
            )
            if first is None:
                await conn.execute("UPDATE mint_redeems SET sent_at = $2 WHERE id = $1", rid, now)
        return first

    async def pending_redeems(self) -> list[tuple[bytes, Redeem]]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch("SELECT * FROM mint_redeems WHERE state = 'PENDING'")
        return [(bytes(r["id"]), _redeem(r)) for r in rows]

    async def withdraw(
        self,
        txid: bytes,
        value_msat: int,
        outputs: Sequence[nut.BlindedMessage],
        sign: Sign,
    ) -> list[nut.BlindSignature]:
        """Ecash for L3 transaction ``txid`` (committed, paying the mint ``value_msat``):
        its outputs signed once; a retry with the same outputs gets the same signatures,
        with others nothing."""
        blinded = [bytes.fromhex(o.B_) for o in outputs]
        async with self.pool.acquire() as conn, conn.transaction():
            done = await conn.fetchval(
                "INSERT INTO mint_withdrawals (txid, value_msat, outputs) VALUES ($1, $2, $3)"
                " ON CONFLICT (txid) DO NOTHING RETURNING 1",
                txid,
                value_msat,
                blinded,
            )
            if done is not None:
                signatures = await sign(outputs)
                # the transaction is committed: its outputs are signed whatever happens.
                # Reserved before it was sent, none was signed before; one signed since
                # (the wallet gave its own output to a swap too) keeps its first record,
                # which is what this answers for it, as a restore (NUT-09) would
                fresh = await _insert_promises(conn, blinded, signatures)
                if len(fresh) < len(blinded):
                    kept = await _recorded(conn, [b for b in blinded if b not in fresh])
                    signatures = [
                        s if b in fresh else kept[b]
                        for b, s in zip(blinded, signatures, strict=True)
                    ]
                await conn.execute("DELETE FROM mint_withdraw_outputs WHERE txid = $1", txid)
                return signatures
        found = await self.withdrawn(txid, outputs)
        assert found is not None
        return found

    async def reserve_withdraw(self, txid: bytes, outputs: Sequence[nut.BlindedMessage]) -> None:
        """Reserve ``outputs`` (each B_ with its keyset and amount) for the withdrawal of
        transaction ``txid``, before it is first sent (a retry's are its own already);
        refused, nothing sent, where one was signed before, is another withdrawal's, or
        was reserved for this one as another keyset or amount."""
        blinded, keysets, amounts = _reserved_columns(outputs)
        async with self.pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(
                "SELECT 1 FROM mint_promises WHERE b_ = ANY($1::bytea[]) LIMIT 1", blinded
            ):
                raise m.CashuError(m.OUTPUTS_SIGNED, "outputs already signed")
            await conn.execute(
                "INSERT INTO mint_withdraw_outputs (b_, txid, keyset, amount)"
                " SELECT b, $2, k, a FROM unnest($1::bytea[], $3::text[], $4::bigint[])"
                " AS t(b, k, a) ORDER BY b ON CONFLICT (b_) DO NOTHING",
                blinded,
                txid,
                keysets,
                amounts,
            )
            if await conn.fetchval(
                "SELECT 1 FROM mint_withdraw_outputs"
                " WHERE b_ = ANY($1::bytea[]) AND txid <> $2 LIMIT 1",
                blinded,
                txid,
            ):
                raise m.CashuError(m.OUTPUTS_SIGNED, "outputs of another withdrawal")
            if await _reserved_as(conn, txid, outputs) != len(outputs):
                raise m.CashuError(
                    m.OUTPUTS_SIGNED,
                    "outputs reserved for this withdrawal as other keysets or amounts",
                )

    async def withdraw_reserved(self, txid: bytes, outputs: Sequence[nut.BlindedMessage]) -> bool:
        """Whether ``outputs`` are reserved for transaction ``txid``'s withdrawal, each as
        the same keyset and amount (it may have been sent: a retry)."""
        async with self.pool.acquire() as conn:
            return bool(outputs) and await _reserved_as(conn, txid, outputs) == len(outputs)

    async def release_withdraw(self, txid: bytes) -> None:
        """The ledger did not commit transaction ``txid``: its outputs are free again."""
        async with self.pool.acquire() as conn:
            await conn.execute("DELETE FROM mint_withdraw_outputs WHERE txid = $1", txid)

    async def withdrawn(
        self, txid: bytes, outputs: Sequence[nut.BlindedMessage]
    ) -> list[nut.BlindSignature] | None:
        """The signatures of transaction ``txid``'s withdrawal where it was made (a retry
        gets them again, whatever happened since), None where it was not; refused where
        it was made with other outputs."""
        blinded = [bytes.fromhex(o.B_) for o in outputs]
        async with self.pool.acquire() as conn:
            stored = await conn.fetchval(
                "SELECT outputs FROM mint_withdrawals WHERE txid = $1", txid
            )
        if stored is None:
            return None
        if [bytes(b) for b in stored] != blinded:
            raise m.CashuError(
                m.OUTPUTS_SIGNED, "this transaction was withdrawn with other outputs"
            )
        found = await self.restore(blinded)
        return [found[b] for b in blinded]

    # -- the books ---------------------------------------------------------------------

    async def books(self) -> MintBooks:
        async with self.pool.acquire() as conn:
            found = await mint_books(conn)
        assert found is not None
        return found

    async def outstanding(self) -> dict[str, int]:
        """Per keyset: what it signed minus what was spent from it (ecash out there)."""
        async with self.pool.acquire() as conn:
            ids = [r["id"] for r in await conn.fetch("SELECT id FROM mint_keysets")]
            total = await _totals(conn)
        return {k: total.get(("signed", k), 0) - total.get(("spent", k), 0) for k in ids}


@dataclass(frozen=True)
class Redeem:
    """A redemption: the coin's address and value, the fee kept, its issuance (hex)."""

    address: str
    value_msat: int
    fee_msat: int
    issuance: str


async def _free_melt(conn: asyncpg.Connection, quote: str) -> None:
    """A melt's reserved proofs free again, its quote UNPAID (its row locked)."""
    await conn.execute(
        "DELETE FROM mint_proofs WHERE reserved_by = $1 AND state = 'PENDING'", quote
    )
    await conn.execute("UPDATE melt_quotes SET state = 'UNPAID' WHERE quote = $1", quote)


def _redeem(r: asyncpg.Record) -> Redeem:
    return Redeem(r["address"], r["value_msat"], r["fee_msat"], r["issuance"])


@dataclass(frozen=True)
class MintBooks:
    """What the mint owes and kept, in msat (the reserve invariant's ecash terms)."""

    outstanding_msat: int  # ecash signed and not spent (proofs a melt reserved: included)
    unissued_msat: int  # mint quotes paid, their ecash not issued yet
    fees_msat: int  # kept: input fees and melt margins
    reserved_msat: int  # proofs reserved by melts and redemptions in flight
    l3_msat: int  # L3 coins the mint holds: paid to it for ecash (its own, no liability)
    chain_msat: int = 0  # the guild's on-chain coins the mint holds (``onchain.py``)
    chain_fees_msat: int = 0  # paid to miners from them: moves to a new guild key


async def mint_books(conn: asyncpg.Connection) -> MintBooks | None:
    """The mint's books from its running sums, or None where this database holds no mint."""
    if await conn.fetchval("SELECT to_regclass('mint_totals')") is None:
        return None
    total = await _totals(conn)

    def of(kind: str) -> int:
        return sum(v for (k, _), v in total.items() if k == kind)

    return MintBooks(
        (of("signed") - of("spent")) * 1000,
        of("unissued") * 1000,
        of("fees_msat"),
        of("pending") * 1000,
        of("l3_msat"),
        of("chain_sat") * 1000,
        of("chain_fees_sat") * 1000,
    )


async def _totals(conn: asyncpg.Connection) -> dict[tuple[str, str], int]:
    """The running sums by kind and keyset (one statement: one snapshot)."""
    rows = await conn.fetch(
        "SELECT kind, keyset, sum(amount) AS amount FROM mint_totals GROUP BY kind, keyset"
    )
    return {(r["kind"], r["keyset"]): int(r["amount"]) for r in rows}


Q = TypeVar("Q", m.MintQuote, m.MeltQuote)


def _quote(kind: type[Q], r: asyncpg.Record) -> Q:
    """A quote from its row (the columns bear its fields' names)."""
    return kind(**{f.name: r[f.name] for f in fields(kind)})


def _change(r: asyncpg.Record) -> list[nut.BlindSignature]:
    if not r["change"]:
        return []
    return nut.decode(r["change"].encode(), list[nut.BlindSignature])


async def listen_forever(
    url: str,
    handlers: dict[str, Callable[[str], None]],
    connected: Callable[[], Awaitable[None]],
) -> None:
    """Hand each notification of the tables' triggers to its channel's handler, on a
    connection of its own; where it breaks it is made again, and ``connected`` runs
    each time it is (what changed meanwhile was not heard: read it anew)."""
    while True:
        try:
            conn = await asyncpg.connect(url)
        except NOT_LISTENING as exc:
            log.warning("not listening", extra={"error": repr(exc)})
            await asyncio.sleep(RELISTEN_S)
            continue
        try:
            for channel, handler in handlers.items():
                await conn.add_listener(channel, _heard(handler))
            await connected()
            while True:  # a connection broken without a word (half-open) is found out too
                await asyncio.sleep(RELISTEN_S)
                await conn.execute("SELECT 1", timeout=ALIVE_S)
        except NOT_LISTENING as exc:
            log.warning("listening again", extra={"error": repr(exc)})
        finally:
            with contextlib.suppress(*NOT_LISTENING):
                await conn.close()


def _heard(handler: Callable[[str], None]) -> Callable[[Any, int, str, str], None]:
    return lambda _conn, _pid, _channel, payload: handler(payload)
