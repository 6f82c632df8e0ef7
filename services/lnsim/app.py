"""The simulated network as a service: its nodes' lightningd sockets, a block every
``LNSIM_BLOCK_S``, metrics, and a control API for faults (what tests and the demo use
to make payments fail, hang or lose their replies, and nodes go down).

Control (JSON, on the ops port):
    GET  /v1/nodes                 each node: id, socket, online, faults
    POST /v1/nodes/{node}          a node joins, with a channel to every node
    POST /v1/faults/{node}         {offline, fail_next, hold, lose_replies, delay_s}
    POST /v1/release/{node}        settle or fail what the node holds, and hold no more
    POST /v1/mine                  {blocks}
    POST /v1/feerate               {sat_per_vb}: what a block takes (a busy fee market)
    POST /v1/fund/{node}           {sat}: the faucet
    GET  /v1/books                 where every msat is (``missing_msat`` must be 0)
    POST /bitcoind                 the chain, as bitcoind's JSON-RPC (``bitcoind.py``)

The network is kept in ``LNSIM_DIR/network.state`` when the process stops (SIGTERM),
and taken up from there when it starts again, as a lightningd keeps its channels,
wallet, invoices and payments on disk: a devnet stopped and started again finds its
Lightning balances where its ledgers' coins are. A process killed (``kill -9``) writes
nothing: started again, it takes up the network as it was at its last stop, without
what happened since (lightningd writes each change), so none of the devnet's tests
kill it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.lnsim import bitcoind
from services.lnsim.config import Settings
from services.lnsim.network import Faults, LnError
from services.lnsim.rpc import NodeServer
from services.lnsim.sim import Simulator
from services.runtime import OPERATOR_RE, OpsServer

log = logging.getLogger("lnsim")

STATE_FILE = "network.state"

FAULTS = {"offline": bool, "fail_next": int, "hold": bool, "lose_replies": int, "delay_s": float}


def _fault(key: str, value: Any) -> bool | int | float:
    kind = FAULTS[key]
    number = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and number and isinstance(value, int):
        return value
    if kind is float and number:
        return float(value)
    raise web.HTTPBadRequest(text=f"{key}: a {kind.__name__}, not negative")


class NetworkCollector(Collector):
    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def collect(self) -> Iterator[Metric]:
        net = self.sim.network
        local = GaugeMetricFamily(
            "lnsim_channel_local_msat", "a node's balance in a channel", labels=["node", "peer"]
        )
        parts = GaugeMetricFamily(
            "lnsim_payments", "a node's outgoing payments by status", labels=["node", "status"]
        )
        paid = GaugeMetricFamily("lnsim_invoices_paid", "invoices paid to a node", labels=["node"])
        calls = CounterMetricFamily("lnsim_rpc_calls", "JSON-RPC calls served", labels=["node"])
        for name, node in net.nodes.items():
            for ch in net.channels_of(name):
                local.add_metric([name, ch.other(name)], ch.balance[name])
            for status in ("pending", "complete", "failed"):
                parts.add_metric([name, status], sum(1 for p in node.parts if p.status == status))
            paid.add_metric([name], sum(1 for i in node.invoices.values() if i.status == "paid"))
            calls.add_metric([name], self.sim.servers[name].calls)
        height = GaugeMetricFamily("lnsim_blockheight", "the chain's height")
        height.add_metric([], net.height)
        missing = GaugeMetricFamily(
            "lnsim_books_missing_msat", "msat made or lost by the simulator (must be 0)"
        )
        missing.add_metric([], net.books()["missing_msat"])
        yield from (local, parts, paid, calls, height, missing)


class LnSimNode:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sim = Simulator(settings.directory, settings.seed, version=settings.version)
        self.registry = CollectorRegistry()
        self.registry.register(NetworkCollector(self.sim))
        self.ops = OpsServer(self.registry, self.ready)
        self._started = False
        r = self.ops.app.router
        r.add_get("/v1/nodes", self._nodes)
        r.add_post("/v1/nodes/{node}", self._join)
        r.add_post("/v1/faults/{node}", self._faults)
        r.add_post("/v1/release/{node}", self._release)
        r.add_post("/v1/mine", self._mine)
        r.add_post("/v1/feerate", self._feerate)
        r.add_post("/v1/fund/{node}", self._fund)
        r.add_get("/v1/books", self._books)
        r.add_post("/bitcoind", self._bitcoind)

    def ready(self) -> tuple[bool, str]:
        if not self._started:
            return False, "starting"
        offline = [n for n, node in self.sim.network.nodes.items() if node.faults.offline]
        return True, f"{len(self.sim.servers)} nodes at height {self.sim.network.height}" + (
            f", offline: {', '.join(offline)}" if offline else ""
        )

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        state = s.directory / STATE_FILE
        if state.exists():  # as it was stopped, and a node named since joins
            await self.sim.restore(state)
            for name in s.nodes:
                if name not in self.sim.network.nodes:
                    await self._joined(name)
            log.info("network restored", extra={"height": self.sim.network.height})
        else:
            await self.sim.mesh(s.nodes, s.channel_sat, s.fund_sat)
        await self.ops.start(s.http_host, s.http_port)
        if s.block_s:
            self.ops.tasks.start("blocks", self._blocks)
        self._started = True
        log.info(
            "network ready",
            extra={
                "nodes": {n: str(sv.path) for n, sv in self.sim.servers.items()},
                "http_port": self.ops.port,
            },
        )
        await stop.wait()
        log.info("stopping")
        await self.ops.tasks.stop()
        await self.sim.close()
        await self.ops.stop()
        self.sim.network.save(state)  # nothing changes it any more

    async def _blocks(self) -> None:
        while True:
            await asyncio.sleep(self.settings.block_s)
            self.sim.network.mine(1)

    # -- control ----------------------------------------------------------------------

    def _node(self, request: web.Request) -> str:
        name = request.match_info["node"]
        if name not in self.sim.network.nodes:
            raise web.HTTPNotFound(text=f"no node {name!r}")
        return name

    @staticmethod
    async def _json(request: web.Request) -> dict[str, Any]:
        try:
            doc = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="a JSON object, please") from None
        if not isinstance(doc, dict):
            raise web.HTTPBadRequest(text="a JSON object, please")
        return doc

    async def _nodes(self, _: web.Request) -> web.Response:
        net = self.sim.network
        return web.json_response(
            [
                {
                    "name": name,
                    "id": node.node_id,
                    "socket": str(self.sim.servers[name].path),
                    "online": not node.faults.offline,
                    "faults": vars(node.faults),
                }
                for name, node in net.nodes.items()
            ]
        )

    async def _join(self, request: web.Request) -> web.Response:
        """A node joins the network, with a channel to every node (an operator joins the
        guild): its socket is served from now on."""
        name = request.match_info["node"]
        if not OPERATOR_RE.match(name):
            raise web.HTTPBadRequest(text=f"a node's name must match {OPERATOR_RE.pattern}")
        if name in self.sim.network.nodes:
            raise web.HTTPConflict(text=f"node {name!r} is in the network already")
        server = await self._joined(name)
        node = self.sim.network.nodes[name]
        return web.json_response({"name": name, "id": node.node_id, "socket": str(server.path)})

    async def _joined(self, name: str) -> NodeServer:
        sat = self.settings.channel_sat
        return await self.sim.join(name, sat, sat * (len(self.sim.servers) + 1))

    async def _faults(self, request: web.Request) -> web.Response:
        name = self._node(request)
        doc = await self._json(request)
        unknown = set(doc) - FAULTS.keys()
        if unknown:
            raise web.HTTPBadRequest(text=f"unknown faults: {sorted(unknown)}")
        faults: Faults = self.sim.network.nodes[name].faults
        checked = {key: _fault(key, value) for key, value in doc.items()}
        for key, value in checked.items():
            if key == "offline":
                await self.sim.set_online(name, not value)
            else:
                setattr(faults, key, value)
        log.info("faults set", extra={"node": name, "faults": vars(faults)})
        return web.json_response(vars(faults))

    async def _release(self, request: web.Request) -> web.Response:
        self.sim.release(self._node(request))
        return web.json_response({"released": True})

    async def _mine(self, request: web.Request) -> web.Response:
        blocks = (await self._json(request)).get("blocks", 1)
        if not isinstance(blocks, int) or isinstance(blocks, bool) or not 1 <= blocks <= 1000:
            raise web.HTTPBadRequest(text="blocks: 1 to 1000")
        return web.json_response({"height": self.sim.network.mine(blocks)})

    async def _feerate(self, request: web.Request) -> web.Response:
        rate = (await self._json(request)).get("sat_per_vb")
        if not isinstance(rate, int) or isinstance(rate, bool) or not 1 <= rate <= 100_000:
            raise web.HTTPBadRequest(text="sat_per_vb: 1 to 100000")
        self.sim.network.set_feerate(rate)
        return web.json_response({"sat_per_vb": rate})

    async def _fund(self, request: web.Request) -> web.Response:
        name = self._node(request)
        sat = (await self._json(request)).get("sat")
        if not isinstance(sat, int) or isinstance(sat, bool) or not 1 <= sat <= 10**12:
            raise web.HTTPBadRequest(text="sat: 1 to 10^12")
        try:
            utxo = self.sim.network.fund(name, sat)
        except LnError as exc:
            raise web.HTTPBadRequest(text=exc.message) from None
        return web.json_response({"txid": utxo.txid, "address": utxo.address})

    async def _books(self, _: web.Request) -> web.Response:
        return web.json_response(self.sim.network.books())

    async def _bitcoind(self, request: web.Request) -> web.Response:
        body = await request.content.read(bitcoind.MAX_REQUEST_BYTES + 1)
        if len(body) > bitcoind.MAX_REQUEST_BYTES:
            raise web.HTTPRequestEntityTooLarge(bitcoind.MAX_REQUEST_BYTES, len(body))
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        answer = bitcoind.call(self.sim.network, doc)
        status = 200 if answer["error"] is None else 500  # as bitcoind does
        return web.Response(
            body=json.dumps(answer, default=float), status=status, content_type="application/json"
        )
