"""The data scientist's route as a new user takes it: `flowline demo --keep` leaves the stack up,
then the README's (and docs/data-science.md's) snippet, both notebooks and `flowline export` work
with nothing set by hand (no FLOWLINE_* variable: the config is found by the documented rule), and
`flowline stack down` stops every process."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO

SNIPPET_SOURCES = (REPO / "README.md", REPO / "docs" / "data-science.md")


def _python_blocks(path: Path, heading: str | None = None) -> list[str]:
    text = path.read_text()
    if heading is not None:  # only the section under this heading
        start = text.index(heading)
        end = text.find("\n## ", start + len(heading))
        text = text[start : end if end != -1 else None]
    return re.findall(r"```python\n(.*?)```", text, re.S)


def _flowline(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flowline.core", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


def _alive(pid: int) -> bool:
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


def _run_notebook(path: Path) -> list[str]:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    texts = [out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert any(
        "image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
    ), f"{path.name} drew no figure"
    return texts


@pytest.mark.timeout(2400)
def test_kept_demo_then_readme_snippet_notebooks_and_export_with_no_hand_edits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A user's shell: no FLOWLINE_* variables; the checkout's notebooks copied next to the demo
    # folder, as they sit in a clone (notebooks/ beside .flowline-demo/).
    for key in [k for k in os.environ if k.startswith("FLOWLINE_")]:
        monkeypatch.delenv(key)
    env = dict(os.environ)
    shutil.copytree(REPO / "notebooks", tmp_path / "notebooks")

    started = time.monotonic()
    demo = _flowline(["demo", "--keep", "--duration", "0", "--backfill-step", "600"], tmp_path, env, timeout=900)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "The stack is still running" in demo.stdout
    state = json.loads((tmp_path / ".flowline-demo" / "stack.json").read_text())
    pids = {p["name"]: p["pid"] for p in state["processes"]}
    try:
        assert set(pids) == {
            "influxd", "mosquitto", "relay-dmz", "relay-writer", "relay-ot", "sim", "collect-opcua", "collect-mqtt"
        }
        assert all(_alive(pid) for pid in pids.values()), "the demo stopped a process it should have kept"
        status = _flowline(["stack", "status"], tmp_path, env)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count("running") == len(pids) and "(answering)" in status.stdout
        print(f"demo --keep: {time.monotonic() - started:.0f} s")

        # The snippets, as written, from the folder the user ran the demo in.
        snippets = [code for source in SNIPPET_SOURCES[1:] for code in _python_blocks(source)]
        snippets += _python_blocks(SNIPPET_SOURCES[0], "## For data scientists")[:1]
        for code in snippets:
            ran = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                                 timeout=600)
            assert ran.returncode == 0, f"snippet failed:\n{code}\n{ran.stderr[-3000:]}"

        # `flowline export`, no --config: Parquet and CSV hold what the API loads.
        out = _flowline(["export", "--asset", "P-102", "--days", "14", "--out", "p102.parquet"], tmp_path, env)
        assert out.returncode == 0, out.stderr
        assert re.search(r"^[\d,]+ rows \(6 tags, 1m, ", out.stdout), out.stdout
        parquet = pd.read_parquet(tmp_path / "p102.parquet")
        assert set(parquet["tag"]) == {"vibration_rms", "bearing_temp", "discharge_pressure", "suction_pressure",
                                       "flow", "motor_current"}
        assert len(parquet) == int(out.stdout.split(" rows")[0].replace(",", ""))
        assert len(parquet) >= 6 * 14 * 24 * 6 * 0.95  # 14 days of 10-minute backfill, every tag
        out = _flowline(["export", "--asset", "E-201", "--days", "1", "--wide", "--out", "e201.csv"], tmp_path, env)
        assert out.returncode == 0, out.stderr
        wide = pd.read_csv(tmp_path / "e201.csv")
        assert "E-201/approach_temp" in wide.columns and len(wide) >= 140

        # Both notebooks, executed where they live (notebooks/), against the kept stack.
        texts = _run_notebook(tmp_path / "notebooks" / "degrading-asset.ipynb")
        result = next(text for text in texts if "RESULT" in text)
        assert re.search(r"RESULT P-102/vibration_rms: (DEGRADING|CRITICAL)", result), result
        texts = _run_notebook(tmp_path / "notebooks" / "backtest.ipynb")
        result = next(text for text in texts if "BACKTEST" in text)
        # The demo's three injected faults, each flagged ahead of its alarm crossing; no false flag.
        match = re.search(r"BACKTEST caught (\d+) of (\d+), missed (\d+), open (\d+), false flags (\d+), "
                          r"min lead (\d+) h", result)
        assert match, result
        caught, events, missed, _, false_flags, min_lead = (int(g) for g in match.groups())
        assert (caught, events, missed, false_flags) == (3, 3, 0, 0) and min_lead >= 24, result
        notebooks = [p.name for p in (REPO / "notebooks").glob("*.ipynb")]
        assert sorted(notebooks) == ["backtest.ipynb", "degrading-asset.ipynb"], "a new notebook is not tested here"
    finally:
        down = _flowline(["stack", "down"], tmp_path, env)
    assert down.returncode == 0, down.stderr
    assert f"stopped {len(pids)} process(es)" in down.stdout
    assert not [name for name, pid in pids.items() if _alive(pid)]
    after = _flowline(["stack", "status"], tmp_path, env)
    assert after.returncode == 1 and "no stack is kept running in .flowline-demo" in after.stderr


def test_notebooks_script_says_what_to_run_when_no_stack_is_up() -> None:
    if (REPO / ".flowline-demo" / "stack.json").exists():
        pytest.skip("a demo stack is kept running in this checkout")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWLINE_")}
    done = subprocess.run([str(REPO / "scripts" / "notebooks")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "start one with:  scripts/demo --keep" in done.stderr
    assert "FLOWLINE_CONFIG=/path/to/flowline.yaml scripts/notebooks" in done.stderr
