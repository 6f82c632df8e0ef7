"""The coordinator side: run ChillDKG and ROAST for this operator's requests.

Any member can coordinate. ROAST needs no timeout to decide who is faulty; the request
deadline only bounds how long an operator waits when fewer than t signers answer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from constellation.crypto import dkg, roast
from constellation.errors import (
    ConstellationError,
    DKGError,
    FaultyParticipantOrCoordinatorError,
    RequestRefused,
    UnknownNonce,
)
from constellation.guild import Derived, SignTarget, derive
from constellation.protocol import signer as proto
from constellation.protocol.envelope import Membership
from services.signer.metrics import SignerMetrics

log = logging.getLogger("signer.coordinator")

Send = Callable[[int, proto.Message], Awaitable[None]]  # (signer index, message)


@dataclass
class _Signing:
    request_id: bytes
    derived: Derived
    roast: roast.Coordinator
    done: asyncio.Future[proto.OpReply]
    refused: dict[int, str] = field(default_factory=dict)
    stale_nonce: bool = False  # a signer no longer held a nonce we had cached for it
    presigned: set[int] = field(default_factory=set)


@dataclass
class _Keygen:
    dkg_id: bytes
    expect: type[proto.DkgMsg1 | proto.DkgMsg2 | proto.DkgDone]
    got: dict[int, bytes] = field(default_factory=dict)
    failed: proto.DkgFailed | None = None
    complete: asyncio.Event = field(default_factory=asyncio.Event)


def _error(exc: ConstellationError, blamed: list[int] | None = None) -> proto.OpReply:
    return proto.OpReply(False, code=exc.code, error=str(exc), blamed=blamed or [])


class Coordinator:
    def __init__(
        self,
        members: Membership,
        metrics: SignerMetrics,
        send: Send,
        group: Callable[[], roast.Group | None],
        max_requests: int,
        request_timeout_ms: int,
    ) -> None:
        self.members = members
        self.n = len(members.hostpubkeys)
        self.metrics = metrics
        self.send = send
        self.group = group
        self.max_requests = max_requests
        self.timeout_s = request_timeout_ms / 1000
        self.signing: dict[bytes, _Signing] = {}
        self._dkg: _Keygen | None = None
        self._announcing: set[asyncio.Task[None]] = set()
        self.cached: dict[int, bytes] = {}  # signer -> a fresh nonce it sent us, unused

    async def handle(self, sender: int, msg: proto.Message) -> None:
        if isinstance(msg, proto.Presign | proto.Share | proto.SignRefused):
            await self._on_signer(sender, msg)
        elif isinstance(msg, proto.DkgMsg1 | proto.DkgMsg2 | proto.DkgDone | proto.DkgFailed):
            self._on_dkg(sender, msg)
        else:
            self.metrics.rejected_messages.labels("protocol.unexpected").inc()

    # -- signing ----------------------------------------------------------------------------

    async def sign(self, target: SignTarget, evidence: bytes = b"") -> proto.OpReply:
        """ROAST-sign ``target``. Signers' nonces left over from earlier requests start
        the first session at once; a signer that restarted has forgotten its nonce and
        says so, and if that leaves too few signers the request is run once more with
        fresh nonces from everyone."""
        group = self.group()
        try:
            if group is None:
                raise RequestRefused("no guild key yet: run keygen first")
            if len(self.signing) >= self.max_requests:
                raise RequestRefused(f"{self.max_requests} signing requests are running")
            derived = derive(target, group.thresh_pk)
        except ConstellationError as exc:
            return _error(exc)
        self.metrics.requests_started.inc()
        started = time.perf_counter()
        reply, stale = await self._run(group, target, evidence, derived, use_cached=True)
        if not reply.ok and stale:
            reply, _ = await self._run(group, target, evidence, derived, use_cached=False)
        outcome = "signed" if reply.ok else reply.code
        self.metrics.requests_finished.labels(outcome).inc()
        if reply.ok:
            self.metrics.sign_latency.observe(time.perf_counter() - started)
        return reply

    async def _run(
        self,
        group: roast.Group,
        target: SignTarget,
        evidence: bytes,
        derived: Derived,
        use_cached: bool,
    ) -> tuple[proto.OpReply, bool]:
        """One ROAST run; also says whether a signer refused a nonce we held for it."""
        coordinator = roast.Coordinator(group, derived.msg, derived.tweaks, derived.is_xonly)
        rid = os.urandom(16)
        run = _Signing(rid, derived, coordinator, asyncio.get_running_loop().create_future())
        self.signing[rid] = run
        preloaded = []
        for i in range(self.n):
            nonce = self.cached.pop(i, None) if use_cached else None
            await self.send(i, proto.SignStart(rid, target, nonce is None, evidence))
            if nonce is not None:
                preloaded.append((i, nonce))
        for i, nonce in preloaded:
            run.presigned.add(i)
            await self._dispatch(run, coordinator.receive(i, None, nonce))
        try:
            reply = await asyncio.wait_for(asyncio.shield(run.done), self.timeout_s)
        except TimeoutError:
            silent = sorted(set(range(self.n)) - run.presigned - set(run.refused))
            stalled = sorted(coordinator.session_of)
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
                blamed=sorted(coordinator.malicious),
            )
            self._finish(run, reply)
        announce = asyncio.create_task(self._announce(rid, reply.signature))
        self._announcing.add(announce)
        announce.add_done_callback(self._announcing.discard)
        return reply, run.stale_nonce

    async def _dispatch(self, run: _Signing, requests: list[roast.SignRequest]) -> None:
        for request in requests:
            self.metrics.sessions_started.inc()
            session = proto.SignSession(
                run.request_id, request.session_id, list(request.ids), list(request.pubnonces)
            )
            for i in request.ids:
                await self.send(i, session)

    async def _on_signer(
        self, sender: int, msg: proto.Presign | proto.Share | proto.SignRefused
    ) -> None:
        run = self.signing.get(msg.request_id)
        if run is None:
            # A late answer to a finished request: its fresh nonce starts a later one.
            if not isinstance(msg, proto.SignRefused):
                self.cached[sender] = msg.pubnonce
            return
        coordinator = run.roast
        if isinstance(msg, proto.SignRefused):
            run.refused[sender] = f"[{msg.code}] {msg.reason}"
            run.stale_nonce |= msg.code == UnknownNonce.code
            self.metrics.signer_failures.labels(str(sender), "refused").inc()
            group = coordinator.group
            if len(run.refused.keys() | coordinator.malicious) > group.n - group.t:
                self._finish(
                    run,
                    proto.OpReply(
                        False,
                        code="signing.refused",
                        error="signers refused: "
                        + "; ".join(f"{i}: {why}" for i, why in sorted(run.refused.items())),
                        sessions=len(coordinator.sessions),
                        blamed=sorted(coordinator.malicious),
                    ),
                )
            return
        was_malicious = sender in coordinator.malicious
        if isinstance(msg, proto.Presign):
            run.presigned.add(sender)
            requests = coordinator.receive(sender, None, msg.pubnonce)
        else:
            requests = coordinator.receive(sender, msg.psig, msg.pubnonce)
        if sender in coordinator.malicious and not was_malicious:
            self.metrics.signer_failures.labels(str(sender), "invalid_share").inc()
            log.warning(
                "signer misbehaved", extra={"request_id": run.request_id.hex(), "signer": sender}
            )
        if coordinator.signature is None:
            await self._dispatch(run, requests)
            return
        self.metrics.sessions_finished.inc()
        for i in coordinator.ready:  # nonces they sent that no session used
            self.cached[i] = coordinator.pubnonce[i]
        self.cached[sender] = msg.pubnonce  # the share that completed it carries one too
        self._finish(
            run,
            proto.OpReply(
                True,
                threshold_pubkey=run.derived.pubkey,
                signature=coordinator.signature,
                message=run.derived.msg,
                sessions=len(coordinator.sessions),
                blamed=sorted(coordinator.malicious),
            ),
        )

    def _finish(self, run: _Signing, reply: proto.OpReply) -> None:
        if self.signing.pop(run.request_id, None) is not None:
            run.done.set_result(reply)

    async def _announce(self, request_id: bytes, signature: bytes) -> None:
        """Tell every signer the request is over (after the operator has its answer)."""
        for i in range(self.n):
            await self.send(i, proto.SignDone(request_id, signature))

    # -- key generation ---------------------------------------------------------------------

    async def keygen(self, t: int) -> proto.OpReply:
        if self._dkg is not None:
            return _error(RequestRefused("a key generation is running already"))
        params = dkg.SessionParams(self.members.hostpubkeys, t)
        dkg_id = os.urandom(16)
        started = time.perf_counter()
        try:
            dkg.params_validate(params)
            pmsgs1 = await self._gather(
                dkg_id, proto.DkgMsg1, proto.DkgStart(dkg_id, list(params.hostpubkeys), t)
            )
            state, cmsg1 = dkg.coordinator_step1(pmsgs1, params)
            pmsgs2 = await self._gather(dkg_id, proto.DkgMsg2, proto.DkgCoord1(dkg_id, cmsg1))
            cmsg2, output, _ = dkg.coordinator_finalize(state, pmsgs2)
            keys = await self._gather(dkg_id, proto.DkgDone, proto.DkgCoord2(dkg_id, cmsg2))
        except ConstellationError as exc:
            self.metrics.dkg_runs.labels(exc.code).inc()
            blamed = getattr(exc, "participant", None)
            return _error(exc, blamed=[] if blamed is None else [blamed])
        finally:
            self._dkg = None
        if any(k != output.threshold_pubkey for k in keys):
            self.metrics.dkg_runs.labels("dkg.disagreement").inc()
            return _error(DKGError("participants stored different keys"))
        self.metrics.dkg_runs.labels("ok").inc()
        self.metrics.dkg_seconds.observe(time.perf_counter() - started)
        log.info("key generation finished", extra={"threshold_pubkey": keys[0].hex(), "t": t})
        return proto.OpReply(True, threshold_pubkey=output.threshold_pubkey)

    async def _gather(
        self,
        dkg_id: bytes,
        expect: type[proto.DkgMsg1 | proto.DkgMsg2 | proto.DkgDone],
        out: proto.Message,
    ) -> list[bytes]:
        """Send ``out`` to every member and wait for one ``expect`` from each."""
        run = self._dkg = _Keygen(dkg_id, expect)
        for i in range(self.n):
            await self.send(i, out)
        try:
            await asyncio.wait_for(run.complete.wait(), self.timeout_s)
        except TimeoutError:
            missing = sorted(set(range(self.n)) - run.got.keys())
            raise DKGError(f"participants {missing} did not answer in time") from None
        if run.failed is not None:
            failed = run.failed
            reason = f"a participant gave up: [{failed.code}] {failed.reason}"
            if failed.blamed >= 0:
                raise FaultyParticipantOrCoordinatorError(failed.blamed, reason)
            raise DKGError(reason)
        return [run.got[i] for i in range(self.n)]

    def _on_dkg(
        self, sender: int, msg: proto.DkgMsg1 | proto.DkgMsg2 | proto.DkgDone | proto.DkgFailed
    ) -> None:
        run = self._dkg
        if run is None or msg.dkg_id != run.dkg_id:
            return
        if isinstance(msg, proto.DkgFailed):
            run.failed = msg
            run.complete.set()
            return
        if not isinstance(msg, run.expect) or sender in run.got:
            return
        if isinstance(msg, proto.DkgMsg1):
            run.got[sender] = msg.pmsg1
        elif isinstance(msg, proto.DkgMsg2):
            run.got[sender] = msg.pmsg2
        else:
            run.got[sender] = msg.threshold_pubkey
        if len(run.got) == self.n:
            run.complete.set()
