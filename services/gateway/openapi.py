"""The OpenAPI 3.1 document of the public API (served at ``/openapi.json``)."""

from __future__ import annotations

from typing import Any

HEX32 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
MSAT = {"type": "integer", "minimum": 0, "maximum": 2**64 - 1}
BLOCK = {
    "type": "object",
    "properties": {"worker": {"type": "integer"}, "height": {"type": "integer"}},
    "required": ["worker", "height"],
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        400: "malformed or invalid",
        403: "not an issuer of this ledger",
        404: "not found",
        409: "a coin is spent or locked by another transaction",
        413: "too large",
        422: "an unknown coin, or a stated value that does not match",
        429: "overloaded or rate limited; see Retry-After",
        503: "unavailable or aborted; retry",
        504: "no answer in time: the outcome is unknown, look the txid up",
    }
    return {str(s): _json(_ref("Error"), text[s]) for s in statuses}


def _path_param(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


LIMIT = {
    "name": "limit",
    "in": "query",
    "schema": {"type": "integer", "minimum": 1, "maximum": 500},
}
ADDRESS = _path_param("address", {"type": "string"})
BINARY = {"type": "string", "format": "binary"}
BINARY_BODY = {"required": True, "content": {"application/octet-stream": {"schema": BINARY}}}
TX_BODY = {
    "required": True,
    "content": {
        "application/octet-stream": {"schema": BINARY},
        "application/json": {"schema": _ref("Transaction")},
    },
}


def openapi() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "Constellation gateway", "version": "1"},
        "paths": {
            "/v1/tx": {
                "post": {
                    "summary": "Submit a signed transaction; answered after it commits",
                    "parameters": [
                        {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}}
                    ],
                    "requestBody": TX_BODY,
                    "responses": {
                        "200": _json(_ref("Receipt"), "committed"),
                        **_errors(400, 409, 413, 422, 429, 503, 504),
                    },
                }
            },
            "/v1/txs": {
                "post": {
                    "summary": "Submit a batch: (length:u32 big-endian, transaction)*",
                    "requestBody": BINARY_BODY,
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {"results": {"type": "array", "items": {}}},
                            },
                            "one receipt or error per transaction, in order, each with its status",
                        ),
                        **_errors(400, 413, 429),
                    },
                }
            },
            "/v1/issuance": {
                "post": {
                    "summary": "Apply an issuance signed by a trusted issuer (idempotent)",
                    "requestBody": BINARY_BODY,
                    "responses": {
                        "200": _json({"type": "object"}, "applied"),
                        **_errors(400, 403, 413, 429, 503, 504),
                    },
                }
            },
            "/v1/tx/{txid}": {
                "get": {
                    "summary": "A transaction's status",
                    "parameters": [_path_param("txid", HEX32)],
                    "responses": {
                        "200": _json({"type": "object"}, "pending or committed"),
                        **_errors(400, 404),
                    },
                }
            },
            "/v1/coin/{coin_id}": {
                "get": {
                    "summary": "A coin: unspent, locked or spent",
                    "parameters": [_path_param("coin_id", HEX32)],
                    "responses": {
                        "200": _json({"type": "object"}, "the coin"),
                        **_errors(400, 404, 503),
                    },
                }
            },
            "/v1/address/{address}/coins": {
                "get": {
                    "summary": "An address's unspent coins",
                    "parameters": [ADDRESS, LIMIT],
                    "responses": {
                        "200": _json({"type": "object"}, "the coins"),
                        **_errors(400, 503),
                    },
                }
            },
            "/v1/address/{address}/history": {
                "get": {
                    "summary": "An address's coins received and spent, newest first",
                    "parameters": [
                        ADDRESS,
                        LIMIT,
                        {"name": "before", "in": "query", "schema": {"type": "integer"}},
                    ],
                    "responses": {
                        "200": _json({"type": "object"}, "the history"),
                        **_errors(400),
                    },
                }
            },
            "/v1/ledger": {
                "get": {
                    "summary": "The operator's totals: held, issued, fees, coins, locks, in doubt",
                    "responses": {
                        "200": _json({"type": "object"}, "totals, and each worker's"),
                        **_errors(503),
                    },
                }
            },
            "/v1/ws": {
                "get": {
                    "summary": "Websocket: send {subscribe: [address]} and receive coin changes",
                    "responses": {"101": {"description": "switching to the websocket protocol"}},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
                }
            },
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {
                        "error": {
                            "type": "object",
                            "properties": {
                                "code": {"type": "string"},
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
                                "properties": {"coin_id": HEX32, "value_msat": MSAT},
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
                            "type": "array",
                            "items": {"type": "string", "pattern": "^[0-9a-f]{128}$"},
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
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                    "required": ["txid", "status", "blocks", "outputs"],
                },
            }
        },
    }
