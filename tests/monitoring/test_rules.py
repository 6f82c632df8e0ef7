"""The Prometheus rules the chart ships: valid for promtool, each alert unit-tested
(firing, and quiet on healthy series), and reading only metrics that exist."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.monitoring import promql

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "helm" / "constellation" / "files" / "rules" / "constellation.rules.yaml"
RULES_TEST = Path(__file__).with_name("rules_test.yaml")

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")

SEVERITIES = {"critical", "warning", "info"}
# level:metric:operations, as Prometheus names recorded series
RECORD_NAME = re.compile(r"^[a-z_]+:[a-z_]+:[a-z0-9_]+$")

# What the alerts must cover, each by the series that shows it: the alert reads it, or
# reads a recorded series made from it.
REQUIRED = {
    "a broken reserve invariant": "gateway_reserve_ok",
    "a shard without a leader": "replica_leader",
    "a settlement pending too long": "gateway_settle_pending_age_seconds",
    "a settlement untaken too long": "gateway_settle_untaken_age_seconds",
    "a replica far behind": "replica_lag_blocks",
    "a copy that takes no snapshot": "replica_blocks_since_snapshot",
    "a copy whose disk lost acked blocks": "replica_damaged",
    "evidence against an operator": "replica_evidence",
    "failing signers": "signer_signer_failures_total",
    "failing signing requests": "signer_requests_finished_total",
    "a target down": "up",
}

Rule = dict[str, Any]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, check=False, cwd=ROOT)


@pytest.fixture(scope="module")
def groups() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(RULES.read_text())
    assert list(loaded) == ["groups"]
    groups: list[dict[str, Any]] = loaded["groups"]
    return groups


def rules(groups: list[dict[str, Any]]) -> Iterator[Rule]:
    for group in groups:
        yield from group["rules"]


def alerts(groups: list[dict[str, Any]]) -> dict[str, Rule]:
    return {r["alert"]: r for r in rules(groups) if "alert" in r}


def records(groups: list[dict[str, Any]]) -> dict[str, str]:
    return {r["record"]: r["expr"] for r in rules(groups) if "record" in r}


def reads(expr: str, recorded: dict[str, str]) -> set[str]:
    """The series ``expr`` reads, through the recorded series it reads."""
    names = promql.metric_names(expr)
    for name in names & recorded.keys():
        names |= reads(recorded[name], recorded)
    return names


def test_the_groups_and_names_are_unique(groups: list[dict[str, Any]]) -> None:
    names = [g["name"] for g in groups]
    assert len(set(names)) == len(names)
    alert_names = [r["alert"] for r in rules(groups) if "alert" in r]
    assert len(set(alert_names)) == len(alert_names)
    recorded = [r["record"] for r in rules(groups) if "record" in r]
    assert len(set(recorded)) == len(recorded)
    for name in recorded:
        assert RECORD_NAME.match(name), name
    for name in alert_names:
        assert name.startswith("Constellation"), name


def test_each_alert_has_a_severity_a_summary_and_a_description(
    groups: list[dict[str, Any]],
) -> None:
    for name, rule in alerts(groups).items():
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert set(annotations) >= {"summary", "description"}, name
        assert annotations["summary"].strip() and annotations["description"].strip(), name


def test_the_alerts_cover_what_they_must(groups: list[dict[str, Any]]) -> None:
    recorded = records(groups)
    read = {name: reads(rule["expr"], recorded) for name, rule in alerts(groups).items()}
    for concern, metric in REQUIRED.items():
        assert any(metric in names for names in read.values()), f"no alert for {concern}"
    critical = {n for n, r in alerts(groups).items() if r["labels"]["severity"] == "critical"}
    assert {
        "ConstellationReserveInvariantBroken",
        "ConstellationShardWithoutLeader",
        "ConstellationOperatorEvidence",
    } <= critical


def test_every_rule_reads_metrics_labels_and_functions_that_exist(
    groups: list[dict[str, Any]],
) -> None:
    recorded = records(groups)
    known = promql.catalogue(recorded)
    exprs = [(rule.get("alert") or rule["record"], rule["expr"], "") for rule in rules(groups)]
    assert promql.all_problems(exprs, known) == []
    # the labels the alerts' templates name exist too
    for name, rule in alerts(groups).items():
        templated = set(re.findall(r"\$labels\.(\w+)", str(rule["annotations"])))
        allowed = set(promql.TARGET_LABELS)
        for metric in promql.metric_names(rule["expr"]):
            allowed |= known[metric]
        assert templated <= allowed, f"{name}: {templated - allowed}"


def test_a_misspelt_metric_in_a_rule_is_caught(groups: list[dict[str, Any]]) -> None:
    recorded = records(groups)
    known = promql.catalogue(recorded)
    rule = alerts(groups)["ConstellationReplicaLagging"]
    spoilt = rule["expr"].replace("replica_lag_blocks", "replica_lag_block")
    assert "lag: no such metric: replica_lag_block" in promql.all_problems(
        [("lag", spoilt, "")], known
    )
    # and a recorded series that no rule records
    assert promql.all_problems([("x", "namespace_shard:replica_leader:min < 0", "")], known) == [
        "x: no such metric: namespace_shard:replica_leader:min"
    ]


def test_every_alert_is_unit_tested_firing_and_quiet(groups: list[dict[str, Any]]) -> None:
    suite = yaml.safe_load(RULES_TEST.read_text())
    assert [(RULES_TEST.parent / f).resolve() for f in suite["rule_files"]] == [RULES]
    fired: set[str] = set()
    quiet: set[str] = set()
    for test in suite["tests"]:
        for case in test.get("alert_rule_test", []):
            (fired if case["exp_alerts"] else quiet).add(case["alertname"])
    assert set(alerts(groups)) - fired == set(), "alerts never seen firing"
    assert set(alerts(groups)) - quiet == set(), "alerts never seen quiet"
    assert (fired | quiet) <= set(alerts(groups)), "tests of alerts that do not exist"


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    done = promtool("test", "rules", str(RULES_TEST))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
