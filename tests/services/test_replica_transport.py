"""Replication messages between operators: what ``Opener`` takes and what it refuses,
relayed messages' envelopes and encoding, and the guild layout every machine reads."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import msgspec
import pytest
from nats.aio.client import Client

from constellation.errors import (
    BadMessageSignature,
    InFlight,
    MessageError,
    Misdirected,
    NotAMember,
    Overloaded,
    Replayed,
    StaleMessage,
)
from constellation.keys import SigningKey
from constellation.protocol import ledger as proto
from constellation.protocol import replication as rp
from constellation.protocol.envelope import seal
from services.gateway.config import Settings as GatewaySettings
from services.replica import relay
from services.replica.config import Layout
from services.replica.host import HostedCopy
from services.replica.transport import (
    ALL,
    FRESH_MS,
    SETTLE_DOMAIN,
    Opener,
    Sealer,
    SettleLink,
    copy_target,
    forward_listen,
    forward_subject,
    listen_subject,
    peer_permissions,
    settle_subject,
    subject,
)
from services.runtime import ConfigError

KEYS = [SigningKey(hashlib.sha256(b"operator %d" % i).digest()) for i in range(4)]
NAMES = ["op0", "op1", "op2", "op3"]
PUBS = [k.pubkey for k in KEYS]
NOW = 1_800_000_000_000
HEARTBEAT = rp.Append(3, 0, bytes(32), [], 0, [])


def sealed(sender: int, to: int, envelope: rp.Envelope, now: int = NOW) -> bytes:
    return Sealer("g", KEYS[sender], PUBS).seal(to, envelope, now)


def opener(me: int = 0) -> Opener:
    return Opener("g", NAMES, PUBS, me)


def test_a_sealed_message_opens_at_its_receiver() -> None:
    env = rp.Envelope(0, 1, 2, HEARTBEAT)  # copy 2 (op1) to a copy of op0, shard op0/1
    assert opener().open(subject("op1", 0, 1, 0), sealed(1, 0, env), NOW) == env


@pytest.mark.parametrize(
    ("subj", "data", "error"),
    [
        # signed by op1 but published as op2 (a peer's credentials allow only its name)
        (subject("op2", 0, 1, 0), sealed(1, 0, rp.Envelope(0, 1, 2, HEARTBEAT)), Misdirected),
        # addressed to op2
        (subject("op1", 0, 1, 0), sealed(1, 2, rp.Envelope(0, 1, 2, HEARTBEAT)), Misdirected),
        # the inner sender is a copy of op2, sealed by op1
        (subject("op1", 0, 1, 0), sealed(1, 0, rp.Envelope(0, 1, 4, HEARTBEAT)), Misdirected),
        # the inner shard is not the subject's
        (subject("op1", 0, 0, 0), sealed(1, 0, rp.Envelope(0, 1, 2, HEARTBEAT)), Misdirected),
        # stale, and from the future
        (
            subject("op1", 0, 1, 0),
            sealed(1, 0, rp.Envelope(0, 1, 2, HEARTBEAT), NOW - FRESH_MS - 1),
            StaleMessage,
        ),
        (
            subject("op1", 0, 1, 0),
            sealed(1, 0, rp.Envelope(0, 1, 2, HEARTBEAT), NOW + FRESH_MS + 1),
            StaleMessage,
        ),
        (subject("op1", 0, 1, 0), b"\x93junk", BadMessageSignature),
        ("cst.rep.op1.0.1", b"", Misdirected),
    ],
)
def test_what_opener_refuses(subj: str, data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        opener().open(subj, data, NOW)


def test_an_outsider_is_refused() -> None:
    outsider = SigningKey(hashlib.sha256(b"outsider").digest())
    data = Sealer("g", outsider, PUBS).seal(0, rp.Envelope(0, 1, 2, HEARTBEAT), NOW)
    with pytest.raises(NotAMember):
        opener().open(subject("op1", 0, 1, 0), data, NOW)


def test_a_forged_signature_is_refused() -> None:
    data = bytearray(sealed(1, 0, rp.Envelope(0, 1, 2, HEARTBEAT)))
    data[-1] ^= 1  # the signature is last
    with pytest.raises(BadMessageSignature):
        opener().open(subject("op1", 0, 1, 0), bytes(data), NOW)


def test_a_replayed_message_is_refused() -> None:
    o = opener()
    data = sealed(1, 0, rp.Envelope(0, 1, 2, HEARTBEAT))
    o.open(subject("op1", 0, 1, 0), data, NOW)
    with pytest.raises(Replayed):
        o.open(subject("op1", 0, 1, 0), data, NOW + 1)


def test_a_malformed_replication_message_inside_a_good_envelope_is_refused() -> None:
    bad = rp.Envelope(0, 1, 2, rp.Append(3, 0, bytes(31), [], 0, []))  # a short hash
    with pytest.raises(MessageError):
        opener().open(subject("op1", 0, 1, 0), sealed(1, 0, bad), NOW)


def test_subjects_and_permissions_name_the_sender() -> None:
    assert subject("op1", 0, 1, 4) == "cst.rep.op1.0.1.4"
    assert listen_subject(0, 1, 4) == "cst.rep.*.0.1.4"
    perms = peer_permissions("op1")
    assert perms == {"publish": {"allow": ["cst.rep.op1.>"]}, "subscribe": {"deny": [">"]}}
    assert peer_permissions("far", member=False)["publish"] == {"allow": ["cst.rep.far.set"]}


# -- the layout ---------------------------------------------------------------------------


def layout_doc(operators: int = 3, **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "guild": "g",
        "workers": 3,
        "members": [
            {"name": n, "key": k.hex(), "issuers": [PUBS[0].hex()], "nats": "nats://x:1"}
            for n, k in zip(NAMES[:operators], PUBS[:operators], strict=True)
        ],
    }
    doc.update(changes)
    return doc


def test_the_layout_round_trips() -> None:
    layout = Layout.from_json(layout_doc())
    assert Layout.from_json(layout.to_json()) == layout
    assert layout.index("op2") == 2 and layout.keys == PUBS[:3]


@pytest.mark.parametrize(
    "doc",
    [
        layout_doc(workers=0),
        layout_doc(members=layout_doc()["members"][:1]),
        layout_doc(members=[layout_doc()["members"][0]] * 2),
        layout_doc(members=[{**m, "key": "00" * 32} for m in layout_doc()["members"]]),
        layout_doc(members=[{"name": "op0"}]),
        {"guild": "g"},
    ],
)
def test_a_bad_layout_is_refused(doc: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Layout.from_json(doc)


def test_a_layout_names_each_members_first_machines_and_reads_back() -> None:
    doc = layout_doc(3)
    doc["members"][0]["machines"] = 5  # op0 starts with more machines than the others
    layout = Layout.from_json(doc)
    assert Layout.from_json(layout.to_json()) == layout
    assert [m.machines for m in layout.members] == [5, 2, 2]


@pytest.mark.parametrize("machines", [1, 65])
def test_a_member_runs_two_to_sixty_four_machines(machines: int) -> None:
    doc = layout_doc(3)
    doc["members"][1]["machines"] = machines
    with pytest.raises(ConfigError, match="machines"):
        Layout.from_json(doc)


def test_between_one_operator_s_machines_messages_go_plain() -> None:
    """Over the operator's own server, under its own name (no peer may publish as it):
    no signature to make or check; the same plain bytes claimed by a peer are refused."""
    env = rp.Envelope(0, 1, 1, HEARTBEAT)  # op0's copy 1 to its copy 0
    plain = sealed(0, 0, env)
    assert plain == rp.encode(env)
    assert opener().open(subject("op0", 0, 1, 0), plain, NOW) == env
    with pytest.raises(BadMessageSignature):
        opener().open(subject("op1", 0, 1, 0), plain, NOW)
    with pytest.raises(Misdirected):  # a copy of another operator, under our name
        opener().open(subject("op0", 0, 1, 0), rp.encode(rp.Envelope(0, 1, 2, HEARTBEAT)), NOW)


def test_one_seal_for_several_operators_opens_at_each_and_cannot_be_passed_on() -> None:
    env = rp.Envelope(1, 0, 2, HEARTBEAT)  # op1's leader to the copies of op0 and op2
    data = Sealer("g", KEYS[1], PUBS).seal_all(env, NOW)
    assert opener(0).open(subject("op1", 1, 0, 0), data, NOW) == env
    assert opener(2).open(subject("op1", 1, 0, 4), data, NOW) == env
    with pytest.raises(Misdirected):  # op0 passing it on to op2, under its own name
        opener(2).open(subject("op0", 1, 0, 4), data, NOW)


def test_a_member_flooding_fresh_messages_fills_only_its_own_replay_guard(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("services.replica.transport.PER_SENDER", 3)
    o = opener()
    flood = rp.Envelope(0, 1, 2, HEARTBEAT)
    for _ in range(3):
        o.open(subject("op1", 0, 1, 0), sealed(1, 0, flood), NOW)
    with pytest.raises(Overloaded):
        o.open(subject("op1", 0, 1, 0), sealed(1, 0, flood), NOW)
    other = rp.Envelope(0, 1, 4, HEARTBEAT)
    assert o.open(subject("op2", 0, 1, 0), sealed(2, 0, other), NOW) == other


def test_a_relayed_message_opens_at_its_receiver_and_what_is_refused() -> None:
    body = relay.encode(relay.Query(0, 1, 1, "coins", b"\x80", "_INBOX.a.b"))
    data = Sealer("g", KEYS[1], PUBS).seal_body(0, body, NOW)
    assert forward_subject("op1", "1") == "cst.rep.op1.fwd.1"
    assert forward_listen(ALL) == "cst.rep.*.fwd.all"
    to_copy = forward_subject("op1", copy_target(0, 1, 0))
    assert to_copy == "cst.rep.op1.fwd.0.1.0"
    assert opener().open_forward(to_copy, data, NOW) == (1, body)
    assert opener().open_forward(forward_subject("op1", "1"), data, NOW) == (1, body)
    with pytest.raises(Replayed):
        opener_ = opener()
        opener_.open_forward(forward_subject("op1", "1"), data, NOW)
        opener_.open_forward(forward_subject("op1", "1"), data, NOW)
    with pytest.raises(Misdirected):  # signed by op1, published as op2
        opener().open_forward(forward_subject("op2", "1"), data, NOW)
    with pytest.raises(Misdirected):  # addressed to op0, opened by op2
        opener(2).open_forward(forward_subject("op1", "1"), data, NOW)
    with pytest.raises(Misdirected):  # machines never relay to their own operator
        opener(1).open_forward(forward_subject("op1", "1"), data, NOW)
    with pytest.raises(Misdirected):
        opener().open_forward("cst.rep.op1.fwd", data, NOW)
    with pytest.raises(NotAMember):
        sealed_by_outsider = Sealer("g", KEYS[3], [*PUBS[:3], KEYS[3].pubkey]).seal_body(
            0, body, NOW
        )
        Opener("g", NAMES[:3], PUBS[:3], 0).open_forward(
            forward_subject("op1", "1"), sealed_by_outsider, NOW
        )


@pytest.mark.parametrize(
    "msg",
    [
        relay.Relayed(0, 1, 1, b"\x01\x02"),
        relay.Query(2, 0, 0, "state", b"", "_INBOX.x"),
        relay.Answer("cst.op0.gw.abc", b"\x00"),
    ],
)
def test_relayed_messages_round_trip(msg: relay.Forward) -> None:
    assert relay.decode(relay.encode(msg)) == msg


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x93junk",
        msgspec.msgpack.encode(["z", 1, 2]),  # an unknown kind
        msgspec.msgpack.encode(["a", "cst.x", b"", "more"]),  # an unknown field
        msgspec.msgpack.encode(["p", "zero", 1, 1, b""]),  # a wrong type
    ],
)
def test_a_malformed_relayed_message_is_refused(body: bytes) -> None:
    with pytest.raises(MessageError):
        relay.decode(body)


def test_a_guild_member_s_gateway_serves_every_member_s_ledger(tmp_path: Path) -> None:
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(layout_doc()))
    env = {"GATEWAY_OPERATOR": "op1", "GATEWAY_DATABASE_URL": "postgresql://x/y"}
    assert GatewaySettings.from_env(env).ledgers == ["op1"]  # alone: its own
    in_guild = GatewaySettings.from_env({**env, "GATEWAY_LAYOUT": str(path)})
    assert in_guild.ledgers == ["op1", "op0", "op2"]  # its own first
    assert in_guild.layout is not None and in_guild.layout.pmap.workers == [0, 1, 2]
    with pytest.raises(ConfigError, match="not a member"):
        GatewaySettings.from_env({**env, "GATEWAY_OPERATOR": "op9", "GATEWAY_LAYOUT": str(path)})


class Recorder:
    """Stands in for the NATS client: keeps what is published."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, data: bytes) -> None:
        self.sent.append((subject, data))


def a_relay() -> tuple[relay.Relay, Recorder, list[tuple[int, str, relay.Forward]]]:
    nc = Recorder()
    sent: list[tuple[int, str, relay.Forward]] = []
    r = relay.Relay(
        Layout.from_json(layout_doc()),
        0,
        0,
        cast(Client, nc),
        lambda op, to, body: sent.append((op, to, relay.decode(body))),
    )
    return r, nc, sent


def results(*items: proto.Result) -> bytes:
    return proto.encode(proto.Package(proto.PROTOCOL_VERSION, 0, "cst.op0.w.0", 1, list(items)))


async def test_only_answers_to_requests_relayed_here_are_published() -> None:
    r, nc, _ = a_relay()
    inbox, gw = "_INBOX.abc.def", "cst.op0.gw.xyz"
    r.expected.add((inbox, 1, 0), 0.0)  # a query relayed to op1
    r.expected.add((gw, 1, 7), 0.0)  # request 7 of a gateway relayed to op1
    await r.receive(1, relay.encode(relay.Answer(inbox, b"answer")))
    assert nc.sent == [(inbox, b"answer")]
    with pytest.raises(relay.Unasked):  # answered once: not again
        await r.receive(1, relay.encode(relay.Answer(inbox, b"again")))
    with pytest.raises(relay.Unasked):  # op2 was not asked
        await r.receive(2, relay.encode(relay.Answer(gw, results(proto.Result(7, "", "", [])))))
    with pytest.raises(relay.Unasked):  # op1 was asked, but not for request 8
        await r.receive(1, relay.encode(relay.Answer(gw, results(proto.Result(8, "", "", [])))))
    in_flight = proto.Result(7, InFlight.code, "being committed", [])
    await r.receive(1, relay.encode(relay.Answer(gw, results(in_flight))))
    done, forged = proto.Result(7, "", "", [(0, 3)]), proto.Result(9, "", "", [])
    await r.receive(1, relay.encode(relay.Answer(gw, results(done, forged))))
    published = [proto.decode_package(d).items for s, d in nc.sent[1:]]
    assert published == [[in_flight], [done]]  # the forged result left out
    with pytest.raises(relay.Unasked):  # answered: request 7 is over
        await r.receive(1, relay.encode(relay.Answer(gw, results(done))))


async def test_answers_go_back_to_every_machine_of_the_asking_operator() -> None:
    r, nc, sent = a_relay()
    await r.publish("cst.relay.2.cst.op0.gw.xyz", b"results")
    assert sent == [(2, ALL, relay.Answer("cst.op0.gw.xyz", b"results"))]
    await r.publish("cst.relay.x.cst.op0.gw.xyz", b"results")  # not ours: dropped
    await r.publish("cst.relay.9.cst.op0.gw.xyz", b"results")
    assert len(sent) == 1 and nc.sent == []
    await r.publish("cst.op0.gw.xyz", b"local")  # anything else: on our own NATS
    assert nc.sent == [("cst.op0.gw.xyz", b"local")]


def test_expected_answers_are_forgotten_after_a_while_or_beyond_a_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected = relay._Expected()
    expected.add(("a", 1, 1), 0.0)
    expected.add(("b", 1, 1), relay.EXPECT_S + 1)  # the first is too old now
    assert ("a", 1, 1) not in expected and ("b", 1, 1) in expected
    monkeypatch.setattr(relay, "EXPECTED", 2)
    for rid in range(2, 5):
        expected.add(("b", 1, rid), relay.EXPECT_S + 1)
    assert ("b", 1, 1) not in expected and ("b", 1, 4) in expected


def test_no_member_may_take_the_relay_s_name() -> None:
    doc = layout_doc()
    doc["members"][1]["name"] = "relay"
    with pytest.raises(ConfigError, match="relay"):
        Layout.from_json(doc)


# -- settlement messages, with members and with operators of other guilds ----------------

NEIGHBOUR = SigningKey(hashlib.sha256(b"an operator of another guild").digest())


def link(key: SigningKey, peers: dict[str, SigningKey]) -> SettleLink:
    return SettleLink(key, [(name, k.pubkey) for name, k in peers.items()])


def test_settlement_messages_open_from_members_and_neighbours_alike() -> None:
    """op0 settles with op1 (a member) and with ``far`` (of another guild, which calls op0
    ``g-op0``): each side knows the other by its own name for it."""
    op0 = link(KEYS[0], {"op1": KEYS[1], "far": NEIGHBOUR})
    op1 = link(KEYS[1], {"op0": KEYS[0]})
    far = link(NEIGHBOUR, {"g-op0": KEYS[0]})
    assert op0.open(settle_subject("op1"), op1.seal("op0", b"from op1", NOW), NOW) == (
        "op1",
        b"from op1",
    )
    assert op0.open(settle_subject("far"), far.seal("g-op0", b"far", NOW), NOW) == ("far", b"far")
    assert far.open(settle_subject("g-op0"), op0.seal("far", b"back", NOW), NOW) == (
        "g-op0",
        b"back",
    )


def test_what_a_settlement_link_refuses() -> None:
    op0 = link(KEYS[0], {"op1": KEYS[1], "far": NEIGHBOUR})
    far = link(NEIGHBOUR, {"g-op0": KEYS[0], "op1": KEYS[1]})
    from_far = far.seal("g-op0", b"x", NOW)
    with pytest.raises(Misdirected):  # the neighbour's signature, published as a member
        op0.open(settle_subject("op1"), from_far, NOW)
    with pytest.raises(Misdirected):  # addressed to another
        op0.open(settle_subject("far"), far.seal("op1", b"x", NOW), NOW)
    with pytest.raises(NotAMember):  # an operator op0 does not settle with
        op0.open(settle_subject("op2"), link(KEYS[2], {"op0": KEYS[0]}).seal("op0", b"", NOW), NOW)
    mine = b"\x02" + KEYS[0].pubkey
    with pytest.raises(Misdirected):  # its own key, from outside
        op0.open(
            settle_subject("op1"),
            seal(SETTLE_DOMAIN, KEYS[0], mine, mine, bytes(16), NOW, b""),
            NOW,
        )
    with pytest.raises(Misdirected):
        op0.open("cst.rep.far.fwd", from_far, NOW)
    with pytest.raises(StaleMessage):
        op0.open(settle_subject("far"), far.seal("g-op0", b"x", NOW - FRESH_MS - 1), NOW)
    # a replication envelope of the guild is not a settlement message (its domain differs)
    with pytest.raises(Misdirected):
        op0.open(settle_subject("op1"), Sealer("g", KEYS[1], PUBS).seal_body(0, b"x", NOW), NOW)
    op0.open(settle_subject("far"), from_far, NOW)
    with pytest.raises(Replayed):
        op0.open(settle_subject("far"), from_far, NOW + 1)


def neighbour(name: str = "far", key: SigningKey = NEIGHBOUR, **changes: Any) -> dict[str, Any]:
    return {"name": name, "guild": "h", "key": key.pubkey.hex(), "nats": "nats://y:1", **changes}


def test_a_layout_names_its_neighbours() -> None:
    layout = Layout.from_json(layout_doc(neighbours=[neighbour()]))
    assert Layout.from_json(layout.to_json()) == layout
    assert [(n.name, n.guild, n.key) for n in layout.neighbours] == [("far", "h", NEIGHBOUR.pubkey)]
    assert Layout.from_json(layout_doc()).neighbours == ()  # a layout without any


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (neighbour(name="op1"), "shares a name or a key"),
        (neighbour(key=KEYS[2]), "shares a name or a key"),
        (neighbour(guild="g"), "of this guild"),
        (neighbour(name="relay"), "reserved"),
        (neighbour(name="Far.x"), "reserved, or not"),
        ({**neighbour(), "key": "00" * 32}, "BIP340"),
        ({"name": "far"}, "malformed"),
    ],
)
def test_a_bad_neighbour_is_refused(bad: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        Layout.from_json(layout_doc(neighbours=[bad]))


def test_a_settling_gateway_needs_credentials_for_every_peer_and_knows_their_ledgers(
    tmp_path: Path,
) -> None:
    layout, peers = tmp_path / "layout.json", tmp_path / "peers.json"
    layout.write_text(json.dumps(layout_doc(neighbours=[neighbour()])))
    env = {
        "GATEWAY_OPERATOR": "op1",
        "GATEWAY_DATABASE_URL": "postgresql://x/y",
        "GATEWAY_LAYOUT": str(layout),
        "GATEWAY_OPERATOR_KEY": KEYS[1].secret.hex(),
        "GATEWAY_ISSUER_KEY": KEYS[3].secret.hex(),
        "GATEWAY_PEERS": str(peers),
        "GATEWAY_LIGHTNING_RPC": str(tmp_path / "lightning-rpc"),
    }
    members = {"op0": "nats://op1:pw@x:1", "op2": "nats://op1:pw@x:2"}
    peers.write_text(json.dumps(members))
    with pytest.raises(ConfigError, match="no credentials for far"):
        GatewaySettings.from_env(env)
    peers.write_text(json.dumps({**members, "far": "nats://g-op1:pw@y:1"}))
    s = GatewaySettings.from_env(env)
    assert s.settle is not None
    assert [name for name, _ in s.settle.counterparts] == ["op0", "op2", "far"]
    assert s.settle.publish_as("far") == "g-op1" and s.settle.publish_as("op0") == "op1"
    assert list(s.neighbour_ids) == ["far"] and "far" not in s.ledgers  # settled, not served


class _Copy:
    """Stands in for a ``HostedCopy`` as the relay sees it: its shard, what its replica
    knows of the leader, and the packages it takes."""

    def __init__(self, owner: int, worker: int, term: int, leader: int) -> None:
        self.owner, self.worker, self.closed = owner, worker, False
        self.replica = SimpleNamespace(term=term, leader=leader)
        self.taken: list[proto.Package] = []

    def take(self, pkg: proto.Package) -> None:
        self.taken.append(pkg)


def leaders(machine: int, *shards: tuple[int, int, int, int]) -> bytes:
    return msgspec.msgpack.encode(relay.Leaders(machine, list(shards)))


async def test_a_machine_with_no_copy_of_the_sending_shard_hears_who_leads_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """op2 is down: its shard 1 is led here (op0's copy 0), its shard 0 at op1 (copy 2).
    With three machines, this one holds no copy of shard 0: who leads it, the machines
    of op0 that do hold one tell."""
    r, _, _ = a_relay()
    target = _Copy(2, 1, 5, 0)
    r.add(cast(HostedCopy, target))
    ask = proto.Package(proto.PROTOCOL_VERSION, 0, "cst.op2.w.0", 1, [proto.Ask(b"t" * 32, 1)])
    relayed = relay.encode(relay.Relayed(2, 1, 0, proto.encode(ask)))
    with pytest.raises(Misdirected, match="nor word"):
        await r.receive(1, relayed)
    now = time.monotonic()
    r.hear(leaders(1, (2, 0, 5, 2)), now)
    await r.receive(1, relayed)
    assert target.taken == [ask]
    with pytest.raises(Misdirected, match="does not lead"):  # op2 does not lead it
        await r.receive(2, relayed)
    r.hear(leaders(2, (2, 0, 6, 4)), now)  # a later term: op2 leads it again
    r.hear(leaders(1, (2, 0, 5, 2)), now)  # what an earlier term said changes nothing
    r.hear(leaders(1, (2, 0, 6, -1)), now)  # nor a copy that knows no leader in that term
    with pytest.raises(Misdirected, match="does not lead"):
        await r.receive(1, relayed)
    await r.receive(2, relayed)
    assert len(target.taken) == 2
    monkeypatch.setattr(relay, "HEARD_S", 0.0)  # what was heard grows old
    with pytest.raises(Misdirected, match="nor word"):
        await r.receive(2, relayed)


def test_what_a_machine_tells_and_what_is_refused_of_what_it_hears() -> None:
    r, _, _ = a_relay()
    copy = _Copy(2, 1, 5, 0)
    r.add(cast(HostedCopy, copy))
    assert r.tell(100.0) == leaders(0, (2, 1, 5, 0))
    assert r.tell(100.0 + relay.TELL_S / 2) is None  # nothing changed
    copy.replica.term, copy.replica.leader = 6, -1
    assert r.tell(100.0 + relay.TELL_S / 2) == leaders(0, (2, 1, 6, -1))  # at once
    assert r.tell(100.0 + relay.TELL_S * 2) == leaders(0, (2, 1, 6, -1))  # and again later
    r.hear(leaders(0, (2, 0, 5, 2)), 0.0)  # its own word: not news
    assert r.heard == {}
    for bad in (
        leaders(1, (2, 0, 5, 2), (3, 0, 5, 2)),  # no operator 3: none of it is taken
        leaders(1, (2, 3, 5, 2)),  # no worker 3
        leaders(1, (2, 0, 5, 6)),  # no copy 6
        leaders(1, (2, 0, -1, 2)),
        b"\xc1",
        msgspec.msgpack.encode([1, [[2, 0, 5, 2]], "more"]),
    ):
        with pytest.raises(MessageError):
            r.hear(bad, 0.0)
    assert r.heard == {}
