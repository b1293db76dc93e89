"""Delta bases kept in memory: the one place that decides what stays, and checks it before use.

A commit keeps the caller's own arrays (no copy; what it had to copy, e.g. torch tensors, lossy or
file input, counts as the cache's) as the next commit's base; a restore keeps what it decoded.
Either may be changed afterwards by whoever holds the arrays (a training loop steps its weights in
place), so a cached snapshot is used only while each tensor still matches its CRC-32. At most
``max_snapshots`` snapshots, and, where ``max_bytes`` is set, at most that many bytes of arrays the
cache owns (the caller's arrays cost nothing extra), the newest snapshot kept whatever its size.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from gpupas.format.manifest import TensorEntry


class BaseCache:
    def __init__(self, max_snapshots: int = 2, max_bytes: int | None = None):
        self.max_snapshots, self.max_bytes = max_snapshots, max_bytes
        self._items: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._owned: dict[str, int] = {}  # snapshot -> bytes the cache itself holds (not the caller's)
        self._lock = threading.Lock()

    def put(self, sid: str, bits: Mapping[str, Any], *, borrowed: bool | Collection[str] = False) -> None:
        """Keep ``bits`` (raw patterns by name) of snapshot ``sid``; ``borrowed``: the names (True: all)
        whose arrays are the caller's own (the others, copies made on the way in, count as the cache's)."""
        lent = set(bits) if borrowed is True else set(borrowed or ())
        with self._lock:
            self._items[sid] = dict(bits)
            self._items.move_to_end(sid)
            self._owned[sid] = sum(int(b.nbytes) for name, b in bits.items() if name not in lent)
            while len(self._items) > self.max_snapshots or (
                    self.max_bytes is not None and len(self._items) > 1 and sum(self._owned.values()) > self.max_bytes):
                self._forget(next(iter(self._items)))

    def get(self, sid: str, entries: Sequence[TensorEntry], crc32_many: Callable[[Sequence[Any]], list[int]],
            usable: Callable[[Any], bool]) -> dict[str, Any] | None:
        """The cached bits of ``entries`` if all are there, ``usable`` (by the backend asking: a GPU commit's
        arrays are not the NumPy backend's) and unchanged (else None; a stale snapshot is dropped)."""
        with self._lock:
            have = self._items.get(sid)
        if have is None or any(e.name not in have or not usable(have[e.name]) for e in entries):
            return None
        if crc32_many([have[e.name] for e in entries]) == [e.crc32 for e in entries]:
            return {e.name: have[e.name] for e in entries}
        self.drop(sid)
        return None

    def drop(self, sid: str) -> None:
        with self._lock:
            self._forget(sid)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._owned.clear()

    def __contains__(self, sid: str) -> bool:
        return sid in self._items

    def _forget(self, sid: str) -> None:
        self._items.pop(sid, None)
        self._owned.pop(sid, None)
