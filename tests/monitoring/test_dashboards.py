"""The Grafana dashboards the chart ships: current with their generator, well formed,
and reading only metrics, labels and functions that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.monitoring import dashboards
from tests.monitoring import promql

Json = dict[str, Any]

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")

# What Grafana puts in place of its variables, for promtool to parse the queries.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__range": "1h",
    "$namespace": ".*",
}


def on_disk() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(dashboards.OUT_DIR.glob("*.json"))}


@pytest.fixture(scope="module")
def boards() -> dict[str, Json]:
    return {Path(name).stem: json.loads(text) for name, text in on_disk().items()}


@pytest.fixture(scope="module")
def known() -> dict[str, frozenset[str]]:
    return promql.catalogue()


def panels(board: Json) -> Iterator[Json]:
    """Every panel, those inside collapsed rows too."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(boards: dict[str, Json]) -> Iterator[tuple[str, str, str]]:
    """(where, expr, legend) of every query of every panel."""
    for name, board in boards.items():
        for panel in panels(board):
            for target in panel.get("targets", []):
                where = f"{name} / {panel['title']} / {target['refId']}"
                yield where, target["expr"], target.get("legendFormat", "")


def test_the_files_are_what_the_generator_makes_now() -> None:
    made = dashboards.rendered()
    assert on_disk().keys() == made.keys(), "run: python -m services.monitoring.dashboards"
    for name, text in made.items():
        assert on_disk()[name] == text, f"{name} is stale: python -m services.monitoring.dashboards"
        assert text.endswith("}\n")
        assert json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n" == text


def test_the_generator_writes_and_checks(tmp_path: Path) -> None:
    assert dashboards.main(["--out", str(tmp_path), "--check"]) == 1  # nothing there yet
    assert dashboards.main(["--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == set(dashboards.rendered())
    assert dashboards.main(["--out", str(tmp_path), "--check"]) == 0
    (tmp_path / "ledger.json").write_text("{}\n")
    assert dashboards.main(["--out", str(tmp_path), "--check"]) == 1
    assert dashboards.main(["--out", str(tmp_path)]) == 0
    assert dashboards.main(["--out", str(tmp_path), "--check"]) == 0


def test_each_dashboard_is_well_formed(boards: dict[str, Json]) -> None:
    assert set(boards) == {"ledger", "replication", "money", "signer"}
    uids = [board["uid"] for board in boards.values()]
    assert len(set(uids)) == len(uids)
    for name, board in boards.items():
        assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 39, name
        assert board["title"].startswith("Constellation / ")
        assert 0 < len(board["uid"]) <= 40
        ids = [panel["id"] for panel in panels(board)]
        assert all(isinstance(i, int) and i > 0 for i in ids), name
        assert len(set(ids)) == len(ids), f"{name}: panel ids repeat"
        assert sum(1 for p in panels(board) if p["type"] != "row") >= 8, name


def test_each_dashboard_has_a_datasource_and_a_namespace_variable(
    boards: dict[str, Json],
) -> None:
    for name, board in boards.items():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        datasource = variables["datasource"]
        assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus"), name
        namespace = variables["namespace"]
        assert namespace["type"] == "query", name
        assert namespace["datasource"]["uid"] == "${datasource}", name
        assert namespace["includeAll"] and namespace["allValue"] == ".*", name
        assert namespace["query"] == "label_values(up, namespace)", name


def test_every_panel_queries_the_chosen_datasource_and_namespace(
    boards: dict[str, Json],
) -> None:
    for name, board in boards.items():
        for panel in panels(board):
            if panel["type"] == "row":
                continue
            where = f"{name} / {panel['title']}"
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            targets = panel["targets"]
            assert targets, where
            ref_ids = [t["refId"] for t in targets]
            assert len(set(ref_ids)) == len(ref_ids) and all(ref_ids), where
            for target in targets:
                assert target["datasource"]["uid"] == "${datasource}", where
                assert target["legendFormat"], where
                # every selector, not just one of them, is narrowed to the namespace
                selectors = re.findall(r"[A-Za-z_:][\w:]*\{[^}]*\}", target["expr"])
                assert selectors, where
                for selector in selectors:
                    assert 'namespace=~"$namespace"' in selector, f"{where}: {selector}"


def test_panels_do_not_overlap(boards: dict[str, Json]) -> None:
    for name, board in boards.items():
        taken: dict[tuple[int, int], str] = {}
        for panel in panels(board):
            g = panel["gridPos"]
            assert g["x"] >= 0 and g["x"] + g["w"] <= 24, f"{name} / {panel['title']}"
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    other = taken.setdefault((x, y), panel["title"])
                    assert other == panel["title"], f"{name}: {other} / {panel['title']}"


def test_every_query_reads_metrics_labels_and_functions_that_exist(
    boards: dict[str, Json], known: dict[str, frozenset[str]]
) -> None:
    found = list(queries(boards))
    assert len(found) > 50
    assert promql.all_problems(found, known) == []


def test_a_misspelt_metric_in_a_dashboard_is_caught(
    boards: dict[str, Json], known: dict[str, frozenset[str]]
) -> None:
    text = json.dumps(boards["ledger"]).replace("gateway_txs_total", "gateway_tx_total")
    spoilt = {"ledger": json.loads(text)}
    assert "ledger / Committed / A: no such metric: gateway_tx_total" in promql.all_problems(
        queries(spoilt), known
    )


@pytest.mark.parametrize(
    ("expr", "legend", "problem"),
    [
        ('rate(gateway_txs{namespace=~"$namespace"}[5m])', "", "no such metric: gateway_txs"),
        ("sum(rate(replica_elections[1m]))", "", "no such metric: replica_elections"),
        ("gateway_confirm_seconds_buckets", "", "no such metric: gateway_confirm_seconds_buckets"),
        ("replica_leader_total", "", "no such metric: replica_leader_total"),
        ("sum by (peeer) (gateway_settle_pending_outputs)", "", "no such label: peeer"),
        ('gateway_settle_pending_outputs{sides="owed"}', "", "no such label: sides"),
        ("sum by (peer) (gateway_settle_pending_outputs)", "{{pear}}", "no such label: pear"),
        (
            "histogram_quantil(0.9, sum by (le) (rate(gateway_confirm_seconds_bucket[1m])))",
            "",
            "no such function: histogram_quantil",
        ),
        ("vector(1)", "", "reads no metric: vector(1)"),
    ],
)
def test_the_checker_catches(
    expr: str, legend: str, problem: str, known: dict[str, frozenset[str]]
) -> None:
    assert [p.what for p in promql.problems("x", expr, known, legend)] == [problem]


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        (
            'sum by (pod) (rate(worker_committed_txs_total{namespace=~"$namespace"}[$__range]))',
            {"worker_committed_txs_total"},
        ),
        (
            "histogram_quantile(0.9, sum by (le) (rate(a_bucket[5m])))"
            " > 1e3 and on (j) b offset 1m",
            {"a_bucket", "b"},
        ),
        ("count(max by (shard) (replica_leader) < 0) or vector(0)", {"replica_leader"}),
        ("namespace_shard:replica_leader:max < -Inf", {"namespace_shard:replica_leader:max"}),
        ('label_replace(x, "dst", "$1", "src", "(by.*)")', {"x"}),
        ("sum without (copy) (y) / ignoring (peer) group_left (shard) z", {"y", "z"}),
    ],
)
def test_metric_names(expr: str, names: set[str]) -> None:
    assert promql.metric_names(expr) == names


def test_the_catalogue_holds_what_the_services_declare(known: dict[str, frozenset[str]]) -> None:
    assert known["gateway_txs_total"] == {"code"}
    assert known["replica_lag_blocks"] == {"shard", "copy", "peer"}
    assert known["signer_sign_latency_seconds_bucket"] == {"le"}
    assert known["mint_operation_seconds_count"] == {"op"}
    assert known["task_failures_total"] == {"task"}
    for name in ("gateway_txs", "replica_elections", "process_cpu_seconds_total"):
        assert name not in known


@needs_promtool
def test_promtool_parses_every_query(boards: dict[str, Json], tmp_path: Path) -> None:
    rules = []
    for i, (where, expr, _) in enumerate(queries(boards)):
        plain = expr
        for variable, value in GRAFANA_VARIABLES.items():
            plain = plain.replace(variable, value)
        assert "$" not in plain, f"{where}: a variable promtool is not given: {plain}"
        rules.append({"record": f"dashboard:query:{i}", "expr": plain})
    path = tmp_path / "queries.rules.json"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboards", "rules": rules}]}))
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
