"""A signer's part in key generation (``services.signer.handlers.Participant``), driven
message by message as a coordinator would, one of them another member that does not
follow the protocol: the guild's first key is a majority's, a session runs alone and is
dealt once, signer ids come within the key's members, and a member's open requests take
its share of the participant's room only. A request opened before a handover or a key's
retirement signs nothing after it; a participant that gives up naming another is blamed
with it."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from constellation.crypto import dkg, roast
from constellation.crypto.dkg import hostpubkey_gen
from constellation.errors import SigningError
from constellation.guild import Checkpoint, Purpose, SigningPolicy, SignTarget, Statement
from constellation.protocol import signer as proto
from constellation.protocol.envelope import Membership
from services.signer.coordinator import Coordinator
from services.signer.handlers import Participant
from services.signer.metrics import SignerMetrics
from services.signer.store import AuditLog, KeyStore, share_record
from tests.crypto.test_dkg import run_dkg

N = 3
SECRETS = [bytes([i + 1]) * 32 for i in range(N)]
HOSTPUBKEYS = [hostpubkey_gen(s) for s in SECRETS]


class Member:
    """Member ``me``'s participant, and what it answered, to whom (holding its share of
    each key the DKGs of ``recoveries`` made)."""

    def __init__(
        self, where: Path, me: int, secrets: list[bytes] = SECRETS, *recoveries: bytes
    ) -> None:
        self.answers: list[tuple[int, proto.Message]] = []
        folder = where / f"m{me}"
        folder.mkdir()
        members = Membership("guild", [hostpubkey_gen(s) for s in secrets])
        keystore = KeyStore(folder, b"k" * 32)
        for recovery in recoveries:
            keystore.save_share(share_record("guild", secrets[me], recovery))

        async def reply(coordinator: int, msg: proto.Message) -> None:
            self.answers.append((coordinator, msg))

        policy = SigningPolicy(members.guild, frozenset(Purpose), members.identities)
        self.p = Participant(
            members,
            me,
            secrets[me],
            keystore,
            AuditLog(folder / "audit.log"),
            policy,
            SignerMetrics(),
            reply,
            8,
            5000,
        )

    def last(self) -> proto.Message:
        return self.answers[-1][1]


async def test_the_first_key_is_a_majority_s_whoever_asks(tmp_path: Path) -> None:
    member = Member(tmp_path, 0)
    await member.p.handle(2, proto.DkgStart(os.urandom(16), HOSTPUBKEYS, 1))
    refused = member.last()
    assert isinstance(refused, proto.DkgFailed) and "majority" in refused.reason
    assert member.p.dkg is None and not member.p.keys
    await member.p.handle(2, proto.DkgStart(os.urandom(16), HOSTPUBKEYS, 2))
    assert isinstance(member.last(), proto.DkgMsg1)


async def test_a_session_runs_alone_and_its_shares_are_dealt_once(tmp_path: Path) -> None:
    members = [Member(tmp_path, i) for i in range(2)]
    params = dkg.SessionParams(tuple(HOSTPUBKEYS), 2)
    session = os.urandom(16)
    for m in members:
        await m.p.handle(2, proto.DkgStart(session, HOSTPUBKEYS, 2))
    firsts = [m.last() for m in members]
    assert all(isinstance(f, proto.DkgMsg1) for f in firsts)
    # another member may not pre-empt it; its coordinator's start, repeated, is dropped
    await members[0].p.handle(1, proto.DkgStart(os.urandom(16), HOSTPUBKEYS, 2))
    assert isinstance(members[0].last(), proto.DkgFailed)
    await members[0].p.handle(2, proto.DkgStart(session, HOSTPUBKEYS, 2))
    assert len(members[0].answers) == 2  # no answer: the session goes on
    assert members[0].p.dkg is not None and members[0].p.dkg.dkg_id == session
    assert members[0].p.dkg.state1 is not None
    # member 2, coordinating, deals two transcripts in one session: each signer
    # certifies the first it is dealt, and gives up the session at the second
    pmsgs1 = [f.pmsg1 for f in firsts if isinstance(f, proto.DkgMsg1)]
    dealt = []
    for _ in range(2):
        _, own = dkg.participant_step1(SECRETS[2], params, os.urandom(32))
        dealt.append(dkg.coordinator_step1([*pmsgs1, own], params)[1])
    m = members[0]
    await m.p.handle(2, proto.DkgCoord1(session, dealt[0]))
    assert isinstance(m.last(), proto.DkgMsg2)
    await m.p.handle(2, proto.DkgCoord1(session, dealt[1]))
    refused = m.last()
    assert isinstance(refused, proto.DkgFailed) and "dealt already" in refused.reason
    assert sum(isinstance(a, proto.DkgMsg2) for _, a in m.answers) == 1
    assert m.p.dkg is None  # the session is over here


def test_signer_ids_outside_the_key_are_refused() -> None:
    group = roast.Group(N, 2, b"\x02" * 33, tuple(b"\x02" * 33 for _ in range(N)))
    with pytest.raises(SigningError):
        group.signers([0, N])
    with pytest.raises(SigningError):
        group.signers([-1, 0])


async def test_a_member_that_opens_requests_and_never_ends_them_holds_up_no_other(
    tmp_path: Path,
) -> None:
    secrets, _, [recovery], _ = run_dkg(N, 2, random.Random(5))
    member = Member(tmp_path, 0, secrets, recovery)
    share = 8 // N  # of the participant's 8 open requests at most

    async def start(coordinator: int, text: str) -> proto.Message:
        await member.p.handle(coordinator, proto.SignStart(os.urandom(16), Statement(text)))
        return member.last()

    for i in range(share):
        assert isinstance(await start(2, f"stalled {i}"), proto.Presign)
    refused = await start(2, "one too many")
    assert isinstance(refused, proto.SignRefused) and refused.code == "overloaded"
    assert isinstance(await start(1, "an honest request"), proto.Presign)


def another_key(
    secrets: list[bytes], params: dkg.SessionParams
) -> tuple[bytes, list[dkg.DKGOutput]]:
    """A second key of the same members: its recovery data and each member's output."""
    steps = [dkg.participant_step1(k, params, os.urandom(32)) for k in secrets]
    state, cmsg1 = dkg.coordinator_step1([m for _, m in steps], params)
    seconds = [
        dkg.participant_step2(k, s1, cmsg1, os.urandom(32))
        for k, (s1, _) in zip(secrets, steps, strict=True)
    ]
    cmsg2, _, recovery = dkg.coordinator_finalize(state, [m for _, m in seconds])
    return recovery, [dkg.participant_finalize(s2, cmsg2)[0] for s2, _ in seconds]


async def test_a_request_opened_before_a_handover_or_a_retirement_signs_nothing_after(
    tmp_path: Path,
) -> None:
    """Both pass the checks as they open; what is signed or changed before their session
    is checked again as it comes: a checkpoint above a handover the old key signed
    meanwhile, or any request under a key the operator retired meanwhile, is refused
    (both were signed: the old key's holders could sign above its handover)."""
    secrets, outputs, [recovery], params = run_dkg(N, 2, random.Random(5))
    second, outputs2 = another_key(secrets, params)
    member = Member(tmp_path, 0, secrets, recovery, second)
    old = outputs[0].threshold_pubkey
    group = roast.Group(N, 2, old, tuple(outputs[0].pubshares))
    share = outputs[1].secshare
    assert share is not None
    helper = roast.Signer(group, 1, share)

    async def opened(target: SignTarget) -> tuple[bytes, bytes]:
        rid = os.urandom(16)
        await member.p.handle(1, proto.SignStart(rid, target, key=old))
        presign = member.last()
        assert isinstance(presign, proto.Presign), presign
        return rid, presign.pubnonce

    async def session(rid: bytes, nonce: bytes) -> proto.Message:
        await member.p.handle(1, proto.SignSession(rid, 0, [0, 1], [nonce, helper.presign()]))
        return member.last()

    roots = os.urandom(32), os.urandom(32)
    handover = Checkpoint(
        "guild", 0, bytes(32), 1, *roots, next_key=os.urandom(32), next_members=os.urandom(32)
    )
    above = Checkpoint("guild", 1, handover.message(), 2, os.urandom(32), os.urandom(32))
    first, then = await opened(handover), await opened(above)
    assert isinstance(await session(*first), proto.Share)
    refused = await session(*then)
    assert isinstance(refused, proto.SignRefused) and "signs above height 0" in refused.reason
    pending = await opened(Statement("asked under the old key"))
    member.p.activate(outputs2[0].threshold_pubkey)
    refused = await session(*pending)
    assert isinstance(refused, proto.SignRefused) and "retired" in refused.reason


async def test_a_participant_that_gives_up_naming_another_is_blamed_with_it() -> None:
    """Member 2 gives up at once, naming member 1: unchecked, that names one faulty
    member of the two (the coordinator relayed honestly), not member 1 alone (a faulty
    member could frame any other, and never be named)."""
    sent: list[tuple[int, proto.Message]] = []

    async def send(member: int, msg: proto.Message) -> None:
        sent.append((member, msg))

    members = Membership("guild", HOSTPUBKEYS)
    coordinator = Coordinator(members, 0, SignerMetrics(), send, lambda _: None, 64, 2000)
    running = asyncio.create_task(coordinator.keygen(2))
    while not sent:
        await asyncio.sleep(0.01)
    start = sent[0][1]
    assert isinstance(start, proto.DkgStart)
    coordinator._on_dkg(2, proto.DkgFailed(start.dkg_id, "dkg.faulty", "it lies", 1))
    reply = await running
    assert not reply.ok and reply.blamed == [2, 1]
    assert "member 2 gave up" in reply.error and "names member 1" in reply.error
