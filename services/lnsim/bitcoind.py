"""The simulated chain served as bitcoind's JSON-RPC (``POST /bitcoind`` on the
simulator's ops port): the methods a wallet that follows blocks and sends its own
transactions calls, with bitcoind's shapes and error codes. Amounts are BTC as JSON
numbers, as bitcoind writes them (read them as decimals).

Only what the simulated chain knows is shown: blocks list their coinbase first, then
the transactions that pay addresses of no node and those sent raw; the nodes' own wallet
transactions (channel opens, splices, change) are not rendered. ``generatetoaddress``
mines blocks whose coinbase pays an address, as on regtest. A transaction is found as on
a node without ``-txindex`` (Bitcoin Core's default): ``getmempoolentry`` and
``getrawtransaction`` by its txid while in no block, ``getrawtransaction`` with its
block's hash once one holds it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from constellation.bitcoin import address_script, parse_tx
from constellation.errors import InvalidAddress
from services.lnsim.chain import (
    RPC_DESERIALIZATION_ERROR,
    RPC_INVALID_ADDRESS_OR_KEY,
    RPC_INVALID_PARAMETER,
    RPC_METHOD_NOT_FOUND,
    RPC_MISC_ERROR,
    RPC_TYPE_ERROR,
    ChainError,
    ChainTx,
    block_hash,
    btc,
)
from services.lnsim.network import HRP, Network

MAX_REQUEST_BYTES = 1_000_000
MAX_GENERATE = 1_000  # blocks one generatetoaddress mines (as ``/v1/mine``)


def _height(net: Network, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= net.height:
        raise ChainError(RPC_INVALID_PARAMETER, "Block height out of range")
    return value


def _by_hash(net: Network, value: Any, missing: str = "Block not found") -> int:
    for height in range(net.height, -1, -1):
        if block_hash(height) == value:
            return height
    raise ChainError(RPC_INVALID_ADDRESS_OR_KEY, missing)


def _coinbase_script(height: int) -> str:
    """A coinbase's input script as bitcoind's miner writes it: the block's height
    (BIP34: a push of its bytes, the simulator's heights being above 16), then OP_0."""
    number = height.to_bytes((height.bit_length() + 8) // 8, "little")  # a sign bit clear
    return (bytes([len(number)]) + number + b"\x00").hex()


def _tx(net: Network, t: ChainTx) -> dict[str, Any]:
    return {
        "txid": t.txid,
        "hash": t.txid,
        **({"hex": t.raw.hex()} if t.raw is not None else {}),
        "vin": (
            [{"coinbase": _coinbase_script(t.height or 0), "sequence": 0xFFFFFFFF}]
            if t.coinbase
            else [{"txid": txid, "vout": vout} for txid, vout in t.inputs]
        ),
        "vout": [
            {
                "value": btc(o.amount_sat),
                "n": n,
                "scriptPubKey": {"hex": o.script_pubkey.hex()},
            }
            for n, o in enumerate(t.outputs)
        ],
        **(
            {
                "blockhash": block_hash(t.height),
                "confirmations": net.height - t.height + 1,
            }
            if t.height is not None
            else {}
        ),
    }


def _getblock(net: Network, p: list[Any]) -> Any:
    height = _by_hash(net, p[0] if p else None)
    verbosity = p[1] if len(p) > 1 else 1
    txids = net.onchain.blocks.get(height, [])
    block: dict[str, Any] = {
        "hash": block_hash(height),
        "height": height,
        "confirmations": net.height - height + 1,
        **({"previousblockhash": block_hash(height - 1)} if height else {}),
        **({"nextblockhash": block_hash(height + 1)} if height < net.height else {}),
    }
    if verbosity == 2:
        block["tx"] = [_tx(net, net.onchain.txs[t]) for t in txids]
    else:
        block["tx"] = list(txids)
    return block


def _gettxout(net: Network, p: list[Any]) -> Any:
    if len(p) < 2:
        raise ChainError(RPC_INVALID_PARAMETER, "gettxout txid n ( include_mempool )")
    coin = net.onchain.coins.get((p[0], p[1]))
    mempool = p[2] if len(p) > 2 else True
    t = net.onchain.txs.get(p[0])
    if coin is None or t is None or coin.spent_by is not None:
        return None
    if t.height is None and not mempool:
        return None
    return {
        "bestblock": block_hash(net.height),
        "confirmations": 0 if t.height is None else net.height - t.height + 1,
        "value": btc(coin.amount_sat),
        "scriptPubKey": {"hex": coin.script.hex()},
        "coinbase": t.coinbase,
    }


def _getrawtransaction(net: Network, p: list[Any]) -> Any:
    """As bitcoind without ``-txindex`` (its default) answers: a transaction of the
    mempool, or one of the block whose hash is given (then ``in_active_chain`` too); one
    in a block is not found by its txid alone."""
    if not 1 <= len(p) <= 3:
        raise ChainError(RPC_MISC_ERROR, 'getrawtransaction "txid" ( verbosity "blockhash" )')
    txid = _hash(p, 0, "txid")
    verbose = len(p) > 1 and p[1] is not None and bool(p[1])  # a bool, or 0, 1 and 2
    t = net.onchain.txs.get(txid)
    if len(p) > 2 and p[2] is not None:
        height = _by_hash(net, _hash(p, 2, "blockhash"), "Block hash not found")
        if t is None or t.raw is None or t.height != height:
            raise ChainError(
                RPC_INVALID_ADDRESS_OR_KEY,
                "No such transaction found in the provided block."
                " Use gettransaction for wallet transactions.",
            )
        return {**_tx(net, t), "in_active_chain": True} if verbose else t.raw.hex()
    if t is None or t.raw is None or t.height is not None:
        raise ChainError(
            RPC_INVALID_ADDRESS_OR_KEY,
            "No such mempool transaction. Use -txindex or provide a block hash to enable"
            " blockchain transaction queries. Use gettransaction for wallet transactions.",
        )
    return _tx(net, t) if verbose else t.raw.hex()


def _getmempoolentry(net: Network, p: list[Any]) -> Any:
    """A transaction sent raw and in no block yet, with its fees and its relatives in
    the mempool (those the simulator keeps: bitcoind's other fields are left out)."""
    if len(p) != 1:
        raise ChainError(RPC_MISC_ERROR, 'getmempoolentry "txid"')
    t = net.onchain.txs.get(_hash(p, 0, "txid"))
    if t is None or t.raw is None or t.height is not None:
        raise ChainError(RPC_INVALID_ADDRESS_OR_KEY, "Transaction not in mempool")
    pool = {u.txid: u for u in net.onchain.txs.values() if u.height is None and u.raw is not None}
    ancestors = [u for u in net.onchain.unmined(t, []) if u.txid in pool]
    descendants = [u for u in pool.values() if any(a is t for a in net.onchain.unmined(u, []))]
    return {
        "vsize": t.vsize,
        "fees": {
            "base": btc(t.fee_sat or 0),
            "modified": btc(t.fee_sat or 0),
            "ancestor": btc(sum(u.fee_sat or 0 for u in ancestors)),
            "descendant": btc(sum(u.fee_sat or 0 for u in descendants)),
        },
        "ancestorcount": len(ancestors),
        "ancestorsize": sum(u.vsize for u in ancestors),
        "descendantcount": len(descendants),
        "descendantsize": sum(u.vsize for u in descendants),
        "depends": sorted({txid for txid, _ in t.inputs if txid in pool}),
        "spentby": sorted(u.txid for u in pool.values() if any(i == t.txid for i, _ in u.inputs)),
        "bip125-replaceable": any(i.sequence < 0xFFFFFFFE for i in parse_tx(t.raw).inputs),
    }


def _sendrawtransaction(net: Network, p: list[Any]) -> Any:
    try:
        raw = bytes.fromhex(p[0])
    except (IndexError, TypeError, ValueError):
        raise ChainError(RPC_DESERIALIZATION_ERROR, "TX decode failed") from None
    return net.send_raw(raw)


def _estimatesmartfee(net: Network, p: list[Any]) -> Any:
    """The market's feerate (``Network.feerate``), whatever the target: BTC per kvB."""
    if not 1 <= len(p) <= 2:
        raise ChainError(RPC_MISC_ERROR, 'estimatesmartfee conf_target ( "estimate_mode" )')
    target = _arg(p, 0, "conf_target", int)
    if not 1 <= target <= 1008:
        raise ChainError(RPC_INVALID_PARAMETER, "Invalid conf_target, must be between 1 and 1008")
    if len(p) > 1 and _arg(p, 1, "estimate_mode", str).lower() not in (
        "unset",
        "economical",
        "conservative",
    ):
        raise ChainError(
            RPC_INVALID_PARAMETER,
            'Invalid estimate_mode parameter, must be one of: "unset", "economical",'
            ' "conservative"',
        )
    return {"feerate": btc(net.feerate * 1000), "blocks": max(2, target)}


JSON_TYPES = {
    type(None): "null",
    bool: "bool",
    int: "number",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
}


def _arg(p: list[Any], index: int, name: str, kind: type) -> Any:
    """A positional parameter of the type asked, refused as bitcoind's RPCHelpMan does."""
    value = p[index]
    if type(value) is kind:
        return value
    if kind is int and type(value) is float:  # a number, not a whole one
        raise ChainError(RPC_MISC_ERROR, "JSON integer out of range")
    raise ChainError(
        RPC_TYPE_ERROR,
        f"Wrong type passed: Position {index + 1} ({name}): JSON value of type"
        f" {JSON_TYPES[type(value)]} is not of expected type {JSON_TYPES[kind]}",
    )


def _hash(p: list[Any], index: int, name: str) -> str:
    """A txid or block hash parameter, refused as bitcoind's ParseHashV does."""
    value = p[index]
    if not isinstance(value, str):
        raise ChainError(RPC_INVALID_PARAMETER, f"{name} must be hexadecimal string")
    if len(value) != 64:
        raise ChainError(
            RPC_INVALID_PARAMETER, f"{name} must be of length 64 (not {len(value)}, for '{value}')"
        )
    try:
        bytes.fromhex(value)
    except ValueError:
        raise ChainError(
            RPC_INVALID_PARAMETER, f"{name} must be hexadecimal string (not '{value}')"
        ) from None
    return value.lower()


def _generatetoaddress(net: Network, p: list[Any]) -> Any:
    if not 2 <= len(p) <= 3:
        raise ChainError(RPC_MISC_ERROR, 'generatetoaddress nblocks "address" ( maxtries )')
    nblocks, address = _arg(p, 0, "nblocks", int), _arg(p, 1, "address", str)
    if len(p) > 2:
        _arg(p, 2, "maxtries", int)  # the simulator's blocks take no work
    try:
        script = address_script(address, HRP[net.chain])
    except InvalidAddress:
        raise ChainError(RPC_INVALID_ADDRESS_OR_KEY, "Error: Invalid address") from None
    if net.onchain.owner_of_script(script) is not None:  # bitcoind would pay it
        raise ChainError(RPC_INVALID_PARAMETER, "lnsim: a node's wallet takes no coinbase")
    if nblocks > MAX_GENERATE:
        raise ChainError(RPC_INVALID_PARAMETER, f"lnsim: nblocks at most {MAX_GENERATE}")
    if nblocks <= 0:  # bitcoind mines none
        return []
    first = net.height + 1
    net.mine(nblocks, to=script)
    return [block_hash(height) for height in range(first, net.height + 1)]


METHODS: dict[str, Callable[[Network, list[Any]], Any]] = {
    "getblockchaininfo": lambda net, _: {
        "chain": {"bcrt": "regtest", "tb": "test", "tbs": "signet", "bc": "main"}[HRP[net.chain]],
        "blocks": net.height,
        "headers": net.height,
        "bestblockhash": block_hash(net.height),
    },
    "getblockcount": lambda net, _: net.height,
    "getblockhash": lambda net, p: block_hash(_height(net, p[0] if p else None)),
    "getblock": _getblock,
    "gettxout": _gettxout,
    "getrawtransaction": _getrawtransaction,
    "getmempoolentry": _getmempoolentry,
    "sendrawtransaction": _sendrawtransaction,
    "estimatesmartfee": _estimatesmartfee,
    "generatetoaddress": _generatetoaddress,
}


def call(net: Network, request: Any) -> dict[str, Any]:
    """One JSON-RPC 1.0 request as bitcoind answers it: ``{result, error, id}``."""
    if not isinstance(request, dict) or not isinstance(request.get("method"), str):
        return {"result": None, "error": {"code": -32600, "message": "Invalid Request"}, "id": None}
    rid = request.get("id")
    params = request.get("params", [])
    method = METHODS.get(request["method"])
    try:
        if method is None:
            raise ChainError(RPC_METHOD_NOT_FOUND, "Method not found")
        if not isinstance(params, list):
            raise ChainError(RPC_INVALID_PARAMETER, "params: a list")
        try:
            return {"result": method(net, params), "error": None, "id": rid}
        except (TypeError, ValueError, KeyError, IndexError) as exc:  # a parameter's type
            raise ChainError(RPC_INVALID_PARAMETER, f"invalid parameter: {exc}") from None
    except ChainError as exc:
        return {"result": None, "error": {"code": exc.code, "message": exc.message}, "id": rid}
