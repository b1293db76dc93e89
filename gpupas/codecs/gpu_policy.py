"""Which codec codes each chunk on the GPU: the rules of :mod:`gpupas.codecs.policy`, for a whole batch.

On a GPU each candidate coder runs over every chunk of a stream in one nvCOMP call (cheaper than
estimating per chunk whether it could win); then the rules pick per chunk, vectorized: the smallest
of the frame of raw blocks (no coder), a coded Zstandard frame and Deflate, where Deflate is kept
only where it saves ``DEFLATE_MIN_GAIN`` of the chunk over Zstandard's coded frame (over the raw
frame where Zstandard did not run) and never for the zero-padded last chunk; nvCOMP ANS competes
where the setting names it. Ties go to the earlier of raw, Zstandard, Deflate, ANS, as on the CPU.

Which coders run is the GPU's shortcut (as ``huffman_floor`` is the CPU's): nvCOMP writes
Huffman-only Deflate at ~45 GB/s and Zstandard at ~7 GB/s, and Deflate came out smaller on the
dense planes of the fine-tune deltas measured, so Zstandard runs over every chunk only under ``try_all`` or
where Deflate is not a candidate. Otherwise it runs after Deflate, over the padded last chunk (which
Deflate may not code), over the chunks Deflate coded to at most :data:`ZSTD_BELOW` of their bytes, and
over those with at least :data:`RUNS_ABOVE` of their bytes in runs (counted on the device): Huffman
coding spends at least a bit on every byte and cannot see runs, so on a sparse or partly changed delta
(stretches of zero bytes) it stores an eighth of them where Zstandard's matches store next to nothing.
Such deltas run both coders over most of their chunks: smaller, at Zstandard's speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpupas.codecs.framing import raw_frame_size
from gpupas.codecs.policy import DEFLATE_MIN_GAIN, ChunkPolicy

RAW, ZSTD, DEFLATE, ANS = 0, 1, 2, 3  # what a chunk is stored as
CODEC_IDS = {RAW: "zstd", ZSTD: "zstd", DEFLATE: "deflate", ANS: "nvcomp-ans"}  # the codec id of each
GZIP_FRAMING = 18  # bytes a gzip member adds around raw Deflate: 10 of header, 8 of trailer
ZSTD_BELOW = 1 / 4  # Deflate within this part of a chunk (2 bits a byte): near Huffman's floor, Zstandard tried too
RUNS_ABOVE = 1 / 8  # a chunk with this part of its bytes equal to the three before them: Zstandard tried too


def raw_frame_sizes(n: np.ndarray, size: int) -> np.ndarray:
    """Bytes of the Zstandard frame of raw blocks holding ``n`` stream bytes zero-padded to ``size``."""
    return np.asarray(raw_frame_size(np.asarray(n, np.int64), np.full(np.shape(n), size, np.int64)), np.int64)


@dataclass(frozen=True)
class GpuPolicy:
    """The codec choice of a setting on the GPU (built from the same :class:`ChunkPolicy`)."""

    codecs: tuple[str, ...] = ("zstd", "deflate")
    try_all: bool = False

    @classmethod
    def of(cls, policy: ChunkPolicy) -> GpuPolicy:
        return cls(tuple(policy.codecs), policy.try_all)

    def coders(self) -> list[str]:
        """Codec ids run over every chunk."""
        out = []
        if "deflate" in self.codecs:
            out.append("deflate")
        if "zstd" in self.codecs and (self.try_all or "deflate" not in self.codecs):
            out.append("zstd")
        if "nvcomp-ans" in self.codecs:
            out.append("nvcomp-ans")
        return out

    def then_needs_runs(self) -> bool:
        """Whether :meth:`then` reads the chunks' run counts."""
        return "zstd" in self.codecs and "zstd" not in self.coders()

    def then(self, n: np.ndarray, size: int, coded: dict[str, np.ndarray],
             runs: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Codec id -> the chunks (indices) to run it over next, given what :meth:`coders` gave (``coded``, as
        in :meth:`choose`) and ``runs`` (each chunk's bytes equal to the three before them): Zstandard, where
        it did not run, over a zero-padded last chunk (Deflate may not code it), over the chunks Deflate
        coded to at most :data:`ZSTD_BELOW` of their bytes and over those with at least :data:`RUNS_ABOVE` of
        their bytes in runs."""
        if not self.then_needs_runs():
            return {}
        n = np.asarray(n, np.int64)
        want = n < size
        d = coded.get("deflate")
        if d is not None:
            want |= (d >= 0) & (d <= ZSTD_BELOW * n)
        if runs is not None:
            want |= np.asarray(runs) >= RUNS_ABOVE * n
        return {"zstd": np.flatnonzero(want)} if want.any() else {}

    def choose(self, n: np.ndarray, size: int, coded: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """What each chunk is stored as (RAW, ZSTD, DEFLATE, ANS) and its body size in bytes.

        ``n``: stream bytes in each chunk (``size`` but for a short last one); ``coded``: codec id ->
        each chunk's coded size (-1 where that coder did not run on the chunk). Deflate's sizes are
        of raw Deflate; the gzip framing is added here.
        """
        n = np.asarray(n, np.int64)
        kind = np.full(n.size, RAW, np.int8)
        best = raw_frame_sizes(n, size)
        z = coded.get("zstd")
        z_ok = np.zeros(n.size, bool) if z is None else z >= 0
        if z is not None:
            take = z_ok & (z < best)
            kind[take], best = ZSTD, np.where(take, z, best)
        d = coded.get("deflate")
        if d is not None and "deflate" in self.codecs:
            body = d + GZIP_FRAMING
            against = np.where(z_ok, z if z is not None else 0, raw_frame_sizes(n, size))
            eligible = (d >= 0) & (n == size) & (body + DEFLATE_MIN_GAIN * n <= against)
            take = eligible & (body < best)
            kind[take], best = DEFLATE, np.where(take, body, best)
        a = coded.get("nvcomp-ans")
        if a is not None and "nvcomp-ans" in self.codecs:
            take = (a >= 0) & (a < best)
            kind[take], best = ANS, np.where(take, a, best)
        return kind, best.astype(np.int64)
