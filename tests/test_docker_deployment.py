"""The docker deployment: compose schema, zone segmentation, secrets hygiene, image hardening.

Docker does not run here, so the compose file is validated against the Compose specification's
JSON schema and the segmentation rules are asserted on the parsed file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from flowline.core.config import load_config
from tests.conftest import REPO, schema_file

DOCKER = REPO / "docker"
OT_SERVICES = {"mosquitto", "collector-opcua", "collector-mqtt", "sim"}
# Which config sections each Flowline service reads (its secrets must be mounted into it).
SECTIONS = {
    "collector-opcua": ("collectors", "opcua"),
    "collector-mqtt": ("collectors", "mqtt"),
    "ot-sender": ("relay_ot",),
    "dmz-gateway": ("relay_dmz",),
    "writer": ("historian",),
    "rollup": ("historian",),
    "analytics": ("analytics",),
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def _networks(service: dict[str, Any]) -> set[str]:
    networks = service.get("networks", [])
    return set(networks) if isinstance(networks, list) else set(networks.keys())


def _secrets(service: dict[str, Any]) -> set[str]:
    """Declared secret names a service uses."""
    return {s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])}


def _mounted(service: dict[str, Any]) -> set[str]:
    """File names under /run/secrets inside the service (``target`` renames a secret)."""
    return {s if isinstance(s, str) else s.get("target", s["source"]) for s in service.get("secrets", [])}


@pytest.mark.schemas
def test_compose_validates_against_the_compose_spec(compose: dict[str, Any]) -> None:
    validator = jsonschema.Draft7Validator(json.loads(schema_file("compose-spec.json").read_text(encoding="utf-8")))
    errors = [f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(compose)]
    assert errors == []


ZONES = {
    "ot": OT_SERVICES | {"ot-sender"},
    "dmz": {"dmz-gateway", "writer"},
    "it": {"rollup", "analytics", "influxdb", "grafana"},
}


def test_each_conduit_joins_exactly_the_two_ends_of_one_approved_flow(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    assert set(compose["networks"]) == {"ot", "ot-dmz", "dmz-it", "it"}
    assert all(compose["networks"][n]["internal"] is True for n in ("ot", "ot-dmz", "dmz-it"))
    members = {name: _networks(s) for name, s in services.items()}
    on = {net: {n for n, nets in members.items() if net in nets} for net in compose["networks"]}
    assert on["ot"] == OT_SERVICES
    assert on["ot-dmz"] == {"ot-sender", "dmz-gateway"}  # the relay: the sender dials the gateway
    assert on["dmz-it"] == {"writer", "influxdb"}  # the historian: the writer dials InfluxDB
    assert on["it"] == {"rollup", "analytics", "influxdb", "grafana"}
    # Nothing is on networks of two zones but InfluxDB, the listening end of its conduit.
    assert [n for n, nets in members.items() if len(nets) > 1] == ["influxdb"]
    assert set(ZONES["ot"] | ZONES["dmz"] | ZONES["it"]) == set(services)


def test_no_volume_is_shared_across_zones(services: dict[str, dict[str, Any]]) -> None:
    zone_of = {service: zone for zone, members in ZONES.items() for service in members}
    users: dict[str, set[str]] = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume["source"]
            if not source.startswith((".", "/")):  # named volumes; bind mounts are read-only files
                users.setdefault(source, set()).add(zone_of[name])
    assert {v: z for v, z in users.items() if len(z) > 1} == {}
    assert users["dmz-data"] == {"dmz"} and users["ot-data"] == {"ot"}


def test_no_ot_or_dmz_service_publishes_a_port(services: dict[str, dict[str, Any]]) -> None:
    for name in ZONES["ot"] | ZONES["dmz"]:
        assert "ports" not in services[name] and "network_mode" not in services[name], name
    assert [n for n, s in services.items() if "ports" in s] == ["grafana"]


def test_simulator_only_in_the_demo_profile(services: dict[str, dict[str, Any]]) -> None:
    assert services["sim"]["profiles"] == ["demo"]
    assert [n for n, s in services.items() if "profiles" in s] == ["sim"]


def test_every_config_and_secret_file_exists_or_has_an_example(compose: dict[str, Any]) -> None:
    for kind in ("configs", "secrets"):
        for name, entry in compose[kind].items():
            raw = entry["file"]
            default = re.fullmatch(r"\$\{\w+:-(.+)\}", raw)
            path = (DOCKER / (default.group(1) if default else raw)).resolve()
            if kind == "secrets":
                assert not path.exists(), f"real secret file {path} must not be in the repository"
                assert path.with_name(path.name + ".example").exists(), f"{name}: no {path.name}.example"
            else:
                assert path.exists(), f"config {name}: {path} missing"
    for service_name, service in compose["services"].items():
        for ref in _secrets(service):
            assert ref in compose["secrets"], f"{service_name} uses undeclared secret {ref}"
        for ref in service.get("configs", []):
            assert ref["source"] in compose["configs"], f"{service_name} uses undeclared config {ref}"


def _secret_paths(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set().union(*(_secret_paths(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_secret_paths(v) for v in node)) if node else set()
    return {node} if isinstance(node, str) and node.startswith("/run/secrets/") else set()


def test_config_template_loads_and_each_service_gets_exactly_its_secrets(
    services: dict[str, dict[str, Any]],
) -> None:
    config = load_config(DOCKER / "flowline.yaml")  # validates every section and SecretRef
    assert config.relay_ot is not None and config.relay_ot.gateway_host == "dmz-gateway"
    raw = yaml.safe_load((DOCKER / "flowline.yaml").read_text(encoding="utf-8"))
    for service, path in SECTIONS.items():
        section = raw
        for key in path:
            section = section[key]
        needed = {p.removeprefix("/run/secrets/") for p in _secret_paths(section)}
        assert needed, f"{service}: section {'.'.join(path)} references no secret files"
        assert needed <= _mounted(services[service]), f"{service} lacks {needed - _mounted(services[service])}"
    # Writer and rollup read the same section but hold different tokens (write-only vs read+write).
    assert _mounted(services["writer"]) == _mounted(services["rollup"]) == {"influxdb_historian_token"}
    assert _secrets(services["writer"]) != _secrets(services["rollup"])
    # Least privilege: the OT side never holds IT credentials and vice versa.
    it_secrets = {s for n in ("writer", "rollup", "analytics", "influxdb", "grafana") for s in _secrets(services[n])}
    ot_secrets = {s for n in OT_SERVICES | {"ot-sender"} for s in _secrets(services[n])}
    assert not any("influx" in s or "grafana" in s for s in ot_secrets)
    assert not any(s.startswith(("opcua", "mqtt", "mosquitto")) for s in it_secrets)


SECRET_PATTERNS = [
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"-----BEGIN CERTIFICATE-----\s*\n[A-Za-z0-9+/]{40,}"),
    re.compile(r"(?i)(password|token|secret)\s*[:=]\s*['\"]?[A-Za-z0-9_\-]{12,}"),
]


def test_no_secret_values_in_the_deployment_files(compose: dict[str, Any]) -> None:
    for path in sorted(p for p in DOCKER.rglob("*") if p.is_file()):
        text = path.read_text(encoding="utf-8", errors="replace")
        for pattern in SECRET_PATTERNS:
            assert not pattern.search(text), (
                f"{path.relative_to(REPO)} looks like it holds a secret ({pattern.pattern})"
            )
    for name, service in compose["services"].items():
        env = service.get("environment", {})
        for key, value in env.items() if isinstance(env, dict) else (e.split("=", 1) for e in env):
            names_a_file = key.endswith("_FILE") or str(value).startswith("/run/secrets/")
            if re.search(r"PASSWORD|TOKEN|SECRET|KEY$", key) and not names_a_file:
                pytest.fail(f"{name}: {key}={value!r} puts a secret in the environment; use a *_FILE secret")
    ignore = (DOCKER / "secrets" / ".gitignore").read_text()
    assert "*" in ignore.split() and "!*.example" in ignore.split()


def test_dockerfile_is_multistage_pinned_non_root_with_healthcheck() -> None:
    text = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert len(bases) >= 2, "multi-stage build expected"
    for base in bases:
        _, _, tag = base.partition(":")
        assert tag and tag != "latest" and re.match(r"\d+\.\d+\.\d+", tag), f"base {base} not pinned by version"
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    assert re.search(r"^HEALTHCHECK\s", text, flags=re.M)
    assert re.search(r"COPY --from=build", text)
    # the health check reads the status file of the container's own process (no connection)
    assert re.search(r'^\s+CMD \["flowline", "status", "--check", "pid1"\]', text, flags=re.M)


def test_every_flowline_service_has_a_status_file_for_its_health_check(services: dict[str, dict[str, Any]]) -> None:
    """`flowline status --check pid1` finds each service's status file from its command line."""
    from flowline.core.status import PROCESS_NAMES, process_name

    named = {}
    for name, service in services.items():
        if "command" in service and "flowline" in str(service.get("image", "")):
            named[name] = process_name(["flowline", *service["command"]])
    assert named.pop("sim") is None  # the simulator is not part of the pipeline: no status file
    assert None not in named.values(), named
    assert set(named.values()) <= set(PROCESS_NAMES.values())
    assert len(set(named.values())) == len(named), "two services would share one status file"


def test_each_service_runs_its_zones_image_built_from_the_lock(services: dict[str, dict[str, Any]]) -> None:
    """One image per zone: an OT container carries no IT library (see tests/test_zone_install.py)."""
    zone_of = {
        "collector-opcua": "ot", "collector-mqtt": "ot", "ot-sender": "ot", "sim": "lab",
        "dmz-gateway": "dmz", "writer": "dmz", "rollup": "it", "analytics": "it",
    }
    for name, zone in zone_of.items():
        service = services[name]
        assert service["build"]["args"]["ZONE"] == zone, name
        assert f"flowline-{zone}:" in service["image"], name
    text = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    assert 'uv sync --frozen --no-default-groups --no-editable --extra "$ZONE"' in text
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text(encoding="utf-8").split()
    assert "!uv.lock" in ignore
    for folder in ("core", "inventory", "collectors", "relay", "historian", "analytics", "dashboards", "lab"):
        assert f"COPY {folder} ./{folder}" in text, f"the image must be built from {folder}/"
        assert f"!{folder}/**" in ignore, f"{folder}/ is left out of the build context"


def test_grafana_is_provisioned_from_the_packaged_files(
    services: dict[str, dict[str, Any]], compose: dict[str, Any]
) -> None:
    grafana = services["grafana"]
    targets = {c["target"] for c in grafana["configs"]}
    assert "/etc/grafana/provisioning/datasources/flowline.yaml" in targets
    assert "/etc/grafana/provisioning/dashboards/flowline.yaml" in targets
    provider = yaml.safe_load((DOCKER / compose["configs"]["grafana_dashboard_provider"]["file"]).read_text())
    path = provider["providers"][0]["options"]["path"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"] if v.startswith("../")}
    assert (DOCKER / mounts[path]).resolve() == (REPO / "dashboards" / "flowline" / "dashboards" / "json").resolve()
    assert grafana["environment"]["GF_SERVER_PROTOCOL"] == "https"


def test_influxdb_is_a_current_release_with_init_settings(services: dict[str, dict[str, Any]]) -> None:
    influx = services["influxdb"]
    version = influx["image"].split(":")[1]
    assert tuple(int(p) for p in version.split(".")[:2]) >= (2, 7)
    env = influx["environment"]
    assert env["DOCKER_INFLUXDB_INIT_MODE"] == "setup"
    assert {"DOCKER_INFLUXDB_INIT_PASSWORD_FILE", "DOCKER_INFLUXDB_INIT_ADMIN_TOKEN_FILE"} <= set(env)
    init = Path(DOCKER / "influxdb" / "init-dbrp.sh").read_text()
    assert "v1 dbrp create" in init and "for policy in raw rollup_1m rollup_1h" in init
    assert env["DOCKER_INFLUXDB_INIT_BUCKET"] == "flowline/raw"
