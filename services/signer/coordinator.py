"""The coordinator side: run ChillDKG and ROAST for this operator's requests.

Any member can coordinate. ROAST needs no timeout to decide who is faulty; the request
deadline only bounds how long an operator waits when fewer than t signers answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from constellation.crypto import dkg, roast
from constellation.errors import (
    CheckpointBound,
    ConstellationError,
    DKGError,
    RequestRefused,
    UnknownNonce,
)
from constellation.guild import (
    Checkpoint,
    Derived,
    SignTarget,
    Stand,
    Standing,
    derive,
    next_epoch,
)
from constellation.protocol import signer as proto
from constellation.protocol.envelope import Membership
from services.signer.handlers import FINISHED_MEMORY, Key
from services.signer.metrics import SignerMetrics

log = logging.getLogger("signer.coordinator")

Send = Callable[[int, proto.Message], Awaitable[None]]  # (signer index, message)
EPOCH_STEPS = 3  # epochs a checkpoint's request moves through, at most
STANDING_WAIT_S = 2.0  # how long the signers' standings are gathered, at most


@dataclass
class _Signing:
    """One ROAST run. ROAST counts the key's participants by position; messages go to
    and come from members (``key.members``): ``refused`` and ``presigned`` are members."""

    request_id: bytes
    derived: Derived
    key: Key
    roast: roast.Coordinator
    done: asyncio.Future[proto.OpReply]
    refused: dict[int, str] = field(default_factory=dict)
    stale_nonce: bool = False  # a signer no longer held a nonce we had cached for it
    bound: bool = False  # a signer released shares for another checkpoint at this height
    presigned: set[int] = field(default_factory=set)

    def members(self, positions: Iterable[int]) -> list[int]:
        return sorted(self.key.members[p] for p in positions)


@dataclass
class _Standings:
    """The standings gathered for one refused checkpoint, by member."""

    members: tuple[int, ...]
    said: dict[int, Stand] = field(default_factory=dict)
    complete: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Keygen:
    dkg_id: bytes
    members: list[int]  # who takes part, in member order
    expect: type[proto.DkgMsg1 | proto.DkgMsg2 | proto.DkgDone]
    got: dict[int, bytes] = field(default_factory=dict)
    failed: proto.DkgFailed | None = None
    failed_by: int = -1  # the member that gave up
    complete: asyncio.Event = field(default_factory=asyncio.Event)


class _Accused(DKGError):
    """A participant gave up naming another: one of the two is faulty (or this, the
    coordinator, which relayed): blamed both, as neither is proved to be."""

    def __init__(self, members: list[int], reason: str) -> None:
        super().__init__(reason)
        self.members = members


def _error(exc: ConstellationError, blamed: list[int] | None = None) -> proto.OpReply:
    return proto.OpReply(False, code=exc.code, error=str(exc), blamed=blamed or [])


class Coordinator:
    def __init__(
        self,
        members: Membership,
        me: int,
        metrics: SignerMetrics,
        send: Send,
        keys: Callable[[bytes], Key | None],
        max_requests: int,
        request_timeout_ms: int,
    ) -> None:
        """``keys``: the usable key of a public key (the active one for b''), if the
        operator's own signer holds it."""
        self.members = members
        self.me = me
        self.n = len(members.hostpubkeys)
        self.metrics = metrics
        self.send = send
        self.keys = keys
        self.max_requests = max_requests
        self.timeout_s = request_timeout_ms / 1000
        self.signing: dict[bytes, _Signing] = {}
        self.standings: dict[bytes, _Standings] = {}
        self._dkg: _Keygen | None = None
        self._announcing: set[asyncio.Task[None]] = set()
        # (key, member) -> a fresh nonce its signer sent us for that key, unused
        self.cached: dict[tuple[bytes, int], bytes] = {}
        # requests finished lately -> their key (a late answer's nonce is for it)
        self.finished: OrderedDict[bytes, bytes] = OrderedDict()

    async def handle(self, sender: int, msg: proto.Message) -> None:
        if isinstance(msg, proto.Presign | proto.Share | proto.SignRefused):
            await self._on_signer(sender, msg)
        elif isinstance(msg, proto.StandingSaid):
            self._on_standing(sender, msg)
        elif isinstance(msg, proto.DkgMsg1 | proto.DkgMsg2 | proto.DkgDone | proto.DkgFailed):
            self._on_dkg(sender, msg)
        else:
            self.metrics.rejected_messages.labels("protocol.unexpected").inc()

    # -- signing ----------------------------------------------------------------------------

    async def sign(
        self, target: SignTarget, evidence: bytes = b"", pubkey: bytes = b""
    ) -> proto.OpReply:
        """ROAST-sign ``target`` with the key ``pubkey`` (the active one where empty).
        Signers' nonces left over from earlier requests start the first session at once;
        a signer that restarted has forgotten its nonce and says so, and if that leaves
        too few signers the request is run once more with fresh nonces from everyone.
        A checkpoint refused by a signer bound to another at its height is asked again
        in the epoch the signers' standings allow (``constellation.guild.next_epoch``):
        at most ``EPOCH_STEPS`` times."""
        key = self.keys(pubkey)
        try:
            if key is None:
                raise RequestRefused(
                    f"no usable guild key {pubkey.hex()}"
                    if pubkey
                    else "no guild key yet: run keygen first"
                )
            # the share of each signer's room that a member's requests may take there
            share = max(1, self.max_requests // self.n)
            if len(self.signing) >= share:
                raise RequestRefused(f"{share} signing requests are running")
            derived = derive(target, key.pubkey, self.members.identities[self.me])
        except ConstellationError as exc:
            return _error(exc)
        self.metrics.requests_started.inc()
        started = time.perf_counter()
        reply, run = await self._run(key, target, evidence, derived, use_cached=True)
        if not reply.ok and run.stale_nonce:
            reply, run = await self._run(key, target, evidence, derived, use_cached=False)
        epoch = 0
        for _ in range(EPOCH_STEPS):
            if reply.ok or not run.bound or not isinstance(target, Checkpoint):
                break
            found = await self._next_epoch(key, target.height, epoch)
            if found is None:
                break
            epoch, cert = found
            log.info(
                "a checkpoint asked again in a later epoch",
                extra={"height": target.height, "epoch": epoch},
            )
            self.metrics.epochs_moved.inc()
            reply, run = await self._run(
                key, target, evidence, derived, use_cached=False, epoch=epoch, cert=cert
            )
        outcome = "signed" if reply.ok else reply.code
        self.metrics.requests_finished.labels(outcome).inc()
        if reply.ok:
            self.metrics.sign_latency.observe(time.perf_counter() - started)
        return reply

    async def _run(
        self,
        key: Key,
        target: SignTarget,
        evidence: bytes,
        derived: Derived,
        use_cached: bool,
        epoch: int = 0,
        cert: list[Standing] | None = None,
    ) -> tuple[proto.OpReply, _Signing]:
        """One ROAST run, and what it saw (a signer refused a nonce we held for it, or
        a checkpoint as bound to another)."""
        group = key.group
        coordinator = roast.Coordinator(group, derived.msg, derived.tweaks, derived.is_xonly)
        rid = os.urandom(16)
        loop = asyncio.get_running_loop()
        run = _Signing(rid, derived, key, coordinator, loop.create_future())
        self.signing[rid] = run
        preloaded = []
        for i in key.members:
            nonce = self.cached.pop((key.pubkey, i), None) if use_cached else None
            start = proto.SignStart(
                rid, target, nonce is None, evidence, key.pubkey, epoch, cert or []
            )
            await self.send(i, start)
            if nonce is not None:
                preloaded.append((i, nonce))
        for i, nonce in preloaded:
            run.presigned.add(i)
            await self._dispatch(run, coordinator.receive(key.members.index(i), None, nonce))
        try:
            reply = await asyncio.wait_for(asyncio.shield(run.done), self.timeout_s)
        except TimeoutError:
            silent = sorted(set(key.members) - run.presigned - set(run.refused))
            stalled = run.members(coordinator.session_of)
            for i in silent:
                self.metrics.signer_failures.labels(str(i), "unresponsive").inc()
            for i in stalled:
                self.metrics.signer_failures.labels(str(i), "stalled").inc()
            reply = proto.OpReply(
                False,
                code="signing.timeout",
                error=f"fewer than {group.t} signers answered: silent {silent}, "
                f"stalled in a session {stalled}, refused {sorted(run.refused)}",
                sessions=len(coordinator.sessions),
                blamed=run.members(coordinator.malicious),
            )
            self._finish(run, reply)
        announce = asyncio.create_task(self._announce(key, rid, reply.signature))
        self._announcing.add(announce)
        announce.add_done_callback(self._announcing.discard)
        return reply, run

    async def _next_epoch(
        self, key: Key, height: int, epoch: int
    ) -> tuple[int, list[Standing]] | None:
        """Gather the standings of ``key``'s signers at ``height`` (every one, or what
        came within ``STANDING_WAIT_S``) and where they let a checkpoint go next."""
        rid = os.urandom(16)
        gathering = self.standings[rid] = _Standings(key.members)
        try:
            for i in key.members:
                await self.send(i, proto.StandingAsk(rid, height))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gathering.complete.wait(), STANDING_WAIT_S)
        finally:
            del self.standings[rid]
        said = list(gathering.said.values())
        m = self.members
        return next_epoch(m.guild, height, epoch, said, key.quorum, m.identities)

    def _on_standing(self, sender: int, msg: proto.StandingSaid) -> None:
        gathering = self.standings.get(msg.request_id)
        if gathering is None or sender not in gathering.members or msg.standing.member != sender:
            self.metrics.rejected_messages.labels("protocol.unexpected").inc()
            return
        gathering.said[sender] = Stand(msg.standing, msg.cert)
        if len(gathering.said) == len(gathering.members):
            gathering.complete.set()

    async def _dispatch(self, run: _Signing, requests: list[roast.SignRequest]) -> None:
        for request in requests:
            self.metrics.sessions_started.inc()
            session = proto.SignSession(
                run.request_id, request.session_id, list(request.ids), list(request.pubnonces)
            )
            for p in request.ids:
                await self.send(run.key.members[p], session)

    async def _on_signer(
        self, sender: int, msg: proto.Presign | proto.Share | proto.SignRefused
    ) -> None:
        run = self.signing.get(msg.request_id)
        if run is None:
            # A late answer to a finished request: its fresh nonce starts a later one.
            key = self.finished.get(msg.request_id)
            if not isinstance(msg, proto.SignRefused) and key is not None:
                self.cached[(key, sender)] = msg.pubnonce
            return
        coordinator = run.roast
        position = run.key.position(sender)
        if position is None:  # not one of this key's participants
            self.metrics.rejected_messages.labels("protocol.unexpected").inc()
            return
        if isinstance(msg, proto.SignRefused):
            run.refused[sender] = f"[{msg.code}] {msg.reason}"
            run.stale_nonce |= msg.code == UnknownNonce.code
            run.bound |= msg.code == CheckpointBound.code
            self.metrics.signer_failures.labels(str(sender), "refused").inc()
            group = coordinator.group
            refusing = {run.key.members.index(i) for i in run.refused}
            if len(refusing | coordinator.malicious) > group.n - group.t:
                self._finish(
                    run,
                    proto.OpReply(
                        False,
                        code="signing.refused",
                        error="signers refused: "
                        + "; ".join(f"{i}: {why}" for i, why in sorted(run.refused.items())),
                        sessions=len(coordinator.sessions),
                        blamed=run.members(coordinator.malicious),
                    ),
                )
            return
        was_malicious = position in coordinator.malicious
        if isinstance(msg, proto.Presign):
            run.presigned.add(sender)
            requests = coordinator.receive(position, None, msg.pubnonce)
        else:
            requests = coordinator.receive(position, msg.psig, msg.pubnonce)
        if position in coordinator.malicious and not was_malicious:
            self.metrics.signer_failures.labels(str(sender), "invalid_share").inc()
            log.warning(
                "signer misbehaved", extra={"request_id": run.request_id.hex(), "signer": sender}
            )
        if coordinator.signature is None:
            await self._dispatch(run, requests)
            return
        self.metrics.sessions_finished.inc()
        pk = run.key.pubkey
        for p in coordinator.ready:  # nonces they sent that no session used
            self.cached[(pk, run.key.members[p])] = coordinator.pubnonce[p]
        self.cached[(pk, sender)] = msg.pubnonce  # the share that completed it carries one
        self._finish(
            run,
            proto.OpReply(
                True,
                threshold_pubkey=run.derived.pubkey,
                signature=coordinator.signature,
                message=run.derived.msg,
                sessions=len(coordinator.sessions),
                blamed=run.members(coordinator.malicious),
            ),
        )

    def _finish(self, run: _Signing, reply: proto.OpReply) -> None:
        if self.signing.pop(run.request_id, None) is not None:
            self.finished[run.request_id] = run.key.pubkey
            while len(self.finished) > FINISHED_MEMORY:
                self.finished.popitem(last=False)
            run.done.set_result(reply)

    async def _announce(self, key: Key, request_id: bytes, signature: bytes) -> None:
        """Tell the key's signers the request is over (after the operator has its answer)."""
        for i in key.members:
            await self.send(i, proto.SignDone(request_id, signature))

    # -- key generation ---------------------------------------------------------------------

    async def keygen(self, t: int, members: list[int] | None = None) -> proto.OpReply:
        """ChillDKG among ``members`` (member indices; all of them where None), ``t`` of
        them to sign with the key it makes."""
        if self._dkg is not None:
            return _error(RequestRefused("a key generation is running already"))
        taking = sorted(set(members)) if members else list(range(self.n))
        if members and (taking != members or not 0 <= taking[0] <= taking[-1] < self.n):
            return _error(RequestRefused(f"members are distinct indices below {self.n}, in order"))
        params = dkg.SessionParams(tuple(self.members.hostpubkeys[i] for i in taking), t)
        dkg_id = os.urandom(16)
        started = time.perf_counter()
        try:
            dkg.params_validate(params)
            start = proto.DkgStart(dkg_id, list(params.hostpubkeys), t)
            pmsgs1 = await self._gather(dkg_id, taking, proto.DkgMsg1, start)
            state, cmsg1 = dkg.coordinator_step1(pmsgs1, params)
            coord1 = proto.DkgCoord1(dkg_id, cmsg1)
            pmsgs2 = await self._gather(dkg_id, taking, proto.DkgMsg2, coord1)
            cmsg2, output, _ = dkg.coordinator_finalize(state, pmsgs2)
            coord2 = proto.DkgCoord2(dkg_id, cmsg2)
            keys = await self._gather(dkg_id, taking, proto.DkgDone, coord2)
        except ConstellationError as exc:
            self.metrics.dkg_runs.labels(exc.code).inc()
            at = getattr(exc, "participant", None)  # a position in the session
            blamed = [taking[at]] if isinstance(at, int) and 0 <= at < len(taking) else []
            return _error(exc, blamed=exc.members if isinstance(exc, _Accused) else blamed)
        finally:
            self._dkg = None
        if any(k != output.threshold_pubkey for k in keys):
            self.metrics.dkg_runs.labels("dkg.disagreement").inc()
            return _error(DKGError("participants stored different keys"))
        self.metrics.dkg_runs.labels("ok").inc()
        self.metrics.dkg_seconds.observe(time.perf_counter() - started)
        log.info(
            "key generation finished",
            extra={"threshold_pubkey": keys[0].hex(), "t": t, "members": taking},
        )
        return proto.OpReply(True, threshold_pubkey=output.threshold_pubkey, threshold=t)

    async def _gather(
        self,
        dkg_id: bytes,
        members: list[int],
        expect: type[proto.DkgMsg1 | proto.DkgMsg2 | proto.DkgDone],
        out: proto.Message,
    ) -> list[bytes]:
        """Send ``out`` to the session's members and wait for one ``expect`` from each."""
        run = self._dkg = _Keygen(dkg_id, members, expect)
        for i in members:
            await self.send(i, out)
        try:
            await asyncio.wait_for(run.complete.wait(), self.timeout_s)
        except TimeoutError:
            missing = sorted(set(members) - run.got.keys())
            raise DKGError(f"participants {missing} did not answer in time") from None
        if run.failed is not None:
            failed, by = run.failed, run.failed_by
            reason = f"member {by} gave up: [{failed.code}] {failed.reason}"
            if 0 <= failed.blamed < len(members) and members[failed.blamed] != by:
                accused = members[failed.blamed]
                raise _Accused([by, accused], f"{reason} (it names member {accused})")
            raise DKGError(reason)
        return [run.got[i] for i in members]

    def _on_dkg(
        self, sender: int, msg: proto.DkgMsg1 | proto.DkgMsg2 | proto.DkgDone | proto.DkgFailed
    ) -> None:
        run = self._dkg
        if run is None or msg.dkg_id != run.dkg_id:
            return
        if isinstance(msg, proto.DkgFailed):
            if sender not in run.members:
                return
            run.failed, run.failed_by = msg, sender
            run.complete.set()
            return
        if not isinstance(msg, run.expect) or sender in run.got or sender not in run.members:
            return
        if isinstance(msg, proto.DkgMsg1):
            run.got[sender] = msg.pmsg1
        elif isinstance(msg, proto.DkgMsg2):
            run.got[sender] = msg.pmsg2
        else:
            run.got[sender] = msg.threshold_pubkey
        if len(run.got) == len(run.members):
            run.complete.set()
