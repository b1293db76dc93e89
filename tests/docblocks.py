"""The code blocks of README.md and docs/*.md, run as a reader would run them, in order.

A ```python block runs in a fresh interpreter, a ```console block runs its ``$ `` lines in one bash
session (so ``export`` carries on; each must succeed); both in one working folder that holds the main job's output
(``demo-archive``, ``demo-checkpoints``) and the repository's ``scripts/`` and ``benchmarks/``. A
block right after ``<!-- not run: why -->`` is left out (the install commands: CI runs those).

    python tests/docblocks.py WORKDIR     # run them all, print each block's output (to paste into docs)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    code: str
    skip: str | None

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line} ({self.lang})"


def blocks(paths: list[Path] = DOCS) -> list[Block]:
    out = []
    for path in paths:
        lines = path.read_text().splitlines()
        i, skip = 0, None
        while i < len(lines):
            m = _FENCE.match(lines[i])
            if m and m.group(1):
                start, body = i + 1, []
                i += 1
                while i < len(lines) and not lines[i].startswith("```"):
                    body.append(lines[i])
                    i += 1
                out.append(Block(path, start, m.group(1), "\n".join(body), skip))
                skip = None
            else:
                note = re.match(r"^<!-- not run: (.*) -->$", lines[i].strip())
                if note:
                    skip = note.group(1)
                elif lines[i].strip():
                    skip = None if not lines[i].startswith("<!--") else skip
            i += 1
    return out


def prepare(workdir: Path, archive: Path, checkpoints: Path) -> None:
    """A working folder as a reader has it after the main job: its outputs and the repository's scripts."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name, target in (("demo-archive", archive), ("demo-checkpoints", checkpoints),
                         ("scripts", ROOT / "scripts"), ("benchmarks", ROOT / "benchmarks")):
        link = workdir / name
        if not link.exists():
            link.symlink_to(target)


def run(block: Block, workdir: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run one block in ``workdir``; the result (its output: stdout, then stderr)."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                        "COLUMNS": "120", "GPUPAS_AUTHOR": "reader"}
    env.pop("GPUPAS_ARCHIVE", None)
    if block.lang == "python":
        cmd = [sys.executable, "-c", block.code]
    elif block.lang == "console":  # each command must succeed (a line may end in `; echo "exit code $?"`)
        lines = [line[2:] for line in block.code.splitlines() if line.startswith("$ ")]
        check = 'rc=$?; if [ $rc -ne 0 ]; then echo "command {} failed ($rc)" >&2; exit $rc; fi'
        script = "\n".join(f"{line}\n{check.format(i + 1)}" for i, line in enumerate(lines))
        cmd = ["bash", "-o", "pipefail", "-c", script]
    elif block.lang == "bash":
        cmd = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    else:
        raise ValueError(f"{block}: no way to run a {block.lang!r} block")
    bindir = str(Path(sys.executable).parent)  # the `gpupas` script of this interpreter's environment
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


def runnable(paths: list[Path] = DOCS) -> list[Block]:
    return [b for b in blocks(paths) if b.skip is None and b.lang in ("python", "console", "bash")]


if __name__ == "__main__":
    work = Path(sys.argv[1]).resolve()
    prepare(work, work / "demo-archive", work / "demo-checkpoints") if not (work / "demo-archive").exists() else None
    for b in runnable():
        res = run(b, work)
        print(f"===== {b}  rc={res.returncode}\n{res.stdout}{res.stderr}", flush=True)
