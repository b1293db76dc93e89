"""One run, every tool, real checkpoints: stored size (% of raw) and throughput (MB/s of raw bytes).

    python benchmarks/run.py [--quick] [--settings default,strong] [--out results.md]

Cases: MiniLM fp32 pretrained (materialized), its Adam fine-tune snapshots each against the previous
one, MiniLM bf16 pretrained and its bf16 fine-tunes against it, and a CNN trained with SGD on
scikit-learn digits, each epoch against the previous one. gpupas writes a real archive on disk
(local Zarr store; chunks, folders and manifest fsync'd, plus a row without fsync); peers
compress in memory. Delta restores of every tool get the base in memory (gpupas: also the base's
own base, which its 'pred' tensors extrapolate from). Every tool's time for a snapshot is its best
of ``--repeat`` runs after one untimed warm-up run (gpupas: of the whole case, each run into a
fresh archive); a case's time is the sum over its snapshots.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpupas
from benchmarks.checkpoints import build_checkpoint_sets
from benchmarks.peers import (
    Blosc2Peer,
    BytewiseZlibPeer,
    SafetensorsPeer,
    TorchSavePeer,
    ZipNNPeer,
    ZstdPeer,
)

Tensors = dict[str, np.ndarray]


@dataclass
class Case:
    """Snapshots ``pairs`` of one set, each (snapshot index, base index or None)."""

    label: str
    set_name: str
    pairs: list[tuple[int, int | None]]


@dataclass
class Result:
    raw: int = 0
    stored: int = 0
    enc_s: float = 0.0
    dec_s: float = 0.0
    per_snapshot: list[float] = field(default_factory=list)

    def row(self) -> tuple[float, float, float]:
        return 100 * self.stored / self.raw, self.raw / self.enc_s / 1e6, self.raw / self.dec_s / 1e6


def _best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, out = float("inf"), fn()  # an untimed warm-up run, as gpupas gets
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _check(got: Tensors, want: Tensors, who: str) -> None:
    for k, v in want.items():
        if got[k].tobytes() != v.tobytes():
            raise AssertionError(f"{who}: tensor {k} did not round-trip")


def run_gpupas(snaps: list[tuple[str, Tensors]], case: Case, setting: str, repeat: int,
               layers: dict[str, list[dict[str, Any]]], durable: bool = True) -> Result:
    res = Result()
    enc_s = [float("inf")] * len(case.pairs)  # per snapshot, the best over the timed runs (as the peers get)
    dec_s = [float("inf")] * len(case.pairs)
    with tempfile.TemporaryDirectory(dir=os.environ.get("GPUPAS_BENCH_TMP")) as tmp:
        for rep in range(repeat + 1):  # a fresh archive each time; rep 0 warms up
            with gpupas.create_archive(Path(tmp) / f"arc{rep}", durable=durable) as arc:
                for k, (i, b) in enumerate(case.pairs):
                    if b is not None and not arc.store.has_manifest(f"s{b}"):
                        arc.commit(snaps[b][1], snapshot=f"s{b}")
                    base = None if b is None else f"s{b}"
                    t = time.perf_counter()
                    m = arc.commit(snaps[i][1], base=base, setting=setting, snapshot=f"s{i}")
                    if rep:
                        enc_s[k] = min(enc_s[k], time.perf_counter() - t)
                    if base is not None:  # the base in memory, as the peers get it; and the base's own
                        grand = arc.manifest(base).base  # base, which 'pred' tensors extrapolate from
                        for s in ([grand] if grand else []) + [base]:
                            arc.restore(s)
                    arc.bases.drop(m.id)
                    t = time.perf_counter()
                    out = arc.restore(m.id)
                    if rep:
                        dec_s[k] = min(dec_s[k], time.perf_counter() - t)
                    _check(out, snaps[i][1], f"gpupas {setting}")
                    if rep == 0:
                        res.raw += m.raw_bytes
                        res.stored += m.stored_bytes
                        res.per_snapshot.append(100 * m.stored_bytes / m.raw_bytes)
                        layers.setdefault(f"{setting}:{snaps[i][0]}", arc.report(m.id))
    res.enc_s, res.dec_s = sum(enc_s), sum(dec_s)
    return res


def run_peer(peer: Any, snaps: list[tuple[str, Tensors]], case: Case, repeat: int) -> Result:
    res = Result()
    for i, b in case.pairs:
        base = snaps[b][1] if (b is not None and peer.supports_delta) else None
        tensors = snaps[i][1]
        enc, blob = _best(lambda t=tensors, b=base: peer.compress(t, b), repeat)
        dec, out = _best(lambda z=blob, b=base: peer.decompress(z, b), repeat)
        _check(out, snaps[i][1], peer.name)
        size = peer.size(blob)
        raw = sum(v.nbytes for v in snaps[i][1].values())
        res.raw += raw
        res.stored += size
        res.enc_s += enc
        res.dec_s += dec
        res.per_snapshot.append(100 * size / raw)
    return res


def _layer_group(name: str) -> str:
    if name.startswith("embeddings"):
        return "embeddings"
    if ".attention." in name:
        return "encoder attention"
    if ".intermediate." in name or ".output.dense" in name:
        return "encoder feed-forward"
    if "LayerNorm" in name:
        return "LayerNorms"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="default,strong", help="gpupas settings to run")
    ap.add_argument("--repeat", type=int, default=2, help="timing repeats (best kept)")
    ap.add_argument("--quick", action="store_true", help="fewer snapshots, one repeat, no strong")
    ap.add_argument("--out", type=Path, help="also write the tables (markdown) here")
    args = ap.parse_args()
    sets = build_checkpoint_sets()
    nft = len(sets["minilm-fp32"]) - 1
    cases = [
        Case("MiniLM fp32, materialized", "minilm-fp32", [(0, None)]),
        Case("MiniLM fp32, Adam fine-tune vs previous", "minilm-fp32", [(i, i - 1) for i in range(1, nft + 1)]),
        Case("MiniLM bf16, materialized", "minilm-bf16", [(0, None)]),
        Case("MiniLM bf16, fine-tune vs pretrained", "minilm-bf16",
             [(i, 0) for i in range(1, len(sets["minilm-bf16"]))]),
        Case("CNN SGD, epoch vs previous", "cnn-sgd", [(i, i - 1) for i in range(1, len(sets["cnn-sgd"]))]),
    ]
    settings = args.settings.split(",")
    repeat = args.repeat
    if args.quick:
        settings, repeat = [s for s in settings if s != "strong"], 1
        cases[1].pairs = cases[1].pairs[:2]
    peers = [ZipNNPeer(), BytewiseZlibPeer(), ZstdPeer(), Blosc2Peer(), SafetensorsPeer(), TorchSavePeer()]
    lines = [f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
             f"Python {platform.python_version()}, numpy {np.__version__}; date {date.today()}",
             f"command: python benchmarks/run.py {' '.join(sys.argv[1:])}", ""]
    table = ["| case | tool | stored % of raw | per snapshot % | compress MB/s | restore MB/s | size / ZipNN |",
             "|---|---|---|---|---|---|---|"]
    verdicts: list[str] = []
    layers: dict[str, list[dict[str, Any]]] = {}
    for case in cases:
        snaps = sets[case.set_name]
        results: dict[str, Result] = {}
        for s in settings:
            results[f"gpupas {s}"] = run_gpupas(snaps, case, s, repeat, layers)
        if "default" in settings:  # what the fsync of every chunk costs (the peers write to memory)
            results["gpupas default, no fsync"] = run_gpupas(snaps, case, "default", repeat, {}, durable=False)
        for p in peers:
            results[p.name + ("" if p.supports_delta or case.pairs[0][1] is None else " (no delta)")] = \
                run_peer(p, snaps, case, repeat)
        zipnn = results["zipnn"]
        for tool, r in results.items():
            pct, enc, dec = r.row()
            each = ", ".join(f"{x:.1f}" for x in r.per_snapshot) if len(r.per_snapshot) > 1 else ""
            table.append(f"| {case.label} | {tool} | {pct:.2f} | {each} | {enc:.0f} | {dec:.0f} | "
                         f"{r.stored / zipnn.stored:.4f} |")
        d = results.get("gpupas default")
        if d is not None:
            worst = max(a / z for a, z in zip(d.per_snapshot, zipnn.per_snapshot))
            verdicts.append(f"{case.label}: default worst snapshot / ZipNN = {worst:.3f}; "
                            f"commit / ZipNN compress = {(d.raw / d.enc_s) / (zipnn.raw / zipnn.enc_s):.2f}; "
                            f"restore / ZipNN decompress = {(d.raw / d.dec_s) / (zipnn.raw / zipnn.dec_s):.2f}")
        st = results.get("gpupas strong")
        if st is not None:
            worst = max(a / z for a, z in zip(st.per_snapshot, zipnn.per_snapshot))
            verdicts.append(f"{case.label}: strong worst snapshot / ZipNN = {worst:.3f}")
        print("\n".join(table[-len(results) :]), flush=True)
    first_ft = sets["minilm-fp32"][1][0]
    groups: dict[str, list[int]] = {}
    for row in layers.get(f"default:{first_ft}", []):
        g = groups.setdefault(_layer_group(row["name"]), [0, 0])
        g[0] += row["nbytes"]
        g[1] += row["stored"]
    layer_table = ["| layer group | raw MB | gpupas default stored % |", "|---|---|---|"]
    layer_table += [f"| {g} | {raw / 1e6:.1f} | {100 * st / raw:.1f} |" for g, (raw, st) in groups.items()]
    text = "\n".join(lines + table + ["", f"Per layer group, {first_ft} vs previous:", ""] + layer_table
                     + ["", "Ratios (targets: size <= ZipNN, fp32 delta <= 0.80, bf16 delta <= 0.60; "
                            "strong fp32 delta <= 0.75; commit >= 1x, restore >= 0.5x):"]
                     + [f"- {v}" for v in verdicts])
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
