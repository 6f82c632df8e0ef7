"""A signer's part in key generation (``services.signer.handlers.Participant``), driven
message by message as a coordinator would, one of them another member that does not
follow the protocol: the guild's first key is a majority's, a session runs alone and is
dealt once, signer ids come within the key's members, and a member's open requests take
its share of the participant's room only."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from constellation.crypto import dkg, roast
from constellation.crypto.dkg import hostpubkey_gen
from constellation.errors import SigningError
from constellation.guild import Purpose, SigningPolicy, Statement
from constellation.protocol import signer as proto
from constellation.protocol.envelope import Membership
from services.signer.handlers import Participant
from services.signer.metrics import SignerMetrics
from services.signer.store import AuditLog, KeyStore, share_record
from tests.crypto.test_dkg import run_dkg

N = 3
SECRETS = [bytes([i + 1]) * 32 for i in range(N)]
HOSTPUBKEYS = [hostpubkey_gen(s) for s in SECRETS]


class Member:
    """Member ``me``'s participant, and what it answered, to whom (where ``recovery``,
    holding its share of the key a DKG made)."""

    def __init__(
        self, where: Path, me: int, secrets: list[bytes] = SECRETS, recovery: bytes = b""
    ) -> None:
        self.answers: list[tuple[int, proto.Message]] = []
        folder = where / f"m{me}"
        folder.mkdir()
        members = Membership("guild", [hostpubkey_gen(s) for s in secrets])
        keystore = KeyStore(folder, b"k" * 32)
        if recovery:
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
