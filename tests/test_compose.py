"""docker-compose.yml, one operator's whole stack: valid under the Compose
specification's JSON schema, and wired as the services and the devnet expect (every
module exists, every service's settings load from its environment, every path it names
is on a volume it mounts, the init step makes what the signers and workers need).

The schema is the Compose specification's own (github.com/compose-spec/compose-spec,
``schema/compose-spec.json``), as vendored by the ``check-jsonschema`` package
(``check_jsonschema/builtin_schemas/vendor/compose-spec.json``).
"""

from __future__ import annotations

import ast
import copy
import importlib
import importlib.resources
import importlib.util
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from unittest import mock

import jsonschema
import pytest
import yaml

from constellation.keys import SigningKey
from services.devnet.state import Devnet, SignerProc, WorkerProc
from services.ecash.config import Settings as MintSettings
from services.gateway.config import Settings as GatewaySettings
from services.indexer.config import Settings as IndexerSettings
from services.lnsim.config import Settings as LnsimSettings
from services.lnsim.sim import socket_path
from services.partition.config import Settings as WorkerSettings
from services.signer.config import Settings as SignerSettings

ROOT = Path(__file__).parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
IMAGE = "constellation:dev"

# Each module a service runs, and the settings loader its ``__main__`` runs first.
LOADERS: dict[str, Callable[[Mapping[str, str]], object]] = {
    "services.gateway": GatewaySettings.from_env,
    "services.indexer": IndexerSettings.from_env,
    "services.ecash": MintSettings.from_env,
    "services.signer": SignerSettings.from_env,
    "services.partition": WorkerSettings.from_env,
    "services.lnsim": LnsimSettings.from_env,
}
PUBLIC = {"gateway", "mint"}  # the only services whose API is published
# The nats image is built from scratch: no shell, no client to probe it with. What needs
# NATS waits for `init`, which waits until NATS answers.
NO_PROBE = {"nats"}


def compose_schema() -> dict[str, Any]:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads(vendor.joinpath("compose-spec.json").read_text())
    return schema


def load() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


DOC = load()
SERVICES: dict[str, dict[str, Any]] = DOC["services"]
PROJECT = {name: s for name, s in SERVICES.items() if s.get("image") == IMAGE}
ONE_SHOT = {"init"}  # runs once before the others, then exits
RUNNING = {name: s for name, s in PROJECT.items() if name not in ONE_SHOT}

_INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*):-(?P<default>[^}]*)\}|\$")


def resolve(value: str) -> str:
    """A value as Compose interpolates it with nothing set: ``${NAME:-default}`` is its
    default, ``$$`` a dollar. The file uses no other form."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group("name") is None:
            raise AssertionError(f"only ${{NAME:-default}} is used in the file: {value!r}")
        return m.group("default")

    return _INTERPOLATION.sub(one, value)


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    raw = service.get("environment", {})
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {k: resolve(str(v)) for k, v in raw.items()}


def module(service: Mapping[str, Any]) -> str:
    """What ``python -m`` runs: the image's entrypoint, with the service's command."""
    assert "entrypoint" not in service, "a long-running service runs the image's entrypoint"
    command = service["command"]
    assert isinstance(command, list) and len(command) == 1, command
    return str(command[0])


def mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's named volumes: mount target -> volume."""
    found = {}
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        assert source in DOC["volumes"], f"{source} is not a named volume"
        found[target] = source
    return found


def volume_of(service: Mapping[str, Any], path: str) -> str:
    """The named volume that ``path`` lies on, in ``service``."""
    for target, volume in mounts(service).items():
        if PurePosixPath(path).is_relative_to(target):
            return volume
    raise AssertionError(f"{path} is on no volume of the service")


def of_module(name: str) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in RUNNING.items() if module(s) == name}


def http_port(service: Mapping[str, Any]) -> int:
    [addr] = [v for k, v in environment(service).items() if k.endswith("_HTTP_ADDR")]
    return int(addr.rpartition(":")[2])


# -- the schema


def test_the_file_is_valid_under_the_compose_specification() -> None:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    errors = [f"{e.json_path}: {e.message}" for e in validator(schema).iter_errors(load())]
    assert errors == []


@pytest.mark.parametrize(
    "spoil",
    [
        lambda doc: doc["services"]["gateway"].update(helthcheck={}),
        lambda doc: doc["services"]["gateway"]["depends_on"]["redis"].update(condition="up"),
        lambda doc: doc["services"]["mint"].update(ports="3338"),
        lambda doc: doc.update(service={}),
    ],
    ids=["unknown key", "unknown condition", "ports not a list", "unknown top-level key"],
)
def test_the_schema_refuses_what_compose_would(spoil: Callable[[dict[str, Any]], None]) -> None:
    schema = compose_schema()
    doc = copy.deepcopy(load())
    spoil(doc)
    assert list(jsonschema.validators.validator_for(schema)(schema).iter_errors(doc))


# -- the services


def test_the_stack_is_one_operators_whole_stack() -> None:
    assert {module(s) for s in RUNNING.values()} == set(LOADERS)
    assert {"nats", "redis", "postgres"} <= set(SERVICES)
    assert SERVICES["nats"]["image"].startswith("nats:") and "-js" in SERVICES["nats"]["command"]


@pytest.mark.parametrize("name", list(RUNNING))
def test_each_service_runs_a_module_that_exists(name: str) -> None:
    found = module(PROJECT[name])
    assert importlib.util.find_spec(found) is not None, found
    assert importlib.util.find_spec(f"{found}.__main__") is not None, f"python -m {found}"


@pytest.mark.parametrize("name", list(PROJECT))
def test_each_project_service_is_built_from_the_projects_image(name: str) -> None:
    assert PROJECT[name]["build"] == "."
    assert PROJECT[name]["image"] == IMAGE


def test_the_image_runs_python_modules() -> None:
    assert re.search(r"^FROM python:3\.11-slim$", DOCKERFILE.read_text(), re.MULTILINE)
    entrypoint = re.search(r"^ENTRYPOINT (.+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert entrypoint is not None and json.loads(entrypoint.group(1)) == ["python", "-m"]
    assert re.search(r"^USER (?!root)\S+$", DOCKERFILE.read_text(), re.MULTILINE)


@pytest.mark.parametrize("name", list(RUNNING))
def test_each_services_settings_load_from_its_environment(name: str) -> None:
    service = PROJECT[name]
    LOADERS[module(service)](environment(service))  # raises ConfigError where one is missing


@pytest.mark.parametrize("name", list(RUNNING))
def test_each_variable_set_is_one_the_service_reads(name: str) -> None:
    """A misspelt optional variable would load without error, and do nothing."""
    config = importlib.util.find_spec(f"{module(PROJECT[name])}.config")
    assert config is not None and config.origin is not None
    tree = ast.parse(Path(config.origin).read_text())
    read = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
    assert set(environment(PROJECT[name])) <= read


def test_the_services_set_what_the_devnet_sets_for_one_operator() -> None:
    """The devnet (``services/devnet/state.py``) is the reference: the same variables
    for a single operator with a Lightning node and a mint, less the ports it picks."""
    net = Devnet("/devnet", "devnet", 4222, "d4" * 32, lightning_rpc="/ln", mint_storage_key="00")
    net.signers = [SignerProc(0, "/s", "00", "07" * 32, 1)]
    net.workers = [WorkerProc(0, "/w", 1)]
    with mock.patch.dict(os.environ, clear=True):
        expected = {
            "services.partition": net.worker_env(net.workers[0]),
            "services.signer": net.signer_env(net.signers[0]),
            "services.gateway": net.gateway_env(),
            "services.indexer": net.indexer_env(),
            "services.ecash": net.mint_env(),
        }
    for name, service in RUNNING.items():
        if module(service) in expected:
            assert set(environment(service)) == set(expected[module(service)]), name


def test_every_service_names_one_operator() -> None:
    operators = {
        value
        for service in PROJECT.values()
        for key, value in environment(service).items()
        if key.endswith("_OPERATOR")
    }
    assert len(operators) == 1


def test_the_workers_accept_the_coins_the_mint_issues() -> None:
    issuer = SigningKey(bytes.fromhex(environment(SERVICES["mint"])["MINT_ISSUER_KEY"]))
    for service in of_module("services.partition").values():
        issuers = environment(service)["WORKER_ISSUERS"].split(",")
        assert issuer.pubkey.hex() in issuers


# -- state on volumes, and what `init` makes there


@pytest.mark.parametrize("name", list(RUNNING))
def test_each_path_a_service_names_is_on_a_volume_it_mounts(name: str) -> None:
    env = environment(PROJECT[name])
    paths = [v for k, v in env.items() if k.endswith(("_DIR", "_MEMBERS", "_RPC"))]
    for path in paths:
        volume_of(PROJECT[name], path)


def test_every_mount_point_exists_in_the_image_for_its_user() -> None:
    """A new named volume takes the owner of the folder it is mounted on in the image:
    without the folder there, it is root's, and the service cannot write its state."""
    made = set(re.findall(r"(/var/lib/constellation/[\w-]+)", DOCKERFILE.read_text()))
    for service in PROJECT.values():
        assert set(mounts(service)) <= made


def test_the_gateway_and_mint_reach_the_operators_lightning_node() -> None:
    lnsim = SERVICES["lnsim"]
    sim = environment(lnsim)
    [operator] = {
        v for s in PROJECT.values() for k, v in environment(s).items() if k.endswith("_OPERATOR")
    }
    assert operator in sim["LNSIM_NODES"].split(",")
    node = str(socket_path(Path(sim["LNSIM_DIR"]), operator))
    for name, key in (("gateway", "GATEWAY_LIGHTNING_RPC"), ("mint", "MINT_LIGHTNING_RPC")):
        assert environment(SERVICES[name])[key] == node
        assert volume_of(SERVICES[name], node) == volume_of(lnsim, sim["LNSIM_DIR"])


def init_script() -> str:
    init = SERVICES["init"]
    assert init["entrypoint"] == ["python", "-c"]
    [script] = init["command"]
    assert "$" not in script, "Compose would interpolate it"
    return str(script)


def test_the_init_script_compiles_and_imports_what_exists() -> None:
    tree = ast.parse(init_script())
    compile(tree, "init", "exec")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.module is not None
            found = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(found, alias.name), f"{node.module}.{alias.name}"


def test_init_makes_each_signers_identity_on_its_volume_with_its_key() -> None:
    init = SERVICES["init"]
    env = environment(init)
    signers = of_module("services.signer")
    assert int(env["INIT_SIGNERS"]) == len(signers)
    raw_init = init["environment"]
    for i, name in enumerate(sorted(signers)):
        signer = signers[name]
        assert (
            raw_init[f"INIT_SIGNER_{i}_STORAGE_KEY"] == signer["environment"]["SIGNER_STORAGE_KEY"]
        )
        assert len(bytes.fromhex(env[f"INIT_SIGNER_{i}_STORAGE_KEY"])) == 32
        state = environment(signer)["SIGNER_STATE_DIR"]
        assert volume_of(init, f"/var/lib/constellation/signer-{i}") == volume_of(signer, state)
        members = environment(signer)["SIGNER_MEMBERS"]
        assert members == "/var/lib/constellation/guild/guild.json"  # where init writes it
        assert volume_of(signer, members) == volume_of(init, members)
    assert "signer-{i}" in init_script() and '"guild" / "guild.json"' in init_script()


def test_init_publishes_the_map_of_the_workers_that_run() -> None:
    env = environment(SERVICES["init"])
    workers = of_module("services.partition")
    ids = sorted(int(environment(s)["WORKER_ID"]) for s in workers.values())
    assert ids == list(range(int(env["INIT_WORKERS"])))
    for service in workers.values():
        assert environment(service)["WORKER_OPERATOR"] == env["INIT_OPERATOR"]
        assert environment(service)["WORKER_NATS_URL"] == env["INIT_NATS_URL"]


def test_what_needs_init_waits_for_it_to_finish() -> None:
    for name in [*of_module("services.signer"), *of_module("services.partition")]:
        condition = SERVICES[name]["depends_on"]["init"]["condition"]
        assert condition == "service_completed_successfully"


# -- start order, probes, ports


def test_depends_on_names_services_that_exist_with_a_condition_they_can_meet() -> None:
    for name, service in SERVICES.items():
        for target, how in service.get("depends_on", {}).items():
            assert target in SERVICES and target != name, f"{name} -> {target}"
            condition = how["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in SERVICES[target], f"{name} -> {target}"
            if condition == "service_completed_successfully":
                assert target in ONE_SHOT, f"{name} -> {target}"


@pytest.mark.parametrize("name", sorted(ONE_SHOT))
def test_a_one_shot_service_runs_once(name: str) -> None:
    assert SERVICES[name]["restart"] == "no"
    assert "healthcheck" not in SERVICES[name]


def test_the_start_order_has_no_cycle() -> None:
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, " -> ".join((*path, name))
        if name not in done:
            for target in SERVICES[name].get("depends_on", {}):
                visit(target, (*path, name))
            done.add(name)

    for name in SERVICES:
        visit(name, ())


@pytest.mark.parametrize("name", [n for n in SERVICES if n not in ONE_SHOT | NO_PROBE])
def test_each_long_running_service_has_a_healthcheck(name: str) -> None:
    test = SERVICES[name]["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL")
    if name in PROJECT:  # its readiness, on the port it serves
        assert f"http://127.0.0.1:{http_port(PROJECT[name])}/readyz" in " ".join(test)


def test_only_the_public_apis_are_published_each_on_its_own_port() -> None:
    published: dict[str, list[tuple[int, int]]] = {}
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            *_, host, container = str(port).split(":")
            published.setdefault(name, []).append((int(host), int(container)))
    assert set(published) == PUBLIC
    hosts = [host for ports in published.values() for host, _ in ports]
    assert len(hosts) == len(set(hosts))
    for name, ports in published.items():
        assert {container for _, container in ports} == {http_port(SERVICES[name])}
