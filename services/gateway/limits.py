"""Per-client rate limits and idempotency keys, in Redis (shared by every gateway).

Rate limit: a fixed one-second window per client, counted in transactions. Idempotency:
the first request with a key stores ``pending``, then the final answer for a day; a
repeat gets that answer again, a repeat while pending is told to retry, and the same
key with a different body is refused.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

IDEMPOTENCY_TTL_S = 24 * 3600
PENDING_TTL_S = 60


@dataclass(frozen=True)
class Stored:
    """What an earlier request with the same key got (``status`` 0: still running)."""

    status: int
    body: dict[str, Any]


class KeyReused(ValueError):
    code = "idempotency.key_reused"


class Limits:
    def __init__(self, client: aioredis.Redis, rate_per_s: int) -> None:
        self.redis = client
        self.rate_per_s = rate_per_s

    @classmethod
    def connect(cls, url: str, rate_per_s: int) -> Limits:
        """A client whose requests wait for one of 32 connections (5 s at most)."""
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=32, timeout=5)
        return cls(aioredis.Redis(connection_pool=pool), rate_per_s)

    async def admit(self, client: str, count: int) -> float:
        """Count ``count`` transactions for ``client``; 0 if admitted, else seconds to wait."""
        now = time.time()
        window = int(now)
        key = f"rate:{client}:{window}"
        pipe = self.redis.pipeline(transaction=False)
        pipe.incrby(key, count)
        pipe.expire(key, 2)
        used, _ = await pipe.execute()
        if int(used) <= self.rate_per_s:
            return 0.0
        return max(0.001, window + 1 - now)

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
        """Store the final answer, or forget the key when the outcome may change on retry."""
        rkey = f"idem:{client}:{key}"
        if status in (429, 503, 504):
            await self.redis.delete(rkey)
            return
        doc = {"hash": hashlib.sha256(body).hexdigest(), "status": status, "body": answer}
        await self.redis.set(rkey, json.dumps(doc), ex=IDEMPOTENCY_TTL_S)

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def close(self) -> None:
        await self.redis.aclose()
