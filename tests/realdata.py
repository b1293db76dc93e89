"""Real training checkpoints for the version-layer tests: scikit-learn's bundled digits (no download).

With torch: a small CNN (conv1 -> relu -> max pool -> conv2 -> relu -> max pool -> fc1 -> fc2)
trained with Adam. Without torch: a NumPy MLP trained with SGD. Either way a folder of
``step-NNNN.safetensors`` checkpoints, a ``train_log.csv`` (step, loss, accuracy, lr), a
``config.json`` and the model's ``network.json`` (torch.fx graph), made once per test session.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from gpupas.integrations.safetensors import save_file

STEPS_PER_CHECKPOINT = 15
CHECKPOINTS = 4
_CACHE: dict[tuple[str, bool], Path] = {}


def have_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (bundled with it); without scikit-learn, noisy class prototypes of the same shape."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # scikit-learn belongs in the test extra; keep the tests running without it
        rng = np.random.default_rng(0)
        protos = rng.random((10, 64))
        y = rng.integers(0, 10, 1797)
        x = np.clip(protos[y] + 0.3 * rng.standard_normal((1797, 64)), 0, 1)
        return x.astype(np.float32), y.astype(np.int64)
    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def make_cnn() -> Any:
    import torch.nn.functional as F
    from torch import nn

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
            self.pool = nn.MaxPool2d(2)
            self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
            self.fc1 = nn.Linear(16 * 2 * 2, 32)
            self.fc2 = nn.Linear(32, 10)

        def forward(self, x: Any) -> Any:
            x = self.pool(F.relu(self.conv1(x)))
            x = F.max_pool2d(F.relu(self.conv2(x)), 2)
            return self.fc2(F.relu(self.fc1(x.flatten(1))))

    return DigitsCNN()


def _train_torch(folder: Path, lr: float) -> list[dict[str, float]]:
    import torch

    from gpupas.integrations.torch import tensor_to_numpy

    torch.manual_seed(0)
    x, y = _digits()
    xt, yt = torch.from_numpy(x).reshape(-1, 1, 8, 8), torch.from_numpy(y)
    model = make_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    log, step = [], 0
    g = torch.Generator().manual_seed(1)
    for _ in range(CHECKPOINTS):
        for _ in range(STEPS_PER_CHECKPOINT):
            idx = torch.randint(0, len(xt), (128,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            with torch.no_grad():
                acc = (model(xt).argmax(1) == yt).float().mean().item() if step % 5 == 0 else None
            log.append({"step": step, "loss": loss.item(), "accuracy": acc, "lr": lr})
        state = {k: tensor_to_numpy(v) for k, v in model.state_dict().items()}
        save_file(state, folder / f"step-{step:04d}.safetensors")
    return log


def _train_numpy(folder: Path, lr: float) -> list[dict[str, float]]:
    rng = np.random.default_rng(0)
    x, y = _digits()
    w1 = (rng.standard_normal((32, 64)) * 0.1).astype(np.float32)
    b1 = np.zeros(32, np.float32)
    w2 = (rng.standard_normal((10, 32)) * 0.1).astype(np.float32)
    b2 = np.zeros(10, np.float32)
    log, step = [], 0
    for _ in range(CHECKPOINTS):
        for _ in range(STEPS_PER_CHECKPOINT):
            idx = rng.integers(0, len(x), 128)
            xb, yb = x[idx], y[idx]
            h = np.maximum(xb @ w1.T + b1, 0)
            z = h @ w2.T + b2
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            loss = float(-np.log(p[np.arange(len(yb)), yb] + 1e-9).mean())
            g = p
            g[np.arange(len(yb)), yb] -= 1
            g /= len(yb)
            gw2, gb2 = g.T @ h, g.sum(0)
            gh = (g @ w2) * (h > 0)
            gw1, gb1 = gh.T @ xb, gh.sum(0)
            w1 -= lr * 20 * gw1
            b1 -= lr * 20 * gb1
            w2 -= lr * 20 * gw2
            b2 -= lr * 20 * gb2
            step += 1
            acc = None
            if step % 5 == 0:
                acc = float(((np.maximum(x @ w1.T + b1, 0) @ w2.T + b2).argmax(1) == y).mean())
            log.append({"step": step, "loss": loss, "accuracy": acc, "lr": lr})
        save_file({"fc1.weight": w1, "fc1.bias": b1, "fc2.weight": w2, "fc2.bias": b2},
                  folder / f"step-{step:04d}.safetensors")
    return log


def training_run(base: Path, use_torch: bool | None = None, lr: float = 0.01) -> Path:
    """A folder of real checkpoints of one training run (made once per ``base`` and kind)."""
    use_torch = have_torch() if use_torch is None else use_torch
    key = (str(base), use_torch)
    if key in _CACHE:
        return _CACHE[key]
    folder = base / ("digits-torch" if use_torch else "digits-numpy")
    folder.mkdir(parents=True)
    log = (_train_torch if use_torch else _train_numpy)(folder, lr)
    with open(folder / "train_log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "loss", "accuracy", "lr"])
        w.writeheader()
        for row in log:
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    if use_torch:
        from gpupas.network import network_from_module

        network = network_from_module(make_cnn()).to_dict()
    else:
        network = {"source": "given", "edges": [[0, 1], [1, 2], [2, 3], [3, 4]],
                   "nodes": [{"id": i, "name": n, "type": t, "attrs": {}} for i, (n, t) in enumerate(
                       [("x", "input"), ("fc1", "Linear"), ("relu", "relu"), ("fc2", "Linear"), ("output", "output")])]}
    (folder / "network.json").write_text(json.dumps(network))
    (folder / "config.json").write_text(json.dumps({"lr": lr, "batch_size": 128, "model": "cnn" if use_torch else
                                                   "mlp", "optimizer": "adam" if use_torch else "sgd"}))
    _CACHE[key] = folder
    return folder
