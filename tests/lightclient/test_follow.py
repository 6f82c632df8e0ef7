"""Following addresses against untrusted gateways (``services.light``): what a change
is told as of is what its proof shows, not a gateway's label; a websocket call has one
deadline however the gateway chatters, bounded notifications, and a malformed answer is
the gateway's failure; and a gateway that could not read a checkpoint's pushes says so
(``services.gateway.lcws``), so that its followers read the history again."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import aiohttp
import pytest

from constellation.lightclient import index as lc
from constellation.lightclient import proof as pf
from services import light
from services.api_client import GatewayError
from services.gateway.errors import ApiError
from services.gateway.lcws import Conn, LightSockets
from services.gateway.metrics import GatewayMetrics
from services.light import LightClient, Rpc, Update
from tests.lightclient.test_proofs import LEDGERS, PIN

LEDGER = LEDGERS[0]
FIRST = LEDGER.signed[0].checkpoint.checkpoint.message()


async def test_a_change_is_told_as_of_its_proof_and_none_below_where_following_began() -> None:
    """A gateway serves a payment under checkpoint 0 as new (labelled 3): told as of
    checkpoint 0 to a wallet following from there, not at all to one following from 2
    (it was told before: every `wallet follow` could otherwise be fed old payments)."""
    txid = next(iter(LEDGER.txs))
    proof = lc.tx_proof(map(lc.held, LEDGER.signed), txid)
    assert proof is not None
    placed = pf.verify_tx(PIN, proof, txid)
    assert {p.checkpoint for p in placed} == {0}
    owner = placed[0].record.changes[0].owner
    doc = {"txid": txid.hex(), "proof": pf.encode_tx_proof(proof).hex(), "checkpoint": 3}
    told: list[Update] = []

    async def tell(update: Update) -> bool:
        told.append(update)
        return True

    session: Any = None  # asks no gateway
    client = LightClient(pf.Descriptor(PIN, FIRST), [], session)
    assert await client._tell("gw", "addr", owner, doc, {"since": 2, "floor": 2}, set(), tell)
    assert told == []
    assert await client._tell("gw", "addr", owner, doc, {"since": 0, "floor": 0}, set(), tell)
    [update] = told
    assert update.checkpoint == 0 and update.txid == txid


class Socket:
    """A gateway's side of a websocket: the messages it sends, one every ``gap_s``."""

    def __init__(self, messages: list[str], gap_s: float = 0.0, forever: str = "") -> None:
        self.messages, self.gap_s, self.forever = deque(messages), gap_s, forever
        self.sent: list[Any] = []

    async def send_json(self, doc: Any) -> None:
        self.sent.append(doc)

    async def receive(self, timeout: float) -> aiohttp.WSMessage:
        async with asyncio.timeout(timeout):
            await asyncio.sleep(self.gap_s)
            text = self.messages.popleft() if self.messages else self.forever
            if not text:
                await asyncio.sleep(3600)
        return aiohttp.WSMessage(aiohttp.WSMsgType.TEXT, text, None)


NOTE = '{"jsonrpc": "2.0", "method": "checkpoints.new", "params": {}}'


async def test_a_call_has_one_deadline_and_bounded_notifications(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(light, "CALL_TIMEOUT_S", 0.3)
    chatter: Any = Socket([], gap_s=0.01, forever=NOTE)  # never answers, never quiet
    started = asyncio.get_running_loop().time()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(5):  # (where each message put it off: never)
            await Rpc(chatter).call("checkpoints.subscribe")
    assert asyncio.get_running_loop().time() - started < 1.0
    flood: Any = Socket([NOTE] * (light.MAX_NOTES + 1))
    with pytest.raises(GatewayError, match="notifications"):
        await Rpc(flood).call("checkpoints.subscribe")


@pytest.mark.parametrize(
    "answer",
    [
        '{"jsonrpc": "2.0", "id": 1, "error": "no object"}',
        '{"jsonrpc": "2.0", "id": 1, "error": {"message": "m", "data": 7}}',
        '{"jsonrpc": "2.0", "id": 1, "x": ' + "[" * 5000 + "]" * 5000 + "}",
    ],
)
async def test_a_malformed_answer_is_a_failure_of_its_gateway(answer: str) -> None:
    """Each is one of the faults that move a client to the next gateway (it escaped:
    an AttributeError ended the follow, a RecursionError the search for a checkpoint)."""
    sock: Any = Socket([answer])
    with pytest.raises(light.SERVER_FAULTS):
        await Rpc(sock).call("checkpoints.subscribe")


async def test_a_checkpoint_whose_pushes_could_not_be_read_is_said_to_its_followers() -> None:
    """The indexer does not answer for a checkpoint's pushes: each socket following an
    address is told (an error: its client reads the history from the last checkpoint it
    followed), not left to take the checkpoint as one that changed nothing."""

    class Unanswered:
        async def ask(self, _: object) -> None:
            raise ApiError("unavailable", "the indexer did not answer")

    class Pushed:
        def __init__(self) -> None:
            self.docs: list[dict[str, Any]] = []
            self.cut = False

        def push(self, doc: dict[str, Any]) -> bool:
            self.docs.append(doc)
            return True

    stand_ins: Any = (Unanswered(), None, GatewayMetrics(), None)
    sockets = LightSockets(*stand_ins)
    sock, quiet = Pushed(), Pushed()
    following, other = Conn(sock, "a"), Conn(quiet, "b")  # type: ignore[arg-type]
    for conn in (following, other):
        sockets.conns.add(conn)
    sockets._add(following, ("address", bytes(32)), "addr")
    announced: Any = type("A", (), {"signed": LEDGER.signed[1].checkpoint})()
    await sockets._pushes(announced)
    [note] = sock.docs
    assert note["method"] == "error" and "checkpoint 1" in note["params"]["message"]
    assert quiet.docs == []  # follows nothing: told nothing
