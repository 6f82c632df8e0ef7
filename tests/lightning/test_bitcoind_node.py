"""The simulated bitcoind answers what a mint asks of its transactions as Bitcoin Core
does: sendrawtransaction of one in a block says "already in the chain" (-27) while an
output of it is unspent and "inputs missing or spent" (-25) once every one is spent in a
block; getmempoolentry finds what is in no block; getrawtransaction, as a node without
``-txindex``, finds one in a block only given that block's hash."""

from __future__ import annotations

from typing import Any

from constellation.bitcoin import SpendOutput, parse_tx
from services.lnsim import bitcoind
from services.lnsim.chain import block_hash, btc
from services.lnsim.network import Network
from tests.lightning.test_chain import SCRIPT, funded, spend


def rpc(net: Network, method: str, *params: Any) -> dict[str, Any]:
    return bitcoind.call(net, {"method": method, "params": list(params), "id": 1})


def _two(net: Network, txid: str) -> tuple[bytes, bytes]:
    """A spend of ``txid``'s coin, and a spend of that spend's only output."""
    first = spend(txid, [SpendOutput(49_000, SCRIPT)])
    second = spend(parse_tx(first).txid, [SpendOutput(48_000, SCRIPT)], amount=49_000)
    return first, second


def test_a_transaction_in_a_block_is_in_the_chain_until_every_output_is_spent() -> None:
    net, txid = funded()
    first, second = _two(net, txid)
    assert rpc(net, "sendrawtransaction", first.hex())["result"] == parse_tx(first).txid
    net.mine(1)
    assert rpc(net, "sendrawtransaction", first.hex())["error"]["code"] == -27
    net.send_raw(second)  # its output spent in the mempool: still in the UTXO set
    assert rpc(net, "sendrawtransaction", first.hex())["error"]["code"] == -27
    net.mine(1)
    error = rpc(net, "sendrawtransaction", first.hex())["error"]
    assert error == {"code": -25, "message": "bad-txns-inputs-missingorspent"}
    assert rpc(net, "sendrawtransaction", second.hex())["error"]["code"] == -27


def test_getmempoolentry_finds_what_is_in_no_block_with_its_relatives() -> None:
    net, txid = funded()
    first, second = _two(net, txid)
    a, b = net.send_raw(first), net.send_raw(second)
    entry = rpc(net, "getmempoolentry", a)["result"]
    assert entry["vsize"] == parse_tx(first).vsize
    assert entry["fees"]["base"] == btc(1_000) and entry["fees"]["descendant"] == btc(2_000)
    assert entry["spentby"] == [b] and entry["depends"] == [] and entry["descendantcount"] == 2
    child = rpc(net, "getmempoolentry", b)["result"]
    assert child["depends"] == [a] and child["ancestorcount"] == 2
    assert child["fees"]["ancestor"] == btc(2_000) and child["bip125-replaceable"]
    net.mine(1)
    assert rpc(net, "getmempoolentry", a)["error"] == {
        "code": -5,
        "message": "Transaction not in mempool",
    }
    assert rpc(net, "getmempoolentry", "zz")["error"]["code"] == -8


def test_getrawtransaction_finds_one_in_a_block_only_given_the_block() -> None:
    net, txid = funded()
    first, _ = _two(net, txid)
    a = net.send_raw(first)
    found = rpc(net, "getrawtransaction", a, True)["result"]
    assert found["txid"] == a and "confirmations" not in found
    assert rpc(net, "getrawtransaction", a)["result"] == first.hex()
    net.mine(2)
    error = rpc(net, "getrawtransaction", a, True)["error"]
    assert error["code"] == -5 and "-txindex" in error["message"]
    found = rpc(net, "getrawtransaction", a, True, block_hash(net.height - 1))["result"]
    assert found["confirmations"] == 2 and found["in_active_chain"] is True
    assert found["blockhash"] == block_hash(net.height - 1)
    other = rpc(net, "getrawtransaction", a, True, block_hash(net.height))["error"]
    assert other["code"] == -5 and "provided block" in other["message"]
    unknown = rpc(net, "getrawtransaction", a, True, "00" * 32)["error"]
    assert unknown == {"code": -5, "message": "Block hash not found"}
