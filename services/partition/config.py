"""A partition worker's settings, read once from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from constellation.keys import is_valid_xonly
from services.bus import Batching
from services.runtime import ConfigError, env_addr, env_int, env_operator, env_str


def env_keys(env: Mapping[str, str], name: str) -> frozenset[bytes]:
    """Comma-separated BIP340 public keys in hex."""
    keys = set()
    for part in (env.get(name) or "").split(","):
        if not part.strip():
            continue
        try:
            key = bytes.fromhex(part.strip())
        except ValueError:
            raise ConfigError(f"{name}: {part!r} is not hex") from None
        if not is_valid_xonly(key):
            raise ConfigError(f"{name}: {part!r} is not a BIP340 public key")
        keys.add(key)
    return frozenset(keys)


@dataclass(frozen=True)
class Settings:
    worker: int
    operator: str
    nats_url: str
    state_dir: Path
    issuers: frozenset[bytes]
    http_host: str
    http_port: int
    packages: Batching
    blocks: Batching
    prepare_timeout_ms: int
    verifiers: int  # processes checking signatures; 0: checked inline
    log_level: str

    @staticmethod
    def from_env(env: Mapping[str, str]) -> Settings:
        host, port = env_addr(env, "WORKER_HTTP_ADDR", "127.0.0.1:0")
        worker = env_int(env, "WORKER_ID", -1, 0, 255)
        if worker < 0:
            raise ConfigError("WORKER_ID must be set")
        return Settings(
            worker=worker,
            operator=env_operator(env, "WORKER_OPERATOR"),
            nats_url=env_str(env, "WORKER_NATS_URL", "nats://127.0.0.1:4222"),
            state_dir=Path(env_str(env, "WORKER_STATE_DIR")),
            issuers=env_keys(env, "WORKER_ISSUERS"),
            http_host=host,
            http_port=port,
            packages=Batching.from_env(env, "WORKER_PACKAGE", 512, 0),
            blocks=Batching.from_env(env, "WORKER_BLOCK", 4096, 0),
            prepare_timeout_ms=env_int(env, "WORKER_PREPARE_TIMEOUT_MS", 2_000, 10, 600_000),
            verifiers=env_int(env, "WORKER_VERIFIERS", 0, 0, 64),
            log_level=env_str(env, "WORKER_LOG_LEVEL", "info"),
        )
