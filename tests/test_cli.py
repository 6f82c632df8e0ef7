"""The README's main command and the ledger benchmark, run end to end."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from constellation.demo import run_demo
from services.cli import main

ROOT = Path(__file__).parents[1]


def test_demo_pays_refuses_double_spend_and_conserves_value() -> None:
    out = io.StringIO()
    assert run_demo(workers=3, payments=30, seed=7, out=out) == 0
    text = out.getvalue()
    assert "30 random payments committed" in text or "refused for lack of funds" in text
    assert "[ledger.conflict]" in text
    assert "[ledger.spent]" in text and "already spent by transaction" in text
    assert "value conserved" in text


def test_demo_is_reproducible_with_a_seed() -> None:
    a, b = io.StringIO(), io.StringIO()
    run_demo(2, 10, 42, a)
    run_demo(2, 10, 42, b)
    assert a.getvalue() == b.getvalue()


def test_console_entry_point() -> None:
    assert main(["demo", "--payments", "5", "--seed", "1"]) == 0


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
