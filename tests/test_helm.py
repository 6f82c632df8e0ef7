"""The Helm chart, with a real helm binary: linted strictly, rendered for several value
sets, and every rendered object checked against the Kubernetes schemas (built-in kinds)
or the CRD's own schema (Guilds); the CRD agrees with what the operator reads."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import msgspec
import pytest
import yaml

from services.operator.changes import ChangeSpec
from services.operator.config import Settings
from services.operator.rebalance import RebalanceSpec, read_rebalance
from services.operator.render import Renderer, owner_reference
from services.operator.spec import GuildSpec, read_spec

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "constellation"
HELM = ROOT / ".tools" / "helm"
EXAMPLE = CHART / "examples" / "guild.yaml"
CHART_APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
KUBE_VERSION = "1.32.0"
MONITORING = ["monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PrometheusRule"]
VALUES = sorted(CHART.glob("ci/*-values.yaml"))

pytestmark = pytest.mark.skipif(not HELM.exists(), reason="no helm binary: run scripts/setup")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    home = ROOT / ".tools" / "helm-home"
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    done = subprocess.run([str(HELM), *args], capture_output=True, text=True, env=env, check=False)
    if check:
        assert done.returncode == 0, done.stderr + done.stdout
    return done


def render(
    *values: Path, monitoring: bool = True, sets: Sequence[str] = ()
) -> list[dict[str, Any]]:
    args = ["template", "r1", str(CHART), "--namespace", "constellation", "--include-crds"]
    for v in values:
        args += ["-f", str(v)]
    for s in sets:
        args += ["--set", s]
    for api in MONITORING if monitoring else []:
        args += ["--api-versions", api]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def crd_schema(name: str = "guilds") -> dict[str, Any]:
    crd = yaml.safe_load((CHART / "crds" / f"{name}.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    schema: dict[str, Any] = json_schema(version["schema"]["openAPIV3Schema"])
    return schema


def json_schema(node: Any) -> Any:
    """OpenAPI v3 (as a CRD has it) to JSON Schema: Kubernetes' own keys go; a nullable
    value may also be null."""
    if isinstance(node, list):
        return [json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if out.pop("nullable", False):
        out["type"] = [out["type"], "null"]
    return out


@pytest.mark.parametrize("values", [None, *VALUES], ids=lambda v: v.name if v else "defaults")
def test_the_chart_lints_strictly(values: Path | None) -> None:
    helm("lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))


@pytest.mark.parametrize(
    "bad",
    [
        'operator.resyncSeconds="often"',
        "operator.surprise=1",
        'image.pullPolicy="Sometimes"',
        'guilds=[{"name": "g1"}]',
    ],
)
def test_the_values_schema_refuses_bad_values(bad: str) -> None:
    done = helm("lint", "--strict", str(CHART), "--set-json", bad, check=False)
    assert done.returncode != 0, f"{bad} was accepted"


@pytest.mark.parametrize("values", [None, *VALUES], ids=lambda v: v.name if v else "defaults")
def test_every_rendered_object_is_valid(values: Path | None) -> None:
    docs = render(*([values] if values else []))
    guild_schema = crd_schema()
    kinds = set()
    for doc in docs:
        kinds.add(doc["kind"])
        if doc["kind"] == "Guild":
            jsonschema.validate(doc, guild_schema)
            read_spec(doc["spec"])
        elif doc["apiVersion"].startswith("monitoring.coreos.com/"):
            assert doc["spec"], doc["kind"]
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount"} <= kinds


def test_a_broken_object_is_caught() -> None:
    (deployment,) = [d for d in render() if d["kind"] == "Deployment"]
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["surprise"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSION, strict=True)


def test_the_operator_runs_alone_and_hardened() -> None:
    (deployment,) = [d for d in render() if d["kind"] == "Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["args"] == ["services.operator"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def _installed(docs: Iterable[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """What the release holds while installed: not its hooks' objects."""
    return [d for d in docs if d and "helm.sh/hook" not in d["metadata"].get("annotations", {})]


SERVICES = ("machine", "signer", "indexer", "gateway", "mint")  # the project's own


def _images(settings: Settings, spec: dict[str, Any]) -> set[tuple[str, str]]:
    """The image and pull policy of every container of the project's own that the
    operator, run with ``settings``, renders for a Guild of ``spec``."""
    guild = {"apiVersion": "constellation.dev/v1alpha1", "kind": "Guild"}
    owner = owner_reference(guild | {"metadata": {"name": "g1", "uid": "u1"}})
    renderer = Renderer("g1", "default", read_spec(spec), owner, image=settings.image)
    return {
        (c["image"], c["imagePullPolicy"])
        for o in renderer.objects()
        if o["kind"] == "StatefulSet"
        for c in o["spec"]["template"]["spec"]["containers"]
        if c["name"] in SERVICES
    }


def test_the_chart_s_image_is_what_a_guild_runs_unless_it_names_another() -> None:
    """``helm upgrade --set image.tag=...`` reaches the Guilds: the operator's Deployment
    passes its own image down, and every Guild's services run it."""
    (guild,) = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d["kind"] == "Guild"]
    for sets, ref, policy in (
        ((), f"ghcr.io/constellation/constellation:{CHART_APP_VERSION}", "IfNotPresent"),
        (
            ("image.tag=0.2.0", "image.pullPolicy=Always"),
            "ghcr.io/constellation/constellation:0.2.0",
            "Always",
        ),
        (
            ("image.repository=registry.example/cst",),
            f"registry.example/cst:{CHART_APP_VERSION}",
            "IfNotPresent",
        ),
    ):
        (deployment,) = [d for d in render(sets=sets) if d["kind"] == "Deployment"]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["image"] == ref and container["imagePullPolicy"] == policy
        env = {e["name"]: e["value"] for e in container["env"]}
        settings = Settings.from_env(env | {"OPERATOR_KUBE_SERVER": "https://k8s.example"})
        assert _images(settings, guild["spec"]) == {(ref, policy)}
        # What a Guild names wins; what it leaves out is still the operator's.
        named = guild["spec"] | {"image": {"tag": "0.1.9"}}
        assert _images(settings, named) == {(ref.rpartition(":")[0] + ":0.1.9", policy)}
        pinned = guild["spec"] | {
            "image": {"repository": "mine/cst", "tag": "1", "pullPolicy": "Never"}
        }
        assert _images(settings, pinned) == {("mine/cst:1", "Never")}


def _rules(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    (role,) = [d for d in _installed(docs) if d["kind"] == kind]
    return list(role["rules"])


def test_the_operator_has_least_privilege() -> None:
    rules = _rules(render(), "ClusterRole")
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        assert "*" not in rule["apiGroups"], rule
    (secrets,) = [r for r in rules if "secrets" in r["resources"]]
    assert set(secrets["verbs"]) == {"get", "create", "patch"}  # never listed, nor deleted
    (pods,) = [r for r in rules if "pods" in r["resources"]]
    assert set(pods["verbs"]) == {"get", "list", "watch"}  # its controllers own them
    namespaced = _installed(render(CHART / "ci" / "namespaced-values.yaml"))
    assert not [d for d in namespaced if d["kind"].startswith("Cluster") and "Role" in d["kind"]]
    (role,) = [d for d in namespaced if d["kind"] == "Role"]
    assert role["metadata"]["namespace"] == "payments"
    (binding,) = [d for d in namespaced if d["kind"] == "RoleBinding"]
    assert binding["subjects"][0]["name"] == "constellation-operator"
    # the chart's Guilds go where the operator watches (they once went to the release's
    # namespace, never reconciled, nothing saying so)
    ci = CHART / "ci"
    guilds = render(ci / "namespaced-values.yaml", ci / "guild-values.yaml")
    assert {d["metadata"]["namespace"] for d in guilds if d["kind"] == "Guild"} == {"payments"}
    # an account the chart does not make is named, never the namespace's default one
    # (which every pod that names none runs as)
    args = ["template", "r1", str(CHART), "--set", "serviceAccount.create=false"]
    unnamed = helm(*args, check=False)
    assert unnamed.returncode != 0 and "serviceAccount.name" in unnamed.stderr
    named = _installed(yaml.safe_load_all(helm(*args, "--set", "serviceAccount.name=ops").stdout))
    (binding,) = [d for d in named if d["kind"] == "ClusterRoleBinding"]
    assert binding["subjects"][0]["name"] == "ops"


def _hooks(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The objects ``helm uninstall`` makes first, by kind."""
    return {
        d["kind"]: d
        for d in docs
        if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "pre-delete"
    }


def test_uninstall_first_stops_the_operator_and_releases_what_it_watched() -> None:
    """A pre-delete hook runs ``services.operator.release`` (tested against the API
    emulator in tests/operator/test_operator.py) with what it needs and no more: the
    operator's Deployment to scale and its pods to list, the resources to release."""
    docs = render()
    hooks = _hooks(docs)
    kinds = {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "Job"}
    assert set(hooks) == kinds
    for hook in hooks.values():
        policy = hook["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
        assert set(policy.split(",")) == {"before-hook-creation", "hook-succeeded"}
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    job = hooks["Job"]["spec"]["template"]
    (container,) = job["spec"]["containers"]
    assert container["args"] == ["services.operator.release"]
    assert container["image"] == deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    env = {e["name"]: e["value"] for e in container["env"]}
    meta = deployment["metadata"]
    assert env["OPERATOR_DEPLOYMENT"] == f"{meta['namespace']}/{meta['name']}"
    assert env["OPERATOR_NAMESPACE"] == ""  # every namespace: a ClusterRole
    # The Job's pod is not one of the operator's, whose end it waits for.
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert not selector.items() <= job["metadata"]["labels"].items()
    account = hooks["ServiceAccount"]["metadata"]["name"]
    assert job["spec"]["serviceAccountName"] == account
    for binding in ("RoleBinding", "ClusterRoleBinding"):
        assert hooks[binding]["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": meta["namespace"]}
        ]
    assert hooks["Role"]["rules"] == [
        {
            "apiGroups": ["apps"],
            "resources": ["deployments"],
            "resourceNames": [meta["name"]],
            "verbs": ["get", "patch"],
        },
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    ]
    assert hooks["ClusterRole"]["rules"] == [
        {
            "apiGroups": ["constellation.dev"],
            "resources": ["guilds", "guildchanges", "guildrebalances"],
            "verbs": ["list", "patch"],
        }
    ]
    namespaced = render(CHART / "ci" / "namespaced-values.yaml")
    hooked = [d for d in namespaced if d["metadata"].get("annotations", {}).get("helm.sh/hook")]
    assert not [d for d in hooked if d["kind"].startswith("Cluster")]
    roles = {
        d["metadata"]["name"]: d["metadata"]["namespace"] for d in hooked if d["kind"] == "Role"
    }
    assert roles == {f"{meta['name']}-release": meta["namespace"], f"{account}-guilds": "payments"}
    (job,) = [d["spec"]["template"]["spec"] for d in hooked if d["kind"] == "Job"]
    assert {"name": "OPERATOR_NAMESPACE", "value": "payments"} in job["containers"][0]["env"]


def test_monitoring_ships_dashboards_rules_and_scrapes() -> None:
    docs = render(CHART / "ci" / "monitoring-values.yaml")
    dashboards = [
        d for d in docs if d["kind"] == "ConfigMap" and "-dashboard-" in d["metadata"]["name"]
    ]
    files = sorted(p.name for p in (CHART / "files" / "dashboards").glob("*.json"))
    assert sorted(n for d in dashboards for n in d["data"]) == files
    for d in dashboards:
        assert d["metadata"]["labels"]["grafana_dashboard"] == "1"
        for text in d["data"].values():
            assert json.loads(text)["panels"]
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    shipped = yaml.safe_load((CHART / "files" / "rules" / "constellation.rules.yaml").read_text())
    assert rule["spec"] == shipped
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector == {"app.kubernetes.io/part-of": "constellation"}
    # Without the Prometheus operator's API, neither is rendered (it would not apply).
    bare = render(monitoring=False)
    assert not [d for d in bare if d["apiVersion"].startswith("monitoring.coreos.com/")]


# -- the Guild CRD and what the operator reads


def _fields(struct: Any) -> dict[str, Any]:
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    return {f.encode_name: f.type for f in info.fields}


def _struct_of(t: Any) -> Any:
    """The Struct inside a field's type (Optional, list), if any."""
    if isinstance(t, msgspec.inspect.StructType):
        return t.cls
    if isinstance(t, msgspec.inspect.UnionType):
        found = [_struct_of(x) for x in t.types]
        return next((f for f in found if f is not None), None)
    if isinstance(t, msgspec.inspect.ListType):
        return _struct_of(t.item_type)
    return None


def _agree(schema: dict[str, Any], struct: Any, where: str) -> None:
    fields = _fields(struct)
    props = schema.get("properties", {})
    if "items" in schema:
        props = schema["items"]["properties"]
    assert set(props) == set(fields), f"{where}: CRD {sorted(props)} != spec {sorted(fields)}"
    for name, t in fields.items():
        inner = _struct_of(t)
        if inner is not None:
            _agree(props[name], inner, f"{where}.{name}")


def test_the_crd_and_the_operator_read_the_same_fields() -> None:
    _agree(crd_schema()["properties"]["spec"], GuildSpec, "spec")


def test_the_example_guild_is_valid() -> None:
    docs = [d for d in yaml.safe_load_all((CHART / "examples" / "guild.yaml").read_text()) if d]
    (guild,) = [d for d in docs if d["kind"] == "Guild"]
    schema = crd_schema()
    jsonschema.validate(guild, schema)
    read_spec(guild["spec"])
    bad = copy.deepcopy(guild)
    bad["spec"]["members"][0]["key"] = "not hex"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    for doc in docs:
        if doc["kind"] != "Guild":
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_the_guild_change_crd_and_the_operator_read_the_same_fields() -> None:
    schema = crd_schema("guildchanges")
    _agree(schema["properties"]["spec"], ChangeSpec, "spec")
    for example in ("leave.yaml", "join.yaml"):
        (change,) = [d for d in yaml.safe_load_all((CHART / "examples" / example).read_text())]
        jsonschema.validate(change, schema)
        msgspec.convert(change["spec"], ChangeSpec)
        for field, value in [("kind", "merge"), ("threshold", 1), ("approve", ["Done"])]:
            bad = copy.deepcopy(change)
            bad["spec"][field] = value
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(bad, schema)


def test_the_guild_rebalance_crd_and_the_operator_read_the_same_fields() -> None:
    schema = crd_schema("guildrebalances")
    _agree(schema["properties"]["spec"], RebalanceSpec, "spec")
    (doc,) = [d for d in yaml.safe_load_all((CHART / "examples" / "rebalance.yaml").read_text())]
    jsonschema.validate(doc, schema)
    assert read_rebalance(doc["spec"]).machines == 3
    for field, value in [("machines", 1), ("machines", 65), ("approve", "yes")]:
        bad = copy.deepcopy(doc)
        bad["spec"][field] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
