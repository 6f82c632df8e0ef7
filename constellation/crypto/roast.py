"""ROAST: robust asynchronous signing sessions over FROST (Ruffing et al., CCS 2022).

The coordinator starts a FROST session as soon as ``t`` signers are ready (have sent a
fresh public nonce and are not pending in another session), marks a signer malicious
when it sends an invalid nonce or partial signature (or breaks the protocol), and keeps
every session open until one completes. Each reply carries the signer's next nonce, so a
responsive signer is ready again at once. With at most ``n - t`` faulty signers, a
session of ``t`` honest ones always forms: at most ``n - t + 1`` sessions are started.

Both sides are pure state machines: the signer service feeds them messages and sends
what they return.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from constellation.crypto import frost
from constellation.crypto.point import cpoint
from constellation.errors import SigningError, UnknownNonce
from constellation.keys import schnorr_verify


@dataclass(frozen=True)
class Group:
    """A threshold key: ``n`` participants, threshold ``t``, every public share."""

    n: int
    t: int
    thresh_pk: bytes  # 33-byte compressed
    pubshares: tuple[bytes, ...]  # index = participant id

    def signers(self, ids: Sequence[int]) -> frost.SignersContext:
        ids = tuple(sorted(ids))
        if any(not 0 <= i < self.n for i in ids):  # a coordinator's message: untrusted
            raise SigningError(f"signer ids are below {self.n}")
        return frost.SignersContext(
            self.n, self.t, ids, tuple(self.pubshares[i] for i in ids), self.thresh_pk
        )


@dataclass(frozen=True)
class SignRequest:
    """The coordinator's request to one session's signers."""

    session_id: int
    ids: tuple[int, ...]
    pubnonces: tuple[bytes, ...]  # parallel to ids: signers check their own is included
    msg: bytes
    tweaks: tuple[bytes, ...] = ()
    is_xonly: tuple[bool, ...] = ()

    def session(self, group: Group) -> frost.SessionContext:
        return frost.SessionContext(
            group.signers(self.ids),
            frost.nonce_agg(self.pubnonces, self.ids),
            self.tweaks,
            self.is_xonly,
            self.msg,
        )


def _is_pubnonce(data: bytes) -> bool:
    try:
        cpoint(data[:33])
        cpoint(data[33:])
    except ValueError:
        return False
    return len(data) == 66


@dataclass
class _Session:
    request: SignRequest
    context: frost.SessionContext
    values: frost.SessionValues
    psigs: dict[int, bytes] = field(default_factory=dict)


class Coordinator:
    """The ROAST coordinator for one message (and one tweak list)."""

    def __init__(
        self,
        group: Group,
        msg: bytes,
        tweaks: Sequence[bytes] = (),
        is_xonly: Sequence[bool] = (),
    ) -> None:
        self.group = group
        self.msg = msg
        self.tweaks = tuple(tweaks)
        self.is_xonly = tuple(is_xonly)
        self.tweak = frost.tweak_context(group.thresh_pk, self.tweaks, self.is_xonly)
        self.ready: list[int] = []
        self.malicious: set[int] = set()
        self.pubnonce: dict[int, bytes] = {}
        self.session_of: dict[int, int] = {}
        self.sessions: dict[int, _Session] = {}
        self.signature: bytes | None = None

    @property
    def max_sessions(self) -> int:
        return self.group.n - self.group.t + 1

    def receive(self, signer: int, psig: bytes | None, pubnonce: bytes) -> list[SignRequest]:
        """Handle a signer's message: its partial signature (None at first) and next nonce.

        Returns requests for sessions that start now. When a session completes,
        ``self.signature`` holds the BIP340 signature and nothing more is started.
        """
        if self.signature is not None or signer in self.malicious:
            return []
        if not 0 <= signer < self.group.n:
            raise SigningError(f"signer {signer} is not a member of this group")
        pending = self.session_of.get(signer)
        if signer in self.ready or (psig is not None and pending is None):
            self.malicious.add(signer)  # a protocol violation: replies out of turn
            return []
        if psig is not None:
            assert pending is not None
            if not self._accept_share(signer, pending, psig):
                return []
            if self.signature is not None:
                return []
        elif pending is not None:
            self.malicious.add(signer)  # a fresh nonce while its session waits on it
            return []
        if not _is_pubnonce(pubnonce):
            self.malicious.add(signer)
            return []
        self.pubnonce[signer] = pubnonce
        self.ready.append(signer)
        if len(self.ready) < self.group.t:
            return []
        return [self._start_session()]

    def _accept_share(self, signer: int, sid: int, psig: bytes) -> bool:
        del self.session_of[signer]
        session = self.sessions[sid]
        k = session.request.ids.index(signer)
        valid = frost.partial_sig_verify_internal(
            psig,
            signer,
            session.request.pubnonces[k],
            self.group.pubshares[signer],
            session.context,
            session.values,
        )
        if not valid:
            self.malicious.add(signer)
            return False
        session.psigs[signer] = psig
        if len(session.psigs) == self.group.t:
            psigs = [session.psigs[i] for i in session.request.ids]
            sig = frost.partial_sig_agg(psigs, session.context)
            # Every share verified, so the sum must verify: anything else is our bug.
            assert schnorr_verify(self.tweak.xonly_pk, self.msg, sig), "valid shares, invalid sum"
            self.signature = sig
        return True

    def _start_session(self) -> SignRequest:
        ids = tuple(sorted(self.ready))
        self.ready = []
        sid = len(self.sessions)
        assert sid < self.max_sessions, "ROAST started more than n-t+1 sessions"
        request = SignRequest(
            sid,
            ids,
            tuple(self.pubnonce.pop(i) for i in ids),
            self.msg,
            self.tweaks,
            self.is_xonly,
        )
        context = request.session(self.group)  # nonces were parsed on receipt
        self.sessions[sid] = _Session(request, context, frost.get_session_values(context))
        for i in ids:
            self.session_of[i] = sid
        return request


class Signer:
    """One participant's side: fresh nonces handed out ahead, each used for one request.

    ``presign`` makes a nonce and keeps its secret half in a bounded pool (the oldest is
    erased when the pool is full), so a coordinator may hold a signer's nonce from one
    request and use it in the next one, saving a round trip. ``sign`` takes the nonce the
    request names out of the pool: a nonce never issued, already used or evicted is
    refused, so no request can make the signer use a nonce twice.
    """

    def __init__(self, group: Group, my_id: int, secshare: bytes, pool_size: int = 64) -> None:
        assert pool_size >= 1
        self.group = group
        self.my_id = my_id
        self.secshare = secshare
        self.pool_size = pool_size
        self._pool: dict[bytes, frost.SecNonce] = {}  # insertion order = age

    def presign(self) -> bytes:
        """A fresh public nonce; its secret half waits in the pool for one request."""
        secnonce, pubnonce = frost.nonce_gen(
            self.secshare, self.group.pubshares[self.my_id], self.group.thresh_pk[1:]
        )
        if len(self._pool) >= self.pool_size:
            oldest = next(iter(self._pool))
            self._pool.pop(oldest).take()  # erased
        self._pool[pubnonce] = secnonce
        return pubnonce

    def sign(self, request: SignRequest) -> tuple[bytes, bytes]:
        """Answer a request with ``(psig, next pubnonce)``; refuses to reuse a nonce."""
        if self.my_id not in request.ids:
            raise SigningError("this signer is not part of the session")
        k = request.ids.index(self.my_id)
        secnonce = self._pool.pop(request.pubnonces[k], None)
        if secnonce is None:
            raise UnknownNonce("the request names a nonce this signer does not hold")
        psig = frost.sign(secnonce, self.secshare, self.my_id, request.session(self.group))
        return psig, self.presign()
