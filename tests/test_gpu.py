"""The CuPy backend of the plane/delta/context transforms: the same bytes as NumPy, bit for bit.

Runs only where CuPy sees a GPU (``scripts/gpu-check.sh`` on a GPU machine); skipped elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpupas.pas.planes import LAYOUTS, to_bits
from gpupas.pas.transform import Plan, decode_segment, encode_segment
from tests.conftest import adversarial

cp = pytest.importorskip("cupy")
try:
    GPU = cp.cuda.runtime.getDeviceCount() > 0
except Exception:  # no driver, no device
    GPU = False
pytestmark = pytest.mark.skipif(not GPU, reason="no CUDA device")

PLANS = [Plan(e, c) for e in ("mat", "sub", "xor") for c in (False, True)]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_cupy_encodes_the_numpy_bytes(name: str) -> None:
    layout = LAYOUTS[name]
    for n in (1, 4099, 70001):
        values, base = adversarial(name, n, 1), adversarial(name, n, 2)
        u, ub = to_bits(values, layout), to_bits(base, layout)
        gu, gub = cp.asarray(u), cp.asarray(ub)
        for plan in PLANS:
            base_np, base_cp = (None, None) if plan.enc == "mat" else (ub, gub)
            host = np.empty((layout.width, n), np.uint8)
            dev = cp.empty((layout.width, n), cp.uint8)
            b_host = encode_segment(u, base_np, layout, plan, host, 256)
            b_dev = encode_segment(gu, base_cp, layout, plan, dev, 256)
            assert b_host == b_dev, (name, n, plan)
            assert cp.asnumpy(dev).tobytes() == host.tobytes(), (name, n, plan)
            back = cp.empty_like(gu)
            decode_segment(dev, base_cp, layout, plan, back)  # GPU decode of GPU-made planes
            assert cp.asnumpy(back).tobytes() == u.tobytes(), (name, n, plan)
            host_back = np.empty_like(u)
            decode_segment(cp.asnumpy(dev), base_np, layout, plan, host_back)  # CPU decode of them
            assert host_back.tobytes() == u.tobytes(), (name, n, plan)


def test_cupy_arrays_commit_and_restore(tmp_path) -> None:
    import gpupas

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((512, 300)) * 0.02).astype(np.float32)
    with gpupas.create_archive(tmp_path / "arc") as a:
        m = a.commit({"w": cp.asarray(w)})
        assert a.restore(m.id)["w"].tobytes() == w.tobytes()


@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16"])
def test_cupy_predicts_the_numpy_bits(name: str) -> None:
    from gpupas.pas.predict import fit, predict

    layout = LAYOUTS[name]
    rng = np.random.default_rng(3)
    shape = (700, 129)
    w0 = rng.standard_normal(shape) * 0.05
    step = rng.standard_normal(shape) * 2e-3
    chain = [w.astype(layout.dtype) for w in (w0, w0 + step, w0 + 1.4 * step)]
    chain[2].reshape(-1)[:300] = adversarial(name, 300, 4)
    u, ub, ub2 = (to_bits(w, layout) for w in reversed(chain))
    alpha = fit(u, ub, ub2, layout, shape)
    assert alpha is not None
    per = shape[1]
    for a, b in [(0, u.size), (1000, 5000), (129 * 3, 129 * 4 + 1)]:
        host = predict(ub[a:b], ub2[a:b], alpha, layout, per, a)
        dev = predict(cp.asarray(ub[a:b]), cp.asarray(ub2[a:b]), cp.asarray(alpha), layout, per, a)
        assert cp.asnumpy(dev).tobytes() == host.tobytes(), (name, a, b)
