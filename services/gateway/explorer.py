"""The guild explorer: its pages (built from ``web/`` into ``web/dist``, served as
files) and the reads only it makes: every shard of the guild's ledgers with its leader
and heights, a shard's blocks, and payments a second.

The pages check what they show themselves: checkpoints against the guild key they
pinned, transaction and coin proofs against checkpoints (``web/src/verify.js``, the
same rules as ``constellation.lightclient.proof``). Nothing here is private: it is what
the ledger makes public anyway.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web

from constellation.replication.placement import COPIES
from services.gateway.api import Api, parse_int, query_int
from services.gateway.errors import ApiError, json_response
from services.partition.client import LedgerUnavailable

STATE_TIMEOUT_S = 1.0  # a shard whose leader does not answer within it shows as such
MAX_BLOCKS = 100  # blocks in one page
MAX_RATE_S = 600  # seconds of payments a second
# What a page may load from elsewhere: nothing (the websocket is this origin's too).
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'; img-src 'self' data:;"
    " object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
PAGES = {"/explorer/": "explorer.html", "/console/": "console.html"}


class Explorer:
    def __init__(self, api: Api, members: list[str], web_dir: Path) -> None:
        self.api = api
        self.members = members  # the guild's operators, in order (empty: not in a guild)
        self.web_dir = web_dir

    def install(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/", self.get_root)
        for path in PAGES:
            r.add_get(path, self.get_page)
        r.add_get("/assets/{name}", self.get_asset)
        r.add_get("/v1/shards", self.get_shards)
        r.add_get("/v1/blocks/{worker}", self.get_blocks)
        r.add_get("/v1/rate", self.get_rate)

    # -- the pages -----------------------------------------------------------------------

    def _file(self, name: str) -> web.FileResponse:
        path = self.web_dir / name
        if not path.is_file():
            raise ApiError(
                "unavailable",
                f"the web pages are not built here ({path} is missing): run scripts/setup",
            )
        # a .gz beside it goes to a browser that takes gzip (aiohttp picks it)
        return web.FileResponse(path, headers={**HEADERS, "Cache-Control": "no-cache"})

    async def get_root(self, _: web.Request) -> web.Response:
        raise web.HTTPFound("/explorer/")

    async def get_page(self, request: web.Request) -> web.FileResponse:
        return self._file(PAGES[request.path])

    async def get_asset(self, request: web.Request) -> web.FileResponse:
        name = request.match_info["name"]
        if name.startswith(".") or name.endswith((".html", ".gz")) or "/" in name:
            raise ApiError("not_found", "no such asset")
        if not (self.web_dir / name).is_file():
            raise ApiError("not_found", "no such asset")
        return self._file(name)

    # -- the reads -----------------------------------------------------------------------

    async def shards(self) -> dict[str, Any]:
        """Every shard of every ledger this gateway reaches: its leader (the copy that
        answered, its member and term), its heights and its coins."""
        asks = [
            (name, w, client.state(w, STATE_TIMEOUT_S))
            for name, client in self.api.ledgers.items()
            for w in client.pmap.workers
        ]
        answers = await asyncio.gather(*(a for *_, a in asks), return_exceptions=True)
        shards = []
        for (name, worker, _), st in zip(asks, answers, strict=True):
            doc: dict[str, Any] = {"ledger": name, "worker": worker}
            if isinstance(st, LedgerUnavailable):
                doc["error"] = "no leader answered"
            elif isinstance(st, BaseException):
                raise st
            else:
                doc |= {
                    "height": st.height,
                    "confirmed": st.confirmed if st.leader >= 0 else st.height,
                    "coins": st.coins,
                    "in_doubt": st.in_doubt,
                }
                if st.leader >= 0 and st.leader // COPIES < len(self.members):
                    doc["leader"] = {
                        "member": self.members[st.leader // COPIES],
                        "copy": st.leader % COPIES,
                        "term": st.term,
                    }
            shards.append(doc)
        return {
            "ledger": self.api.ledger.operator,
            "network": self.api.network.value,  # its addresses' prefix
            "members": self.members,
            "shards": shards,
        }

    async def get_shards(self, _: web.Request) -> web.Response:
        return json_response(await self.shards())

    async def get_blocks(self, request: web.Request) -> web.Response:
        """This ledger's blocks of one worker that changed coins, newest first, a page at
        a time (``before``: a height; a page's ``next``)."""
        workers = self.api.ledger.pmap.workers
        worker = parse_int(request.match_info["worker"], "worker", 0, max(workers))
        if worker not in workers:
            raise ApiError("not_found", f"no worker {worker} in this ledger")
        before = query_int(request, "before", 0, 2**62, 2**62)
        limit = query_int(request, "limit", 1, MAX_BLOCKS, 20)
        blocks = await self.api.index.blocks(worker, before, limit)
        for b in blocks:
            for rec in b["records"]:
                rec["changes"] = [self.api.described(c) for c in rec["changes"]]
        doc: dict[str, Any] = {
            "ledger": self.api.ledger.operator,
            "worker": worker,
            "blocks": blocks,
        }
        if len(blocks) == limit:
            doc["next"] = blocks[-1]["height"]
        return json_response(doc)

    async def get_rate(self, request: web.Request) -> web.Response:
        """Transactions committed in this ledger each second of the last ``seconds``."""
        seconds = query_int(request, "seconds", 1, MAX_RATE_S, 60)
        found = await self.api.index.rate(seconds)
        return json_response(
            {
                "ledger": self.api.ledger.operator,
                "seconds": seconds,
                "rate": [{"second": s, "txs": n} for s, n in found],
            }
        )
