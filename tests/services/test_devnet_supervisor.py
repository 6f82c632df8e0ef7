"""The devnet supervisor's restart policy and loop, on small throwaway processes with a
clock the test moves; ``devnet status`` of a devnet that is not running."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from services import devnet
from services.cli import main
from services.devnet.deps import clear_stale_lock
from services.devnet.procs import group_nice
from services.devnet.supervisor import Supervisor

POLICY = devnet.RestartPolicy(initial_s=1.0, max_s=8.0, reset_after_s=100.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_the_devnet_policy_is_kubernetes_scaled_down() -> None:
    k8s = devnet.KUBERNETES_POLICY
    assert (k8s.initial_s, k8s.max_s, k8s.reset_after_s) == (10.0, 300.0, 600.0)
    scaled = k8s.scaled(1 / 20)
    assert scaled == devnet.DEVNET_POLICY
    assert (scaled.initial_s, scaled.max_s, scaled.reset_after_s) == (0.5, 15.0, 30.0)
    delays = [devnet.DEVNET_POLICY.delay_s(n) for n in range(1, 9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    assert [k8s.delay_s(n) for n in range(1, 7)] == [10, 20, 40, 80, 160, 300]
    assert k8s.delay_s(10_000) == 300.0  # no overflow, however long it crash-loops
    with pytest.raises(AssertionError):
        k8s.delay_s(0)


class Procs:
    """Small processes started for a test; whatever runs at the end is stopped."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.pids: list[int] = []

    def start(
        self,
        name: str,
        argv: list[str],
        nice: int = 0,
        before: Callable[[], None] | None = None,
    ) -> devnet.Spec:
        log = self.folder / f"{name}.log"
        spec = devnet.Spec(name, argv, dict(os.environ), log, nice=nice, before=before)
        self.pids.append(devnet.launch(spec))
        return spec


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    made = Procs(tmp_path)
    yield made
    for pid in made.pids:
        devnet.stop_pid(pid, 2)


def tick_until(sup: Supervisor, done: Callable[[], bool], deadline_s: float = 10) -> None:
    """Tick (the test's clock stands still) until ``done``: real processes exit meanwhile."""
    end = time.monotonic() + deadline_s
    while not done():
        assert time.monotonic() < end, "the supervisor never got there"
        sup.tick()
        time.sleep(0.01)


def test_a_process_that_keeps_crashing_waits_longer_each_time(
    tmp_path: Path, procs: Procs, caplog: pytest.LogCaptureFixture
) -> None:
    spec = procs.start("crasher", ["sh", "-c", "exit 3"])
    clock = Clock()
    restarted: list[tuple[str, int]] = []
    status_path = tmp_path / devnet.STATUS_FILE
    sup = Supervisor(
        {"crasher": spec},
        {"crasher": procs.pids[0]},
        status_path,
        lambda name, pid: restarted.append((name, pid)),
        POLICY,
        clock,
    )
    w = sup.watched["crasher"]
    waits = []
    caplog.set_level(logging.INFO, "devnet-supervisor")
    for n in range(1, 6):
        tick_until(sup, lambda: w.restart_s is not None)
        assert w.last_exit == "exit 3" and w.exits_in_a_row == n
        waits.append(w.backoff_s)
        assert w.restart_s is not None
        clock.now = w.restart_s - 0.001
        sup.tick()
        assert w.restart_s is not None, "restarted before its backoff was over"
        clock.now += 0.001
        sup.tick()
        assert w.restart_s is None and w.restarts == n
        procs.pids.append(w.pid)
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert [pid for _, pid in restarted] == procs.pids[1:]
    # Up longer than reset_after_s: its exits in a row are forgotten.
    clock.now += POLICY.reset_after_s
    tick_until(sup, lambda: w.restart_s is not None)
    assert w.exits_in_a_row == 1 and w.backoff_s == 1.0
    # Each restart is one JSON-ready log record with what an operator needs.
    lines = [r for r in caplog.records if r.getMessage() == "restarted"]
    assert len(lines) == 5
    last = lines[-1].__dict__
    assert last["proc"] == "crasher" and last["exit"] == "exit 3"
    assert last["restarts"] == 5 and last["backoff_s"] == 8.0
    assert last["old_pid"] == procs.pids[-2] and last["pid"] == procs.pids[-1]
    doc = json.loads(status_path.read_text())
    assert doc["state"] == "running" and doc["processes"][0]["restarts"] == 5
    assert doc["processes"][0]["restart_at"] is not None  # waiting out its backoff


def test_a_killed_process_restarts_and_a_frozen_one_is_left_alone(
    tmp_path: Path, procs: Procs
) -> None:
    a = procs.start("a", ["sleep", "60"])
    b = procs.start("b", ["sleep", "60"])
    pid_a, pid_b = procs.pids
    clock = Clock()
    sup = Supervisor({"a": a, "b": b}, {"a": pid_a, "b": pid_b}, tmp_path / "s.json", clock=clock)
    os.kill(pid_a, signal.SIGKILL)
    os.kill(pid_b, signal.SIGSTOP)
    try:
        tick_until(sup, lambda: sup.watched["a"].restart_s is not None)
        clock.now += devnet.DEVNET_POLICY.initial_s
        sup.tick()
        new_a = sup.watched["a"].pid
        procs.pids.append(new_a)
        assert new_a != pid_a and devnet.alive(new_a) and not devnet.alive(pid_a)
        assert sup.watched["a"].last_exit == "SIGKILL" and sup.watched["a"].restarts == 1
        clock.now += 60
        sup.tick()
        assert sup.watched["b"].pid == pid_b and sup.watched["b"].restarts == 0
    finally:
        os.kill(pid_b, signal.SIGCONT)


def niceness(pid: int) -> tuple[int, int | None]:
    """(its own nice, its session's), once it runs ``sleep`` (after the fork and ``nice``)."""
    end = time.monotonic() + 5
    while not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep\0"):
        assert time.monotonic() < end, "the program never ran"
        time.sleep(0.01)
    return os.getpriority(os.PRIO_PROCESS, pid), group_nice(pid)


def test_a_yielding_process_yields_as_a_session_too_and_after_a_restart(
    tmp_path: Path, procs: Procs
) -> None:
    """A devnet process leads its own session; where the kernel shares CPU between
    sessions first (autogroup), its nice alone changed nothing against other sessions
    (the indexers took as much CPU as the ledger's machines)."""
    low = procs.start("low", ["sleep", "60"], nice=10)
    plain = procs.start("plain", ["sleep", "60"])
    grouped = Path("/proc/self/autogroup").exists()
    assert niceness(procs.pids[0]) == (10, 10 if grouped else None)
    assert niceness(procs.pids[1]) == (0, 0 if grouped else None)
    clock = Clock()
    sup = Supervisor(
        {"low": low, "plain": plain},
        {"low": procs.pids[0], "plain": procs.pids[1]},
        tmp_path / "s.json",
        clock=clock,
    )
    os.kill(procs.pids[0], signal.SIGKILL)
    tick_until(sup, lambda: sup.watched["low"].restart_s is not None)
    clock.now += devnet.DEVNET_POLICY.initial_s
    sup.tick()
    again = sup.watched["low"].pid
    procs.pids.append(again)
    assert again != procs.pids[0] and niceness(again) == (10, 10 if grouped else None)


def test_what_a_process_left_is_cleared_before_its_start_and_each_restart(
    tmp_path: Path, procs: Procs
) -> None:
    """A server that crashed can leave what its next start trips over (PostgreSQL: its
    lock and its backends, ``clear_stale_lock``): a spec's ``before`` runs before the
    first start and before each restart by the supervisor."""
    cleared: list[float] = []
    spec = procs.start("server", ["sleep", "60"], before=lambda: cleared.append(time.monotonic()))
    assert len(cleared) == 1
    clock = Clock()
    sup = Supervisor({"server": spec}, {"server": procs.pids[0]}, tmp_path / "s.json", clock=clock)
    os.kill(procs.pids[0], signal.SIGKILL)
    tick_until(sup, lambda: sup.watched["server"].restart_s is not None)
    assert len(cleared) == 1  # not while it waits out its backoff
    clock.now += devnet.DEVNET_POLICY.initial_s
    sup.tick()
    procs.pids.append(sup.watched["server"].pid)
    assert len(cleared) == 2 and procs.pids[1] != procs.pids[0]


def test_the_supervisor_module_refuses_anything_but_supervise() -> None:
    code = os.spawnv(os.P_WAIT, sys.executable, [sys.executable, "-m", "services.devnet"])
    assert code == 2


def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


def test_status_of_a_devnet_that_is_not_running(tmp_path: Path) -> None:
    net = devnet.create(tmp_path / "net", 0, "g", workers=2)
    st = devnet.status(Path(net.dir))
    assert st.supervisor == "none" and not st.healthy
    names = [p.name for p in st.processes]
    assert names == ["nats", "redis", "postgres", "worker-0", "worker-1", "gateway", "indexer"]
    assert all(p.state == "down" and p.restarts == 0 for p in st.processes)
    code, out = cli("devnet", "status", "--dir", net.dir)
    assert code == 1 and "not supervised" in out and "worker-1" in out
    code, out = cli("devnet", "status", "--json", "--dir", net.dir)
    doc = json.loads(out)
    assert code == 1 and doc["supervisor"] == "none" and len(doc["processes"]) == 7
    assert cli("devnet", "status", "--dir", str(tmp_path / "none"))[0] == 2


def test_a_postmaster_lock_is_cleared_only_where_its_server_is_gone(tmp_path: Path) -> None:
    """After an operator's power loss its PostgreSQL left ``postmaster.pid`` behind (a
    killed server nobody reaped reads as running to PostgreSQL): the devnet removes the
    lock of a server that is gone, waits for one still exiting, and keeps one of a live
    process."""
    lock = tmp_path / "postmaster.pid"
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock.write_text(f"{gone.pid}\n/data\n1700000000\n5432\n")
    clear_stale_lock(tmp_path)
    assert not lock.exists()
    exiting = subprocess.Popen(["sleep", "0.5"])
    lock.write_text(f"{exiting.pid}\n/data\n")
    clear_stale_lock(tmp_path, wait_s=10)
    assert not lock.exists() and exiting.poll() is not None
    lock.write_text(f"{os.getpid()}\n/data\n")
    clear_stale_lock(tmp_path, wait_s=0.3)
    assert lock.exists()


def test_a_gone_server_s_lock_goes_but_no_other_program_in_its_folder(tmp_path: Path) -> None:
    """The devnet stops the backends a killed postmaster left running in its data
    directory (tests/system/test_devnet_supervisor.py, with a real server), and nothing
    else working there: a shell someone left in that folder lives on."""
    data = tmp_path / "postgres"
    data.mkdir()
    lock = data / "postmaster.pid"
    shell = subprocess.Popen(["sleep", "60"], cwd=data, start_new_session=True)
    try:
        gone = subprocess.Popen(["true"])
        gone.wait()
        lock.write_text(f"{gone.pid}\n{data}\n")
        clear_stale_lock(data)
        assert not lock.exists() and shell.poll() is None
    finally:
        shell.kill()
        shell.wait()


def test_a_process_that_outlives_its_grace_is_killed_and_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stop that waited out a whole grace says which process it waited for (an
    operator's stop, an election measured after it: 10 s more, and why)."""
    stubborn = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 60"], start_new_session=True)
    time.sleep(0.2)  # its trap is set
    with caplog.at_level(logging.WARNING, logger="devnet"):
        devnet.stop_pid(stubborn.pid, 0.3)
    assert stubborn.poll() is not None
    [said] = [r.getMessage() for r in caplog.records if r.name == "devnet"]
    assert f"pid {stubborn.pid} (sh -c trap '' TERM; sleep 60) not stopped in 0.3 s" in said
