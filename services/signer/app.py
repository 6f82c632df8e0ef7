"""Wiring: keys from disk, NATS subscriptions, the ops server, and a clean drain."""

from __future__ import annotations

import asyncio
import logging

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from constellation.crypto.dkg import hostpubkey_gen
from constellation.errors import ConstellationError
from constellation.guild import Checkpoint, SigningPolicy
from constellation.protocol import lightclient as lc
from constellation.protocol import signer as proto
from services.runtime import ConfigError, OpsServer, close_nats, connect_nats, connect_peer
from services.signer.config import Settings, load_members
from services.signer.coordinator import Coordinator
from services.signer.handlers import Participant
from services.signer.metrics import SignerMetrics
from services.signer.store import AuditLog, KeyStore
from services.signer.transport import Role, Transport, listen_subject, subject

log = logging.getLogger("signer")

VOUCH_S = 5.0  # how long a checkpoint waits for this operator's indexer to check it


class SignerNode:
    """One operator's signer: participant for every member, coordinator for its operator."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = SignerMetrics()
        self.members = load_members(settings.members_path)
        self.keystore = KeyStore(settings.state_dir, settings.storage_key)
        self.hostseckey = self.keystore.load_identity()
        self.hostpubkey = hostpubkey_gen(self.hostseckey)
        me = self.members.index.get(self.hostpubkey)
        if me is None:
            raise ConfigError("this signer's identity is not in the guild's member list")
        if set(settings.clients) & set(self.members.hostpubkeys):
            raise ConfigError("SIGNER_CLIENT_KEYS: a member's host key is no client key")
        if not settings.clients:
            log.warning("no SIGNER_CLIENT_KEYS: this operator's requests are refused")
        for key in self.keystore.restore_shares(self.hostseckey, self.members.guild):
            log.warning(
                "a lost key share restored from its recovery data", extra={"key": key.hex()}
            )
        self.me = me
        self.audit = AuditLog(settings.state_dir / "audit.log")
        self.transport: Transport | None = None
        self.participant = Participant(
            self.members,
            me,
            self.hostseckey,
            self.keystore,
            self.audit,
            SigningPolicy(self.members.guild, settings.purposes, self.members.identities),
            self.metrics,
            lambda idx, msg: self.send(Role.COORD, idx, msg),
            settings.max_requests,
            settings.request_timeout_ms,
            self.vouch if settings.vouch_subject else None,
        )
        self.coordinator = Coordinator(
            self.members,
            me,
            self.metrics,
            lambda idx, msg: self.send(Role.SIGNER, idx, msg),
            self.participant.key,
            settings.max_requests,
            settings.request_timeout_ms,
        )
        self.ops = OpsServer(self.metrics.registry, self.ready)
        self._tasks: set[asyncio.Task[None]] = set()
        self.routes: dict[int, Client] = {}  # each other member's server, once connected
        self._connecting: list[asyncio.Task[None]] = []

    def ready(self) -> tuple[bool, str]:
        if self.transport is None or not self.transport.nc.is_connected:
            return False, "not connected to NATS"
        if self.participant.active is None:
            return True, "connected; no key share yet"
        return True, f"connected; holds a key share ({len(self.participant.usable())} usable)"

    async def vouch(self, checkpoint: Checkpoint, evidence: bytes) -> str:
        """Ask this operator's indexer whether it computed the checkpoint's entries: a
        reason to refuse, or empty."""
        assert self.transport is not None
        request = msgspec.msgpack.encode(lc.Vouch(checkpoint, evidence))
        try:
            msg = await self.transport.nc.request(
                self.settings.vouch_subject, request, timeout=VOUCH_S
            )
            return msgspec.msgpack.decode(msg.data, type=str)
        except (NatsError, msgspec.ValidationError, msgspec.DecodeError) as exc:
            return f"this operator's ledger did not answer ({type(exc).__name__})"

    async def send(self, role: Role, idx: int, msg: proto.Message) -> None:
        assert self.transport is not None
        await self.transport.send(role, idx, msg)

    async def run(self, stop: asyncio.Event) -> None:
        await self.ops.start(self.settings.http_host, self.settings.http_port)
        name = f"signer-{self.members.guild}-{self.me}"
        nc = await connect_nats(self.settings.nats_url, name)
        me = self.settings.names[self.me] if self.settings.names else ""
        routes = None if self.settings.peers is None else self.routes
        s = self.settings
        self.transport = Transport(
            nc,
            self.members,
            self.hostseckey,
            s.replay_window_ms,
            s.replay_per_sender,
            me,
            routes,
            s.clients,
        )
        self._connect_peers(name)
        guild = self.members.guild
        await nc.subscribe(listen_subject(Role.SIGNER, self.me), cb=self._on_signer)
        await nc.subscribe(listen_subject(Role.COORD, self.me), cb=self._on_coord)
        ops = await nc.subscribe(subject(guild, Role.OP, self.me), cb=self._on_op)
        await nc.flush()
        log.info(
            "signer ready",
            extra={
                "guild": guild,
                "member": self.me,
                "hostpubkey": self.hostpubkey.hex(),
                "http_port": self.ops.port,
                "keys": len(self.participant.usable()),
                "audit_entries": self.audit.count,
            },
        )
        await stop.wait()
        # Take no new requests, finish the running ones (they need the other two
        # subscriptions), then drain: callbacks that started complete before closing.
        log.info("draining", extra={"open_requests": len(self._tasks)})
        await ops.unsubscribe()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.settings.request_timeout_ms / 1000)
        await close_nats(nc, drain=True)
        for task in self._connecting:
            task.cancel()
        for peer in self.routes.values():
            await close_nats(peer)
        self.audit.close()
        await self.ops.stop()

    def _connect_peers(self, name: str) -> None:
        """Where members run their own servers: connect to each other member's, with
        the credentials it issued us, retrying until it answers (the client reconnects
        by itself afterwards); until then that member hears nothing from us."""
        s, peers = self.settings, self.settings.peers
        if peers is None:
            return
        if len(s.names) != len(self.members.hostpubkeys) or not set(s.names) - {
            s.names[self.me]
        } <= set(peers):
            raise ConfigError("SIGNER_NAMES names every member, SIGNER_PEERS each other one")

        async def connect(i: int, peer: str) -> None:
            self.routes[i] = await connect_peer(peers[peer], name, peer)

        for i, peer in enumerate(s.names):
            if i != self.me:
                task = asyncio.create_task(connect(i, peer))
                self._connecting.append(task)
                self.ops.tasks.watch(f"peer-{peer}", task)

    def _open(self, data: bytes) -> tuple[int, proto.Message] | None:
        assert self.transport is not None
        try:
            return self.transport.open(data)
        except ConstellationError as exc:
            self.metrics.rejected_messages.labels(exc.code).inc()
            log.info("message rejected", extra={"code": exc.code, "reason": str(exc)})
            return None

    async def _on_signer(self, msg: Msg) -> None:
        opened = self._open(msg.data)
        if opened is not None:
            await self.participant.handle(*opened)

    async def _on_coord(self, msg: Msg) -> None:
        opened = self._open(msg.data)
        if opened is not None:
            await self.coordinator.handle(*opened)

    async def _on_op(self, msg: Msg) -> None:
        assert self.transport is not None
        try:
            client, request = self.transport.open_request(msg.data)
        except ConstellationError as exc:
            self.metrics.rejected_messages.labels(exc.code).inc()
            log.info("request rejected", extra={"code": exc.code, "reason": str(exc)})
            return
        task = asyncio.create_task(self._serve_op(msg, client, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.ops.tasks.watch("request", task)

    async def _serve_op(self, msg: Msg, client: bytes, request: proto.Message) -> None:
        if isinstance(request, proto.KeygenRequest):
            reply = await self.coordinator.keygen(request.t, request.members)
        elif isinstance(request, proto.SignRequest):
            reply = await self.coordinator.sign(request.target, request.evidence, request.key)
        elif isinstance(request, proto.KeyRequest):
            reply = self._keys()
        elif isinstance(request, proto.AgreeKey | proto.ActivateKey):
            try:
                if isinstance(request, proto.AgreeKey):
                    self.participant.agree(request.members, request.t)
                else:
                    self.participant.activate(request.key)
                reply = self._keys()
            except ConstellationError as exc:
                reply = proto.OpReply(False, code=exc.code, error=str(exc))
        else:
            reply = proto.OpReply(False, code="protocol.unexpected", error="not a request")
        assert self.transport is not None
        await msg.respond(self.transport.seal(client, reply))

    def _keys(self) -> proto.OpReply:
        """The active key, and every key this signer signs with."""
        key = self.participant.active
        if key is None:
            return proto.OpReply(False, code="signing.no_key", error="no key share yet")
        p = self.participant
        keys = [proto.KeyInfo(k.pubkey, list(k.members), k.group.t) for k in p.usable()]
        agreed = None
        if p.agreement is not None:
            taking = sorted(self.members.index[h] for h in p.agreement.hostpubkeys)
            agreed = proto.KeyInfo(b"", taking, p.agreement.t)
        first = p.keys[0]
        return proto.OpReply(
            True,
            threshold_pubkey=key.pubkey,
            threshold=key.group.t,
            keys=keys,
            agreed=agreed,
            first=proto.KeyInfo(first.pubkey, list(first.members), first.group.t),
        )
