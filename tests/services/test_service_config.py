"""A service refuses a bad environment at start: exit status 2 and a line saying why."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("module", "env", "says"),
    [
        ("services.partition", {"WORKER_STATE_DIR": "/nonexistent"}, "WORKER_ID must be set"),
        (
            "services.partition",
            {"WORKER_ID": "1", "WORKER_STATE_DIR": "/x", "WORKER_ISSUERS": "zz"},
            "WORKER_ISSUERS",
        ),
        (
            "services.gateway",
            {"GATEWAY_DATABASE_URL": "postgresql://x", "GATEWAY_RATE_PER_S": "fast"},
            "GATEWAY_RATE_PER_S",
        ),
        ("services.indexer", {}, "INDEXER_DATABASE_URL must be set"),
    ],
)
def test_bad_configuration_is_refused(module: str, env: dict[str, str], says: str) -> None:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k.split("_")[0] not in ("WORKER", "GATEWAY", "INDEXER")
    }
    done = subprocess.run(
        [sys.executable, "-m", module],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert says in done.stderr
