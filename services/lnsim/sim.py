"""A simulated Lightning network with every node's lightningd socket served: what tests
and the local guild start (``python -m services.lnsim`` runs one as a service)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

from services.lnsim.network import VERSION, Channel, Network
from services.lnsim.rpc import Changes, NodeServer


def socket_path(directory: Path, node: str, chain: str = "regtest") -> Path:
    """lightningd's layout: ``<lightning-dir>/<network>/lightning-rpc``."""
    return directory / node / chain / "lightning-rpc"


class Simulator:
    def __init__(
        self,
        directory: Path,
        seed: int = 0,
        clock: Callable[[], float] = time.time,
        version: str = VERSION,
    ) -> None:
        self.directory = directory
        self.network = Network(clock, seed)
        self.changes = Changes()
        self.network.listeners.append(self.changes.notify)
        self.version = version
        self.servers: dict[str, NodeServer] = {}

    async def add_node(self, name: str, fund_sat: int = 0) -> NodeServer:
        self.network.add_node(name)
        if fund_sat:
            self.network.fund(name, fund_sat)
        server = self._server(name)
        await server.start()
        return server

    def _server(self, name: str) -> NodeServer:
        path = socket_path(self.directory, name, self.network.chain)
        server = self.servers[name] = NodeServer(
            self.network, name, path, self.changes, self.version
        )
        return server

    async def restore(self, path: Path) -> None:
        """The network as ``Network.save`` left it in ``path`` (on this simulator's
        clock), each node's socket served again, but an offline node's."""
        self.network = Network.load(path, self.network.clock)
        self.network.listeners.append(self.changes.notify)
        for name, node in self.network.nodes.items():
            server = self._server(name)
            if not node.faults.offline:
                await server.start()

    def open_channel(self, a: str, b: str, sat: int, push_msat: int = 0) -> Channel:
        """A channel funded by ``a``, usable once the next block confirms it (mined
        here)."""
        ch = self.network.fundchannel(a, b, sat, push_msat)
        self.network.mine(1)
        return ch

    async def mesh(self, names: Iterable[str], sat: int, fund_sat: int) -> None:
        """Nodes ``names``, each funded on-chain, with a channel between every pair
        (balanced: half pushed to the other side)."""
        names = list(names)
        for name in names:
            await self.add_node(name, fund_sat)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                self.open_channel(a, b, sat, sat * 1000 // 2)

    async def join(self, name: str, sat: int, fund_sat: int) -> NodeServer:
        """A node that joins the network: funded on-chain, it opens a balanced channel of
        ``sat`` to every node already in it (an operator that joins a guild)."""
        others = list(self.servers)
        server = await self.add_node(name, fund_sat)
        for other in others:
            self.open_channel(name, other, sat, sat * 1000 // 2)
        return server

    async def set_online(self, name: str, online: bool) -> None:
        await self.servers[name].set_online(online)

    def release(self, name: str) -> None:
        """Resolve the HTLCs held at ``name`` (and stop holding new ones)."""
        self.network.nodes[name].faults.hold = False
        self.network.release(name)

    async def close(self) -> None:
        for server in self.servers.values():
            await server.stop()
