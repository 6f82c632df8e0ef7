"""A machine's settings: the guild's layout (a file every member holds alike), this
machine's place in it, and the credentials its operator was issued by each peer."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from constellation.keys import SigningKey, is_valid_xonly
from constellation.ledger.pmap import PartitionMap
from constellation.replication.placement import MAX_MACHINES, MIN_MACHINES
from services.runtime import OPERATOR_RE, ConfigError, env_addr, env_int, env_str

MACHINES = MIN_MACHINES  # an operator's machines at first, unless the layout says more
RESERVED = "relay"  # cst.relay.* carries the relay's answers (relay.py)


@dataclass(frozen=True)
class Member:
    """One operator of the guild, as every member knows it."""

    name: str
    key: bytes  # x-only: it signs blocks, acks, votes and every message it sends
    issuers: frozenset[bytes]  # keys whose issuances its shards accept
    nats: str  # its NATS server, where its peers deliver what they send it
    # Its machines at first (``Placement.initial``); it adds and removes machines itself
    # (``constellation.replication.placement``), telling no other member.
    machines: int = MACHINES


@dataclass(frozen=True)
class Neighbour:
    """An operator of another guild that every member settles with (over Lightning,
    ``services.gateway.settle``): payments from a member's ledger may go to its ledger,
    and from its ledger to a member's. Nothing of it is replicated here."""

    name: str  # what the members call it: its NATS user at each member, its metrics' label
    guild: str
    key: bytes  # x-only: its operator key (its ledger's id derives from it)
    nats: str  # its NATS server, where members deliver settlement messages


@dataclass(frozen=True)
class Layout:
    """The guild: its members in order (a member's index is its operator number in the
    replication protocol), the workers (shards) each runs, and the operators of other
    guilds its members settle with."""

    guild: str
    workers: int
    members: tuple[Member, ...]
    neighbours: tuple[Neighbour, ...] = ()
    # The first ``founders`` members founded the guild (0: every member did); those after
    # joined it, and vote once the guild agreed to it (``constellation.replication
    # .members``): a shard's first block names the founders alone.
    founders: int = 0

    def index(self, name: str) -> int:
        for i, m in enumerate(self.members):
            if m.name == name:
                return i
        raise ConfigError(f"operator {name!r} is not a member of guild {self.guild!r}")

    @property
    def keys(self) -> list[bytes]:
        return [m.key for m in self.members]

    @property
    def founding(self) -> list[int]:
        """The founders' member indices: the voters of every shard's first block."""
        return list(range(self.founders or len(self.members)))

    @property
    def pmap(self) -> PartitionMap:
        return PartitionMap.even(self.workers)

    def to_json(self) -> dict[str, Any]:
        return {
            "guild": self.guild,
            "workers": self.workers,
            "members": [
                {
                    "name": m.name,
                    "key": m.key.hex(),
                    "issuers": sorted(k.hex() for k in m.issuers),
                    "nats": m.nats,
                    "machines": m.machines,
                }
                for m in self.members
            ],
            "neighbours": [
                {"name": n.name, "guild": n.guild, "key": n.key.hex(), "nats": n.nats}
                for n in self.neighbours
            ],
            **({"founders": self.founders} if self.founders else {}),
        }

    @staticmethod
    def from_json(doc: Any) -> Layout:
        try:
            members = tuple(
                Member(
                    str(m["name"]),
                    bytes.fromhex(m["key"]),
                    frozenset(bytes.fromhex(k) for k in m["issuers"]),
                    str(m["nats"]),
                    int(m.get("machines", MACHINES)),
                )
                for m in doc["members"]
            )
            neighbours = tuple(
                Neighbour(str(n["name"]), str(n["guild"]), bytes.fromhex(n["key"]), str(n["nats"]))
                for n in doc.get("neighbours", ())
            )
            founders = int(doc.get("founders", 0))
            layout = Layout(str(doc["guild"]), int(doc["workers"]), members, neighbours, founders)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"the guild layout is malformed: {exc!r}") from None
        if not 1 <= layout.workers <= 256:
            raise ConfigError("the guild layout needs 1 to 256 workers per operator")
        if len(members) < 2:
            raise ConfigError("a guild has at least two members")
        if founders and not 2 <= founders < len(members):
            raise ConfigError("founders: at least two, fewer than the members (or 0: all)")
        if not all(MACHINES <= m.machines <= MAX_MACHINES for m in members):
            raise ConfigError(f"a member runs {MACHINES} to {MAX_MACHINES} machines")
        if any(m.name == RESERVED for m in members):
            raise ConfigError(f"no member may be named {RESERVED!r} (its subjects are the relay's)")
        if len({m.name for m in members}) != len(members) or len(set(layout.keys)) != len(members):
            raise ConfigError("two members of the guild share a name or a key")
        for m in members:
            if not is_valid_xonly(m.key) or not all(is_valid_xonly(k) for k in m.issuers):
                raise ConfigError(f"member {m.name!r}: a key is not a BIP340 public key")
        names = [m.name for m in members] + [n.name for n in neighbours]
        keys = layout.keys + [n.key for n in neighbours]
        if len(set(names)) != len(names) or len(set(keys)) != len(keys):
            raise ConfigError("a neighbour shares a name or a key with a member or another")
        for n in neighbours:
            if n.guild == layout.guild:
                raise ConfigError(f"neighbour {n.name!r} is of this guild: make it a member")
            if n.name == RESERVED or not OPERATOR_RE.match(n.name):
                raise ConfigError(f"neighbour {n.name!r}: reserved, or not {OPERATOR_RE.pattern}")
            if not is_valid_xonly(n.key):
                raise ConfigError(f"neighbour {n.name!r}: its key is not a BIP340 public key")
        return layout


def load_layout(path: Path) -> Layout:
    try:
        return Layout.from_json(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the guild layout {path}: {exc}") from None


def load_peers(path: Path) -> dict[str, str]:
    """Each peer's NATS URL with the credentials that peer issued to this operator."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the peers' credentials {path}: {exc}") from None
    if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
        raise ConfigError(f"{path}: expected an object of peer name to NATS URL")
    return {str(k): v for k, v in doc.items()}


@dataclass(frozen=True)
class Settings:
    layout: Layout
    operator: int  # this operator's index in the layout
    machine: int
    key: SigningKey
    nats_url: str  # this operator's own NATS, with its own credentials
    peers: dict[str, str]  # peer name -> URL with the credentials it issued us
    state_dir: Path
    http_host: str
    http_port: int
    heartbeat_ms: int
    election_ms: int
    prepare_timeout_ms: int
    snapshot_every: int  # blocks between a copy's snapshots
    keep: int  # blocks kept behind a snapshot, for copies slightly behind
    log_level: str

    @property
    def name(self) -> str:
        return self.layout.members[self.operator].name

    @staticmethod
    def from_env(env: Mapping[str, str]) -> Settings:
        layout = load_layout(Path(env_str(env, "REPLICA_LAYOUT")))
        operator = layout.index(env_str(env, "REPLICA_OPERATOR"))
        try:
            key = SigningKey(bytes.fromhex(env_str(env, "REPLICA_KEY")))
        except ValueError:
            raise ConfigError("REPLICA_KEY must be a 32-byte secret key in hex") from None
        if key.pubkey != layout.members[operator].key:
            raise ConfigError("REPLICA_KEY is not this operator's key in the guild layout")
        peers = load_peers(Path(env_str(env, "REPLICA_PEERS")))
        for i, m in enumerate(layout.members):
            if i != operator and m.name not in peers:
                raise ConfigError(f"no credentials for peer {m.name!r} in REPLICA_PEERS")
        host, port = env_addr(env, "REPLICA_HTTP_ADDR", "127.0.0.1:0")
        # Three beats to an election timeout: every beat is a message to each other copy
        # of every shard, and its answer (at 100 ms, half the messages of an idle guild).
        heartbeat_ms = env_int(env, "REPLICA_HEARTBEAT_MS", 200, 10, 10_000)
        election_ms = env_int(env, "REPLICA_ELECTION_MS", 600, 50, 60_000)
        if election_ms < 3 * heartbeat_ms:
            raise ConfigError("REPLICA_ELECTION_MS must be at least 3 heartbeats")
        return Settings(
            layout=layout,
            operator=operator,
            machine=env_int(env, "REPLICA_MACHINE", 0, 0, MAX_MACHINES - 1),
            key=key,
            nats_url=env_str(env, "REPLICA_NATS_URL", "nats://127.0.0.1:4222"),
            peers=peers,
            state_dir=Path(env_str(env, "REPLICA_STATE_DIR")),
            http_host=host,
            http_port=port,
            heartbeat_ms=heartbeat_ms,
            election_ms=election_ms,
            prepare_timeout_ms=env_int(env, "REPLICA_PREPARE_TIMEOUT_MS", 2_000, 10, 600_000),
            snapshot_every=env_int(env, "REPLICA_SNAPSHOT_EVERY", 1024, 2, 1 << 20),
            keep=env_int(env, "REPLICA_KEEP", 256, 1, 1 << 20),
            log_level=env_str(env, "REPLICA_LOG_LEVEL", "info"),
        )
