"""Planners over a storage graph (ModelHub, Miao et al., ICDE 2017, section 5): minimum storage, shortest
paths, LAST, PAS-MT, PAS-PT.

Every planner returns a :class:`~gpupas.plan.graph.Plan`. MST is a minimum-cost arborescence by
storage (:mod:`gpupas.plan.arborescence`), SPT Dijkstra's shortest-path tree by recreation
(networkx; ties go to the shortest-path tree that stores least), LAST Khuller-Raghavachari-Young's tree on
directed edges. The two PAS planners meet per-group budgets:

* **PAS-MT** starts from the MST and, while a group is over budget, re-parents the vertex (onto a
  vertex outside its subtree) with the best ratio of recreation gained by violated groups to
  storage added. Candidates are ranked by an upper bound of the gain and re-checked exactly
  before a move (lazy greedy); moves on disjoint subtrees are taken in one batch. Where no move
  gains, the vertex on a violated member's shortest path that lies above its shortest distance
  moves to its SPT parent, which never raises anyone's recreation: so wherever the SPT meets a
  budget, PAS-MT ends meeting it. Where a chain limit leaves it stuck (the shortest paths are too deep), it
  starts again from the shortest paths of fewest links, then puts over-budget vertices on their fastest chains
  within the limit.
* **PAS-PT** grows a tree from the root Prim-style by storage, accepting an edge only if every
  group of the new vertex can still meet its budget (members not yet in the tree counted at their
  shortest distance), and re-parents tree vertices onto the new one where that stores less and
  recreates no slower; what cannot be added is stored whole and repaired as in PAS-MT.

Both end with a pass that re-parents vertices where that stores less and keeps every budget (an
addition to the paper). A plan never exceeds a budget it reports as met: a group that no plan can
meet (its budget is below its SPT recreation, or needs chains longer than ``max_depth``) is
reported in ``Plan.violations`` with the reason.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from gpupas.plan.arborescence import min_arborescence
from gpupas.plan.graph import ROOT, SCHEMES, Plan, StorageGraph, Vertex, Violation, budgets_from, evaluate, over

EPS = 1e-12
INF = math.inf


class Problem:
    """A storage graph compiled to integer vertices (0 is the root), with groups, budgets, and at most
    ``max_depth`` delta links below any vertex."""

    def __init__(self, graph: StorageGraph, scheme: str = "independent", budgets: Mapping[Any, float] | None = None,
                 max_depth: int | None = None):
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, not {scheme!r}")
        self.graph, self.scheme = graph, scheme
        self.names: list[Vertex] = [ROOT, *graph.edges]
        self.index = {v: i for i, v in enumerate(self.names)}
        n = self.n = len(self.names)
        self.ins: list[dict[int, tuple[float, float]]] = [{} for _ in range(n)]
        self.outs: list[list[tuple[int, float, float]]] = [[] for _ in range(n)]
        for dst, ins in graph.edges.items():
            v = self.index[dst]
            for src, e in ins.items():
                u = self.index[src]
                self.ins[v][u] = (e.storage, e.recreation)
                self.outs[u].append((v, e.storage, e.recreation))
        groups = graph.group_list()
        self.gnames = list(groups)
        self.members = [[self.index[v] for v in groups[g]] for g in self.gnames]
        self.vgroups: list[list[int]] = [[] for _ in range(n)]
        for gi, ms in enumerate(self.members):
            for v in ms:
                self.vgroups[v].append(gi)
        b = dict(budgets or {})
        self.theta = [float(b.get(g, INF)) for g in self.gnames]
        self.max_depth = max_depth + 1 if max_depth is not None else n  # in tree edges from the root
        self._spt: tuple[list[float], list[int]] | None = None

    @property
    def independent(self) -> bool:
        return self.scheme == "independent"

    def spt(self) -> tuple[list[float], list[int]]:
        """Shortest recreation of each vertex from the root, and its parent on a shortest path (ties:
        the shortest-path tree that stores least), by networkx's Dijkstra."""
        if self._spt is None:
            import networkx as nx

            g = nx.DiGraph()
            g.add_nodes_from(range(self.n))
            for v in range(1, self.n):
                for u, (_, cr) in self.ins[v].items():
                    g.add_edge(u, v, w=cr)
            preds, dist = nx.dijkstra_predecessor_and_distance(g, 0, weight="w")
            d = [dist.get(v, INF) for v in range(self.n)]
            for v in range(1, self.n):
                if v not in dist:
                    raise ValueError(f"vertex {self.names[v]!r} cannot be reached from the root")
            # every tree of shortest-path edges is a shortest-path tree; the cheapest to store of them (each vertex's
            # cheapest predecessor alone can close a cycle where edges recreate in 0 s)
            tight = [(u, v, self.ins[v][u][0]) for v in range(1, self.n) for u in preds[v]]
            chosen = min_arborescence(self.n, 0, tight)
            par = [-1] + [tight[chosen[v]][0] for v in range(1, self.n)]
            self._spt = d, par
        return self._spt

    def least(self) -> list[float]:
        """Each vertex's least recreation in any plan: its shortest distance, over paths of at most
        ``max_depth`` edges where chains are limited (Bellman-Ford by rounds; a plan's chains are such paths)."""
        d, _ = self.spt()
        if self.max_depth >= self.n - 1:
            return d
        return [x for x, _ in _layers(self)[-1]]

    def vertex_bound(self) -> list[float]:
        """Each vertex's own share of its groups' budgets (LAST works per vertex): its shortest
        distance scaled as its group's budget scales the group's SPT cost; parallel: the budget."""
        d, _ = self.spt()
        out = [INF] * self.n
        for gi, ms in enumerate(self.members):
            t = self.theta[gi]
            if t == INF:
                continue
            spt_cost = sum(d[v] for v in ms) if self.independent else max((d[v] for v in ms), default=0.0)
            for v in ms:
                share = t if not self.independent else (t * d[v] / spt_cost if spt_cost > 0 else t)
                out[v] = min(out[v], share)
        return out

    def plan(self, name: str, parent: list[int], seconds: float, extra: list[Violation] | None = None) -> Plan:
        names = self.names
        budgets = {g: t for g, t in zip(self.gnames, self.theta) if t < INF}
        p = evaluate(self.graph, {names[v]: names[parent[v]] for v in range(1, self.n)}, name, self.scheme,
                     budgets or None)
        p.seconds = seconds
        if p.violations:
            why = {str(v.group): v.reason for v in (extra or [])}
            for v in p.violations:
                v.reason = why.get(str(v.group), "the planner found no re-parenting that meets it")
        deep = [v for v in range(1, self.n) if p.depth[names[v]] + 1 > self.max_depth]
        if deep:
            p.violations.append(Violation(f"chain of {names[deep[0]]!r}", p.depth[names[deep[0]]], self.max_depth - 1,
                                          f"{len(deep)} snapshot(s) deeper than {self.max_depth - 1} links", "links"))
        return p


class Tree:
    """A spanning tree being changed: parents, children, and (after :meth:`recompute`) each vertex's
    recreation ``r``, depth, subtree height and DFS interval."""

    def __init__(self, pb: Problem, parent: list[int]):
        self.pb = pb
        self.parent = list(parent)
        self.children: list[list[int]] = [[] for _ in range(pb.n)]
        for v in range(1, pb.n):
            self.children[self.parent[v]].append(v)
        self.recompute()

    def cs(self, v: int) -> float:
        return self.pb.ins[v][self.parent[v]][0]

    def recompute(self) -> None:
        n = self.pb.n
        self.r, self.depth, self.height = [0.0] * n, [0] * n, [0] * n
        self.tin, self.tout = [0] * n, [0] * n
        order: list[int] = []
        stack = [0]
        while stack:
            x = stack.pop()
            self.tin[x] = len(order)
            order.append(x)
            for c in self.children[x]:
                self.r[c] = self.r[x] + self.pb.ins[c][x][1]
                self.depth[c] = self.depth[x] + 1
                stack.append(c)
        if len(order) != n:
            raise ValueError("the tree does not reach every vertex (a cycle)")
        for x in reversed(order):
            end = self.tin[x] + 1
            for c in self.children[x]:
                end = max(end, self.tout[c])
                self.height[x] = max(self.height[x], self.height[c] + 1)
            self.tout[x] = end
        self.order = order

    def inside(self, u: int, x: int) -> bool:
        """Whether ``u`` lies in the subtree of ``x`` (as of the last recompute)."""
        return self.tin[x] <= self.tin[u] < self.tout[x]

    def subtree(self, x: int) -> list[int]:
        out, stack = [], [x]
        while stack:
            y = stack.pop()
            out.append(y)
            stack.extend(self.children[y])
        return out

    def ancestors(self, x: int) -> list[int]:
        out = []
        while x != 0:
            x = self.parent[x]
            out.append(x)
        return out

    def move(self, x: int, u: int) -> None:
        self.children[self.parent[x]].remove(x)
        self.children[u].append(x)
        self.parent[x] = u

    def costs(self) -> list[float]:
        pb, r = self.pb, self.r
        if pb.independent:
            return [sum(r[v] for v in ms) for ms in pb.members]
        return [max((r[v] for v in ms), default=0.0) for ms in pb.members]


# -- baselines -------------------------------------------------------------------------------------------------
def _mst_parent(pb: Problem) -> list[int]:
    edges = [(u, v, cs) for v in range(1, pb.n) for u, (cs, _) in pb.ins[v].items()]
    chosen = min_arborescence(pb.n, 0, edges)
    return [-1] + [edges[chosen[v]][0] for v in range(1, pb.n)]


def _timed(fn: Callable[..., tuple[list[int], list[Violation]]]) -> Callable[..., Plan]:
    def run(pb: Problem, *args: Any) -> Plan:
        t0 = time.perf_counter()
        parent, why = fn(pb, *args)
        return pb.plan(fn.__name__.strip("_").replace("_", "-"), parent, time.perf_counter() - t0, why)

    run.__name__ = fn.__name__.strip("_")
    run.__doc__ = fn.__doc__
    return run


@_timed
def _materialized(pb: Problem) -> tuple[list[int], list[Violation]]:
    """Every vertex stored whole."""
    return [-1] + [0] * (pb.n - 1), []


@_timed
def _mst(pb: Problem) -> tuple[list[int], list[Violation]]:
    """Least storage (budgets ignored)."""
    return _mst_parent(pb), []


@_timed
def _spt(pb: Problem) -> tuple[list[int], list[Violation]]:
    """Least recreation for every vertex (budgets ignored)."""
    return pb.spt()[1], []


@_timed
def _last(pb: Problem) -> tuple[list[int], list[Violation]]:
    """LAST: walk the MST depth first, relaxing its edges (both ways where the graph has both); a
    vertex reached over its bound (its share of the budget) gets its shortest path added."""
    return _last_parent(pb), []


def _last_parent(pb: Problem) -> list[int]:
    d_s, spt_par = pb.spt()
    bound = pb.vertex_bound()
    mst = _mst_parent(pb)
    kids: list[list[int]] = [[] for _ in range(pb.n)]
    for v in range(1, pb.n):
        kids[mst[v]].append(v)
    d = [INF] * pb.n
    d[0] = 0.0
    par = [-1] * pb.n

    def relax(u: int, v: int) -> None:
        e = pb.ins[v].get(u)
        if e is not None and d[u] + e[1] < d[v] * (1 - 1e-12):
            d[v], par[v] = d[u] + e[1], u

    def add_path(v: int) -> None:
        path = []
        while v != 0 and d[v] > d_s[v] * (1 + 1e-12):
            path.append(v)
            v = spt_par[v]
        for x in reversed(path):
            relax(spt_par[x], x)

    stack: list[tuple[int, int]] = [(0, 0)]
    while stack:
        v, i = stack.pop()
        if i == 0 and v != 0 and over(d[v], bound[v]):
            add_path(v)
        if i < len(kids[v]):
            c = kids[v][i]
            stack.append((v, i + 1))
            relax(v, c)
            stack.append((c, 0))
        elif v != 0:
            relax(v, mst[v])  # back up the MST edge, reversed
    return par


# -- PAS -------------------------------------------------------------------------------------------------------
def _infeasible(pb: Problem) -> tuple[set[int], list[Violation]]:
    """Groups no plan can meet: their budget is below their recreation under the SPT, or below the least
    recreation its members can have with chains of at most ``max_depth`` links."""
    d_s, _ = pb.spt()
    lb = pb.least()
    agg = sum if pb.independent else (lambda xs: max(xs, default=0.0))
    bad, why = set(), []
    for gi, ms in enumerate(pb.members):
        least = agg([d_s[v] for v in ms])
        if over(least, pb.theta[gi]):
            bad.add(gi)
            why.append(Violation(pb.gnames[gi], least, pb.theta[gi],
                                 f"no plan can meet it: even the shortest-path tree takes {least:.4g} s"))
            continue
        least = agg([lb[v] for v in ms])
        if over(least, pb.theta[gi]):
            bad.add(gi)
            links = pb.max_depth - 1
            why.append(Violation(pb.gnames[gi], least, pb.theta[gi],
                                 f"no plan with chains of at most {links} link{'s' * (links != 1)} can meet it: "
                                 f"the fastest such chains take {least:.4g} s"))
    return bad, why


def _units(pb: Problem, t: Tree, cost: list[float], skip: set[int]) -> tuple[dict[int, float], list[float]]:
    """What is over budget now: independent, each violated group's excess (by group); parallel,
    each over-budget vertex's excess (by vertex). And the weight of each vertex in the ranking bound."""
    weight = [0.0] * pb.n
    excess: dict[int, float] = {}
    if pb.independent:
        for gi, c in enumerate(cost):
            if gi not in skip and over(c, pb.theta[gi]):
                excess[gi] = c - pb.theta[gi]
                for v in pb.members[gi]:
                    weight[v] += 1
    else:
        theta_v = _theta_v(pb)
        for v in range(1, pb.n):
            if over(t.r[v], theta_v[v]) and not all(g in skip for g in pb.vgroups[v]):
                excess[v] = t.r[v] - theta_v[v]
                weight[v] = 1
    for x in reversed(t.order):  # subtree sums
        if x:
            weight[t.parent[x]] += weight[x]
    return excess, weight


def _theta_v(pb: Problem) -> list[float]:
    out = [INF] * pb.n
    for gi, ms in enumerate(pb.members):
        for v in ms:
            out[v] = min(out[v], pb.theta[gi])
    return out


def _gain(pb: Problem, t: Tree, x: int, delta: float, excess: dict[int, float]) -> tuple[float, dict[int, float]]:
    """Exact recreation gained over what is over budget by moving ``x`` (its subtree changes by
    ``delta`` < 0), capped at each excess; and the change to each excess."""
    change: dict[int, float] = {}
    sub = t.subtree(x)
    if pb.independent:
        for w in sub:
            for g in pb.vgroups[w]:
                if g in excess:
                    change[g] = change.get(g, 0.0) + delta
    else:
        for w in sub:
            if w in excess:
                change[w] = delta
    gain = sum(min(excess[k], -c) for k, c in change.items())
    return gain, change


def _repair(pb: Problem, t: Tree, skip: set[int]) -> None:
    """PAS-MT's loop: re-parent until every group not in ``skip`` meets its budget, or stuck."""
    d_s, spt_par = pb.spt()
    while True:
        t.recompute()
        cost = t.costs()
        excess, weight = _units(pb, t, cost, skip)
        if not excess:
            return
        heap: list[tuple[float, float, int, int, float]] = []
        for x in range(1, pb.n):
            if weight[x] <= 0:
                continue
            p, rx, room = t.parent[x], t.r[x], pb.max_depth - 1 - t.height[x]
            cs_now = pb.ins[x][p][0]
            for u, (cs, cr) in pb.ins[x].items():
                if u == p or t.depth[u] > room or (u and t.inside(u, x)):
                    continue
                delta = t.r[u] + cr - rx
                if delta >= -EPS * max(1.0, rx):
                    continue
                heap.append((-_score(-delta * weight[x], cs - cs_now), delta, x, u, cs - cs_now))
        heapq.heapify(heap)
        dirty: set[int] = set()
        moved = 0
        while heap and excess:
            _, delta, x, u, inc = heapq.heappop(heap)
            if x in dirty or u in dirty:
                continue
            gain, change = _gain(pb, t, x, delta, excess)
            if gain <= EPS:
                continue
            score = _score(gain, inc)
            if heap and score < -heap[0][0] * (1 - 1e-12):
                heapq.heappush(heap, (-score, delta, x, u, inc))  # the bound was too high: rank it again
                continue
            dirty.update(t.subtree(x), t.ancestors(x), t.ancestors(u), (u,))
            dirty.discard(0)
            t.move(x, u)
            moved += 1
            for k, c in change.items():
                excess[k] += c
                if excess[k] <= EPS:
                    del excess[k]
        if moved:
            continue
        if not _spt_step(pb, t, excess, d_s, spt_par):
            return  # stuck: the violations are reported


def _score(gain: float, inc: float) -> float:
    """Gain per byte added; moves that add no storage rank first (by gain)."""
    return 1e300 + gain if inc <= EPS else gain / inc


def _spt_step(pb: Problem, t: Tree, excess: dict[int, float], d_s: list[float], spt_par: list[int]) -> bool:
    """Move one vertex onto its SPT parent, on the shortest path of an over-budget vertex: the first
    vertex of that path above its shortest distance (raises nobody's recreation). False if none can."""
    members = ([w for g in excess for w in pb.members[g]] if pb.independent else list(excess))
    for w in members:
        if t.r[w] <= d_s[w] * (1 + 1e-12) + EPS:
            continue
        path = []
        x = w
        while x != 0:
            path.append(x)
            x = spt_par[x]
        for x in reversed(path):
            if t.r[x] > d_s[x] * (1 + 1e-12) + EPS:
                u = spt_par[x]
                if u != t.parent[x] and t.depth[u] + 1 + t.height[x] <= pb.max_depth and not (u and t.inside(u, x)):
                    t.move(x, u)
                    return True
                break
    return False


def _tighten(pb: Problem, t: Tree, passes: int = 4) -> None:
    """Re-parent vertices where that stores less and every budget still holds (never breaks one that
    holds, never worsens one that does not)."""
    theta_v = None if pb.independent else _theta_v(pb)
    for _ in range(passes):
        t.recompute()
        cost = t.costs()
        slack = [th - c for th, c in zip(pb.theta, cost)]
        heap = []
        for x in range(1, pb.n):
            now = pb.ins[x][t.parent[x]][0]
            for u, (cs, _) in pb.ins[x].items():
                if cs < now - 1e-9 * max(1.0, now):
                    heap.append((cs - now, x, u))
        heapq.heapify(heap)
        dirty: set[int] = set()
        moved = 0
        while heap:
            _, x, u = heapq.heappop(heap)
            if x in dirty or u in dirty or u == t.parent[x] or (u and t.inside(u, x)):
                continue
            if t.depth[u] + 1 + t.height[x] > pb.max_depth:
                continue
            delta = t.r[u] + pb.ins[x][u][1] - t.r[x]
            sub = t.subtree(x)
            if delta > 0:
                if pb.independent:
                    add: dict[int, float] = {}
                    for w in sub:
                        for g in pb.vgroups[w]:
                            add[g] = add.get(g, 0.0) + delta
                    if any(a > slack[g] + EPS * max(1.0, pb.theta[g]) for g, a in add.items()):
                        continue
                    for g, a in add.items():
                        slack[g] -= a
                elif any(over(t.r[w] + delta, theta_v[w]) for w in sub):  # type: ignore[index]
                    continue
            dirty.update(sub, t.ancestors(x), t.ancestors(u), (u,))
            dirty.discard(0)
            t.move(x, u)
            moved += 1
        if not moved:
            break
    t.recompute()


@_timed
def _pas_mt(pb: Problem) -> tuple[list[int], list[Violation]]:
    """PAS-MT: the MST, repaired until every budget holds, then tightened; LAST's tree, tightened the same
    way, where that meets the budgets and stores less (both are heuristics, and on some graphs LAST's
    walk finds the better start)."""
    skip, why = _infeasible(pb)
    t = _fitted(pb, _mst_parent(pb), skip)
    alt = _fitted(pb, _last_parent(pb), skip)
    if _meets(pb, alt, skip) and (not _meets(pb, t, skip) or _stored(pb, alt) < _stored(pb, t) * (1 - 1e-12)):
        t = alt
    if not _meets(pb, t, skip):  # stuck under a chain limit: start again from the shortest paths of fewest links
        alt = _fitted(pb, _fewest_links_spt(pb), skip)
        alt = alt if _meets(pb, alt, skip) else _forced(pb, alt, skip)
        t = alt if _meets(pb, alt, skip) else t
    return t.parent, why


def _forced(pb: Problem, t: Tree, skip: set[int]) -> Tree:
    """Put every over-budget vertex on its fastest chain within ``max_depth`` links (which may slow others
    down), then fit the tree again: a last resort where repair is stuck because every faster chain is too deep."""
    layers = _layers(pb)
    excess, _ = _units(pb, t, t.costs(), skip)
    over_v = [w for g in excess for w in pb.members[g]] if pb.independent else list(excess)
    for w in over_v:
        path: list[tuple[int, int]] = []
        x, k = w, len(layers) - 1
        while x != 0:
            while k > 0 and layers[k - 1][x] == layers[k][x]:
                k -= 1
            if k == 0:  # no chain within the limit reaches it
                path = []
                break
            path.append((x, layers[k][x][1]))
            x, k = layers[k][x][1], k - 1
        t.recompute()
        for x, u in reversed(path):
            if u != t.parent[x] and not (u and t.inside(u, x)):
                t.move(x, u)
                t.recompute()
    _limit_depth(pb, t)
    _repair(pb, t, skip)
    _tighten(pb, t)
    return t


def _layers(pb: Problem) -> list[list[tuple[float, int]]]:
    """Bellman-Ford by rounds: ``[k][v]``, the least recreation of ``v`` over chains of at most ``k`` links and
    the parent on such a chain."""
    out = [[(0.0, -1)] + [(INF, -1)] * (pb.n - 1)]
    for _ in range(min(pb.max_depth, pb.n - 1)):
        best = out[-1]
        nxt = list(best)
        for v in range(1, pb.n):
            for u, (_, cr) in pb.ins[v].items():
                if best[u][0] + cr < nxt[v][0]:
                    nxt[v] = (best[u][0] + cr, u)
        out.append(nxt)
    return out


def _fewest_links_spt(pb: Problem) -> list[int]:
    """A shortest-path tree whose paths have the fewest links among shortest ones (ties: the cheaper edge).
    Where 0-second edges tie, :meth:`Problem.spt` may take the longer chain and leave no room under
    ``max_depth`` for a vertex below it; repair cannot shorten it, as no move gains recreation."""
    best: list[tuple[float, int, float]] = [(0.0, 0, 0.0)] + [(INF, 0, INF)] * (pb.n - 1)
    parent = [-1] * pb.n
    heap, done = [(0.0, 0, 0)], [False] * pb.n
    while heap:
        _, _, u = heapq.heappop(heap)
        if done[u]:
            continue
        done[u] = True
        for v, cs, cr in pb.outs[u]:
            key = (best[u][0] + cr, best[u][1] + 1, cs)
            if not done[v] and key < best[v]:
                best[v], parent[v] = key, u
                heapq.heappush(heap, (key[0], key[1], v))
    return parent


def _fitted(pb: Problem, parent: list[int], skip: set[int]) -> Tree:
    """The tree of ``parent`` with its chains cut to the depth limit, repaired and tightened."""
    t = Tree(pb, parent)
    _limit_depth(pb, t)
    _repair(pb, t, skip)
    _tighten(pb, t)
    return t


def _meets(pb: Problem, t: Tree, skip: set[int]) -> bool:
    """Whether ``t`` meets every budget that can be met, within the depth limit."""
    return max(t.depth) <= pb.max_depth and all(
        g in skip or not over(c, th) for g, (c, th) in enumerate(zip(t.costs(), pb.theta)))


def _stored(pb: Problem, t: Tree) -> float:
    return sum(t.cs(v) for v in range(1, pb.n))


def _limit_depth(pb: Problem, t: Tree) -> None:
    """Re-parent the top of every chain deeper than ``max_depth`` onto the cheapest parent that fits."""
    for x in list(t.order):
        if x == 0 or t.depth[x] + 0 <= pb.max_depth:
            continue
        t.recompute()
        if t.depth[x] <= pb.max_depth:
            continue
        fits = [(cs, u) for u, (cs, _) in pb.ins[x].items()
                if t.depth[u] + 1 + t.height[x] <= pb.max_depth and not (u and t.inside(u, x))]
        t.move(x, min(fits)[1] if fits else 0)
    t.recompute()


@_timed
def _pas_pt(pb: Problem) -> tuple[list[int], list[Violation]]:
    """PAS-PT: Prim-style growth by storage under the budgets, then repaired and tightened."""
    skip, why = _infeasible(pb)
    d_s, _ = pb.spt()
    n = pb.n
    theta_v = _theta_v(pb)
    lb = [sum(d_s[v] for v in ms) for ms in pb.members]  # independent: members in the tree at r, others at d_s
    parent = [-1] * n
    kids: list[list[int]] = [[] for _ in range(n)]
    r, depth = [0.0] * n, [0] * n
    inside = [False] * n
    inside[0] = True
    heap = [(cs, v, 0) for v, cs, _ in pb.outs[0]]
    heapq.heapify(heap)

    def subtree(x: int) -> list[int]:
        out, stack = [], [x]
        while stack:
            y = stack.pop()
            out.append(y)
            stack.extend(kids[y])
        return out

    def fits(v: int, rv: float) -> bool:
        if pb.independent:
            return all(g in skip or not over(lb[g] - d_s[v] + rv, pb.theta[g]) for g in pb.vgroups[v])
        return not over(rv, theta_v[v]) or all(g in skip for g in pb.vgroups[v])

    while heap:
        _, v, u = heapq.heappop(heap)
        if inside[v] or depth[u] + 1 > pb.max_depth:
            continue
        rv = r[u] + pb.ins[v][u][1]
        if not fits(v, rv):
            continue
        parent[v], r[v], depth[v], inside[v] = u, rv, depth[u] + 1, True
        kids[u].append(v)
        for g in pb.vgroups[v]:
            lb[g] += rv - d_s[v]
        for w, cs, cr in pb.outs[v]:  # re-parent tree vertices onto v where that stores less, recreates no slower
            if not inside[w] or w == 0 or cs >= pb.ins[w][parent[w]][0] - 1e-9 or r[v] + cr > r[w] + EPS:
                continue
            x, up = v, False
            while x != 0:
                if x == w:
                    up = True
                    break
                x = parent[x]
            sub = subtree(w)
            if up or depth[v] + 1 + max(depth[y] for y in sub) - depth[w] > pb.max_depth:
                continue
            kids[parent[w]].remove(w)
            kids[v].append(w)
            parent[w] = v
            dr, dd = r[v] + cr - r[w], depth[v] + 1 - depth[w]
            for y in sub:
                r[y] += dr
                depth[y] += dd
                for g in pb.vgroups[y]:
                    lb[g] += dr
        for w, cs, _ in pb.outs[v]:
            if not inside[w]:
                heapq.heappush(heap, (cs, w, v))
    for v in range(1, n):
        if not inside[v]:
            parent[v] = 0  # stuck: stored whole, then repaired
    t = Tree(pb, parent)
    _limit_depth(pb, t)
    _repair(pb, t, skip)
    _tighten(pb, t)
    return t.parent, why


materialized, mst, spt, last, pas_mt, pas_pt = _materialized, _mst, _spt, _last, _pas_mt, _pas_pt
PLANNERS: dict[str, Callable[[Problem], Plan]] = {"materialized": materialized, "mst": mst, "spt": spt,
                                                  "last": last, "pas-mt": pas_mt, "pas-pt": pas_pt}


def plan_all(graph: StorageGraph, alpha: float | None = 2.0, *, scheme: str = "independent",
             absolute: Mapping[Any, float] | None = None, max_depth: int | None = None,
             planners: tuple[str, ...] = tuple(PLANNERS)) -> dict[str, Plan]:
    """Every planner's plan of ``graph`` under budgets ``alpha`` x each group's SPT recreation
    and/or ``absolute`` ones; plus ``"pas"``, the better (less storage, then less recreation) of
    PAS-MT and PAS-PT among those that meet every budget they can.

    >>> from gpupas.plan.graph import StorageGraph
    >>> g = StorageGraph()
    >>> for v in "abc":
    ...     g.add_vertex(v, 100, 1.0)
    >>> g.add_edge("a", "b", 30, 0.5); g.add_edge("b", "c", 30, 0.5)
    >>> plans = plan_all(g, alpha=1.6)
    >>> plans["mst"].storage, plans["spt"].storage, plans["pas"].storage
    (160.0, 300.0, 230.0)
    """
    base = Problem(graph, scheme, None, max_depth)
    spt_plan = spt(base)
    budgets = budgets_from(spt_plan, alpha, absolute)
    pb = Problem(graph, scheme, budgets, max_depth)
    pb._spt = base._spt
    out = {name: PLANNERS[name](pb) for name in planners}
    pas = [out[k] for k in ("pas-mt", "pas-pt") if k in out]
    if pas:
        best = min(pas, key=lambda p: (len(p.violations), p.storage, p.total_recreation))
        out["pas"] = best
    return out
