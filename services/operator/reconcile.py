"""What to do about a Guild, from what the cluster holds: pure and level-based.

``plan`` compares the rendered objects with the observed ones and says which to create
and which to patch; ``status`` says what the Guild's status is. Neither reads a clock
or the API server: the shell (``handlers``) passes the time and the observed objects
in, so a restarted operator reaches the same decisions from the same cluster.

One change is refused rather than applied: the guild's layout (its members, their keys,
the shards each runs) is what every member's copies agree on, so a running operator's
layout is never rewritten under it. A Guild whose layout differs from the one its
machines run is Degraded, saying what differs, and nothing else of it is changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.operator.render import Obj, Renderer
from services.replica.config import MACHINES

LAYOUT_FILE = "layout.json"
CONFIG_HASH = "constellation.dev/config-hash"  # on pod templates: a new one rolls them
Key = tuple[str, str]  # (kind, name)


def key_of(obj: Obj) -> Key:
    return obj["kind"], obj["metadata"]["name"]


def covers(actual: Any, desired: Any) -> bool:
    """Whether ``actual`` holds everything ``desired`` says (the API server adds
    defaults and bookkeeping, which are not differences)."""
    if isinstance(desired, dict):
        return isinstance(actual, dict) and all(
            k in actual and covers(actual[k], v) for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(desired)
            and all(covers(a, d) for a, d in zip(actual, desired, strict=True))
        )
    return bool(actual == desired)


def layout_change(running: str, wanted: str) -> str | None:
    """What differs between the layout the machines run and the Guild's, or None."""
    old, new = json.loads(running), json.loads(wanted)
    changes = []
    if old["guild"] != new["guild"]:
        changes.append(f"guild {old['guild']} -> {new['guild']}")
    if old["workers"] != new["workers"]:
        changes.append(f"shards {old['workers']} -> {new['workers']}")
    before = {m["name"]: m for m in old["members"]}
    after = {m["name"]: m for m in new["members"]}
    if added := sorted(after.keys() - before.keys()):
        changes.append(f"members added: {', '.join(added)}")
    if removed := sorted(before.keys() - after.keys()):
        changes.append(f"members removed: {', '.join(removed)}")
    changed = []
    for n in sorted(before.keys() & after.keys()):
        was, now = dict(before[n]), dict(after[n])
        machines = was.pop("machines", MACHINES), now.pop("machines", MACHINES)
        if machines[0] != machines[1]:
            changes.append(f"machines of {n}: {machines[0]} -> {machines[1]}")
        if was != now:
            changed.append(n)
    if changed:
        changes.append(f"members changed: {', '.join(changed)}")
    if any(c.startswith("machines of") for c in changes):
        changes.append("copies do not move between machines yet")
    if [m["name"] for m in old["members"]] != [m["name"] for m in new["members"]] and not (
        added or removed
    ):
        changes.append("members reordered")
    return "; ".join(changes) or None


def config_hash(objs: Sequence[Obj]) -> str:
    """A digest of the configuration the pods read at start (the layout and the NATS
    configuration): a change to it rolls the workloads that read it."""
    data = [o["data"] for o in objs if o["kind"] == "ConfigMap"]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Plan:
    create: list[Obj] = field(default_factory=list)
    patch: list[Obj] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # machines whose change waits its turn
    refused: str | None = None  # why nothing is applied


def plan(renderer: Renderer, observed: Mapping[Key, Obj]) -> Plan:
    """What to create and what to patch so that the cluster holds the rendered Guild."""
    objs = renderer.objects()
    layout = objs[0]
    assert layout["kind"] == "ConfigMap" and LAYOUT_FILE in layout["data"]
    running = observed.get(key_of(layout))
    if running is not None:
        change = layout_change(running["data"][LAYOUT_FILE], layout["data"][LAYOUT_FILE])
        if change is not None:
            return Plan(
                refused=(
                    f"the guild's layout cannot change under running machines ({change}): "
                    "a membership change goes through the guild's own procedure"
                )
            )
    digest = config_hash(objs)
    machines = {renderer.n.machine(m) for m in range(renderer.spec.machines)}
    out = Plan()
    for obj in objs:
        if obj["kind"] == "StatefulSet":
            template = obj["spec"]["template"]["metadata"]
            template["annotations"] = {CONFIG_HASH: digest}
        have = observed.get(key_of(obj))
        if have is None:
            out.create.append(obj)
        elif covers(have, obj):
            continue
        elif obj["metadata"]["name"] in machines and not _machine_turn(
            obj, out, observed, machines
        ):
            out.waiting.append(obj["metadata"]["name"])
        else:
            out.patch.append(obj)
    return out


def _machine_turn(machine: Obj, out: Plan, observed: Mapping[Key, Obj], machines: set[str]) -> bool:
    """Whether ``machine``'s change may go now: the member's machines change one at a
    time, each once the others run what they should (ready and up to date), so that
    one of the member's two copies of every shard is always up. (A disruption budget
    limits evictions only, not a rollout.) Where no machine is ready there is nothing
    to keep up: the change goes (it may be what mends them)."""
    name = machine["metadata"]["name"]
    states = {m: _workload_state(observed.get(("StatefulSet", m))) for m in machines}
    if not any(ready for ready, _ in states.values()):
        return True
    if any(o["metadata"]["name"] in machines for o in out.patch):
        return False
    return all(settled for m, (_, settled) in states.items() if m != name)


# -- status


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str


def _workload_state(obj: Obj | None) -> tuple[bool, bool]:
    """(ready, settled) of a StatefulSet: all its replicas ready, and its controller
    has seen its last spec and updated every replica to it."""
    if obj is None:
        return False, False
    want = obj.get("spec", {}).get("replicas", 1)
    st = obj.get("status", {})
    ready = st.get("readyReplicas", 0) >= want
    settled = (
        st.get("observedGeneration", 0) >= obj["metadata"].get("generation", 1)
        and st.get("updatedReplicas", 0) >= want
    )
    return ready, ready and settled


# Why a kubelet refuses a pod after the scheduler placed it: the node's CPU manager or
# topology manager cannot give it whole cores (the scheduler does not know). The pod
# stays Failed; the StatefulSet replaces it, possibly on the same node again.
REFUSED_BY_NODE = ("SMTAlignmentError", "TopologyAffinityError", "UnexpectedAdmissionError")


def _machine_state(name: str, index: int, state: tuple[bool, bool], pod: Obj | None) -> Obj:
    ready, settled = state
    out: Obj = {"name": name, "index": index, "ready": ready, "upToDate": settled}
    if pod is not None:
        out["pod"] = pod["metadata"]["name"]
        out["node"] = pod.get("spec", {}).get("nodeName", "")
        out["podPhase"] = pod.get("status", {}).get("phase", "Pending")
        reason = pod.get("status", {}).get("reason", "")
        if out["podPhase"] == "Failed" and reason in REFUSED_BY_NODE:
            out["refused"] = f"node {out['node'] or '?'} refused its pod: {reason}"
    return out


def conditions(
    renderer: Renderer,
    observed: Mapping[Key, Obj],
    problem: str | None,
    queued: Sequence[str] = (),
) -> tuple[list[Condition], list[Obj]]:
    """The Guild's conditions and its machines' states (each machine's one pod, where
    the observed objects have it)."""
    workloads = [o for o in renderer.objects() if o["kind"] == "StatefulSet"]
    states = {o["metadata"]["name"]: _workload_state(observed.get(key_of(o))) for o in workloads}
    machines = []
    for m in range(renderer.spec.machines):
        name = renderer.n.machine(m)
        pod = observed.get(("Pod", f"{name}-0"))
        machines.append(_machine_state(name, m, states[name], pod))
    waiting = sorted({n for n, (_, settled) in states.items() if not settled} | set(queued))
    refused = [f"{m['name']}: {m['refused']}" for m in machines if "refused" in m]
    if refused and problem is None:
        problem = "; ".join(refused)
    degraded = Condition(
        "Degraded",
        problem is not None,
        "Refused" if problem else "AsExpected",
        problem or "",
    )
    progressing = Condition(
        "Progressing",
        bool(waiting) and problem is None,
        "RollingOut" if waiting else "Settled",
        (f"waiting for {', '.join(waiting)}" if waiting else "every workload is up to date")
        + (f"; {', '.join(queued)} next, one machine at a time" if queued else ""),
    )
    up = Condition(
        "Ready",
        not waiting and problem is None,
        "Running" if not waiting and problem is None else "NotReady",
        problem or (f"waiting for {', '.join(waiting)}" if waiting else "every workload ready"),
    )
    return [up, progressing, degraded], machines


def status(
    renderer: Renderer | None,
    observed: Mapping[Key, Obj],
    previous: Mapping[str, Any],
    generation: int,
    problem: str | None,
    now: str,
    peers: Sequence[str],
    queued: Sequence[str] = (),
) -> Obj:
    """The Guild's ``status``: conditions keep their ``lastTransitionTime`` while their
    status holds. ``renderer`` is None for a Guild that cannot be rendered at all."""
    if renderer is None:
        assert problem is not None
        conds = [
            Condition("Ready", False, "NotReady", problem),
            Condition("Progressing", False, "Refused", problem),
            Condition("Degraded", True, "Refused", problem),
        ]
        machines: list[Obj] = []
        members: list[Obj] = []
    else:
        conds, machines = conditions(renderer, observed, problem, queued)
        spec = renderer.spec
        members = [
            {
                "name": m.name,
                "key": m.key,
                "self": m.name == spec.operator,
                "credentials": m.name == spec.operator or m.name in peers,
            }
            for m in spec.members
        ]
    before = {c["type"]: c for c in previous.get("conditions", [])}
    out = []
    for c in conds:
        text = "True" if c.status else "False"
        old = before.get(c.type)
        since = old["lastTransitionTime"] if old and old.get("status") == text else now
        out.append(
            {
                "type": c.type,
                "status": text,
                "reason": c.reason,
                "message": c.message,
                "lastTransitionTime": since,
                "observedGeneration": generation,
            }
        )
    ready, _, degraded = conds
    phase = "Degraded" if degraded.status else "Running" if ready.status else "Progressing"
    return {
        "observedGeneration": generation,
        "phase": phase,
        "partitionMapVersion": renderer.spec.layout().pmap.version if renderer else None,
        "conditions": out,
        "machines": machines,
        "members": members,
    }
