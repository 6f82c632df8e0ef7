"""The ledger benchmark, run end to end."""

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
