"""This tree's gpupas against another revision's, in one process, alternating: speed differences this
machine's noise would hide between separate runs.

    python benchmarks/ab.py REV [--rounds 10] [--cases fp32-mat,bf16-mat,fp32-ft,bf16-ft,cnn]  (also: fp32-cut-ft)

``REV`` (a commit, tag or branch) is exported with ``git archive``, its compiled path built, and its
package imported as ``gpupas_ab`` beside this tree's ``gpupas``. Each round runs every case once with
each (the order alternating): a commit into a fresh durable archive, then a restore of that snapshot
(the base, for a delta, committed and restored before it, untimed). Reported per case: the median over
the rounds of this tree's time divided by REV's in the same round (below 1: this tree is faster), wall
and CPU, and each side's best. The sizes must agree: a change that alters the bytes is not a speed A/B.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = {  # key: (set, snapshot, base or None); "-cut": the set's tensors cut into 1,450 (checkpoints.cut)
    "fp32-mat": ("minilm-fp32", 0, None),
    "bf16-mat": ("minilm-bf16", 0, None),
    "fp32-ft": ("minilm-fp32", 1, 0),
    "bf16-ft": ("minilm-bf16", 1, 0),
    "cnn": ("cnn-sgd", 1, 0),
    "fp32-cut-ft": ("minilm-fp32-cut", 1, 0),
}
DEFAULT = "fp32-mat,bf16-mat,fp32-ft,bf16-ft,cnn"


def build(rev: str, into: Path) -> Path:
    """REV's package, built and renamed ``gpupas_ab`` under ``into``; returns the folder to put on sys.path."""
    src = into / "src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    subprocess.run([sys.executable, "-c", "import setuptools; setuptools.setup()", "build_ext", "--inplace", "-q"],
                   cwd=src, check=True, capture_output=True)
    pkg = into / "pkg"
    pkg.mkdir()
    (src / "gpupas").rename(pkg / "gpupas_ab")
    modules = "|".join(sorted({p.name.split(".")[0] for p in (pkg / "gpupas_ab").iterdir()} - {"__pycache__"}))
    for py in (pkg / "gpupas_ab").rglob("*.py"):  # its imports of gpupas, and module paths in strings
        text = py.read_text()
        text = re.sub(r"\b(from|import) gpupas(?=[. \n])", r"\1 gpupas_ab", text)
        text = re.sub(rf"([\"'])gpupas\.({modules})\b", r"\1gpupas_ab.\2", text)  # not codec ids ("gpupas.x")
        py.write_text(text)
    return pkg


def timed(fn: Any) -> tuple[float, float, Any]:
    c, t = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - t, time.process_time() - c, out


def one(lib: Any, where: Path, snaps: list[Any], i: int, b: int | None) -> tuple[list[float], int]:
    """(commit wall, commit CPU, restore wall, restore CPU), stored bytes."""
    with lib.create_archive(where) as arc:
        if b is not None:
            arc.commit(snaps[b][1], snapshot="b")
            arc.restore("b")
        we, ce, m = timed(lambda: arc.commit(snaps[i][1], snapshot="s", base=None if b is None else "b"))
        arc.bases.drop(m.id)
        wd, cd, out = timed(lambda: arc.restore(m.id))
        for name, v in snaps[i][1].items():
            if out[name].tobytes() != v.tobytes():
                raise AssertionError(f"{lib.__name__}: tensor {name} did not round-trip")
        return [we, ce, wd, cd], m.stored_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--cases", default=DEFAULT)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, str(build(args.rev, Path(tmp))))
        import gpupas_ab

        import gpupas
        from benchmarks.checkpoints import build_checkpoint_sets, cut

        sets = build_checkpoint_sets()
        sets["minilm-fp32-cut"] = cut(sets["minilm-fp32"][:2])
        print(f"this tree vs {args.rev}, {args.rounds} rounds; ratios: this tree / {args.rev} (median over rounds)")
        for key in args.cases.split(","):
            set_name, i, b = CASES[key]
            got: dict[str, list[list[float]]] = {"new": [], "old": []}
            sizes = set()
            for r in range(args.rounds):
                for side, lib in (("new", gpupas), ("old", gpupas_ab))[:: 1 if r % 2 else -1]:
                    times, stored = one(lib, Path(tmp) / f"{key}-{side}-{r}", sets[set_name], i, b)
                    got[side].append(times)
                    sizes.add(stored)
            ratio = [statistics.median(n[k] / o[k] for n, o in zip(got["new"], got["old"])) for k in range(4)]
            best = [(min(x[k] for x in got["new"]) * 1e3, min(x[k] for x in got["old"]) * 1e3) for k in (0, 2)]
            print(f"{key:9s} commit wall {ratio[0]:.3f} cpu {ratio[1]:.3f} | restore wall {ratio[2]:.3f} cpu "
                  f"{ratio[3]:.3f} | best commit {best[0][0]:.1f} vs {best[0][1]:.1f} ms, restore {best[1][0]:.1f} "
                  f"vs {best[1][1]:.1f} ms | stored bytes {'equal' if len(sizes) == 1 else sorted(sizes)}", flush=True)


if __name__ == "__main__":
    main()
