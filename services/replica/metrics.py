"""A machine's Prometheus metrics: per copy, read from the replicas when scraped."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from constellation.replication.replica import Role
from services.replica.host import HostedCopy

ROUND_BUCKETS_S = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class CopyCollector(Collector):
    """Each copy's term, role, heights, snapshot, lag, members, elections, refusals,
    evidence and damage."""

    def __init__(self, copies: Callable[[], Sequence[HostedCopy]]) -> None:
        self.copies = copies

    def collect(self) -> Iterator[Metric]:
        labels = ["shard", "copy"]
        term = GaugeMetricFamily("replica_term", "the copy's current term", labels=labels)
        leading = GaugeMetricFamily(
            "replica_leading", "1 where this copy leads its shard", labels=labels
        )
        leader = GaugeMetricFamily(
            "replica_leader", "the copy this copy follows (-1: none known)", labels=labels
        )
        confirmed = GaugeMetricFamily(
            "replica_confirmed_height", "the highest block known confirmed", labels=labels
        )
        last = GaugeMetricFamily("replica_last_height", "the highest block held", labels=labels)
        snapshot = GaugeMetricFamily(
            "replica_snapshot_height",
            "the block of this copy's latest snapshot (the log before it is dropped)",
            labels=labels,
        )
        unsnapped = GaugeMetricFamily(
            "replica_blocks_since_snapshot",
            "blocks held after the latest snapshot (one is taken every REPLICA_SNAPSHOT_EVERY"
            " confirmed blocks, once their confirmation is proven)",
            labels=labels,
        )
        damaged = GaugeMetricFamily(
            "replica_damaged",
            "1 while this copy may have lost blocks it acked (a damaged disk): it neither"
            " votes nor campaigns until it holds a block of a term begun after its restart",
            labels=labels,
        )
        since = GaugeMetricFamily(
            "replica_seconds_since_confirmed",
            "since this copy last learned of a newly confirmed block",
            labels=labels,
        )
        lag = GaugeMetricFamily(
            "replica_lag_blocks",
            "at a leader: blocks each other copy lacks",
            labels=[*labels, "peer"],
        )
        gap = GaugeMetricFamily(
            "replica_events_gap",
            "the height up to which the events log lacks blocks' events (0: whole)",
            labels=labels,
        )
        evidence = GaugeMetricFamily(
            "replica_evidence", "operators this copy holds a proof against", labels=labels
        )
        elections = CounterMetricFamily(
            "replica_elections", "elections this copy started", labels=labels
        )
        refused_blocks = CounterMetricFamily(
            "replica_refused_blocks", "blocks this copy found invalid", labels=labels
        )
        refused = CounterMetricFamily(
            "replica_refused_messages", "messages the protocol refused", labels=labels
        )
        dropped = CounterMetricFamily(
            "replica_dropped_packages",
            "at a leader: packages refused while a full block's worth waited",
            labels=labels,
        )
        snapshots = CounterMetricFamily(
            "replica_snapshots_installed", "snapshots received from a leader", labels=labels
        )
        voters = GaugeMetricFamily(
            "replica_voters",
            "operators voting in the shard, as this copy's log says",
            labels=labels,
        )
        learners = GaugeMetricFamily(
            "replica_learners", "operators learning the shard's log (joining)", labels=labels
        )
        joint = GaugeMetricFamily(
            "replica_members_joint",
            "1 while the shard is in a joint step of a change of members (both sets count)",
            labels=labels,
        )
        now = time.monotonic()
        for c in self.copies():
            r, lv = c.replica, [c.name, str(c.me)]
            term.add_metric(lv, r.term)
            leading.add_metric(lv, 1 if r.role is Role.LEADER else 0)
            leader.add_metric(lv, r.leader)
            confirmed.add_metric(lv, r.confirmed)
            last.add_metric(lv, r.last)
            snapshot.add_metric(lv, r.snap.height)
            unsnapped.add_metric(lv, r.last - r.snap.height)
            damaged.add_metric(lv, 1 if r.damaged else 0)
            since.add_metric(lv, now - c.confirmed_at)
            evidence.add_metric(lv, len(r.evidence))
            gap.add_metric(lv, c.gap or 0)
            voters.add_metric(lv, len(r.members.voters))
            learners.add_metric(lv, len(r.members.learners))
            joint.add_metric(lv, 1 if r.members.old else 0)
            elections.add_metric(lv, r.counters.elections)
            refused_blocks.add_metric(lv, r.counters.refused_blocks)
            refused.add_metric(lv, r.counters.refused_messages)
            snapshots.add_metric(lv, r.counters.snapshots_installed)
            dropped.add_metric(lv, c.dropped)
            if r.role is Role.LEADER:
                for peer, p in r.progress.items():
                    lag.add_metric([*lv, str(peer)], max(0, r.last - p.match))
        yield from (term, leading, leader, confirmed, last, since, lag, evidence, gap)
        yield from (snapshot, unsnapped, damaged)
        yield from (voters, learners, joint)
        yield from (elections, refused_blocks, refused, snapshots, dropped)


class MachineMetrics:
    def __init__(self, copies: Callable[[], Sequence[HostedCopy]]) -> None:
        r = self.registry = CollectorRegistry()
        r.register(CopyCollector(copies))
        self.rejected = Counter(
            "replica_rejected_messages",
            "messages from the network refused before the protocol saw them, by reason",
            ["reason"],
            registry=r,
        )
        self.round_seconds = Histogram(
            "replica_round_seconds",
            "at a leader: from proposing a block to its confirmation",
            buckets=ROUND_BUCKETS_S,
            registry=r,
        )
        self.undelivered = Counter(
            "replica_undelivered_messages",
            "messages not sent: no connection to the receiving operator",
            ["peer"],
            registry=r,
        )
        self.placement = Gauge(
            "replica_placement_version",
            "the version of its operator's placement of copies this machine follows",
            registry=r,
        )
        self.moved_bytes = Counter(
            "replica_moved_bytes",
            "bytes of copies' folders fetched from another machine of the operator",
            registry=r,
        )
        self.tick_failures = Counter(
            "replica_tick_failures",
            "ticks of a copy that raised (a bug; the machine is not ready while they do)",
            ["shard"],
            registry=r,
        )
        self.relayed = Counter(
            "replica_relayed_messages",
            "packages, queries and answers relayed for shards led at another operator",
            ["direction"],  # out: sent to another operator; in: taken from one
            registry=r,
        )
