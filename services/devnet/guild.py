"""A local guild: several operators on this machine, each a devnet of its own.

Operator ``opI`` lives in ``DIR/opI``: its own NATS server (users and permissions in
``nats.conf``), Redis, PostgreSQL, gateway and indexer, and two or more machines
(``services.replica``) over which its two copies of every shard of every operator
spread (``constellation.replication.placement``; ``set_machines`` adds and removes
machines, moving the copies live). What
binds them is the guild layout (``layout.json``, the same in every folder: each
member's name, operator key, issuer keys and NATS address) and, per operator, the
credentials each peer issued it (``peers.json``): a peer may publish on another's NATS
only under its own name, and signs every message besides.

Each operator's devnet has its own supervisor; ``up`` starts them all, then waits until
every machine is ready (its copies follow live leaders, which needs a majority of the
operators up). ``down`` stops them all.

With ``neighbours``, a second guild runs beside the first (``<guild>-nb``, operators
``nb0``, ``nb1``, ... in ``DIR/nbI``): each guild's layout names the other's operators
as its neighbours, so every operator settles with every operator of both guilds, and
payments go between the guilds as they go between members.

The operators' Lightning nodes are one simulated network (``python -m services.lnsim``,
in ``DIR/lightning``: a channel between every pair of operators, of both guilds), which
``up`` starts
first and ``down`` stops last; each gateway reaches its node's lightningd socket. A
stopped operator's node goes offline with it. The network is not supervised: it is the
stand-in for the outside world, and a restart would lose its channels.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from nats.errors import Error as NatsError

from constellation.keys import SigningKey
from constellation.membership import KeyPlan, KeysSeen
from constellation.protocol.envelope import Membership
from constellation.protocol.signer import (
    KeygenRequest,
    KeyRequest,
    OpReply,
    OpRequest,
)
from constellation.replication.members import Agreement
from constellation.replication.placement import BATCH, COPIES, MAX_MACHINES, Placement
from services.bus import load_agreement, load_keys_seen, publish_agreement, publish_key_plan
from services.devnet.deps import NATS_START_S, assign_ports, start_deadline_s, stop_all
from services.devnet.procs import alive, free_port, ready, spawn, stop_pid, wait_ready
from services.devnet.state import (
    Devnet,
    DevnetError,
    MachineProc,
    SignerProc,
    write_json_atomic,
)
from services.devnet.supervisor import (
    MACHINES_FILE,
    STATUS_FILE,
    await_supervisor,
    spawn_supervisor,
    stop_supervisor,
    supervisor_alive,
    want_machines,
)
from services.lnsim.sim import socket_path
from services.replica.config import MACHINES, Layout, Member, Neighbour
from services.replica.moves import Stuck, drive
from services.replica.transport import peer_permissions
from services.runtime import connect_nats
from services.signer.client import call
from services.signer.config import load_members, save_members

GUILD_FILE = "guild-devnet.json"
READY_S = 120  # every machine ready, once every operator's processes have started
LIGHTNING_DIR = "lightning"
LIGHTNING_START_S = 30
OUTSIDE = "outside"  # the simulated network's node that belongs to no operator
CHANNEL_SAT = 10_000_000  # each channel between two operators (half on each side)
KEYGEN_S = 60
DROP_S = 10  # a removed machine's released folders are dropped within, or go with it


def _doc(directory: Path) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads((directory / GUILD_FILE).read_text())
    except FileNotFoundError:
        raise DevnetError(f"no local guild in {directory}: `devnet up --operators N`") from None
    return doc


def operator_dirs(directory: Path) -> list[Path]:
    """The folders of the guild's operators, in member order."""
    return [directory / name for name in _doc(directory)["operators"]]


def neighbour_dirs(directory: Path) -> list[Path]:
    """The folders of the neighbouring guild's operators (none without one)."""
    return [directory / name for name in _doc(directory).get("neighbours", [])]


def load(directory: Path) -> list[Devnet]:
    return [Devnet.load(d) for d in operator_dirs(directory)]


def load_neighbours(directory: Path) -> list[Devnet]:
    return [Devnet.load(d) for d in neighbour_dirs(directory)]


def create(
    directory: Path,
    operators: int,
    workers: int,
    guild: str,
    neighbours: int = 0,
    machines: int = MACHINES,
) -> tuple[list[Devnet], list[Devnet]]:
    """The guild's operators, and its neighbouring guild's (``neighbours`` of them)."""
    if operators < 2 or neighbours == 1:
        raise DevnetError("a guild has at least two operators")
    if not MACHINES <= machines <= MAX_MACHINES:
        raise DevnetError(f"an operator runs {MACHINES} to {MAX_MACHINES} machines")
    directory.mkdir(parents=True, exist_ok=True)
    groups = [(guild, [f"op{i}" for i in range(operators)])]
    if neighbours:
        groups.append((f"{guild}-nb", [f"nb{i}" for i in range(neighbours)]))
    everyone = [name for _, names in groups for name in names]
    made: list[list[Devnet]] = []
    for guild_id, names in groups:
        nets, identities = [], []
        for name in names:
            net, identity = _operator(directory, guild_id, name, everyone, workers, machines)
            nets.append(net)
            identities.append(identity)
        for net in nets:  # one signer per operator: the guild's members, in operator order
            save_members(Membership(guild_id, identities), net.members_path)
            net.save()
        made.append(nets)
    doc: dict[str, Any] = {"guild": guild, "operators": groups[0][1]}
    if neighbours:
        doc["neighbours"] = groups[1][1]
    write_json_atomic(directory / GUILD_FILE, doc)
    return made[0], made[1] if neighbours else []


def _operator(
    directory: Path, guild: str, name: str, everyone: list[str], workers: int, machines: int
) -> tuple[Devnet, bytes]:
    """A new operator's folder, keys and the NATS passwords it issues each of
    ``everyone`` else; and its signer's identity (a member of the guild's signers)."""
    folder = (directory / name).resolve()
    folder.mkdir(exist_ok=True)
    net = Devnet(str(folder), guild, free_port(), os.urandom(32).hex(), operator=name)
    net.shards = workers
    net.operator_key = os.urandom(32).hex()
    net.nats_password = os.urandom(16).hex()
    net.issued = {peer: os.urandom(16).hex() for peer in everyone if peer != name}
    net.machines = [
        MachineProc(m, str(folder / f"machine-{m}"), free_port()) for m in range(machines)
    ]
    net.lightning_rpc = str(socket_path((directory / LIGHTNING_DIR).resolve(), name))
    net.mint_storage_key = os.urandom(32).hex()
    net.signers = [SignerProc.create(0, folder / "signer", free_port())]
    return net, bytes.fromhex(net.signers[0].hostpubkey)


def layout(nets: Sequence[Devnet], neighbours: Sequence[Devnet] = (), founders: int = 0) -> Layout:
    """The layout of ``nets``' guild, whose first ``founders`` founded it (0: all)."""
    return Layout(
        nets[0].guild,
        nets[0].shards,
        tuple(
            Member(n.operator, _key(n), frozenset([n.issuer.pubkey]), _nats(n), len(n.machines))
            for n in nets
        ),
        tuple(Neighbour(n.operator, n.guild, _key(n), _nats(n)) for n in neighbours),
        founders,
    )


def _key(net: Devnet) -> bytes:
    return SigningKey(bytes.fromhex(net.operator_key)).pubkey


def _nats(net: Devnet) -> str:
    return f"nats://127.0.0.1:{net.nats_port}"


def write_config(nets: list[Devnet], neighbours: list[Devnet]) -> None:
    """Each guild's layout (naming the other's operators as neighbours), each operator's
    NATS users and the credentials its peers issued it (the ports change with every
    ``up``)."""
    everyone = nets + neighbours
    founders = _doc(Path(nets[0].dir).parent).get("founders", 0)
    for group, others, first in ((nets, neighbours, founders), (neighbours, nets, 0)):
        if group:
            doc = layout(group, others, first).to_json()
            for net in group:
                write_json_atomic(net.layout_path, doc)
    guild_of = {n.operator: n.guild for n in everyone}
    for net in everyone:
        peers = {
            p.operator: f"nats://{net.operator}:{p.issued[net.operator]}@127.0.0.1:{p.nats_port}"
            for p in everyone
            if p is not net
        }
        write_json_atomic(net.peers_path, peers)
        users: list[dict[str, object]] = [{"user": "self", "password": net.nats_password}]
        users += [
            {
                "user": peer,
                "password": password,
                "permissions": peer_permissions(peer, guild_of[peer] == net.guild),
            }
            for peer, password in net.issued.items()
        ]
        # NATS reads JSON as its configuration format.
        net.nats_conf.write_text(json.dumps({"authorization": {"users": users}}, indent=2))


def up(
    directory: Path,
    operators: int,
    workers: int,
    guild: str,
    neighbours: int = 0,
    machines: int = MACHINES,
) -> list[Devnet]:
    """Start the local guild in ``directory`` (creating it the first time), and its
    neighbouring guild where it has one; returns the guild's operators once every
    machine of every operator is ready. Each operator runs ``machines`` machines the
    first time (then as many as ``set_machines`` left it), over which its two copies of
    every shard spread (``constellation.replication.placement``)."""
    if (directory / GUILD_FILE).exists():
        nets, others = load(directory), load_neighbours(directory)
        if len(nets) != operators or nets[0].shards != workers or len(others) != neighbours:
            raise DevnetError(
                f"the guild in {directory} has {len(nets)} operators of {nets[0].shards} "
                f"workers, and {len(others)} neighbours: `devnet down --purge` it first"
            )
        if any(supervisor_alive(Path(n.dir)) for n in nets + others):
            raise DevnetError(f"the guild in {directory} is running: `devnet down` first")
    else:
        nets, others = create(directory, operators, workers, guild, neighbours, machines)
    everyone = nets + others
    for net in everyone:
        assign_ports(net)
    write_config(nets, others)
    for net in everyone:
        net.save()
        (Path(net.dir) / STATUS_FILE).unlink(missing_ok=True)
    try:
        port = start_lightning(directory, [n.operator for n in everyone] + [OUTSIDE])
        for net in everyone:
            net.bitcoind_url = f"http://127.0.0.1:{port}/bitcoind"
            net.save()
        pids = [spawn_supervisor(Path(n.dir)) for n in everyone]
        for net, pid in zip(everyone, pids, strict=True):
            await_supervisor(Path(net.dir), pid, start_deadline_s(net))
        wait_machines(load(directory) + load_neighbours(directory), READY_S)
        for group in (nets, others):
            if group:
                guild_key(group)
    except BaseException:
        down(directory)
        raise
    return load(directory)


def guild_key(nets: list[Devnet]) -> None:
    """Make the guild's threshold key by a DKG among the operators' signers (a majority
    signs), unless the first operator's signer holds a share of it already."""
    if signer_request(nets[0], KeyRequest()).ok:
        return
    reply = signer_request(nets[0], KeygenRequest(len(nets) // 2 + 1))
    if not reply.ok:
        raise DevnetError(f"the guild's key generation failed: {reply.code}: {reply.error}")


def signer_request(net: Devnet, request: OpRequest, timeout_s: float = KEYGEN_S) -> OpReply:
    """One request of an operator to its own signer, signed with its client key."""
    return asyncio.run(call(net.signer_access(), request, timeout_s))


def plan_key(nets: list[Devnet], plan: KeyPlan, deadline_s: float = 60.0) -> list[KeysSeen]:
    """Agree to ``plan`` at each of ``nets`` (in its NATS KV, where its indexer follows
    it: ``services.indexer.keys``) and wait until each reports it done: the key made
    (the same at all), and with ``move``, the guild's coins its mint holds moved to it,
    in a block, the checkpoints handed over to it and the keys before it retired. What
    each reported."""

    async def agree_and_wait() -> list[KeysSeen]:
        clients = [await connect_nats(n.nats_url, f"devnet-key-{n.operator}") for n in nets]
        try:
            for nc, net in zip(clients, nets, strict=True):
                await publish_key_plan(nc, net.operator, plan)
            end = time.monotonic() + deadline_s
            while True:
                pairs = zip(clients, nets, strict=True)
                seen = [await load_keys_seen(nc, n.operator) for nc, n in pairs]
                done = [
                    s is not None
                    and s.of(plan)
                    and bool(s.key)
                    and ((s.moved and s.handed) or not plan.move)
                    for s in seen
                ]
                if all(done) and len({s.key for s in seen if s is not None}) == 1:
                    return [s for s in seen if s is not None]
                if time.monotonic() > end:
                    waiting = {
                        n.operator: s.waiting if s is not None and s.of(plan) else "no report"
                        for n, s in zip(nets, seen, strict=True)
                    }
                    raise DevnetError(f"the planned key is not done in {deadline_s} s: {waiting}")
                await asyncio.sleep(0.2)
        finally:
            for nc in clients:
                await nc.close()

    return asyncio.run(agree_and_wait())


def wait_machines(nets: list[Devnet], deadline_s: float) -> None:
    """Wait until every running machine is ready (its copies follow live leaders)."""
    end = time.monotonic() + deadline_s
    machines = [m for n in nets for m in n.machines if alive(m.pid)]
    while not all(ready(m.http_port) for m in machines):
        if time.monotonic() > end:
            late = [m.state_dir for m in machines if not ready(m.http_port)]
            raise DevnetError(f"machines not ready after {deadline_s} s: {late}")
        time.sleep(0.1)


def stop_operator(directory: Path, name: str) -> None:
    """Stop one operator's supervisor and every process of it (the others go on)."""
    folder = directory / name
    stop_supervisor(folder)
    stop_all(Devnet.load(folder))
    lightning_faults(directory, name, {"offline": True})


def start_operator(directory: Path, name: str) -> Devnet:
    """Start a stopped operator again, on the ports its peers know; returns once its
    machines are ready (caught up with live leaders)."""
    folder = directory / name
    if supervisor_alive(folder):
        raise DevnetError(f"operator {name} runs already")
    net = Devnet.load(folder)
    (folder / STATUS_FILE).unlink(missing_ok=True)
    await_supervisor(folder, spawn_supervisor(folder), start_deadline_s(net))
    lightning_faults(directory, name, {"offline": False})
    net = Devnet.load(folder)
    wait_machines([net], READY_S)
    return net


@dataclass(frozen=True)
class Rebalanced:
    """What ``set_machines`` did."""

    operator: str
    before: int  # machines
    after: int
    moved: int  # copy slots moved
    placement: int  # the placement's version at the end
    seconds: float  # the whole change: machines started, copies moved, machines stopped
    moving_since: float  # time.perf_counter() when the copies began to move
    moving_s: float  # from then to the last arrival


def set_machines(
    directory: Path, name: str, machines: int, batch: int = BATCH, stalled_s: float = 60.0
) -> Rebalanced:
    """Run operator ``name`` on ``machines`` machines, moving its copies live: new
    machines start first, the copies move (``batch`` at a time) while payments go on,
    and machines removed stop only once no copy is on them. A move that makes no
    progress for ``stalled_s`` (a machine that does not answer) stops the change with
    the reason, and every machine that still holds a copy keeps running."""
    folder = directory / name
    if not supervisor_alive(folder):
        raise DevnetError(f"operator {name} does not run: `devnet start {name}` first")
    if not MACHINES <= machines <= MAX_MACHINES:
        raise DevnetError(f"an operator runs {MACHINES} to {MAX_MACHINES} machines")
    net = Devnet.load(folder)
    before, started = len(net.machines), time.monotonic()
    if machines > before:
        net = _machines_become(folder, machines)
        wait_machines([net], READY_S)

    async def move() -> tuple[Placement, int]:
        nc = await connect_nats(net.nats_url, f"devnet-machines-{name}")
        try:
            return await drive(nc, name, machines, batch, stalled_s)
        except Stuck as exc:
            raise DevnetError(f"{exc}: the machines stay as they are") from None
        finally:
            await nc.close()

    moving_since = time.perf_counter()
    placement, moved = asyncio.run(move())
    moving_s = time.perf_counter() - moving_since
    if machines < before:
        leaving = net.machines[machines:]
        end = time.monotonic() + DROP_S
        while any(_holds(m) for m in leaving) and time.monotonic() < end:
            time.sleep(0.05)  # its released folders are dropped (no copy runs there)
        net = _machines_become(folder, machines)
    return Rebalanced(
        name,
        before,
        machines,
        moved,
        placement.version,
        round(time.monotonic() - started, 3),
        moving_since,
        round(moving_s, 3),
    )


@dataclass(frozen=True)
class Left:
    """What ``leave`` did."""

    operator: str
    voters: list[str]  # the guild's voters after it
    seconds: float  # from the agreement to every shard's new members confirmed
    key: str  # the new guild key the voters made (hex): it holds the guild's coins
    key_seconds: float  # how long its DKG took, with the agreements
    moved: list[str]  # the txids moving the guild's coins to it (none: no coin held)


def leave(directory: Path, name: str, deadline_s: float = 60.0) -> Left:
    """Operator ``name`` leaves the guild: every member agrees to the voters without it
    (``constellation.replication.members``), every shard's leader takes the steps (a
    joint step, then the voters alone) while payments go on, and once every copy of
    every shard at the members that stay names the new voters, confirmed, the leaver's
    processes stop. Its shards stay, led and kept by the others' copies. Then the
    members that stay make a new guild key (``plan_key``) and their mints move the
    guild's coins to it: the leaver's share signs for none of them. Then the checkpoints
    hand over to the new key (light clients follow the handover from the key they
    pinned), and the members' signers retire the old key."""
    nets = load(directory)
    names = [n.operator for n in nets]
    if name not in names:
        raise DevnetError(f"no operator {name} in this guild")
    leaver = names.index(name)
    stay = [n for n in nets if n.operator != name]
    if not all(supervisor_alive(directory / n.operator) for n in nets):
        raise DevnetError("every member runs while one leaves (`devnet start` the others)")

    agreement = _agreement(nets)
    voters = agreement.voters[-1]
    if leaver not in voters:
        raise DevnetError(f"operator {name} left already")
    if len(voters) <= 2:
        raise DevnetError("a guild keeps at least two members")
    started = time.monotonic()
    voters = [op for op in voters if op != leaver]
    _agree(nets, Agreement([*agreement.voters, voters]))
    _wait_voters(stay, len(nets), voters, started + deadline_s)
    seconds = time.monotonic() - started
    stop_operator(directory, name)
    started = time.monotonic()
    plan = KeyPlan(voters, len(voters) // 2 + 1)  # member indices are the layout's
    [made, *_] = plan_key(stay, plan)
    key_seconds = time.monotonic() - started
    moves = plan_key(stay, msgspec.structs.replace(plan, move=True))
    txids = [t for seen in moves for t in seen.txids]
    return Left(name, [names[op] for op in voters], seconds, made.key.hex(), key_seconds, txids)


@dataclass(frozen=True)
class Joined:
    """What ``join`` did."""

    operator: str
    voters: list[str]  # the guild's voters after it
    roll_seconds: float  # every member restarted on the layout that names it
    seconds: float  # from the first agreement to every shard's new voters confirmed
    key: str  # the new guild key the voters made (hex): it holds the guild's coins
    key_seconds: float  # how long its DKG took, with the agreements
    moved: list[str]  # the txids moving the guild's coins to it (none: no coin held)


def join(directory: Path, name: str, deadline_s: float = 120.0) -> Joined:
    """Operator ``name`` joins the guild, while payments go on:

    1. Its folder, keys and NATS credentials are made; every member's layout names it
       (after the founders: ``Layout.founders``), and its signer's identity is among the
       signers'. Its Lightning node joins the network with a channel to every member.
    2. The members restart on that layout one at a time, each once the one before it
       follows its shards' leaders again (the others keep every shard led meanwhile);
       its shards start at every member's copies, their first block naming the voters
       of the time.
    3. Every member agrees that its copies learn (``Agreement.learning``): each
       shard's leader makes them learners. It starts, its indexer pinned to the guild's
       first key (``INDEXER_GUILD_PIN``: it holds no share of it).
    4. Every member agrees to the voters with it: each shard's leader makes its copies
       voters once they hold the log (a joint step, then the new voters alone).
    5. The voters make a new guild key, the mints move the guild's coins to it, and the
       checkpoints hand over to it (``plan_key``): from there its share signs."""
    nets = load(directory)
    names = [n.operator for n in nets]
    doc = _doc(directory)
    if name in names or name == OUTSIDE or name in doc.get("neighbours", []):
        raise DevnetError(f"{name} is a name taken in this local guild")
    if doc.get("neighbours"):
        raise DevnetError("a member joins a guild without a neighbouring guild only")
    if not all(supervisor_alive(directory / n.operator) for n in nets):
        raise DevnetError("every member runs while one joins (`devnet start` the others)")
    agreement = _agreement(nets)
    voters = agreement.voters[-1]
    if len(voters) != len(nets):
        raise DevnetError("a member that left is still in the layout: a guild joins once")
    joiner = _admit(directory, nets, name)
    started = time.monotonic()
    for net in nets:  # each restarts on the layout that names the joiner
        folder = Path(net.dir)
        stop_supervisor(folder)
        stop_all(Devnet.load(folder))
        await_supervisor(folder, spawn_supervisor(folder), start_deadline_s(net))
        _wait_led([Devnet.load(folder)], set(names), READY_S)
    roll_seconds = time.monotonic() - started
    # Learning: the members' leaders make the joiner's copies learners (its machines
    # follow that from their start, and its indexer reads every shard from them).
    folder = Path(joiner.dir)
    supervisor = spawn_supervisor(folder)
    started = time.monotonic()
    _agree([joiner, *nets], Agreement(agreement.voters, learning=[len(nets)]), NATS_START_S)
    _wait_learners(nets, len(nets), started + deadline_s)
    # Voting: each shard's leader makes them voters once they hold its log (its own
    # shards' leadership comes home then, and its indexer is ready).
    grown = [*voters, len(nets)]
    _agree([joiner, *nets], Agreement([*agreement.voters, grown]))
    await_supervisor(folder, supervisor, start_deadline_s(joiner))
    everyone = load(directory)
    _wait_voters(everyone, len(everyone), grown, started + deadline_s)
    seconds = time.monotonic() - started
    started = time.monotonic()
    plan = KeyPlan(grown, len(grown) // 2 + 1)
    [made, *_] = plan_key(everyone, plan)
    key_seconds = time.monotonic() - started
    moves = plan_key(everyone, msgspec.structs.replace(plan, move=True))
    txids = [t for seen in moves for t in seen.txids]
    return Joined(
        name,
        [n.operator for n in everyone],
        round(roll_seconds, 3),
        round(seconds, 3),
        made.key.hex(),
        round(key_seconds, 3),
        txids,
    )


def _admit(directory: Path, nets: list[Devnet], name: str) -> Devnet:
    """``join``'s first step: the joiner's folder, credentials, signer and Lightning
    node, and every member's configuration naming it. Returns the joiner."""
    names, doc = [n.operator for n in nets], _doc(directory)
    first = signer_request(nets[0], KeyRequest()).first
    if first is None:
        raise DevnetError("the guild has no key yet")
    joiner, identity = _operator(
        directory, nets[0].guild, name, names, nets[0].shards, len(nets[0].machines)
    )
    joiner.bitcoind_url = nets[0].bitcoind_url
    joiner.guild_pin = msgspec.json.encode(
        {"key": first.key.hex(), "threshold": first.t, "members": first.members}
    ).decode()
    assign_ports(joiner)
    members = load_members(nets[0].members_path)
    for net in nets:
        net.issued[name] = os.urandom(16).hex()
    everyone = [*nets, joiner]
    for net in everyone:
        signers = Membership(members.guild, [*members.hostpubkeys, identity])
        save_members(signers, net.members_path)
        net.save()
    lightning(directory, f"/v1/nodes/{name}", {})
    doc.update(operators=[*names, name], founders=doc.get("founders") or len(nets))
    write_json_atomic(directory / GUILD_FILE, doc)
    write_config(everyone, [])
    return joiner


def _agreement(nets: list[Devnet]) -> Agreement:
    """The voters the guild agreed to, as its first member keeps them."""

    async def read() -> Agreement | None:
        nc = await connect_nats(nets[0].nats_url, f"devnet-agreement-{nets[0].operator}")
        try:
            return await load_agreement(nc, nets[0].operator)
        finally:
            await nc.close()

    return asyncio.run(read()) or Agreement([layout(nets).founding])


def _agree(nets: list[Devnet], agreement: Agreement, wait_s: float = 0.0) -> None:
    """Every member agrees to ``agreement`` (in its NATS KV, where its machines follow
    it), waiting up to ``wait_s`` for a member's NATS that is starting."""

    async def publish(net: Devnet) -> None:
        nc = await connect_nats(net.nats_url, f"devnet-agree-{net.operator}")
        try:
            await publish_agreement(nc, net.operator, agreement)
        finally:
            await nc.close()

    end = time.monotonic() + wait_s
    for net in nets:
        while True:
            try:
                asyncio.run(publish(Devnet.load(Path(net.dir))))
                break
            except (OSError, NatsError):
                if time.monotonic() > end:
                    raise DevnetError(f"{net.operator}'s NATS did not answer") from None
                time.sleep(0.2)


def _wait_led(nets: list[Devnet], owners: set[str], deadline_s: float) -> None:
    """Wait until every copy at ``nets`` of a shard of ``owners`` follows a leader."""
    end = time.monotonic() + deadline_s
    expected = COPIES * len(owners) * sum(n.shards for n in nets)
    while True:
        rows = [c for c in copies(nets) if c["shard"].split("/")[0] in owners]
        if len(rows) == expected and all(r["leader"] >= 0 for r in rows):
            return
        if time.monotonic() > end:
            who = nets[0].operator
            raise DevnetError(f"the copies at {who} follow no leader in {deadline_s} s")
        time.sleep(0.1)


def _wait_learners(nets: list[Devnet], joiner: int, end: float) -> None:
    """Wait until every copy at ``nets`` of every shard names ``joiner`` a learner (or
    a voter), confirmed."""
    expected = COPIES * len(nets) * (len(nets) + 1) * nets[0].shards
    while True:
        rows = copies(nets)
        if len(rows) == expected and all(
            joiner in (*r["learners"], *r["voters"]) and r["members_confirmed"] for r in rows
        ):
            return
        if time.monotonic() > end:
            raise DevnetError(f"the shards did not all take operator {joiner} as a learner")
        time.sleep(0.1)


def _wait_voters(nets: list[Devnet], owners: int, voters: list[int], end: float) -> None:
    """Wait until every copy at ``nets`` of every shard (of ``owners`` members) names
    ``voters``, confirmed."""
    expected = COPIES * len(nets) * owners * nets[0].shards
    while True:
        rows = copies(nets)
        if len(rows) == expected and all(
            r["voters"] == voters and not r["old"] and r["members_confirmed"] for r in rows
        ):
            return
        if time.monotonic() > end:
            raise DevnetError(f"the shards did not all take the voters {voters} in time")
        time.sleep(0.1)


def _holds(machine: MachineProc) -> bool:
    """Whether a machine's folder still holds a copy's folder."""
    return any(p.is_dir() for p in Path(machine.state_dir).iterdir())


def _machines_become(folder: Path, machines: int, deadline_s: float = READY_S) -> Devnet:
    """Ask the supervisor for ``machines`` machines and wait until it runs them."""
    want_machines(folder, machines)
    end = time.monotonic() + deadline_s
    while True:
        net = Devnet.load(folder)
        if len(net.machines) == machines and not (folder / MACHINES_FILE).exists():
            return net
        if time.monotonic() > end or not supervisor_alive(folder):
            raise DevnetError(f"{folder.name} did not come to {machines} machines")
        time.sleep(0.1)


def down(directory: Path) -> None:
    folders = operator_dirs(directory) + neighbour_dirs(directory)
    for folder in folders:
        stop_supervisor(folder)
    for folder in folders:
        stop_all(Devnet.load(folder))
    stop_lightning(directory)


# -- the simulated Lightning network --------------------------------------------------


def outside_rpc(directory: Path) -> str:
    """The socket of the network's node that is no operator's: the outside world (users'
    own Lightning wallets, merchants) that pays deposits and issues the invoices users
    pay. Its money is no operator's, so moving it breaks no operator's reserve."""
    return str(socket_path((directory / LIGHTNING_DIR).resolve(), OUTSIDE))


def start_lightning(directory: Path, names: list[str]) -> int:
    """Start the operators' simulated Lightning network (stopping one left running);
    returns its ops port (where its chain answers as bitcoind: ``/bitcoind``)."""
    stop_lightning(directory)
    port = free_port()
    env = {
        **os.environ,
        "LNSIM_DIR": str((directory / LIGHTNING_DIR).resolve()),
        "LNSIM_NODES": ",".join(names),
        "LNSIM_CHANNEL_SAT": str(CHANNEL_SAT),
        "LNSIM_HTTP_ADDR": f"127.0.0.1:{port}",
    }
    pid = spawn([sys.executable, "-m", "services.lnsim"], env, directory / f"{LIGHTNING_DIR}.log")
    wait_ready(port, pid, LIGHTNING_START_S)
    doc = _doc(directory)
    doc["lightning"] = {"pid": pid, "http_port": port}
    write_json_atomic(directory / GUILD_FILE, doc)
    return port


def stop_lightning(directory: Path) -> None:
    found = _doc(directory).get("lightning")
    if found is not None and alive(found["pid"]):
        stop_pid(found["pid"], 10)


def deposit(net: Devnet, amount_msat: int) -> None:
    """Back coins issued at ``net`` with as much on its Lightning node's wallet (the
    simulated network's faucet): a deposit, so the reserve invariant holds. Nothing for
    an operator outside a guild (it runs no Lightning network)."""
    directory = Path(net.dir).parent
    if net.in_guild and (directory / GUILD_FILE).exists() and amount_msat >= 1000:
        lightning(directory, f"/v1/fund/{net.operator}", {"sat": amount_msat // 1000})


def lightning_faults(directory: Path, node: str, faults: dict[str, Any]) -> None:
    """Set faults at a node of the guild's simulated network (``services/lnsim/app.py``)."""
    lightning(directory, f"/v1/faults/{node}", faults)


def lightning(directory: Path, path: str, doc: dict[str, Any] | None = None) -> Any:
    """The guild's simulated network's control API: GET ``path``, or POST ``doc``."""
    found = _doc(directory).get("lightning")
    if found is None:
        raise DevnetError(f"no Lightning network runs for the guild in {directory}")
    req = urllib.request.Request(
        f"http://127.0.0.1:{found['http_port']}{path}",
        data=json.dumps(doc).encode() if doc is not None else None,
        method="POST" if doc is not None else "GET",
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.load(r)
    except (OSError, ValueError) as exc:
        raise DevnetError(f"the guild's Lightning network did not answer {path}: {exc}") from None


# -- watching the copies (``/v1/copies`` of each machine) ------------------------------


def copies(nets: list[Devnet]) -> list[dict[str, Any]]:
    """What every running machine says of its copies, with where each copy lives."""
    found = []
    for net in nets:
        for m in net.machines:
            try:
                url = f"http://127.0.0.1:{m.http_port}/v1/copies"
                with urllib.request.urlopen(url, timeout=2) as r:
                    rows = json.load(r)
            except OSError:
                continue  # stopped, or starting
            for row in rows:
                row.update(operator=net.operator, machine=m.index, pid=m.pid)
            found += rows
    return found


def leader(nets: list[Devnet], shard: str) -> dict[str, Any] | None:
    """The copy of ``shard`` leading in the highest term, if any leads."""
    leading = [c for c in copies(nets) if c["shard"] == shard and c["role"] == "leader"]
    return max(leading, key=lambda c: c["term"], default=None)


def wait_new_leader(
    nets: list[Devnet], shard: str, confirmed: int, deadline_s: float = 30
) -> dict[str, Any]:
    """Wait until a copy leads ``shard`` and has confirmed a block above ``confirmed``."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        found = leader(nets, shard)
        if found is not None and found["confirmed"] > confirmed:
            return found
        time.sleep(0.01)
    raise DevnetError(f"no leader of {shard} confirmed a block within {deadline_s} s")


def wait_converged(nets: list[Devnet], deadline_s: float = 60) -> dict[str, list[dict[str, Any]]]:
    """Wait until every copy of every shard holds the same confirmed log with the same
    state root; returns the copies by shard."""
    end = time.monotonic() + deadline_s
    expected = COPIES * len(nets) * len(nets) * nets[0].shards
    while True:
        rows = copies(nets)
        by_shard: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_shard.setdefault(row["shard"], []).append(row)
        if len(rows) == expected and all(
            len({(c["last"], c["confirmed"], c["root"]) for c in cs}) == 1
            and cs[0]["last"] == cs[0]["confirmed"]
            for cs in by_shard.values()
        ):
            return by_shard
        if time.monotonic() > end:
            raise DevnetError(f"the copies did not converge within {deadline_s} s")
        time.sleep(0.1)


def wait_home(nets: list[Devnet], deadline_s: float = 60) -> None:
    """Wait until every shard is led by a copy of its owner (leadership goes back home
    once the owner's copies have caught up): the owner's gateway reaches its leaders."""
    end = time.monotonic() + deadline_s
    shards = [f"{n.operator}/{w}" for n in nets for w in range(n.shards)]
    while True:
        leaders = [leader(nets, s) for s in shards]
        if all(
            c is not None and c["operator"] == s.split("/")[0]
            for s, c in zip(shards, leaders, strict=True)
        ):
            return
        if time.monotonic() > end:
            raise DevnetError(f"leadership did not return to the owners within {deadline_s} s")
        time.sleep(0.1)
