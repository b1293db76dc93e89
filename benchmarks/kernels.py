"""Throughput of the compiled segment kernels alone (one thread, CPU time, best of 30): the context-split
encode and decode of a 2^20-value fp32 segment, 'mat' and against a base ('sub', 'xor').

    python benchmarks/kernels.py [--repo PATH]

``--repo`` measures another checkout's build (its ``gpupas/_fastc*.so`` built in place), to compare two
versions alternately on a noisy machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    args = ap.parse_args()
    sys.path.insert(0, str(args.repo))
    import numpy as np

    from gpupas.backend import fast
    from gpupas.pas.planes import LAYOUTS
    from gpupas.pas.transform import Plan

    if not fast.enabled():
        raise SystemExit("the compiled kernels are not built in this checkout")
    rng = np.random.default_rng(0)
    n = 1 << 20
    vals = (rng.standard_normal(n) * 0.05).astype(np.float32)
    u = vals.view(np.uint32)
    base = (vals + (rng.standard_normal(n) * 1e-4).astype(np.float32)).view(np.uint32)
    flat = np.zeros(4 * n + 64, np.uint8)
    offs = np.arange(4, dtype=np.int64) * n
    out = np.empty(n, np.uint32)
    got = {}
    for enc in ("mat", "sub", "xor"):
        plan, ub = Plan(enc, True), None if enc == "mat" else base
        best_e = best_d = float("inf")
        for _ in range(30):
            t = time.process_time()
            fast.encode_segment(u, ub, None, None, None, n, 0, n, LAYOUTS["float32"], plan, flat, offs, 64)
            best_e = min(best_e, time.process_time() - t)
        for _ in range(30):
            t = time.process_time()
            fast.decode_segment(flat, offs, ub, None, None, None, n, 0, n, LAYOUTS["float32"], plan, out)
            best_d = min(best_d, time.process_time() - t)
        if not (out == u).all():
            raise AssertionError(f"{enc}: the decoded segment differs")
        got[enc] = (n / best_e / 1e6, n / best_d / 1e6)
    print(f"{args.repo}: M values/s encode / decode: "
          + ", ".join(f"{k} {e:.0f} / {d:.0f}" for k, (e, d) in got.items()))


if __name__ == "__main__":
    main()
