"""Signed, replay-checked messages between guild members over NATS.

Between members: ``cst.rep.<sender>.sig.signer.<i>`` (member i's signer) and
``cst.rep.<sender>.sig.coord.<i>`` (member i's coordinator), published on member i's
NATS server (where each member runs its own, a peer reaches it with the credentials it
was issued, which let it publish under its own name only: ``replica.transport``); the
sender's name in the subject is for routing only, the envelope says who sent it. An
operator's requests to its own signer: ``cst.<guild>.op.<i>`` (request-reply, on its
own server). Every payload between members is an envelope signed by the sender's host
key; an operator's request is signed by one of its client keys (``SIGNER_CLIENT_KEYS``:
keys that may ask this signer, and that sign nothing for the guild), the reply to it by
the signer's host key.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from enum import StrEnum

from nats.aio.client import Client

from constellation.crypto.dkg import hostpubkey_gen
from constellation.errors import MessageError, NotAMember
from constellation.keys import SigningKey
from constellation.protocol import signer as proto
from constellation.protocol.envelope import MSG_ID_LEN, Membership, ReplayGuard, seal
from services.replica.transport import PREFIX
from services.runtime import now_ms

# Message ids remembered per member within the replay window: far above what signing
# sends (a few messages a session), and a bound on what a flooding member costs.
PER_SENDER = 100_000


class Role(StrEnum):
    SIGNER = "signer"
    COORD = "coord"
    OP = "op"


def subject(guild: str, role: Role, idx: int) -> str:
    """Where an operator asks its own signer (``Role.OP``)."""
    return f"cst.{guild}.{role}.{idx}"


def peer_subject(sender: str, role: Role, idx: int) -> str:
    return f"{PREFIX}.{sender}.sig.{role}.{idx}"


def listen_subject(role: Role, idx: int) -> str:
    """What member ``idx``'s signer or coordinator hears, from every sender."""
    return f"{PREFIX}.*.sig.{role}.{idx}"


class Transport:
    def __init__(
        self,
        nc: Client,
        members: Membership,
        hostseckey: bytes,
        window_ms: int = 60_000,
        per_sender: int = PER_SENDER,
        name: str = "",
        routes: dict[int, Client] | None = None,
        clients: Sequence[bytes] = (),
    ) -> None:
        """``routes``: the connection to each other member's server, once made (None:
        every member shares ``nc``'s); ``name``: this member's, in subjects;
        ``clients``: the public keys of this operator's client keys. Message ids are
        remembered for ``window_ms``, at most ``per_sender`` of each member's (and
        client's): a member that floods fills its own and is refused, not the others
        (one memory for all let a faulty member have every member's messages
        refused)."""
        self.nc = nc
        self.routes = routes
        self.members = members
        self.guild = members.guild
        self.key = SigningKey(hostseckey)
        self.hostpubkey = hostpubkey_gen(hostseckey)
        self.me = members.index.get(self.hostpubkey, -1)  # -1: not a member (it is refused)
        self.name = name or f"m{self.me}"
        self.guards = [ReplayGuard(window_ms, per_sender) for _ in members.hostpubkeys]
        self.clients = Membership(self.guild, clients) if clients else None
        self.client_guards = [ReplayGuard(window_ms, per_sender) for _ in clients]

    def seal(self, to: bytes, msg: proto.Message) -> bytes:
        return seal(
            self.guild,
            self.key,
            self.hostpubkey,
            to,
            os.urandom(MSG_ID_LEN),
            now_ms(),
            proto.encode(msg),
        )

    async def send(self, role: Role, idx: int, msg: proto.Message) -> None:
        data = self.seal(self.members.hostpubkeys[idx], msg)
        nc = self.nc if self.routes is None or idx == self.me else self.routes.get(idx)
        if nc is None:
            return  # not connected to that member yet: it is unresponsive, as ROAST sees it
        await nc.publish(peer_subject(self.name, role, idx), data)

    def open(self, data: bytes) -> tuple[int, proto.Message]:
        """Authenticate, replay-check and decode; returns the sender's index."""
        _check_size(data)
        env, sender = self.members.open(data, self.hostpubkey)
        self.guards[sender].check(env, now_ms())
        return sender, proto.decode(env.body)

    def open_request(self, data: bytes) -> tuple[bytes, proto.Message]:
        """An operator's request, signed by one of its client keys (a member's host key
        commands no other member's signer, nor its own); returns the client's key, to
        seal the reply to."""
        _check_size(data)
        if self.clients is None:
            raise NotAMember("this signer takes no operator requests: no SIGNER_CLIENT_KEYS")
        try:
            env, client = self.clients.open(data, self.hostpubkey)
        except NotAMember:
            raise NotAMember("the request is not signed by a client key of this signer") from None
        self.client_guards[client].check(env, now_ms())
        return env.sender, proto.decode(env.body)


class ClientTransport:
    """An operator's side of its requests to its own signer: sealed with a client key,
    the replies opened as the signer's."""

    def __init__(self, members: Membership, signer: bytes, client_key: bytes) -> None:
        self.members = members
        self.signer = signer
        self.me = members.index[signer]
        self.key = SigningKey(client_key)
        self.pubkey = hostpubkey_gen(client_key)
        self.guard = ReplayGuard()

    def seal(self, request: proto.Message) -> bytes:
        return seal(
            self.members.guild,
            self.key,
            self.pubkey,
            self.signer,
            os.urandom(MSG_ID_LEN),
            now_ms(),
            proto.encode(request),
        )

    def open(self, data: bytes) -> proto.Message:
        """The signer's reply: from this operator's signer, to this client."""
        _check_size(data)
        env, sender = self.members.open(data, self.pubkey)
        if sender != self.me:
            raise MessageError("the reply did not come from this operator's signer")
        self.guard.check(env, now_ms())
        return proto.decode(env.body)


def _check_size(data: bytes) -> None:
    if len(data) > proto.MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(data)} bytes is over the limit")
