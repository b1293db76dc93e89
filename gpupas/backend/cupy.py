"""The CuPy backend (a CUDA GPU): kernels from ``kernels/``, nvCOMP chunk codecs, pinned staging.

A commit reads the tensors where they are (CuPy arrays, CUDA torch tensors, anything with
``__cuda_array_interface__`` or DLPack: no copy), codes every segment of the snapshot in two kernel
launches (``planes.cu``: delta, rotation, plane split, context sort), every chunk of a stream in one
nvCOMP call per candidate coder, frames the chosen bodies on the device (``frames.cu``: gzip
member with the CRC-32 of the uncompressed chunk, raw Zstandard frames; ``crc.cu``: the CRC-32C
suffix), and copies only the finished payloads to the host: through :meth:`CupyBackend.to_host`,
into two preallocated pinned buffers, one filling while the other's chunks are handed to the store.
A restore does the reverse: stored payloads up in one copy, checked and decoded there, tensors
rebuilt in two launches, returned as CuPy arrays or torch CUDA tensors.

Every table the kernels read is built by :mod:`gpupas.backend.kernels_ref`, whose NumPy mirror of
each kernel the CPU tests check; only the launches and copies here need a GPU. All GPU work of a
thread runs on one non-blocking CUDA stream of its own; nvCOMP's codecs are bound to it.

Creating :class:`CupyBackend` checks that CuPy, nvCOMP and a GPU are usable and raises
BackendUnavailableError otherwise (the caller then falls back to the NumPy backend, said once).
"""

from __future__ import annotations

import functools
import logging
import threading
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np

from gpupas.backend import kernels_ref as K
from gpupas.backend.base import bases_of, check_dtype
from gpupas.errors import (
    BackendUnavailableError,
    DeviceMemoryError,
    IntegrityError,
    InvalidInputError,
    UnsupportedDtypeError,
)
from gpupas.xp import ML_DTYPES

GPU_CHUNK = 1 << 16  # bytes a chunk: nvCOMP's natural chunk (the size its Deflate headers advise); the GPU's layout
STAGE = 64 << 20  # bytes a pinned staging buffer holds (two of them: one copied into while the other is written)
PLAIN_THREADS = 256
CRC_THREADS = 256
COPY_THREADS = 256
MAX_BLOCKS = 1 << 16  # grid-stride kernels: more blocks than any GPU runs at once
CUPY_LACKS = ML_DTYPES  # dtypes kept as bit patterns (DeviceTensor)

_cupy: Any = None
_said: set[str] = set()  # codecs whose CPU fallback was logged
log = logging.getLogger("gpupas")


def _on_host(x: Any) -> bool:
    """A NumPy array in host memory (device arrays all say where they are: ``__cuda_array_interface__``)."""
    return isinstance(x, np.ndarray) and not hasattr(x, "__cuda_array_interface__")


def _in_room(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a CupyBackend method) with the GPU running out of memory said as DeviceMemoryError."""

    @functools.wraps(fn)
    def run(self: CupyBackend, *args: Any, **kwargs: Any) -> Any:
        with self._room():
            return fn(self, *args, **kwargs)

    return run


def _check() -> Any:
    """CuPy, once CuPy, nvCOMP, a GPU and the CUDA sources are known usable; else BackendUnavailableError."""
    global _cupy
    if _cupy is not None:
        return _cupy
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailableError("CuPy is not installed (pip install 'gpupas[gpu-cu13]'; for CUDA 12: "
                                      "'gpupas[gpu-cu12]')") from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError: no driver, or one too old for this CuPy
        raise BackendUnavailableError(f"no usable CUDA device ({exc})") from exc
    if count < 1:
        raise BackendUnavailableError("no CUDA device")
    from gpupas.codecs.nvcomp import _nvcomp

    _nvcomp()  # installed, and of a version with the batch API the codecs call (else BackendUnavailableError)
    if not (K.kernel_dir() / "planes.cu").is_file():
        raise BackendUnavailableError(f"the CUDA sources are not in {K.kernel_dir()} (set GPUPAS_KERNELS)")
    _cupy = cupy
    return cupy


class DeviceTensor:
    """A GPU tensor of a dtype CuPy has not (bfloat16, float8): its bit patterns and its dtype.

    Enough of an array for the engine (``dtype``, ``shape``, ``nbytes``, ``reshape(-1).view(uint)``
    gives the CuPy patterns); :meth:`to_torch` gives the torch tensor with the same bits, :meth:`get`
    a NumPy (ml_dtypes) copy.
    """

    flags = types.SimpleNamespace(c_contiguous=True)

    def __init__(self, bits: Any, dtype: Any, shape: Sequence[int]):
        self.bits, self.dtype, self.shape = bits.reshape(-1), np.dtype(dtype), tuple(int(d) for d in shape)

    @property
    def size(self) -> int:
        return int(self.bits.size)

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return self.bits.__cuda_array_interface__

    def reshape(self, *shape: Any) -> DeviceTensor:
        dims = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        if -1 in dims:
            known = int(np.prod([d for d in dims if d != -1]))
            dims = tuple(self.size // max(1, known) if d == -1 else d for d in dims)
        if int(np.prod(dims)) != self.size:
            raise ValueError(f"cannot reshape {self.size} values into {dims}")
        return DeviceTensor(self.bits, self.dtype, dims)

    def view(self, dtype: Any) -> Any:
        dt = np.dtype(dtype)
        if dt == self.dtype:
            return self
        if dt.kind in "ui" and dt.itemsize == self.dtype.itemsize:
            return self.bits.view(dt).reshape(self.shape)
        raise TypeError(f"a {self.dtype} DeviceTensor views as {self.dtype} or an integer of its width, not {dt}")

    def copy(self) -> DeviceTensor:
        return DeviceTensor(self.bits.copy(), self.dtype, self.shape)

    def get(self) -> np.ndarray:
        return self.bits.get().view(self.dtype).reshape(self.shape)

    def to_torch(self) -> Any:
        return _torch_of(self.bits, self.dtype.name, self.shape)


def _torch_of(bits: Any, dtype_name: str, shape: Sequence[int]) -> Any:
    """The torch CUDA tensor with the bits of CuPy patterns ``bits`` (no copy)."""
    from gpupas.integrations.torch import _torch

    torch = _torch()
    carrier = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}[bits.dtype.itemsize]
    t = torch.from_dlpack(bits.reshape(-1).view(carrier))
    target = getattr(torch, dtype_name, None)
    if target is None:
        from gpupas.integrations.torch import torch_lacks

        raise torch_lacks(dtype_name)
    return (t.view(target) if target != t.dtype else t).reshape(tuple(shape))


class CupyBackend:
    """The GPU backend: see the module docstring."""

    name = "cupy"
    codec_backend = "gpu"
    layout: ClassVar[dict[str, int]] = {"chunk_size": GPU_CHUNK}  # a commit's layout here, unless told otherwise

    def __init__(self) -> None:
        self.cp = self.xp = _check()
        self.to_host_bytes = 0  # data: payloads, tensors
        self.to_host_meta_bytes = 0  # sizes, checksums, masks: a few bytes per chunk or tensor
        self._lock = threading.Lock()  # one commit or restore at a time uses the pinned buffers
        self._count = threading.Lock()
        self._local = threading.local()
        self._modules: dict[str, Any] = {}
        self._consts: dict[tuple[int, int], Any] = {}
        self._pinned: dict[str, tuple[Any, np.ndarray]] = {}

    @contextmanager
    def _room(self) -> Iterator[None]:
        """CuPy's out-of-memory errors as DeviceMemoryError, naming the remedies: device memory (CuPy's
        OutOfMemoryError is a MemoryError, which a restore would report as a damaged manifest's) and pinned
        memory (CUDARuntimeError cudaErrorMemoryAllocation)."""
        try:
            yield
        except Exception as exc:
            oom = getattr(getattr(self.cp.cuda, "memory", None), "OutOfMemoryError", ())
            pinned = getattr(getattr(self.cp.cuda, "runtime", None), "CUDARuntimeError", ())
            if not (isinstance(exc, oom) or (isinstance(exc, pinned) and getattr(exc, "status", None) == 2)):
                raise
            raise DeviceMemoryError(
                f"the GPU ran out of memory ({exc}); nothing was written or changed: free GPU memory (other "
                "tensors, cupy.get_default_memory_pool().free_all_blocks(), torch.cuda.empty_cache()), restore "
                "fewer tensors at a time (names=...), or commit/restore with device='cpu'") from exc

    # -- streams, kernels, pinned memory --------------------------------------------------------------------------
    def _stream(self, which: str = "work") -> Any:
        """This thread's non-blocking CUDA stream for ``which`` ("work" or "copy")."""
        s = getattr(self._local, which, None)
        if s is None:
            s = self.cp.cuda.Stream(non_blocking=True)
            setattr(self._local, which, s)
        return s

    @contextmanager
    def _on_stream(self) -> Iterator[Any]:
        """This thread's work stream made current, after what the caller's stream has queued (uploads of
        its tensors, frees of memory the pool hands out again): a non-blocking stream waits for nothing."""
        s = self._stream()
        s.wait_event(self.cp.cuda.get_current_stream().record())
        with s:
            yield s

    def _fn(self, file: str, name: str) -> Any:
        with self._count:
            if file not in self._modules:
                self._modules[file] = self.cp.RawModule(code=K.kernel_source(file), options=("-std=c++17",))
            return self._modules[file].get_function(name)

    def _crc_consts(self, poly: int) -> Any:
        """The CRC tables on this device, uploaded once and waited for (every thread's stream reads them)."""
        key = (self.cp.cuda.Device().id, poly)
        with self._count:
            if key not in self._consts:
                consts = self.cp.asarray(K.crc_consts(poly))
                self.cp.cuda.get_current_stream().synchronize()
                self._consts[key] = consts
            return self._consts[key]

    def _pinned_buffer(self, slot: str, nbytes: int) -> np.ndarray:
        have = self._pinned.get(slot)
        if have is None or have[1].size < nbytes:
            self._pinned.pop(slot, None)
            grow = max(nbytes, STAGE if slot.startswith("out") else 0)
            mem = self.cp.cuda.alloc_pinned_memory(max(1, grow))
            have = self._pinned[slot] = (mem, np.frombuffer(mem, np.uint8, max(1, grow)))
        return have[1][:nbytes]

    def release(self) -> None:
        """Drop the pinned staging buffers."""
        with self._lock:
            self._pinned.clear()

    # -- arrays in and out -----------------------------------------------------------------------------------------
    @_in_room
    def as_array(self, value: Any, name: str) -> Any:
        """A device array of ``value`` without a copy where it already is on this GPU (host arrays go up)."""
        from gpupas.integrations.torch import is_torch_tensor

        cp = self.cp
        if is_torch_tensor(value):
            arr = self._from_torch(value)
        elif isinstance(value, DeviceTensor) or type(value).__module__.split(".")[0] == "cupy":
            arr = value
        elif hasattr(value, "__cuda_array_interface__"):
            arr = cp.asarray(value)
        elif _on_host(value) or isinstance(value, np.generic):
            arr = self._upload(np.asarray(value))
        elif hasattr(value, "__dlpack__") and hasattr(value, "__dlpack_device__"):
            arr = cp.from_dlpack(value) if value.__dlpack_device__()[0] == 2 else self._upload(np.from_dlpack(value))
        else:
            raise InvalidInputError(f"{name!r} is a {type(value).__name__}, not a tensor; archive tensors only "
                                    "(put other values in the version's metadata)")
        check_dtype(arr, name)
        cp.cuda.get_current_stream().synchronize()  # what the caller's stream still writes into it (uploads too)
        if isinstance(arr, DeviceTensor):
            return arr
        if arr.device.id != cp.cuda.Device().id:
            raise InvalidInputError(f"tensor {name!r} is on GPU {arr.device.id}; this commit runs on GPU "
                                    f"{cp.cuda.Device().id} (use cupy.cuda.Device(n) / torch.cuda.set_device)")
        return arr if arr.flags.c_contiguous else arr.copy(order="C")

    def _upload(self, a: np.ndarray) -> Any:
        if not a.flags.c_contiguous or not a.dtype.isnative:
            a = np.ascontiguousarray(a, a.dtype.newbyteorder("="))
        if a.dtype.name in CUPY_LACKS:
            return DeviceTensor(self.cp.asarray(a.reshape(-1).view(f"u{a.dtype.itemsize}")), a.dtype, a.shape)
        return self.cp.asarray(a)

    def _from_torch(self, t: Any) -> Any:
        from gpupas.integrations.torch import _torch, _views, tensor_to_numpy

        torch = _torch()
        if t.device.type != "cuda" or t.layout != torch.strided:
            return self._upload(tensor_to_numpy(t))  # host tensors go up; meta and sparse ones are refused there
        t = t.detach().resolve_conj().resolve_neg()  # DLPack refuses lazy views (c.conj().imag): their values
        if not t.is_contiguous():
            t = t.contiguous()
        torch.cuda.current_stream(t.device).synchronize()
        views = _views()
        if t.dtype in views:
            carrier, np_dtype = views[t.dtype]
            bits = self.cp.from_dlpack(t.reshape(-1).view(carrier)).view(f"u{t.element_size()}")
            return DeviceTensor(bits, np_dtype, tuple(t.shape))
        return self.cp.from_dlpack(t)

    def _device(self, x: Any) -> Any:
        """``x`` as a CuPy array (bits from another backend's cache go up)."""
        if isinstance(x, DeviceTensor):
            return x.bits
        if _on_host(x):
            return self._upload(x) if x.dtype.name not in CUPY_LACKS else self._upload(x).bits
        return x

    def to_host(self, x: Any, out: np.ndarray | None = None, *, stream: Any = None, meta: bool = False) -> np.ndarray:
        """A host copy of device array ``x`` (into ``out``, asynchronously on ``stream`` if given): the one
        function through which bytes leave the GPU, counted in ``to_host_bytes`` (``meta``: sizes and
        checksums, counted in ``to_host_meta_bytes``)."""
        if _on_host(x):
            return x
        if isinstance(x, DeviceTensor):
            return self.to_host(x.bits, meta=meta).view(x.dtype).reshape(x.shape)
        host = x.get() if out is None else x.get(stream=stream, out=out, blocking=stream is None)
        with self._count:
            if meta:
                self.to_host_meta_bytes += int(x.nbytes)
            else:
                self.to_host_bytes += int(x.nbytes)
        return host

    @_in_room
    def outputs(self, m: Any, bits: Mapping[str, Any], framework: str) -> dict[str, Any]:
        """A restore's tensors on the GPU: CuPy arrays (``DeviceTensor`` for bfloat16 and float8), or
        torch CUDA tensors (``framework="torch"``)."""
        out = {}
        for name, r in bits.items():
            e = m.tensor(name)
            r = self._device(r)
            if framework == "torch":
                try:
                    out[name] = _torch_of(r, e.dtype, e.shape)
                except UnsupportedDtypeError as exc:
                    raise UnsupportedDtypeError(f"tensor {name!r}: {exc}") from None
            elif e.dtype in CUPY_LACKS:
                out[name] = DeviceTensor(r, e.layout.dtype, e.shape)
            else:
                out[name] = r.view(e.layout.dtype).reshape(e.shape)
        return out

    # -- checksums, memory ---------------------------------------------------------------------------------------
    def _crc(self, ptrs: Any, lens: Any, poly: int, dsts: Any = None) -> Any:
        """CRCs (device uint32) of the messages at ``ptrs`` (``lens`` bytes each); with ``dsts``, also
        written there as 4 little-endian bytes. Two launches for any number of messages."""
        cp = self.cp
        msgs, npieces = K.crc_messages(ptrs, lens, dsts)
        out = cp.empty(len(msgs), cp.uint32)
        if not len(msgs):
            return out
        d_msgs, consts = cp.asarray(msgs), self._crc_consts(poly)
        raw = cp.empty(max(1, npieces), cp.uint32)
        if npieces:
            blocks = min(MAX_BLOCKS, -(-npieces // (CRC_THREADS // 32)))
            self._fn("crc.cu", "crc_pieces")((blocks,), (CRC_THREADS,),
                                             (d_msgs, np.int32(len(msgs)), np.int64(npieces), consts, raw))
        self._fn("crc.cu", "crc_combine")((min(MAX_BLOCKS, len(msgs)),), (CRC_THREADS,),
                                          (d_msgs, np.int32(len(msgs)), consts, raw, out))
        return out

    @_in_room
    def crc32_many(self, arrays: Sequence[Any], executor: Any = None) -> list[int]:
        """CRC-32 of each array's bytes: two launches and one small copy for all of them."""
        with self._on_stream() as s:
            devs = [self.cp.ascontiguousarray(self._device(a)) for a in arrays]
            got = self._crc([d.data.ptr for d in devs], [d.nbytes for d in devs], K.CRC32_POLY)
            s.synchronize()
            return [int(x) for x in self.to_host(got, meta=True)]

    def usable(self, array: Any) -> bool:
        return True  # host arrays are uploaded where used

    def crc32(self, bits: Any) -> int:
        if _on_host(bits):
            from gpupas.format.checksum import crc32

            return crc32(memoryview(np.ascontiguousarray(bits)).cast("B"))
        return self.crc32_many([bits])[0]

    @contextmanager
    def workspace(self, nbytes: int) -> Iterator[Any]:
        """Device bytes for a ``with`` block (from CuPy's memory pool, which keeps them for the next)."""
        with self._room():
            buf = self.cp.empty(nbytes, self.cp.uint8)
        try:
            yield buf
        finally:
            del buf

    @_in_room
    def empty(self, nbytes: int) -> Any:
        return self.cp.empty(nbytes, self.cp.uint8)  # CuPy allocations are 256-byte aligned

    # -- planes of every segment, both ways: two launches ----------------------------------------------------------
    def _launch_planes(self, rows: list[list[int]], decode: bool) -> None:
        plain, ntiles, ctx = K.segment_tables(rows)
        if ntiles:
            self._fn("planes.cu", "planes_plain")((min(MAX_BLOCKS, ntiles),), (PLAIN_THREADS,),
                                                  (self.cp.asarray(plain), np.int32(len(plain)), np.int64(ntiles),
                                                   np.int32(decode)))
        if len(ctx):
            self._fn("planes.cu", "planes_ctx")((min(MAX_BLOCKS, len(ctx)),), (K.CTX_THREADS,),
                                                (self.cp.asarray(ctx), np.int32(len(ctx)), np.int32(decode)))

    def _scatter_up(self, pieces: Sequence[np.ndarray], dests: Sequence[int]) -> None:
        """Host byte arrays to device addresses: one upload and one launch for all."""
        sizes = np.array([p.size for p in pieces], np.int64)
        if not sizes.sum():
            return
        host = np.concatenate([p.view(np.uint8).reshape(-1) for p in pieces])
        dev = self.cp.asarray(host)
        spans = np.stack([dev.data.ptr + np.cumsum(sizes) - sizes, np.asarray(dests, np.int64), sizes], axis=1)
        self._copy_spans(spans[sizes > 0])
        self._stream().synchronize()  # ``dev`` is freed on return

    def _copy_spans(self, spans: np.ndarray) -> None:
        if len(spans):
            self._fn("frames.cu", "copy_spans")((min(MAX_BLOCKS, len(spans)),), (COPY_THREADS,),
                                                (self.cp.asarray(spans.astype(np.int64)), np.int32(len(spans))))

    def _run_bytes(self, src: Any, stride: int, size: int, nchunks: int) -> np.ndarray:
        """Per chunk of ``src`` (``nchunks`` of ``size`` bytes, ``stride`` apart): its bytes in runs (equal to
        the three before them). One launch and a copy of ``nchunks`` integers."""
        out = self.cp.empty(nchunks, self.cp.int64)  # every entry written
        self._fn("frames.cu", "run_bytes")((min(MAX_BLOCKS, nchunks),), (K.RUN_THREADS,),
                                           (src, np.int64(stride), np.int64(size), np.int32(nchunks), out))
        return self.to_host(out, meta=True)

    def _pack(self, jobs: np.ndarray, crcs: Any) -> None:
        """Every chunk's body at its place (``jobs``: rows of :func:`gpupas.backend.kernels_ref.pack_jobs`);
        ``crcs``: the gzip trailers' CRC-32s on the device. One launch."""
        if len(jobs):
            self._fn("frames.cu", "pack_payloads")((min(MAX_BLOCKS, len(jobs)),), (COPY_THREADS,),
                                                   (self.cp.asarray(jobs), np.int32(len(jobs)),
                                                    crcs if len(crcs) else self.cp.zeros(1, self.cp.uint32)))

    @_in_room
    def encode_planes(self, staged: Sequence[Any], extras: Sequence[np.ndarray], placements: Sequence[Any],
                      bufs: Sequence[Any], segment: int, min_group: int, executor: Any,
                      small: bool) -> list[list[int]]:
        """Every staged tensor's planes into the stream buffers (two launches for the snapshot) and the
        extras (one upload). Returns, per stream, where tensors' planes and extras start: hints for a
        coder that can end blocks there (nvCOMP cannot; context groups are not computed)."""
        with self._on_stream() as s:
            cuts: list[set[int]] = [set() for _ in bufs]
            pieces, dests, alphas = [], [], {}
            for i, (x, pl) in enumerate(zip(extras, placements)):
                if x.size:
                    st, off = pl.extras
                    pieces.append(np.asarray(x, np.uint8))
                    dests.append(bufs[st].data.ptr + off)
                    cuts[st].add(off)
                if staged[i].plan.enc == "pred":
                    alphas[i] = np.ascontiguousarray(staged[i].alpha, np.int16)
            self._scatter_up(pieces, dests)
            order = list(alphas)
            dev_alpha = self.cp.asarray(np.concatenate([alphas[i] for i in order])) if order else None
            alpha_at, at = {}, 0
            for i in order:
                alpha_at[i] = dev_alpha.data.ptr + 2 * at  # type: ignore[union-attr]  # (made where order has any)
                at += alphas[i].size
            arrays = []
            for st, pl in zip(staged, placements):
                enc = st.plan.enc
                arrays.append((self.cp.ascontiguousarray(self._device(st.u)),
                               self.cp.ascontiguousarray(self._device(st.ub)) if enc != "mat" else None,
                               self.cp.ascontiguousarray(self._device(st.ub2)) if enc == "pred" else None))
                for p in pl.parts:
                    cuts[p.stream].add(p.offset)
            rows = K.encode_rows(staged, placements, arrays, alpha_at, [b.data.ptr for b in bufs], segment,
                                 lambda a: a.data.ptr)
            self._launch_planes(rows, decode=False)
            s.synchronize()  # the buffers are read by the coders next; ``arrays`` may be freed now
        return [sorted(c) for c in cuts]

    @_in_room
    def decode_planes(self, m: Any, entries: Sequence[Any], bufs: Any, base_bits: Any, grand_bits: Any,
                      executor: Any, small: bool) -> dict[str, Any]:
        """The raw bits of ``entries`` (CuPy, one allocation) from their decoded planes on the device."""
        from gpupas.pas.predict import alpha_from_planes
        from gpupas.pas.rows import mask_from_bytes, rows_of

        cp = self.cp
        with self._on_stream() as s:
            nbytes = [e.nbytes for e in entries]
            starts = np.cumsum([0] + [-(-n // 256) * 256 for n in nbytes]).tolist()
            block = cp.empty(max(1, starts[-1]), cp.uint8)
            out = {e.name: block[lo : lo + n].view(e.layout.uint) for e, lo, n in zip(entries, starts, nbytes)}
            with_extras = [e for e in entries if e.extras is not None and e.extras_nbytes]
            sizes = np.array([e.extras_nbytes for e in with_extras], np.int64)
            host_extras: dict[str, np.ndarray] = {}
            if with_extras:  # every mask and factor table in one copy
                gathered = cp.empty(int(sizes.sum()), cp.uint8)
                at = np.cumsum(sizes) - sizes
                self._copy_spans(np.stack([[bufs[e.extras[0]].data.ptr + e.extras[1] for e in with_extras],
                                           gathered.data.ptr + at, sizes], axis=1))
                host = self.to_host(gathered, meta=True)
                host_extras = {e.name: host[a : a + n] for e, a, n in zip(with_extras, at, sizes)}
            rows, keep, scatters, alphas = [], [], [], []
            for e in entries:
                r, per = rows_of(e.shape)
                ub, ub2 = bases_of(m, e, base_bits, grand_bits, self._device)
                target, alpha_ptr = out[e.name], 0
                if e.name in host_extras:
                    extra = host_extras[e.name]
                    if e.masked:
                        changed = mask_from_bytes(extra[: e.mask_nbytes], r)
                        if int(changed.sum()) != e.rows:
                            raise IntegrityError(f"snapshot {m.id}: the row mask of tensor {e.name!r} is damaged")
                        dev_changed = cp.asarray(changed)
                        ub = ub.reshape(r, per)[dev_changed].reshape(-1)
                        ub2 = None if ub2 is None else ub2.reshape(r, per)[dev_changed].reshape(-1)
                        target = cp.empty(e.values, e.layout.uint)
                        scatters.append((e, dev_changed, target))
                    if e.enc == "pred":
                        alphas.append(cp.asarray(np.ascontiguousarray(alpha_from_planes(extra[e.mask_nbytes :]))))
                        alpha_ptr = alphas[-1].data.ptr
                keep += [ub, ub2, target]
                rows += K.tensor_rows(target.data.ptr, 0 if e.enc == "mat" or ub is None else ub.data.ptr,
                                      0 if ub2 is None else ub2.data.ptr, alpha_ptr if e.enc == "pred" else 0,
                                      e.values, e.width, e.enc, e.coding.rotate, e.ctx, per,
                                      [(p.stream, p.offset, p.first, p.count) for p in e.parts],
                                      lambda stream, off: bufs[stream].data.ptr + off, m.segment)
            self._launch_planes(rows, decode=True)
            for e, changed, target in scatters:  # unchanged rows are the base's
                whole = out[e.name].reshape(changed.size, -1)
                whole[...] = self._device(base_bits[e.name]).reshape(changed.size, -1)
                whole[changed] = target.reshape(-1, whole.shape[1])
            s.synchronize()
        return out

    # -- chunks ------------------------------------------------------------------------------------------------
    def _padded(self, buf: Any, nbytes: int) -> Any:
        """``buf`` as ``nbytes`` device bytes, aligned, zero-padded past its end (a copy only where needed)."""
        from gpupas.codecs.nvcomp import ALIGN

        if buf.data.ptr % ALIGN == 0 and buf.size == nbytes:
            return buf
        out = self.cp.empty(nbytes, self.cp.uint8)
        out[: buf.size] = buf
        out[buf.size :] = 0
        return out

    def _strided(self, src: Any, nchunks: int, size: int) -> tuple[Any, int]:
        """``src`` (``nchunks`` chunks of ``size`` bytes) with every chunk starting at a multiple of ALIGN, as
        nVCOMP needs, and that stride: ``src`` itself where ``size`` is a multiple, else a spaced copy."""
        from gpupas.codecs.nvcomp import ALIGN

        stride = -(-size // ALIGN) * ALIGN
        if stride == size or src is None:
            return src, stride
        out = self.cp.zeros(nchunks * stride, self.cp.uint8)
        out.reshape(nchunks, stride)[:, :size] = src[: nchunks * size].reshape(nchunks, size)
        return out, stride

    @_in_room
    def encode_chunks(self, policy: Any, buf: Any, bounds: Sequence[int], chunk_size: int,
                      emit: Callable[[int, str, Any], None], executor: Any, small: bool) -> list[tuple[str, int]]:
        """Code every chunk of stream buffer ``buf``: each candidate coder over all of them in one nvCOMP
        call, the choice of :class:`gpupas.codecs.gpu_policy.GpuPolicy`, bodies framed and checksummed on
        the device, then copied out through pinned memory, ``emit`` called as each copy lands."""
        from gpupas.codecs import registry
        from gpupas.codecs.gpu_policy import ANS, CODEC_IDS, DEFLATE, RAW, ZSTD, GpuPolicy

        cp, size, length = self.cp, chunk_size, int(buf.size)
        nchunks = -(-length // size)
        if not nchunks:
            return []
        gp = GpuPolicy.of(policy)
        letter_of = np.array([registry.info(CODEC_IDS[k]).letter for k in (RAW, ZSTD, DEFLATE, ANS)])
        n = np.full(nchunks, size, np.int64)
        n[-1] = length - (nchunks - 1) * size
        ids = np.arange(nchunks, dtype=np.int64)
        with self._lock, self._on_stream() as s:
            src = self._padded(buf, nchunks * size)
            coder_src, stride = self._strided(src, nchunks, size)
            coded: dict[str, np.ndarray] = {}
            outs: dict[str, tuple[Any, int, np.ndarray]] = {}

            def run(cid: str, which: np.ndarray) -> None:  # one nvCOMP call over those chunks
                codec = registry.get(cid, "gpu")
                out = cp.empty(which.size * codec.slot(size), cp.uint8)
                coded[cid] = np.full(nchunks, -1, np.int64)
                coded[cid][which] = codec.compress(coder_src, which, size, out, stride)
                outs[cid] = (out, codec.slot(size), which)

            def fits(cid: str) -> bool:  # nvCOMP's largest chunk for that coder (ANS: 16 MiB; a layout may ask 1 GiB)
                return size <= registry.get(cid, "gpu").max_chunk

            for cid in filter(fits, gp.coders()):
                run(cid, ids)
            runs = self._run_bytes(coder_src, stride, size, nchunks) if gp.then_needs_runs() else None
            for cid, which in gp.then(n, size, coded, runs).items():  # after Deflate: where Zstandard may do better
                if fits(cid):
                    run(cid, which)
            kind, body = gp.choose(n, size, coded)
            srcs = np.where(kind == RAW, src.data.ptr + ids * size, 0).astype(np.int64)
            srclens = np.zeros(nchunks, np.int64)
            for k in (ZSTD, DEFLATE, ANS):
                sel = np.flatnonzero(kind == k)
                if sel.size:
                    out, slot, which = outs[CODEC_IDS[k]]
                    srcs[sel] = out.data.ptr + np.searchsorted(which, sel) * slot
                    srclens[sel] = coded[CODEC_IDS[k]][sel]
            gz = np.flatnonzero(kind == DEFLATE)  # their gzip trailer: CRC-32 of the chunk, on the device
            crcs = self._crc(src.data.ptr + gz * size, np.full(gz.size, size), K.CRC32_POLY)
            crc_index = np.zeros(nchunks, np.int64)
            crc_index[gz] = np.arange(gz.size)
            pack_kind = np.select([kind == RAW, kind == DEFLATE], [K.KIND_RAW, K.KIND_GZIP], K.KIND_CODED)
            packed = cp.empty(max(1, int((body + 4).sum())), cp.uint8)
            jobs, offsets, bodies = K.pack_jobs(pack_kind, srcs, srclens, np.full(nchunks, size), n, crc_index,
                                                packed.data.ptr)
            if not (bodies == body).all():  # pragma: no cover - the policy and the packer disagree on a size
                raise AssertionError("GPU chunk sizes disagree between policy and packer")
            self._pack(jobs, crcs)
            self._crc(packed.data.ptr + offsets, bodies, K.CRC32C_POLY, packed.data.ptr + offsets + bodies)
            letters = letter_of[kind]
            self._emit(packed, offsets, bodies + 4, letters, emit, executor, small, s)
            return list(zip(letters.tolist(), (bodies + 4).tolist()))

    def _emit(self, packed: Any, offsets: np.ndarray, lengths: np.ndarray, letters: np.ndarray,
              emit: Callable[[int, str, Any], None], executor: Any, small: bool, work: Any) -> None:
        """Copy the packed payloads to pinned memory in stages of at most STAGE bytes (two buffers,
        the next copy in flight while the last one's chunks are handed to ``emit``)."""
        ends = offsets + lengths
        groups, lo = [], 0
        while lo < len(offsets):
            hi = max(lo + 1, int(np.searchsorted(ends, offsets[lo] + STAGE, side="right")))
            groups.append((lo, hi))
            lo = hi
        copy = self._stream("copy")
        copy.wait_event(work.record())  # the payloads are finished before they are copied

        def hand_over(group: tuple[int, int], host: np.ndarray, done: Any) -> None:
            done.synchronize()
            a = int(offsets[group[0]])

            def one(c: int) -> None:
                emit(c, str(letters[c]), host[int(offsets[c]) - a : int(ends[c]) - a])

            executor.map(one, range(*group), inline=small)

        pending = None
        try:
            for g, (lo, hi) in enumerate(groups):
                a, b = int(offsets[lo]), int(ends[hi - 1])
                host = self._pinned_buffer(f"out{g % 2}", b - a)
                self.to_host(packed[a:b], out=host, stream=copy)
                done = copy.record()
                if pending is not None:
                    hand_over(*pending)
                pending = ((lo, hi), host, done)
            if pending is not None:
                hand_over(*pending)
        finally:  # ``emit`` raised: no copy into a pinned buffer may still be in flight when it is reused
            copy.synchronize()

    @_in_room
    def decode_chunks(self, stream: Any, chunks: Sequence[int], fetch: Callable[[int], Any], buf: Any,
                      executor: Any, small: bool, on_error: Callable[[int, Exception], Exception],
                      scatter: Any = None) -> None:
        """Stored chunks (``fetch(c)``: payload + CRC-32C, on the host) into pinned memory, up in one
        copy, checked and decoded on the device into ``buf`` (chunk ``c`` at ``c * chunk_size``);
        ``scatter`` is not used (every chunk goes up whole)."""
        from gpupas.codecs import registry
        from gpupas.codecs.nvcomp import ALIGN

        cp, size = self.cp, stream.chunk_size
        ids = np.array(sorted(chunks), np.int64)
        if not ids.size:
            return
        letters = np.array([stream.chunks[c] for c in ids.tolist()])
        gzip_letter = next((k for k, v in stream.codecs.items() if v == "deflate"), "")
        zstd_letter = next((k for k, v in stream.codecs.items() if v == "zstd"), "")
        room = _payload_sizes(fetch, ids)  # exact where the reader says, else what any coder could write
        if room is None:
            room = np.full(ids.size, size + size // 64 + 1024, np.int64)
        offsets, total = K.aligned_offsets(room, np.where(letters == gzip_letter, K.GZIP_HEADER, 0))
        lengths = np.zeros(ids.size, np.int64)
        with self._lock, self._on_stream() as s:
            host = self._pinned_buffer("in", total)

            def fill(part: np.ndarray) -> None:
                for i in part.tolist():
                    payload = memoryview(fetch(int(ids[i]))).cast("B")  # valid until this thread fetches again
                    if not 4 <= len(payload) <= room[i]:
                        raise on_error(int(ids[i]), IntegrityError("checksum mismatch" if len(payload) < 4 else
                                                                   "chunk is larger than its shard index says"))
                    host[offsets[i] : offsets[i] + len(payload)] = np.frombuffer(payload, np.uint8)
                    lengths[i] = len(payload)

            executor.map(fill, np.array_split(np.arange(ids.size), min(ids.size, 64)), inline=small)
            info = K.classify(host, offsets, lengths, letters, size, zstd_letter, gzip_letter)
            dev = cp.empty(max(1, total), cp.uint8)
            dev.set(host[: dev.size], stream=s)
            got = self.to_host(self._crc(dev.data.ptr + offsets, lengths - 4, K.CRC32C_POLY), meta=True)
            for i in np.flatnonzero(got != info["suffix"])[:1]:
                raise on_error(int(ids[i]), IntegrityError("checksum mismatch"))
            raw = info["raw"]
            self._copy_spans(np.stack([dev.data.ptr + offsets[raw] + 12, buf.data.ptr + ids[raw] * size,
                                       np.full(int(raw.sum()), size)], axis=1))
            for letter in sorted(set(letters.tolist())):
                sel = np.flatnonzero((letters == letter) & ~raw)
                if not sel.size:
                    continue
                cid = stream.codecs[letter]
                start, stop = info["start"][sel], info["stop"][sel]
                for i in np.flatnonzero((start < 0) | (stop < start))[:1]:
                    raise on_error(int(ids[sel[i]]), IntegrityError(f"{cid} chunk is not a gzip member"))
                odd = start % ALIGN != 0  # a gzip header with optional fields (another writer's): nvCOMP reads
                if odd.any():  # aligned inputs only, so the CPU decodes those
                    self._decode_on_cpu(cid, ids[sel[odd]], fetch, size, buf, executor, small, on_error,
                                        IntegrityError(f"{cid} chunk has a gzip header with optional fields"))
                    sel, start, stop = sel[~odd], start[~odd], stop[~odd]
                    if not sel.size:
                        continue
                _, stride = self._strided(None, 0, size)
                out = buf if stride == size else cp.empty(sel.size * stride, cp.uint8)
                try:
                    sizes = registry.get(cid, "gpu").decompress(dev, start, stop - start, out,
                                                                ids[sel] * size if out is buf else
                                                                np.arange(sel.size, dtype=np.int64) * stride, size)
                    if out is not buf:
                        self._copy_spans(np.stack([out.data.ptr + np.arange(sel.size) * stride,
                                                   buf.data.ptr + ids[sel] * size, np.full(sel.size, size)], axis=1))
                except IntegrityError as exc:  # damage, or a stream nvCOMP does not take: the CPU says which
                    self._decode_on_cpu(cid, ids[sel], fetch, size, buf, executor, small, on_error, exc)
                    continue
                for i in np.flatnonzero(sizes != size)[:1]:
                    raise on_error(int(ids[sel[i]]), IntegrityError(f"{cid} chunk does not hold exactly {size} bytes"))
                if cid == "deflate":  # the gzip trailer: CRC-32 and size of the uncompressed chunk
                    crc = self.to_host(self._crc(buf.data.ptr + ids[sel] * size, np.full(sel.size, size),
                                                 K.CRC32_POLY), meta=True)
                    bad = (crc != info["trailer_crc"][sel]) | (info["trailer_size"][sel] != size & 0xFFFFFFFF)
                    for i in np.flatnonzero(bad)[:1]:
                        raise on_error(int(ids[sel[i]]), IntegrityError("deflate chunk fails its gzip CRC-32"))
            s.synchronize()

    def _decode_on_cpu(self, cid: str, ids: np.ndarray, fetch: Callable[[int], Any], size: int, buf: Any,
                       executor: Any, small: bool, on_error: Callable[[int, Exception], Exception],
                       gpu_error: Exception) -> None:
        """Chunks nvCOMP would not decode: decoded by the CPU codec (which names a damaged one) and copied up."""
        from gpupas.codecs import registry
        from gpupas.errors import CodecUnavailableError

        try:
            cpu = registry.get(cid, "cpu")
        except CodecUnavailableError:
            raise on_error(int(ids[0]), gpu_error) from None
        host = np.empty(ids.size * size, np.uint8)

        def decode(i: int) -> None:
            try:
                cpu.decode_batch([memoryview(fetch(int(ids[i]))).cast("B")[:-4]], [host[i * size : (i + 1) * size]])
            except IntegrityError as exc:
                raise on_error(int(ids[i]), exc) from None

        executor.map(decode, range(ids.size), inline=small)
        if cid not in _said:
            _said.add(cid)
            log.warning("gpupas: nvCOMP did not decode %s chunks of %d bytes (%s); decoding them on the CPU", cid,
                        size, gpu_error)
        dev = self.cp.asarray(host)
        self._copy_spans(np.stack([dev.data.ptr + np.arange(ids.size) * size, buf.data.ptr + ids * size,
                                   np.full(ids.size, size)], axis=1))
        self._stream().synchronize()


def _payload_sizes(fetch: Callable[[int], Any], ids: np.ndarray) -> np.ndarray | None:
    """Stored bytes of each chunk, from the shard indexes of the reader ``fetch`` belongs to (None if
    it does not say): a staging buffer of exactly the compressed size."""
    locate = getattr(getattr(fetch, "__self__", None), "locate", None)
    if locate is None:
        return None
    try:
        found = [locate(c) for c in ids.tolist()]
        return None if any(f is None for f in found) else np.array([f[2] for f in found], np.int64)
    except (IntegrityError, TypeError, IndexError):
        return None
