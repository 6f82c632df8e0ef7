"""The gateway's Prometheus metrics (one registry per process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.partition.metrics import CONFIRM_BUCKETS_S, SIZE_BUCKETS


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.submitted = Counter(
            "gateway_txs", "transactions answered, by outcome code", ["code"], registry=r
        )
        self.confirm_seconds = Histogram(
            "gateway_confirm_seconds",
            "from a transaction's arrival to its answer",
            buckets=CONFIRM_BUCKETS_S,
            registry=r,
        )
        self.package_items = Histogram(
            "gateway_package_items", "items per package sent", buckets=SIZE_BUCKETS, registry=r
        )
        self.http = Counter(
            "gateway_http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.queue = Gauge("gateway_queue_depth", "items waiting, by queue", ["queue"], registry=r)
        self.websockets = Gauge("gateway_websockets", "open websocket subscriptions", registry=r)
        self.lightning_up = Gauge(
            "gateway_lightning_up", "1 while the Lightning node answers", registry=r
        )
        self.lightning_msat = Gauge(
            "gateway_lightning_msat",
            "the Lightning node's money: local, spendable and receivable in channels that "
            "can carry payments, and on-chain (confirmed or not)",
            ["kind"],
            registry=r,
        )
        self.lightning_channel_msat = Gauge(
            "gateway_lightning_channel_msat",
            "per channel: ours, what we can send, what we can receive",
            ["peer", "kind"],
            registry=r,
        )
        self.lightning_splicing = Gauge(
            "gateway_lightning_splicing", "channels with a splice in flight", registry=r
        )
        self.lightning_splices = Counter(
            "gateway_lightning_splices",
            "splices the liquidity policy started, by direction and outcome",
            ["direction", "outcome"],
            registry=r,
        )
