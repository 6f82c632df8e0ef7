"""A wallet against a gateway: the seed file, the gateway client, and the wallet commands.

The wallet file holds the BIP39 words, the network, the gateway URL and how many keys
of each chain were handed out; it is written with mode 0600 and must be protected like
the seed it is (a real deployment keeps the words in a hardware or encrypted store).

It also keeps the name of the ledger holding its coins and the coins it last saw: while
its own operator is down, another guild member's gateway (``--via``) serves that ledger
but has no index of it, so the wallet pays with the coins it knows, each checked there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from constellation.address import Network, decode_address, encode_address
from constellation.keys import XOnlyPubKey
from constellation.ledger.partition import Coin
from constellation.tx import AnyIssuance, Transaction
from constellation.wallet import CHANGE, RECEIVE, Wallet, new_mnemonic
from services.runtime import ConfigError

ADDRESS_TIMEOUT = aiohttp.ClientTimeout(total=5)
GAP = 5  # unused receive addresses past the last handed out that a balance also checks


class GatewayError(RuntimeError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message} (HTTP {status})")
        self.status = status
        self.code = code


class Gateway:
    """The public API, over HTTP; transactions, issuances and totals go to ``ledger``
    (a guild member's name) where given, else to the gateway's own operator's."""

    def __init__(self, url: str, session: aiohttp.ClientSession, ledger: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.session = session
        self.query = f"?ledger={ledger}" if ledger else ""

    async def _json(self, resp: aiohttp.ClientResponse) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = await resp.json(content_type=None)
        except (aiohttp.ContentTypeError, json.JSONDecodeError, ValueError):
            raise GatewayError(resp.status, "http", await resp.text()) from None
        if resp.status >= 400:
            err = doc.get("error", {})
            raise GatewayError(resp.status, err.get("code", "http"), err.get("message", ""))
        return doc

    async def get(self, path: str) -> dict[str, Any]:
        async with self.session.get(self.url + path) as resp:
            return await self._json(resp)

    async def post(
        self, path: str, body: bytes, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        hdrs = {"Content-Type": "application/octet-stream", **(headers or {})}
        async with self.session.post(self.url + path, data=body, headers=hdrs) as resp:
            return await self._json(resp)

    async def submit(self, tx: Transaction, key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": key} if key else None
        return await self.post("/v1/tx" + self.query, tx.encode(), headers)

    async def issue(self, issuance: AnyIssuance) -> dict[str, Any]:
        return await self.post("/v1/issuance" + self.query, issuance.encode())

    async def totals(self) -> dict[str, Any]:
        return await self.get("/v1/ledger" + self.query)

    async def coin(self, coin_id: bytes) -> dict[str, Any] | None:
        """A coin's state, or None where the ledger has no such coin."""
        try:
            return await self.get(f"/v1/coin/{coin_id.hex()}" + self.query)
        except GatewayError as exc:
            if exc.status == 404:
                return None
            raise

    async def coins(self, address: str) -> dict[bytes, Coin]:
        """Every unspent coin of ``address``, page by page."""
        # The wallet's own address: its network is whatever its prefix says.
        owner = decode_address(address, address.rpartition("1")[0].lower())
        found: dict[bytes, Coin] = {}
        after = 0
        while True:
            doc = await self.get(f"/v1/address/{address}/coins?limit=500&after={after}")
            found.update(
                (bytes.fromhex(c["coin_id"]), Coin(c["value_msat"], owner))
                for c in doc["coins"]
                if c["status"] == "unspent"
            )
            if "next" not in doc:
                return found
            after = doc["next"]

    async def incoming(self, address: str, limit: int = 50) -> list[dict[str, Any]]:
        """Outputs paid to ``address`` from other operators' ledgers (pending, released)."""
        doc = await self.get(f"/v1/address/{address}/incoming?limit={limit}")
        entries: list[dict[str, Any]] = doc["incoming"]
        return entries

    async def history(self, address: str, limit: int = 50) -> list[dict[str, Any]]:
        doc = await self.get(f"/v1/address/{address}/history?limit={limit}")
        entries: list[dict[str, Any]] = doc["history"]
        return entries


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
    ecash: list[dict[str, Any]] = field(default_factory=list)  # proofs worth less than a coin

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
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)

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
        return 0
    doc = WalletFile.load(path)
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
        if args.wallet_command == "history":
            await _history(gw, doc, args.limit, out)
            return 0
        coins = await unspent(gw, doc, via)  # the balance
        doc.save(path)
        total = sum(c.value_msat for c in coins.values())
        where = f" (as {via} sees them)" if via else ""
        print(f"{total} msat in {len(coins)} coins{where}", file=out)
        if not via:
            await _pending(gw, doc, out)
        if doc.ecash:
            kept = sum(p["amount"] for p in doc.ecash)
            print(f"+ {kept} sat of ecash, worth less than a coin's fee", file=out)
    return 0


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
        pending += [e for e in await gw.incoming(address) if e["status"] == "pending"]
    if pending:
        total = sum(e["value_msat"] for e in pending)
        froms = ", ".join(sorted({e["from"] for e in pending}))
        print(
            f"+ {total} msat pending in {len(pending)} payments from {froms}:"
            " spendable once that operator settles",
            file=out,
        )


async def _history(gw: Gateway, doc: WalletFile, limit: int, out: Any) -> None:
    entries = []
    for address in doc.addresses():
        entries += [(e["at"], address, e) for e in await gw.history(address, limit)]
    for at, address, e in sorted(entries, key=lambda x: x[0], reverse=True)[:limit]:
        sign = "+" if e["kind"] == "received" else "-"
        print(f"{at}  {sign}{e['value_msat']:>15} msat  {address}  tx {e['txid']}", file=out)


async def send(
    gw: Gateway,
    doc: WalletFile,
    path: Path,
    coins: dict[bytes, Coin],
    address: str,
    amount_msat: int,
    fee_msat: int,
    out: Any,
) -> None:
    """Pay ``amount_msat`` to an L3 address from ``coins``, and say what happened."""
    here = bytes.fromhex(doc.ledger_id) if doc.ledger_id else None
    tx = doc.wallet().pay(coins, address, amount_msat, fee_msat, here=here)
    if len(tx.outputs) > 1:
        doc.change += 1  # the change key is spent from the chain: remember it
        doc.save(path)
    receipt = await gw.submit(tx, key=tx.txid.hex())
    spent = {cid for cid, _ in tx.inputs}
    kept = {cid: coin for cid, coin in coins.items() if cid not in spent}
    for output, (value, owner) in zip(receipt["outputs"][1:], tx.outputs[1:], strict=True):
        kept[bytes.fromhex(output["coin_id"])] = Coin(value, owner)  # our change
    doc.remember(kept)
    doc.save(path)
    blocks = ", ".join(f"worker {b['worker']} block {b['height']}" for b in receipt["blocks"])
    print(f"sent {amount_msat} msat to {address}", file=out)
    print(f"txid {receipt['txid']} committed in {blocks}", file=out)
    paid = receipt["outputs"][0]
    if "ledger" in paid:
        print(
            f"pending at {paid['ledger']} until the operators settle over Lightning (the"
            " receiver's `wallet balance` shows it pending, then as a coin)",
            file=out,
        )
