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
        self.lc_pushes = Counter(
            "gateway_lc_pushes",
            "light-client websocket pushes, by method (cut: a socket too slow, dropped;"
            " failed: a checkpoint's pushes the indexer did not answer)",
            ["method"],
            registry=r,
        )
        self.lightning_up = Gauge(
            "gateway_lightning_up", "1 while the Lightning node answers", registry=r
        )
        self.index_up = Gauge(
            "gateway_index_up", "1 while the index database (reads) answers", registry=r
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
        # -- settlement between operators (``settle.py``)
        self.settle_leading = Gauge(
            "gateway_settle_leading",
            "1 while this gateway settles for its operator (0: another does, or it restarts)",
            registry=r,
        )
        self.settle_owed = Counter(
            "gateway_settle_owed_msat",
            "outputs paid from this ledger into a peer's, taken as obligations",
            ["peer"],
            registry=r,
        )
        self.settle_paid = Counter(
            "gateway_settle_paid_msat", "obligations settled over Lightning", ["peer"], registry=r
        )
        self.settle_released = Counter(
            "gateway_settle_released_msat",
            "outputs from a peer released here once paid",
            ["peer"],
            registry=r,
        )
        self.settle_batches = Counter(
            "gateway_settle_batches",
            "batches this operator paid, by outcome (settled, failed)",
            ["peer", "outcome"],
            registry=r,
        )
        self.settle_payments = Counter(
            "gateway_settle_payments",
            "Lightning payments started for settlement (a retry counts again)",
            ["peer"],
            registry=r,
        )
        self.settle_failures = Counter(
            "gateway_settle_failures",
            "batches that failed, by the outcome that ended them",
            ["code"],
            registry=r,
        )
        self.settle_batch_seconds = Histogram(
            "gateway_settle_batch_seconds",
            "from a batch's closing to its payment settled",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=r,
        )
        self.settle_release_seconds = Histogram(
            "gateway_settle_release_seconds",
            "from an output announced pending here to its coin issued",
            buckets=(0.1, 0.25, 0.5, 1, 1.5, 2, 2.5, 5, 10, 30),
            registry=r,
        )
        self.settle_pending = Gauge(
            "gateway_settle_pending_outputs",
            "outputs pending: owed to a peer, or held here for one",
            ["peer", "side"],
            registry=r,
        )
        self.settle_pending_age = Gauge(
            "gateway_settle_pending_age_seconds",
            "the age of the oldest output pending here from a peer",
            ["peer"],
            registry=r,
        )
        self.settle_announce_refused = Counter(
            "gateway_settle_announce_refused",
            "outputs a peer announced beyond what is held pending for it (announced again)",
            ["peer"],
            registry=r,
        )
        self.settle_release_refused = Counter(
            "gateway_settle_release_refused",
            "releases the ledger refused (tried again later, with a back-off)",
            ["peer"],
            registry=r,
        )
        self.settle_untaken = Gauge(
            "gateway_settle_untaken_outputs",
            "outputs paid to other ledgers that are not obligations yet",
            registry=r,
        )
        self.settle_untaken_age = Gauge(
            "gateway_settle_untaken_age_seconds",
            "the age of the oldest output paid to another ledger not yet an obligation",
            registry=r,
        )
        self.settle_expected = Gauge(
            "gateway_settle_expected_msat",
            "what a batch to a peer is expected to carry (the liquidity policy keeps the"
            " channel able to send it, twice over)",
            ["peer"],
            registry=r,
        )
        self.settle_unsent = Counter(
            "gateway_settle_unsent",
            "settlement messages not sent (the peer unreachable)",
            ["peer"],
            registry=r,
        )
        self.settle_refused = Counter(
            "gateway_settle_refused", "settlement messages refused as malformed", registry=r
        )
        self.reserve_msat = Gauge(
            "gateway_reserve_msat",
            "the reserve invariant's terms: l3_held, owed_to_others, owed_by_others, funds,"
            " slack, drift (0 when it holds), in_flight",
            ["term"],
            registry=r,
        )
        self.reserve_ok = Gauge(
            "gateway_reserve_ok", "1 while the reserve invariant holds", registry=r
        )
