"""The wallet as a light client: it pins the guild's descriptor, asks any of the guild's
gateways for checkpoints and proofs, checks every one against the pin
(``constellation.lightclient.proof``), and moves to the next gateway when one is down or
serves something that does not verify, saying which gateway failed which check.

It never goes back on what it has seen: a checkpoint below the highest it verified is
stale (a server withholding what happened since), and a coin proof must be as of a
checkpoint at least that high.

``follow`` follows addresses over a gateway's websocket (``services.gateway.lcws``):
each checkpoint and each pushed change is verified before it is told; a gateway that
pushes what does not verify, skips a checkpoint (what changed under it would be
unknown), or goes away, is left for the next, where the addresses' history since the
last checkpoint followed is read (and each transaction's proof checked) before its
pushes are.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

import aiohttp

from constellation.address import Network, decode_address
from constellation.errors import (
    BadCheckpointSignature,
    BadEntryPath,
    DecodeError,
    ProofRefused,
    StaleCheckpoint,
    WrongGuild,
    WrongMembers,
    WrongSubject,
)
from constellation.ledger.pmap import PartitionMap
from constellation.lightclient import proof as pf
from constellation.lightclient.checkpointer import Announced
from constellation.tx import partition_of
from services.api_client import Gateway, GatewayError

T = TypeVar("T")
CALL_TIMEOUT_S = 10.0  # for each request to a gateway, each call on its websocket
TIMEOUT = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
MAX_NOTES = 1000  # notifications kept while a call waits for its answer
SILENT_S = 60.0  # a socket that pushes nothing this long (not even a checkpoint) is left
RETRY_S = 1.0  # after every gateway failed in turn
MAX_AGE_S = 300.0  # a latest checkpoint older than this is stale (the guild signs one
# every 30 s at rest: INDEXER_CHECKPOINT_IDLE_MS)


class Failure(NamedTuple):
    """What one gateway did wrong: ``check`` is the failed check's code (``proof.…``) where
    it served something that does not verify, else why it could not be asked."""

    server: str
    check: str
    message: str

    def __str__(self) -> str:
        return f"{self.server}: [{self.check}] {self.message}"


class NoServer(RuntimeError):
    """No gateway of the guild served what was asked in a form that verifies."""

    def __init__(self, what: str, failures: list[Failure]) -> None:
        lines = "\n".join(f"  {f}" for f in failures)
        super().__init__(f"no gateway of the guild served {what} that verifies:\n{lines}")
        self.failures = failures


class LightClient:
    def __init__(
        self,
        descriptor: pf.Descriptor,
        servers: list[str],
        session: aiohttp.ClientSession,
        seen: int = 0,
        workers: int = 0,
        max_age_s: float = MAX_AGE_S,
        handovers: tuple[pf.SignedCheckpoint, ...] = (),
    ) -> None:
        """``handovers``: those followed before (kept by the wallet), checked again."""
        self.descriptor = descriptor
        self.pin = descriptor.pin
        for handover in handovers:
            self.pin = self.pin.follow(handover)
        self.servers = servers
        self.session = session
        self.seen = seen  # the highest checkpoint verified so far
        self.workers = workers  # shards per member (a coin's shard), once learnt
        self.max_age_s = max_age_s  # how old the latest checkpoint served may be
        self.failures: list[Failure] = []  # every failure met, in order

    async def _each(self, what: str, ask: Callable[[Gateway], Awaitable[T]]) -> tuple[str, T]:
        """``ask`` of each gateway in turn until one answers with what verifies (asked
        again where the gateway had handovers this client had not followed)."""
        failed: list[Failure] = []
        for url in self.servers:
            gw = Gateway(url, self.session, timeout=TIMEOUT)
            try:
                try:
                    return url, await ask(gw)
                except (WrongMembers, BadCheckpointSignature):
                    if not await self.catch_up(gw):
                        raise
                    return url, await ask(gw)
            except SERVER_FAULTS as exc:
                failed.append(self._failed(url, exc))
        raise NoServer(what, failed)

    async def catch_up(self, gw: Gateway) -> bool:
        """Follow the handovers ``gw`` serves above the last one followed, each checked
        (``Pin.follow``: raises ``ProofRefused``); whether there were any."""
        doc = await gw.get(f"/v1/lc/handovers?start={self.pin.handed + 1}")
        handovers = [
            pf.SignedCheckpoint.decode(bytes.fromhex(h["encoded"])) for h in doc["handovers"]
        ]
        for handover in handovers:
            self.pin = self.pin.follow(handover)
        return bool(handovers)

    def _failed(self, url: str, exc: BaseException) -> Failure:
        """What went wrong with a gateway, kept in ``failures``."""
        if isinstance(exc, ProofRefused | GatewayError):
            failure = Failure(url, exc.code, str(exc))
        elif isinstance(exc, aiohttp.ClientError | TimeoutError | ConnectionError):
            failure = Failure(url, "unreachable", repr(exc))
        else:  # malformed answers
            failure = Failure(url, "malformed", f"{type(exc).__name__}: {exc}")
        self.failures.append(failure)
        return failure

    def _checkpoint(self, doc: dict[str, Any], not_below: int | None = None) -> Announced:
        """A checkpoint served, verified (not below ``not_below``: the highest seen)."""
        announced = Announced.decode(bytes.fromhex(doc["encoded"]))
        floor = self.seen if not_below is None else not_below
        c = pf.verify_checkpoint(self.pin, announced.signed, floor)
        if pf.shards_tree(announced.entries).root() != c.shards:
            raise BadEntryPath(f"checkpoint {c.height}'s entries do not make its root")
        if c.height == 0 and c.message() != self.descriptor.first:
            raise WrongGuild("checkpoint 0 is not the one the descriptor pins")
        if c.next_key and c.height > self.pin.handed:  # a handover, as it is signed
            self.pin = self.pin.follow(announced.signed)
        return announced

    async def latest(self) -> tuple[str, Announced]:
        """The latest checkpoint, verified, and not older than any seen before."""

        async def ask(gw: Gateway) -> Announced:
            announced = self._checkpoint(await gw.get("/v1/lc/checkpoints/latest"))
            c = announced.signed.checkpoint
            age = time.time() - c.time_ms / 1000
            if age > self.max_age_s:  # the guild signs one every 30 s at rest
                raise StaleCheckpoint(
                    f"the latest checkpoint served, {c.height}, is {age:.0f} s old"
                    f" (at most {self.max_age_s:.0f} s)"
                )
            return announced

        url, announced = await self._each("the latest checkpoint", ask)
        self.seen = max(self.seen, announced.signed.checkpoint.height)
        self.workers = self.workers or 1 + max(e.worker for e in announced.entries)
        return url, announced

    async def tx(self, txid: bytes) -> tuple[str, pf.TxProof, list[pf.Placed]]:
        """A transaction's proof and what it shows, verified."""

        async def ask(gw: Gateway) -> tuple[pf.TxProof, list[pf.Placed]]:
            doc = await gw.get(f"/v1/lc/tx/{txid.hex()}")
            proof = pf.decode_tx_proof(bytes.fromhex(doc["proof"]))
            placed = pf.verify_tx(self.pin, proof, txid)
            for c in proof.checkpoints:
                if c.checkpoint.height == 0 and c.checkpoint.message() != self.descriptor.first:
                    raise WrongGuild("checkpoint 0 is not the one the descriptor pins")
            return proof, placed

        url, (proof, placed) = await self._each(f"a proof of transaction {txid.hex()}", ask)
        return url, proof, placed

    async def coin(self, coin_id: bytes, ledger: str, owner: int) -> tuple[str, pf.CoinVerdict]:
        """A coin's state in member ``owner``'s ledger (named ``ledger``) as of a
        checkpoint at least as recent as the latest this client verified."""
        if not self.workers:
            await self.latest()

        async def ask(gw: Gateway) -> pf.CoinVerdict:
            doc = await gw.get(f"/v1/lc/coin/{coin_id.hex()}?ledger={ledger}")
            proof = pf.decode_coin_proof(bytes.fromhex(doc["proof"]))
            shard = (owner, shard_of(coin_id, self.workers))
            return pf.verify_coin(self.pin, proof, coin_id, shard, self.seen)

        url, verdict = await self._each(f"a proof of coin {coin_id.hex()}", ask)
        self.seen = max(self.seen, verdict.checkpoint)
        return url, verdict

    def _pushed(self, doc: dict[str, Any], owner: bytes) -> Update:
        """A pushed (or read) change of an address, verified: the transaction's records
        that change it, under checkpoints of the pinned guild."""
        txid = bytes.fromhex(doc["txid"])
        proof = pf.decode_tx_proof(bytes.fromhex(doc["proof"]))
        placed = pf.verify_tx(self.pin, proof, txid)
        for c in proof.checkpoints:
            if c.checkpoint.height == 0 and c.checkpoint.message() != self.descriptor.first:
                raise WrongGuild("checkpoint 0 is not the one the descriptor pins")
        mine = [p for p in placed if any(c.owner == owner for c in p.record.changes)]
        if not mine:
            raise WrongSubject(f"the proof of {txid.hex()} shows no change of the address")
        # as of the checkpoints its proof is under, not as the gateway labels it
        return Update("", max(p.checkpoint for p in mine), txid, mine)

    async def follow(
        self,
        addresses: list[str],
        network: Network,
        since: int,
        told: Callable[[Update], Awaitable[bool]],
    ) -> None:
        """Tell ``told`` of every change of ``addresses`` from checkpoint ``since`` on,
        each verified and told once, until it answers False; moving from gateway to
        gateway as each fails (``failures`` says how), and starting over after
        ``RETRY_S`` when every one failed in turn."""
        owners = {a: bytes(decode_address(a, network)) for a in addresses}
        done: set[Told] = set()  # each record told, for each address
        # "since": the history is read from here; "floor": no change under a checkpoint
        # below the one followed from is told (one told before, served again as new)
        state = {"since": since, "floor": since}
        for url in itertools.cycle(self.servers):
            try:
                if not await self._follow_one(url, owners, state, done, told):
                    return
            except SERVER_FAULTS as exc:
                self._failed(url, exc)
                if url == self.servers[-1]:
                    await asyncio.sleep(RETRY_S)

    async def _follow_one(
        self,
        url: str,
        owners: dict[str, bytes],
        state: dict[str, int],
        done: set[Told],
        told: Callable[[Update], Awaitable[bool]],
    ) -> bool:
        """Follow over one gateway's websocket until ``told`` says stop (False) or the
        gateway fails (raises)."""
        await self.catch_up(Gateway(url, self.session, timeout=TIMEOUT))  # signed while away
        ws_url = url.replace("http", "ws", 1) + "/v1/lc/ws"
        async with asyncio.timeout(CALL_TIMEOUT_S):
            ws = await self.session.ws_connect(ws_url, heartbeat=30)
        async with ws:
            rpc = Rpc(ws)
            latest = await rpc.call("checkpoints.subscribe")
            pushed = -1  # the highest checkpoint this gateway told of
            if latest is not None:
                self._took(self._checkpoint(latest))
                pushed = latest["height"]
            for address in owners:
                await rpc.call("address.subscribe", address=address)
            # what happened since the last told checkpoint, read before what is pushed
            for address, owner in owners.items():
                before: str | None = ""
                while before is not None:
                    page = await rpc.call("address.history", address=address, before=before)
                    entries = [e for e in page["history"] if e["checkpoint"] >= state["since"]]
                    for entry in entries:
                        proof = await rpc.call("tx.proof", txid=entry["txid"])
                        doc = {**entry, **proof}
                        if not await self._tell(url, address, owner, doc, state, done, told):
                            return False
                    more = len(entries) == len(page["history"])
                    before = page.get("next") if more else None
            while True:
                note = await rpc.notification(SILENT_S)
                method, params = note.get("method"), note.get("params", {})
                if method == "checkpoints.new":
                    # one pushed while an answer overtook it may be below the latest seen
                    announced = self._checkpoint(params, not_below=0)
                    height = announced.signed.checkpoint.height
                    if pushed >= 0 and height > pushed + 1:  # what changed there is unknown
                        raise GatewayError(
                            0, "gap", f"checkpoints {pushed + 1} to {height - 1} were not pushed"
                        )
                    pushed = max(pushed, height)
                    self._took(announced)
                    state["since"] = max(state["since"], height)
                elif method == "address.update" and params["address"] in owners:
                    address = params["address"]
                    tell = (url, address, owners[address], params, state, done, told)
                    if not await self._tell(*tell):
                        return False
                elif method == "error":
                    raise GatewayError(0, params["code"], params["message"])

    def _took(self, announced: Announced) -> None:
        self.seen = max(self.seen, announced.signed.checkpoint.height)

    async def _tell(
        self,
        url: str,
        address: str,
        owner: bytes,
        doc: dict[str, Any],
        state: dict[str, int],
        done: set[Told],
        told: Callable[[Update], Awaitable[bool]],
    ) -> bool:
        update = self._pushed(doc, owner)._replace(server=url, address=address)
        if update.checkpoint < state["floor"]:
            return True  # under a checkpoint below the one followed from: told before
        keys = [(address, p.owner, p.worker, p.record.height, update.txid) for p in update.placed]
        fresh = [p for p, key in zip(update.placed, keys, strict=True) if key not in done]
        if not fresh:  # the history (or another gateway) told them
            return True
        done.update(keys)
        return await told(update._replace(placed=fresh))


Told = tuple[str, int, int, int, bytes]  # (address, owner, worker, record height, txid)


class Update(NamedTuple):
    """A verified change of a followed address: a transaction's records that change it
    (``placed``), told by ``server``, provable as of checkpoint ``checkpoint``."""

    server: str
    checkpoint: int
    txid: bytes
    placed: list[pf.Placed]
    address: str = ""


class Rpc:
    """JSON-RPC 2.0 calls over a websocket, the notifications that come between kept."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.notes: list[dict[str, Any]] = []

    async def _receive(self, timeout: float) -> dict[str, Any]:
        msg = await self.ws.receive(timeout)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"the websocket ended ({msg.type.name})")
        try:
            doc = msg.json()
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None
        if not isinstance(doc, dict):
            raise TypeError("a message that is not an object")
        return doc

    async def call(self, method: str, **params: Any) -> Any:
        call_id = next(self.ids)
        await self.ws.send_json(
            {"jsonrpc": "2.0", "id": call_id, "method": method, "params": params}
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CALL_TIMEOUT_S  # notifications do not put it off
        while True:
            doc = await self._receive(max(0.0, deadline - loop.time()))
            if "method" in doc:
                if len(self.notes) >= MAX_NOTES:
                    raise GatewayError(0, "overloaded", f"{MAX_NOTES} notifications, no answer")
                self.notes.append(doc)
                continue
            if doc.get("id") != call_id:
                raise ValueError(f"an answer to call {doc.get('id')!r}, not {call_id}")
            if "error" in doc:
                err = doc["error"]
                data = err.get("data") if isinstance(err, dict) else None
                code = data.get("code") if isinstance(data, dict) else None
                what = err.get("message") if isinstance(err, dict) else err
                raise GatewayError(0, str(code or "error"), str(what)[:200])
            return doc["result"]

    async def notification(self, timeout: float) -> dict[str, Any]:
        if self.notes:
            return self.notes.pop(0)
        doc = await self._receive(timeout)
        if "method" not in doc:
            raise ValueError("an answer to no call")
        return doc


SERVER_FAULTS = (
    ProofRefused,
    GatewayError,
    aiohttp.ClientError,
    TimeoutError,
    ConnectionError,
    DecodeError,
    ValueError,
    KeyError,
    TypeError,
)


def shard_of(coin_id: bytes, workers: int) -> int:
    """The worker of a member's ledger that holds a coin (the even partition map every
    member's ledger has: ``PartitionMap.even``)."""
    return PartitionMap.even(workers).owners()[partition_of(coin_id)]


def describe(placed: list[pf.Placed], members: list[str]) -> list[str]:
    """What a verified transaction proof shows, a line per record."""
    lines = []
    for p in placed:
        r = p.record
        who = members[p.owner] if p.owner < len(members) else f"member {p.owner}"
        head = f"  {who}'s shard {p.worker}, block {r.height}, under checkpoint {p.checkpoint}"
        if r.committed:
            head += f": committed here (fee {r.fee_msat} msat)"
        lines.append(head)
        for c in r.changes:
            lines.append(f"    {c.kind.name.lower():8} {c.coin_id.hex()} {c.value_msat} msat")
    return lines
