"""The devnet's supervisor: one detached process per devnet that starts the others and
restarts any that exits, with exponential backoff, until ``devnet down`` stops it.

The restart policy is Kubernetes' own (a pod with ``restartPolicy: Always``: the kubelet
waits 10 s after the first exit, doubling on each exit in a row up to 5 min, and forgets
the exits once the container has run for 10 min), scaled down twentyfold for a devnet
whose processes start in a second. The same policy, unscaled, is what Kubernetes applies
to these processes once the Helm chart runs them.

The supervisor is the only writer of a supervised devnet's ``devnet.json`` (the current
pids) and of ``supervisor.json`` (restarts, last exits, backoff), both replaced whole.
Its log, ``supervisor.log``, has one JSON line per exit and per restart.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from services.devnet.deps import machine_spec, specs, start_all, start_machine, stop_all
from services.devnet.procs import (
    Spec,
    alive,
    free_port,
    launch,
    poll_exit,
    proc_state,
    spawn,
    stop_pid,
)
from services.devnet.procs import started_at as process_started_at
from services.devnet.state import Devnet, DevnetError, MachineProc, write_json_atomic
from services.runtime import configure_logging

STATUS_FILE = "supervisor.json"
MACHINES_FILE = "machines.json"  # the machines asked for (``follow_machines``)
LOG_FILE = "supervisor.log"
POLL_S = 0.1  # how soon an exit is noticed
SUPERVISOR_START_S = 10  # its own start, before it starts the devnet's processes
SUPERVISOR_STOP_S = 10

log = logging.getLogger("devnet-supervisor")


@dataclass(frozen=True)
class RestartPolicy:
    """Exponential backoff between restarts of a process that keeps exiting."""

    initial_s: float  # the wait before the first restart
    max_s: float  # the longest wait
    reset_after_s: float  # a process up this long has its exits in a row forgotten

    def delay_s(self, exits_in_a_row: int) -> float:
        """The wait before restarting a process that has exited ``exits_in_a_row`` times
        (1 for the first exit) without staying up ``reset_after_s`` in between."""
        assert exits_in_a_row >= 1, exits_in_a_row
        return min(self.max_s, self.initial_s * 2.0 ** min(exits_in_a_row - 1, 32))

    def scaled(self, factor: float) -> RestartPolicy:
        return RestartPolicy(
            self.initial_s * factor, self.max_s * factor, self.reset_after_s * factor
        )


KUBERNETES_POLICY = RestartPolicy(initial_s=10.0, max_s=300.0, reset_after_s=600.0)
DEVNET_SCALE = 1 / 20
DEVNET_POLICY = KUBERNETES_POLICY.scaled(DEVNET_SCALE)  # 0.5 s doubling to 15 s; reset: 30 s


@dataclass
class Watched:
    """One supervised process, as the supervisor sees it."""

    spec: Spec
    pid: int
    started_s: float  # on the supervisor's clock
    restarts: int = 0
    exits_in_a_row: int = 0
    last_exit: str | None = None  # "exit 3", "SIGKILL", "unknown"
    last_exit_at: float | None = None  # Unix seconds
    backoff_s: float = 0.0
    restart_s: float | None = None  # while it is down: when it restarts, supervisor's clock
    restart_at: float | None = None  # the same in Unix seconds, for `devnet status`


class Supervisor:
    """Watches processes (its children: their exit status is read as they are reaped) and
    restarts each that exits from its ``Spec`` after the policy's backoff.

    ``restarted(name, pid)`` is called after each restart, before the status file is
    written. Clocks are injected for tests."""

    def __init__(
        self,
        procs: Mapping[str, Spec],
        pids: Mapping[str, int],
        status_path: Path,
        restarted: Callable[[str, int], None] = lambda name, pid: None,
        policy: RestartPolicy = DEVNET_POLICY,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        assert procs.keys() == pids.keys(), "a supervised process without a spec or a pid"
        self.policy = policy
        self.status_path = status_path
        self.restarted = restarted
        self.clock = clock
        self.wall = wall
        now = clock()
        self.watched = {name: Watched(spec, pids[name], now) for name, spec in procs.items()}
        self.since = wall()

    def add(self, name: str, spec: Spec, pid: int) -> None:
        """Watch a process started since (a machine added)."""
        assert name not in self.watched, f"{name} is watched already"
        self.watched[name] = Watched(spec, pid, self.clock())
        self.write("running")
        log.info("watching", extra={"proc": name, "pid": pid})

    def remove(self, name: str) -> None:
        """Stop a process and watch it no more (a machine removed)."""
        w = self.watched.pop(name)
        stop_pid(w.pid, SUPERVISOR_STOP_S)
        self.write("running")
        log.info("removed", extra={"proc": name, "pid": w.pid})

    def tick(self) -> None:
        """Notice exits and make the restarts that are due; write the status on a change."""
        now = self.clock()
        changed = False
        for name, w in self.watched.items():
            if w.restart_s is None:
                how = poll_exit(w.pid)
                if how is not None:
                    self._exited(name, w, how, now)
                    changed = True
            elif now >= w.restart_s:
                self._restart(name, w, now)
                changed = True
        if changed:
            self.write("running")

    def run(self, stop: threading.Event, each: Callable[[], None] = lambda: None) -> None:
        """Supervise until ``stop`` is set (the processes are left running), calling
        ``each`` after every look."""
        self.write("running")
        log.info(
            "supervising",
            extra={"procs": list(self.watched), "policy": asdict(self.policy)},
        )
        while not stop.wait(POLL_S):
            self.tick()
            each()
        self.write("stopped")
        log.info("stopped")

    def _exited(self, name: str, w: Watched, how: str, now: float) -> None:
        up_s = now - w.started_s
        if up_s >= self.policy.reset_after_s:
            w.exits_in_a_row = 0
        w.exits_in_a_row += 1
        w.backoff_s = self.policy.delay_s(w.exits_in_a_row)
        w.restart_s = now + w.backoff_s
        w.last_exit, w.last_exit_at = how, self.wall()
        w.restart_at = w.last_exit_at + w.backoff_s
        log.warning(
            "exited",
            extra={
                "proc": name,
                "pid": w.pid,
                "exit": how,
                "up_s": round(up_s, 3),
                "restart_in_s": w.backoff_s,
                "exits_in_a_row": w.exits_in_a_row,
            },
        )

    def _restart(self, name: str, w: Watched, now: float) -> None:
        old_pid = w.pid
        try:
            pid = launch(w.spec)
        except OSError as exc:  # e.g. its binary is gone: try again, later each time
            w.exits_in_a_row += 1
            w.backoff_s = self.policy.delay_s(w.exits_in_a_row)
            w.restart_s = now + w.backoff_s
            w.restart_at = self.wall() + w.backoff_s
            log.error(
                "restart failed",
                extra={"proc": name, "error": str(exc), "restart_in_s": w.backoff_s},
            )
            return
        w.pid, w.started_s, w.restart_s, w.restart_at = pid, now, None, None
        w.restarts += 1
        self.restarted(name, pid)
        log.warning(
            "restarted",
            extra={
                "proc": name,
                "old_pid": old_pid,
                "exit": w.last_exit,
                "pid": pid,
                "restarts": w.restarts,
                "backoff_s": w.backoff_s,
            },
        )

    def write(self, state: str) -> None:
        procs = [
            {
                "name": name,
                "pid": w.pid,
                "restarts": w.restarts,
                "exits_in_a_row": w.exits_in_a_row,
                "last_exit": w.last_exit,
                "last_exit_at": w.last_exit_at,
                "backoff_s": w.backoff_s,
                "restart_at": w.restart_at,
            }
            for name, w in self.watched.items()
        ]
        _write_status(self.status_path, state, since=self.since, procs=procs, policy=self.policy)


def _write_status(
    path: Path,
    state: str,
    error: str | None = None,
    since: float | None = None,
    procs: list[dict[str, Any]] | None = None,
    policy: RestartPolicy = DEVNET_POLICY,
) -> None:
    doc = {
        "pid": os.getpid(),
        "state": state,  # starting, running, failed or stopped
        "error": error,
        "since": since,
        "policy": asdict(policy),
        "processes": procs or [],
    }
    write_json_atomic(path, doc)


def read_status(directory: Path) -> dict[str, Any] | None:
    """The supervisor's ``supervisor.json``, or None for a devnet never supervised."""
    try:
        doc: dict[str, Any] = json.loads((directory / STATUS_FILE).read_text())
    except FileNotFoundError:
        return None
    return doc


# -- the supervisor process


class Stopping(Exception):
    """SIGTERM while the devnet's processes start."""


def _stopping(_signum: int, _frame: FrameType | None) -> None:
    raise Stopping("stopped while starting")


def main(directory: Path) -> int:
    """``python -m services.devnet supervise DIR``: start the devnet's processes as ``up``
    does, then keep them running until SIGTERM (which leaves them running: ``down`` stops
    them once the supervisor is gone)."""
    configure_logging("devnet-supervisor")
    signal.signal(signal.SIGTERM, _stopping)
    path = directory / STATUS_FILE
    net = Devnet.load(directory)
    _write_status(path, "starting")
    log.info("starting", extra={"dir": net.dir, "procs": [name for name, _ in net.processes()]})
    stop = threading.Event()
    try:
        start_all(net, net.save)
        net.save()

        def restarted(name: str, pid: int) -> None:
            net.set_pid(name, pid)
            net.save()

        supervisor = Supervisor(specs(net), dict(net.processes()), path, restarted)
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    except Exception as exc:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # clean up first
        expected = isinstance(exc, DevnetError | Stopping)  # no traceback for these
        error = str(exc) if expected else repr(exc)
        log.error("start failed", extra={"error": error}, exc_info=not expected)
        net.save()
        stop_all(net)
        _write_status(path, "failed", error)
        return 1
    supervisor.run(stop, functools.partial(follow_machines, net, supervisor))
    return 0


def want_machines(directory: Path, machines: int) -> None:
    """Ask a devnet's supervisor to run ``machines`` machines (``follow_machines``)."""
    write_json_atomic(directory / MACHINES_FILE, {"machines": machines})


def follow_machines(net: Devnet, supervisor: Supervisor) -> None:
    """Start the machines asked for beyond those running (the next numbers), or stop
    the highest beyond those asked for: ``devnet machines`` asks once their copies have
    moved off (``services.devnet.guild.set_machines``)."""
    path = Path(net.dir) / MACHINES_FILE
    try:
        wanted = int(json.loads(path.read_text())["machines"])
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("machines file unreadable", extra={"error": str(exc)})
        path.unlink(missing_ok=True)
        return
    while len(net.machines) < wanted:
        index = len(net.machines)
        proc = MachineProc(index, str(Path(net.dir) / f"machine-{index}"), free_port())
        try:
            start_machine(net, proc)
        except DevnetError as exc:
            log.error("machine not started", extra={"machine": index, "error": str(exc)})
            stop_pid(proc.pid, SUPERVISOR_STOP_S)
            path.unlink(missing_ok=True)
            return
        net.machines.append(proc)
        supervisor.add(f"machine-{index}", machine_spec(net, proc), proc.pid)
        net.save()
    while len(net.machines) > wanted:
        proc = net.machines.pop()
        supervisor.remove(f"machine-{proc.index}")
        net.save()
    path.unlink()


def launch_supervisor(directory: Path, start_s: float) -> int:
    """Start the supervisor of the devnet in ``directory``; returns its pid once every
    process is ready (``start_s``: how long their starts may take)."""
    pid = spawn_supervisor(directory)
    await_supervisor(directory, pid, start_s)
    return pid


def spawn_supervisor(directory: Path) -> int:
    """Start the supervisor of the devnet in ``directory`` (``await_supervisor`` waits)."""
    argv = [sys.executable, "-m", "services.devnet", "supervise", str(directory)]
    return spawn(argv, dict(os.environ), directory / LOG_FILE)


def await_supervisor(directory: Path, pid: int, start_s: float) -> None:
    """Wait until supervisor ``pid`` has started every process; raise if it could not."""
    log_path = directory / LOG_FILE
    end = time.monotonic() + SUPERVISOR_START_S + start_s
    while True:
        doc = read_status(directory)
        if doc is not None and doc["pid"] == pid and doc["state"] != "starting":
            break
        if not alive(pid):
            raise DevnetError(f"the devnet's supervisor exited during start: see {log_path}")
        if time.monotonic() > end:
            raise DevnetError(f"the devnet was not up after {start_s} s: see {log_path}")
        time.sleep(0.05)
    if doc["state"] != "running":
        raise DevnetError(f"{doc['error']} (see {log_path})")


def _is_supervisor(pid: int) -> bool:
    """Whether ``pid`` runs a devnet supervisor (not a stranger that reuses a stale pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"services.devnet\0supervise\0" in cmdline


def stop_supervisor(directory: Path) -> None:
    """Stop the devnet's supervisor, if it runs, so that nothing restarts meanwhile."""
    doc = read_status(directory)
    if doc is not None and alive(doc["pid"]) and _is_supervisor(doc["pid"]):
        stop_pid(doc["pid"], SUPERVISOR_STOP_S)


def supervisor_alive(directory: Path) -> bool:
    doc = read_status(directory)
    return doc is not None and alive(doc["pid"]) and _is_supervisor(doc["pid"])


# -- what `devnet status` shows


@dataclass(frozen=True)
class ProcessStatus:
    name: str
    pid: int
    state: str  # up, frozen (SIGSTOP: alive, never restarted), restarting, or down
    restarts: int
    last_exit: str | None  # "exit 3", "SIGKILL", "unknown"; None if it never exited
    up_since: float | None  # Unix seconds, while it runs
    restart_in_s: float | None  # while it waits out its backoff


@dataclass(frozen=True)
class DevnetStatus:
    dir: str
    guild: str
    supervisor_pid: int  # 0: not supervised
    supervisor: str  # running, starting, stopped, failed, dead (killed), or none
    policy: RestartPolicy
    processes: list[ProcessStatus]

    @property
    def healthy(self) -> bool:
        return all(p.state in ("up", "frozen") for p in self.processes)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def status(directory: Path) -> DevnetStatus:
    """Each process of the devnet in ``directory``: pid, state, restarts, last exit."""
    net = Devnet.load(directory)
    doc = read_status(directory)
    sup_pid = doc["pid"] if doc is not None else 0
    if doc is None:
        sup_state = "none"
    elif supervisor_alive(directory) or doc["state"] in ("stopped", "failed"):
        sup_state = doc["state"]
    else:
        sup_state = "dead"
    records = {p["name"]: p for p in doc["processes"]} if doc is not None else {}
    now = time.time()
    found = []
    for name, pid in net.processes():
        record = records.get(name, {})
        kernel_state = proc_state(pid)
        restart_at = record.get("restart_at")
        restart_in_s = None
        if kernel_state in ("T", "t"):
            state = "frozen"
        elif kernel_state not in (None, "Z", "X"):
            state = "up"
        elif restart_at is not None and sup_state == "running":
            state, restart_in_s = "restarting", max(0.0, restart_at - now)
        else:
            state = "down"
        up_since = process_started_at(pid) if state in ("up", "frozen") else None
        found.append(
            ProcessStatus(
                name,
                pid,
                state,
                record.get("restarts", 0),
                record.get("last_exit"),
                up_since,
                restart_in_s,
            )
        )
    policy = RestartPolicy(**doc["policy"]) if doc is not None else DEVNET_POLICY
    return DevnetStatus(net.dir, net.guild, sup_pid, sup_state, policy, found)
