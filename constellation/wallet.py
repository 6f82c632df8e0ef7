"""A deterministic wallet: BIP39 words → BIP32 keys → addresses and signed payments.

Keys live at ``m/1237'/<network>'/<account>'/<chain>/<index>``: chain 0 receives,
chain 1 takes change. The same words always give the same keys, so a wallet is
recovered from its words alone: a restore walks each chain asking which keys were used
(``GapScan``), as it walks the wallet's ecash secrets at its mint (NUT-13).
The wallet never reads the ledger itself: callers pass the coins it may spend.
"""

from __future__ import annotations

from collections.abc import Mapping

from mnemonic import Mnemonic

from constellation.address import Network, decode_destination, encode_address
from constellation.errors import InsufficientFunds, InvalidKey
from constellation.keys import ExtendedKey, SigningKey, XOnlyPubKey
from constellation.ledger.partition import Coin
from constellation.sighash import sign_transaction
from constellation.tx import HERE, MAX_INPUTS, Transaction, TxInput, TxOutput

PURPOSE = 1237
RECEIVE, CHANGE = 0, 1
_NETWORK_INDEX = {Network.MAIN: 0, Network.TEST: 1, Network.REGTEST: 2}
_BIP39 = Mnemonic("english")


def seed_of(words: str, passphrase: str = "") -> bytes:
    """The BIP39 seed of these words (checksum checked): the root of the wallet's keys
    and of its ecash secrets (NUT-13)."""
    normalized = " ".join(words.lower().split())
    if not _BIP39.check(normalized):
        raise InvalidKey("these words are not a valid BIP39 mnemonic (checksum failed)")
    return bytes(Mnemonic.to_seed(normalized, passphrase))


def new_mnemonic(words: int = 12) -> str:
    """Fresh BIP39 words (12 or 24) from the operating system's randomness."""
    if words not in (12, 24):
        raise ValueError("a mnemonic has 12 or 24 words")
    return str(_BIP39.generate(strength=words * 32 // 3))


class Wallet:
    """Keys and addresses of one account, and payments signed with them."""

    def __init__(self, seed: bytes, network: Network = Network.MAIN, account: int = 0) -> None:
        self.network = network
        path = f"m/{PURPOSE}'/{_NETWORK_INDEX[network]}'/{account}'"
        root = ExtendedKey.from_seed(seed).derive(path)
        self._chains = (root.child(RECEIVE), root.child(CHANGE))
        self._next = [0, 0]
        self._keys: dict[bytes, SigningKey] = {}

    @classmethod
    def from_mnemonic(
        cls, words: str, passphrase: str = "", network: Network = Network.MAIN
    ) -> Wallet:
        """Restore a wallet from its BIP39 words (checksum checked)."""
        return cls(seed_of(words, passphrase), network)

    def key(self, chain: int, index: int) -> SigningKey:
        """The key at ``chain/index``, remembered so coins it owns can be spent."""
        key = self._chains[chain].child(index).signing_key()
        self._keys[key.pubkey] = key
        self._next[chain] = max(self._next[chain], index + 1)
        return key

    def fresh_key(self, chain: int = RECEIVE) -> SigningKey:
        return self.key(chain, self._next[chain])

    def fresh_address(self) -> str:
        return encode_address(self.fresh_key().pubkey, self.network)

    @property
    def owners(self) -> frozenset[bytes]:
        return frozenset(self._keys)

    def pay(
        self,
        coins: Mapping[bytes, Coin],
        to: str | XOnlyPubKey,
        amount_msat: int,
        fee_msat: int = 0,
        *,
        ledger: bytes | None = None,
        here: bytes | None = None,
    ) -> Transaction:
        """A signed payment of ``amount_msat`` to an address or key, change to a fresh key.

        Picks the largest coins first. ``coins`` are coins the caller believes unspent;
        those this wallet holds no key for are ignored. The payment goes to the ledger
        the address names (or ``ledger``, for a key), settled between the operators
        unless it is ``here``, the ledger of the coins; else it stays in that ledger.
        """
        if isinstance(to, str):
            owner, ledger = decode_destination(to, self.network)
        else:
            owner = to
        mine = sorted(
            ((cid, c) for cid, c in coins.items() if c.owner in self._keys),
            key=lambda item: item[1].value_msat,
            reverse=True,
        )
        need = amount_msat + fee_msat
        chosen: list[tuple[bytes, Coin]] = []
        total = 0
        for cid, coin in mine[:MAX_INPUTS]:
            if total >= need:
                break
            chosen.append((cid, coin))
            total += coin.value_msat
        if total < need:
            have = sum(c.value_msat for _, c in mine)
            raise InsufficientFunds(f"need {need} msat, wallet holds {have} msat")
        outputs = [TxOutput(amount_msat, owner)]
        if total > need:
            outputs.append(TxOutput(total - need, self.fresh_key(CHANGE).pubkey))
        dest = HERE if ledger is None or ledger == here else ledger
        tx = Transaction(
            [TxInput(cid, c.value_msat) for cid, c in chosen],
            outputs,
            fee_msat,
            ledgers=[dest, *[HERE] * (len(outputs) - 1)],
        )
        return sign_transaction(tx, [self._keys[c.owner] for _, c in chosen])


class GapScan:
    """Which of a sequence of keys (or NUT-13 counters) a wallet restored from its seed
    has used, found by asking: indexes are asked about in order, in batches of at most
    ``batch``, until ``gap`` in a row after the last one used were not (BIP 44's gap
    limit; NUT-13's empty restore batches). A use further than ``gap`` past the last one
    found is not found: the wallet never leaves such a gap (it hands keys out in order)."""

    def __init__(self, gap: int, batch: int) -> None:
        assert gap > 0 and batch > 0, "a scan that asks nothing"
        self.gap = gap
        self.batch = batch
        self.asked = 0  # indexes 0 .. asked - 1 were handed out to ask about
        self.end = 0  # one past the last index found used

    def next(self) -> range:
        """The indexes to ask about next (each batch's uses told first); empty once
        ``gap`` in a row after the last one used were not."""
        left = self.end + self.gap - self.asked
        batch = range(self.asked, self.asked + max(0, min(self.batch, left)))
        self.asked = batch.stop
        return batch

    def used(self, index: int) -> None:
        """Index ``index``, handed out to ask about, was used."""
        assert 0 <= index < self.asked, "a use told of an index not asked about"
        self.end = max(self.end, index + 1)
