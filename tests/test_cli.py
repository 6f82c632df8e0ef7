"""The ledger and worker benchmarks, run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_ledger_benchmark_writes_its_figures(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "ledger.py"),
            "--json",
            str(path),
            "--runs",
            "1",
            "--txs",
            "300",
            "--sig-txs",
            "30",
        ],
        check=True,
        capture_output=True,
    )
    figures = json.loads(path.read_text())
    for key in (
        "apply_tps_nosig",
        "apply_tps_sig",
        "codec_roundtrips_per_s",
        "verify_per_s_raw",
        "sig_ratio",
    ):
        assert figures[key] > 0


def test_worker_benchmark_commits_every_payment_and_writes_its_figures(tmp_path: Path) -> None:
    """bench/worker.py asserts that every payment it sends commits."""
    path = tmp_path / "worker.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "worker.py"),
            *("--json", str(path), "--runs", "1", "--payments", "500", "--package", "50"),
        ],
        check=True,
        capture_output=True,
    )
    figures = json.loads(path.read_text())
    assert 0 < figures["cpu_us_per_tx"] < 100_000 and figures["package"] == 50


def test_the_replication_benchmark_runs(tmp_path: Path) -> None:
    """bench/replication.py asserts that every payment commits and all six copies end
    with one state root."""
    path = tmp_path / "replication.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "replication.py"),
            *("--json", str(path), "--runs", "1", "--payments", "250", "--package", "50"),
        ],
        check=True,
        capture_output=True,
    )
    figures = json.loads(path.read_text())
    assert figures["replication_cpu_ratio"] > 1 and figures["package"] == 50
