"""Per-client rate limits and idempotency keys, in Redis (shared by every gateway).

Rate limit: a fixed one-second window per client, counted in transactions. Each gateway
decides locally, from the window's count in Redis as last seen plus what it admitted
since, and adds its counts to Redis every ``SYNC_S`` (one pipelined round trip for all
clients, instead of one per request). With g gateways, a client can exceed its rate by
at most what the other gateways admit in one ``SYNC_S``. If Redis is unreachable, each
gateway goes on limiting by its own counts.

Idempotency: the first request with a key stores ``pending``, then the final answer for
a day; a repeat gets that answer again, a repeat while pending is told to retry, and
the same key with a different body is refused.

In doubt: a transaction whose submission timed out (HTTP 504) may still commit; every
gateway's lookup of it says so, not "not found", for ``IN_DOUBT_TTL_S`` after.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from constellation.errors import KeyReused
from services.gateway.errors import is_final

IDEMPOTENCY_TTL_S = 24 * 3600
PENDING_TTL_S = 60
IN_DOUBT_TTL_S = 3600  # far past a two-phase commit's resolution
SYNC_S = 0.1

log = logging.getLogger("gateway.limits")


@dataclass(frozen=True)
class Stored:
    """What an earlier request with the same key got (``status`` 0: still running)."""

    status: int
    body: dict[str, Any]


class Limits:
    def __init__(
        self,
        client: aioredis.Redis,
        rate_per_s: int,
        clock: Callable[[], float] = time.time,
        prefix: str = "rate",
    ) -> None:
        self.redis = client
        self.rate_per_s = rate_per_s
        self.clock = clock
        self.prefix = prefix  # of its counts' keys: each service counts its own requests
        # (client, window) -> its count in Redis when last synced / admitted here since
        self._seen: dict[tuple[str, int], int] = {}
        self._unsynced: dict[tuple[str, int], int] = {}

    @classmethod
    def connect(cls, url: str, rate_per_s: int) -> Limits:
        return cls(cls.client(url), rate_per_s)

    @staticmethod
    def client(url: str, timeout_s: float | None = None) -> aioredis.Redis:
        """A client whose requests wait for one of 32 connections (5 s at most), each
        call answered within ``timeout_s`` (where given) or failed."""
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=32,
            timeout=5,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
        return aioredis.Redis(connection_pool=pool)

    def admit(self, client: str, count: int) -> float:
        """Count ``count`` transactions for ``client``: 0 if admitted, else the seconds
        until its window ends (nothing is counted then)."""
        now = self.clock()
        key = (client, int(now))
        unsynced = self._unsynced.get(key, 0)
        if self._seen.get(key, 0) + unsynced + count > self.rate_per_s:
            return max(0.001, key[1] + 1 - now)
        self._unsynced[key] = unsynced + count
        return 0.0

    async def sync(self) -> None:
        """Add the counts admitted here to Redis and learn the windows' totals."""
        window = int(self.clock())
        seen = self._seen = {k: v for k, v in self._seen.items() if k[1] >= window}
        batch = {k: n for k, n in self._unsynced.items() if k[1] >= window}
        self._unsynced = {}
        if not batch:
            return
        for key, n in batch.items():  # still counted while the round trip runs
            seen[key] = seen.get(key, 0) + n
        pipe = self.redis.pipeline(transaction=False)
        for (client, w), n in batch.items():
            pipe.incrby(f"{self.prefix}:{client}:{w}", n)
            pipe.expire(f"{self.prefix}:{client}:{w}", 2)
        try:
            totals = (await pipe.execute())[::2]
        except RedisError:
            for key, n in batch.items():  # counted here, to be synced next time
                seen[key] -= n
                self._unsynced[key] = self._unsynced.get(key, 0) + n
            raise
        for key, total in zip(batch, totals, strict=True):
            seen[key] = int(total)  # ours and every other gateway's

    async def sync_forever(self) -> None:
        while True:
            await asyncio.sleep(SYNC_S)
            try:
                await self.sync()
            except RedisError as exc:
                log.warning("rate counts not synced to redis", extra={"error": str(exc)})

    async def begin(self, client: str, key: str, body: bytes) -> Stored | None:
        """Claim ``key`` for this request; None if it is new, else what is stored."""
        digest = hashlib.sha256(body).hexdigest()
        rkey = f"idem:{client}:{key}"
        claimed = await self.redis.set(
            rkey, json.dumps({"hash": digest, "status": 0}), nx=True, ex=PENDING_TTL_S
        )
        if claimed:
            return None
        raw = await self.redis.get(rkey)
        if raw is None:  # expired between the two calls: claim again
            return await self.begin(client, key, body)
        doc = json.loads(raw)
        if doc["hash"] != digest:
            raise KeyReused("this idempotency key was used with a different request")
        return Stored(doc["status"], doc.get("body", {}))

    async def finish(
        self, client: str, key: str, body: bytes, status: int, answer: dict[str, Any]
    ) -> None:
        """Store the final answer, or forget the key when the outcome may change on retry
        (``errors.is_final``: a retry must reach the ledger again, not this answer)."""
        rkey = f"idem:{client}:{key}"
        if status >= 400 and not is_final(status, answer["error"]["code"]):
            await self.redis.delete(rkey)
            return
        doc = {"hash": hashlib.sha256(body).hexdigest(), "status": status, "body": answer}
        await self.redis.set(rkey, json.dumps(doc), ex=IDEMPOTENCY_TTL_S)

    async def timed_out(self, txids: list[bytes]) -> None:
        """Remember that these transactions' submissions timed out, now."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for txid in txids:
                pipe.set(f"doubt:{txid.hex()}", str(self.clock()), ex=IN_DOUBT_TTL_S)
            await pipe.execute()

    async def timed_out_at(self, txid: bytes) -> float | None:
        """When a submission of ``txid`` timed out (the latest, within the TTL)."""
        raw = await self.redis.get(f"doubt:{txid.hex()}")
        return None if raw is None else float(raw)

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def close(self) -> None:
        await self.redis.aclose()
