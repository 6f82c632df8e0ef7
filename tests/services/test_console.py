"""The operator console's reading of its processes: targets, their figures by panel."""

from __future__ import annotations

import pytest

from services.gateway.console import PANELS, parse_targets, resolved, summarize
from services.monitoring.dashboards import rendered

METRICS = """\
# HELP replica_term The copy's term
# TYPE replica_term gauge
replica_term{shard="op0/0",copy="1"} 3.0
# HELP replica_elections_total Elections started
# TYPE replica_elections_total counter
replica_elections_total{shard="op0/0"} 2.0
replica_elections_created{shard="op0/0"} 1.7e9
# HELP worker_fsync_seconds fsyncs
# TYPE worker_fsync_seconds histogram
worker_fsync_seconds_bucket{le="0.001"} 4.0
worker_fsync_seconds_count 4.0
# HELP process_cpu_seconds_total CPU
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 1.5
# HELP mint_pending_melts Melts waiting for their payment
# TYPE mint_pending_melts gauge
mint_pending_melts 1.0
"""


def test_a_process_s_figures_go_to_their_panels_and_nothing_else_does() -> None:
    panels = summarize(METRICS)
    assert set(panels) == {"Replication", "Mint"}
    assert panels["Replication"] == [
        {"name": "replica_term", "labels": {"shard": "op0/0", "copy": "1"}, "value": 3.0},
        {"name": "replica_elections_total", "labels": {"shard": "op0/0"}, "value": 2.0},
    ]
    assert panels["Mint"] == [{"name": "mint_pending_melts", "labels": {}, "value": 1.0}]


def test_the_console_shows_figures_the_dashboards_show() -> None:
    shown = "".join(rendered().values())
    missing = [f for families in PANELS.values() for f in families if f not in shown]
    assert not missing, missing


def test_targets_are_names_and_urls() -> None:
    assert parse_targets("") == {}
    assert parse_targets(" a=http://h:1/ , b=dns+http://svc:8080") == {
        "a": "http://h:1",
        "b": "dns+http://svc:8080",
    }
    for bad in ("a", "=http://h:1", "a=h:1", "a=dns+h:1", "a=ftp://h"):
        with pytest.raises(ValueError, match="name=http://host:port"):
            parse_targets(bad)


async def test_a_dns_target_stands_for_each_address_of_its_name() -> None:
    found = await resolved({"gw": "http://127.0.0.1:9", "machine": "dns+http://localhost:8080"})
    assert found[0] == ("gw", "http://127.0.0.1:9")
    machines = found[1:]
    assert machines and all(name.startswith("machine ") for name, _ in machines)
    assert ("machine 127.0.0.1", "http://127.0.0.1:8080") in machines
    # a name that does not resolve stays one target, shown as down when scraped
    unknown = await resolved({"m": "dns+http://no-such-host.invalid:1"})
    assert unknown == [("m", "http://no-such-host.invalid:1")]
