"""The executor's map: results in item order, every item run before an error is raised (no task still
writing into a shared buffer), the error of the first failing item, at most ``workers`` threads; CRC-32s computed
in pieces on its threads."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from gpupas.engine.executor import Executor


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_map_keeps_item_order(workers: int) -> None:
    with Executor(workers) as ex:
        items = list(range(200))
        assert ex.map(lambda x: (time.sleep(0.0005 * (x % 3)), x * x)[1], items) == [x * x for x in items]
        assert ex.map(lambda x: x, []) == []
        assert ex.map(lambda x: x + 1, iter(range(5))) == [1, 2, 3, 4, 5]  # any iterable, read once


def test_map_runs_every_item_then_raises_the_first_failing_items_error() -> None:
    ran: list[int] = []
    lock = threading.Lock()

    def fn(x: int) -> int:
        time.sleep(0.002 if x == 3 else 0.0)  # the first failure is not the first to happen
        with lock:
            ran.append(x)
        if x in (3, 7, 12):
            raise ValueError(f"item {x}")
        return x

    with Executor(3) as ex, pytest.raises(ValueError, match="item 3"):
        ex.map(fn, range(20))
    assert sorted(ran) == list(range(20))


def test_map_uses_at_most_its_workers_threads() -> None:
    names: set[str] = set()
    lock = threading.Lock()

    def fn(x: int) -> None:
        with lock:
            names.add(threading.current_thread().name)
        time.sleep(0.001)

    with Executor(2) as ex:
        ex.map(fn, range(50))
        assert 1 <= len(names) <= 2 and threading.current_thread().name not in names
        names.clear()
        ex.map(fn, range(50), inline=True)
        assert names == {threading.current_thread().name}


@pytest.mark.parametrize("sizes", [[0], [1, 0, 7], [13, 64, 65, 129], [5 * 64 + 3, 0, 2 * 64]])
def test_crc32_in_pieces_is_zlibs(sizes: list[int]) -> None:
    """CRC-32s computed piece by piece on the pool and joined equal zlib's of the whole bytes."""
    import zlib

    from gpupas.format.checksum import crc32_pieces

    rng = np.random.default_rng(len(sizes))
    arrays = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    with Executor(2) as ex:
        got = crc32_pieces([memoryview(a) for a in arrays], ex.map, piece=64)
    assert got == [zlib.crc32(a.tobytes()) for a in arrays]


def test_backend_crc32_many_uses_the_pool_for_large_arrays() -> None:
    """NumpyBackend.crc32_many with an executor: the same CRC-32s as without, for arrays past the
    threshold (several pieces each) and small ones beside them."""
    import zlib

    from gpupas.backend import get_backend
    from gpupas.format.checksum import PIECE

    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal(PIECE // 4 * 2 + 5).astype(np.float32), np.zeros(0, np.float32),
              rng.integers(0, 9, (33, 7), dtype=np.int16)]
    backend = get_backend("numpy")
    with Executor(2) as ex:
        assert backend.crc32_many(arrays, ex) == backend.crc32_many(arrays) == [zlib.crc32(a.tobytes()) for a in arrays]
