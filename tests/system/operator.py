"""A whole local operator of real processes for the ledger's system tests, and helpers."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

from constellation.keys import SigningKey
from constellation.sighash import sign_transaction
from constellation.tx import Transaction, TxInput, TxOutput, partition_of
from services import devnet
from services.api_client import Gateway


class Operator:
    """``devnet.up`` in a fresh folder (readable by PostgreSQL's user where tests run as
    root), with helpers to kill, freeze and restart workers.

    Unsupervised by default: the test itself kills, stops and restarts processes. With
    ``supervise``, the devnet's supervisor restarts what exits, and ``pid`` reads the
    current pids from ``devnet.json`` (which only the supervisor writes)."""

    def __init__(self, workers: int = 2, supervise: bool = False) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="cst-test-"))
        self.root.chmod(0o755)
        self.supervised = supervise
        self.net = devnet.up(self.root / "net", 0, "test", workers, supervise=supervise)
        self.frozen: set[int] = set()

    @property
    def url(self) -> str:
        return self.net.gateway_url

    def owner_of(self, coin_id: bytes) -> int:
        """The worker holding ``coin_id`` under the devnet's even map."""
        return partition_of(coin_id) * len(self.net.workers) // (1 << 16)

    def refresh(self) -> devnet.Devnet:
        """The devnet as its supervisor last recorded it (the pids of restarted processes)."""
        if self.supervised:
            self.net = devnet.Devnet.load(Path(self.net.dir))
        return self.net

    def pid(self, name: str) -> int:
        """The current pid of a process by its name (``worker-0``, ``gateway``, ``nats``)."""
        return self.refresh().pid_of(name)

    def worker_pid(self, i: int) -> int:
        return self.pid(f"worker-{i}")

    def status(self) -> devnet.DevnetStatus:
        return devnet.status(Path(self.net.dir))

    def wait_restarted(self, name: str, old_pid: int, deadline_s: float = 60) -> int:
        """The pid of ``name`` once the supervisor has restarted it and it is ready."""
        assert self.supervised, "nothing restarts a process of an unsupervised devnet"
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            pid = self.pid(name)
            if pid != old_pid and devnet.alive(pid) and self._ready(name):
                return pid
            time.sleep(0.05)
        raise AssertionError(f"{name} (pid {old_pid}) was not back after {deadline_s} s")

    def _ready(self, name: str) -> bool:
        port = self.http_port(name)
        return devnet.ready(port) if port else True

    def http_port(self, name: str) -> int:
        """The port of ``name``'s ops endpoints (0 for nats, redis, postgres)."""
        ports = {"gateway": self.net.gateway_port, "indexer": self.net.indexer_port}
        ports.update((f"worker-{w.index}", w.http_port) for w in self.net.workers)
        ports.update((f"signer-{s.index}", s.http_port) for s in self.net.signers)
        return ports.get(name, 0)

    def kill(self, i: int) -> None:
        pid = self.worker_pid(i)
        os.kill(pid, signal.SIGKILL)
        if not self.supervised:  # else the supervisor's child: it reaps it
            os.waitpid(pid, 0)

    def restart(self, i: int) -> None:
        assert not self.supervised, "the supervisor restarts the devnet's processes"
        devnet.start_worker(self.net, self.net.workers[i])
        self.net.save()  # so that `down` stops the new process

    def restart_gateway(self) -> None:
        """Stop the gateway and start it again (with the environment as it is now)."""
        assert not self.supervised, "the supervisor restarts the devnet's processes"
        devnet.stop_pid(self.net.gateway_pid, 10)
        devnet.start_gateway(self.net)
        self.net.save()

    @contextlib.contextmanager
    def gateway_settings(self, **settings: str) -> Iterator[None]:
        """Run the gateway with these ``GATEWAY_*`` settings, then as before."""
        try:
            with environment(settings):
                self.restart_gateway()
                yield
        finally:
            self.restart_gateway()

    @contextlib.contextmanager
    def worker_settings(self, i: int, **settings: str) -> Iterator[None]:
        """Run worker ``i`` with these ``WORKER_*`` settings, then as before."""
        try:
            with environment(settings):
                self.stop_worker(i)
                self.restart(i)
                yield
        finally:
            self.stop_worker(i)
            self.restart(i)

    def stop_worker(self, i: int) -> None:
        assert not self.supervised, "the supervisor would restart it"
        devnet.stop_pid(self.worker_pid(i), 10)

    def freeze(self, i: int) -> None:
        os.kill(self.worker_pid(i), signal.SIGSTOP)
        self.frozen.add(i)

    def thaw(self, i: int) -> None:
        os.kill(self.worker_pid(i), signal.SIGCONT)
        self.frozen.discard(i)

    def worker_log(self, i: int) -> str:
        return (Path(self.net.workers[i].state_dir) / "worker.log").read_text()

    def close(self) -> None:
        for i in list(self.frozen):
            with contextlib.suppress(ProcessLookupError):
                self.thaw(i)
        devnet.down(Path(self.net.dir), purge=True)
        with contextlib.suppress(OSError):
            self.root.rmdir()

    async def fund(
        self, gw: Gateway, key: SigningKey, value: int, worker: int | None = None
    ) -> bytes:
        """A new coin of ``value`` owned by ``key`` (on ``worker``, if given)."""
        while True:
            issuance = self.net.issuance([TxOutput(value, key.pubkey)])
            if worker is None or self.owner_of(issuance.output_ids[0]) == worker:
                break
        receipt = await gw.issue(issuance)
        assert receipt["status"] == "committed"
        return issuance.output_ids[0]


@contextlib.contextmanager
def environment(settings: dict[str, str]) -> Iterator[None]:
    """These environment variables (for the processes started meanwhile), then as before."""
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def pay(
    coins: list[tuple[bytes, int, SigningKey]], outputs: list[TxOutput], fee: int = 0
) -> Transaction:
    tx = Transaction([TxInput(c, v) for c, v, _ in coins], outputs, fee)
    return sign_transaction(tx, [k for _, _, k in coins])


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    ctype: str = "application/octet-stream",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with session.post(
        url, data=body, headers={"Content-Type": ctype, **(headers or {})}
    ) as resp:
        return resp.status, await resp.json(content_type=None), dict(resp.headers)
