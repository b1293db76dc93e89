"""Where the array work runs: the NumPy backend (host) or the CuPy backend (a CUDA GPU).

A backend is chosen once per commit or restore (``device=``, or from the input) and owns
allocation, checksums, the segment kernels, chunk coding and every copy to the host.
"""

from __future__ import annotations

from gpupas.backend.base import Backend, get_backend, resolve_device

__all__ = ["Backend", "get_backend", "resolve_device"]
