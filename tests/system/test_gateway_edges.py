"""The gateway's edges against a real operator: whatever comes in, the answer is the
documented JSON error (never a 500), and bad websocket frames end the socket quietly.

``test_the_api_holds_its_openapi_document_under_fuzzing`` generates requests from
``/openapi.json`` with schemathesis, valid and invalid ones, for every operation, and
checks each answer: no 5xx, a documented status, the documented content type, headers
and body schema, within a per-request timeout. Requests per operation:
``CST_FUZZ_EXAMPLES`` (default 150, about 15 s in all on two cores), e.g.
``CST_FUZZ_EXAMPLES=5000 pytest tests/system/test_gateway_edges.py -s`` for a long run.
It prints how many requests each operation got, and the statuses they were answered.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from constellation.address import Network, encode_address
from constellation.keys import SigningKey
from constellation.tx import Transaction, TxOutput
from services.api_client import Gateway
from tests.system.operator import Operator, pay, post

EXAMPLES = int(os.environ.get("CST_FUZZ_EXAMPLES", "150"))
REQUEST_TIMEOUT_S = 10
HTTP_LINE_LIMIT = 8190  # aiohttp's max_line_size and max_field_size


class Seeded:
    """An operator with a little history: a coin of alice's paid to bob."""

    def __init__(self) -> None:
        self.op = Operator(workers=2)
        self.alice, self.bob = SigningKey(os.urandom(32)), SigningKey(os.urandom(32))
        self.coin, self.tx = asyncio.run(self._pay())

    async def _pay(self) -> tuple[bytes, Transaction]:
        async with aiohttp.ClientSession() as session:
            gw = Gateway(self.op.url, session)
            coin = await self.op.fund(gw, self.alice, 10_000)
            tx = pay([(coin, 10_000, self.alice)], [TxOutput(9_000, self.bob.pubkey)], 1_000)
            await gw.submit(tx)
            end = time.monotonic() + 15
            bob = encode_address(self.bob.pubkey, Network.REGTEST)
            while not await gw.history(bob):  # indexed: lookups find something
                assert time.monotonic() < end, "the index never caught up"
                await asyncio.sleep(0.1)
        return coin, tx

    def gateway_log(self) -> str:
        return (Path(self.op.net.dir) / "gateway.log").read_text()

    def path_parameters(self) -> list[dict[str, str]]:
        """Values the API knows, so that requests also reach the index and the ledger."""
        return [
            {
                "address": encode_address(key.pubkey, Network.REGTEST),
                "txid": self.tx.txid.hex(),
                "coin_id": coin.hex(),
            }
            for key, coin in ((self.alice, self.coin), (self.bob, self.tx.output_ids[0]))
        ]


@pytest.fixture(scope="module")
def seeded() -> Iterator[Seeded]:
    s = Seeded()
    yield s
    s.op.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str, Any]:
    async with session.get(url) as resp:
        return resp.status, resp.content_type, await resp.json(content_type=None)


async def test_inputs_that_answered_500_get_the_json_error(
    seeded: Seeded, session: aiohttp.ClientSession
) -> None:
    url = seeded.op.url
    address = encode_address(seeded.bob.pubkey, Network.REGTEST)
    malformed = [("/v1/address", b) for b in (2**63, 2**64, 10**30, "-1", "²", "1" * 5000)]
    malformed += [("/v1/lc/address", b) for b in ("-1", "²", "²." + "00" * 32, "1" * 5000)]
    for path, before in malformed:
        status, ctype, doc = await get(session, f"{url}{path}/{address}/history?before={before}")
        assert (status, ctype, doc["error"]["code"]) == (
            400,
            "application/json",
            "malformed.before",
        ), (path, before)
    status, _, doc = await get(session, f"{url}/v1/address/{address}/history?before={2**63 - 1}")
    assert status == 200 and doc["history"], doc
    for limit in (0, 501, "²", 2**64):
        status, _, doc = await get(session, f"{url}/v1/address/{address}/coins?limit={limit}")
        assert (status, doc["error"]["code"]) == (400, "malformed.limit")
    signed = seeded.tx
    tx_doc = {
        "inputs": [{"coin_id": c.hex(), "value_msat": v} for c, v in signed.inputs],
        "outputs": [
            {"address": encode_address(k, Network.REGTEST), "value_msat": v}
            for v, k in signed.outputs
        ],
        "fee_msat": signed.fee_msat,
    }
    for witnesses in ([], [signed.witnesses[0].hex()] * 2):
        body = json.dumps({**tx_doc, "witnesses": witnesses}).encode()
        status, doc, _ = await post(session, url + "/v1/tx", body, "application/json")
        assert (status, doc["error"]["code"]) == (400, "invalid.unsigned"), doc
        assert "one signature per input" in doc["error"]["message"]
    for key in ("é", "x" * 129):
        status, doc, _ = await post(
            session, url + "/v1/tx", signed.encode(), headers={"Idempotency-Key": key}
        )
        assert (status, doc["error"]["code"]) == (400, "malformed.idempotency_key")
    assert "Traceback" not in seeded.gateway_log()


async def test_bad_websocket_frames_end_the_socket_without_a_traceback(
    seeded: Seeded, session: aiohttp.ClientSession
) -> None:
    """Oversized frames (over 64 KiB), binary frames, bad subscriptions, and clients that
    leave while the gateway answers: each socket ends or is answered, nothing is logged
    above debug, and the gateway goes on serving."""
    url = seeded.op.url + "/v1/ws"
    oversized = json.dumps({"subscribe": ["x" * (70 << 10)]})
    for _ in range(5):
        async with session.ws_connect(url) as ws:
            await ws.send_str(oversized)
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE, msg
            assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    async with session.ws_connect(url) as ws:
        for bad in ("{not json", "[]", '{"subscribe": 5}', '{"subscribe": ["nope"]}', '{"x": 1}'):
            await ws.send_str(bad)
            assert (await ws.receive_json(timeout=5))["type"] == "error", bad
        await ws.send_bytes(b"\x00binary")
        assert (await ws.receive_json(timeout=5))["code"] == "malformed"
        await ws.send_str(oversized)  # after the bad ones: closed as well
        assert (await ws.receive(timeout=5)).type == aiohttp.WSMsgType.CLOSE
    for _ in range(3):  # frames the gateway answers or refuses, then the client is gone
        for frame in (b"\x00binary", "{", oversized):
            ws = await session.ws_connect(url)
            if isinstance(frame, bytes):
                await ws.send_bytes(frame)
            else:
                await ws.send_str(frame)
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY)
    async with session.ws_connect(url) as ws:
        address = encode_address(seeded.bob.pubkey, Network.REGTEST)
        await ws.send_str(json.dumps({"subscribe": [address]}))
        assert (await ws.receive_json(timeout=5)) == {"type": "subscribed", "count": 1}
    status, _, _ = await get(session, seeded.op.url + "/v1/ledger")
    assert status == 200
    await asyncio.sleep(0.5)  # what the gateway would log about the last sockets
    assert "Traceback" not in seeded.gateway_log()


def checks() -> list[Any]:
    """No 5xx; the status, content type, headers and body as the document says."""
    schemathesis.checks.load_all_checks()
    names = [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
    ]
    return [getattr(schemathesis.checks, name) for name in names]


def beyond_http_limits(request: requests.PreparedRequest) -> bool:
    """Whether aiohttp's HTTP parser refuses ``request`` before the API sees it (a request
    line or a header line over ``HTTP_LINE_LIMIT``), answering a plain-text 400."""
    target = urlsplit(request.url or "")
    line = f"{request.method} {target.path}?{target.query} HTTP/1.1"
    sizes = [len(line.encode())]
    for name, value in request.headers.items():
        raw = value if isinstance(value, bytes) else value.encode()
        sizes.append(len(name) + 2 + len(raw))
    return max(sizes) > HTTP_LINE_LIMIT


def fuzz(
    cases: st.SearchStrategy[schemathesis.Case[Any]],
    url: str,
    http: requests.Session,
    validate: list[Any],
) -> Counter[int | str]:
    """Send ``EXAMPLES`` of ``cases`` and check each answer: how many got each status
    (and how many the HTTP layer refused, as ``"http"``)."""
    answered: Counter[int | str] = Counter()
    sent_with = {"base_url": url, "session": http, "timeout": REQUEST_TIMEOUT_S}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(cases)
    def run(case: schemathesis.Case[Any]) -> None:
        response = case.call(base_url=url, session=http, timeout=REQUEST_TIMEOUT_S)
        if beyond_http_limits(response.request):
            # Refused by the HTTP server, as the document's description says; the JSON
            # error is the API's own, for what it reads.
            assert response.status_code == 400, response.status_code
            answered["http"] += 1
            return
        case.validate_response(response, checks=validate, transport_kwargs=sent_with)
        answered[response.status_code] += 1

    run()
    return answered


def test_the_api_holds_its_openapi_document_under_fuzzing(seeded: Seeded) -> None:
    url = seeded.op.url
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    known = seeded.path_parameters()
    validate = checks()
    answered: dict[str, Counter[int | str]] = {}
    http = requests.Session()
    started = time.monotonic()
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()  # the document itself is valid
        operations.append(result.ok())
    assert len(operations) >= 9
    for operation in operations:
        names = {p.name for p in operation.path_parameters}
        strategies = []
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategies.append(operation.as_strategy(generation_mode=mode))
            for values in known if names else []:
                pinned = {k: v for k, v in values.items() if k in names}
                strategies.append(
                    operation.as_strategy(generation_mode=mode, path_parameters=pinned)
                )
        answered[operation.label] = fuzz(st.one_of(strategies), url, http, validate)
    took = time.monotonic() - started
    sent = {label: sum(statuses.values()) for label, statuses in answered.items()}
    report = "\n".join(f"  {op}: {n} requests, {dict(answered[op])}" for op, n in sent.items())
    print(f"\nschemathesis: {sum(sent.values())} requests in {took:.1f} s\n{report}")
    assert all(sent[operation.label] >= 1 for operation in operations), sent
    # Operations with inputs get many distinct requests, and some reach a 200.
    assert sum(sent.values()) >= 6 * min(EXAMPLES, 100)
    assert answered["GET /v1/address/{address}/history"][200] > 0
    assert answered["GET /v1/coin/{coin_id}"][200] > 0
    assert "Traceback" not in seeded.gateway_log()
