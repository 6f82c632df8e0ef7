"""Processes on this machine: how one is started (a ``Spec``), watched and stopped."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.devnet.state import DevnetError

KILLED_WITHIN_S = 5.0  # how long stop_pid waits for a SIGKILLed process to be gone

log = logging.getLogger("devnet")


@dataclass(frozen=True)
class Spec:
    """How to start one process: the same for its first start and for every restart."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    user: str | None = None
    nice: int = 0  # above 0: it yields the cores it shares to processes at 0
    before: Callable[[], None] | None = None  # run before each start: what a last one left


# Our children, held so that the subprocess module's own clean-up (which reaps the
# children of dropped Popen objects) never takes an exit status that the supervisor reads.
_children: dict[int, subprocess.Popen[bytes]] = {}


# Ports handed to the devnet's servers come from below the kernel's ephemeral range
# (32768-60999 on Linux), where outgoing connections take their local ports: a port
# chosen there may be taken by a client before its server starts.
PORTS = range(20_000, 32_768)
_handed: set[int] = set()  # by this process: not handed out twice


def free_port() -> int:
    """A port nothing listens on now, outside the ephemeral range, and not handed out
    before by this process."""
    for _ in range(1000):
        port = random.choice(PORTS)
        if port in _handed:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed.add(port)
        return port
    raise DevnetError("no free port found")


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
    _children[proc.pid] = proc
    return proc.pid


def launch(spec: Spec) -> int:
    if spec.before is not None:
        spec.before()
    if not spec.nice:
        return spawn(spec.argv, spec.env, spec.log_path, spec.user)
    argv = ["nice", "-n", str(spec.nice), *spec.argv]
    pid = spawn(argv, spec.env, spec.log_path, spec.user)
    set_group_nice(pid, spec.nice)
    return pid


def set_group_nice(pid: int, nice: int) -> None:
    """Give the session ``pid`` leads the scheduling weight of ``nice``. Where the kernel
    groups processes by session (autogroup, on in most distributions' kernels), CPU is
    shared between sessions first, and a process's own nice weighs it only against its
    own session: a process alone in its session (every devnet process) would take as
    much as any other, its nice ignored. Nothing to do where the kernel has no
    autogroup (the file is absent), has it off (the value is kept, and unused) or does
    not let us (the process then keeps only its own nice)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/autogroup").write_text(f"{nice}\n")


def group_nice(pid: int) -> int | None:
    """The nice of the session ``pid`` is in (``set_group_nice``); None without autogroup."""
    try:
        return int(Path(f"/proc/{pid}/autogroup").read_text().split()[-1])
    except (FileNotFoundError, ProcessLookupError):
        return None


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (started by any of its threads)."""
    return pids_where(lambda proc: f"\nPPid:\t{pid}\n" in (proc / "status").read_text())


def pids_where(test: Callable[[Path], bool]) -> list[int]:
    """The processes whose ``/proc`` folder ``test`` accepts; one gone meanwhile, or not
    this user's to read, is not."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if test(entry):
                    found.append(int(entry.name))
    return found


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` from the third (the state) on; None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_state(pid: int) -> str | None:
    """The kernel's one-letter state (R, S, D, T for stopped, Z for a zombie), or None."""
    fields = _stat(pid) if pid > 0 else None
    return fields[0] if fields else None


def cpu_seconds(pid: int) -> float:
    """The CPU ``pid`` has used so far, user and system (0 once it is gone)."""
    fields = _stat(pid) if pid > 0 else None
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def started_at(pid: int) -> float | None:
    """When ``pid`` started, in Unix seconds (None if it is gone)."""
    fields = _stat(pid) if pid > 0 else None
    if fields is None:
        return None
    boot_s = 0
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            boot_s = int(line.split()[1])
    return boot_s + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime


def alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie counts as gone: one of ours is reaped here, another waits for its parent.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return proc_state(pid) not in (None, "Z", "X")
    if done:
        _children.pop(pid, None)
    return done == 0


def describe_exit(status: int) -> str:
    """A wait status as ``exit 3`` or the signal's name (``SIGKILL``)."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return signal.Signals(number).name
        except ValueError:
            return f"signal {number}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


def poll_exit(pid: int) -> str | None:
    """None while ``pid`` runs (a stopped process runs); once it has ended, how it ended
    (``describe_exit``), or ``unknown`` for a process that is not our child."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None if alive(pid) else "unknown"
    if done == 0:
        return None
    _children.pop(pid, None)
    return describe_exit(status)


def wait_tcp(port: int, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise DevnetError(f"nothing listens on port {port} after {deadline_s} s")


def ready(port: int, probe: str = "readyz") -> bool:
    """Whether the process serving ops on ``port`` answers ``/readyz`` (or another
    ``probe``) with 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/{probe}", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def wait_ready(port: int, pid: int, deadline_s: float, probe: str = "readyz") -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if not alive(pid):
            raise DevnetError(f"process {pid} exited during start")
        if ready(port, probe):
            return
        time.sleep(0.05)
    raise DevnetError(f"process {pid} did not answer /{probe} within {deadline_s} s")


def wait_up(port: int, pid: int, deadline_s: float) -> None:
    """Wait until the process answers ``/healthz``: it runs, whether or not it is ready."""
    wait_ready(port, pid, deadline_s, "healthz")


def stop_pid(pid: int, grace_s: float, sig: signal.Signals = signal.SIGTERM) -> None:
    """Send ``sig``, and SIGKILL after ``grace_s``; returns once ``pid`` is gone."""
    if not alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
        os.kill(pid, signal.SIGCONT)  # a frozen (SIGSTOP) process handles ``sig`` too
    end = time.monotonic() + grace_s
    while time.monotonic() < end:
        if not alive(pid):
            return
        time.sleep(0.02)
    # Said, with what it was: whatever waits on this stop waited out the whole grace.
    with contextlib.suppress(OSError):
        what = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120].decode()
        log.warning("pid %d (%s) not stopped in %g s: killed", pid, what.strip(), grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + KILLED_WITHIN_S
    while alive(pid) and time.monotonic() < end:
        time.sleep(0.02)
