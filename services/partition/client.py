"""The gateway's client of the partition workers: routing, packages, answers by request id."""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import Callable, Sequence

import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from constellation.errors import AlreadyCommitted, InFlight, MessageError
from constellation.ledger.pmap import PartitionMap
from constellation.protocol import ledger as proto
from constellation.tx import AnyIssuance, Transaction
from services.bus import (
    GATEWAY,
    Batching,
    Packer,
    load_map,
    query_subject,
    worker_subject,
)
from services.runtime import close_nats, connect_nats

# A request unanswered this long is sent again (same request id), then after twice as
# long, and so on: the package may have gone to a leader that died or handed over, and
# a transaction's outcome is idempotent; an overloaded leader is not flooded.
RESEND_S = 1.0
QUERY_RETRY_S = 0.1  # a query that found no responder (leadership changing) waits this


class LedgerUnavailable(RuntimeError):
    """No answer from a worker in time: the outcome is unknown."""


class LedgerClient:
    def __init__(
        self,
        nc: Client,
        operator: str,
        pmap: PartitionMap,
        batching: Batching,
        observe: Callable[[int], None],
    ) -> None:
        self.nc = nc
        self.operator = operator
        self.pmap = pmap
        self.owners = pmap.owners()
        self.inbox = f"cst.{operator}.gw.{nc.new_inbox().rsplit('.', 1)[-1]}"
        self.packer = Packer(nc, GATEWAY, self.inbox, lambda: self.pmap.version, batching, observe)
        self._rids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[proto.Result]] = {}
        self._items: dict[int, tuple[str, proto.Item]] = {}  # rid -> what to send again
        self._resent: set[int] = set()

    @classmethod
    async def connect(
        cls,
        url: str,
        operator: str,
        batching: Batching,
        observe: Callable[[int], None],
        pmap: PartitionMap | None = None,
    ) -> LedgerClient:
        """A client of ``operator``'s ledger through the NATS at ``url``: its partition
        map is ``pmap`` where given (a guild's layout), else the one published there."""
        nc = await connect_nats(url, f"gateway-{operator}")
        if pmap is None:
            pmap = await load_map(nc, operator)
        if pmap is None:
            await close_nats(nc)
            raise LedgerUnavailable("no partition map is published yet")
        client = cls(nc, operator, pmap, batching, observe)
        await nc.subscribe(client.inbox, cb=client._on_results, pending_msgs_limit=1_000_000)
        await nc.flush()
        return client

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    def owner(self, coin_id: bytes) -> int:
        return self.owners[(coin_id[0] << 8) | coin_id[1]]

    async def _on_results(self, msg: Msg) -> None:
        try:
            pkg = proto.decode_package(msg.data)
        except MessageError:
            return
        waiting = self._waiting
        for item in pkg.items:
            if isinstance(item, proto.Result):
                result = item
                if item.rid in self._resent:
                    if item.code == InFlight.code:
                        continue  # sent again while the first runs: the first will tell
                    if item.code == AlreadyCommitted.code:  # the first's answer was lost
                        result = proto.Result(item.rid, "", "", [])
                fut = waiting.pop(item.rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(result)

    def _request(
        self, worker: int, item_of: Callable[[int, bytes], proto.Item], raw: bytes
    ) -> tuple[int, asyncio.Future[proto.Result]]:
        rid = next(self._rids)
        fut: asyncio.Future[proto.Result] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        subject, item = worker_subject(self.operator, worker), item_of(rid, raw)
        self._items[rid] = (subject, item)
        self.packer.send(subject, item)
        return rid, fut

    async def _answers(
        self, pending: list[tuple[int, asyncio.Future[proto.Result]]], timeout_s: float
    ) -> list[proto.Result | None]:
        """Every answer that came within ``timeout_s`` (one timeout for them all); None
        where none came. What is unanswered after ``RESEND_S`` is sent again (and
        after twice as long, ...)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        wait_s = RESEND_S
        try:
            while True:
                left = [f for _, f in pending if not f.done()]
                if not left or loop.time() >= end:
                    break
                await asyncio.wait(left, timeout=min(wait_s, end - loop.time()))
                wait_s *= 2
                for rid, fut in pending:
                    if not fut.done() and loop.time() < end:
                        self._resent.add(rid)
                        self.packer.send(*self._items[rid])
        finally:
            for rid, _ in pending:
                self._waiting.pop(rid, None)
                self._items.pop(rid, None)
                self._resent.discard(rid)
        return [f.result() if f.done() and not f.cancelled() else None for _, f in pending]

    async def submit(
        self, txs: Sequence[tuple[Transaction, bytes]], timeout_s: float
    ) -> list[proto.Result | None]:
        """Run each transaction through its coordinator: the workers' ``Result``s, in
        order, or None where no answer came in time (the outcome is unknown)."""
        pending = [
            self._request(self.owner(tx.inputs[0].coin_id), proto.Submit, raw) for tx, raw in txs
        ]
        return await self._answers(pending, timeout_s)

    async def issue(
        self, issuance: AnyIssuance, raw: bytes, timeout_s: float
    ) -> list[proto.Result]:
        """Apply an issuance at every worker holding one of its outputs."""
        workers = sorted({self.owner(cid) for cid in issuance.output_ids})
        pending = [self._request(w, proto.Issue, raw) for w in workers]
        answers = await self._answers(pending, timeout_s)
        found = [a for a in answers if a is not None]
        if len(found) < len(answers):
            raise LedgerUnavailable(f"no answer from the ledger in {timeout_s:g} s")
        return found

    async def coins(self, coin_ids: list[bytes], timeout_s: float) -> dict[bytes, proto.CoinInfo]:
        by_worker: dict[int, list[bytes]] = defaultdict(list)
        for cid in coin_ids:
            by_worker[self.owner(cid)].append(cid)
        replies = await asyncio.gather(
            *(
                self._query(w, "coins", msgspec.msgpack.encode(proto.CoinQuery(ids)), timeout_s)
                for w, ids in by_worker.items()
            )
        )
        found = {}
        for data in replies:
            for info in msgspec.msgpack.decode(data, type=list[proto.CoinInfo]):
                found[info.coin_id] = info
        return found

    async def state(self, worker: int, timeout_s: float) -> proto.StateInfo:
        data = await self._query(worker, "state", b"", timeout_s)
        return msgspec.msgpack.decode(data, type=proto.StateInfo)

    async def _query(self, worker: int, what: str, payload: bytes, timeout_s: float) -> bytes:
        """Ask a worker; while none answers (its leadership is changing: no copy
        subscribed, or a frozen one), ask again every ``RESEND_S``."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        subject = query_subject(self.operator, worker, what)
        while True:
            left = end - loop.time()
            try:
                msg = await self.nc.request(subject, payload, timeout=min(RESEND_S, left))
                return msg.data
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
                if loop.time() + QUERY_RETRY_S >= end:
                    raise LedgerUnavailable(f"worker {worker} did not answer: {exc}") from None
                if isinstance(exc, nats.errors.NoRespondersError):
                    await asyncio.sleep(QUERY_RETRY_S)

    async def close(self) -> None:
        await self.packer.drain()
        await close_nats(self.nc, drain=True)
