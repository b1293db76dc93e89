"""Peak memory of a commit and a restore, per case, against ZipNN: each measured in a subprocess.

    python benchmarks/memory.py [--cases fp32-mat,fp32-ft,bf16-mat,bf16-ft,cnn] [--tools gpupas,zipnn] [--out m.md]

Per (case, snapshot, tool), in fresh processes that first load the tensors they need (the snapshot, its
base and the base's base: the caller's arrays, held as a training loop holds them) and warm up (imports,
threads: a small commit and restore elsewhere), then read their resident set size (RSS) ``R0``:

- commit (one process): commits the base(s) unmeasured, resets the peak RSS (Linux
  ``/proc/self/clear_refs``), commits the snapshot against its base and reads the peak (``VmHWM``).
  Extra = peak - R0: everything gpupas holds beyond the caller's tensors, buffers it kept from the base
  commits included. "Kept" is what stays after the commit (RSS - R0): the workspace and scratch kept for
  the next call. ZipNN: ``compress`` to memory.
- restore (a second process, on the archive the first wrote): the base and the base's base are put in
  the archive's base cache (the caller's arrays, as after a commit), the peak is reset, the snapshot is
  restored. Extra = peak - R0 - output bytes. ZipNN: ``decompress`` of what it compressed before R0.

``MALLOC_MMAP_THRESHOLD_`` is fixed at 128 KiB in the subprocesses (for every tool), so freed large
buffers go back to the system and R0 is not inflated by freed heap pages. Linux only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = {  # name: (label, set, pairs (snapshot, base))
    "fp32-mat": ("MiniLM fp32, materialized", "minilm-fp32", lambda n: [(0, None)]),
    "fp32-ft": ("MiniLM fp32, Adam fine-tune vs previous", "minilm-fp32",
                lambda n: [(i, i - 1) for i in range(1, n)]),
    "bf16-mat": ("MiniLM bf16, materialized", "minilm-bf16", lambda n: [(0, None)]),
    "bf16-ft": ("MiniLM bf16, fine-tune vs pretrained", "minilm-bf16", lambda n: [(i, 0) for i in range(1, n)]),
    "cnn": ("CNN SGD, epoch vs previous", "cnn-sgd", lambda n: [(i, i - 1) for i in range(1, n)]),
}


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    got = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                got[k] = int(v.split()[0]) * 1024
    return got["VmRSS"], got["VmHWM"]


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _warm_up(tmp: Path) -> None:
    import gpupas

    # imports and threads, as ZipNN gets its warm-up
    with gpupas.create_archive(Path(tempfile.mkdtemp(dir=tmp)), durable=False) as arc:
        small = {"w": np.ones((64, 64), np.float32)}
        arc.commit(small, snapshot="a")
        arc.commit({"w": small["w"] + 1}, snapshot="b", base="a")
        arc.bases.clear()
        arc.restore("b")


def _child(set_name: str, i: int, b: int | None, tool: str, op: str, where: str) -> dict[str, float]:
    from benchmarks.checkpoints import build_checkpoint_sets

    snaps = build_checkpoint_sets(sets=(set_name,))[set_name]
    grand = b - 1 if (b is not None and set_name != "minilm-bf16" and b > 0) else None
    held = {k: snaps[k][1] for k in {i, b, grand} - {None}}
    tensors = held[i]
    raw = sum(v.nbytes for v in tensors.values())
    if tool == "zipnn":
        from benchmarks.peers import ZipNNPeer

        peer = ZipNNPeer()
        base = None if b is None else held[b]
        blob = peer.compress(tensors, base)  # also the warm-up: imports, thread pools
        peer.decompress(blob, base)
        del blob
        gc.collect()
        r0 = _rss()[0]
        _reset_peak()
        blob = peer.compress(tensors, base)
        commit = _rss()[1] - r0
        gc.collect()
        r1 = _rss()[0]
        _reset_peak()
        out = peer.decompress(blob, base)
        restore = _rss()[1] - r1 - raw
        del out
        return {"raw": raw, "commit": commit, "restore": restore, "kept": 0}
    import gpupas
    from gpupas.pas.planes import layout_of, to_bits

    _warm_up(Path(where))
    gc.collect()
    r0 = _rss()[0]
    if op == "commit":
        with gpupas.create_archive(Path(where) / "a") as arc:
            if grand is not None:
                arc.commit(held[grand], snapshot=f"s{grand}")
            if b is not None:
                arc.commit(held[b], snapshot=f"s{b}", base=None if grand is None else f"s{grand}")
            _reset_peak()
            arc.commit(tensors, snapshot=f"s{i}", base=None if b is None else f"s{b}")
            commit = _rss()[1] - r0
            gc.collect()
            kept = _rss()[0] - r0
        return {"raw": raw, "commit": commit, "kept": kept}
    with gpupas.open_archive(Path(where) / "a", cache_size=3) as arc:
        for k in (grand, b):  # the caller's arrays, as a commit leaves them in the cache
            if k is not None:
                arc.bases.put(f"s{k}", {n: to_bits(v, layout_of(v.dtype)).reshape(-1) for n, v in held[k].items()},
                              borrowed=True)
        _reset_peak()
        out = arc.restore(f"s{i}")
        restore = _rss()[1] - r0 - raw
        del out
    return {"raw": raw, "restore": restore}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--tools", default="gpupas,zipnn")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        set_name, i, b, tool, op, where = json.loads(args.child)
        print(json.dumps(_child(set_name, i, b, tool, op, where)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    rows = ["| case | tool | raw MB (largest snapshot) | commit extra, worst (x raw) | restore extra beyond its "
            "output, worst (x raw) | kept after a commit, MB |", "|---|---|---|---|---|---|"]
    from benchmarks.checkpoints import _default_cache

    sizes = {k: len(v) for k, v in json.loads((_default_cache() / "manifest.json").read_text())["sets"].items()}

    def child(*spec: object) -> dict[str, float]:
        p = subprocess.run([sys.executable, __file__, "--child", json.dumps(list(spec))], capture_output=True,
                           text=True, env=env, check=False)
        if p.returncode:
            raise RuntimeError(p.stderr[-2000:])
        return json.loads(p.stdout.strip().splitlines()[-1])

    for key in args.cases.split(","):
        label, set_name, pairs = CASES[key]
        for tool in args.tools.split(","):
            got = []
            for i, b in pairs(sizes[set_name]):
                with tempfile.TemporaryDirectory(dir=os.environ.get("GPUPAS_BENCH_TMP")) as where:
                    if tool == "zipnn":
                        got.append(child(set_name, i, b, tool, "both", where))
                    else:
                        got.append(child(set_name, i, b, tool, "commit", where)
                                   | child(set_name, i, b, tool, "restore", where))
            raw = max(g["raw"] for g in got)
            c = max(g["commit"] / g["raw"] for g in got)
            r = max(g["restore"] / g["raw"] for g in got)
            kept = max(g["kept"] for g in got) / 1e6
            cmb = max(g["commit"] for g in got) / 1e6
            rmb = max(g["restore"] for g in got) / 1e6
            rows.append(f"| {label} | {tool} | {raw / 1e6:.1f} | {cmb:.1f} MB ({c:.2f}) | {rmb:.1f} MB ({r:.2f}) | "
                        f"{kept:.1f} |")
            print(rows[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
