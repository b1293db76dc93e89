"""The archive end to end on a real Zarr directory store: round trips, deltas, damage, bad input."""

from __future__ import annotations

import fcntl
import json
import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import zarr

import gpupas
from gpupas.errors import (
    ArchiveExistsError,
    ArchiveNotFoundError,
    GpupasError,
    IntegrityError,
    InvalidInputError,
    SnapshotNotFoundError,
    UnsupportedDtypeError,
)
from gpupas.pas.planes import LAYOUTS, unrotate
from gpupas.store.archive import ArchiveStore
from tests.conftest import adversarial, flip_chunks_of


@pytest.fixture
def archive(tmp_path: Path) -> gpupas.Archive:
    with gpupas.create_archive(tmp_path / "arc") as a:
        yield a


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def test_a_published_manifest_reads_back_equal(archive: gpupas.Archive) -> None:
    """The archive keeps the manifest it published as the parse of its bytes (the next commit's base is
    not parsed again): that holds only if a manifest reads back equal, for every kind of snapshot."""
    from gpupas.format.manifest import Manifest

    a = archive.commit(_model(0), snapshot="a", meta={"step": 10, "lr": 1e-4, "tags": ["x", None], "d": {"k": 0.1}})
    b = archive.commit(_model(1, 1e-3, _model(0)), base="a", snapshot="b")
    c = archive.commit(_model(2, 1e-3, _model(1, 1e-3, _model(0))), base="b", snapshot="c")  # may predict
    d = archive.commit(_model(0), snapshot="d", lossy="bf16")
    for m in (a, b, c, d):
        assert Manifest.from_bytes(m.to_bytes(), m.id) == m
        archive._forget(m.id)
        assert archive.manifest(m.id) is m  # kept at publication, not parsed again
    (Path(archive.location) / "manifests" / "a.json").write_bytes(b"{}")  # other bytes: parsed (and refused)
    archive._forget("a")
    with pytest.raises(GpupasError):
        archive.manifest("a")


def _model(seed: int, scale: float = 0.0, base: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if base is not None:
        return {k: (v + rng.standard_normal(v.shape) * scale).astype(v.dtype) for k, v in base.items()}
    return {
        "enc.w": (rng.standard_normal((300, 257)) * 0.02).astype(np.float32),
        "enc.b": (rng.standard_normal(257) * 0.01).astype(np.float32),
        "head.w": (rng.standard_normal((64, 300)) * 0.05).astype(ml_dtypes.bfloat16),
        "steps": np.array(7, np.int64),
    }


def test_every_dtype_and_shape_roundtrips(archive: gpupas.Archive) -> None:
    tensors = {}
    for i, name in enumerate(sorted(LAYOUTS)):
        tensors[f"{name}/odd"] = adversarial(name, 1001, i).reshape(7, 11, 13)
        tensors[f"{name}/empty"] = adversarial(name, 0).reshape(0, 3)
        tensors[f"{name}/scalar"] = adversarial(name, 1, i).reshape(())
    tensors["many-dims"] = np.ones((1,) * 32, np.float32)
    tensors["huge-empty"] = np.zeros((0, 2**40), np.float16)
    m = archive.commit(tensors)
    _same(archive.restore(m.id), tensors)
    _same(gpupas.open_archive(archive.location).restore(m.id), tensors)


def test_a_memory_mapped_input_is_not_kept_mapped_as_the_next_delta_base(tmp_path: Path) -> None:
    """A memory-mapped array (np.load(mmap_mode="r"), np.memmap) was kept as it was, the file's mapping, as the
    next commit's delta base: once its file was written again in place (np.save truncates it first), that
    commit's check of the cached base read past the file's end and the process died of SIGBUS. Its bits are
    read into memory on the way in, as a torch tensor's are."""
    code = f"""if True:
        import numpy as np, gpupas
        np.save({str(tmp_path / "w.npy")!r}, np.ones(1 << 16, np.float32))
        with gpupas.create_archive({str(tmp_path / "arc")!r}) as a:
            m = a.commit({{"w": np.load({str(tmp_path / "w.npy")!r}, mmap_mode="r")}})
            open({str(tmp_path / "w.npy")!r}, "wb").close()  # rewritten in place: truncated first
            w = np.full(1 << 16, 2.0, np.float32)
            assert a.restore(a.commit({{"w": w}}, base=m.id).id)["w"].tobytes() == w.tobytes()
            assert a.restore(m.id)["w"].tolist() == [1.0] * (1 << 16)
        print("ok")
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr[-2000:])


def test_non_contiguous_and_big_endian_inputs(archive: gpupas.Archive) -> None:
    base = np.arange(60, dtype=np.float32).reshape(6, 10)
    tensors = {"t": base.T, "s": base[:, ::3], "be": base.astype(">f4"), "f": np.asfortranarray(base)}
    m = archive.commit(tensors)
    out = archive.restore(m.id)
    for k, v in tensors.items():
        assert np.array_equal(out[k], v) and out[k].dtype == v.dtype.newbyteorder("=")


def test_delta_chain_and_fallbacks(archive: gpupas.Archive) -> None:
    s0 = _model(0)
    s1 = _model(1, 1e-4, s0)
    s1["new"] = np.ones(5, np.float32)  # not in base -> stored whole
    s1["head.w"] = s1["head.w"][:32]  # reshaped -> stored whole
    s2 = _model(2, 1e-4, s1)
    m0 = archive.commit(s0)
    m1 = archive.commit(s1, base=m0.id)
    m2 = archive.commit(s2, base=m1.id)
    enc1 = {e.name: e.enc for e in m1.tensors}
    assert enc1["enc.w"] in ("sub", "xor") and enc1["new"] == "mat" and enc1["head.w"] == "mat"
    assert m1.stored_bytes < 0.8 * m0.stored_bytes
    fresh = gpupas.open_archive(archive.location)  # no cached bases
    _same(fresh.restore(m2.id), s2)
    _same(fresh.restore(m1.id), s1)
    assert set(fresh.restore(m2.id, names=["enc.b"])) == {"enc.b"}
    assert fresh.snapshots() == [m0.id, m1.id, m2.id]


def test_report_accounts_for_every_byte(archive: gpupas.Archive) -> None:
    m = archive.commit(_model(0))
    rows = archive.report(m.id)
    assert {r["name"] for r in rows} == set(_model(0))
    assert sum(r["stored"] for r in rows) == m.stored_bytes  # every byte, to the byte
    for r in rows:
        assert 0 <= r["stored"] - sum(r["planes"]) <= 1  # the planes never add up to more than the tensor
    big = next(r for r in rows if r["name"] == "enc.w")
    assert big["planes"][0] < big["planes"][3]  # exponent plane compresses, low mantissa does not


def _chunk_files(archive: gpupas.Archive, sid: str) -> list[Path]:
    files = []
    for f in archive.manifest(sid).folders():
        files += sorted(p for p in (Path(archive.location) / "snapshots" / f).rglob("c/*") if p.is_file())
    return files


def test_flipped_byte_names_tensor_and_snapshot(archive: gpupas.Archive) -> None:
    m = archive.commit({"only": (np.random.default_rng(0).standard_normal(5000) * 0.02).astype(np.float32)})
    victim = _chunk_files(archive, m.id)[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=rf"snapshot {m.id}.*only"):
        gpupas.open_archive(archive.location).restore(m.id)
    with pytest.raises(IntegrityError):
        gpupas.open_archive(archive.location).verify(m.id)


def test_flipped_byte_in_raw_chunks_read_in_place_is_caught(archive: gpupas.Archive) -> None:
    """Random low planes are stored as raw frames of whole chunks, which a local restore reads straight into
    place (no copy): a flipped byte anywhere in their shard still fails the restore, naming the tensor."""
    w = np.random.default_rng(3).integers(0, 2**32, 600_000, dtype=np.uint32).view(np.float32)
    m = archive.commit({"noise": w})
    assert gpupas.open_archive(archive.location).restore(m.id)["noise"].tobytes() == w.tobytes()
    victim = max(_chunk_files(archive, m.id), key=lambda p: p.stat().st_size)
    clean = victim.read_bytes()
    for at in (9, 10, 11, len(clean) // 3, len(clean) // 2):
        data = bytearray(clean)
        data[at] ^= 0x04
        victim.write_bytes(bytes(data))
        with pytest.raises(IntegrityError, match=rf"snapshot {m.id}.*noise"):
            gpupas.open_archive(archive.location).restore(m.id)
    victim.write_bytes(clean)
    assert gpupas.open_archive(archive.location).restore(m.id)["noise"].tobytes() == w.tobytes()


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("groups", [(), (1,)])
def test_restoring_some_names_never_reads_the_chunks_between_them(tmp_path: Path, compiled: bool,
                                                                  groups: tuple[int, ...]) -> None:
    """A restore of tensors ``a`` and ``c`` reads their chunks only: every chunk that holds nothing but ``b``
    (lying between them in every stream) damaged, it still restores them bit-exact; ``b`` names the damage."""
    from gpupas.backend import fast
    from gpupas.engine.encode import Layout
    from gpupas.format.layout import holders

    rng = np.random.default_rng(5)
    t = {k: (rng.standard_normal(1_000_000) * 0.02).astype(np.float32) for k in "abc"}
    m = gpupas.create_archive(tmp_path / "a").commit(t, layout=Layout(groups=groups))
    store = gpupas.open_archive(tmp_path / "a").store
    flipped = []
    for s, stream in enumerate(m.streams):
        reader = store.reader(stream)
        for c in range(stream.nchunks):
            if holders(m, s, c) == ["b"]:
                key, off, n = reader.locate(c)
                path = tmp_path / "a" / key
                data = bytearray(path.read_bytes())
                data[off + n // 2] ^= 0x10
                path.write_bytes(bytes(data))
                flipped.append(s)
        reader.close()
    assert sorted(set(flipped)) == list(range(len(m.streams))) and len(flipped) >= 2 * len(m.streams)
    with fast.use(compiled):
        got = gpupas.open_archive(tmp_path / "a").restore(m.id, ["a", "c"])
        assert {k: v.tobytes() for k, v in got.items()} == {k: t[k].tobytes() for k in "ac"}
        with pytest.raises(IntegrityError, match=rf"snapshot {m.id}.*tensor\(s\) b"):
            gpupas.open_archive(tmp_path / "a").restore(m.id, ["b"])


def test_an_archive_and_a_repository_say_where_they_are_in_their_repr(tmp_path: Path) -> None:
    """Both printed as ``<... object at 0x...>``, which does not tell two open archives apart."""
    from gpupas.versions.repository import create_repository

    with gpupas.create_archive(tmp_path / "a") as a:
        assert repr(a) == f"<gpupas.Archive {str(tmp_path / 'a')!r}>" and a.location == str(tmp_path / "a")
    with create_repository(tmp_path / "r") as repo:
        assert repr(repo) == f"<gpupas.Repository {str(tmp_path / 'r')!r}>"


def test_storage_and_tier_options_that_are_not_mappings_are_refused_by_name(tmp_path: Path) -> None:
    """``tier_options=3`` was an AttributeError ('int' object has no attribute 'items') from inside the store,
    ``{"cold": 3}`` a TypeError; ``storage_options=3`` was ignored on a local archive."""
    gpupas.create_archive(tmp_path / "a").close()
    for kw, what in (({"tier_options": 3}, "tier_options=3: give a mapping of tier names"),
                     ({"tier_options": {"cold": 3}}, "tier_options=.'cold': 3.: give"),
                     ({"storage_options": 3}, "storage_options=3: give a mapping")):
        with pytest.raises(InvalidInputError, match=what):
            gpupas.open_archive(tmp_path / "a", **kw)
        with pytest.raises(InvalidInputError, match=what):
            gpupas.create_archive(tmp_path / "b", **kw)
    assert not (tmp_path / "b").exists()
    gpupas.open_archive(tmp_path / "a", tier_options={"cold": {"anon": True}}).close()


def test_a_version_where_a_snapshot_id_goes_is_refused_naming_its_latest_snapshot(tmp_path: Path) -> None:
    """A Version given to an Archive method was "snapshot id Version(...) is not allowed: use 1-128 letters,
    digits...", which says nothing of the id to give: the message names version.latest and its value."""
    from gpupas.versions.repository import create_repository

    w = {"w": np.arange(4, dtype=np.float32)}
    with create_repository(tmp_path / "r") as repo:
        v = repo.commit("net", w)
        a = repo.archive
        want = rf"not a version \(Version\(id=1.*'{v.latest}' \(version\.latest"
        for call in (lambda: a.restore(v), lambda: a.manifest(v), lambda: a.verify(v),
                     lambda: a.read_planes(v), lambda: a.commit(w, base=v)):
            with pytest.raises(InvalidInputError, match=want):
                call()
        assert a.restore(v.latest)["w"].tobytes() == w["w"].tobytes()


def test_an_archive_or_repository_made_from_a_path_is_refused_naming_the_opener(tmp_path: Path) -> None:
    """``gpupas.Archive(path)`` was taken and every use then failed with an AttributeError ('str' object has
    no attribute ...); ``gpupas.Repository(path)`` failed so at once."""
    with pytest.raises(InvalidInputError, match=r"gpupas\.open_archive\(location\)"):
        gpupas.Archive(str(tmp_path / "a"))  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=r"gpupas\.open_repository\(location\)"):
        gpupas.Repository(tmp_path / "a")  # type: ignore[arg-type]


def test_verify_all_judges_a_delta_by_the_base_tensors_it_reads(tmp_path: Path) -> None:
    """A delta that dropped tensor ``b`` restores without its base's ``b``: with every chunk holding only the
    base's ``b`` damaged, verify_all passes the delta as verify does, checked alone (then it reads none of
    those chunks), beside its base (which it reports damaged) or beside a sibling that reads that ``b``."""
    rng = np.random.default_rng(6)
    t0 = {k: (rng.standard_normal(1_000_000) * 0.02).astype(np.float32) for k in "abc"}
    with gpupas.create_archive(tmp_path / "a") as a:
        m0 = a.commit(t0)
        m1 = a.commit({k: v + np.float32(1e-4) for k, v in t0.items() if k != "b"}, base=m0.id)
        m2 = a.commit({"b": t0["b"] + np.float32(1e-4)}, base=m0.id)  # reads the base's b alone
    assert all(e.reads_base for e in m1.tensors)
    assert flip_chunks_of(tmp_path / "a", m0, "b") >= 2
    with gpupas.open_archive(tmp_path / "a") as a:
        assert a.verify(m1.id) == 2
        assert dict(a.verify_all([m1.id])) == {m1.id: 2}
        assert dict(a.verify_all(m1.id)) == {m1.id: 2}  # one id alone (was taken letter by letter)
        with pytest.raises(InvalidInputError, match="not a Manifest"):
            a.verify_all([m1])
        both = dict(a.verify_all([m0.id, m1.id]))
        assert both[m1.id] == 2
        assert isinstance(both[m0.id], IntegrityError) and "holds tensor(s) b" in str(both[m0.id])
        two = dict(a.verify_all([m1.id, m2.id]))  # the base decoded for both (a, b and c) fails: m1 is intact still
        assert two[m1.id] == 2 and isinstance(two[m2.id], IntegrityError)


def test_restoring_some_names_needs_memory_for_their_chunks_only(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore of one tensor is refused as too large only where its own chunks and bits exceed the
    machine's memory, not the whole snapshot's streams (one layer of a checkpoint larger than memory)."""
    from gpupas.engine import decode

    rng = np.random.default_rng(9)
    t = {k: (rng.standard_normal(1_000_000) * 0.02).astype(np.float32) for k in "abc"}
    m = gpupas.create_archive(tmp_path / "a").commit(t)
    assert sum(s.nchunks * s.chunk_size for s in m.streams) >= 12_000_000
    monkeypatch.setattr(decode, "memory_bytes", lambda: 12_000_000)
    with gpupas.open_archive(tmp_path / "a") as a:
        assert a.restore(m.id, ["b"])["b"].tobytes() == t["b"].tobytes()
        with pytest.raises(IntegrityError, match="more than this machine's memory"):
            a.restore(m.id)


def test_restoring_some_names_without_windows_holds_their_chunks_only(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Where planes are decoded whole, not through windows (the NumPy reference, the GPU), a restore of some
    tensors holds the chunks from their first to their last, not their streams' others: its workspace for the
    last of three tensors is about a third of the snapshot's planes; every subset restores bit-exact."""
    from gpupas.backend import fast, get_backend
    from gpupas.engine.encode import Layout

    rng = np.random.default_rng(11)
    t = {k: (rng.standard_normal(1_000_000) * 0.02).astype(np.float32) for k in "abc"}
    t["empty"] = np.zeros((0, 3), np.float32)
    m0 = gpupas.create_archive(tmp_path / "a").commit(t, layout=Layout(groups=(1,)))
    t1 = {k: v + np.float32(1e-3) for k, v in t.items()}
    m1 = gpupas.open_archive(tmp_path / "a").commit(t1, base=m0.id, layout=Layout(groups=(1,)))
    backend, asked = get_backend("numpy"), []
    real = backend.workspace
    monkeypatch.setattr(backend, "workspace", lambda n: asked.append(n) or real(n))
    planes = sum(s.nchunks * s.chunk_size for s in m0.streams)
    with fast.use(False):
        for names in (["c"], ["a", "c"], ["empty"], ["b", "empty"], None):
            for sid, want in ((m0.id, t), (m1.id, t1)):
                got = gpupas.open_archive(tmp_path / "a").restore(sid, names)
                assert {k: v.tobytes() for k, v in got.items()} == {k: want[k].tobytes() for k in names or want}
        asked.clear()
        gpupas.open_archive(tmp_path / "a").restore(m0.id, ["c"])
    assert asked and max(asked) < 0.4 * planes


def test_restoring_some_names_tells_the_gpu_their_stored_chunk_sizes(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore of a tensor whose chunks start past a stream's first (numbered from there for the backend)
    still lets the GPU backend size its staging buffer by the chunks' stored bytes, as a whole restore does,
    not by the most any coder could write (67,584 bytes a chunk of 65,536, most of which hold ~21,300)."""
    from gpupas.backend import fast, get_backend
    from gpupas.backend.cupy import _payload_sizes
    from gpupas.engine.encode import Layout

    rng = np.random.default_rng(12)
    t = {k: (rng.standard_normal(300_000) * 0.02).astype(np.float32) for k in "abc"}
    m = gpupas.create_archive(tmp_path / "a").commit(t, layout=Layout(chunk_size=1 << 16))
    backend, said = get_backend("numpy"), []
    real = backend.decode_chunks

    def spy(stream, chunks, fetch, *rest):  # what the CuPy backend asks of the reader it is given
        said.append(_payload_sizes(fetch, np.array(chunks, np.int64)))
        return real(stream, chunks, fetch, *rest)

    monkeypatch.setattr(backend, "decode_chunks", spy)
    with fast.use(False):
        got = gpupas.open_archive(tmp_path / "a").restore(m.id, ["c"])
    assert got["c"].tobytes() == t["c"].tobytes()
    assert said and all(s is not None for s in said), said  # None: each staged as 67,584 bytes


def test_damaged_base_is_caught_through_delta(archive: gpupas.Archive) -> None:
    s0 = _model(0)
    m0 = archive.commit(s0)
    m1 = archive.commit(_model(1, 1e-4, s0), base=m0.id)
    for f in _chunk_files(archive, m0.id):
        f.unlink()
    with pytest.raises(IntegrityError, match=m0.id):
        gpupas.open_archive(archive.location).restore(m1.id)


def test_planes_open_with_plain_zarr(archive: gpupas.Archive) -> None:
    w = (np.random.default_rng(0).standard_normal(3000) * 0.02).astype(np.float32)
    m = archive.commit({"w": w, "v": np.arange(10, dtype=np.int16)}, setting="fast")  # fast: no context split
    group = zarr.open_group(archive.location, mode="r")
    assert group.attrs["gpupas"]["format"] == 3
    (st,) = m.streams
    stream = np.zeros(st.length, np.uint8)
    for kind in ("zstd", "deflate"):
        stream |= zarr.open_array(archive.location, path=f"snapshots/{st.folder}/{kind}", mode="r")[:]
    entry = m.tensor("w")
    assert entry.enc == "mat" and not entry.ctx
    (part,) = entry.parts
    planes = stream[part.offset : part.offset + w.nbytes].reshape(4, -1)
    bits = (planes[0].astype(np.uint32) << 24) | (planes[1].astype(np.uint32) << 16)
    bits |= (planes[2].astype(np.uint32) << 8) | planes[3]
    assert unrotate(bits, LAYOUTS["float32"]).view(np.float32).tobytes() == w.tobytes()  # sign back on top


def test_failed_commit_leaves_nothing_visible(archive: gpupas.Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    s0 = _model(0)
    m0 = archive.commit(s0)

    def boom(*a: object, **k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ArchiveStore, "publish_manifest", boom)
    with pytest.raises(OSError):
        archive.commit(_model(1, 1e-4, s0), base=m0.id, snapshot="doomed")
    monkeypatch.undo()
    fresh = gpupas.open_archive(archive.location)
    assert fresh.snapshots() == [m0.id]
    assert fresh.store.orphan_folders() == []  # the failed commit removed what it wrote
    _same(fresh.restore(m0.id), s0)
    m2 = fresh.commit(_model(2, 1e-4, s0), base=m0.id)
    assert fresh.snapshots() == [m0.id, m2.id]


def test_failed_background_flush_fails_the_commit(archive: gpupas.Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write-back error seen by a flush while coding goes on is not lost to a later fsync."""
    import gpupas.store.local as local
    import gpupas.store.shards as shards

    s0 = _model(0)
    m0 = archive.commit(s0)

    def eio(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(shards, "FLUSH_EVERY", 1)  # a flush after every chunk
    monkeypatch.setattr(local, "_datasync", eio)
    with pytest.raises(OSError, match="Input/output"):
        archive.commit(_model(1), snapshot="doomed")
    monkeypatch.undo()
    fresh = gpupas.open_archive(archive.location)
    assert fresh.snapshots() == [m0.id]
    _same(fresh.restore(m0.id), s0)


def test_failed_shard_close_fails_the_commit(archive: gpupas.Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard's last fsync fails on the I/O thread, while the commit attributes its bytes: the commit
    raises that error, waits for the closing before it removes its folders, and leaves nothing behind."""
    import gpupas.store.local as local

    s0 = _model(0)
    m0 = archive.commit(s0)

    def eio(self: local.LocalWriter, sync: bool = True) -> None:
        os.close(self.fd)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(local.LocalWriter, "close", eio)
    with pytest.raises(OSError, match="Input/output"):
        archive.commit(_model(1, 1e-4, s0), base=m0.id, snapshot="doomed")
    monkeypatch.undo()
    fresh = gpupas.open_archive(archive.location)
    assert fresh.snapshots() == [m0.id]
    assert fresh.store.orphan_folders() == []
    _same(fresh.restore(m0.id), s0)
    m2 = fresh.commit(_model(2, 1e-4, s0), base=m0.id)
    assert fresh.snapshots() == [m0.id, m2.id]


@pytest.mark.parametrize(("code", "said"), [(5, "Input/output"), (28, "free space there")])
def test_failed_fsync_of_the_written_files_fails_the_commit(archive: gpupas.Archive, monkeypatch: pytest.MonkeyPatch,
                                                            code: int, said: str) -> None:
    """The files of a commit (shards, Zarr documents) and their folders are fsync'd together before the
    manifest is published: an error there fails the commit, which leaves nothing behind; a full disk is
    said with its remedy, as for other writes."""
    import gpupas.store.local as local

    s0 = _model(0)
    m0 = archive.commit(s0)
    synced: list[int] = []

    def eio(fds: list[int]) -> None:
        synced.extend(os.fstat(fd).st_mode for fd in fds)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(local, "_fsync_all", eio)
    with pytest.raises(OSError, match=said):
        archive.commit(_model(1, 1e-4, s0), base=m0.id, snapshot="doomed")
    monkeypatch.undo()
    assert sum(map(stat.S_ISREG, synced)) >= 3 and sum(map(stat.S_ISDIR, synced)) >= 4  # documents, shard; folders
    fresh = gpupas.open_archive(archive.location)
    assert fresh.snapshots() == [m0.id] and fresh.store.orphan_folders() == []
    _same(fresh.restore(m0.id), s0)


@pytest.mark.skipif(hasattr(fcntl, "F_FULLFSYNC"), reason="macOS syncs by fcntl, not os.fsync")
def test_every_file_and_folder_of_a_commit_is_durable_before_its_manifest(archive: gpupas.Archive,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Power-loss safety: each file a commit writes (shards, Zarr documents) and each folder it made or
    added to is fsync'd before the manifest that names them is linked into place."""
    s0 = _model(0)
    m0 = archive.commit(s0)
    synced: set[tuple[int, int]] = set()
    before: set[tuple[int, int]] = set()
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        real_fsync(fd)
        st = os.fstat(fd)
        synced.add((st.st_dev, st.st_ino))

    def link(src: Any, dst: Any, *a: Any, **k: Any) -> None:
        if str(dst).endswith(".json") and not before:  # the manifest: the first record a commit links
            before.update(synced)
        real_link(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    m1 = archive.commit(_model(1, 1e-4, s0), base=m0.id, snapshot="s1")
    monkeypatch.undo()
    root = Path(archive.location)
    made = [p for s in archive.manifest(m1.id).streams for p in [root / "snapshots" / s.folder,
                                                                  *(root / "snapshots" / s.folder).rglob("*")]]
    assert len(made) >= 6
    for p in [*made, root / "snapshots"]:
        st = p.stat()
        assert (st.st_dev, st.st_ino) in before, f"{p.relative_to(root)} was not fsync'd before the manifest"


def test_bad_input_is_refused_and_changes_nothing(archive: gpupas.Archive, tmp_path: Path) -> None:
    m0 = archive.commit(_model(0))
    with pytest.raises(UnsupportedDtypeError, match="'c'"):
        archive.commit({"c": np.zeros(3, np.complex64)})
    with pytest.raises(UnsupportedDtypeError):
        archive.commit({"s": np.array(["a", "b"])})
    with pytest.raises(InvalidInputError, match="not a tensor"):
        archive.commit({"x": [1.0, 2.0]})
    with pytest.raises(InvalidInputError):
        archive.commit({"": np.zeros(2)})
    for bad in ("../escape", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(InvalidInputError):
            archive.commit({"w": np.zeros(2)}, snapshot=bad)
    with pytest.raises(ArchiveExistsError):
        archive.commit({"w": np.zeros(2)}, snapshot=m0.id)
    with pytest.raises(SnapshotNotFoundError, match="nope"):
        archive.commit({"w": np.zeros(2)}, base="nope")
    with pytest.raises(SnapshotNotFoundError):
        archive.restore("nope")
    assert archive.snapshots() == [m0.id]
    _same(archive.restore(m0.id), _model(0))


def test_a_cuda_index_other_than_the_current_device_is_refused(archive: gpupas.Archive,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """device="cuda:N" runs on the current CUDA device: another N is refused, not silently ignored."""
    from gpupas.backend import base

    monkeypatch.setattr(base, "_current_cuda_device", lambda: 0)  # as on a GPU machine, device 0 current
    assert base.resolve_device("cuda:0") == base.resolve_device("cuda") == "cupy"
    with pytest.raises(InvalidInputError, match=r"'cuda:1'.*current CUDA device, 0"):
        base.resolve_device("cuda:1")
    with pytest.raises(InvalidInputError, match="current CUDA device"):
        archive.commit(_model(0), device="cuda:1")
    with pytest.raises(InvalidInputError, match="current CUDA device"):
        archive.restore("nope", device="cuda:1")
    for bad in ("cuda:", "cuda:x", "cuda1", "cuda:-1", "cudas"):
        with pytest.raises(InvalidInputError, match="'cuda:N'"):
            base.resolve_device(bad)
    assert archive.snapshots() == []

def test_bad_options_are_refused_before_anything_is_written(archive: gpupas.Archive, tmp_path: Path) -> None:
    """Options a reader would reject later (a chunk size, a manifest's meta) are refused up front, named."""
    m0 = archive.commit(_model(0))
    for kw in ({"chunk_size": -5}, {"chunk_size": 0}, {"chunk_size": 2.5}, {"chunk_size": (1 << 30) + 1},
               {"groups": (-1,)}, {"rotate": "no"}, {"segment": 1.5e6}):
        with pytest.raises(InvalidInputError, match=next(iter(kw))):
            gpupas.Layout(**kw)
    for meta, what in (({"lr": float("nan")}, "finite"), ({1: "x", "1": "y"}, "string keys"),
                       ({"when": object()}, "not a JSON value")):
        with pytest.raises(InvalidInputError, match=what):
            archive.commit(_model(1), base=m0.id, meta=meta)
    for lossy in (5, ["bf16"]):
        with pytest.raises(InvalidInputError, match="lossy="):
            archive.commit(_model(1), lossy=lossy)
    with pytest.raises(InvalidInputError, match=r"does not make tensor 'enc\.w'"):
        archive.commit(_model(1), lossy={"enc.w": "fixed:32"})  # float32 as int32: no smaller
    with pytest.raises(InvalidInputError, match="cache_size"):
        gpupas.open_archive(archive.location, cache_size=-1)
    with pytest.raises(InvalidInputError, match="workers"):
        gpupas.create_archive(tmp_path / "never", workers=-1)
    assert not (tmp_path / "never").exists()  # refused before anything was created
    with pytest.raises(InvalidInputError, match=r"layout=: not an archive option .*commit\(\.\.\., layout="):
        gpupas.create_archive(tmp_path / "never", layout=gpupas.Layout(groups=(1,)))
    with pytest.raises(InvalidInputError, match="worker=: not an archive option"):
        gpupas.open_archive(archive.location, worker=2)
    for where in (None, 5, ""):
        with pytest.raises(InvalidInputError, match=r"archive location .*: give a folder's path or an fsspec URL"):
            gpupas.create_archive(where)
    assert not (tmp_path / "never").exists()
    with pytest.raises(InvalidInputError, match="nested"):
        archive.commit(_model(1), meta={"x": {1: 2}})
    with gpupas.open_archive(archive.location, workers=np.int64(2), cache_bytes=2e9):  # as before
        pass
    assert gpupas.Layout(rotate=np.bool_(False)).rotate is False and gpupas.Layout(groups=[1]).groups == [1]
    gen = gpupas.Layout(groups=(g for g in [1]), tiers=(t for t in [None, "cold"]))  # read once, kept
    assert gen.groups == (1,) and gen.tiers == (None, "cold")
    with pytest.raises(InvalidInputError, match="groups"):
        gpupas.Layout(groups=None)
    assert archive.snapshots() == [m0.id]
    m1 = archive.commit(_model(1), meta={"step": np.int64(3), "lr": np.float32(0.5)})  # NumPy scalars: numbers
    assert m1.meta == {"step": 3, "lr": 0.5} and json.dumps(m1.meta) == '{"step": 3, "lr": 0.5}'


def test_a_manifest_or_a_dict_where_an_id_or_a_layout_goes_is_named(archive: gpupas.Archive) -> None:
    """commit() returns a Manifest: passing it where a snapshot id goes (restore, base=, revise, verify...) says
    to give its .id, and a layout given as a dict or a string says to give a Layout, instead of a TypeError or
    AttributeError from inside; nothing is written."""
    m0 = archive.commit(_model(0))
    for call in (lambda: archive.restore(m0), lambda: archive.commit(_model(1), base=m0),
                 lambda: archive.revise(m0), lambda: archive.revise(m0.id, base=m0), lambda: archive.verify(m0),
                 lambda: archive.manifest(m0), lambda: archive.report(m0), lambda: archive.read_planes(m0),
                 lambda: archive.depth(m0), lambda: archive.discard(m0), lambda: archive.tier(m0, to=None)):
        with pytest.raises(InvalidInputError, match=rf"Manifest.*{m0.id}.*\.id"):
            call()
    for layout in ({"chunk_size": 1024}, "rotate", 5):
        with pytest.raises(InvalidInputError, match=r"layout=.*gpupas\.Layout\("):
            archive.commit(_model(1), layout=layout)
        with pytest.raises(InvalidInputError, match=r"layout=.*gpupas\.Layout\("):
            archive.revise(m0.id, layout=layout)
    assert archive.snapshots() == [m0.id]
    _same(archive.restore(m0.id), _model(0))


def test_gc_with_an_age_that_is_not_a_number_removes_nothing(archive: gpupas.Archive) -> None:
    """gc's min_age as a string, None, NaN or below 0 is refused by name: a string or None was a TypeError from
    a comparison inside, and NaN (``gpupas gc --min-age nan``) compared false, so every orphan was taken
    whatever its age; the orphans stay for a gc with a real age."""
    m0 = archive.commit(_model(0))
    archive.revise(m0.id, setting="fast")  # the old form's folder is now an orphan
    orphans = archive.gc(min_age=0, dry_run=True)
    assert len(orphans) == 1
    repo = gpupas.Repository(archive, own_archive=False)
    for bad in ("1", None, float("nan"), -1, True):
        with pytest.raises(InvalidInputError, match=r"min_age=.*number of seconds"):
            archive.gc(min_age=bad)
        with pytest.raises(InvalidInputError, match=r"min_age="):
            repo.gc(min_age=bad)
    assert archive.gc(min_age=0, dry_run=True) == orphans
    assert archive.gc(min_age=np.float32(0)) == orphans and archive.gc(min_age=0, dry_run=True) == []
    _same(archive.restore(m0.id), _model(0))


def test_discard_of_a_snapshot_that_is_not_there_says_so(tmp_path: Path) -> None:
    """discard() of a mistyped id raised nothing, as if it had deleted it; now SnapshotNotFoundError names it
    (a version whose commit failed still takes back what it wrote, silently), and nothing else goes."""
    with gpupas.create_repository(tmp_path / "arc") as repo:
        a = repo.archive
        m0 = a.commit(_model(0))
        with pytest.raises(SnapshotNotFoundError, match=r"no snapshot 'nope'.*Archive\.snapshots\(\)"):
            a.discard("nope")
        with pytest.raises(SnapshotNotFoundError, match=m0.id[:6] + "'"):
            a.discard(m0.id[:6])  # a prefix is not an id
        assert a.snapshots() == [m0.id]
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            repo._discard(["gone"])  # its own clean-up: nothing to say of a snapshot already gone
        assert not [w for w in said if "gone" in str(w.message)]
        a.discard(m0.id)
        assert a.snapshots() == []


def test_a_forced_discard_does_not_list_every_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether another snapshot names a folder as its own is asked of the few ids that prefix the folder's
    name; a listing of every manifest per discard made discarding K snapshots of an archive of S cost K x S
    (``gpupas plan`` discards one scratch snapshot per pair it measures)."""
    with gpupas.create_archive(tmp_path / "arc") as a:
        ids = [a.commit(_model(k)).id for k in range(3)]
        listed: list[str] = []
        listing = type(a.store.store).list

        def counting(self: Any, prefix: str) -> Any:
            listed.append(prefix)
            return listing(self, prefix)

        monkeypatch.setattr(type(a.store.store), "list", counting)
        a.discard(ids[1], force=True)
        assert "manifests" not in listed, listed
        monkeypatch.undo()
        assert sorted(a.snapshots()) == sorted([ids[0], ids[2]])
        _same(a.restore(ids[2]), _model(2))


def test_restore_reads_names_once(archive: gpupas.Archive) -> None:
    m = archive.commit(_model(0))
    names = sorted(_model(0))[:2]
    assert sorted(archive.restore(m.id, iter(names))) == names  # an iterator: read once, not spent by a check
    assert sorted(archive.restore(m.id, (n for n in names))) == names
    assert list(archive.restore(m.id, names[0])) == [names[0]]  # one name as a string
    assert sorted(archive.read_planes(m.id, 1, iter(names)).approx) == names


def test_missing_and_foreign_locations(tmp_path: Path) -> None:
    with pytest.raises(ArchiveNotFoundError, match="gpupas init"):
        gpupas.open_archive(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArchiveNotFoundError):
        gpupas.open_archive(tmp_path / "empty")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("not an archive")
    with pytest.raises(ArchiveExistsError):
        gpupas.create_archive(tmp_path / "busy")
    zarr.create_group(str(tmp_path / "plainzarr"))
    with pytest.raises(ArchiveNotFoundError, match=r"not a gpupas archive"):
        gpupas.open_archive(tmp_path / "plainzarr")


def test_a_file_where_the_archive_folder_goes_is_named(tmp_path: Path) -> None:
    """A file (or a path through one) given as the archive's location is called a file, with what to give
    instead, not a bare FileExistsError, NotADirectoryError or "the directory does not exist"; the file is kept."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(ArchiveExistsError, match=r"notes\.txt is a file, not a folder.*folder of its own"):
        gpupas.create_archive(notes)
    with pytest.raises(ArchiveExistsError, match=r"is a file, not a folder"):
        gpupas.create_repository(notes)
    with pytest.raises(InvalidInputError, match=r"notes\.txt is a file, not a folder.*pick another location"):
        gpupas.create_archive(notes / "arc")
    with pytest.raises(ArchiveNotFoundError, match=r"notes\.txt: it is a file, not an archive folder"):
        gpupas.open_archive(notes)
    with pytest.raises(ArchiveNotFoundError, match=r"is a file, not an archive folder"):
        gpupas.open_repository(notes)
    assert notes.read_text() == "mine" and sorted(tmp_path.iterdir()) == [notes]


def test_manifest_is_plain_json_with_sizes(archive: gpupas.Archive) -> None:
    m = archive.commit(_model(0), meta={"step": 10})
    on_disk = json.loads((Path(archive.location) / "manifests" / f"{m.id}.json").read_text())
    assert on_disk.pop("checksum").startswith("crc32c:")
    assert on_disk == json.loads(json.dumps(m.to_dict()))
    assert on_disk["meta"] == {"step": 10} and on_disk["raw_bytes"] == sum(v.nbytes for v in _model(0).values())


def test_safetensors_file_input(archive: gpupas.Archive, tmp_path: Path) -> None:
    from gpupas.integrations.safetensors import save_file

    tensors = _model(0)
    path = tmp_path / "ckpt.safetensors"
    save_file(tensors, path)
    m = archive.commit(path)
    _same(archive.restore(m.id), tensors)
    assert "file_metadata" not in m.meta  # the file had none
    save_file(tensors, path, metadata={"format": "pt", "modelspec.title": "demo"})
    m2 = archive.commit(path, base=m.id, meta={"step": 2})  # a file's own metadata kept, as Repository keeps it
    assert archive.manifest(m2.id).meta == {"step": 2, "file_metadata": {"format": "pt", "modelspec.title": "demo"}}
    own = archive.commit(path, meta={"file_metadata": {"mine": "1"}})  # the caller's own member wins
    assert own.meta == {"file_metadata": {"mine": "1"}}
    safetensors = pytest.importorskip("safetensors.numpy")
    ref = safetensors.load_file(str(path))
    assert np.array_equal(ref["enc.w"], tensors["enc.w"])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(InvalidInputError, match=r"bad\.safetensors"):
        archive.commit(bad)
    for entry, err, what in (({"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}, InvalidInputError,
                              "does not fit"),  # a count past 2^63 must not wrap to one that fits
                             ({"dtype": "F32", "shape": [1.7], "data_offsets": [0, 4]}, InvalidInputError, "bad dtype"),
                             ({"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}, UnsupportedDtypeError, "C64")):
        header = json.dumps({"x": entry}).encode()
        bad.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
        with pytest.raises(err, match=what):
            archive.commit(bad)


def test_one_byte_floats_of_every_kind_round_trip(archive: gpupas.Archive, tmp_path: Path) -> None:
    """float8 fnuz (AMD) and e8m0 (MX block scales): every pattern, whole and as deltas, from NumPy, torch and
    safetensors files (written by the safetensors package itself)."""
    from gpupas.integrations.safetensors import load_file

    names = ("float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
    pats = np.arange(256, dtype=np.uint8).reshape(16, 16)
    first = {n: pats.view(getattr(ml_dtypes, n)) for n in names}
    second = {n: np.roll(pats, 1, axis=0).view(getattr(ml_dtypes, n)) for n in names}
    m1 = archive.commit(first)
    m2 = archive.commit(second, base=m1.id)
    assert [t.enc for t in m2.tensors] != ["mat"] * 3  # coded against the base
    _same(archive.restore(m1.id), first)
    _same(archive.restore(m2.id), second)
    torch = pytest.importorskip("torch")
    state = {n: torch.from_numpy(pats.copy()).view(getattr(torch, n)) for n in names}
    out = archive.restore(archive.commit(state).id, framework="torch")
    assert all(out[n].dtype == state[n].dtype and out[n].view(torch.uint8).equal(state[n].view(torch.uint8))
               for n in names)
    st = pytest.importorskip("safetensors.torch")
    st.save_file(state, str(tmp_path / "f8.safetensors"))
    _same(archive.restore(archive.commit(tmp_path / "f8.safetensors").id), first)
    assert load_file(tmp_path / "f8.safetensors").keys() == set(names)


def test_safetensors_files_are_in_memory_once(tmp_path: Path) -> None:
    """Loading a safetensors file holds it once (every tensor a view of it; it was read, then copied tensor by
    tensor: twice the file at the peak), an unaligned tensor is copied aligned, and the arrays are writable."""
    import tracemalloc

    from gpupas.integrations.safetensors import load_file, save_file

    big = np.random.default_rng(0).standard_normal((1024, 2048)).astype(np.float32)  # 8 MiB
    path = tmp_path / "m.safetensors"
    save_file({"big": big, "odd": np.arange(3, dtype=np.uint8)}, path)
    tracemalloc.start()
    try:
        got = load_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.25 * path.stat().st_size, peak
    assert got["big"].tobytes() == big.tobytes() and got["odd"].tolist() == [0, 1, 2]
    got["big"][0, 0] = 1.0  # writable, as a copy was
    header = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}}).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-aligned, the tensor one byte in
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" + np.float32([1.5, -2.0]).tobytes())
    x = load_file(path)["x"]
    assert x.flags.aligned and x.tolist() == [1.5, -2.0]


def test_torch_state_dict_roundtrip(archive: gpupas.Archive) -> None:
    torch = pytest.importorskip("torch")
    state = {
        "w": torch.randn(33, 17),
        "b16": torch.randn(40).to(torch.bfloat16),
        "h": torch.randn(5, 5).half()[:, 1:],
        "n": torch.tensor([float("nan"), -0.0, float("inf")]),
        "i": torch.arange(10),
    }
    m = archive.commit(state)
    out = archive.restore(m.id, framework="torch")
    for k, v in state.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        assert torch.equal(out[k].contiguous().view(torch.uint8), v.contiguous().view(torch.uint8))


def test_torch_restores_hold_the_output_once_and_stay_their_own(archive: gpupas.Archive) -> None:
    """framework="torch" wraps the restored block (a copy doubled a restore's peak and kept both alive), and a
    tensor changed in place changes no later restore (the base cache re-checks what it handed out)."""
    import tracemalloc

    torch = pytest.importorskip("torch")
    w = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)  # 4 MiB
    b16 = w.astype(ml_dtypes.bfloat16)
    m = archive.commit({"w": w, "b16": b16})
    archive.bases.drop(m.id)
    tracemalloc.start()
    try:
        out = archive.restore(m.id, framework="torch")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * (w.nbytes + b16.nbytes), peak  # NumPy's allocations: the block, not a copy beside it
    assert out["b16"].dtype == torch.bfloat16 and out["w"].numpy().tobytes() == w.tobytes()
    out["w"].add_(1.0)
    out["b16"].zero_()
    again = archive.restore(m.id)
    assert again["w"].tobytes() == w.tobytes() and again["b16"].tobytes() == b16.tobytes()
    assert archive.commit({"w": w, "b16": b16}, base=m.id).stored_bytes < m.stored_bytes / 10  # a true delta


def test_cache_bytes_counts_the_copies_a_commit_keeps(tmp_path: Path) -> None:
    """Torch tensors are copied on the way in and the cache alone then holds the copies: ``cache_bytes`` counts
    them (they were counted as the caller's, so a loop of commits kept ``cache_size`` snapshots whatever the
    cap); the caller's own NumPy arrays still cost nothing."""
    torch = pytest.importorskip("torch")
    cap = 3 << 20
    with gpupas.create_archive(tmp_path / "arc", cache_size=8, cache_bytes=cap) as a:
        state = {"w": torch.zeros(1 << 18), "b": torch.ones(1 << 18)}  # 2 MiB
        for _ in range(4):
            state["w"] += 1.0
            a.commit(state)
        held = [v.nbytes for bits in a.bases._items.values() for v in bits.values()]
        assert len(a.bases._items) == 1 and sum(held) <= cap, held  # the newest is kept, even alone over the cap
        arrays = {"w": np.zeros(1 << 18, np.float32), "b": np.ones(1 << 18, np.float32)}
        ids = [a.commit(arrays).id for _ in range(4)]
        assert all(s in a.bases for s in ids)  # borrowed: nothing owned, all four kept


def test_commit_of_a_checkpoint_with_a_tensor_without_storage_returns_its_manifest(tmp_path: Path) -> None:
    """What a training checkpoint holds beside its weights (here a sparse tensor, whose data pointer torch
    refuses) is left out, and the commit returns: it raised RuntimeError after the snapshot was published."""
    torch = pytest.importorskip("torch")
    with gpupas.create_archive(tmp_path / "arc") as a, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = a.commit({"model": {"w": np.ones(4, np.float32)}, "extra": {"s": torch.eye(3).to_sparse()}})
        assert a.snapshots() == [m.id] and m.id in a.bases


def test_import_loads_no_optional_backend() -> None:
    code = "import sys, gpupas; print(sorted(m for m in ('torch', 'cupy', 'nvidia.nvcomp') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_caller_mutating_a_committed_array_cannot_corrupt_the_next_delta(archive: gpupas.Archive) -> None:
    s0 = _model(0)
    m0 = archive.commit(s0)
    original = {k: v.copy() for k, v in s0.items()}
    s0["enc.w"] += 1.0  # a training loop updating its weights in place after the commit
    s1 = _model(1, 1e-4, original)
    m1 = archive.commit(s1, base=m0.id)
    fresh = gpupas.open_archive(archive.location)
    _same(fresh.restore(m0.id), original)
    _same(fresh.restore(m1.id), s1)
    got = archive.restore(m1.id)  # served from memory: a copy, never the caller's own array
    got["enc.w"] += 1.0
    _same(archive.restore(m1.id), s1)


def test_per_plane_report_of_a_multi_segment_tensor(archive: gpupas.Archive) -> None:
    from gpupas.pas.transform import SEGMENT

    rng = np.random.default_rng(0)
    big = (rng.standard_normal(SEGMENT * 2 + 12345) * 0.02).astype(np.float32)
    m = archive.commit({"big": big})
    row = archive.report(m.id)[0]
    assert row["planes"][0] < 0.45 * big.nbytes / 4  # exponent plane: about a third of its bytes
    assert row["planes"][3] > 0.99 * big.nbytes / 4  # lowest mantissa byte: incompressible
    assert archive.restore(m.id)["big"].tobytes() == big.tobytes()


def test_restores_never_share_arrays(archive: gpupas.Archive) -> None:
    m = archive.commit(_model(0))
    fresh = gpupas.open_archive(archive.location)
    first, second = fresh.restore(m.id), fresh.restore(m.id)
    first["enc.w"][:] = -1.0  # e.g. keep the initial weights while training a copy in place
    _same(second, _model(0))
    _same(fresh.restore(m.id), _model(0))


def test_delta_chains_are_capped(tmp_path: Path) -> None:
    arc = gpupas.Archive(gpupas.create_archive(tmp_path / "arc").store, max_chain=3)
    state, prev, depths = _model(0), None, []
    for i in range(8):
        state = _model(i + 1, 1e-4, state)
        m = arc.commit(state, base=prev)
        depths.append(arc.depth(m.id))
        prev = m.id
    assert depths == [0, 1, 2, 3, 0, 1, 2, 3]
    _same(gpupas.open_archive(arc.location).restore(prev), state)


def test_same_explicit_id_from_two_threads(archive: gpupas.Archive) -> None:
    from concurrent.futures import ThreadPoolExecutor

    models = [_model(1), _model(2)]

    def commit(i: int) -> str:
        with gpupas.open_archive(archive.location) as a:
            try:
                a.commit(models[i], snapshot="same")
                return "won"
            except ArchiveExistsError:
                return "lost"

    with ThreadPoolExecutor(2) as pool:
        outcome = sorted(pool.map(commit, [0, 1]))
    assert outcome == ["lost", "won"]
    got = gpupas.open_archive(archive.location).restore("same")  # the winner's bits, whole
    assert any(all(got[k].tobytes() == m[k].tobytes() for k in m) for m in models)


def test_damaged_shard_index_is_caught(archive: gpupas.Archive) -> None:
    m = archive.commit(_model(0))
    shard = _chunk_files(archive, m.id)[0]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the index at the end of the shard file
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=rf"snapshot {m.id}.*index"):
        gpupas.open_archive(archive.location).restore(m.id)


def test_the_manifest_cache_is_bounded_by_tensors(archive: gpupas.Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    """A session reading many snapshots of many tensors keeps at most the stated number of tensor entries
    parsed (the newest manifest always), least recently used out first."""
    import gpupas.archive as arc_mod

    monkeypatch.setattr(arc_mod, "MANIFEST_CACHE", (1024, 250))
    ids = [archive.commit({f"t{i}": np.full(3, k, np.float32) for i in range(100)}).id for k in range(5)]
    archive.refresh()
    for sid in ids:
        archive.manifest(sid)
        archive.manifest(ids[0])  # used again: kept
    assert list(archive._manifests) == [ids[-1], ids[0]] and archive._entries == 200
    big = archive.commit({f"t{i}": np.ones(1, np.float32) for i in range(400)}).id
    archive.manifest(big)
    assert list(archive._manifests) == [big] and archive._entries == 400
    archive._forget(big)
    assert archive._entries == 0 and archive.restore(ids[2])["t7"].tolist() == [2, 2, 2]


def test_revise_reads_no_base_tensor_of_another_dtype_or_shape(tmp_path: Path) -> None:
    """A tensor whose dtype or shape changed since the base is stored whole and reads nothing of the base's:
    damage there does not stop the delta from being re-encoded, as it does not stop its restore."""
    rng = np.random.default_rng(4)
    t0 = {k: (rng.standard_normal(300_000) * 0.02).astype(np.float32) for k in "abc"}
    t1 = {"a": t0["a"] + np.float32(1e-4), "b": t0["b"].astype(np.float64), "c": t0["c"].reshape(600, 500) * 2}
    with gpupas.create_archive(tmp_path / "a") as a:
        m0 = a.commit(t0, snapshot="s0")
        a.commit(t1, snapshot="s1", base="s0")
    assert flip_chunks_of(tmp_path / "a", m0, "b") >= 2 and flip_chunks_of(tmp_path / "a", m0, "c") >= 2
    with gpupas.open_archive(tmp_path / "a") as a:
        assert a.revise("s1", setting="strong").base == "s0"
        assert {k: v.tobytes() for k, v in a.restore("s1").items()} == {k: v.tobytes() for k, v in t1.items()}


def test_gc_counts_a_removed_snapshot_by_what_it_took_on_disk_as_a_folder(tmp_path: Path) -> None:
    """gc said a snapshot it removes took its payloads' bytes (``stored``), a folder its bytes on disk: the
    snapshot's manifest, Zarr documents and shard indexes went uncounted."""

    def usage() -> int:
        return sum(p.stat().st_size for p in (tmp_path / "arc").rglob("*") if p.is_file())

    with gpupas.create_repository(tmp_path / "arc") as repo:
        repo.commit("kept", _model(0))
        m = repo.archive.commit(_model(1), meta={"version_name": "killed"})  # as a commit killed before publishing
        before = usage()
        dry = repo.gc(min_age=0, dry_run=True)
        assert [(r["kind"], r["name"]) for r in dry] == [("snapshot", m.id)] and dry[0]["bytes"] > m.stored_bytes
        assert repo.gc(min_age=0) == dry and before - usage() == dry[0]["bytes"]
