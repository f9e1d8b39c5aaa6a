"""The benchmarks are not run by CI (they take minutes), so check what would break them silently:
each one imports, and every file or folder of the checkout it names exists."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO

BENCHES = sorted(p for p in (REPO / "bench").glob("*.py") if not p.name.startswith("_"))


def _load(path: Path) -> ModuleType:
    sys.path.insert(0, str(path.parent))  # the benches import their `_common` helper as a sibling
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(path.parent))


@pytest.mark.parametrize("bench", BENCHES, ids=[p.stem for p in BENCHES])
def test_bench_imports_and_its_checkout_paths_exist(bench: Path) -> None:
    module = _load(bench)
    named = {k: v for k, v in vars(module).items() if isinstance(v, Path) and v.is_relative_to(REPO)}
    missing = {k: str(v.relative_to(REPO)) for k, v in named.items() if not v.exists() and k != "RESULTS"}
    assert not missing, f"{bench.name} names paths that are not in the checkout: {missing}"
