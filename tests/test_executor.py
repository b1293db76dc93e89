"""The executor's map: results in item order, every item run before an error is raised (no task still
writing into a shared buffer), the error of the first failing item, at most ``workers`` threads."""

from __future__ import annotations

import threading
import time

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
