"""The simulated chain: coins of no node, transactions sent raw and checked as Bitcoin
checks key-path taproot spends, every block's coinbase (spent only once mature), the
books still balanced, and bitcoind's JSON-RPC."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from constellation.address import encode_segwit
from constellation.bitcoin import (
    BitcoinTx,
    SpendInput,
    SpendOutput,
    TxIn,
    address_script,
    p2tr_script,
    parse_tx,
    taproot_sighash,
)
from constellation.keys import SigningKey
from services.lnsim import bitcoind
from services.lnsim.chain import COINBASE_SAT, MINER_SCRIPT, ChainError
from services.lnsim.network import Network

KEY = SigningKey(b"\x21" * 32)
SCRIPT = p2tr_script(KEY.pubkey)
ADDRESS = encode_segwit("bcrt", 1, KEY.pubkey)


def funded() -> tuple[Network, str]:
    """A network whose node ``a`` paid 50,000 sat to ``KEY``'s address."""
    net = Network(lambda: 1_700_000_000.0)
    net.add_node("a")
    net.fund("a", 1_000_000)
    txid = net.withdraw("a", ADDRESS, 50_000)
    net.mine(1)
    return net, txid


def spend(txid: str, pay: list[SpendOutput], key: SigningKey = KEY, amount: int = 50_000) -> bytes:
    inputs = [TxIn(bytes.fromhex(txid)[::-1], 0, 0xFFFFFFFD)]
    prev = [SpendInput(inputs[0].txid, 0, 0xFFFFFFFD, amount, SCRIPT)]
    sig = key.sign(taproot_sighash(2, 0, prev, pay, 0))
    return BitcoinTx(2, 0, [TxIn(inputs[0].txid, 0, 0xFFFFFFFD, [sig])], pay).serialize()


def test_a_valid_spend_is_taken_and_the_books_balance() -> None:
    net, txid = funded()
    assert net.books()["outside_msat"] == 50_000_000
    to_node = net.newaddr("a")
    node_script = bytes([0x51, 0x20]) + bytes(32)
    raw = spend(txid, [SpendOutput(30_000, SCRIPT), SpendOutput(19_000, node_script)])
    new = net.send_raw(raw)
    assert net.send_raw(raw) == new  # a resend changes nothing
    assert net.books()["missing_msat"] == 0
    assert net.books()["miner_fees_msat"] >= 1_000_000
    net.mine(1)
    block = bitcoind.call(net, {"method": "getblockhash", "params": [net.height], "id": 1})
    got = bitcoind.call(net, {"method": "getblock", "params": [block["result"], 2], "id": 2})
    [coinbase, tx] = got["result"]["tx"]
    assert coinbase["vout"][0]["scriptPubKey"]["hex"] == MINER_SCRIPT.hex()
    assert tx["txid"] == new and tx["vout"][0]["value"] == Decimal("0.0003")
    assert tx["vout"][0]["scriptPubKey"]["hex"] == SCRIPT.hex()
    again = bitcoind.call(net, {"method": "sendrawtransaction", "params": [raw.hex()], "id": 3})
    assert again["error"]["code"] == -27
    assert to_node  # a node's address stays its own


@pytest.mark.parametrize(
    ("make", "code", "reason"),
    [
        (
            lambda t: spend(t, [SpendOutput(49_000, SCRIPT)], SigningKey(b"\x22" * 32)),
            -26,
            "Schnorr",
        ),
        (lambda t: spend(t, [SpendOutput(50_001, SCRIPT)]), -26, "belowout"),
        (lambda t: spend(t, [SpendOutput(49_990, SCRIPT)]), -26, "min relay fee"),
        (lambda t: spend("00" * 32, [SpendOutput(49_000, SCRIPT)]), -25, "missingorspent"),
        (lambda t: b"\x02\x00\x00", -22, "decode"),
    ],
)
def test_what_bitcoin_refuses_is_refused(make, code: int, reason: str) -> None:  # type: ignore[no-untyped-def]
    net, txid = funded()
    with pytest.raises(ChainError, match=reason) as caught:
        net.send_raw(make(txid))
    assert caught.value.code == code
    assert net.books()["missing_msat"] == 0


def test_a_coin_is_spent_once() -> None:
    net, txid = funded()
    twice = parse_tx(spend(txid, [SpendOutput(49_000, SCRIPT)]))
    twice = BitcoinTx(2, 0, [twice.inputs[0], twice.inputs[0]], [SpendOutput(99_000, SCRIPT)])
    with pytest.raises(ChainError, match="inputs-duplicate"):
        net.send_raw(twice.serialize())
    net.send_raw(spend(txid, [SpendOutput(49_000, SCRIPT)]))
    with pytest.raises(ChainError, match="missingorspent"):
        net.send_raw(spend(txid, [SpendOutput(48_000, SCRIPT)]))
    answer = bitcoind.call(net, {"method": "gettxout", "params": [txid, 0], "id": 1})
    assert answer["result"] is None
    bad: list[list[object]] = [[["x"], 0], [{}]]  # wrong types: an error, not a crash
    for params in bad:
        answer = bitcoind.call(net, {"method": "gettxout", "params": params, "id": 2})
        assert answer["error"]["code"] == -8
    answer = bitcoind.call(net, {"method": "getrawtransaction", "params": [{}], "id": 3})
    assert answer["error"]["code"] in (-8, -5)


def test_a_block_takes_what_pays_the_market_and_bitcoind_estimates_it() -> None:
    """A busy market (``Network.set_feerate``): a transaction paying less than it stays
    in the mempool, and a node's output in it unconfirmed, block after block; a child
    paying more than the market cannot go without its parent, but pays for it (CPFP)
    once the two together pay what the market asks. bitcoind's ``estimatesmartfee``
    says the market's feerate, in BTC per kvB."""
    net, txid = funded()
    a_script = address_script(net.newaddr("a"), "bcrt")
    raw = spend(txid, [SpendOutput(30_000, SCRIPT), SpendOutput(19_000, a_script)])
    parent = parse_tx(raw)  # 1,000 sat on 154 vB
    pay = [SpendOutput(25_000, SCRIPT)]  # 5,000 sat on 111 vB: 45 sat/vB; 22.6 with its parent
    prev = [SpendInput(bytes.fromhex(parent.txid)[::-1], 0, 0xFFFFFFFD, 30_000, SCRIPT)]
    sig = KEY.sign(taproot_sighash(2, 0, prev, pay, 0))
    child = parse_tx(BitcoinTx(2, 0, [TxIn(prev[0].txid, 0, 0xFFFFFFFD, [sig])], pay).serialize())
    net.set_feerate(30)
    estimate = bitcoind.call(net, {"method": "estimatesmartfee", "params": [6], "id": 1})
    assert estimate["result"] == {"feerate": Decimal("0.0003"), "blocks": 6}
    net.send_raw(raw)  # relayed (over the relay minimum), not mined
    net.send_raw(child.serialize())
    net.mine(3)
    assert net.onchain.txs[parent.txid].height is None
    assert net.onchain.txs[child.txid].height is None
    [mine] = [u for u in net.nodes["a"].utxos if u.txid == parent.txid]
    assert mine.blockheight is None
    net.set_feerate(20)
    net.mine(1)
    block = bitcoind.call(net, {"method": "getblockhash", "params": [net.height], "id": 2})
    got = bitcoind.call(net, {"method": "getblock", "params": [block["result"], 1], "id": 3})
    assert parent.txid in got["result"]["tx"] and child.txid in got["result"]["tx"]
    assert mine.blockheight == net.height
    assert net.books()["missing_msat"] == 0
    bad: list[tuple[list[object], int]] = [([0], -8), ([1009], -8), ([6, "fast"], -8)]
    bad += [(["6"], -3), ([6, 1], -3), ([], -1)]  # bitcoind's codes: type, then usage
    for params, code in bad:
        answer = bitcoind.call(net, {"method": "estimatesmartfee", "params": params, "id": 4})
        assert answer["error"]["code"] == code, params


def rpc(net: Network, method: str, *params: object) -> dict[str, Any]:
    return bitcoind.call(net, {"method": method, "params": list(params), "id": 1})


def test_every_block_begins_with_its_coinbase_and_generatetoaddress_pays_an_address() -> None:
    net, _ = funded()
    books = net.books()
    net.mine(2)
    hashes = rpc(net, "generatetoaddress", 2, ADDRESS)["result"]
    assert hashes == [rpc(net, "getblockhash", h)["result"] for h in (net.height - 1, net.height)]
    assert net.height == 106
    for height in range(102, 107):
        block = rpc(net, "getblock", rpc(net, "getblockhash", height)["result"], 2)["result"]
        coinbase = block["tx"][0]
        # bitcoind's shape: no outpoint spent, the script begins with the height (BIP34)
        [vin] = coinbase["vin"]
        assert vin == {"coinbase": f"01{height:02x}00", "sequence": 0xFFFFFFFF}
        [out] = coinbase["vout"]
        assert out["value"] == Decimal(COINBASE_SAT) / 100_000_000
        paid = SCRIPT if height > 104 else MINER_SCRIPT
        assert out["scriptPubKey"]["hex"] == paid.hex()
        coin = rpc(net, "gettxout", coinbase["txid"], 0)["result"]
        assert (coin is not None) == (paid == SCRIPT)  # the miner's are nobody's coins
    assert rpc(net, "gettxout", block["tx"][0]["txid"], 0)["result"]["coinbase"] is True
    # money made: counted as minted, and outside the network until spent
    assert net.books()["minted_msat"] == books["minted_msat"] + 2 * COINBASE_SAT * 1000
    assert net.books()["outside_msat"] == books["outside_msat"] + 2 * COINBASE_SAT * 1000
    assert net.books()["missing_msat"] == 0


def test_a_coinbase_is_spent_once_mature_as_bitcoind_takes_it() -> None:
    """Bitcoin's COINBASE_MATURITY: the coinbase of block h is spent in block h + 100 on,
    which the mempool takes once the tip is h + 99."""
    net, _ = funded()
    [block] = rpc(net, "generatetoaddress", 1, ADDRESS)["result"]
    coinbase = rpc(net, "getblock", block, 2)["result"]["tx"][0]["txid"]
    raw = spend(coinbase, [SpendOutput(COINBASE_SAT - 1_000, SCRIPT)], amount=COINBASE_SAT)

    def refused(depth: int) -> None:
        error = rpc(net, "sendrawtransaction", raw.hex())["error"]
        assert error == {
            "code": -26,
            "message": "bad-txns-premature-spend-of-coinbase,"
            f" tried to spend coinbase at depth {depth}",
        }

    refused(1)  # the depth bitcoind says: the next block's height less the coinbase's
    net.mine(98)
    refused(99)  # the tip h + 98
    net.mine(1)
    assert rpc(net, "sendrawtransaction", raw.hex())["result"] == parse_tx(raw).txid
    assert net.books()["missing_msat"] == 0


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ([1], -1),  # an address is required
        ([1, ADDRESS, 10, 4], -1),
        (["1", ADDRESS], -3),
        ([True, ADDRESS], -3),
        ([1.5, ADDRESS], -1),
        ([1, 42], -3),
        ([1, ADDRESS, "many"], -3),
        ([1, "bcrt1qnotanaddress"], -5),
        ([1, encode_segwit("bc", 1, KEY.pubkey)], -5),  # another chain's
    ],
)
def test_generatetoaddress_refuses_what_bitcoind_refuses(params: list[object], code: int) -> None:
    net, _ = funded()
    height = net.height
    assert rpc(net, "generatetoaddress", *params)["error"]["code"] == code
    assert net.height == height
    assert rpc(net, "generatetoaddress", 0, ADDRESS) == {"result": [], "error": None, "id": 1}
    # a node's wallet keeps no coinbase in the simulator: refused, not paid unseen
    assert rpc(net, "generatetoaddress", 1, net.newaddr("a"))["error"]["code"] == -8
