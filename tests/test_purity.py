"""The core stays pure by rule: no I/O frameworks, no event loop, no clock, no global
randomness (a seeded run replays exactly), no threads or processes, and nothing of the
services (the core never imports its shells)."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).parents[1] / "constellation"
FORBIDDEN = {
    "asyncio",
    "nats",
    "aiohttp",
    "asyncpg",
    "redis",
    "socket",
    "time",
    "kopf",
    "random",
    "threading",
    "multiprocessing",
    "subprocess",
    "logging",
    "services",
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_core_imports_nothing_impure() -> None:
    files = list(CORE.rglob("*.py"))
    assert files
    offenders = {str(p.relative_to(CORE)): imported_roots(p) & FORBIDDEN for p in files}
    assert not {k: v for k, v in offenders.items() if v}
