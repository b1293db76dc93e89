"""Minimum-cost spanning arborescence (Chu-Liu/Edmonds, in Tarjan's O(E log^2 V) form).

networkx has the algorithm (``minimum_spanning_arborescence``, and the tests check this one
against it), but its implementation is too slow and memory-hungry for thousands of vertices, and so
is a plain contraction per level (BENCHMARKS.md). This
one grows paths from each vertex along its cheapest in-edge, contracts a cycle as soon as a
path closes one (merging the cycle's in-edge heaps, smaller into larger, with a lazy offset per
heap) and recovers the tree by undoing the contractions in reverse (a union-find with rollback).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def min_arborescence(n: int, root: int, edges: Sequence[tuple[int, int, float]]) -> list[int]:
    """For each vertex ``0..n-1`` the index in ``edges`` (``(src, dst, weight)``) of its in-edge in a
    minimum-weight spanning arborescence rooted at ``root`` (``-1`` for the root).

    ValueError if some vertex cannot be reached from the root.
    """
    up = list(range(n))  # union-find with rollback: union by size, no path compression
    size = [1] * n
    history: list[tuple[int, int]] = []

    def find(x: int) -> int:
        while up[x] != x:
            x = up[x]
        return x

    heaps: list[list[tuple[float, int]]] = [[] for _ in range(n)]  # in-edges of each component (by its rep)
    offset = [0.0] * n  # true key of an entry = its key + offset of its heap
    for i, (a, b, w) in enumerate(edges):
        if a != b and b != root:
            heaps[b].append((float(w), i))
    for h in heaps:
        heapq.heapify(h)

    def join(a: int, b: int) -> bool:
        a, b = find(a), find(b)
        if a == b:
            return False
        big, small = (a, b) if len(heaps[a]) >= len(heaps[b]) else (b, a)
        hb, ob = heaps[big], offset[big]
        for k, i in heaps[small]:
            heapq.heappush(hb, (k + offset[small] - ob, i))
        heaps[small] = []
        if size[a] < size[b]:
            a, b = b, a
        up[b] = a
        size[a] += size[b]
        history.append((b, a))
        heaps[a], offset[a] = hb, ob
        if big != a:
            heaps[big] = []
        return True

    seen = [-1] * n
    seen[root] = root
    chosen = [-1] * n  # per component representative: the edge entering it
    cycles: list[tuple[int, int, list[int]]] = []  # (representative, history length before, cycle's edges)
    for s in range(n):
        u = s
        q: list[int] = []  # edges of the current path
        path: list[int] = []  # components of the current path
        while seen[u] < 0:
            h = heaps[u]
            while True:
                if not h:
                    raise ValueError(f"vertex {u} has no path from the root")
                k, i = heapq.heappop(h)
                if find(edges[i][0]) != u:  # skip edges inside the (contracted) component
                    break
            offset[u] -= k + offset[u]  # every other edge into u now costs that much less
            q.append(i)
            path.append(u)
            seen[u] = s
            u = find(edges[i][0])
            if seen[u] == s:  # the path closed a cycle: contract it
                t = len(history)
                start = len(q)
                while True:
                    w = path.pop()
                    start -= 1
                    if not join(u, w):
                        break
                u = find(u)
                seen[u] = -1
                cycles.append((u, t, q[start:]))
                del q[start:]
        for i in q:
            chosen[find(edges[i][1])] = i
    for u, t, cyc in reversed(cycles):
        while len(history) > t:
            b, a = history.pop()
            up[b] = b
            size[a] -= size[b]
        entering = chosen[u]
        for i in cyc:
            chosen[find(edges[i][1])] = i
        chosen[find(edges[entering][1])] = entering
    chosen[root] = -1
    return chosen
