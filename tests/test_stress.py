"""Stress (issue 15): commits racing a training loop that steps the weights in place, and racing
`gpupas gc --min-age 0` and discards run by another process. Whatever a commit returns must restore
bit-exact afterwards; a commit may only fail with a clear error (the tensor changed while it was being
committed, or its base was discarded first).

The archives live in /dev/shm where there is one (fsync costs nothing there; the races do not depend
on it), each test runs for a bounded time (~10 s).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import gpupas
from gpupas.errors import IntegrityError, InvalidInputError, SnapshotNotFoundError
from gpupas.versions.repository import create_repository, open_repository

ROOT = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
ENV = {k: v for k, v in os.environ.items() if k != "GPUPAS_ARCHIVE"} | {"PYTHONPATH": PYTHONPATH,
                                                                         "PYTHONUNBUFFERED": "1"}

# Another process: `gpupas gc --min-age 0` (the command itself, run in this process) in a loop, and,
# in "discard" mode, a discard of a random snapshot after each (refused while others are built on it).
_JANITOR = r"""
import json, os, random, sys
import gpupas
from gpupas.cli.app import app

root, stop, mode = sys.argv[1:4]
rng = random.Random(int(sys.argv[4]))
out = {"gcs": 0, "gc_failures": [], "discarded": [], "refused": 0}
while not os.path.exists(stop):
    code = app(["gc", "--min-age", "0", "--json", "-A", root], standalone_mode=False)
    out["gcs"] += 1
    if code:
        out["gc_failures"].append(code)
    if out["gcs"] == 1:
        print("READY", flush=True)
    if mode == "discard":
        with gpupas.open_archive(root) as a:
            sids = a.store.list_snapshots()
            if sids:
                sid = rng.choice(sids)
                try:
                    a.discard(sid)
                    out["discarded"].append(sid)
                except gpupas.GpupasError:
                    out["refused"] += 1
print("RESULT " + json.dumps(out))
"""


@pytest.fixture
def place(tmp_path: Path) -> Iterator[Path]:
    shm = Path("/dev/shm")
    if os.access(shm, os.W_OK):
        base = Path(tempfile.mkdtemp(prefix="gpupas-stress-", dir=shm))
        try:
            yield base
        finally:
            shutil.rmtree(base, ignore_errors=True)
    else:
        yield tmp_path


class Janitor:
    """The other process; :meth:`stop` ends its loop and returns what it did."""

    def __init__(self, root: Path, mode: str, seed: int = 0):
        self.flag = root.parent / f"stop-{mode}"
        self.proc = subprocess.Popen([sys.executable, "-c", _JANITOR, str(root), str(self.flag), mode, str(seed)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                self.lines.append(line)
                if line.startswith("READY"):
                    ready.set()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        assert ready.wait(120), f"the other process did not start: {self.proc.poll()} {self.lines[-5:]}"

    def stop(self) -> dict:
        self.flag.touch()
        self.proc.wait(timeout=120)
        self.reader.join(30)
        err = self.proc.stderr.read()  # type: ignore[union-attr]
        assert self.proc.returncode == 0, err[-3000:]
        return json.loads([line for line in self.lines if line.startswith("RESULT ")][-1][len("RESULT "):])


@pytest.mark.parametrize("cache_size", [
    0,
    2,
])
def test_training_loop_steps_in_place_while_commits_gc_and_discards_run(place: Path, cache_size: int,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread steps the weights in place (+=, at varying pace) while this thread commits those same arrays
    (each a delta on the previous), and another process runs `gpupas gc --min-age 0` and discards. Every
    commit raises the clear error or publishes a snapshot that verifies (its tensors decode to its manifest's
    CRC-32s) and stays until discarded. (cache_size=0: bases always decoded from the archive, the control;
    the default cache runs until the first unrestorable snapshot, at most 30 s.)

    Half of the commits are held up for up to 5 ms between reading their base and staging their tensors, as
    a busy machine's scheduler would: that is where a step must not slip in unnoticed."""
    from gpupas import archive as archive_mod

    real_stage, jitter = archive_mod.stage_all, random.Random(2)

    def delayed_stage(*args: object, **kwargs: object) -> object:
        if jitter.random() < 0.5:
            time.sleep(jitter.uniform(0, 0.005))
        return real_stage(*args, **kwargs)

    monkeypatch.setattr(archive_mod, "stage_all", delayed_stage)
    arc = place / "arc"
    a = gpupas.create_archive(arc, cache_size=cache_size)
    rng = np.random.default_rng(0)
    w = {"a": rng.standard_normal(1 << 17).astype(np.float32), "b": rng.standard_normal((256, 256)).astype(np.float32),
         "c": np.zeros(1000, np.int32)}
    stop = threading.Event()
    steps, commit_s = [0], [0.01]

    def train() -> None:  # a step every 1-3 commit durations: steps land before, during and between commits
        pace = random.Random(1)
        while not stop.is_set():
            w["a"] += np.float32(1e-3)
            w["b"] *= np.float32(0.999)
            w["c"] += 1
            steps[0] += 1
            time.sleep(pace.uniform(1.0, 3.0) * commit_s[0])

    published: list[str] = []
    bad: list[str] = []  # published snapshots that do not verify
    gone: list[str] = []  # published snapshots no longer there when checked: the other process must have discarded
    checked = 0

    def check_new() -> None:  # each snapshot decoded once, its chain's in order (a fresh reader: no cache)
        nonlocal checked
        batch, checked = published[checked:], len(published)
        with gpupas.open_archive(arc, cache_size=0) as reader:
            for sid, result in reader.verify_all([s for s in batch if reader.store.has_manifest(s)]):
                if isinstance(result, Exception) and reader.store.has_manifest(sid):
                    bad.append(f"{sid}: {result}")
        gone.extend(s for s in batch if not (arc / "manifests" / f"{s}.json").exists())

    first = a.commit(w)  # warm up: compiled kernels (if any) are loaded before the clock starts
    w["c"] += 1
    first = a.commit(w, base=first.id)
    with gpupas.open_archive(arc, cache_size=0) as warm:
        warm.restore(first.id)
    published.append(first.id)
    janitor = Janitor(arc, "discard")
    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()
    changed = base_gone = 0
    base: str | None = first.id
    budget, enough = (15, 60) if cache_size == 0 else (30, 10**6)
    t0 = time.time()
    try:
        while time.time() - t0 < budget and not bad and len(published) < enough:
            c0 = time.time()
            try:
                m = a.commit(w, base=base)
                commit_s[0] = 0.8 * commit_s[0] + 0.2 * (time.time() - c0)
            except InvalidInputError as exc:
                assert "changed while it was being committed" in str(exc), exc
                changed += 1
                commit_s[0] = 0.8 * commit_s[0] + 0.2 * (time.time() - c0)
                continue
            except SnapshotNotFoundError as exc:
                assert base is not None and base in str(exc), exc
                base_gone, base = base_gone + 1, None
                continue
            except IntegrityError as exc:  # the base a previous commit published does not restore
                bad.append(f"{base} (read as the base of the next commit): {exc}")
                base = None
                continue
            published.append(m.id)
            base = m.id
            if len(published) - checked >= 25:
                check_new()
        check_new()
    finally:
        stop.set()
        trainer.join(30)
        done = janitor.stop()
        a.close()
    assert done["gcs"] > 0 and not done["gc_failures"], done
    assert not bad, (f"{len(bad)} of {len(published)} published snapshots do not restore ({changed} commits refused, "
                     f"{base_gone} bases discarded, {len(done['discarded'])} discards, {steps[0]} steps): {bad[:3]}")
    lost = set(gone) - set(done["discarded"])
    assert not lost, f"published, never discarded, yet gone: {sorted(lost)}"
    assert len(published) >= 3, (len(published), changed, steps)  # not vacuous (a slow machine publishes few)


def _tensors(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    return {"fc.weight": rng.standard_normal((32, 16)).astype(np.float32),
            "fc.bias": rng.standard_normal(32).astype(np.float32)}


def test_commits_racing_gc_from_another_process(place: Path) -> None:
    """100+ commits (plain snapshots, each a delta on the last; new versions; snapshots appended to a
    version) while another process runs `gpupas gc --min-age 0` in a loop: gc never takes what a commit in
    flight is writing, and every manifest a commit returned restores afterwards."""
    arc = place / "arc"
    repo = create_repository(arc)
    v = repo.commit("run", _tensors(0))
    repo.archive.commit(_tensors(0))  # compiled kernels (if any) are loaded before the race starts
    janitor = Janitor(arc, "gc")
    plain: list[tuple[gpupas.Manifest, int]] = []
    versions: list[tuple[int, str, int]] = []  # version, snapshot, seed
    base = None
    t0 = time.time()
    try:
        i = 1
        while (i <= 120 or time.time() - t0 < 3) and time.time() - t0 < 60:
            kind = i % 3
            if kind == 0:
                m = repo.archive.commit(_tensors(i), base=base)
                plain.append((m, i))
                base = m.id
            elif kind == 1:
                nv = repo.commit("run", _tensors(i), parents=[v.id])
                versions.append((nv.id, nv.latest, i))
            else:
                v = repo.add_snapshot(v.id, _tensors(i), step=i)
                versions.append((v.id, v.latest, i))
            i += 1
    finally:
        done = janitor.stop()
        repo.close()
    assert done["gcs"] >= 2 and not done["gc_failures"], done
    assert len(plain) + len(versions) >= 100
    with open_repository(arc) as fresh:
        for m, seed in plain:
            got = fresh.archive.restore(m.id)
            assert all(got[k].tobytes() == x.tobytes() for k, x in _tensors(seed).items()), m.id
        for vid, sid, seed in versions:
            got = fresh.restore(vid, sid)
            assert all(got[k].tobytes() == x.tobytes() for k, x in _tensors(seed).items()), (vid, sid)
        report = fresh.verify()
        assert report["ok"], report["problems"][:5]
        assert fresh.gc(min_age=0) == []  # nothing left that nothing needs
