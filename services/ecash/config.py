"""The mint's settings, read once from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from constellation.address import Network
from constellation.ecash.keyset import MAX_FEE_PPK
from constellation.ecash.onchain import DUST_SAT
from constellation.keys import SigningKey
from constellation.payto import BITCOIN_HRP
from services.ecash.onchain import ChainSettings
from services.runtime import (
    ConfigError,
    IpNetwork,
    env_addr,
    env_int,
    env_networks,
    env_operator,
    env_str,
)
from services.signer.config import signer_access


@dataclass(frozen=True)
class Settings:
    operator: str
    database_url: str
    lightning_rpc: Path  # the operator's lightningd socket: mint invoices, melt payments
    storage_key: bytes  # seals the master secret the keysets derive from
    http_host: str
    http_port: int
    name: str  # what NUT-06 says the mint is
    input_fee_ppk: int  # of the active keyset; a change rotates the keyset
    quote_expiry_s: int
    max_amount_sat: int  # per mint or melt
    fee_reserve_ppm: int  # a melt's reserve for routing fees: this share of its amount...
    fee_reserve_min_sat: int  # ...and at least this
    log_level: str
    # the bridge to the operator's L3 ledger (none without a gateway): its public API, the
    # key that issues redeemed coins, and the addresses' network
    gateway_url: str = ""
    issuer: SigningKey | None = None
    network: Network = Network.REGTEST
    # NUT-19: answers kept in Redis (none without it) this long, for a wallet's retry
    redis_url: str = ""
    cache_ttl_s: int = 300
    rate_per_s: int = 100  # requests a second per client address (shared through Redis)
    trusted_proxies: tuple[IpNetwork, ...] = ()  # whose X-Forwarded-For names the client
    chain: ChainSettings | None = None  # on-chain deposits and withdrawals (NUT-30)

    @staticmethod
    def from_env(env: Mapping[str, str]) -> Settings:
        host, port = env_addr(env, "MINT_HTTP_ADDR", "127.0.0.1:3338")
        operator = env_operator(env, "MINT_OPERATOR")
        try:
            storage_key = bytes.fromhex(env_str(env, "MINT_STORAGE_KEY"))
        except ValueError:
            storage_key = b""
        if len(storage_key) != 32:
            raise ConfigError("MINT_STORAGE_KEY must be 32 bytes in hex")
        issuer = None
        if env.get("MINT_ISSUER_KEY"):
            try:
                issuer = SigningKey(bytes.fromhex(env_str(env, "MINT_ISSUER_KEY")))
            except ValueError:
                raise ConfigError("MINT_ISSUER_KEY must be a 32-byte secret key in hex") from None
        try:
            network = Network.from_name(env_str(env, "MINT_NETWORK", "regtest"))
        except ValueError as exc:
            raise ConfigError(f"MINT_NETWORK: {exc}") from None
        gateway_url = env.get("MINT_GATEWAY_URL", "")
        if bool(gateway_url) != (issuer is not None):
            raise ConfigError("the L3 bridge needs both MINT_GATEWAY_URL and MINT_ISSUER_KEY")
        return Settings(
            chain=_chain(env, network),
            redis_url=env.get("MINT_REDIS_URL", ""),
            cache_ttl_s=env_int(env, "MINT_CACHE_TTL_S", 300, 1, 7 * 86400),
            rate_per_s=env_int(env, "MINT_RATE_PER_S", 100, 1, 1_000_000),
            trusted_proxies=env_networks(env, "MINT_TRUSTED_PROXIES"),
            gateway_url=gateway_url,
            issuer=issuer,
            network=network,
            operator=operator,
            database_url=env_str(env, "MINT_DATABASE_URL"),
            lightning_rpc=Path(env_str(env, "MINT_LIGHTNING_RPC")),
            storage_key=storage_key,
            http_host=host,
            http_port=port,
            name=env_str(env, "MINT_NAME", f"Constellation mint of {operator}"),
            input_fee_ppk=env_int(env, "MINT_INPUT_FEE_PPK", 0, 0, MAX_FEE_PPK),
            quote_expiry_s=env_int(env, "MINT_QUOTE_EXPIRY_S", 3600, 60, 7 * 86400),
            max_amount_sat=env_int(
                env, "MINT_MAX_AMOUNT_SAT", 10_000_000, 1, 2_100_000_000_000_000
            ),
            fee_reserve_ppm=env_int(env, "MINT_FEE_RESERVE_PPM", 10_000, 0, 1_000_000),
            fee_reserve_min_sat=env_int(env, "MINT_FEE_RESERVE_MIN_SAT", 2, 0, 1_000_000),
            log_level=env_str(env, "MINT_LOG_LEVEL", "info"),
        )


def _chain(env: Mapping[str, str], network: Network) -> ChainSettings | None:
    """The chain (bitcoind's JSON-RPC) and the operator's signer, where both are given."""
    if not env.get("MINT_BITCOIND_URL"):
        return None
    # at most Bitcoin Core's maxfeerate (0.1 BTC/kvB): sendrawtransaction refuses more
    least = env_int(env, "MINT_CHAIN_FEERATE", 2, 1, 10_000)
    most = env_int(env, "MINT_CHAIN_MAX_FEERATE", 1_000, 1, 10_000)
    if least > most:
        raise ConfigError(f"MINT_CHAIN_FEERATE ({least}) over MINT_CHAIN_MAX_FEERATE ({most})")
    signer = signer_access(env, "MINT_SIGNER")
    return ChainSettings(
        bitcoind_url=env_str(env, "MINT_BITCOIND_URL"),
        signer=signer,
        confirmations=env_int(env, "MINT_CHAIN_CONFIRMATIONS", 3, 1, 1000),
        min_feerate=least,
        max_feerate=most,
        fee_target=env_int(env, "MINT_CHAIN_FEE_TARGET", 6, 1, 1008),
        poll_s=env_int(env, "MINT_CHAIN_POLL_S", 5, 1, 600),
        hrp=BITCOIN_HRP[network],
        bump_budget_sat=env_int(
            env, "MINT_CHAIN_BUMP_BUDGET_SAT", 1_000_000, 0, 2_100_000_000_000_000
        ),
        min_deposit_sat=env_int(
            env, "MINT_CHAIN_MIN_DEPOSIT_SAT", 10_000, DUST_SAT, 2_100_000_000_000_000
        ),
    )
