"""gpupas (default setting) against ZipNN, several rounds of the same cases in one run: the spread of the
speed ratios, the stored sizes, and whether the compiled CPU path is on.

    python benchmarks/fast.py [--rounds 3] [--repeat 3] [--cases fp32-mat,fp32-ft,bf16-mat,bf16-ft,cnn]
                              [--reference] [--no-fsync] [--out results.md]

Each round runs every case for gpupas and then for ZipNN, timed as ``benchmarks/run.py`` times them: per
snapshot the best of ``--repeat`` runs after an untimed warm-up (gpupas: each run a fresh archive on
disk, durable unless ``--no-fsync``; deltas restored with the base, and the base's base, in memory;
ZipNN to and from memory), summed over the case. Besides wall-clock MB/s it reports CPU MB/s (raw bytes
per second of the process's CPU time, all threads): a figure other load on the machine moves less.
``--reference`` runs gpupas's NumPy reference transforms instead of the compiled ones (the same bytes).
Case ``fp32-cut-ft`` (not run unless named): MiniLM fp32 cut into 1,450 small tensors, for per-tensor costs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = {  # key: (label, set, pairs (snapshot, base))
    "fp32-mat": ("MiniLM fp32, materialized", "minilm-fp32", lambda n: [(0, None)]),
    "fp32-ft": ("MiniLM fp32, Adam fine-tune vs previous", "minilm-fp32", lambda n: [(i, i - 1) for i in range(1, n)]),
    "bf16-mat": ("MiniLM bf16, materialized", "minilm-bf16", lambda n: [(0, None)]),
    "bf16-ft": ("MiniLM bf16, fine-tune vs pretrained", "minilm-bf16", lambda n: [(i, 0) for i in range(1, n)]),
    "cnn": ("CNN SGD, epoch vs previous", "cnn-sgd", lambda n: [(i, i - 1) for i in range(1, n)]),
    "fp32-cut-ft": ("MiniLM fp32 cut into 1,450 tensors, fine-tune vs previous", "minilm-fp32-cut",
                    lambda n: [(1, 0)]),
}
DEFAULT = "fp32-mat,fp32-ft,bf16-mat,bf16-ft,cnn"  # the issue's cases; fp32-cut-ft: per-tensor costs


@dataclass
class Timed:
    raw: int = 0
    stored: int = 0
    enc: list[float] = field(default_factory=list)  # per snapshot: best wall seconds
    dec: list[float] = field(default_factory=list)
    enc_cpu: list[float] = field(default_factory=list)  # per snapshot: CPU seconds of that best run
    dec_cpu: list[float] = field(default_factory=list)

    def mbs(self) -> tuple[float, float, float, float]:
        return (self.raw / sum(self.enc) / 1e6, self.raw / sum(self.dec) / 1e6, self.raw / sum(self.enc_cpu) / 1e6,
                self.raw / sum(self.dec_cpu) / 1e6)


def _timed(fn: Any) -> tuple[float, float, Any]:
    c, t = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - t, time.process_time() - c, out


def _best(slot: list[tuple[float, float]], k: int, got: tuple[float, float]) -> None:
    if got[0] < slot[k][0]:
        slot[k] = got


def run_gpupas(snaps: list[tuple[str, dict[str, np.ndarray]]], pairs: list[tuple[int, int | None]], repeat: int,
               durable: bool) -> Timed:
    import gpupas

    res = Timed()
    enc = [(float("inf"), 0.0)] * len(pairs)
    dec = [(float("inf"), 0.0)] * len(pairs)
    with tempfile.TemporaryDirectory(dir=os.environ.get("GPUPAS_BENCH_TMP")) as tmp:
        for rep in range(repeat + 1):  # a fresh archive each time; rep 0 warms up
            with gpupas.create_archive(Path(tmp) / f"arc{rep}", durable=durable) as arc:
                for k, (i, b) in enumerate(pairs):
                    if b is not None and not arc.store.has_manifest(f"s{b}"):
                        arc.commit(snaps[b][1], snapshot=f"s{b}")
                    base = None if b is None else f"s{b}"
                    wall, cpu, m = _timed(lambda i=i, base=base: arc.commit(snaps[i][1], base=base, snapshot=f"s{i}"))
                    if rep:
                        _best(enc, k, (wall, cpu))
                    if base is not None:  # the base in memory, and the base's own base ('pred')
                        grand = arc.manifest(base).base
                        for s in ([grand] if grand else []) + [base]:
                            arc.restore(s)
                    arc.bases.drop(m.id)
                    wall, cpu, out = _timed(lambda m=m: arc.restore(m.id))
                    if rep:
                        _best(dec, k, (wall, cpu))
                    for name, v in snaps[i][1].items():
                        if out[name].tobytes() != v.tobytes():
                            raise AssertionError(f"gpupas: tensor {name} did not round-trip")
                    if rep == 0:
                        res.raw += m.raw_bytes
                        res.stored += m.stored_bytes
                    del out
    res.enc, res.enc_cpu = [w for w, _ in enc], [c for _, c in enc]
    res.dec, res.dec_cpu = [w for w, _ in dec], [c for _, c in dec]
    return res


def run_zipnn(snaps: list[tuple[str, dict[str, np.ndarray]]], pairs: list[tuple[int, int | None]],
              repeat: int) -> Timed:
    from benchmarks.peers import ZipNNPeer

    peer = ZipNNPeer()
    res = Timed()
    for i, b in pairs:
        base = None if b is None else snaps[b][1]
        tensors = snaps[i][1]
        peer.compress(tensors, base)  # warm-up
        best_e, best_d = (float("inf"), 0.0), (float("inf"), 0.0)
        blob = None
        for _ in range(repeat):
            wall, cpu, blob = _timed(lambda t=tensors, b=base: peer.compress(t, b))
            best_e = min(best_e, (wall, cpu))
        peer.decompress(blob, base)
        for _ in range(repeat):
            wall, cpu, out = _timed(lambda z=blob, b=base: peer.decompress(z, b))
            best_d = min(best_d, (wall, cpu))
        for name, v in tensors.items():
            if out[name].tobytes() != v.tobytes():
                raise AssertionError(f"zipnn: tensor {name} did not round-trip")
        res.raw += sum(v.nbytes for v in tensors.values())
        res.stored += peer.size(blob)
        res.enc.append(best_e[0])
        res.enc_cpu.append(best_e[1])
        res.dec.append(best_d[0])
        res.dec_cpu.append(best_d[1])
    return res


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3, help="timing repeats per snapshot (best kept)")
    ap.add_argument("--cases", default=DEFAULT)
    ap.add_argument("--reference", action="store_true", help="gpupas's NumPy reference transforms")
    ap.add_argument("--no-fsync", action="store_true", help="gpupas writes without fsync")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.reference:
        os.environ["GPUPAS_FAST"] = "0"
    from benchmarks.checkpoints import build_checkpoint_sets, cut
    from gpupas.backend import fast

    sets = build_checkpoint_sets()
    sets["minilm-fp32-cut"] = cut(sets["minilm-fp32"][:2])
    keys = args.cases.split(",")
    rows: dict[str, list[tuple[Timed, Timed]]] = {k: [] for k in keys}
    for r in range(args.rounds):
        for k in keys:
            _, set_name, pairs = CASES[k]
            snaps = sets[set_name]
            g = run_gpupas(snaps, pairs(len(snaps)), args.repeat, not args.no_fsync)
            z = run_zipnn(snaps, pairs(len(snaps)), args.repeat)
            rows[k].append((g, z))
            ge, gd, _, _ = g.mbs()
            ze, zd, _, _ = z.mbs()
            print(f"round {r + 1} {k}: commit {ge:.0f} vs {ze:.0f} MB/s ({ge / ze:.2f}x), restore {gd:.0f} vs "
                  f"{zd:.0f} MB/s ({gd / zd:.2f}x)", flush=True)
    lines = [f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python "
             f"{platform.python_version()}, numpy {np.__version__}; date {date.today()}; compiled CPU path: "
             f"{'on' if fast.enabled() else 'off'}{', no fsync' if args.no_fsync else ''}",
             f"command: python benchmarks/fast.py {' '.join(sys.argv[1:])}", "",
             "Median over the rounds (min-max); ratios are gpupas / ZipNN in the same round.", "",
             "| case | gpupas stored bytes | ZipNN stored bytes | commit MB/s gpupas / ZipNN | "
             "commit / ZipNN compress | "
             "restore MB/s gpupas / ZipNN | restore / ZipNN decompress | CPU-time ratio commit / restore |",
             "|---|---|---|---|---|---|---|---|"]
    for k in keys:
        got = rows[k]
        g0, z0 = got[0]
        ce = [g.mbs()[0] / z.mbs()[0] for g, z in got]
        cd = [g.mbs()[1] / z.mbs()[1] for g, z in got]
        ue = [g.mbs()[2] / z.mbs()[2] for g, z in got]
        ud = [g.mbs()[3] / z.mbs()[3] for g, z in got]
        med = statistics.median
        lines.append(f"| {CASES[k][0]} | {g0.stored:,} | {z0.stored:,} | "
                     f"{med([g.mbs()[0] for g, _ in got]):.0f} / {med([z.mbs()[0] for _, z in got]):.0f} | "
                     f"{_spread(ce)} | {med([g.mbs()[1] for g, _ in got]):.0f} / "
                     f"{med([z.mbs()[1] for _, z in got]):.0f} | {_spread(cd)} | {med(ue):.2f} / {med(ud):.2f} |")
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
