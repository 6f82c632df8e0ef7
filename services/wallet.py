"""A wallet against a gateway: the seed file and the wallet commands (the gateway client is
``services.api_client``; as a light client, ``services.light``).

The wallet file holds the BIP39 words, the network, the gateway URL and how many keys
of each chain were handed out; it is written with mode 0600 and must be protected like
the seed it is (a real deployment keeps the words in a hardware or encrypted store).

It also keeps the name of the ledger holding its coins and the coins it last saw: while
its own operator is down, another guild member's gateway (``--via``) serves that ledger
but has no index of it, so the wallet pays with the coins it knows, each checked there.

Its ecash secrets come from the words too (NUT-13), numbered per keyset: the file keeps
each keyset's next number, so that a wallet restored from its words finds at its mint the
ecash the lost file held (``services.wallet_money``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from constellation.address import Network, decode_address, encode_address
from constellation.ecash import client
from constellation.keys import XOnlyPubKey
from constellation.ledger.partition import Coin
from constellation.lightclient import proof as pf
from constellation.protocol import cashu as nut
from constellation.wallet import CHANGE, RECEIVE, GapScan, Wallet, new_mnemonic, seed_of
from services.api_client import Gateway, GatewayError
from services.light import LightClient, NoServer, Update, describe
from services.runtime import ConfigError, write_atomic

ADDRESS_TIMEOUT = aiohttp.ClientTimeout(total=5)
GAP = 5  # unused receive addresses past the last handed out that a balance also checks
# A rescan (``wallet restore``, ``wallet rescan``) walks each chain of keys until this many
# addresses in a row were never used (BIP 44's gap limit).
SCAN_GAP = 20
PENDING_EXIT = 3  # a payment or deposit whose fate is not known yet


@dataclass
class WalletFile:
    mnemonic: str
    network: str
    gateway: str
    receive: int = 0  # receive keys handed out
    change: int = 0
    ledger: str = ""  # the operator whose ledger holds the coins (its gateway says)
    ledger_id: str = ""  # that ledger's id (hex), named by the wallet's addresses
    coins: dict[str, list[Any]] = field(default_factory=dict)  # id hex: [msat, owner hex]
    mint: str = ""  # the operator's Cashu mint (deposits, invoices paid)
    flows: list[dict[str, Any]] = field(default_factory=list)  # through the mint, in flight
    # Flows given up on, kept whole (their keys, secrets and transactions): what the
    # mint or the ledger did after all can still be proved and asked for.
    archive: list[dict[str, Any]] = field(default_factory=list)
    ecash: list[dict[str, Any]] = field(default_factory=list)  # proofs worth less than a coin
    counters: dict[str, int] = field(default_factory=dict)  # keyset id: next NUT-13 counter
    # As a light client (``wallet pin``): the guild descriptor it trusts, the guild's
    # members in order, the gateways it asks (its own first), the highest checkpoint seen.
    descriptor: str = ""
    members: list[str] = field(default_factory=list)
    servers: list[str] = field(default_factory=list)
    checkpoint: int = 0
    handovers: list[str] = field(default_factory=list)  # followed from the pin's key (hex)

    def remember(self, coins: dict[bytes, Coin]) -> None:
        self.coins = {cid.hex(): [c.value_msat, bytes(c.owner).hex()] for cid, c in coins.items()}

    def known(self) -> dict[bytes, Coin]:
        return {
            bytes.fromhex(cid): Coin(v, XOnlyPubKey(bytes.fromhex(owner)))
            for cid, (v, owner) in self.coins.items()
        }

    @staticmethod
    def create(
        path: Path, gateway: str, network: str, words: str | None = None, mint: str = ""
    ) -> WalletFile:
        if path.exists():
            raise FileExistsError(f"{path} exists: a wallet is never overwritten")
        mnemonic = words if words is not None else new_mnemonic()
        doc = WalletFile(mnemonic, network, gateway, mint=mint)
        doc.wallet()  # checks the words and the network
        doc.save(path)
        return doc

    @staticmethod
    def load(path: Path) -> WalletFile:
        try:
            return WalletFile(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"no wallet at {path}: `constellation wallet create`") from None

    def save(self, path: Path) -> None:
        """Durably: what a flow records before it asks the mint or the ledger survives a
        power loss (the words, the secrets of ecash bought, signed transactions)."""
        write_atomic(path, (json.dumps(asdict(self), indent=2) + "\n").encode())

    def wallet(self) -> Wallet:
        """The wallet with every key handed out so far (and the gap) registered."""
        w = Wallet.from_mnemonic(self.mnemonic, network=Network.from_name(self.network))
        for i in range(self.receive + GAP):
            w.key(RECEIVE, i)
        for i in range(self.change):
            w.key(CHANGE, i)
        return w

    def addresses(self) -> list[str]:
        w = self.wallet()
        keys = [w.key(RECEIVE, i) for i in range(self.receive + GAP)]
        keys += [w.key(CHANGE, i) for i in range(self.change)]
        return [encode_address(k.pubkey, w.network) for k in keys]

    def next_address(self) -> str:
        """A fresh receive address, naming the wallet's ledger where it knows it (then
        a payer at another operator pays it there, settled between the operators)."""
        key = self.wallet().key(RECEIVE, self.receive)
        self.receive += 1
        ledger = bytes.fromhex(self.ledger_id) if self.ledger_id else None
        return encode_address(key.pubkey, Network.from_name(self.network), ledger)

    def outputs(
        self, amounts: Sequence[int], keyset_id: str
    ) -> tuple[list[nut.BlindedMessage], list[client.Secret]]:
        """Outputs of these amounts made of the wallet's next NUT-13 secrets of
        ``keyset_id``, its counter moved past them: saved with the outputs, before they
        are sent, none is made twice (the mint signs an output once), and a restore
        finds each one the mint signed."""
        counter = self.counters.get(keyset_id, 0)
        made = client.derived_outputs(amounts, keyset_id, seed_of(self.mnemonic), counter)
        self.counters[keyset_id] = counter + len(amounts)
        return made

    def learn(self, totals: dict[str, Any]) -> None:
        """The wallet's ledger, as its own gateway names it."""
        self.ledger = self.ledger or totals["ledger"]
        self.ledger_id = self.ledger_id or totals.get("ledger_id", "")


@contextlib.contextmanager
def wallet_lock(path: Path) -> Iterator[None]:
    """One wallet command at a time on a wallet file (another waits its turn): two would
    each write the file from what they read, and one's flows would be lost."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another wallet command on {path}", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


async def wallet_coins(gateway: Gateway, addresses: list[str]) -> dict[bytes, Coin]:
    coins: dict[bytes, Coin] = {}
    for address in addresses:
        coins.update(await gateway.coins(address))
    return coins


async def known_coins(gateway: Gateway, doc: WalletFile) -> dict[bytes, Coin]:
    """The coins the wallet knows that ``gateway`` (serving its ledger) says are unspent."""
    found = {}
    for cid, coin in doc.known().items():
        state = await gateway.coin(cid)
        if state is not None and state["status"] == "unspent":
            found[cid] = coin
    return found


async def wallet_command(args: Any, out: Any) -> int:
    """``constellation wallet …`` (``args`` from the CLI's parser)."""
    path: Path = args.file
    if args.wallet_command in ("create", "restore"):
        words = " ".join(args.words) if args.wallet_command == "restore" else None
        doc = WalletFile.create(path, args.gateway, args.network, words, args.mint)
        if words is None:
            print("write these words down; they are the only way to restore the wallet:", file=out)
            print(f"  {doc.mnemonic}", file=out)
        print(f"wallet saved to {path} ({doc.network}, gateway {doc.gateway})", file=out)
        if words is None:
            return 0
    else:
        doc = WalletFile.load(path)
    if args.wallet_command in ("restore", "rescan"):
        return await _rescan(doc, path, args.gateway, out)
    if args.wallet_command == "address":
        if not doc.ledger_id:  # ask once; without it the address names no ledger
            with contextlib.suppress(aiohttp.ClientError, GatewayError, TimeoutError):
                async with aiohttp.ClientSession(timeout=ADDRESS_TIMEOUT) as session:
                    doc.learn(await Gateway(doc.gateway, session).totals())
        address = doc.next_address()
        doc.save(path)
        print(address, file=out)
        return 0
    via = getattr(args, "via", "")
    async with aiohttp.ClientSession() as session:
        gw = gateway_of(doc, session, args.gateway, via)
        if args.wallet_command == "pin":
            await pin(gw, doc, args.descriptor, args.server, out)
            doc.save(path)
            return 0
        if args.wallet_command == "verify":
            code = await verify(doc, session, _txid(args.txid), out)
            doc.save(path)
            return code
        if args.wallet_command == "follow":
            code = await follow(doc, session, args.address, args.since, args.count, out)
            doc.save(path)
            return code
        if args.wallet_command == "history":
            await _history(gw, doc, args.limit, out)
            return 0
        coins = await unspent(gw, doc, via)  # the balance
        doc.save(path)
        total = sum(c.value_msat for c in coins.values())
        where = f" (as {via} sees them)" if via else ""
        print(f"{total} msat in {len(coins)} coins{where}", file=out)
        if doc.descriptor:
            await verify_coins(doc, session, coins, out)
            doc.save(path)
        if not via:
            await _pending(gw, doc, out)
        if doc.ecash:
            kept = sum(p["amount"] for p in doc.ecash)
            print(f"+ {kept} sat of ecash, worth less than a coin's fee", file=out)
    return 0


async def _rescan(doc: WalletFile, path: Path, url: str, out: Any) -> int:
    """Find how far each chain of keys was used, and save it (``rescan``)."""
    try:
        async with aiohttp.ClientSession() as session:
            await rescan(gateway_of(doc, session, url, ""), doc)
    except (aiohttp.ClientError, GatewayError, TimeoutError) as exc:
        print(
            f"the gateway did not say which keys were used ({exc}): coins at later keys are"
            " not counted until `constellation wallet rescan` succeeds",
            file=out,
        )
        return 1
    doc.save(path)
    print(f"keys in use: {doc.receive} to receive, {doc.change} for change", file=out)
    return 0


async def rescan(gateway: Gateway, doc: WalletFile) -> None:
    """Set how many keys of each chain were handed out from what ``gateway`` knows of
    them, as a wallet restored from its words must: its coins may sit at any receive
    key handed out, and at every change key its payments made. A key counts as used
    where its address has any history (a coin received, even spent since) or an
    output paid to it from another ledger; each chain is walked until ``SCAN_GAP``
    addresses in a row were never used. Never lowers what the file says."""
    w = doc.wallet()
    for chain in (RECEIVE, CHANGE):
        scan = GapScan(SCAN_GAP, SCAN_GAP)
        while batch := scan.next():
            for index in batch:
                address = encode_address(w.key(chain, index).pubkey, w.network)
                if await gateway.history(address, 1) or await gateway.incoming(address, 1):
                    scan.used(index)
        if chain == RECEIVE:
            doc.receive = max(doc.receive, scan.end)
        else:
            doc.change = max(doc.change, scan.end)


def _txid(text: str) -> bytes:
    try:
        txid = bytes.fromhex(text)
    except ValueError:
        txid = b""
    if len(txid) != 32:
        raise ConfigError(f"{text[:80]!r} is not a transaction id (32 bytes in hex)")
    return txid


async def pin(gw: Gateway, doc: WalletFile, text: str, servers: list[str], out: Any) -> None:
    """Pin the guild descriptor ``text`` (or, without one, the one the wallet's gateway
    serves: compare it with what the guild publishes), and the gateways to ask. The
    members' names are taken once they make the member-set root the descriptor pins."""
    served = await gw.get("/v1/lc/descriptor")
    if not text:
        text = served["descriptor"]
        print(f"the descriptor {gw.url} serves (compare it with the guild's):", file=out)
    descriptor = pf.Descriptor.decode(text)
    members = [(m["name"], bytes.fromhex(m["key"])) for m in served["member_keys"]]
    if pf.members_root(served["threshold"], members) != descriptor.pin.members:
        raise ConfigError(
            f"{gw.url} names members the descriptor's member set is not: it may lie; pin"
            " through another member's gateway (--gateway)"
        )
    doc.descriptor = text
    doc.members = [name for name, _ in members]
    doc.servers = list(dict.fromkeys([gw.url, *(s.rstrip("/") for s in servers)]))
    doc.checkpoint = 0
    doc.handovers = []
    print(f"  {text}", file=out)
    print(
        f"pinned guild {descriptor.pin.guild!r}, key {descriptor.pin.key.hex()}, members"
        f" {', '.join(doc.members)}; asking {', '.join(doc.servers)}",
        file=out,
    )


def light_client(doc: WalletFile, session: aiohttp.ClientSession) -> LightClient:
    if not doc.descriptor:
        raise ConfigError("the wallet pins no guild: `constellation wallet pin`")
    descriptor = pf.Descriptor.decode(doc.descriptor)
    handovers = tuple(pf.SignedCheckpoint.decode(bytes.fromhex(h)) for h in doc.handovers)
    servers = doc.servers or [doc.gateway]
    return LightClient(descriptor, servers, session, doc.checkpoint, handovers=handovers)


def kept(doc: WalletFile, client: LightClient) -> None:
    """What the wallet keeps of a light client's checks: the highest checkpoint seen,
    and the handovers followed (the key that signs now)."""
    doc.checkpoint = client.seen
    doc.handovers = [h.encode().hex() for h in client.pin.handovers]


def _said(client: LightClient, out: Any) -> None:
    """What gateways failed on the way (the wallet moved on from each)."""
    for failure in client.failures:
        print(f"! {failure} (asked the next gateway)", file=out)
    client.failures.clear()


async def verify(doc: WalletFile, session: aiohttp.ClientSession, txid: bytes, out: Any) -> int:
    """``wallet verify TXID``: the transaction's proof, checked against the pinned guild."""
    client = light_client(doc, session)
    try:
        url, proof, placed = await client.tx(txid)
    except NoServer:
        for failure in client.failures:
            print(f"! {failure}", file=out)
        print(f"verdict: NOT VERIFIED: no gateway proved transaction {txid.hex()}", file=out)
        return 1
    _said(client, out)
    heights = sorted({c.checkpoint.height for c in proof.checkpoints})
    print(f"transaction {txid.hex()} (proof from {url}):", file=out)
    for line in describe(placed, doc.members):
        print(line, file=out)
    client.seen = max(client.seen, *heights)
    kept(doc, client)
    print(
        f"verdict: VERIFIED: committed, under checkpoint {', '.join(map(str, heights))}"
        f" signed by the guild key",
        file=out,
    )
    return 0


async def follow(
    doc: WalletFile,
    session: aiohttp.ClientSession,
    addresses: list[str],
    since: int,
    count: int,
    out: Any,
) -> int:
    """``wallet follow``: each change of the addresses, verified, as the guild signs it."""
    client = light_client(doc, session)
    if since < 0:
        try:
            since = (await client.latest())[1].signed.checkpoint.height
        except NoServer as exc:
            print(f"! {exc}", file=out)
            return 1
    addresses = addresses or doc.addresses()
    network = doc.wallet().network
    seen = 0
    print(f"following {len(addresses)} addresses from checkpoint {since}", file=out, flush=True)

    async def told(update: Update) -> bool:
        nonlocal seen
        _said(client, out)
        seen += 1
        owner = bytes(decode_address(update.address, network))
        for p in update.placed:
            for c in p.record.changes:
                if c.owner == owner:
                    kind = c.kind.name.lower()
                    print(
                        f"checkpoint {update.checkpoint}: {update.address} {kind}"
                        f" {c.value_msat} msat (coin {c.coin_id.hex()}, tx {update.txid.hex()})"
                        f" VERIFIED via {update.server}",
                        file=out,
                        flush=True,
                    )
        return seen != count

    await client.follow(addresses, network, since, told)
    kept(doc, client)
    return 0


async def verify_coins(
    doc: WalletFile, session: aiohttp.ClientSession, coins: dict[bytes, Coin], out: Any
) -> None:
    """Check each coin the wallet's gateway says it holds against the latest checkpoint."""
    client = light_client(doc, session)
    if doc.ledger not in doc.members:
        print(f"! the wallet's ledger {doc.ledger!r} is not a member of the pinned guild", file=out)
        return
    owner = doc.members.index(doc.ledger)
    try:
        _, latest = await client.latest()
        unconfirmed = []
        for cid, coin in coins.items():
            _, verdict = await client.coin(cid, doc.ledger, owner)
            leaf = verdict.leaf
            if leaf is None:
                unconfirmed.append(cid)
            elif leaf.state is not pf.CoinState.UNSPENT or (
                leaf.value_msat,
                leaf.owner,
            ) != (coin.value_msat, bytes(coin.owner)):
                print(f"! coin {cid.hex()}: the guild's checkpoint says otherwise", file=out)
    except NoServer as exc:
        print(f"! coins not verified: {exc.args[0].splitlines()[0]}", file=out)
        return
    finally:
        _said(client, out)
        kept(doc, client)
    height = latest.signed.checkpoint.height
    checked = len(coins) - len(unconfirmed)
    print(f"{checked} of {len(coins)} coins verified as of checkpoint {height}", file=out)
    for cid in unconfirmed:
        print(f"  coin {cid.hex()}: not under a checkpoint yet", file=out)


def gateway_of(doc: WalletFile, session: aiohttp.ClientSession, url: str, via: str) -> Gateway:
    """The wallet's gateway (``url``, else its own); or, ``via`` another guild member's
    while its own operator is down: it has no index of the wallet's ledger, so the wallet
    pays with the coins it knows, each checked there."""
    if not via:
        return Gateway(url or doc.gateway, session)
    if not doc.ledger:
        raise ConfigError("the wallet does not know its ledger yet: ask its own gateway")
    return Gateway(via, session, ledger=doc.ledger)


async def unspent(gw: Gateway, doc: WalletFile, via: str = "") -> dict[bytes, Coin]:
    """The wallet's unspent coins: from its own gateway's index, or (``via`` another
    member's gateway) those it knows, checked there; remembered either way."""
    if via:
        coins = await known_coins(gw, doc)
    else:
        doc.learn(await gw.totals())
        coins = await wallet_coins(gw, doc.addresses())
    doc.remember(coins)
    return coins


async def _pending(gw: Gateway, doc: WalletFile, out: Any) -> None:
    """Payments to the wallet from other operators' ledgers, not spendable yet."""
    pending = []
    for address in doc.addresses():
        pending += await gw.pending_incoming(address)
    if pending:
        total = sum(e["value_msat"] for e in pending)
        froms = ", ".join(sorted({e["from"] for e in pending}))
        print(
            f"+ {total} msat pending in {len(pending)} payments from {froms}:"
            " spendable once that operator settles",
            file=out,
        )


async def _history(gw: Gateway, doc: WalletFile, limit: int, out: Any) -> None:
    """The wallet's last ``limit`` transactions, newest first, each as what it did to
    the wallet: what it created for the wallet's addresses less what it spent of their
    coins (a payment: what it sent, with the fee, its change left out). The addresses'
    histories (each read until it names ``limit`` transactions) say which are the
    newest; each one's parts are then read whole (``/v1/tx``), as a page may end among
    the coins of one (where it cannot be read, its coins in the pages are summed)."""
    mine = set(doc.addresses())
    at: dict[str, str] = {}
    paged: dict[str, int] = {}
    received: set[str] = set()
    for address in mine:
        txids: set[str] = set()
        before = None
        while len(txids) < limit:
            page = await gw.history(address, limit, before)
            for e in page:
                txids.add(e["txid"])
                at[e["txid"]] = max(at.get(e["txid"], ""), e["at"])
                value = e["value_msat"] if e["kind"] == "received" else -e["value_msat"]
                paged[e["txid"]] = paged.get(e["txid"], 0) + value
                if e["kind"] == "received":
                    received.add(e["coin_id"])
            if len(page) < limit:
                break
            before = page[-1]["seq"]

    async def net(txid: str) -> int:
        try:
            tx = await gw.get(f"/v1/tx/{txid}")
        except GatewayError:  # its commit not indexed yet
            return paged[txid]
        total = 0
        for c in tx["changes"]:
            if c["kind"] == "created" and c.get("address") in mine:
                total += c["value_msat"]
            elif c["kind"] == "spent" and (c.get("address") in mine or c["coin_id"] in received):
                total -= c["value_msat"]
        return total

    newest = sorted(at, key=lambda t: at[t], reverse=True)[:limit]
    nets = await asyncio.gather(*(net(t) for t in newest))
    for txid, value in zip(newest, nets, strict=True):
        what = "received" if value >= 0 else "sent"
        print(f"{at[txid]}  {value:+16} msat  {what:8}  tx {txid}", file=out)


async def send(
    gw: Gateway,
    doc: WalletFile,
    path: Path,
    coins: dict[bytes, Coin],
    address: str,
    amount_msat: int,
    fee_msat: int,
    out: Any,
) -> int:
    """Pay ``amount_msat`` to an L3 address from ``coins``, and say what happened: 0
    (committed), 1 (refused for good after an unclear answer) or ``PENDING_EXIT`` (its
    fate not known yet: it is not sent again as another transaction, which could pay
    twice)."""
    here = bytes.fromhex(doc.ledger_id) if doc.ledger_id else None
    tx = doc.wallet().pay(coins, address, amount_msat, fee_msat, here=here)
    if len(tx.outputs) > 1:
        doc.change += 1  # the change key is spent from the chain: remember it
        doc.save(path)
    try:
        receipt = await gw.submit(tx, key=tx.txid.hex())
    except aiohttp.ClientConnectorError:
        raise  # never sent
    except (GatewayError, aiohttp.ClientError, TimeoutError) as exc:
        if isinstance(exc, GatewayError) and exc.final:
            raise
        # the answer lost, or not final: the same transaction again, until the ledger says
        try:
            committed = await gw.outcome(tx)
        except (GatewayError, aiohttp.ClientError, TimeoutError) as unknown:
            print(
                f"PENDING: transaction {tx.txid.hex()} may still commit ({unknown}); its"
                " coins' state tells (`constellation wallet balance`): do not pay again"
                " before it does",
                file=out,
            )
            return PENDING_EXIT
        if not committed:
            print(f"FAILED: the ledger refused transaction {tx.txid.hex()} ({exc})", file=out)
            return 1
        receipt = {"txid": tx.txid.hex(), "blocks": [], "outputs": [{}]}
    spent = {cid for cid, _ in tx.inputs}
    kept = {cid: coin for cid, coin in coins.items() if cid not in spent}
    for cid, (value, owner) in zip(tx.output_ids[1:], tx.outputs[1:], strict=True):
        kept[cid] = Coin(value, owner)  # our change
    doc.remember(kept)
    doc.save(path)
    blocks = ", ".join(f"worker {b['worker']} block {b['height']}" for b in receipt["blocks"])
    print(f"sent {amount_msat} msat to {address}", file=out)
    print(f"txid {receipt['txid']} committed" + (f" in {blocks}" if blocks else ""), file=out)
    paid = receipt["outputs"][0]
    if "ledger" in paid:
        print(
            f"pending at {paid['ledger']} until the operators settle over Lightning (the"
            " receiver's `wallet balance` shows it pending, then as a coin)",
            file=out,
        )
    return 0
