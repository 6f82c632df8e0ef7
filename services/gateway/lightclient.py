"""The light-client API (``/v1/lc``): the guild's descriptor, its signed checkpoints, and
proofs of transactions and coins under them, as this operator's indexer keeps them
(``services.indexer.checkpoints``, asked over NATS).

A wallet trusts none of it: a checkpoint is checked against the guild key and member set
it pinned, a proof against a checkpoint (``constellation.lightclient.proof``). Each
answer carries the bytes the wallet checks (``encoded``, hex) and, for a reader, what
they say.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from aiohttp import web
from nats.aio.client import Client
from nats.errors import Error as NatsError

from constellation.address import Network, decode_address
from constellation.errors import DecodeError
from constellation.lightclient import proof as pf
from constellation.lightclient.checkpointer import Announced
from constellation.protocol import lightclient as lcp
from services.bus import lc_subject
from services.gateway.api import parse_hex, parse_int, query_int
from services.gateway.errors import NOT_FOUND, ApiError, json_response
from services.gateway.ws import MAX_MESSAGE

PROTOCOL = "constellation-lc"
VERSION = 1
FEATURES = [
    "descriptor",
    "checkpoints",
    "tx_proof",
    "coin_proof",
    "history",
    "coins",
    "subscribe",
    "submit",
]
ASK_TIMEOUT_S = 5.0
MAX_COUNT = 100  # checkpoints in one answer
MAX_HISTORY = 100  # transactions in one page of an address's history
MAX_HEIGHT = 2**62
CURSOR = re.compile(r"([0-9]{1,19})(?:\.([0-9a-f]{64})?)?")  # ASCII digits: int() refuses "²"
MAX_SUBSCRIPTIONS = 1000  # addresses and coins one websocket subscribes to
LIMITS = {
    "checkpoints": MAX_COUNT,
    "history": MAX_HISTORY,
    "subscriptions": MAX_SUBSCRIPTIONS,
    "message_bytes": MAX_MESSAGE,
}


def checkpoint_doc(announced: Announced) -> dict[str, Any]:
    c = announced.signed.checkpoint
    return {
        "guild": c.guild,
        "height": c.height,
        "time_ms": c.time_ms,
        "prev_hash": c.prev_hash.hex(),
        "shards": c.shards.hex(),
        "members": c.members.hex(),
        **(
            {"next_key": c.next_key.hex(), "next_members": c.next_members.hex()}
            if c.next_key
            else {}
        ),
        "signature": announced.signed.sig.hex(),
        "entries": [
            {"owner": e.owner, "worker": e.worker, "height": e.height, "records": e.size}
            for e in announced.entries
        ],
        "encoded": announced.encode().hex(),
    }


class LightClientApi:
    """The answers, each a JSON document (``ApiError`` where there is none), served over
    HTTP here and over the websocket (``services.gateway.lcws``)."""

    def __init__(self, nc: Client, operator: str, members: list[str], network: Network) -> None:
        self.nc = nc
        self.operator = operator
        self.subject = lc_subject(operator)
        self.members = members  # the guild's operators, in order (empty: not in a guild)
        self.network = network

    def install(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/v1/lc", self.get_server)
        r.add_get("/v1/lc/descriptor", self.get_descriptor)
        r.add_get("/v1/lc/handovers", self.get_handovers)
        r.add_get("/v1/lc/checkpoints", self.get_checkpoints)
        r.add_get("/v1/lc/checkpoints/latest", self.get_latest)
        r.add_get("/v1/lc/checkpoints/{height}", self.get_checkpoint)
        r.add_get("/v1/lc/tx/{txid}", self.get_tx_proof)
        r.add_get("/v1/lc/coin/{coin_id}", self.get_coin_proof)
        r.add_get("/v1/lc/address/{address}/history", self.get_history)
        r.add_get("/v1/lc/address/{address}/coins", self.get_coins)

    async def ask(self, query: lcp.Query) -> lcp.Answer:
        if not self.members:
            raise ApiError(NOT_FOUND, "this operator is not in a guild: it makes no checkpoints")
        try:
            msg = await self.nc.request(
                self.subject, msgspec.msgpack.encode(query), timeout=ASK_TIMEOUT_S
            )
            answer = msgspec.msgpack.decode(msg.data, type=lcp.Answer)
        except (NatsError, TimeoutError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ApiError("unavailable", f"the indexer did not answer: {exc!r}", 1) from None
        if answer.unavailable:
            raise ApiError("unavailable", answer.error, 1)
        if answer.error:
            raise ApiError(NOT_FOUND, answer.error)
        return answer

    async def _items(self, query: lcp.Query) -> list[bytes]:
        return (await self.ask(query)).items

    # -- the answers ---------------------------------------------------------------------

    def server(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL,
            "version": VERSION,
            "features": FEATURES if self.members else [],
            "members": self.members,
            "limits": LIMITS,
        }

    async def descriptor(self) -> dict[str, Any]:
        text, members = await self._items(lcp.DescriptorQuery())
        d = pf.Descriptor.decode(text.decode())
        m = msgspec.msgpack.decode(members, type=lcp.Members)
        return {
            "descriptor": text.decode(),
            "guild": d.pin.guild,
            "key": d.pin.key.hex(),
            "members": d.pin.members.hex(),
            "first": d.first.hex(),
            "threshold": m.threshold,
            "member_keys": [{"name": name, "key": key.hex()} for name, key in m.members],
        }

    async def handovers(self, start: int) -> dict[str, Any]:
        """The handovers of the checkpoints from one key to the next, from height
        ``start`` on: a wallet pinned to an earlier key follows them (``Pin.follow``)."""
        found = map(pf.SignedCheckpoint.decode, await self._items(lcp.Handovers(start)))
        return {
            "handovers": [
                {
                    "height": h.checkpoint.height,
                    "next_key": h.checkpoint.next_key.hex(),
                    "next_members": h.checkpoint.next_members.hex(),
                    "encoded": h.encode().hex(),
                }
                for h in found
            ]
        }

    async def latest(self) -> dict[str, Any]:
        data = (await self._items(lcp.Checkpoints(-1, 1)))[0]
        return checkpoint_doc(Announced.decode(data))

    async def checkpoint(self, height: int) -> dict[str, Any]:
        found = [Announced.decode(a) for a in await self._items(lcp.Checkpoints(height, 1))]
        if not found or found[0].signed.checkpoint.height != height:
            raise ApiError(NOT_FOUND, f"no checkpoint at height {height} here (yet)")
        return checkpoint_doc(found[0])

    async def checkpoints(self, start: int, count: int) -> dict[str, Any]:
        found = await self._items(lcp.Checkpoints(start, count))
        return {"checkpoints": [checkpoint_doc(Announced.decode(a)) for a in found]}

    async def tx_proof(self, txid: bytes) -> dict[str, Any]:
        proof = (await self._items(lcp.TxProofQuery(txid)))[0]
        heights = [c.checkpoint.height for c in pf.decode_tx_proof(proof).checkpoints]
        return {"txid": txid.hex(), "checkpoints": heights, "proof": proof.hex()}

    async def coin_proof(self, coin_id: bytes, ledger: str) -> dict[str, Any]:
        """The coin's proof from the ledger of guild member ``ledger``."""
        if ledger not in self.members:
            raise ApiError("malformed.ledger", f"no guild member {ledger[:64]!r}")
        owner = self.members.index(ledger)
        proof = (await self._items(lcp.CoinProofQuery(owner, coin_id)))[0]
        return {"coin_id": coin_id.hex(), "ledger": ledger, "proof": proof.hex()}

    async def history(self, address: str, before: str, limit: int) -> dict[str, Any]:
        """The transactions that changed an address in any member's ledger, newest first,
        each with the checkpoint from which its proof is served. ``before``: a page's
        ``next`` (where there may be more), or a checkpoint height ("" for the newest)."""
        owner = self.owner(address)
        height, txid = parse_cursor(before)
        found = [
            msgspec.msgpack.decode(item, type=lcp.Touch)
            for item in await self._items(lcp.HistoryQuery(owner, height, txid, limit))
        ]
        doc: dict[str, Any] = {
            "address": address,
            "history": [{"checkpoint": t.height, "txid": t.txid.hex()} for t in found],
        }
        if len(found) == limit:
            doc["next"] = f"{found[-1].height}.{found[-1].txid.hex()}"
        return doc

    async def coins(self, address: str, after: str, limit: int) -> dict[str, Any]:
        """An address's unspent coins in any member's ledger as of the latest checkpoint
        stored here, by coin id (``after``: a page's ``next``): each one a wallet checks
        with its coin proof."""
        owner = self.owner(address)
        start = parse_hex(after, "after", 32) if after else b""
        found = [
            msgspec.msgpack.decode(item, type=lcp.Owned)
            for item in await self._items(lcp.CoinsQuery(owner, start, limit))
        ]
        doc: dict[str, Any] = {
            "address": address,
            "coins": [
                {
                    "coin_id": o.coin_id.hex(),
                    "ledger": self.members[o.member],
                    "value_msat": o.value_msat,
                    "checkpoint": o.height,
                }
                for o in found
            ],
        }
        if len(found) == limit:
            doc["next"] = found[-1].coin_id.hex()
        return doc

    def owner(self, address: str) -> bytes:
        try:
            return bytes(decode_address(address, self.network))
        except DecodeError as exc:
            raise ApiError("malformed.address", str(exc)) from None

    # -- over HTTP -----------------------------------------------------------------------

    async def get_server(self, _: web.Request) -> web.Response:
        return json_response(self.server())

    async def get_descriptor(self, _: web.Request) -> web.Response:
        return json_response(await self.descriptor())

    async def get_handovers(self, request: web.Request) -> web.Response:
        start = query_int(request, "start", 0, MAX_HEIGHT, 0)
        return json_response(await self.handovers(start))

    async def get_latest(self, _: web.Request) -> web.Response:
        return json_response(await self.latest())

    async def get_checkpoint(self, request: web.Request) -> web.Response:
        height = parse_int(request.match_info["height"], "height", 0, MAX_HEIGHT)
        return json_response(await self.checkpoint(height))

    async def get_checkpoints(self, request: web.Request) -> web.Response:
        start = query_int(request, "start", 0, MAX_HEIGHT, 0)
        count = query_int(request, "count", 1, MAX_COUNT, MAX_COUNT)
        return json_response(await self.checkpoints(start, count))

    async def get_tx_proof(self, request: web.Request) -> web.Response:
        txid = parse_hex(request.match_info["txid"], "txid", 32)
        return json_response(await self.tx_proof(txid))

    async def get_coin_proof(self, request: web.Request) -> web.Response:
        """``?ledger=NAME``: the guild member whose ledger holds the coin (this
        operator's if not named)."""
        coin_id = parse_hex(request.match_info["coin_id"], "coin_id", 32)
        ledger = request.query.get("ledger", self.operator)
        return json_response(await self.coin_proof(coin_id, ledger))

    async def get_coins(self, request: web.Request) -> web.Response:
        after = request.query.get("after", "")
        limit = query_int(request, "limit", 1, MAX_HISTORY, MAX_HISTORY)
        return json_response(await self.coins(request.match_info["address"], after, limit))

    async def get_history(self, request: web.Request) -> web.Response:
        before = request.query.get("before", "")
        limit = query_int(request, "limit", 1, MAX_HISTORY, MAX_HISTORY)
        return json_response(await self.history(request.match_info["address"], before, limit))


def parse_cursor(text: str) -> tuple[int, bytes]:
    """A history page's ``before``: "" (the newest), a checkpoint height (transactions
    below it), or a page's ``next`` ("HEIGHT.TXID": those after it, newest first)."""
    if not text:
        return MAX_HEIGHT, b""
    m = CURSOR.fullmatch(text)
    if m is None:
        raise ApiError("malformed.before", "before is a height, or a page's next")
    return min(int(m[1]), MAX_HEIGHT), bytes.fromhex(m[2] or "")
