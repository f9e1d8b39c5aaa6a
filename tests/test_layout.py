"""The repository's shape: one folder per component, each with its README and a sample config that loads."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from flowline.analytics.rules import rules_for
from flowline.core.config import load_config
from flowline.dashboards.provision import DATASOURCE_UID
from flowline.inventory import load_site
from tests.conftest import EXAMPLE_SITE, REPO

COMPONENTS = ("core", "inventory", "collectors", "relay", "historian", "analytics", "dashboards", "lab")
ZONE_OF = {
    "core": "every zone",
    "inventory": "every zone",
    "collectors": "OT",
    "relay": "DMZ",
    "historian": "IT",
    "analytics": "IT",
    "dashboards": "IT",
    "lab": "development",
}


@pytest.mark.parametrize("component", COMPONENTS)
def test_each_component_is_a_namespace_portion_with_readme_and_pyproject(component: str) -> None:
    folder = REPO / component
    meta = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
    assert meta["name"] == f"flowline-plant-{component}"
    assert not (folder / "flowline" / "__init__.py").exists(), "flowline is a PEP 420 namespace: no __init__.py"
    assert (folder / "flowline" / component).is_dir()
    readme = (folder / "README.md").read_text()
    assert ZONE_OF[component] in readme.split("\n", 1)[0], "the README's title says where it runs"


def test_the_top_level_is_the_architecture() -> None:
    top = {p.name for p in REPO.iterdir() if not p.name.startswith(".")}
    assert {*COMPONENTS, "tests", "docker", "pyproject.toml", "README.md", "uv.lock"} <= top
    assert "flowline" not in top, "no catch-all package folder at the top"


def test_every_workspace_package_resolves_to_its_folder_never_to_an_index() -> None:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    ours = {p["name"]: p["source"] for p in lock["package"] if p["name"].startswith("flowline")}
    assert set(ours) == {"flowline-plant", *(f"flowline-plant-{c}" for c in COMPONENTS)}
    for name, source in ours.items():
        assert "registry" not in source, f"{name} would be fetched from a package index: {source}"
    assert not any(p["name"] == "flowline" for p in lock["package"]), "the PyPI 'flowline' is someone else's"


def _config_with_site(tmp_path: Path, sample: Path) -> Path:
    """The sample with its relative site_file pointing at the inventory's sample site."""
    doc = yaml.safe_load(sample.read_text())
    doc["site_file"] = str(REPO / "inventory" / "site.sample.yaml")
    path = tmp_path / sample.name
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    "sample",
    ["core/core.sample.yaml", "collectors/collectors.sample.yaml", "relay/relay.sample.yaml",
     "historian/historian.sample.yaml", "analytics/analytics.sample.yaml"],
)
def test_sample_configs_are_valid(sample: str, tmp_path: Path) -> None:
    config = load_config(_config_with_site(tmp_path, REPO / sample))
    load_site(config.site_file)
    if sample.startswith("analytics"):
        assert rules_for(config.analytics).trend_window_hours == 72


def test_inventory_and_lab_site_files_load() -> None:
    assert load_site(REPO / "inventory" / "site.sample.yaml").site == "north-field"
    assert len(load_site(EXAMPLE_SITE).assets) == 13


def test_dashboard_provisioning_samples_name_the_dashboards_datasource() -> None:
    folder = REPO / "dashboards" / "flowline" / "dashboards" / "provisioning"
    datasources = [yaml.safe_load(p.read_text()) for p in sorted(folder.glob("datasource-*.yaml"))]
    assert len(datasources) == 3
    assert all(d["datasources"][0]["uid"] == DATASOURCE_UID for d in datasources)
    assert yaml.safe_load((folder / "dashboards.yaml").read_text())["providers"]


def test_nothing_a_user_reads_points_outside_the_repository() -> None:
    readable = [REPO / "README.md", *REPO.glob("*/README.md"), *REPO.glob("docs/*.md"), *REPO.glob("notebooks/*")]
    offenders = [str(p.relative_to(REPO)) for p in readable if re.search(r"\.\./shared|/work/", p.read_text())]
    assert offenders == []
