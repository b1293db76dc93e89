"""gpupas (default setting) on kinds of checkpoints its own benchmark sets never used, against ZipNN and
zstd-3: stored bytes, commit/restore wall time against ZipNN's, and bit-exact round trips.

    PYTHONPATH=. python benchmarks/generalize.py [--sets 1,2,...] [--repeat 2] [--no-fsync] [--detail]
                                                 [--out results.md]

Every checkpoint is made here with torch on the CPU (seeded, a few seconds each, at most ~30 MB raw);
nothing is downloaded. Sets: 1 fp16 transformer weights after a few Adam steps (materialized, and each
snapshot a delta on the one before); 2 a full training checkpoint (weights + Adam exp_avg/exp_avg_sq in one
dict), snapshots a few steps apart; 3 LoRA (frozen fp32 base + rank-8 A/B adapters, only the adapters
change); 4 a 50k x 64 embedding table with sparse row updates; 5 int8 weights with fp32 per-channel
scales; 6 float8_e4m3fn weights with fp32 scales; 7 ~3000 tiny tensors of a deep narrow model; 8 freshly
initialised weights; 9 magnitude-pruned weights (50/70/90% zeros); 10 one snapshot committed twice.

Timing as ``benchmarks/fast.py``: per snapshot the best of ``--repeat`` runs after an untimed warm-up;
gpupas writes a fresh archive each run (durable unless ``--no-fsync``) and restores a delta with its base
in memory; peers compress to and decompress from memory, with the same base (XOR delta). Ratios are
gpupas / peer: size below 1 means gpupas stores less, time above 1 means gpupas is slower.
``--detail`` prints each case's largest gpupas tensors with their encoding, context and stored bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

Tensors = dict[str, np.ndarray]
Snaps = list[Tensors]
Pairs = list[tuple[int, int | None]]


# --------------------------------------------------------------------------- checkpoints (torch, CPU, seeded)


def _torch():
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return torch


def _np(sd: dict, dtype=None) -> Tensors:
    out = {}
    for k, v in sd.items():
        t = v.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if str(t.dtype) == "torch.bfloat16":  # no NumPy bf16 in torch: through the int16 bit patterns
            import ml_dtypes
            import torch

            out[k] = t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        else:
            out[k] = t.contiguous().numpy().copy()
    return out


def _transformer(vocab: int = 4000, d: int = 256, layers: int = 4, ff: int = 1024):
    torch = _torch()
    from torch import nn

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(vocab, d)
            layer = nn.TransformerEncoderLayer(d, 4, ff, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.head = nn.Linear(d, vocab)

        def forward(self, x):
            return self.head(self.enc(self.emb(x)))

    return torch, LM()


def _train(torch, model, steps: int, opt, vocab: int = 4000, every: int = 0,
           grab: Callable[[], Tensors] | None = None) -> list[Tensors]:
    """``steps`` steps of next-token loss on random tokens; ``grab()`` after every ``every`` steps."""
    g = torch.Generator().manual_seed(1)
    got = []
    for s in range(1, steps + 1):
        x = torch.randint(0, vocab, (8, 33), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if every and grab is not None and s % every == 0:
            got.append(grab())
    return got


def _chain(snaps: Snaps) -> dict[str, Pairs]:
    """The first snapshot whole, and each one as a delta on the one before."""
    return {"mat": [(0, None)], "delta": [(i, i - 1) for i in range(1, len(snaps))]}


def _stepped(m: Any, opt: Any, loss_of: Callable[[], Any], steps: int) -> Snaps:
    """``m``'s state now and after each of ``steps`` optimizer steps on ``loss_of()``."""
    snaps = [_np(m.state_dict())]
    for _ in range(steps):
        loss = loss_of()
        opt.zero_grad()
        loss.backward()
        opt.step()
        snaps.append(_np(m.state_dict()))
    return snaps


def set_fp16() -> tuple[Snaps, dict[str, Pairs]]:
    torch, m = _transformer()
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    snaps = [_np(m.state_dict(), torch.float16)]
    snaps += _train(torch, m, 6, opt, every=2, grab=lambda: _np(m.state_dict(), torch.float16))
    return snaps, {"mat": [(0, None), (len(snaps) - 1, None)], "delta": [(i, i - 1) for i in range(1, len(snaps))]}


def set_adam() -> tuple[Snaps, dict[str, Pairs]]:
    torch, m = _transformer(vocab=2000, d=192, layers=3, ff=768)
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    names = dict(m.named_parameters())

    def full() -> Tensors:
        out = _np(m.state_dict())
        for n, p in names.items():
            st = opt.state[p]
            out[f"optimizer.{n}.exp_avg"] = st["exp_avg"].numpy().copy()
            out[f"optimizer.{n}.exp_avg_sq"] = st["exp_avg_sq"].numpy().copy()
        return out

    snaps = _train(torch, m, 9, opt, vocab=2000, every=3, grab=full)
    return snaps, _chain(snaps)


def set_lora() -> tuple[Snaps, dict[str, Pairs]]:
    torch, m = _transformer(vocab=3000, d=256, layers=4, ff=1024)
    base = _np(m.state_dict())
    g = torch.Generator().manual_seed(2)
    r = 8
    adapters = {}
    for i in range(4):
        for w in ("q", "v"):
            adapters[f"lora.{i}.{w}.A"] = (torch.randn(r, 256, generator=g) * 0.01).requires_grad_()
            adapters[f"lora.{i}.{w}.B"] = torch.zeros(256, r).requires_grad_()
    opt = torch.optim.Adam(adapters.values(), lr=1e-3)

    def snap() -> Tensors:
        return {**base, **_np(adapters)}

    snaps = [snap()]
    for _ in range(3):
        for _ in range(2):  # a few steps on a surrogate loss that moves A and B
            loss = sum(((a @ torch.randn(a.shape[1], 4, generator=g)) ** 2).mean()
                       for a in adapters.values()) + sum((adapters[f"lora.{i}.q.B"] - 0.01).pow(2).sum()
                                                         for i in range(4))
            opt.zero_grad()
            loss.backward()
            opt.step()
        snaps.append(snap())
    return snaps, _chain(snaps)


def set_embedding() -> tuple[Snaps, dict[str, Pairs]]:
    torch = _torch()
    emb = torch.nn.Embedding(50_000, 64, sparse=True)
    opt = torch.optim.SparseAdam(emb.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(3)
    snaps = _stepped(emb, opt, lambda: emb(torch.randint(0, 50_000, (300,), generator=g)).pow(2).sum(), 3)
    return snaps, _chain(snaps)


def _trained_fp32(steps: int = 6, every: int = 2) -> list[Tensors]:
    torch, m = _transformer()
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    return _train(torch, m, steps, opt, every=every, grab=lambda: _np(m.state_dict()))


def _quant(snap: Tensors, kind: str) -> Tensors:
    out = {}
    for k, w in snap.items():
        if w.ndim != 2:
            out[k] = w
            continue
        amax = np.abs(w).max(axis=1, keepdims=True).astype(np.float32)
        if kind == "int8":
            scale = np.maximum(amax, 1e-12) / 127
            out[k] = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        else:
            import ml_dtypes
            import torch

            scale = np.maximum(amax, 1e-12) / 448
            q = torch.from_numpy(w / scale).to(torch.float8_e4m3fn)
            out[k] = q.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn).copy()
        out[k + ".scale"] = scale.reshape(-1).astype(np.float32)
    return out


def set_int8() -> tuple[Snaps, dict[str, Pairs]]:
    snaps = [_quant(s, "int8") for s in _trained_fp32()]
    return snaps, _chain(snaps)


def set_fp8() -> tuple[Snaps, dict[str, Pairs]]:
    snaps = [_quant(s, "fp8") for s in _trained_fp32()]
    return snaps, _chain(snaps)


def set_tiny() -> tuple[Snaps, dict[str, Pairs]]:
    torch = _torch()
    from torch import nn

    blocks = [nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16)) for _ in range(750)]  # 4 tensors each
    m = nn.Sequential(*blocks)
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    x = torch.randn(32, 16)
    snaps = _stepped(m, opt, lambda: m(x).pow(2).mean(), 2)
    return snaps, _chain(snaps)


def set_init() -> tuple[Snaps, dict[str, Pairs]]:
    torch, m = _transformer()
    return [_np(m.state_dict()), _np(m.state_dict(), torch.bfloat16)], {"fp32": [(0, None)], "bf16": [(1, None)]}


def set_pruned() -> tuple[Snaps, dict[str, Pairs]]:
    w = _trained_fp32(2, 2)[0]
    snaps = []
    for frac in (0.5, 0.7, 0.9):
        out = {}
        for k, a in w.items():
            if a.ndim == 2:
                t = np.quantile(np.abs(a), frac)
                a = np.where(np.abs(a) < t, np.float32(0), a).astype(np.float32)
            out[k] = a
        snaps.append(out)
    return snaps, {"mat": [(i, None) for i in range(3)], "delta": [(1, 0), (2, 1)]}


def set_twice() -> tuple[Snaps, dict[str, Pairs]]:
    w = _trained_fp32(2, 2)[0]
    return [w, {k: v.copy() for k, v in w.items()}], {"delta": [(1, 0)]}


SETS: dict[str, tuple[str, Callable[[], tuple[Snaps, dict[str, Pairs]]]]] = {
    "1": ("fp16 transformer", set_fp16),
    "2": ("Adam training ckpt fp32", set_adam),
    "3": ("LoRA (base + adapters)", set_lora),
    "4": ("embedding 50k x 64 sparse", set_embedding),
    "5": ("int8 + fp32 scales", set_int8),
    "6": ("fp8 e4m3 + fp32 scales", set_fp8),
    "7": ("3000 tiny tensors", set_tiny),
    "8": ("fresh init", set_init),
    "9": ("pruned 50/70/90%", set_pruned),
    "10": ("same snapshot twice", set_twice),
}


# --------------------------------------------------------------------------- measuring


@dataclass
class Res:
    raw: int = 0
    stored: int = 0
    enc: float = 0.0
    dec: float = 0.0
    entries: list = field(default_factory=list)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def run_gpupas(snaps: Snaps, pairs: Pairs, repeat: int, durable: bool) -> Res:
    import gpupas

    res = Res()
    enc = [float("inf")] * len(pairs)
    dec = [float("inf")] * len(pairs)
    with tempfile.TemporaryDirectory(dir=os.environ.get("GPUPAS_BENCH_TMP")) as tmp:
        for rep in range(repeat + 1):
            with gpupas.create_archive(Path(tmp) / f"arc{rep}", durable=durable) as arc:
                for k, (i, b) in enumerate(pairs):
                    if b is not None and not arc.store.has_manifest(f"s{b}"):
                        arc.commit(snaps[b], snapshot=f"s{b}")
                    base = None if b is None else f"s{b}"
                    t = time.perf_counter()
                    m = arc.commit(snaps[i], base=base, snapshot=f"s{i}")
                    enc[k] = min(enc[k], time.perf_counter() - t) if rep else enc[k]
                    if base is not None:
                        grand = arc.manifest(base).base
                        for s in ([grand] if grand else []) + [base]:
                            arc.restore(s)
                    arc.bases.drop(m.id)
                    t = time.perf_counter()
                    out = arc.restore(m.id)
                    dec[k] = min(dec[k], time.perf_counter() - t) if rep else dec[k]
                    for name, v in snaps[i].items():
                        if not _same(np.asarray(out[name]), v):
                            raise AssertionError(f"gpupas: tensor {name} did not round-trip")
                    if rep == 0:
                        res.raw += m.raw_bytes
                        res.stored += m.stored_bytes
                        res.entries.extend(m.tensors)
    res.enc, res.dec = sum(enc), sum(dec)
    return res


def run_peer(peer, snaps: Snaps, pairs: Pairs, repeat: int) -> Res:
    res = Res()
    for i, b in pairs:
        base = None if b is None else snaps[b]
        tensors = snaps[i]
        blob = peer.compress(tensors, base)  # warm-up
        be = bd = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            blob = peer.compress(tensors, base)
            be = min(be, time.perf_counter() - t)
        for _ in range(repeat):
            t = time.perf_counter()
            out = peer.decompress(blob, base)
            bd = min(bd, time.perf_counter() - t)
        for name, v in tensors.items():
            if not _same(np.asarray(out[name]), v):
                raise AssertionError(f"{peer.name}: tensor {name} did not round-trip")
        res.raw += sum(v.nbytes for v in tensors.values())
        res.stored += peer.size(blob)
        res.enc += be
        res.dec += bd
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-fsync", action="store_true")
    ap.add_argument("--detail", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from benchmarks.peers import ZipNNPeer, ZstdPeer

    zipnn, zstd = ZipNNPeer(), ZstdPeer()
    lines = ["| set | case | raw MB | gpupas B | ZipNN B | zstd-3 B | gpupas/ZipNN | gpupas/zstd | "
             "commit/ZipNN | restore/ZipNN |", "|---|---|---|---|---|---|---|---|---|---|"]
    flags = []
    for key in args.sets.split(","):
        label, make = SETS[key]
        t = time.perf_counter()
        snaps, cases = make()
        print(f"[{key}] {label}: built {len(snaps)} snapshots, {len(snaps[0])} tensors, "
              f"{sum(v.nbytes for v in snaps[0].values()) / 1e6:.1f} MB each, {time.perf_counter() - t:.1f}s",
              file=sys.stderr, flush=True)
        for case, pairs in cases.items():
            try:
                g = run_gpupas(snaps, pairs, args.repeat, not args.no_fsync)
            except Exception as exc:  # a failure is a finding: report it and go on
                lines.append(f"| {key} {label} | {case} | | FAILED: {type(exc).__name__}: {exc} | | | | | | |")
                flags.append(f"{key}/{case}: failed")
                continue
            z = run_peer(zipnn, snaps, pairs, args.repeat)
            s = run_peer(zstd, snaps, pairs, args.repeat)
            rz, rs = g.stored / z.stored, g.stored / s.stored
            ce, cd = g.enc / z.enc, g.dec / z.dec
            lines.append(f"| {key} {label} | {case} | {g.raw / 1e6:.1f} | {g.stored:,} | {z.stored:,} | {s.stored:,} "
                         f"| {rz:.3f} | {rs:.3f} | {ce:.2f} | {cd:.2f} |")
            print(lines[-1], flush=True)
            if rz > 1.01 or rs > 1.01 or ce > 2 or cd > 2:
                flags.append(f"{key}/{case}: size {rz:.3f}/{rs:.3f}, time {ce:.2f}/{cd:.2f}")
            if args.detail:
                top = sorted(g.entries, key=lambda e: -e.stored)[:8]
                for e in top:
                    print(f"    {e.name:40s} {e.dtype:14s} {e.nbytes:>10,} enc={e.enc} ctx={e.ctx} "
                          f"stored={e.stored:,}", flush=True)
    text = "\n".join([*lines, "", "flags: " + ("; ".join(flags) or "none")])
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
