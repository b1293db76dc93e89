"""Progressive evaluation of a PyTorch classifier from a snapshot's highest byte planes (ModelHub, ICDE 2017, sec. 4).

:func:`evaluate_progressive` reads the top plane of every weight (guaranteed bounds, see
:mod:`gpupas.engine.partial`), propagates intervals through the network for every input, decides
each input's top-1 label (or top-k set) where the logits' intervals separate it, and reads the next
plane only for the inputs still undecided; at the last plane the weights are exact and the
remaining inputs run through the model itself. Labels therefore always equal full-precision
inference (``check=True`` asserts it).

Supported (traced with :func:`torch.fx.symbolic_trace`): Linear, Conv1d/2d, BatchNorm1d/2d in eval
mode, ReLU and other monotone activations (ReLU6, Hardtanh, LeakyReLU, ELU, Sigmoid, Tanh,
Hardsigmoid), Softplus (any threshold), max and average pooling (adaptive too), flatten/view/reshape,
residual adds (and subtraction, scaling by a constant, concatenation), Dropout and Identity. Anything
else is refused before anything is read, naming the operation.

Soundness: intervals are propagated in float64 in center-radius form, every layer widened by a bound on
the rounding error of the reference computation (IEEE arithmetic at the weights' precision, with
subnormals: ``gamma_n = 1.01 (n + 2)(u + 4 * 2^-53)`` times ``|W| |x|`` plus ``n eta`` for a dot product
of ``n`` terms, ``u`` the unit roundoff and ``eta`` the smallest subnormal; 16 ulps for library
activations, ``(32 + 2 |beta x|) u`` for softplus) and of the float64 propagation itself. Where the
reference may overflow (some partial sum's magnitude can reach the format's largest finite value), or an
input or weight is unbounded, the value is unknown from there on (NaN ends inside, so that no later
activation bounds it again; -Inf and Inf at the outputs) and decides nothing: such inputs are labelled
by the model at the last plane, Inf and NaN logits included. That holds for ordinary CPU kernels without
flush-to-zero (``torch.set_flush_denormal(True)`` is not covered); on CUDA turn TF32 off
(``torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False``). """

from __future__ import annotations

import math
import operator
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from gpupas.errors import InvalidInputError, TensorNotFoundError

U64 = 2.0**-53
TINY = 2.0**-120  # absolute slack for library functions: results near underflow (flushed or subnormal)
SUPPORTED = ("Linear, Conv1d/2d, BatchNorm (eval), ReLU and other monotone activations, max/avg pooling, "
             "flatten/view/reshape and residual adds")


# -- intervals -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    """The reference computation's floating-point format: unit roundoff ``u``, smallest subnormal ``eta``,
    largest finite value ``big``."""

    u: float
    eta: float
    big: float

    @classmethod
    def of(cls, dtypes: Iterable[torch.dtype]) -> Precision:
        """The least precise and narrowest of ``dtypes`` (floating-point ones)."""
        fs = [torch.finfo(d) for d in dtypes if d.is_floating_point] or [torch.finfo(torch.float64)]
        return cls(max(f.eps / 2 for f in fs), max(f.smallest_normal * f.eps for f in fs), min(f.max for f in fs))


@dataclass
class Box:
    """Elementwise intervals [lo, hi] (float64 tensors of one shape)."""

    lo: torch.Tensor
    hi: torch.Tensor  # both NaN where the reference's value is unknown: it may be Inf or NaN (see _seal)

    @property
    def shape(self) -> torch.Size:
        return self.lo.shape

    def sup(self) -> torch.Tensor:
        """The largest magnitude in each interval."""
        return torch.maximum(self.lo.abs(), self.hi.abs())

    def unknown(self) -> torch.Tensor:
        """Where an end is not finite (unbounded, or NaN: the reference's value may be Inf or NaN)."""
        return ~(torch.isfinite(self.lo) & torch.isfinite(self.hi))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Box:
        """A structural or monotone (nondecreasing) function applied to both ends."""
        return Box(fn(self.lo), fn(self.hi))

    def widen(self, r: torch.Tensor | float) -> Box:
        return Box(self.lo - r, self.hi + r)


def _seal(b: Box, fmt: Precision, mag: torch.Tensor | None = None) -> Box:
    """``b`` with NaN ends wherever the reference may not be finite: an end not finite, or ``mag`` (a bound on
    the magnitude of every value the reference computes on the way there, rounding included) at or above the
    format's largest finite value (overflow to Inf, and then Inf - Inf or 0 * Inf). NaN ends stay NaN
    through every operation, and :func:`decide` decides nothing from them."""
    bad = b.unknown()
    if mag is not None:
        bad = bad | ~(mag < fmt.big)  # NaN mag too
    if not bool(bad.any()):
        return b
    return Box(b.lo.masked_fill(bad, math.nan), b.hi.masked_fill(bad, math.nan))


def _mid_rad(b: Box) -> tuple[torch.Tensor, torch.Tensor]:
    """Center and radius with ``[c - r, c + r]`` holding ``[lo, hi]`` (rounded outward; c = 0 and r = Inf
    where unbounded)."""
    if b.lo is b.hi:
        return b.lo, torch.zeros_like(b.lo)
    c = (b.lo + b.hi) * 0.5
    r = (b.hi - b.lo) * (0.5 + 2.0**-50) + c.abs() * 2.0**-51  # covers the rounding of c and of hi - lo
    return torch.nan_to_num(c, nan=0.0, posinf=0.0, neginf=0.0), torch.nan_to_num(r, nan=math.inf)


def _gamma(n: int, u: float) -> float:
    """Bound on the relative rounding error of an n-term dot product at unit roundoff ``u``, plus the
    float64 propagation's own."""
    return 1.01 * (n + 2) * (u + 4 * U64)


def _mul(a: Box, b: Box) -> Box:
    """Interval product (an unknown factor, or 0 * Inf, gives NaN ends)."""
    p = torch.stack([a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi])
    return Box(p.amin(0), p.amax(0))


@dataclass
class _Affine:
    """A layer's weights prepared for interval propagation: ``op(x, w) + b`` is in
    ``op(xc, wc) + bc ± (op(xr, wx) + op(|xc| + xr, ws) + bs + tiny)``, and every partial sum's magnitude is
    at most ``op(|xc| + xr, wabs) + babs``."""

    wc: torch.Tensor
    wx: torch.Tensor  # |wc|, scaled up for the propagation's own rounding
    ws: torch.Tensor  # the weights' radius and the reference's relative rounding
    wabs: torch.Tensor  # (|wc| + wr) (1 + gamma), rounded up
    wmax: float  # the largest row sum of wabs (a cheap overflow test)
    tiny: float  # the reference's (and the propagation's) absolute rounding: underflow
    bc: torch.Tensor | None
    bs: torch.Tensor | None
    babs: torch.Tensor | float
    bad: torch.Tensor | None  # output channels with an unknown weight or bias


def _prepare(w: Box, b: Box | None, n: int, fmt: Precision, bias_shape: tuple[int, ...]) -> _Affine:
    wbad = w.unknown()
    wc, wr = _mid_rad(w)
    wc, wr = wc.masked_fill(wbad, 0.0), wr.masked_fill(wbad, 0.0)
    grow, g = 1 + 4 * (n + 2) * U64, _gamma(n, fmt.u)
    wa = wc.abs()
    wabs = (wa + wr) * (grow * (1 + g))
    bad = wbad.flatten(1).any(1)
    bc = bs = None
    babs: torch.Tensor | float = 0.0
    if b is not None:
        bbad = b.unknown()
        bad = bad | bbad
        bcc, br = _mid_rad(b)
        bcc, br, bsup = bcc.masked_fill(bbad, 0.0), br.masked_fill(bbad, 0.0), b.sup().masked_fill(bbad, 0.0)
        bc, bs = bcc.reshape(bias_shape), ((br * grow) + g * bsup).reshape(bias_shape)
        babs = (bsup * (grow * (1 + g))).reshape(bias_shape)
    # a product in the reference's format errs by at most u |ab| + eta / 2, a sum by u |a + b| (exact when
    # subnormal): n eta / 2, doubled for safety; the float64 propagation's three products of n terms 1.5 n 2^-1074
    wmax = float(wabs.flatten(1).sum(1).max()) if wabs.numel() else 0.0  # a layer may have no outputs
    return _Affine(wc, wa * grow, wr * (grow * (1 + g)) + g * wa, wabs, wmax * grow,
                   n * (fmt.eta + 2.0**-1073), bc, bs, babs if b is not None else 0.0,
                   bad.reshape(bias_shape) if bool(bad.any()) else None)


def _affine(x: Box, p: _Affine, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], fmt: Precision) -> Box:
    """``op(x, w) + b`` for a bilinear ``op`` (linear, convolution) over intervals, center-radius form; unknown
    (NaN ends) where an input or weight it uses is, or where a partial sum may overflow."""
    xbad = x.unknown()
    xc, xr = _mid_rad(x)
    anybad = bool(xbad.any())
    if anybad:
        xc, xr = xc.masked_fill(xbad, 0.0), xr.masked_fill(xbad, 0.0)
    xa = xc.abs() + xr
    c = op(xc, p.wc)
    r = op(xa, p.ws) + p.tiny
    if x.lo is not x.hi:
        r = r + op(xr, p.wx)
    if p.bc is not None:
        c = c + p.bc
        r = r + p.bs  # type: ignore[operator]
    mag = None
    bmax = float(p.babs.max()) if isinstance(p.babs, torch.Tensor) and p.babs.numel() else 0.0
    if xa.numel() and float(xa.max()) * p.wmax + bmax + p.tiny >= fmt.big / 2:  # some sum may overflow
        mag = op(xa, p.wabs) + p.babs + p.tiny
    out = _seal(Box(c - r, c + r), fmt, mag)
    if anybad:  # NaN * 0 is NaN: every output whose window holds an unknown input
        out = _seal(out, fmt, torch.where(op(xbad.to(xc.dtype), torch.ones_like(p.wc)) > 0, math.inf, 0.0))
    if p.bad is not None:
        out = _seal(out, fmt, torch.where(p.bad, math.inf, 0.0))
    return out


def _add(a: Box, b: Box, fmt: Precision) -> Box:
    out = Box(a.lo + b.lo, a.hi + b.hi)
    s = a.sup() + b.sup()
    return _seal(out.widen((fmt.u + 2 * U64) * s), fmt, s * (1 + 2 * fmt.u + 4 * U64))


def _monotone(x: Box, fn: Callable[[torch.Tensor], torch.Tensor], fmt: Precision, exact: bool = False) -> Box:
    out = x.map(fn)
    if exact:
        return out
    out = out.widen(16 * fmt.u * out.sup() + 4 * fmt.eta + TINY)
    return _seal(out, fmt, out.sup())


def _softplus(x: Box, beta: float, threshold: float, fmt: Precision) -> Box:
    """``F.softplus(x, beta, threshold)``: ``log1p(exp(beta x)) / beta`` where ``beta x <= threshold``, else
    ``x``. Each branch is nondecreasing but the function drops at the switch, so the result is the hull of
    the branches over the parts of ``[lo, hi]`` where each may be taken (the switch point known to a few
    rounding errors)."""
    u, lo, hi = fmt.u, x.lo, x.hi
    t = threshold / beta
    slack = (4 * u * abs(t) if math.isfinite(t) else 0.0) + 4 * fmt.eta / beta
    t_lo, t_hi = t - slack, t + slack
    may_log, may_lin = lo <= t_hi, hi > t_lo
    top = torch.minimum(hi, torch.full_like(hi, t_hi))
    ends = Box(lo, top).map(lambda v: torch.log1p(torch.exp(v * beta)) / beta)
    z = beta * torch.maximum(lo.abs(), top.abs())  # exp's argument: its rounding error is |z| u relative
    ends = ends.widen((32 + 2 * z) * u * ends.sup() + (4 * fmt.eta + TINY) * max(1.0, 1 / beta))
    inf = torch.tensor(math.inf, dtype=lo.dtype)
    lin_lo = torch.maximum(lo, torch.full_like(lo, t_lo))
    out = Box(torch.minimum(torch.where(may_log, ends.lo, inf), torch.where(may_lin, lin_lo, inf)),
              torch.maximum(torch.where(may_log, ends.hi, -inf), torch.where(may_lin, hi, -inf)))
    # exp may overflow in the reference (Inf) before the switch to x: unknown there
    over = may_log & ~(beta * top < math.log(fmt.big) - 1)
    return _seal(out, fmt, torch.where(over, inf, out.sup()))


def _as_box(v: Any) -> Box:
    if isinstance(v, Box):
        return v
    t = torch.as_tensor(v, dtype=torch.float64)
    return Box(t, t)


# -- the network as a graph of interval operations -------------------------------------------------------------
_EXACT_ACT: dict[type, Callable[[Any], Callable[[torch.Tensor], torch.Tensor]]] = {  # (of an nn.Module)
    nn.ReLU: lambda m: F.relu,
    nn.ReLU6: lambda m: lambda t: t.clamp(0, 6),
    nn.Hardtanh: lambda m: lambda t: t.clamp(m.min_val, m.max_val),
}
_ACT: dict[type, Callable[[Any], Callable[[torch.Tensor], torch.Tensor] | None]] = {
    nn.Sigmoid: lambda m: torch.sigmoid,
    nn.Tanh: lambda m: torch.tanh,
    nn.Hardsigmoid: lambda m: F.hardsigmoid,
    nn.LeakyReLU: lambda m: (lambda t: F.leaky_relu(t, m.negative_slope)) if m.negative_slope >= 0 else None,
    nn.ELU: lambda m: (lambda t: F.elu(t, m.alpha)) if m.alpha >= 0 else None,
    nn.Softplus: lambda m: (lambda t: F.softplus(t, m.beta, m.threshold)) if m.beta > 0 else None,
}
_FN_EXACT = {F.relu: F.relu, torch.relu: torch.relu, F.relu6: F.relu6, F.hardtanh: F.hardtanh}
_FN_ACT: dict[Any, Callable[..., torch.Tensor]] = {
    torch.sigmoid: torch.sigmoid, F.sigmoid: torch.sigmoid, torch.tanh: torch.tanh, F.tanh: torch.tanh,
    F.hardsigmoid: F.hardsigmoid, F.softplus: F.softplus, F.elu: F.elu, F.leaky_relu: F.leaky_relu}
_MONOTONE_ARG = {F.leaky_relu: (1, "negative_slope", 0.01, lambda v: v >= 0),
                 F.elu: (1, "alpha", 1.0, lambda v: v >= 0), F.softplus: (1, "beta", 1.0, lambda v: v > 0)}


def _keeps_monotone(node: fx.Node, pos: int, key: str, default: float, ok: Callable[[float], bool]) -> bool:
    """Whether the argument that shapes an activation (given at ``pos`` or as ``key``) keeps it monotone."""
    v = node.args[pos] if len(node.args) > pos else node.kwargs.get(key, default)
    return isinstance(v, int | float) and not isinstance(v, bool) and ok(v)


_FN_POOL_MAX = (F.max_pool1d, F.max_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d)
_FN_POOL_AVG = (F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)
_FN_SHAPE = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)
_ADD = (operator.add, operator.iadd, torch.add)
_METHOD_SHAPE = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "contiguous", "permute", "transpose"}
_METHOD_ACT: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], bool]] = {
    "relu": (F.relu, True), "sigmoid": (torch.sigmoid, False), "tanh": (torch.tanh, False)}
_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.MaxPool1d, nn.MaxPool2d,
            nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d,
            nn.AdaptiveMaxPool2d, nn.Flatten, nn.Dropout, nn.Identity, *_EXACT_ACT, *_ACT)


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"module {node.target} ({type(gm.get_submodule(str(node.target))).__name__})"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return f"function {getattr(node.target, '__name__', node.target)}"


class IntervalNet:
    """A traced model whose every operation has an interval counterpart (checked on construction)."""

    def __init__(self, model: nn.Module):
        training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
        if training:  # a submodule in train mode (batch statistics, dropout) computes something else
            raise InvalidInputError(f"progressive evaluation needs the model in eval mode ({training[0]} is in train "
                                    "mode): call model.eval() first")
        try:
            self.gm = fx.symbolic_trace(model)
        except Exception as exc:  # tracing failures come in many types
            raise InvalidInputError(f"the model cannot be traced by torch.fx ({type(exc).__name__}: {exc}); "
                                    f"progressive evaluation supports {SUPPORTED}") from exc
        self.model = model
        self.weights: list[str] = []  # parameters and buffers read: module-qualified names
        inputs = 0
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                inputs += 1
            elif node.op == "get_attr":
                self.weights.append(str(node.target))
            elif node.op == "call_module":
                mod = self.gm.get_submodule(str(node.target))
                if not isinstance(mod, _MODULES) or (type(mod) in _ACT and _ACT[type(mod)](mod) is None):
                    raise InvalidInputError(f"progressive evaluation cannot bound {_describe(node, self.gm)}: it "
                                            f"supports {SUPPORTED}")
                if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.padding_mode != "zeros":
                    raise InvalidInputError(f"progressive evaluation cannot bound {_describe(node, self.gm)}: "
                                            "padding_mode must be 'zeros'")
                if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) and not mod.track_running_stats:
                    raise InvalidInputError(f"{_describe(node, self.gm)} has no running statistics")
                if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d)) and mod.return_indices:
                    raise InvalidInputError(f"{_describe(node, self.gm)} returns indices")
                self.weights.extend(f"{node.target}.{n}" for n, t in
                                    [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]
                                    if t is not None and t.is_floating_point())
            elif node.op == "call_function":
                ok = (node.target in _FN_EXACT or node.target in _FN_ACT or node.target in _FN_POOL_MAX
                      or node.target in _FN_POOL_AVG or node.target in _FN_SHAPE or node.target in _ADD
                      or node.target in (operator.sub, torch.sub, operator.mul, torch.mul, torch.cat, F.linear,
                                         F.conv1d, F.conv2d, getattr, operator.getitem, F.dropout))
                if node.target in _MONOTONE_ARG and not _keeps_monotone(node, *_MONOTONE_ARG[node.target]):
                    ok = False  # a slope, alpha or beta that makes the function non-monotone (or is not a number)
                if node.target is F.softplus and not _keeps_monotone(node, 2, "threshold", 20.0, lambda v: v == v):
                    ok = False  # a threshold that is not a number (any number is bounded: see _softplus)
                if node.target in (*_ADD, operator.sub, torch.sub) and "alpha" in node.kwargs:
                    ok = False  # a scaled operand: not bounded here
                if not ok:
                    raise InvalidInputError(f"progressive evaluation cannot bound {_describe(node, self.gm)}: it "
                                            f"supports {SUPPORTED}")
            elif node.op == "call_method":
                if node.target not in _METHOD_SHAPE | set(_METHOD_ACT) | {"size", "add", "dim"} or (
                        node.target == "add" and "alpha" in node.kwargs):
                    raise InvalidInputError(f"progressive evaluation cannot bound {_describe(node, self.gm)}: it "
                                            f"supports {SUPPORTED}")
        if inputs != 1:
            raise InvalidInputError(f"progressive evaluation needs a model of one input, not {inputs}")
        self.weights = list(dict.fromkeys(self.weights))
        saved = set(model.state_dict())
        unsaved = [w for w in self.weights if w not in saved]
        if unsaved:  # every tensor is read from the snapshot: one a state_dict lacks is in none
            raise InvalidInputError(f"progressive evaluation reads every tensor the model uses from the snapshot, but "
                                    f"{', '.join(unsaved[:3])} is not in the model's state_dict (a tensor made in "
                                    "forward, or a non-persistent buffer): register it as a persistent buffer")
        self._source: Any = None
        self._fmt: Precision | None = None
        self._prep: dict[str, _Affine] = {}

    def _prepared(self, target: str, make: Callable[[], _Affine]) -> _Affine:
        if target not in self._prep:
            self._prep[target] = make()
        return self._prep[target]

    def propagate(self, weights: Mapping[str, Box], x: Box, fmt: Precision) -> Box:
        """Intervals of the outputs for inputs in ``x`` and weights in ``weights`` (by qualified name);
        ``fmt``: the reference computation's format. Ends -Inf and Inf: unbounded (the output may be Inf or NaN)."""
        env: dict[fx.Node, Any] = {}
        if self._source is not weights or self._fmt != fmt:
            self._source, self._fmt, self._prep = weights, fmt, {}

        def val(a: Any) -> Any:
            return fx.node.map_arg(a, lambda n: env[n])

        def get(name: str) -> Box:
            return weights[name]

        for node in self.gm.graph.nodes:
            args, kwargs = val(node.args), val(node.kwargs)
            if node.op == "placeholder":
                out: Any = _seal(x, fmt)
            elif node.op == "get_attr":
                out = get(str(node.target))
            elif node.op == "call_module":
                out = self._module(str(node.target), args[0], get, fmt)
            elif node.op == "call_function":
                out = self._function(node.target, args, kwargs, fmt)
            elif node.op == "call_method":
                out = self._method(str(node.target), args, kwargs, fmt)
            else:  # output
                out = args[0] if isinstance(args[0], Box) else _as_box(args[0])
                unknown = out.lo.isnan() | out.hi.isnan()
                return Box(out.lo.masked_fill(unknown, -math.inf), out.hi.masked_fill(unknown, math.inf))
            env[node] = out
        raise InvalidInputError("the traced model has no output")

    def _module(self, target: str, x: Box, get: Callable[[str], Box], fmt: Precision) -> Box:
        mod = self.gm.get_submodule(target)
        w = lambda n: get(f"{target}.{n}")  # noqa: E731
        if isinstance(mod, nn.Linear):
            p = self._prepared(target, lambda: _prepare(w("weight"), None if mod.bias is None else w("bias"),
                                                        mod.in_features + 1, fmt, (mod.out_features,)))
            return _affine(x, p, F.linear, fmt)
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            conv = F.conv1d if isinstance(mod, nn.Conv1d) else F.conv2d
            kw: dict[str, Any] = dict(stride=mod.stride, padding=mod.padding, dilation=mod.dilation, groups=mod.groups)
            n = mod.in_channels // mod.groups * math.prod(mod.kernel_size) + 1
            shape = (1, mod.out_channels) + (1,) * (x.lo.dim() - 2)
            p = self._prepared(target, lambda: _prepare(w("weight"), None if mod.bias is None else w("bias"), n, fmt,
                                                        shape))
            return _affine(x, p, lambda a, b: conv(a, b, **kw), fmt)
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            one = Box(torch.ones(mod.num_features, dtype=torch.float64), torch.ones(mod.num_features,
                                                                                     dtype=torch.float64))
            zero = Box(torch.zeros(mod.num_features, dtype=torch.float64), torch.zeros(mod.num_features,
                                                                                        dtype=torch.float64))
            g = w("weight") if mod.affine else one
            beta = w("bias") if mod.affine else zero
            return _batch_norm(x, w("running_mean"), w("running_var"), g, beta, mod.eps, fmt)
        if type(mod) in _EXACT_ACT:
            return x.map(_EXACT_ACT[type(mod)](mod))
        if isinstance(mod, nn.Softplus):
            return _softplus(x, mod.beta, mod.threshold, fmt)
        if type(mod) in _ACT:
            return _monotone(x, _ACT[type(mod)](mod), fmt)  # type: ignore[arg-type]
        if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)):
            return x.map(mod)
        if isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
            return _avg(x, mod, fmt)
        return x.map(mod)  # Flatten, Dropout (eval), Identity

    def _function(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], fmt: Precision) -> Any:
        boxes = [a for a in args if isinstance(a, Box)]
        if not boxes and fn not in (torch.cat,):
            return fn(*args, **kwargs)  # arithmetic on sizes
        x = args[0]
        if fn in _FN_EXACT:
            return x.map(lambda t: _FN_EXACT[fn](t, *args[1:], **kwargs))
        if fn is F.softplus:
            beta = args[1] if len(args) > 1 else kwargs.get("beta", 1.0)
            return _softplus(x, beta, args[2] if len(args) > 2 else kwargs.get("threshold", 20.0), fmt)
        if fn in _FN_ACT:
            if fn is F.leaky_relu and (args[1:] or [kwargs.get("negative_slope", 0.01)])[0] < 0:
                raise InvalidInputError("progressive evaluation cannot bound leaky_relu with a negative slope")
            return _monotone(x, lambda t: _FN_ACT[fn](t, *args[1:], **kwargs), fmt)
        if fn in _FN_POOL_MAX:
            return x.map(lambda t: fn(t, *args[1:], **kwargs))
        if fn in _FN_POOL_AVG:
            return _avg(x, lambda t: fn(t, *args[1:], **kwargs), fmt)
        if fn in _FN_SHAPE or fn is operator.getitem or fn is F.dropout:
            if fn is F.dropout:
                return x
            return x.map(lambda t: fn(t, *args[1:], **kwargs))
        if fn is getattr:
            return getattr(x.lo, args[1])
        if fn in _ADD or fn in (operator.sub, torch.sub):
            a, b = _as_box(args[0]), _as_box(args[1])
            if fn in (operator.sub, torch.sub):
                b = Box(-b.hi, -b.lo)
            return _add(a, b, fmt)
        if fn in (operator.mul, torch.mul):
            a, b = args[0], args[1]
            if isinstance(a, Box) and isinstance(b, Box):
                p = _mul(a, b)
            else:
                box, c = (a, b) if isinstance(a, Box) else (b, a)
                p = _mul(box, _as_box(c))
            return _seal(p.widen(fmt.u * p.sup() + 2 * fmt.eta), fmt, p.sup() * (1 + 2 * fmt.u))
        if fn is torch.cat:
            parts = [_as_box(a) for a in args[0]]
            return Box(torch.cat([p.lo for p in parts], *args[1:], **kwargs),
                       torch.cat([p.hi for p in parts], *args[1:], **kwargs))
        if fn is F.linear:
            wgt = _as_box(args[1])
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            prep = _prepare(wgt, None if bias is None else _as_box(bias), wgt.shape[1] + 1, fmt, (wgt.shape[0],))
            return _affine(x, prep, F.linear, fmt)
        if fn in (F.conv1d, F.conv2d):
            wgt = _as_box(args[1])
            bias = args[2] if len(args) > 2 else kwargs.pop("bias", None)
            rest = dict(zip(("stride", "padding", "dilation", "groups"), args[3:])) | kwargs
            n = wgt.shape[1] * math.prod(wgt.shape[2:]) + 1
            shape = (1, wgt.shape[0]) + (1,) * (x.lo.dim() - 2)
            prep = _prepare(wgt, None if bias is None else _as_box(bias), n, fmt, shape)
            return _affine(x, prep, lambda a, b: fn(a, b, **rest), fmt)
        raise InvalidInputError(f"progressive evaluation cannot bound function {getattr(fn, '__name__', fn)}")

    def _method(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], fmt: Precision) -> Any:
        x = args[0]
        if not isinstance(x, Box):
            return getattr(x, name)(*args[1:], **kwargs)
        if name in ("size", "dim"):
            return getattr(x.lo, name)(*args[1:], **kwargs)
        if name in _METHOD_SHAPE:
            return x.map(lambda t: getattr(t, name)(*args[1:], **kwargs))
        if name == "add":
            return _add(x, _as_box(args[1]), fmt)
        fn, exact = _METHOD_ACT[name]
        return _monotone(x, fn, fmt, exact)


def _avg(x: Box, pool: Callable[[torch.Tensor], torch.Tensor], fmt: Precision) -> Box:
    out = x.map(pool)
    n = math.prod(x.shape[2:]) + 1  # at most the whole plane is averaged
    g, s = _gamma(n, fmt.u), pool(x.sup())
    return _seal(out.widen(g * s + 4 * fmt.eta), fmt, s * (n * (1 + g)))  # the sum, before dividing


def _batch_norm(x: Box, mean: Box, var: Box, g: Box, b: Box, eps: float, fmt: Precision) -> Box:
    """``(x - mean) / sqrt(var + eps) * g + b`` per channel (dimension 1) over intervals."""
    shape = (1, -1) + (1,) * (x.lo.dim() - 2)
    inv_lo = 1 / torch.sqrt(var.hi + eps)
    inv_hi = torch.where(var.lo + eps > 0, 1 / torch.sqrt((var.lo + eps).clamp_min(1e-300)),
                         torch.full_like(var.lo, math.inf))
    scale = _mul(g, Box(inv_lo, inv_hi))
    scale = Box(scale.lo.reshape(shape), scale.hi.reshape(shape))
    m = Box(mean.lo.reshape(shape), mean.hi.reshape(shape))
    beta = Box(b.lo.reshape(shape), b.hi.reshape(shape))
    centered = Box(x.lo - m.hi, x.hi - m.lo)
    y = _mul(centered, scale)
    y = Box(y.lo + beta.lo, y.hi + beta.hi)
    terms, rel = (x.sup() + m.sup()) * scale.sup() + beta.sup(), 8 * (fmt.u + 4 * U64)
    # underflow: the scale (g / sqrt(var + eps), or the steps to it) errs by up to eta / 2 absolute, times x or mean
    tiny = 4 * fmt.eta * (x.sup() + m.sup() + g.sup().reshape(shape) + 1) + TINY
    return _seal(y.widen(rel * terms + tiny), fmt, torch.maximum(terms, scale.sup()) * (1 + rel) + tiny)


# -- deciding labels -------------------------------------------------------------------------------------------
def decide(lo: torch.Tensor, hi: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of logit intervals: whether the top-``k`` set is decided (its lowest lower bound above
    every other class's upper bound), and the set (sorted class ids; (N,) for k=1, (N, k) otherwise)."""
    sound = (lo <= hi).all(1)  # an inverted or NaN interval (an output that may be NaN) decides nothing
    if k == 1:
        best = lo.argmax(1)
        others = hi.scatter(1, best[:, None], -math.inf).amax(1)
        return (lo.gather(1, best[:, None])[:, 0] > others) & sound, best
    if k > lo.shape[1]:
        raise InvalidInputError(f"topk={k}: the model has only {lo.shape[1]} outputs")
    top = lo.topk(k, 1).indices
    low = lo.gather(1, top).amin(1)
    others = hi.scatter(1, top, -math.inf).amax(1)
    return (low > others) & sound, top.sort(1).values


def top_labels(logits: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Full-precision labels in the form :func:`decide` returns: argmax, or the sorted top-k set."""
    if k == 1:
        return logits.argmax(1)
    if k > logits.shape[1]:
        raise InvalidInputError(f"topk={k}: the model has only {logits.shape[1]} outputs")
    return logits.topk(k, 1).indices.sort(1).values


# -- the evaluation --------------------------------------------------------------------------------------------
@dataclass
class Step:
    """One plane count of a progressive evaluation."""

    planes: int
    bytes_read: int  # stored bytes fetched so far (cumulative, bases included)
    bytes_total: int  # what a full restore of the same weights fetches
    evaluated: int  # inputs evaluated at this plane count
    undecided: int  # of which still undecided afterwards
    read_seconds: float
    eval_seconds: float


@dataclass
class ProgressiveResult:
    """Labels (argmax, or sorted top-k sets) and how they were reached."""

    labels: torch.Tensor
    planes: torch.Tensor  # per input, the plane count that decided it
    steps: list[Step] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def bytes_read(self) -> int:
        return self.steps[-1].bytes_read if self.steps else 0

    @property
    def bytes_total(self) -> int:
        return self.steps[-1].bytes_total if self.steps else 0


def _weight_names(net: IntervalNet, names: Mapping[str, str] | Callable[[str], str] | None) -> dict[str, str]:
    if names is None:
        return {w: w for w in net.weights}
    if callable(names):
        return {w: names(w) for w in net.weights}
    return {w: names.get(w, w) for w in net.weights}


def _require(have: Callable[[str], bool], mapping: Mapping[str, str], where: str) -> None:
    """TensorNotFoundError naming the model's weights whose tensors ``where`` lacks, and the remedy."""
    missing = [f"{w!r}" + (f" (as {t!r})" if t != w else "") for w, t in mapping.items() if not have(t)]
    if missing:
        raise TensorNotFoundError(f"{where} has no tensor for the model's {', '.join(missing[:5])}"
                                  f"{'...' if len(missing) > 5 else ''}: pass names= (a mapping or function from the "
                                  "model's state_dict names to the snapshot's), or read every tensor the model uses")


def _torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a manifest dtype name."""
    from gpupas.integrations.torch import numpy_to_tensor
    from gpupas.pas.bounds import np_dtype

    return numpy_to_tensor(np.zeros(0, np_dtype(name))).dtype


def _precision(dtypes: Iterable[str], inputs: torch.Tensor) -> Precision:
    """The reference computation's format: the least precise and narrowest of the weights' and inputs'."""
    return Precision.of([_torch_dtype(d) for d in dtypes] + [inputs.dtype])


def _same_dtypes(model: nn.Module, mapping: Mapping[str, str], dtype_of: Callable[[str], str], where: str) -> None:
    """InvalidInputError where a weight of ``model`` has another dtype than its tensor in ``where``: the model
    would not run on those weights, nor compute as the bounds assume."""
    own = {k: t.dtype for k, t in [*model.named_parameters(), *model.named_buffers()]}
    for w, t in mapping.items():
        stored = _torch_dtype(dtype_of(t))
        if w in own and own[w] != stored:
            raise InvalidInputError(f"the model's {w!r} is {own[w]}, but {where} stores {t!r} as {stored}: cast the "
                                    f"model to the snapshot's dtype first (model.to({stored})), or evaluate a "
                                    "snapshot committed from the model as it computes")


def _check_inputs(model: nn.Module, inputs: torch.Tensor) -> None:
    """Inputs the model itself can take: of its floating-point dtype (it runs them at the last plane)."""
    dtypes = {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}
    want = next(iter(dtypes)) if len(dtypes) == 1 else None
    if not inputs.is_floating_point() or (want is not None and inputs.dtype != want):
        raise InvalidInputError(f"inputs are {inputs.dtype}, but the model computes in {want or 'floating point'}: "
                                f"cast them first (inputs.to({want or 'torch.float32'}))")


def _boxes(net: IntervalNet, read: Any, mapping: Mapping[str, str]) -> dict[str, Box]:
    return {w: Box(torch.from_numpy(np.asarray(read.lo[mapping[w]], np.float64)),
                   torch.from_numpy(np.asarray(read.hi[mapping[w]], np.float64))) for w in net.weights}


def _propagate(net: IntervalNet, boxes: Mapping[str, Box], x: torch.Tensor, fmt: Precision, batch_size: int) -> Box:
    los, his = [], []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size].to(torch.float64)
        with torch.no_grad():
            out = net.propagate(boxes, Box(xb, xb), fmt)
        los.append(out.lo)
        his.append(out.hi)
    return Box(torch.cat(los), torch.cat(his))


def bound_outputs(model: nn.Module, read: Any, inputs: torch.Tensor, *,
                  names: Mapping[str, str] | Callable[[str], str] | None = None, batch_size: int = 1024) -> Box:
    """Guaranteed intervals of ``model``'s outputs on ``inputs`` with weights bounded by ``read`` (an
    :meth:`gpupas.Archive.read_planes` result): they hold what the model computes with the true weights
    (-Inf and Inf where it may compute Inf or NaN). ``inputs`` must have the model's dtype.

    >>> import torch, gpupas, tempfile
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh()).eval()
    >>> a = gpupas.create_archive(tempfile.mkdtemp() + "/arc")
    >>> m = a.commit(net.state_dict(), layout=gpupas.Layout(rotate=False))
    >>> x = torch.randn(5, 4)
    >>> box = bound_outputs(net, a.read_planes(m.id, planes=2), x)
    >>> bool(((box.lo <= net(x)) & (net(x) <= box.hi)).all())
    True
    """
    net = IntervalNet(model)
    _check_inputs(model, inputs)
    mapping = _weight_names(net, names)
    _require(lambda t: t in read.lo, mapping, f"the read of snapshot {read.snapshot}")
    _same_dtypes(model, mapping, lambda t: read.lo[t].dtype.name, f"the read of snapshot {read.snapshot}")
    fmt = _precision([read.lo[t].dtype.name for t in mapping.values()], inputs)
    return _propagate(net, _boxes(net, read, mapping), inputs.detach(), fmt, batch_size)


def evaluate_progressive(model: nn.Module, archive: Any, snapshot: str, inputs: torch.Tensor, *, topk: int = 1,
                         names: Mapping[str, str] | Callable[[str], str] | None = None, batch_size: int = 1024,
                         check: bool = False, base_planes: int | None = None, probe: int = 64) -> ProgressiveResult:
    """Labels of ``inputs`` under ``model`` with the weights of ``snapshot``, reading planes only while some
    input is undecided.

    ``names``: the snapshot's tensor name of each of the model's parameters and buffers (a mapping or a
    function of the qualified name; default: the same name, as in ``model.state_dict()``); ``topk``: decide
    top-1 labels (default) or top-k sets; ``check``: afterwards run the full-precision model on every input
    and raise AssertionError if any label differs (costs a full evaluation); ``base_planes``: planes of a
    delta snapshot's bases read at least (see :class:`gpupas.engine.partial.PartialReader`); ``probe``: at each
    plane count, bound this many inputs first and, where none of them is decided, go on to the next plane
    without bounding the others (0: bound every input at every plane count).

    >>> import torch, gpupas, tempfile
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    >>> a = gpupas.create_archive(tempfile.mkdtemp() + "/arc")
    >>> m = a.commit(net.state_dict(), layout=gpupas.Layout(rotate=False))
    >>> r = evaluate_progressive(net, a, m.id, torch.randn(50, 4), check=True)
    >>> r.labels.shape, r.steps[0].planes
    (torch.Size([50]), 1)
    """
    from gpupas.backend import get_backend
    from gpupas.engine.partial import PartialReader
    from gpupas.integrations.torch import numpy_to_tensor

    t_start = time.perf_counter()
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise InvalidInputError(f"topk must be a whole number of at least 1, not {topk!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a whole number of at least 1, not {batch_size!r}")
    if inputs.ndim == 0 or inputs.shape[0] == 0:
        raise InvalidInputError("inputs must hold at least one input (a batch along the first dimension)")
    net = IntervalNet(model)
    _check_inputs(model, inputs)
    mapping = _weight_names(net, names)
    tensors = list(dict.fromkeys(mapping.values()))
    def run() -> ProgressiveResult:  # on the manifests as read now
        m = archive.manifest(snapshot)
        _require(lambda t: t in m.by_name, mapping, f"snapshot {snapshot}")
        _same_dtypes(model, mapping, lambda t: m.by_name[t].dtype, f"snapshot {snapshot}")
        entries = m.select(tensors)
        width = max((e.width for e in entries), default=1)
        fmt = _precision([e.dtype for e in entries], inputs)
        x = inputs.detach()
        n = x.shape[0]
        labels = torch.full((n,) if topk == 1 else (n, topk), -1, dtype=torch.long)
        result = ProgressiveResult(labels, torch.zeros(n, dtype=torch.long))
        todo = torch.arange(n)

        def exact_labels(read: Any, idx: torch.Tensor) -> torch.Tensor:
            weights = {w: numpy_to_tensor(read.approx[mapping[w]]) for w in net.weights}
            with torch.no_grad():
                return torch.cat([top_labels(torch.func.functional_call(  # tie_weights off: both names are given
                    model, weights, (x[idx[i : i + batch_size]],), tie_weights=False), topk)
                    for i in range(0, len(idx), batch_size)])

        with PartialReader(archive.store, archive.manifest, get_backend("numpy"), archive.executor,
                           base_planes) as reader:
            for k in range(1, width + 1):
                t0 = time.perf_counter()
                r = reader.read(snapshot, k, tensors)
                t1 = time.perf_counter()
                evaluated = len(todo)
                if r.all_exact or k == width:  # the weights themselves: the model decides the rest
                    labels[todo] = exact_labels(r, todo)
                    result.planes[todo] = k
                    todo = todo[:0]
                else:
                    boxes = _boxes(net, r, mapping)
                    parts = [todo[:probe], todo[probe:]] if 0 < probe < len(todo) else [todo]
                    left: list[torch.Tensor] = []
                    evaluated = 0
                    for part in parts:
                        if evaluated and sum(len(t) for t in left) == evaluated:  # the probe decided nothing
                            left.append(part)
                            continue
                        out = _propagate(net, boxes, x[part], fmt, batch_size)
                        ok, lab = decide(out.lo, out.hi, topk)
                        labels[part[ok]] = lab[ok]
                        result.planes[part[ok]] = k
                        left.append(part[~ok])
                        evaluated += len(part)
                    todo = torch.cat(left)
                result.steps.append(Step(k, r.bytes_read, r.bytes_total, evaluated, len(todo), t1 - t0,
                                         time.perf_counter() - t1))
                if not len(todo):
                    break
            result.seconds = time.perf_counter() - t_start
            if check:
                ref = exact_labels(reader.read(snapshot, width, tensors), torch.arange(n))
                bad = (ref != labels).reshape(n, -1).any(1)
                if bool(bad.any()):
                    raise AssertionError(f"progressive labels differ from full-precision inference for "
                                         f"{int(bad.sum())} of {n} inputs (first: {int(bad.nonzero()[0, 0])})")
        return result

    return archive.fresh(run)  # once more, from the start, where another process revised the snapshot meanwhile
