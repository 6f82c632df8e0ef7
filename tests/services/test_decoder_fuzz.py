"""The decoders that read untrusted bytes, fuzzed: the transaction and issuance codecs,
the gateway's JSON transactions and batch framing, and the workers' packages, blocks,
events and events pages. Each gets arbitrary bytes and mutations of valid encodings (bytes flipped,
cut, inserted, repeated; counts and lengths set to their edges; JSON fields replaced by
any JSON value). The only exceptions allowed are the typed rejections: the core's
``ConstellationError`` subclasses and the API's ``ApiError``.

Inputs per decoder: ``CST_FUZZ_EXAMPLES`` (default 400: about 15 s for all of them);
``CST_FUZZ_EXAMPLES=20000 pytest tests/services/test_decoder_fuzz.py -s`` for a long
run. Each test prints how many inputs it ran (``-s`` shows it) and fails if it ran
fewer than it should have.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from constellation.address import Network, encode_address
from constellation.errors import ConstellationError
from constellation.protocol import ledger as proto
from constellation.tx import Issuance, Transaction, TxOutput, decode_issuance, decode_transaction
from services.gateway.api import parse_batch, tx_from_json
from services.gateway.errors import ApiError
from tests.strategies import KEYS, transactions

EXAMPLES = int(os.environ.get("CST_FUZZ_EXAMPLES", "400"))
TYPED = (ConstellationError, ApiError)

Decoder = Callable[[bytes], object]
Mutation = tuple[str, int, bytes]


# -- valid encodings to start from ------------------------------------------------------

tx_bytes = transactions().map(Transaction.encode)


@st.composite
def issuance_bytes(draw: st.DrawFn) -> bytes:
    key = draw(st.sampled_from(KEYS))
    outputs = draw(
        st.lists(
            st.builds(
                TxOutput, st.integers(1, 2**64 - 1), st.sampled_from([k.pubkey for k in KEYS])
            ),
            min_size=1,
            max_size=4,
        )
    )
    nonce = draw(st.integers(0, 2**64 - 1))
    return Issuance(key.pubkey, nonce, outputs).signed_by(key.secret, b"\x00" * 32).encode()


@st.composite
def batch_bytes(draw: st.DrawFn) -> bytes:
    items = draw(st.lists(st.one_of(tx_bytes, st.binary(max_size=200)), max_size=4))
    return b"".join(struct.pack(">I", len(i)) + i for i in items)


def _tx_doc(tx: Transaction) -> dict[str, Any]:
    return {
        "inputs": [{"coin_id": c.hex(), "value_msat": v} for c, v in tx.inputs],
        "outputs": [
            {"address": encode_address(k, Network.REGTEST), "value_msat": v} for v, k in tx.outputs
        ],
        "fee_msat": tx.fee_msat,
        "witnesses": [w.hex() for w in tx.witnesses],
    }


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


tx_json = transactions().map(lambda tx: json.dumps(_tx_doc(tx)).encode())


@st.composite
def tx_json_replaced(draw: st.DrawFn) -> bytes:
    """A valid JSON transaction with some of its fields (at any depth) replaced."""
    doc: Any = _tx_doc(draw(transactions()))
    for _ in range(draw(st.integers(1, 3))):
        parent: Any = None
        key: Any = None
        node = doc
        while isinstance(node, dict | list) and node and draw(st.booleans()):
            keys = sorted(node) if isinstance(node, dict) else range(len(node))
            parent, key = node, draw(st.sampled_from(keys))
            node = node[key]
        if parent is None:
            doc = draw(JSON_VALUES)
        else:
            parent[key] = draw(JSON_VALUES)
    return json.dumps(doc).encode()


_ITEMS = st.one_of(
    st.builds(proto.Submit, st.integers(0, 2**64 - 1), tx_bytes),
    st.builds(proto.Issue, st.integers(0, 2**64 - 1), issuance_bytes()),
    st.builds(proto.Prepare, tx_bytes, st.integers(0, 2**64 - 1)),
    st.builds(
        proto.Vote,
        st.binary(min_size=32, max_size=32),
        st.sampled_from(["", "ledger.spent"]),
        st.text(max_size=20),
        st.integers(0, 2**63),
        st.integers(0, 2**64 - 1),
    ),
    st.builds(proto.Decide, st.binary(min_size=32, max_size=32), st.booleans(), st.integers(0, 9)),
    st.builds(proto.Ask, st.binary(min_size=32, max_size=32), st.integers(0, 9)),
    st.builds(proto.Done, st.binary(min_size=32, max_size=32), st.integers(0, 9)),
    st.builds(
        proto.Result,
        st.integers(0, 2**64 - 1),
        st.just(""),
        st.just(""),
        st.lists(st.tuples(st.integers(0, 7), st.integers(0, 2**40)), max_size=3),
    ),
)
package_bytes = st.builds(
    proto.Package,
    st.just(proto.PROTOCOL_VERSION),
    st.integers(-1, 64),
    st.text(max_size=30),
    st.integers(0, 2**32),
    st.lists(_ITEMS, max_size=4),
).map(proto.encode)

_RECORDS = st.one_of(
    st.builds(proto.Prepared, tx_bytes, st.integers(0, 7), st.integers(0, 9)),
    st.builds(proto.Committed, st.binary(min_size=32, max_size=32), tx_bytes, st.integers(0, 9)),
    st.builds(proto.Aborted, st.binary(min_size=32, max_size=32)),
    st.builds(proto.Issued, issuance_bytes()),
    st.builds(proto.Ended, st.binary(min_size=32, max_size=32)),
)
block_bytes = st.builds(
    proto.Block, st.integers(0, 64), st.integers(0, 2**63), st.lists(_RECORDS, max_size=4)
).map(proto.encode)

_CHANGES = st.builds(
    proto.CoinChange,
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=32, max_size=32),
    st.integers(1, 2**64 - 1),
    st.booleans(),
)
block_events = st.builds(
    proto.BlockEvents,
    st.integers(0, 64),
    st.integers(0, 2**63),
    st.integers(-1, 2**63),
    st.lists(_CHANGES, max_size=4),
    st.lists(st.tuples(st.binary(min_size=32, max_size=32), st.integers(0, 2**40)), max_size=3),
)
block_events_bytes = block_events.map(proto.encode_block_events)
events_bytes = st.lists(block_events_bytes, max_size=3).map(proto.encode_events)


@st.composite
def page_bytes(draw: st.DrawFn) -> bytes:
    """A worker's page of events: its blocks in order, each chained to the one before."""
    heights = sorted(draw(st.sets(st.integers(0, 2**40), max_size=4)))
    blocks = [
        proto.encode_block_events(
            proto.BlockEvents(3, h, prev, draw(st.lists(_CHANGES, max_size=3)), [])
        )
        for prev, h in zip([-1, *heights], heights, strict=False)
    ]
    return proto.encode_page(heights[-1] if heights else -1, blocks)


# -- mutations ----------------------------------------------------------------------------

EDGES = [b"\x00", b"\xff", b"\x00\x00", b"\xff\xff", b"\x01\x00", b"\x00\x01", b"\x7f\xff"]
EDGES += [b"\x00" * 4, b"\xff" * 4, b"\xff" * 8, b"\x80" + b"\x00" * 7]
EDGES += [b"\xcf" + b"\xff" * 8, b"\xdc\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xc1", b"\x90"]

MUTATION = st.tuples(
    st.sampled_from(["flip", "cut", "insert", "delete", "repeat", "edge"]),
    st.integers(0, 1 << 16),
    st.one_of(st.binary(min_size=1, max_size=16), st.sampled_from(EDGES)),
)


def mutate(data: bytes, mutations: list[Mutation]) -> bytes:
    """``data`` with each mutation applied in turn, at a position modulo its length."""
    buf = bytearray(data)
    for kind, where, extra in mutations:
        at = where % (len(buf) + 1)
        if kind == "flip" and buf:
            at %= len(buf)
            buf[at] ^= extra[0] or 1
        elif kind == "cut":
            del buf[at:]
        elif kind == "insert":
            buf[at:at] = extra
        elif kind == "delete":
            del buf[at : at + len(extra)]
        elif kind == "repeat":
            buf[at:at] = buf[at : at + len(extra) * 4]
        elif kind == "edge":
            buf[at : at + len(extra)] = extra
    return bytes(buf)


def mutated(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.builds(mutate, valid, st.lists(MUTATION, min_size=1, max_size=4))


# -- the decoders -------------------------------------------------------------------------

# name: (decoder, valid encodings, what to mutate them into)
TARGETS: dict[str, tuple[Decoder, st.SearchStrategy[bytes], st.SearchStrategy[bytes]]] = {
    "decode_transaction": (decode_transaction, tx_bytes, mutated(tx_bytes)),
    "decode_transaction(check_owners=False)": (
        lambda b: decode_transaction(b, check_owners=False),
        tx_bytes,
        mutated(tx_bytes),
    ),
    "decode_issuance": (decode_issuance, issuance_bytes(), mutated(issuance_bytes())),
    "parse_batch": (parse_batch, batch_bytes(), mutated(batch_bytes())),
    "tx_from_json": (
        lambda b: tx_from_json(b, Network.REGTEST),
        tx_json,
        st.one_of(tx_json_replaced(), mutated(tx_json)),
    ),
    "decode_package": (proto.decode_package, package_bytes, mutated(package_bytes)),
    "decode_block": (proto.decode_block, block_bytes, mutated(block_bytes)),
    "decode_events": (proto.decode_events, events_bytes, mutated(events_bytes)),
    "decode_block_events": (
        proto.decode_block_events,
        block_events_bytes,
        mutated(block_events_bytes),
    ),
    "decode_page": (proto.decode_page, page_bytes(), mutated(page_bytes())),
}


def run(decoder: Decoder, inputs: st.SearchStrategy[bytes], examples: int) -> tuple[int, int]:
    """Feed ``examples`` inputs to ``decoder``: (inputs run, inputs it accepted)."""
    ran = accepted = 0

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(inputs)
    def fuzz(data: bytes) -> None:
        nonlocal ran, accepted
        ran += 1
        try:
            decoder(data)
        except TYPED:
            return
        accepted += 1

    fuzz()
    return ran, accepted


@pytest.mark.parametrize("name", TARGETS)
def test_arbitrary_bytes_get_only_typed_rejections(name: str) -> None:
    decoder, _, _ = TARGETS[name]
    ran, accepted = run(decoder, st.binary(max_size=4096), EXAMPLES)
    print(f"\n{name}: {ran} arbitrary inputs, {accepted} accepted")
    assert ran >= min(EXAMPLES, 100)


@pytest.mark.parametrize("name", TARGETS)
def test_mutated_encodings_get_only_typed_rejections(name: str) -> None:
    decoder, valid, mutations = TARGETS[name]
    seeds, accepted = run(decoder, valid, 20)
    assert accepted == seeds, "the valid encodings that mutations start from are refused"
    ran, accepted = run(decoder, mutations, EXAMPLES)
    print(f"\n{name}: {ran} mutated inputs, {accepted} accepted (and {seeds} valid ones)")
    assert ran >= min(EXAMPLES, 100)
