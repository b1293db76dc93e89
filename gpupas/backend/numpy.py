"""The NumPy backend: everything on the host, the executor's threads doing the work in parallel.

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
from typing import Any

import numpy as np

from gpupas.errors import InvalidInputError, UnsupportedDtypeError
from gpupas.format.checksum import check_crc32c_suffix, crc32
from gpupas.pas.planes import layout_of

KEEP_AT_MOST = int(os.environ.get("GPUPAS_WORKSPACE_MAX", 1 << 30))


class NumpyBackend:
    name = "numpy"
    codec_backend = "cpu"
    xp = np

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
        try:
            layout_of(arr.dtype)
        except UnsupportedDtypeError as exc:
            raise UnsupportedDtypeError(f"tensor {name!r}: {exc}") from None
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")  # ascontiguousarray would turn 0-d into 1-d
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        return arr

    def to_host(self, x: Any) -> np.ndarray:
        if isinstance(x, np.ndarray):
            return x
        from gpupas.xp import to_numpy

        out = to_numpy(x)
        self.to_host_bytes += out.nbytes
        return out

    def crc32(self, bits: Any) -> int:
        return crc32(memoryview(bits).cast("B"))

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

    # -- work over the segment table ------------------------------------------------------------------------
    def run(self, fn: Callable[[Any], Any], items: Sequence[Any], executor: Any, small: bool) -> list[Any]:
        return executor.map(fn, items, inline=small)

    def encode_chunks(self, policy: Any, buf: np.ndarray, bounds: Sequence[int], chunk_size: int,
                      emit: Callable[[int, str, Any], None], executor: Any, small: bool) -> list[tuple[str, int]]:
        """Code every chunk of ``buf`` (one task per chunk), handing each to ``emit`` when ready."""
        from gpupas.codecs.policy import encode_cpu

        length = buf.size

        def code(c: int) -> tuple[str, int]:
            lo, hi = c * chunk_size, min(length, (c + 1) * chunk_size)
            inner = [b - lo for b in bounds[bisect.bisect_right(bounds, lo) : bisect.bisect_left(bounds, hi)]]
            ((letter, payload),) = encode_cpu(policy, [buf[lo:hi]], [inner], chunk_size)
            emit(c, letter, payload)
            return letter, len(payload)

        return executor.map(code, range(-(-length // chunk_size)), inline=small)

    def decode_chunks(self, stream: Any, stored: dict[int, Any], buf: np.ndarray, executor: Any, small: bool,
                      on_error: Callable[[int, Exception], Exception]) -> None:
        """Check and decode each stored chunk into ``buf`` (chunk ``c`` at ``c * chunk_size``)."""
        from gpupas.codecs import registry
        from gpupas.errors import IntegrityError

        size = stream.chunk_size
        codecs = {letter: registry.get(cid, "cpu") for letter, cid in stream.codecs.items()
                  if letter in set(stream.chunks[c] for c in stored)}

        def decode(c: int) -> None:
            try:
                body = check_crc32c_suffix(stored[c])
                codecs[stream.chunks[c]].decode_batch([body], [buf[c * size : (c + 1) * size]])
            except IntegrityError as exc:
                raise on_error(c, exc) from None

        executor.map(decode, sorted(stored), inline=small)
