"""Settlement records in PostgreSQL: obligations to each peer, outputs pending from each,
and the state of each pair's machines (``constellation.settlement``).

* ``settle_owed``: what this operator owes a peer, one row per output paid from its
  ledger into the peer's, numbered per peer from 1 without gaps. Taken from the index's
  ``outbound`` rows (the ledger's committed outputs to other ledgers) in one transaction
  that marks them taken, so each becomes exactly one obligation.
* ``settle_pending``: outputs a peer paid into this ledger, as it announced them, with
  the coin each becomes here (``release_id``) and, once its batch is paid and the coin
  issued, the batch and the time.
* ``settle_state``: each machine's state, without the lists the two tables above hold.

One process settles for an operator at a time: the holder of a session advisory lock.
What it writes of the settlement's own (the machines' states, the obligations it takes)
goes through the lock's session, so a process that lost the lock writes none of it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from constellation.protocol.settlement import Entry
from services.database import DATABASE_DOWN

SCHEMA = """
CREATE TABLE IF NOT EXISTS settle_owed (
    peer       text     NOT NULL,
    seq        bigint   NOT NULL,
    coin_id    bytea    NOT NULL UNIQUE,
    txid       bytea    NOT NULL,
    owner      bytea    NOT NULL,
    value_msat numeric(20) NOT NULL,
    at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (peer, seq)
);
CREATE TABLE IF NOT EXISTS settle_pending (
    peer        text     NOT NULL,
    seq         bigint   NOT NULL,
    coin_id     bytea    NOT NULL,  -- the output's id in the payer's ledger
    txid        bytea    NOT NULL,
    owner       bytea    NOT NULL,
    value_msat  numeric(20) NOT NULL,
    release_id  bytea    NOT NULL UNIQUE,  -- the coin it becomes here
    at          timestamptz NOT NULL DEFAULT now(),
    batch       bigint,
    released_at timestamptz,
    PRIMARY KEY (peer, seq)
);
-- n: the order an address's payments are listed in (where the column is new, numbered)
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_name = 'settle_pending' AND column_name = 'n') THEN
        ALTER TABLE settle_pending ADD COLUMN n bigserial;
    END IF;
END $$;
DROP INDEX IF EXISTS settle_pending_owner;
CREATE INDEX IF NOT EXISTS settle_pending_by_owner ON settle_pending (owner, n);
CREATE INDEX IF NOT EXISTS settle_pending_unreleased ON settle_pending (owner, n)
    WHERE released_at IS NULL;
CREATE TABLE IF NOT EXISTS settle_state (
    role  text  NOT NULL,
    peer  text  NOT NULL,
    state bytea NOT NULL,
    PRIMARY KEY (role, peer)
);
"""

SCHEMA_LOCK = 7412
LEADER_LOCK = 7413
COMMAND_TIMEOUT_S = 30.0


def _entry(row: Any) -> Entry:
    return Entry(row["seq"], row["coin_id"], row["txid"], row["owner"], int(row["value_msat"]))


class LockLost(ConnectionError):
    """This process does not hold the settlement lock (its session ended, or it never
    took the lock): it writes nothing, and stands by as for its database down."""


class SettleStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._leader: asyncpg.Connection | None = None  # the lock's own session
        self._holds = False  # whether that session took the lock
        self._use = asyncio.Lock()  # one statement at a time on it

    @classmethod
    async def open(cls, dsn: str) -> SettleStore:
        pool = await asyncpg.create_pool(
            dsn, min_size=1, max_size=4, command_timeout=COMMAND_TIMEOUT_S
        )
        async with pool.acquire() as conn:
            await conn.execute(f"SELECT pg_advisory_lock({SCHEMA_LOCK})")
            try:
                await conn.execute(SCHEMA)
            finally:
                await conn.execute(f"SELECT pg_advisory_unlock({SCHEMA_LOCK})")
        return cls(pool)

    async def lead(self, dsn: str) -> bool:
        """Whether this process settles: it holds the lock on a connection of its own
        (a crashed holder's session ends, and its lock with it)."""
        async with self._use:
            if self._leader is None or self._leader.is_closed():
                self._leader = await asyncpg.connect(dsn, command_timeout=COMMAND_TIMEOUT_S)
            try:
                self._holds = bool(
                    await self._leader.fetchval(f"SELECT pg_try_advisory_lock({LEADER_LOCK})")
                )
            except DATABASE_DOWN:
                self._drop_leader()
                raise
            return self._holds

    async def still_leading(self) -> bool:
        """Whether this process holds the lock now: its session answers."""
        try:
            async with self._as_leader() as conn:
                await conn.fetchval("SELECT 1")
        except (*DATABASE_DOWN, asyncpg.PostgresError):  # LockLost among them
            return False
        return True

    @contextlib.asynccontextmanager
    async def _as_leader(self) -> AsyncIterator[asyncpg.Connection]:
        """The lock's own session, to one caller at a time; ``LockLost`` where this
        process does not hold the lock. A statement there runs only while the session
        holds the lock, and the session's end undoes a transaction it has not committed
        before it frees the lock: a successor, which loads the store once it holds the
        lock, sees everything this process wrote, and nothing is written after."""
        async with self._use:
            conn = self._leader
            if conn is None or conn.is_closed() or not self._holds:
                raise LockLost("this process does not hold the settlement lock")
            try:
                yield conn
            except (*DATABASE_DOWN, asyncpg.PostgresError):
                self._drop_leader()
                raise

    def _drop_leader(self) -> None:
        """The lock's connection failed: gone (asyncpg may not see it closed where its
        server died mid-statement), so that ``lead`` connects afresh."""
        self._holds = False
        if self._leader is not None:
            self._leader.terminate()
            self._leader = None

    # -- the payer's side -------------------------------------------------------------

    async def take(
        self, peers: dict[bytes, str], last: dict[str, int], limit: int
    ) -> list[tuple[str, Entry]]:
        """New obligations from the index's outputs to the ledgers of ``peers`` (by
        ledger id), oldest first: each numbered next for its peer after ``last`` (which
        it moves on), and marked taken, at once, only while this process holds the lock
        (the numbers follow its memory of what was taken)."""
        async with self._as_leader() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT coin_id, txid, ledger, owner, value_msat FROM outbound"
                " WHERE NOT taken AND ledger = ANY($1::bytea[])"
                " ORDER BY at, coin_id LIMIT $2 FOR UPDATE",
                list(peers),
                limit,
            )
            if not rows:
                return []
            last = dict(last)
            taken: list[tuple[str, Entry]] = []
            for r in rows:
                peer = peers[r["ledger"]]
                seq = last[peer] = last.get(peer, 0) + 1
                taken.append(
                    (peer, Entry(seq, r["coin_id"], r["txid"], r["owner"], int(r["value_msat"])))
                )
            await conn.execute(
                "INSERT INTO settle_owed (peer, seq, coin_id, txid, owner, value_msat)"
                " SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[], $4::bytea[],"
                " $5::bytea[], $6::numeric[])",
                [p for p, _ in taken],
                [e.seq for _, e in taken],
                [e.coin_id for _, e in taken],
                [e.txid for _, e in taken],
                [e.owner for _, e in taken],
                [e.value_msat for _, e in taken],
            )
            await conn.execute(
                "UPDATE outbound SET taken = true WHERE coin_id = ANY($1::bytea[])",
                [r["coin_id"] for r in rows],
            )
        return taken

    async def untaken(self) -> tuple[int, float]:
        """Outputs paid to other ledgers not yet obligations, and the oldest one's age."""
        row = await self.pool.fetchrow(
            "SELECT count(*) AS n, coalesce(extract(epoch FROM now() - min(at)), 0) AS age"
            " FROM outbound WHERE NOT taken"
        )
        return int(row["n"]), float(row["age"])

    async def owed(self, peer: str, after: int, limit: int) -> list[Entry]:
        rows = await self.pool.fetch(
            "SELECT seq, coin_id, txid, owner, value_msat FROM settle_owed"
            " WHERE peer = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            peer,
            after,
            limit,
        )
        return [_entry(r) for r in rows]

    # -- the payee's side -------------------------------------------------------------

    async def add_pending(self, peer: str, entries: list[tuple[Entry, bytes]]) -> None:
        """Outputs announced by ``peer``, each with the coin it becomes here (an entry
        held already is left as it is)."""
        await self.pool.execute(
            "INSERT INTO settle_pending (peer, seq, coin_id, txid, owner, value_msat,"
            " release_id) SELECT $1, * FROM unnest($2::bigint[], $3::bytea[], $4::bytea[],"
            " $5::bytea[], $6::numeric[], $7::bytea[]) ON CONFLICT (peer, seq) DO NOTHING",
            peer,
            [e.seq for e, _ in entries],
            [e.coin_id for e, _ in entries],
            [e.txid for e, _ in entries],
            [e.owner for e, _ in entries],
            [e.value_msat for e, _ in entries],
            [r for _, r in entries],
        )

    async def releases(self, peer: str, first: int, last: int) -> list[tuple[Entry, bytes]]:
        """Outputs ``first..last`` from ``peer``, each with the coin it becomes here."""
        rows = await self.pool.fetch(
            "SELECT seq, coin_id, txid, owner, value_msat, release_id FROM settle_pending"
            " WHERE peer = $1 AND seq BETWEEN $2 AND $3 ORDER BY seq",
            peer,
            first,
            last,
        )
        return [(_entry(r), bytes(r["release_id"])) for r in rows]

    async def pending(self, peer: str, after: int, upto: int | None = None) -> list[Entry]:
        rows = await self.pool.fetch(
            "SELECT seq, coin_id, txid, owner, value_msat FROM settle_pending"
            " WHERE peer = $1 AND seq > $2 AND seq <= $3 ORDER BY seq",
            peer,
            after,
            upto if upto is not None else 2**62,
        )
        return [_entry(r) for r in rows]

    async def released(self, peer: str, first: int, last: int, batch: int) -> None:
        await self.pool.execute(
            "UPDATE settle_pending SET batch = $4, released_at = now()"
            " WHERE peer = $1 AND seq BETWEEN $2 AND $3 AND released_at IS NULL",
            peer,
            first,
            last,
            batch,
        )

    async def incoming(
        self, owner: bytes, limit: int, before: int, unreleased: bool
    ) -> list[dict[str, Any]]:
        """Outputs paid into this ledger for ``owner``, newest first: ``limit`` of them
        before ``before`` (an output's ``n``), only those not marked released where
        ``unreleased``."""
        rows = await self.pool.fetch(
            "SELECT n, peer, coin_id, txid, value_msat, release_id, at, batch, released_at"
            " FROM settle_pending WHERE owner = $1 AND n < $2"
            + (" AND released_at IS NULL" if unreleased else "")
            + " ORDER BY n DESC LIMIT $3",
            owner,
            before,
            limit,
        )
        return [dict(r) for r in rows]

    async def by_release_id(self, coin_id: bytes) -> dict[str, Any] | None:
        row = await self.pool.fetchrow(
            "SELECT peer, coin_id, txid, value_msat, owner, at, batch, released_at"
            " FROM settle_pending WHERE release_id = $1",
            coin_id,
        )
        return dict(row) if row is not None else None

    # -- the machines' state ----------------------------------------------------------

    async def load_states(self) -> dict[tuple[str, str], bytes]:
        rows = await self.pool.fetch("SELECT role, peer, state FROM settle_state")
        return {(r["role"], r["peer"]): bytes(r["state"]) for r in rows}

    async def save_state(self, role: str, peer: str, state: bytes) -> None:
        """Write one machine's state, only while this process holds the lock: one that
        lost it would write its stale memory over its successor's books."""
        async with self._as_leader() as conn:
            await conn.execute(
                "INSERT INTO settle_state (role, peer, state) VALUES ($1, $2, $3)"
                " ON CONFLICT (role, peer) DO UPDATE SET state = EXCLUDED.state",
                role,
                peer,
                state,
            )

    async def close(self) -> None:
        if self._leader is not None:
            await self._leader.close()
        await self.pool.close()
