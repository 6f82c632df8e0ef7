"""What to do about a Guild, from what the cluster holds: pure and level-based.

``plan`` compares the rendered objects with the observed ones and says which to create,
patch and delete; ``moves`` says what the member's placement of its copies asks of its
machines (those to run, those drained, whether a change's next step may go);
``status`` says what the Guild's status is. Neither reads a clock
or the API server: the shell (``handlers``) passes the time and the observed objects
in, so a restarted operator reaches the same decisions from the same cluster.

One change is refused rather than applied: the guild's layout (its members, their keys,
the shards each runs) is what every member's copies agree on, so a running operator's
layout is never rewritten under it. A Guild whose layout differs from the one its
machines run is Degraded, saying what differs, and nothing else of it is changed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from constellation.replication.placement import MAX_MACHINES, Placement
from services.operator.render import MACHINE, Obj, Renderer
from services.replica.moves import waiting

LAYOUT_FILE = "layout.json"
CONFIG_HASH = "constellation.dev/config-hash"  # on pod templates: a new one rolls them
CLAIMS = "volumeClaimTemplates"  # of a StatefulSet: an API server refuses a change of them
STORAGE = "StorageApplied"  # the condition that says what a change of storage waits for
Key = tuple[str, str]  # (kind, name)


def key_of(obj: Obj) -> Key:
    return obj["kind"], obj["metadata"]["name"]


def covers(actual: Any, desired: Any) -> bool:
    """Whether ``actual`` holds everything ``desired`` says (the API server adds
    defaults and bookkeeping, which are not differences, and writes each quantity in its
    own canonical form, which is not one either)."""
    return _covers(actual, desired, ())


def _covers(actual: Any, desired: Any, path: tuple[str, ...]) -> bool:
    if isinstance(desired, dict):
        return isinstance(actual, dict) and all(
            k in actual and _covers(actual[k], v, (*path, k)) for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(desired)
            and all(_covers(a, d, path) for a, d in zip(actual, desired, strict=True))
        )
    if is_quantity(path):
        have, want = quantity(actual), quantity(desired)
        if have is not None and want is not None:
            return have == want
    return bool(actual == desired)


def is_quantity(path: Sequence[str]) -> bool:
    """Whether the field at ``path`` (its keys, lists left out) of a rendered object holds
    a quantity: a container's or a volume claim's resources, an emptyDir's size."""
    return path[-1:] == ("sizeLimit",) or (
        len(path) >= 3 and path[-3] == "resources" and path[-2] in ("requests", "limits")
    )


# Kubernetes' quantity grammar: a signed decimal number, then a binary suffix (Ki..Ei), a
# decimal one (n, u and m below one, k..E above: the API server writes n and u too), or
# an exponent of ten (1e3; a bare E is exa).
_QUANTITY = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))(?:([KMGTPE]i|[numkMGTPE])|[eE]([+-]?\d+))?")
_SCALE = {
    **{s: Decimal(10) ** e for s, e in (("n", -9), ("u", -6), ("m", -3), ("", 0))},
    **{s: Decimal(1000) ** (i + 1) for i, s in enumerate("kMGTPE")},
    **{s: Decimal(1024) ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
}


def quantity(text: Any) -> Decimal | None:
    """The value of a Kubernetes quantity (``1Gi``, ``500m``, ``1e3``, or a number), exact,
    or None where ``text`` is none (the API server refuses it: it is compared as written)."""
    found = _QUANTITY.fullmatch(str(text))
    if found is None:
        return None
    number, suffix, exponent = found.groups()
    if exponent is not None:
        return Decimal(number).scaleb(int(exponent))
    return Decimal(number) * _SCALE[suffix or ""]


def layout_change(running: str, wanted: str) -> str | None:
    """What differs between the layout the machines run and the Guild's that they cannot
    take, or None. They take members added after those they know, the founders kept (a
    join: the machines roll onto it, one at a time, and carry the joiner's shards)."""
    old, new = json.loads(running), json.loads(wanted)
    changes = []
    if old["guild"] != new["guild"]:
        changes.append(f"guild {old['guild']} -> {new['guild']}")
    if old["workers"] != new["workers"]:
        changes.append(f"shards {old['workers']} -> {new['workers']}")
    before = {m["name"]: m for m in old["members"]}
    after = {m["name"]: m for m in new["members"]}
    founders = old.get("founders") or len(old["members"])
    if added := sorted(after.keys() - before.keys()):
        appended = [m["name"] for m in new["members"][: len(before)]] == list(before)
        if not appended or (new.get("founders") or len(after)) != founders:
            changes.append(
                f"members added: {', '.join(added)} (a joiner comes after the members,"
                f" with spec.founders: {founders})"
            )
    elif (new.get("founders") or len(after)) != founders:
        # who founded the guild is in every shard's log: its voters change only through
        # the guild's agreement (a join, a leave), never by an edit
        changes.append(f"founders {founders} -> {new.get('founders') or len(after)}")
    if removed := sorted(before.keys() - after.keys()):
        changes.append(f"members removed: {', '.join(removed)}")
    changed = []
    for n in sorted(before.keys() & after.keys()):
        # A member's machines are its own: its copies move (``moves``), nobody else's.
        was, now = _without_machines(before[n]), _without_machines(after[n])
        if was != now:
            changed.append(n)
    if changed:
        changes.append(f"members changed: {', '.join(changed)}")
    if [m["name"] for m in old["members"]] != [m["name"] for m in new["members"]] and not (
        added or removed
    ):
        changes.append("members reordered")
    return "; ".join(changes) or None


def _without_machines(member: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in member.items() if k != "machines"}


def config_hash(workload: Obj, configs: Mapping[str, Mapping[str, str]]) -> str | None:
    """A digest of the configuration ``workload``'s pods read at start: the ConfigMaps they
    mount (``configs``: each rendered one's data, by name), or None where they mount none.
    A change to it rolls that workload and no other: a new layout rolls the machines and
    the services pod, and never restarts PostgreSQL or Redis, which do not read it. The
    members' machine counts are left out: a machine reads its own only while its
    operator has no placement yet (``Placement.initial``), and adding a machine rolls none."""
    volumes = workload["spec"]["template"]["spec"].get("volumes", [])
    mounted = sorted(v["configMap"]["name"] for v in volumes if "configMap" in v)
    if not mounted:
        return None
    data = {}
    for name in mounted:
        assert name in configs, f"{name}: a mounted ConfigMap the Guild does not render"
        d: dict[str, Any] = dict(configs[name])
        if LAYOUT_FILE in d:
            layout = json.loads(d[LAYOUT_FILE])
            layout["members"] = [_without_machines(m) for m in layout["members"]]
            d[LAYOUT_FILE] = layout
        data[name] = d
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Moves:
    """Where the member's copies are, and what that asks of its machines."""

    machines: list[int]  # to run: those asked for, and any beyond that holds a copy
    drive: bool  # the next step of the change may be taken (``moves.advance``)
    remove: list[str]  # machine StatefulSets to delete: nothing is on them any more
    moving: list[str]  # the moves under way, "slot: from -> to"
    known: bool  # the placement was read


def moves(renderer: Renderer, placement: Placement | None, observed: Mapping[Key, Obj]) -> Moves:
    """What the member's machines need, from its placement (None: not read, so nothing
    is removed and nothing driven): a machine beyond those asked for runs until no copy
    is on it, then goes; the copies move once every machine asked for is ready."""
    want = renderer.spec.machines
    have = sorted(
        int(o["metadata"]["labels"][MACHINE])
        for (kind, _), o in observed.items()
        if kind == "StatefulSet" and MACHINE in o["metadata"].get("labels", {})
    )
    if placement is None:
        return Moves(sorted({*range(want), *have}), False, [], [], False)
    holding = [m for m in range(MAX_MACHINES) if placement.holds(m)]
    machines = sorted({*range(want), *holding})
    ready = all(
        _workload_state(observed.get(("StatefulSet", renderer.n.machine(m))))[0]
        for m in range(want)
    )
    remove = [renderer.n.machine(m) for m in have if m not in machines]
    return Moves(machines, ready and not placement.done(want), remove, waiting(placement), True)


@dataclass
class Plan:
    create: list[Obj] = field(default_factory=list)
    patch: list[Obj] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)  # machine StatefulSets, drained
    waiting: list[str] = field(default_factory=list)  # rolled StatefulSets waiting their turn
    refused: str | None = None  # why nothing is applied
    held: list[str] = field(default_factory=list)  # what needs a manual step, and which


def rolled(renderer: Renderer) -> list[str]:
    """The StatefulSets a change replaces one at a time, in this order: the Guild's NATS
    (every machine reaches every copy through it: while it restarts, none is ready),
    then the machines (each holds one of the member's two copies of every shard)."""
    nats = [renderer.n.nats] if renderer.spec.nats.external is None else []
    return nats + [renderer.n.machine(m) for m in renderer.machines]


def plan(renderer: Renderer, observed: Mapping[Key, Obj], remove: Sequence[str] = ()) -> Plan:
    """What to create, patch and delete so that the cluster holds the rendered Guild
    (``remove``: the machines ``moves`` found drained)."""
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
    configs = {o["metadata"]["name"]: o["data"] for o in objs if o["kind"] == "ConfigMap"}
    out = Plan(delete=list(remove))
    updates = []
    for obj in objs:
        # One that reads no ConfigMap has no digest: one an older operator gave it stays
        # (a merge patch leaves it, and it is no difference), so that upgrading the
        # operator does not restart PostgreSQL or Redis either.
        digest = config_hash(obj, configs) if obj["kind"] == "StatefulSet" else None
        if digest is not None:
            obj["spec"]["template"]["metadata"]["annotations"] = {CONFIG_HASH: digest}
        have = observed.get(key_of(obj))
        if have is None:
            out.create.append(obj)
            continue
        update: Obj | None = obj
        if obj["kind"] == "StatefulSet":
            update, step = _claims_kept(obj, have)
            if step:
                out.held.append(step)
        if update is not None and not covers(have, update):
            updates.append(update)
    order = rolled(renderer)
    changed = {o["metadata"]["name"] for o in updates if o["kind"] == "StatefulSet"}
    turn = _turn(order, changed, observed)
    for obj in updates:
        name = obj["metadata"]["name"]
        if obj["kind"] == "StatefulSet" and name in order and name != turn:
            out.waiting.append(name)
        else:
            out.patch.append(obj)
    return out


def _claims_kept(want: Obj, have: Obj) -> tuple[Obj | None, str | None]:
    """The update of StatefulSet ``have`` to ``want``, and the manual step what it leaves
    out needs. An API server refuses an update that changes the claims (the field is
    immutable), the whole of it: the update leaves them out, so that the rest (its pod
    template) still changes. Where a claim is added or removed, nothing of it changes
    (None): the pods' volumes must match the claims."""
    update = {**want, "spec": {k: v for k, v in want["spec"].items() if k != CLAIMS}}
    kept, wanted = have.get("spec", {}).get(CLAIMS, []), want["spec"][CLAIMS]
    if covers(kept, wanted):
        return update, None
    name = want["metadata"]["name"]
    was = {c["metadata"]["name"]: _claim(c) for c in kept}
    now = {c["metadata"]["name"]: _claim(c) for c in wanted}
    both = sorted(was.keys() & now.keys())
    what = [f"{c} added" for c in now if c not in was]
    what += [f"{c} removed" for c in was if c not in now]
    what += [f"{c} {' '.join(was[c])} -> {' '.join(now[c])}" for c in both if was[c] != now[c]]
    made = range(want["spec"].get("replicas", 1))  # the claims of the pods it made
    grown = [f"{c}-{name}-{i}" for c in both if was[c][0] != now[c][0] for i in made]
    reclassed = [f"{c}-{name}-{i}" for c in both if was[c][1] != now[c][1] for i in made]
    steps = []
    if grown:
        steps.append(f"expand PersistentVolumeClaim {', '.join(grown)} (its class must allow it)")
    steps.append(
        f"kubectl delete statefulset {name} --cascade=orphan (its pod keeps running) and the "
        "operator makes it again with the claims the Guild asks for"
    )
    step = f"StatefulSet {name}: its volume claims cannot change in place ({'; '.join(what)}): "
    step += ", then ".join(steps)
    if reclassed:
        step += f" (PersistentVolumeClaim {', '.join(reclassed)} keeps its class: make it anew)"
    if was.keys() != now.keys():
        return None, f"{step}; until then nothing of it changes"
    return update, step


def _claim(template: Obj) -> tuple[str, str]:
    """A claim template's size and storage class, as a manual step names them."""
    spec = template.get("spec", {})
    size = spec.get("resources", {}).get("requests", {}).get("storage", "?")
    return size, f"({spec.get('storageClassName', 'default')} class)"


def _turn(order: Sequence[str], changed: set[str], observed: Mapping[Key, Obj]) -> str | None:
    """The one StatefulSet of ``order`` (``rolled``) whose change may go now, if any: they
    change one at a time, in order, each once every other is settled (ready, and running
    its spec), so that one of the member's two copies of every shard is always up and no
    machine restarts while the NATS it needs does. One that is down and cannot come up as
    it is (``_stuck``) goes first: nothing that is up goes down, and the change may be
    what mends it. One that runs but is not ready (starting, catching up, or connecting
    again to a NATS that restarted) is waited for by the others; itself, it may go
    before its turn while every other is settled (nothing else is down, and the change
    may be what it waits for), so the order is kept only among settled ones. The roll
    keeps no state of its own: the StatefulSets, their status and their pods say where
    it is, so a restarted operator carries on from there. (A disruption budget limits
    evictions only.)"""
    settled = {m: _workload_state(observed.get(("StatefulSet", m)))[1] for m in order}
    for m in order:
        others = all(settled[o] for o in order if o != m)
        if m in changed and (others or _stuck(observed.get(("Pod", f"{m}-0")))):
            return m
    return None


# Why a container waits that only a new spec can change (its image, its configuration,
# what makes it crash), as the kubelet says it.
WAITING_ON_SPEC = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)


def _stuck(pod: Obj | None) -> bool:
    """Whether a StatefulSet's one pod is down and does not come up as it is: none (its
    controller is replacing it, or cannot make it), not running (being created,
    unscheduled, refused by its node, failed), or a container waiting on what only a
    new spec changes."""
    if pod is None:
        return True
    st = pod.get("status", {})
    waiting = [c.get("state", {}).get("waiting", {}) for c in st.get("containerStatuses", [])]
    return st.get("phase") != "Running" or any(w.get("reason") in WAITING_ON_SPEC for w in waiting)


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
    moving: str | None = None,
    held: Sequence[str] = (),
) -> tuple[list[Condition], list[Obj]]:
    """The Guild's conditions and its machines' states (each machine's one pod, where
    the observed objects have it); ``moving``: what the member's copies are doing, while
    a change of its machines goes on; ``held``: the manual steps a change of storage
    needs (``Plan.held``), which keep nothing else from running."""
    workloads = [o for o in renderer.objects() if o["kind"] == "StatefulSet"]
    states = {o["metadata"]["name"]: _workload_state(observed.get(key_of(o))) for o in workloads}
    machines = []
    for m in renderer.machines:
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
    rolling = (f"waiting for {', '.join(waiting)}" if waiting else "") + (
        f"; {', '.join(queued)} next, one at a time" if queued else ""
    )
    progressing = Condition(
        "Progressing",
        bool(waiting or moving) and problem is None,
        "RollingOut" if waiting else "MovingCopies" if moving else "Settled",
        "; ".join(filter(None, [rolling, moving])) or "every workload is up to date",
    )
    up = Condition(
        "Ready",
        not waiting and problem is None,
        "Running" if not waiting and problem is None else "NotReady",
        problem or (f"waiting for {', '.join(waiting)}" if waiting else "every workload ready"),
    )
    storage = Condition(
        STORAGE,
        not held,
        "ManualStepNeeded" if held else "Applied",
        "; ".join(held) or "every volume claim is as the Guild asks",
    )
    return [up, progressing, degraded, storage], machines


def status(
    renderer: Renderer | None,
    observed: Mapping[Key, Obj],
    previous: Mapping[str, Any],
    generation: int,
    problem: str | None,
    now: str,
    peers: Sequence[str],
    queued: Sequence[str] = (),
    placement: Obj | None = None,
    moving: str | None = None,
    voters: Sequence[int] | None = None,
    held: Sequence[str] = (),
) -> Obj:
    """The Guild's ``status``: conditions keep their ``lastTransitionTime`` while their
    status holds. ``renderer`` is None for a Guild that cannot be rendered at all.
    ``placement`` and ``moving``: ``placement_status``'s. ``voters``: the members that
    vote, as this member agreed (None: not read)."""
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
        conds, machines = conditions(renderer, observed, problem, queued, moving, held)
        spec = renderer.spec
        members = [
            {
                "name": m.name,
                "key": m.key,
                "self": m.name == spec.operator,
                "credentials": m.name == spec.operator or m.name in peers,
                "voting": None if voters is None else i in voters,
            }
            for i, m in enumerate(spec.members)
        ]
    out = condition_list(conds, previous, generation, now)
    ready, progressing, degraded = conds[:3]
    phase = (
        "Degraded"
        if degraded.status
        else "Running"
        if ready.status and not progressing.status
        else "Progressing"
    )
    return {
        "observedGeneration": generation,
        "phase": phase,
        "partitionMapVersion": renderer.spec.layout().pmap.version if renderer else None,
        "placement": placement or previous.get("placement"),
        "conditions": out,
        "machines": machines,
        "members": members,
    }


def change_conditions(done: bool, phase: str, waiting: str, problem: str) -> list[Condition]:
    """Ready, Progressing and Degraded of a change walked through phases (a GuildChange,
    a GuildRebalance): ``waiting`` says what it waits for, ``problem`` why it is refused."""
    waiting = problem or waiting
    return [
        Condition("Ready", done, "Done" if done else "InProgress", waiting or f"phase {phase}"),
        Condition(
            "Progressing",
            not done and not problem,
            "Refused" if problem else ("Done" if done else "Waiting"),
            waiting or ("" if done else f"phase {phase}"),
        ),
        Condition("Degraded", bool(problem), "Refused" if problem else "AsExpected", problem),
    ]


def condition_list(
    conds: Sequence[Condition], previous: Mapping[str, Any], generation: int, now: str
) -> list[Obj]:
    """``status.conditions``: each keeps its ``lastTransitionTime`` while it holds."""
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
    return out


def placement_status(
    placement: Placement | None,
    previous: Mapping[str, Any],
    want: int,
    now: str,
    stall_s: float,
) -> tuple[Obj | None, str | None, str | None]:
    """The member's placement in its status (None where unread), what its copies are
    doing while a change goes on, and why the change is stuck: no move has ended for
    ``stall_s`` (a machine that does not release its copies, or one that does not fetch
    them; the machines that still hold copies keep running)."""
    if placement is None:
        return None, None, None
    before = previous.get("placement") or {}
    since = before.get("since", now) if before.get("version") == placement.version else now
    moving = waiting(placement)
    st: Obj = {
        "version": placement.version,
        "machines": placement.machines,
        "moving": moving,
        "since": since,
    }
    if placement.done(want):
        return st, None, None
    doing = f"moving copies to {want} machines: " + (", ".join(moving) or "the next batch")
    stalled = _seconds(now) - _seconds(since) > stall_s
    if moving and stalled:
        return (
            st,
            doing,
            (
                f"no move of the copies ended in {stall_s:g} s (waiting: {', '.join(moving)}): "
                "a machine does not release its copies, or does not fetch them; every machine "
                "that holds a copy keeps running"
            ),
        )
    return st, doing, None


def _seconds(stamp: str) -> float:
    return (
        datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")
        .replace(tzinfo=datetime.UTC)
        .timestamp()
    )
