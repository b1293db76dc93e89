"""tests/cudaemu.py, the CPU runner of the CUDA sources: CUDA's semantics where kernels/*.cu rely on them,
and the mistakes it must catch (a missing or divergent barrier, reading shared memory never written)."""

from __future__ import annotations

import numpy as np
import pytest

from tests import cudaemu

pytestmark = pytest.mark.skipif(cudaemu.unavailable() is not None, reason=str(cudaemu.unavailable()))

SOURCE = r"""
typedef long long i64;

extern "C" __global__ void warps(const unsigned* v, unsigned* match, unsigned* down, int delta) {
    unsigned x = v[blockIdx.x * blockDim.x + threadIdx.x];
    match[blockIdx.x * blockDim.x + threadIdx.x] = __match_any_sync(0xffffffffu, x);
    down[blockIdx.x * blockDim.x + threadIdx.x] = __shfl_down_sync(0xffffffffu, x, delta);
}

extern "C" __global__ void neighbours(unsigned* out, int barrier) {
    __shared__ unsigned s[1024];
    s[threadIdx.x] = threadIdx.x + 1;
    if (barrier) __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

extern "C" __global__ void unwritten(unsigned* out) {
    __shared__ unsigned s[4];
    if (threadIdx.x == 0) out[blockIdx.x] = s[blockIdx.x % 4];
    __syncthreads();
    s[blockIdx.x % 4] = 7;
}

extern "C" __global__ void divergent(unsigned* out) {
    if (threadIdx.x < 5) __syncthreads();
    out[threadIdx.x] = 1;
}

extern "C" __global__ void after(i64* out) {
    if (threadIdx.x == 0) out[blockIdx.x] = blockIdx.x == 0 ? 1 : out[blockIdx.x - 1] + 1;
}

extern "C" __global__ void halves(const float* v, float* down) {
    down[threadIdx.x] = __shfl_down_sync(0xffffffffu, v[threadIdx.x] * 0.5f, 1);
}

#define BIG 6145

extern "C" __global__ void greedy(i64* out) {
    __shared__ i64 big[BIG];
    big[threadIdx.x] = threadIdx.x;
    out[0] = big[0];
}

extern "C" __global__ void strided(i64* out, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        atomicAdd((unsigned long long*)&out[i], (unsigned long long)(i + 1));
}
"""


@pytest.fixture(scope="module")
def mod() -> cudaemu.Module:
    return cudaemu.module(SOURCE)


@pytest.mark.parametrize("block", [32, 96, 40])
def test_warp_collectives(mod: cudaemu.Module, block: int) -> None:
    """__match_any_sync: the lanes of the warp holding the same value; __shfl_down_sync: lane + delta's
    value, the lane's own past the warp's end (a partial last warp: its lanes only)."""
    grid, delta = 2, 3
    v = np.random.default_rng(block).integers(0, 4, grid * block).astype(np.uint32)
    match, down = np.zeros_like(v), np.zeros_like(v)
    mod.get_function("warps")((grid,), (block,), (v, match, down, np.int32(delta)))
    for t in range(grid * block):
        b, tid = divmod(t, block)
        lo = b * block + tid // 32 * 32
        lanes = range(lo, min(lo + 32, (b + 1) * block))
        assert match[t] == sum(1 << (u - lo) for u in lanes if v[u] == v[t]), t
        if t + delta in lanes:
            assert down[t] == v[t + delta], t
        elif t - lo + delta >= 32:  # past the warp's end: its own (a lane with no thread: undefined)
            assert down[t] == v[t], t


def test_floats_cross_a_warp_as_bits(mod: cudaemu.Module) -> None:
    v = np.array([np.nan, -0.0, 3.0, 1e-45] * 8, np.float32)
    down = np.zeros_like(v)
    mod.get_function("halves")((1,), (32,), (v, down))
    want = np.append((v * np.float32(0.5))[1:], v[-1] * np.float32(0.5))
    assert down.view(np.uint32).tolist() == want.view(np.uint32).tolist()


def test_blocks_run_in_no_fixed_order(mod: cudaemu.Module) -> None:
    """A block reading what an earlier block wrote is a race on a GPU: here it reads the wrong value."""
    out = np.zeros(64, np.int64)
    mod.get_function("after")((64,), (32,), (out,))
    assert (out != np.arange(1, 65)).any()


def test_a_missing_barrier_shows(mod: cudaemu.Module) -> None:
    """Reading a neighbour's shared slot without __syncthreads reads what the GPU might: here, in shuffled
    orders, the poison of a slot not written yet."""
    out = np.zeros(3 * 256, np.uint32)
    want = np.tile((np.arange(256) + 1) % 256 + 1, 3)
    mod.get_function("neighbours")((3,), (256,), (out, np.int32(1)))
    assert (out == want).all()
    mod.get_function("neighbours")((3,), (256,), (out, np.int32(0)))
    assert (out != want).any() and (out == 0xA5A5A5A5).any()


def test_shared_memory_starts_undefined_in_every_block(mod: cudaemu.Module) -> None:
    out = np.zeros(9, np.uint32)
    mod.get_function("unwritten")((9,), (64,), (out,))
    assert (out == 0xA5A5A5A5).all()  # not what the block before left there


def test_a_divergent_barrier_fails_the_launch(mod: cudaemu.Module) -> None:
    with pytest.raises(cudaemu.LaunchError, match="barrier"):
        mod.get_function("divergent")((1,), (64,), (np.zeros(64, np.uint32),))


def test_grid_stride_loops_and_refused_launches(mod: cudaemu.Module) -> None:
    out = np.zeros(10007, np.int64)
    mod.get_function("strided")((3,), (128,), (out, np.int64(out.size)))
    assert (out == np.arange(1, out.size + 1)).all()
    for grid, block in [(1, 1025), (0, 32), (1, 0)]:
        with pytest.raises(cudaemu.LaunchError, match="not a launch"):
            mod.get_function("strided")((grid,), (block,), (out, np.int64(out.size)))
    with pytest.raises(cudaemu.LaunchError, match="arguments"):
        mod.get_function("strided")((1,), (32,), (out,))
    with pytest.raises(cudaemu.LaunchError, match="i64 n given a int32"):  # CuPy would pass 4 bytes
        mod.get_function("strided")((1,), (32,), (out, np.int32(out.size)))


def test_static_shared_memory_over_a_blocks_is_refused(mod: cudaemu.Module) -> None:
    with pytest.raises(cudaemu.LaunchError, match="49160 bytes of static shared memory"):
        mod.get_function("greedy")((1,), (32,), (np.zeros(1, np.int64),))


def test_the_kernel_sources_parse() -> None:
    from gpupas.backend import kernels_ref as K

    shared = {k: v for f in ("planes.cu", "crc.cu", "frames.cu") for k, v in
              cudaemu.shared_bytes(K.kernel_source(f)).items()}
    assert shared == {"planes_plain": 0, "planes_ctx": 33792, "crc_pieces": 1024, "crc_combine": 12288,
                      "pack_payloads": 0, "copy_spans": 0, "run_bytes": 2048}  # as ptxas counts them

    params = cudaemu.kernels_of(K.kernel_source("crc.cu"))
    assert params["crc_pieces"] == [("const i64*", "msgs"), ("int", "nmsg"), ("i64", "npieces"),
                                    ("const unsigned*", "consts"), ("unsigned*", "raw")]
    assert "static emu::Shared emu_shared_table(table, sizeof(table));" in cudaemu.host_source(
        K.kernel_source("crc.cu"))
