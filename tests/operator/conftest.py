"""The operator's tests run it against kmock's Kubernetes API emulator, with the fix-ups
a kopf operator needs from it (kmock 0.8 sets no resourceVersion, uid or generation,
answers a failed JSON-patch ``test`` with 500 where an API server says 422, leaves
``kind`` out of list replies, and names the core group ``/v1``)."""

from __future__ import annotations

import copy
import datetime
import itertools
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import jsonpatch
import kmock
import pytest
import yaml
from aiohttp import web

from services.operator.kube import KINDS
from services.operator.spec import GROUP, VERSION

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "constellation"
EXAMPLE = CHART / "examples" / "guild.yaml"


@attrs.frozen
class Invalid(kmock.KubernetesError):
    status: int = 422
    reason: str = "Invalid"
    message: str = "the patch's test failed: the object changed"


class VersionedEmulator(kmock.KubernetesEmulator):
    """kmock's emulator, keeping the bookkeeping an API server keeps."""

    _versions = itertools.count(1)

    def _key(self, request: Any) -> Any:
        return (request.resource, request.namespace, request.name)

    async def _handle(self, request: Any) -> web.StreamResponse:
        if request.resource is not None and isinstance(request.data, (dict, list)):
            try:
                self._bookkeep(request)
            except kmock.KubernetesError as exc:
                return await self._render_error(exc)
        response = await super()._handle(request)
        return response

    def _bookkeep(self, request: Any) -> None:
        version = str(next(self._versions))
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if "name" not in meta and "generateName" in meta:  # kopf's events
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:8]
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("namespace", request.namespace)
            meta["resourceVersion"] = version
            meta["generation"] = 1
            meta["creationTimestamp"] = datetime.datetime.now(datetime.UTC).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            )
            return
        if request.action != kmock.action.UPDATE or request.name is None:
            return
        key = self._key(request)
        if key not in self.objects or self.objects[key].deleted:
            return
        current = copy.deepcopy(dict(self.objects[key].raw))
        if isinstance(request.data, list):
            try:
                after = jsonpatch.apply_patch(current, request.data, in_place=False)
            except jsonpatch.JsonPatchTestFailed:
                raise Invalid() from None
        else:
            after = kmock.KubernetesEmulator.Object(current)
            after.patch(request.data)
            after = dict(after.raw)
        generation = current["metadata"].get("generation", 1)
        if after.get("spec") != current.get("spec"):
            generation += 1
        if isinstance(request.data, list):
            request.data[:] = [op for op in request.data if op.get("op") != "test"]
            request.data.extend(
                [
                    {"op": "add", "path": "/metadata/resourceVersion", "value": version},
                    {"op": "add", "path": "/metadata/generation", "value": generation},
                ]
            )
        else:
            meta = request.data.setdefault("metadata", {})
            meta["resourceVersion"] = version
            meta["generation"] = generation

    async def _serve_list(self, request: Any) -> Any:
        reply: Any = await super()._serve_list(request)
        kind = KIND_OF.get(request.resource.plural)
        if kind:
            for item in reply["items"]:
                item.setdefault("kind", kind)
                item.setdefault("apiVersion", API_OF[kind])
        reply["kind"] = f"{kind}List" if kind else "List"
        reply["apiVersion"] = "v1"
        return reply

    async def _serve_version(self, request: Any) -> Any:
        reply: Any = await super()._serve_version(request)
        if reply["groupVersion"].startswith("/"):
            reply["groupVersion"] = reply["groupVersion"][1:]
        return reply


KIND_OF = {plural: kind for kind, (_, plural) in KINDS.items()} | {"guilds": "Guild"}
API_OF = {
    kind: (prefix.removeprefix("/api/").removeprefix("/apis/"))
    for kind, (prefix, _) in KINDS.items()
} | {"Guild": f"{GROUP}/{VERSION}"}


@pytest.fixture
async def k8s() -> AsyncIterator[VersionedEmulator]:
    """A running emulator that knows the built-in kinds and the Guild."""
    emulator = VersionedEmulator()
    emulator.resources.load_bundled()
    emulator.resources[f"{GROUP}/{VERSION}/guilds"] = kmock.ResourceInfo(
        kind="Guild",
        singular="guild",
        namespaced=True,
        verbs={"list", "watch", "get", "create", "update", "patch", "delete"},
        subresources={"status"},
    )
    async with emulator, kmock.Server(emulator):
        yield emulator


def example() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
