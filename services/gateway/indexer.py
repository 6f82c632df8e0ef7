"""``python -m services.gateway.indexer``: the history index's writer, its own process.

It consumes the workers' events stream (a durable JetStream consumer) into PostgreSQL,
which the gateways read for history and address queries. Kept apart from the gateway so
indexing never takes CPU from answering payments, and scales on its own.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import nats
from nats.aio.client import Client
from prometheus_client import CollectorRegistry, Counter

from services.gateway.index import Index
from services.partition.config import env_operator
from services.runtime import OpsServer, env_addr, env_str, serve

log = logging.getLogger("indexer")


@dataclass(frozen=True)
class Settings:
    operator: str
    nats_url: str
    database_url: str
    http_host: str
    http_port: int
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
            log_level=env_str(env, "INDEXER_LOG_LEVEL", "info"),
        )


class Indexer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        registry = CollectorRegistry()
        self.indexed = Counter(
            "indexer_blocks", "blocks of events stored in the index", registry=registry
        )
        self.ops = OpsServer(registry, self.ready)
        self.nc: Client | None = None

    def ready(self) -> tuple[bool, str]:
        if self.nc is None or not self.nc.is_connected:
            return False, "not connected to NATS"
        return True, "indexing"

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        await self.ops.start(s.http_host, s.http_port)
        index = await Index.open(s.database_url)
        self.nc = await nats.connect(
            s.nats_url, name=f"indexer-{s.operator}", max_reconnect_attempts=-1
        )
        task = asyncio.create_task(index.consume(self.nc, s.operator, "index", self.indexed.inc))
        log.info("indexer ready", extra={"http_port": self.ops.port})
        await stop.wait()
        task.cancel()  # a batch not acknowledged yet is delivered again: rows are unique
        await asyncio.gather(task, return_exceptions=True)
        # Close, not drain: a fetch cut short by the cancel can leave delivered messages
        # that nobody will take, and a drain would wait for them (30 s).
        await self.nc.close()
        await index.close()
        await self.ops.stop()


if __name__ == "__main__":
    sys.exit(serve(lambda _: "indexer", Settings.from_env, lambda s: Indexer(s).run))
