"""The CuPy backend of the plane/delta/context transforms: the same bytes as NumPy, bit for bit.

Runs only where CuPy sees a GPU (``scripts/gpu-check.sh`` on a GPU machine); skipped elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gpupas.pas.planes import LAYOUTS, to_bits
from gpupas.pas.settings import Setting
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


# -- the CuPy backend: kernels, nvCOMP, transfers (issue 10) --------------------------------------------------------
CODEC_SETS = {"zstd": ("zstd",), "deflate": ("zstd", "deflate"), "nvcomp-ans": ("zstd", "nvcomp-ans")}
FIXTURE_DTYPES = ["float32", "bfloat16", "float16", "int64", "uint8", "bool", "float8_e4m3fn"]


def _gpu() -> object:
    from gpupas.backend.base import get_backend

    return get_backend("cupy", fallback=False)


def _chain(seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Three snapshots of every fixture dtype: rows that move and keep moving, rows left alone."""
    from gpupas.pas.planes import layout_of

    rng = np.random.default_rng(seed)
    out: list[dict[str, np.ndarray]] = [{}, {}, {}]
    for name in FIXTURE_DTYPES:
        layout = layout_of(name)
        shape = (300, 160)
        if layout.rotate:
            w0 = rng.standard_normal(shape) * 0.05
            step = rng.standard_normal(shape) * 2e-3
            snaps = [w0, w0 + step, w0 + 1.5 * step]
            snaps = [s.astype(layout.dtype) for s in snaps]
            snaps[2][:100] = snaps[1][:100]
        else:
            a = adversarial(name, shape[0] * shape[1], 1).reshape(shape)
            b = a.copy()
            b.reshape(-1)[::7] = adversarial(name, a.size, 2)[::7]
            snaps = [a, b, b.copy()]
            snaps[2][200:] = adversarial(name, 100 * shape[1], 3).reshape(100, shape[1])
        snaps[2].reshape(-1)[-9:] = adversarial(name, 9, 4)
        for i in range(3):
            out[i][name] = snaps[i]
    return out


def _to_cupy(d: dict[str, np.ndarray]) -> dict[str, object]:
    from gpupas.backend.cupy import DeviceTensor

    out = {}
    for k, v in d.items():
        if v.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
            out[k] = DeviceTensor(cp.asarray(v.reshape(-1).view(f"u{v.dtype.itemsize}")), v.dtype, v.shape)
        else:
            out[k] = cp.asarray(v)
    return out


def _host(x: object) -> np.ndarray:
    from gpupas.backend.cupy import DeviceTensor

    if isinstance(x, DeviceTensor):
        return x.get()
    if type(x).__module__.startswith("torch"):
        from gpupas.integrations.torch import tensor_to_numpy

        return tensor_to_numpy(x)
    return cp.asnumpy(x) if isinstance(x, cp.ndarray) else np.asarray(x)


def test_device_crc_is_zlibs() -> None:
    import zlib

    gpu = _gpu()
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, n, dtype=np.uint8) for n in (0, 1, 1023, 1024, 1025, 65536, 3_000_001)]
    assert gpu.crc32_many([cp.asarray(a) for a in arrays]) == [zlib.crc32(a.tobytes()) for a in arrays]


@pytest.mark.parametrize("setting", ["fast", "default", "strong"])
def test_device_planes_are_the_numpy_backends(setting: str) -> None:
    """encode_planes / decode_planes on the GPU write and read the NumPy backend's streams."""
    from gpupas.backend import fast
    from gpupas.backend.numpy import NumpyBackend
    from gpupas.engine.executor import Executor
    from gpupas.engine.stage import stage_all
    from gpupas.format.layout import place
    from gpupas.format.manifest import TensorEntry
    from gpupas.pas.planes import layout_of
    from gpupas.pas.settings import get_setting

    gpu, cpu, ex = _gpu(), NumpyBackend(), Executor(1)
    cfg = get_setting(setting)
    grand, base, child = _chain()
    bits = {k: {n: to_bits(v, layout_of(v.dtype)).copy() for n, v in d.items()} for k, d in
            (("g", grand), ("b", base))}
    ents = {n: TensorEntry(n, layout_of(v.dtype).name, v.shape, v.nbytes, 0, "mat", False, ()) for n, v in base.items()}
    with fast.use(False):  # staged as a GPU commit stages (the reference path): the compiled one keeps masked
        # tensors' rows whole (_RowStaged), and assigning their gathered ``u`` back below would gather them twice
        staged = stage_all(child, cfg, cpu.crc32, ex, True, ents, bits["b"], bits["g"])
    extras = [st.extra() for st in staged]
    placements, lengths = place([(st.layout.width, st.u.size, x.size) for st, x in zip(staged, extras)], (1,))
    want = [np.zeros(n, np.uint8) for n in lengths]
    cpu.encode_planes(staged, extras, placements, want, 7000, cfg.min_group, ex, True)
    for st in staged:  # the same plan, on device arrays
        st.u, st.ub, st.ub2 = (None if x is None else cp.asarray(x) for x in (st.u, st.ub, st.ub2))
    got = [cp.zeros(n, cp.uint8) for n in lengths]
    gpu.encode_planes(staged, extras, placements, got, 7000, cfg.min_group, ex, True)
    for s in range(len(lengths)):
        assert cp.asnumpy(got[s]).tobytes() == want[s].tobytes(), (setting, s)
    m = SimpleNamespace(id="x", segment=7000)
    entries = [TensorEntry(st.name, st.layout.name, st.shape, st.nbytes, st.crc, st.plan.enc, st.plan.ctx, pl.parts,
                           rows=None if st.changed is None else st.coded_shape[0], extras=pl.extras)
               for st, pl in zip(staged, placements)]
    dev = gpu.decode_planes(m, entries, dict(enumerate(got)), {k: cp.asarray(v) for k, v in bits["b"].items()},
                            {k: cp.asarray(v) for k, v in bits["g"].items()}, ex, True)
    for e in entries:
        assert cp.asnumpy(dev[e.name]).tobytes() == to_bits(child[e.name], layout_of(e.dtype)).tobytes(), e.name


def _commit_chain(a: object, snaps: list[dict[str, object]], setting: object, device: str | None) -> list[object]:
    ms, base = [], None
    for s in snaps:
        m = a.commit(s, base=base, setting=setting, device=device)
        ms.append(m)
        base = m.id
    return ms


@pytest.mark.parametrize("codec", sorted(CODEC_SETS))
def test_gpu_written_archives_restore_on_the_cpu_and_back(tmp_path: Path, codec: str) -> None:
    """Commit from GPU memory, restore on the CPU (portable codecs; ANS names its remedy) and on the GPU;
    the bytes that cross to the host are exactly the stored bytes."""
    import gpupas
    from gpupas.errors import CodecUnavailableError

    gpu = _gpu()
    snaps = _chain(1)
    setting = Setting("gpu-" + codec, codecs=CODEC_SETS[codec])
    with gpupas.create_archive(tmp_path / "arc") as a:
        before = gpu.to_host_bytes
        ms = _commit_chain(a, [_to_cupy(s) for s in snaps], setting, None)
        assert gpu.to_host_bytes - before == sum(m.stored_bytes for m in ms)  # only stored bytes left the GPU
        assert all(s.chunk_size == 1 << 16 for m in ms for s in m.streams)
        used = {letter for m in ms for s in m.streams for letter in s.chunks}
        assert {"z", "d", "a"}.issuperset(used) and (codec == "zstd" or used - {"z"}), used
    with gpupas.open_archive(tmp_path / "arc") as a:  # fresh: nothing cached
        for m, snap in zip(ms, snaps):
            on_gpu = a.restore(m.id, device="cuda")
            assert all(_host(on_gpu[k]).tobytes() == v.tobytes() for k, v in snap.items()), m.id
    with gpupas.open_archive(tmp_path / "arc") as a:
        for m, snap in zip(ms, snaps):
            try:
                on_cpu = a.restore(m.id, device="cpu")
            except CodecUnavailableError as exc:  # ANS chunks in it or along its chain: the remedy is named
                assert codec == "nvcomp-ans" and "CUDA GPU" in str(exc)
                continue
            assert all(on_cpu[k].tobytes() == v.tobytes() for k, v in snap.items()), m.id
    if codec != "nvcomp-ans":  # stock zarr + NumPy (FORMAT.md's recipe) read what the GPU wrote
        from tests import recipe

        for m, snap in zip(ms, snaps):
            got = recipe.restore(tmp_path / "arc", m.id)
            assert all(got[k].tobytes() == v.tobytes() for k, v in snap.items())


@pytest.mark.parametrize("setting", ["default", "strong"])
def test_cpu_written_archives_restore_on_the_gpu(tmp_path: Path, setting: str) -> None:
    import gpupas
    from gpupas.engine.encode import Layout

    snaps = _chain(2)
    with gpupas.create_archive(tmp_path / "arc") as a:
        ms = [_commit_chain(a, snaps, setting, "cpu"),
              _commit_chain(a, snaps, setting, "cpu") if setting == "strong" else []]
        small = a.commit(snaps[0], setting=setting, device="cpu", layout=Layout(groups=(1,), chunk_size=4096))
    with gpupas.open_archive(tmp_path / "arc") as a:
        for m, snap in zip(ms[0], snaps):
            got = a.restore(m.id, device="cuda")
            assert all(_host(got[k]).tobytes() == v.tobytes() for k, v in snap.items()), m.id
        got = a.restore(small.id, device="cuda", framework="torch")
        assert all(got[k].is_cuda and _host(got[k]).tobytes() == v.tobytes() for k, v in snaps[0].items())


def test_torch_cuda_state_dict_in_and_out(tmp_path: Path) -> None:
    import gpupas

    torch = pytest.importorskip("torch")
    snaps = _chain(3)
    from gpupas.integrations.torch import numpy_to_tensor

    state = {k: numpy_to_tensor(v).cuda() for k, v in snaps[0].items()}
    with gpupas.create_archive(tmp_path / "arc") as a:
        m = a.commit(state)  # device inferred from the tensors
        assert a.manifest(m.id).streams[0].chunk_size == 1 << 16
        back = a.restore(m.id, device="cuda", framework="torch")
        for k, t in state.items():
            assert back[k].is_cuda and back[k].dtype == t.dtype and torch.equal(back[k].view(torch.uint8),
                                                                                 t.view(torch.uint8)), k


def test_async_commits_do_not_wait_for_the_encode(tmp_path: Path) -> None:
    """The training-loop mode: each call costs a device copy; weights changed right after the call do
    not leak into the snapshot; the committed copy is the next commit's delta base, on the GPU."""
    import time

    import gpupas
    from gpupas.integrations.async_commit import AsyncCommitter

    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    w = {f"layer{i}.weight": torch.from_numpy((rng.standard_normal((1024, 1024)) * 0.02).astype(np.float32)).cuda()
         for i in range(16)}
    expected = []
    with gpupas.create_archive(tmp_path / "arc") as a:
        ids: list[str] = []

        def commit(state: dict[str, object]) -> object:
            m = a.commit(state, base=ids[-1] if ids else None)
            ids.append(m.id)
            return m

        with AsyncCommitter(commit) as committer:
            for _ in range(4):
                expected.append({k: v.cpu().numpy().copy() for k, v in w.items()})
                committer.submit(w)
                for v in w.values():  # the optimizer step, at once
                    v.add_(torch.randn_like(v) * 1e-4)
            committer.wait()
            t0 = time.perf_counter()
            a.commit({k: v.clone() for k, v in w.items()})
            sync_seconds = time.perf_counter() - t0
        assert max(committer.blocking_seconds[1:]) < sync_seconds  # waiting for a copy, not for an encode
        assert a.manifest(ids[-1]).base == ids[-2]
        for sid, want in zip(ids, expected):
            got = a.restore(sid)
            assert all(got[k].tobytes() == v.tobytes() for k, v in want.items()), sid


def test_async_commits_of_cupy_arrays_on_a_stream_of_their_own(tmp_path: Path) -> None:
    """CuPy arrays copied on the caller's non-blocking stream: the commit's thread waits for those copies,
    and what the stream does next (an update queued behind a long kernel) never reaches the snapshot."""
    import gpupas
    from gpupas.integrations.async_commit import AsyncCommitter

    rng = np.random.default_rng(5)
    host = {f"w{i}": (rng.standard_normal((2048, 2048)) * 0.02).astype(np.float32) for i in range(4)}
    with gpupas.create_archive(tmp_path / "arc") as a, AsyncCommitter(a.commit) as committer:
        spin = cp.RawKernel(r'''extern "C" __global__ void spin(long long cycles) {
            long long t = clock64();
            while (clock64() - t < cycles) {}
        }''', "spin")
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            w = {k: cp.asarray(v) for k, v in host.items()}
            spin((1,), (1,), (np.int64(500_000_000),))  # ~0.3 s: the copies are still queued at submit
            committer.submit(w)
            for v in w.values():
                v += 1.0
        m = committer.wait()
        got = a.restore(m.id)
    assert all(got[k].tobytes() == v.tobytes() for k, v in host.items())


def test_write_gpu_fixture() -> None:
    """With GPUPAS_GPU_FIXTURE set (scripts/gpu-check.sh does), write the GPU-written golden archive that
    tests/test_kernels.py decodes on the CPU: copy it to tests/fixtures/gpu/."""
    import json

    import gpupas

    out = os.environ.get("GPUPAS_GPU_FIXTURE")
    if not out:
        pytest.skip("GPUPAS_GPU_FIXTURE not set")
    root = Path(out)
    snaps = _chain(5)
    expected: dict[str, np.ndarray] = {}
    index: dict[str, dict[str, object]] = {}
    with gpupas.create_archive(root / "archive") as a:
        ms = _commit_chain(a, [_to_cupy(s) for s in snaps], "default", None)
        ms.append(a.commit(_to_cupy(snaps[0]), setting=Setting("strong-gpu", codecs=("zstd", "deflate"),
                                                                 try_all=True)))
        for m, snap in zip(ms, [*snaps, snaps[0]]):
            for k, v in snap.items():
                key = f"t{len(expected)}"
                expected[key] = v.reshape(-1).view(np.uint8)
                index[f"{m.id}|{k}"] = {"npz": key, "dtype": v.dtype.name, "shape": list(v.shape)}
    np.savez_compressed(root / "expected.npz", **expected)
    (root / "expected.json").write_text(json.dumps({"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                                                    "tensors": index}, indent=1))
