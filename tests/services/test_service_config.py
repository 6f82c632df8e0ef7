"""A service refuses a bad environment at start: exit status 2 and a line saying why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from coincurve import PrivateKey

from constellation.protocol.envelope import Membership
from services.indexer.config import guild_pin
from services.runtime import ConfigError
from services.signer.config import client_keys, save_members, signer_access


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


def test_a_services_access_to_its_signer_is_a_client_key_and_the_signers_public_key(
    tmp_path: Path,
) -> None:
    """What the indexer and the mint are given to ask their operator's signer: a client
    key the signer lists, and which member the signer is; never the signer's identity."""
    members = [PrivateKey(bytes([i]) * 32).public_key.format() for i in (1, 2)]
    save_members(Membership("g", members), tmp_path / "guild.json")
    client = b"\x05" * 32
    env = {
        "X_NATS_URL": "nats://n:4222",
        "X_MEMBERS": str(tmp_path / "guild.json"),
        "X_PUBKEY": members[1].hex(),
        "X_CLIENT_KEY": client.hex(),
    }
    access = signer_access(env, "X")
    assert (access.signer, access.client_key) == (members[1], client)
    for bad, says in [
        ({"X_PUBKEY": PrivateKey(b"\x03" * 32).public_key.format().hex()}, "not a member"),
        ({"X_CLIENT_KEY": "00" * 32}, "_CLIENT_KEY"),
        ({"X_CLIENT_KEY": "05" * 31}, "_CLIENT_KEY"),
    ]:
        with pytest.raises(ConfigError, match=says):
            signer_access({**env, **bad}, "X")
    pub = PrivateKey(client).public_key.format().hex()
    assert client_keys(f"{pub}, {pub},") == (bytes.fromhex(pub),)  # each once
    with pytest.raises(ConfigError, match="not a public key"):
        client_keys("02" + "00" * 32)
