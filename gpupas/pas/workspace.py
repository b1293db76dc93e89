"""A process-wide reusable byte buffer for a snapshot's planes.

Large fresh allocations are fresh pages: the first write to each costs a page fault, which here
halves the speed of a commit or restore. One buffer is kept and reused; an operation that finds
it busy (another thread) allocates its own.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

_lock = threading.Lock()
_buf = np.empty(0, np.uint8)
KEEP_AT_MOST = 4 << 30  # never hold more than this between operations


@contextmanager
def workspace(nbytes: int) -> Iterator[np.ndarray]:
    """A uint8 buffer of ``nbytes`` for the duration of the ``with`` block."""
    global _buf
    if nbytes > KEEP_AT_MOST or not _lock.acquire(blocking=False):
        yield np.empty(nbytes, np.uint8)
        return
    try:
        if _buf.size < nbytes:
            _buf = np.empty(0, np.uint8)  # free the old one before taking the new
            _buf = np.empty(nbytes, np.uint8)
        yield _buf[:nbytes]
    finally:
        _lock.release()
