"""The OpenAPI 3.1 document of the public API (served at ``/openapi.json``).

It documents every status an operation can answer (500 included: a bug, still answered
with the JSON error), and its error descriptions come from ``services.gateway.errors``,
where the codes are mapped to statuses.
"""

from __future__ import annotations

from typing import Any

from services.gateway.errors import describe
from services.runtime import OPERATOR_RE

HEX32 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
HEX32_IN = {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}
MSAT = {"type": "integer", "minimum": 0, "maximum": 2**64 - 1}
INT = {"type": "integer"}
BLOCK = {
    "type": "object",
    "properties": {"worker": INT, "height": INT},
    "required": ["worker", "height"],
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before trying again",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}


def _errors(*statuses: int) -> dict[str, Any]:
    """The JSON error for each of ``statuses``, and for 500 (a bug)."""
    answers = {}
    for status in sorted({*statuses, 500}):
        answers[str(status)] = _json(_ref("Error"), describe(status))
        if status in (429, 503):
            answers[str(status)]["headers"] = RETRY_AFTER
    return answers


def _path_param(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _object(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required}


LIMIT = {
    "name": "limit",
    "in": "query",
    "schema": {"type": "integer", "minimum": 1, "maximum": 500},
}
BEFORE = {
    "name": "before",
    "in": "query",
    "description": "a history cursor: the seq of the last entry of the previous page",
    "schema": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
}
AFTER = {
    "name": "after",
    "in": "query",
    "description": "a coins cursor: the previous page's next (coins come oldest first)",
    "schema": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
}
# bech32m: the network's prefix, "1", then data; never a "/" or "%" in it.
ADDRESS = _path_param("address", {"type": "string", "pattern": "^[0-9A-Za-z]{1,90}$"})
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "description": (
        "the same key and body within a day get the first final answer again (a receipt"
        " or a refusal for good); an answer that may change (a timeout, an overload, the"
        " transaction still being committed, an input locked) is not kept: the retry runs"
    ),
    "schema": {"type": "string", "pattern": "^[\\x20-\\x7e]{1,128}$"},
}
LEDGER = {
    "name": "ledger",
    "in": "query",
    "description": (
        "the guild member whose ledger holds the coins (default: this gateway's operator):"
        " a member's gateway serves every member's ledger, so that its users pay while"
        " their own operator is down"
    ),
    "schema": {"type": "string", "pattern": OPERATOR_RE.pattern},
}
BINARY = {"type": "string", "format": "binary"}
BINARY_BODY = {"required": True, "content": {"application/octet-stream": {"schema": BINARY}}}
TX_BODY = {
    "required": True,
    "content": {
        "application/octet-stream": {"schema": BINARY},
        "application/json": {"schema": _ref("Transaction")},
    },
}
COIN_OUT = _object(["coin_id", "value_msat"], coin_id=HEX32, value_msat=MSAT)


HEX = {"type": "string", "pattern": "^([0-9a-f]{2})*$"}
CHANGE = _object(
    ["kind", "coin_id", "address", "value_msat", "block"],
    kind={"enum": ["spent", "created", "paid_out"]},
    coin_id=HEX32,
    address={"type": "string"},
    value_msat=MSAT,
    block=BLOCK,
    ledger_id={"type": "string", "description": "paid_out: the ledger it is paid to"},
    ledger={"type": "string", "description": "paid_out: that ledger's operator, if known"},
    settlement={
        "enum": ["pending", "settled", "unknown"],
        "description": "paid_out (in /v1/tx): released there as a coin once settled",
    },
    released_as={**HEX32, "description": "settled: the coin it became in that ledger"},
)
UNINDEXED = _object(
    ["kind", "coin_id", "value_msat", "indexed"],
    kind={"enum": ["spent", "created"]},
    coin_id=HEX32,
    address={"type": "string", "description": "created: its owner"},
    value_msat=MSAT,
    indexed={
        "enum": [False],
        "description": "a part committed in another worker's block that the index has"
        " not stored yet (shown as the transaction says)",
    },
)


def _explorer_paths() -> dict[str, Any]:
    """What the explorer's pages read besides the rest of the API, and the console."""
    shard = _object(
        ["ledger", "worker"],
        ledger={"type": "string"},
        worker=INT,
        height=INT,
        confirmed=INT,
        coins=INT,
        in_doubt=INT,
        leader=_object(["member", "copy", "term"], member={"type": "string"}, copy=INT, term=INT),
        error={"type": "string", "description": "no leader answered in time"},
    )
    record = _object(
        ["txid", "committed", "fee_msat", "changes"],
        txid=HEX32,
        committed={"type": "boolean"},
        fee_msat=MSAT,
        changes={"type": "array", "items": CHANGE},
    )
    block = _object(
        ["worker", "height", "records"],
        worker=INT,
        height=INT,
        records={"type": "array", "items": record},
    )
    return {
        "/v1/shards": {
            "get": {
                "summary": "Every shard of the ledgers served: its leader, term and heights",
                "responses": {
                    "200": _json(
                        _object(
                            ["ledger", "network", "members", "shards"],
                            ledger={"type": "string"},
                            network={"type": "string"},
                            members={"type": "array", "items": {"type": "string"}},
                            shards={"type": "array", "items": shard},
                        ),
                        "the shards",
                    ),
                    **_errors(),
                },
            }
        },
        "/v1/blocks/{worker}": {
            "get": {
                "summary": "This ledger's blocks of one worker that changed coins, newest first",
                "parameters": [
                    _path_param("worker", {"type": "string", "pattern": "^[0-9]{1,6}$"}),
                    {
                        "name": "before",
                        "in": "query",
                        "description": "a height: the blocks below it (a page's next)",
                        "schema": {"type": "integer", "minimum": 0, "maximum": 2**62},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100},
                    },
                ],
                "responses": {
                    "200": _json(
                        _object(
                            ["ledger", "worker", "blocks"],
                            ledger={"type": "string"},
                            worker=INT,
                            blocks={"type": "array", "items": block},
                            next=INT,
                        ),
                        "a page of blocks",
                    ),
                    **_errors(400, 404),
                },
            }
        },
        "/v1/rate": {
            "get": {
                "summary": "Transactions committed in this ledger, each second",
                "parameters": [
                    {
                        "name": "seconds",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 600},
                    }
                ],
                "responses": {
                    "200": _json(
                        _object(
                            ["ledger", "seconds", "rate"],
                            ledger={"type": "string"},
                            seconds=INT,
                            rate={
                                "type": "array",
                                "items": _object(["second", "txs"], second=INT, txs=INT),
                            },
                        ),
                        "the seconds with any, oldest first",
                    ),
                    **_errors(400),
                },
            }
        },
        "/v1/console": {
            "get": {
                "summary": "The operator console: its processes' health and figures",
                "description": "needs Authorization: Bearer <the console token>",
                "responses": {
                    "200": _json(
                        _object(
                            ["operator", "panels", "processes"],
                            operator={"type": "string"},
                            panels={"type": "array", "items": {"type": "string"}},
                            processes={"type": "array", "items": {"type": "object"}},
                            grafana={"type": "string"},
                        ),
                        "each process: up, ready, and its figures by panel",
                    ),
                    **_errors(401, 404),
                },
            }
        },
    }


def _address_page(
    cursor: str,
    cursor_schema: dict[str, Any],
    cursor_says: str,
    field: str,
    item: dict[str, Any],
    next_schema: dict[str, Any],
) -> dict[str, Any]:
    """The parameters and answers of a page of what the light-client API lists of an
    address (``field``: a list of ``item``), paged by ``cursor``."""
    return {
        "parameters": [
            _path_param("address", {"type": "string"}),
            {"name": cursor, "in": "query", "description": cursor_says, "schema": cursor_schema},
            {
                "name": "limit",
                "in": "query",
                "schema": {"type": "integer", "minimum": 1, "maximum": 100},
            },
        ],
        "responses": {
            "200": _json(
                _object(
                    ["address", field],
                    address={"type": "string"},
                    **{field: {"type": "array", "items": item}},
                    next=next_schema,
                ),
                f"a page of the {field} (next: the {cursor} of the next one)",
            ),
            **_errors(400, 404, 503),
        },
    }


def _light_client_paths() -> dict[str, Any]:
    """``/v1/lc``: what a light client checks against the guild key it pinned."""
    checkpoint = _json(_ref("Checkpoint"), "a signed checkpoint and its entries")
    lc_errors = _errors(400, 404, 503)
    return {
        "/v1/lc": {
            "get": {
                "summary": "The light-client protocol: version, features, the guild's members",
                "responses": {"200": _json({"type": "object"}, "the server"), **_errors()},
            }
        },
        "/v1/lc/descriptor": {
            "get": {
                "summary": "The guild descriptor a wallet pins (bech32m, cstguild1...)",
                "responses": {
                    "200": _json(
                        _object(
                            [
                                "descriptor",
                                "guild",
                                "key",
                                "members",
                                "first",
                                "threshold",
                                "member_keys",
                            ],
                            descriptor={"type": "string"},
                            guild={"type": "string"},
                            key=HEX32,
                            members=HEX32,
                            first=HEX32,
                            threshold=INT,
                            member_keys={
                                "type": "array",
                                "items": _object(
                                    ["name", "key"], name={"type": "string"}, key=HEX32
                                ),
                            },
                        ),
                        "the descriptor, what it says, and the member set its members"
                        " root commits to (a wallet checks it)",
                    ),
                    **lc_errors,
                },
            }
        },
        "/v1/lc/checkpoints": {
            "get": {
                "summary": "Signed checkpoints from a height on, oldest first",
                "parameters": [
                    {"name": "start", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    {
                        "name": "count",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100},
                    },
                ],
                "responses": {
                    "200": _json(
                        _object(
                            ["checkpoints"],
                            checkpoints={"type": "array", "items": _ref("Checkpoint")},
                        ),
                        "up to count checkpoints",
                    ),
                    **lc_errors,
                },
            }
        },
        "/v1/lc/handovers": {
            "get": {
                "summary": "The handovers of the checkpoints from one guild key to the next",
                "parameters": [
                    {"name": "start", "in": "query", "schema": {"type": "integer", "minimum": 0}}
                ],
                "responses": {
                    "200": _json(
                        _object(
                            ["handovers"],
                            handovers={
                                "type": "array",
                                "items": _object(
                                    ["height", "next_key", "next_members", "encoded"],
                                    height=INT,
                                    next_key=HEX32,
                                    next_members=HEX32,
                                    encoded=HEX,
                                ),
                            },
                        ),
                        "each a signed checkpoint naming the key and member set of the"
                        " checkpoints above it, in height order: a wallet follows them from"
                        " the key it pinned (constellation.lightclient.proof.Pin.follow)",
                    ),
                    **lc_errors,
                },
            }
        },
        "/v1/lc/checkpoints/latest": {
            "get": {
                "summary": "The latest signed checkpoint",
                "responses": {"200": checkpoint, **lc_errors},
            }
        },
        "/v1/lc/checkpoints/{height}": {
            "get": {
                "summary": "The signed checkpoint at a height",
                "parameters": [_path_param("height", {"type": "integer", "minimum": 0})],
                "responses": {"200": checkpoint, **lc_errors},
            }
        },
        "/v1/lc/tx/{txid}": {
            "get": {
                "summary": "A transaction's proof: its records under signed checkpoints",
                "parameters": [_path_param("txid", HEX32_IN)],
                "responses": {
                    "200": _json(
                        _object(
                            ["txid", "checkpoints", "proof"],
                            txid=HEX32,
                            checkpoints={"type": "array", "items": INT},
                            proof=HEX,
                        ),
                        "the proof (constellation.lightclient.proof.encode_tx_proof)",
                    ),
                    **lc_errors,
                },
            }
        },
        "/v1/lc/coin/{coin_id}": {
            "get": {
                "summary": "A coin's proof as of the latest checkpoint: unspent, spent, none",
                "parameters": [_path_param("coin_id", HEX32_IN), LEDGER],
                "responses": {
                    "200": _json(
                        _object(
                            ["coin_id", "ledger", "proof"],
                            coin_id=HEX32,
                            ledger={"type": "string"},
                            proof=HEX,
                        ),
                        "the proof (constellation.lightclient.proof.encode_coin_proof)",
                    ),
                    **lc_errors,
                },
            }
        },
        "/v1/lc/address/{address}/history": {
            "get": {
                "summary": "The transactions that changed an address in any member's ledger,"
                " newest first, each with the checkpoint from which its proof is served",
                **_address_page(
                    "before",
                    {"type": "string"},
                    "a page's next, or a checkpoint height",
                    "history",
                    _object(["checkpoint", "txid"], checkpoint=INT, txid=HEX32),
                    {"type": "string"},
                ),
            }
        },
        "/v1/lc/address/{address}/coins": {
            "get": {
                "summary": "An address's unspent coins in any member's ledger as of the latest"
                " checkpoint, by coin id (each checked with its coin proof)",
                **_address_page(
                    "after",
                    HEX32_IN,
                    "a page's next (a coin id)",
                    "coins",
                    _object(
                        ["coin_id", "ledger", "value_msat", "checkpoint"],
                        coin_id=HEX32,
                        ledger={"type": "string"},
                        value_msat=MSAT,
                        checkpoint=INT,
                    ),
                    HEX32,
                ),
            }
        },
        "/v1/lc/ws": {
            "get": {
                "summary": "Websocket: the light-client protocol in JSON-RPC 2.0 (methods,"
                " subscriptions and pushes with proofs: /v1/lc/ws/schema.json)",
                "responses": {
                    "101": {"description": "switching to the websocket protocol"},
                    **_errors(400),
                },
            }
        },
        "/v1/lc/ws/schema.json": {
            "get": {
                "summary": "The JSON Schema of every websocket message, both ways",
                "responses": {"200": _json({"type": "object"}, "JSON Schema 2020-12"), **_errors()},
            }
        },
    }


def openapi() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Constellation gateway",
            "version": "1",
            "description": (
                "Every error is JSON {error: {code, message}}, its status set by its code."
                " Only a request that the HTTP server refuses before the API reads it (a"
                " request line or a header line over 8190 bytes) is answered 400 in plain"
                " text."
            ),
        },
        "paths": {
            "/v1/tx": {
                "post": {
                    "summary": "Submit a signed transaction; answered after it commits",
                    "parameters": [IDEMPOTENCY_KEY, LEDGER],
                    "requestBody": TX_BODY,
                    "responses": {
                        "200": _json(_ref("Receipt"), "committed"),
                        **_errors(400, 403, 409, 413, 422, 429, 503, 504),
                    },
                }
            },
            "/v1/txs": {
                "post": {
                    "summary": "Submit a batch: (length:u32 big-endian, transaction)*",
                    "parameters": [LEDGER],
                    "requestBody": BINARY_BODY,
                    "responses": {
                        "200": _json(
                            _object(
                                ["results"],
                                results={
                                    "type": "array",
                                    "items": {"anyOf": [_ref("Receipt"), _ref("Error")]},
                                },
                            ),
                            "one receipt or error per transaction, in order",
                        ),
                        **_errors(400, 413, 429),
                    },
                }
            },
            "/v1/issuance": {
                "post": {
                    "summary": "Apply an issuance signed by a trusted issuer (idempotent)",
                    "parameters": [LEDGER],
                    "requestBody": BINARY_BODY,
                    "responses": {
                        "200": _json(
                            _object(
                                ["issuance_id", "status", "blocks", "outputs"],
                                issuance_id=HEX32,
                                status={"const": "committed"},
                                blocks={"type": "array", "items": BLOCK},
                                outputs={"type": "array", "items": COIN_OUT},
                            ),
                            "applied",
                        ),
                        **_errors(400, 403, 409, 413, 422, 429, 503, 504),
                    },
                }
            },
            "/v1/tx/{txid}": {
                "get": {
                    "summary": "A transaction's status",
                    "parameters": [_path_param("txid", HEX32_IN)],
                    "responses": {
                        "200": _json(
                            _object(
                                ["txid", "status"],
                                txid=HEX32,
                                status={"enum": ["pending", "committed"]},
                                fee_msat=MSAT,
                                block={**BLOCK, "description": "the block of its commit"},
                                at={"type": "string", "description": "when it was indexed"},
                                changes={
                                    "type": "array",
                                    "items": {"oneOf": [CHANGE, UNINDEXED]},
                                    "description": "the coins it spent and created in this"
                                    " ledger, and its outputs paid to other ledgers",
                                },
                                complete={
                                    "type": "boolean",
                                    "description": "whether every part of it is indexed"
                                    " (absent where the index does not hold the"
                                    " transaction itself)",
                                },
                            ),
                            "pending, or committed (with what it changed)",
                        ),
                        **_errors(400, 404, 503),
                    },
                }
            },
            "/v1/coin/{coin_id}": {
                "get": {
                    "summary": "A coin: unspent, locked, spent, or pending (its transaction"
                    " commits, or it is paid from another member's ledger, until settled)",
                    "parameters": [_path_param("coin_id", HEX32_IN), LEDGER],
                    "responses": {
                        "200": _json(
                            _object(
                                ["coin_id", "status"],
                                coin_id=HEX32,
                                status={"enum": ["unspent", "locked", "spent", "pending"]},
                                value_msat=MSAT,
                                address={"type": "string"},
                                spent_by=HEX32,
                                **{
                                    "from": {
                                        "description": "pending: paid from this ledger of"
                                        " another operator, a coin here once settled",
                                        **_object(
                                            ["ledger", "txid"],
                                            ledger={"type": "string"},
                                            txid=HEX32,
                                        ),
                                    }
                                },
                            ),
                            "the coin",
                        ),
                        **_errors(400, 404, 503),
                    },
                }
            },
            "/v1/address/{address}/coins": {
                "get": {
                    "summary": "An address's unspent coins, a page at a time",
                    "parameters": [ADDRESS, LIMIT, AFTER],
                    "responses": {
                        "200": _json(
                            _object(
                                ["address", "coins"],
                                address={"type": "string"},
                                coins={"type": "array", "items": COIN_OUT},
                                next={
                                    "type": "integer",
                                    "minimum": 0,
                                    "description": "present while there may be more: the"
                                    " cursor (after) of the next page",
                                },
                            ),
                            "the coins",
                        ),
                        **_errors(400, 404, 503),
                    },
                }
            },
            "/v1/address/{address}/history": {
                "get": {
                    "summary": "An address's coins received and spent, newest first",
                    "parameters": [ADDRESS, LIMIT, BEFORE],
                    "responses": {
                        "200": _json(
                            _object(
                                ["address", "history"],
                                address={"type": "string"},
                                history={"type": "array", "items": {"type": "object"}},
                            ),
                            "the history",
                        ),
                        **_errors(400, 404, 503),
                    },
                }
            },
            "/v1/address/{address}/incoming": {
                "get": {
                    "summary": (
                        "Payments to the address from other operators' ledgers, newest first:"
                        " pending until the paying operator settles over Lightning, then"
                        " released as a coin here (marked so, or its coin indexed)"
                    ),
                    "parameters": [
                        ADDRESS,
                        LIMIT,
                        {
                            "name": "before",
                            "in": "query",
                            "description": "a cursor: the previous page's next",
                            "schema": {"type": "integer", "minimum": 0},
                        },
                        {
                            "name": "status",
                            "in": "query",
                            "description": "pending: only those not released yet",
                            "schema": {"enum": ["pending"]},
                        },
                    ],
                    "responses": {
                        "200": _json(
                            _object(
                                ["address", "incoming"],
                                address={"type": "string"},
                                incoming={"type": "array", "items": _ref("Incoming")},
                                next={
                                    "type": "integer",
                                    "description": "where the next page starts (absent at the end)",
                                },
                            ),
                            "the payments (none where this operator does not settle)",
                        ),
                        **_errors(400, 503),
                    },
                }
            },
            "/v1/settlement": {
                "get": {
                    "summary": (
                        "Settlement with each other operator: what this one owes and holds,"
                        " the batch in flight (served by the operator's settling gateway)"
                    ),
                    "responses": {
                        "200": _json(
                            _object(
                                ["settling", "peers"],
                                settling={"type": "boolean"},
                                peers={"type": "object"},
                            ),
                            "per peer: owed and held (none where this operator does not settle)",
                        ),
                        **_errors(503),
                    },
                }
            },
            "/v1/ledger": {
                "get": {
                    "summary": "A ledger's totals: held, issued, fees, coins, locks, in doubt",
                    "parameters": [LEDGER],
                    "responses": {
                        "200": _json({"type": "object"}, "totals, and each worker's"),
                        **_errors(400, 503),
                    },
                }
            },
            "/v1/ws": {
                "get": {
                    "summary": "Websocket: send {subscribe: [address]} and receive coin changes",
                    "responses": {
                        "101": {"description": "switching to the websocket protocol"},
                        **_errors(400),
                    },
                }
            },
            **_light_client_paths(),
            **_explorer_paths(),
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {
                        "200": _json({"type": "object"}, "OpenAPI 3.1"),
                        **_errors(),
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "error": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "code": {"type": "string", "minLength": 1},
                                "message": {"type": "string"},
                            },
                            "required": ["code", "message"],
                        }
                    },
                    "required": ["error"],
                },
                "Transaction": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "inputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"coin_id": HEX32_IN, "value_msat": MSAT},
                                "required": ["coin_id", "value_msat"],
                            },
                        },
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"address": {"type": "string"}, "value_msat": MSAT},
                                "required": ["address", "value_msat"],
                            },
                        },
                        "fee_msat": MSAT,
                        "witnesses": {
                            "description": "one BIP340 signature per input, in input order",
                            "type": "array",
                            "items": {"type": "string", "pattern": "^[0-9a-fA-F]{128}$"},
                        },
                    },
                    "required": ["inputs", "outputs", "witnesses"],
                },
                "Receipt": {
                    "type": "object",
                    "properties": {
                        "txid": HEX32,
                        "status": {"const": "committed"},
                        "blocks": {"type": "array", "items": BLOCK},
                        "outputs": {
                            "type": "array",
                            "items": {
                                **COIN_OUT,
                                "description": "an output to another operator's ledger names"
                                " it (ledger) and is pending there until settled",
                                "properties": {
                                    **COIN_OUT["properties"],
                                    "ledger": {"type": "string"},
                                    "status": {"const": "pending"},
                                },
                            },
                        },
                    },
                    "required": ["txid", "status", "blocks", "outputs"],
                },
                "Checkpoint": _object(
                    [
                        *("guild", "height", "time_ms", "prev_hash", "shards", "members"),
                        *("signature", "entries", "encoded"),
                    ],
                    guild={"type": "string"},
                    height=INT,
                    time_ms=INT,
                    prev_hash=HEX32,
                    shards=HEX32,
                    members=HEX32,
                    next_key={**HEX32, "description": "a handover's: the key from the next on"},
                    next_members={**HEX32, "description": "a handover's: the next member set"},
                    signature={"type": "string", "pattern": "^[0-9a-f]{128}$"},
                    entries={
                        "type": "array",
                        "items": _object(
                            ["owner", "worker", "height", "records"],
                            owner=INT,
                            worker=INT,
                            height=INT,
                            records=INT,
                        ),
                    },
                    encoded={
                        **HEX,
                        "description": "the signed checkpoint and its entries, as a wallet"
                        " checks them (constellation.lightclient.checkpointer.Announced)",
                    },
                ),
                "Incoming": _object(
                    ["from", "txid", "output", "coin_id", "value_msat", "status"],
                    **{"from": {"type": "string", "description": "the paying operator"}},
                    txid=HEX32,
                    output={**HEX32, "description": "the output's id in the payer's ledger"},
                    coin_id={**HEX32, "description": "the coin it is (or becomes) here"},
                    value_msat=MSAT,
                    status={"enum": ["pending", "released"]},
                    batch={"type": ["integer", "null"]},
                    seen_at={"type": "number"},
                    released_at={"type": ["number", "null"]},
                ),
            }
        },
    }
