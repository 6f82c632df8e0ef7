"""``kubectl`` applies the example ``guild.yaml`` against the API emulator, and the
running operator turns it into the guild's workloads; then the example
``rebalance.yaml``, which waits, saying why (the member's NATS does not run here)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.operator.conftest import (
    CHART,
    EXAMPLE,
    WORKLOADS,
    Api,
    Running,
    VersionedEmulator,
    all_exist,
    eventually,
)

KUBECTL = shutil.which("kubectl")


def _kubeconfig(server: str, path: Path) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {"token": "unused"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester"}}],
        "current-context": "emulator",
    }
    path.write_text(json.dumps(config))
    return path


async def _kubectl(config: Path, *args: str) -> str:
    assert KUBECTL is not None
    env = {"KUBECONFIG": str(config), "HOME": str(config.parent)}
    done = await asyncio.to_thread(
        subprocess.run, [KUBECTL, *args], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(KUBECTL is None, reason="no kubectl: run scripts/setup")
async def test_kubectl_applies_the_example(
    k8s: VersionedEmulator, api: Api, running: Running, tmp_path: Path
) -> None:
    config = _kubeconfig(api.url, tmp_path / "kubeconfig")
    # The emulator serves no OpenAPI documents, which kubectl's validation would fetch.
    out = await _kubectl(config, "apply", "--validate=false", "-f", str(EXAMPLE))
    assert "guild.constellation.dev/g1 created" in out, out
    await eventually(lambda: all_exist(api, WORKLOADS), "every workload exists")

    async def reported() -> Any:
        doc = json.loads(await _kubectl(config, "get", "guilds", "g1", "-o", "json"))
        return doc.get("status", {}).get("phase")

    assert await eventually(reported, "kubectl sees the Guild's status") == "Progressing"
    sets = json.loads(await _kubectl(config, "get", "statefulsets", "-o", "json"))
    names = {i["metadata"]["name"] for i in sets["items"]}
    assert set(WORKLOADS) <= names

    out = await _kubectl(
        config, "apply", "--validate=false", "-f", str(CHART / "examples" / "rebalance.yaml")
    )
    assert "guildrebalance.constellation.dev/g1-three-machines created" in out, out

    async def rebalance() -> Any:
        doc = json.loads(await _kubectl(config, "get", "guildrebalance", "-o", "json"))
        (item,) = doc["items"]
        return item.get("status", {}).get("waitingFor")

    waiting = await eventually(rebalance, "kubectl sees the rebalance's status")
    assert waiting.startswith("the member's NATS"), waiting
