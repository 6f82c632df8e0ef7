"""A gateway that lies: it forwards to an honest one, and forges, withholds or serves
stale what ``mode`` says (the light-client and explorer tests)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import web

from constellation.lightclient import proof as pf


class Liar:
    """A gateway that forwards to an honest one, and lies where ``mode`` says."""

    def __init__(self, upstream: str, other_ledger: str) -> None:
        self.upstream = upstream
        self.other_ledger = other_ledger
        self.mode = "honest"
        self.session: aiohttp.ClientSession | None = None
        self.messages: list[dict[str, Any]] = []  # over the websocket, both ways

    async def _get(self, path: str) -> tuple[int, bytes]:
        assert self.session is not None
        async with self.session.get(self.upstream + path) as r:
            return r.status, await r.read()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        path = request.path_qs
        if path == "/v1/lc/ws":
            return await self.socket(request)
        if request.method == "GET" and self.mode == "forge" and path.startswith("/v1/lc/tx/"):
            status, body = await self._get(path)
            doc = json.loads(body)
            doc["proof"] = forge(doc["proof"])
            return web.json_response(doc, status=status)
        if (
            request.method == "GET"
            and self.mode == "entries"
            and path.startswith("/v1/lc/checkpoints?")
        ):
            status, body = await self._get(path)
            doc = json.loads(body)
            for c in doc["checkpoints"]:  # the last entry's state, one bit off
                c["encoded"] = c["encoded"][:-2] + f"{int(c['encoded'][-2:], 16) ^ 1:02x}"
            return web.json_response(doc, status=status)
        if request.method == "GET" and self.mode == "members" and path == "/v1/lc/descriptor":
            status, body = await self._get(path)
            doc = json.loads(body)
            keys = doc["member_keys"]
            keys[0]["name"], keys[1]["name"] = keys[1]["name"], keys[0]["name"]
            return web.json_response(doc, status=status)
        if request.method == "GET" and self.mode == "stale" and path == "/v1/lc/checkpoints/latest":
            status, body = await self._get("/v1/lc/checkpoints/0")
            return web.Response(body=body, status=status, content_type="application/json")
        if request.method == "GET" and self.mode == "withhold" and path.startswith("/v1/lc/coin/"):
            # a true proof that the coin is not in another ledger's shard
            status, body = await self._get(path.split("?")[0] + f"?ledger={self.other_ledger}")
            return web.Response(body=body, status=status, content_type="application/json")
        async with self.session.request(
            request.method,
            self.upstream + path,
            data=await request.read(),
            headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
        ) as r:
            return web.Response(body=await r.read(), status=r.status, content_type=r.content_type)

    async def socket(self, request: web.Request) -> web.WebSocketResponse:
        """The websocket, both ways; a pushed change's proof forged where ``mode`` says."""
        assert self.session is not None
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        upstream = self.upstream.replace("http", "ws", 1) + "/v1/lc/ws"
        async with self.session.ws_connect(upstream) as up:

            async def down() -> None:
                async for msg in up:
                    doc = json.loads(msg.data)
                    self.messages.append(doc)
                    if self.mode == "forge" and doc.get("method") == "address.update":
                        doc["params"]["proof"] = forge(doc["params"]["proof"])
                    if self.mode == "skip" and doc.get("method") == "checkpoints.new":
                        self.mode = "honest"  # one withheld, with what it did
                        continue
                    await ws.send_json(doc)
                await ws.close()

            task = asyncio.create_task(down())
            async for msg in ws:
                self.messages.append(json.loads(msg.data))
                await up.send_str(msg.data)
            task.cancel()
        return ws


def forge(proof_hex: str) -> str:
    """A transaction proof with its first record changed (its fee, one more)."""
    proof = pf.decode_tx_proof(bytes.fromhex(proof_hex))
    part = proof.parts[0]
    record = pf.Record.decode(part.record)
    forged = record._replace(fee_msat=record.fee_msat + 1)
    parts = [part._replace(record=forged.encode()), *proof.parts[1:]]
    return pf.encode_tx_proof(proof._replace(parts=parts)).hex()
