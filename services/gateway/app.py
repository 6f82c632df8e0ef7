"""Wiring: NATS, Redis, PostgreSQL, the API on the ops server, the index, a clean drain."""

from __future__ import annotations

import asyncio
import logging

from services.gateway.api import Api
from services.gateway.config import Settings
from services.gateway.limits import Limits
from services.gateway.metrics import GatewayMetrics
from services.gateway.ws import Pushes
from services.indexer.store import Index
from services.partition.client import LedgerClient
from services.runtime import OpsServer

log = logging.getLogger("gateway")


class GatewayNode:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = GatewayMetrics()
        self.ops = OpsServer(self.metrics.registry, self.ready, settings.max_body)
        self.api: Api | None = None
        self.draining = False

    def ready(self) -> tuple[bool, str]:
        if self.api is None:
            return False, "starting"
        if not self.api.ledger.nc.is_connected:
            return False, "not connected to NATS"
        if self.draining:
            return False, "draining"
        return True, f"routing by partition map v{self.api.ledger.pmap.version}"

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        m = self.metrics
        ledger = await LedgerClient.connect(
            s.nats_url, s.operator, s.packages, m.package_items.observe
        )
        index = await Index.open(s.database_url)
        limits = Limits.connect(s.redis_url, s.rate_per_s)
        await limits.ping()
        pushes = Pushes(ledger, s.network, m, m.registry, self.ops.tasks)
        api = Api(ledger, index, limits, m, pushes, s.network, s.max_in_flight, s.timeout_ms / 1000)
        api.install(self.ops.app)
        m.queue.labels("in_flight").set_function(lambda: ledger.in_flight)
        m.queue.labels("outbox").set_function(lambda: ledger.packer.depth)
        tasks = self.ops.tasks
        tasks.start("packages", ledger.packer.run)
        tasks.start("limits", limits.sync_forever)
        await self.ops.start(s.http_host, s.http_port)
        self.api = api
        log.info(
            "gateway ready",
            extra={"http_port": self.ops.port, "map_version": ledger.pmap.version},
        )
        await stop.wait()
        self.draining = True
        log.info("draining", extra={"in_flight": ledger.in_flight})
        await self.ops.stop()  # stops taking requests; waits for the running ones
        await ledger.close()
        await tasks.stop()
        await index.close()
        await limits.close()
