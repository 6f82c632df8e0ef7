"""The indexer's settings, read once from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.runtime import env_addr, env_int, env_operator, env_str


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
        )
