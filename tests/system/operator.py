"""A whole local operator of real processes for the ledger's system tests, and helpers."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

from constellation.keys import SigningKey
from constellation.sighash import sign_transaction
from constellation.tx import Transaction, TxInput, TxOutput, partition_of
from services import devnet
from services.wallet import Gateway


class Operator:
    """``devnet.up`` in a fresh folder (readable by PostgreSQL's user where tests run as
    root), with helpers to kill, freeze and restart workers."""

    def __init__(self, workers: int = 2) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="cst-test-"))
        self.root.chmod(0o755)
        self.net = devnet.up(self.root / "net", 0, "test", workers)
        self.frozen: set[int] = set()

    @property
    def url(self) -> str:
        return self.net.gateway_url

    def owner_of(self, coin_id: bytes) -> int:
        """The worker holding ``coin_id`` under the devnet's even map."""
        return partition_of(coin_id) * len(self.net.workers) // (1 << 16)

    def worker_pid(self, i: int) -> int:
        return self.net.workers[i].pid

    def kill(self, i: int) -> None:
        os.kill(self.worker_pid(i), signal.SIGKILL)
        os.waitpid(self.worker_pid(i), 0)

    def restart(self, i: int) -> None:
        devnet.start_worker(self.net, self.net.workers[i])
        self.net.save()  # so that `down` stops the new process

    def restart_gateway(self) -> None:
        """Stop the gateway and start it again (with the environment as it is now)."""
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
