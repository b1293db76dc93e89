"""The NumPy backend: everything on the host, the executor's threads doing the work in parallel.

The transforms run compiled and fused (:mod:`gpupas.backend.fast`: the same bytes as the NumPy
reference of :mod:`gpupas.pas`, which runs where the kernels were not built or ``GPUPAS_FAST=0``); a
restore then rebuilds its tensors through a bounded window of decoded planes (:meth:`decode_windows`).

Its reusable workspace keeps at most :data:`KEEP_AT_MOST` bytes between operations (fresh pages
cost a page fault each on first write, which halves the speed of a commit or restore); set
``GPUPAS_WORKSPACE_MAX`` (bytes) to change the cap, 0 to keep nothing.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np

from gpupas.backend.base import bases_of, check_dtype
from gpupas.errors import InvalidInputError
from gpupas.format.checksum import PIECE, check_crc32c_suffix, crc32, crc32_pieces

KEEP_AT_MOST = int(os.environ.get("GPUPAS_WORKSPACE_MAX", 1 << 30))


def _mapped(arr: np.ndarray) -> bool:
    """Whether ``arr``'s memory is a file's mapping (np.memmap, np.load(mmap_mode=...), np.frombuffer of an mmap):
    read once its file is truncated (rewritten in place), it kills the process with SIGBUS."""
    import mmap

    seen: Any = arr
    while seen is not None:
        if isinstance(seen, mmap.mmap):  # (a copy of an np.memmap is an np.memmap too, of its own memory)
            return True
        seen = seen.obj if isinstance(seen, memoryview) else getattr(seen, "base", None)
    return False


class NumpyBackend:
    name = "numpy"
    codec_backend = "cpu"
    xp = np
    layout: ClassVar[dict[str, int]] = {}  # the default layout (256 KiB chunks)

    def __init__(self) -> None:
        self.to_host_bytes = 0
        self._lock = threading.Lock()
        self._buf = np.empty(0, np.uint8)

    # -- arrays in and out -----------------------------------------------------------------------------------
    def as_array(self, value: Any, name: str) -> np.ndarray:
        from gpupas.integrations.torch import is_torch_tensor, tensor_to_numpy
        from gpupas.xp import namespace

        if is_torch_tensor(value):
            arr = tensor_to_numpy(value)
        elif isinstance(value, (np.ndarray, np.generic)):
            arr = np.asarray(value)
        elif namespace(value) is not np:
            arr = self.to_host(value)
        else:
            raise InvalidInputError(f"{name!r} is a {type(value).__name__}, not a tensor; archive tensors only "
                                    "(put other values in the version's metadata)")
        check_dtype(arr, name)
        if not arr.flags.c_contiguous or _mapped(arr):  # a file's mapping, kept as a delta base, could shrink under it
            arr = arr.copy(order="C")  # ascontiguousarray would turn 0-d into 1-d
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        return arr

    def to_host(self, x: Any, out: np.ndarray | None = None, *, stream: Any = None, meta: bool = False) -> np.ndarray:
        if isinstance(x, np.ndarray):
            if out is not None:
                out[...] = x
                return out
            return x
        from gpupas.xp import to_numpy

        got = to_numpy(x)
        self.to_host_bytes += got.nbytes
        if out is not None:
            out[...] = got
            return out
        return got

    def crc32(self, bits: Any) -> int:
        return crc32(memoryview(bits).cast("B"))

    def usable(self, array: Any) -> bool:
        from gpupas.xp import is_device_array

        return not is_device_array(array)

    def crc32_many(self, arrays: Sequence[Any], executor: Any = None) -> list[int]:
        views = [memoryview(a).cast("B") for a in arrays]
        if executor is None or executor.workers == 1 or sum(len(v) for v in views) < 2 * PIECE:
            return [crc32(v) for v in views]
        return crc32_pieces(views, executor.map)

    def outputs(self, m: Any, bits: Any, framework: str) -> dict[str, Any]:
        from gpupas.pas.planes import from_bits

        out = {}
        for name, r in bits.items():
            e = m.tensor(name)
            out[name] = from_bits(r, e.layout, e.shape)
        if framework == "torch":
            from gpupas.integrations.torch import numpy_to_state_dict

            return numpy_to_state_dict(out, copy=False)  # the arrays are the caller's already
        return out

    @contextmanager
    def workspace(self, nbytes: int) -> Iterator[np.ndarray]:
        """A reused buffer (one per backend: a second user at once gets a fresh one)."""
        if nbytes > KEEP_AT_MOST or not self._lock.acquire(blocking=False):
            yield np.empty(nbytes, np.uint8)
            return
        try:
            if self._buf.size < nbytes:
                self._buf = np.empty(0, np.uint8)  # free the old one before taking the new
                self._buf = np.empty(nbytes, np.uint8)
            yield self._buf[:nbytes]
        finally:
            self._lock.release()

    def release(self) -> None:
        """Drop the kept workspace."""
        with self._lock:
            self._buf = np.empty(0, np.uint8)

    def empty(self, nbytes: int) -> np.ndarray:
        raw = np.empty(nbytes + 64, np.uint8)
        skip = -raw.ctypes.data % 64
        return raw[skip : skip + nbytes]

    # -- chunks ------------------------------------------------------------------------------------------------
    def encode_chunks(self, policy: Any, buf: np.ndarray, bounds: Sequence[int], chunk_size: int,
                      emit: Callable[[int, str, Any], None], executor: Any, small: bool) -> list[tuple[str, int]]:
        """Code every chunk of ``buf`` (one task per chunk), handing each to ``emit`` when ready."""
        from gpupas.codecs.policy import encode_cpu

        length = buf.size

        def code(c: int) -> tuple[str, int]:
            lo, hi = c * chunk_size, min(length, (c + 1) * chunk_size)
            inner = [b - lo for b in bounds[bisect.bisect_right(bounds, lo) : bisect.bisect_left(bounds, hi)]]
            ((letter, parts),) = encode_cpu(policy, [buf[lo:hi]], [inner], chunk_size, parts=True)
            emit(c, letter, parts)  # written before this returns: the views into ``buf`` are still valid
            return letter, sum(len(p) for p in parts)

        return executor.map(code, range(-(-length // chunk_size)), inline=small)

    def decode_chunks(self, stream: Any, chunks: Sequence[int], fetch: Callable[[int], Any], buf: np.ndarray,
                      executor: Any, small: bool, on_error: Callable[[int, Exception], Exception],
                      scatter: Callable[[int, list[memoryview]], bool | None] | None = None) -> None:
        """Fetch, check and decode each chunk into ``buf`` (chunk ``c`` at ``c * chunk_size``), one task
        per chunk; a Zstandard chunk of raw blocks read straight into its place where ``scatter`` can."""
        from gpupas.codecs import registry
        from gpupas.codecs.zstd import read_raw
        from gpupas.errors import IntegrityError

        size = stream.chunk_size
        used = {stream.chunks[c] for c in chunks}
        codecs = {letter: registry.get(cid, "cpu") for letter, cid in stream.codecs.items() if letter in used}
        raw = {letter for letter, cid in stream.codecs.items() if cid == "zstd"} if scatter is not None else set()

        def decode(c: int) -> None:
            out = buf[c * size : (c + 1) * size]
            try:
                if stream.chunks[c] in raw and read_raw(lambda views: scatter(c, views), out):  # type: ignore[misc]
                    return
                body = check_crc32c_suffix(fetch(c))
                codecs[stream.chunks[c]].decode_batch([body], [out])
            except IntegrityError as exc:
                raise on_error(c, exc) from None

        executor.map(decode, sorted(chunks), inline=small)

    # -- planes of every segment, both ways --------------------------------------------------------------------
    def encode_planes(self, staged: Sequence[Any], extras: Sequence[np.ndarray], placements: Sequence[Any],
                      bufs: Sequence[np.ndarray], segment: int, min_group: int, executor: Any,
                      small: bool) -> list[list[int]]:
        """Fill the stream buffers with every tensor's planes and extras (one task per segment); returns,
        per stream, the sorted offsets where a coder should end a block (plane starts, context groups,
        extras)."""
        from gpupas.backend import fast
        from gpupas.format.layout import segments, write_extras
        from gpupas.pas.transform import encode_segment

        if fast.enabled():
            got = fast.encode_planes(staged, extras, placements, bufs, segment, min_group, executor, small)
            if got is not None:
                return got
        cuts = write_extras(extras, placements, bufs)
        units = [(i, a, b) for i, st in enumerate(staged) for a, b in segments(st.u.size, segment)]

        def encode(unit: tuple[int, int, int]) -> list[tuple[int, int]]:
            i, a, b = unit
            st, pl = staged[i], placements[i]
            n = b - a
            views, where = [], []
            for p in pl.parts:
                start = p.offset + a * p.count
                block = bufs[p.stream][start : start + p.count * n]
                for k in range(p.count):
                    views.append(block[k * n : (k + 1) * n])
                    where.append((p.stream, start + k * n))
            groups = encode_segment(st.u[a:b], st.base_for(a, b), st.layout, st.plan, views, min_group)
            return [(s, lo + g) for (s, lo), gs in zip(where, groups) for g in (0, *gs)]

        for found in executor.map(encode, units, inline=small):
            for s, off in found:
                cuts[s].add(off)
        return [sorted(c) for c in cuts]

    def decode_windows(self, m: Any, entries: Sequence[Any], read: Callable[[int, list[int], Any, int], None],
                       base_bits: Any, grand_bits: Any, executor: Any, small: bool,
                       crcs: dict[str, int] | None = None) -> dict[str, np.ndarray] | None:
        """A restore through a bounded window of decoded planes (the compiled path; None where that does not
        run, and the caller decodes every chunk first), each unmasked tensor's CRC-32 into ``crcs``: see
        :func:`gpupas.backend.fast.decode_windows`."""
        from gpupas.backend import fast

        if not fast.enabled():
            return None
        return fast.decode_windows(self, m, entries, read, base_bits, grand_bits, executor, small, crcs=crcs)

    def decode_planes(self, m: Any, entries: Sequence[Any], bufs: Any, base_bits: Any, grand_bits: Any,
                      executor: Any, small: bool) -> dict[str, np.ndarray]:
        """The raw bits of ``entries`` of manifest ``m`` from their decoded planes (``bufs``: stream
        index -> bytes) and the bases' bits; one allocation for all, one task per segment."""
        from gpupas.backend import fast
        from gpupas.errors import IntegrityError
        from gpupas.format.layout import segments
        from gpupas.pas.predict import alpha_from_planes, predict
        from gpupas.pas.rows import gather, mask_from_bytes, rows_of
        from gpupas.pas.transform import Plan, decode_segment

        if fast.enabled():
            got = fast.decode_planes(self, m, entries, bufs, base_bits, grand_bits, executor, small)
            if got is not None:
                return got

        nbytes = [e.nbytes for e in entries]
        starts = np.cumsum([0] + [-(-n // 64) * 64 for n in nbytes]).tolist()  # 64-byte aligned tensors
        block = self.empty(starts[-1])  # one allocation: huge pages
        out = {e.name: block[lo : lo + n].view(e.layout.uint) for e, lo, n in zip(entries, starts, nbytes)}
        jobs: dict[str, tuple[Any, Any, Any, Any, Any]] = {}  # name: (target, base, base's base, factors, mask)
        units: list[tuple[Any, int, int]] = []
        for e in entries:
            values = e.values
            rows, per = rows_of(e.shape)
            ub, ub2 = bases_of(m, e, base_bits, grand_bits)
            target, changed, alpha = out[e.name], None, None
            if e.extras is not None:
                s, off = e.extras
                extra = bufs[s][off : off + e.extras_nbytes]
                if e.masked:
                    changed = mask_from_bytes(extra[: e.mask_nbytes], rows)
                    if int(changed.sum()) != e.rows:
                        raise IntegrityError(f"snapshot {m.id}: the row mask of tensor {e.name!r} is damaged")
                    ub = gather(ub, changed, per)
                    ub2 = None if ub2 is None else gather(ub2, changed, per)
                    target = np.empty(values, out[e.name].dtype)
                if e.enc == "pred":
                    alpha = alpha_from_planes(extra[e.mask_nbytes :])
            jobs[e.name] = (target, ub, ub2, alpha, changed)
            units.extend((e, a, b) for a, b in segments(values, m.segment))

        def rebuild(unit: tuple[Any, int, int]) -> None:
            e, a, b = unit
            target, ub, ub2, alpha, _ = jobs[e.name]
            n = b - a
            planes: list[Any] = []
            for p in e.parts:
                start = p.offset + a * p.count
                block = bufs[p.stream][start : start + p.count * n]
                planes.extend(block[k * n : (k + 1) * n] for k in range(p.count))
            base = None if ub is None else ub[a:b]
            if e.enc == "pred":
                base = predict(base, ub2[a:b], alpha, e.coding, rows_of(e.shape)[1], a)
            decode_segment(planes, base, e.coding, Plan(e.enc, e.ctx), target[a:b])

        executor.map(rebuild, units, inline=small)
        for e in entries:
            target, _, _, _, changed = jobs[e.name]
            if changed is not None:  # unchanged rows are the base's
                whole = out[e.name].reshape(changed.size, -1)
                whole[...] = base_bits[e.name].reshape(changed.size, -1)
                whole[changed] = target.reshape(-1, whole.shape[1])
        return out
