"""The operator's settings, from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import msgspec

from services.operator.kube import Connection
from services.operator.spec import Image
from services.runtime import ConfigError, env_addr, env_int, env_str

REPOSITORY = "ghcr.io/constellation/constellation"


@dataclass(frozen=True)
class Settings:
    connection: Connection
    namespace: str  # the one namespace whose Guilds it runs; "": every namespace
    http_host: str
    http_port: int
    resync_s: int  # between two reconciles of a Guild that nothing changed
    log_level: str
    image: Image  # its own: what the Guilds' services run unless a Guild names another
    nats_addr: str = ""  # host:port of every Guild's NATS; "": its Service (in the cluster)
    stall_s: int = 120  # a change of machines with no move ending this long is stuck
    deployment: str = ""  # namespace/name of its own Deployment (``release``), "" unknown

    @staticmethod
    def from_env(env: Mapping[str, str]) -> Settings:
        """``OPERATOR_KUBE_SERVER`` (with ``_TOKEN_FILE`` and ``_CA_FILE``) names the API
        server; without it, the operator runs in the cluster, as its service account."""
        server = env.get("OPERATOR_KUBE_SERVER", "")
        if server:
            token_file = env.get("OPERATOR_KUBE_TOKEN_FILE", "")
            try:
                token = Path(token_file).read_text().strip() if token_file else None
            except OSError as exc:
                raise ConfigError(f"OPERATOR_KUBE_TOKEN_FILE: {exc}") from None
            conn = Connection(server.rstrip("/"), token, env.get("OPERATOR_KUBE_CA_FILE") or None)
        else:
            host = env.get("KUBERNETES_SERVICE_HOST", "")
            if not host:
                raise ConfigError("set OPERATOR_KUBE_SERVER, or run in a cluster")
            try:
                conn = Connection.in_cluster(host, env.get("KUBERNETES_SERVICE_PORT", "443"))
            except OSError as exc:
                raise ConfigError(f"the service account's token: {exc}") from None
        host, port = env_addr(env, "OPERATOR_HTTP_ADDR", "0.0.0.0:8080")
        own = {
            "repository": env.get("OPERATOR_IMAGE_REPOSITORY") or REPOSITORY,
            "tag": env.get("OPERATOR_IMAGE_TAG") or version("constellation"),  # run by hand
            "pullPolicy": env.get("OPERATOR_IMAGE_PULL_POLICY") or "IfNotPresent",
        }
        try:
            image = msgspec.convert(own, Image)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"OPERATOR_IMAGE_PULL_POLICY: {exc}") from None
        return Settings(
            connection=conn,
            namespace=env.get("OPERATOR_NAMESPACE", ""),
            http_host=host,
            http_port=port,
            resync_s=env_int(env, "OPERATOR_RESYNC_S", 30, 1, 3600),
            log_level=env_str(env, "OPERATOR_LOG_LEVEL", "info"),
            image=image,
            nats_addr=env.get("OPERATOR_NATS_ADDR", ""),
            stall_s=env_int(env, "OPERATOR_STALL_S", 120, 1, 86_400),
            deployment=env.get("OPERATOR_DEPLOYMENT", ""),
        )
