"""The light-client API (``/v1/lc``): the guild's descriptor, its signed checkpoints, and
proofs of transactions and coins under them, as this operator's indexer keeps them
(``services.indexer.checkpoints``, asked over NATS).

A wallet trusts none of it: a checkpoint is checked against the guild key and member set
it pinned, a proof against a checkpoint (``constellation.lightclient.proof``). Each
answer carries the bytes the wallet checks (``encoded``, hex) and, for a reader, what
they say.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web
from nats.aio.client import Client
from nats.errors import Error as NatsError

from constellation.lightclient import proof as pf
from constellation.lightclient.checkpointer import Announced
from constellation.protocol import lightclient as lcp
from services.bus import lc_subject
from services.gateway.api import parse_hex, parse_int, query_int
from services.gateway.errors import NOT_FOUND, ApiError, json_response

PROTOCOL = "constellation-lc"
VERSION = 1
FEATURES = ["descriptor", "checkpoints", "tx_proof", "coin_proof"]
ASK_TIMEOUT_S = 5.0
MAX_COUNT = 100  # checkpoints in one answer
MAX_HEIGHT = 2**62


def checkpoint_doc(announced: Announced) -> dict[str, Any]:
    c = announced.signed.checkpoint
    return {
        "guild": c.guild,
        "height": c.height,
        "time_ms": c.time_ms,
        "prev_hash": c.prev_hash.hex(),
        "shards": c.shards.hex(),
        "members": c.members.hex(),
        "signature": announced.signed.sig.hex(),
        "entries": [
            {"owner": e.owner, "worker": e.worker, "height": e.height, "records": e.size}
            for e in announced.entries
        ],
        "encoded": announced.encode().hex(),
    }


class LightClientApi:
    def __init__(self, nc: Client, operator: str, members: list[str]) -> None:
        self.nc = nc
        self.operator = operator
        self.subject = lc_subject(operator)
        self.members = members  # the guild's operators, in order (empty: not in a guild)

    def install(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/v1/lc", self.get_server)
        r.add_get("/v1/lc/descriptor", self.get_descriptor)
        r.add_get("/v1/lc/checkpoints", self.get_checkpoints)
        r.add_get("/v1/lc/checkpoints/latest", self.get_latest)
        r.add_get("/v1/lc/checkpoints/{height}", self.get_checkpoint)
        r.add_get("/v1/lc/tx/{txid}", self.get_tx_proof)
        r.add_get("/v1/lc/coin/{coin_id}", self.get_coin_proof)

    async def _ask(self, query: lcp.Query) -> list[bytes]:
        if not self.members:
            raise ApiError(NOT_FOUND, "this operator is not in a guild: it makes no checkpoints")
        try:
            msg = await self.nc.request(
                self.subject, msgspec.msgpack.encode(query), timeout=ASK_TIMEOUT_S
            )
            answer = msgspec.msgpack.decode(msg.data, type=lcp.Answer)
        except (NatsError, TimeoutError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ApiError("unavailable", f"the indexer did not answer: {exc!r}", 1) from None
        if answer.error:
            raise ApiError(NOT_FOUND, answer.error)
        return answer.items

    async def get_server(self, _: web.Request) -> web.Response:
        return json_response(
            {
                "protocol": PROTOCOL,
                "version": VERSION,
                "features": FEATURES if self.members else [],
                "members": self.members,
                "limits": {"checkpoints": MAX_COUNT},
            }
        )

    async def get_descriptor(self, _: web.Request) -> web.Response:
        text = (await self._ask(lcp.DescriptorQuery()))[0].decode()
        d = pf.Descriptor.decode(text)
        return json_response(
            {
                "descriptor": text,
                "guild": d.pin.guild,
                "key": d.pin.key.hex(),
                "members": d.pin.members.hex(),
                "first": d.first.hex(),
            }
        )

    async def get_latest(self, _: web.Request) -> web.Response:
        data = (await self._ask(lcp.Checkpoints(-1, 1)))[0]
        return json_response(checkpoint_doc(Announced.decode(data)))

    async def get_checkpoint(self, request: web.Request) -> web.Response:
        height = parse_int(request.match_info["height"], "height", 0, MAX_HEIGHT)
        found = [Announced.decode(a) for a in await self._ask(lcp.Checkpoints(height, 1))]
        if not found or found[0].signed.checkpoint.height != height:
            raise ApiError(NOT_FOUND, f"no checkpoint at height {height} here (yet)")
        return json_response(checkpoint_doc(found[0]))

    async def get_checkpoints(self, request: web.Request) -> web.Response:
        start = query_int(request, "start", 0, MAX_HEIGHT, 0)
        count = query_int(request, "count", 1, MAX_COUNT, MAX_COUNT)
        found = await self._ask(lcp.Checkpoints(start, count))
        return json_response({"checkpoints": [checkpoint_doc(Announced.decode(a)) for a in found]})

    async def get_tx_proof(self, request: web.Request) -> web.Response:
        txid = parse_hex(request.match_info["txid"], "txid", 32)
        proof = (await self._ask(lcp.TxProofQuery(txid)))[0]
        heights = [c.checkpoint.height for c in pf.decode_tx_proof(proof).checkpoints]
        return json_response({"txid": txid.hex(), "checkpoints": heights, "proof": proof.hex()})

    async def get_coin_proof(self, request: web.Request) -> web.Response:
        """``?ledger=NAME``: the guild member whose ledger holds the coin (this
        operator's if not named)."""
        coin_id = parse_hex(request.match_info["coin_id"], "coin_id", 32)
        name = request.query.get("ledger", self.operator)
        if name not in self.members:
            raise ApiError("malformed.ledger", f"no guild member {name[:64]!r}")
        owner = self.members.index(name)
        proof = (await self._ask(lcp.CoinProofQuery(owner, coin_id)))[0]
        return json_response({"coin_id": coin_id.hex(), "ledger": name, "proof": proof.hex()})
