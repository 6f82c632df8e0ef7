"""Helpers shared by the benchmarks: repeated runs, medians, a table and a JSON file."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def print_table(title: str, rows: list[tuple[str, str, str]]) -> None:
    """Rows of (figure, value, note), aligned."""
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(title)
    print("-" * len(title))
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>{vwidth}}  {note}")


def write_json(path: str | None, figures: dict[str, Any]) -> None:
    if path is None:
        return
    figures = {
        **figures,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
