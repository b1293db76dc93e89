"""nVIDIA nvCOMP chunk codecs (GPU): Huffman-only Deflate and Zstandard in the CPU's formats, and ANS.

Registered under the same ids as the CPU codecs ("deflate", "zstd": each decodes the other's
output; the GPU tests check both ways) and as "nvcomp-ans" (GPU only, opt-in). All use nvCOMP's
``BitstreamKind.RAW``: a chunk is the bare standard stream (a raw Deflate stream, a Zstandard
frame, an ANS stream), never nvCOMP's own container, which the CPU libraries cannot read.

The CuPy backend calls the batch methods on device buffers (:meth:`NvcompCodec.compress`,
:meth:`NvcompCodec.decompress`: every chunk of a stream in one call, output preallocated) and adds
what the format wraps around them on the device (gzip framing with the CRC-32 of the uncompressed
chunk, the CRC-32C suffix: ``kernels/``). ``encode_batch``/``decode_batch`` (the registry's
protocol, host bytes) do the same one chunk at a time, for tools and tests. nvCOMP and CuPy are
imported on first use, never with :mod:`gpupas`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from gpupas.errors import BackendUnavailableError, IntegrityError

ALIGN = 16  # bytes: where every coder input and output starts (nvCOMP's strictest requirement is 8 or 16)


# What this module calls, all of it nvCOMP 6's Python API (nvidia-nvcomp-cu12/-cu13 6.0.0.12, the docstrings of
# nvidia/nvcomp/nvcomp_impl): ``as_arrays(buffer, offsets, sizes, cuda_stream)`` and ``BatchArray`` (whose
# ``buffer_sizes`` are an encode's compressed sizes) are new in 6.0 (5.x has only ``as_arrays(sources,
# cuda_stream)``, returning a list of Arrays); ``Codec.get_max_comp_buffer_size``, ``compression_config``,
# ``decompression_config`` and ``encode``/``decode`` with ``out=`` are not in 4.2 nor 5.0 (they are in 5.3).
NEEDS = ("BatchArray", "BitstreamKind.RAW", "Codec.get_max_comp_buffer_size", "Codec.compression_config",
         "Codec.decompression_config")
_usable: set[int] = set()  # nvCOMP modules found to have all of NEEDS


def _lacks(nv: Any) -> list[str]:
    """What of NEEDS module ``nv`` has not."""
    out = []
    for need in NEEDS:
        obj: Any = nv
        for part in need.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            out.append(need)
    return out


def _nvcomp() -> Any:
    """nvCOMP's Python module, once known to have the API this module calls; else BackendUnavailableError (the
    CuPy backend is then not used: the NumPy one codes on the CPU)."""
    try:
        import nvidia.nvcomp as nv
    except ImportError as exc:
        raise BackendUnavailableError("nvCOMP is not installed (pip install 'gpupas[gpu-cu13]'; for CUDA 12: "
                                      "'gpupas[gpu-cu12]')") from exc
    if id(nv) not in _usable:
        missing = _lacks(nv)
        if missing:
            raise BackendUnavailableError(
                f"nvCOMP {getattr(nv, '__version__', '?')} lacks {', '.join(missing)} (nvCOMP 6's batch API): "
                "pip install 'nvidia-nvcomp-cu12>=6' (or -cu13)")
        _usable.add(id(nv))
    return nv


def _sizes(batch: Any) -> np.ndarray:
    got = batch.buffer_sizes  # an attribute in nvCOMP 6, a method in some builds
    return np.asarray(got() if callable(got) else got, np.int64)


def _stream_ptr() -> int:
    import cupy

    return int(cupy.cuda.get_current_stream().ptr)


class NvcompCodec:
    """One nvCOMP algorithm in RAW bitstreams; nvCOMP codec objects made per (chunk size, CUDA stream)."""

    codec_id: ClassVar[str]
    letter: ClassVar[str]
    backend: ClassVar[str] = "gpu"
    zarr_codecs: ClassVar[list[dict[str, Any]]]
    options: ClassVar[dict[str, Any]]
    max_chunk: ClassVar[int]  # nvCOMP's largest uncompressed chunk for compression (<nvcomp/ALGO.h>)

    def __init__(self) -> None:
        self._codecs: dict[tuple[int, int, int], Any] = {}
        self._slots: dict[int, int] = {}
        self._lock = threading.Lock()

    def _codec(self, size: int) -> Any:
        nv = _nvcomp()
        key = (size, _stream_ptr(), threading.get_ident())  # an nvCOMP Codec is not for two threads at once
        with self._lock:
            codec = self._codecs.get(key)
            if codec is None:
                codec = self._codecs[key] = nv.Codec(bitstream_kind=nv.BitstreamKind.RAW, uncomp_chunk_size=size,
                                                     cuda_stream=key[1], **self.options)
            return codec

    def slot(self, size: int) -> int:
        """Bytes to reserve for one coded chunk of ``size`` bytes (nVCOMP's bound, aligned)."""
        if size not in self._slots:
            import cupy

            nv = _nvcomp()
            bound = self._codec(size).get_max_comp_buffer_size(nv.as_array(cupy.empty(size, cupy.uint8)))
            self._slots[size] = -(-int(bound) // ALIGN) * ALIGN
        return self._slots[size]

    def compress(self, src: Any, chunks: np.ndarray, size: int, out: Any, stride: int | None = None) -> np.ndarray:
        """Code chunks ``chunks`` (each ``size`` bytes at ``c * stride`` of device buffer ``src``; ``stride``
        defaults to ``size``, a multiple of ALIGN) into ``out`` (slot ``i`` of :meth:`slot` bytes for the
        i-th); returns the coded sizes."""
        if not len(chunks):
            return np.zeros(0, np.int64)
        nv, ptr, slot, k = _nvcomp(), _stream_ptr(), self.slot(size), len(chunks)
        codec = self._codec(size)
        srcs = nv.as_arrays(src, (np.asarray(chunks, np.int64) * (stride or size)).tolist(), [size] * k, ptr)
        outs = nv.as_arrays(out, (np.arange(k, dtype=np.int64) * slot).tolist(), [slot] * k, ptr)
        return _sizes(codec.encode(srcs, out=outs, compression_config=codec.compression_config([size] * k)))

    def decompress(self, src: Any, starts: np.ndarray, lengths: np.ndarray, dst: Any, dst_offsets: np.ndarray,
                   size: int) -> np.ndarray:
        """Decode the streams at ``src[starts[i] : starts[i] + lengths[i]]`` into ``dst[dst_offsets[i]:]``
        (``size`` bytes each at most); returns the decoded sizes. Raises IntegrityError where nvCOMP
        cannot decode the batch."""
        if not len(starts):
            return np.zeros(0, np.int64)
        nv, ptr, k = _nvcomp(), _stream_ptr(), len(starts)
        try:
            codec = self._codec(size)
            srcs = nv.as_arrays(src, np.asarray(starts, np.int64).tolist(), np.asarray(lengths, np.int64).tolist(),
                                ptr)
            outs = nv.as_arrays(dst, np.asarray(dst_offsets, np.int64).tolist(), [size] * k, ptr)
            try:  # sizes known from the format: no header parsing, no synchronization
                config = codec.decompression_config(codec.compression_config([size] * k))
                return _sizes(codec.decode(srcs, out=outs, decompression_config=config))
            except (RuntimeError, ValueError):
                return _sizes(codec.decode(srcs, out=outs))  # nvCOMP reads the sizes from the streams
        except (RuntimeError, ValueError) as exc:
            raise IntegrityError(f"undecodable {self.codec_id} chunk(s) on the GPU: {exc}") from None

    # -- the registry's protocol: host bytes, one chunk at a time (tools, tests) ----------------------------------
    def encode_batch(self, chunks: Sequence[Any], bounds: Sequence[Sequence[int]], size: int) -> list[bytes]:
        """Bodies of chunks (host or device arrays of at most ``size`` bytes, coded zero-padded to
        ``size``); ``bounds`` are ignored (nvCOMP cannot end a block where asked)."""
        import cupy

        out = []
        for chunk in chunks:
            data = cupy.zeros(size, cupy.uint8)
            flat = cupy.asarray(chunk).reshape(-1).view(cupy.uint8)
            data[: flat.size] = flat
            coded = cupy.empty(self.slot(size), cupy.uint8)
            n = int(self.compress(data, np.zeros(1, np.int64), size, coded)[0])
            out.append(self._frame(coded[:n].get().tobytes(), data))
        return out

    def decode_batch(self, bodies: Sequence[Any], outs: Sequence[Any]) -> None:
        import cupy

        for body, out in zip(bodies, outs):
            size = out.size
            raw, start = self._unframe(bytes(memoryview(body).cast("B")), size)
            src = cupy.zeros(-(-max(1, len(raw)) // ALIGN) * ALIGN, cupy.uint8)
            src[: len(raw)] = cupy.asarray(np.frombuffer(raw, np.uint8))
            dst = cupy.zeros(size, cupy.uint8)
            got = self.decompress(src, np.zeros(1, np.int64), np.array([len(raw)]), dst, np.zeros(1, np.int64), size)
            if int(got[0]) != size:
                raise IntegrityError(f"{self.codec_id} chunk does not hold exactly {size} bytes")
            self._check(start, dst)
            if isinstance(out, np.ndarray):
                out[:] = dst.get()
            else:
                out[:] = dst

    def _frame(self, coded: bytes, data: Any) -> bytes:
        return coded

    def _unframe(self, body: bytes, size: int) -> tuple[bytes, Any]:
        return body, None

    def _check(self, expected: Any, decoded: Any) -> None:
        return None


class NvcompDeflate(NvcompCodec):
    """Huffman-only Deflate (``algorithm_type=0``) in a gzip member, as the CPU's ``deflate``."""

    codec_id: ClassVar[str] = "deflate"
    letter: ClassVar[str] = "d"
    zarr_codecs: ClassVar[list[dict[str, Any]]] = [{"name": "gzip", "configuration": {"level": 6}}]
    options: ClassVar[dict[str, Any]] = {"algorithm": "Deflate", "algorithm_type": 0}
    max_chunk: ClassVar[int] = 1 << 31  # nvcompDeflateCompressionMaxAllowedChunkSize

    def _frame(self, coded: bytes, data: Any) -> bytes:
        from gpupas.backend.base import get_backend  # the device's CRC-32 kernel (the one upward import here)
        from gpupas.codecs.framing import gzip_member

        return gzip_member(coded, get_backend("cupy", fallback=False).crc32(data), data.size)

    def _unframe(self, body: bytes, size: int) -> tuple[bytes, Any]:
        from gpupas.codecs.framing import gzip_header_size

        h = gzip_header_size(body)
        if h < 0:
            raise IntegrityError("deflate chunk is not a gzip member")
        crc, isize = int.from_bytes(body[-8:-4], "little"), int.from_bytes(body[-4:], "little")
        if isize != size & 0xFFFFFFFF:
            raise IntegrityError(f"deflate chunk does not hold exactly {size} bytes")
        return body[h:-8], crc

    def _check(self, expected: Any, decoded: Any) -> None:
        from gpupas.backend.base import get_backend

        if get_backend("cupy", fallback=False).crc32(decoded) != expected:
            raise IntegrityError("deflate chunk fails its gzip CRC-32")


class NvcompZstd(NvcompCodec):
    """Zstandard frames (RAW bitstream: a standard frame), as the CPU's ``zstd``."""

    codec_id: ClassVar[str] = "zstd"
    letter: ClassVar[str] = "z"
    zarr_codecs: ClassVar[list[dict[str, Any]]] = [{"name": "zstd", "configuration": {"level": 1, "checksum": False}}]
    options: ClassVar[dict[str, Any]] = {"algorithm": "Zstd"}
    max_chunk: ClassVar[int] = (1 << 31) - 1  # nvcompZstdCompressionMaxAllowedChunkSize


class NvcompAns(NvcompCodec):
    """nvCOMP's ANS coder on bytes (GPU only: no CPU library reads it)."""

    codec_id: ClassVar[str] = "nvcomp-ans"
    letter: ClassVar[str] = "a"
    zarr_codecs: ClassVar[list[dict[str, Any]]] = [{"name": "gpupas.nvcomp_ans"}]
    options: ClassVar[dict[str, Any]] = {"algorithm": "ANS", "data_type": "|u1"}
    max_chunk: ClassVar[int] = 1 << 24  # nvcompANSCompressionMaxAllowedChunkSize: 16 MiB
