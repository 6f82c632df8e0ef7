"""The operator's Prometheus metrics, declared once."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.reconciles = Counter(
            "operator_reconciles",
            "reconciles of a Guild, by the phase it was left in",
            ["phase"],
            registry=registry,
        )
        self.changes = Counter(
            "operator_guild_change_reconciles",
            "reconciles of a GuildChange, by the phase it was left in",
            ["phase"],
            registry=registry,
        )
        self.rebalances = Counter(
            "operator_guild_rebalance_reconciles",
            "reconciles of a GuildRebalance, by the phase it was left in",
            ["phase"],
            registry=registry,
        )
        self.applied = Counter(
            "operator_applied_objects", "objects created or patched", registry=registry
        )
