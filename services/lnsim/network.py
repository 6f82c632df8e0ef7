"""The simulated Lightning network: what stands in for Core Lightning nodes and Bitcoin.

Nodes have keys and sign real BOLT11 invoices. Channels between two nodes hold both
balances, a reserve (1% of capacity) on each side and the HTLCs in flight. A payment is
two-phase, as in Lightning: its HTLCs are added on every hop of a route (amounts
reserved, fees added backwards), then settled from the payee back (the preimage
revealed, balances moved) or failed (reservations released). A held payment stays
added until released: the stuck payment of a real network. Each node has an on-chain
wallet (UTXOs, addresses) on one chain whose block height ``mine`` advances; channels
open and splice from those wallets and their changes confirm with a block.

Deterministic: time (``clock``, unix seconds) and randomness (``seed``) are passed in,
and every method is synchronous. ``rpc.py`` serves each node's part as lightningd's
JSON-RPC; its errors are lightningd's (``LnError``, the codes of
``common/jsonrpc_errors.h``). Faults are set per node (``Faults``).

The books (``books``): every msat the faucet minted (or a block paid to an address:
``mine``'s coinbase) is in a wallet, a channel balance (HTLCs in flight stay in their
offerer's balance until they settle), a splice in flight, a miner's fee or an address
outside the network.

What a lightningd keeps on disk (channels, wallets, invoices, payments) the network
keeps across a restart of its process: ``save`` writes it whole, ``load`` reads it back
(all but the clock and the listeners, which the process gives it again).
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import coincurve
from bolt11 import (
    Bolt11,
    Feature,
    Features,
    FeatureState,
    MilliSatoshi,
    TagChar,
    Tags,
)
from bolt11 import decode as decode_bolt11
from bolt11 import encode as encode_bolt11
from bolt11.exceptions import Bolt11Exception

from constellation.address import encode_segwit
from constellation.bitcoin import SpendOutput, address_script, p2tr_script
from constellation.errors import InvalidAddress
from services.lnsim.chain import MIN_FEERATE, MINER_SCRIPT, Chain

# lightningd's error codes (common/jsonrpc_errors.h)
INVALID_PARAMS = -32602
LIGHTNINGD = -1
PAY_IN_PROGRESS = 200
PAY_RHASH_ALREADY_USED = 201
PAY_DESTINATION_PERM_FAIL = 203
PAY_ROUTE_NOT_FOUND = 205
PAY_ROUTE_TOO_EXPENSIVE = 206
PAY_INVOICE_EXPIRED = 207
PAY_NO_SUCH_PAYMENT = 208
PAY_UNSPECIFIED_ERROR = 209
PAY_ALREADY_PAID = 219
FUND_CANNOT_AFFORD = 301
INVOICE_LABEL_ALREADY_EXISTS = 900
INVOICE_PREIMAGE_ALREADY_EXISTS = 901
INVOICE_EXPIRED_DURING_WAIT = 903
INVOICE_WAIT_TIMED_OUT = 904
INVOICE_NOT_FOUND = 905
INVOICE_STATUS_UNEXPECTED = 906
CONNECT_NO_KNOWN_ADDRESS = 400
SPLICE_FUNDING_LOW = 357

# BOLT 4 failure codes the payee gives
INCORRECT_OR_UNKNOWN_PAYMENT_DETAILS = 0x400F
TEMPORARY_NODE_FAILURE = 0x2002

HRP = {"regtest": "bcrt", "testnet": "tb", "signet": "tbs", "bitcoin": "bc"}
INVOICE_HRP = {"regtest": "bcrt", "testnet": "tb", "signet": "tbs", "bitcoin": "bc"}
TX_FEE_SAT = 200  # what every on-chain transaction pays its miner
RESERVE_DIVISOR = 100  # each side keeps 1% of the capacity
MIN_FINAL_CLTV = 18
CLTV_DELTA = 34  # per hop
MAX_HOPS = 4
DEFAULT_EXPIRY_S = 604_800
VERSION = "v26.06"


class LnError(Exception):
    """What lightningd answers with ``{"code", "message", "data"}``."""

    def __init__(self, code: int, message: str, data: dict[str, object] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data

    def __reduce__(self) -> tuple[type[LnError], tuple[int, str, dict[str, object] | None]]:
        return LnError, (self.code, self.message, self.data)  # kept with a failed payment


@dataclass
class Faults:
    """What goes wrong at a node (set and cleared by tests and the control API)."""

    offline: bool = False  # no RPC, and its channels carry nothing
    fail_next: int = 0  # as a payee: fail this many incoming payments
    hold: bool = False  # as a payee: keep incoming HTLCs pending until released
    lose_replies: int = 0  # RPC: this many replies are lost after the call took effect
    delay_s: float = 0.0  # RPC: every reply this much later


@dataclass
class Invoice:
    label: str
    bolt11: str
    payment_hash: bytes
    preimage: bytes
    amount_msat: int | None
    description: str
    expires_at: int
    created_index: int
    status: str = "unpaid"  # paid, expired
    pay_index: int | None = None
    amount_received_msat: int | None = None
    paid_at: int | None = None
    updated_index: int | None = None


@dataclass
class Part:
    """One part of an outgoing payment: a sendpay; one group per attempt."""

    created_index: int
    groupid: int
    payment_hash: bytes
    amount_msat: int
    amount_sent_msat: int
    destination: str
    created_at: int
    bolt11: str
    label: str | None
    status: str = "pending"  # complete, failed
    completed_at: int | None = None
    preimage: bytes | None = None
    updated_index: int | None = None
    partid: int = 0


@dataclass
class Htlc:
    payment_hash: bytes
    amount_msat: int
    offerer: str  # the side whose balance it reserves


@dataclass
class Splice:
    txid: str
    node: str
    relative_sat: int  # + in (from the wallet), - out (to the wallet)
    capacity_delta_sat: int  # at confirmation; a splice out also pays its fee from it
    confirm_at: int  # block height


@dataclass
class Channel:
    channel_id: str
    scid: str
    a: str
    b: str
    capacity_sat: int
    balance: dict[str, int]  # msat, by node
    opener: str
    fee_base_msat: int = 1
    fee_ppm: int = 10
    state: str = "CHANNELD_AWAITING_LOCKIN"
    lockin_at: int = 0
    htlcs: list[Htlc] = field(default_factory=list)
    splice: Splice | None = None

    @property
    def reserve_msat(self) -> int:
        return self.capacity_sat * 1000 // RESERVE_DIVISOR

    def other(self, node: str) -> str:
        return self.b if node == self.a else self.a

    def offered(self, node: str) -> int:
        return sum(h.amount_msat for h in self.htlcs if h.offerer == node)

    def spendable(self, node: str) -> int:
        """What ``node`` can still send: its balance less its reserve and its HTLCs in
        flight (which stay in the balance until they settle)."""
        return max(0, self.balance[node] - self.reserve_msat - self.offered(node))

    def receivable(self, node: str) -> int:
        return self.spendable(self.other(node))

    def usable(self) -> bool:
        return self.state in ("CHANNELD_NORMAL", "CHANNELD_AWAITING_SPLICE")


@dataclass
class Utxo:
    txid: str
    output: int
    amount_sat: int
    address: str
    blockheight: int | None  # None: unconfirmed
    spent: bool = False


@dataclass
class Node:
    name: str
    secret: bytes
    node_id: str
    faults: Faults = field(default_factory=Faults)
    invoices: dict[str, Invoice] = field(default_factory=dict)
    parts: list[Part] = field(default_factory=list)
    utxos: list[Utxo] = field(default_factory=list)
    addresses: set[str] = field(default_factory=set)
    pay_index: int = 0
    invoice_index: int = 0
    sendpay_index: int = 0
    updated: int = 0
    fees_collected_msat: int = 0
    # lightningd's bookkeeper: (tag, credit msat, debit msat, txid or payment hash, when)
    income: list[tuple[str, int, int, str, int]] = field(default_factory=list)


@dataclass
class Attempt:
    """A payment in flight: its HTLCs on every hop, until settled or failed."""

    payer: str
    part: Part
    hops: list[tuple[Channel, str, int]]  # (channel, offerer, amount) from the payer on
    payee: str
    resolved: bool = False
    error: LnError | None = None


class Network:
    # sat/vB a raw transaction must pay to be mined (``/v1/feerate``: a busy market), and
    # bitcoind's ``estimatesmartfee`` answer
    feerate: int = MIN_FEERATE

    def __init__(self, clock: Callable[[], float], seed: int = 0, chain: str = "regtest") -> None:
        self.clock = clock
        self.rng = random.Random(seed)
        self.chain = chain
        self.nodes: dict[str, Node] = {}
        self.channels: dict[str, Channel] = {}
        self.attempts: dict[tuple[str, bytes], Attempt] = {}  # (payer, hash): in flight
        self.height = 101
        self.minted_sat = 0
        self.miner_fees_sat = 0
        self._txids = 0  # made so far
        self._address_owner: dict[str, str] = {}
        self._script_address: dict[bytes, str] = {}  # of the nodes' addresses
        self.onchain = Chain(self._owner_of_script)
        self.listeners: list[Callable[[], None]] = []  # told after every change

    def _owner_of_script(self, script: bytes) -> str | None:
        return self._address_owner.get(self._script_address.get(script, ""))

    def __getstate__(self) -> dict[str, object]:
        return {k: v for k, v in vars(self).items() if k not in ("clock", "listeners")}

    def __setstate__(self, state: dict[str, object]) -> None:
        vars(self).update(state)
        self.listeners = []  # the clock: ``load`` gives it

    def save(self, path: Path) -> None:
        """Write the network to ``path``, replaced whole. Pickled: the file is this
        process's own, as a lightningd's database is, and never comes from anyone else."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL))
        tmp.replace(path)

    @staticmethod
    def load(path: Path, clock: Callable[[], float]) -> Network:
        """The network ``save`` wrote to ``path``, on ``clock``."""
        network = pickle.loads(path.read_bytes())
        if not isinstance(network, Network):
            raise ValueError(f"{path} holds no network")
        network.clock = clock
        return network

    def _changed(self) -> None:
        for listener in self.listeners:
            listener()

    def now(self) -> int:
        return int(self.clock())

    # -- nodes, the chain -------------------------------------------------------------

    def add_node(self, name: str) -> Node:
        if name in self.nodes:
            raise ValueError(f"node {name!r} exists")
        secret = hashlib.sha256(f"lnsim node {name} {self.rng.getrandbits(64)}".encode()).digest()
        node_id = coincurve.PrivateKey(secret).public_key.format().hex()
        node = self.nodes[name] = Node(name, secret, node_id)
        return node

    def node(self, name: str) -> Node:
        return self.nodes[name]

    def by_id(self, node_id: str) -> Node | None:
        return next((n for n in self.nodes.values() if n.node_id == node_id), None)

    def _txid(self) -> str:
        self._txids += 1
        return hashlib.sha256(b"lnsim tx %d" % self._txids).hexdigest()

    def newaddr(self, name: str) -> str:
        program = hashlib.sha256(f"{name} address {len(self._address_owner)}".encode()).digest()
        address = encode_segwit(HRP[self.chain], 1, program)  # P2TR: bech32m
        self.nodes[name].addresses.add(address)
        self._address_owner[address] = name
        self._script_address[p2tr_script(program)] = address
        return address

    def fund(self, name: str, sat: int) -> Utxo:
        """The faucet: a confirmed output of ``sat`` to the node's wallet."""
        utxo = Utxo(self._txid(), 0, sat, self.newaddr(name), self.height)
        self.nodes[name].utxos.append(utxo)
        self.minted_sat += sat
        self._changed()
        return utxo

    def wallet_sat(self, name: str, confirmed_only: bool = False) -> int:
        return sum(
            u.amount_sat
            for u in self.nodes[name].utxos
            if not u.spent and (u.blockheight is not None or not confirmed_only)
        )

    def _spend(self, name: str, sat: int) -> str:
        """Take ``sat`` plus the fee from the node's confirmed outputs; the change goes
        back to its wallet (unconfirmed). Returns the txid."""
        node = self.nodes[name]
        need = sat + TX_FEE_SAT
        picked, total = [], 0
        for u in node.utxos:
            if not u.spent and u.blockheight is not None and total < need:
                picked.append(u)
                total += u.amount_sat
        if total < need:
            raise LnError(
                FUND_CANNOT_AFFORD,
                f"Could not afford {sat}sat using all {len(picked)} available UTXOs: "
                f"{need - total}sat short",
            )
        for u in picked:
            u.spent = True
        txid = self._txid()
        self._miner_fee(name, txid)
        if total > need:
            node.utxos.append(Utxo(txid, 1, total - need, self.newaddr(name), None))
        return txid

    def _miner_fee(self, name: str, txid: str) -> None:
        self.miner_fees_sat += TX_FEE_SAT
        self.nodes[name].income.append(("onchain_fee", 0, TX_FEE_SAT * 1000, txid, self.now()))

    def withdraw(self, name: str, destination: str, sat: int | None) -> str:
        if sat is None:  # "all"
            sat = self.wallet_sat(name, confirmed_only=True) - TX_FEE_SAT
            if sat <= 0:
                raise LnError(FUND_CANNOT_AFFORD, "Could not afford all: nothing to spend")
        if sat <= 0:
            raise LnError(INVALID_PARAMS, "satoshi: must be positive")
        owner = self._address_owner.get(destination)
        if owner is None:
            try:
                script = address_script(destination, HRP[self.chain])
            except InvalidAddress as exc:
                raise LnError(
                    INVALID_PARAMS, f"Could not parse destination address: {exc}"
                ) from None
        txid = self._spend(name, sat)
        if owner is None:
            self.onchain.paid(txid, [SpendOutput(sat, script)], [])
        else:
            self.nodes[owner].utxos.append(Utxo(txid, 0, sat, destination, None))
        self._changed()
        return txid

    def send_raw(self, raw: bytes) -> str:
        """A transaction spending coins of no node (bitcoind's ``sendrawtransaction``):
        checked as Bitcoin checks it (raises ChainError), into the next block."""
        tx, fee, new = self.onchain.send(raw)
        if new:
            self.miner_fees_sat += fee
            for vout, out in enumerate(tx.outputs):
                address = self._script_address.get(out.script_pubkey)
                if address is not None:
                    owner = self.nodes[self._address_owner[address]]
                    owner.utxos.append(Utxo(tx.txid, vout, out.amount_sat, address, None))
            self._changed()
        return tx.txid

    def set_feerate(self, sat_per_vb: int) -> None:
        """The market from now on: blocks take what pays this much, and bitcoind's
        estimate says so."""
        self.feerate = sat_per_vb
        self._changed()

    def mine(self, blocks: int = 1, to: bytes = MINER_SCRIPT) -> int:
        """Advance the chain; what waited for a block confirms, but a transaction sent
        raw that pays less than the market's ``feerate`` (and its outputs to nodes).
        Each block's coinbase pays ``to`` (an address of no node: bitcoind's
        ``generatetoaddress``), or the simulator's miner."""
        self.onchain.mine(self.height + 1, self.feerate)  # in the first block, as bitcoind
        for height in range(self.height + 1, self.height + blocks + 1):
            self.minted_sat += self.onchain.coinbase(height, to)
        self.height += blocks
        for node in self.nodes.values():
            for u in node.utxos:
                waiting = self.onchain.txs.get(u.txid)
                if u.blockheight is None and (waiting is None or waiting.height is not None):
                    u.blockheight = self.height
        for ch in self.channels.values():
            if ch.state == "CHANNELD_AWAITING_LOCKIN" and self.height >= ch.lockin_at:
                ch.state = "CHANNELD_NORMAL"
            s = ch.splice
            if s is not None and self.height >= s.confirm_at:
                ch.capacity_sat += s.capacity_delta_sat
                if s.relative_sat > 0:
                    ch.balance[s.node] += s.relative_sat * 1000
                ch.splice = None
                ch.state = "CHANNELD_NORMAL"
        self._changed()
        return self.height

    # -- channels ---------------------------------------------------------------------

    def fundchannel(self, name: str, peer: str, sat: int, push_msat: int = 0) -> Channel:
        if peer not in self.nodes or peer == name:
            raise LnError(CONNECT_NO_KNOWN_ADDRESS, f"Unknown peer {peer}")
        if sat <= 0 or push_msat < 0 or push_msat > sat * 1000:
            raise LnError(INVALID_PARAMS, "amount and push_msat must be positive, push within it")
        txid = self._spend(name, sat)
        scid = f"{self.height + 1}x{len(self.channels) + 1}x0"
        ch = Channel(
            channel_id=hashlib.sha256(bytes.fromhex(txid) + b"\x00").hexdigest(),
            scid=scid,
            a=name,
            b=peer,
            capacity_sat=sat,
            balance={name: sat * 1000 - push_msat, peer: push_msat},
            opener=name,
            lockin_at=self.height + 1,
        )
        self.channels[ch.channel_id] = ch
        self._changed()
        return ch

    def channels_of(self, name: str) -> Iterator[Channel]:
        return (c for c in self.channels.values() if name in (c.a, c.b))

    def channel(self, name: str, ref: str) -> Channel:
        """A channel of ``name`` by channel id, short channel id or peer id."""
        for c in self.channels_of(name):
            peer = self.nodes[c.other(name)].node_id
            if ref in (c.channel_id, c.scid, peer):
                return c
        raise LnError(LIGHTNINGD, f"Unknown channel {ref}")

    def splice(self, name: str, ref: str, relative_sat: int) -> str:
        """Splice ``relative_sat`` in (> 0, from the wallet) or out (< 0, to the wallet);
        the channel keeps working, and the new capacity counts once a block confirms it."""
        ch = self.channel(name, ref)
        if ch.splice is not None or not ch.usable():
            raise LnError(355, "Channel is busy: a splice is in flight or it is not open")
        if relative_sat == 0:
            raise LnError(INVALID_PARAMS, "amount: must not be zero")
        if relative_sat > 0:
            txid = self._spend(name, relative_sat)
            delta = relative_sat
        else:
            delta = relative_sat - TX_FEE_SAT  # the fee comes out of the channel
            # until a block confirms it both the old and the new channel must be valid:
            # the old one's reserve (the larger) holds meanwhile
            if ch.balance[name] - ch.offered(name) + delta * 1000 < ch.reserve_msat:
                raise LnError(SPLICE_FUNDING_LOW, "Not enough funds in the channel to splice out")
            ch.balance[name] += delta * 1000
            txid = self._txid()
            self._miner_fee(name, txid)
            self.nodes[name].utxos.append(Utxo(txid, 1, -relative_sat, self.newaddr(name), None))
        ch.splice = Splice(txid, name, relative_sat, delta, self.height + 1)
        ch.state = "CHANNELD_AWAITING_SPLICE"
        self._changed()
        return txid

    # -- invoices ---------------------------------------------------------------------

    def invoice(
        self,
        name: str,
        amount_msat: int | None,
        label: str,
        description: str,
        expiry: int = DEFAULT_EXPIRY_S,
        preimage: bytes | None = None,
    ) -> Invoice:
        node = self.nodes[name]
        if label in node.invoices:
            raise LnError(INVOICE_LABEL_ALREADY_EXISTS, "Duplicate label")
        if preimage is None:
            preimage = hmac.digest(node.secret, b"preimage %d" % self.rng.getrandbits(64), "sha256")
        payment_hash = hashlib.sha256(preimage).digest()
        if any(i.payment_hash == payment_hash for i in node.invoices.values()):
            raise LnError(INVOICE_PREIMAGE_ALREADY_EXISTS, "preimage already used")
        now = self.now()
        tags = Tags()
        tags.add(TagChar.payment_hash, payment_hash.hex())
        secret = hmac.digest(node.secret, b"secret" + payment_hash, "sha256")
        tags.add(TagChar.payment_secret, secret.hex())
        tags.add(TagChar.description, description)
        tags.add(TagChar.expire_time, expiry)
        tags.add(TagChar.min_final_cltv_expiry, MIN_FINAL_CLTV)
        tags.add(
            TagChar.features,
            Features.from_feature_list(
                {
                    Feature.var_onion_optin: FeatureState.required,
                    Feature.payment_secret: FeatureState.required,
                }
            ),
        )
        amount = MilliSatoshi(amount_msat) if amount_msat is not None else None
        bolt11 = encode_bolt11(
            Bolt11(currency=INVOICE_HRP[self.chain], date=now, tags=tags, amount_msat=amount),
            node.secret.hex(),
        )
        node.invoice_index += 1
        inv = Invoice(
            label,
            bolt11,
            payment_hash,
            preimage,
            amount_msat,
            description,
            now + expiry,
            node.invoice_index,
        )
        node.invoices[label] = inv
        self._changed()
        return inv

    def expire_invoices(self, name: str) -> None:
        now = self.now()
        for inv in self.nodes[name].invoices.values():
            if inv.status == "unpaid" and inv.expires_at <= now:
                inv.status = "expired"

    def delinvoice(self, name: str, label: str, status: str) -> Invoice:
        node = self.nodes[name]
        self.expire_invoices(name)
        inv = node.invoices.get(label)
        if inv is None:
            raise LnError(INVOICE_NOT_FOUND, "Unknown invoice")
        if inv.status != status:
            raise LnError(
                INVOICE_STATUS_UNEXPECTED,
                f"Invoice status is {inv.status} not {status}",
                {"current_status": inv.status, "expected_status": status},
            )
        del node.invoices[label]
        self._changed()
        return inv

    # -- payments ---------------------------------------------------------------------

    def decode(self, bolt11: str) -> Bolt11:
        try:
            inv = decode_bolt11(bolt11)
        except (Bolt11Exception, ValueError, KeyError, IndexError) as exc:
            raise LnError(INVALID_PARAMS, f"Invalid bolt11: {exc}") from None
        if inv.currency != INVOICE_HRP[self.chain]:
            raise LnError(INVALID_PARAMS, f"Invalid bolt11: wrong network {inv.currency}")
        return inv

    def start_payment(
        self, name: str, bolt11: str, amount_msat: int | None, maxfee_msat: int | None, xpay: bool
    ) -> Attempt | Part:
        """Add the HTLCs of a payment (returns its ``Attempt``), or the earlier part that
        paid it (``pay`` answers that success again; ``xpay`` refuses with 219), or an
        ``LnError`` where nothing was sent."""
        inv = self.decode(bolt11)
        payment_hash = bytes.fromhex(inv.payment_hash)
        node = self.nodes[name]
        done = [p for p in node.parts if p.payment_hash == payment_hash and p.status == "complete"]
        if done:
            if xpay:
                raise LnError(PAY_ALREADY_PAID, "Already paid this invoice successfully")
            return done[0]
        if (name, payment_hash) in self.attempts:
            raise LnError(PAY_IN_PROGRESS, "Payment is still in progress")
        if inv.amount_msat is not None:
            if amount_msat is not None and amount_msat != int(inv.amount_msat):
                raise LnError(INVALID_PARAMS, "amount_msat: should not be set for this invoice")
            amount = int(inv.amount_msat)
        elif amount_msat is None:
            raise LnError(INVALID_PARAMS, "amount_msat: required for an invoice without amount")
        else:
            amount = amount_msat
        if amount <= 0:
            raise LnError(INVALID_PARAMS, "amount_msat: must be positive")
        if inv.date + inv.expiry <= self.now():
            raise LnError(
                PAY_INVOICE_EXPIRED,
                "Invoice expired",
                {"now": self.now(), "expiry": inv.date + inv.expiry},
            )
        payee = self.by_id(inv.payee or "")
        if payee is None or payee.name == name:
            raise LnError(PAY_ROUTE_NOT_FOUND, "Unknown destination: no route")
        hops = self._route(name, payee.name, amount)
        if hops is None:
            raise LnError(PAY_ROUTE_NOT_FOUND, f"Could not find a route to {inv.payee}")
        sent = hops[0][2]
        if maxfee_msat is not None and sent - amount > maxfee_msat:
            raise LnError(
                PAY_ROUTE_TOO_EXPENSIVE,
                f"Fee {sent - amount}msat exceeds maxfee {maxfee_msat}msat",
                {"fee": sent - amount},
            )
        for ch, offerer, amt in hops:
            ch.htlcs.append(Htlc(payment_hash, amt, offerer))
        node.sendpay_index += 1
        groupid = 1 + max(
            (p.groupid for p in node.parts if p.payment_hash == payment_hash), default=0
        )
        part = Part(
            node.sendpay_index,
            groupid,
            payment_hash,
            amount,
            sent,
            payee.node_id,
            self.now(),
            bolt11,
            None,
        )
        node.parts.append(part)
        attempt = self.attempts[(name, payment_hash)] = Attempt(name, part, hops, payee.name)
        self._changed()
        return attempt

    def _route(self, payer: str, payee: str, amount: int) -> list[tuple[Channel, str, int]] | None:
        """The cheapest route (then the shortest) of at most ``MAX_HOPS`` channels, each
        of which can carry what it must; the amounts each hop carries, from the payer."""
        best: tuple[int, int, list[tuple[Channel, str, int]]] | None = None

        def usable(ch: Channel, frm: str) -> bool:
            to = ch.other(frm)
            return ch.usable() and not self.nodes[to].faults.offline

        def walk(at: str, path: list[tuple[Channel, str]], seen: set[str]) -> None:
            nonlocal best
            if at == payee:
                hops, need = [], amount
                for i in range(len(path) - 1, -1, -1):
                    ch, frm = path[i]
                    if ch.spendable(frm) < need:
                        return
                    hops.append((ch, frm, need))
                    if i > 0:  # the node forwarding over ``ch`` charges its fee
                        need += ch.fee_base_msat + need * ch.fee_ppm // 1_000_000
                hops.reverse()
                key = (hops[0][2], len(hops))
                if best is None or key < best[:2]:
                    best = (*key, hops)
                return
            if len(path) == MAX_HOPS:
                return
            for ch in sorted(self.channels_of(at), key=lambda c: c.channel_id):
                nxt = ch.other(at)
                if nxt not in seen and usable(ch, at):
                    walk(nxt, [*path, (ch, at)], seen | {nxt})

        walk(payer, [], {payer})
        return best[2] if best is not None else None

    def advance(self, attempt: Attempt) -> None:
        """The HTLC reached the payee: it settles or fails now, unless the payee holds it
        (``Faults.hold``) until ``release``."""
        if not self.nodes[attempt.payee].faults.hold:
            self.resolve(attempt)

    def resolve(self, attempt: Attempt) -> None:
        """The payee takes or refuses the HTLC; then every hop settles or fails."""
        if attempt.resolved:
            return
        payee = self.nodes[attempt.payee]
        part = attempt.part
        inv = next(
            (i for i in payee.invoices.values() if i.payment_hash == part.payment_hash), None
        )
        self.expire_invoices(payee.name)
        if payee.faults.fail_next > 0:
            payee.faults.fail_next -= 1
            self._fail(attempt, TEMPORARY_NODE_FAILURE, "WIRE_TEMPORARY_NODE_FAILURE")
        elif (
            inv is None
            or inv.status != "unpaid"
            or (inv.amount_msat is not None and part.amount_msat < inv.amount_msat)
        ):
            self._fail(
                attempt,
                INCORRECT_OR_UNKNOWN_PAYMENT_DETAILS,
                "WIRE_INCORRECT_OR_UNKNOWN_PAYMENT_DETAILS",
            )
        else:
            self._settle(attempt, inv)
        self._changed()

    def _settle(self, attempt: Attempt, inv: Invoice) -> None:
        payee, now = self.nodes[attempt.payee], self.now()
        payee.pay_index += 1
        payee.updated += 1
        inv.status, inv.pay_index, inv.paid_at = "paid", payee.pay_index, now
        inv.amount_received_msat = attempt.part.amount_msat
        inv.updated_index = payee.updated
        for i, (ch, offerer, amt) in enumerate(attempt.hops):
            self._drop_htlc(ch, attempt.part.payment_hash, offerer)
            ch.balance[offerer] -= amt
            ch.balance[ch.other(offerer)] += amt
            if i > 0:  # the forwarding node kept the difference
                fee = attempt.hops[i - 1][2] - amt
                self.nodes[offerer].fees_collected_msat += fee
                self.nodes[offerer].income.append(
                    ("routed", fee, 0, attempt.part.payment_hash.hex(), now)
                )
        part = attempt.part
        payer = self.nodes[attempt.payer]
        payer.updated += 1
        part.status, part.completed_at, part.preimage = "complete", now, inv.preimage
        part.updated_index = payer.updated
        attempt.resolved = True
        del self.attempts[(attempt.payer, part.payment_hash)]

    def _fail(self, attempt: Attempt, failcode: int, failcodename: str) -> None:
        for ch, offerer, _ in attempt.hops:
            self._drop_htlc(ch, attempt.part.payment_hash, offerer)
        payer = self.nodes[attempt.payer]
        payer.updated += 1
        part = attempt.part
        part.status, part.completed_at, part.updated_index = "failed", self.now(), payer.updated
        attempt.resolved = True
        attempt.error = LnError(
            PAY_DESTINATION_PERM_FAIL,
            f"failed: {failcodename}",
            {
                "erring_index": len(attempt.hops),
                "erring_node": self.nodes[attempt.payee].node_id,
                "failcode": failcode,
                "failcodename": failcodename,
            },
        )
        del self.attempts[(attempt.payer, part.payment_hash)]

    @staticmethod
    def _drop_htlc(ch: Channel, payment_hash: bytes, offerer: str) -> None:
        for i, h in enumerate(ch.htlcs):
            if h.payment_hash == payment_hash and h.offerer == offerer:
                del ch.htlcs[i]
                return
        raise AssertionError("an HTLC of a payment in flight is missing")

    def release(self, payee: str) -> None:
        """Resolve every HTLC held at ``payee``."""
        for attempt in [a for a in self.attempts.values() if a.payee == payee]:
            self.resolve(attempt)

    def pays(self, name: str, payment_hash: bytes | None = None) -> list[dict[str, object]]:
        """``listpays``: one entry per (payment hash, group), its parts aggregated."""
        groups: dict[tuple[bytes, int], list[Part]] = {}
        for p in self.nodes[name].parts:
            if payment_hash is None or p.payment_hash == payment_hash:
                groups.setdefault((p.payment_hash, p.groupid), []).append(p)
        out = []
        for parts in groups.values():
            first = parts[0]
            statuses = {p.status for p in parts}
            status = (
                "complete"
                if "complete" in statuses
                else "pending"
                if "pending" in statuses
                else "failed"
            )
            entry: dict[str, object] = {
                "created_index": first.created_index,
                "payment_hash": first.payment_hash.hex(),
                "status": status,
                "destination": first.destination,
                "created_at": first.created_at,
                "bolt11": first.bolt11,
                "amount_sent_msat": sum(p.amount_sent_msat for p in parts),
            }
            if status == "complete":
                done = next(p for p in parts if p.status == "complete")
                assert done.preimage is not None
                entry.update(
                    preimage=done.preimage.hex(),
                    amount_msat=sum(p.amount_msat for p in parts if p.status == "complete"),
                    number_of_parts=len(parts),
                    completed_at=done.completed_at,
                )
            if first.updated_index is not None:
                entry["updated_index"] = max(p.updated_index or 0 for p in parts)
            out.append(entry)
        return out

    # -- the books --------------------------------------------------------------------

    def books(self) -> dict[str, int]:
        """Where every msat minted is; ``missing`` is 0 unless money was made or lost."""
        wallets = sum(self.wallet_sat(n) for n in self.nodes) * 1000
        balances = sum(sum(c.balance.values()) for c in self.channels.values())
        splicing = sum(
            c.splice.relative_sat * 1000
            for c in self.channels.values()
            if c.splice is not None and c.splice.relative_sat > 0
        )
        fees = self.miner_fees_sat * 1000
        outside = self.onchain.unspent_sat * 1000
        held = wallets + balances + splicing + fees + outside
        return {
            "minted_msat": self.minted_sat * 1000,
            "wallets_msat": wallets,
            "channels_msat": balances,  # HTLCs in flight are in them until they settle
            "splicing_msat": splicing,
            "miner_fees_msat": fees,
            "outside_msat": outside,
            "missing_msat": self.minted_sat * 1000 - held,
        }
