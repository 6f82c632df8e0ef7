"""An operator's guild key through a change of members (the indexer's part: it holds the
operator's NATS, database and signer access). It follows the key plan its operator
agreed to (``constellation.membership.KeyPlan``, in the operator's NATS KV, where the
Kubernetes operator and ``constellation devnet leave`` put it), takes the step
``constellation.membership.key_step`` names with the operator's signer and mint, and
reports what it sees (``KeysSeen``) beside the plan:

* the signer is told its operator agrees to the plan's key (``op.agree_key``);
* the plan's first member's signer coordinates the DKG once every member agreed (the
  others refuse until then: it tries again each round);
* with ``move``, once the key is made, the mint is asked to move every coin it holds
  under another key to it (``services.ecash.onchain.ask_move``): its resolver builds,
  signs (the old key's ROAST) and sends the move, and asks again while confirmed coins
  are left under another key (a move takes as many as one transaction takes, and coins
  under the old key may confirm later);
* once every coin is under the key, the checkpoints are handed over to it (this
  operator's checkpointing proposes and vouches for the handover: ``Checkpoints
  .hand_over``), and then the signer retires the keys before it (``op.activate_key``).
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from nats.aio.client import Client
from nats.errors import Error as NatsError

from constellation.errors import MessageError
from constellation.membership import KeyPlan, KeysSeen, KeyStep, key_step, planned
from constellation.protocol.signer import ActivateKey, AgreeKey, KeygenRequest, KeyRequest
from services.bus import load_key_plan, report_keys
from services.ecash.onchain import Moved, ask_move, moved
from services.indexer.checkpoints import Checkpoints
from services.signer.client import SignerClient
from services.signer.config import SignerAccess

log = logging.getLogger("indexer.keys")

POLL_S = 1.0
ASK_S = 10.0
KEYGEN_S = 60.0


class KeyFollower:
    def __init__(
        self,
        nc: Client,
        operator: str,
        me: int,
        signer: SignerAccess,
        database_url: str,
        checkpoints: Checkpoints,
    ) -> None:
        self.nc, self.operator, self.me = nc, operator, me
        self.checkpoints = checkpoints
        self.signer = signer
        self.database_url = database_url
        self._db: asyncpg.Connection | None = None  # opened once a plan moves coins
        self._reported: KeysSeen | None = None  # written to the KV only when it changes

    async def run(self) -> None:
        """Until cancelled (a task of the indexer)."""
        async with SignerClient(self.signer) as signer:
            try:
                await self._follow(signer)
            finally:
                await self._close()

    async def _follow(self, signer: SignerClient) -> None:
        while True:
            try:
                await self.once(signer)
            except (NatsError, TimeoutError, OSError, MessageError) as exc:
                log.warning("the key plan not followed", extra={"error": repr(exc)})
            except asyncpg.PostgresError as exc:
                log.warning("the mint's moves not read", extra={"error": repr(exc)})
                await self._close()
            await asyncio.sleep(POLL_S)

    async def once(self, signer: SignerClient) -> None:
        """One round: the plan, what the signer and mint hold, one step, the report."""
        plan = await load_key_plan(self.nc, self.operator)
        if plan is None:
            return
        why = plan.malformed(len(self.signer.members.hostpubkeys))
        if why:
            await self._report(plan, b"", None, False, f"the key plan is malformed: {why}")
            return
        self.checkpoints.stay(plan.members)
        reply = await signer.request(KeyRequest(), ASK_S)
        held = reply.keys if reply.ok else []
        made = planned(plan, held)
        moves = await self._moves(made.key) if made is not None and plan.move else None
        to_move = moves is not None and moves.confirmed_elsewhere > 0 and not moves.open
        all_moved = moves is not None and moves.done
        handed = made is not None and self.checkpoints.handed(made.key)
        step, waiting = key_step(plan, self.me, held, reply.agreed, to_move, all_moved, handed)
        if step is KeyStep.AGREE:
            agreed = await signer.request(AgreeKey(plan.members, plan.t), ASK_S)
            waiting = "" if agreed.ok else f"the signer refused the plan: {agreed.error}"
            if agreed.ok:
                log.info("agreed to the planned key", extra={"members": plan.members})
        elif step is KeyStep.KEYGEN:
            done = await signer.request(KeygenRequest(plan.t, plan.members), KEYGEN_S)
            waiting = "" if done.ok else f"the key's generation: [{done.code}] {done.error}"
            if done.ok:
                log.info("the planned key made", extra={"key": done.threshold_pubkey.hex()})
        elif step is KeyStep.MOVE:
            assert made is not None
            await ask_move(await self._conn(), made.key)
            log.info("asked the mint to move the coins", extra={"key": made.key.hex()})
        elif step is KeyStep.HAND_OVER:
            assert made is not None
            self.checkpoints.hand_over(made.key, plan.members, plan.t)
        elif step is KeyStep.RETIRE:
            assert made is not None
            retired = await signer.request(ActivateKey(made.key), ASK_S)
            waiting = "" if retired.ok else f"the signer kept the old key: {retired.error}"
            held = retired.keys if retired.ok else held
            if retired.ok:
                log.info("the keys before the planned key retired", extra={"key": made.key.hex()})
        if not waiting and moves is not None and not moves.done:
            waiting = (
                f"the moves to the new key: {moves.open} under way, {moves.unconfirmed} "
                f"in no block yet, {moves.confirmed_elsewhere + moves.pending_elsewhere} "
                f"coins under another key, {moves.deposits_elsewhere} deposits still to come"
                f" under another key, {moves.signing} withdrawals signing"
            )
        alone = handed and made is not None and held[0].key == made.key
        await self._report(plan, made.key if made else b"", moves, alone, waiting)

    async def _moves(self, key: bytes) -> Moved:
        """Where the mint's moves to ``key`` are (nothing to move where this operator's
        mint keeps no coins on chain)."""
        try:
            return await moved(await self._conn(), key)
        except asyncpg.UndefinedTableError:
            return Moved([], 0, 0, 0, 0, 0)

    async def _conn(self) -> asyncpg.Connection:
        if self._db is None or self._db.is_closed():
            self._db = await asyncpg.connect(self.database_url)
        return self._db

    async def _close(self) -> None:
        if self._db is not None:  # a broken connection: dropped, another opened next round
            self._db.terminate()
            self._db = None

    async def _report(
        self, plan: KeyPlan, key: bytes, moves: Moved | None, handed: bool, waiting: str
    ) -> None:
        txids = moves.txids if moves is not None else []
        done = moves is not None and moves.done
        seen = KeysSeen(plan.members, plan.t, key, txids, done, handed, waiting)
        if seen != self._reported:
            await report_keys(self.nc, self.operator, seen)
            self._reported = seen
