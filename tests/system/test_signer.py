"""The signer service over real NATS with real signer processes.

Robustness: for 2-of-3, 3-of-5 and 5-of-7, up to n - t signers are frozen (SIGSTOP),
slow, or send invalid partial signatures, chosen at random per run (the seed is in
every assertion message); ROAST finishes and coincurve verifies the signature.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path

import msgspec
import nats
import pytest
from coincurve import PublicKeyXOnly
from nats.aio.msg import Msg

from constellation.bitcoin import SpendInput, SpendOutput, p2tr_script, taproot_sighash
from constellation.guild import Checkpoint, OnchainSpend, Statement, guild_output, owned_derivation
from constellation.keys import SigningKey
from constellation.protocol import lightclient as lc
from constellation.protocol import signer as proto
from constellation.protocol.envelope import seal
from services.runtime import now_ms
from services.signer.store import AuditEntry, AuditLog
from services.signer.transport import (
    ClientTransport,
    Role,
    Transport,
    listen_subject,
    peer_subject,
    subject,
)
from tests.system.conftest import GuildFactory
from tests.system.guild import Guild

FAULTS = ("silent", "slow:300", "bad_psig")


def assert_valid(reply: proto.OpReply, expect_msg: bytes, context: str) -> None:
    assert reply.ok, f"{context}: [{reply.code}] {reply.error}"
    assert reply.message == expect_msg
    key = PublicKeyXOnly(reply.threshold_pubkey)
    assert key.verify(reply.signature, reply.message), context


@pytest.mark.parametrize(("n", "t"), [(3, 2), (5, 3), (7, 5)])
async def test_roast_finishes_with_up_to_n_minus_t_faulty_signers(
    guild_factory: GuildFactory, n: int, t: int
) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    count = rng.randint(1, n - t)
    faulty = rng.sample(range(n), count)
    kinds = {i: rng.choice(FAULTS) for i in faulty}
    context = f"seed {seed}: {t}-of-{n}, faults {kinds}"
    guild: Guild = guild_factory(n, {i: k for i, k in kinds.items() if k != "silent"})
    keygen = await guild.keygen(t)
    assert keygen.ok, f"{context}: {keygen.error}"
    for i, kind in kinds.items():
        if kind == "silent":
            guild.freeze(i)
    honest = [i for i in range(n) if i not in kinds]
    for r in range(3):
        text = f"round {r} of {context}"
        reply = await guild.sign(Statement(text), operator=rng.choice(honest))
        assert_valid(reply, text.encode(), context)
        assert reply.threshold_pubkey == keygen.threshold_pubkey[1:], context
        assert reply.sessions <= n - t + 1, context
        assert set(reply.blamed) <= {i for i, k in kinds.items() if k == "bad_psig"}, context


async def test_killing_a_signer_mid_session_does_not_stop_signing(
    guild_factory: GuildFactory,
) -> None:
    guild = guild_factory(5)
    assert (await guild.keygen(3)).ok
    texts = [f"payment batch {i}" for i in range(12)]
    pending = [asyncio.ensure_future(guild.sign(Statement(s))) for s in texts]
    await asyncio.sleep(0.03)
    guild.kill(2)  # while its sessions are open: ROAST moves on without it
    replies = await asyncio.gather(*pending)
    for text, reply in zip(texts, replies, strict=True):
        assert_valid(reply, text.encode(), "after kill -9 of signer 2")
    guild.kill(4)  # n - t = 2 gone now: still enough
    assert_valid(await guild.sign(Statement("two down"), operator=3), b"two down", "3 left")
    guild.start(2)  # back from its sealed share and audit log
    assert_valid(await guild.sign(Statement("back"), operator=2), b"back", "restarted")
    # its sealed share lost: restored at start from the DKG's recovery data and its host key
    guild.stop(2)
    state = Path(guild.net.signers[2].state_dir)
    (state / "share.sealed").unlink()
    guild.start(2)
    assert "a lost key share restored" in guild.log(2)
    assert_valid(await guild.sign(Statement("restored"), operator=2), b"restored", "restored")


async def test_too_few_signers_is_a_clear_timeout(guild_factory: GuildFactory) -> None:
    guild = guild_factory(3, timeout_ms=1500)
    assert (await guild.keygen(2)).ok
    guild.freeze(1)
    guild.freeze(2)
    started = time.monotonic()
    reply = await guild.sign(Statement("nobody home"))
    assert not reply.ok and reply.code == "signing.timeout"
    assert "silent [1, 2]" in reply.error and 1.4 < time.monotonic() - started < 10
    assert guild.metric(0, 'signer_signer_failures_total{reason="unresponsive"') >= 1


async def test_signers_never_sign_conflicting_checkpoints_even_after_restart(
    guild_factory: GuildFactory,
) -> None:
    guild = guild_factory(3)
    assert (await guild.keygen(2)).ok
    first = Checkpoint("test", 0, bytes(32), 0, b"a" * 32, bytes(32))
    assert_valid(await guild.sign(first), first.message(), "checkpoint 0")
    assert_valid(await guild.sign(first, operator=1), first.message(), "retry of checkpoint 0")
    fork = Checkpoint("test", 0, bytes(32), 0, b"b" * 32, bytes(32))
    refused = await guild.sign(fork)
    assert not refused.ok and refused.code == "signing.refused"
    assert "signing.checkpoint_bound" in refused.error
    for i in range(3):  # policy is rebuilt from the audit log
        guild.stop(i)
        guild.start(i)
    again = await guild.sign(fork, operator=2)
    assert not again.ok and "signing.checkpoint_bound" in again.error
    assert guild.metric(0, "signer_checkpoint_epochs_moved_total") == 0
    nxt = Checkpoint("test", 1, first.message(), 0, b"c" * 32, bytes(32))
    assert_valid(await guild.sign(nxt), nxt.message(), "checkpoint 1")
    wrong_guild = await guild.sign(Checkpoint("other", 5, b"x" * 32, 0, b"c" * 32, bytes(32)))
    assert not wrong_guild.ok and "not ours" in wrong_guild.error
    statement = await guild.sign(Statement("x" * 32))
    assert not statement.ok and "digest" in statement.error


async def test_shares_split_at_one_height_go_on_in_the_next_epoch(
    guild_factory: GuildFactory,
) -> None:
    """Each signer holds a share of a different checkpoint at height 0 (proposers took
    over from each other and each session failed after one share), so none of them can
    reach 2. One of them is signed in epoch 1, once the signers' standings show that
    epoch 0 ended; no other checkpoint is signed at that height afterwards, after
    restarts too (the audit log keeps the epochs)."""
    guild = guild_factory(3)
    assert (await guild.keygen(2)).ok
    split = [Checkpoint("test", 0, bytes(32), 0, bytes([i]) * 32, bytes(32)) for i in range(4)]
    for i in range(3):
        guild.stop(i)
        audit = AuditLog(Path(guild.net.signers[i].state_dir) / "audit.log")
        audit.append(
            AuditEntry(
                audit.count,
                0,
                os.urandom(16).hex(),
                i,
                "checkpoint",
                proto.encode_target(split[i]).hex(),
                split[i].message().hex(),
                0,
                [0, 1],
                bytes(32).hex(),
            )
        )
        audit.close()
        guild.start(i)
    assert_valid(await guild.sign(split[1]), split[1].message(), "in epoch 1")
    assert guild.metric(0, "signer_checkpoint_epochs_moved_total") == 1
    assert "a checkpoint asked again in a later epoch" in guild.log(0)
    for restarted in (False, True):
        for i in range(3):
            if restarted:
                guild.stop(i)
                guild.start(i)
        for i, other in enumerate((split[0], split[2], split[3])):
            refused = await guild.sign(other, operator=i)
            assert not refused.ok and "signing.checkpoint_bound" in refused.error, refused.error
        assert_valid(await guild.sign(split[1], operator=2), split[1].message(), "again")


async def test_keygen_refuses_to_replace_a_share(guild_factory: GuildFactory) -> None:
    guild = guild_factory(3)
    before = await guild.keygen(2)
    assert before.ok and len(before.threshold_pubkey) == 33
    again = await guild.keygen(3, operator=1)
    assert not again.ok and "agreed to no new key" in again.error
    bad_t = await guild.keygen(4)
    assert not bad_t.ok and bad_t.code.startswith("dkg.")


async def test_a_new_key_among_the_members_that_stay_signs_beside_the_old_one(
    guild_factory: GuildFactory,
) -> None:
    """Member 3 leaves: members 0-2 make a new key (each agreed to it), both keys sign
    until the new one is activated, then the old one signs nothing more at them."""
    guild = guild_factory(4)
    old = (await guild.keygen(3)).threshold_pubkey
    stay = [0, 1, 2]
    unasked = await guild.request(proto.KeygenRequest(2, stay), operator=1)
    assert not unasked.ok and "agreed to no new key" in unasked.error
    leaver = await guild.request(proto.AgreeKey(stay, 2), operator=3)
    assert not leaver.ok and "not among" in leaver.error
    for i in stay[:2]:
        assert (await guild.request(proto.AgreeKey(stay, 2), operator=i)).ok
    not_all = await guild.request(proto.KeygenRequest(2, stay), operator=1)
    assert not not_all.ok and "agreed to no new key" in not_all.error  # member 2 did not
    other_t = await guild.request(proto.AgreeKey(stay, 3), operator=2)
    assert other_t.agreed == proto.KeyInfo(b"", stay, 3)
    assert not (await guild.request(proto.KeygenRequest(2, stay), operator=1)).ok
    assert (await guild.request(proto.AgreeKey(stay, 2), operator=2)).ok
    made = await guild.request(proto.KeygenRequest(2, stay), operator=1)
    assert made.ok and made.threshold == 2, made.error
    new = made.threshold_pubkey
    assert new != old and len(new) == 33
    held = await guild.request(proto.KeyRequest(), operator=0)
    assert held.threshold_pubkey == old and held.agreed is None
    assert held.keys == [proto.KeyInfo(old, [0, 1, 2, 3], 3), proto.KeyInfo(new, stay, 2)]
    leaver_keys = (await guild.request(proto.KeyRequest(), operator=3)).keys
    assert [k.key for k in leaver_keys] == [old]
    again = await guild.request(proto.KeygenRequest(2, stay), operator=0)
    assert not again.ok and "agreed to no new key" in again.error  # the agreement is used

    guild.stop(2)  # 2 of the new key's 3 sign with it; the old key's 3 of 4 remain too
    by_new = await guild.sign(Statement("with the new key"), operator=0, key=new)
    assert_valid(by_new, b"with the new key", "new key")
    assert by_new.threshold_pubkey == new[1:]
    by_old = await guild.sign(Statement("with the old key"), operator=3)
    assert_valid(by_old, b"with the old key", "old key")
    assert by_old.threshold_pubkey == old[1:]
    refused = await guild.sign(Statement("x"), operator=3, key=new)
    assert not refused.ok and "no usable guild key" in refused.error
    guild.start(2)

    for i in stay:
        activated = await guild.request(proto.ActivateKey(new), operator=i)
        assert [k.key for k in activated.keys] == [new]
    assert_valid(await guild.sign(Statement("active"), operator=1), b"active", "activated")
    retired = await guild.sign(Statement("x"), operator=0, key=old)
    assert not retired.ok and "no usable guild key" in retired.error
    by_leaver = await guild.sign(Statement("the leaver asks"), operator=3)
    assert not by_leaver.ok and by_leaver.code == "signing.refused", by_leaver.error
    guild.stop(1)
    guild.start(1)  # the active key and the retired one are remembered
    assert [k.key for k in (await guild.request(proto.KeyRequest(), operator=1)).keys] == [new]


async def test_ops_endpoints_and_clean_sigterm(guild_factory: GuildFactory) -> None:
    guild = guild_factory(3)
    assert guild.http(0, "/healthz")[0] == 200
    status, body = guild.http(0, "/readyz")
    assert status == 200 and "no key share yet" in body
    assert (await guild.keygen(2)).ok
    assert "holds a key share" in guild.http(1, "/readyz")[1]
    assert_valid(await guild.sign(Statement("metrics")), b"metrics", "sign")
    assert guild.metric(0, "signer_requests_finished_total") == 1
    assert guild.metric(0, "signer_sessions_started_total") >= 1
    assert guild.metric(0, "signer_sign_latency_seconds_count") == 1
    assert sum(guild.metric(i, "signer_partial_signatures_total") for i in range(3)) >= 2
    pid = guild.pid(1)
    os.kill(pid, signal.SIGTERM)
    _, status_code = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status_code) == 0
    assert '"event": "stopped"' in guild.log(1)


async def test_replays_outsiders_forgeries_and_garbage_are_rejected(
    guild_factory: GuildFactory,
) -> None:
    guild = guild_factory(3)
    assert (await guild.keygen(2)).ok
    nc = await nats.connect(guild.net.nats_url)
    captured: list[bytes] = []

    async def capture(msg: Msg) -> None:
        captured.append(msg.data)

    await nc.subscribe(listen_subject(Role.SIGNER, 1), cb=capture)
    await nc.flush()
    assert_valid(await guild.sign(Statement("once")), b"once", "capture")
    assert captured

    def rejected(code: str) -> float:
        return guild.metric(1, f'signer_rejected_messages_total{{code="{code}"}}')

    await nc.publish(peer_subject("m0", Role.SIGNER, 1), captured[0])  # a replay
    outsider = Transport(nc, guild.members, b"\x07" * 32)
    start = proto.SignStart(os.urandom(16), Statement("from outside"))
    await nc.publish(
        peer_subject("m0", Role.SIGNER, 1), outsider.seal(guild.members.hostpubkeys[1], start)
    )
    await nc.publish(peer_subject("m0", Role.SIGNER, 1), b"\x93garbage")
    await nc.publish(peer_subject("m0", Role.SIGNER, 1), b"\x00" * (proto.MAX_MESSAGE_BYTES + 1))
    # Member 2 tries to command member 1's signer (only operator 1's client keys may).
    member2 = Transport(nc, guild.members, guild.identity(2))
    with pytest.raises(nats.errors.TimeoutError):
        await nc.request(
            subject("test", Role.OP, 1),
            member2.seal(guild.members.hostpubkeys[1], proto.KeygenRequest(2)),
            timeout=1,
        )
    # Nor does operator 1's own identity: only its client keys ask (the identity key
    # stays with the signer), and operator 2's client key is not one of them.
    own = Transport(nc, guild.members, guild.identity(1))
    key2 = bytes.fromhex(guild.net.signers[2].client_key)
    foreign = ClientTransport(guild.members, guild.members.hostpubkeys[1], key2)
    for request in (
        own.seal(guild.members.hostpubkeys[1], proto.KeygenRequest(2)),
        foreign.seal(proto.KeygenRequest(2)),
    ):
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request(subject("test", Role.OP, 1), request, timeout=1)
    await nc.close()
    assert rejected("protocol.replay") == 1
    # the outsider, and the three foreign commands
    assert rejected("protocol.not_member") == 4
    assert rejected("protocol.bad_signature") == 1
    assert rejected("protocol.malformed") == 1
    assert_valid(await guild.sign(Statement("still fine"), 1), b"still fine", "after attacks")


async def test_a_member_flooding_a_signer_fills_only_its_own_replay_memory(
    guild_factory: GuildFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Member 2 sends member 1 more fresh, validly signed messages than a member's ids
    are remembered: the rest of its are refused as overloaded, and member 1 still
    hears member 0 (one memory for all had member 1 refuse everyone's)."""
    monkeypatch.setenv("SIGNER_REPLAY_PER_SENDER", "40")
    guild = guild_factory(3)
    assert (await guild.keygen(2)).ok
    nc = await nats.connect(guild.net.nats_url)
    members, key = guild.members, SigningKey(guild.identity(2))
    for _ in range(60):
        data = seal(
            members.guild, key, members.hostpubkeys[2], members.hostpubkeys[1],
            os.urandom(16), now_ms(), b"",
        )  # fmt: skip
        await nc.publish(peer_subject("m2", Role.COORD, 1), data)
    await nc.close()

    def rejected(code: str) -> float:
        return guild.metric(1, f'signer_rejected_messages_total{{code="{code}"}}')

    end = time.monotonic() + 10
    while rejected("overloaded") < 20:  # past its 40 (those, empty, are refused later)
        assert time.monotonic() < end, "the flood was not refused"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.2)
    assert rejected("overloaded") == 20
    # Member 1 coordinates with member 0 (member 2's own messages are refused too now).
    assert_valid(await guild.sign(Statement("after a flood"), 1), b"after a flood", "flood")


async def test_nonces_held_from_before_a_signer_restart_are_refused_then_replaced(
    guild_factory: GuildFactory,
) -> None:
    guild = guild_factory(3)
    assert (await guild.keygen(2)).ok
    assert_valid(
        await guild.sign(Statement("fills the nonce cache")), b"fills the nonce cache", "1"
    )
    for i in (1, 2):  # their pools are gone; coordinator 0 still holds their nonces
        guild.stop(i)
        guild.start(i)
    reply = await guild.sign(Statement("after restarts"))
    assert_valid(reply, b"after restarts", "stale nonces")
    refused = guild.metric(0, 'signer_signer_failures_total{reason="refused"')
    stale = [
        guild.metric(i, 'signer_requests_refused_total{code="signing.unknown_nonce"}')
        for i in (1, 2)
    ]
    assert refused >= 1 and refused == sum(stale), (refused, stale)


async def test_an_onchain_spend_is_signed_under_the_guild_taproot_key(
    guild_factory: GuildFactory,
) -> None:
    guild = guild_factory(3)
    keygen = await guild.keygen(2)
    label = b"\x41" * 32  # an address of operator 2's
    derivation = owned_derivation(guild.members.identities[2], label)
    output_key = guild_output(keygen.threshold_pubkey, derivation).xonly
    spend = OnchainSpend(
        2,
        0,
        [SpendInput(b"\x01" * 32, 0, 0xFFFFFFFD, 100_000, p2tr_script(output_key))],
        [SpendOutput(99_000, b"\x00\x14" + b"\x05" * 20)],
        0,
        label,
    )
    reply = await guild.sign(spend, operator=2)
    assert_valid(reply, taproot_sighash(2, 0, spend.inputs, spend.outputs, 0), "spend")
    assert reply.threshold_pubkey == output_key  # what a P2TR key-path witness verifies under
    # operator 0 asking for a spend of operator 2's coin: every signer refuses
    refused = await guild.sign(spend, operator=0)
    assert not refused.ok and "not a guild output the requester holds" in refused.error


async def test_a_checkpoint_is_signed_only_where_each_signers_ledger_vouches_for_it(
    guild_factory: GuildFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every signer asks its operator's ledger (here, one responder on SIGNER_VOUCH_SUBJECT)
    about a checkpoint, with the evidence its proposer sent; a refusal or silence is a
    refusal to sign, with the ledger's reason."""
    monkeypatch.setenv("SIGNER_VOUCH_SUBJECT", "test.vouch")
    guild = guild_factory(3)
    assert (await guild.keygen(2)).ok
    asked: list[tuple[Checkpoint, bytes]] = []

    async def ledger(msg: Msg) -> None:
        vouch = msgspec.msgpack.decode(msg.data, type=lc.Vouch)
        asked.append((vouch.checkpoint, vouch.evidence))
        if vouch.evidence != b"silent":
            answer = "" if vouch.evidence == b"entries" else "shard 0/1 at 7 differs here"
            await msg.respond(msgspec.msgpack.encode(answer))

    nc = await nats.connect(guild.net.nats_url)
    try:
        await nc.subscribe("test.vouch", cb=ledger)
        await nc.flush()

        async def sign(target: Checkpoint, evidence: bytes) -> proto.OpReply:
            async with guild.client() as client:
                return await client.request(proto.SignRequest(target, evidence), 60)

        first = Checkpoint("test", 0, bytes(32), 0, b"a" * 32, bytes(32))
        assert_valid(await sign(first, b"entries"), first.message(), "vouched for")
        assert {(c, e) for c, e in asked} == {(first, b"entries")} and len(asked) >= 2
        other = Checkpoint("test", 1, first.message(), 0, b"b" * 32, bytes(32))
        refused = await sign(other, b"forged")
        assert not refused.ok and "does not vouch: shard 0/1 at 7 differs here" in refused.error
        silent = await sign(other, b"silent")
        assert not silent.ok and "ledger did not answer" in silent.error
        # Nonces held from earlier requests start a session at once: it waits for the
        # ledger's answer rather than being refused as unknown.
        assert_valid(await sign(other, b"entries"), other.message(), "vouched, nonces held")
        # A statement is not a checkpoint: no ledger is asked.
        before = len(asked)
        assert (await guild.sign(Statement("not about the ledger"))).ok
        assert len(asked) == before
    finally:
        await nc.close()
