"""The operator's process: kopf's reactor and the ops server in one event loop."""

from __future__ import annotations

import asyncio
import logging

import kopf
from prometheus_client import CollectorRegistry

from services.operator.config import Settings
from services.operator.handlers import Reconciler, registry
from services.operator.kube import Kube
from services.operator.metrics import Metrics
from services.operator.spec import FINALIZER
from services.runtime import OpsServer

_log = logging.getLogger("operator")


class OperatorNode:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.prom = CollectorRegistry()
        self.metrics = Metrics(self.prom)
        self.ready = asyncio.Event()
        self.ops = OpsServer(self.prom, self._ready)
        self._reconciler: Reconciler | None = None

    def _ready(self) -> tuple[bool, str]:
        if not self.ready.is_set():
            return False, "watching no Guilds yet"
        return True, f"watching Guilds in {self.s.namespace or 'every namespace'}"

    def reconciler(self) -> Reconciler:
        assert self._reconciler is not None, "a handler ran before the operator started"
        return self._reconciler

    async def run(self, stop: asyncio.Event) -> None:
        kube = Kube(self.s.connection)
        self._reconciler = Reconciler(
            kube, self.metrics, self.s.image, self.s.nats_addr, self.s.stall_s
        )
        await self.ops.start(self.s.http_host, self.s.http_port)
        settings = kopf.OperatorSettings()
        settings.posting.level = logging.INFO
        settings.persistence.finalizer = FINALIZER
        try:
            await kopf.operator(
                registry=registry(self.s.connection, self.reconciler, self.s.resync_s),
                settings=settings,
                clusterwide=not self.s.namespace,
                namespaces=[self.s.namespace] if self.s.namespace else (),
                standalone=True,  # one replica (the Deployment's strategy is Recreate)
                stop_flag=stop,
                ready_flag=self.ready,
            )
        finally:
            await kube.close()
            await self.ops.stop()
            _log.info("operator stopped")
