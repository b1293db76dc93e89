"""The only place gpupas starts threads: a bounded pool for coding work, one thread for background I/O."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Executor:
    """Runs work items on ``workers`` threads (created on first use); ``workers=1`` runs them inline
    (inside a Dask task, say, where the cluster already uses the cores)."""

    def __init__(self, workers: int | None = None):
        self.workers = max(1, workers or os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None
        self._io: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _get(self, io: bool) -> ThreadPoolExecutor:
        with self._lock:
            if io:
                if self._io is None:
                    self._io = ThreadPoolExecutor(1, thread_name_prefix="gpupas-io")
                return self._io
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="gpupas")
            return self._pool

    def map(self, fn: Callable[[T], R], items: Iterable[T], inline: bool = False) -> list[R]:
        """``fn`` over ``items``; waits for every item before raising the first error (so no task is
        still writing into a shared buffer when the caller unwinds; the error of the first such item).
        One task per worker takes items in order until none is left: no hand-off per item.
        ``inline``: on this thread (for small work, the hand-offs cost more than they save)."""
        if inline or self.workers == 1:
            return [fn(x) for x in items]
        todo = list(items)
        results: list[Any] = [None] * len(todo)
        errors: dict[int, BaseException] = {}
        queue, lock = iter(range(len(todo))), threading.Lock()

        def drain() -> None:  # one task per worker, each taking the next item until none is left
            while True:
                with lock:
                    i = next(queue, None)
                if i is None:
                    return
                try:
                    results[i] = fn(todo[i])
                except BaseException as exc:  # raised below, once every item has run
                    errors[i] = exc

        pool = self._get(False)
        futures: list[Future[None]] = []
        try:
            for _ in range(min(self.workers, len(todo))):
                futures.append(pool.submit(drain))
        except RuntimeError:  # no thread starts at interpreter exit (Python 3.12+): an exit hook's commit
            drain()  # the items no worker took, on this thread
        wait(futures)
        if errors:
            raise errors[min(errors)]
        return results

    def background(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` on the I/O thread (durable writes overlapping the coding)."""
        if self.workers > 1:
            try:
                return self._get(True).submit(fn, *args)
            except RuntimeError:  # its thread cannot start at interpreter exit (Python 3.12+): run here
                pass
        fut: Future[Any] = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:
            fut.set_exception(exc)
        return fut

    def close(self) -> None:
        with self._lock:
            pools, self._pool, self._io = [self._pool, self._io], None, None
        for p in pools:
            if p is not None:
                p.shutdown()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
