"""The mint's Prometheus metrics, declared once."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class MintMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.operations = Counter(
            "mint_operations",
            "requests answered, by operation and outcome (ok, or the NUT error code)",
            ["op", "outcome"],
            registry=r,
        )
        self.seconds = Histogram(
            "mint_operation_seconds",
            "from a request's arrival to its answer, by operation",
            ["op"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.outstanding = Gauge(
            "mint_outstanding",
            "ecash out there per keyset (signed minus spent), in its unit",
            ["keyset"],
            registry=r,
        )
        self.redeems_in_doubt = Counter(
            "mint_redeems_in_doubt",
            "redemptions refused after a send whose answer was lost, kept PENDING (alert)",
            registry=r,
        )
        self.swap_groups = Histogram(
            "mint_swap_group_swaps",
            "swaps committed together in one transaction",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.ec_stops = Counter(
            "mint_ec_process_stops",
            "EC processes that stopped unasked (each is replaced; their calls answered 503)",
            registry=r,
        )
        self.pending_melts = Gauge(
            "mint_pending_melts", "melts whose payment's fate is not known yet", registry=r
        )
        self.oldest_pending_melt = Gauge(
            "mint_oldest_pending_melt_seconds",
            "age of the oldest melt whose payment's fate is not known yet",
            registry=r,
        )
        self.ws_sockets = Gauge(
            "mint_ws_sockets", "websockets open for NUT-17 subscriptions", registry=r
        )
        self.ws_notifications = Counter(
            "mint_ws_notifications", "NUT-17 notifications of a change sent", registry=r
        )
        self.cache = Counter(
            "mint_cache",
            "NUT-19 cached answers looked up: hit, miss, or error (Redis not reachable)",
            ["outcome"],
            registry=r,
        )
        self.chain_feerate = Gauge(
            "mint_chain_feerate",
            "sat/vB the mint's on-chain transactions are built at now (bitcoind's estimate,"
            " within MINT_CHAIN_FEERATE and MINT_CHAIN_MAX_FEERATE)",
            registry=r,
        )
        self.deposits_below_min = Counter(
            "mint_chain_deposits_below_min",
            "on-chain deposits (outputs) under their quote's min_amount: not credited (NUT-30)",
            registry=r,
        )
        self.chain_height = Gauge(
            "mint_chain_height", "the last block the chain follower read (NUT-30)", registry=r
        )
        self.withdrawals_open = Gauge(
            "mint_withdrawals_open",
            "on-chain withdrawals recorded and not yet signed and sent (the resolver's)",
            registry=r,
        )
        self.withdrawals_unmined = Gauge(
            "mint_withdrawals_unmined",
            "on-chain withdrawals and moves sent and in no block yet (sent again until one)",
            registry=r,
        )
