"""A Guild, rendered: every object one operator's part of the guild needs.

Pure: the same Guild gives the same objects, and no secret value appears in them
(containers read the generated secrets and the member's keys by reference; NATS reads
its users' passwords from its environment).

The workloads:

* the **machines** (``services.replica``): one StatefulSet each, one replica, its own
  volume. Each holds one copy of every shard of every operator, so the two must be on
  different nodes (a required anti-affinity), on the nodes set aside for them (a node
  selector and a toleration of their taint), with whole CPUs and requests equal to
  limits (Guaranteed QoS, so the kubelet's static CPU manager pins them). A disruption
  budget lets at most one be down by choice.
* the **services** pod: the signer, the indexer, the gateway and, with Lightning,
  lightningd and the mint. They share a volume and a socket: the indexer and the mint
  ask the signer as its identity (its state folder), and lightningd serves its JSON-RPC
  only on a unix socket that the gateway and the mint use.
* NATS (its users: the operator's own services, and each peer, allowed to publish only
  as itself), Redis and PostgreSQL, unless the Guild names external ones.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from typing import Any

from constellation.crypto.dkg import hostpubkey_gen
from services.operator.spec import Amount, GuildSpec, Image, Infra, pin_env
from services.replica.transport import peer_permissions

Obj = dict[str, Any]

PART_OF = "constellation"
MANAGED_BY = "constellation-operator"
ROLE = "constellation.dev/role"
GUILD = "constellation.dev/guild"
MACHINE = "constellation.dev/machine"
DEDICATED = "constellation.dev/dedicated"  # the taint of the machines' nodes
UID = 10001
# The users the images of Redis and PostgreSQL (Docker's official ones) run their
# servers as; NATS's image names none, and its server runs as any.
IMAGE_UIDS = {"nats": UID, "redis": 999, "postgres": 999}
# What NATS, Redis and PostgreSQL are given where the Guild does not say (Infra.resources).
INFRA_RESOURCES = {
    "nats": Amount(cpu="250m", memory="512Mi"),
    "redis": Amount(cpu="100m", memory="256Mi"),
    "postgres": Amount(cpu="500m", memory="1Gi"),
}

STATE = "/var/lib/constellation"
LAYOUT_DIR = "/etc/constellation/layout"
PEERS_DIR = "/etc/constellation/peers"
RPC_DIR = "/run/lightning"
RPC = f"{RPC_DIR}/lightning-rpc"
NATS_PORT = 4222
NATS_MONITOR_PORT = 8222
# The services pod's containers share its network: each its own port.
PORTS = {"machine": 8080, "gateway": 8080, "signer": 8081, "indexer": 8082, "mint": 8083}

# The keys of the Secret the operator generates for each Guild (random, made once).
NATS_SELF = "nats-self"
REDIS_PASSWORD = "redis"
POSTGRES_PASSWORD = "postgres"
SIGNER_STORAGE = "signer-storage"
SIGNER_CLIENT = "signer-client"  # the key the indexer asks the signer with
SIGNER_CLIENT_PUB = "signer-client-pub"  # its public key: the signer's SIGNER_CLIENT_KEYS
MINT_STORAGE = "mint-storage"
CONSOLE_TOKEN = "console-token"


def generated_values(keys: Sequence[str], have: dict[str, str]) -> dict[str, str]:
    """New values for the generated Secret's ``keys`` (``have``: the values it holds):
    the storage keys and the client key are 32 random bytes in hex (the client key's
    public key goes with it); a password starts with a letter, because NATS reads a
    password from its environment as a value of its configuration, and one of only
    digits would be a number."""
    made = {}
    for key in keys:
        entropy = secrets.token_bytes(32)
        if key in (SIGNER_STORAGE, SIGNER_CLIENT, MINT_STORAGE):
            made[key] = entropy.hex()
        elif key != SIGNER_CLIENT_PUB:
            made[key] = "p" + entropy.hex()
    if SIGNER_CLIENT_PUB in keys:
        client = made.get(SIGNER_CLIENT) or have[SIGNER_CLIENT]
        made[SIGNER_CLIENT_PUB] = hostpubkey_gen(bytes.fromhex(client)).hex()
    return made


def issued_key(peer: str) -> str:
    """The generated Secret's key for the NATS password this operator issued ``peer``."""
    return f"issued-{peer}"


def issued_env(peer: str) -> str:
    return "ISSUED_" + peer.upper().replace("-", "_")


def generated_keys(spec: GuildSpec) -> list[str]:
    """Every key the generated Secret must hold for ``spec``."""
    peers = [m.name for m in spec.members if m.name != spec.operator]
    peers += [n.name for n in spec.neighbours]
    fixed = [NATS_SELF, REDIS_PASSWORD, POSTGRES_PASSWORD, SIGNER_STORAGE, MINT_STORAGE]
    fixed += [CONSOLE_TOKEN, SIGNER_CLIENT, SIGNER_CLIENT_PUB]
    return fixed + [issued_key(p) for p in peers]


# A Guild's name, at most: each object's name is made from it, and a StatefulSet's pods
# are labelled with its name ("<guild>-machine-NN") and a revision hash of 10 more, in a
# label of 63 characters at most (the chart's values and the CRD say the same)
MAX_NAME = 41


class Names:
    """The names of a Guild's objects: each starts with the Guild's own."""

    def __init__(self, guild: str) -> None:
        self.guild = guild
        self.layout = f"{guild}-layout"
        self.generated = f"{guild}-generated"
        self.nats = f"{guild}-nats"
        self.redis = f"{guild}-redis"
        self.postgres = f"{guild}-postgres"
        self.machines = f"{guild}-machines"
        self.services = f"{guild}-services"

    def machine(self, index: int) -> str:
        return f"{self.guild}-machine-{index}"


def labels(guild: str, role: str, **more: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": role,
        "app.kubernetes.io/instance": guild,
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        GUILD: guild,
        ROLE: role,
        **more,
    }


def _meta(name: str, namespace: str, lab: dict[str, str], owner: Obj) -> Obj:
    return {"name": name, "namespace": namespace, "labels": lab, "ownerReferences": [owner]}


def owner_reference(guild: Obj) -> Obj:
    meta = guild["metadata"]
    return {
        "apiVersion": guild["apiVersion"],
        "kind": guild["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _secret_env(name: str, secret: str, key: str) -> Obj:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _value(name: str, value: str) -> Obj:
    """An environment variable. An empty one has no value, as an API server stores it
    (the container has it all the same, empty): written otherwise, what the API server
    answers never covers it, and the operator would apply it again at every reconcile."""
    return {"name": name, "value": value} if value else {"name": name}


def _probes(port: int) -> Obj:
    return {
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": port},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": port},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
    }


def _hardened() -> Obj:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _pod_basics(uid: int = UID) -> Obj:
    """What every pod of the guild has: a hardened security context (not root: ``uid``,
    which owns its volumes), no token for the Kubernetes API (nothing in it talks to the
    API; NATS faces the internet), no service links in its environment, and time to
    drain."""
    return {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": uid,
            "fsGroup": uid,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 60,
    }


def _pvc(name: str, size: str, spec: GuildSpec) -> Obj:
    claim: Obj = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}
    if spec.storage_class:
        claim["storageClassName"] = spec.storage_class
    return {"metadata": {"name": name}, "spec": claim}


class Renderer:
    """Renders one Guild (``name`` in ``namespace``, owned by ``owner``)."""

    def __init__(
        self,
        name: str,
        namespace: str,
        spec: GuildSpec,
        owner: Obj,
        machines: Sequence[int] | None = None,
        *,
        image: Image,
    ) -> None:
        """``machines``: the machines to run, where others than the first
        ``spec.machines`` still hold copies (``reconcile.moves``). ``image``: the
        operator's own, under what ``spec.image`` leaves out."""
        self.n = Names(name)
        self.namespace = namespace
        self.spec = spec
        self.owner = owner
        self.machines = list(range(spec.machines) if machines is None else machines)
        self.image = spec.image.over(image)

    def meta(self, name: str, role: str, **more: str) -> Obj:
        return _meta(name, self.namespace, labels(self.n.guild, role, **more), self.owner)

    def objects(self) -> list[Obj]:
        """Every object, in the order to apply them (configuration before workloads)."""
        objs = [self.layout()]
        for infra, make in (
            (self.spec.nats, self.nats),
            (self.spec.redis, self.redis),
            (self.spec.postgres, self.postgres),
        ):
            if infra.external is None:
                objs += make()
        objs += [self.machines_service(), self.machines_budget()]
        objs += [self.machine(m) for m in self.machines]
        objs += [self.services_service(), self.services()]
        return objs

    # -- configuration

    def layout(self) -> Obj:
        spec = self.spec
        members = {"guild": spec.guild, "members": [m.signer_key for m in spec.members]}
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": self.meta(self.n.layout, "layout"),
            "data": {
                "layout.json": json.dumps(spec.layout().to_json(), indent=2, sort_keys=True),
                "members.json": json.dumps(members, indent=2),
            },
        }

    def _urls(self) -> list[Obj]:
        """The environment every service's container starts with: its servers' URLs
        (with credentials read from Secrets, and expanded by the kubelet)."""
        env = [_secret_env("NATS_PASSWORD", self.n.generated, NATS_SELF)]
        env.append(_value("NATS_URL", f"nats://self:$(NATS_PASSWORD)@{self.n.nats}:{NATS_PORT}"))
        for var, infra, key, url in (
            (
                "REDIS",
                self.spec.redis,
                REDIS_PASSWORD,
                f"redis://:$(REDIS_PASSWORD)@{self.n.redis}:6379/0",
            ),
            (
                "DATABASE",
                self.spec.postgres,
                POSTGRES_PASSWORD,
                f"postgresql://constellation:$(DATABASE_PASSWORD)@{self.n.postgres}:5432/"
                "constellation",
            ),
        ):
            if infra.external is not None:
                env.append(_secret_env(f"{var}_URL", infra.external.secret, infra.external.key))
            else:
                env.append(_secret_env(f"{var}_PASSWORD", self.n.generated, key))
                env.append(_value(f"{var}_URL", url))
        if self.spec.nats.external is not None:
            ext = self.spec.nats.external
            env[:2] = [_secret_env("NATS_URL", ext.secret, ext.key)]
        return env

    # -- infrastructure

    def _infra(
        self,
        name: str,
        role: str,
        infra: Infra,
        container: Obj,
        volumes: list[Obj],
        claim: bool,
    ) -> Obj:
        """A server's StatefulSet: its container hardened and given its resources, its
        pod as every pod of the guild, not root (the user its image runs the server as),
        its root filesystem read-only: what it writes is on its volumes."""
        res = infra.resources or INFRA_RESOURCES[role]
        amount = {"cpu": str(res.cpu), "memory": res.memory}
        container = container | {
            "resources": {"requests": amount, "limits": {"memory": res.memory}},
            "securityContext": _hardened(),
        }
        return {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": self.meta(name, role),
            "spec": {
                "serviceName": name,
                "replicas": 1,
                "selector": {"matchLabels": {GUILD: self.n.guild, ROLE: role}},
                "template": {
                    "metadata": {"labels": labels(self.n.guild, role)},
                    "spec": {
                        **_pod_basics(IMAGE_UIDS[role]),
                        "containers": [container],
                        "volumes": volumes,
                    },
                },
                "volumeClaimTemplates": [_pvc("data", infra.storage, self.spec)] if claim else [],
            },
        }

    def _service(self, name: str, role: str, ports: list[Obj], kind: str = "ClusterIP") -> Obj:
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": self.meta(name, role),
            "spec": {
                "type": kind,
                "selector": {GUILD: self.n.guild, ROLE: role},
                "ports": ports,
            },
        }

    def nats_config(self) -> str:
        """The NATS server's configuration: the operator's own services as ``self``, and
        each peer publishing only as itself; passwords come from the environment."""
        users = ["{user: self, password: $NATS_SELF}"]
        peers = [(m.name, True) for m in self.spec.members if m.name != self.spec.operator]
        peers += [(n.name, False) for n in self.spec.neighbours]
        for peer, member in peers:
            perms = json.dumps(peer_permissions(peer, member))
            password = f"${issued_env(peer)}"
            users.append(
                f"{{user: {json.dumps(peer)}, password: {password}, permissions: {perms}}}"
            )
        body = ",\n    ".join(users)
        return (
            f"port: {NATS_PORT}\nhttp_port: {NATS_MONITOR_PORT}\n"
            'jetstream: {store_dir: "/data"}\n'
            f"authorization: {{\n  users: [\n    {body}\n  ]\n}}\n"
        )

    def nats(self) -> list[Obj]:
        name = self.n.nats
        peers = [m.name for m in self.spec.members if m.name != self.spec.operator]
        peers += [n.name for n in self.spec.neighbours]
        env = [_secret_env("NATS_SELF", self.n.generated, NATS_SELF)]
        env += [_secret_env(issued_env(p), self.n.generated, issued_key(p)) for p in peers]
        container = {
            "name": "nats",
            "image": self.spec.nats.image,
            "args": ["-c", "/etc/nats/nats.conf"],
            "env": env,
            "ports": [
                {"name": "client", "containerPort": NATS_PORT},
                {"name": "monitor", "containerPort": NATS_MONITOR_PORT},
            ],
            "volumeMounts": [
                {"name": "config", "mountPath": "/etc/nats"},
                {"name": "data", "mountPath": "/data"},
            ],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": NATS_MONITOR_PORT}},
        }
        config = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": self.meta(name, "nats"),
            "data": {"nats.conf": self.nats_config()},
        }
        volumes = [{"name": "config", "configMap": {"name": name}}]
        client = [{"name": "client", "port": NATS_PORT, "targetPort": "client"}]
        return [
            config,
            self._infra(name, "nats", self.spec.nats, container, volumes, claim=True),
            # Where the peers deliver what they send: reachable from outside the cluster.
            self._service(name, "nats", client, self.spec.nats_service_type),
        ]

    def redis(self) -> list[Obj]:
        name = self.n.redis
        container = {
            "name": "redis",
            "image": self.spec.redis.image,
            # Redis holds what is rebuildable (idempotency keys, rate limits, caches).
            "args": ["--requirepass", "$(REDIS_PASSWORD)", "--save", ""],
            "env": [_secret_env("REDIS_PASSWORD", self.n.generated, REDIS_PASSWORD)],
            "ports": [{"name": "redis", "containerPort": 6379}],
            "volumeMounts": [{"name": "data", "mountPath": "/data"}],  # its working folder
            "readinessProbe": {"tcpSocket": {"port": 6379}},
        }
        ports = [{"name": "redis", "port": 6379, "targetPort": "redis"}]
        scratch = [{"name": "data", "emptyDir": {}}]
        return [
            self._infra(name, "redis", self.spec.redis, container, scratch, claim=False),
            self._service(name, "redis", ports),
        ]

    def postgres(self) -> list[Obj]:
        name = self.n.postgres
        container = {
            "name": "postgres",
            "image": self.spec.postgres.image,
            "env": [
                _value("POSTGRES_USER", "constellation"),
                _value("POSTGRES_DB", "constellation"),
                _value("PGDATA", "/var/lib/postgresql/data/pgdata"),
                _secret_env("POSTGRES_PASSWORD", self.n.generated, POSTGRES_PASSWORD),
            ],
            "ports": [{"name": "postgres", "containerPort": 5432}],
            "volumeMounts": [
                {"name": "data", "mountPath": "/var/lib/postgresql/data"},
                {"name": "socket", "mountPath": "/var/run/postgresql"},
                {"name": "tmp", "mountPath": "/tmp"},
            ],
            "readinessProbe": {"exec": {"command": ["pg_isready", "-U", "constellation"]}},
        }
        ports = [{"name": "postgres", "port": 5432, "targetPort": "postgres"}]
        scratch = [{"name": "socket", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]
        return [
            self._infra(name, "postgres", self.spec.postgres, container, scratch, claim=True),
            self._service(name, "postgres", ports),
        ]

    # -- the machines

    def machines_service(self) -> Obj:
        service = self._service(
            self.n.machines, "machine", [{"name": "http", "port": PORTS["machine"]}]
        )
        service["spec"]["clusterIP"] = "None"
        return service

    def machines_budget(self) -> Obj:
        return {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": self.meta(self.n.machines, "machine"),
            "spec": {
                "maxUnavailable": 1,
                "selector": {"matchLabels": {GUILD: self.n.guild, ROLE: "machine"}},
            },
        }

    def _config_volumes(self) -> list[Obj]:
        return [
            {"name": "layout", "configMap": {"name": self.n.layout}},
            {"name": "peers", "secret": {"secretName": self.spec.secrets.peers}},
        ]

    def _config_mounts(self) -> list[Obj]:
        return [
            {"name": "layout", "mountPath": LAYOUT_DIR, "readOnly": True},
            {"name": "peers", "mountPath": PEERS_DIR, "readOnly": True},
            {"name": "state", "mountPath": STATE},
        ]

    def machine(self, index: int) -> Obj:
        spec = self.spec
        res = spec.machine_resources
        amount = {"cpu": str(res.cpu), "memory": res.memory}
        port = PORTS["machine"]
        env = [
            *self._urls(),
            _value("REPLICA_LAYOUT", f"{LAYOUT_DIR}/layout.json"),
            _value("REPLICA_OPERATOR", spec.operator),
            _value("REPLICA_MACHINE", str(index)),
            _secret_env("REPLICA_KEY", spec.secrets.keys, "operator-key"),
            _value("REPLICA_NATS_URL", "$(NATS_URL)"),
            _value("REPLICA_PEERS", f"{PEERS_DIR}/peers.json"),
            _value("REPLICA_STATE_DIR", STATE),
            _value("REPLICA_HTTP_ADDR", f"0.0.0.0:{port}"),
        ]
        container = {
            "name": "machine",
            "image": self.image.ref,
            "imagePullPolicy": self.image.pull_policy,
            "args": ["services.replica"],
            "env": env,
            "ports": [{"name": "http", "containerPort": port}],
            "resources": {"requests": amount, "limits": amount},
            "volumeMounts": self._config_mounts(),
            "securityContext": _hardened(),
            **_probes(port),
        }
        pod_labels = labels(self.n.guild, "machine", **{MACHINE: str(index)})
        same_guild_machines = {"matchLabels": {GUILD: self.n.guild, ROLE: "machine"}}
        return {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": self.meta(self.n.machine(index), "machine", **{MACHINE: str(index)}),
            "spec": {
                "serviceName": self.n.machines,
                "replicas": 1,
                "podManagementPolicy": "Parallel",
                "selector": {
                    "matchLabels": {GUILD: self.n.guild, ROLE: "machine", MACHINE: str(index)}
                },
                "template": {
                    "metadata": {"labels": pod_labels},
                    "spec": {
                        "nodeSelector": {ROLE: "machine"},
                        "tolerations": [
                            {
                                "key": DEDICATED,
                                "operator": "Equal",
                                "value": "machine",
                                "effect": "NoSchedule",
                            }
                        ],
                        "affinity": {
                            "podAntiAffinity": {
                                "requiredDuringSchedulingIgnoredDuringExecution": [
                                    {
                                        "labelSelector": same_guild_machines,
                                        "topologyKey": "kubernetes.io/hostname",
                                    }
                                ]
                            }
                        },
                        **_pod_basics(),
                        "containers": [container],
                        "volumes": self._config_volumes(),
                    },
                },
                "volumeClaimTemplates": [_pvc("state", spec.machine_storage, spec)],
            },
        }

    # -- the services pod

    def services_service(self) -> Obj:
        ports = [
            {"name": c, "port": PORTS[c]}
            for c in ("gateway", "signer", "indexer", "mint")
            if c != "mint" or self.spec.mint
        ]
        return self._service(self.n.services, "services", ports)

    def _console_targets(self) -> str:
        """The operator console's view: the services in this pod, and every machine (the
        machines' headless Service, resolved when the console is asked: machines come
        and go without a restart of the gateway)."""
        local = [
            c for c in ("gateway", "signer", "indexer", "mint") if c != "mint" or self.spec.mint
        ]
        targets = [f"{c}=http://127.0.0.1:{PORTS[c]}" for c in local]
        targets.append(f"machine=dns+http://{self.n.machines}:{PORTS['machine']}")
        return ",".join(targets)

    def _service_container(self, name: str, env: list[Obj], mounts: list[Obj]) -> Obj:
        res = {"cpu": "250m", "memory": "512Mi"}
        if name == "gateway":  # the busiest: every payment passes through it
            res = {
                "cpu": str(self.spec.gateway_resources.cpu),
                "memory": self.spec.gateway_resources.memory,
            }
        return {
            "name": name,
            "image": self.image.ref,
            "imagePullPolicy": self.image.pull_policy,
            "args": [f"services.{'ecash' if name == 'mint' else name}"],
            "env": env,
            "ports": [{"name": name, "containerPort": PORTS[name]}],
            "resources": {"requests": res, "limits": {"memory": res["memory"]}},
            "volumeMounts": mounts,
            "securityContext": _hardened(),
            **_probes(PORTS[name]),
        }

    def services(self) -> Obj:
        spec = self.spec
        keys = spec.secrets.keys
        gen = self.n.generated
        signer_dir = f"{STATE}/signer"
        vouch = f"cst.{spec.operator}.vouch"
        layout = f"{LAYOUT_DIR}/layout.json"
        members = f"{LAYOUT_DIR}/members.json"
        peers = f"{PEERS_DIR}/peers.json"
        # the state volume (the signer's identity and share) is the signer's alone
        mounts = [m for m in self._config_mounts() if m["name"] != "state"]
        rpc_mount = [{"name": "rpc", "mountPath": RPC_DIR}]
        signer_access = [
            _value("INDEXER_SIGNER_NATS_URL", "$(NATS_URL)"),
            _value("INDEXER_SIGNER_MEMBERS", members),
            _value("INDEXER_SIGNER_PUBKEY", spec.members[spec.me].signer_key),
            _secret_env("INDEXER_SIGNER_CLIENT_KEY", gen, SIGNER_CLIENT),
        ]
        containers = [
            self._service_container(
                "signer",
                [
                    *self._urls(),
                    _value("SIGNER_NATS_URL", "$(NATS_URL)"),
                    _value("SIGNER_MEMBERS", members),
                    _value("SIGNER_STATE_DIR", signer_dir),
                    _secret_env("SIGNER_STORAGE_KEY", gen, SIGNER_STORAGE),
                    _secret_env("SIGNER_CLIENT_KEYS", gen, SIGNER_CLIENT_PUB),
                    _value("SIGNER_HTTP_ADDR", f"0.0.0.0:{PORTS['signer']}"),
                    _value("SIGNER_NAMES", ",".join(m.name for m in spec.members)),
                    _value("SIGNER_PEERS", peers),
                    _value("SIGNER_VOUCH_SUBJECT", vouch),
                ],
                self._config_mounts(),
            ),
            self._service_container(
                "indexer",
                [
                    *self._urls(),
                    _value("INDEXER_OPERATOR", spec.operator),
                    _value("INDEXER_NATS_URL", "$(NATS_URL)"),
                    _value("INDEXER_DATABASE_URL", "$(DATABASE_URL)"),
                    _value("INDEXER_HTTP_ADDR", f"0.0.0.0:{PORTS['indexer']}"),
                    _value("INDEXER_LAYOUT", layout),
                    _value("INDEXER_PEERS", peers),
                    _value("INDEXER_VOUCH_SUBJECT", vouch),
                    *signer_access,
                    *(
                        [_value("INDEXER_GUILD_PIN", pin_env(spec.pin, len(spec.members)))]
                        if spec.pin is not None
                        else []
                    ),
                ],
                mounts,
            ),
        ]
        gateway_env = [
            *self._urls(),
            _value("GATEWAY_OPERATOR", spec.operator),
            _value("GATEWAY_NATS_URL", "$(NATS_URL)"),
            _value("GATEWAY_REDIS_URL", "$(REDIS_URL)"),
            _value("GATEWAY_DATABASE_URL", "$(DATABASE_URL)"),
            _value("GATEWAY_HTTP_ADDR", f"0.0.0.0:{PORTS['gateway']}"),
            _value("GATEWAY_NETWORK", spec.network),
            _value("GATEWAY_TRUSTED_PROXIES", ",".join(spec.trusted_proxies)),
            _value("GATEWAY_LAYOUT", layout),
            _secret_env("GATEWAY_CONSOLE_TOKEN", gen, CONSOLE_TOKEN),
            _value("GATEWAY_CONSOLE_TARGETS", self._console_targets()),
        ]
        volumes = self._config_volumes()
        claims = [_pvc("state", spec.services_storage, spec)]
        if spec.lightning is not None:
            gateway_env += [
                _value("GATEWAY_LIGHTNING_RPC", RPC),
                _secret_env("GATEWAY_OPERATOR_KEY", keys, "operator-key"),
                _secret_env("GATEWAY_ISSUER_KEY", keys, "issuer-key"),
                _value("GATEWAY_PEERS", peers),
            ]
            containers.append(self.lightningd())
            volumes.append({"name": "rpc", "emptyDir": {}})
            if spec.lightning.config is not None:
                volumes.append(
                    {
                        "name": "lightning-config",
                        "secret": {
                            "secretName": spec.lightning.config,
                            "items": [{"key": "config", "path": "config"}],
                        },
                    }
                )
            claims.append(_pvc("lightning", spec.lightning.storage, spec))
        containers.append(
            self._service_container(
                "gateway", gateway_env, mounts + (rpc_mount if spec.lightning else [])
            )
        )
        if spec.mint:
            containers.append(
                self._service_container(
                    "mint",
                    [
                        *self._urls(),
                        _value("MINT_OPERATOR", spec.operator),
                        _value("MINT_DATABASE_URL", "$(DATABASE_URL)"),
                        _value("MINT_REDIS_URL", "$(REDIS_URL)"),
                        _value("MINT_LIGHTNING_RPC", RPC),
                        _secret_env("MINT_STORAGE_KEY", gen, MINT_STORAGE),
                        _value("MINT_HTTP_ADDR", f"0.0.0.0:{PORTS['mint']}"),
                        _value("MINT_GATEWAY_URL", f"http://127.0.0.1:{PORTS['gateway']}"),
                        _secret_env("MINT_ISSUER_KEY", keys, "issuer-key"),
                        _value("MINT_NETWORK", spec.network),
                        _value("MINT_TRUSTED_PROXIES", ",".join(spec.trusted_proxies)),
                    ],
                    mounts + rpc_mount,
                )
            )
        return {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": self.meta(self.n.services, "services"),
            "spec": {
                "serviceName": self.n.services,
                "replicas": 1,
                "selector": {"matchLabels": {GUILD: self.n.guild, ROLE: "services"}},
                "template": {
                    "metadata": {"labels": labels(self.n.guild, "services")},
                    "spec": {
                        **_pod_basics(),
                        "containers": containers,
                        "volumes": volumes,
                    },
                },
                "volumeClaimTemplates": claims,
            },
        }

    def lightningd(self) -> Obj:
        lightning = self.spec.lightning
        assert lightning is not None
        network = {"main": "bitcoin", "test": "testnet"}.get(self.spec.network, self.spec.network)
        args = [
            f"--network={network}",
            "--lightning-dir=/data",
            f"--rpc-file={RPC}",
        ]
        mounts = [
            {"name": "lightning", "mountPath": "/data"},
            {"name": "rpc", "mountPath": RPC_DIR},
        ]
        if lightning.config is not None:  # bitcoind's RPC and the node's own settings
            args.append("--conf=/etc/lightning/config")
            mounts.append({"name": "lightning-config", "mountPath": "/etc/lightning"})
        return {
            "name": "lightningd",
            "image": lightning.image,
            "args": args,
            "resources": {
                "requests": {"cpu": "250m", "memory": "512Mi"},
                "limits": {"memory": "1Gi"},
            },
            "volumeMounts": mounts,
        }
