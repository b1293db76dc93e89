"""The storage graph (ModelHub, ICDE 2017, sec. 5): vertices to store, candidate edges, co-usage groups, budgets.

A vertex is something stored as one unit: a snapshot (``"sid"``) or one tensor of a snapshot
(``("sid", "name")``). The root :data:`ROOT` stands for "nothing": the edge ``ROOT -> v`` stores
``v`` whole, an edge ``u -> v`` stores ``v`` as a delta on ``u``. Each edge has a storage cost
(bytes) and a recreation cost (seconds of the calibrated model, :mod:`gpupas.plan.costs`) of
decoding ``v`` once ``u`` is decoded. A **plan** is a spanning tree rooted at :data:`ROOT`.

A co-usage group is a set of vertices restored together (a snapshot's tensors); its recreation
cost is the sum (scheme ``independent``) or the maximum (``parallel``) of its members' path costs.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpupas.errors import InvalidInputError

ROOT = ""  # never a snapshot id (ids are non-empty names)
Vertex = Hashable
SCHEMES: tuple[str, ...] = ("independent", "parallel")


@dataclass
class Edge:
    """Storing ``dst`` as a delta on ``src`` (``src == ROOT``: whole) costs ``storage`` bytes, and
    ``recreation`` seconds to decode once ``src`` is decoded; ``measured``: storage comes from a
    real encoding (else a sampled estimate)."""

    src: Vertex
    dst: Vertex
    storage: float
    recreation: float
    measured: bool = True


@dataclass
class StorageGraph:
    """Vertices, candidate edges (every vertex has its ``ROOT`` edge), and co-usage groups.

    ``groups``: group id -> its vertices (default: each vertex alone); ``raw``: raw bytes of each
    vertex; ``current``: the parent each vertex has in the archive now (for comparisons).
    """

    edges: dict[Vertex, dict[Vertex, Edge]] = field(default_factory=dict)  # dst -> src -> edge
    groups: dict[Any, list[Vertex]] = field(default_factory=dict)
    raw: dict[Vertex, int] = field(default_factory=dict)
    current: dict[Vertex, Vertex] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def vertices(self) -> list[Vertex]:
        return list(self.edges)

    def add_vertex(self, v: Vertex, whole_storage: float, whole_recreation: float, raw: int = 0,
                   measured: bool = True) -> None:
        if v == ROOT:
            raise ValueError("the root is not a vertex to store")
        self.edges.setdefault(v, {})[ROOT] = Edge(ROOT, v, float(whole_storage), float(whole_recreation), measured)
        self.raw[v] = int(raw)

    def add_edge(self, src: Vertex, dst: Vertex, storage: float, recreation: float, measured: bool = True) -> None:
        """A candidate: ``dst`` as a delta on ``src`` (both must be vertices already)."""
        if src not in self.edges or dst not in self.edges or src == dst:
            raise ValueError(f"edge {src!r} -> {dst!r}: both ends must be distinct vertices of the graph")
        self.edges[dst][src] = Edge(src, dst, float(storage), float(recreation), measured)

    def edge(self, src: Vertex, dst: Vertex) -> Edge:
        return self.edges[dst][src]

    def group_list(self) -> dict[Any, list[Vertex]]:
        """The co-usage groups; every vertex in none is a group of its own."""
        out = {g: list(vs) for g, vs in self.groups.items()}
        covered = {v for vs in out.values() for v in vs}
        for v in self.edges:
            if v not in covered:
                out[v] = [v]
        return out

    def to_networkx(self) -> Any:
        """A ``networkx.DiGraph`` with ``storage`` and ``recreation`` edge attributes, rooted at ROOT."""
        import networkx as nx

        g = nx.DiGraph()
        g.add_node(ROOT)
        for dst, ins in self.edges.items():
            for src, e in ins.items():
                g.add_edge(src, dst, storage=e.storage, recreation=e.recreation)
        return g

    def n_edges(self) -> int:
        return sum(len(x) for x in self.edges.values())


@dataclass
class Violation:
    """A group whose budget a plan does not meet, and why."""

    group: Any
    cost: float
    budget: float
    reason: str
    unit: str = "s"  # of cost and budget: seconds of recreation, or "links" of a delta chain

    def __str__(self) -> str:
        if self.unit == "links":
            return f"{self.group}: {self.cost:g} links > at most {self.budget:g} ({self.reason})"
        return f"{self.group}: recreation {self.cost:.4g} s > budget {self.budget:.4g} s ({self.reason})"


@dataclass
class Plan:
    """A spanning tree of a storage graph: each vertex's parent (``ROOT``: stored whole)."""

    name: str
    parent: dict[Vertex, Vertex]
    storage: float
    recreation: dict[Any, float]  # per group
    depth: dict[Vertex, int]  # delta links below each vertex (0: stored whole), as ``Archive.depth``
    scheme: str = "independent"
    budgets: dict[Any, float] | None = None
    violations: list[Violation] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def feasible(self) -> bool:
        return not self.violations

    @property
    def total_recreation(self) -> float:
        return sum(self.recreation.values())

    @property
    def max_depth(self) -> int:
        return max(self.depth.values(), default=0)

    def summary(self) -> dict[str, Any]:
        return {"planner": self.name, "storage": self.storage, "recreation": self.total_recreation,
                "max_recreation": max(self.recreation.values(), default=0.0), "max_depth": self.max_depth,
                "violations": [str(v) for v in self.violations], "seconds": self.seconds}


def evaluate(graph: StorageGraph, parent: Mapping[Vertex, Vertex], name: str = "plan",
             scheme: str = "independent", budgets: Mapping[Any, float] | None = None) -> Plan:
    """Storage, per-group recreation and depths of the tree ``parent`` (checked to be one)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, not {scheme!r}")
    r: dict[Vertex, float] = {ROOT: 0.0}
    depth: dict[Vertex, int] = {ROOT: 0}
    storage = 0.0
    for v in graph.edges:
        if v not in parent:
            raise ValueError(f"the plan leaves {v!r} out")
        storage += graph.edges[v][parent[v]].storage
    for v in graph.edges:
        path = []
        x = v
        while x not in r:
            path.append(x)
            x = parent[x]
            if len(path) > len(graph.edges):
                raise ValueError(f"the plan has a cycle through {v!r}")
        for y in reversed(path):
            p = parent[y]
            r[y] = r[p] + graph.edges[y][p].recreation
            depth[y] = depth[p] + 1
    rec = group_costs(graph.group_list(), r, scheme)
    plan = Plan(name, dict(parent), storage, rec, {v: depth[v] - 1 for v in graph.edges}, scheme,
                None if budgets is None else dict(budgets))
    if budgets is not None:
        plan.violations = [Violation(g, rec[g], b, "over budget") for g, b in budgets.items() if over(rec[g], b)]
    return plan


def group_costs(groups: Mapping[Any, Sequence[Vertex]], r: Mapping[Vertex, float], scheme: str) -> dict[Any, float]:
    agg = sum if scheme == "independent" else (lambda xs: max(xs, default=0.0))
    return {g: float(agg([r[v] for v in vs])) for g, vs in groups.items()}


def over(cost: float, budget: float) -> bool:
    """``cost`` exceeds ``budget`` beyond rounding."""
    return cost > budget * (1 + 1e-9) + 1e-12


def budgets_from(spt: Plan, alpha: float | None = None,
                 absolute: Mapping[Any, float] | None = None) -> dict[Any, float]:
    """Per-group budgets: ``alpha`` x the group's recreation under the shortest-path tree, and/or
    absolute ones (seconds) for the groups named; where both apply, the smaller."""
    out: dict[Any, float] = {}
    if alpha is not None:
        if not alpha >= 1:  # NaN too: it compares false with every budget, which would drop them all
            raise InvalidInputError(f"alpha must be at least 1 (1: the shortest-path tree's recreation), not {alpha}")
        out = {g: alpha * c for g, c in spt.recreation.items()}
    for g, b in (absolute or {}).items():
        if math.isnan(float(b)):
            raise InvalidInputError(f"the recreation budget of {g} is NaN: give seconds (inf: no budget)")
        if float(b) < 0:  # no plan meets it: bad input, not a budget the planner failed
            raise InvalidInputError(f"the recreation budget of {g} is {float(b):g} s: give seconds, at least 0 "
                                    "(inf: no budget)")
        out[g] = min(out.get(g, float("inf")), float(b))
    return out
