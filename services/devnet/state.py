"""What a devnet is, as recorded in its ``devnet.json``: ports, keys, the pid of each
process, and the environment each process is started with."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from constellation.crypto.dkg import hostpubkey_gen
from constellation.keys import SigningKey
from constellation.tx import Issuance, TxOutput
from services.signer.config import SignerAccess, signer_access
from services.signer.store import KeyStore

STATE_FILE = "devnet.json"


class DevnetError(RuntimeError):
    pass


def write_json_atomic(path: Path, doc: Any) -> None:
    """Readers see the old document or the new one, never half of one."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(temp, path)


@dataclass
class SignerProc:
    index: int
    state_dir: str
    storage_key: str  # seals its identity and shares: the signer's alone
    client_key: str  # its operator's client key: what the operator's other services ask with
    http_port: int
    hostpubkey: str = ""  # its identity's public key (its member's), once made
    pid: int = 0

    @staticmethod
    def create(index: int, state_dir: Path, http_port: int) -> SignerProc:
        """A new signer, with its identity made (in ``state_dir``) and a client key."""
        keys = os.urandom(32).hex(), os.urandom(32).hex()
        proc = SignerProc(index, str(state_dir), *keys, http_port)
        store = KeyStore(state_dir, bytes.fromhex(proc.storage_key))
        proc.hostpubkey = store.create_identity().hex()
        return proc

    @property
    def access_env(self) -> dict[str, str]:
        """How another service of its operator asks it (``signer_access``, bar the NATS
        and the members), by the prefix of that service's variables."""
        return {"PUBKEY": self.hostpubkey, "CLIENT_KEY": self.client_key}


@dataclass
class WorkerProc:
    index: int
    state_dir: str
    http_port: int
    pid: int = 0


@dataclass
class MachineProc:
    """A machine of a guild's operator: it holds one copy of every shard."""

    index: int
    state_dir: str
    http_port: int
    pid: int = 0


@dataclass
class Devnet:
    dir: str
    guild: str
    nats_port: int
    issuer_secret: str
    operator: str = "local"
    network: str = "regtest"
    nats_pid: int = 0
    redis_port: int = 0
    redis_pid: int = 0
    pg_port: int = 0
    pg_pid: int = 0
    gateway_port: int = 0
    gateway_pid: int = 0
    indexer_port: int = 0
    indexer_pid: int = 0
    request_timeout_ms: int = 30_000
    signers: list[SignerProc] = field(default_factory=list)
    workers: list[WorkerProc] = field(default_factory=list)
    # An operator of a local guild (``guild.py``): its machines instead of lone workers.
    machines: list[MachineProc] = field(default_factory=list)
    shards: int = 0  # workers (shards) the machines hold, per operator
    operator_key: str = ""  # secret: signs its blocks, acks, votes and messages
    settle_period_ms: int = 1000  # a settlement batch per peer this often, at most
    nats_password: str = ""  # of its own processes' NATS user
    issued: dict[str, str] = field(default_factory=dict)  # peer -> the NATS password issued
    lightning_rpc: str = ""  # its Lightning node's socket (the guild's simulated network)
    mint_port: int = 0  # its Cashu mint (an operator with a Lightning node runs one)
    mint_pid: int = 0
    mint_storage_key: str = ""  # seals the mint's master secret
    bitcoind_url: str = ""  # the chain, as bitcoind's JSON-RPC (the simulated network's)
    guild_pin: str = ""  # a member that joined: the guild's first key (INDEXER_GUILD_PIN)
    console_token: str = field(default_factory=lambda: os.urandom(16).hex())  # the console's

    @property
    def in_guild(self) -> bool:
        return bool(self.machines)

    @property
    def shard_count(self) -> int:
        return self.shards if self.in_guild else len(self.workers)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def has_mint(self) -> bool:
        return bool(self.lightning_rpc and self.mint_storage_key)

    @property
    def mint_url(self) -> str:
        return f"http://127.0.0.1:{self.mint_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def database_url(self) -> str:
        return f"postgresql://constellation@127.0.0.1:{self.pg_port}/constellation"

    @property
    def nats_url(self) -> str:
        user = f"self:{self.nats_password}@" if self.nats_password else ""
        return f"nats://{user}127.0.0.1:{self.nats_port}"

    @property
    def layout_path(self) -> Path:
        return Path(self.dir) / "layout.json"

    @property
    def peers_path(self) -> Path:
        return Path(self.dir) / "peers.json"

    @property
    def nats_conf(self) -> Path:
        return Path(self.dir) / "nats.conf"

    @property
    def members_path(self) -> Path:
        return Path(self.dir) / "guild.json"

    @property
    def issuer(self) -> SigningKey:
        return SigningKey(bytes.fromhex(self.issuer_secret))

    def issuance(self, outputs: Sequence[TxOutput]) -> Issuance:
        """New coins, signed by the devnet's issuer key (a fresh random nonce each)."""
        issuer = self.issuer
        nonce = int.from_bytes(os.urandom(8)) >> 1
        return Issuance(issuer.pubkey, nonce, outputs).signed_by(issuer.secret)

    # -- processes, by name

    def processes(self) -> list[tuple[str, int]]:
        """Each process's name and pid (0: never started), in the order ``up`` starts them."""
        return [
            ("nats", self.nats_pid),
            ("redis", self.redis_pid),
            ("postgres", self.pg_pid),
            *((f"signer-{s.index}", s.pid) for s in self.signers),
            *((f"worker-{w.index}", w.pid) for w in self.workers),
            *((f"machine-{m.index}", m.pid) for m in self.machines),
            ("gateway", self.gateway_pid),
            ("indexer", self.indexer_pid),
            *((("mint", self.mint_pid),) if self.has_mint else ()),
        ]

    def pid_of(self, name: str) -> int:
        return dict(self.processes())[name]

    def set_pid(self, name: str, pid: int) -> None:
        kind, _, index = name.partition("-")
        if kind == "signer":
            self.signers[int(index)].pid = pid
        elif kind == "worker":
            self.workers[int(index)].pid = pid
        elif kind == "machine":
            self.machines[int(index)].pid = pid
        elif name in ("nats", "redis", "gateway", "indexer", "mint"):
            setattr(self, f"{name}_pid", pid)
        elif name == "postgres":
            self.pg_pid = pid
        else:
            raise DevnetError(f"no process {name!r} in this devnet")

    # -- the environment of each process (its settings; see each service's config.py)

    def worker_env(self, proc: WorkerProc) -> dict[str, str]:
        return {
            **os.environ,
            "WORKER_ID": str(proc.index),
            "WORKER_OPERATOR": self.operator,
            "WORKER_NATS_URL": self.nats_url,
            "WORKER_STATE_DIR": proc.state_dir,
            "WORKER_HTTP_ADDR": f"127.0.0.1:{proc.http_port}",
            "WORKER_ISSUERS": self.issuer.pubkey.hex(),
        }

    def machine_env(self, proc: MachineProc) -> dict[str, str]:
        return {
            **os.environ,
            "REPLICA_LAYOUT": str(self.layout_path),
            "REPLICA_OPERATOR": self.operator,
            "REPLICA_MACHINE": str(proc.index),
            "REPLICA_KEY": self.operator_key,
            "REPLICA_NATS_URL": self.nats_url,
            "REPLICA_PEERS": str(self.peers_path),
            "REPLICA_STATE_DIR": proc.state_dir,
            "REPLICA_HTTP_ADDR": f"127.0.0.1:{proc.http_port}",
        }

    def gateway_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "GATEWAY_OPERATOR": self.operator,
            "GATEWAY_NATS_URL": self.nats_url,
            "GATEWAY_REDIS_URL": self.redis_url,
            "GATEWAY_DATABASE_URL": self.database_url,
            "GATEWAY_HTTP_ADDR": f"127.0.0.1:{self.gateway_port}",
            "GATEWAY_NETWORK": self.network,
            **({"GATEWAY_LAYOUT": str(self.layout_path)} if self.in_guild else {}),
            **({"GATEWAY_LIGHTNING_RPC": self.lightning_rpc} if self.lightning_rpc else {}),
            **(self._settle_env() if self.in_guild and self.lightning_rpc else {}),
            "GATEWAY_CONSOLE_TOKEN": self.console_token,
            "GATEWAY_CONSOLE_TARGETS": ",".join(
                f"{name}=http://127.0.0.1:{port}" for name, port in self.ops_ports()
            ),
        }

    def ops_ports(self) -> list[tuple[str, int]]:
        """The ops server (``/readyz``, ``/metrics``) of each of its own processes."""
        return [
            *((f"signer-{s.index}", s.http_port) for s in self.signers),
            *((f"worker-{w.index}", w.http_port) for w in self.workers),
            *((f"machine-{m.index}", m.http_port) for m in self.machines),
            ("gateway", self.gateway_port),
            ("indexer", self.indexer_port),
            *((("mint", self.mint_port),) if self.has_mint else ()),
        ]

    def _settle_env(self) -> dict[str, str]:
        """The gateway settles with the other members over the Lightning network."""
        return {
            "GATEWAY_OPERATOR_KEY": self.operator_key,
            "GATEWAY_ISSUER_KEY": self.issuer_secret,
            "GATEWAY_PEERS": str(self.peers_path),
            "GATEWAY_SETTLE_PERIOD_MS": str(self.settle_period_ms),
        }

    @property
    def member_names(self) -> list[str]:
        """The operators of this one's guild, in member order (the layout's)."""
        doc = json.loads(self.layout_path.read_text())
        return [m["name"] for m in doc["members"]]

    def mint_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "MINT_OPERATOR": self.operator,
            "MINT_DATABASE_URL": self.database_url,
            "MINT_LIGHTNING_RPC": self.lightning_rpc,
            "MINT_STORAGE_KEY": self.mint_storage_key,
            "MINT_HTTP_ADDR": f"127.0.0.1:{self.mint_port}",
            "MINT_GATEWAY_URL": self.gateway_url,
            "MINT_ISSUER_KEY": self.issuer_secret,
            "MINT_NETWORK": self.network,
            "MINT_REDIS_URL": self.redis_url,
            "MINT_RATE_PER_S": os.environ.get("MINT_RATE_PER_S", "5000"),  # one local client
            **(self._onchain_env() if self.bitcoind_url and self.signers else {}),
        }

    def _onchain_env(self) -> dict[str, str]:
        """What the mint needs for on-chain deposits and withdrawals: the chain, and its
        operator's signer."""
        return {"MINT_BITCOIND_URL": self.bitcoind_url, **self.signer_access_env("MINT_SIGNER")}

    def signer_access(self, index: int = 0) -> SignerAccess:
        """How the operator (the devnet's commands) asks signer ``index``."""
        return signer_access(self.signer_access_env("ACCESS", index), "ACCESS")

    def signer_access_env(self, prefix: str, index: int = 0) -> dict[str, str]:
        """How a service asks its operator's signer (``signer_access(env, prefix)``)."""
        signer = self.signers[index]
        return {
            f"{prefix}_NATS_URL": self.nats_url,
            f"{prefix}_MEMBERS": str(self.members_path),
            **{f"{prefix}_{k}": v for k, v in signer.access_env.items()},
        }

    def indexer_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "INDEXER_OPERATOR": self.operator,
            "INDEXER_NATS_URL": self.nats_url,
            "INDEXER_DATABASE_URL": self.database_url,
            "INDEXER_HTTP_ADDR": f"127.0.0.1:{self.indexer_port}",
            **(self._checkpoint_env() if self.in_guild else {}),
        }

    @property
    def vouch_subject(self) -> str:
        """Where the signer asks the indexer to vouch for a checkpoint."""
        return f"cst.{self.operator}.vouch"

    def _checkpoint_env(self) -> dict[str, str]:
        """A guild member's indexer makes the guild's checkpoints with its signer."""
        return {
            "INDEXER_LAYOUT": str(self.layout_path),
            "INDEXER_PEERS": str(self.peers_path),
            "INDEXER_VOUCH_SUBJECT": self.vouch_subject,
            **self.signer_access_env("INDEXER_SIGNER"),
            **({"INDEXER_GUILD_PIN": self.guild_pin} if self.guild_pin else {}),
        }

    def signer_env(self, proc: SignerProc) -> dict[str, str]:
        return {
            **os.environ,
            "SIGNER_NATS_URL": self.nats_url,
            "SIGNER_MEMBERS": str(self.members_path),
            "SIGNER_STATE_DIR": proc.state_dir,
            "SIGNER_STORAGE_KEY": proc.storage_key,
            "SIGNER_CLIENT_KEYS": hostpubkey_gen(bytes.fromhex(proc.client_key)).hex(),
            "SIGNER_HTTP_ADDR": f"127.0.0.1:{proc.http_port}",
            **(
                {
                    "SIGNER_NAMES": ",".join(self.member_names),
                    "SIGNER_PEERS": str(self.peers_path),
                    "SIGNER_VOUCH_SUBJECT": self.vouch_subject,
                }
                if self.in_guild
                else {}
            ),
            "SIGNER_REQUEST_TIMEOUT_MS": str(self.request_timeout_ms),
        }

    # -- devnet.json (once a devnet is supervised, its supervisor is the only writer)

    def save(self) -> None:
        write_json_atomic(Path(self.dir) / STATE_FILE, asdict(self))

    @staticmethod
    def load(directory: Path) -> Devnet:
        try:
            doc = json.loads((directory / STATE_FILE).read_text())
        except FileNotFoundError:
            raise DevnetError(f"no devnet in {directory}: run `constellation devnet up`") from None
        signers = [SignerProc(**s) for s in doc.pop("signers")]
        workers = [WorkerProc(**w) for w in doc.pop("workers")]
        machines = [MachineProc(**m) for m in doc.pop("machines", [])]
        return Devnet(**doc, signers=signers, workers=workers, machines=machines)
