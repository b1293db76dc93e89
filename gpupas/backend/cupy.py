"""The CuPy backend (a CUDA GPU): segment kernels from ``kernels/``, nvCOMP chunk codecs, pinned staging.

Importing this module checks that CuPy and a GPU are usable and raises BackendUnavailableError
otherwise (the caller then falls back to the NumPy backend).
"""

from __future__ import annotations

from gpupas.errors import BackendUnavailableError


def _check() -> None:
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailableError("CuPy is not installed (pip install 'gpupas[gpu-cu12]')") from exc
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise BackendUnavailableError("no CUDA device")
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise BackendUnavailableError(f"no usable CUDA device ({exc})") from exc


_check()


class CupyBackend:  # pragma: no cover - needs a GPU
    name = "cupy"
    codec_backend = "gpu"

    def __init__(self) -> None:
        raise BackendUnavailableError("the CuPy backend is not built yet")
