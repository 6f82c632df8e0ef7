"""The gateway's public API, as its clients (the wallet, the mint, the workloads) call it."""

from __future__ import annotations

import asyncio
import time
from typing import Any, NamedTuple

import aiohttp

from constellation.address import decode_address
from constellation.errors import AlreadyCommitted, CoinSpent
from constellation.ledger.partition import Coin
from constellation.tx import AnyIssuance, Transaction
from services.gateway.errors import is_final

OUTCOME_WAIT_S = 60.0  # for the outcome of a payment that had no clear answer
OUTCOME_RETRY_S = 0.25


class GatewayError(RuntimeError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message} (HTTP {status})")
        self.status = status
        self.code = code

    @property
    def final(self) -> bool:
        """The ledger refused the request for good: sending it again changes nothing
        (not a timeout, an overload, or a transaction still being committed)."""
        return is_final(self.status, self.code)


class Sent(NamedTuple):
    """What became of a payment sent: ``committed`` (None: nobody could tell in time),
    and how it went (``how``): "committed", "gateway down" (never sent: the connection
    was refused), the error code of a refusal for good, "CODE, then committed" or "CODE,
    outcome unknown" where the first answer left it open ("no answer": none came)."""

    committed: bool | None
    how: str
    seconds: float  # from the submission to the answer that told


REFUSED_WAIT_S = 0.05  # after a refused connection: the gateway's supervisor restarts it


class Gateway:
    """The public API, over HTTP; transactions, issuances and totals go to ``ledger``
    (a guild member's name) where given, else to the gateway's own operator's."""

    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession,
        ledger: str | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> None:
        """``timeout``: of each request (else the session's)."""
        self.url = url.rstrip("/")
        self.session = session
        self.query = f"?ledger={ledger}" if ledger else ""
        self.timeout = timeout

    async def _json(self, resp: aiohttp.ClientResponse) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = await resp.json(content_type=None)
        except (aiohttp.ContentTypeError, ValueError, RecursionError):
            raise GatewayError(resp.status, "http", (await resp.text())[:200]) from None
        if resp.status >= 400:
            err = doc.get("error") if isinstance(doc, dict) else None
            if not isinstance(err, dict):
                raise GatewayError(resp.status, "http", str(doc)[:200])
            raise GatewayError(resp.status, str(err.get("code", "http")), str(err.get("message")))
        if not isinstance(doc, dict):
            raise GatewayError(resp.status, "http", f"not a JSON object: {str(doc)[:200]}")
        return doc

    async def get(self, path: str) -> dict[str, Any]:
        timeout = self.timeout or self.session.timeout
        async with self.session.get(self.url + path, timeout=timeout) as resp:
            return await self._json(resp)

    async def post(
        self, path: str, body: bytes, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        hdrs = {"Content-Type": "application/octet-stream", **(headers or {})}
        async with self.session.post(self.url + path, data=body, headers=hdrs) as resp:
            return await self._json(resp)

    async def submit(self, tx: Transaction, key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": key} if key else None
        return await self.post("/v1/tx" + self.query, tx.encode(), headers)

    async def outcome(self, tx: Transaction, timeout_s: float = OUTCOME_WAIT_S) -> bool:
        """Whether ``tx``, whose submission had no clear answer (a timeout, a lost
        connection), is committed: it is sent again until the ledger commits it, says it
        committed it before, or refuses it for good (the ledger commits a transaction
        once). Raises the last error where the outcome is still unknown after
        ``timeout_s``."""
        end = time.monotonic() + timeout_s
        while True:
            try:
                await self.submit(tx)
                return True
            except GatewayError as exc:
                if exc.code == AlreadyCommitted.code:
                    return True
                if exc.code == CoinSpent.code:  # by itself, where its record is gone
                    info = await self.coin(tx.inputs[0].coin_id)
                    return info is not None and info.get("spent_by") == tx.txid.hex()
                if exc.final:
                    return False
                if time.monotonic() > end:
                    raise
            except (aiohttp.ClientError, TimeoutError):
                if time.monotonic() > end:
                    raise
            await asyncio.sleep(OUTCOME_RETRY_S)

    async def send(self, tx: Transaction) -> Sent:
        """Submit ``tx`` and find out what became of it, whatever the gateway does
        meanwhile (a refusal for good, a timeout, a restart): a payer keeps its coin
        where ``committed`` is False, spends it where True, and cannot tell where None."""
        started = time.perf_counter()
        try:
            await self.submit(tx)
            return Sent(True, "committed", time.perf_counter() - started)
        except aiohttp.ClientConnectorError:
            await asyncio.sleep(REFUSED_WAIT_S)
            return Sent(False, "gateway down", time.perf_counter() - started)
        except (GatewayError, aiohttp.ClientError, TimeoutError) as exc:
            code = exc.code if isinstance(exc, GatewayError) else "no answer"
            if isinstance(exc, GatewayError) and exc.final:
                return Sent(False, code, time.perf_counter() - started)
        try:  # committed or not: sent again until the ledger says
            committed = await self.outcome(tx)
        except (GatewayError, aiohttp.ClientError, TimeoutError):
            return Sent(None, f"{code}, outcome unknown", time.perf_counter() - started)
        how = f"{code}, then committed" if committed else code
        return Sent(committed, how, time.perf_counter() - started)

    async def issue(self, issuance: AnyIssuance) -> dict[str, Any]:
        return await self.post("/v1/issuance" + self.query, issuance.encode())

    async def totals(self) -> dict[str, Any]:
        return await self.get("/v1/ledger" + self.query)

    async def settled(self, timeout_s: float = 15) -> dict[str, Any]:
        """The totals once no lock is held and nothing is in doubt, or the last read when
        ``timeout_s`` passes first. A receipt comes once a payment's outcome is decided;
        its other workers apply it just after, so totals read at once may lag it."""
        end = time.monotonic() + timeout_s
        while True:
            doc = await self.totals()
            if (doc["locks"] == 0 and doc["in_doubt"] == 0) or time.monotonic() > end:
                return doc
            await asyncio.sleep(0.05)

    async def coin(self, coin_id: bytes) -> dict[str, Any] | None:
        """A coin's state, or None where the ledger has no such coin."""
        try:
            return await self.get(f"/v1/coin/{coin_id.hex()}" + self.query)
        except GatewayError as exc:
            if exc.status == 404:
                return None
            raise

    async def coins(self, address: str) -> dict[bytes, Coin]:
        """Every unspent coin of ``address``, page by page."""
        # The wallet's own address: its network is whatever its prefix says.
        owner = decode_address(address, address.rpartition("1")[0].lower())
        found: dict[bytes, Coin] = {}
        after = 0
        while True:
            doc = await self.get(f"/v1/address/{address}/coins?limit=500&after={after}")
            found.update(
                (bytes.fromhex(c["coin_id"]), Coin(c["value_msat"], owner))
                for c in doc["coins"]
                if c["status"] == "unspent"
            )
            if "next" not in doc:
                return found
            after = doc["next"]

    async def incoming(self, address: str, limit: int = 50) -> list[dict[str, Any]]:
        """The last ``limit`` outputs paid to ``address`` from other operators' ledgers
        (pending, released)."""
        doc = await self.get(f"/v1/address/{address}/incoming?limit={limit}")
        entries: list[dict[str, Any]] = doc["incoming"]
        return entries

    async def pending_incoming(self, address: str) -> list[dict[str, Any]]:
        """Every output paid to ``address`` from another operator's ledger and not
        released here yet, a page at a time."""
        found: list[dict[str, Any]] = []
        cursor = ""
        while True:
            path = f"/v1/address/{address}/incoming?status=pending&limit=500{cursor}"
            doc = await self.get(path)
            found += doc["incoming"]
            if "next" not in doc:
                return found
            cursor = f"&before={doc['next']}"

    async def history(
        self, address: str, limit: int = 50, before: int | None = None
    ) -> list[dict[str, Any]]:
        """``address``'s history, newest first: ``limit`` entries before ``before`` (an
        entry's ``seq``: the page after the one that ended there)."""
        cursor = "" if before is None else f"&before={before}"
        doc = await self.get(f"/v1/address/{address}/history?limit={limit}{cursor}")
        entries: list[dict[str, Any]] = doc["history"]
        return entries
