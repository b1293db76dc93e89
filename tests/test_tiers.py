"""Storage tiers: low-order planes of chosen snapshots in a second store (a directory, or S3 on a
request-counting server on 127.0.0.1), high-order planes local; moves are bit-checked revisions; a
read of only the high planes never touches the tier; gc sweeps tiers; clear errors when a tier is gone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import recipe
from s3counting import CountingS3, counting_s3
from s3server import s3_endpoint, s3_options, split

import gpupas
from gpupas import inspect
from gpupas.backend import get_backend
from gpupas.engine.partial import PartialReader
from gpupas.errors import ConflictError, InvalidInputError, TierNotFoundError, TierUnavailableError
from gpupas.format import keys
from gpupas.pas import bounds

__all__ = ["counting_s3", "s3_endpoint", "s3_options"]  # fixtures this module uses
ROOT = Path(__file__).resolve().parents[1]


def chain(seed: int = 0, n: int = 3) -> list[dict[str, np.ndarray]]:
    """``n`` checkpoints of a small model, each a small step from the one before."""
    rng = np.random.default_rng(seed)
    first = {"fc1.weight": (rng.standard_normal((256, 320)) * 0.02).astype(np.float32),
             "fc1.bias": np.zeros(256, np.float32), "emb.weight": (rng.standard_normal((300, 64))).astype(np.float16),
             "steps": np.arange(4, dtype=np.int64)}
    out = [first]
    for _ in range(n - 1):
        prev = out[-1]
        out.append({k: (v + (rng.standard_normal(v.shape) * 1e-3).astype(v.dtype)) if v.dtype.kind == "f" else v + 1
                    for k, v in prev.items()})
    return out


def commit_chain(a: gpupas.Archive, ckpts: list[dict[str, np.ndarray]]) -> list[str]:
    sids: list[str] = []
    for c in ckpts:
        sids.append(a.commit(c, base=sids[-1] if sids else None).id)
    return sids


def same(got: dict[str, Any], want: dict[str, np.ndarray]) -> bool:
    return sorted(got) == sorted(want) and all(got[k].tobytes() == want[k].tobytes() for k in want)


def test_move_planes_to_a_directory_tier_and_back(tmp_path: Path) -> None:
    ckpts = chain()
    with gpupas.create_archive(tmp_path / "arc") as a:
        sids = commit_chain(a, ckpts)
        a.add_tier("cold", tmp_path / "cold")
        for sid in sids:
            m = a.tier(sid, planes_from=2, to="cold")
            assert [s.tier for s in m.streams] == [None, "cold"] and m.revision == 1
            parts = {e.name: [(p.stream, p.first, p.count) for p in e.parts] for e in m.tensors}
            assert parts["fc1.weight"] == [(0, 0, 2), (1, 2, 2)] and parts["emb.weight"] == [(0, 0, 2)]
            assert a.tier(sid, planes_from=2, to="cold").revision == 1  # already there: nothing done
        assert a.manifest(sids[1]).base == sids[0]  # a revision keeps the delta base
        assert sorted(p.name for p in (tmp_path / "cold" / "snapshots").iterdir()) == sorted(
            ["zarr.json", *(a.manifest(s).streams[1].folder for s in sids)])
    for sid, c in zip(sids, ckpts):  # the spec's reader (FORMAT.md 18), which never imports gpupas
        assert same(recipe.restore(tmp_path / "arc", sid), c)
    with gpupas.open_archive(tmp_path / "arc") as b:
        assert all(same(b.restore(s), c) for s, c in zip(sids, ckpts))
        assert all(b.verify(s) == 4 for s in sids)
        swept = b.gc(min_age=0)  # the forms before the move: one local folder each
        assert len(swept) == 3 and not any(":" in f for f in swept)
        b.revise(sids[2], setting="fast")  # a compaction or re-encode leaves the planes in the tier
        assert [s.tier for s in b.manifest(sids[2]).streams] == [None, "cold"]
        swept = b.gc(min_age=0)  # its old form: a folder here and one in the tier
        assert len(swept) == 2 and sum(f.startswith(f"cold:{sids[2]}.") for f in swept) == 1
        with pytest.raises(InvalidInputError, match="move them back"):
            b.remove_tier("cold")
        for sid in sids:
            m = b.tier(sid, to=None, planes_from=None)
            assert [s.tier for s in m.streams] == [None, None]
        assert all(same(b.restore(s), c) for s, c in zip(sids, ckpts))
        swept = b.gc(min_age=0)
        assert sum(f.startswith("cold:") for f in swept) == 3  # the tier's folders, swept from the tier
        assert [p.name for p in (tmp_path / "cold" / "snapshots").iterdir()] == ["zarr.json"]
        b.remove_tier("cold")
        assert b.tiers() == {}


def test_commit_straight_into_a_tier_and_bad_moves(tmp_path: Path) -> None:
    with gpupas.create_archive(tmp_path / "arc") as a:
        a.add_tier("cold", tmp_path / "cold")
        w = np.linspace(-2, 2, 10000, dtype=np.float32)
        m = a.commit({"w": w}, layout=gpupas.Layout(groups=(1,), tiers=(None, "cold")))
        assert [s.tier for s in m.streams] == [None, "cold"]
        assert a.restore(m.id)["w"].tobytes() == w.tobytes()
        with pytest.raises(InvalidInputError, match="planes_from"):
            a.tier(m.id, planes_from=4, to="cold")
        with pytest.raises(TierNotFoundError, match=r"no tier 'warm' to move planes to.*gpupas tier add warm"):
            a.tier(m.id, planes_from=2, to="warm")
        with pytest.raises(TierNotFoundError):
            a.commit({"w": w}, layout=gpupas.Layout(groups=(1,), tiers=(None, "warm")))
        assert a.gc(min_age=0) == []  # the refused commit left nothing behind


def test_a_missing_tier_says_which_and_what_to_do_while_high_planes_still_read(tmp_path: Path) -> None:
    ckpts = chain(1, 2)
    with gpupas.create_archive(tmp_path / "arc") as a:
        sids = commit_chain(a, ckpts)
        a.add_tier("cold", tmp_path / "cold")
        for sid in sids:
            a.tier(sid, planes_from=2, to="cold")
    shutil.move(tmp_path / "cold", tmp_path / "moved")
    with gpupas.open_repository(tmp_path / "arc") as repo:  # unreachable is not damaged: reported apart
        for scheduler in ("sync", "threads"):  # the inline check and the job's graph
            result = repo.verify(scheduler=scheduler)
            assert not result["ok"] and result["problems"] == [] and len(result["unreachable"]) == len(sids)
            assert all("tier 'cold'" in line for line in result["unreachable"])
    res = subprocess.run([sys.executable, "-m", "gpupas", "-A", str(tmp_path / "arc"), "verify"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert res.returncode == 4 and "nothing found damaged" in res.stderr, res.stderr
    with gpupas.open_archive(tmp_path / "arc") as b:
        with pytest.raises(TierUnavailableError, match=r"'cold' .*not exist.*gpupas tier add cold NEW_URL --force"):
            b.restore(sids[1])
        top = inspect.read_plane_bytes(b, sids[1], planes=2)  # the local planes alone: no tier needed
        assert {k for k in top} == {(n, p) for n in ckpts[0] for p in range(2)}
        rows = inspect.planes(b, sids[1], planes=1)
        assert {r["plane"] for r in rows} == {0} and all(r["entropy"] is not None for r in rows)
        with pytest.raises(InvalidInputError, match="copy of tier"):
            b.add_tier("cold", tmp_path / "elsewhere", force=True)  # not a copy of the tier
        b.add_tier("cold", tmp_path / "moved", force=True)  # the copy: same tier id
    with gpupas.open_archive(tmp_path / "arc") as c:
        assert same(c.restore(sids[1]), ckpts[1])
        doc = json.loads((tmp_path / "arc" / "zarr.json").read_text())
        del doc["attributes"]["gpupas"]["tiers"]["cold"]
        (tmp_path / "arc" / "zarr.json").write_text(json.dumps(doc))
    with gpupas.open_archive(tmp_path / "arc") as d, pytest.raises(TierNotFoundError,
                                                                    match=r"no tier 'cold'.*gpupas tier add cold"):
        d.restore(sids[0])
    with gpupas.open_repository(tmp_path / "arc") as repo:  # a tier the root no longer names: not damage either
        for scheduler in ("sync", "threads"):  # the inline check and the job's graph
            result = repo.verify(scheduler=scheduler)
            assert not result["ok"] and result["problems"] == [] and len(result["unreachable"]) == len(sids)
            assert all("gpupas tier add cold" in line for line in result["unreachable"])
    cli = subprocess.run([sys.executable, "-m", "gpupas", "-A", str(tmp_path / "arc"), "verify"], capture_output=True,
                         text=True)
    assert cli.returncode == 4 and "not checked" in cli.stderr and "damaged:" not in cli.stderr


def test_tier_locations_are_checked_and_secrets_never_written(tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with gpupas.create_archive(tmp_path / "arc") as a, gpupas.create_archive(tmp_path / "other") as other:
        with pytest.raises(InvalidInputError, match="local"):
            a.add_tier("local", tmp_path / "t")
        with pytest.raises(InvalidInputError, match="not empty"):
            a.add_tier("cold", tmp_path / "busy")
        with pytest.raises(InvalidInputError, match="archive"):
            a.add_tier("cold", tmp_path / "other")
        a.add_tier("cold", tmp_path / "t", {"endpoint_url": "http://127.0.0.1:1", "key": "AKIA-SECRET",
                                            "client_kwargs": {"region_name": "r", "aws_secret_access_key": "S3CR3T"}})
        with pytest.raises(InvalidInputError, match="another archive"):
            other.add_tier("cold", tmp_path / "t")
        with pytest.raises(InvalidInputError, match="already points"):
            a.add_tier("cold", tmp_path / "t2")
        for inner in (tmp_path / "arc" / "snapshots" / "cold", tmp_path / "arc" / "cold"):  # gc would take it
            with pytest.raises(InvalidInputError, match="inside archive"):
                a.add_tier("inner", inner)
    text = (tmp_path / "arc" / "zarr.json").read_text()
    assert "endpoint_url" in text and "region_name" in text
    assert "AKIA-SECRET" not in text and "S3CR3T" not in text and '"key"' not in text


def test_cli_tier_commands(tmp_path: Path) -> None:
    with gpupas.create_repository(tmp_path / "arc") as repo:
        ckpts = chain(2, 2)
        v = repo.commit("net", ckpts[0])
        repo.add_snapshot(v.id, ckpts[1])
    env = {k: v for k, v in os.environ.items() if k != "GPUPAS_ARCHIVE"} | {"GPUPAS_AUTHOR": "t"}

    def gp(*args: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gpupas", "-A", str(tmp_path / "arc"), *map(str, args)],
                              capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)

    assert gp("tier", "add", "cold", tmp_path / "cold").returncode == 0
    moved = gp("tier", "move", "net", "--to", "cold", "--planes-from", "2", "--json")
    assert moved.returncode == 0, moved.stderr
    rows = json.loads(moved.stdout)
    assert len(rows) == 2 and all(r["changed"] and r["tiers"]["cold"] > 0 for r in rows)
    listed = json.loads(gp("tier", "list", "--json").stdout)
    assert [r["tier"] for r in listed] == ["local", "cold"] and listed[1]["snapshots"] == 2
    planes = json.loads(gp("inspect", "net", "--by", "plane", "--json").stdout)
    assert [r["tier"] for r in planes] == ["local"] * 2 + ["cold"] * 6  # an int64 tensor has 8 planes
    gc = gp("gc", "--min-age", "0")
    assert gc.returncode == 0 and "removed 2 unreferenced" in gc.stdout
    assert gp("verify").returncode == 0
    refused = gp("tier", "remove", "cold")
    assert refused.returncode == 2 and "move them back" in refused.stderr
    assert gp("tier", "move", "net", "--to", "local").returncode == 0
    assert "removed folder cold:" in gp("gc", "--min-age", "0").stdout
    assert gp("tier", "remove", "cold").returncode == 0
    unknown = gp("tier", "move", "net", "--to", "warm")
    assert unknown.returncode == 1 and "gpupas tier add warm" in unknown.stderr


# -- S3: the tier in its own bucket of a server that counts requests ----------------------------------------------
def test_s3_tier_high_planes_read_makes_no_request_to_it(counting_s3: CountingS3, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = counting_s3.bucket()
    ckpts = chain(3, 3)
    with gpupas.create_archive(tmp_path / "arc") as a:
        sids = commit_chain(a, ckpts)
        a.add_tier("cold", f"s3://{bucket}/cold", counting_s3.options())  # credentials: this session only
        for sid in sids:
            a.tier(sid, planes_from=2, to="cold")
    assert "test" not in json.dumps(json.loads((tmp_path / "arc" / "zarr.json").read_text())["attributes"])
    monkeypatch.setenv("GPUPAS_TIER_OPTIONS_COLD", json.dumps({"key": "test", "secret": "test"}))

    counting_s3.reset()
    with gpupas.open_archive(tmp_path / "arc") as b:
        for sid in sids:  # the coded high planes of every snapshot (whole, delta, delta on a delta)
            top = inspect.read_plane_bytes(b, sid, planes=2)
            assert len(top) == 2 * len(ckpts[0])
            inspect.planes(b, sid, planes=2)
        # values from their top 2 planes (the partial reader's data path), of the whole snapshot and of the
        # delta on it: both need nothing below plane 2 (a delta on a delta may: its context split can need
        # more of its base's planes)
        with PartialReader(b.store, b.manifest, get_backend("numpy"), b.executor) as reader:
            for sid, truth in zip(sids[:2], ckpts, strict=False):
                for name in ckpts[0]:
                    known = reader.knowledge(sid, name, 2)
                    lo, hi, unbounded = bounds.to_values(known.slots, b.manifest(sid).tensor(name).dtype)
                    t = truth[name].reshape(-1)
                    assert lo.shape == t.shape and np.all(unbounded | ((lo <= t) & (t <= hi))), (sid, name)
                    assert not np.all(unbounded), (sid, name)  # two planes say something of the values
            assert all(k <= 2 for t in reader.planes_read.values() for k in t.values())
        assert counting_s3.count(bucket) == 0  # the tier was never asked for anything
        assert "cold" not in b.store._tier_stores  # nor even opened

        got = b.restore(sids[2])  # a full restore reads the low planes from the tier, by ranged GETs
        assert same(got, ckpts[2])
        seen = counting_s3.requests(bucket)
        assert seen and {m for m, *_ in seen} <= {"GET", "HEAD"}
        assert any(r is not None for *_, r in seen)  # chunks by byte ranges, not whole shards
        assert all(k.startswith("cold/") for _, _, k, _ in seen if k)
        before = counting_s3.count(bucket)
        assert same(b.restore(sids[0]), ckpts[0]) and counting_s3.count(bucket) > before
        assert b.verify(sids[1]) == 4

        # gc sweeps the tier too: move one snapshot back, its folder in the bucket becomes garbage
        b.tier(sids[0], to=None, planes_from=None)
        swept = b.gc(min_age=0)
        cold = [f for f in swept if f.startswith("cold:")]
        assert len(cold) == 1 and cold[0].startswith(f"cold:{sids[0]}.")
        assert same(b.restore(sids[1]), ckpts[1])


def _s3_pair(options: dict[str, Any]) -> tuple[list[dict[str, np.ndarray]], list[str], Any]:
    """An archive on S3 holding a chain of two, with tier 'cold' beside it; the checkpoints, snapshot ids and
    a function opening another session on it (as another process would)."""
    url, opts = split(options)
    ckpts = chain(n=2)
    with gpupas.create_archive(url, storage_options=opts) as a:
        sids = commit_chain(a, ckpts)
        a.add_tier("cold", url + "-cold", opts)
    return ckpts, sids, lambda: gpupas.open_archive(url, storage_options=opts, tier_options={"cold": opts})


@pytest.mark.parametrize("strict", [False, True])
def test_on_s3_a_tier_removed_while_a_move_into_it_publishes_is_put_back(s3_options: dict[str, Any],
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        strict: bool) -> None:
    """An object store has no lock: `tier remove` (which found no snapshot in the tier) can land between a
    move's check of the tier and its publishing. The move then puts the tier back, with a warning, and the
    snapshot stays readable; before, the archive forgot the tier and `verify` called the snapshot damaged.
    ``strict``: warnings made errors; the move then raises the warning, and its published form stays whole."""
    ckpts, sids, session = _s3_pair(s3_options)
    with session() as mover, session() as remover:
        real = mover.store.store.update

        def crossing(key: str, change: Any) -> Any:
            if key == keys.manifest(sids[1]):  # the move is about to publish: the other process removes the tier
                remover.remove_tier("cold")
            return real(key, change)

        monkeypatch.setattr(mover.store.store, "update", crossing)
        if strict:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                with pytest.raises(UserWarning, match=r"tier 'cold' was removed by another process.*added back"):
                    mover.tier(sids[1], planes_from=2, to="cold")
        else:
            with pytest.warns(UserWarning, match="tier 'cold' was removed by another process.*added back"):
                mover.tier(sids[1], planes_from=2, to="cold")
    with session() as fresh:
        assert "cold" in fresh.store.tier_table() and any(s.tier == "cold" for s in fresh.manifest(sids[1]).streams)
        assert same(fresh.restore(sids[1]), ckpts[1]) and fresh.verify(sids[1]) == 4


def test_on_s3_a_move_publishing_while_tier_remove_lands_keeps_the_tier(s3_options: dict[str, Any],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The other order: a move publishes between `tier remove`'s look for snapshots in the tier and its
    removal. The removal's second look finds the snapshot, puts the tier back and says so (ConflictError)."""
    ckpts, sids, session = _s3_pair(s3_options)
    with session() as mover, session() as remover:
        real, moved = remover.store.store.update, []

        def crossing(key: str, change: Any) -> Any:
            if key == keys.ROOT and not moved:  # the removal is about to land: the other process's move publishes
                moved.append(mover.tier(sids[1], planes_from=2, to="cold"))
            return real(key, change)

        monkeypatch.setattr(remover.store.store, "update", crossing)
        with pytest.raises(ConflictError, match=f"{sids[1]} put planes in tier 'cold' while it was being removed"):
            remover.remove_tier("cold")
    with session() as fresh:
        assert "cold" in fresh.store.tier_table() and any(s.tier == "cold" for s in fresh.manifest(sids[1]).streams)
        assert same(fresh.restore(sids[1]), ckpts[1]) and fresh.verify(sids[1]) == 4
        fresh.tier(sids[1], planes_from=None, to=None)
        fresh.remove_tier("cold")  # with nothing in it, the removal goes through
        assert "cold" not in fresh.store.tier_table()


def test_a_malformed_tier_options_variable_is_a_tier_that_cannot_be_used(s3_options: dict[str, Any],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """$GPUPAS_TIER_OPTIONS_COLD that is not a JSON object is a tier that cannot be used (its credentials are
    wrong), as an unreachable endpoint is: verify said the snapshot was damaged ("restore the damaged parts from a
    copy", exit 3) and gc and stats stopped with bad input; now verify reports it not checked and gc sweeps the
    rest with a warning, and every message names the variable."""
    ckpts, sids, session = _s3_pair(s3_options)
    with session() as a:
        a.tier(sids[1], planes_from=2, to="cold")
    url, opts = split(s3_options)
    monkeypatch.setenv("GPUPAS_TIER_OPTIONS_COLD", "not json")
    with gpupas.open_repository(url, storage_options=opts) as repo:
        with pytest.raises(TierUnavailableError, match=r"tier 'cold'.*\$GPUPAS_TIER_OPTIONS_COLD is not JSON"):
            repo.archive.restore(sids[1])
        assert same(repo.archive.restore(sids[0]), ckpts[0])
        result = repo.verify()
        assert result["problems"] == [] and len(result["unreachable"]) == 1, result
        assert "GPUPAS_TIER_OPTIONS_COLD is not JSON" in result["unreachable"][0]
        with pytest.warns(UserWarning, match="tier 'cold' was not swept"):
            repo.archive.gc(min_age=3600)
    monkeypatch.setenv("GPUPAS_TIER_OPTIONS_COLD", "[1]")
    with gpupas.open_archive(url, storage_options=opts) as a:
        with pytest.raises(TierUnavailableError, match=r"GPUPAS_TIER_OPTIONS_COLD must hold a JSON object"):
            a.restore(sids[1])


def test_s3_tier_that_cannot_be_reached(counting_s3: CountingS3, tmp_path: Path) -> None:
    with gpupas.create_archive(tmp_path / "arc") as a:
        with pytest.raises(TierUnavailableError, match="tier 'cold'"):
            a.add_tier("cold", "s3://no-such-bucket-here/cold", counting_s3.options())
        bucket = counting_s3.bucket()
        a.add_tier("cold", f"s3://{bucket}/cold", counting_s3.options())
        sid = a.commit(chain(4, 1)[0]).id
        a.tier(sid, planes_from=1, to="cold")
    import boto3

    s3 = boto3.client("s3", endpoint_url=counting_s3.endpoint, aws_access_key_id="test",
                      aws_secret_access_key="test", region_name="us-east-1")
    for obj in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        s3.delete_object(Bucket=bucket, Key=obj["Key"])
    with gpupas.open_archive(tmp_path / "arc", tier_options={"cold": counting_s3.options()}) as b:
        with pytest.raises(TierUnavailableError, match=r"tier 'cold' \(s3://.*no gpupas tier"):
            b.restore(sid)
        assert len(inspect.read_plane_bytes(b, sid, planes=1)) == 4  # the local plane still reads


def test_s3_tier_read_planes_of_a_whole_snapshot_makes_no_request_to_it(counting_s3: CountingS3,
                                                                         tmp_path: Path) -> None:
    bucket = counting_s3.bucket()
    with gpupas.create_archive(tmp_path / "arc") as a:
        sid = a.commit(chain(5, 1)[0]).id
        a.add_tier("cold", f"s3://{bucket}/cold", counting_s3.options())
        a.tier(sid, planes_from=2, to="cold")
    counting_s3.reset()
    with gpupas.open_archive(tmp_path / "arc", tier_options={"cold": counting_s3.options()}) as b:
        got = b.read_planes(sid, planes=2)
        assert counting_s3.count(bucket) == 0
        assert 0 < got.bytes_read < got.bytes_total  # the tier's share estimated from the manifest
        full = b.restore(sid)
    assert counting_s3.count(bucket) > 0
    assert all(np.all((got.lo[k] <= v) & (v <= got.hi[k])) for k, v in full.items() if v.dtype.kind == "f")


def test_a_removed_tier_is_added_back_with_its_data(tmp_path: Path) -> None:
    """`tier remove` leaves the data where it is; adding the tier back at that location takes force (the
    location is checked to hold a tier of that name) and keeps its id."""
    with gpupas.create_archive(tmp_path / "arc") as a, gpupas.create_archive(tmp_path / "other") as other:
        entry = a.add_tier("cold", tmp_path / "t")
        a.remove_tier("cold")
        with pytest.raises(InvalidInputError, match=r"removed from this archive.*force"):
            a.add_tier("cold", tmp_path / "t")
        with pytest.raises(InvalidInputError, match="back under its name 'cold'"):
            a.add_tier("other", tmp_path / "t", force=True)  # another name: not this tier
        for force in (False, True):  # another archive never takes it over (its gc would delete a's data)
            with pytest.raises(InvalidInputError, match="another archive"):
                other.add_tier("cold", tmp_path / "t", force=force)
        assert a.add_tier("cold", tmp_path / "t", force=True)["id"] == entry["id"]


def test_a_session_never_writes_into_a_tier_removed_since_it_opened_it(tmp_path: Path) -> None:
    """A long-lived session has the tier's store open; another process removes the tier (no snapshot
    uses it then); the session's next revision into it is refused under the lock, not published."""
    from gpupas import tiers
    from gpupas.engine.encode import Layout

    ckpts = chain(n=2)
    with gpupas.create_archive(tmp_path / "arc") as a:
        sids = commit_chain(a, ckpts)
        a.add_tier("cold", tmp_path / "cold")
        tiers.move(a, sids[0], planes_from=1, to="cold")
        tiers.move(a, sids[0], planes_from=None, to=None)  # back: the tier is unused, its store still open here
        with gpupas.open_archive(tmp_path / "arc") as other:
            other.remove_tier("cold")
        with pytest.raises(TierNotFoundError, match="no tier 'cold'"):
            a.revise(sids[1], layout=Layout(groups=(1,), tiers=(None, "cold")))
        assert all(s.tier is None for s in a.manifest(sids[1]).streams)
        assert same(a.restore(sids[1]), ckpts[1])


@pytest.mark.parametrize("read", ["restore", "read_planes"])
def test_a_reader_follows_planes_moved_back_from_a_tier_removed_since(tmp_path: Path, read: str) -> None:
    """A session has read a snapshot's manifest while some of its planes lay in a tier; another process
    moves them back and removes the tier. The session's next read finds the tier gone, reads the
    manifest again and reads its new form: bit-exact, not "no tier 'cold'"."""
    from gpupas import tiers

    ckpts = chain(n=2)
    with gpupas.create_archive(tmp_path / "arc") as a:
        sids = commit_chain(a, ckpts)
        a.add_tier("cold", tmp_path / "cold")
        tiers.move(a, sids[1], planes_from=1, to="cold")
    with gpupas.open_archive(tmp_path / "arc") as reader:
        assert any(s.tier == "cold" for s in reader.manifest(sids[1]).streams)  # parsed in its tiered form
        with gpupas.open_archive(tmp_path / "arc") as other:
            tiers.move(other, sids[1], planes_from=None, to=None)
            other.remove_tier("cold")
        if read == "restore":
            assert same(reader.restore(sids[1]), ckpts[1])
        else:
            r = reader.read_planes(sids[1], planes=8)  # every plane of every dtype: exact
            assert same(r.approx, ckpts[1])
        assert all(s.tier is None for s in reader.manifest(sids[1]).streams)


def _moved_back_while_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           then: Any = None) -> tuple[dict[str, np.ndarray], str, list[bool]]:
    """A repository at ``tmp_path / "arc"`` with version "v", planes 2.. in tier 'cold'; the first read of a
    'cold' stream in this process first has another session move them back and remove the tier (then calls
    ``then(manifest)``). Returns the checkpoint, the snapshot id and a list that is non-empty once that ran."""
    from gpupas.store.archive import ArchiveStore

    ckpt = chain(n=2)[1]
    with gpupas.create_repository(tmp_path / "arc") as repo:
        repo.commit("v", ckpt)
        sid = repo.version("v").snapshots[0]["id"]
        repo.archive.add_tier("cold", tmp_path / "cold")
        repo.archive.tier(sid, planes_from=2, to="cold")
    real, done = ArchiveStore.reader, []

    def crossing(self: ArchiveStore, stream: Any) -> Any:
        if not done and stream.tier == "cold":
            done.append(True)
            with gpupas.open_archive(tmp_path / "arc") as other:  # another process: back to local, tier removed
                m = other.tier(sid, planes_from=None, to=None)
                other.remove_tier("cold")
            if then is not None:
                then(m)
        return real(self, stream)

    monkeypatch.setattr(ArchiveStore, "reader", crossing)
    return ckpt, sid, done


def test_verify_looks_again_where_a_tier_was_removed_after_the_snapshot_moved_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`verify` read a snapshot's manifest while its planes lay in a tier; before it opened the tier, another
    process moved them back and removed the tier. That is no fault of the archive: verify looks once more on
    fresh manifests and passes (a tier that is only unreachable is not tried twice)."""
    ckpt, sid, done = _moved_back_while_read(tmp_path, monkeypatch)
    with gpupas.open_repository(tmp_path / "arc") as repo:
        result = repo.verify()
        assert done and result["ok"], result
        assert same(repo.archive.restore(sid), ckpt)


def test_verify_looking_again_reports_damage_in_the_new_form_as_damage(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, but the snapshot's new local form is damaged: the second look's finding stands (damage,
    exit 3's kind), not the first one's "no tier 'cold'" (not checked) with its wrong remedy."""
    def damage(m: gpupas.Manifest) -> None:
        chunk = sorted((tmp_path / "arc" / "snapshots" / m.streams[0].folder).rglob("c/0"))[0]
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF  # a bit flipped in the new form
        chunk.write_bytes(bytes(data))

    _, sid, done = _moved_back_while_read(tmp_path, monkeypatch, damage)
    with gpupas.open_repository(tmp_path / "arc") as repo:
        result = repo.verify()
    assert done and not result["ok"] and result["unreachable"] == []
    assert len(result["problems"]) == 1 and sid in result["problems"][0] and "tier add" not in result["problems"][0]


def test_tier_remove_waits_for_a_move_in_flight(tmp_path: Path) -> None:
    """A move that has written its planes into the tier and is about to publish: `tier remove` waits for
    it, then refuses (the tier is in use), instead of leaving a snapshot that names a missing tier."""
    import threading

    from gpupas import tiers

    with gpupas.create_archive(tmp_path / "arc") as a:
        sid = a.commit({"w": np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32)}).id
        a.add_tier("cold", tmp_path / "t")
    mover, remover = gpupas.open_archive(tmp_path / "arc"), gpupas.open_archive(tmp_path / "arc")
    at_publish, go, errors = threading.Event(), threading.Event(), []
    replace = mover.store.replace_manifest

    def held(*args: object, **kw: object) -> None:
        at_publish.set()
        go.wait(30)
        replace(*args, **kw)

    mover.store.replace_manifest = held  # type: ignore[method-assign]
    t = threading.Thread(target=lambda: tiers.move(mover, sid, planes_from=1, to="cold"))
    t.start()
    assert at_publish.wait(30)

    def remove() -> None:
        try:
            remover.remove_tier("cold")
        except InvalidInputError as exc:
            errors.append(exc)

    r = threading.Thread(target=remove)
    r.start()
    r.join(1.0)
    assert r.is_alive()  # waiting for the move
    go.set()
    t.join(30)
    r.join(30)
    assert len(errors) == 1 and "have planes in tier 'cold'" in str(errors[0])
    mover.close()
    remover.close()
    with gpupas.open_archive(tmp_path / "arc") as a:
        assert "cold" in a.tiers() and any(s.tier == "cold" for s in a.manifest(sid).streams)
        a.verify(sid)


def test_damage_in_a_tier_names_the_tier(tmp_path: Path) -> None:
    """A damaged chunk in a tier is reported there (its name and location), not in the archive's folder."""
    from gpupas import tiers

    ckpts = chain(n=1)
    with gpupas.create_archive(tmp_path / "arc") as a:
        sid = a.commit(ckpts[0]).id
        a.add_tier("cold", tmp_path / "cold")
        tiers.move(a, sid, planes_from=1, to="cold")
    shards = sorted(p for p in (tmp_path / "cold" / "snapshots").rglob("c/*") if p.is_file())
    data = bytearray(shards[0].read_bytes())
    data[len(data) // 3] ^= 0xFF
    shards[0].write_bytes(bytes(data))
    with gpupas.open_archive(tmp_path / "arc") as a, pytest.raises(gpupas.IntegrityError) as err:
        a.verify(sid)
    assert f"tier 'cold' ({tmp_path / 'cold'})" in str(err.value) and "Restore tier 'cold'" in str(err.value)


def test_a_full_tier_is_called_full() -> None:
    """ENOSPC is not 'check that it is online and its credentials' (the remedy for a server down)."""
    import errno

    from gpupas.store.tiers import unreachable

    full = str(unreachable("cold", "/mnt/cold", OSError(errno.ENOSPC, "No space left on device")))
    down = str(unreachable("cold", "s3://b/cold", OSError(errno.ECONNREFUSED, "Connection refused")))
    assert "is full" in full and "Free space there" in full and "credentials" not in full
    assert "online" in down and "credentials" in down


def test_a_tier_that_refuses_writes_is_one_that_cannot_be_used(tmp_path: Path) -> None:
    a = gpupas.create_archive(tmp_path / "arc")
    a.add_tier("cold", tmp_path / "cold")
    ckpts = chain(n=2)
    s1, s2 = (a.commit(c).id for c in ckpts)
    for sid in (s1, s2):
        a.tier(sid, planes_from=2, to="cold")
    folders = tmp_path / "cold" / keys.SNAPSHOTS
    folders.chmod(0o555)  # read-only (a mount, another user's); root writes whatever the mode: immutable then
    immutable = os.access(folders, os.W_OK)
    if immutable and subprocess.run(["chattr", "+i", str(folders)], capture_output=True).returncode:
        folders.chmod(0o755)
        pytest.skip("cannot make a folder read-only for this user")
    try:
        with pytest.raises(TierUnavailableError, match="tier 'cold'"):
            a.tier(s1, planes_from=1, to="cold")
        with pytest.warns(UserWarning, match="stays in tier 'cold'"):
            a.discard(s2)  # it is gone: said so, not failed after the fact
        assert a.snapshots() == [s1]
        with pytest.warns(UserWarning, match="tier 'cold' was not swept"):
            a.gc(min_age=0)  # the archive's own folders are swept all the same
        assert same(a.restore(s1), ckpts[0]) and a.verify(s1)
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folders)], check=True)
        folders.chmod(0o755)
    assert [f for f in a.gc(min_age=0) if f.startswith("cold:")]  # its folders, once it takes writes again


def test_tier_names_sharing_one_options_variable_are_refused(tmp_path: Path) -> None:
    """$GPUPAS_TIER_OPTIONS_A_B would hold the credentials of tier a-b and of tier a_b alike."""
    with gpupas.create_archive(tmp_path / "a") as a:
        a.add_tier("a-b", tmp_path / "t1")
        for twin in ("a_b", "A-B", "a.b"):
            with pytest.raises(gpupas.InvalidInputError, match=r"shares \$GPUPAS_TIER_OPTIONS_A_B with tier 'a-b'"):
                a.add_tier(twin, tmp_path / "t2")
        a.add_tier("a-b", tmp_path / "t1")  # the same tier again: fine
        a.add_tier("ab", tmp_path / "t3")
        assert sorted(a.store.tier_table()) == ["a-b", "ab"]
