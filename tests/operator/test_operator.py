"""The operator, running (kopf, its handlers, its ops server), against the Kubernetes API
emulator: a Guild created, rolled out, changed, refused, recovered, resumed after a
restart, deleted through its finalizer, and released from it before the operator goes."""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import urllib.request
from typing import Any

from prometheus_client import CollectorRegistry

from constellation.keys import SigningKey
from constellation.replication.placement import Placement
from services.operator.handlers import Reconciler
from services.operator.metrics import Metrics
from services.operator.release import release
from services.operator.render import Renderer, generated_keys
from services.operator.spec import API_VERSION, FINALIZER, Image, read_spec
from tests.operator.conftest import (
    MACHINES,
    NS,
    ROLL_S,
    WORKLOADS,
    Api,
    Kubelet,
    Running,
    VersionedEmulator,
    all_exist,
    eventually,
    example,
    gone,
    phase_is,
    template_hash,
)
from tests.operator.test_render import _member


async def create_example(api: Api) -> dict[str, Any]:
    keys, peers, guild = example()
    await api.secret(keys)
    await api.secret(peers)
    await api.create_guild(guild)
    return guild


async def test_a_guild_is_rolled_out_and_becomes_ready(api: Api, running: Running) -> None:
    guild = await create_example(api)
    await eventually(lambda: all_exist(api, WORKLOADS), "every workload exists")
    await eventually(lambda: phase_is(api, "Progressing"), "the Guild is Progressing")
    layout = await api.kube.get("ConfigMap", NS, "g1-layout")
    assert layout is not None
    spec = read_spec(guild["spec"])
    assert json.loads(layout["data"]["layout.json"]) == spec.layout().to_json()
    generated = await api.kube.get("Secret", NS, "g1-generated")
    assert generated is not None and set(generated["data"]) == set(generated_keys(spec))
    assert "ownerReferences" not in generated["metadata"]  # kept when the Guild goes
    # The finalizer holds a deletion until the operator has cleaned up.
    have = await api.guild()
    assert have is not None and "constellation.dev/operator" in have["metadata"]["finalizers"]

    await api.settle(WORKLOADS)
    await eventually(lambda: phase_is(api, "Running"), "the Guild is Running")
    ready = await api.condition("Ready")
    assert ready["status"] == "True" and ready["observedGeneration"] == 1
    have = await api.guild()
    assert have is not None
    status = have["status"]
    assert status["observedGeneration"] == 1 and status["partitionMapVersion"] == 1
    assert [m["ready"] for m in status["machines"]] == [True, True]
    assert [(m["name"], m["self"], m["credentials"]) for m in status["members"]] == [
        ("op0", True, True),
        ("op1", False, True),
        ("op2", False, True),
    ]
    assert all(m["voting"] is None for m in status["members"])  # its NATS is not read
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{running.node.ops.port}/metrics")
    text = metrics.read().decode()
    assert 'operator_reconciles_total{phase="Running"}' in text
    ready_probe = urllib.request.urlopen(f"http://127.0.0.1:{running.node.ops.port}/readyz")
    assert json.loads(ready_probe.read())["ready"] is True


NEIGHBOUR = {
    "name": "nb0",
    "guild": "g2",
    "key": "e493dbf1c10d80f3581e4904930b1404cc6c13900ee0758474fa94abe8c4cd13",
    "nats": "nats://nats.nb0.example:4222",
}


async def test_a_new_neighbour_rolls_nats_then_each_machine_one_at_a_time(api: Api) -> None:
    """Three machines: NATS, then each machine, is replaced only while every other of
    them is ready (a machine is ready once connected to NATS and caught up), the
    operator restarted in the middle carries on, and the roll completes. PostgreSQL and
    Redis read neither the layout nor NATS's users: they are not restarted."""
    keys, peers, guild = example()
    guild["spec"]["members"][0]["machines"] = 3
    machines = [*MACHINES, "g1-machine-2"]
    rolled = ["g1-nats", *machines]
    await api.secret(keys)
    await api.secret(peers)
    operator = Running(api.url)
    await operator.start()
    async with Kubelet(api) as kubelet:
        try:
            await api.create_guild(guild)
            await eventually(lambda: phase_is(api, "Running"), "the Guild is Running")
            before = {n: template_hash(await _get(api, n)) for n in rolled}
            servers = {n: await _get(api, n) for n in ("g1-postgres", "g1-redis")}
            kubelet.forget()
            await api.patch_spec({"neighbours": [NEIGHBOUR]})
            await eventually(lambda: kubelet.began, "NATS is replaced")
            layout = await api.kube.get("ConfigMap", NS, "g1-layout")
            assert layout is not None and "nb0" in layout["data"]["layout.json"]
            nats_config = await api.kube.get("ConfigMap", NS, "g1-nats")
            assert nats_config is not None and '"nb0"' in nats_config["data"]["nats.conf"]
            generated = await api.kube.get("Secret", NS, "g1-generated")
            assert generated is not None and "issued-nb0" in generated["data"]
            progressing = await eventually(lambda: _rolling(api), "the Guild says what waits")
            assert "next, one at a time" in progressing["message"]
            await eventually(lambda: len(kubelet.began) >= 2, "a machine is replaced")
            await operator.stop()
            operator = Running(api.url)
            await operator.start()

            async def done() -> bool:
                hashes = {n: template_hash(await _get(api, n)) for n in rolled}
                changed = all(hashes[n] != before[n] for n in rolled)
                return changed and not kubelet.replacing and await phase_is(api, "Running")

            await eventually(done, "every one is replaced and the Guild is Running", ROLL_S)
            for name, was in servers.items():
                now = await _get(api, name)
                assert now["spec"]["template"] == was["spec"]["template"], name
                assert now["metadata"]["generation"] == was["metadata"]["generation"], name
        finally:
            await operator.stop()
    # NATS first; the machines each once, in order unless one was still connecting to
    # NATS again as the one before it could go (``_turn``): it goes before its turn.
    assert [name for name, _ in kubelet.began][:1] == ["g1-nats"]
    assert sorted(name for name, _ in kubelet.began[1:]) == machines
    assert all(not down for _, down in kubelet.began), kubelet.began
    assert kubelet.most == 1


async def _get(api: Api, name: str) -> dict[str, Any]:
    found = await api.kube.get("StatefulSet", NS, name)
    assert found is not None, name
    return found


async def _rolling(api: Api) -> dict[str, Any] | None:
    found = await api.condition("Progressing")
    return found if found["reason"] == "RollingOut" and "next" in found["message"] else None


async def _condition_is(api: Api, kind: str, status: str) -> dict[str, Any] | None:
    found = await api.condition(kind)
    return found if found["status"] == status else None


async def _events(api: Api, reason: str) -> list[dict[str, Any]]:
    async with api.http.get(f"{api.url}/api/v1/namespaces/{NS}/events") as resp:
        items: list[dict[str, Any]] = (await resp.json())["items"]
    return [e for e in items if e.get("reason") == reason]


async def _gateway_cpu(api: Api, cpu: str) -> bool:
    pod = (await _get(api, "g1-services"))["spec"]["template"]["spec"]
    (gateway,) = [c for c in pod["containers"] if c["name"] == "gateway"]
    return bool(gateway["resources"]["requests"]["cpu"] == cpu)


def _claim_size(obj: dict[str, Any]) -> str:
    (claim,) = obj["spec"]["volumeClaimTemplates"]
    return str(claim["spec"]["resources"]["requests"]["storage"])


async def test_a_change_of_storage_waits_for_a_manual_step_and_the_rest_applies(
    api: Api, running: Running
) -> None:
    """An API server refuses an update that changes a StatefulSet's volume claims (the
    emulator does too): the operator leaves them out, applies the rest, and says what
    to do by hand, in a condition and an Event; done, the claims are the new ones."""
    async with Kubelet(api):
        await create_example(api)
        await eventually(lambda: phase_is(api, "Running"), "the Guild is Running")
        await api.patch_spec(
            {"machineStorage": "50Gi", "gatewayResources": {"cpu": 2, "memory": "2Gi"}}
        )
        await eventually(lambda: _gateway_cpu(api, "2"), "the services pod changes")
        held = await eventually(lambda: _condition_is(api, "StorageApplied", "False"), "held")
        assert held["reason"] == "ManualStepNeeded"
        for machine in MACHINES:
            assert f"StatefulSet {machine}: " in held["message"]
            assert f"expand PersistentVolumeClaim state-{machine}-0 " in held["message"]
            assert f"kubectl delete statefulset {machine} --cascade=orphan" in held["message"]
            assert _claim_size(await _get(api, machine)) == "20Gi"
        assert "state 20Gi (default class) -> 50Gi (default class)" in held["message"]
        await eventually(lambda: phase_is(api, "Running"), "Running: nothing was refused")
        await eventually(lambda: _events(api, "ManualStepNeeded"), "an Event says so")
        # The manual step (the emulator has no volumes to expand): the operator makes the
        # StatefulSets again, with the new claims.
        for machine in MACHINES:
            await api.kube.delete("StatefulSet", NS, machine)
        await eventually(lambda: _condition_is(api, "StorageApplied", "True"), "applied")
        for machine in MACHINES:
            assert _claim_size(await _get(api, machine)) == "50Gi"
        assert len(await _events(api, "ManualStepNeeded")) == 1  # said once


async def _redis_resources(api: Api) -> dict[str, Any]:
    (container,) = (await _get(api, "g1-redis"))["spec"]["template"]["spec"]["containers"]
    return dict(container["resources"])


async def test_quantities_the_api_server_rewrites_are_not_applied_again(
    api: Api, running: Running
) -> None:
    """The API server writes quantities back in their canonical form (the emulator does
    too): a Guild that writes them otherwise is applied once, not at every reconcile,
    and its volume claims are as it asks; a new quantity is applied."""
    keys, peers, guild = example()
    odd = {"cpu": "1000m", "memory": "1024Mi"}
    guild["spec"] |= {"redis": {"image": "redis:7", "resources": odd}, "machineStorage": "20480Mi"}
    await api.secret(keys)
    await api.secret(peers)
    async with Kubelet(api):
        await api.create_guild(guild)
        await eventually(lambda: phase_is(api, "Running"), "the Guild is Running")
        assert (await _redis_resources(api))["requests"] == {"cpu": "1", "memory": "1Gi"}
        assert _claim_size(await _get(api, MACHINES[0])) == "20Gi"
        updated = len(await _events(api, "Updated"))
        await asyncio.sleep(3 * running.settings.resync_s)
        assert len(await _events(api, "Updated")) == updated
        assert (await api.condition("StorageApplied"))["status"] == "True"
        await api.patch_spec({"redis": {"image": "redis:7", "resources": odd | {"memory": "2Gi"}}})

        async def grown() -> bool:
            return bool((await _redis_resources(api))["limits"] == {"memory": "2Gi"})

        await eventually(grown, "the new memory is applied")


async def _refused(api: Api, *words: str) -> str | None:
    degraded = await api.condition("Degraded")
    message = str(degraded["message"])
    return message if all(w in message for w in words) else None


# The workloads that read a ConfigMap: a new configuration restarts them.
CONFIGURED = ["g1-nats", *MACHINES, "g1-services"]


async def _hashes(api: Api) -> dict[str, str]:
    return {n: template_hash(await _get(api, n)) for n in CONFIGURED}


async def test_what_the_api_server_refuses_is_said_and_tried_again_and_the_rest_applies(
    api: Api, k8s: VersionedEmulator, running: Running
) -> None:
    """An object the API server refuses (here an admission webhook denies it) is named
    in Degraded and tried again at every reconcile; the Guild's other objects still
    apply meanwhile (NATS and the machines roll)."""
    async with Kubelet(api):
        await create_example(api)
        await eventually(lambda: phase_is(api, "Running"), "the Guild is Running")
        before = await _hashes(api)
        k8s.denied[("statefulsets", "g1-services")] = "no restart of the services today"
        await api.patch_spec({"neighbours": [NEIGHBOUR]})
        why = "no restart of the services today"
        await eventually(lambda: _refused(api, "g1-services", why), "said")

        async def rolled(names: list[str]) -> bool:
            now = await _hashes(api)
            return all(now[n] != before[n] for n in names)

        others = [n for n in CONFIGURED if n != "g1-services"]
        await eventually(lambda: rolled(others), "the others roll all the same", ROLL_S)
        assert (await _hashes(api))["g1-services"] == before["g1-services"]
        del k8s.denied[("statefulsets", "g1-services")]
        await eventually(lambda: rolled(CONFIGURED), "tried again, the services too", ROLL_S)
        await eventually(lambda: phase_is(api, "Running"), "the Guild is Running again")

        # A refused ConfigMap holds every StatefulSet: its pods would start on the
        # configuration before it, under the new one's hash.
        before = await _hashes(api)
        k8s.denied[("configmaps", "g1-layout")] = "not today"
        other = NEIGHBOUR | {"name": "nb1", "key": SigningKey(bytes([9] * 32)).pubkey.hex()}
        await api.patch_spec({"neighbours": [NEIGHBOUR, other]})
        why = await eventually(lambda: _refused(api, "g1-layout", "not today"), "said")
        assert "no StatefulSet changes until the configuration is applied" in why
        nats_config = await api.kube.get("ConfigMap", NS, "g1-nats")
        assert nats_config is not None and '"nb1"' in nats_config["data"]["nats.conf"]
        assert await _hashes(api) == before
        del k8s.denied[("configmaps", "g1-layout")]
        await eventually(lambda: rolled(CONFIGURED), "then they roll", ROLL_S)
        await eventually(lambda: phase_is(api, "Running"), "the Guild is Running again")


async def test_a_membership_change_is_refused_and_nothing_changes(
    api: Api, running: Running
) -> None:
    guild = await create_example(api)
    await eventually(lambda: all_exist(api, WORKLOADS), "every workload exists")
    await api.settle(WORKLOADS)
    await eventually(lambda: phase_is(api, "Running"), "the Guild is Running")
    layout = await api.kube.get("ConfigMap", NS, "g1-layout")
    members = copy.deepcopy(guild["spec"]["members"])[:2]
    await api.patch_spec({"members": members, "threshold": 2})
    await eventually(lambda: phase_is(api, "Degraded"), "the Guild is Degraded")
    degraded = await api.condition("Degraded")
    assert "members removed: op2" in degraded["message"] and degraded["reason"] == "Refused"
    assert (await api.condition("Ready"))["status"] == "False"
    after = await api.kube.get("ConfigMap", NS, "g1-layout")
    assert layout is not None and after is not None
    assert after["data"] == layout["data"]
    # Back to the running layout: Running again.
    await api.patch_spec({"members": guild["spec"]["members"], "threshold": 2})
    await eventually(lambda: phase_is(api, "Running"), "the Guild is Running again")


async def test_a_missing_secret_degrades_until_it_comes(api: Api, running: Running) -> None:
    keys, peers, guild = example()
    await api.secret(keys)
    await api.create_guild(guild)
    await eventually(lambda: phase_is(api, "Degraded"), "the Guild is Degraded")
    degraded = await api.condition("Degraded")
    assert "op0-peers" in degraded["message"]
    assert await api.kube.get("StatefulSet", NS, "g1-machine-0") is None
    await api.secret(peers)  # the resync picks it up: no event on the Guild is needed
    await eventually(lambda: all_exist(api, WORKLOADS), "every workload exists")


async def test_a_guild_that_cannot_be_read_says_why(api: Api, running: Running) -> None:
    keys, peers, guild = example()
    guild["spec"]["threshold"] = 5
    await api.secret(keys)
    await api.secret(peers)
    await api.create_guild(guild)
    await eventually(lambda: phase_is(api, "Degraded"), "the Guild is Degraded")
    assert "threshold" in (await api.condition("Degraded"))["message"]


async def test_a_guild_whose_name_its_pods_labels_cannot_hold_says_why(
    api: Api, running: Running
) -> None:
    """A name of 44 characters: every object passes validation, but the API server
    refuses its StatefulSets' pods (a label of the name and a hash, over 63 characters),
    and the Guild once waited for them for ever, saying it was progressing."""
    keys, peers, guild = example()
    name = guild["metadata"]["name"] = "g" * 44
    await api.secret(keys)
    await api.secret(peers)
    await api.create_guild(guild)

    async def degraded() -> dict[str, Any] | None:
        found = await api.guild(name) or {}
        conditions = found.get("status", {}).get("conditions", [])
        return next((c for c in conditions if c["type"] == "Degraded"), None)

    condition = await eventually(degraded, "the Guild says why")
    assert condition["status"] == "True" and "at most 41" in condition["message"]


async def test_a_restarted_operator_resumes(api: Api) -> None:
    first = Running(api.url)
    await first.start()
    await create_example(api)
    await eventually(lambda: all_exist(api, WORKLOADS), "every workload exists")
    await first.stop()
    # While no operator runs, a machine's StatefulSet goes (a mistaken kubectl delete).
    await api.kube.delete("StatefulSet", NS, "g1-machine-1")
    second = Running(api.url)
    await second.start()
    try:
        await eventually(lambda: all_exist(api, WORKLOADS), "the machine is back")
        await api.settle(WORKLOADS)
        await eventually(lambda: phase_is(api, "Running"), "the Guild is Running")
    finally:
        await second.stop()


async def test_deleting_a_guild_keeps_its_data(api: Api, running: Running) -> None:
    await create_example(api)
    await eventually(lambda: all_exist(api, WORKLOADS), "every workload exists")
    await api.delete_guild()
    await eventually(lambda: gone(api), "the Guild is gone")
    for name in WORKLOADS:
        assert await api.kube.get("StatefulSet", NS, name) is None, name
    assert await api.kube.get("ConfigMap", NS, "g1-layout") is None
    assert await api.kube.get("Secret", NS, "g1-generated") is not None


async def _finalized(api: Api, kind: str, name: str) -> bool:
    found = await api.kube.get(kind, NS, name)
    return found is not None and FINALIZER in found["metadata"].get("finalizers", [])


async def test_uninstall_stops_the_operator_then_releases_what_it_watched(api: Api) -> None:
    """``helm uninstall``'s pre-delete hook (``release``), with this test as the
    Deployment controller: scaled to none, the operator stops and its pod goes; only then
    is its finalizer taken off, and a Guild deleted without an operator goes at once."""
    labels = {"app.kubernetes.io/name": "constellation", "app.kubernetes.io/component": "operator"}
    meta = {"name": "r1-constellation", "namespace": NS}
    selector = {"matchLabels": labels}
    await api.kube.create(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {
                "replicas": 1,
                "selector": selector,
                "template": {"metadata": {"labels": labels}},
            },
        }
    )
    pod = "r1-constellation-5d9f-x2k4"
    running = {"name": pod, "namespace": NS, "labels": labels}
    await api.kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": running, "spec": {}})
    operator = Running(api.url)
    await operator.start()
    await create_example(api)
    change = {
        "apiVersion": API_VERSION,
        "kind": "GuildChange",
        "metadata": {"name": "op2-leaves", "namespace": NS},
        "spec": {"guild": "g1", "kind": "leave", "member": "op2", "threshold": 2},
    }
    await api.kube.create(change)
    for kind, name in (("Guild", "g1"), ("GuildChange", "op2-leaves")):
        held = functools.partial(_finalized, api, kind, name)
        await eventually(held, f"the operator holds {kind} {name}")

    happened = []

    async def deployment_controller() -> None:
        async def scaled() -> bool:
            found = await api.kube.get("Deployment", NS, meta["name"])
            return found is not None and found["spec"]["replicas"] == 0

        await eventually(scaled, "the operator is scaled to none")
        await asyncio.sleep(1)  # its pod takes a while to stop: the release waits
        await operator.stop()
        happened.append("stopped")
        await api.kube.delete("Pod", NS, pod)

    stopping = asyncio.create_task(deployment_controller())
    released = await release(api.kube, f"{NS}/{meta['name']}", "")
    assert happened == ["stopped"], "released while the operator still ran"
    await stopping
    assert sorted(released) == [f"Guild {NS}/g1", f"GuildChange {NS}/op2-leaves"]
    for kind, name in (("Guild", "g1"), ("GuildChange", "op2-leaves")):
        assert not await _finalized(api, kind, name), name
    await api.delete_guild()  # as helm deletes the chart's own Guilds, or anyone later
    await eventually(lambda: gone(api), "the Guild is gone, no operator running")


async def test_a_pod_a_node_refuses_is_reported(api: Api, running: Running) -> None:
    await create_example(api)
    await eventually(lambda: all_exist(api, WORKLOADS), "every workload exists")
    await api.settle(WORKLOADS)
    await eventually(lambda: phase_is(api, "Running"), "the Guild is Running")
    # The kubelet's CPU manager cannot give the pod whole cores: it fails admission.
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "g1-machine-0-0",
            "namespace": NS,
            "labels": {"constellation.dev/guild": "g1", "constellation.dev/role": "machine"},
        },
        "spec": {"nodeName": "node-a", "containers": [{"name": "machine", "image": "x"}]},
        "status": {"phase": "Failed", "reason": "SMTAlignmentError"},
    }
    await api.kube.create(pod)
    await eventually(lambda: phase_is(api, "Degraded"), "the Guild is Degraded")
    degraded = await api.condition("Degraded")
    assert "node node-a refused its pod: SMTAlignmentError" in degraded["message"]
    guild = await api.guild()
    assert guild is not None
    (machine,) = [m for m in guild["status"]["machines"] if m["index"] == 0]
    assert machine["node"] == "node-a" and machine["podPhase"] == "Failed"
    # Its replacement runs on a node that can pin it.
    await api.kube.delete("Pod", NS, "g1-machine-0-0")
    pod["spec"]["nodeName"] = "node-b"
    pod["status"] = {"phase": "Running"}
    await api.kube.create(pod)
    await eventually(lambda: phase_is(api, "Running"), "the Guild is Running again")


async def test_an_approved_rebalance_never_undoes_an_edit_of_the_guild_made_meanwhile(
    api: Api,
) -> None:
    """The rebalance writes the Guild's members list whole, with its member's machines
    changed: a joiner named meanwhile (the join procedure's first step) was undone. It
    writes over the Guild as it read it only: a conflict, read again, then written."""
    keys, peers, guild = example()
    await api.secret(keys)
    await api.secret(peers)
    await api.create_guild(guild)
    reconciler = Reconciler(api.kube, Metrics(CollectorRegistry()), Image("r", "t", "Never"))
    read = reconciler._placement

    async def placement(renderer: Renderer) -> Placement:  # its NATS round trip, slow
        await asyncio.sleep(0.5)
        return Placement.initial(renderer.spec.shards, 2)

    reconciler._placement = placement  # type: ignore[method-assign]
    body = {
        "apiVersion": API_VERSION,
        "kind": "GuildRebalance",
        "metadata": {"name": "rb1", "namespace": NS, "uid": "u-rb1", "generation": 1},
        "spec": {"guild": "g1", "machines": 3, "approve": True},
    }

    async def edit() -> None:
        await asyncio.sleep(0.1)
        found = await api.guild()
        assert found is not None
        await api.patch_spec({"members": [*found["spec"]["members"], _member("op3", 7)]})

    first, _ = await asyncio.gather(reconciler._reconcile_rebalance(body), edit())
    assert "refused" in str(first.get("message", "")) or first["phase"] == "Proposed", first
    again = await reconciler._reconcile_rebalance(body)
    reconciler._placement = read  # type: ignore[method-assign]
    found = await api.guild()
    assert found is not None and again["phase"] != "Proposed", again
    members = found["spec"]["members"]
    assert [m["name"] for m in members] == ["op0", "op1", "op2", "op3"]  # the joiner kept
    assert members[0]["machines"] == 3
