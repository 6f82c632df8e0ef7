"""A service refuses a bad environment at start: exit status 2 and a line saying why."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from coincurve import PrivateKey

from services.indexer.config import guild_pin
from services.runtime import ConfigError


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
        (
            "services.gateway",
            {"GATEWAY_DATABASE_URL": "postgresql://x", "GATEWAY_CONSOLE_TOKEN": "short"},
            "the console token needs at least 16 characters",
        ),
        (
            "services.gateway",
            {"GATEWAY_DATABASE_URL": "postgresql://x", "GATEWAY_CONSOLE_TARGETS": "gw:8080"},
            "GATEWAY_CONSOLE_TARGETS: a console target is name=http://host:port",
        ),
        (
            "services.gateway",
            {
                "GATEWAY_DATABASE_URL": "postgresql://x",
                "GATEWAY_CONSOLE_TOKEN_FILE": "/nonexistent",
            },
            "GATEWAY_CONSOLE_TOKEN_FILE",
        ),
        (
            "services.gateway",
            {"GATEWAY_DATABASE_URL": "postgresql://x", "GATEWAY_TRUSTED_PROXIES": "10.0.0.0/33"},
            "GATEWAY_TRUSTED_PROXIES",
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


def test_a_joiners_guild_pin_is_read_and_checked() -> None:
    key = PrivateKey(b"\x07" * 32).public_key.format().hex()
    pin = guild_pin(f'{{"key": "{key}", "threshold": 2, "members": [0, 1, 2]}}', 4)
    assert pin is not None and (pin.key.hex(), pin.t, pin.members) == (key, 2, [0, 1, 2])
    assert guild_pin("", 4) is None  # a founder's indexer takes its signer's first key
    for bad, says in [
        ("{", "not a guild pin"),
        (f'{{"key": "{key[2:]}", "threshold": 2, "members": [0, 1]}}', "compressed"),
        (f'{{"key": "{key}", "threshold": 2, "members": [1, 0]}}', "distinct indices"),
        (f'{{"key": "{key}", "threshold": 2, "members": [0, 4]}}', "distinct indices"),
        (f'{{"key": "{key}", "threshold": 3, "members": [0, 1]}}', "threshold"),
    ]:
        with pytest.raises(ConfigError, match=says):
            guild_pin(bad, 4)
