"""docs/FORMAT.md is complete: archives decode bit for bit with stock zarr + NumPy alone.

gpupas writes the archives and says what they must restore to; :mod:`tests.recipe`, which never
imports gpupas, reads them. Every encoding, dtype, layout and codec the writer has is checked to
occur (so no test passes vacuously), and the golden archives of formats 1 and 2 decode too.
"""

from __future__ import annotations

import ast
import json
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import zarr
from numcodecs.zstd import Zstd

import gpupas
from gpupas.pas.planes import LAYOUTS
from tests import recipe
from tests.conftest import adversarial

FIXTURES = Path(__file__).parent / "fixtures"
TINY_SEGMENT = 1000  # values per segment in the 'pred' chain: rows of 96 and 37 values straddle segments
SMALL = gpupas.Layout(groups=(1,), chunk_size=65536)


# -- what gets committed ------------------------------------------------------------------------------------------
def _whole(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for i, name in enumerate(sorted(LAYOUTS)):
        dt = LAYOUTS[name].dtype
        out[f"adv.{name}"] = adversarial(dt, 257, i)
        out[f"odd.{name}"] = adversarial(dt, 231, 100 + i).reshape(7, 11, 3)
        out[f"empty.{name}"] = adversarial(dt, 0).reshape(0, 3)
        out[f"scalar.{name}"] = adversarial(dt, 1, 200 + i).reshape(())
    out["dense"] = (rng.standard_normal((160, 384)) * 0.02).astype(np.float32)  # over one chunk; split under strong
    out["emb"] = (rng.standard_normal((512, 96)) * 0.05).astype(np.float32)  # rows that stay put
    out["head"] = (rng.standard_normal((96, 200)) * 0.05).astype(ml_dtypes.bfloat16)  # XOR-friendly changes
    out["noise"] = rng.integers(0, 2**32, 40_000, dtype=np.uint32).view(np.float32)  # raw chunks
    out["reshaped"] = np.arange(60, dtype=np.float32).reshape(6, 10)
    return out


def _step(prev: dict[str, np.ndarray], seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = dict(prev)
    out["dense"] = prev["dense"] + (rng.standard_normal(prev["dense"].shape) * 2e-4).astype(np.float32)
    rows = np.zeros(512, bool)
    rows[rng.choice(512, 64, replace=False)] = True  # an eighth of the rows change
    emb = prev["emb"].copy()
    emb[rows] += (rng.standard_normal((64, 96)) * 1e-3).astype(np.float32)
    out["emb"] = emb
    flips = rng.integers(0, 2, (96, 200), dtype=np.uint16) << rng.integers(0, 4, (96, 200), dtype=np.uint16)
    out["head"] = (prev["head"].view(np.uint16) ^ flips).view(ml_dtypes.bfloat16)
    out["adv.int32"] = prev["adv.int32"] + np.int32(7)
    out["reshaped"] = prev["reshaped"].reshape(10, 6) + 1  # another shape: stored whole
    out["new"] = np.full((3, 5), 2.5, np.float32)  # not in the base: stored whole
    return out


def _moving(dtype: str, rows: int, per: int, frozen: float, seed: int) -> list[np.ndarray]:
    """Three snapshots where rows keep moving along their last change, shrinking (Adam leaving a row
    alone), some rows move afresh, and a share ``frozen`` never moves (tests/test_predict.py's chain)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, per)) * 0.05
    step = rng.standard_normal((rows, per)) * 2e-3
    still = rng.random(rows) < frozen
    out = [w.copy()]
    for _ in range(2):
        fresh = rng.random(rows) < 0.2
        step = np.where(fresh[:, None], rng.standard_normal((rows, per)) * 2e-3, step * 0.4)
        step[still] = 0
        w = w + step
        out.append(w.copy())
    return [x.astype(LAYOUTS[dtype].dtype) for x in out]


class Built:
    """An archive with every feature the writer has, and what each snapshot must restore to."""

    def __init__(self, root: Path):
        self.root = root
        self.want: dict[str, dict[str, np.ndarray]] = {}
        self.old_folders: list[str] = []

    def commit(self, a: gpupas.Archive, sid: str, tensors: dict[str, np.ndarray], **kw: Any) -> None:
        a.commit(tensors, snapshot=sid, **kw)
        self.want[sid] = tensors


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    b = Built(tmp_path_factory.mktemp("recipe") / "archive")
    s0 = _whole()
    s1 = _step(s0)
    with gpupas.create_archive(b.root) as a:
        b.commit(a, "whole", s0, setting="strong")  # 'mat' with the context split, Deflate and raw chunks
        b.commit(a, "groups", s0, layout=SMALL)  # plane groups, 64 KiB chunks
        b.commit(a, "delta", s1, base="whole")  # SUB (+ctx), XOR, row masks
        b.commit(a, "edge", {"empty": np.zeros((0, 3), np.float32), "scalar": np.array(-0.0, np.float64),
                             "bytes": np.arange(5, dtype=np.int8)}, layout=SMALL)
        b.commit(a, "nothing", {"empty": np.zeros((0,), np.float16)})  # a stream of no bytes
        chains = {}
        for i, dt in enumerate(("float32", "float16", "bfloat16")):
            chains[f"{dt}.masked"] = _moving(dt, 600, 96, frozen=0.3, seed=i)  # row masks
            chains[f"{dt}.moving"] = _moving(dt, 300, 37, frozen=0.0, seed=10 + i)
        base = None
        for k in range(3):  # 'pred' (with masks and the split), segments of 1000 values
            b.commit(a, f"p{k}", {name: c[k] for name, c in chains.items()}, base=base,
                     layout=gpupas.Layout(groups=(1,), chunk_size=65536, segment=TINY_SEGMENT))
            base = f"p{k}"
        rng = np.random.default_rng(5)
        huge = (rng.standard_normal((1100, 1000)) * 0.02).astype(np.float32)  # over one segment of 2^20 values
        b.commit(a, "huge0", {"huge": huge})
        b.commit(a, "huge1", {"huge": huge + np.float32(1e-4) * rng.standard_normal(huge.shape).astype(np.float32)},
                 base="huge0")
        b.commit(a, "revised", s1, base="whole")
        b.old_folders = a.manifest("revised").folders()
        a.revise("revised", setting="strong", layout=SMALL)
        signed = gpupas.Layout(groups=(1,), rotate=False)  # planes with the sign on top (rot: false)
        b.commit(a, "raw", s0, setting="strong", layout=signed)
        b.commit(a, "rawdelta", s1, base="raw", layout=signed)
        for k, spec in enumerate(("bf16", "fp16:truncate", "fixed:12", "quant:3", "kmeans:5")):  # FORMAT.md 9.9
            sid = f"lossy{k}"
            finite = {n: s0[n] for n in ("dense", "emb", "head")} | {"f64": s0["dense"][:7].astype(np.float64) * k}
            a.commit(s0 if k < 2 else finite, snapshot=sid, lossy=spec,  # casts keep NaN, Inf, -0.0
                     layout=signed if k % 2 else gpupas.Layout())
            b.want[sid] = {n: v.copy() for n, v in a.restore(sid).items()}  # what the scheme kept
    return b


def manifests(b: Built) -> dict[str, dict[str, Any]]:
    return {sid: recipe.read_manifest(b.root, sid) for sid in b.want}


# -- the recipe is independent ------------------------------------------------------------------------------------
def test_recipe_never_imports_gpupas() -> None:
    tree = ast.parse((Path(__file__).parent / "recipe.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert names and not [n for n in names if n.split(".")[0] in ("gpupas", "tests")], names


def test_crc32c_is_castagnoli() -> None:
    assert recipe.crc32c_py(b"123456789") == 0xE3069283 == recipe.crc32c(b"123456789")
    data = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    assert recipe.crc32c_py(data) == recipe.crc32c(data)


# -- nothing passes vacuously -------------------------------------------------------------------------------------
def test_every_feature_occurs(built: Built) -> None:
    ms = manifests(built)
    kinds = {(e["enc"], e["ctx"], e["rows"] is not None) for m in ms.values() for e in m["tensors"]}
    for need in [("mat", False, False), ("mat", True, False), ("sub", False, False), ("sub", True, False),
                 ("sub", False, True), ("pred", True, True), ("pred", False, False)]:
        assert need in kinds, need
    assert any(k[0] == "xor" for k in kinds)
    tensors = [(m, e) for m in ms.values() for e in m["tensors"]]
    assert {e["dtype"] for _, e in tensors} == set(recipe.DTYPES)
    assert any(e["shape"] == [] for _, e in tensors) and any(0 in e["shape"] for _, e in tensors)
    segs = {m["segment"] for m, e in tensors if recipe.values(e) > m["segment"]}
    assert segs == {TINY_SEGMENT, 1 << 20}  # multi-segment tensors at both segment sizes
    assert any(len(e["parts"]) == 2 for _, e in tensors)  # plane groups
    assert ms["groups"]["streams"][0]["chunk_size"] == 65536 and len(ms["groups"]["streams"]) == 2
    assert ms["revised"]["revision"] == 1
    letters = "".join(s["chunks"] for m in ms.values() for s in m["streams"])
    assert "z" in letters and "d" in letters
    assert any(s["length"] == 0 for m in ms.values() for s in m["streams"])
    assert any(e.get("rot") is False and e["enc"] == "sub" for _, e in tensors)
    assert {e["scheme"]["name"] for _, e in tensors if e.get("scheme")} == {"cast", "fixed", "quant"}


# -- decoding ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sid", ["whole", "groups", "delta", "edge", "nothing", "p0", "p1", "p2", "huge0", "huge1",
                                 "revised", "raw", "rawdelta", "lossy0", "lossy1", "lossy2", "lossy3", "lossy4"])
def test_recipe_restores_bit_for_bit(built: Built, sid: str) -> None:
    got = recipe.restore(built.root, sid)
    want = built.want[sid]
    assert got.keys() == want.keys()
    for name, arr in want.items():
        assert got[name].dtype == arr.dtype and got[name].shape == arr.shape, name
        assert got[name].tobytes() == arr.tobytes(), (sid, name)


def test_depth_is_derived(built: Built) -> None:
    assert [recipe.depth(built.root, s) for s in ("whole", "delta", "p0", "p1", "p2")] == [0, 1, 0, 1, 2]
    with gpupas.open_archive(built.root) as a:
        assert a.depth("p2") == 2


def test_revision_names_new_folders_only(built: Built) -> None:
    m = recipe.read_manifest(built.root, "revised")
    folders = [s["folder"] for s in m["streams"]]
    assert not set(folders) & set(built.old_folders)
    assert all((built.root / "snapshots" / f / "zarr.json").is_file() for f in built.old_folders)  # garbage, for gc


def test_the_sketch_in_format_md_decodes(built: Built, tmp_path: Path) -> None:
    """The worked recipe of docs/FORMAT.md (a sketch with few checks) runs as printed, on every snapshot
    here (sign-on-top planes and each lossy scheme included), the golden archives and a local tier."""
    text = (Path(__file__).parents[1] / "docs" / "FORMAT.md").read_text()
    code = text.split("## 17. A worked recipe", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    ns: dict[str, Any] = {"crc32c": recipe.crc32c, "from_legacy": recipe.from_legacy}
    exec(compile(code, "FORMAT.md", "exec"), ns)
    tiered = tmp_path / "tiered"
    with gpupas.create_archive(tiered) as a:
        a.add_tier("cold", tmp_path / "cold")
        m = a.commit(_whole(), layout=gpupas.Layout(groups=(1,), tiers=(None, "cold")))
        assert [s.tier for s in m.streams] == [None, "cold"]
    cases = [(built.root, list(built.want)), (tiered, [m.id])]
    cases += [(FIXTURES / f / "archive", sorted({k.split("|")[0] for k in json.loads(
        (FIXTURES / f / "expected.json").read_text())["tensors"]})) for f in ("format1", "format2", "format3")]
    for root, sids in cases:
        for sid in sids:
            got, want = ns["restore"](root, sid), recipe.restore(root, sid)
            assert got.keys() == want.keys()
            assert all(got[k].tobytes() == v.tobytes() and got[k].shape == v.shape for k, v in want.items()), sid
    assert {"raw", "rawdelta", "lossy2", "lossy3"} <= set(built.want)  # rot: false and the schemes were run


@pytest.mark.parametrize("fmt", ["format1", "format2"])
def test_golden_legacy_archives(fmt: str) -> None:
    index = json.loads((FIXTURES / fmt / "expected.json").read_text())
    root = FIXTURES / fmt / "archive"
    assert recipe.archive_format(root) == int(fmt[-1])
    encs = set()
    restored: dict[str, dict[str, np.ndarray]] = {}
    with np.load(FIXTURES / "expected.npz") as raw:
        for key, t in index["tensors"].items():
            sid, name = key.split("|", 1)
            if sid not in restored:
                restored[sid] = recipe.restore(root, sid)
            got = restored[sid][name]
            dt = recipe.dtype_of(t["dtype"])
            assert got.dtype == dt and list(got.shape) == t["shape"]
            assert got.tobytes() == raw[t["npz"]].tobytes(), (fmt, sid, name)
        for sid in {k.split("|")[0] for k in index["tensors"]}:
            m = recipe.read_manifest(root, sid)
            s = m["streams"][0]
            doc = json.loads((root / "snapshots" / s["folder"] / "zstd" / "zarr.json").read_text())
            assert doc["chunk_grid"]["configuration"]["chunk_shape"] == [s["shard_chunks"] * s["chunk_size"]]
            encs |= {(e["enc"], e["ctx"], e["rows"] is not None) for e in m["tensors"]}
    if fmt == "format2":
        assert ("pred", False, True) in encs and ("pred", True, False) in encs


# -- the bytes on disk ------------------------------------------------------------------------------------------
def test_manifests_are_sealed(built: Built) -> None:
    for sid in built.want:
        data = (built.root / "manifests" / f"{sid}.json").read_bytes()
        obj, sealed = recipe.unseal(data)
        assert sealed and recipe.seal(obj) == data  # compact, ASCII, checksum last, one newline
        body = data[: data.rindex(b',"checksum":')] + b"}"
        assert f"crc32c:{recipe.crc32c_py(body):08x}".encode() in data
        forged = data.replace(b'"revision":', b'"revision": ', 1)
        with pytest.raises(recipe.DamagedError):
            recipe.unseal(forged)


def test_chunks_shards_and_codecs(built: Built) -> None:
    raw_frames = padded = 0
    for m in manifests(built).values():
        for s in m["streams"]:
            size, length = s["chunk_size"], s["length"]
            stored = recipe.stored_chunks(built.root, s)
            assert sorted(stored) == list(range(len(s["chunks"])))
            joined = np.zeros(len(s["chunks"]) * size, np.uint8)
            for c, (cid, payload) in stored.items():
                assert cid == s["codecs"][s["chunks"][c]]
                body, crc = payload[:-4], int.from_bytes(payload[-4:], "little")
                assert recipe.crc32c(body) == crc
                last_padded = c == len(s["chunks"]) - 1 and length % size
                if cid == "zstd":
                    assert body[:4] == b"\x28\xb5\x2f\xfd"
                    raw_frames += body[4] == 0xA0  # a frame of raw blocks: single segment, 4-byte content size
                    out = np.frombuffer(Zstd().decode(body), np.uint8)
                else:
                    assert cid == "deflate" and not last_padded
                    out = np.frombuffer(zlib.decompress(body, wbits=31), np.uint8)  # one gzip member
                assert out.size == size
                joined[c * size : (c + 1) * size] = out
                if last_padded:
                    padded += 1
                    assert not out[length % size :].any()  # zero padding
            assert np.array_equal(joined[:length], recipe.read_stream(built.root, s))  # the OR of the arrays
    assert raw_frames and padded


def test_refuses_what_it_does_not_know(built: Built, tmp_path: Path) -> None:
    from gpupas.errors import FormatError

    root = tmp_path / "a"
    shutil.copytree(built.root / "manifests", root / "manifests")
    shutil.copy(built.root / "zarr.json", root / "zarr.json")
    shutil.copytree(built.root / "snapshots", root / "snapshots", ignore=lambda d, n: [
        x for x in n if d.endswith("snapshots") and x != "zarr.json" and not x.startswith("whole.")])
    original = recipe.unseal((root / "manifests" / "whole.json").read_bytes())[0]
    forgeries = {
        "format": lambda d: d.update(format=4),
        "field": lambda d: d.update(depth=0),
        "tensor field": lambda d: d["tensors"][0].update(scale=1.0),
        "encoding": lambda d: d["tensors"][0].update(enc="lz"),
        "dtype": lambda d: d["tensors"][0].update(dtype="float4_e2m1fn"),
        "codec": lambda d: d["streams"][0]["codecs"].update(z="zstd-next"),  # its array renamed below
    }
    folder = root / "snapshots" / original["streams"][0]["folder"]
    for what, forge in forgeries.items():
        doc = json.loads(json.dumps(original))
        forge(doc)
        (root / "manifests" / "whole.json").write_bytes(recipe.seal(doc))
        if what == "codec":
            (folder / "zstd").rename(folder / "zstd-next")
        with pytest.raises(recipe.FormatError):
            recipe.decode_snapshot(root, "whole")
        with gpupas.open_archive(root) as a, pytest.raises(FormatError, match="upgrade"):
            a.restore("whole")
    (folder / "zstd-next").rename(folder / "zstd")
    (root / "manifests" / "whole.json").write_bytes(recipe.seal(original))
    assert recipe.restore(root, "whole").keys() == built.want["whole"].keys()
    doc = json.loads((root / "zarr.json").read_text())
    doc["attributes"]["gpupas"]["format"] = 4
    (root / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(recipe.FormatError):
        recipe.decode_snapshot(root, "whole")
    with pytest.raises(FormatError, match="upgrade"):
        gpupas.open_archive(root)


# -- stock readers ----------------------------------------------------------------------------------------------
def _arrays(b: Built) -> set[str]:
    return {f"snapshots/{s['folder']}/{cid}" for m in manifests(b).values() for s in m["streams"]
            for cid in s["codecs"].values()}


def test_zarr_lists_every_snapshot_array(built: Built) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # see the next test
        members = dict(zarr.open_group(built.root, mode="r").members(max_depth=None))
    arrays = {k for k, v in members.items() if isinstance(v, zarr.Array)}
    assert _arrays(built) <= arrays
    assert all(members[k].dtype == np.uint8 and members[k].ndim == 1 for k in arrays)


def test_zarr_warns_only_about_what_is_not_zarr(built: Built) -> None:
    """The snapshots group holds Zarr nodes only; at the root, zarr notes the archive's other keys."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zarr.open_group(built.root / "snapshots", mode="r").members(max_depth=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        zarr.open_group(built.root, mode="r").members(max_depth=None)
    allowed = ("manifests", "versions", "refs", "files", "catalog.sqlite")
    for w in caught:
        assert any(f"Object at {a}" in str(w.message) for a in allowed), str(w.message)


def test_tensorstore_reads_what_zarr_reads(built: Built) -> None:
    ts = pytest.importorskip("tensorstore")
    for key in sorted(_arrays(built)):
        path = built.root / key
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
        got = ts.open(spec, read=True).result().read().result()
        assert np.array_equal(got, zarr.open_array(path, mode="r")[:]), key


# -- rules that once broke ------------------------------------------------------------------------------------------
def test_rebasing_a_base_keeps_pred_children_readable(tmp_path: Path) -> None:
    snaps = [{"w": w} for w in _moving("float32", 300, 37, frozen=0.0, seed=3)]
    with gpupas.create_archive(tmp_path / "a") as a:
        for k, s in enumerate(snaps):
            a.commit(s, snapshot=f"s{k}", base=None if k == 0 else f"s{k - 1}")
        assert a.manifest("s2").tensors[0].enc == "pred"
        a.revise("s1", base=None)  # s1's bits do not change
    with gpupas.open_archive(tmp_path / "a") as a:
        assert a.restore("s2")["w"].tobytes() == snaps[2]["w"].tobytes()


def test_longest_snapshot_id_is_readable(tmp_path: Path) -> None:
    sid = "x" * 128
    with gpupas.create_archive(tmp_path / "a") as a:
        a.commit({"w": np.arange(4, dtype=np.float32)}, snapshot=sid)
    with gpupas.open_archive(tmp_path / "a") as a:
        assert a.restore(sid)["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
