"""Replication messages between copies, over each operator's own NATS.

A message for copy ``c`` goes to the NATS server of operator ``c // 2``, on the subject
``cst.rep.<sender>.<owner>.<worker>.<c>``. A peer reaches that server with credentials
the receiving operator issued, which allow it to publish under its own name only
(``cst.rep.<sender>.>``); and every message is sealed in an ``Envelope`` signed with the
sender's operator key and addressed to the receiving operator, with a fresh id and the
time it was sent. The receiver refuses, and counts by reason, anything that is not from
a member, is signed by another than the subject names, is addressed to another, was seen
before, is stale, or is not a replication message of a copy of that operator.

No server is a hub: operator ``o``'s copies hear from ``o``'s server only, and each
sender delivers to the server of each receiver.

Between the two machines of one operator, messages go over that operator's own server
under its own name, which no peer may publish as: they are not sealed (``Sealer.seal``
leaves them plain, ``Opener.open`` takes them plain), saving a signature and its check
on every message to a twin.

Packages and queries relayed to a shard's leader at another operator (``relay.py``) go
to the machine hosting that copy on ``cst.rep.<sender>.fwd.<owner>.<worker>.<copy>``
(an operator moves its copies between its machines without telling anyone), and their
answers to one machine (``fwd.<machine>``) or all (``fwd.all``), sealed the same way
(always: a machine never relays to its own operator).

Checkpoints a member had signed go to every member on ``cst.rep.<sender>.ckpt``
(``services.indexer.checkpoints``).

Settlement messages between two operators (``services.gateway.settle``) go on
``cst.rep.<sender>.set``, sealed by a ``SettleLink``: the same envelope, naming the
settlement domain instead of a guild, since an operator settles with the other members
of its guild and with operators of other guilds (the layout's neighbours) alike.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from constellation.errors import Misdirected
from constellation.keys import SigningKey
from constellation.protocol import replication as rp
from constellation.protocol.envelope import BROADCAST, Membership, ReplayGuard, seal

FRESH_MS = 30_000  # a message older (or newer) than this, by the receiver's clock, is stale
PER_SENDER = 500_000  # message ids remembered per sender: FRESH_MS of 16,000 a second
PREFIX = "cst.rep"


def member_key(xonly: bytes) -> bytes:
    """An operator's key as an envelope names it (compressed, even Y: BIP340's lift)."""
    return b"\x02" + xonly


def subject(sender: str, owner: int, worker: int, copy: int) -> str:
    return f"{PREFIX}.{sender}.{owner}.{worker}.{copy}"


def listen_subject(owner: int, worker: int, copy: int) -> str:
    """What copy ``copy`` of shard (owner, worker) listens on, from every sender."""
    return f"{PREFIX}.*.{owner}.{worker}.{copy}"


def forward_subject(sender: str, to: str) -> str:
    """Where ``sender`` relays to ``to`` at the receiving operator: ``copy_target`` (the
    machine hosting that copy, wherever it is), ``str(machine)`` or ``ALL`` machines."""
    return f"{PREFIX}.{sender}.fwd.{to}"


def copy_target(owner: int, worker: int, copy: int) -> str:
    return f"{owner}.{worker}.{copy}"


ALL = "all"


def forward_listen(to: str) -> str:
    return f"{PREFIX}.*.fwd.{to}"


def settle_subject(sender: str) -> str:
    return f"{PREFIX}.{sender}.set"


SETTLE_LISTEN = f"{PREFIX}.*.set"


def checkpoint_subject(sender: str) -> str:
    """Where ``sender``'s indexer announces the checkpoints it had signed to a member
    (not sealed: a signed checkpoint proves itself)."""
    return f"{PREFIX}.{sender}.ckpt"


CHECKPOINT_LISTEN = f"{PREFIX}.*.ckpt"


def range_subject(sender: str) -> str:
    """Where ``sender``'s indexer asks a member for checkpoints it missed (``RangeRequest``)."""
    return f"{PREFIX}.{sender}.ckptq"


RANGE_LISTEN = f"{PREFIX}.*.ckptq"


def fill_subject(sender: str) -> str:
    """Where ``sender``'s indexer answers a ``RangeRequest`` (``Fills``)."""
    return f"{PREFIX}.{sender}.ckptf"


FILL_LISTEN = f"{PREFIX}.*.ckptf"
SETTLE_DOMAIN = "constellation/settle"  # what settlement envelopes name instead of a guild


def peer_permissions(peer: str, member: bool = True) -> dict[str, object]:
    """The NATS permissions an operator grants a peer: publish its own messages, nothing
    else (no subscriptions, no JetStream, no other subjects); an operator of another
    guild (not a ``member``), its settlement messages only."""
    allow = f"{PREFIX}.{peer}.>" if member else settle_subject(peer)
    return {"publish": {"allow": [allow]}, "subscribe": {"deny": [">"]}}


class Sealer:
    """Seals this operator's messages for each receiving operator."""

    def __init__(self, guild: str, key: SigningKey, keys: Sequence[bytes]) -> None:
        self.guild = guild
        self.key = key
        self.me = member_key(key.pubkey)
        self.to = [member_key(k) for k in keys]

    def seal(self, operator: int, envelope: rp.Envelope, now_ms: int) -> bytes:
        """For the copies of ``operator`` (plain for our own)."""
        if self.to[operator] == self.me:
            return rp.encode(envelope)  # to our own other machine
        return self._seal(self.to[operator], envelope, now_ms)

    def seal_all(self, envelope: rp.Envelope, now_ms: int) -> bytes:
        """For the copies of several operators: one signature, addressed to every member
        (each receiver's replay guard sees it once; a peer cannot pass it on, since it
        may publish only under its own name)."""
        return self._seal(BROADCAST, envelope, now_ms)

    def seal_body(self, operator: int, body: bytes, now_ms: int) -> bytes:
        """A message for ``operator`` that is not replication's: a relayed package,
        query or answer (``relay.py``)."""
        return seal(self.guild, self.key, self.me, self.to[operator], os.urandom(16), now_ms, body)

    def _seal(self, to: bytes, envelope: rp.Envelope, now_ms: int) -> bytes:
        return seal(self.guild, self.key, self.me, to, os.urandom(16), now_ms, rp.encode(envelope))


class Opener:
    """Checks what arrives for this operator's copies (see the module docstring)."""

    def __init__(self, guild: str, names: Sequence[str], keys: Sequence[bytes], me: int) -> None:
        self.names = {name: i for i, name in enumerate(names)}
        self.membership = Membership(guild, [member_key(k) for k in keys])
        self.me = member_key(keys[me])
        self.index = me
        # One guard per sender: a member flooding fresh ids fills its own, not others';
        # and relayed traffic its own, not that of replication.
        self.guards = [ReplayGuard(FRESH_MS, PER_SENDER) for _ in keys]
        self.forward_guards = [ReplayGuard(FRESH_MS, PER_SENDER) for _ in keys]

    def open(self, subj: str, data: bytes, now_ms: int) -> rp.Envelope:
        """The replication envelope inside, or a ``ConstellationError`` saying why not."""
        parts = subj.split(".")
        if len(parts) != 6:
            raise Misdirected(f"not a replication subject: {subj!r}")
        claimed = self.names.get(parts[2])
        if claimed == self.index:  # from our other machine, over our own server
            sender, inner = claimed, rp.decode(data)
        else:
            sender, body = self._open(self.guards, claimed, parts[2], data, now_ms)
            inner = rp.decode(body)
        if (
            inner.sender // 2 != sender
            or str(inner.owner) != parts[3]
            or str(inner.worker) != parts[4]
        ):
            raise Misdirected("the message names another copy or shard than its subject")
        return inner

    def open_forward(self, subj: str, data: bytes, now_ms: int) -> tuple[int, bytes]:
        """(the sending operator, the relayed message inside), or a
        ``ConstellationError`` saying why not."""
        parts = subj.split(".")
        if len(parts) not in (5, 7) or parts[3] != "fwd":
            raise Misdirected(f"not a relay subject: {subj!r}")
        claimed = self.names.get(parts[2])
        if claimed == self.index:
            raise Misdirected("a relay from our own name: machines never relay to their own")
        return self._open(self.forward_guards, claimed, parts[2], data, now_ms)

    def _open(
        self,
        guards: list[ReplayGuard],
        claimed: int | None,
        name: str,
        data: bytes,
        now_ms: int,
    ) -> tuple[int, bytes]:
        env, sender = self.membership.open(data, self.me)
        if sender != claimed:
            raise Misdirected(f"signed by member {sender}, sent as {name!r}")
        guards[sender].check(env, now_ms)
        return sender, env.body


class SettleLink:
    """Seals this operator's settlement messages and opens those it receives, from the
    operators it settles with (by the names it knows them by: the NATS users it issued
    them). It refuses, raising a ``ConstellationError`` that says why, anything not from
    one of them, signed by another than the subject names, addressed to another, seen
    before, or stale."""

    def __init__(self, key: SigningKey, peers: Sequence[tuple[str, bytes]]) -> None:
        keys = [member_key(key.pubkey), *(member_key(k) for _, k in peers)]
        self.key = key
        self.me = keys[0]
        self.keys = {name: keys[i + 1] for i, (name, _) in enumerate(peers)}
        self.index = {name: i + 1 for i, (name, _) in enumerate(peers)}
        self.names = {i: name for name, i in self.index.items()}
        self.membership = Membership(SETTLE_DOMAIN, keys)
        self.guards = [ReplayGuard(FRESH_MS, PER_SENDER) for _ in keys]

    def seal(self, peer: str, body: bytes, now_ms: int) -> bytes:
        return seal(SETTLE_DOMAIN, self.key, self.me, self.keys[peer], os.urandom(16), now_ms, body)

    def open(self, subj: str, data: bytes, now_ms: int) -> tuple[str, bytes]:
        """(the sending peer's name, its settlement message inside)."""
        parts = subj.split(".")
        if len(parts) != 4 or parts[3] != "set":
            raise Misdirected(f"not a settlement subject: {subj!r}")
        claimed = self.index.get(parts[2])
        env, sender = self.membership.open(data, self.me)
        if sender != claimed:
            raise Misdirected(f"signed by another than {parts[2][:64]!r}, who sent it")
        self.guards[sender].check(env, now_ms)
        return self.names[sender], env.body
