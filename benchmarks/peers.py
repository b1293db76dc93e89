"""Peer checkpoint compressors for the gpupas benchmarks, behind one uniform interface.

Every peer maps ``{name: np.ndarray}`` to an opaque blob and back, bit-exactly. ``size(blob)`` is
the stored payload bytes; per-tensor names/shapes/dtypes kept in the Python blob object are not
counted (they are a few KB at most), except for safetensors/torch.save where they are part of the
serialized bytes. bfloat16 tensors are numpy arrays of dtype ``ml_dtypes.bfloat16``.
Arrays returned by ``decompress`` may be read-only views of the decompressed buffers.

Threads (``NTHREADS = os.cpu_count()``):

* ZipNNPeer: zipnn's ``threads=NTHREADS`` (its C core splits each tensor into 256 KiB chunks).
* BytewiseZlibPeer: a thread pool of NTHREADS over all (tensor, byte plane) pairs; zlib releases
  the GIL, and each plane's stream equals a serial ``zlib.compress(plane, 6)``.
* ZstdPeer: a thread pool of NTHREADS over tensors, one single-threaded level-3 zstd frame per
  tensor (identical bytes to serial zstd -3; zstd's own ``threads`` would only split >8 MB inputs).
* Blosc2Peer: blosc2 ``nthreads=NTHREADS`` for compression and decompression.
* SafetensorsPeer, TorchSavePeer: single-threaded serialization, no compression.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

NTHREADS = os.cpu_count() or 1

Tensors = dict[str, np.ndarray]
_T = TypeVar("_T")
_R = TypeVar("_R")


class Peer(Protocol):
    """Uniform interface of a peer compressor."""

    name: str
    supports_delta: bool

    def compress(self, tensors: Tensors, base: Tensors | None) -> object: ...

    def size(self, blob: Any) -> int: ...

    def decompress(self, blob: Any, base: Tensors | None) -> Tensors: ...


# --------------------------------------------------------------------------- helpers


def _c(a: np.ndarray) -> np.ndarray:
    """C-contiguous version of ``a`` (``np.ascontiguousarray`` would turn 0-d into 1-d)."""
    a = np.asarray(a)
    return a if a.flags.c_contiguous else a.copy(order="C")


def _uint_view(a: np.ndarray) -> np.ndarray:
    """Flat unsigned-integer view of the bit patterns (works for bf16, fp16/32/64, ints)."""
    a = _c(a).reshape(-1)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _is_bf16(dtype: np.dtype) -> bool:
    return dtype.name == "bfloat16"


def _bf16() -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def _delta_base(name: str, a: np.ndarray, base: Tensors | None) -> np.ndarray | None:
    """The base tensor to delta against, or None when absent or incompatible."""
    if base is None or name not in base:
        return None
    b = base[name]
    if b.shape != a.shape or b.dtype != a.dtype or a.size == 0:
        return None
    return b


def _pmap(fn: Callable[[_T], _R], items: Iterable[_T]) -> list[_R]:
    items = list(items)
    if NTHREADS <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(NTHREADS) as ex:
        return list(ex.map(fn, items))


@dataclass
class _Entry:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    delta: bool
    payload: list[bytes] = field(default_factory=list)


@dataclass
class _Blob:
    entries: list[_Entry]

    @property
    def nbytes(self) -> int:
        return sum(len(p) for e in self.entries for p in e.payload)


def _from_bytes(buf: bytes | bytearray, e: _Entry) -> np.ndarray:
    return np.frombuffer(buf, dtype=e.dtype).reshape(e.shape)


def _xor_bytes(a: np.ndarray, b: np.ndarray) -> bytes:
    return np.bitwise_xor(_uint_view(a), _uint_view(b)).tobytes()


def _unxor(buf: bytes | bytearray, base: np.ndarray, e: _Entry) -> np.ndarray:
    u = _uint_view(base)
    return np.bitwise_xor(np.frombuffer(buf, dtype=u.dtype), u).view(e.dtype).reshape(e.shape)


def _require_base(e: _Entry, base: Tensors | None) -> np.ndarray:
    if base is None or e.name not in base:
        raise ValueError(f"tensor {e.name!r} was delta-compressed; its base is required")
    return base[e.name]


# --------------------------------------------------------------------------- ZipNN


_ZIPNN_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class ZipNNPeer:
    """zipnn 0.5.4 per tensor on raw bytes (``input_format="byte"``, ``bytearray_dtype`` set to
    float32/bfloat16/float16 so its byte grouping + Huffman path is used).

    Delta mode uses ZipNN's own XOR delta: ``ZipNN(delta_compressed_type="byte")`` with
    ``compress(data, delta_second_data=base)`` XORs the bytes with the base inside zipnn and then
    byte-groups and compresses the XOR; ``decompress(blob, delta_second_data=base)`` undoes it.
    (The constructor docstring says "NOT IMPLEMENTED YET", but the byte-format path is.)

    zipnn only handles float32/bf16/fp16; other dtypes (e.g. MiniLM's int64 ``position_ids``) fall
    back to zstd level 3 (XOR delta), like ZipNN's own safetensors tooling leaves them.
    """

    name = "zipnn"
    supports_delta = True

    def __init__(self, threads: int = NTHREADS) -> None:
        self.threads = threads

    def _zipnn(self, dtype: str, delta: bool) -> Any:
        from zipnn import ZipNN

        # A fresh object per call: zipnn stores decoded header fields on the instance.
        return ZipNN(
            input_format="byte",
            bytearray_dtype=dtype,
            threads=self.threads,
            delta_compressed_type="byte" if delta else 0,
        )

    def compress(self, tensors: Tensors, base: Tensors | None) -> _Blob:
        entries = []
        for name, a in tensors.items():
            b = _delta_base(name, a, base)
            e = _Entry(name, a.dtype, a.shape, b is not None)
            zdt = _ZIPNN_DTYPES.get(a.dtype.name)
            if a.size == 0:
                e.payload = [b""]
            elif zdt is None:
                raw = _xor_bytes(a, b) if b is not None else _c(a).tobytes()
                e.payload = [_zstd_compress(raw)]
            elif b is not None:
                z = self._zipnn(zdt, True)
                data = _c(a).tobytes()
                e.payload = [z.compress(data, delta_second_data=_c(b).tobytes())]
            else:
                e.payload = [self._zipnn(zdt, False).compress(_c(a).tobytes())]
            entries.append(e)
        return _Blob(entries)

    def size(self, blob: _Blob) -> int:
        return blob.nbytes

    def decompress(self, blob: _Blob, base: Tensors | None) -> Tensors:
        out: Tensors = {}
        for e in blob.entries:
            zdt = _ZIPNN_DTYPES.get(e.dtype.name)
            b = _require_base(e, base) if e.delta else None
            if int(np.prod(e.shape)) == 0:
                out[e.name] = np.empty(e.shape, e.dtype)
            elif zdt is None:
                raw = _zstd_decompress(e.payload[0])
                out[e.name] = _unxor(raw, b, e) if b is not None else _from_bytes(raw, e)
            elif b is not None:
                z = self._zipnn(zdt, True)
                raw = z.decompress(e.payload[0], delta_second_data=_c(b).tobytes())
                out[e.name] = _from_bytes(raw, e)
            else:
                out[e.name] = _from_bytes(self._zipnn(zdt, False).decompress(e.payload[0]), e)
        return out


# --------------------------------------------------------------------------- byte planes + zlib


class BytewiseZlibPeer:
    """ModelHub-paper scheme: split each tensor into byte planes (most significant byte first),
    zlib level 6 per plane. Delta = integer SUB of the bit patterns (uint16/uint32/uint64
    wrap-around), i.e. planes of ``(x - base) mod 2**bits``. Applied to every dtype."""

    name = "bytewise-zlib"
    supports_delta = True

    def __init__(self, level: int = 6) -> None:
        self.level = level

    def compress(self, tensors: Tensors, base: Tensors | None) -> _Blob:
        entries: list[_Entry] = []
        planes: list[np.ndarray] = []
        for name, a in tensors.items():
            b = _delta_base(name, a, base)
            u = _uint_view(a)
            if b is not None:
                u = u - _uint_view(b)  # unsigned wrap-around
            k = u.dtype.itemsize
            # little-endian bytes -> columns; reverse so plane 0 is the high-order byte
            cols = u.view(np.uint8).reshape(-1, k)
            planes.extend(_c(cols[:, k - 1 - j]) for j in range(k))
            entries.append(_Entry(name, a.dtype, a.shape, b is not None))
        comp = _pmap(lambda p: zlib.compress(p, self.level), planes)
        i = 0
        for e in entries:
            k = e.dtype.itemsize
            e.payload, i = comp[i : i + k], i + k
        return _Blob(entries)

    def size(self, blob: _Blob) -> int:
        return blob.nbytes

    def decompress(self, blob: _Blob, base: Tensors | None) -> Tensors:
        raw = _pmap(zlib.decompress, [p for e in blob.entries for p in e.payload])
        out: Tensors = {}
        i = 0
        for e in blob.entries:
            k = e.dtype.itemsize
            n = int(np.prod(e.shape))
            cols = np.empty((n, k), np.uint8)
            for j in range(k):
                cols[:, k - 1 - j] = np.frombuffer(raw[i + j], np.uint8)
            i += k
            u = cols.reshape(-1).view(_uint_view(np.empty(0, e.dtype)).dtype)
            if e.delta:
                u = u + _uint_view(_require_base(e, base))
            out[e.name] = u.view(e.dtype).reshape(e.shape)
        return out


# --------------------------------------------------------------------------- zstd


def _zstd_compress(buf: bytes, level: int = 3) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=level).compress(buf)


def _zstd_decompress(buf: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().decompress(buf)


class ZstdPeer:
    """zstandard level 3 on each tensor's raw bytes; delta = XOR of the bit patterns."""

    name = "zstd-3"
    supports_delta = True

    def __init__(self, level: int = 3) -> None:
        self.level = level

    def compress(self, tensors: Tensors, base: Tensors | None) -> _Blob:
        entries, raws = [], []
        for name, a in tensors.items():
            b = _delta_base(name, a, base)
            raws.append(_xor_bytes(a, b) if b is not None else _c(a).tobytes())
            entries.append(_Entry(name, a.dtype, a.shape, b is not None))
        for e, c in zip(entries, _pmap(lambda r: _zstd_compress(r, self.level), raws), strict=True):
            e.payload = [c]
        return _Blob(entries)

    def size(self, blob: _Blob) -> int:
        return blob.nbytes

    def decompress(self, blob: _Blob, base: Tensors | None) -> Tensors:
        raws = _pmap(_zstd_decompress, [e.payload[0] for e in blob.entries])
        out: Tensors = {}
        for e, raw in zip(blob.entries, raws, strict=True):
            if e.delta:
                out[e.name] = _unxor(raw, _require_base(e, base), e)
            else:
                out[e.name] = _from_bytes(raw, e)
        return out


# --------------------------------------------------------------------------- blosc2


class Blosc2Peer:
    """blosc2 ``compress2`` per tensor: SHUFFLE filter + ZSTD clevel 5, typesize = itemsize,
    ``nthreads=NTHREADS``. No delta (base is ignored)."""

    name = "blosc2-shuffle-zstd5"
    supports_delta = False

    def __init__(self, clevel: int = 5, nthreads: int = NTHREADS) -> None:
        self.clevel = clevel
        self.nthreads = nthreads

    def compress(self, tensors: Tensors, base: Tensors | None) -> _Blob:
        import blosc2

        entries = []
        for name, a in tensors.items():
            e = _Entry(name, a.dtype, a.shape, False)
            cp = blosc2.CParams(
                codec=blosc2.Codec.ZSTD,
                clevel=self.clevel,
                typesize=a.dtype.itemsize,
                nthreads=self.nthreads,
                filters=[blosc2.Filter.SHUFFLE],
                filters_meta=[0],
            )
            e.payload = [blosc2.compress2(_uint_view(a), cparams=cp)]
            entries.append(e)
        return _Blob(entries)

    def size(self, blob: _Blob) -> int:
        return blob.nbytes

    def decompress(self, blob: _Blob, base: Tensors | None) -> Tensors:
        import blosc2

        dp = blosc2.DParams(nthreads=self.nthreads)
        return {e.name: _from_bytes(blosc2.decompress2(e.payload[0], dparams=dp), e) for e in blob.entries}


# --------------------------------------------------------------------------- safetensors


_BF16_META_KEY = "gpupas_bf16"
_ORDER_META_KEY = "gpupas_order"


class SafetensorsPeer:
    """``safetensors.numpy.save`` bytes, no compression, no delta. bf16 tensors are stored as
    uint16 bit patterns; their names (and the dict order, which safetensors does not keep) are
    recorded in the safetensors header metadata, so that overhead counts toward ``size``."""

    name = "safetensors"
    supports_delta = False

    def compress(self, tensors: Tensors, base: Tensors | None) -> bytes:
        from safetensors.numpy import save

        bf16 = [k for k, a in tensors.items() if _is_bf16(a.dtype)]
        arrays = {k: (_uint_view(a).reshape(a.shape) if k in bf16 else _c(a))
                  for k, a in tensors.items()}
        meta = {_BF16_META_KEY: json.dumps(bf16), _ORDER_META_KEY: json.dumps(list(tensors))}
        return save(arrays, metadata=meta)

    def size(self, blob: bytes) -> int:
        return len(blob)

    def decompress(self, blob: bytes, base: Tensors | None) -> Tensors:
        from safetensors.numpy import load

        hlen = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8 : 8 + hlen]).get("__metadata__", {})
        bf16 = set(json.loads(meta.get(_BF16_META_KEY, "[]")))
        loaded = load(blob)
        order = json.loads(meta.get(_ORDER_META_KEY, "null")) or list(loaded)
        return {k: loaded[k].view(_bf16()) if k in bf16 else loaded[k] for k in order}


# --------------------------------------------------------------------------- torch.save


class TorchSavePeer:
    """``torch.save`` of the state dict into ``io.BytesIO`` (bf16 as ``torch.bfloat16``);
    ``torch.load(weights_only=True)``. No compression, no delta."""

    name = "torch-save"
    supports_delta = False

    def compress(self, tensors: Tensors, base: Tensors | None) -> bytes:
        import torch

        sd = {}
        for k, a in tensors.items():
            a = _c(a)
            if _is_bf16(a.dtype):
                sd[k] = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
            else:
                sd[k] = torch.from_numpy(a.copy())
        buf = io.BytesIO()
        torch.save(sd, buf)
        return buf.getvalue()

    def size(self, blob: bytes) -> int:
        return len(blob)

    def decompress(self, blob: bytes, base: Tensors | None) -> Tensors:
        import torch

        sd = torch.load(io.BytesIO(blob), weights_only=True)
        out: Tensors = {}
        for k, t in sd.items():
            if t.dtype == torch.bfloat16:
                out[k] = t.view(torch.int16).numpy().view(_bf16())
            else:
                out[k] = t.numpy()
        return out


ALL_PEERS: tuple[type, ...] = (
    ZipNNPeer,
    BytewiseZlibPeer,
    ZstdPeer,
    Blosc2Peer,
    SafetensorsPeer,
    TorchSavePeer,
)


def all_peers() -> list[Peer]:
    """One instance of every peer with default settings."""
    return [cls() for cls in ALL_PEERS]


# --------------------------------------------------------------------------- self-test


def _selftest() -> None:
    rng = np.random.default_rng(0)
    bf16 = _bf16()

    def fp32(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def perturb(a: np.ndarray) -> np.ndarray:
        return np.asarray((a.astype(np.float32) + fp32(*a.shape) * 1e-3).astype(a.dtype))

    base32 = {
        "w": fp32(64, 96),
        "b": fp32(96),
        "same": fp32(33),
        "scalar": fp32(),
        "empty": fp32(0, 4),
        "pos": np.arange(77, dtype=np.int64).reshape(1, 77),
        "half": fp32(40).astype(np.float16),
        "shape_changed": fp32(8),
    }
    cur32 = {k: perturb(v) if v.dtype.kind == "f" and k != "same" else v.copy() for k, v in base32.items()}
    cur32["shape_changed"] = fp32(9)
    cur32["new_only"] = fp32(17, 3)
    to_bf = {k: v.astype(bf16) if v.dtype == np.float32 else v for k, v in base32.items()}
    base16 = dict(to_bf)
    cur16 = {k: perturb(v) if v.dtype == bf16 and k != "same" else v.copy() for k, v in base16.items()}
    cur16["big"] = fp32(300_000).astype(bf16)
    base16["big"] = perturb(cur16["big"])
    cur32["big"] = fp32(300_000)
    base32["big"] = perturb(cur32["big"])

    for peer in all_peers():
        for label, cur, base in (("fp32", cur32, base32), ("bf16", cur16, base16)):
            for use_base in (None, base):
                blob = peer.compress(cur, use_base)
                got = peer.decompress(blob, use_base)
                assert list(got) == list(cur), (peer.name, label, list(got))
                for k, a in cur.items():
                    g = got[k]
                    assert g.dtype == a.dtype and g.shape == a.shape, (peer.name, label, k, g.dtype, g.shape)
                    assert np.array_equal(_c(g).reshape(-1).view(np.uint8),
                                          _c(a).reshape(-1).view(np.uint8)), (peer.name, label, k)
                raw = sum(a.nbytes for a in cur.values())
                mode = "delta" if use_base is not None and peer.supports_delta else "full"
                print(f"{peer.name:22s} {label} {mode:5s} {peer.size(blob):8d} B / {raw} B raw")
    print("selftest OK: all peers round-trip bit-exactly")


if __name__ == "__main__":
    _selftest()
