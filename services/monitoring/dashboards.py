"""Constellation's Grafana dashboards, built with grafana-foundation-sdk.

``python -m services.monitoring.dashboards`` writes each dashboard as JSON into
``helm/constellation/files/dashboards/<name>.json``, where the chart ships it as a
ConfigMap for Grafana's sidecar; ``--check`` only says whether those files are current.
A test fails when they are not, so edit this file and run the module, never the JSON.

Every query reads metrics the services declare (``services/*/metrics.py``, and
``task_failures`` of ``services/runtime.py``), plus two from outside: ``up`` (Prometheus,
per target) and ``container_cpu_usage_seconds_total`` (the kubelet's cAdvisor). The
services serve their own registries, which hold no ``process_*`` metrics, so the CPU a
pod uses is read from cAdvisor. Every dashboard has a ``datasource`` variable (any
Prometheus) and a ``namespace`` one: a guild runs in its own namespace.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm

OUT_DIR = Path(__file__).resolve().parents[2] / "helm" / "constellation" / "files" / "dashboards"

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
NAMESPACE = 'namespace=~"$namespace"'
RATE = "$__rate_interval"
RANGE = "$__range"

# Grafana has no unit for these: a custom suffix says what the number counts.
MSAT = "suffix: msat"
PER_S = "suffix: /s"
TX_PER_S = "suffix: tx/s"
BLOCKS = "suffix: blocks"
CORES = "suffix: cores"

GRAPH_WIDTH, GRAPH_HEIGHT = 12, 8
STAT_WIDTH, STAT_HEIGHT = 6, 4


# -- PromQL --------------------------------------------------------------------------------


def sel(metric: str, *matchers: str) -> str:
    """``metric`` in the namespaces chosen on the dashboard, with more ``matchers``."""
    return f"{metric}{{{', '.join((NAMESPACE, *matchers))}}}"


def rate(metric: str, *matchers: str, window: str = RATE) -> str:
    return f"rate({sel(metric, *matchers)}[{window}])"


def increase(metric: str, *matchers: str, window: str = RATE) -> str:
    return f"increase({sel(metric, *matchers)}[{window}])"


def quantile(q: float, histogram: str, *by: str) -> str:
    """The ``q`` quantile of a histogram's observations, per ``by``."""
    labels = ", ".join((*by, "le"))
    return f"histogram_quantile({q}, sum by ({labels}) ({rate(histogram + '_bucket')}))"


def leading(expr: str) -> str:
    """``expr`` only from the gateway that settles for its operator (a standby keeps
    what it showed when it last settled, or shows nothing)."""
    return f"({expr}) and on (job, instance) ({sel('gateway_settle_leading')} == 1)"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


# -- building ------------------------------------------------------------------------------


class Board:
    """One dashboard being built: numbers its rows, panels and queries, and places the
    panels left to right, row after row."""

    def __init__(self, uid: str, title: str, description: str) -> None:
        self._ids = itertools.count(1)
        namespace = (
            db.QueryVariable("namespace")
            .label("Namespace")
            .description("The guild's namespace (one guild per namespace).")
            .datasource(DATASOURCE)
            .query("label_values(up, namespace)")
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
        self.builder = (
            db.Dashboard(title)
            .uid(uid)
            .description(description)
            .tags(["constellation"])
            .time("now-1h", "now")
            .refresh("30s")
            .timezone("browser")
            .tooltip(dm.DashboardCursorSync.CROSSHAIR)
            .with_variable(
                db.DatasourceVariable("datasource").label("Data source").type("prometheus")
            )
            .with_variable(namespace)
        )

    def row(self, title: str) -> None:
        self.builder.with_row(db.Row(title).id(next(self._ids)))

    def graph(
        self,
        title: str,
        description: str,
        unit: str,
        *queries: Query,
        width: int = GRAPH_WIDTH,
        stacked: bool = False,
    ) -> None:
        panel = (
            timeseries.Panel()
            .id(next(self._ids))
            .title(title)
            .description(description)
            .datasource(DATASOURCE)
            .unit(unit)
            .span(width)
            .height(GRAPH_HEIGHT)
            .fill_opacity(10)
            .legend(
                common_builders.VizLegendOptions()
                .display_mode(common.LegendDisplayMode.LIST)
                .placement(common.LegendPlacement.BOTTOM)
                .show_legend(True)
            )
            .tooltip(
                common_builders.VizTooltipOptions()
                .mode(common.TooltipDisplayMode.MULTI)
                .sort(common.SortOrder.DESCENDING)
            )
        )
        if stacked:
            panel.stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
        for target in _targets(queries):
            panel.with_target(target)
        self.builder.with_panel(panel)

    def stat(
        self,
        title: str,
        description: str,
        unit: str,
        *queries: Query,
        red_from: float | None = None,
        mappings: Sequence[dm.ValueMapping] = (),
        width: int = STAT_WIDTH,
    ) -> None:
        """A number; red at ``red_from`` and above, if given."""
        steps = [dm.Threshold(None, "green")]
        if red_from is not None:
            steps.append(dm.Threshold(red_from, "red"))
        panel = (
            stat.Panel()
            .id(next(self._ids))
            .title(title)
            .description(description)
            .datasource(DATASOURCE)
            .unit(unit)
            .span(width)
            .height(STAT_HEIGHT)
            .graph_mode(common.BigValueGraphMode.AREA)
            .color_mode(common.BigValueColorMode.VALUE)
            .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
            .thresholds(db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(steps))
        )
        if mappings:
            panel.mappings(list(mappings))
        for target in _targets(queries):
            panel.with_target(target)
        self.builder.with_panel(panel)

    def build(self) -> dm.Dashboard:
        return self.builder.build()


def _targets(queries: Sequence[Query]) -> list[prometheus.Dataquery]:
    assert 0 < len(queries) <= 26, "a panel has from 1 to 26 queries (refIds A to Z)"
    return [
        prometheus.Dataquery()
        .datasource(DATASOURCE)
        .expr(q.expr)
        .legend_format(q.legend)
        .ref_id(chr(ord("A") + i))
        for i, q in enumerate(queries)
    ]


# -- the dashboards ------------------------------------------------------------------------


def ledger() -> dm.Dashboard:
    b = Board(
        "constellation-ledger",
        "Constellation / Ledger",
        "Transactions through the gateways and partition workers: throughput, latency,"
        " queues, batching and the CPU each pod uses.",
    )
    committed, not_committed = 'code="committed"', 'code!="committed"'
    b.row("Transactions")
    b.stat(
        "Committed",
        "Transactions the gateways answered as committed.",
        TX_PER_S,
        Query(f"sum({rate('gateway_txs_total', committed)})", "committed"),
    )
    b.stat(
        "Not committed",
        "Transactions the gateways answered with an error (refused, timed out, ...).",
        TX_PER_S,
        Query(f"sum({rate('gateway_txs_total', not_committed)})", "error"),
    )
    b.stat(
        "Confirm latency p99",
        "From a transaction's arrival at a gateway to its answer.",
        "s",
        Query(quantile(0.99, "gateway_confirm_seconds"), "p99"),
    )
    b.stat(
        "Targets down",
        "Scrape targets in the namespace that do not answer.",
        "short",
        Query(f"sum(1 - {sel('up')})", "down"),
        red_from=1,
    )
    b.graph(
        "Transactions answered, by outcome",
        "At the gateways: committed, or the error code answered.",
        TX_PER_S,
        Query(f"sum by (code) ({rate('gateway_txs_total')})", "{{code}}"),
        stacked=True,
    )
    b.graph(
        "Transactions coordinated",
        "At the partition workers: transactions each coordinated to commit, and those"
        " refused or aborted, by code.",
        TX_PER_S,
        Query(f"sum by (pod) ({rate('worker_committed_txs_total')})", "committed {{pod}}"),
        Query(f"sum by (code) ({rate('worker_aborted_txs_total')})", "aborted {{code}}"),
    )
    b.graph(
        "Confirm latency at the gateways",
        "From a transaction's arrival at a gateway to its answer.",
        "s",
        Query(quantile(0.5, "gateway_confirm_seconds"), "p50"),
        Query(quantile(0.99, "gateway_confirm_seconds"), "p99"),
    )
    b.graph(
        "Confirm latency at the coordinators",
        "From a submission's arrival at its coordinator to its durable commit.",
        "s",
        Query(quantile(0.5, "worker_confirm_seconds"), "p50"),
        Query(quantile(0.99, "worker_confirm_seconds"), "p99"),
    )
    b.row("Machines")
    b.graph(
        "CPU per pod",
        "Cores each pod's containers use (the kubelet's cAdvisor; the services export no"
        " process metrics of their own).",
        CORES,
        Query(
            "sum by (pod) (rate(container_cpu_usage_seconds_total"
            f'{{{NAMESPACE}, container!="", container!="POD"}}[{RATE}]))',
            "{{pod}}",
        ),
    )
    b.graph(
        "Tasks restarted",
        "Long-running tasks that died and were restarted, per pod and task.",
        "short",
        Query(f"sum by (pod, task) ({increase('task_failures_total')})", "{{pod}} {{task}}"),
    )
    b.graph(
        "Queue depth at the gateways",
        "Items waiting, by queue (in_flight: submitted, not answered; outbox: not sent).",
        "short",
        Query(f"sum by (pod, queue) ({sel('gateway_queue_depth')})", "{{pod}} {{queue}}"),
    )
    b.graph(
        "Queue depth at the partition workers",
        "Items waiting, by queue.",
        "short",
        Query(f"sum by (pod, queue) ({sel('worker_queue_depth')})", "{{pod}} {{queue}}"),
    )
    b.graph(
        "Batching, median",
        "Items per package sent and records per block written: how well load batches.",
        "short",
        Query(quantile(0.5, "gateway_package_items"), "items per package, gateways"),
        Query(quantile(0.5, "worker_package_items"), "items per package, workers"),
        Query(quantile(0.5, "worker_block_records"), "records per block, workers"),
    )
    b.graph(
        "Block write and fsync",
        "Writing and syncing one block at the partition workers.",
        "s",
        Query(quantile(0.5, "worker_fsync_seconds", "pod"), "p50 {{pod}}"),
        Query(quantile(0.99, "worker_fsync_seconds", "pod"), "p99 {{pod}}"),
    )
    b.graph(
        "Blocks in each worker's log",
        "The height of each partition worker's log.",
        BLOCKS,
        Query(f"max by (pod) ({sel('worker_block_height')})", "{{pod}}"),
    )
    b.graph(
        "Packages refused",
        "Packages the partition workers refused as malformed.",
        PER_S,
        Query(f"sum by (pod) ({rate('worker_rejected_packages_total')})", "{{pod}}"),
    )
    b.row("Clients")
    b.graph(
        "HTTP requests, by status",
        "Requests the gateways answered.",
        "reqps",
        Query(f"sum by (status) ({rate('gateway_http_requests_total')})", "{{status}}"),
        stacked=True,
    )
    b.graph(
        "Websockets and light-client pushes",
        "Open websocket subscriptions, and light-client pushes by method.",
        "short",
        Query(f"sum({sel('gateway_websockets')})", "open websockets"),
        Query(f"sum by (method) ({rate('gateway_lc_pushes_total')})", "pushes/s {{method}}"),
    )
    return b.build()


def replication() -> dm.Dashboard:
    b = Board(
        "constellation-replication",
        "Constellation / Replication",
        "The copies of each shard on this operator's machines: leaders, terms, elections,"
        " confirmation, lag behind the leader, refusals and evidence against operators.",
    )
    b.row("Leadership")
    b.stat(
        "Shards without a known leader",
        "Shards whose every copy here follows no one (replica_leader is -1).",
        "short",
        Query(f"count(max by (shard) ({sel('replica_leader')}) < 0) or vector(0)", "shards"),
        red_from=1,
    )
    b.stat(
        "Evidence held",
        "The most operators any copy holds a proof against: an operator misbehaved.",
        "short",
        Query(f"max({sel('replica_evidence')})", "operators"),
        red_from=1,
    )
    b.stat(
        "Largest lag",
        "At the leaders here: the most blocks another copy lacks.",
        BLOCKS,
        Query(f"max({sel('replica_lag_blocks')})", "blocks"),
    )
    b.stat(
        "Elections",
        "Elections the copies here started in the time range shown.",
        "short",
        Query(f"sum({increase('replica_elections_total', window=RANGE)})", "elections"),
    )
    b.graph(
        "Shards led, by machine",
        "Shards whose copy on each machine leads.",
        "short",
        Query(f"sum by (pod) ({sel('replica_leading')})", "{{pod}}"),
        stacked=True,
    )
    b.graph(
        "Shards led, by copy",
        "Shards led by each copy number (copies 2k and 2k+1 are operator k's).",
        "short",
        Query(f"sum by (copy) ({sel('replica_leading')})", "copy {{copy}}"),
        stacked=True,
    )
    b.graph(
        "Leader followed",
        "The copy each copy follows (-1: none known).",
        "short",
        Query(f"max by (shard, copy) ({sel('replica_leader')})", "{{shard}} copy {{copy}}"),
    )
    b.graph(
        "Term and elections",
        "Each shard's term, and the elections its copies here started.",
        "short",
        Query(f"max by (shard) ({sel('replica_term')})", "term {{shard}}"),
        Query(f"sum by (shard) ({increase('replica_elections_total')})", "elections {{shard}}"),
    )
    b.row("Progress")
    b.graph(
        "Blocks confirmed",
        "Blocks confirmed per second, per shard.",
        PER_S,
        Query(f"max by (shard) (deriv({sel('replica_confirmed_height')}[{RATE}]))", "{{shard}}"),
    )
    b.graph(
        "Lag behind the leader",
        "At each leader here: the blocks each other copy lacks.",
        BLOCKS,
        Query(f"max by (shard, peer) ({sel('replica_lag_blocks')})", "{{shard}} copy {{peer}}"),
    )
    b.graph(
        "Since a block was confirmed",
        "Since each copy last learned of a newly confirmed block (it grows while a shard"
        " is idle, too).",
        "s",
        Query(
            f"max by (shard, copy) ({sel('replica_seconds_since_confirmed')})",
            "{{shard}} copy {{copy}}",
        ),
    )
    b.graph(
        "Held, not yet confirmed",
        "Blocks each copy holds above the highest it knows confirmed.",
        BLOCKS,
        Query(
            f"max by (shard, copy) ({sel('replica_last_height')}"
            f" - {sel('replica_confirmed_height')})",
            "{{shard}} copy {{copy}}",
        ),
    )
    b.graph(
        "Round latency at the leaders",
        "From proposing a block to its confirmation.",
        "s",
        Query(quantile(0.5, "replica_round_seconds"), "p50"),
        Query(quantile(0.99, "replica_round_seconds"), "p99"),
    )
    b.graph(
        "Events log gaps and snapshots",
        "The height up to which a copy's events log lacks blocks' events (0: whole), and"
        " snapshots installed from a leader.",
        "short",
        Query(
            f"max by (shard, copy) ({sel('replica_events_gap')})",
            "gap {{shard}} copy {{copy}}",
        ),
        Query(
            f"sum by (shard, copy) ({increase('replica_snapshots_installed_total')})",
            "snapshots {{shard}} copy {{copy}}",
        ),
    )
    b.row("Faults")
    b.graph(
        "Evidence held",
        "Operators each copy holds a proof against (equivocation, double vote).",
        "short",
        Query(f"max by (shard, copy) ({sel('replica_evidence')})", "{{shard}} copy {{copy}}"),
    )
    b.graph(
        "Blocks refused",
        "Blocks a copy found invalid.",
        "short",
        Query(
            f"sum by (shard, copy) ({increase('replica_refused_blocks_total')})",
            "{{shard}} copy {{copy}}",
        ),
    )
    b.graph(
        "Messages refused",
        "Messages the protocol refused, per shard, and those refused before it saw them,"
        " by reason.",
        PER_S,
        Query(f"sum by (shard) ({rate('replica_refused_messages_total')})", "protocol {{shard}}"),
        Query(f"sum by (reason) ({rate('replica_rejected_messages_total')})", "network {{reason}}"),
    )
    b.graph(
        "Messages between operators",
        "Relayed for shards led at another operator, by direction, and not sent for want"
        " of a connection, by peer operator.",
        PER_S,
        Query(
            f"sum by (direction) ({rate('replica_relayed_messages_total')})",
            "relayed {{direction}}",
        ),
        Query(
            f"sum by (peer) ({rate('replica_undelivered_messages_total')})",
            "undelivered {{peer}}",
        ),
    )
    b.graph(
        "Packages dropped at the leaders",
        "Packages refused while a full block's worth waited.",
        PER_S,
        Query(f"sum by (shard) ({rate('replica_dropped_packages_total')})", "{{shard}}"),
    )
    b.row("Placement and members")
    b.stat(
        "Shards changing members",
        "Shards whose copies here are in a joint step of a change of members, or have a"
        " joiner learning their log (a GuildChange under way).",
        "short",
        Query(
            f"count(max by (shard) ({sel('replica_members_joint')}"
            f" + {sel('replica_learners')}) > 0) or vector(0)",
            "shards",
        ),
    )
    b.stat(
        "Fewest voters",
        "The fewest operators voting in any shard, as the copies here see it.",
        "short",
        Query(f"min({sel('replica_voters')})", "operators"),
    )
    b.stat(
        "Placement version",
        "The version of the operator's placement of copies its machines follow (it moves"
        " on with each step of a change of machines).",
        "short",
        Query(f"max({sel('replica_placement_version')})", "version"),
    )
    b.stat(
        "Machines out of step",
        "Machines following an older placement than the newest any machine follows.",
        "short",
        Query(
            f"count({sel('replica_placement_version')}"
            f" < scalar(max({sel('replica_placement_version')}))) or vector(0)",
            "machines",
        ),
    )
    b.graph(
        "Copies, by machine",
        "The copies each machine runs: they spread over the machines after a rebalance.",
        "short",
        Query(f"count by (pod) ({sel('replica_term')})", "{{pod}}"),
        stacked=True,
    )
    b.graph(
        "Copies moved in, by machine",
        "Bytes of copies' folders each machine fetched from another while copies move.",
        "Bps",
        Query(f"sum by (pod) ({rate('replica_moved_bytes_total')})", "{{pod}}"),
    )
    b.graph(
        "Voters and learners, by shard",
        "Operators voting in each shard and those learning its log (joining).",
        "short",
        Query(f"min by (shard) ({sel('replica_voters')})", "voters {{shard}}"),
        Query(f"max by (shard) ({sel('replica_learners')})", "learners {{shard}}"),
    )
    return b.build()


def money() -> dm.Dashboard:
    b = Board(
        "constellation-money",
        "Constellation / Money",
        "The reserve invariant, settlement between operators, the Lightning node and the"
        " ecash mint.",
    )
    holds = dm.ValueMap(
        {
            "0": dm.ValueMappingResult(text="BROKEN", color="red", index=0),
            "1": dm.ValueMappingResult(text="holds", color="green", index=1),
        }
    )
    drift = 'term="drift"'
    b.row("Reserve")
    b.stat(
        "Reserve invariant",
        "Whether the reserve invariant holds, at the gateway that settles.",
        "short",
        Query(f"min({leading(sel('gateway_reserve_ok'))})", "reserve"),
        mappings=[holds],
    )
    b.stat(
        "Gateways settling",
        "Gateways that hold the settlement lock: one per operator.",
        "short",
        Query(f"sum({sel('gateway_settle_leading')})", "settling"),
        red_from=2,
    )
    b.stat(
        "Drift",
        "How far the reserve moved beyond fees since its baseline (0 while it holds).",
        MSAT,
        Query(f"max({leading(sel('gateway_reserve_msat', drift))})", "drift"),
    )
    b.stat(
        "Lightning node",
        "Whether the Lightning node of the gateway that settles answers.",
        "short",
        Query(f"min({leading(sel('gateway_lightning_up'))})", "lightning"),
        mappings=[
            dm.ValueMap(
                {
                    "0": dm.ValueMappingResult(text="down", color="red", index=0),
                    "1": dm.ValueMappingResult(text="up", color="green", index=1),
                }
            )
        ],
    )
    b.graph(
        "Reserve terms",
        "The invariant's terms at the gateway that settles.",
        MSAT,
        Query(f"max by (term) ({leading(sel('gateway_reserve_msat'))})", "{{term}}"),
    )
    b.graph(
        "Reserve invariant, per gateway",
        "1 while the invariant holds; and 1 while the gateway settles for its operator.",
        "short",
        Query(f"max by (pod) ({sel('gateway_reserve_ok')})", "holds {{pod}}"),
        Query(f"max by (pod) ({sel('gateway_settle_leading')})", "settles {{pod}}"),
    )
    b.row("Settlement")
    b.graph(
        "Outputs pending",
        "Outputs owed to a peer, or held here for one, by peer.",
        "short",
        Query(
            f"sum by (peer, side) ({sel('gateway_settle_pending_outputs')})",
            "{{side}} {{peer}}",
        ),
        Query(f"sum({sel('gateway_settle_untaken_outputs')})", "untaken"),
    )
    b.graph(
        "Oldest output waiting",
        "The oldest output pending here from each peer, and the oldest paid to another"
        " ledger and not yet an obligation (untaken).",
        "s",
        Query(
            f"max by (peer) ({leading(sel('gateway_settle_pending_age_seconds'))})",
            "pending {{peer}}",
        ),
        Query(f"max({leading(sel('gateway_settle_untaken_age_seconds'))})", "untaken"),
    )
    b.graph(
        "Owed, paid and released",
        "Outputs taken as obligations to each peer, obligations settled over Lightning,"
        " and outputs from a peer released here once paid.",
        MSAT + "/s",
        Query(f"sum by (peer) ({rate('gateway_settle_owed_msat_total')})", "owed {{peer}}"),
        Query(f"sum by (peer) ({rate('gateway_settle_paid_msat_total')})", "paid {{peer}}"),
        Query(
            f"sum by (peer) ({rate('gateway_settle_released_msat_total')})",
            "released {{peer}}",
        ),
    )
    b.graph(
        "Batches",
        "Batches paid, by peer and outcome, and Lightning payments started (a retry counts again).",
        "short",
        Query(
            f"sum by (peer, outcome) ({increase('gateway_settle_batches_total')})",
            "{{outcome}} {{peer}}",
        ),
        Query(
            f"sum by (peer) ({increase('gateway_settle_payments_total')})",
            "payments {{peer}}",
        ),
    )
    b.graph(
        "Settlement latency",
        "From a batch's closing to its payment settled, and from an output announced"
        " pending here to its coin issued.",
        "s",
        Query(quantile(0.5, "gateway_settle_batch_seconds"), "batch p50"),
        Query(quantile(0.99, "gateway_settle_batch_seconds"), "batch p99"),
        Query(quantile(0.5, "gateway_settle_release_seconds"), "release p50"),
        Query(quantile(0.99, "gateway_settle_release_seconds"), "release p99"),
    )
    b.graph(
        "Failures and refusals",
        "Batches failed (by the outcome that ended them), releases the ledger refused,"
        " messages not sent (the peer unreachable) and messages refused as malformed.",
        "short",
        Query(f"sum by (code) ({increase('gateway_settle_failures_total')})", "failed {{code}}"),
        Query(
            f"sum by (peer) ({increase('gateway_settle_release_refused_total')})",
            "release refused {{peer}}",
        ),
        Query(f"sum by (peer) ({increase('gateway_settle_unsent_total')})", "unsent {{peer}}"),
        Query(f"sum({increase('gateway_settle_refused_total')})", "malformed"),
    )
    b.row("Lightning")
    b.graph(
        "Node funds",
        "The Lightning node's money: local, spendable and receivable in channels that"
        " can carry payments, and on-chain.",
        MSAT,
        Query(f"max by (kind) ({sel('gateway_lightning_msat')})", "{{kind}}"),
    )
    b.graph(
        "Channels",
        "Per channel: ours, what we can send, what we can receive; and what a batch to"
        " each peer is expected to carry.",
        MSAT,
        Query(
            f"max by (peer, kind) ({sel('gateway_lightning_channel_msat')})",
            "{{kind}} {{peer}}",
        ),
        Query(f"max by (peer) ({sel('gateway_settle_expected_msat')})", "expected batch {{peer}}"),
    )
    b.graph(
        "Splices",
        "Channels with a splice in flight, and splices the liquidity policy started.",
        "short",
        Query(f"sum({sel('gateway_lightning_splicing')})", "in flight"),
        Query(
            f"sum by (direction, outcome) ({increase('gateway_lightning_splices_total')})",
            "{{direction}} {{outcome}}",
        ),
    )
    b.row("Mint (ecash)")
    b.graph(
        "Mint operations",
        "Requests answered, by operation and outcome (ok, or the NUT error code).",
        PER_S,
        Query(f"sum by (op, outcome) ({rate('mint_operations_total')})", "{{op}} {{outcome}}"),
    )
    b.graph(
        "Mint latency, p99",
        "From a request's arrival to its answer, by operation.",
        "s",
        Query(quantile(0.99, "mint_operation_seconds", "op"), "{{op}}"),
    )
    b.graph(
        "Swaps a transaction",
        "Swaps committed together in one PostgreSQL transaction (the mint groups those"
        " that arrive while others commit): the mean.",
        "short",
        Query(
            f"sum({rate('mint_swap_group_swaps_sum')})"
            f" / sum({rate('mint_swap_group_swaps_count')})",
            "swaps",
        ),
    )
    b.graph(
        "Outstanding ecash",
        "Signed minus spent, per keyset, in the keyset's unit.",
        "short",
        Query(f"sum by (keyset) ({sel('mint_outstanding')})", "{{keyset}}"),
    )
    b.graph(
        "Pending melts",
        "Melts whose payment's fate is not known yet, and on-chain withdrawals recorded"
        " and not yet sent.",
        "short",
        Query(f"sum({sel('mint_pending_melts')})", "melts pending"),
        Query(f"sum({sel('mint_withdrawals_open')})", "withdrawals open"),
    )
    b.graph(
        "Oldest pending melt",
        "The age of the oldest melt whose payment's fate is not known yet.",
        "s",
        Query(f"max({sel('mint_oldest_pending_melt_seconds')})", "oldest"),
    )
    b.graph(
        "Mint cache and subscriptions",
        "NUT-19 cached answers looked up, by outcome; NUT-17 websockets open and"
        " notifications sent.",
        "short",
        Query(f"sum by (outcome) ({rate('mint_cache_total')})", "cache {{outcome}}/s"),
        Query(f"sum({sel('mint_ws_sockets')})", "websockets"),
        Query(f"sum({rate('mint_ws_notifications_total')})", "notifications/s"),
    )
    return b.build()


def signer() -> dm.Dashboard:
    b = Board(
        "constellation-signer",
        "Constellation / Signer",
        "Threshold signing (ROAST over FROST): requests, sessions, latency, failing"
        " signers, key generation and the audit log.",
    )
    failed = 'outcome!="signed"'
    b.row("Signing")
    b.stat(
        "Requests failed",
        "Coordinated signing requests that ended without a signature, in the time range.",
        "short",
        Query(f"sum({increase('signer_requests_finished_total', failed, window=RANGE)})", "failed"),
        red_from=1,
    )
    b.stat(
        "Signer failures",
        "Failures of single signers seen by the coordinators, in the time range.",
        "short",
        Query(f"sum({increase('signer_signer_failures_total', window=RANGE)})", "failures"),
        red_from=1,
    )
    b.stat(
        "Signing latency p99",
        "From a request to its BIP340 signature.",
        "s",
        Query(quantile(0.99, "signer_sign_latency_seconds"), "p99"),
    )
    b.stat(
        "Requests held open",
        "Signing requests held open by the signers.",
        "short",
        Query(f"sum({sel('signer_pending_requests')})", "pending"),
    )
    b.graph(
        "Signing requests",
        "Requests coordinated, and how they finished (signed, or the error code).",
        PER_S,
        Query(f"sum({rate('signer_requests_started_total')})", "started"),
        Query(
            f"sum by (outcome) ({rate('signer_requests_finished_total')})",
            "finished {{outcome}}",
        ),
    )
    b.graph(
        "ROAST sessions",
        "Sessions started and those that produced the signature (more started than"
        " finished: signers dropped out and sessions were retried).",
        PER_S,
        Query(f"sum({rate('signer_sessions_started_total')})", "started"),
        Query(f"sum({rate('signer_sessions_finished_total')})", "finished"),
    )
    b.graph(
        "Signing latency",
        "From a request to its BIP340 signature.",
        "s",
        Query(quantile(0.5, "signer_sign_latency_seconds"), "p50"),
        Query(quantile(0.99, "signer_sign_latency_seconds"), "p99"),
    )
    b.graph(
        "Failures, by signer and reason",
        "Failures per signer seen by the coordinators: unresponsive, stalled, refused,"
        " invalid_share.",
        "short",
        Query(
            f"sum by (signer, reason) ({increase('signer_signer_failures_total')})",
            "signer {{signer}} {{reason}}",
        ),
    )
    b.graph(
        "Refused and rejected",
        "Requests the signers refused, and messages dropped before handling, by code.",
        PER_S,
        Query(f"sum by (code) ({rate('signer_requests_refused_total')})", "refused {{code}}"),
        Query(f"sum by (code) ({rate('signer_rejected_messages_total')})", "rejected {{code}}"),
    )
    b.graph(
        "Partial signatures",
        "Partial signatures each signer made.",
        PER_S,
        Query(f"sum by (pod) ({rate('signer_partial_signatures_total')})", "{{pod}}"),
    )
    b.row("Key generation and audit")
    b.graph(
        "Key generations",
        "Key generations coordinated, by outcome (ok, or the error code).",
        "short",
        Query(f"sum by (outcome) ({increase('signer_dkg_runs_total')})", "{{outcome}}"),
    )
    b.graph(
        "Key generation duration",
        "The mean duration of a coordinated key generation.",
        "s",
        Query(
            f"sum({rate('signer_dkg_seconds_sum')}) / sum({rate('signer_dkg_seconds_count')})",
            "mean",
        ),
    )
    b.graph(
        "Audit log append",
        "Appending one audit entry (write and fsync).",
        "s",
        Query(quantile(0.5, "signer_audit_fsync_seconds", "pod"), "p50 {{pod}}"),
        Query(quantile(0.99, "signer_audit_fsync_seconds", "pod"), "p99 {{pod}}"),
    )
    return b.build()


DASHBOARDS: dict[str, Callable[[], dm.Dashboard]] = {
    "ledger": ledger,
    "replication": replication,
    "money": money,
    "signer": signer,
}


def render(dashboard: dm.Dashboard) -> str:
    """The JSON as written to the chart: sorted keys, indented, a newline at the end."""
    return json.dumps(dashboard, cls=JSONEncoder, sort_keys=True, indent=2) + "\n"


def rendered() -> dict[str, str]:
    """Each dashboard's file name and the JSON it holds."""
    return {f"{name}.json": render(build()) for name, build in DASHBOARDS.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.monitoring.dashboards")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="default: %(default)s")
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a file is stale"
    )
    args = parser.parse_args(argv)
    out: Path = args.out
    files = rendered()
    stale = sorted(
        name
        for name, text in files.items()
        if not (out / name).is_file() or (out / name).read_text() != text
    )
    extra = sorted(p.name for p in out.glob("*.json") if p.name not in files)
    if args.check:
        for name in stale:
            print(f"stale: {out / name}", file=sys.stderr)
        for name in extra:
            print(f"not generated: {out / name}", file=sys.stderr)
        return 1 if stale or extra else 0
    out.mkdir(parents=True, exist_ok=True)
    for name in stale:
        (out / name).write_text(files[name])
        print(f"wrote {out / name}")
    for name in extra:
        print(f"not generated here (remove it if it is ours): {out / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
