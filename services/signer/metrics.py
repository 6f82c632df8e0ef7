"""The signer's Prometheus metrics, declared once per process (one registry each)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class SignerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests_started = Counter(
            "signer_requests_started", "signing requests this node coordinated", registry=r
        )
        self.requests_finished = Counter(
            "signer_requests_finished",
            "coordinated signing requests by outcome",
            ["outcome"],
            registry=r,
        )
        self.epochs_moved = Counter(
            "signer_checkpoint_epochs_moved",
            "checkpoints asked again in a later epoch at their height (shares split)",
            registry=r,
        )
        self.sessions_started = Counter(
            "signer_sessions_started", "ROAST sessions started (coordinator)", registry=r
        )
        self.sessions_finished = Counter(
            "signer_sessions_finished", "ROAST sessions that produced the signature", registry=r
        )
        self.signer_failures = Counter(
            "signer_signer_failures",
            "failures per signer seen by this coordinator",
            ["signer", "reason"],
            registry=r,
        )
        self.sign_latency = Histogram(
            "signer_sign_latency_seconds",
            "time from a request to its BIP340 signature",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.partial_signatures = Counter(
            "signer_partial_signatures", "partial signatures this signer made", registry=r
        )
        self.refused = Counter(
            "signer_requests_refused", "requests this signer refused", ["code"], registry=r
        )
        self.rejected_messages = Counter(
            "signer_rejected_messages", "messages dropped before handling", ["code"], registry=r
        )
        self.dkg_runs = Counter(
            "signer_dkg_runs", "key generations coordinated, by outcome", ["outcome"], registry=r
        )
        self.dkg_seconds = Histogram(
            "signer_dkg_seconds", "duration of a coordinated key generation", registry=r
        )
        self.pending_requests = Gauge(
            "signer_pending_requests", "signing requests held open by this signer", registry=r
        )
        self.audit_fsync = Histogram(
            "signer_audit_fsync_seconds",
            "appending one audit entry (write and fsync)",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
