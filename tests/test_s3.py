"""The archive on a real S3-compatible server (moto's, on 127.0.0.1): the fsspec store path."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import zarr
from s3server import s3_endpoint, s3_options, split

import gpupas
from gpupas.errors import ArchiveNotFoundError, IntegrityError
from gpupas.format import keys
from gpupas.pas.planes import LAYOUTS, unrotate

s3fs = pytest.importorskip("s3fs")

__all__ = ["s3_endpoint", "s3_options"]  # fixtures this module uses


def _archive(options: dict[str, Any], create: bool = True) -> gpupas.Archive:
    url, opts = split(options)
    return (gpupas.create_archive if create else gpupas.open_archive)(url, storage_options=opts)


def test_commit_restore_delta_verify_on_s3(s3_options: dict[str, Any]) -> None:
    rng = np.random.default_rng(0)
    s0 = {"w": (rng.standard_normal((300, 700)) * 0.02).astype(np.float32), "n": np.arange(5)}
    s1 = {"w": (s0["w"] + rng.standard_normal((300, 700)).astype(np.float32) * 1e-6), "n": np.arange(5)}
    with _archive(s3_options) as a:
        m0 = a.commit(s0)
        m1 = a.commit(s1, base=m0.id)
        assert m1.base == m0.id
        assert m1.stored_bytes < 0.7 * m0.stored_bytes
    with _archive(s3_options, create=False) as fresh:
        assert fresh.snapshots() == [m0.id, m1.id]
        out = fresh.restore(m1.id)
        assert all(out[k].tobytes() == s1[k].tobytes() for k in s1)
        assert fresh.restore(m0.id, names=["n"])["n"].tobytes() == s0["n"].tobytes()
        assert fresh.verify(m0.id) == 2
        assert fresh.verify(m1.id) == 2
    # stock zarr reads the sharded planes straight from the bucket
    root, opts = split(s3_options)
    (st,) = m0.streams
    stream = np.zeros(st.length, np.uint8)
    for codec_id in st.codec_ids():  # each chunk is in one codec's array; the others read as zeros there
        stream |= zarr.open_array(f"{root}/{keys.array(st.folder, codec_id)}", mode="r", storage_options=opts)[:]
    entry = m0.tensor("w")
    assert entry.enc == "mat" and not entry.ctx
    (part,) = entry.parts
    planes = stream[part.offset : part.offset + s0["w"].nbytes].reshape(4, -1)  # high byte first
    bits = (planes[0].astype(np.uint32) << 24) | (planes[1].astype(np.uint32) << 16)
    bits |= (planes[2].astype(np.uint32) << 8) | planes[3]
    assert unrotate(bits, LAYOUTS["float32"]).view(np.float32).tobytes() == s0["w"].tobytes()


def test_damage_and_missing_on_s3(s3_options: dict[str, Any]) -> None:
    with pytest.raises(ArchiveNotFoundError):
        _archive(s3_options, create=False)
    with _archive(s3_options) as a:
        m = a.commit({"w": np.ones(70000, np.float32)})
    (st,) = m.streams
    root, opts = split(s3_options)
    fs = s3fs.S3FileSystem(**opts)
    shards = [f"{root}/{keys.shard(st.folder, cid, 0)}".removeprefix("s3://") for cid in st.codec_ids()]
    shard = next(s for s in shards if fs.exists(s))
    data = bytearray(fs.cat(shard))
    data[5] ^= 0xFF
    fs.pipe(shard, bytes(data))
    with _archive(s3_options, create=False) as fresh, pytest.raises(IntegrityError, match=m.id):
        fresh.restore(m.id)
    with _archive(s3_options, create=False) as fresh, pytest.raises(IntegrityError, match=m.id):
        fresh.verify(m.id)


def test_versions_tags_files_and_catalog_on_s3(s3_options: dict[str, Any], tmp_path: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Records, tags and files go through the store too; the catalog lives in the user's cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    url, opts = split(s3_options)
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 32)) * 0.02).astype(np.float32)
    with gpupas.create_repository(url, storage_options=opts) as repo:
        v1 = repo.commit("net", {"fc.weight": w}, hyperparameters={"lr": 0.1}, files={"cfg.json": b"{}"})
        v2 = repo.add_snapshot(v1.id, {"fc.weight": w + 1e-3})
        repo.tag("base", v1.id)
        c = repo.copy(v1.id, "net-copy")
    with gpupas.open_repository(url, storage_options=opts) as repo:
        assert [v.id for v in repo.versions()] == [v1.id, c.id] and repo.tags() == {"base": v1.id}
        assert [r["id"] for r in repo.query("select m where m.hp.lr > 0.05")] == [v1.id, c.id]
        assert repo.restore("base")["fc.weight"].tobytes() == (w + 1e-3).astype(np.float32).tobytes()
        assert repo.file_bytes(repo.version(v1.id).files["cfg.json"]["sha256"]) == b"{}"
        assert len(v2.snapshots) == 2
        result = repo.verify()
        assert result["ok"] and result["checked"]["snapshots"] == 2, result
        assert list((tmp_path / "cache" / "gpupas" / "catalogs").glob("*.sqlite"))  # not in the bucket
        with pytest.raises(gpupas.ArchiveExistsError):
            repo.tag("base", c.id)
        repo.tag("base", c.id, force=True)
        assert repo.tags() == {"base": c.id}


def test_command_line_on_an_s3_url(s3_options: dict[str, Any], tmp_path: Any) -> None:
    """``-A s3://...`` and ``init s3://...`` reach the server (a Path once made them a local folder
    named "s3:"); credentials and the endpoint come from the AWS_* variables, and without them the
    error names the URL and what to give."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from gpupas.integrations.safetensors import save_file

    url, opts = split(s3_options)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "GPUPAS_ARCHIVE"}
    env |= {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "AWS_DEFAULT_REGION": "us-east-1"}
    creds = {"AWS_ACCESS_KEY_ID": opts["key"], "AWS_SECRET_ACCESS_KEY": opts["secret"],
             "AWS_ENDPOINT_URL": opts["endpoint_url"]}
    w = np.arange(300, dtype=np.float32)
    save_file({"w": w}, tmp_path / "w.safetensors")

    def gp(*args: str, extra: dict[str, str] = creds) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gpupas.cli", *args], capture_output=True, text=True,
                              env=env | extra, cwd=tmp_path, timeout=120)

    assert gp("init", url).returncode == 0
    assert gp("-A", url, "commit", "-n", "net", str(tmp_path / "w.safetensors")).returncode == 0
    assert gp("-A", url, "verify").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # nothing local was made
    with gpupas.open_repository(url, storage_options=opts) as repo:
        assert repo.restore("net")["w"].tobytes() == w.tobytes()
    res = gp("-A", url, "log", extra={"AWS_ENDPOINT_URL": opts["endpoint_url"], "AWS_SHARED_CREDENTIALS_FILE":
                                      str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none")})
    assert res.returncode == 4 and f"cannot reach {url}" in res.stderr and "credentials" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_a_store_that_goes_away_after_opening_is_named(tmp_path: Any) -> None:
    """The server stops after the archive was opened: restore, commit and listing raise
    StoreUnavailableError naming the archive and what to do (they raised the S3 client's own errors,
    which the command line called unexpected), and nothing half-written appears."""
    from s3server import CREDENTIALS, REGION, make_bucket, moto_server

    from gpupas.errors import StoreUnavailableError

    w = np.random.default_rng(0).standard_normal((200, 300)).astype(np.float32)
    with moto_server() as endpoint:
        url = f"s3://{make_bucket(endpoint)}/arc"
        opts = {**CREDENTIALS, "endpoint_url": endpoint, "client_kwargs": {"region_name": REGION},
                "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
        with gpupas.create_archive(url, storage_options=opts) as a:
            sid = a.commit({"w": w}).id
        a = gpupas.open_archive(url, storage_options=opts)
        a.manifest(sid)
    for call in (lambda: a.restore(sid), lambda: a.commit({"w": w + 1}), lambda: a.snapshots()):
        with pytest.raises(StoreUnavailableError, match=r"cannot reach s3://.*run the command again"):
            call()
    a.close()


def test_gc_on_an_object_store_says_it_keeps_the_young(s3_options: dict[str, Any]) -> None:
    """Object stores have no locks, so gc there keeps what is younger than an hour whatever min_age
    asks: said, not silently."""
    with _archive(s3_options) as a:
        a.commit({"w": np.arange(10, dtype=np.float32)})
        with pytest.warns(UserWarning, match="object store.*3600 s"):
            assert a.gc(min_age=0) == []


def test_a_missing_bucket_is_named_with_the_remedy(s3_options: dict[str, Any]) -> None:
    from gpupas.errors import StoreUnavailableError

    url, opts = split(s3_options)
    missing = url.replace(s3_options["bucket"], s3_options["bucket"] + "-none")
    with pytest.raises(StoreUnavailableError, match=r"create the bucket first.*does not create buckets"):
        gpupas.create_archive(missing, storage_options=opts)
    with pytest.raises(ArchiveNotFoundError, match="in a bucket that exists"):
        gpupas.open_archive(missing, storage_options=opts)


def test_the_remote_guard_names_outages_only(s3_options: dict[str, Any]) -> None:
    """The guard around a remote archive's store turns the client's failures into StoreUnavailableError,
    but not what a caller's own callback raised, nor a missing object (a shard removed by a gc after a
    revision: it reads short, fails its CRC, and the read is retried on fresh manifests)."""
    with _archive(s3_options) as a:
        store = a.store.store
        with pytest.raises(ZeroDivisionError):
            store.update("scratch.json", lambda old: 1 // 0)
        assert store.get_ranges("snapshots/none/c/0", [(0, 10), (10, 5)]) == [b"", b""]
        assert store.get("snapshots/none/zarr.json") is None


def test_restoring_some_names_on_s3_reads_each_shard_index_once(s3_options: dict[str, Any]) -> None:
    """A restore of the biases between the weights decodes one window per bias (the chunks between them are
    never read); on S3 the compiled path read every shard index again for each window (two requests and the
    whole index each: about 3x the bytes and 2.5x the requests of the reference); now it asks for what the
    reference asks for, and both restore bit-exact."""
    from gpupas.backend import fast

    rng = np.random.default_rng(3)
    t = {f"l{i}.{k}": (rng.standard_normal(n) * 0.02).astype(np.float32)
         for i in range(8) for k, n in (("weight", 20_000), ("bias", 3_000))}
    biases = [k for k in t if k.endswith("bias")]
    with _archive(s3_options) as a:
        m = a.commit(t, layout=gpupas.Layout(chunk_size=4096))
    cost = {}
    for compiled in (False, True):
        with fast.use(compiled), _archive(s3_options, create=False) as fresh:
            fresh.manifest(m.id)
            store = fresh.store.store
            before = store.requests, store.bytes_read
            got = fresh.restore(m.id, biases)
            cost[compiled] = store.requests - before[0], store.bytes_read - before[1]
            assert {k: v.tobytes() for k, v in got.items()} == {k: t[k].tobytes() for k in biases}
    assert cost[False][1] < 0.4 * m.stored_bytes  # the weights' chunks are not read
    assert cost[True][0] <= cost[False][0] and cost[True][1] <= 1.05 * cost[False][1], cost


def test_a_discard_crossing_a_commit_on_its_base_leaves_nothing_broken(s3_options: dict[str, Any]) -> None:
    """No lock on S3: a discard of snapshot b and a commit of a delta on b cross. Whichever way they
    interleave, no published snapshot is left without its base: the commit that published after the
    discard's look takes itself back, or the discard that finds the new child puts b back and refuses."""
    from gpupas.errors import ConflictError, SnapshotNotFoundError

    rng = np.random.default_rng(3)
    b0 = {"w": (rng.standard_normal((100, 50)) * 0.02).astype(np.float32)}
    c0 = {"w": b0["w"] + np.float32(1e-4)}
    url, opts = split(s3_options)
    with gpupas.create_archive(url, storage_options=opts) as a:
        a.commit(b0, snapshot="b")
    writer, other = gpupas.open_archive(url, storage_options=opts), gpupas.open_archive(url, storage_options=opts)
    real_publish = writer.store.publish_manifest

    def discarded_first(m: Any) -> None:  # the commit checked b is there; the discard found no child of b
        other.discard("b")
        real_publish(m)

    writer.store.publish_manifest = discarded_first  # type: ignore[method-assign]
    with pytest.raises(SnapshotNotFoundError, match="discarded while it was being committed"):
        writer.commit(c0, base="b", snapshot="c")
    writer.store.publish_manifest = real_publish  # type: ignore[method-assign]
    assert writer.snapshots() == [] and other.store.orphan_folders() == []

    writer.commit(b0, snapshot="b")
    real_children, looks = other.store.children, []

    def committed_between(sid: str) -> list[str]:  # the discard's first look, then the commit publishes whole
        looks.append(sid)
        if len(looks) == 1:
            found = real_children(sid)
            writer.commit(c0, base="b", snapshot="c")
            return found
        return real_children(sid)

    other.store.children = committed_between  # type: ignore[method-assign]
    with pytest.raises(ConflictError, match="it is kept"):
        other.discard("b")
    with gpupas.open_archive(url, storage_options=opts) as a:
        assert a.snapshots() == ["b", "c"]
        assert a.restore("c")["w"].tobytes() == c0["w"].tobytes()
        assert a.restore("b")["w"].tobytes() == b0["w"].tobytes()
    writer.close()
    other.close()


def test_a_discard_crossing_a_rebase_onto_it_leaves_nothing_broken(s3_options: dict[str, Any]) -> None:
    """A revision that re-bases snapshot c on b (a compaction) crossing a discard of b, as a commit of a delta on b
    does: the revision that switched after the discard's looks takes itself back, and c stays restorable."""
    from gpupas.errors import SnapshotNotFoundError

    rng = np.random.default_rng(4)
    b0 = {"w": (rng.standard_normal((100, 50)) * 0.02).astype(np.float32)}
    c0 = {"w": b0["w"] + np.float32(1e-4)}
    url, opts = split(s3_options)
    with gpupas.create_archive(url, storage_options=opts) as a:
        a.commit(b0, snapshot="b")
        a.commit(c0, snapshot="c")
    writer, other = gpupas.open_archive(url, storage_options=opts), gpupas.open_archive(url, storage_options=opts)
    real_replace = writer.store.replace_manifest

    def discarded_first(new: Any, revision: int, check: Any = None) -> Any:
        def then_discarded() -> None:  # the revision's last look finds b; the discard's looks find no child of b
            check()
            other.discard("b")

        return real_replace(new, revision, check=then_discarded)

    writer.store.replace_manifest = discarded_first  # type: ignore[method-assign]
    with pytest.raises(SnapshotNotFoundError, match="discarded while"):
        writer.revise("c", base="b")
    writer.close()
    other.close()
    with gpupas.open_archive(url, storage_options=opts) as a:
        assert a.snapshots() == ["c"] and a.manifest("c").base is None
        assert a.restore("c")["w"].tobytes() == c0["w"].tobytes()
        assert a.store.orphan_folders() == []


def test_gc_on_an_object_store_keeps_a_snapshot_dropped_within_the_hour(s3_options: dict[str, Any],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Object stores have no locks: an add_snapshot in another process may be writing a delta on the latest as
    it is dropped, a reader restoring it. gc there keeps what was dropped within the hour whatever min_age asks,
    as it keeps young manifests (it freed a long-committed snapshot dropped a moment before, under --min-age 0)."""
    from gpupas.versions.repository import create_repository, open_repository

    url, opts = split(s3_options)
    ws = [np.arange(1000, dtype=np.float32) * k for k in (1, 2)]
    with create_repository(url, storage_options=opts) as repo:
        repo.commit("run", [{"w": w} for w in ws])
        sids = [s["id"] for s in repo.version("run").snapshots]
    reader = open_repository(url, storage_options=opts)
    assert reader.version("run").latest == sids[1]  # read before the drop
    with open_repository(url, storage_options=opts) as repo:
        store = repo.archive.store.store
        age = store.age
        monkeypatch.setattr(store, "age", lambda key: 7200.0 if key.startswith("manifests/") else age(key))
        repo.drop_snapshots("run", ["latest"])  # committed two hours ago, dropped now
        with pytest.warns(UserWarning, match="object store.*3600 s"):
            assert [r for r in repo.gc(min_age=0) if r["kind"] == "snapshot"] == []
        monkeypatch.undo()
    assert reader.archive.restore(sids[1])["w"].tobytes() == ws[1].tobytes()
    reader.close()


def test_drop_on_an_object_store_says_gc_frees_an_hour_after_the_drop(s3_options: dict[str, Any],
                                                                      tmp_path: Any) -> None:
    """gc there keeps a drop an hour whatever --min-age: drop said `gpupas gc --min-age 0` then frees them."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from gpupas.versions.repository import create_repository

    url, opts = split(s3_options)
    with create_repository(url, storage_options=opts) as repo:
        repo.commit("run", [{"w": np.arange(1000, dtype=np.float32) * k} for k in (1, 2)])
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "GPUPAS_ARCHIVE"}
    env |= {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": opts["key"], "AWS_SECRET_ACCESS_KEY": opts["secret"],
            "AWS_ENDPOINT_URL": opts["endpoint_url"]}
    res = subprocess.run([sys.executable, "-m", "gpupas.cli", "-A", url, "drop", "run", "latest", "--dry-run"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "`gpupas gc` an hour after the drop" in res.stdout and "--min-age 0`" not in res.stdout, res.stdout
