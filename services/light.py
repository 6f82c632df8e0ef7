"""The wallet as a light client: it pins the guild's descriptor, asks any of the guild's
gateways for checkpoints and proofs, checks every one against the pin
(``constellation.lightclient.proof``), and moves to the next gateway when one is down or
serves something that does not verify, saying which gateway failed which check.

It never goes back on what it has seen: a checkpoint below the highest it verified is
stale (a server withholding what happened since), and a coin proof must be as of a
checkpoint at least that high.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

import aiohttp

from constellation.errors import BadEntryPath, DecodeError, ProofRefused, WrongGuild
from constellation.ledger.pmap import PartitionMap
from constellation.lightclient import proof as pf
from constellation.lightclient.checkpointer import Announced
from constellation.tx import partition_of
from services.api_client import Gateway, GatewayError

T = TypeVar("T")
TIMEOUT = aiohttp.ClientTimeout(total=10)


class Failure(NamedTuple):
    """What one gateway did wrong: ``check`` is the failed check's code (``proof.…``) where
    it served something that does not verify, else why it could not be asked."""

    server: str
    check: str
    message: str

    def __str__(self) -> str:
        return f"{self.server}: [{self.check}] {self.message}"


class NoServer(RuntimeError):
    """No gateway of the guild served what was asked in a form that verifies."""

    def __init__(self, what: str, failures: list[Failure]) -> None:
        lines = "\n".join(f"  {f}" for f in failures)
        super().__init__(f"no gateway of the guild served {what} that verifies:\n{lines}")
        self.failures = failures


class LightClient:
    def __init__(
        self,
        descriptor: pf.Descriptor,
        servers: list[str],
        session: aiohttp.ClientSession,
        seen: int = 0,
        workers: int = 0,
    ) -> None:
        self.descriptor = descriptor
        self.servers = servers
        self.session = session
        self.seen = seen  # the highest checkpoint verified so far
        self.workers = workers  # shards per member (a coin's shard), once learnt
        self.failures: list[Failure] = []  # every failure met, in order

    @property
    def pin(self) -> pf.Pin:
        return self.descriptor.pin

    async def _each(self, what: str, ask: Callable[[Gateway], Awaitable[T]]) -> tuple[str, T]:
        """``ask`` of each gateway in turn until one answers with what verifies."""
        failed: list[Failure] = []
        for url in self.servers:
            try:
                return url, await ask(Gateway(url, self.session))
            except ProofRefused as exc:
                failure = Failure(url, exc.code, str(exc))
            except (DecodeError, ValueError, KeyError, TypeError) as exc:  # malformed answers
                failure = Failure(url, "malformed", f"{type(exc).__name__}: {exc}")
            except GatewayError as exc:
                failure = Failure(url, exc.code, str(exc))
            except (aiohttp.ClientError, TimeoutError) as exc:
                failure = Failure(url, "unreachable", repr(exc))
            failed.append(failure)
            self.failures.append(failure)
        raise NoServer(what, failed)

    def _checkpoint(self, doc: dict[str, Any]) -> Announced:
        announced = Announced.decode(bytes.fromhex(doc["encoded"]))
        c = pf.verify_checkpoint(self.pin, announced.signed, self.seen)
        if pf.shards_tree(announced.entries).root() != c.shards:
            raise BadEntryPath(f"checkpoint {c.height}'s entries do not make its root")
        if c.height == 0 and c.message() != self.descriptor.first:
            raise WrongGuild("checkpoint 0 is not the one the descriptor pins")
        return announced

    async def latest(self) -> tuple[str, Announced]:
        """The latest checkpoint, verified, and not older than any seen before."""

        async def ask(gw: Gateway) -> Announced:
            return self._checkpoint(await gw.get("/v1/lc/checkpoints/latest"))

        url, announced = await self._each("the latest checkpoint", ask)
        self.seen = max(self.seen, announced.signed.checkpoint.height)
        self.workers = self.workers or 1 + max(e.worker for e in announced.entries)
        return url, announced

    async def tx(self, txid: bytes) -> tuple[str, pf.TxProof, list[pf.Placed]]:
        """A transaction's proof and what it shows, verified."""

        async def ask(gw: Gateway) -> tuple[pf.TxProof, list[pf.Placed]]:
            doc = await gw.get(f"/v1/lc/tx/{txid.hex()}")
            proof = pf.decode_tx_proof(bytes.fromhex(doc["proof"]))
            placed = pf.verify_tx(self.pin, proof, txid)
            for c in proof.checkpoints:
                if c.checkpoint.height == 0 and c.checkpoint.message() != self.descriptor.first:
                    raise WrongGuild("checkpoint 0 is not the one the descriptor pins")
            return proof, placed

        url, (proof, placed) = await self._each(f"a proof of transaction {txid.hex()}", ask)
        return url, proof, placed

    async def coin(self, coin_id: bytes, ledger: str, owner: int) -> tuple[str, pf.CoinVerdict]:
        """A coin's state in member ``owner``'s ledger (named ``ledger``) as of a
        checkpoint at least as recent as the latest this client verified."""
        if not self.workers:
            await self.latest()

        async def ask(gw: Gateway) -> pf.CoinVerdict:
            doc = await gw.get(f"/v1/lc/coin/{coin_id.hex()}?ledger={ledger}")
            proof = pf.decode_coin_proof(bytes.fromhex(doc["proof"]))
            shard = (owner, shard_of(coin_id, self.workers))
            return pf.verify_coin(self.pin, proof, coin_id, shard, self.seen)

        url, verdict = await self._each(f"a proof of coin {coin_id.hex()}", ask)
        self.seen = max(self.seen, verdict.checkpoint)
        return url, verdict


def shard_of(coin_id: bytes, workers: int) -> int:
    """The worker of a member's ledger that holds a coin (the even partition map every
    member's ledger has: ``PartitionMap.even``)."""
    return PartitionMap.even(workers).owners()[partition_of(coin_id)]


def describe(placed: list[pf.Placed], members: list[str]) -> list[str]:
    """What a verified transaction proof shows, a line per record."""
    lines = []
    for p in placed:
        r = p.record
        who = members[p.owner] if p.owner < len(members) else f"member {p.owner}"
        head = f"  {who}'s shard {p.worker}, block {r.height}, under checkpoint {p.checkpoint}"
        if r.committed:
            head += f": committed here (fee {r.fee_msat} msat)"
        lines.append(head)
        for c in r.changes:
            lines.append(f"    {c.kind.name.lower():8} {c.coin_id.hex()} {c.value_msat} msat")
    return lines
