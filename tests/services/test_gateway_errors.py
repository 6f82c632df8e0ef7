"""The gateway's error edge: every code of the core has its own status, the middleware
maps every exception to the documented JSON error, and query parameters are range-checked."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from constellation import errors
from constellation.address import Network
from constellation.ledger.pmap import PartitionMap
from constellation.protocol import ledger as proto
from services.gateway import api as gateway_api
from services.gateway.api import Api, tx_from_json
from services.gateway.errors import STATUS, STATUS_TEXT, ApiError, describe, status_of
from services.gateway.metrics import GatewayMetrics
from services.gateway.openapi import openapi

CODES = sorted(
    {
        cls.code
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.ConstellationError)
    }
)


@pytest.mark.parametrize("code", CODES)
def test_every_code_of_the_core_has_its_own_status(code: str) -> None:
    """A renamed code fails here instead of falling back to 400 unseen."""
    assert code in STATUS, f"{code} has no HTTP status in services/gateway/errors.py"


def test_codes_name_one_class_each() -> None:
    classes = [
        cls
        for name, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.ConstellationError) and not name.startswith("_")
    ]
    by_code: dict[str, list[str]] = {}
    for cls in classes:
        by_code.setdefault(cls.code, []).append(cls.__name__)
    assert {c: n for c, n in by_code.items() if len(n) > 1} == {}


def test_codes_of_the_api_edge_fall_back_to_their_family() -> None:
    assert status_of("malformed.json") == 400
    assert status_of("ledger.spent") == 409
    assert status_of(errors.Unavailable.code) == 503
    assert status_of("never.heard.of") == 400


def test_the_openapi_error_texts_come_from_the_status_map() -> None:
    doc = openapi()
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    assert response["description"] == describe(int(status)), (path, method)
                    assert int(status) in STATUS_TEXT
            assert "500" in operation["responses"], (path, method)
    assert "ledger.spent" in describe(409) and "malformed.*" in describe(400)


def test_an_unsigned_json_transaction_is_refused_by_name() -> None:
    body = (
        b'{"inputs": [{"coin_id": "' + b"11" * 32 + b'", "value_msat": 5}],'
        b' "outputs": [], "witnesses": []}'
    )
    with pytest.raises(errors.Unsigned):
        tx_from_json(body, Network.REGTEST)


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("limit=0", "malformed.limit"),
        ("limit=501", "malformed.limit"),
        ("limit=-1", "malformed.limit"),
        ("limit=%C2%B2", "malformed.limit"),  # "²": str.isdigit says yes, int() says no
        ("limit=" + "9" * 5000, "malformed.limit"),  # more digits than int() reads
        ("before=9223372036854775808", "malformed.before"),  # 2**63: past bigint
        ("before=18446744073709551616", "malformed.before"),
        ("before=", "malformed.before"),
        ("before=1e3", "malformed.before"),
    ],
)
def test_cursors_and_limits_are_range_checked(query: str, code: str) -> None:
    request = make_mocked_request("GET", f"/v1/address/x/history?{query}")
    name = query.split("=", maxsplit=1)[0]
    low, high = (1, gateway_api.HISTORY_LIMIT) if name == "limit" else (0, gateway_api.MAX_CURSOR)
    with pytest.raises(ApiError) as err:
        gateway_api.query_int(request, name, low, high, 50)
    assert err.value.code == code and err.value.status == 400


def test_cursor_bounds_are_accepted() -> None:
    request = make_mocked_request("GET", f"/h?before={2**63 - 1}&limit=500")
    assert gateway_api.query_int(request, "before", 0, gateway_api.MAX_CURSOR, 7) == 2**63 - 1
    assert gateway_api.query_int(request, "limit", 1, gateway_api.HISTORY_LIMIT, 50) == 500
    assert gateway_api.query_int(request, "absent", 1, 2, 50) == 50


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def client() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """The ``_errors`` middleware around handlers that fail in each way."""
    api = Api.__new__(Api)
    api.metrics = GatewayMetrics()
    app = web.Application()
    app.middlewares.append(api._errors)

    def failing(exc: BaseException) -> Handler:
        async def handler(_: web.Request) -> web.Response:
            raise exc

        return handler

    app.router.add_get("/bug", failing(RuntimeError("a bug")))
    app.router.add_get("/spent", failing(errors.CoinSpent("already spent by …")))
    app.router.add_get("/busy", failing(errors.Overloaded("queue full")))
    app.router.add_get("/gone", failing(ConnectionRefusedError("postgres")))
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_the_middleware_answers_every_failure_with_the_json_error(
    client: TestClient[web.Request, web.Application], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "gateway.api")
    expected = {
        "/bug": (500, "internal"),
        "/spent": (409, "ledger.spent"),
        "/busy": (429, "overloaded"),
        "/gone": (503, "unavailable"),
        "/nowhere": (404, "not_found"),
    }
    for path, (status, code) in expected.items():
        async with client.get(path) as resp:
            assert resp.status == status, path
            assert resp.content_type == "application/json"
            doc = await resp.json()
            assert doc["error"]["code"] == code and doc["error"]["message"], doc
            if status == 429:
                assert resp.headers["Retry-After"] == "1"
    bugs = [r for r in caplog.records if r.getMessage() == "unexpected error"]
    assert len(bugs) == 1 and bugs[0].exc_info is not None  # once, with its traceback


async def test_a_transaction_indexed_while_its_absence_is_checked_is_answered() -> None:
    """The lookup misses; before the index's cursors are read the indexer stores the
    block (it runs beside the gateway): the cursors no longer look behind the ledger,
    and the index holds it. Answered as committed, not with a final not_found."""
    txid = bytes(range(32))
    height = 7  # the block of worker 0 that holds it, in its events log already

    class RacingIndex:  # the indexer's commit lands right after the first lookup
        def __init__(self) -> None:
            self.rows: dict[bytes, dict[str, object]] = {}
            self.cursor = height - 1

        async def tx(self, wanted: bytes) -> dict[str, object] | None:
            found = self.rows.get(wanted)
            block = {"height": height}
            self.rows[txid] = {"fee_msat": 0, "block": block, "changes": [], "tx": None}
            self.cursor = height
            return found

        async def cursors(self) -> dict[int, int]:
            return {0: self.cursor}

    class Worker:  # how far worker 0's events log is
        operator, pmap = "op", PartitionMap.even(1)

        async def state(self, worker: int, timeout_s: float) -> proto.StateInfo:
            return proto.StateInfo(worker, 1, height + 1, 0, 0, 0, 0, 0, 0, 0, height)

    class NoTimeouts:
        async def timed_out_at(self, _: bytes) -> None:
            return None

    ledger, index = Worker(), RacingIndex()
    stand_ins: Any = [{"op": ledger}, "op", index, NoTimeouts(), *[None] * 3, 1, 1.0, {}, {}, {}]
    api = Api(*stand_ins)
    request = make_mocked_request("GET", f"/v1/tx/{txid.hex()}", match_info={"txid": txid.hex()})
    answer = await api.get_tx(request)
    assert answer.status == 200 and '"committed"' in (answer.text or "")
