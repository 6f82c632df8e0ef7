"""A ``Guild`` resource's spec, read and checked.

The CRD's OpenAPI schema and CEL rules check what can be checked statically; this
checks it again (an API server may not run them, and a Guild may come from elsewhere)
and what they cannot: keys that are points on the curve, names the services accept.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import msgspec

from constellation.address import Network
from constellation.keys import SigningKey, is_valid_xonly
from services.indexer.config import guild_pin
from services.replica.config import MACHINES, Layout, Member, Neighbour
from services.runtime import OPERATOR_RE, ConfigError, env_networks

GROUP = "constellation.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
# kopf's finalizer on the resources the operator watches (its timers need one).
FINALIZER = f"{GROUP}/operator"
NETWORKS = tuple(n.name.lower() for n in Network)


class BadGuild(ValueError):
    """A Guild the operator refuses: it says why, in the Guild's status."""


class MemberSpec(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    name: str
    key: str  # x-only operator key (hex): it signs blocks, acks and messages
    signer_key: str  # the member's signer's host public key (33 bytes, hex)
    issuers: list[str]  # x-only keys whose issuances its shards accept
    nats: str  # its NATS server, where peers deliver what they send it
    machines: int = MACHINES  # its machines, over which its two copies of a shard spread


class NeighbourSpec(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    name: str
    guild: str
    key: str
    nats: str


class Image(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    """The project's image, which the Guild's own services run. What a Guild leaves out
    is the operator's own image's (``Settings.image``, from the chart's ``image``), so
    that upgrading the chart upgrades the Guilds too."""

    repository: str | None = None
    tag: str | None = None
    pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None

    def over(self, default: Image) -> Image:
        """This image, with what it leaves out taken from ``default``."""
        return Image(
            self.repository or default.repository,
            self.tag or default.tag,
            self.pull_policy or default.pull_policy,
        )

    @property
    def ref(self) -> str:
        assert self.repository and self.tag, "an image with nothing under what it leaves out"
        return f"{self.repository}:{self.tag}"


class Resources(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    cpu: int  # whole cores: with requests equal to limits the pod is Guaranteed
    memory: str


class External(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    """A server the Guild uses instead of running its own: the name of a Secret and the
    key in it that holds the URL (with its credentials)."""

    secret: str
    key: str = "url"


class Amount(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    """What a server's container is given: ``cpu`` and ``memory`` requested, and its
    memory as its limit too (no CPU limit: a quota would throttle it in bursts)."""

    cpu: str | int
    memory: str


class Infra(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    image: str
    storage: str = "10Gi"
    external: External | None = None
    resources: Amount | None = None  # None: the server's own default (``render``)


class Lightning(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    """Core Lightning, beside the gateway and the mint (its JSON-RPC is a unix socket)."""

    image: str = "elementsproject/lightningd:v25.02"
    storage: str = "10Gi"
    config: str | None = None  # a Secret whose ``config`` is lightningd's (bitcoind's RPC)


class GuildPin(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    """The guild's first key, for a member that joined after it was made (its signer
    holds no share of it): where its light-client checkpoints start (every member's
    gateway shows it at ``/v1/lc/descriptor``)."""

    key: str  # 33 bytes, hex
    threshold: int
    members: list[int]  # its holders: member indices


class Secrets(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    keys: str  # holds ``operator-key`` and ``issuer-key`` (32-byte secrets, hex)
    peers: str  # holds ``peers.json``: each peer's NATS URL with what it issued us


def _nats() -> Infra:
    return Infra(image="nats:2.10")


def _redis() -> Infra:
    return Infra(image="redis:7", storage="1Gi")


def _postgres() -> Infra:
    return Infra(image="postgres:16")


def _machine() -> Resources:
    return Resources(cpu=2, memory="4Gi")


def _gateway() -> Resources:
    return Resources(cpu=1, memory="1Gi")


class GuildSpec(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    guild: str
    operator: str  # this member's name: the part of the guild this resource runs
    threshold: int
    members: list[MemberSpec]
    secrets: Secrets
    shards: int = 4
    network: str = "regtest"
    neighbours: list[NeighbourSpec] = []
    image: Image = msgspec.field(default_factory=Image)
    machine_resources: Resources = msgspec.field(default_factory=_machine)
    gateway_resources: Resources = msgspec.field(default_factory=_gateway)
    # The load balancers or ingresses in front of the gateway and the mint (addresses or
    # networks): their X-Forwarded-For names the client that rate limits count by.
    trusted_proxies: list[str] = []
    machine_storage: str = "20Gi"
    services_storage: str = "5Gi"
    storage_class: str | None = None
    nats: Infra = msgspec.field(default_factory=_nats)
    nats_service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "LoadBalancer"
    redis: Infra = msgspec.field(default_factory=_redis)
    postgres: Infra = msgspec.field(default_factory=_postgres)
    lightning: Lightning | None = None
    mint: bool = True  # needs ``lightning``
    founders: int = 0  # the first ``founders`` members founded the guild (0: all of them)
    pin: GuildPin | None = None  # a member that joined: the guild's first key

    @property
    def me(self) -> int:
        return [m.name for m in self.members].index(self.operator)

    @property
    def machines(self) -> int:
        """This member's machines."""
        return self.members[self.me].machines

    def layout(self) -> Layout:
        """The guild layout every member holds alike (services.replica.config)."""
        return Layout(
            self.guild,
            self.shards,
            tuple(
                Member(
                    m.name,
                    bytes.fromhex(m.key),
                    frozenset(bytes.fromhex(k) for k in m.issuers),
                    m.nats,
                    m.machines,
                )
                for m in self.members
            ),
            tuple(
                Neighbour(n.name, n.guild, bytes.fromhex(n.key), n.nats) for n in self.neighbours
            ),
            self.founders,
        )


def _hex(value: str, size: int, what: str) -> bytes:
    try:
        data = bytes.fromhex(value)
    except ValueError:
        raise BadGuild(f"{what} is not hex") from None
    if len(data) != size:
        raise BadGuild(f"{what} must be {size} bytes")
    return data


def read_spec(doc: Any) -> GuildSpec:
    """The Guild's ``spec``, or BadGuild saying what is wrong with it."""
    try:
        spec = msgspec.convert(doc, GuildSpec)
    except msgspec.ValidationError as exc:
        raise BadGuild(f"spec: {exc}") from None
    names = [m.name for m in spec.members]
    if spec.operator not in names:
        raise BadGuild(f"spec.operator {spec.operator!r} is not one of spec.members")
    if len(spec.members) < 2:
        raise BadGuild("a guild has at least two members")
    if not 1 <= spec.threshold <= len(spec.members):
        raise BadGuild("spec.threshold must be between 1 and the number of members")
    if not 1 <= spec.shards <= 256:
        raise BadGuild("spec.shards must be in 1..256")
    if spec.network not in NETWORKS:
        raise BadGuild(f"spec.network must be one of {', '.join(NETWORKS)}")
    try:
        env_networks({"P": ",".join(spec.trusted_proxies)}, "P")
    except ConfigError as exc:
        raise BadGuild(f"spec.trustedProxies: {exc}") from None
    if spec.mint and spec.lightning is None:
        raise BadGuild("the mint needs spec.lightning (it pays and is paid over Lightning)")
    for name in [*names, *(n.name for n in spec.neighbours)]:
        if not OPERATOR_RE.match(name):
            raise BadGuild(f"operator name {name!r} must match {OPERATOR_RE.pattern}")
    for m in spec.members:
        keys = [_hex(m.key, 32, f"member {m.name}: key")]
        keys += [_hex(k, 32, f"member {m.name}: issuer") for k in m.issuers]
        if not all(is_valid_xonly(k) for k in keys):
            raise BadGuild(f"member {m.name}: a key is not a BIP340 public key")
        _hex(m.signer_key, 33, f"member {m.name}: signerKey")
    try:
        Layout.from_json(spec.layout().to_json())  # the services' own checks
        if spec.pin is not None:
            pin_env(spec.pin, len(spec.members))
    except ValueError as exc:
        raise BadGuild(str(exc)) from None
    return spec


def pin_env(pin: GuildPin, members: int) -> str:
    """``INDEXER_GUILD_PIN`` for ``pin`` (ConfigError where the indexer would refuse it)."""
    text = json.dumps({"key": pin.key, "threshold": pin.threshold, "members": pin.members})
    guild_pin(text, members)
    return text


def check_keys(spec: GuildSpec, operator_key: str, issuer_key: str) -> None:
    """The keys Secret holds this member's operator key, and an issuer it lists."""
    member = spec.members[spec.me]
    try:
        operator = SigningKey(bytes.fromhex(operator_key))
        issuer = SigningKey(bytes.fromhex(issuer_key))
    except ValueError:
        raise BadGuild(f"Secret {spec.secrets.keys}: keys must be 32-byte secrets in hex") from None
    if operator.pubkey.hex() != member.key:
        raise BadGuild(
            f"Secret {spec.secrets.keys}: operator-key is not member {member.name}'s key"
        )
    if issuer.pubkey.hex() not in member.issuers:
        raise BadGuild(
            f"Secret {spec.secrets.keys}: issuer-key is not one of member {member.name}'s issuers"
        )
