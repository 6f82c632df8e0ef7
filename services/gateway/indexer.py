"""``python -m services.gateway.indexer``: the history index's writer, its own process.

It follows every worker's events log by height (``services.follow``) into PostgreSQL,
which the gateways read for history and address queries; it is ready while it is no
more than ``INDEXER_MAX_BEHIND`` blocks behind any worker and its following goes round
(not stuck for ``INDEXER_STALL_S``, e.g. on a database that hangs). Kept apart from the gateway
so indexing never takes CPU from answering payments, and scales on its own.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import nats
from nats.aio.client import Client
from prometheus_client import CollectorRegistry

from services.follow import Follower, FollowMetrics
from services.gateway.index import Index
from services.partition.config import env_operator
from services.partition.transport import await_map, drop_legacy_events_stream
from services.runtime import OpsServer, env_addr, env_int, env_str, nats_error, serve

log = logging.getLogger("indexer")


@dataclass(frozen=True)
class Settings:
    operator: str
    nats_url: str
    database_url: str
    http_host: str
    http_port: int
    max_behind: int  # blocks behind a worker's log beyond which it is not ready
    stall_s: int  # seconds without progress after which it is not ready
    log_level: str

    @staticmethod
    def from_env(env: Mapping[str, str]) -> Settings:
        host, port = env_addr(env, "INDEXER_HTTP_ADDR", "127.0.0.1:0")
        return Settings(
            operator=env_operator(env, "INDEXER_OPERATOR"),
            nats_url=env_str(env, "INDEXER_NATS_URL", "nats://127.0.0.1:4222"),
            database_url=env_str(env, "INDEXER_DATABASE_URL"),
            http_host=host,
            http_port=port,
            max_behind=env_int(env, "INDEXER_MAX_BEHIND", 2_000, 0, 1 << 40),
            stall_s=env_int(env, "INDEXER_STALL_S", 15, 1, 3600),
            log_level=env_str(env, "INDEXER_LOG_LEVEL", "info"),
        )


class Indexer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        registry = CollectorRegistry()
        self.metrics = FollowMetrics(registry, "indexer")
        self.ops = OpsServer(registry, self.ready)
        self.nc: Client | None = None
        self.follower: Follower | None = None

    def ready(self) -> tuple[bool, str]:
        if self.nc is None or not self.nc.is_connected:
            return False, "not connected to NATS"
        if self.follower is None:
            return False, "starting"
        return self.follower.progress(self.settings.max_behind, self.settings.stall_s)

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        await self.ops.start(s.http_host, s.http_port)
        index = await Index.open(s.database_url)
        nc = self.nc = await nats.connect(
            s.nats_url, name=f"indexer-{s.operator}", max_reconnect_attempts=-1, error_cb=nats_error
        )
        pmap = await await_map(nc, s.operator)
        await drop_legacy_events_stream(nc, s.operator)
        self.follower = Follower(
            nc, s.operator, pmap.workers, await index.cursors(), index.store, self.metrics
        )
        self.ops.tasks.start("follow", self.follower.run)
        log.info(
            "indexer ready",
            extra={"http_port": self.ops.port, "cursors": self.follower.cursor},
        )
        await stop.wait()
        await self.ops.tasks.stop()  # a block stored, its cursor not yet: stored again
        await nc.close()
        await index.close()
        await self.ops.stop()


if __name__ == "__main__":
    sys.exit(serve(lambda _: "indexer", Settings.from_env, lambda s: Indexer(s).run))
