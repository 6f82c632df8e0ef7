"""The indexer's wiring: the store, NATS, following every worker's events log, ops."""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client
from prometheus_client import CollectorRegistry

from services.bus import await_map, drop_legacy_events_stream
from services.database import DATABASE_DOWN
from services.follow import Follower, FollowMetrics
from services.indexer.checkpoints import Checkpoints
from services.indexer.config import Settings
from services.indexer.keys import KeyFollower
from services.indexer.store import Index
from services.runtime import OpsServer, close_nats, connect_nats

log = logging.getLogger("indexer")


class Indexer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        registry = CollectorRegistry()
        self.metrics = FollowMetrics(registry, "indexer")
        self.ops = OpsServer(registry, self.ready)
        self.nc: Client | None = None
        self.follower: Follower | None = None
        self.checkpoints: Checkpoints | None = None

    def ready(self) -> tuple[bool, str]:
        if self.nc is None or not self.nc.is_connected:
            return False, "not connected to NATS"
        if self.follower is None:
            return False, "starting"
        ok, why = self.follower.progress(self.settings.max_behind, self.settings.stall_s)
        if ok and self.checkpoints is not None:
            return self.checkpoints.progress()
        return ok, why

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        await self.ops.start(s.http_host, s.http_port)
        index = await Index.open(s.database_url)
        nc = self.nc = await connect_nats(s.nats_url, f"indexer-{s.operator}")
        pmap = await await_map(nc, s.operator)
        await drop_legacy_events_stream(nc, s.operator)
        self.follower = Follower(
            nc,
            s.operator,
            pmap.workers,
            await index.cursors(),
            index.store,
            self.metrics,
            DATABASE_DOWN,
        )
        self.ops.tasks.start("follow", self.follower.run)
        if s.checkpoints is not None:
            self.checkpoints = Checkpoints(
                s.checkpoints, nc, index, self.ops.registry, self.ops.tasks
            )
            self.ops.tasks.start("checkpoints", self.checkpoints.run)
            keys = KeyFollower(
                nc,
                s.operator,
                s.checkpoints.me,
                s.checkpoints.signer,
                s.database_url,
                self.checkpoints,
            )
            self.ops.tasks.start("keys", keys.run)
        log.info(
            "indexer ready",
            extra={"http_port": self.ops.port, "cursors": self.follower.cursor},
        )
        await stop.wait()
        await self.ops.tasks.stop()  # a block stored, its cursor not yet: stored again
        await close_nats(nc)
        await index.close()
        await self.ops.stop()
