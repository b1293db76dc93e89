"""Progressive evaluation: interval propagation holds the true outputs for every supported operation, and the
labels always equal full-precision inference (gpupas/integrations/progressive.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import gpupas  # noqa: E402
from gpupas import Layout  # noqa: E402
from gpupas.errors import InvalidInputError  # noqa: E402
from gpupas.integrations.progressive import Box, IntervalNet, bound_outputs, decide, evaluate_progressive, top_labels  # noqa: E402

BOUNDED = Layout(rotate=False, groups=(1, 2, 3))


class ResidualNet(nn.Module):
    """Conv, batch norm, ReLU, a residual add, max pooling, flatten, Linear, Tanh."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.Tanh(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.bn(self.conv(x)))
        return self.head(self.pool(x))


class Zoo(nn.Module):
    """Every other supported operation once."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.LeakyReLU(0.1)
        self.avg = nn.AvgPool2d(2)
        self.c2 = nn.Conv2d(6, 6, 1, bias=False)
        self.ada = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)
        self.bn1 = nn.BatchNorm1d(5)
        self.out = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.avg(self.act(self.bn(self.c1(x))))
        z = torch.sigmoid(self.c2(y)) - 0.5 * y
        pooled = torch.cat([self.ada(y).flatten(1), F.adaptive_max_pool2d(z, 1).view(z.size(0), -1)], 1)
        h = F.elu(self.bn1(self.fc(pooled)))
        return self.out(torch.tanh(h) + h.relu())


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.tensor(d.target)


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor]:
    pytest.importorskip("sklearn")
    torch.manual_seed(0)
    x, y = _digits()
    model = ResidualNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x[::2]


def _reference(model: nn.Module, weights: dict[str, np.ndarray], x: torch.Tensor, k: int) -> torch.Tensor:
    fresh = type(model)()
    fresh.load_state_dict({n: torch.from_numpy(v.copy()) for n, v in weights.items()})
    with torch.no_grad():
        return top_labels(fresh.eval()(x), k)


def test_labels_equal_full_precision_and_planes_are_saved(tmp_path: Path, trained: tuple) -> None:
    model, x = trained
    with gpupas.create_archive(tmp_path / "a") as arc:
        m = arc.commit(model.state_dict(), layout=BOUNDED)
        weights = arc.restore(m.id)
        for k in (1, 3):
            res = evaluate_progressive(model, arc, m.id, x, topk=k, check=True, batch_size=700)
            assert torch.equal(res.labels, _reference(model, weights, x, k))
            assert all(a.bytes_read < b.bytes_read for a, b in zip(res.steps, res.steps[1:]))
            assert all(a.undecided >= b.undecided for a, b in zip(res.steps, res.steps[1:]))
            assert res.steps[-1].undecided == 0 and int(res.planes.min()) <= 3  # some decided before the end
            assert res.bytes_read <= res.bytes_total
        # a delta snapshot: its bases are read along
        model2 = ResidualNet()
        state = {n: v + 1e-3 * torch.randn_like(v) if v.is_floating_point() else v
                 for n, v in model.state_dict().items()}
        model2.load_state_dict(state)
        m2 = arc.commit(model2.state_dict(), base=m.id, layout=BOUNDED)
        assert any(e.reads_base for e in arc.manifest(m2.id).tensors)
        for base_planes in (None, 4):
            res = evaluate_progressive(model2.eval(), arc, m2.id, x[:300], check=True, base_planes=base_planes)
            assert torch.equal(res.labels, _reference(model2, arc.restore(m2.id), x[:300], 1))


@pytest.mark.parametrize("seed", range(4))
def test_propagated_intervals_hold_sampled_weights(tmp_path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = Zoo().eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.running_mean.normal_()
        model.bn1.running_var.uniform_(0.5, 2)
    x = torch.randn(16, 2, 8, 8)
    with gpupas.create_archive(tmp_path / "a") as arc:
        m = arc.commit(model.state_dict(), layout=BOUNDED)
        for planes in (2, 3):
            r = arc.read_planes(m.id, planes)
            box = bound_outputs(model, r, x, batch_size=5)
            gen = np.random.default_rng(seed)
            for _ in range(4):  # weights anywhere in their bounds: the outputs stay in the box
                w = {n: torch.from_numpy(np.clip((r.lo[n] + gen.random(r.lo[n].shape) * (r.hi[n] - r.lo[n]))
                                                 .astype(np.float32), r.lo[n], r.hi[n]))
                     for n, v in model.state_dict().items() if v.is_floating_point()}
                with torch.no_grad():
                    out = torch.func.functional_call(model, w, (x,)).double()
                assert bool(((box.lo <= out) & (out <= box.hi)).all()), planes
            exact = bound_outputs(model, arc.read_planes(m.id, 4), x)
            with torch.no_grad():
                out = model(x).double()
            assert bool(((exact.lo <= out) & (out <= exact.hi)).all())
            assert float((exact.hi - exact.lo).max()) < 1e-3 * float(out.abs().max())  # rounding slack only


def test_unsupported_operations_are_refused_by_name() -> None:
    class Attention(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(x @ x.transpose(0, 1), 1)

    cases = [(nn.Sequential(nn.Linear(4, 4), nn.GELU()).eval(), "GELU"),
             (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).eval(), "LayerNorm"),
             (nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(-0.5)).eval(), "LeakyReLU"),
             (Attention().eval(), "matmul"),
             (nn.Sequential(nn.Linear(4, 4)).train(), "eval mode")]
    for model, name in cases:
        with pytest.raises(InvalidInputError, match=name):
            IntervalNet(model)


class _Two(nn.Module):
    """Two branches joined by ``join``."""

    def __init__(self, join) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.a, self.b, self.join = nn.Linear(4, 3), nn.Linear(4, 3), join

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.join(self.a(x), self.b(x))


class _Unsaved(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("scale", torch.ones(3), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale


def test_what_would_bound_wrongly_is_refused_before_reading() -> None:
    """Operations whose intervals the propagation would get wrong (a scaled operand, a non-monotone
    activation, a submodule in train mode, a tensor no snapshot holds) are refused up front."""
    half_train = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).eval()
    half_train[1].train()
    cases = [(_Two(lambda a, b: torch.add(a, b, alpha=-3)).eval(), "function add"),
             (_Two(lambda a, b: a.add(b, alpha=2)).eval(), "method .add"),
             (_Two(lambda a, b: torch.sub(a, b, alpha=2)).eval(), "function sub"),
             (nn.Sequential(nn.Linear(4, 3), nn.Identity()).eval(), None),
             (half_train, "'1' is in train mode|1 is in train mode"),
             (_Unsaved().eval(), "scale is not in the model's state_dict")]
    elu = _Two(lambda a, b: F.elu(a + b, -1.0)).eval()
    softplus = _Two(lambda a, b: F.softplus(a + b, beta=-1.0)).eval()
    cases += [(elu, "function elu"), (softplus, "function softplus")]
    for model, what in cases:
        if what is None:
            IntervalNet(model)
            continue
        with pytest.raises(InvalidInputError, match=what):
            IntervalNet(model)
    IntervalNet(_Two(lambda a, b: F.elu(a + b, 0.5)).eval())  # monotone arguments are fine


def test_evaluation_starts_again_where_its_low_planes_moved_out_of_a_tier_removed_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Progressive evaluation read the top plane (in the archive); before it needed the lower ones (in tier
    'cold'), another process moved them back and removed the tier. The evaluation starts again on the
    manifest as it is now and gives the full-precision labels (before: TierNotFoundError naming the tier)."""
    from gpupas.engine.partial import PartialReader

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5)).eval()
    with gpupas.create_archive(tmp_path / "a") as a:
        m = a.commit(net.state_dict(), layout=Layout(rotate=False))
        a.add_tier("cold", tmp_path / "cold")
        a.tier(m.id, planes_from=1, to="cold")
    real, moved = PartialReader.read, []

    def crossing(self: PartialReader, *args: object, **kw: object) -> object:
        got = real(self, *args, **kw)
        if not moved:  # another process, after the first read: the low planes back, the tier removed
            moved.append(True)
            with gpupas.open_archive(tmp_path / "a") as other:
                other.tier(m.id, planes_from=None, to=None)
                other.remove_tier("cold")
        return got

    monkeypatch.setattr(PartialReader, "read", crossing)
    x = torch.randn(64, 6)
    with gpupas.open_archive(tmp_path / "a") as a:
        assert any(s.tier == "cold" for s in a.manifest(m.id).streams)
        r = evaluate_progressive(net, a, m.id, x, check=True)
    assert moved and torch.equal(r.labels, net(x).argmax(1))


def test_tied_weights_and_bad_arguments(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)).eval()
    net[2].weight = net[0].weight  # tied: both names in the state_dict, one tensor
    with gpupas.create_archive(tmp_path / "a") as a:
        m = a.commit(net.state_dict(), layout=Layout(rotate=False))
        x = torch.randn(40, 4)
        r = evaluate_progressive(net, a, m.id, x, check=True)  # the last plane runs the model: both names given
        assert torch.equal(r.labels, net(x).argmax(1))
        for kw, what in (({"topk": 0}, "topk"), ({"topk": 5}, "only 4 outputs"), ({"batch_size": 0}, "batch_size")):
            with pytest.raises(InvalidInputError, match=what):
                evaluate_progressive(net, a, m.id, x, check=True, **kw)
        with pytest.raises(InvalidInputError, match="at least one input"):
            evaluate_progressive(net, a, m.id, x[:0])
        assert a.read_planes(m.id, np.int64(2)).planes == 2


def test_weights_missing_from_the_snapshot_or_the_read_are_named_with_the_remedy(tmp_path: Path) -> None:
    """Not a bare KeyError from bound_outputs, nor a listing without the way out (names=)."""
    net = nn.Sequential(nn.Linear(4, 3)).eval()
    x = torch.randn(5, 4)
    with gpupas.create_archive(tmp_path / "a") as a:
        m = a.commit({"model." + k: v for k, v in net.state_dict().items()}, layout=Layout(rotate=False))
        for call in (lambda: evaluate_progressive(net, a, m.id, x),
                     lambda: bound_outputs(net, a.read_planes(m.id, 1), x),
                     lambda: bound_outputs(net, a.read_planes(m.id, 1, ["model.0.weight"]), x,
                                           names=lambda n: "model." + n)):
            with pytest.raises(gpupas.TensorNotFoundError, match=r"'0\.bias'.*names="):
                call()
        r = evaluate_progressive(net, a, m.id, x, names=lambda n: "model." + n, check=True)
        assert torch.equal(r.labels, net(x).argmax(1))


def test_a_model_of_another_dtype_than_the_snapshot_is_refused_before_any_read(tmp_path: Path) -> None:
    """A model cast after the commit (net.half()) would run on none of the snapshot's weights: refused up front,
    naming the weight and the cast, not a torch error after every plane was read."""
    net = nn.Sequential(nn.Linear(4, 3)).eval()
    with gpupas.create_archive(tmp_path / "a") as a:
        m = a.commit(net.state_dict(), layout=Layout(rotate=False))
        read = a.read_planes(m.id, 1)
        half = net.half()
        x = torch.randn(5, 4).half()
        for call in (lambda: evaluate_progressive(half, a, m.id, x), lambda: bound_outputs(half, read, x)):
            with pytest.raises(InvalidInputError, match=r"'0\.weight' is torch\.float16.*model\.to\(torch\.float32\)"):
                call()
        r = evaluate_progressive(half.float(), a, m.id, x.float(), check=True)
        assert r.labels.shape == (5,)


def test_decide() -> None:
    lo = torch.tensor([[0.0, 2.0, 1.0], [0.0, 2.0, 1.0], [3.0, 2.0, -5.0]], dtype=torch.float64)
    hi = torch.tensor([[0.5, 3.0, 1.9], [0.5, 3.0, 2.5], [4.0, 2.5, -4.0]], dtype=torch.float64)
    ok, lab = decide(lo, hi, 1)
    assert ok.tolist() == [True, False, True] and lab.tolist() == [1, 1, 0]
    ok, lab = decide(lo, hi, 2)
    assert ok.tolist() == [True, True, True] and lab.tolist() == [[1, 2], [1, 2], [0, 1]]
    nan = Box(torch.full((1, 3), float("nan"), dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64))
    assert not decide(nan.lo, nan.hi, 1)[0].any()


def _commit(tmp_path: Path, net: nn.Module):  # type: ignore[no-untyped-def]
    arc = gpupas.create_archive(tmp_path / "a")
    return arc, arc.commit(net.state_dict(), layout=BOUNDED)


def _holds(box: Box, y: torch.Tensor) -> bool:
    """Every output finite and inside its interval, or its interval unbounded (it may be Inf or NaN)."""
    y = y.double()
    inside = torch.isfinite(y) & (box.lo <= y) & (y <= box.hi)
    return bool((inside | ((box.lo == -math.inf) & (box.hi == math.inf))).all())


def _tiny_net(kind: str, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    """A model whose two outputs are +-(a product below half the smallest subnormal of ``dtype``): both 0
    in ``dtype``, so argmax is 0, while exact arithmetic says class 1."""
    fi = torch.finfo(dtype)
    e = math.log2(fi.smallest_normal * fi.eps) - 2  # the product 2^e rounds to 0
    w, xv = 2.0 ** math.floor(e / 2), 2.0 ** (e - math.floor(e / 2))
    if kind == "linear":
        net: nn.Module = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            net.weight.copy_(torch.tensor([[-w], [w]]))
        x = torch.tensor([[xv]])
    elif kind == "conv":
        net = nn.Sequential(nn.Conv1d(1, 2, 1, bias=False), nn.Flatten())
        with torch.no_grad():
            net[0].weight.copy_(torch.tensor([[[-w]], [[w]]]))
        x = torch.tensor([[[xv]]])
    elif kind == "batchnorm":  # the scale weight / sqrt(var + eps) times x underflows
        net = nn.Sequential(nn.BatchNorm1d(2, eps=0.0))
        with torch.no_grad():
            net[0].weight.copy_(torch.tensor([-w, w]))
            net[0].bias.zero_(), net[0].running_mean.zero_(), net[0].running_var.fill_(1.0)
        x = torch.tensor([[xv, xv]])
    else:  # sigmoid of a large negative number: below the smallest subnormal in float16
        net = nn.Sequential(nn.Linear(1, 2), nn.Sigmoid())
        with torch.no_grad():
            net[0].weight.copy_(torch.tensor([[1.0], [1.0]]))
            net[0].bias.copy_(torch.tensor([-30.0, -29.0]))
        x = torch.tensor([[0.0]])
    return net.to(dtype).eval(), x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", ["linear", "conv", "batchnorm", "sigmoid"])
def test_results_that_underflow_to_zero_are_held(tmp_path: Path, kind: str, dtype: torch.dtype) -> None:
    """A product below the smallest subnormal is 0 in the model: the intervals (relative rounding
    allowance only, before) must hold 0, so no label is decided from them."""
    net, x = _tiny_net(kind, dtype)
    with torch.no_grad():
        y = net(x)
    arc, m = _commit(tmp_path, net)
    with arc:
        for planes in (1, 2, int(dtype.itemsize)):
            assert _holds(bound_outputs(net, arc.read_planes(m.id, planes), x), y), planes
        r = evaluate_progressive(net, arc, m.id, x, check=True)
        assert torch.equal(r.labels, y.argmax(1))


def _overflow_net(dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    """A hidden unit beyond the largest finite value of ``dtype`` (Inf in the model), then ``0 * Inf``: the
    logits are [Inf, NaN], argmax 1; float64 intervals kept the unit finite and decided class 0."""
    big = torch.finfo(dtype).max
    net = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 2)).to(dtype)
    with torch.no_grad():
        net[0].weight.fill_(big * 0.9), net[0].bias.fill_(big * 0.9)
        net[2].weight.copy_(torch.tensor([[1.0], [0.0]])), net[2].bias.copy_(torch.tensor([0.0, 1.0]))
    return net.eval(), torch.ones(1, 1, dtype=dtype)


class _AddOverflow(nn.Module):
    """Two finite halves whose sum overflows (a residual add), then a weight of 0: NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(1, 1), nn.Linear(1, 1), nn.Linear(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.a(x) + self.b(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_overflow_to_inf_leaves_the_label_to_the_model(tmp_path: Path, dtype: torch.dtype) -> None:
    """Where a unit may overflow in the model's dtype its interval is unbounded, so a NaN logit
    (which argmax picks) is never outvoted by float64 intervals that stayed finite."""
    big = torch.finfo(dtype).max
    add = _AddOverflow().to(dtype)
    with torch.no_grad():
        for lin in (add.a, add.b):
            lin.weight.fill_(big * 0.6), lin.bias.zero_()
        add.out.weight.copy_(torch.tensor([[1.0], [0.0]])), add.out.bias.copy_(torch.tensor([0.0, 1.0]))
    for net, x in (_overflow_net(dtype), (add.eval(), torch.ones(1, 1, dtype=dtype))):
        with torch.no_grad():
            y = net(x)
        assert bool(y[0, 1].isnan())  # the premise: a NaN logit
        with gpupas.create_archive(tmp_path / str(id(net))) as arc:
            m = arc.commit(net.state_dict(), layout=BOUNDED)
            for planes in range(1, int(dtype.itemsize) + 1):
                box = bound_outputs(net, arc.read_planes(m.id, planes), x)
                assert _holds(box, y) and not bool(decide(box.lo, box.hi)[0].any()), planes
            r = evaluate_progressive(net, arc, m.id, x, check=True)
            assert r.labels.tolist() == [1] and r.planes.tolist() == [int(dtype.itemsize)]


class _FnSoftplus(nn.Module):
    def __init__(self, beta: float, threshold: float) -> None:
        super().__init__()
        self.fc, self.beta, self.threshold = nn.Linear(1, 1, bias=False), beta, threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.fc(x), self.beta, self.threshold)


@pytest.mark.parametrize("beta,threshold", [(1.0, 0.5), (2.0, 20.0), (0.5, -1.0), (3.0, 0.0), (1.0, 200.0)])
def test_softplus_is_bounded_across_its_threshold(tmp_path: Path, beta: float, threshold: float) -> None:
    """``softplus`` switches from ``log1p(exp(beta x)) / beta`` to ``x`` above ``beta x > threshold``, where it
    drops: it is not monotone, and an interval across the switch must hold both branches."""
    x = torch.linspace(-6, 6, 401).reshape(-1, 1) + threshold / beta
    for net in (nn.Sequential(nn.Linear(1, 1, bias=False), nn.Softplus(beta, threshold)), _FnSoftplus(beta, threshold)):
        net = net.eval()
        with torch.no_grad():
            (net[0] if isinstance(net, nn.Sequential) else net.fc).weight.fill_(0.999)
            y = net(x)
        with gpupas.create_archive(tmp_path / str(id(net))) as arc:
            m = arc.commit(net.state_dict(), layout=BOUNDED)
            for planes in (1, 2, 3, 4):
                box = bound_outputs(net, arc.read_planes(m.id, planes), x)
                assert _holds(box, y) and not bool((box.lo > box.hi).any()), planes
            z = beta * 0.999 * x  # exp(z) is Inf in float32 from z = 88.7: unbounded is right only near there
            assert bool(torch.isfinite(box.lo[torch.isfinite(y) & ((z < 86) | (z > threshold * 1.01 + 0.01))]).all())


def test_softplus_threshold_mislabel(tmp_path: Path) -> None:
    """The tester's case: an interval across threshold 0.5 came out inverted and decided class 0."""
    net = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Softplus(beta=1.0, threshold=0.5), nn.Linear(1, 2)).eval()
    with torch.no_grad():
        net[0].weight.fill_(0.999)
        net[2].weight.copy_(torch.tensor([[1.0], [0.0]])), net[2].bias.copy_(torch.tensor([0.0, 0.7]))
    x = torch.tensor([[0.5015]])
    with gpupas.create_archive(tmp_path / "a") as arc:
        m = arc.commit(net.state_dict(), layout=BOUNDED)
        assert evaluate_progressive(net, arc, m.id, x, check=True).labels.tolist() == [1]


class _WithEmpty(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.e = nn.Linear(4, 3), nn.Linear(4, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.e(x)], 1)


def test_a_layer_without_outputs_is_bounded(tmp_path: Path) -> None:
    """A layer of no outputs (a zero-width head) has no largest weight sum: it is bounded, not an error."""
    net = _WithEmpty().eval()
    x = torch.randn(2, 4)
    with gpupas.create_archive(tmp_path / "a") as arc:
        m = arc.commit(net.state_dict())
        box = bound_outputs(net, arc.read_planes(m.id, 4), x)
    with torch.no_grad():
        y = net(x)
    assert box.lo.shape == y.shape and bool(((box.lo <= y) & (y <= box.hi)).all())


def test_inverted_or_nan_intervals_decide_nothing() -> None:
    lo = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    hi = torch.tensor([[1.0, 0.5], [3.0, float("nan")], [3.0, 0.5]], dtype=torch.float64)
    for k in (1, 2):
        assert decide(lo, hi, k)[0].tolist() == [False, False, True]


def test_integer_inputs_are_refused_with_the_remedy(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Linear(4, 3)).eval()
    with gpupas.create_archive(tmp_path / "a") as arc:
        m = arc.commit(net.state_dict(), layout=BOUNDED)
        for x in (torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.float64)):
            with pytest.raises(InvalidInputError, match=r"inputs are torch\.(int64|float64).*torch\.float32"):
                evaluate_progressive(net, arc, m.id, x)
            with pytest.raises(InvalidInputError, match="cast"):
                bound_outputs(net, arc.read_planes(m.id, 2), x)
