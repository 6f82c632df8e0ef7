"""The simulated network's settings, read once from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.lnsim.network import VERSION
from services.runtime import OPERATOR_RE, ConfigError, env_addr, env_int, env_str


@dataclass(frozen=True)
class Settings:
    directory: Path  # node N's socket: DIR/N/regtest/lightning-rpc
    nodes: tuple[str, ...]
    channel_sat: int  # a channel of this size between every pair of nodes, balanced
    fund_sat: int  # each node's wallet at the start
    seed: int
    version: str  # what getinfo says: it picks the methods clients may call
    block_s: int  # a block every so many seconds (0: only when asked)
    http_host: str
    http_port: int
    log_level: str

    @staticmethod
    def from_env(env: Mapping[str, str]) -> Settings:
        nodes = tuple(n for n in env_str(env, "LNSIM_NODES").split(",") if n)
        if not nodes or len(set(nodes)) != len(nodes):
            raise ConfigError("LNSIM_NODES: distinct node names, separated by commas")
        for n in nodes:
            if not OPERATOR_RE.match(n):
                raise ConfigError(f"LNSIM_NODES: {n!r} must match {OPERATOR_RE.pattern}")
        channel_sat = env_int(env, "LNSIM_CHANNEL_SAT", 10_000_000, 20_000, 10**9)
        host, port = env_addr(env, "LNSIM_HTTP_ADDR", "127.0.0.1:0")
        return Settings(
            directory=Path(env_str(env, "LNSIM_DIR")),
            nodes=nodes,
            channel_sat=channel_sat,
            fund_sat=env_int(env, "LNSIM_FUND_SAT", channel_sat * len(nodes), 0, 10**12),
            seed=env_int(env, "LNSIM_SEED", 0, 0, 2**63 - 1),
            version=env_str(env, "LNSIM_VERSION", VERSION),
            block_s=env_int(env, "LNSIM_BLOCK_S", 10, 0, 3600),
            http_host=host,
            http_port=port,
            log_level=env_str(env, "LNSIM_LOG_LEVEL", "info"),
        )
