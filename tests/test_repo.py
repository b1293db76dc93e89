"""The version layer (gpupas.versions): versions, lineage, snapshots, metadata, files, tags, safety."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import realdata

from gpupas.errors import (
    ArchiveExistsError,
    IntegrityError,
    InvalidInputError,
    SnapshotNotFoundError,
    UnsupportedDtypeError,
    VersionNotFoundError,
)
from gpupas.integrations.safetensors import save_file
from gpupas.network import Network, diff_networks, network_from_state_dict
from gpupas.tensors import load_checkpoint
from gpupas.versions import verify as _verify
from gpupas.versions.metrics import normalize_metrics, read_training_log
from gpupas.versions.repository import Repository, create_repository, open_repository
from tests.conftest import flip_chunks_of

needs_torch = pytest.mark.skipif(not realdata.have_torch(), reason="torch is not installed")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real checkpoints (digits, 4 checkpoints) and its training log."""
    return realdata.training_run(tmp_path_factory.mktemp("run"))


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    r = create_repository(tmp_path / "arc")
    yield r
    r.close()


def ckpts(run: Path) -> list[Path]:
    return sorted(run.glob("step-*.safetensors"))


def test_commit_directory_makes_time_ordered_snapshots(repo: Repository, run: Path) -> None:
    v = repo.commit("digits", run, hyperparameters={"lr": 0.01, "opt": {"name": "adam", "betas": [0.9, 0.99]}},
                    metrics=run / "train_log.csv", files=[run / "config.json"], message="first run", author="ana",
                    best_by="accuracy")
    assert (v.id, v.name, v.parents, v.author, v.message) == (1, "digits", [], "ana", "first run")
    assert [s["step"] for s in v.snapshots] == [15, 30, 45, 60]
    assert [s["source"] for s in v.snapshots] == [p.name for p in ckpts(run)]
    # each snapshot is a delta against the previous one
    assert [s["base"] for s in v.snapshots] == [None] + [s["id"] for s in v.snapshots[:-1]]
    assert v.latest == v.snapshots[-1]["id"]
    acc = {p[0]: p[1] for p in v.metrics["accuracy"]}
    best_step = max((s["step"] for s in v.snapshots), key=lambda st: acc.get(st, -1))
    assert v.best == next(s["id"] for s in v.snapshots if s["step"] == best_step)
    assert v.hyperparameters["opt"]["betas"] == [0.9, 0.99]
    assert v.files["config.json"]["size"] == (run / "config.json").stat().st_size
    for i, p in enumerate(ckpts(run), 1):  # every snapshot restores bit-exactly
        want, got = load_checkpoint(p), repo.restore(v.id, i)
        assert want.keys() == got.keys() and all(got[k].tobytes() == want[k].tobytes() for k in want)
    assert repo.restore("digits", "best")["fc2.bias"].dtype == np.float32


def test_lineage_refs_tags_and_first_snapshot_delta(repo: Repository, run: Path) -> None:
    a = repo.commit("base", ckpts(run)[0])
    b = repo.commit("ft", ckpts(run)[1], parents=["base"])
    c = repo.commit("merge", ckpts(run)[2], parents=[a.id, "ft"])
    assert b.snapshots[0]["base"] == a.latest  # fine-tune stored as a delta to its parent
    assert c.parents == [1, 2]
    assert repo.tag("prod", b) == 2
    assert repo.tag("prod", 2) == 2  # same target: fine
    with pytest.raises(ArchiveExistsError):
        repo.tag("prod", 3)
    repo.tag("prod", 3, force=True)
    assert repo.resolve("prod") == 3 and repo.tags() == {"prod": 3}
    assert repo.resolve("base") == 1 and repo.resolve("3") == 3 and repo.resolve(2) == 2
    repo.commit("base", ckpts(run)[3])
    assert repo.resolve("base") == 4  # a name means its newest version
    assert repo.untag("prod") == 3 and repo.tags() == {}
    with pytest.raises(VersionNotFoundError, match="no version, tag or name 'nope'"):
        repo.resolve("nope")
    with pytest.raises(VersionNotFoundError):
        repo.version(99)
    rows = {r["id"]: r for r in repo.lineage()}
    assert rows[3]["parents"] == [1, 2] and rows[4]["parents"] == []
    assert repo.show(1)["children"] == [2, 3]


def test_files_are_deduplicated_and_checked(repo: Repository, tmp_path: Path) -> None:
    d = tmp_path / "scripts"
    (d / "sub").mkdir(parents=True)
    (d / "train.py").write_text("print('train')\n")
    (d / "sub" / "cfg.yaml").write_text("lr: 0.1\n")
    w = {"w": np.arange(4, dtype=np.float32)}
    v1 = repo.commit("a", w, files=[d])
    v2 = repo.commit("b", w, files={"train.py": b"print('train')\n", "notes/readme.txt": b"hi"})
    assert set(v1.files) == {"scripts/train.py", "scripts/sub/cfg.yaml"}
    assert v1.files["scripts/train.py"]["sha256"] == v2.files["train.py"]["sha256"]
    blobs = list((repo.root / "files").iterdir())
    assert len(blobs) == 3  # the shared script is stored once
    out = repo.checkout(2, tmp_path / "co")
    assert (tmp_path / "co" / "notes" / "readme.txt").read_bytes() == b"hi"
    assert {p.name for p in out} >= {"model.safetensors", "train.py", "readme.txt", "gpupas-version.json"}
    co = tmp_path / "co"  # a checkout over another (--force) leaves one version there, not a mix of two
    (co / "mine.txt").write_text("the user's own")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "readme.txt").write_text("not the checkout's")
    shutil.rmtree(co / "notes")
    (co / "notes").symlink_to(outside)  # a folder linked elsewhere: nothing removed through it
    repo.checkout(1, co, force=True, format="torch")
    assert not (co / "train.py").exists() and not (co / "model.safetensors").exists()  # v2's, not v1's
    assert (outside / "readme.txt").exists() and (co / "mine.txt").exists()
    assert (co / "model.pt").is_file() and (co / "scripts" / "sub" / "cfg.yaml").is_file()
    (co / "notes").unlink()
    repo.checkout(2, co, force=True)
    assert not (co / "scripts").exists() and not (co / "model.pt").exists()  # v1's files, and their folders
    assert sorted(p.name for p in co.iterdir()) == ["gpupas-version.json", "mine.txt", "model.safetensors", "notes",
                                                    "train.py"]
    sha = v2.files["notes/readme.txt"]["sha256"]
    (repo.root / "files" / sha).write_bytes(b"ho")  # damage
    with pytest.raises(IntegrityError, match="damaged"):
        repo.file_bytes(sha)
    assert not repo.verify()["ok"]


@pytest.mark.parametrize("bad", ["../evil", "a/b", "", "x" * 200, ".hidden", "123", "a\0b", "con fig"])
def test_names_cannot_leave_the_archive(repo: Repository, bad: str) -> None:
    w = {"w": np.zeros(2, np.float32)}
    with pytest.raises(InvalidInputError):
        repo.commit(bad, w)
    v = repo.commit("ok", w)
    with pytest.raises(InvalidInputError):
        repo.tag(bad, v.id)
    if bad and not bad.isdigit():
        with pytest.raises((InvalidInputError, VersionNotFoundError)):
            repo.resolve(bad)
    assert [x.id for x in repo.versions()] == [1]
    assert not list((repo.root / "refs").rglob("*.json")) and repo.tags() == {}


@pytest.mark.parametrize("bad", ["../x.py", "/etc/passwd", "a/../../b", "a\\b", "ok/.."])
def test_file_names_cannot_leave_the_archive_or_checkout(repo: Repository, bad: str) -> None:
    with pytest.raises(InvalidInputError):
        repo.commit("v", {"w": np.zeros(2, np.float32)}, files={bad: b"x"})
    assert repo.versions() == []


def test_an_attached_file_name_too_long_to_check_out_is_refused_by_its_rule(repo: Repository, tmp_path: Path) -> None:
    """A file name whose parts are each allowed but whose path is longer than file systems write (it committed,
    then every checkout of the version failed with 'File name too long'): refused at commit, naming the rule."""
    w = {"w": np.zeros(2, np.float32)}
    fits = "/".join(["a" * 100] * 10 + ["b" * 14])  # 1024 characters
    v = repo.commit("ok", w, files={fits: b"x"})
    assert repo.checkout(v.id, tmp_path / "co")[1] == tmp_path / "co" / fits
    with pytest.raises(InvalidInputError, match=r"at most 1024 characters"):
        repo.commit("long", w, files={"/".join(["a" * 120] * 40): b"x"})
    assert [x.name for x in repo.versions()] == ["ok"]


def test_bad_input_changes_nothing(repo: Repository, run: Path, tmp_path: Path) -> None:
    repo.commit("good", ckpts(run)[0])
    before = sorted(p.relative_to(repo.root) for p in repo.root.rglob("*") if p.is_file()
                    and not p.name.startswith("catalog.sqlite"))
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in ckpts(run):
        (bad / p.name).write_bytes(p.read_bytes())
    last = sorted(bad.iterdir())[-1]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated checkpoint, written last
    with pytest.raises(InvalidInputError, match="not a valid safetensors file"):
        repo.commit("dir", bad)
    with pytest.raises(InvalidInputError):
        repo.import_folder(bad, "chain")
    with pytest.raises(InvalidInputError, match="unknown checkpoint type"):
        repo.commit("txt", run / "config.json")
    with pytest.raises(InvalidInputError, match="hyperparameters"):
        repo.commit("hp", ckpts(run)[0], hyperparameters={"lr": float("nan")})
    with pytest.raises(VersionNotFoundError):
        repo.commit("orphan", ckpts(run)[0], parents=[42])
    after = sorted(p.relative_to(repo.root) for p in repo.root.rglob("*") if p.is_file()
                   and not p.name.startswith("catalog.sqlite"))
    assert after == before
    assert [v.id for v in repo.versions()] == [1]


def test_one_parent_or_ref_alone_and_wrong_types_of_metadata(repo: Repository, tmp_path: Path) -> None:
    """One parent (or one version to verify) given alone, not in a list, is that one version: a name was read as
    its letters (parents="net": "no version 'n'"; verify("12") checked versions 1 and 2), an id or a Version
    was a TypeError. Hyperparameters that are not a mapping and attached files that are neither paths nor
    bytes are refused naming them, not a TypeError or ValueError from dict() or Path(); nothing is published.
    The training hook takes one parent alone too."""
    w = np.zeros(3, np.float32)
    v1 = repo.commit("net", {"w": w})
    for parents in ("net", 1, v1, np.int64(1)):
        assert repo.commit("child", {"w": w + 1}, parents=parents).parents == [1]
    from gpupas.integrations.training import CheckpointHook

    with CheckpointHook(repo, "tuned", parents="net") as hook:  # the training hook, too
        assert hook({"w": w + 2}, step=1).parents == [1]
    assert repo.verify("1")["checked"]["versions"] == 1 and repo.verify(1)["checked"]["versions"] == 1
    with pytest.raises(VersionNotFoundError, match="12"):
        repo.verify("12")
    with pytest.raises(InvalidInputError, match=r"parents.*not a float"):
        repo.commit("child", {"w": w}, parents=1.5)
    count = len(repo.versions())
    for hp in ("lr=0.1", [1], 0.1):
        with pytest.raises(InvalidInputError, match=r"hyperparameters must be a mapping"):
            repo.commit("bad", {"w": w}, hyperparameters=hp)
    for files, what in (({"a.txt": 5}, r"attached file 'a\.txt'.*not a int"), ({"a.txt": None}, "not a NoneType"),
                        (b"abc", r"give \{name: bytes\}"), (5, "not a int"), ([5], "5 is not a path")):
        with pytest.raises(InvalidInputError, match=what):
            repo.commit("bad", {"w": w}, files=files)
    assert len(repo.versions()) == count and "bad" not in {v.name for v in repo.versions()}
    assert repo.restore(1)["w"].tobytes() == w.tobytes()


def test_a_checkout_into_a_file_is_refused_by_name(repo: Repository, tmp_path: Path) -> None:
    """checkout's output folder given as an existing file: refused naming it (export writes one file), not a
    NotADirectoryError; the file is kept."""
    repo.commit("net", {"w": np.zeros(3, np.float32)})
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for force in (False, True):
        with pytest.raises(ArchiveExistsError, match=r"notes\.txt is a file, not a folder.*export"):
            repo.checkout(1, notes, force=force)
    assert notes.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["arc", "notes.txt"]


def test_a_checkout_never_writes_through_a_folder_linked_elsewhere(repo: Repository, tmp_path: Path) -> None:
    """checkout --force into a folder where the folder of an attached file (or of the weights) is a link to
    elsewhere: refused naming the link, nothing written there nor through it (it wrote the file outside)."""
    repo.commit("net", {"w": np.zeros(3, np.float32)}, files={"sub/x.txt": b"hi"})
    co, outside = tmp_path / "co", tmp_path / "outside"
    co.mkdir()
    outside.mkdir()
    (co / "sub").symlink_to(outside)
    for kw in ({}, {"weights_name": "sub/w.safetensors"}):
        with pytest.raises(InvalidInputError, match=r"co/sub is a link"):
            repo.checkout(1, co, force=True, **kw)
        assert list(outside.iterdir()) == [] and sorted(p.name for p in co.iterdir()) == ["sub"]


def test_import_folder_is_a_lineage_chain_with_metrics_per_step(repo: Repository, run: Path) -> None:
    vs = repo.import_folder(run, "digits", metrics=run / "train_log.csv", hyperparameters={"lr": 0.01},
                            files=[run / "config.json"])
    assert [v.id for v in vs] == [1, 2, 3, 4]
    assert [v.parents for v in vs] == [[], [1], [2], [3]]
    assert vs[1].snapshots[0]["base"] == vs[0].latest
    steps = [[p[0] for p in v.metrics["loss"]] for v in vs]
    assert steps[0] == list(range(1, 16)) and steps[3] == list(range(46, 61))
    d = repo.diff(1, 4)
    assert d["hyperparameters"] == {} and not any(d["network"].values())
    assert d["metrics"]["loss"][1] < d["metrics"]["loss"][0]
    w = d["weights"]
    assert w["identical"] == 0 and 0 < w["rel_l2"] < 10
    row = next(r for r in w["tensors"] if r["name"] == "fc2.weight")
    assert row["changed"] > 0.5 and row["max_abs"] >= row["mean_abs"] > 0


def test_diff_reports_network_and_hyperparameter_changes(repo: Repository) -> None:
    rng = np.random.default_rng(0)
    a = {"fc1.weight": rng.standard_normal((8, 4)).astype(np.float32), "fc2.weight": np.ones((2, 8), np.float32)}
    b = {"fc1.weight": a["fc1.weight"], "fc2.weight": np.ones((3, 8), np.float32),
         "fc3.weight": np.ones((3, 3), np.float32)}
    repo.commit("a", a, hyperparameters={"lr": 0.1, "opt": {"name": "sgd"}})
    repo.commit("b", b, parents=[1], hyperparameters={"lr": 0.01, "opt": {"name": "sgd"}, "wd": 1e-4})
    d = repo.diff("a", "b")
    assert d["hyperparameters"] == {"lr": [0.1, 0.01], "wd": [None, 1e-4]}
    assert d["hyperparameters_absent"] == {"wd": [True, False]}  # (not None: absent)
    repo.commit("c", b, parents=[2], hyperparameters={"lr": 0.01, "opt": {"name": "sgd"}, "wd": None})
    d2 = repo.diff("b", "c", weights=False)
    assert d2["hyperparameters"] == {"wd": [1e-4, None]} and d2["hyperparameters_absent"] == {}
    assert [x["name"] for x in d["network"]["added"]] == ["fc3"]
    assert d["network"]["changed"][0]["attrs"]["out_features"] == [2, 3]
    rows = {r["name"]: r for r in d["weights"]["tensors"]}
    assert rows["fc1.weight"]["changed"] == 0.0 and rows["fc1.weight"]["rel_l2"] == 0.0
    assert rows["fc2.weight"]["shape"] == [[2, 8], [3, 8]]
    assert d["weights"]["added"] == ["fc3.weight"]


def test_diff_reads_only_the_tensors_both_versions_have(tmp_path: Path) -> None:
    """diff compares the tensors two versions share; one that only one of them has is named (added or
    removed), never read: with every chunk holding only such a tensor damaged, the diff still succeeds."""
    rng = np.random.default_rng(7)
    a = {k: (rng.standard_normal(1_000_000) * 0.02).astype(np.float32) for k in "abc"}
    b = {"a": a["a"] + np.float32(1e-4), "c": a["c"], "d": a["b"] * 2}
    with create_repository(tmp_path / "arc") as repo:
        v1 = repo.commit("a", a)
        v2 = repo.commit("b", b, parents=[v1.id])
        m1, m2 = repo.archive.manifest(v1.latest), repo.archive.manifest(v2.latest)
    assert flip_chunks_of(tmp_path / "arc", m1, "b") >= 2 and flip_chunks_of(tmp_path / "arc", m2, "d") >= 2
    with open_repository(tmp_path / "arc") as repo:
        w = repo.diff(v1.id, v2.id)["weights"]
        assert w["removed"] == ["b"] and w["added"] == ["d"] and w["identical"] == 1
        assert [r["name"] for r in w["tensors"]] == ["a", "c"] and w["tensors"][0]["changed"] > 0.5
        with pytest.raises(IntegrityError, match="tensor\\(s\\) d"):
            repo.restore(v2.id)  # (the damage is there)


def test_copy_scaffolds_and_add_snapshot_continues(repo: Repository, run: Path) -> None:
    src = repo.commit("base", ckpts(run)[0], hyperparameters={"lr": 0.01}, files={"a.txt": b"a"})
    v = repo.copy("base", "ft")
    assert (v.id, v.parents, v.latest, v.hyperparameters, v.files) == (2, [1], src.latest, {"lr": 0.01}, src.files)
    v = repo.add_snapshot("ft", ckpts(run)[1], metrics={"loss": [[30, 0.5]]}, best=True)
    assert len(v.snapshots) == 2 and v.snapshots[1]["base"] == src.latest and v.best == v.latest
    assert v.snapshots[1]["step"] == 30 and v.rev == 1
    v = repo.log_metrics("ft", {"loss": [[31, 0.4]]})
    assert v.metrics["loss"] == [[30, 0.5], [31, 0.4]]
    v = repo.mark_best("ft", 1)
    assert v.best == src.latest
    with pytest.raises(SnapshotNotFoundError):
        v.snapshot(7)
    with pytest.raises(SnapshotNotFoundError):
        repo.version(1).snapshot("best")


def test_export_safetensors_and_refuse_overwrite(repo: Repository, run: Path, tmp_path: Path) -> None:
    repo.commit("m", ckpts(run)[2])
    out = repo.export("m", tmp_path / "m.safetensors")
    want = load_checkpoint(ckpts(run)[2])
    got = load_checkpoint(out)
    assert all(got[k].tobytes() == want[k].tobytes() for k in want)
    head = out.read_bytes()
    meta = json.loads(head[8:8 + int.from_bytes(head[:8], "little")])["__metadata__"]
    assert meta["format"] == "pt"  # transformers' from_pretrained loads only files that say so
    with pytest.raises(ArchiveExistsError):
        repo.export("m", out)
    with pytest.raises(ArchiveExistsError):
        repo.checkout("m", tmp_path)  # not empty
    src = tmp_path / "spec.safetensors"  # a file's own metadata comes back with its weights
    save_file({"w": np.ones(3, np.float32)}, src, metadata={"modelspec.title": "demo", "format": "pt"})
    v = repo.commit("spec", src)
    repo.add_snapshot(v.id, src)
    for snap in (1, 2):
        head = repo.export("spec", tmp_path / f"spec{snap}.safetensors", snapshot=snap).read_bytes()
        meta = json.loads(head[8:8 + int.from_bytes(head[:8], "little")])["__metadata__"]
        assert meta == {"modelspec.title": "demo", "format": "pt", "gpupas_version": str(v.id)}
    repo.commit("odd", {"__metadata__": np.ones(2, np.float32)})  # a legal tensor name, but not in safetensors
    with pytest.raises(InvalidInputError, match="--format torch"):
        repo.export("odd", tmp_path / "odd.safetensors")
    assert not (tmp_path / "odd.safetensors").exists()


def test_what_killed_exports_and_checkouts_left_is_swept_by_the_next(repo: Repository, tmp_path: Path) -> None:
    """A SIGKILLed export or checkout leaves its hidden temporary file or folder beside the output (a whole
    snapshot's bytes); a later export or checkout of that output removes those untouched for an hour, and
    nothing else: a fresh one (another writer of the same name at work) and other hidden files stay."""
    repo.commit("m", {"w": np.arange(6, dtype=np.float32)})
    old = time.time() - 2 * 3600

    def planted(name: str, folder: bool = False, when: float = old) -> Path:
        q = tmp_path / name
        if folder:
            (q / "sub").mkdir(parents=True)
            (q / "sub" / "model.safetensors").write_bytes(b"half")
            os.utime(q / "sub" / "model.safetensors", (when, when))
            os.utime(q / "sub", (when, when))
        else:
            q.write_bytes(b"half a file")
        os.utime(q, (when, when))
        return q

    hexes = iter(f"{i:032x}" for i in range(1, 99))
    stale = [planted(f".m.safetensors.{next(hexes)}.tmp"), planted(f".co.{next(hexes)}.tmp", folder=True)]
    kept = [planted(f".m.safetensors.{next(hexes)}.tmp", when=time.time()),  # a write going on
            planted(f".co.{next(hexes)}.tmp", folder=True, when=time.time()),
            planted(".m.safetensors.not-ours.tmp"), planted(f".other.{next(hexes)}.tmp")]
    busy = planted(f".co.{next(hexes)}.tmp", folder=True)  # an old folder, but a file in it written just now
    (busy / "sub" / "model.safetensors").write_bytes(b"still writing")
    repo.export("m", tmp_path / "m.safetensors")
    repo.checkout("m", tmp_path / "co")
    assert not any(q.exists() for q in stale)
    assert all(q.exists() for q in [*kept, busy])


@needs_torch
def test_torch_export_and_network_from_module(repo: Repository, run: Path, tmp_path: Path) -> None:
    import torch

    model = realdata.make_cnn()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in load_checkpoint(ckpts(run)[-1]).items()})
    v = repo.commit("cnn", model.state_dict(), network=model)
    net = v.network
    assert net.source == "fx"
    kinds = [(n.name, n.kind, n.variant) for n in net.nodes]
    assert ("conv1", "conv", None) in kinds and ("pool", "pool", "max") in kinds
    p = repo.export(v.id, tmp_path / "cnn.pt")
    sd = torch.load(p, weights_only=True)
    assert all(torch.equal(sd[k], model.state_dict()[k]) for k in sd)
    repo.checkout(v.id, tmp_path / "co", format="torch")
    assert (tmp_path / "co" / "model.pt").is_file()


@needs_torch
def test_torch_export_holds_the_snapshot_once(repo: Repository, tmp_path: Path) -> None:
    """A torch export wraps the restored arrays (it copied each into a tensor first: twice the snapshot at the
    peak, 1,079 MB extra for a 537 MB export against 555 MB now) and writes the same file."""
    import tracemalloc

    import torch

    w = np.random.default_rng(0).standard_normal((1024, 2048)).astype(np.float32)  # 8 MiB
    v = repo.commit("big", {"w": w, "b16": w[:64].astype(ml_dtypes.bfloat16)})
    repo.archive.bases.clear()
    tracemalloc.start()
    try:
        p = repo.export(v.id, tmp_path / "big.pt")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * w.nbytes, peak  # the restored block (and the window of planes), not a copy beside it
    sd = torch.load(p, weights_only=True)
    assert sd["w"].numpy().tobytes() == w.tobytes() and sd["b16"].dtype == torch.bfloat16
    assert sd["b16"].view(torch.int16).numpy().tobytes() == w[:64].astype(ml_dtypes.bfloat16).tobytes()


@needs_torch
def test_network_from_untraceable_module_uses_module_tree() -> None:
    from torch import nn

    from gpupas.network import network_from_module

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):  # data-dependent control flow: fx cannot trace it
            return self.b(self.a(x)) if x.sum() > 0 else self.b(x)

    net = network_from_module(Branchy())
    assert net.source == "modules" and [n.name for n in net.nodes] == ["a", "b"] and net.edges == [(0, 1)]


def test_network_from_state_dict_guesses_types() -> None:
    net = network_from_state_dict({
        "embeddings.word_embeddings.weight": (100, 8), "encoder.0.attention.query.weight": (8, 8),
        "encoder.0.attention.query.bias": (8,), "encoder.0.LayerNorm.weight": (8,), "encoder.0.LayerNorm.bias": (8,),
        "features.0.weight": (4, 3, 3, 3), "bn.weight": (4,), "bn.running_mean": (4,), "bn.running_var": (4,),
    })
    types = {n.name: n.type for n in net.nodes}
    assert types == {"embeddings.word_embeddings": "Embedding", "encoder.0.attention.query": "Linear",
                     "encoder.0.LayerNorm": "LayerNorm", "features.0": "Conv2d", "bn": "BatchNorm"}
    assert Network.from_dict(net.to_dict()).to_dict() == net.to_dict()
    assert diff_networks(net, net) == {"added": [], "removed": [], "changed": [], "edges_added": [],
                                       "edges_removed": []}
    with pytest.raises(InvalidInputError):
        Network.from_dict({"nodes": [{"id": 0, "name": "a", "type": "x"}], "edges": [[0, 5]]})


def test_network_diff_tells_apart_the_uses_of_a_module_called_twice() -> None:
    """A traced ResNet block calls its relu twice: two nodes of one name. Replacing the second use must show."""
    torch = pytest.importorskip("torch")
    from torch import nn

    from gpupas.network import network_from_module

    class Block(nn.Module):
        def __init__(self, second: nn.Module | None = None) -> None:
            super().__init__()
            self.c1, self.c2, self.relu = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1), nn.ReLU()
            self.act2 = second

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.c2(self.relu(self.c1(x))) + x
            return self.relu(y) if self.act2 is None else self.act2(y)

    a, b = network_from_module(Block()), network_from_module(Block(nn.GELU()))
    assert [n.name for n in a.nodes].count("relu") == 2
    d = diff_networks(a, b)
    assert d["removed"] == [{"name": "relu#2", "type": "ReLU"}] and d["added"] == [{"name": "act2", "type": "GELU"}]
    assert ["add", "act2"] in d["edges_added"] and ["add", "relu#2"] in d["edges_removed"]
    assert diff_networks(a, a)["edges_added"] == [] and diff_networks(b, b)["removed"] == []


def test_training_hook_commits_each_checkpoint_against_the_previous(tmp_path: Path, run: Path) -> None:
    from gpupas.integrations.training import CheckpointHook

    hook = CheckpointHook(tmp_path / "arc", "run1", hyperparameters={"lr": 0.01})
    for i, p in enumerate(ckpts(run)):
        step = 15 * (i + 1)
        hook.log(step - 1, loss=1.0 / step)
        v = hook(load_checkpoint(p), step=step, metrics={"accuracy": 0.5 + i / 10}, best=(i == 2))
    hook.log(61, loss=0.001)
    v = hook.close()
    assert v is not None and v.id == 1 and len(v.snapshots) == 4 and v.rev == 4
    assert [s["base"] for s in v.snapshots] == [None] + [s["id"] for s in v.snapshots[:-1]]
    assert v.best == v.snapshots[2]["id"] and v.latest == v.snapshots[3]["id"]
    assert [p[0] for p in v.metrics["loss"]] == [14, 29, 44, 59, 61]
    with open_repository(tmp_path / "arc") as repo:
        assert repo.query("select m where m.metric.accuracy > 0.75")[0]["id"] == 1
        assert repo.verify()["ok"]


def test_training_hook_survives_a_refused_call(tmp_path: Path, run: Path) -> None:
    """A bad metric or step is refused by that call alone: the points pending before stay, and the next
    good call commits as if the bad one had not been made."""
    from gpupas.integrations.training import CheckpointHook

    paths = ckpts(run)
    with CheckpointHook(tmp_path / "arc", "run1") as hook:
        hook.log(1, loss=0.5)
        hook(load_checkpoint(paths[0]), step=np.int64(10), metrics={"step": 10})  # a metric may be named "step"
        hook.log(11, loss=0.4)
        for metrics, step in (({"loss": "nan?"}, 20), ({1: 6}, 20), ([0.3], 20), ({"loss": 0.3}, 2.5),
                              ({"loss": 0.3}, True)):
            with pytest.raises(InvalidInputError):
                hook(load_checkpoint(paths[1]), step=step, metrics=metrics)
        hook.log(step=15, loss=0.35)  # step by keyword: the step, not a metric
        v = hook(load_checkpoint(paths[1]), step=20.0, metrics={"loss": 0.3})  # an integral float step
    assert [s["step"] for s in v.snapshots] == [10, 20]
    assert v.metrics["loss"] == [[1, 0.5], [11, 0.4], [15, 0.35], [20, 0.3]] and v.metrics["step"] == [[10, 10.0]]


def test_asynchronous_hook_refuses_a_non_tensor_at_that_call(tmp_path: Path) -> None:
    from gpupas.integrations.training import CheckpointHook

    w = np.arange(12, dtype=np.float32)
    with CheckpointHook(tmp_path / "arc", "run1", asynchronous=True) as hook:
        hook({"w": w}, step=1)
        for odd in (3, None, [1.0, 2.0]):
            with pytest.raises(InvalidInputError, match="not a tensor"):
                hook({"w": w + 1, "n": odd}, step=2)
        hook({"w": w + 2}, step=3, metrics={"loss": 0.1})
    v = hook.version
    assert v is not None and [s["step"] for s in v.snapshots] == [1, 3] and v.metrics["loss"] == [[3, 0.1]]


def test_asynchronous_commit_in_flight_at_exit_is_finished(tmp_path: Path) -> None:
    """A process that exits with a background commit still running (no close()) finishes it: the commit's coding
    and writes were refused by concurrent.futures, shut down at exit, and the snapshot silently lost."""
    script = """if True:
        import sys, time, numpy as np, gpupas
        from gpupas.integrations.async_commit import AsyncCommitter
        arc = gpupas.create_archive(sys.argv[1])
        def commit(state):
            time.sleep(0.5)  # still running at exit
            return arc.commit(state)
        AsyncCommitter(commit).submit({"w": np.arange(4_000_000, dtype=np.float32)})
    """
    import gpupas

    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "arc")], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr
    with gpupas.open_archive(tmp_path / "arc") as a:
        assert len(a.snapshots()) == 1, run.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_child_forked_while_an_asynchronous_commit_runs_exits(tmp_path: Path) -> None:
    """A child forked during a background commit (a DataLoader's worker, each epoch) exits: the exit hook it
    inherited waited for the commit, whose thread the child does not have, so a worker ended only when killed
    (torch's DataLoader: 5 s per worker, each epoch) and a Process.join() hung."""
    import multiprocessing
    import threading

    from gpupas.integrations.async_commit import AsyncCommitter

    started, release = threading.Event(), threading.Event()

    def commit(state: dict[str, np.ndarray]) -> int:
        started.set()
        release.wait(60)
        return 1

    committer = AsyncCommitter(commit)
    committer.submit({"w": np.zeros(4, np.float32)})
    assert started.wait(30)
    child = multiprocessing.get_context("fork").Process(target=int)
    try:
        child.start()
        child.join(20)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
        release.set()
        committer.close()


def test_asynchronous_hook_keeps_a_failed_commits_metrics_and_closes(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A background commit that fails keeps its metric points pending (as a failed synchronous call does); its error
    is raised by the next call, or by close(), which still writes the points pending and releases the archive."""
    from gpupas.integrations.training import CheckpointHook

    w = np.arange(12, dtype=np.float32)
    for closing in (True, False):
        hook = CheckpointHook(tmp_path / f"arc{closing}", "run", asynchronous=True)
        hook({"w": w}, step=1, metrics={"loss": 1.0})
        append = hook.repo.add_snapshot
        monkeypatch.setattr(hook.repo, "add_snapshot", lambda *a, **kw: (_ for _ in ()).throw(OSError("disk full")))
        hook({"w": w + 1}, step=2, metrics={"loss": 0.5})  # fails in the background
        hook.log(3, acc=0.9)
        if not closing:
            with pytest.raises(OSError, match="disk full"):
                hook({"w": w + 3}, step=3, metrics={"loss": 0.4})
            monkeypatch.setattr(hook.repo, "add_snapshot", append)
            hook({"w": w + 4}, step=4)
            hook.close()
        else:
            with pytest.raises(OSError, match="disk full"):
                hook.close()
            assert hook.repo._catalog is None  # released
        with open_repository(tmp_path / f"arc{closing}") as repo:
            v = repo.version("run")
        assert [s["step"] for s in v.snapshots] == ([1] if closing else [1, 4])
        assert v.metrics["loss"] == [[1, 1.0], [2, 0.5]] + ([] if closing else [[3, 0.4]])
        assert v.metrics["acc"] == [[3, 0.9]]


@needs_torch
def test_asynchronous_hook_refuses_a_tensor_it_cannot_archive_at_that_call(tmp_path: Path) -> None:
    """A meta, sparse or complex tensor is refused by the call given it, as a synchronous commit refuses it, not
    by the next call (whose checkpoint would be lost with it)."""
    import torch

    from gpupas.integrations.training import CheckpointHook

    w = torch.arange(12, dtype=torch.float32)
    with CheckpointHook(tmp_path / "arc", "run", asynchronous=True) as hook:
        hook({"w": w}, step=1)
        odd = {"meta device": torch.empty(3, device="meta"), "sparse": torch.eye(2).to_sparse(),
               "complex64": torch.ones(2, dtype=torch.complex64)}
        for step, (why, t) in enumerate(odd.items(), 2):
            with pytest.raises(UnsupportedDtypeError, match=f"tensor 'n': .*{why}"):
                hook({"w": w + 1, "n": t}, step=step)
            hook({"w": w + step}, step=step)
    v = hook.version
    assert v is not None and [s["step"] for s in v.snapshots] == [1, 2, 3, 4]


@needs_torch
def test_asynchronous_hook_refuses_a_nested_or_wrapper_tensor_at_that_call(tmp_path: Path) -> None:
    """A nested tensor and a tensor subclass whose data is not plain tensor data (a wrapper subclass, as torchao's
    and DTensor are) passed the call's check (an empty tensor of their dtype stood in for them) and failed in the
    background: the next call raised it and lost its own checkpoint. They are refused by the call given them."""
    import torch
    from torch.utils._pytree import tree_map

    from gpupas.integrations.training import CheckpointHook

    class Wrapper(torch.Tensor):
        @staticmethod
        def __new__(cls, elem: Any) -> Any:
            return torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype)  # type: ignore[attr-defined]

        def __init__(self, elem: Any) -> None:
            self.elem = elem

        @classmethod
        def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*tree_map(lambda x: x.elem if isinstance(x, Wrapper) else x, args), **(kwargs or {}))
            return tree_map(lambda x: Wrapper(x) if isinstance(x, torch.Tensor) else x, out)

    class Tagged(torch.Tensor):  # plain data under another class: archived
        pass

    w = torch.arange(12, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: the strided nested layout is a prototype
        odd = {"nested": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "Wrapper": Wrapper(torch.ones(3))}
    with CheckpointHook(tmp_path / "arc", "run", asynchronous=True) as hook:
        hook({"w": w}, step=1)
        for step, (why, t) in enumerate(odd.items(), 2):
            with pytest.raises(UnsupportedDtypeError, match=f"tensor 'n': .*{why}"):
                hook({"w": w + 1, "n": t}, step=step)
            hook({"w": w + step}, step=step)
        hook({"w": w, "n": torch.ones(2).as_subclass(Tagged)}, step=4)
    v = hook.version
    assert v is not None and [s["step"] for s in v.snapshots] == [1, 2, 3, 4]


@needs_torch
def test_asynchronous_hook_refuses_a_subclass_whose_ops_all_fail_as_a_commit_does(tmp_path: Path) -> None:
    """A wrapper subclass that implements no op (not even detach, nor the empty slice the call probes it with)
    raised its own NotImplementedError from the asynchronous hook's call: refused as a synchronous commit
    refuses it."""
    import torch

    from gpupas.integrations.training import CheckpointHook

    class Opaque(torch.Tensor):
        @staticmethod
        def __new__(cls, shape: tuple[int, ...]) -> Any:
            return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=torch.float32)  # type: ignore[attr-defined]

        @classmethod
        def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            raise NotImplementedError(f"{func} is not implemented")

    with CheckpointHook(tmp_path / "arc", "run", asynchronous=True) as hook:
        hook({"w": torch.ones(3)}, step=1)
        with pytest.raises(UnsupportedDtypeError, match="tensor 'n': a Opaque tensor does not read as plain"):
            hook({"w": torch.ones(3), "n": Opaque((3, 4))}, step=2)
        hook({"w": torch.ones(3) * 2}, step=2)
    v = hook.version
    assert v is not None and [s["step"] for s in v.snapshots] == [1, 2]


@needs_torch
def test_asynchronous_hook_takes_what_a_synchronous_commit_takes(tmp_path: Path) -> None:
    """A module's non-tensor extra state, a training checkpoint's optimizer state and NumPy scalars: left out
    (or kept) as the synchronous first call does, not refused by every later, asynchronous one."""
    import torch

    from gpupas.integrations.training import CheckpointHook

    class WithExtra(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def get_extra_state(self) -> dict[str, int]:
            return {"version": 1}

        def set_extra_state(self, state: object) -> None:
            pass

    model = WithExtra()
    with CheckpointHook(tmp_path / "arc", "run", asynchronous=True) as hook, pytest.warns(UserWarning):
        hook(model, step=1)
        hook(model, step=2)  # asynchronous from here on
        hook({"model": model.state_dict(), "optimizer": {"lr": 0.1}}, step=3)
        hook({"lin.weight": model.lin.weight, "lin.bias": model.lin.bias, "n": np.float32(2)}, step=4)
    v = hook.version
    assert v is not None and [s["step"] for s in v.snapshots] == [1, 2, 3, 4]
    with open_repository(tmp_path / "arc") as repo:
        names = [sorted(t.name for t in repo.archive.manifest(s["id"]).tensors) for s in v.snapshots]
    assert names == [["lin.bias", "lin.weight"]] * 3 + [["lin.bias", "lin.weight", "n"]]


# One process of a 2-process DDP run (gloo, CPU): every rank runs the hooks, as a training script does.
DDP_RANK = """
import datetime, json, sys, torch, torch.distributed as dist
import gpupas
rank, tmp = int(sys.argv[1]), sys.argv[2]
early = gpupas.CheckpointHook(tmp + "/early", "ddp")  # made before the process group is up (a Lightning callback)
dist.init_process_group("gloo", init_method="file://" + tmp + "/pg", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=60))

class Net(torch.nn.Sequential):
    def state_dict(self, *args, **kwargs):  # a collective, as FSDP's full state_dict: rank 0 waits for every rank
        dist.barrier()
        return super().state_dict(*args, **kwargs)

torch.manual_seed(0)
ddp = torch.nn.parallel.DistributedDataParallel(Net(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)))
opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
hooks = [gpupas.CheckpointHook(tmp + "/arc", "ddp", model=ddp, best_by="loss"),
         gpupas.CheckpointHook(tmp + "/async", "ddp", asynchronous=True), early]
torch.manual_seed(1 + rank)  # each rank its own batches
out = {"returned": [], "losses": []}
for step in (1, 2, 3):
    loss = ddp(torch.randn(4, 8)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    out["losses"].append(loss.item())
    for hook in hooks:
        hook.log(step, lr=0.1)
        v = hook(ddp, step=step, metrics={"loss": loss.item()})
        out["returned"].append(v and v.id)
out["closed"] = [v and v.id for v in (hook.close() for hook in hooks)]
out["repos"] = [hook.repo is None for hook in hooks]
weights = ddp.module.state_dict()  # (a collective: on every rank)
if rank == 0:
    torch.save(weights, tmp + "/rank0.pt")
dist.destroy_process_group()
json.dump(out, open(tmp + f"/rank{rank}.json", "w"))
"""


@needs_torch
def test_training_hook_under_ddp_writes_once_from_rank_0(tmp_path: Path) -> None:
    """torchrun/DDP runs the hook in every process: global rank 0 alone writes one version (not one per rank,
    racing), the other rank takes the module's state_dict (a collective under FSDP) and returns None, without
    opening the archive; a hook made before the process group was initialized stands down there."""
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", DDP_RANK, str(rank), str(tmp_path)], env=env,
                              cwd=Path(__file__).resolve().parents[1],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        logs = [p.communicate(timeout=90)[0] for p in procs]  # a hang fails here (the group's own timeout is 60 s)
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], logs
    r0, r1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert r1["returned"] == [None] * 9 and r1["closed"] == [None] * 3 and r1["repos"] == [True] * 3
    assert r0["returned"] == [1] * 9 and r0["closed"] == [1] * 3 and r0["repos"] == [False] * 3
    want = torch.load(tmp_path / "rank0.pt")
    for arc in ("arc", "async", "early"):
        with open_repository(tmp_path / arc) as repo:
            assert [row["id"] for row in repo.log()] == [1]  # one version: rank 1 wrote none
            v = repo.version(1)
            assert len(repo.archive.snapshots()) == len(v.snapshots) == 3 and v.name == "ddp"
            assert [s["step"] for s in v.snapshots] == [1, 2, 3]
            assert v.metrics["loss"] == [[s, x] for s, x in zip((1, 2, 3), r0["losses"], strict=True)]  # rank 0's
            assert v.metrics["lr"] == [[s, 0.1] for s in (1, 2, 3)]
            got = repo.restore(1, framework="torch")
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with open_repository(tmp_path / "arc") as repo:
        v = repo.version(1)
        assert v.network is not None and v.network.source == "fx"
        assert v.best == v.snapshots[min(range(3), key=r0["losses"].__getitem__)]["id"]


@needs_torch
def test_training_hook_with_a_torch_loop(tmp_path: Path) -> None:
    import torch

    from gpupas.integrations.training import CheckpointHook

    torch.manual_seed(0)
    model = realdata.make_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    with CheckpointHook(tmp_path / "arc", "loop", model=model, hyperparameters={"lr": 0.1}) as hook:
        for step in range(1, 7):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 2 == 0:
                hook(model, step=step, metrics={"loss": loss.item()})
    with open_repository(tmp_path / "arc") as repo:
        v = repo.version("loop")
        assert len(v.snapshots) == 3 and v.network.source == "fx"
        got = repo.restore("loop")
        assert all(np.array_equal(got[k], t.numpy()) for k, t in model.state_dict().items())
        assert [r["id"] for r in repo.query('select m where m["conv[1-3]"].next has POOL("MAX")')] == [1]


def test_metrics_parsing(tmp_path: Path) -> None:
    assert normalize_metrics({"loss": [0.5, float("nan")], "acc": {"10": 0.9}, "final": 3}) == {
        "loss": [[0, 0.5], [1, None]], "acc": [[10, 0.9]], "final": [[0, 3.0]]}
    (tmp_path / "log.jsonl").write_text('{"iteration": 1, "loss": 2.0, "phase": "train"}\n'
                                        '{"iteration": 2, "loss": 1.5}\n')
    assert read_training_log(tmp_path / "log.jsonl") == {"loss": [[1, 2.0], [2, 1.5]]}
    (tmp_path / "log.json").write_text(json.dumps([{"epoch": 0, "acc": 0.1}, {"epoch": 1, "acc": 0.2}]))
    assert read_training_log(tmp_path / "log.json") == {"acc": [[0, 0.1], [1, 0.2]]}
    (tmp_path / "gaps.csv").write_text("step,loss,val_acc\n100,0.9,\n200,0.8,\n,,0.7\n300,0.6,\n")
    assert read_training_log(tmp_path / "gaps.csv") == {  # a row without a step: of the step before it
        "loss": [[100, 0.9], [200, 0.8], [300, 0.6]], "val_acc": [[200, 0.7]]}
    (tmp_path / "bad.csv").write_text("step,loss\n1,abc\n")
    with pytest.raises(InvalidInputError):
        read_training_log(tmp_path / "bad.csv")
    (tmp_path / "log.txt").write_text("x")
    with pytest.raises(InvalidInputError, match="unknown type"):
        read_training_log(tmp_path / "log.txt")


def test_create_refuses_an_existing_archive(tmp_path: Path) -> None:
    create_repository(tmp_path / "a").close()
    with pytest.raises(ArchiveExistsError):
        create_repository(tmp_path / "a")


def test_import_gpupas_does_not_import_torch() -> None:
    code = ("import sys, gpupas, gpupas.versions.repository, gpupas.catalog, gpupas.query, gpupas.network, gpupas.cli, "
            "gpupas.integrations.training; print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    assert res.stdout.strip() == "False"


def test_tags_and_version_names_never_shadow_each_other(tmp_path: Path) -> None:
    """Tags resolve before names, so neither may take the other's: each reference keeps naming what it named."""
    w = {"w": np.arange(10, dtype=np.float32)}
    with create_repository(tmp_path / "arc") as repo:
        v1 = repo.commit("resnet", w)
        v2 = repo.commit("other", w)
        with pytest.raises(InvalidInputError, match="names version"):
            repo.tag("resnet", v2.id)
        repo.tag("stable", v2.id)
        with pytest.raises(InvalidInputError, match="is a tag"):
            repo.commit("stable", w)
        with pytest.raises(InvalidInputError, match="is a tag"):
            repo.copy(v1.id, "stable")
        assert repo.resolve("resnet") == v1.id and repo.resolve("stable") == v2.id
        assert len(repo.versions()) == 2


def test_tags_that_differ_only_in_case_are_refused(tmp_path: Path) -> None:
    """macOS and Windows keep one file for refs/tags/best.json and Best.json: a second tag differing only in case
    is refused on every file system, and a tag file holding another tag's record (what such a file system
    shows for the missing name) is not read as that tag."""
    w = {"w": np.arange(10, dtype=np.float32)}
    arc = tmp_path / "arc"
    with create_repository(arc) as repo:
        v1, v2 = repo.commit("a", w), repo.commit("b", w)
        repo.tag("best", v1.id)
        for name, force in (("Best", False), ("BEST", True)):
            with pytest.raises(InvalidInputError, match=r"only in case.*'best'"):
                repo.tag(name, v2.id, force=force)
        assert repo.tags() == {"best": v1.id}
        (arc / "refs" / "tags" / "Best.json").write_bytes((arc / "refs" / "tags" / "best.json").read_bytes())
        with pytest.raises(VersionNotFoundError):
            repo.resolve("Best")
        with pytest.raises(VersionNotFoundError):
            repo.untag("Best")
        assert repo.resolve("best") == v1.id


def test_a_tag_file_holding_another_tags_record_can_be_set_again(tmp_path: Path) -> None:
    """A tag file holding another tag's record (what an older gpupas left on macOS, tagging Best over best)
    reads as no tag everywhere, the catalog too; tagging that name says so, and --force sets it: it was
    stuck, refused as 'deleted and made again by others' however forced, while `tags` listed it."""
    w = {"w": np.arange(10, dtype=np.float32)}
    arc = tmp_path / "arc"
    with create_repository(arc) as repo:
        v1, v2 = repo.commit("a", w), repo.commit("b", w)
        repo.tag("Best", v2.id)
        (arc / "refs" / "tags" / "Best.json").rename(arc / "refs" / "tags" / "best.json")
        repo.reindex()
        assert repo.tags() == {} and repo.query('select m where m.tag = "best"') == []
        with pytest.raises(ArchiveExistsError, match="holds tag 'Best'"):
            repo.tag("best", v1.id)
        assert repo.tag("best", v1.id, force=True) == v1.id
        assert repo.resolve("best") == v1.id and repo.tags() == {"best": v1.id}


def test_a_tag_made_meanwhile_in_another_case_makes_this_one_back_out(tmp_path: Path) -> None:
    """Two processes tag 'best' and 'Best' at once: each passed the case check before the other's tag
    existed; the one that then finds the other backs out, so the archive never holds both."""
    w = {"w": np.arange(10, dtype=np.float32)}
    with create_repository(tmp_path / "arc") as repo, open_repository(tmp_path / "arc") as other:
        v1, v2 = repo.commit("a", w), repo.commit("b", w)
        create = repo.records.create_tag

        def crossing(name: str, record: dict) -> bool:
            made = create(name, record)
            other.records.create_tag("Best", {"tag": "Best", "version": v2.id, "created": "now"})  # its check passed
            return made

        repo.records.create_tag = crossing  # type: ignore[method-assign]
        with pytest.raises(InvalidInputError, match="only in case"):
            repo.tag("best", v1.id)
        assert repo.records.tag_names() == ["Best"] and repo.records.tag("Best") == v2.id


def test_a_branch_starts_from_the_snapshot_it_names(repo: Repository, tmp_path: Path) -> None:
    """Fine-tuning from an earlier checkpoint of a run: the branch's first snapshot is a delta on that one
    (not on the parent's latest), and its entry says so."""
    from gpupas.integrations.training import CheckpointHook

    rng = np.random.default_rng(1)
    w = [rng.standard_normal(4096).astype(np.float32)]
    for _ in range(3):
        w.append(w[-1] + rng.standard_normal(4096).astype(np.float32))  # each far from the one before
    run = repo.commit("run", [{"w": x} for x in w])
    branch = repo.commit("ft", {"w": w[1] + np.float32(1e-6)}, parents=["run"], from_snapshot=2)
    assert branch.snapshots[0]["base"] == run.snapshots[1]["id"]
    on_latest = repo.commit("ft-latest", {"w": w[1] + np.float32(1e-6)}, parents=["run"])
    assert on_latest.snapshots[0]["base"] == run.latest
    assert branch.snapshots[0]["stored_bytes"] < on_latest.snapshots[0]["stored_bytes"]
    assert repo.restore(branch.id)["w"].tobytes() == (w[1] + np.float32(1e-6)).tobytes()
    with CheckpointHook(repo, "ft-hook", parents=["run"], from_snapshot=run.snapshots[1]["id"]) as hook:
        v = hook({"w": w[1]}, step=1)
    assert v.snapshots[0]["base"] == run.snapshots[1]["id"]
    with pytest.raises(InvalidInputError, match="give parents"):
        repo.commit("x", {"w": w[0]}, from_snapshot=1)
    empty = repo.commit("empty", [])  # a parent without snapshots: the child's first is stored whole
    child = repo.commit("child", {"w": w[0]}, parents=[empty.id])
    assert child.snapshots[0]["base"] is None and child.parents == [empty.id]
    with pytest.raises(SnapshotNotFoundError):
        repo.commit("x", {"w": w[0]}, parents=["run"], from_snapshot=9)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_training_hook_marks_the_best_checkpoint_by_a_metric(tmp_path: Path, asynchronous: bool) -> None:
    from gpupas.integrations.training import CheckpointHook

    losses = [0.9, 0.5, float("nan"), 0.7, 0.4, 0.6]  # NaN (a diverged step) is never the best
    with CheckpointHook(tmp_path / "arc", "run", best_by="loss", asynchronous=asynchronous) as hook:
        for step, loss in enumerate(losses):
            hook({"w": np.full(8, step, np.float32)}, step=step, metrics={"loss": loss})
    with open_repository(tmp_path / "arc") as repo:
        v = repo.version("run")
        assert v.best == v.snapshots[4]["id"]
        assert repo.restore("run", "best")["w"].tolist() == [4.0] * 8
        repo.mark_best("run", 2)
        assert repo.version("run").best == v.snapshots[1]["id"]
    with pytest.raises(InvalidInputError, match="METRIC:min"):
        CheckpointHook(tmp_path / "arc", "other", best_by="loss:lowest")
    # save, then evaluate: a checkpoint's evaluation arrives after it, logged at its step
    with CheckpointHook(tmp_path / "arc", "eval-after", best_by="val_loss", asynchronous=asynchronous) as hook:
        for step, loss in ((100, 0.9), (200, 0.2), (300, 0.6)):
            hook({"w": np.full(8, step, np.float32)}, step=step)
            hook.log(step=step, val_loss=loss)
    # a training loss logged with the checkpoint, then the evaluation at the same step: the evaluation counts
    with CheckpointHook(tmp_path / "arc", "eval-same-step", best_by="loss", asynchronous=asynchronous) as hook:
        for step, train, val in ((10, 0.5, 0.1), (20, 0.3, 0.4)):
            hook({"w": np.full(8, step, np.float32)}, step=step, metrics={"loss": train})
            hook.log(step=step, loss=val)
    with open_repository(tmp_path / "arc") as repo:
        v = repo.version("eval-after")
        assert v.best == v.snapshots[1]["id"], [s["step"] for s in v.snapshots if s["id"] == v.best]
        v = repo.version("eval-same-step")
        assert v.best == v.snapshots[0]["id"], [s["step"] for s in v.snapshots if s["id"] == v.best]



@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_checkpoint_by_a_metric_rewrites_its_record_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           asynchronous: bool) -> None:
    """With best_by every checkpoint whose loss was the lowest yet was a second record update (mark_best): the
    whole record (every metric point of the run) read, written and re-indexed twice, a long run's checkpoints
    twice as slow as they need be. The best is picked in the append's own update now."""
    from gpupas.integrations.training import CheckpointHook
    from gpupas.versions.records import Records

    updates: list[int] = []
    real = Records.update_version
    monkeypatch.setattr(Records, "update_version", lambda self, vid, change: updates.append(vid) or real(
        self, vid, change))
    with CheckpointHook(tmp_path / "arc", "run", best_by="loss", asynchronous=asynchronous) as hook:
        for step in range(1, 7):
            hook({"w": np.full(8, step, np.float32)}, step=step, metrics={"loss": 1.0 / step})
        hook.log(step=6, loss=2.0)  # written at close: the best goes back to step 5
        v = hook.close()
    assert len(updates) == 6 and v is not None and v.best == v.snapshots[4]["id"]  # 5 appends, the metric at close
    with open_repository(tmp_path / "arc") as repo:
        assert repo.version("run").best == v.snapshots[4]["id"]
        with pytest.raises(InvalidInputError, match="METRIC"):
            repo.add_snapshot("run", {"w": np.zeros(8, np.float32)}, best_by="loss:lowest")

def test_attached_files_a_checkout_could_not_write_side_by_side_are_refused(repo: Repository, tmp_path: Path) -> None:
    """On macOS and Windows 'README.md' and 'readme.md' are one file: a checkout would write one over the other
    (an attached 'Model.safetensors' over the weights)."""
    w = {"w": np.ones(3, np.float32)}
    for files, words in [({"README.md": b"a", "readme.md": b"b"}, "differ only in case"),
                         ({"notes": b"a", "notes/x.txt": b"b"}, "needs a folder")]:
        with pytest.raises(InvalidInputError, match=words):
            repo.commit("m", w, files=files)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "cfg.json").write_text(d)
    with pytest.raises(InvalidInputError, match="given twice"):
        repo.commit("m", w, files=[tmp_path / "a" / "cfg.json", tmp_path / "b" / "cfg.json"])
    for files in ({"Model.safetensors": b"not weights"}, {"model.safetensors/README.md": b"a folder there"}):
        v = repo.commit("m", w, files=files)
        with pytest.raises(InvalidInputError, match="--weights-name"):
            repo.checkout(v.id, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_a_restarted_run_goes_on_appending_to_its_version(tmp_path: Path) -> None:
    from gpupas.integrations.training import CheckpointHook

    ckpt = [{"w": np.full(16, k, np.float32)} for k in range(4)]
    with CheckpointHook(tmp_path / "arc", "run", hyperparameters={"lr": 0.1}) as hook:
        for step in (1, 2):
            first = hook(ckpt[step - 1], step=step, metrics={"loss": 1.0 / step})
    with CheckpointHook(tmp_path / "arc", "run", resume="run") as hook:  # after a stop
        for step in (3, 4):
            v = hook(ckpt[step - 1], step=step, metrics={"loss": 1.0 / step})
    assert v.id == first.id and [s["step"] for s in v.snapshots] == [1, 2, 3, 4]
    assert v.snapshots[2]["base"] == v.snapshots[1]["id"] and v.metrics["loss"][-1] == [4, 0.25]
    with pytest.raises(InvalidInputError, match="not of 'other'"):
        CheckpointHook(tmp_path / "arc", "other", resume="run")
    with open_repository(tmp_path / "arc") as repo:
        assert [x.id for x in repo.versions()] == [first.id]
        assert repo.restore("run")["w"].tolist() == [3.0] * 16


def test_picking_the_best_of_a_long_run_costs_one_pass_not_a_scan_per_checkpoint() -> None:
    """The hook picks the best again after every checkpoint: each snapshot's value was found by scanning the
    whole series (checkpoints x points: 4000 of each took seconds, a day-long run's later checkpoints ever
    slower). The pick is the same as that scan's: the last value at the highest step up to the snapshot's,
    none where that is None (NaN), unsorted and repeated steps, the earliest snapshot on a tie."""
    import random

    from gpupas.versions.metrics import pick_best

    def scan(series: list[list[object]], step: int | None) -> object:
        pts = [(i, p) for i, p in enumerate(series) if step is None or p[0] <= step]
        return max(pts, key=lambda ip: (ip[1][0], ip[0]))[1][1] if pts else None

    rng = random.Random(0)
    for _ in range(200):
        series = [[rng.randrange(12), rng.choice([None, 0.1, 0.2, 0.3, 0.4])] for _ in range(rng.randrange(9))]
        entries = [{"id": f"s{i}", "step": rng.choice([None, *range(-1, 13)])} for i in range(rng.randrange(1, 7))]
        for rule, sign in (("loss", 1), ("loss:max", -1)):
            scored = [(v, i) for i, e in enumerate(entries) if (v := scan(series, e["step"])) is not None]
            want = entries[min(scored, key=lambda t: (sign * t[0], t[1]))[1]]["id"] if scored else None
            assert pick_best(entries, {"loss": series}, None, rule) == want, (series, entries, rule)
    reads = [0]  # reads of a point: a scan per checkpoint reads every point once per checkpoint

    class Point(list):  # type: ignore[type-arg]
        def __getitem__(self, k):  # type: ignore[no-untyped-def]
            reads[0] += 1
            return super().__getitem__(k)

        def __iter__(self):  # type: ignore[no-untyped-def]
            reads[0] += 1
            return super().__iter__()

    n = 1000
    entries = [{"id": f"s{i}", "step": 10 * i} for i in range(n)]
    series = {"loss": [Point([10 * i + j, 1.0 / (i + 1 + j)]) for i in range(n) for j in (0, 5)]}
    assert pick_best(entries, series, None, "loss") == f"s{n - 1}"
    assert 0 < reads[0] <= 4 * len(series["loss"]), reads  # a few reads a point, not n (no timing: a loaded CI)


def test_a_message_author_best_flag_or_snapshot_of_the_wrong_kind_is_refused_by_name(repo: Repository) -> None:
    """Values of the wrong kind are refused naming what to give, and nothing is written: a message or
    author that is not text (was stored as a number, by copy too), ``best`` that is not a bool (a string counted
    as True), a snapshot named by a Manifest or a float (its whole text went into the error), a DQL statement that
    is not text (was "empty statement")."""
    import gpupas

    w = {"w": np.arange(6, dtype=np.float32)}
    v = repo.commit("net", w, message="first")
    for kw, what in (({"message": 5}, "message=5: give"), ({"author": 7}, "author=7: give"),
                     ({"message": b"x"}, "message=b'x'")):
        with pytest.raises(InvalidInputError, match=what):
            repo.commit("other", w, **kw)
        with pytest.raises(InvalidInputError, match=what):
            repo.copy(v.id, "other", **kw)  # (copy stored them as given)
    with pytest.raises(InvalidInputError, match="best='yes'"):
        repo.add_snapshot(v.id, w, best="yes")
    m = repo.archive.manifest(v.latest)
    for sel in (m, 1.0, True):
        with pytest.raises(InvalidInputError, match=r"name a snapshot of .* by 'latest', 'best'"):
            repo.commit("branch", w, parents=[v.id], from_snapshot=sel)
    for ref in (True, np.bool_(False)):
        with pytest.raises(InvalidInputError, match=r"a tag or a name, not (True|np.False_)"):
            repo.resolve(ref)
    with pytest.raises(InvalidInputError, match="a statement is text, not int"):
        repo.query(5)
    with pytest.raises(InvalidInputError, match=r"Layout\(tiers='cold'\)"):
        gpupas.Layout(tiers="cold")
    assert [(x["name"], x["n_snapshots"]) for x in repo.log()] == [("net", 1)]
    assert repo.archive.restore(v.latest)["w"].tobytes() == w["w"].tobytes()
    assert repo.commit("quiet", w, message=None).parents == []  # no message: as before


def test_best_may_be_a_comparison_of_tensors_or_a_zero_or_one(repo: Repository) -> None:
    """``add_snapshot(best=...)`` (and the training hook's ``best=``) takes what a training loop computes:
    ``val_loss < best_loss`` of two torch or NumPy scalars, or 1/0, as it did before strings were refused;
    a string or 2 is still refused."""
    w = {"w": np.arange(6, dtype=np.float32)}
    v = repo.commit("net", w)
    flags = [np.float32(0.1) < np.float32(0.2), 1, 0]
    if realdata.have_torch():
        import torch

        flags += [torch.tensor(0.1) < torch.tensor(0.2), torch.tensor(False)]
    for i, flag in enumerate(flags):
        v = repo.add_snapshot(v.id, {"w": w["w"] + i}, best=flag)
        assert (v.best == v.latest) is bool(flag), (flag, v.best, v.latest)
    for bad in ("yes", 2, 0.5):
        with pytest.raises(InvalidInputError, match=r"best=.*True marks"):
            repo.add_snapshot(v.id, w, best=bad)
    assert len(repo.version(v.id).snapshots) == 1 + len(flags)


def test_load_checkpoint_of_something_not_a_path_is_refused_by_name() -> None:
    """A state_dict (or None) in place of a checkpoint's path was a bare TypeError from pathlib."""
    with pytest.raises(InvalidInputError, match="not a dict; a mapping of tensors needs no loading"):
        load_checkpoint({"w": np.zeros(2, np.float32)})  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=r"file or model folder, not a NoneType$"):
        load_checkpoint(None)  # type: ignore[arg-type]


def test_cache_bytes_counts_the_tensors_a_repository_loads_from_files(tmp_path: Path) -> None:
    """A version committed from checkpoint files: the arrays loaded for each commit are the cache's alone (no
    caller holds them), so ``cache_bytes`` counts them; they were taken for the caller's own (0 bytes) and the
    cache kept ``cache_size`` snapshots whatever the cap."""
    paths = []
    for k in range(4):
        paths.append(tmp_path / f"step-{k}.safetensors")
        save_file({"w": np.full(1 << 18, k, np.float32)}, paths[-1])  # 1 MiB each
    r = create_repository(tmp_path / "arc", cache_size=8, cache_bytes=1 << 20)
    r.commit("m", paths)
    assert len(r.archive.bases._items) == 1
    r.add_snapshot("m", paths[0])
    assert len(r.archive.bases._items) == 1


def test_cache_bytes_counts_an_asynchronous_hooks_copies(tmp_path: Path) -> None:
    """An asynchronous hook commits its own copies of the weights: once the next commit is in, only the cache
    holds them, so ``cache_bytes`` counts them (they were taken for the caller's: 5 snapshots kept at a 1 MiB cap)."""
    from gpupas.integrations.training import CheckpointHook

    r = create_repository(tmp_path / "arc", cache_size=8, cache_bytes=1 << 20)
    w = np.zeros(1 << 18, np.float32)  # 1 MiB
    with CheckpointHook(r, "run", asynchronous=True) as hook:
        for step in range(5):
            w += 1
            hook({"w": w}, step=step)
    assert len(r.archive.bases._items) == 1


def test_attaching_something_that_is_neither_file_nor_folder_says_so(tmp_path: Path) -> None:
    with create_repository(tmp_path / "a") as repo:
        for path, what in (("/dev/null", "neither a file nor a folder"), (tmp_path / "gone", "does not exist")):
            with pytest.raises(InvalidInputError, match=what):
                repo.commit("x", {"w": np.ones(2)}, files=[path])
        assert repo.log() == []


def test_metrics_as_arrays_odd_row_names_and_a_best_by_not_text_are_answered(tmp_path: Path) -> None:
    """A NumPy array as a series (or as a row's value) raised ValueError ("truth value of an array is ambiguous"),
    a row's tuple name TypeError at publishing, best_by=5 AttributeError: internal errors. 1 and "" as a row's
    name were stored although a mapping's are refused."""
    import torch

    assert normalize_metrics({"l": np.array([0.5, np.nan]), "t": torch.tensor([1.0, 2.0])}) == \
        {"l": [[0, 0.5], [1, None]], "t": [[0, 1.0], [1, 2.0]]}
    assert normalize_metrics({"l": np.array([[3, 0.5], [4, 0.25]])}) == {"l": [[3, 0.5], [4, 0.25]]}
    assert normalize_metrics([{"a": np.ones(3), "b": 1}]) == {"b": [[0, 1.0]]}  # an array is no number: skipped
    for rows in ([{(1, 2): 0.5}], [{1: 0.5}], [{"": 0.5}]):
        with pytest.raises(InvalidInputError, match="metric name"):
            normalize_metrics(rows)
    with pytest.raises(InvalidInputError, match="not a number"):
        normalize_metrics({"l": np.ones((2, 3))})
    repo = create_repository(tmp_path / "arc")
    with pytest.raises(InvalidInputError, match="best_by"):
        repo.commit("m", {"w": np.zeros(2, np.float32)}, metrics={"loss": [1.0]}, best_by=5)
    repo.close()


def test_hyperparameters_nested_too_deep_are_refused_before_anything_is_published(tmp_path: Path) -> None:
    """Nested 5000 deep, json.dumps raised RecursionError (an internal error); nested 990 deep, the record was
    published and then could not be read back ("not valid JSON"): a damaged version."""
    repo = create_repository(tmp_path / "arc")
    for depth in (5000, 990, 300):
        deep: dict = {"x": 1}
        for _ in range(depth):
            deep = {"k": deep}
        with pytest.raises(InvalidInputError, match="hyperparameters"):
            repo.commit("deep", {"w": np.zeros(2, np.float32)}, hyperparameters=deep)
    deep = {"x": [1]}
    for _ in range(150):
        deep = {"k": deep}
    assert repo.commit("deep", {"w": np.zeros(2, np.float32)}, hyperparameters=deep).id == 1
    assert [v.id for v in repo.versions()] == [1] and repo.verify()["problems"] == []
    repo.close()


def test_a_training_checkpoint_gives_the_network_of_its_weights(tmp_path: Path) -> None:
    """A checkpoint committed whole (Lightning's ``state_dict``/``optimizer_states``, or ``model``/``optimizer``)
    is archived as its weights; the network was read off the wrapper instead: a list of optimizer states raised
    TypeError after the snapshot was written, and ``model``/``optimizer`` became the version's two "layers"."""
    from gpupas.integrations.training import CheckpointHook

    sd = {"enc.weight": np.ones((8, 4), np.float32), "enc.bias": np.zeros(8, np.float32),
          "head.weight": np.ones((2, 8), np.float32)}
    opt = {"state": {0: {"exp_avg": np.zeros((8, 4), np.float32)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    lightning = {"state_dict": sd, "optimizer_states": [opt], "epoch": 3, "global_step": 100}
    with pytest.warns(UserWarning, match="left out"), CheckpointHook(tmp_path / "arc", "pl") as hook:
        v = hook(lightning, step=100)
    with pytest.warns(UserWarning, match="left out"), CheckpointHook(tmp_path / "arc", "plain") as hook:
        w = hook({"model": sd, "optimizer": opt, "step": 5}, step=5)
    for version in (v, w):
        assert [n.name for n in version.network.nodes] == ["enc", "head"]
    with open_repository(tmp_path / "arc") as repo:
        empty = repo.commit("later")  # no snapshot yet: the first one added gives the network
        with pytest.warns(UserWarning, match="left out"):
            u = repo.add_snapshot(empty.id, lightning, step=1)
        assert [n.name for n in u.network.nodes] == ["enc", "head"]


def test_a_loss_tensor_is_logged_without_torch_warning(tmp_path: Path) -> None:
    """``hook.log(step, loss=loss)`` with the loss as the training loop has it (a tensor with its graph): float()
    of it made torch warn 'Converting a tensor with requires_grad=True to a scalar', at every point logged."""
    torch = pytest.importorskip("torch")
    import warnings

    from gpupas.integrations.training import CheckpointHook

    w = torch.nn.Parameter(torch.ones(3))
    loss = (w * 2).sum()
    with warnings.catch_warnings(), CheckpointHook(tmp_path / "arc", "run") as hook:
        warnings.simplefilter("error")
        hook.log(1, loss=loss)
        v = hook({"w": np.zeros(3, np.float32)}, step=1, metrics={"acc": loss / 6})
    assert v.metrics == {"loss": [[1, 6.0]], "acc": [[1, 1.0]]}


@needs_torch
@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_checkpoint_whose_loss_is_nan_is_never_the_best(tmp_path: Path, asynchronous: bool) -> None:
    """A run that diverges: the loss logged every step, a checkpoint every 10, the weights NaN from step 16 on. The
    checkpoint at step 20, its own loss NaN, was credited the last finite loss logged before it (step 14's, lower
    than step 10's) and marked best: `checkout -s best` gave NaN weights. A checkpoint's value is the last point
    logged at or before its step; where that is NaN or infinite, it has none."""
    import torch

    from gpupas.integrations.training import CheckpointHook

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    with CheckpointHook(tmp_path / "arc", "run", best_by="loss", asynchronous=asynchronous) as hook:
        for step in range(1, 31):
            if step == 15:
                opt.param_groups[0]["lr"] = float("inf")  # diverges
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 10:
                hook.log(step, loss=loss.item())
            else:
                hook(model, step=step, metrics={"loss": loss.item()})
    with open_repository(tmp_path / "arc") as repo:
        v = repo.version("run")
        loss = {step: value for step, value in v.metrics["loss"]}  # NaN and infinity are kept as None
        assert loss[14] < loss[10] and loss[20] is None and loss[30] is None
        assert v.best == v.snapshots[0]["id"], [s["step"] for s in v.snapshots if s["id"] == v.best]
        assert np.isfinite(repo.restore("run", "best")["weight"]).all()


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_hook_whose_close_found_the_disk_full_writes_its_metrics_when_closed_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, asynchronous: bool) -> None:
    """close() writes the metric points still pending; where the disk was full it raised 'free space there ... and
    run the command again', but it had already dropped the points: the close run again, after space was freed,
    returned without error and the run's last evaluations were lost. They stay pending until written."""
    import errno

    from gpupas.integrations.training import CheckpointHook

    def full(*args: object, **kwargs: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    hook = CheckpointHook(tmp_path / "arc", "run", asynchronous=asynchronous)
    for step in (1, 2):
        hook({"w": np.full(8, step, np.float32)}, step=step, metrics={"loss": 1.0 / step})
    hook._settle()  # (the asynchronous commit published before the disk fills)
    hook.log(3, val_loss=0.25)
    with monkeypatch.context() as m:
        m.setattr(os, "write", full)
        with pytest.raises(OSError, match="free space there"):
            hook.close()
    v = hook.close()  # space freed: run again
    assert v is not None and v.metrics["val_loss"] == [[3, 0.25]]
    with open_repository(tmp_path / "arc") as repo:
        v = repo.version("run")
        assert [s["step"] for s in v.snapshots] == [1, 2] and v.metrics["val_loss"] == [[3, 0.25]]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_closed_hook_refuses_metrics_and_checkpoints_it_would_never_write(tmp_path: Path,
                                                                           asynchronous: bool) -> None:
    """A test accuracy logged after the ``with`` block had closed the hook was taken without a word and held until
    a next close() that a script never makes: lost at exit. An asynchronous checkpoint after close was left in
    flight, on a thread restarted after close, its error (at exit) a warning. Both are refused by name; closing
    again is still harmless."""
    from gpupas.integrations.training import CheckpointHook

    with CheckpointHook(tmp_path / "arc", "run", asynchronous=asynchronous) as hook:
        for step in (1, 2):
            hook({"w": np.full(8, step, np.float32)}, step=step, metrics={"loss": 1.0 / step})
    with pytest.raises(InvalidInputError, match=r"closed.*log_metrics"):
        hook.log(2, test_acc=0.9)
    with pytest.raises(InvalidInputError, match="closed"):
        hook({"w": np.full(8, 3, np.float32)}, step=3, metrics={"loss": 0.3})
    v = hook.close()
    assert v is not None and [s["step"] for s in v.snapshots] == [1, 2] and "test_acc" not in v.metrics


@needs_torch
def test_a_failed_asynchronous_commit_does_not_keep_its_copy_of_the_weights(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit of an asynchronous checkpoint that fails (the disk full) keeps its error for the next call; the
    frames of that error's traceback kept the call's copy of the weights alive with it, until the next checkpoint:
    a third model copy (on the GPU, for a model trained there) over the documented two, all the interval long."""
    import errno
    import gc
    from concurrent.futures import wait

    import torch

    from gpupas.integrations.training import CheckpointHook

    def full(*args: object, **kwargs: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def copies() -> int:
        gc.collect()
        kinds = (torch.Tensor, torch.nn.Parameter)  # by type: isinstance() on every object wakes torch's
        # deprecated aliases (a FutureWarning)
        return sum(1 for o in gc.get_objects() if type(o) in kinds and o.shape == (53, 37))

    torch.manual_seed(0)
    model = torch.nn.Linear(37, 53)
    hook = CheckpointHook(tmp_path / "arc", "run", model=model, asynchronous=True)
    for step in (1, 2):
        with torch.no_grad():
            model.weight.add_(1.0)
        hook(model, step=step)
    wait([hook._async._future])
    assert copies() == 2  # the model's and the last committed copy (the next delta base)
    with monkeypatch.context() as m:
        for name in ("write", "pwrite", "pwritev"):
            m.setattr(os, name, full)
        with torch.no_grad():
            model.weight.add_(1.0)
        hook(model, step=3)
        wait([hook._async._future])
    failed_copies = copies()
    with pytest.raises(OSError, match="free space there"):
        hook(model, step=4)
    hook(model, step=5)
    assert [s["step"] for s in hook.close().snapshots] == [1, 2, 5]
    assert failed_copies == 2


@needs_torch
def test_a_failed_asynchronous_checkpoint_is_named_where_its_error_is_raised(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """An asynchronous checkpoint whose commit fails (the archive read-only) is reported by the next call, with the
    store's error alone: 'cannot write snapshots/<id> ...', an id found nowhere. Which checkpoint was lost (the
    call before had returned without a word), and that the reporting call's own checkpoint was not taken either,
    was said nowhere. The error now says both (a note on it, its type and message as they were)."""
    import errno
    import traceback

    import torch

    from gpupas.integrations.training import CheckpointHook

    def read_only(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EROFS, "Read-only file system")

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    for closing in (False, True):
        hook = CheckpointHook(tmp_path / f"arc{closing}", "run", model=model, asynchronous=True)
        hook(model, step=100)
        hook(model, step=200)
        hook._settle()  # (published before the archive turns read-only)
        with monkeypatch.context() as m:
            for name in ("write", "pwrite", "pwritev", "mkdir"):
                m.setattr(os, name, read_only)
            hook(model, step=300)  # fails in the background
            with pytest.raises(OSError, match="read-only") as got:
                hook.close() if closing else hook(model, step=400)
        report = "".join(traceback.format_exception(got.value))
        assert "checkpoint of step 300" in report and "not in version 1 'run'" in report, report
        assert ("step 400" in report) is not closing, report
        if not closing:
            hook.close()


@needs_torch
def test_weights_come_out_in_the_format_their_name_says(repo: Repository, tmp_path: Path) -> None:
    """`checkout --weights-name pytorch_model.bin` wrote safetensors bytes under a torch name (and `--format torch
    --weights-name model.safetensors` a torch file under a safetensors name): torch.load refused the file, and so did
    `gpupas commit` of the checkout. The name's suffix now picks the format; a --format against it is refused."""
    import torch

    w = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    repo.commit("m", w)
    repo.checkout("m", tmp_path / "bin", weights_name="pytorch_model.bin")
    got = torch.load(tmp_path / "bin" / "pytorch_model.bin", weights_only=True)
    assert torch.equal(got["w"], torch.from_numpy(w["w"]))
    assert repo.restore(repo.commit("again", tmp_path / "bin"))["w"].tobytes() == w["w"].tobytes()
    repo.checkout("m", tmp_path / "st", weights_name="weights.safetensors", format="safetensors")
    assert load_checkpoint(tmp_path / "st" / "weights.safetensors")["w"].tobytes() == w["w"].tobytes()
    for call in (lambda: repo.checkout("m", tmp_path / "co", format="torch", weights_name="model.safetensors"),
                 lambda: repo.checkout("m", tmp_path / "co", format="safetensors", weights_name="model.pt"),
                 lambda: repo.export("m", tmp_path / "co" / "m.safetensors", format="torch"),
                 lambda: repo.export("m", tmp_path / "co" / "m.bin", format="safetensors")):
        with pytest.raises(InvalidInputError, match="--format"):
            call()
        assert not (tmp_path / "co").exists()
    assert torch.load(repo.export("m", tmp_path / "m.weights", format="torch"), weights_only=True)["w"].shape == (2, 3)


def test_a_snapshot_number_of_any_length_and_an_id_of_digits_only_each_select_theirs() -> None:
    from gpupas.versions.model import select_snapshot

    snaps = [{"id": f"{i:016x}"} for i in range(100_001)]
    snaps[7]["id"] = "1234567890123456"  # ids are 16 hex digits: sometimes digits only
    pick = lambda sel: select_snapshot(snaps, sel, snaps[-1]["id"], None, "version 1")  # noqa: E731
    assert pick("100000") is snaps[99_999] and pick(100_001) is snaps[100_000]  # numbers past five digits
    assert pick("1234567890123456") is snaps[7] and pick("8") is snaps[7]
    with pytest.raises(SnapshotNotFoundError, match=r"1\.\.100001, not 100002"):
        pick("100002")


def test_diff_reports_a_hyperparameter_list_whose_items_change_type(repo: Repository) -> None:
    """A list (or an object in one) whose items turn from numbers to booleans, or ints to floats, differs, as a
    plain value does (True is not 1): Python's ``[True, False] == [1, 0]`` had diff call them the same."""
    w = {"w": np.ones(3, np.float32)}
    pairs = [([1, 0], [True, False]), ([{"a": 1}], [{"a": True}]), ([1, 2], [1, 2.0]), ({"k": [1]}, {"k": [1.0]})]
    for i, (x, y) in enumerate(pairs):
        a = repo.commit(f"a{i}", w, hyperparameters={"h": x})
        b = repo.commit(f"b{i}", w, parents=[a.id], hyperparameters={"h": y})
        d = repo.diff(a.id, b.id, weights=False)["hyperparameters"]
        assert d == {"h" if isinstance(x, list) else "h.k": [x if isinstance(x, list) else x["k"],
                                                              y if isinstance(y, list) else y["k"]]}, (x, y)
        assert repo.diff(b.id, b.id, weights=False)["hyperparameters"] == {}


def test_diff_with_a_version_without_snapshots_says_the_weights_were_not_compared(repo: Repository) -> None:
    """A version committed without weights (metadata only): diff left the weights out without a word (a reader
    could take that for no change) and took a snapshot asked of it (``snapshot_b=1``) without complaint."""
    a = repo.commit("a", {"w": np.ones(3, np.float32)})
    b = repo.commit("b", None, parents=[a.id], hyperparameters={"lr": 0.1})
    d = repo.diff(a.id, b.id)
    assert "weights" not in d and d["weights_not_compared"] == [b.id]
    assert "weights_not_compared" not in repo.diff(a.id, b.id, weights=False)
    with pytest.raises(SnapshotNotFoundError, match=f"version {b.id} has no snapshots"):
        repo.diff(a.id, b.id, snapshot_b=1)
    assert repo.diff(a.id, a.id)["weights"]["identical"] == 1


def _run_of(repo: Repository, n: int, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """A version "run" of ``n`` snapshots, each a delta on the one before (a training hook's), with a loss per step."""
    rng = np.random.default_rng(seed)
    ws = [rng.standard_normal(4000).astype(np.float32)]
    repo.commit("run", {"w": ws[0]}, metrics={"loss": [[0, 1.0]]}, step=0)
    for k in range(1, n):
        ws.append(ws[-1] + np.float32(1e-3) * rng.standard_normal(4000).astype(np.float32))
        repo.add_snapshot("run", {"w": ws[-1]}, step=k, metrics={"loss": [[k, 1.0 / (k + 1)]]})
    return ws, [s["id"] for s in repo.version("run").snapshots]


def _manifests(repo: Repository) -> set[str]:
    return {p.stem for p in (repo.root / "manifests").glob("*.json")}


def test_drop_by_number_id_and_keep_last_keeps_the_best_and_says_so_in_every_listing(repo: Repository) -> None:
    ws, sids = _run_of(repo, 6)
    repo.mark_best("run", 2)
    v = repo.drop_snapshots("run", [1, sids[2]])  # a number and an id
    assert [s["id"] for s in v.snapshots] == [sids[1], *sids[3:]] and v.latest == sids[5] and v.best == sids[1]
    assert [d["id"] for d in v.record["dropped"]] == [sids[0], sids[2]] and v.rev == 7  # 5 adds, best, drop
    assert len(v.metrics["loss"]) == 6  # metrics stay
    v = repo.drop_snapshots("run", keep_last=1)  # the best is kept besides the last
    assert [s["id"] for s in v.snapshots] == [sids[1], sids[5]]
    v = repo.drop_snapshots("run", ["latest"])  # dropping the latest: the last left is latest
    assert [s["id"] for s in v.snapshots] == [sids[1]] and v.latest == v.best == sids[1]
    again = repo.version("run")
    assert again.record == v.record  # as published
    assert repo.show("run")["snapshot"]["id"] == sids[1]
    assert [(r["n_snapshots"], r["latest"], r["best"]) for r in repo.log()] == [(1, sids[1], sids[1])]
    assert repo.query("select m where m.snapshots = 1")[0]["id"] == v.id
    assert repo.query("select m where m.snapshots > 1") == []
    assert [r["n"] for r in repo.catalog().query("SELECT count(*) AS n FROM snapshots WHERE version=?", (v.id,))] == [1]
    assert repo.stats()["versions"] == 1
    assert repo.restore("run")["w"].tobytes() == ws[1].tobytes()  # a delta on dropped ones, bit-exact


def test_drop_of_the_best_unmarks_it_or_repicks_by_a_metric(repo: Repository) -> None:
    _, sids = _run_of(repo, 4)
    repo.mark_best("run", 4)
    assert repo.drop_snapshots("run", ["best"]).best is None
    repo.mark_best("run", 3)
    assert repo.drop_snapshots("run", [3], best_by="loss:min").best == sids[1]  # the lowest loss of those left


def test_drop_refuses_what_names_nothing_or_would_empty_the_version(repo: Repository) -> None:
    _run_of(repo, 3)
    before = repo.version("run").record
    with pytest.raises(InvalidInputError, match="nothing dropped; name snapshots it has"):
        repo.drop_snapshots("run", [7])
    with pytest.raises(InvalidInputError, match="nothing dropped; name snapshots it has"):
        repo.drop_snapshots("run", ["nosuchid"])
    with pytest.raises(InvalidInputError, match="keep_last"):
        repo.drop_snapshots("run")
    assert repo.drop_snapshots("run", keep_last=3).snapshots == repo.drop_snapshots("run", keep_last=9).snapshots \
        == before["snapshots"]  # more to keep than there are: all kept, nothing written (not the last 9 - 3)
    with pytest.raises(InvalidInputError, match="allow_empty=True"):
        repo.drop_snapshots("run", keep_last=0)
    with pytest.raises(InvalidInputError, match="keep_last"):
        repo.drop_snapshots("run", keep_last=-1)
    assert repo.drop_snapshots("run", [1], dry_run=True).snapshots == before["snapshots"][1:]
    assert repo.version("run").record == before  # nothing changed by any of these
    v = repo.drop_snapshots("run", [1, 2, 3], allow_empty=True)
    assert v.snapshots == [] and v.latest is None and v.best is None
    assert repo.version("run").snapshots == [] and repo.log()[0]["n_snapshots"] == 0


def test_gc_waits_min_age_after_a_drop_not_after_the_commit(repo: Repository) -> None:
    """A reader that read the version before the drop may still be restoring the snapshot: gc counts a dropped
    snapshot's age from its drop (a commit of long ago freed it at the very next gc)."""
    ws, sids = _run_of(repo, 3)
    old = time.time() - 7200
    for p in (repo.root / "manifests").glob("*.json"):
        os.utime(p, (old, old))  # committed two hours ago
    repo.drop_snapshots("run", [3])  # the latest: no kept snapshot is built on it
    assert repo.gc(min_age=3600) == [] and sids[2] in _manifests(repo)  # dropped just now: kept for the hour
    assert [(r["name"], r["dropped_from"]) for r in repo.gc(min_age=0) if r["kind"] == "snapshot"] == [(sids[2], 1)]
    assert sids[2] not in _manifests(repo) and repo.restore("run")["w"].tobytes() == ws[1].tobytes()


def test_a_drop_that_fails_inside_its_update_leaves_the_version_as_it_was(repo: Repository,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    ws, sids = _run_of(repo, 3)
    import gpupas.versions.repository as repository

    def boom() -> str:
        raise OSError("killed while writing the record")

    monkeypatch.setattr(repository, "now", boom)  # called inside the change, before the record is replaced
    with pytest.raises(OSError, match="killed"):
        repo.drop_snapshots("run", [2])
    monkeypatch.undo()
    v = repo.version("run")
    assert [s["id"] for s in v.snapshots] == sids and "dropped" not in v.record and v.rev == 2
    assert all(repo.restore("run", i + 1)["w"].tobytes() == w.tobytes() for i, w in enumerate(ws))


def test_a_drop_crossing_another_says_only_what_it_dropped_and_a_drop_of_nothing_left_writes_nothing(
        repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process drops some of the same snapshots between this drop's read of the version and its record
    update: this one reports only what it dropped itself, and where nothing is left to drop, leaves the record
    (its ``rev``) as the other wrote it."""
    _, sids = _run_of(repo, 4)
    update = repo.records.update_version
    other = [sids[0], sids[3]]  # what the other process drops, one per crossing

    def crossed(vid: int, change: Any) -> Any:
        with open_repository(repo.root) as elsewhere:
            elsewhere.drop_snapshots(vid, other.pop(0))
        return update(vid, change)

    monkeypatch.setattr(repo.records, "update_version", crossed)
    v, gone = repo.dropping("run", [1, 2])  # the other drops snapshot 1 first
    assert [s["id"] for s in gone] == [sids[1]] and [s["id"] for s in v.snapshots] == sids[2:]
    rev = v.rev
    v, gone = repo.dropping("run", [sids[3]])  # ... and then the very one this drops: nothing left to do
    assert gone == [] and [s["id"] for s in v.snapshots] == [sids[2]]
    assert v.rev == rev + 1  # the other's drop alone
    assert [d["id"] for d in v.record["dropped"]] == [sids[0], sids[1], sids[3]]


def test_gc_frees_dropped_snapshots_but_keeps_bases_and_shared_ones_bit_exact(repo: Repository) -> None:
    ws, sids = _run_of(repo, 3)  # chain s0 <- s1 <- s2 <- s3 <- s4
    fork = repo.copy("run", "fork")  # shares s2
    rng = np.random.default_rng(1)
    for k in (3, 4):
        ws.append(ws[-1] + np.float32(1e-3) * rng.standard_normal(4000).astype(np.float32))
        sids.append(repo.add_snapshot("run", {"w": ws[-1]}, step=k).latest)
    other = repo.commit("other", {"w": ws[0] + 1})
    v = repo.drop_snapshots("run", [2, 3, 5])  # s1 (s2, s3 are built on it), s2 (the fork's), s4 (nothing on it)
    assert [s["id"] for s in v.snapshots] == [sids[0], sids[3]] and v.latest == sids[3]
    notes = repo.verify()["notes"]
    assert not any("killed" in n for n in notes) and len(notes) == 2, notes
    assert any(sids[4] in n and "dropped from version 1" in n and "`gpupas gc` removes them" in n for n in notes)
    assert any(sids[1] in n and "dropped from version 1" in n and "gc keeps them" in n for n in notes)
    assert repo.gc() == []  # younger than an hour (the manifests' age, as for any snapshot): kept
    held = {p.name for p in (repo.root / "snapshots").iterdir() if p.name.split(".")[0] == sids[4]}
    assert held
    removed = repo.gc(min_age=0)
    assert [(r["name"], r["dropped_from"]) for r in removed if r["kind"] == "snapshot"] == [(sids[4], 1)]
    assert _manifests(repo) == {*sids[:4], other.latest}
    assert not held & {p.name for p in (repo.root / "snapshots").iterdir()}  # its bytes are gone
    result = repo.verify()
    assert result["ok"] and result["checked"]["snapshots"] == 5
    assert [n for n in result["notes"] if sids[1] in n] == result["notes"] and len(result["notes"]) == 1
    assert repo.restore(fork.id)["w"].tobytes() == ws[2].tobytes()
    assert repo.restore("run")["w"].tobytes() == ws[3].tobytes()
    assert repo.restore("run", 1)["w"].tobytes() == ws[0].tobytes()


def test_gc_killed_between_deletions_of_a_dropped_chain_leaves_no_damage(repo: Repository,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """gc deletes a snapshot before those it is built on: killed between two deletions, it leaves no delta whose
    base is gone (it deleted by id: verify then called the archive damaged, 'restore it from a copy')."""
    ws, sids = _run_of(repo, 6)  # s0 <- s1 <- ... <- s5
    repo.drop_snapshots("run", [2, 3, 4, 5, 6])  # a chain no kept snapshot is built on: all garbage
    store = repo.archive.store.store
    real, deleted = store.delete, []

    def delete(key: str) -> None:
        if key.startswith("manifests/"):
            if len(deleted) == 2:
                raise KeyboardInterrupt("gc killed")
            deleted.append(key)
        real(key)

    monkeypatch.setattr(store, "delete", delete)
    with pytest.raises(KeyboardInterrupt):
        repo.gc(min_age=0)
    monkeypatch.undo()
    assert deleted == [f"manifests/{s}.json" for s in (sids[5], sids[4])]  # the tip first
    result = repo.verify()
    assert result["ok"] and not result["problems"], result["problems"]
    assert {r["name"] for r in repo.gc(min_age=0) if r["kind"] == "snapshot"} == set(sids[1:4])
    assert repo.verify()["ok"] and repo.restore("run")["w"].tobytes() == ws[0].tobytes()


def test_verify_names_the_kept_snapshot_a_dropped_chain_is_kept_for_not_dropped_ones(repo: Repository) -> None:
    """A chain of dropped bases under one kept delta: verify's note named the dropped snapshots between as the
    'kept snapshots built on them' (each one's immediate dependent), as drop's own output did not."""
    sids = _run_of(repo, 4)[1]  # s0 <- s1 <- s2 <- s3
    repo.drop_snapshots("run", [1, 2, 3])
    notes = [n for n in repo.verify()["notes"] if "kept snapshots are built on them" in n]
    assert len(notes) == 1 and f"built on them ({sids[3]})" in notes[0], notes
    assert _verify.fate(repo, sids[:3]) == {  # each named with the kept one, and the one it is the base of
        sids[2]: {"gc": "keeps", "why": f"the base of kept snapshot {sids[3]}"},
        **{s: {"gc": "keeps", "why": f"the base of {on} (dropped too), in the chain kept snapshot {sids[3]} is "
               "built on"} for s, on in ((sids[0], sids[1]), (sids[1], sids[2]))}}


def test_compact_of_a_plan_made_before_a_drop_builds_nothing_on_what_was_dropped(repo: Repository) -> None:
    """`gpupas compact --plan FILE` with a plan saved before a drop: it re-encoded the dropped snapshot and made it a
    kept one's base again, which gc then kept; now refused, and the dropped snapshots themselves are left to gc."""
    from gpupas.jobs.compact import compact_archive

    ws, sids = _run_of(repo, 4)  # s0 <- s1 <- s2 <- s3
    plan = {sids[3]: None, sids[2]: sids[3]}  # saved earlier: s3 whole, s2 a delta on it
    repo.drop_snapshots("run", ["latest"])  # s3: nothing kept is built on it
    before = {s: repo.archive.manifest(s).base for s in sids}
    repo.close()
    with pytest.raises(InvalidInputError, match=f"dropped from their version since it was made.*{sids[2]} on "
                                                f"{sids[3]}.*plan again"):
        compact_archive(str(repo.location), target=plan, scheduler="sync")
    c = compact_archive(str(repo.location), target={sids[3]: None}, scheduler="sync", gc_min_age=0)
    assert c.to_dict()["revised"] == []  # a dropped snapshot is gc's, not re-encoded
    with open_repository(repo.location) as again:
        assert {s: again.archive.manifest(s).base for s in sids[:3]} == {s: before[s] for s in sids[:3]}
        assert _manifests(again) == set(sids[:3])  # the gc after the job freed it
        assert [again.restore("run", i + 1)["w"].tobytes() for i in range(3)] == [w.tobytes() for w in ws[:3]]


@pytest.mark.parametrize("alpha", [1.0, 3.0, None])  # all whole; a plan that would keep deltas; no budget
def test_a_dropped_base_of_a_kept_delta_stays_until_compact_rebases_it(repo: Repository, alpha: float | None) -> None:
    """Whatever the plan's budget, compaction re-bases a kept snapshot off dropped ones (at alpha 3 a plan kept the
    delta on its dropped base, storing that base whole again, and with no budget nothing changed)."""
    from gpupas.jobs.compact import compact_archive
    from gpupas.plan.archive import plan_archive, unkept

    ws, sids = _run_of(repo, 4)
    repo.drop_snapshots("run", [1, 2, 3])  # s3 is a delta on s2, on s1, on s0
    notes = repo.verify()["notes"]
    assert any("gc keeps them until `gpupas compact` re-bases those" in n for n in notes), notes
    assert repo.gc(min_age=0) == []  # every dropped one is a base of the kept s3
    assert repo.restore("run")["w"].tobytes() == ws[3].tobytes()
    assert unkept(repo.archive) == (set(), set(sids[:3]))
    planned = plan_archive(repo.archive, alpha=None)
    assert planned.target == {sids[3]: None}  # no plan keeps a dropped snapshot or builds on one
    assert [(r["snapshot"], r["base_now"], r["base_now_dropped"]) for r in planned.rows()] == [(sids[3], sids[2], True)]
    repo.close()
    c = compact_archive(str(repo.location), alpha=alpha, scheduler="sync", gc_min_age=0)
    assert not {x["snapshot"] for x in c.to_dict()["revised"]} & set(sids[:3])  # nothing re-encoded that goes
    with open_repository(repo.location) as again:
        assert again.archive.manifest(sids[3]).base is None
        assert _manifests(again) == {sids[3]}
        assert again.restore("run")["w"].tobytes() == ws[3].tobytes()
        assert again.verify()["ok"] and again.verify()["notes"] == []


def test_compact_says_which_dropped_snapshots_its_stored_bytes_still_count(repo: Repository) -> None:
    """Re-basing a kept delta off its dropped bases stores it whole, so the archive stores more until gc frees
    the bases: compaction says which snapshots of its 'after' bytes no version keeps any more."""
    from gpupas.jobs.compact import compact_archive

    ws, sids = _run_of(repo, 4)
    repo.drop_snapshots("run", [1, 2, 3])
    repo.close()
    dry = compact_archive(str(repo.location), alpha=None, scheduler="sync", dry_run=True)
    assert dry.unkept == [] and dry.stored_unkept == 0  # as things are: every dropped one is a base of s3
    c = compact_archive(str(repo.location), alpha=None, scheduler="sync")
    with open_repository(repo.location) as again:
        sizes = {s: again.archive.manifest(s).stored_bytes for s in sids}
        assert c.unkept == sorted(sids[:3]) and c.stored_unkept == sum(sizes[s] for s in sids[:3])
        assert c.stored_after == sum(sizes.values()) and c.to_dict()["stored_unkept"] == c.stored_unkept
        again.gc(min_age=0)
        assert again.restore("run")["w"].tobytes() == ws[3].tobytes()
        assert again.stats()["stored_bytes"] == c.stored_after - c.stored_unkept


def test_stats_says_how_many_bytes_gc_would_free(repo: Repository) -> None:
    """Dropped snapshots and the old forms a compaction leaves were counted in stats' disk total alone (by number
    elsewhere): the bytes between the weights stored and the folder on disk went unexplained. stats gives their
    bytes, as gc counts what it frees."""
    from gpupas.jobs.compact import compact_archive

    _run_of(repo, 4)
    repo.drop_snapshots("run", [1, 2, 3])
    repo.close()
    compact_archive(str(repo.location), alpha=None, scheduler="sync")  # s3 stored whole: the old form is left
    with open_repository(repo.location) as again:
        s = again.stats()
        assert len(s["unreferenced_snapshots"]) == 3 and len(s["incomplete_snapshots"]) == 1
        freed = again.gc(min_age=0)
        by_kind = {k: sum(r["bytes"] for r in freed if r["kind"] == k) for k in ("snapshot", "folder")}
        assert (s["unreferenced_bytes"], s["incomplete_bytes"]) == (by_kind["snapshot"], by_kind["folder"]) != (0, 0)
        after = again.stats()
        assert (after["unreferenced_bytes"], after["incomplete_bytes"]) == (0, 0)


def test_verify_notes_what_an_add_snapshot_killed_before_its_record_update_left(repo: Repository) -> None:
    """A snapshot written for an existing version that its record never named (nor dropped): an add killed
    between its commit and the record update. verify notes it, and gc removes it."""
    _, sids = _run_of(repo, 2)
    stray = repo.archive.commit({"w": np.zeros(4000, np.float32)}, meta={"version_id": 1})  # the add's commit
    result = repo.verify()
    assert result["ok"] and len(result["notes"]) == 1, result["notes"]
    note = result["notes"][0]
    assert stray.id in note and "written for version 1 are not named by its record" in note
    assert "killed before its record named them" in note and "dropped from version" not in note
    assert [r["name"] for r in repo.gc(min_age=0) if r["kind"] == "snapshot"] == [stray.id]
    assert _manifests(repo) == set(sids) and repo.verify()["notes"] == []


def test_repository_methods_name_every_option_of_the_functions_they_call() -> None:
    """``help(repo.export)`` lists export's options (they were hidden behind ``**kw``), and an option added to the
    function and not to the method fails here."""
    import inspect

    from gpupas.versions import export
    from gpupas.versions import inspect as _inspect

    for method, func in ((Repository.export, export.export), (Repository.checkout, export.checkout),
                         (Repository.diff, _inspect.diff)):
        m, f = inspect.signature(method).parameters, inspect.signature(func).parameters
        assert list(m)[1:] == list(f)[1:] and all(m[k].default == f[k].default for k in list(f)[1:]), method


def test_versions_read_twice_are_equal_until_the_record_changes(repo: Repository) -> None:
    repo.commit("run", {"w": np.arange(8, dtype=np.float32)}, metrics={"loss": [[0, float("nan")]]})
    repo.commit("other", {"w": np.zeros(8, np.float32)})
    a, b = repo.version("run"), repo.version(1)
    assert a is not b and a == b and len({a, b, repo.version("other")}) == 2 and a != repo.version("other")
    assert a != 1 and a != a.record
    after = repo.add_snapshot("run", {"w": np.ones(8, np.float32)})
    assert after != a and after == repo.version("run") and hash(after) == hash(repo.version("run"))
