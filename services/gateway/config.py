"""The gateway's settings, read once from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from constellation.address import Network
from constellation.keys import SigningKey
from constellation.tx import ledger_id
from services.bus import Batching
from services.gateway.console import parse_targets
from services.gateway.settle import Settings as SettleSettings
from services.replica.config import Layout, load_layout, load_peers
from services.runtime import (
    ConfigError,
    IpNetwork,
    env_addr,
    env_int,
    env_networks,
    env_operator,
    env_str,
)

WEB_DIR = Path(__file__).resolve().parents[2] / "web" / "dist"  # web/ built (scripts/setup)
MIN_TOKEN = 16


@dataclass(frozen=True)
class Settings:
    operator: str
    nats_url: str
    redis_url: str
    database_url: str
    network: Network
    http_host: str
    http_port: int
    rate_per_s: int  # transactions per second per client
    trusted_proxies: tuple[IpNetwork, ...]  # whose X-Forwarded-For names the client
    max_in_flight: int
    max_body: int
    timeout_ms: int
    packages: Batching
    log_level: str
    # A guild member's gateway serves every member's ledger (its users pay here while
    # their own operator is down), with the guild's partition map.
    layout: Layout | None = None
    lightning_rpc: Path | None = None  # the operator's lightningd socket
    # what the channel to each peer should be able to send (twice over; 0: no splicing)
    liquidity_msat: int = 0
    # settlement with the other members (needs the layout and the Lightning node)
    settle: SettleSettings | None = None
    web_dir: Path = WEB_DIR  # the explorer's and the console's built pages
    console_token: str = ""  # the operator console's (empty: no console)
    console_targets: dict[str, str] = field(default_factory=dict)  # name: ops server URL
    grafana_url: str = ""  # the console links to it

    @property
    def ledger_ids(self) -> dict[str, bytes]:
        """Each member's ledger id (none without a layout)."""
        members = self.layout.members if self.layout else ()
        return {m.name: ledger_id(m.key) for m in members}

    @property
    def neighbour_ids(self) -> dict[str, bytes]:
        """The ledger id of each operator of another guild the members settle with."""
        neighbours = self.layout.neighbours if self.layout else ()
        return {n.name: ledger_id(n.key) for n in neighbours}

    @property
    def ledgers(self) -> list[str]:
        """The ledgers served: this operator's first."""
        others = [m.name for m in self.layout.members] if self.layout else []
        return [self.operator, *(o for o in others if o != self.operator)]

    @staticmethod
    def from_env(env: Mapping[str, str]) -> Settings:
        host, port = env_addr(env, "GATEWAY_HTTP_ADDR", "127.0.0.1:8080")
        try:
            network = Network.from_name(env_str(env, "GATEWAY_NETWORK", "regtest"))
        except ValueError as exc:
            raise ConfigError(f"GATEWAY_NETWORK: {exc}") from None
        operator = env_operator(env, "GATEWAY_OPERATOR")
        layout = None
        if env.get("GATEWAY_LAYOUT"):
            layout = load_layout(Path(env_str(env, "GATEWAY_LAYOUT")))
            layout.index(operator)  # a member of it
        settle = None
        if layout is not None and env.get("GATEWAY_OPERATOR_KEY"):
            settle = SettleSettings(
                operator=operator,
                layout=layout,
                key=_secret(env, "GATEWAY_OPERATOR_KEY"),
                issuer=_secret(env, "GATEWAY_ISSUER_KEY"),
                peers=load_peers(Path(env_str(env, "GATEWAY_PEERS"))),
                database_url=env_str(env, "GATEWAY_DATABASE_URL"),
                period_s=env_int(env, "GATEWAY_SETTLE_PERIOD_MS", 1000, 50, 3_600_000) / 1000,
                fee_limit_msat=env_int(env, "GATEWAY_SETTLE_FEE_LIMIT_MSAT", 10_000, 0, 10**12),
                max_batch_msat=env_int(
                    env, "GATEWAY_SETTLE_MAX_BATCH_MSAT", 10**9, 1000, 2_100_000_000_000_000
                ),
            )
            if settle.key.pubkey != layout.members[layout.index(operator)].key:
                raise ConfigError("GATEWAY_OPERATOR_KEY is not this operator's key in the layout")
            missing = [n for n, _ in settle.counterparts if n not in settle.peers]
            if missing:
                raise ConfigError(f"GATEWAY_PEERS has no credentials for {', '.join(missing)}")
            if not env.get("GATEWAY_LIGHTNING_RPC"):
                raise ConfigError("settling (GATEWAY_OPERATOR_KEY) needs GATEWAY_LIGHTNING_RPC")
        try:
            targets = parse_targets(env.get("GATEWAY_CONSOLE_TARGETS", ""))
        except ValueError as exc:
            raise ConfigError(f"GATEWAY_CONSOLE_TARGETS: {exc}") from None
        return Settings(
            operator=operator,
            nats_url=env_str(env, "GATEWAY_NATS_URL", "nats://127.0.0.1:4222"),
            redis_url=env_str(env, "GATEWAY_REDIS_URL", "redis://127.0.0.1:6379/0"),
            database_url=env_str(env, "GATEWAY_DATABASE_URL"),
            network=network,
            http_host=host,
            http_port=port,
            rate_per_s=env_int(env, "GATEWAY_RATE_PER_S", 20_000, 1, 10_000_000),
            trusted_proxies=env_networks(env, "GATEWAY_TRUSTED_PROXIES"),
            max_in_flight=env_int(env, "GATEWAY_MAX_IN_FLIGHT", 20_000, 1, 10_000_000),
            max_body=env_int(env, "GATEWAY_MAX_BODY", 4 << 20, 1024, 64 << 20),
            timeout_ms=env_int(env, "GATEWAY_TIMEOUT_MS", 5_000, 100, 600_000),
            packages=Batching.from_env(env, "GATEWAY_PACKAGE", 512, 0),
            log_level=env_str(env, "GATEWAY_LOG_LEVEL", "info"),
            layout=layout,
            lightning_rpc=Path(env["GATEWAY_LIGHTNING_RPC"])
            if env.get("GATEWAY_LIGHTNING_RPC")
            else None,
            liquidity_msat=env_int(env, "GATEWAY_LIQUIDITY_MSAT", 0, 0, 10**15),
            settle=settle,
            web_dir=Path(env_str(env, "GATEWAY_WEB_DIR", str(WEB_DIR))),
            console_token=_console_token(env),
            console_targets=targets,
            grafana_url=env.get("GATEWAY_GRAFANA_URL", ""),
        )


def _secret(env: Mapping[str, str], name: str) -> SigningKey:
    try:
        return SigningKey(bytes.fromhex(env_str(env, name)))
    except ValueError:
        raise ConfigError(f"{name} must be a 32-byte secret key in hex") from None


def _console_token(env: Mapping[str, str]) -> str:
    """The console's token: GATEWAY_CONSOLE_TOKEN, or the file GATEWAY_CONSOLE_TOKEN_FILE
    names (a mounted Secret); at least 16 characters, or none (no console)."""
    token = env.get("GATEWAY_CONSOLE_TOKEN", "")
    if env.get("GATEWAY_CONSOLE_TOKEN_FILE"):
        try:
            token = Path(env["GATEWAY_CONSOLE_TOKEN_FILE"]).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"GATEWAY_CONSOLE_TOKEN_FILE: {exc}") from None
    if token and len(token) < MIN_TOKEN:
        raise ConfigError(f"the console token needs at least {MIN_TOKEN} characters")
    return token
