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
from constellation.guild import Checkpoint, Derived, Quorum, SigningPolicy, SignTarget, Standing
from constellation.keys import schnorr_verify
from constellation.lightclient.checkpointer import signed_below
from constellation.protocol import signer as proto
from constellation.protocol.envelope import Membership
from services.runtime import ConfigError, now_ms
from services.signer.metrics import SignerMetrics
from services.signer.store import (
    AuditEntry,
    AuditLog,
    KeyAgreement,
    KeyStore,
    ShareRecord,
    target_of,
)

log = logging.getLogger("signer")

Reply = Callable[[int, proto.Message], Awaitable[None]]  # (coordinator index, message)
Vouch = Callable[[Checkpoint, bytes], Awaitable[str]]  # (checkpoint, evidence) -> refusal
FINISHED_MEMORY = 10_000


@dataclass(frozen=True)
class Key:
    """A guild key this signer holds a share of: ROAST's group over the key's
    participants (positions 0..n-1), and the member each position is."""

    record: ShareRecord
    group: roast.Group
    members: tuple[int, ...]

    @property
    def pubkey(self) -> bytes:
        return self.group.thresh_pk

    def position(self, member: int) -> int | None:
        return self.members.index(member) if member in self.members else None

    @property
    def quorum(self) -> Quorum:
        return Quorum(self.members, self.group.t)


def key_of(members: Membership, record: ShareRecord) -> Key:
    """The key of a stored share: one of this guild's, among its members."""
    if record.guild != members.guild or not all(k in members.index for k in record.hostpubkeys):
        raise ConfigError("a stored share belongs to another guild or membership")
    n = len(record.hostpubkeys)
    group = roast.Group(n, record.t, record.threshold_pubkey, tuple(record.pubshares))
    return Key(record, group, tuple(members.index[k] for k in record.hostpubkeys))


@dataclass
class _Pending:
    coordinator: int
    target: SignTarget
    derived: Derived
    deadline_ms: int
    key: Key
    epoch: int
    cert: list[Standing]


@dataclass
class _DkgRun:
    dkg_id: bytes
    coordinator: int
    state1: dkg.ParticipantState1
    until_ms: int  # past it, another session may replace this one
    state2: dkg.ParticipantState2 | None = None


def _majority(t: int, n: int) -> None:
    """A key's threshold: a majority of its ``n`` members, at most all of them."""
    if not n // 2 < t <= n:
        raise RequestRefused(f"the threshold must be a majority of {n}, at most all")


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
        self.vouching: dict[bytes, tuple[int, asyncio.Event]] = {}  # by its coordinator
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
        self.keys = [key_of(members, r) for r in keystore.load_shares()]
        active = keystore.load_active()
        self.active = next((k for k in self.keys if k.pubkey == active), None)
        if active is not None and self.active is None:
            raise ConfigError("the active key is none of the keys this signer holds")
        self.active = self.active or (self.keys[0] if self.keys else None)
        self.agreement = keystore.load_agreement()
        self.pending: dict[bytes, _Pending] = {}
        # per (coordinator, key): the pool of our nonces it may hold
        self.nonces: dict[tuple[int, bytes], roast.Signer] = {}
        self.finished: OrderedDict[bytes, None] = OrderedDict()
        self.dkg: _DkgRun | None = None
        for entry in audit.take_loaded():
            cert = proto.decode_cert(bytes.fromhex(entry["cert"])) if entry.get("cert") else []
            policy.record(
                target_of(entry), bytes.fromhex(entry["msg"]), entry.get("epoch", 0), cert
            )
            self._remember(bytes.fromhex(entry["request_id"]))

    def usable(self) -> list[Key]:
        """The keys this signer signs with: the active one and any made after it (a key
        made before the active one signs nothing more)."""
        if self.active is None:
            return []
        return self.keys[self.keys.index(self.active) :]

    def key(self, pubkey: bytes = b"") -> Key | None:
        """The usable key ``pubkey`` (the active one where empty), if this signer holds it."""
        if not pubkey:
            return self.active
        return next((k for k in self.usable() if k.pubkey == pubkey), None)

    def agree(self, members: list[int], t: int) -> None:
        """Take part in a DKG among ``members`` with threshold ``t`` (this operator's
        consent; kept until that key is made)."""
        n = len(self.members.hostpubkeys)
        if not members or sorted(set(members)) != members or not 0 <= members[0] <= members[-1] < n:
            raise RequestRefused(f"members must be distinct member indices below {n}, in order")
        if self.me not in members:
            raise RequestRefused("this signer is not among the new key's members")
        _majority(t, len(members))
        self.agreement = KeyAgreement([self.members.hostpubkeys[i] for i in members], t)
        self.keystore.save_agreement(self.agreement)
        log.info("agreed to a new key", extra={"members": members, "t": t})

    def activate(self, pubkey: bytes) -> None:
        """Sign with ``pubkey`` from now on, and never with a key made before it."""
        key = self.key(pubkey) if pubkey else None
        if key is None:
            raise RequestRefused("this signer holds no usable share of that key")
        self.keystore.save_active(key.pubkey)
        retired = [k.pubkey.hex() for k in self.keys[: self.keys.index(key)]]
        self.active = key
        log.info("key activated", extra={"key": key.pubkey.hex(), "retired": retired})

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
        elif isinstance(msg, proto.StandingAsk) and 0 <= msg.height < 2**64:
            stand = self.policy.stand(msg.height, self.me, self.hostseckey)
            await self.reply(sender, proto.StandingSaid(msg.request_id, *stand))
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
            if self.active is None:
                raise RequestRefused("this signer holds no key share yet (run keygen)")
            key = self.key(msg.key)
            if key is None:
                raise RequestRefused(f"this signer signs with no key {msg.key.hex()}")
            if len(self.pending) + len(self.vouching) >= self.max_requests:
                raise Overloaded(f"{self.max_requests} signing requests are open already")
            # each member's coordinator its share of them: one that opens requests and
            # never finishes them holds up no other's
            share = max(1, self.max_requests // len(self.members.hostpubkeys))
            if self._open_by(sender) >= share:
                raise Overloaded(f"{share} signing requests of member {sender} are open already")
            if isinstance(msg.target, Checkpoint):  # a share released below may have lost
                keys = [k.pubkey[1:] for k in self.keys]
                below = signed_below(msg.target, msg.evidence, keys)
                if below is not None:
                    self.policy.learn(*below)
            quorums = [k.quorum for k in self.usable()]
            requester = self.members.identities[sender]  # a spend: of its own coins only
            derived = self.policy.check(
                msg.target, key.pubkey, msg.epoch, msg.cert, quorums, requester
            )
        except ConstellationError as exc:
            await self._refuse(sender, rid, exc)
            return
        if isinstance(msg.target, Checkpoint) and self.vouch is not None:
            # Asked in a task of its own: messages of other requests go on meanwhile.
            self.vouching[rid] = (sender, asyncio.Event())
            self._spawn(self._vouched(sender, msg, msg.target, derived, key))
            return
        await self._open(sender, msg, derived, key)

    def _open_by(self, coordinator: int) -> int:
        """The requests of ``coordinator`` open here (being vouched for, or pending)."""
        vouching = sum(c == coordinator for c, _ in self.vouching.values())
        return vouching + sum(p.coordinator == coordinator for p in self.pending.values())

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
        vouching = self.vouching.get(msg.request_id)
        if vouching is not None:
            await vouching[1].wait()
        await self._sign_session(sender, msg)

    async def _vouched(
        self, sender: int, msg: proto.SignStart, target: Checkpoint, derived: Derived, key: Key
    ) -> None:
        assert self.vouch is not None
        answered = self.vouching[msg.request_id][1]
        try:
            reason = await self.vouch(target, msg.evidence)
            if reason:
                refusal = RequestRefused(f"this operator's ledger does not vouch: {reason}")
                await self._refuse(sender, msg.request_id, refusal)
            else:
                await self._open(sender, msg, derived, key)
        finally:
            del self.vouching[msg.request_id]
            answered.set()

    async def _open(self, sender: int, msg: proto.SignStart, derived: Derived, key: Key) -> None:
        """The request is open here: a nonce for the coordinator where it asked for one."""
        deadline = now_ms() + self.request_timeout_ms
        self.pending[msg.request_id] = _Pending(
            sender, msg.target, derived, deadline, key, msg.epoch, msg.cert
        )
        self.metrics.pending_requests.set(len(self.pending))
        if msg.presign:
            nonce = self._signer(sender, key).presign()
            await self.reply(sender, proto.Presign(msg.request_id, nonce))

    def _signer(self, coordinator: int, key: Key) -> roast.Signer:
        signer = self.nonces.get((coordinator, key.pubkey))
        if signer is None:
            me = key.position(self.me)
            assert me is not None  # a share of the key is held here
            signer = roast.Signer(key.group, me, key.record.secshare, self.max_requests + 1)
            self.nonces[(coordinator, key.pubkey)] = signer
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
            # Checked again: another request may have signed a conflicting checkpoint or
            # a handover below it, or the key may have been retired since it opened.
            if pending.key not in self.usable():
                raise RequestRefused("the request's key was retired: it signs nothing more")
            self.policy.check_history(
                pending.target, pending.derived.msg, pending.key.pubkey, pending.epoch
            )
            psig, next_pubnonce = self._signer(sender, pending.key).sign(request)
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
                epoch=pending.epoch,
                cert=proto.encode_cert(pending.cert).hex() if pending.cert else "",
            )
        )
        self.metrics.audit_fsync.observe(time.perf_counter() - started)
        self.policy.record(pending.target, pending.derived.msg, pending.epoch, pending.cert)
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

    def _takes_part(self, msg: proto.DkgStart) -> None:
        """Refuses a DKG this signer's operator did not ask for: the guild's first key
        is made by all its members; a later one only among the members and with the
        threshold its operator agreed to (``agree``)."""
        if not self.keys:
            if tuple(msg.hostpubkeys) != self.members.hostpubkeys:
                raise RequestRefused("the session's participants are not this guild's members")
            _majority(msg.t, len(msg.hostpubkeys))  # no member makes it a key it holds alone
            return
        agreed = self.agreement
        if agreed is None:
            raise RequestRefused(
                "this signer holds a key share already, and its operator agreed to no new key"
            )
        if (msg.hostpubkeys, msg.t) != (agreed.hostpubkeys, agreed.t):
            raise RequestRefused("the session's members or threshold are not the agreed ones")

    async def _dkg_start(self, sender: int, msg: proto.DkgStart) -> None:
        run = self.dkg
        if run is not None and run.dkg_id == msg.dkg_id:  # started once: a repeat is dropped
            self.metrics.rejected_messages.labels("dkg.repeated").inc()
            return
        if (
            run is not None
            and now_ms() < run.until_ms
            and (sender != run.coordinator or run.state2 is not None)
        ):
            # one session at a time: no member pre-empts a session running (given three
            # of the coordinator's steps to end), and a coordinator starts another only
            # before this signer certified a transcript of its own
            self.metrics.rejected_messages.labels("dkg.running").inc()
            why = "a key generation is running here already"
            await self.reply(sender, proto.DkgFailed(msg.dkg_id, RequestRefused.code, why, -1))
            return
        try:
            self._takes_part(msg)
            params = dkg.SessionParams(tuple(msg.hostpubkeys), msg.t)
            state1, pmsg1 = dkg.participant_step1(self.hostseckey, params, os.urandom(32))
        except ConstellationError as exc:
            await self._dkg_fail(sender, msg.dkg_id, exc)
            return
        self.dkg = _DkgRun(msg.dkg_id, sender, state1, now_ms() + 3 * self.request_timeout_ms)
        await self.reply(sender, proto.DkgMsg1(msg.dkg_id, pmsg1))

    async def _dkg_step(self, sender: int, msg: proto.DkgCoord1 | proto.DkgCoord2) -> None:
        run = self.dkg
        if run is None or run.dkg_id != msg.dkg_id or run.coordinator != sender:
            self.metrics.rejected_messages.labels("dkg.unknown_session").inc()
            return
        try:
            if isinstance(msg, proto.DkgCoord1):
                if run.state2 is not None:  # one transcript a session: certified once
                    raise RequestRefused("the session's shares were dealt already")
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
            list(run.state1.params.hostpubkeys),
            output.threshold_pubkey,
            list(output.pubshares),
            output.secshare,
            recovery,
        )
        self.keystore.save_share(record)
        key = key_of(self.members, record)
        self.keys.append(key)
        self.active = self.active or key
        if self.agreement is not None:  # the agreed key is made: agreed to no more
            self.agreement = None
            self.keystore.save_agreement(None)
        self.dkg = None
        log.info(
            "key share stored",
            extra={"threshold_pubkey": output.threshold_pubkey.hex(), "t": record.t},
        )
        await self.reply(sender, proto.DkgDone(msg.dkg_id, output.threshold_pubkey))
