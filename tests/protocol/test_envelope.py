"""Signed envelopes: only members, only the addressee, only once, only fresh."""

from __future__ import annotations

import os

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from constellation.crypto.dkg import hostpubkey_gen
from constellation.errors import (
    BadMessageSignature,
    MessageError,
    Misdirected,
    NotAMember,
    Overloaded,
    Replayed,
    StaleMessage,
)
from constellation.keys import SigningKey
from constellation.protocol import signer as proto
from constellation.protocol.envelope import BROADCAST, Envelope, Membership, ReplayGuard, seal

SECRETS = [bytes([i + 1]) * 32 for i in range(3)]
KEYS = [hostpubkey_gen(s) for s in SECRETS]
GUILD = "test-guild"
MEMBERS = Membership(GUILD, KEYS)
NOW = 1_800_000_000_000


def sealed(sender: int = 0, to: bytes | None = None, body: bytes = b"hi", **kw: object) -> bytes:
    args: dict[str, object] = {
        "guild": GUILD,
        "key": SigningKey(SECRETS[sender]),
        "hostpubkey": KEYS[sender],
        "to": KEYS[1] if to is None else to,
        "msg_id": os.urandom(16),
        "sent_ms": NOW,
        "body": body,
    }
    args.update(kw)
    return seal(**args)  # type: ignore[arg-type]


def test_a_member_message_opens_for_its_addressee() -> None:
    env, sender = MEMBERS.open(sealed(sender=2, body=b"payload"), KEYS[1])
    assert sender == 2 and env.body == b"payload"
    env, _ = MEMBERS.open(sealed(to=BROADCAST), KEYS[2])
    assert env.to == BROADCAST


def test_non_member_is_rejected() -> None:
    outsider = bytes([9]) * 32
    data = sealed(key=SigningKey(outsider), hostpubkey=hostpubkey_gen(outsider))
    with pytest.raises(NotAMember):
        MEMBERS.open(data, KEYS[1])


def test_member_key_claimed_by_someone_else_fails_the_signature() -> None:
    data = sealed(sender=0, key=SigningKey(SECRETS[2]))  # claims to be member 0
    with pytest.raises(BadMessageSignature):
        MEMBERS.open(data, KEYS[1])


def test_message_for_another_member_or_guild_is_misdirected() -> None:
    with pytest.raises(Misdirected):
        MEMBERS.open(sealed(to=KEYS[2]), KEYS[1])
    with pytest.raises(Misdirected):
        MEMBERS.open(sealed(guild="other"), KEYS[1])


def test_a_time_out_of_range_is_refused_before_its_signature_is_checked() -> None:
    """Anyone may publish on the subject, naming a member: a negative time was a
    struct.error out of ``open`` (its digest packs the time as a u64)."""
    env = msgspec.msgpack.decode(sealed(), type=Envelope)
    for sent_ms in (-1, -(1 << 63)):
        forged = msgspec.msgpack.encode(msgspec.structs.replace(env, sent_ms=sent_ms))
        with pytest.raises(BadMessageSignature, match="not a u64"):
            MEMBERS.open(forged, KEYS[1])


@given(st.data())
def test_any_changed_byte_is_refused(data: st.DataObject) -> None:
    wire = bytearray(sealed(body=b"some body bytes"))
    i = data.draw(st.integers(0, len(wire) - 1))
    wire[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(MessageError):
        MEMBERS.open(bytes(wire), KEYS[1])


@given(st.binary(max_size=300))
def test_garbage_is_a_clear_error(data: bytes) -> None:
    with pytest.raises(MessageError):
        MEMBERS.open(data, KEYS[1])


def test_replay_and_staleness() -> None:
    guard = ReplayGuard(window_ms=1000)
    env, _ = MEMBERS.open(sealed(), KEYS[1])
    guard.check(env, NOW + 10)
    with pytest.raises(Replayed):
        guard.check(env, NOW + 20)
    old, _ = MEMBERS.open(sealed(sent_ms=NOW - 5000), KEYS[1])
    with pytest.raises(StaleMessage):
        guard.check(old, NOW)
    future, _ = MEMBERS.open(sealed(sent_ms=NOW + 5000), KEYS[1])
    with pytest.raises(StaleMessage):
        guard.check(future, NOW)


def test_replay_memory_is_pruned_and_bounded() -> None:
    guard = ReplayGuard(window_ms=1000, max_entries=3)
    envs = [MEMBERS.open(sealed(sent_ms=NOW + 100 * i), KEYS[1])[0] for i in range(5)]
    for env in envs[:3]:
        guard.check(env, env.sent_ms)
    with pytest.raises(Overloaded):
        guard.check(envs[3], envs[3].sent_ms)
    late = envs[4].sent_ms + 2500  # the first three are now stale
    fresh, _ = MEMBERS.open(sealed(sent_ms=late), KEYS[1])
    guard.check(fresh, late)
    assert len(guard._seen) == 1


def test_a_peer_sending_steadily_is_never_refused_below_the_bound() -> None:
    """1,000 messages a window, 1,500 ids allowed: an id is remembered for as long as
    its message is fresh, not two windows from its receipt (which took 2,000 ids: at
    8,333 messages a second an honest operator was refused as a flood)."""
    guard = ReplayGuard(window_ms=1000, max_entries=1500)
    for ms in range(0, 4000, 1):
        env, _ = MEMBERS.open(sealed(sent_ms=NOW + ms - 5), KEYS[1])
        guard.check(env, NOW + ms)
    assert len(guard._seen) <= 1001


def test_a_clock_gone_back_lets_no_forgotten_id_in_again() -> None:
    guard = ReplayGuard(window_ms=1000)
    env, _ = MEMBERS.open(sealed(sent_ms=NOW), KEYS[1])
    guard.check(env, NOW)
    later, _ = MEMBERS.open(sealed(sent_ms=NOW + 1500), KEYS[1])
    guard.check(later, NOW + 1500)  # the first is forgotten: stale from here on
    assert len(guard._seen) == 1
    with pytest.raises(StaleMessage):
        guard.check(env, NOW + 500)  # the receiver's clock went back a second


def test_what_a_stranger_names_is_quoted_short() -> None:
    """The refusal of a stranger's envelope is logged: a guild of 900 kB or a sender of
    450 kB (before any signature is checked) once went into the log whole."""
    with pytest.raises(Misdirected) as guild:
        MEMBERS.open(sealed(guild="g" * 900_000), KEYS[1])
    with pytest.raises(NotAMember) as sender:
        MEMBERS.open(sealed(hostpubkey=b"\x02" * 450_000), KEYS[1])
    assert len(str(guild.value)) < 200 and len(str(sender.value)) < 200


def test_messages_refuse_unknown_fields_and_kinds() -> None:
    good = proto.encode(proto.Presign(b"r" * 16, b"n" * 66))
    assert proto.decode(good) == proto.Presign(b"r" * 16, b"n" * 66)
    doc = msgspec.msgpack.decode(good)
    with pytest.raises(MessageError, match="extra"):
        proto.decode(msgspec.msgpack.encode({**doc, "extra": 1}))
    with pytest.raises(MessageError, match=r"sign\.steal"):
        proto.decode(msgspec.msgpack.encode({**doc, "kind": "sign.steal"}))
    with pytest.raises(MessageError, match="pubnonce"):
        proto.decode(msgspec.msgpack.encode({**doc, "pubnonce": "not bytes"}))
    with pytest.raises(MessageError):
        proto.decode(b"\xa2\xff\xfe")
