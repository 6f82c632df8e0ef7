"""The partition worker's Prometheus metrics (one registry per process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

CONFIRM_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
FSYNC_BUCKETS_S = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class WorkerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.committed = Counter(
            "worker_committed_txs", "transactions this worker coordinated to commit", registry=r
        )
        self.aborted = Counter(
            "worker_aborted_txs",
            "transactions this worker refused or aborted, by code",
            ["code"],
            registry=r,
        )
        self.confirm_seconds = Histogram(
            "worker_confirm_seconds",
            "from a submission's arrival to its durable commit (coordinator)",
            buckets=CONFIRM_BUCKETS_S,
            registry=r,
        )
        self.package_items = Histogram(
            "worker_package_items", "items per package sent", buckets=SIZE_BUCKETS, registry=r
        )
        self.block_records = Histogram(
            "worker_block_records", "records per block written", buckets=SIZE_BUCKETS, registry=r
        )
        self.fsync_seconds = Histogram(
            "worker_fsync_seconds",
            "writing and syncing one block",
            buckets=FSYNC_BUCKETS_S,
            registry=r,
        )
        self.rejected_packages = Counter(
            "worker_rejected_packages", "packages refused as malformed", registry=r
        )
        self.queue = Gauge("worker_queue_depth", "items waiting, by queue", ["queue"], registry=r)
        self.height = Gauge("worker_block_height", "blocks in this worker's log", registry=r)
