"""The seams of the design: a light import, errors that say what happened, chains decoded once per link,
versions on a remote store, and one host-transfer function per backend."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpupas
from gpupas.errors import EXIT_CODES, FormatError, NotFoundError, TensorNotFoundError, exit_code

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("numpy", "zarr", "numcodecs", "torch", "cupy", "nvidia", "zstandard", "isal", "zlib_ng", "dask",
         "distributed", "fsspec", "sqlite3")


def _imported(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"import sys\n{code}\nprint(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return {m.split(".")[0] for m in out.stdout.split()}


def test_import_gpupas_loads_nothing_heavy() -> None:
    assert not _imported("import gpupas") & set(HEAVY)


def test_help_and_version_load_no_archive_code() -> None:
    for argv in (["--help"], ["--version"], ["log", "--help"]):
        res = subprocess.run([sys.executable, "-X", "importtime", "-m", "gpupas", *argv], capture_output=True,
                             text=True, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        loaded = {line.split("|")[-1].strip().split(".")[0] for line in res.stderr.splitlines() if "|" in line}
        assert not loaded & set(HEAVY), (argv, loaded & set(HEAVY))


def test_error_kinds_map_to_exit_codes() -> None:
    assert exit_code(FormatError("newer")) == 5 and exit_code(TensorNotFoundError("x")) == 1
    assert exit_code(gpupas.IntegrityError("bad")) == 3 and exit_code(gpupas.InvalidInputError("no")) == 2
    assert exit_code(RuntimeError("?")) == 4
    assert all(issubclass(k, BaseException) for k, _ in EXIT_CODES)
    assert issubclass(TensorNotFoundError, KeyError) and issubclass(TensorNotFoundError, NotFoundError)
    assert str(TensorNotFoundError("no tensor 'x'")) == "no tensor 'x'"  # not KeyError's quoting


def test_missing_tensor_and_newer_archive(tmp_path: Path) -> None:
    with gpupas.create_repository(tmp_path / "a") as repo:
        v = repo.commit("m", {"w": np.ones(3, np.float32)})
        with pytest.raises(TensorNotFoundError, match="nope"):
            repo.restore(v.id, names=["nope"])
    root = json.loads((tmp_path / "a" / "zarr.json").read_text())
    root["attributes"]["gpupas"]["format"] = 99
    (tmp_path / "a" / "zarr.json").write_text(json.dumps(root))
    with pytest.raises(FormatError, match="upgrade gpupas"):
        gpupas.open_archive(tmp_path / "a")
    res = subprocess.run([sys.executable, "-m", "gpupas", "-A", str(tmp_path / "a"), "log"], capture_output=True,
                         text=True, cwd=ROOT)
    assert res.returncode == 5 and "upgrade gpupas" in res.stderr and "Traceback" not in res.stderr


def test_a_chain_is_decoded_once_per_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpupas.engine import decode

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 64)) * 0.02).astype(np.float32)
    with gpupas.create_repository(tmp_path / "a") as repo:
        repo.archive.max_chain = 16
        v = repo.commit("chain", {"w": w})
        for _ in range(16):
            w = (w + rng.standard_normal(w.shape).astype(np.float32) * 1e-4).astype(np.float32)
            v = repo.add_snapshot(v.id, {"w": w})
        sids = [s["id"] for s in v.snapshots]
    assert len(sids) == 17
    calls: list[str] = []
    real = decode.decode_snapshot

    def counting(store: object, m: gpupas.Manifest, *args: object) -> object:
        calls.append(m.id)
        return real(store, m, *args)

    monkeypatch.setattr(decode, "decode_snapshot", counting)
    with gpupas.open_repository(tmp_path / "a") as repo:
        assert repo.archive.depth(sids[-1]) == 16
        result = repo.verify()
        assert result["ok"] and result["checked"]["snapshots"] == 17
        assert sorted(calls) == sorted(sids)  # 17 decodes, not 1 + 2 + ... + 17 = 153
        calls.clear()
        assert repo.archive.verify(sids[-1]) == 1  # the tip alone: its chain, each link once
        assert sorted(calls) == sorted(sids)
        calls.clear()
        repo.restore(v.id)
        repo.restore(v.id)  # the second time from memory
        assert sorted(calls) == sorted(sids)


def test_numpy_commits_copy_nothing_to_the_host(tmp_path: Path) -> None:
    from gpupas.backend import get_backend

    backend = get_backend("numpy")
    before = backend.to_host_bytes
    with gpupas.create_archive(tmp_path / "a") as a:
        m = a.commit({"w": np.arange(1000, dtype=np.float32)})
        a.restore(m.id)
    assert backend.to_host_bytes == before


def test_device_resolution_falls_back_to_numpy_once(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from gpupas.backend import base

    base._BACKENDS.pop("cupy", None)
    base._warned.discard("cupy")
    with caplog.at_level(logging.WARNING, logger="gpupas"):
        for _ in range(3):
            assert base.get_backend(base.resolve_device("cuda")).name == "numpy"  # no GPU on this machine
    assert sum("GPU backend is unavailable" in r.message for r in caplog.records) == 1
    assert base.resolve_device(None, {"w": np.zeros(2)}) == "numpy"
    with pytest.raises(gpupas.InvalidInputError):
        base.resolve_device("tpu")


LAYERS = [  # docs/architecture.md's diagram, top to bottom: a module imports from its own layer or below
    ["cli"], ["integrations.training", "integrations.async_commit", "integrations.progressive"], ["inspect"],
    ["jobs"], ["plan"], ["versions"], ["catalog", "query", "network"], ["tiers"], ["archive"], ["engine"],
    ["tensors"], ["backend"], ["codecs"], ["store"], ["format"], ["pas"],
    ["xp", "integrations.torch", "integrations.safetensors"], ["outputs"], ["errors"],
]
UPWARD = {  # the named exceptions (docs/architecture.md), each a lazy import inside one function
    ("gpupas.versions.verify", "gpupas.jobs"),  # verify runs the jobs' verify graph (jobs' gc calls Repository.gc)
    ("gpupas.codecs.nvcomp", "gpupas.backend"),  # the device's CRC-32 kernel around a gzip member
    ("gpupas.archive", "gpupas.tiers"),  # Archive.tier: the method form of tiers.move (a revision of the archive)
}


def _layer(module: str) -> int | None:
    rest = module.removeprefix("gpupas.")
    for i, layer in enumerate(LAYERS):
        if any(rest == u or rest.startswith(u + ".") for u in layer):
            return i
    return None


def test_imports_go_down_the_layers() -> None:
    import ast

    upward, unplaced = set(), set()
    for f in (ROOT / "gpupas").rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if module in ("gpupas", "gpupas.__main__", "gpupas.integrations"):  # the facade; the CLI's start; a docstring
            continue
        me = _layer(module)
        if me is None:
            unplaced.add(module)
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "gpupas" and not node.level:
                names = [f"gpupas.{a.name}" for a in node.names]  # from gpupas import tiers: a module too
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.startswith("gpupas.") and (them := _layer(name)) is not None and them < me:
                    upward.add((module, ".".join(name.split(".")[:2])))
    assert not unplaced, f"modules the layer diagram does not place: {sorted(unplaced)}"
    assert upward == UPWARD, f"imports up the layers: {sorted(upward - UPWARD)}; gone: {sorted(UPWARD - upward)}"
