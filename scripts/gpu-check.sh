#!/usr/bin/env bash
# GPU check, for a machine with a CUDA GPU and CuPy but no network (the device tool's machines):
# install the carried wheels (../shared/device/fetch-wheels.sh or the list in README), run the GPU
# tests and a short timing of the CuPy transforms against NumPy, print a table last. < 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_codecs.py
python3 - <<'PY'
import time, numpy as np, cupy as cp
from gpupas.pas.planes import LAYOUTS, to_bits
from gpupas.pas.transform import Plan, decode_segment, encode_segment, SEGMENT
dev = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
rng = np.random.default_rng(0)
l = LAYOUTS["float32"]
a = (rng.standard_normal(SEGMENT) * 0.02).astype(np.float32)
b = (a + rng.standard_normal(SEGMENT).astype(np.float32) * 1e-4).astype(np.float32)
rows = []
for plan in (Plan("mat", False), Plan("sub", False), Plan("sub", True)):
    for xp in (np, cp):
        u, ub = xp.asarray(to_bits(b, l)), xp.asarray(to_bits(a, l))
        base = None if plan.enc == "mat" else ub
        out = xp.empty((4, SEGMENT), xp.uint8); back = xp.empty_like(u)
        for _ in range(3):
            encode_segment(u, base, l, plan, out, 32768); decode_segment(out, base, l, plan, back)
        cp.cuda.runtime.deviceSynchronize()
        t = time.perf_counter()
        for _ in range(10):
            encode_segment(u, base, l, plan, out, 32768)
        cp.cuda.runtime.deviceSynchronize(); te = (time.perf_counter() - t) / 10
        t = time.perf_counter()
        for _ in range(10):
            decode_segment(out, base, l, plan, back)
        cp.cuda.runtime.deviceSynchronize(); td = (time.perf_counter() - t) / 10
        assert xp.asnumpy(back).tobytes() == b.tobytes() if xp is cp else back.tobytes() == b.tobytes()
        rows.append((f"{plan.enc}{'+ctx' if plan.ctx else ''}", xp.__name__, u.nbytes / te / 1e9, u.nbytes / td / 1e9))
print(f"\ntransforms of one 4 MiB float32 segment on {dev} (GB/s of raw bytes; CuPy: generic kernels, unfused)")
print("| plan | backend | encode GB/s | decode GB/s |\n|---|---|---|---|")
for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} |")
PY
