"""Network definitions as a DAG of layers: nodes (name, type, attributes) and edges.

A network comes from a torch module (``torch.fx`` where the module traces, its module tree
otherwise) or, with no module at hand, from the names and shapes of a state_dict.

>>> import numpy as np
>>> net = network_from_state_dict({"conv1.weight": np.zeros((8, 1, 3, 3)), "fc.weight": np.zeros((10, 8))})
>>> [(n.name, n.type) for n in net.nodes]
[('conv1', 'Conv2d'), ('fc', 'Linear')]
>>> net.edges
[(0, 1)]

Every node also gets a ``kind`` (conv, pool, linear, norm, act, dropout, embedding, attention,
reshape, io, op, other) and a ``variant`` (max/avg for pools, relu/gelu for activations...):
the query language matches templates such as ``POOL("MAX")`` against them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_ACTIVATIONS = {
    "relu", "relu6", "leakyrelu", "leaky_relu", "gelu", "silu", "swish", "sigmoid", "tanh", "softmax",
    "log_softmax", "logsoftmax", "softplus", "elu", "selu", "celu", "mish", "hardswish", "hardsigmoid",
    "hardtanh", "prelu", "rrelu", "glu", "softsign", "tanhshrink", "threshold", "quickgelu", "newgelu",
}
_RESHAPES = {"flatten", "view", "reshape", "permute", "transpose", "squeeze", "unsqueeze", "contiguous",
             "unflatten", "getitem", "size", "getattr", "chunk", "split"}
_OPS = {"add", "sub", "mul", "truediv", "div", "matmul", "cat", "stack", "bmm", "einsum", "iadd", "mean", "sum"}
# kinds a data path passes through when the query language follows ``.next`` / ``.prev``:
# elementwise activations and dropout, like Caffe's in-place ReLU and Dropout layers
TRANSPARENT = frozenset({"act", "dropout"})


def classify(type_name: str) -> tuple[str, str | None]:
    """``(kind, variant)`` of a layer type name such as ``MaxPool2d``, ``relu`` or ``LayerNorm``.

    >>> classify("MaxPool2d"), classify("adaptive_avg_pool2d"), classify("ReLU")
    (('pool', 'max'), ('pool', 'avg'), ('act', 'relu'))
    """
    t = type_name.lower()
    bare = re.sub(r"[^a-z0-9_]", "", t).rstrip("_")
    if "pool" in t:
        for v in ("max", "avg", "lp"):
            if v in t:
                return "pool", v
        return "pool", None
    if "conv" in t:
        return "conv", ("transpose" if "transpose" in t else None)
    if "embedding" in t:
        return "embedding", None
    if "attention" in t:
        return "attention", None
    if "dropout" in t:
        return "dropout", None
    if "norm" in t:
        for v in ("batch", "layer", "group", "instance", "rms"):
            if v in t:
                return "norm", v
        return "norm", None
    if bare in _ACTIVATIONS or bare.replace("_", "") in _ACTIVATIONS:
        return "act", bare.replace("_", "")
    if "linear" in t or t in ("dense", "fc", "innerproduct"):
        return "linear", None
    if bare in ("input", "output", "placeholder"):
        return "io", bare
    if bare in _RESHAPES:
        return "reshape", bare
    if bare in _OPS:
        return "op", bare
    return "other", None


@dataclass
class Node:
    """One layer (or operation) of a network."""

    id: int
    name: str
    type: str
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return classify(self.type)[0]

    @property
    def variant(self) -> str | None:
        return classify(self.type)[1]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "type": self.type, "attrs": self.attrs}


@dataclass
class Network:
    """A DAG of layers. ``source`` says how it was made: fx, modules, state_dict or given."""

    nodes: list[Node] = field(default_factory=list)
    edges: list[tuple[int, int]] = field(default_factory=list)
    source: str = "given"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "nodes": [n.to_dict() for n in self.nodes],
                "edges": [list(e) for e in self.edges]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Network:
        """A network from its JSON form (``to_dict``); InvalidInputError if it is malformed."""
        from gpupas.errors import InvalidInputError

        if not d:
            return cls(source="none")
        try:
            nodes = [Node(int(n["id"]), str(n["name"]), str(n["type"]), dict(n.get("attrs") or {}))
                     for n in d["nodes"]]
            edges = [(int(a), int(b)) for a, b in d.get("edges", [])]
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"network definition is malformed ({exc!r}); expected "
                                    '{"nodes": [{"id", "name", "type", "attrs"}], "edges": [[from, to]]}') from None
        ids = {n.id for n in nodes}
        if len(ids) != len(nodes) or any(a not in ids or b not in ids for a, b in edges):
            raise InvalidInputError("network definition is malformed: node ids repeat or edges name unknown nodes")
        return cls(nodes, edges, str(d.get("source", "given")))

    def __len__(self) -> int:
        return len(self.nodes)

    def successors(self, transparent: frozenset[str] = frozenset()) -> dict[int, list[int]]:
        """Successor ids of every node: its direct successors, and the nodes reached through
        successors whose kind is in ``transparent``."""
        direct: dict[int, list[int]] = {n.id: [] for n in self.nodes}
        for a, b in self.edges:
            direct[a].append(b)
        if not transparent:
            return direct
        kinds = {n.id: n.kind for n in self.nodes}
        out: dict[int, list[int]] = {}
        for n in self.nodes:
            seen: set[int] = set()
            found: list[int] = []
            stack = list(direct[n.id])
            while stack:
                x = stack.pop(0)
                if x in seen:
                    continue
                seen.add(x)
                found.append(x)
                if kinds[x] in transparent:
                    stack.extend(direct[x])
            out[n.id] = found
        return out

    def flow_edges(self) -> list[tuple[int, int]]:
        """Edges as the query language's ``.next`` sees them: direct ones, plus ones that pass
        through activations and dropout (``conv -> relu -> pool`` gives conv->relu, conv->pool)."""
        return [(a, b) for a, bs in self.successors(TRANSPARENT).items() for b in bs]


# -- from a state_dict ------------------------------------------------------------------------
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _guess_type(prefix: str, params: dict[str, tuple[int, ...]]) -> tuple[str, dict[str, Any]]:
    low = prefix.lower()
    w = params.get("weight")
    attrs: dict[str, Any] = {}
    if any(k in params for k in _BN_BUFFERS):
        t = "BatchNorm"
        if "running_mean" in params:
            attrs["num_features"] = params["running_mean"][0] if params["running_mean"] else 0
        return t, attrs
    if w is None:
        return "Parameters", attrs
    if len(w) >= 3:
        dims = len(w) - 2
        attrs = {"out_channels": w[0], "in_channels": w[1], "kernel_size": list(w[2:])}
        return f"Conv{dims}d", attrs
    if len(w) == 2:
        if "embed" in low and "bias" not in params:
            return "Embedding", {"num_embeddings": w[0], "embedding_dim": w[1]}
        return "Linear", {"in_features": w[1], "out_features": w[0]}
    if len(w) == 1:
        if "ln" in low.split(".")[-1] or "norm" in low or "layernorm" in low:
            return "LayerNorm", {"normalized_shape": w[0]}
        return "Scale", {"features": w[0]}
    return "Parameters", attrs


def network_from_state_dict(tensors: Mapping[str, Any]) -> Network:
    """A network guessed from state_dict names and shapes: one node per module prefix.

    Types come from the parameters: a 4-D ``weight`` is a Conv2d, a 2-D one a Linear (an
    Embedding where the name says so), running statistics make a BatchNorm, a 1-D weight under a
    ``norm``/``ln`` name a LayerNorm. Edges follow the order of appearance (a chain): layers
    without parameters (activations, pooling) cannot be seen from weights alone.
    """
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, value in tensors.items():
        shape = tuple(int(s) for s in (value if isinstance(value, (tuple, list)) else getattr(value, "shape", ())))
        prefix, _, leaf = name.rpartition(".")
        groups.setdefault(prefix or name, {})[leaf if prefix else "weight"] = shape
    nodes = []
    for i, (prefix, params) in enumerate(groups.items()):
        t, attrs = _guess_type(prefix, params)
        attrs["params"] = {k: list(v) for k, v in params.items()}
        nodes.append(Node(i, prefix, t, attrs))
    return Network(nodes, [(i, i + 1) for i in range(len(nodes) - 1)], "state_dict")


# -- from a torch module ----------------------------------------------------------------------
def _jsonable(v: Any) -> Any:
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return str(v)


def _module_attrs(module: Any) -> dict[str, Any]:
    attrs = {k: _jsonable(getattr(module, k)) for k in getattr(module, "__constants__", ()) if hasattr(module, k)}
    params = {k: list(p.shape) for k, p in module.named_parameters(recurse=False)}
    params |= {k: list(b.shape) for k, b in module.named_buffers(recurse=False) if b is not None}
    if params:
        attrs["params"] = params
    return attrs


def network_from_module(module: Any) -> Network:
    """The DAG of a torch ``nn.Module``: its ``torch.fx`` graph, or its leaf modules in order.

    fx nodes that call a submodule are named after it (``features.0``, ``conv1``) and typed by
    its class (``Conv2d``); function calls are typed by the function (``relu``, ``max_pool2d``).
    Where tracing fails (data-dependent control flow), the leaf modules form a chain in
    registration order (``source == "modules"``).
    """
    try:
        import torch.fx as fx
    except ImportError as exc:  # pragma: no cover - torch is optional
        from gpupas.errors import BackendUnavailableError

        raise BackendUnavailableError("extracting a network from a module needs torch: "
                                      "pip install 'gpupas[torch]'") from exc
    module = _unwrapped(module)
    modules = dict(module.named_modules())
    try:
        graph = fx.symbolic_trace(module).graph
    except Exception:  # fx raises many types on untraceable code: fall back to the module tree
        leaves = [(n, m) for n, m in modules.items() if n and not any(True for _ in m.children())]
        nodes = [Node(i, n, type(m).__name__, _module_attrs(m)) for i, (n, m) in enumerate(leaves)]
        return Network(nodes, [(i, i + 1) for i in range(len(nodes) - 1)], "modules")
    nodes, ids = [], {}
    for node in graph.nodes:
        attrs: dict[str, Any] = {}
        if node.op == "call_module":
            name, sub = str(node.target), modules[str(node.target)]
            t, attrs = type(sub).__name__, _module_attrs(sub)
        elif node.op == "call_function":
            name = node.name
            t = getattr(node.target, "__name__", str(node.target)).strip("_")
        elif node.op == "call_method":
            name, t = node.name, str(node.target)
        elif node.op == "placeholder":
            name, t = node.name, "input"
        elif node.op == "output":
            name, t = node.name, "output"
        else:  # get_attr
            name, t = str(node.target), "parameter"
        if node.op in ("call_function", "call_method"):
            consts = {k: _jsonable(v) for k, v in node.kwargs.items() if not isinstance(v, fx.Node)}
            args = [_jsonable(v) for v in node.args if not isinstance(v, (fx.Node, tuple, list))]
            if args:
                attrs["args"] = args
            if consts:
                attrs["kwargs"] = consts
        ids[node] = len(nodes)
        nodes.append(Node(len(nodes), name, t, attrs))
    edges = [(ids[src], ids[node]) for node in graph.nodes for src in node.all_input_nodes]
    return Network(nodes, edges, "fx")


def _unwrapped(module: Any) -> Any:
    """The model inside torch.compile's and (Distributed)DataParallel's wrappers, its layers named as its
    tensors are once those wrappers' prefixes are taken off (:mod:`gpupas.tensors`)."""
    while True:
        inner = getattr(module, "_orig_mod", None)  # torch.compile's OptimizedModule
        if inner is None and type(module).__name__ in ("DistributedDataParallel", "DataParallel"):
            inner = getattr(module, "module", None)
        if inner is None:
            return module
        module = inner


def extract_network(obj: Any) -> Network:
    """A Network from a torch module, a state_dict (names -> arrays or shapes), a dict or a Network."""
    if obj is None:
        return Network(source="none")
    if isinstance(obj, Network):
        return obj
    if type(obj).__module__.startswith("torch") or hasattr(obj, "named_modules"):
        return network_from_module(obj)
    if isinstance(obj, Mapping) and "nodes" in obj:
        return Network.from_dict(obj)
    if isinstance(obj, Mapping):
        return network_from_state_dict(obj)
    from gpupas.errors import InvalidInputError

    raise InvalidInputError(f"cannot make a network definition from a {type(obj).__name__}; give a torch "
                            "module, a state_dict or a network dict")


def _unique_names(net: Network) -> dict[int, str]:
    """Node id -> its name, the k-th use of a name used again (a module called twice: a traced ResNet's relu)
    as ``name#k``."""
    seen: dict[str, int] = {}
    out = {}
    for n in net.nodes:
        seen[n.name] = k = seen.get(n.name, 0) + 1
        out[n.id] = n.name if k == 1 else f"{n.name}#{k}"
    return out


def diff_networks(a: Network, b: Network) -> dict[str, Any]:
    """Layers added, removed and changed (type or attributes) from ``a`` to ``b``, edges by name (a name used
    again counted by its uses: ``relu#2``)."""
    ia, ib = _unique_names(a), _unique_names(b)
    na, nb = {ia[n.id]: n for n in a.nodes}, {ib[n.id]: n for n in b.nodes}
    changed = []
    for name in na.keys() & nb.keys():
        x, y = na[name], nb[name]
        if x.type != y.type or x.attrs != y.attrs:
            keys = sorted(set(x.attrs) | set(y.attrs))
            changed.append({"name": name, "type": [x.type, y.type] if x.type != y.type else x.type,
                            "attrs": {k: [x.attrs.get(k), y.attrs.get(k)] for k in keys
                                      if x.attrs.get(k) != y.attrs.get(k)}})
    order = {k: i for i, k in enumerate(nb)} | {k: -1 for k in na if k not in nb}
    ea = {(ia[s], ia[t]) for s, t in a.edges}
    eb = {(ib[s], ib[t]) for s, t in b.edges}
    return {
        "added": [{"name": k, "type": n.type} for k, n in nb.items() if k not in na],
        "removed": [{"name": k, "type": n.type} for k, n in na.items() if k not in nb],
        "changed": sorted(changed, key=lambda c: order.get(c["name"], 0)),
        "edges_added": sorted([list(e) for e in eb - ea]),
        "edges_removed": sorted([list(e) for e in ea - eb]),
    }
