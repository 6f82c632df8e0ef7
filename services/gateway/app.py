"""Wiring: NATS, Redis, PostgreSQL, the API on the ops server, the index, a clean drain."""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from services.database import DATABASE_DOWN
from services.gateway.api import Api
from services.gateway.config import Settings
from services.gateway.console import Console
from services.gateway.explorer import Explorer
from services.gateway.lcws import LightSockets
from services.gateway.lightclient import LightClientApi
from services.gateway.lightning import ClnBackend, LightningError, rebalance
from services.gateway.limits import Limits
from services.gateway.metrics import GatewayMetrics
from services.gateway.settle import Settler
from services.gateway.settle_store import SettleStore
from services.gateway.ws import Pushes
from services.indexer.store import Index
from services.partition.client import LedgerClient
from services.runtime import OpsServer

log = logging.getLogger("gateway")

LIGHTNING_POLL_S = 5.0
INDEX_POLL_S = 2.0


class GatewayNode:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = GatewayMetrics()
        self.ops = OpsServer(
            self.metrics.registry, self.ready, settings.max_body, settings.trusted_proxies
        )
        self.api: Api | None = None
        self.lightning_up: bool | None = None  # None: no node configured, or not asked yet
        self.index_up = True
        self.settler: Settler | None = None
        self.draining = False

    def ready(self) -> tuple[bool, str]:
        if self.api is None:
            return False, "starting"
        if not self.api.ledger.nc.is_connected:
            return False, "not connected to NATS"
        if self.draining:
            return False, "draining"
        # payments in the ledger need neither the index nor a Lightning node: ready,
        # and saying so
        node = "" if self.index_up else "; the index database does not answer (no reads)"
        if self.lightning_up is False:
            node += "; the Lightning node does not answer"
        if self.settler is not None:  # payments in the ledger need no settling either
            node += "; settling" if self.settler.leading else "; not settling (standing by)"
        return True, f"routing by partition map v{self.api.ledger.pmap.version}{node}"

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        m = self.metrics
        pmap = s.layout.pmap if s.layout else None
        ledgers = {
            name: await LedgerClient.connect(
                s.nats_url, name, s.packages, m.package_items.observe, pmap
            )
            for name in s.ledgers
        }
        ledger = ledgers[s.operator]
        index = await Index.open(s.database_url)
        limits = Limits.connect(s.redis_url, s.rate_per_s)
        await limits.ping()
        pushes = Pushes(ledger, s.network, m, m.registry, self.ops.tasks)
        api = Api(
            ledgers,
            s.operator,
            index,
            limits,
            m,
            pushes,
            s.network,
            s.max_in_flight,
            s.timeout_ms / 1000,
            s.ledger_ids,
            s.neighbour_ids,
            {m.name: m.issuers for m in s.layout.members} if s.layout else {},
        )
        api.install(self.ops.app)
        members = [m.name for m in s.layout.members] if s.layout else []
        light = LightClientApi(ledger.nc, s.operator, members, s.network)
        light.install(self.ops.app)
        LightSockets(light, api, m, self.ops.tasks).install(self.ops.app)
        Explorer(api, members, s.web_dir).install(self.ops.app)
        Console(s.console_token, s.console_targets, s.grafana_url, s.operator).install(self.ops.app)
        m.queue.labels("in_flight").set_function(lambda: sum(c.in_flight for c in ledgers.values()))
        m.queue.labels("outbox").set_function(lambda: sum(c.packer.depth for c in ledgers.values()))
        tasks = self.ops.tasks
        for name, client in ledgers.items():
            tasks.start(f"packages-{name}", client.packer.run)
        tasks.start("limits", limits.sync_forever)
        tasks.start("index", lambda: self._watch_index(index))
        lightning = ClnBackend(s.lightning_rpc) if s.lightning_rpc else None
        if lightning is not None:
            tasks.start("lightning", lambda: self._watch_lightning(lightning))
        settle_store = None
        if s.settle is not None and lightning is not None:
            settle_store = await SettleStore.open(s.database_url)
            settler = Settler(s.settle, settle_store, lightning, ledger, m)
            api.settle_store, api.settler, self.settler = settle_store, settler, settler
            tasks.start("settle", settler.run)
        await self.ops.start(s.http_host, s.http_port)
        self.api = api
        log.info(
            "gateway ready",
            extra={
                "http_port": self.ops.port,
                "map_version": ledger.pmap.version,
                "ledgers": list(ledgers),
            },
        )
        await stop.wait()
        self.draining = True
        log.info("draining", extra={"in_flight": sum(c.in_flight for c in ledgers.values())})
        await self.ops.stop()  # stops taking requests; waits for the running ones
        await tasks.stop()  # before the connections they use go (else each logs a failure)
        for client in ledgers.values():
            await client.close()
        await index.close()
        if settle_store is not None:
            await settle_store.close()
        await limits.close()

    async def _watch_index(self, index: Index) -> None:
        """Whether the index database answers, every ``INDEX_POLL_S`` (``/readyz``'s
        reason and ``gateway_index_up``); said once as it goes and as it comes back."""
        while True:
            try:
                async with asyncio.timeout(INDEX_POLL_S):
                    await index.ping()
                up = True
            except (*DATABASE_DOWN, TimeoutError, asyncpg.PostgresError) as exc:
                if self.index_up:
                    log.warning("index database not answering", extra={"error": repr(exc)})
                up = False
            if up and not self.index_up:
                log.info("index database answering again")
            self.index_up = up
            self.metrics.index_up.set(int(up))
            await asyncio.sleep(INDEX_POLL_S)

    async def _watch_lightning(self, backend: ClnBackend) -> None:
        """The Lightning node's money into the metrics, every ``LIGHTNING_POLL_S`` (its
        version is read once it answers: it picks the methods the backend calls)."""
        m = self.metrics
        up = False
        while True:
            try:
                if backend.version == (0, 0):
                    info = await backend.connect()
                    log.info(
                        "lightning node",
                        extra={"node_id": info.node_id, "version": info.version},
                    )
                channels = await backend.channels()
                balances = await backend.balances()
            except LightningError as exc:
                if up:  # said once, as it goes down
                    log.warning("lightning node unreachable", extra={"error": str(exc)})
                up = self.lightning_up = False
                m.lightning_up.set(0)
            else:
                up = self.lightning_up = True
                m.lightning_up.set(1)
                kinds = {
                    "local": balances.lightning_local_msat,
                    "spendable": balances.spendable_msat,
                    "receivable": balances.receivable_msat,
                    "onchain_confirmed": balances.onchain_confirmed_msat,
                    "onchain_unconfirmed": balances.onchain_unconfirmed_msat,
                }
                for kind, value in kinds.items():
                    m.lightning_msat.labels(kind).set(value)
                for c in channels:
                    m.lightning_channel_msat.labels(c.peer_id, "local").set(c.local_msat)
                    m.lightning_channel_msat.labels(c.peer_id, "spendable").set(c.spendable_msat)
                    m.lightning_channel_msat.labels(c.peer_id, "receivable").set(c.receivable_msat)
                m.lightning_splicing.set(sum(1 for c in channels if c.splicing))
                if self.settings.liquidity_msat or self.settler is not None:
                    await self._rebalance(backend)
            await asyncio.sleep(LIGHTNING_POLL_S)

    async def _rebalance(self, backend: ClnBackend) -> None:
        expected = self.settler.expected() if self.settler is not None else {}
        try:
            done = await rebalance(backend, self.settings.liquidity_msat, expected)
        except LightningError as exc:
            log.warning("liquidity not checked", extra={"error": str(exc)})
            return
        for splice, error in done:
            direction = "in" if splice.relative_sat > 0 else "out"
            self.metrics.lightning_splices.labels(direction, "failed" if error else "started").inc()
            log.info(
                "splice" if error is None else "splice refused",
                extra={
                    "channel": splice.channel_id,
                    "peer": splice.peer,
                    "sat": splice.relative_sat,
                    "reason": splice.reason,
                    **({"error": error} if error else {}),
                },
            )
