"""The recreation cost model: seconds to decode one link of a chain, from bytes read and rebuilt.

Decoding a snapshot (its base already decoded) reads its stored bytes and decodes them (codec
work, proportional to ``stored``) and rebuilds its tensors (planes joined, context sort and
delta undone, CRC checked: proportional to the raw bytes, at a higher rate for tensors coded as
deltas), plus a fixed cost per link (manifest, folders, allocation)::

    seconds = per_stored * stored + per_raw * (raw - delta_raw) + per_delta * delta_raw + per_link

:func:`calibrate` fits the four coefficients by least squares to timed decodes of real snapshots
(materialized and deltas, small and large). :data:`DEFAULT` holds the fit on this project's
machine (2 cores, local disk, cold page cache; see benchmarks/plan-results.md); a restore's chain
costs the sum of its links (an upper bound where some tensors of a delta snapshot are whole).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CostModel:
    """Seconds per stored byte, per raw byte of tensors stored whole, per raw byte of tensors rebuilt
    from a delta (they also read their base's bits), and per link of a delta chain."""

    per_stored: float
    per_raw: float
    per_delta: float
    per_link: float

    def seconds(self, stored: float, raw: float, delta_raw: float = 0.0, links: float = 1.0) -> float:
        """Modelled time to decode ``links`` snapshot(s) of ``stored`` bytes holding ``raw`` bytes, of
        which ``delta_raw`` in tensors coded as deltas."""
        return (self.per_stored * stored + self.per_raw * (raw - delta_raw) + self.per_delta * delta_raw
                + self.per_link * links)

    def describe(self) -> str:
        return (f"{self.per_stored * 1e9:.3g} ns/stored byte + {self.per_raw * 1e9:.3g} ns/raw byte whole + "
                f"{self.per_delta * 1e9:.3g} ns/raw byte of deltas + {self.per_link * 1e3:.3g} ms/link")


# Fitted by calibrate(cold=True) on 2 cores of this project's machine (Python 3.11, NumPy backend, local disk,
# each snapshot's pages dropped before its decode) on the 15 snapshots of benchmarks/plan.py's archive (MiniLM
# fp32/bf16, CNN); the fits and their errors are in BENCHMARKS.md ("Storage plans and compaction"). Calibrate
# again for another machine or a remote store.
DEFAULT = CostModel(per_stored=0.0, per_raw=2.96e-9, per_delta=5.5e-9, per_link=0.368e-3)


@dataclass
class Calibration:
    """A fitted model and the measurements behind it: (stored, raw, delta raw, seconds) per decode."""

    model: CostModel
    samples: list[tuple[int, int, int, float]]

    def errors(self) -> list[float]:
        """Relative error of the model on each measured decode."""
        return [(self.model.seconds(s, r, d) - t) / t for s, r, d, t in self.samples if t > 0]

    def describe(self) -> str:
        errs = sorted(abs(e) for e in self.errors())
        med = errs[len(errs) // 2] if errs else 0.0
        return (f"{self.model.describe()} (fitted on {len(self.samples)} decodes; median |error| {100 * med:.1f}%, "
                f"max {100 * (errs[-1] if errs else 0.0):.1f}%)")


def fit(samples: Sequence[tuple[int, int, int, float]]) -> CostModel:
    """Least-squares fit (relative errors) of :class:`CostModel` to (stored, raw, delta raw, seconds);
    coefficients kept >= 0 (a negative one is dropped and the rest refitted)."""
    import numpy as np

    if not samples:
        return DEFAULT
    x = np.array([[s, r - d, d, 1.0] for s, r, d, _ in samples], dtype=np.float64)
    y = np.array([t for *_, t in samples], dtype=np.float64)
    w = 1.0 / np.maximum(y, 1e-6)  # small decodes count as much as large ones
    keep = [0, 1, 2, 3]
    coef = np.zeros(4)
    while keep:
        sol, *_ = np.linalg.lstsq(x[:, keep] * w[:, None], y * w, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0
            coef[keep] = sol
            break
        keep.pop(int(np.argmin(sol)))
    return CostModel(*(float(c) for c in coef))


def evict(archive: Any, m: Any) -> None:
    """Drop the page cache of snapshot ``m``'s folders (a local archive; clean pages, no privileges)."""
    import os

    from gpupas.format import keys

    root = archive.store.local_root
    if root is None or not hasattr(os, "posix_fadvise"):
        return
    for folder in m.folders():
        for d, _, files in os.walk(os.path.join(root, keys.folder(folder))):
            for f in files:
                fd = os.open(os.path.join(d, f), os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def calibrate(archive: Any, snapshots: Iterable[str] | None = None, repeat: int = 2, cold: bool = False
              ) -> Calibration:
    """Time the decode of each snapshot's own link (its bases decoded beforehand, untimed), best of
    ``repeat``, and fit the model; ``cold``: the snapshot's files leave the page cache before each
    decode (local archives). Uses the archive's executor (one thread per core by default)."""
    from gpupas.backend import get_backend
    from gpupas.engine import chain, decode

    backend = get_backend("numpy")
    sids = list(snapshots) if snapshots is not None else archive.snapshots()
    samples: list[tuple[int, int, int, float]] = []
    for sid in sids:
        m = archive.manifest(sid)
        deps = chain.dependencies(m, None, archive.manifest)
        bits = {d: chain.read_bits(archive.store, d, sorted(names), manifests=archive.manifest, backend=backend,
                                   executor=archive.executor)[0] for d, names in deps}
        base = bits.get(m.base, {}) if m.base is not None else {}
        grand = bits.get(chain.grand_of(m, archive.manifest) or "", {})
        base_bits = {e.name: base[e.name] for e in m.tensors if e.reads_base}
        grand_bits = {e.name: grand[e.name] for e in m.tensors if e.enc == "pred"}
        best = float("inf")
        for _ in range(repeat):
            if cold:
                evict(archive, m)
            t0 = time.perf_counter()
            decode.decode_snapshot(archive.store, m, m.tensors, base_bits, grand_bits, backend, archive.executor)
            best = min(best, time.perf_counter() - t0)
        delta = sum(e.nbytes for e in m.tensors if e.reads_base)
        samples.append((m.stored_bytes, m.raw_bytes, delta, best))
    return Calibration(fit(samples), samples)
