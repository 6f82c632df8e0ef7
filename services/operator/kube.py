"""A small client of the Kubernetes API (aiohttp): get, list, create, merge-patch and
delete the kinds a Guild is made of. kopf watches the Guilds; this applies what they
render, with the same credentials."""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import kopf

from services.operator.render import Obj
from services.operator.spec import GROUP, VERSION

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TIMEOUT_S = 30

# kind -> (API path prefix, plural)
KINDS = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Secret": ("/api/v1", "secrets"),
    "Service": ("/api/v1", "services"),
    "Pod": ("/api/v1", "pods"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "StatefulSet": ("/apis/apps/v1", "statefulsets"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),
    "Guild": (f"/apis/{GROUP}/{VERSION}", "guilds"),
    "GuildChange": (f"/apis/{GROUP}/{VERSION}", "guildchanges"),
    "GuildRebalance": (f"/apis/{GROUP}/{VERSION}", "guildrebalances"),
}


class KubeError(Exception):
    def __init__(self, status: int, what: str, body: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {body[:300]}")
        self.status = status


@dataclass(frozen=True)
class Connection:
    """Where the API server is and how to prove who we are."""

    server: str
    token: str | None = None
    ca_path: str | None = None

    @staticmethod
    def in_cluster(host: str, port: str) -> Connection:
        token = (SERVICE_ACCOUNT / "token").read_text().strip()
        return Connection(f"https://{host}:{port}", token, str(SERVICE_ACCOUNT / "ca.crt"))

    def for_kopf(self) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=self.server, token=self.token, ca_path=self.ca_path)


class Kube:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        headers = {"Authorization": f"Bearer {conn.token}"} if conn.token else {}
        context = ssl.create_default_context(cafile=conn.ca_path) if conn.ca_path else None
        self._http = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=TIMEOUT_S),
            connector=aiohttp.TCPConnector(ssl=context) if context else None,
        )

    async def close(self) -> None:
        await self._http.close()

    def _url(self, kind: str, namespace: str, name: str | None = None) -> str:
        """An object's URL, or its kind's in ``namespace`` (empty: in every namespace)."""
        prefix, plural = KINDS[kind]
        where = f"/namespaces/{namespace}" if namespace else ""
        url = f"{self.conn.server}{prefix}{where}/{plural}"
        return f"{url}/{name}" if name else url

    async def _call(
        self, method: str, url: str, what: str, body: Any = None, content: str | None = None
    ) -> Any:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content or "application/json"} if data else {}
        async with self._http.request(method, url, data=data, headers=headers) as resp:
            text = await resp.text()
            if resp.status >= 400:
                raise KubeError(resp.status, what, text)
            return json.loads(text) if text else None

    async def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        try:
            obj: Obj = await self._call(
                "GET", self._url(kind, namespace, name), f"get {kind} {name}"
            )
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    async def list(self, kind: str, namespace: str, labels: dict[str, str]) -> list[Obj]:
        """Objects of ``kind`` in ``namespace`` ("": every namespace) that carry every one
        of ``labels`` (the selector is sent, and checked here again)."""
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        url = f"{self._url(kind, namespace)}?labelSelector={selector}"
        doc = await self._call("GET", url, f"list {kind}")
        items: list[Obj] = doc.get("items", [])
        for item in items:
            item.setdefault("kind", kind)
        return [
            i
            for i in items
            if all(i["metadata"].get("labels", {}).get(k) == v for k, v in labels.items())
        ]

    async def create(self, obj: Obj) -> Obj:
        meta = obj["metadata"]
        created: Obj = await self._call(
            "POST",
            self._url(obj["kind"], meta["namespace"]),
            f"create {obj['kind']} {meta['name']}",
            obj,
        )
        return created

    async def patch(self, obj: Obj) -> Obj:
        """A merge patch: what ``obj`` says replaces what is there (lists whole)."""
        meta = obj["metadata"]
        patched: Obj = await self._call(
            "PATCH",
            self._url(obj["kind"], meta["namespace"], meta["name"]),
            f"patch {obj['kind']} {meta['name']}",
            obj,
            "application/merge-patch+json",
        )
        return patched

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        try:
            await self._call("DELETE", self._url(kind, namespace, name), f"delete {kind} {name}")
        except KubeError as exc:
            if exc.status != 404:
                raise
