"""The indexer's settings, read once from the environment."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from constellation.keys import is_valid_xonly
from constellation.protocol.signer import KeyInfo
from services.indexer.checkpoints import CheckpointSettings
from services.replica.config import load_layout, load_peers
from services.runtime import ConfigError, env_addr, env_int, env_operator, env_str
from services.signer.config import signer_access


@dataclass(frozen=True)
class Settings:
    operator: str
    nats_url: str
    database_url: str
    http_host: str
    http_port: int
    max_behind: int  # blocks behind a worker's log beyond which it is not ready
    stall_s: int  # seconds without progress after which it is not ready
    log_level: str
    checkpoints: CheckpointSettings | None  # a guild's member: its light-client checkpoints

    @staticmethod
    def from_env(env: Mapping[str, str]) -> Settings:
        host, port = env_addr(env, "INDEXER_HTTP_ADDR", "127.0.0.1:0")
        return Settings(
            operator=env_operator(env, "INDEXER_OPERATOR"),
            nats_url=env_str(env, "INDEXER_NATS_URL", "nats://127.0.0.1:4222"),
            database_url=env_str(env, "INDEXER_DATABASE_URL"),
            http_host=host,
            http_port=port,
            max_behind=env_int(env, "INDEXER_MAX_BEHIND", 2_000, 0, 1 << 40),
            stall_s=env_int(env, "INDEXER_STALL_S", 15, 1, 3600),
            log_level=env_str(env, "INDEXER_LOG_LEVEL", "info"),
            checkpoints=_checkpoints(env) if env.get("INDEXER_LAYOUT") else None,
        )


def _checkpoints(env: Mapping[str, str]) -> CheckpointSettings:
    """A guild member's checkpointing: the layout and peers, its operator's signer (asked
    with a client key of the operator's) and where that signer asks it
    to vouch."""
    layout = load_layout(Path(env_str(env, "INDEXER_LAYOUT")))
    cadence = env_int(env, "INDEXER_CHECKPOINT_MS", 1000, 100, 3_600_000)
    return CheckpointSettings(
        layout=layout,
        me=layout.index(env_operator(env, "INDEXER_OPERATOR")),
        peers=load_peers(Path(env_str(env, "INDEXER_PEERS"))),
        signer=signer_access(env, "INDEXER_SIGNER"),
        vouch_subject=_vouch_subject(env_str(env, "INDEXER_VOUCH_SUBJECT")),
        cadence_ms=cadence,
        takeover_ms=env_int(env, "INDEXER_CHECKPOINT_TAKEOVER_MS", 5 * cadence, cadence, 10**8),
        idle_ms=env_int(env, "INDEXER_CHECKPOINT_IDLE_MS", 30_000, cadence, 10**8),
        pin=guild_pin(env.get("INDEXER_GUILD_PIN", ""), len(layout.members)),
    )


def guild_pin(text: str, members: int) -> KeyInfo | None:
    """``INDEXER_GUILD_PIN``: the guild's first key, for a member that joins a running
    guild (its signer holds no share of that key): ``{"key": 33 bytes in hex,
    "threshold": t, "members": [its holders' layout indices]}``, as every member's
    indexer keeps it (``GET /v1/lc/descriptor`` shows it)."""
    if not text:
        return None
    try:
        doc = json.loads(text)
        pin = KeyInfo(
            bytes.fromhex(doc["key"]), [int(i) for i in doc["members"]], int(doc["threshold"])
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"INDEXER_GUILD_PIN is not a guild pin: {exc!r}") from None
    held = pin.members
    if len(pin.key) != 33 or pin.key[0] not in (2, 3) or not is_valid_xonly(pin.key[1:]):
        raise ConfigError("INDEXER_GUILD_PIN: the key is not a compressed public key")
    if held != sorted(set(held)) or not held or held[0] < 0 or held[-1] >= members:
        raise ConfigError("INDEXER_GUILD_PIN: members are not distinct indices of the layout")
    if not 1 <= pin.t <= len(held):
        raise ConfigError("INDEXER_GUILD_PIN: the threshold is not 1 to its members")
    return pin


def _vouch_subject(subject: str) -> str:
    if not subject or any(c in subject for c in " *>"):
        raise ConfigError(f"INDEXER_VOUCH_SUBJECT {subject!r} is not a plain NATS subject")
    return subject
