"""How a commit shares each chunk's stored bytes among the tensor planes in it (``engine.encode.attribute``),
against a plain loop over the chunks written from its docstring: the same integers in every manifest."""

from __future__ import annotations

import bisect
import math

import ml_dtypes
import numpy as np
import pytest

import gpupas
from gpupas.engine import encode
from gpupas.engine.encode import SHARE_SAMPLES, Layout
from gpupas.format.layout import plane_ranges
from gpupas.pas.context import count_entropies, sample_counts


def reference(entries, streams, bufs, chunk_sizes, segment):
    """Chunk after chunk: a chunk one plane fills is that plane's; a shared one is split by length times
    sampled entropy (at least 0.05 bits), its parts summed after every chunk one plane fills."""
    shares = [[0.0] * (e.width + 1) for e in entries]
    shared = []
    for s, stream in enumerate(streams):
        segs = []
        for i, e in enumerate(entries):
            segs.extend((lo, lo + b - a, i, p) for st, lo, p, a, b in plane_ranges(e, segment) if st == s)
            if e.extras is not None and e.extras[0] == s:
                segs.append((e.extras[1], e.extras[1] + e.extras_nbytes, i, e.width))
        segs = sorted(x for x in segs if x[1] > x[0])
        starts = [x[0] for x in segs]
        buf, size = np.asarray(bufs[s]), stream.chunk_size
        for c, stored in enumerate(chunk_sizes[s]):
            lo, hi = c * size, min(len(buf), (c + 1) * size)
            parts = []
            for x in segs[max(0, bisect.bisect_right(starts, lo) - 1):]:
                if x[0] >= hi:
                    break
                a, b = max(lo, x[0]), min(hi, x[1])
                if b > a:
                    parts.append((x[2], x[3], a, b))
            if len(parts) == 1:
                shares[parts[0][0]][parts[0][1]] += stored
            elif parts:
                h = count_entropies(sample_counts([buf[a:b:max(1, (b - a) // SHARE_SAMPLES)] for *_, a, b in parts]))
                shared.append((stored, parts, h.tolist()))
    for stored, parts, h in shared:  # no piece above its own length: the rest shared again among the others
        weights = [(b - a) * max(0.05, x) for (*_, a, b), x in zip(parts, h)]
        length = [float(b - a) for *_, a, b in parts]
        got, active, left = [0.0] * len(parts), set(range(len(parts))), float(stored)
        while True:
            total = sum(weights[k] for k in sorted(active))
            part = {k: left * weights[k] / total for k in active}
            over = sorted(k for k in active if part[k] > length[k])
            if not over:
                for k in active:
                    got[k] = part[k]
                break
            for k in over:
                got[k] = length[k]
                active.discard(k)
            left -= sum(length[k] for k in over)
            if not active:  # every piece got its length: the rest (a raw chunk's framing) by length
                if left > 0:
                    got = [g + left * n / sum(length) for g, n in zip(got, length)]
                break
        for (i, p, _, _), g in zip(parts, got):
            shares[i][p] += g
    def largest_remainders(xs, whole):
        floors = [math.floor(x) for x in xs]
        extra = sorted(range(len(xs)), key=lambda i: (round(floors[i] - xs[i], 9), i))[: whole - sum(floors)]
        return [f + (i in extra) for i, f in enumerate(floors)]

    total = sum(sum(c) for c in chunk_sizes)  # every stored byte goes to some tensor: largest remainders
    stored = largest_remainders([sum(sh) for sh in shares], total)
    return [(tuple(largest_remainders(sh[:-1], min(n, round(sum(sh[:-1]))))), n) for sh, n in zip(shares, stored)]


def _snapshots(seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    first = {f"small.{i}": rng.normal(0, 0.02, int(rng.integers(0, 700))).astype(np.float32) for i in range(150)}
    first |= {"empty": np.zeros((0, 3), np.float16), "odd": np.array([np.nan, -0.0, np.inf, 1e-45], np.float32),
              "wide": rng.normal(0, 1, (9, 5)).astype(np.float64),
              "bf": rng.normal(0, 1, 333).astype(ml_dtypes.bfloat16),
              "emb": rng.normal(0, 0.02, (400, 64)).astype(np.float32),
              "big": rng.normal(0, 0.02, 70_001).astype(np.float32)}
    second = {k: v.copy() for k, v in first.items()}
    rows = rng.random(400) < 0.3  # a few changed rows: a row mask, an extra beside the planes
    second["emb"][rows] += rng.normal(0, 1e-4, (int(rows.sum()), 64)).astype(np.float32)
    second["big"] += rng.normal(0, 1e-5, 70_001).astype(np.float32)
    return [first, second]


@pytest.mark.parametrize("layout", [Layout(), Layout(groups=(1,), chunk_size=4096),
                                    Layout(groups=(1, 2), chunk_size=1000, segment=1024, rotate=False)],
                         ids=["default", "two-groups", "three-groups-odd-chunks"])
def test_shares_are_the_plain_loops(tmp_path, monkeypatch, layout) -> None:
    seen = []
    real = encode.attribute

    def both(entries, streams, bufs, chunk_sizes, segment):
        got = real(entries, streams, bufs, chunk_sizes, segment)
        seen.append(([(e.plane_bytes, e.stored) for e in got], reference(entries, streams, bufs, chunk_sizes, segment)))
        return got

    monkeypatch.setattr(encode, "attribute", both)
    first, second = _snapshots(len(layout.groups))
    with gpupas.create_archive(tmp_path / "a", durable=False) as arc:
        arc.commit(first, snapshot="s0", layout=layout)
        m = arc.commit(second, snapshot="s1", base="s0", layout=layout)
    assert any(e.rows is not None for e in m.tensors)  # the extras path ran
    assert len(seen) == 2
    for got, want in seen:
        assert got == want
    shared = sum(len(s.chunks) for s in m.streams) < sum(e.width for e in m.tensors if e.values)
    assert shared  # many planes per chunk: the shared path ran, not only the one-plane chunks


def test_no_piece_of_a_shared_chunk_is_given_more_than_its_length() -> None:
    """A plane whose sampled entropy is high beside pieces whose estimate is biased low would be given more
    bytes than it has (a delta "stored" above its raw size in `gpupas stats`): it gets its length, the rest
    goes to the others; where every piece got its length, the rest (a raw chunk's framing) goes by length."""
    from gpupas.engine.encode import _share

    chunk = np.array([0, 0, 1, 1, 1, 2, 2])
    length = np.array([100.0, 2000.0, 10.0, 20.0, 30.0, 100.0, 200.0])
    weight = length * np.array([8.0, 0.05, 1.0, 1.0, 1.0, 8.0, 8.0])
    stored = np.array([1000.0, 30.0, 310.0])
    got = _share(chunk, weight, length, stored, 3)
    assert got[:5].tolist() == [100.0, 900.0, 5.0, 10.0, 15.0]
    assert got[5:].tolist() == pytest.approx([100 + 10 / 3, 200 + 20 / 3])
    assert got[:2].sum() == 1000 and got[2:5].sum() == 30  # every stored byte goes to some piece
