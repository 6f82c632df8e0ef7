"""A local operator on this machine, no Docker: nats-server, Redis, PostgreSQL, the
partition workers, the gateway, the indexer, and one signer per guild member.

``up`` creates what is missing (identity keys, the guild file, storage keys, the issuer
key, the database), publishes the partition map, starts the processes detached, waits
until each is ready, and records it all in ``devnet.json``. By default a supervisor
(``supervisor.py``) starts them and restarts any that exits, with Kubernetes' backoff
scaled down; ``status`` shows each process's pid, state, restarts and last exit.
``down`` stops the supervisor first, then sends each process SIGTERM (SIGKILL after a
grace period). State survives ``down``/``up``; ``down --purge`` deletes it. The storage
and issuer keys of a devnet live in its ``devnet.json``: a real operator's come from a
secret store.

``state.py`` is what a devnet is, ``procs.py`` how a process is started, watched and
stopped, ``deps.py`` each of the devnet's processes, ``supervisor.py`` the supervisor.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from services.devnet.deps import (
    assign_ports,
    create,
    nats_server_binary,
    pg_binary,
    publish_partition_map,
    specs,
    start_all,
    start_deadline_s,
    start_gateway,
    start_indexer,
    start_nats,
    start_postgres,
    start_redis,
    start_signer,
    start_worker,
    stop_all,
)
from services.devnet.procs import (
    Spec,
    alive,
    child_pids,
    free_port,
    launch,
    poll_exit,
    ready,
    spawn,
    stop_pid,
    wait_ready,
    wait_tcp,
)
from services.devnet.state import STATE_FILE, Devnet, DevnetError, SignerProc, WorkerProc
from services.devnet.supervisor import (
    DEVNET_POLICY,
    KUBERNETES_POLICY,
    LOG_FILE,
    STATUS_FILE,
    DevnetStatus,
    ProcessStatus,
    RestartPolicy,
    launch_supervisor,
    read_status,
    status,
    stop_supervisor,
    supervisor_alive,
)

__all__ = [
    "DEVNET_POLICY",
    "KUBERNETES_POLICY",
    "LOG_FILE",
    "STATE_FILE",
    "STATUS_FILE",
    "Devnet",
    "DevnetError",
    "DevnetStatus",
    "ProcessStatus",
    "RestartPolicy",
    "SignerProc",
    "Spec",
    "WorkerProc",
    "alive",
    "child_pids",
    "create",
    "down",
    "free_port",
    "launch",
    "nats_server_binary",
    "pg_binary",
    "pids",
    "poll_exit",
    "publish_partition_map",
    "read_status",
    "ready",
    "spawn",
    "specs",
    "start_gateway",
    "start_indexer",
    "start_nats",
    "start_postgres",
    "start_redis",
    "start_signer",
    "start_worker",
    "status",
    "stop_pid",
    "up",
    "wait_ready",
    "wait_tcp",
]


def pids(net: Devnet) -> list[int]:
    return [pid for _, pid in net.processes()]


def up(
    directory: Path, signers: int, guild: str, workers: int = 2, supervise: bool = True
) -> Devnet:
    """Start the devnet in ``directory`` (creating it the first time); with ``supervise``,
    under a supervisor that restarts a process that exits. Returns once all are ready."""
    if (directory / STATE_FILE).exists():
        net = Devnet.load(directory)
        if any(alive(p) for p in pids(net)) or supervisor_alive(directory):
            raise DevnetError(f"the devnet in {directory} is running: `devnet down` first")
    else:
        net = create(directory, signers, guild, workers)
    assign_ports(net)
    net.save()
    (directory / STATUS_FILE).unlink(missing_ok=True)  # the restarts of an earlier run
    try:
        if supervise:
            launch_supervisor(Path(net.dir), start_deadline_s(net))
            return Devnet.load(directory)
        start_all(net)
    except BaseException:
        if not supervise:
            net.save()
        down(directory)
        raise
    net.save()
    return net


def down(directory: Path, purge: bool = False) -> None:
    """Stop the supervisor, then every process (as the supervisor last recorded them)."""
    stop_supervisor(directory)
    stop_all(Devnet.load(directory))
    if purge:
        shutil.rmtree(directory)
