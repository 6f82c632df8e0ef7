"""The history index in PostgreSQL: committed coin changes by owner, by block.

The indexer follows every worker's events log (``services.follow``) into it. A block's
rows and the worker's cursor (the last block stored) are stored in one transaction;
rows are keyed by ``(coin_id, created)`` and transactions by txid, so a block stored
again inserts nothing twice. Outputs paid to other ledgers go to ``outbound``, where
settlement (``services.gateway.settle``) takes them as obligations.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from constellation.lightclient import index as lc
from constellation.lightclient.checkpointer import Announced, Filled
from constellation.protocol import ledger as proto
from constellation.protocol import lightclient as lcp
from constellation.protocol.signer import KeyInfo

SCHEMA = """
CREATE TABLE IF NOT EXISTS coin_events (
    seq        bigserial NOT NULL,  -- the order of history; paged by (owner, seq)
    owner      bytea    NOT NULL,
    coin_id    bytea    NOT NULL,
    txid       bytea    NOT NULL,
    value_msat numeric(20) NOT NULL,
    created    boolean  NOT NULL,
    worker     integer  NOT NULL,
    height     bigint   NOT NULL,
    at         timestamptz NOT NULL DEFAULT now(),
    spent      boolean  NOT NULL DEFAULT false,  -- a created coin's: its spend is stored
    PRIMARY KEY (coin_id, created)
);
-- spent: where the column is new, filled from the spends stored
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_name = 'coin_events' AND column_name = 'spent') THEN
        ALTER TABLE coin_events ADD COLUMN spent boolean NOT NULL DEFAULT false;
        UPDATE coin_events c SET spent = true WHERE c.created AND EXISTS
            (SELECT 1 FROM coin_events s WHERE s.coin_id = c.coin_id AND NOT s.created);
    END IF;
END $$;
CREATE INDEX IF NOT EXISTS coin_events_owner ON coin_events (owner, seq);
-- an owner's unspent coins, a page at a time: never walking those spent long ago
CREATE INDEX IF NOT EXISTS coin_events_unspent ON coin_events (owner, seq)
    WHERE created AND NOT spent;
CREATE INDEX IF NOT EXISTS coin_events_block ON coin_events (worker, height);  -- explorer
CREATE INDEX IF NOT EXISTS coin_events_txid ON coin_events (txid);  -- a transaction's coins
CREATE TABLE IF NOT EXISTS txs (
    txid     bytea PRIMARY KEY,
    fee_msat numeric(20) NOT NULL,
    worker   integer NOT NULL,
    height   bigint  NOT NULL,
    at       timestamptz NOT NULL DEFAULT now()
);
-- the transaction itself: every part of it is known before the other workers' parts are
-- stored (none for an issuance, nor for one indexed before it was carried)
ALTER TABLE txs ADD COLUMN IF NOT EXISTS tx bytea;
CREATE INDEX IF NOT EXISTS txs_at ON txs (at);  -- payments a second
CREATE TABLE IF NOT EXISTS outbound (
    coin_id    bytea PRIMARY KEY,  -- the output's id (a coin of the other ledger once settled)
    txid       bytea    NOT NULL,
    ledger     bytea    NOT NULL,  -- the ledger it is paid to
    owner      bytea    NOT NULL,
    value_msat numeric(20) NOT NULL,
    worker     integer  NOT NULL,
    height     bigint   NOT NULL,
    at         timestamptz NOT NULL DEFAULT now(),
    taken      boolean  NOT NULL DEFAULT false  -- settlement has made it an obligation
);
CREATE INDEX IF NOT EXISTS outbound_untaken ON outbound (at) WHERE NOT taken;
CREATE INDEX IF NOT EXISTS outbound_txid ON outbound (txid);
CREATE INDEX IF NOT EXISTS outbound_block ON outbound (worker, height);
CREATE TABLE IF NOT EXISTS lc_checkpoints (
    height    bigint PRIMARY KEY,
    announced bytea  NOT NULL,  -- the signed checkpoint and its entries
    at        timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS lc_records (
    height   bigint  NOT NULL,
    position integer NOT NULL,  -- the shard's among the checkpoint's entries
    records  bytea[] NOT NULL,  -- the records its entry's tree is over, in order
    PRIMARY KEY (height, position)
);
-- complete false: adopted (taken without the records its entries cover), until another
-- member's are filled in (where the column is new, a checkpoint without records may be
-- one: it is asked for, and one with none to fill is filled with none)
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_name = 'lc_checkpoints' AND column_name = 'complete') THEN
        ALTER TABLE lc_checkpoints ADD COLUMN complete boolean NOT NULL DEFAULT true;
        UPDATE lc_checkpoints c SET complete = false
            WHERE NOT EXISTS (SELECT 1 FROM lc_records r WHERE r.height = c.height);
    END IF;
END $$;
CREATE TABLE IF NOT EXISTS lc_txs (
    txid     bytea   NOT NULL,
    height   bigint  NOT NULL,  -- a checkpoint with a record of it
    position integer NOT NULL,  -- in the records of that shard
    PRIMARY KEY (txid, height, position)
);
CREATE TABLE IF NOT EXISTS lc_touches (
    owner  bytea  NOT NULL,  -- an address of any member's ledger
    height bigint NOT NULL,  -- the checkpoint from which the transaction is provable
    txid   bytea  NOT NULL,
    PRIMARY KEY (owner, height, txid)
);
CREATE TABLE IF NOT EXISTS lc_created (
    coin_id    bytea  PRIMARY KEY,
    owner      bytea  NOT NULL,
    member     integer NOT NULL,  -- the guild member whose ledger holds it
    value_msat numeric(20) NOT NULL,
    height     bigint NOT NULL   -- the checkpoint it was created under
);
CREATE INDEX IF NOT EXISTS lc_created_owner ON lc_created (owner, coin_id);
CREATE TABLE IF NOT EXISTS lc_spent (
    coin_id bytea  PRIMARY KEY,
    height  bigint NOT NULL  -- the checkpoint it was spent under
);
CREATE TABLE IF NOT EXISTS lc_pin (  -- the key the guild's first checkpoint is signed by
    one       boolean  PRIMARY KEY DEFAULT true CHECK (one),
    key       bytea    NOT NULL,  -- 33 bytes: later keys come from handovers
    threshold integer  NOT NULL,
    members   integer[] NOT NULL  -- its holders (layout indices): the first member set
);
CREATE TABLE IF NOT EXISTS lc_proposal (  -- the checkpoint this member proposed last
    one        boolean PRIMARY KEY DEFAULT true CHECK (one),
    checkpoint bytea   NOT NULL,  -- its sign target (MessagePack)
    evidence   bytea   NOT NULL
);
CREATE TABLE IF NOT EXISTS index_cursors (
    worker integer PRIMARY KEY,
    height bigint  NOT NULL  -- the last block with events stored
);
"""


# A coin a transaction spent or created in a block, or an output it paid to another
# ledger (``ledger`` its id, NULL for a coin of this one).
_CHANGES = (
    "SELECT * FROM (SELECT txid, coin_id, owner, value_msat, created, worker, height,"
    " NULL::bytea AS ledger FROM coin_events UNION ALL SELECT txid, coin_id, owner,"
    " value_msat, true, worker, height, ledger FROM outbound) c"
)


def _change(r: asyncpg.Record) -> dict[str, Any]:
    kind = "paid_out" if r["ledger"] is not None else "created" if r["created"] else "spent"
    doc = {
        "kind": kind,
        "coin_id": r["coin_id"].hex(),
        "owner": r["owner"].hex(),
        "value_msat": int(r["value_msat"]),
        "block": {"worker": r["worker"], "height": r["height"]},
    }
    if r["ledger"] is not None:
        doc["ledger_id"] = r["ledger"].hex()
    return doc


def _record(txid: bytes) -> dict[str, Any]:
    return {"txid": txid.hex(), "committed": False, "fee_msat": 0, "changes": []}


COMMAND_TIMEOUT_S = 30.0  # a statement that takes longer fails (the database hangs)


class Index:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def open(cls, dsn: str) -> Index:
        pool = await asyncpg.create_pool(
            dsn, min_size=1, max_size=4, command_timeout=COMMAND_TIMEOUT_S
        )
        async with pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock(7411)")
            try:
                await conn.execute(SCHEMA)
            finally:
                await conn.execute("SELECT pg_advisory_unlock(7411)")
        return cls(pool)

    async def ping(self) -> None:
        """Raise where the database does not answer."""
        await self.pool.fetchval("SELECT 1")

    async def store(self, events: list[proto.BlockEvents]) -> None:
        """Store blocks' events, and move each worker's cursor to its last block here."""
        changes: list[tuple[bytes, bytes, bytes, int, bool, int, int]] = []
        txs: list[tuple[bytes, int, int, int, bytes | None]] = []
        outbound: list[tuple[bytes, bytes, bytes, bytes, int, int, int]] = []
        cursors: dict[int, int] = {}
        for ev in events:
            cursors[ev.worker] = max(cursors.get(ev.worker, -1), ev.height)
            for c in ev.changes:
                if c.ledger:
                    outbound.append(
                        (c.coin_id, c.txid, c.ledger, c.owner, c.value_msat, ev.worker, ev.height)
                    )
                    continue
                changes.append(
                    (c.owner, c.coin_id, c.txid, c.value_msat, c.created, ev.worker, ev.height)
                )
            txs.extend((t, fee, ev.worker, ev.height, tx or None) for t, fee, tx in ev.committed)
        # One set-based statement per table, its columns sent as arrays: a row costs
        # a few microseconds this way, against tens with a statement per row.
        async with self.pool.acquire() as conn, conn.transaction():
            if changes:
                await conn.execute(
                    "INSERT INTO coin_events (owner, coin_id, txid, value_msat, created, worker,"
                    " height) SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::bytea[],"
                    " $4::numeric[], $5::boolean[], $6::integer[], $7::bigint[])"
                    " ON CONFLICT DO NOTHING",
                    *(list(column) for column in zip(*changes, strict=True)),
                )
                # a created coin whose spend is stored is marked (its spend may come in
                # this batch, a later one, or, where a log was read from its middle, none)
                await conn.execute(
                    "UPDATE coin_events c SET spent = true WHERE c.coin_id = ANY($1::bytea[])"
                    " AND c.created AND NOT c.spent AND EXISTS (SELECT 1 FROM coin_events s"
                    " WHERE s.coin_id = c.coin_id AND NOT s.created)",
                    list({c[1] for c in changes}),
                )
            if outbound:
                await conn.execute(
                    "INSERT INTO outbound (coin_id, txid, ledger, owner, value_msat, worker,"
                    " height) SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::bytea[],"
                    " $4::bytea[], $5::numeric[], $6::integer[], $7::bigint[])"
                    " ON CONFLICT DO NOTHING",
                    *(list(column) for column in zip(*outbound, strict=True)),
                )
            if txs:
                await conn.execute(
                    "INSERT INTO txs (txid, fee_msat, worker, height, tx) SELECT * FROM"
                    " unnest($1::bytea[], $2::numeric[], $3::integer[], $4::bigint[],"
                    " $5::bytea[]) ON CONFLICT DO NOTHING",
                    *(list(column) for column in zip(*txs, strict=True)),
                )
            if cursors:
                await conn.execute(
                    "INSERT INTO index_cursors (worker, height) SELECT * FROM"
                    " unnest($1::integer[], $2::bigint[]) ON CONFLICT (worker) DO UPDATE"
                    " SET height = GREATEST(index_cursors.height, EXCLUDED.height)",
                    list(cursors),
                    list(cursors.values()),
                )

    async def cursors(self) -> dict[int, int]:
        """Each worker's last block with events stored."""
        rows = await self.pool.fetch("SELECT worker, height FROM index_cursors")
        return {r["worker"]: r["height"] for r in rows}

    async def history(self, owner: bytes, limit: int, before: int | None) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT seq, coin_id, txid, value_msat, created, worker, height, at FROM coin_events"
            " WHERE owner = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
            owner,
            before if before is not None else 2**62,
            limit,
        )
        return [
            {
                "seq": r["seq"],
                "txid": r["txid"].hex(),
                "coin_id": r["coin_id"].hex(),
                "value_msat": int(r["value_msat"]),
                "kind": "received" if r["created"] else "spent",
                "block": {"worker": r["worker"], "height": r["height"]},
                "at": r["at"].isoformat(),
            }
            for r in rows
        ]

    async def unspent(
        self, owner: bytes, limit: int, after: int = 0
    ) -> list[tuple[int, bytes, int]]:
        """(seq, coin_id, value) of the owner's unspent coins after ``after``, oldest first."""
        rows = await self.pool.fetch(
            "SELECT seq, coin_id, value_msat FROM coin_events WHERE owner = $1 AND created"
            " AND NOT spent AND seq > $3 ORDER BY seq LIMIT $2",
            owner,
            limit,
            after,
        )
        return [(r["seq"], r["coin_id"], int(r["value_msat"])) for r in rows]

    async def created(self, coin_ids: list[bytes]) -> set[bytes]:
        """Those of ``coin_ids`` whose creation is stored."""
        rows = await self.pool.fetch(
            "SELECT coin_id FROM coin_events WHERE coin_id = ANY($1::bytea[]) AND created",
            coin_ids,
        )
        return {bytes(r["coin_id"]) for r in rows}

    async def tx(self, txid: bytes) -> dict[str, Any] | None:
        """A committed transaction: its fee, the block of its commit, the coins it
        spent and created in each block stored that carries a part of it (outputs paid
        to other ledgers among them), and the transaction itself (``None`` where not
        known: an issuance, or one indexed before it was carried)."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT fee_msat, worker, height, at, tx FROM txs WHERE txid = $1", txid
            )
            if row is None:
                return None
            coins = await conn.fetch(_CHANGES + " WHERE txid = $1", txid)
        return {
            "fee_msat": int(row["fee_msat"]),
            "block": {"worker": row["worker"], "height": row["height"]},
            "at": row["at"].isoformat(),
            "changes": [_change(r) for r in coins],
            "tx": row["tx"],
        }

    async def blocks(self, worker: int, before: int, limit: int) -> list[dict[str, Any]]:
        """A worker's blocks below height ``before`` that changed coins, newest first
        (at most ``limit``), each with its transactions' changes and commits."""
        async with self.pool.acquire() as conn:
            heights = [
                r["height"]
                for r in await conn.fetch(
                    "SELECT DISTINCT height FROM coin_events WHERE worker = $1 AND height < $2"
                    " ORDER BY height DESC LIMIT $3",
                    worker,
                    before,
                    limit,
                )
            ]
            if not heights:
                return []
            span = (worker, heights[-1], heights[0])
            where = " WHERE worker = $1 AND height BETWEEN $2 AND $3"
            coins = await conn.fetch(_CHANGES + where + " ORDER BY txid", *span)
            commits = await conn.fetch("SELECT txid, fee_msat, height FROM txs" + where, *span)
        found: dict[int, dict[bytes, dict[str, Any]]] = {h: {} for h in heights}
        for r in coins:
            if r["height"] in found:
                tx = found[r["height"]].setdefault(r["txid"], _record(r["txid"]))
                tx["changes"].append(_change(r))
        for r in commits:
            if r["height"] in found:
                tx = found[r["height"]].setdefault(r["txid"], _record(r["txid"]))
                tx["committed"], tx["fee_msat"] = True, int(r["fee_msat"])
        return [
            {"worker": worker, "height": h, "records": list(found[h].values())} for h in heights
        ]

    async def rate(self, seconds: int) -> list[tuple[int, int]]:
        """(unix second, transactions committed in it) for the last ``seconds`` seconds,
        as the index took them (seconds without any left out)."""
        rows = await self.pool.fetch(
            "SELECT floor(extract(epoch FROM at))::bigint AS second, count(*) AS n FROM txs"
            " WHERE at > now() - make_interval(secs => $1) GROUP BY second ORDER BY second",
            seconds,
        )
        return [(r["second"], r["n"]) for r in rows]

    # -- light-client checkpoints (``services.indexer.checkpoints``) ----------------------

    async def store_checkpoints(
        self,
        held: list[lc.Held],
        touches: list[tuple[bytes, int, bytes]],
        coins: dict[int, lc.Coins],
    ) -> None:
        """Signed checkpoints, what their entries cover, the transactions they made
        provable by each address they changed (``(address, height, txid)``), and the
        coins they created and spent, by height (stored again: nothing twice)."""
        checkpoints: list[tuple[int, bytes, bool]] = []
        records: list[tuple[int, int, list[bytes]]] = []
        txs: list[tuple[bytes, int, int]] = []
        created = [(*c, height) for height, cs in coins.items() for c in cs.created]
        spent = [(coin_id, height) for height, cs in coins.items() for coin_id in cs.spent]
        for h in held:
            height = h.checkpoint.checkpoint.height
            complete = all(e.size == 0 or i in h.records for i, e in enumerate(h.entries))
            checkpoints.append((height, Announced(h.checkpoint, h.entries).encode(), complete))
            for position, encoded in h.records.items():
                records.append((height, position, encoded))
                txs.extend((r[8:40], height, position) for r in encoded)  # a record's txid
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                "INSERT INTO lc_checkpoints (height, announced, complete) VALUES ($1, $2, $3)"
                " ON CONFLICT (height) DO UPDATE SET complete = EXCLUDED.complete"
                " WHERE EXCLUDED.complete",
                checkpoints,
            )
            await conn.executemany(
                "INSERT INTO lc_records (height, position, records) VALUES ($1, $2, $3)"
                " ON CONFLICT DO NOTHING",
                records,
            )
            if txs:
                await conn.execute(
                    "INSERT INTO lc_txs (txid, height, position) SELECT * FROM"
                    " unnest($1::bytea[], $2::bigint[], $3::integer[]) ON CONFLICT DO NOTHING",
                    *(list(column) for column in zip(*txs, strict=True)),
                )
            if created:
                await conn.execute(
                    "INSERT INTO lc_created (coin_id, owner, member, value_msat, height)"
                    " SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::integer[],"
                    " $4::numeric[], $5::bigint[]) ON CONFLICT DO NOTHING",
                    *(list(column) for column in zip(*created, strict=True)),
                )
            if spent:
                await conn.execute(
                    "INSERT INTO lc_spent (coin_id, height) SELECT * FROM"
                    " unnest($1::bytea[], $2::bigint[]) ON CONFLICT DO NOTHING",
                    *(list(column) for column in zip(*spent, strict=True)),
                )
            if touches:
                await conn.execute(
                    "INSERT INTO lc_touches (owner, height, txid) SELECT * FROM"
                    " unnest($1::bytea[], $2::bigint[], $3::bytea[]) ON CONFLICT DO NOTHING",
                    *(list(column) for column in zip(*touches, strict=True)),
                )

    async def lc_history(
        self, owner: bytes, before: tuple[int, bytes], limit: int
    ) -> list[lcp.Touch]:
        """The transactions that changed an address, newest first (by checkpoint, then
        txid), those before ``before`` (a checkpoint height and txid)."""
        rows = await self.pool.fetch(
            "SELECT height, txid FROM lc_touches WHERE owner = $1 AND (height, txid) < ($2, $3)"
            " ORDER BY height DESC, txid DESC LIMIT $4",
            owner,
            *before,
            limit,
        )
        return [lcp.Touch(r["height"], r["txid"]) for r in rows]

    async def pin(self, first: KeyInfo) -> KeyInfo:
        """The guild key (33 bytes), threshold and members the checkpoints start from:
        the first ever given here, kept for good (the signer's key changes with the
        members)."""
        await self.pool.execute(
            "INSERT INTO lc_pin (key, threshold, members) VALUES ($1, $2, $3)"
            " ON CONFLICT DO NOTHING",
            first.key,
            first.t,
            first.members,
        )
        row = await self.pool.fetchrow("SELECT key, threshold, members FROM lc_pin")
        return KeyInfo(bytes(row["key"]), list(row["members"]), row["threshold"])

    async def save_proposal(self, checkpoint: bytes, evidence: bytes) -> None:
        await self.pool.execute(
            "INSERT INTO lc_proposal (checkpoint, evidence) VALUES ($1, $2) ON CONFLICT (one)"
            " DO UPDATE SET checkpoint = EXCLUDED.checkpoint, evidence = EXCLUDED.evidence",
            checkpoint,
            evidence,
        )

    async def proposal(self) -> tuple[bytes, bytes] | None:
        """The checkpoint this member proposed last, and its evidence (None: none yet)."""
        row = await self.pool.fetchrow("SELECT checkpoint, evidence FROM lc_proposal")
        return None if row is None else (bytes(row["checkpoint"]), bytes(row["evidence"]))

    async def checkpoints(self, start: int, count: int) -> list[bytes]:
        """Signed checkpoints (``Announced``, encoded) from height ``start`` on (a member
        that adopted a checkpoint lacks those it missed)."""
        rows = await self.pool.fetch(
            "SELECT announced FROM lc_checkpoints WHERE height >= $1 ORDER BY height LIMIT $2",
            start,
            count,
        )
        return [r["announced"] for r in rows]

    async def lc_coins(self, owner: bytes, after: bytes, limit: int) -> list[lcp.Owned]:
        """An address's unspent coins under the checkpoints stored, by coin id."""
        rows = await self.pool.fetch(
            "SELECT coin_id, member, value_msat, height FROM lc_created c WHERE owner = $1"
            " AND coin_id > $2 AND NOT EXISTS (SELECT 1 FROM lc_spent s"
            " WHERE s.coin_id = c.coin_id) ORDER BY coin_id LIMIT $3",
            owner,
            after,
            limit,
        )
        return [
            lcp.Owned(r["coin_id"], r["member"], int(r["value_msat"]), r["height"]) for r in rows
        ]

    async def missing(self, since: int, upto: int, most: int) -> list[int]:
        """The heights from ``since`` to ``upto`` with no checkpoint, or one without its
        records (adopted), lowest first."""
        rows = await self.pool.fetch(
            "SELECT h FROM generate_series($1::bigint, $2::bigint) h WHERE NOT EXISTS"
            " (SELECT 1 FROM lc_checkpoints c WHERE c.height = h AND c.complete)"
            " ORDER BY h LIMIT $3",
            since,
            upto,
            most,
        )
        return [r["h"] for r in rows]

    async def filled(self, start: int, count: int) -> list[Filled]:
        """The checkpoints from ``start`` to ``start + count - 1`` with their records
        (those this operator has)."""
        rows = await self.pool.fetch(
            "SELECT c.height, c.announced, r.position, r.records FROM lc_checkpoints c"
            " LEFT JOIN lc_records r ON r.height = c.height"
            " WHERE c.height BETWEEN $1 AND $2 AND c.complete ORDER BY c.height, r.position",
            start,
            start + count - 1,
        )
        found: dict[int, Filled] = {}
        for row in rows:
            f = found.get(row["height"])
            if f is None:
                f = found[row["height"]] = Filled(Announced.decode(row["announced"]), {})
            if row["position"] is not None:
                f.records[row["position"]] = list(row["records"])
        return list(found.values())

    async def holding(self, txid: bytes, most: int) -> list[lc.Held]:
        """The first ``most`` checkpoints with records of ``txid``, each with its
        records (those of the shards that have the transaction's)."""
        rows = await self.pool.fetch(
            "SELECT DISTINCT c.height, c.announced, r.position, r.records FROM lc_txs t"
            " JOIN lc_checkpoints c ON c.height = t.height"
            " JOIN lc_records r ON (r.height, r.position) = (t.height, t.position)"
            " WHERE t.txid = $1 AND t.height IN (SELECT DISTINCT height FROM lc_txs"
            " WHERE txid = $1 ORDER BY height LIMIT $2) ORDER BY c.height, r.position",
            txid,
            most,
        )
        held: dict[int, lc.Held] = {}
        for row in rows:
            h = held.get(row["height"])
            if h is None:
                a = Announced.decode(row["announced"])
                h = held[row["height"]] = lc.Held(a.signed, a.entries, {})
            h.records[row["position"]] = list(row["records"])
        return list(held.values())

    async def close(self) -> None:
        await self.pool.close()
