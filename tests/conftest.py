"""Which tests run one at a time: ``scripts/test`` runs the tests of one process on
every core (pytest-xdist) and then, alone on the machine, those that start a guild's
processes (``system``: every test under ``tests/system`` and ``tests/operator``), whose
timings are made for the machine's whole CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ONE_AT_A_TIME = {"system", "operator"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.relative_to(TESTS).parts[0] in ONE_AT_A_TIME:
            item.add_marker(pytest.mark.system)
