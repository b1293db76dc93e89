"""Integer tensors stored whole: gpupas's settings against Zstandard level 3 (ZipNN's coder for dtypes
it does not model) on the same bytes, one tensor each of 2^20 values.

    python benchmarks/ints.py

Small signed values repeat their sign in every upper byte; the default setting may split those planes
by the value's top byte (FORMAT.md 9.7), which the sampled estimate decides per tensor.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def cases(n: int = 1 << 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    signed = rng.normal(0, 60, n).round()
    return {
        "int64 N(0, 60)": signed.astype(np.int64),
        "int32 N(0, 60)": signed.astype(np.int32),
        "int16 N(0, 60)": signed.astype(np.int16),
        "int64 labels, 30% -100": np.where(rng.random(n) < 0.3, -100, rng.integers(0, 30000, n)).astype(np.int64),
        "int64 Poisson(20)": rng.poisson(20, n).astype(np.int64),
        "int64 arange": np.arange(n, dtype=np.int64),
        "int8 N(0, 30)": rng.normal(0, 30, n).round().clip(-128, 127).astype(np.int8),
    }


def main() -> None:
    import zstandard

    import gpupas

    print("| tensor | raw | fast | default | strong | zstd-3 | default / zstd-3 |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d, gpupas.create_archive(f"{d}/arc", durable=False) as a:
        for name, v in cases().items():
            sizes = [a.commit({"v": v}, setting=s).stored_bytes for s in ("fast", "default", "strong")]
            z = len(zstandard.ZstdCompressor(level=3).compress(v.tobytes()))
            print(f"| {name} | {v.nbytes:,} | " + " | ".join(f"{x:,}" for x in sizes) + f" | {z:,} | "
                  f"{sizes[1] / z:.2f} |")


if __name__ == "__main__":
    main()
