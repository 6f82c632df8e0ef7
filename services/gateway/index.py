"""The history index in PostgreSQL: committed coin changes by owner, fed from the events.

Workers publish each durable block's coin changes to a JetStream stream; the gateway
consumes it with a durable consumer and acknowledges a batch only once its rows are
stored, so the index misses nothing across restarts. Rows are keyed by
``(coin_id, created)``: a replayed event inserts nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import asyncpg
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeout

from constellation.errors import MessageError
from constellation.protocol import ledger as proto
from services.partition.transport import ensure_events_stream, events_subject

log = logging.getLogger("gateway.index")

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
    PRIMARY KEY (coin_id, created)
);
CREATE INDEX IF NOT EXISTS coin_events_owner ON coin_events (owner, seq);
CREATE TABLE IF NOT EXISTS txs (
    txid     bytea PRIMARY KEY,
    fee_msat numeric(20) NOT NULL,
    worker   integer NOT NULL,
    height   bigint  NOT NULL,
    at       timestamptz NOT NULL DEFAULT now()
);
"""

FETCH_BATCH = 256


class Index:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def open(cls, dsn: str) -> Index:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
        async with pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock(7411)")
            try:
                await conn.execute(SCHEMA)
            finally:
                await conn.execute("SELECT pg_advisory_unlock(7411)")
        return cls(pool)

    async def store(self, events: list[proto.BlockEvents]) -> None:
        changes: list[tuple[bytes, bytes, bytes, int, bool, int, int]] = []
        txs: list[tuple[bytes, int, int, int]] = []
        for ev in events:
            for c in ev.changes:
                changes.append(
                    (c.owner, c.coin_id, c.txid, c.value_msat, c.created, ev.worker, ev.height)
                )
            txs.extend((txid, fee, ev.worker, ev.height) for txid, fee in ev.committed)
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
            if txs:
                await conn.execute(
                    "INSERT INTO txs (txid, fee_msat, worker, height) SELECT * FROM"
                    " unnest($1::bytea[], $2::numeric[], $3::integer[], $4::bigint[])"
                    " ON CONFLICT DO NOTHING",
                    *(list(column) for column in zip(*txs, strict=True)),
                )

    async def consume(
        self, nc: Client, operator: str, durable: str, notify: Callable[[int], None]
    ) -> None:
        """Store the events stream forever (until cancelled); ``notify(blocks)`` after each
        stored batch."""
        await ensure_events_stream(nc, operator)
        js = nc.jetstream()
        sub = await js.pull_subscribe(events_subject(operator), durable=durable)
        while True:
            try:
                msgs = await sub.fetch(FETCH_BATCH, timeout=1)
            except NatsTimeout:
                continue
            events = []
            for msg in msgs:
                try:
                    events.extend(proto.decode_events(msg.data))
                except MessageError as exc:
                    log.error("undecodable event skipped", extra={"error": str(exc)})
            try:
                await self.store(events)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("index write failed; will retry", extra={"error": str(exc)})
                for msg in msgs:
                    await msg.nak(delay=1)
                await asyncio.sleep(1)
                continue
            for msg in msgs:
                await msg.ack()
            notify(len(events))

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

    async def unspent(self, owner: bytes, limit: int) -> list[tuple[bytes, int]]:
        rows = await self.pool.fetch(
            "SELECT c.coin_id, c.value_msat FROM coin_events c WHERE c.owner = $1 AND c.created"
            " AND NOT EXISTS (SELECT 1 FROM coin_events s WHERE s.coin_id = c.coin_id"
            " AND NOT s.created) ORDER BY c.seq LIMIT $2",
            owner,
            limit,
        )
        return [(r["coin_id"], int(r["value_msat"])) for r in rows]

    async def tx(self, txid: bytes) -> dict[str, Any] | None:
        row = await self.pool.fetchrow(
            "SELECT fee_msat, worker, height, at FROM txs WHERE txid = $1", txid
        )
        if row is None:
            return None
        return {
            "fee_msat": int(row["fee_msat"]),
            "block": {"worker": row["worker"], "height": row["height"]},
            "at": row["at"].isoformat(),
        }

    async def close(self) -> None:
        await self.pool.close()
