"""The signer's settings, read once from the environment."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from coincurve import PublicKey

from constellation.crypto.dkg import hostpubkey_gen
from constellation.errors import DKGError
from constellation.guild import Purpose
from constellation.protocol.envelope import Membership
from services.replica.config import load_peers
from services.runtime import ConfigError, env_addr, env_int, env_str
from services.signer.transport import PER_SENDER

GUILD_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def load_members(path: Path) -> Membership:
    """The guild file: its id and its members' host public keys, in signer-id order."""
    try:
        doc = json.loads(path.read_text())
        guild = doc["guild"]
        keys = tuple(bytes.fromhex(k) for k in doc["members"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read the guild file {path}: {exc}") from exc
    if not isinstance(guild, str) or not GUILD_RE.match(guild):
        raise ConfigError(f"guild id {guild!r} must match {GUILD_RE.pattern}")
    if not keys or any(len(k) != 33 for k in keys):
        raise ConfigError("members must be 33-byte compressed host public keys in hex")
    try:
        return Membership(guild, keys)
    except ValueError as exc:
        raise ConfigError(f"the guild file {path}: {exc}") from exc


def save_members(members: Membership, path: Path) -> None:
    doc = {"guild": members.guild, "members": [k.hex() for k in members.hostpubkeys]}
    path.write_text(json.dumps(doc, indent=2) + "\n")


@dataclass(frozen=True)
class SignerAccess:
    """How another service of an operator asks the operator's own signer: the signer's
    NATS, the guild's members, the signer's host public key (which member it is), and a
    client key of the operator's (one of the signer's ``SIGNER_CLIENT_KEYS``)."""

    nats_url: str
    members: Membership
    signer: bytes
    client_key: bytes


def signer_access(env: Mapping[str, str], prefix: str) -> SignerAccess:
    """From ``<prefix>_NATS_URL``, ``_MEMBERS``, ``_PUBKEY`` (the signer's host public
    key) and ``_CLIENT_KEY`` (32 bytes in hex)."""
    members = load_members(Path(env_str(env, f"{prefix}_MEMBERS")))
    try:
        signer = bytes.fromhex(env_str(env, f"{prefix}_PUBKEY"))
        client_key = bytes.fromhex(env_str(env, f"{prefix}_CLIENT_KEY"))
        hostpubkey_gen(client_key)
    except (ValueError, DKGError) as exc:
        raise ConfigError(f"{prefix}_PUBKEY and _CLIENT_KEY: {exc}") from None
    if signer not in members.index:
        raise ConfigError(f"{prefix}_PUBKEY is not a member's host key")
    return SignerAccess(env_str(env, f"{prefix}_NATS_URL"), members, signer, client_key)


def client_keys(text: str) -> tuple[bytes, ...]:
    """``SIGNER_CLIENT_KEYS``: the public keys (33 bytes in hex, comma-separated) of the
    client keys whose requests the signer serves."""
    keys = []
    for item in (k.strip() for k in text.split(",")):
        if not item:
            continue
        try:
            keys.append(PublicKey(bytes.fromhex(item)).format())
        except ValueError:
            raise ConfigError(f"SIGNER_CLIENT_KEYS: {item!r} is not a public key") from None
    return tuple(dict.fromkeys(keys))  # each once


@dataclass(frozen=True)
class Settings:
    nats_url: str
    members_path: Path
    state_dir: Path
    storage_key: bytes  # encrypts the identity key and the share at rest
    http_host: str
    http_port: int
    purposes: frozenset[Purpose]
    request_timeout_ms: int
    max_requests: int
    replay_window_ms: int
    replay_per_sender: int  # message ids remembered per member, at most
    log_level: str
    # Where this operator's indexer checks a checkpoint before this signer signs it;
    # empty: checkpoints are checked by the signing policy only (a signer without a ledger).
    vouch_subject: str = ""
    names: tuple[str, ...] = ()  # every member's name, in member order (with peers)
    peers: dict[str, str] | None = None  # a member's name -> its NATS, our credentials
    clients: tuple[bytes, ...] = ()  # the client keys that may ask it (none: no one)

    @staticmethod
    def from_env(env: Mapping[str, str]) -> Settings:
        raw_key = env_str(env, "SIGNER_STORAGE_KEY")
        try:
            key = bytes.fromhex(raw_key)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise ConfigError("SIGNER_STORAGE_KEY must be 32 bytes in hex")
        names = env.get("SIGNER_PURPOSES") or ",".join(p.value for p in Purpose)
        try:
            purposes = frozenset(Purpose(p.strip()) for p in names.split(",") if p.strip())
        except ValueError as exc:
            raise ConfigError(f"SIGNER_PURPOSES: {exc}") from exc
        host, port = env_addr(env, "SIGNER_HTTP_ADDR", "127.0.0.1:0")
        member_names = tuple(n for n in env.get("SIGNER_NAMES", "").split(",") if n)
        peers = load_peers(Path(env["SIGNER_PEERS"])) if env.get("SIGNER_PEERS") else None
        if (peers is None) != (not member_names):
            raise ConfigError("SIGNER_NAMES and SIGNER_PEERS go together (a member per server)")
        return Settings(
            nats_url=env_str(env, "SIGNER_NATS_URL", "nats://127.0.0.1:4222"),
            members_path=Path(env_str(env, "SIGNER_MEMBERS")),
            state_dir=Path(env_str(env, "SIGNER_STATE_DIR")),
            storage_key=key,
            http_host=host,
            http_port=port,
            purposes=purposes,
            request_timeout_ms=env_int(env, "SIGNER_REQUEST_TIMEOUT_MS", 30_000, 100, 600_000),
            max_requests=env_int(env, "SIGNER_MAX_REQUESTS", 64, 1, 10_000),
            replay_window_ms=env_int(env, "SIGNER_REPLAY_WINDOW_MS", 60_000, 1_000, 600_000),
            replay_per_sender=env_int(env, "SIGNER_REPLAY_PER_SENDER", PER_SENDER, 16, 10_000_000),
            log_level=env.get("SIGNER_LOG_LEVEL") or "info",
            vouch_subject=env.get("SIGNER_VOUCH_SUBJECT", ""),
            names=member_names,
            peers=peers,
            clients=client_keys(env.get("SIGNER_CLIENT_KEYS", "")),
        )
