"""Storage graphs shaped like the paper's experiment (ModelHub, ICDE 2017, sec. 5): versions of snapshots of tensors.

``versions`` lines of work, each with ``snapshots`` snapshots of ``tensors`` tensors; version 0
is pretrained, each later one fine-tunes a snapshot of an earlier version (a random lineage
tree). A vertex per tensor snapshot, a co-usage group per snapshot. Candidate edges per tensor:
the previous snapshot of the version (both ways), the one two back, and a version's first
snapshot from the snapshot it was fine-tuned from (both ways). Sizes are raw bytes times a ratio
drawn from ``ratios`` (lists of stored/raw measured on real snapshot pairs, per kind of edge),
recreation the cost model's.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from gpupas.plan.costs import DEFAULT, CostModel
from gpupas.plan.graph import StorageGraph

# stored/raw by edge kind, from DESIGN.md's real checkpoints (benchmarks/plan.py measures its own)
RATIOS: dict[str, list[float]] = {
    "whole": [0.82, 0.83, 0.81, 0.84],
    "next": [0.32, 0.34, 0.48, 0.67, 0.31],  # a snapshot from the previous one of the same run
    "back": [0.33, 0.35, 0.49, 0.68, 0.32],  # the previous one from the next
    "skip": [0.40, 0.42, 0.55, 0.72, 0.39],  # from two back
    "fork": [0.45, 0.50, 0.60, 0.75],  # a fine-tune's first snapshot from the snapshot it started from
}


def paper_graph(versions: int = 30, snapshots: int = 10, tensors: int = 16, *, sizes: Sequence[int] | None = None,
                ratios: Mapping[str, Sequence[float]] = RATIOS, model: CostModel = DEFAULT, noise: float = 0.05,
                seed: int = 0) -> StorageGraph:
    """A tensor-level storage graph of ``versions x snapshots x tensors`` vertices (see the module)."""
    rng = random.Random(seed)
    sizes = list(sizes or [rng.choice([1 << 16, 1 << 18, 1 << 20, 1 << 22]) for _ in range(tensors)])
    sizes = [sizes[t % len(sizes)] for t in range(tensors)]
    per_tensor = {kind: [rng.choice(list(vals)) for _ in range(tensors)] for kind, vals in ratios.items()}
    share = 1.0 / tensors
    g = StorageGraph()

    def size(kind: str, t: int) -> float:
        return sizes[t] * per_tensor[kind][t] * rng.lognormvariate(0.0, noise)

    def add(u: str, v: str, kind: str) -> None:
        for t in range(tensors):
            s = size(kind, t)
            g.add_edge((u, t), (v, t), s, model.seconds(s, sizes[t], sizes[t], share))

    runs: list[list[str]] = []
    for k in range(versions):
        run = [f"v{k}s{i}" for i in range(snapshots)]
        runs.append(run)
        for sid in run:
            g.groups[sid] = []
            for t in range(tensors):
                s = size("whole", t)
                g.add_vertex((sid, t), s, model.seconds(s, sizes[t], share), sizes[t])
                g.groups[sid].append((sid, t))
        for i in range(1, snapshots):
            add(run[i - 1], run[i], "next")
            add(run[i], run[i - 1], "back")
            if i >= 2:
                add(run[i - 2], run[i], "skip")
        if k:
            start = rng.choice(runs[rng.randrange(k)])
            add(start, run[0], "fork")
            add(run[0], start, "fork")
    return g
