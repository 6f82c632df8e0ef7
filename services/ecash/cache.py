"""NUT-19: the answers to mint, swap and melt requests kept in Redis for a while, so a
wallet that lost an answer and sends the very same request again gets the same answer
(its outputs signed) instead of "proofs already spent".

An answer is keyed by the request's path and body bytes (a retry sends the same bytes)
and kept ``ttl_s`` seconds. Only answers that are final are kept: a success, and of a
melt only one whose payment is PAID (a PENDING melt's retry is answered anew, with its
quote as it stands: ``store.MeltStarted``). The cache is read only where the mint
refuses a request (its proofs spent, its quote issued or paid): a retry is refused that
way, and a first request does not pay for the lookup. Where Redis is down, requests are
served without it: a retry then gets the answer it would get from a mint without NUT-19,
and nothing is lost either way (the signatures are in PostgreSQL, NUT-09 restores them).

An answer is sent once it is kept. The answers of requests that finish while one write
is on its way go together in the next: one script (``KEEP``) sets them all, one command
on one round trip. At a few hundred swaps a second, one write per answer was a twelfth
of the mint's time; a pipeline of one SET per answer cost the mint 30 µs an answer,
the script 10 µs. (Its keys need not share a slot: the mint's Redis is one server, not
a cluster.)
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.ecash.metrics import MintMetrics

log = logging.getLogger("mint.cache")

CACHED = ("/v1/mint/bolt11", "/v1/swap", "/v1/melt/bolt11")
# KEYS the answers' keys, ARGV their answers in that order, then the time to keep them
KEEP = "for i, key in ipairs(KEYS) do redis.call('SET', key, ARGV[i], 'EX', ARGV[#KEYS + 1]) end"


class Cache:
    def __init__(self, client: aioredis.Redis, ttl_s: int, metrics: MintMetrics) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.metrics = metrics
        self._keep = client.register_script(KEEP)
        self._puts: list[tuple[str, bytes]] = []  # for the next write
        self._next: asyncio.Future[None] | None = None  # done once they are written
        self._writer: asyncio.Task[None] | None = None

    @staticmethod
    def key(path: str, body: bytes) -> str:
        return "mint:nut19:" + hashlib.sha256(path.encode() + b"\n" + body).hexdigest()

    async def get(self, path: str, body: bytes) -> bytes | None:
        try:
            found = await self.client.get(self.key(path, body))
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return None
        self.metrics.cache.labels("hit" if found is not None else "miss").inc()
        return found.encode() if isinstance(found, str) else found

    async def put(self, path: str, body: bytes, answer: bytes) -> None:
        """Keep ``answer``; returns once it is written (or Redis failed: nothing kept)."""
        self._puts.append((self.key(path, body), answer))
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            if self._writer is None or self._writer.done():
                self._writer = asyncio.create_task(self._write())
        # shielded: a request given up does not stop the write of the others' answers
        await asyncio.shield(self._next)

    async def _write(self) -> None:
        """Write what waits, one write at a time, until nothing waits."""
        while self._next is not None:
            written, puts = self._next, self._puts
            self._next, self._puts = None, []
            try:
                await self._keep([key for key, _ in puts], [*(a for _, a in puts), self.ttl_s])
            except (RedisError, OSError, TimeoutError) as exc:
                self._failed(exc)
            except Exception:  # a bug: said with its traceback; the next write still goes
                self.metrics.cache.labels("error").inc()
                log.exception("NUT-19 answers not kept", extra={"answers": len(puts)})
            finally:
                written.set_result(None)

    def _failed(self, exc: Exception) -> None:
        self.metrics.cache.labels("error").inc()
        log.warning("NUT-19 cache not reachable", extra={"error": repr(exc)})
