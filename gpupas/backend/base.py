"""The backend protocol, and the choice of a backend for a device.

CuPy is imported only when a GPU backend is asked for (``device="cuda"``, or device arrays as
input). Where it cannot run (no CuPy, no nvCOMP, no GPU) the NumPy backend is used instead, and
that is said once in a log line, never silently per call.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Protocol

from gpupas.errors import BackendUnavailableError, InvalidInputError

log = logging.getLogger("gpupas")


def check_dtype(arr: Any, name: str) -> None:
    """UnsupportedDtypeError naming tensor ``name`` where gpupas has no layout for ``arr``'s dtype."""
    from gpupas.errors import UnsupportedDtypeError
    from gpupas.pas.planes import layout_of

    try:
        layout_of(arr.dtype)
    except UnsupportedDtypeError as exc:
        raise UnsupportedDtypeError(f"tensor {name!r}: {exc}") from None


def bases_of(m: Any, e: Any, base_bits: Any, grand_bits: Any, device: Callable[[Any], Any] = lambda x: x,
             ) -> tuple[Any, Any]:
    """The bits entry ``e`` of snapshot ``m`` decodes against: its base's (where it reads one) and its
    grand-base's (a 'pred' tensor), each on this backend via ``device``; IntegrityError where one is
    missing or not the tensor's size."""
    from gpupas.errors import IntegrityError
    from gpupas.pas.rows import rows_of

    ub = device(base_bits.get(e.name)) if e.reads_base else None
    ub2 = device(grand_bits.get(e.name)) if e.enc == "pred" else None
    if e.reads_base and ub is None:
        raise IntegrityError(f"snapshot {m.id}: the base's bits of tensor {e.name!r} are missing")
    if e.enc == "pred" and ub2 is None:
        raise IntegrityError(f"snapshot {m.id}: the bits tensor {e.name!r} extrapolates from are missing")
    rows, per = rows_of(e.shape)
    for name, arr in (("base", ub), ("grand-base", ub2)):
        if arr is not None and arr.size != rows * per:
            raise IntegrityError(f"snapshot {m.id}: tensor {e.name!r} has {rows * per} values, its {name} "
                                 f"{arr.size}")
    return ub, ub2


class Backend(Protocol):
    """What the engine asks of a device."""

    name: str  # "numpy" or "cupy"
    codec_backend: str  # which chunk-codec implementations run here: "cpu" or "gpu"
    @property
    def xp(self) -> Any:
        """The array module."""
        ...

    to_host_bytes: int  # bytes copied from the device to the host so far

    def as_array(self, value: Any, name: str) -> Any:
        """An input tensor as an array of this backend (zero-copy where it can), contiguous."""
        ...

    layout: ClassVar[dict[str, int]]  # this device's default stream layout (e.g. {"chunk_size": 65536} on a GPU)

    def to_host(self, x: Any, out: Any = None, *, stream: Any = None, meta: bool = False) -> Any:
        """A host (NumPy) copy of ``x`` (into ``out`` where given): the one function through which bytes
        leave the device; counted in ``to_host_bytes`` (``meta``: sizes, checksums, masks, counted apart)."""
        ...

    def crc32(self, bits: Any) -> int:
        """CRC-32 of an array's bytes."""
        ...

    def usable(self, array: Any) -> bool:
        """Whether ``array`` (a cached base, say) can be used here as it is: the NumPy backend takes host
        arrays only; the CuPy backend takes both (it uploads host arrays)."""
        ...

    def crc32_many(self, arrays: Sequence[Any], executor: Any = None) -> list[int]:
        """CRC-32 of each array (one launch and one copy on a GPU, not one per tensor; on the CPU, large
        arrays in pieces on ``executor``'s threads where given)."""
        ...

    def outputs(self, m: Any, bits: Any, framework: str) -> dict[str, Any]:
        """Restored tensors of manifest ``m`` from their raw ``bits`` (the caller's to keep), as this device's
        arrays (``framework``: "numpy" for the backend's own, "torch" for torch tensors)."""
        ...

    def workspace(self, nbytes: int) -> AbstractContextManager[Any]:
        """A uint8 buffer of ``nbytes`` on the device for the duration of a ``with`` block."""
        ...

    def empty(self, nbytes: int) -> Any:
        """A fresh uint8 array (64-byte aligned) that outlives the call."""
        ...

    def encode_planes(self, staged: Sequence[Any], extras: Sequence[Any], placements: Sequence[Any],
                      bufs: Sequence[Any], segment: int, min_group: int, executor: Any, small: bool
                      ) -> list[list[int]]:
        """Write every staged tensor's planes (segment by segment) and extras into the stream buffers;
        return, per stream, the sorted offsets where a coder should end a block."""
        ...

    def encode_chunks(self, policy: Any, buf: Any, bounds: Sequence[int], chunk_size: int,
                      emit: Callable[[int, str, Any], None], executor: Any, small: bool) -> list[tuple[str, int]]:
        """Code every chunk of stream buffer ``buf``, handing (chunk, codec letter, stored bytes) to
        ``emit`` as each is ready (the stored bytes are on the host); returns (letter, size) per chunk."""
        ...

    def decode_chunks(self, stream: Any, chunks: Sequence[int], fetch: Callable[[int], Any], buf: Any, executor: Any,
                      small: bool, on_error: Callable[[int, Exception], Exception],
                      scatter: Callable[[int, list[memoryview]], bool | None] | None = None) -> None:
        """Check and decode chunks (``fetch(c)``: the stored payload + CRC-32C, on the host) into their
        places in ``buf``; ``on_error(c, exc)`` gives the error to raise for a damaged one. ``scatter(c,
        views)``, where given, reads chunk ``c``'s stored bytes into host buffers the backend chooses
        (:meth:`gpupas.store.shards.ShardReader.scatter`); a backend may ignore it."""
        ...

    def decode_planes(self, m: Any, entries: Sequence[Any], bufs: Any, base_bits: Any, grand_bits: Any,
                      executor: Any, small: bool) -> dict[str, Any]:
        """The raw bits of ``entries`` from their decoded planes (``bufs``: stream -> bytes) and the
        bases' bits, as arrays of this backend."""
        ...


_BACKENDS: dict[str, Backend] = {}
_warned: set[str] = set()


def _current_cuda_device() -> int | None:
    """The id of CuPy's current CUDA device; None where CuPy or a device is missing (the GPU backend
    then falls back to NumPy)."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDevice())
    except Exception:  # ImportError; CUDARuntimeError: no driver, no device
        return None


def resolve_device(device: str | None, inputs: Any = None) -> str:
    """The backend name for ``device`` ("cpu", "cuda", "cuda:N", None: from the inputs).

    The GPU backend runs on the current CUDA device, so "cuda:N" is taken only where N is that device
    (InvalidInputError otherwise: select it first with ``cupy.cuda.Device(N).use()`` or
    ``torch.cuda.set_device(N)``)."""
    if device is None:
        from gpupas.xp import any_device_array

        return "cupy" if inputs is not None and any_device_array(inputs) else "numpy"
    if device in ("cpu", "numpy"):
        return "numpy"
    if device in ("cupy", "cuda"):
        return "cupy"
    index = re.fullmatch(r"cuda:([0-9]+)", device) if isinstance(device, str) else None
    if index:
        current = _current_cuda_device()
        if current is not None and int(index[1]) != current:
            raise InvalidInputError(f"device={device!r}, but gpupas runs on the current CUDA device, "
                                    f"{current}; select device {int(index[1])} first "
                                    "(cupy.cuda.Device(n).use() / torch.cuda.set_device(n)) and pass 'cuda'")
        return "cupy"
    raise InvalidInputError(f"device must be 'cpu', 'cuda' or 'cuda:N', not {device!r}")


def get_backend(name: str = "numpy", *, fallback: bool = True) -> Backend:
    """The backend called ``name``; a GPU backend that cannot run falls back to NumPy (said once)."""
    if name in _BACKENDS:
        return _BACKENDS[name]
    if name == "numpy":
        from gpupas.backend.numpy import NumpyBackend

        backend: Backend = NumpyBackend()
    elif name == "cupy":
        try:
            from gpupas.backend.cupy import CupyBackend

            backend = CupyBackend()
        except BackendUnavailableError as exc:
            if not fallback:
                raise
            if name not in _warned:
                _warned.add(name)
                log.warning("gpupas: the GPU backend is unavailable (%s); using the NumPy backend on the CPU", exc)
            return get_backend("numpy")
    else:
        raise InvalidInputError(f"unknown backend {name!r}; use 'numpy' or 'cupy'")
    _BACKENDS[name] = backend
    return backend
