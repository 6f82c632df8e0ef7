"""A real local guild for system tests and benchmarks: nats-server and signer processes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import signal
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from constellation.guild import SignTarget
from constellation.protocol import signer as proto
from services import devnet
from services.cli import main as cli_main
from services.signer.client import SignerClient, call
from services.signer.config import load_members
from services.signer.store import KeyStore

FAULTY = Path(__file__).with_name("faulty_signer.py")


class Guild:
    def __init__(
        self, directory: Path, n: int, faults: dict[int, str] | None, timeout_ms: int
    ) -> None:
        self.faults = faults or {}
        self.net = devnet.create(directory, n, "test", workers=0)
        self.net.request_timeout_ms = timeout_ms
        self.frozen: set[int] = set()
        devnet.start_nats(self.net)
        for proc in self.net.signers:
            self.start(proc.index)
        self.members = load_members(self.net.members_path)

    @property
    def n(self) -> int:
        return len(self.net.signers)

    def start(self, i: int, fault: str | None = None) -> None:
        fault = self.faults.get(i) if fault is None else fault
        argv = [sys.executable, str(FAULTY), fault] if fault else None
        devnet.start_signer(self.net, self.net.signers[i], argv)

    def identity(self, i: int) -> bytes:
        proc = self.net.signers[i]
        return KeyStore(Path(proc.state_dir), bytes.fromhex(proc.storage_key)).load_identity()

    async def keygen(self, t: int, operator: int = 0) -> proto.OpReply:
        return await call(
            self.net.nats_url, self.members, self.identity(operator), proto.KeygenRequest(t), 60
        )

    async def sign(self, target: SignTarget, operator: int = 0) -> proto.OpReply:
        return await call(
            self.net.nats_url, self.members, self.identity(operator), proto.SignRequest(target), 60
        )

    def client(self, operator: int = 0) -> SignerClient:
        return SignerClient(self.net.nats_url, self.members, self.identity(operator))

    def pid(self, i: int) -> int:
        return self.net.signers[i].pid

    def freeze(self, i: int) -> None:
        os.kill(self.pid(i), signal.SIGSTOP)
        self.frozen.add(i)

    def kill(self, i: int) -> None:
        os.kill(self.pid(i), signal.SIGKILL)
        os.waitpid(self.pid(i), 0)

    def stop(self, i: int) -> None:
        devnet.stop_pid(self.pid(i), 10)

    def http(self, i: int, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.net.signers[i].http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, i: int, name: str) -> float:
        _, text = self.http(i, "/metrics")
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def log(self, i: int) -> str:
        return (Path(self.net.signers[i].state_dir) / "signer.log").read_text()

    def close(self) -> None:
        for i in self.frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid(i), signal.SIGCONT)
        for proc in self.net.signers:
            devnet.stop_pid(proc.pid, 5)
        devnet.stop_pid(self.net.nats_pid, 5)


@contextlib.contextmanager
def local_guild(prefix: str) -> Iterator[Path]:
    """A local guild of 3 operators with 2 workers each (``services.devnet.guild``), up
    for the block, in a fresh directory."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)  # PostgreSQL runs as its own user where tests run as root
    devnet.guild.up(root / "g", 3, 2, "test")
    try:
        yield root / "g"
    finally:
        devnet.guild.down(root / "g")
        shutil.rmtree(root, ignore_errors=True)


async def cli(*argv: str) -> tuple[int, str]:
    """``constellation ARGV``, its exit code and what it printed."""

    def run() -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = cli_main(list(argv))
        return code, out.getvalue()

    return await asyncio.to_thread(run)
