"""The participant side: answer DKG and signing messages from any member's coordinator.

The core decides (``constellation.guild`` policy, ``crypto.roast.Signer``,
``crypto.dkg``); this module moves messages, keeps per-request state with a deadline,
and writes the audit entry before a partial signature leaves the process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass

from constellation.crypto import dkg, roast
from constellation.errors import ConstellationError, Overloaded, RequestRefused, SigningError
from constellation.guild import Checkpoint, Derived, SigningPolicy, SignTarget
from constellation.keys import schnorr_verify
from constellation.protocol import signer as proto
from constellation.protocol.envelope import Membership
from services.runtime import ConfigError, now_ms
from services.signer.metrics import SignerMetrics
from services.signer.store import AuditEntry, AuditLog, KeyStore, ShareRecord, target_of

log = logging.getLogger("signer")

Reply = Callable[[int, proto.Message], Awaitable[None]]  # (coordinator index, message)
Vouch = Callable[[Checkpoint, bytes], Awaitable[str]]  # (checkpoint, evidence) -> refusal
FINISHED_MEMORY = 10_000


@dataclass
class _Pending:
    coordinator: int
    target: SignTarget
    derived: Derived
    deadline_ms: int


@dataclass
class _DkgRun:
    dkg_id: bytes
    coordinator: int
    state1: dkg.ParticipantState1
    state2: dkg.ParticipantState2 | None = None


class Participant:
    def __init__(
        self,
        members: Membership,
        me: int,
        hostseckey: bytes,
        keystore: KeyStore,
        audit: AuditLog,
        policy: SigningPolicy,
        metrics: SignerMetrics,
        reply: Reply,
        max_requests: int,
        request_timeout_ms: int,
        vouch: Vouch | None = None,
    ) -> None:
        """``vouch``: asks this operator's ledger whether a checkpoint's entries are what
        it computed (a reason to refuse, or empty); None: the policy alone decides."""
        self.members = members
        self.vouch = vouch
        # Requests whose checkpoint the ledger is checking; set once it answered.
        self.vouching: dict[bytes, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.me = me
        self.hostseckey = hostseckey
        self.keystore = keystore
        self.audit = audit
        self.policy = policy
        self.metrics = metrics
        self.reply = reply
        self.max_requests = max_requests
        self.request_timeout_ms = request_timeout_ms
        self.share = keystore.load_share()
        self.group = self._group(self.share)
        self.pending: dict[bytes, _Pending] = {}
        self.nonces: dict[int, roast.Signer] = {}  # per coordinator: its pool of our nonces
        self.finished: OrderedDict[bytes, None] = OrderedDict()
        self.dkg: _DkgRun | None = None
        for entry in audit.take_loaded():
            policy.record(target_of(entry), bytes.fromhex(entry["msg"]))
            self._remember(bytes.fromhex(entry["request_id"]))

    def _group(self, share: ShareRecord | None) -> roast.Group | None:
        if share is None:
            return None
        if share.guild != self.members.guild or tuple(share.hostpubkeys) != (
            self.members.hostpubkeys
        ):
            raise ConfigError("the stored share belongs to another guild or membership")
        n = len(share.hostpubkeys)
        return roast.Group(n, share.t, share.threshold_pubkey, tuple(share.pubshares))

    def _remember(self, request_id: bytes) -> None:
        self.finished[request_id] = None
        while len(self.finished) > FINISHED_MEMORY:
            self.finished.popitem(last=False)

    async def handle(self, sender: int, msg: proto.Message) -> None:
        if isinstance(msg, proto.SignStart):
            await self._sign_start(sender, msg)
        elif isinstance(msg, proto.SignSession) and msg.request_id in self.vouching:
            self._spawn(self._after_vouch(sender, msg))
        elif isinstance(msg, proto.SignSession):
            await self._sign_session(sender, msg)
        elif isinstance(msg, proto.SignDone):
            self._sign_done(sender, msg)
        elif isinstance(msg, proto.DkgStart):
            await self._dkg_start(sender, msg)
        elif isinstance(msg, proto.DkgCoord1 | proto.DkgCoord2):
            await self._dkg_step(sender, msg)
        else:
            self.metrics.rejected_messages.labels("protocol.unexpected").inc()

    # -- signing ----------------------------------------------------------------------------

    async def _refuse(self, coordinator: int, request_id: bytes, exc: ConstellationError) -> None:
        self.metrics.refused.labels(exc.code).inc()
        log.info(
            "refused a signing request",
            extra={"request_id": request_id.hex(), "code": exc.code, "reason": str(exc)},
        )
        await self.reply(coordinator, proto.SignRefused(request_id, exc.code, str(exc)))

    def _expire(self) -> None:
        now = now_ms()
        for rid in [r for r, p in self.pending.items() if p.deadline_ms < now]:
            del self.pending[rid]
            self._remember(rid)
        self.metrics.pending_requests.set(len(self.pending))

    async def _sign_start(self, sender: int, msg: proto.SignStart) -> None:
        rid = msg.request_id
        self._expire()
        try:
            if len(rid) != 16:
                raise RequestRefused("request ids are 16 bytes")
            if rid in self.pending or rid in self.finished or rid in self.vouching:
                raise RequestRefused(f"request {rid.hex()} was started already")
            if self.group is None or self.share is None:
                raise RequestRefused("this signer holds no key share yet (run keygen)")
            if len(self.pending) + len(self.vouching) >= self.max_requests:
                raise Overloaded(f"{self.max_requests} signing requests are open already")
            derived = self.policy.check(msg.target, self.group.thresh_pk)
        except ConstellationError as exc:
            await self._refuse(sender, rid, exc)
            return
        if isinstance(msg.target, Checkpoint) and self.vouch is not None:
            # Asked in a task of its own: messages of other requests go on meanwhile.
            self.vouching[rid] = asyncio.Event()
            self._spawn(self._vouched(sender, msg, msg.target, derived))
            return
        await self._open(sender, msg, derived)

    def _spawn(self, work: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        """A vouching task ended: a failure is logged, never lost with the task."""
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a checkpoint's vouching failed", exc_info=task.exception())

    async def _after_vouch(self, sender: int, msg: proto.SignSession) -> None:
        """A session that came (with a nonce held from before) while the ledger checks
        its checkpoint: handled once it answered."""
        answered = self.vouching.get(msg.request_id)
        if answered is not None:
            await answered.wait()
        await self._sign_session(sender, msg)

    async def _vouched(
        self, sender: int, msg: proto.SignStart, target: Checkpoint, derived: Derived
    ) -> None:
        assert self.vouch is not None
        answered = self.vouching[msg.request_id]
        try:
            reason = await self.vouch(target, msg.evidence)
            if reason:
                refusal = RequestRefused(f"this operator's ledger does not vouch: {reason}")
                await self._refuse(sender, msg.request_id, refusal)
            else:
                await self._open(sender, msg, derived)
        finally:
            del self.vouching[msg.request_id]
            answered.set()

    async def _open(self, sender: int, msg: proto.SignStart, derived: Derived) -> None:
        """The request is open here: a nonce for the coordinator where it asked for one."""
        deadline = now_ms() + self.request_timeout_ms
        self.pending[msg.request_id] = _Pending(sender, msg.target, derived, deadline)
        self.metrics.pending_requests.set(len(self.pending))
        if msg.presign:
            await self.reply(sender, proto.Presign(msg.request_id, self._signer(sender).presign()))

    def _signer(self, coordinator: int) -> roast.Signer:
        signer = self.nonces.get(coordinator)
        if signer is None:
            assert self.group is not None and self.share is not None
            signer = roast.Signer(self.group, self.me, self.share.secshare, self.max_requests + 1)
            self.nonces[coordinator] = signer
        return signer

    async def _sign_session(self, sender: int, msg: proto.SignSession) -> None:
        rid = msg.request_id
        pending = self.pending.get(rid)
        if pending is None or pending.coordinator != sender:
            await self._refuse(sender, rid, RequestRefused("no such open request here"))
            return
        try:
            if len(msg.ids) != len(msg.pubnonces) or msg.session_id < 0:
                raise SigningError("ids and nonces do not pair up")
            request = roast.SignRequest(
                msg.session_id,
                tuple(msg.ids),
                tuple(msg.pubnonces),
                pending.derived.msg,
                pending.derived.tweaks,
                pending.derived.is_xonly,
            )
            # Checked again: another request may have signed a conflicting checkpoint.
            self.policy.check_history(pending.target, pending.derived.msg)
            psig, next_pubnonce = self._signer(sender).sign(request)
        except ConstellationError as exc:
            del self.pending[rid]
            self._remember(rid)
            await self._refuse(sender, rid, exc)
            return
        started = time.perf_counter()
        self.audit.append(
            AuditEntry(
                seq=self.audit.count,
                at_ms=now_ms(),
                request_id=rid.hex(),
                coordinator=sender,
                purpose=pending.derived.purpose.value,
                target=proto.encode_target(pending.target).hex(),
                msg=pending.derived.msg.hex(),
                session_id=msg.session_id,
                ids=list(msg.ids),
                psig=psig.hex(),
            )
        )
        self.metrics.audit_fsync.observe(time.perf_counter() - started)
        self.policy.record(pending.target, pending.derived.msg)
        self.metrics.partial_signatures.inc()
        await self.reply(sender, proto.Share(rid, msg.session_id, psig, next_pubnonce))

    def _sign_done(self, sender: int, msg: proto.SignDone) -> None:
        pending = self.pending.get(msg.request_id)
        if pending is None or pending.coordinator != sender:
            return
        del self.pending[msg.request_id]
        self._remember(msg.request_id)
        self.metrics.pending_requests.set(len(self.pending))
        derived = pending.derived
        if msg.signature and not schnorr_verify(derived.pubkey, derived.msg, msg.signature):
            log.warning(
                "coordinator reported an invalid signature",
                extra={"request_id": msg.request_id.hex(), "coordinator": sender},
            )
            return
        log.info(
            "request finished",
            extra={
                "request_id": msg.request_id.hex(),
                "purpose": pending.derived.purpose.value,
                "signed": bool(msg.signature),
            },
        )

    # -- key generation ---------------------------------------------------------------------

    async def _dkg_fail(self, coordinator: int, dkg_id: bytes, exc: ConstellationError) -> None:
        self.dkg = None
        blamed = getattr(exc, "participant", -1)
        log.warning(
            "key generation failed",
            extra={"dkg_id": dkg_id.hex(), "code": exc.code, "reason": str(exc), "blamed": blamed},
        )
        await self.reply(coordinator, proto.DkgFailed(dkg_id, exc.code, str(exc), blamed))

    async def _dkg_start(self, sender: int, msg: proto.DkgStart) -> None:
        try:
            if self.share is not None:
                raise RequestRefused("this signer holds a key share already; it never replaces one")
            if tuple(msg.hostpubkeys) != self.members.hostpubkeys:
                raise RequestRefused("the session's participants are not this guild's members")
            params = dkg.SessionParams(tuple(msg.hostpubkeys), msg.t)
            state1, pmsg1 = dkg.participant_step1(self.hostseckey, params, os.urandom(32))
        except ConstellationError as exc:
            await self._dkg_fail(sender, msg.dkg_id, exc)
            return
        self.dkg = _DkgRun(msg.dkg_id, sender, state1)
        await self.reply(sender, proto.DkgMsg1(msg.dkg_id, pmsg1))

    async def _dkg_step(self, sender: int, msg: proto.DkgCoord1 | proto.DkgCoord2) -> None:
        run = self.dkg
        if run is None or run.dkg_id != msg.dkg_id or run.coordinator != sender:
            self.metrics.rejected_messages.labels("dkg.unknown_session").inc()
            return
        try:
            if isinstance(msg, proto.DkgCoord1):
                run.state2, pmsg2 = dkg.participant_step2(
                    self.hostseckey, run.state1, msg.cmsg1, os.urandom(32)
                )
                await self.reply(sender, proto.DkgMsg2(msg.dkg_id, pmsg2))
                return
            if run.state2 is None:
                raise RequestRefused("certificate before the shares")
            output, recovery = dkg.participant_finalize(run.state2, msg.cmsg2)
        except ConstellationError as exc:
            await self._dkg_fail(sender, msg.dkg_id, exc)
            return
        assert output.secshare is not None
        record = ShareRecord(
            self.members.guild,
            run.state1.params.t,
            list(self.members.hostpubkeys),
            output.threshold_pubkey,
            list(output.pubshares),
            output.secshare,
            recovery,
        )
        self.keystore.save_share(record)
        self.share, self.group, self.dkg = record, self._group(record), None
        log.info(
            "key share stored",
            extra={"threshold_pubkey": output.threshold_pubkey.hex(), "t": record.t},
        )
        await self.reply(sender, proto.DkgDone(msg.dkg_id, output.threshold_pubkey))
