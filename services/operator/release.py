"""``python -m services.operator.release``: what the chart runs before ``helm uninstall``
deletes the operator (its pre-delete hook).

kopf puts the operator's finalizer on every Guild, GuildChange and GuildRebalance it
watches (its timers need one), and only the operator takes it off. Helm deletes the
operator with the release: a Guild deleted with it (the chart's own ``guilds``) or after
it, and the namespace it is in, would wait for ever. So the hook first stops the
operator (its Deployment scaled to none, until no pod of it runs: a running one puts
the finalizer back), then takes the finalizer off each resource it watched.

The Guilds keep running, no longer managed (``helm install`` again takes them back). One
deleted then goes at once, and its workloads with it: each is owned by it, so the
garbage collector deletes them; its volumes and its generated Secret stay, as they stay
when the operator deletes a Guild.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from services.operator.config import Settings
from services.operator.kube import Kube, KubeError
from services.operator.spec import FINALIZER
from services.runtime import ConfigError, configure_logging

KINDS = ("Guild", "GuildChange", "GuildRebalance")
POLL_S = 1.0
STOP_S = 180  # for the operator's pod to go (it has 30 s to stop; the hook's Job, 240)

_log = logging.getLogger("operator-release")


async def release(kube: Kube, deployment: str, watched: str, stop_s: float = STOP_S) -> list[str]:
    """Stop the operator (``deployment``: its Deployment, namespace/name) and take its
    finalizer off what it watched in ``watched`` ("": every namespace); what it took
    it off. TimeoutError where a pod of it still runs after ``stop_s``."""
    namespace, _, name = deployment.partition("/")
    meta = {"name": name, "namespace": namespace}
    scaled = await kube.patch({"kind": "Deployment", "metadata": meta, "spec": {"replicas": 0}})
    selector = scaled["spec"]["selector"]["matchLabels"]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + stop_s
    while pods := await kube.list("Pod", namespace, selector):
        if loop.time() > deadline:
            names = ", ".join(p["metadata"]["name"] for p in pods)
            raise TimeoutError(f"the operator's pods still run after {stop_s:g} s: {names}")
        await asyncio.sleep(POLL_S)
    released = []
    for kind in KINDS:
        for obj in await kube.list(kind, watched, {}):
            m = obj["metadata"]
            if FINALIZER not in m.get("finalizers", []):
                continue
            # resourceVersion: refused (409) where the object changed since it was read,
            # so no other finalizer put there meanwhile is lost; the Job runs it again.
            rest = [f for f in m["finalizers"] if f != FINALIZER]
            mine = {"name": m["name"], "namespace": m["namespace"]}
            patch = mine | {"finalizers": rest, "resourceVersion": m["resourceVersion"]}
            await kube.patch({"kind": kind, "metadata": patch})
            released.append(f"{kind} {m['namespace']}/{m['name']}")
    return released


async def _main(settings: Settings) -> None:
    kube = Kube(settings.connection)
    try:
        released = await release(kube, settings.deployment, settings.namespace)
    finally:
        await kube.close()
    _log.info("released", extra={"deployment": settings.deployment, "released": released})


def main() -> int:
    configure_logging("operator-release")
    try:
        settings = Settings.from_env(os.environ)
        if settings.deployment.count("/") != 1:
            raise ConfigError("OPERATOR_DEPLOYMENT must be NAMESPACE/NAME")
    except ConfigError as exc:
        _log.error("bad configuration", extra={"error": str(exc)})
        return 2
    try:
        asyncio.run(_main(settings))
    except (KubeError, OSError, TimeoutError) as exc:
        _log.error("not released", extra={"error": str(exc)})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
