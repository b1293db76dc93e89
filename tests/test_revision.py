"""Revising a snapshot in place: another encoding under the same id, switched atomically.

Readers see the old form or the new one, never a mix; children of a revised snapshot are
unaffected (deltas are defined on bits); a revision killed at any moment loses nothing.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import gpupas
from gpupas.errors import ConflictError, InvalidInputError


def model(seed: int, base: dict[str, np.ndarray] | None = None, scale: float = 1e-4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if base is not None:
        return {k: (v + rng.standard_normal(v.shape) * scale).astype(v.dtype) for k, v in base.items()}
    return {"w": (rng.standard_normal((300, 200)) * 0.02).astype(np.float32),
            "b": (rng.standard_normal(200) * 0.01).astype(np.float16), "n": np.arange(7, dtype=np.int64)}


def same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes() for k in want)


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, list[dict[str, np.ndarray]]]:
    snaps = [model(0)]
    snaps += [model(1, snaps[0]), model(2, None)]
    snaps[2] = model(2, snaps[1])
    with gpupas.create_archive(tmp_path / "a") as a:
        for i, s in enumerate(snaps):
            a.commit(s, snapshot=f"s{i}", base=f"s{i - 1}" if i else None)
    return tmp_path / "a", snaps


def test_revise_changes_the_form_not_the_bits(chain: tuple[Path, list[dict[str, np.ndarray]]]) -> None:
    path, snaps = chain
    with gpupas.open_archive(path) as a:
        old = a.manifest("s1")
        new = a.revise("s1", setting="strong", layout=gpupas.Layout(groups=(1,), chunk_size=1 << 16))
        assert new.revision == old.revision + 1 and new.base == old.base and new.created == old.created
        assert len(new.streams) == 2 and new.streams[0].chunk_size == 1 << 16
        assert not set(new.folders()) & set(old.folders())
        assert {e.name: e.crc32 for e in new.tensors} == {e.name: e.crc32 for e in old.tensors}
    with gpupas.open_archive(path) as cold:  # the snapshot, and its child (a delta on its bits), restore cold
        assert cold.manifest("s1").revision == 1
        same(cold.restore("s1"), snaps[1])
        same(cold.restore("s2"), snaps[2])
        assert cold.store.orphan_folders() == old.folders()  # the old form is garbage now
        assert cold.gc(min_age=3600) == []  # but kept for a grace period: readers may still be on it
        assert cold.gc(min_age=0) == old.folders()
        same(cold.restore("s2"), snaps[2])


def test_a_manifest_is_parsed_again_only_when_its_bytes_change(
        chain: tuple[Path, list[dict[str, np.ndarray]]]) -> None:
    path, _ = chain
    with gpupas.open_archive(path) as a:
        first = a.store.read_manifest("s1")
        assert a.store.read_manifest("s1") is first  # the same bytes: the same (frozen) object
        with gpupas.open_archive(path) as other:  # revised by another process, say
            other.revise("s1", setting="strong")
        again = a.store.read_manifest("s1")
        assert again is not first and again.revision == first.revision + 1
        mpath = path / "manifests" / "s1.json"
        data = mpath.read_bytes()
        assert b'"revision":1,' in data
        mpath.write_bytes(data.replace(b'"revision":1,', b'"revision":7,'))  # damaged: its seal no longer fits
        with pytest.raises(gpupas.errors.IntegrityError, match="checksum"):
            a.store.read_manifest("s1")


def test_revise_can_change_the_base(chain: tuple[Path, list[dict[str, np.ndarray]]]) -> None:
    path, snaps = chain
    with gpupas.open_archive(path) as a:
        whole = a.revise("s1", base=None)  # stored whole now
        assert whole.base is None and {e.enc for e in whole.tensors} == {"mat"}
        assert a.depth("s2") == 1
        rebased = a.revise("s2", base="s0")  # a delta on s0 instead of s1
        assert rebased.base == "s0" and a.depth("s2") == 1
        with pytest.raises(InvalidInputError, match="cannot be its base"):
            a.revise("s0", base="s2")  # s2 is a delta on s0: a loop
    with gpupas.open_archive(path) as cold:
        for i, s in enumerate(snaps):
            same(cold.restore(f"s{i}"), s)


def test_a_new_base_may_not_put_the_snapshots_built_on_it_past_max_chain(tmp_path: Path) -> None:
    """revise(base=...) checked the chain below the snapshot, not the snapshots built on it: with max_chain 4,
    a0..a3 (a3 3 links deep) and b0..b2, re-basing a1 on b2 put a3 5 links deep, past what a commit may make
    and what a restore was promised to decode. Refused now, nothing changed; a base that deepens no one past the
    limit, and storing whole, still work; a compaction (descendants=False) checks its whole plan instead."""
    snaps = [model(i) for i in range(7)]
    with gpupas.create_archive(tmp_path / "a", max_chain=4) as a:
        for name, n in (("a", 4), ("b", 3)):
            for i in range(n):
                a.commit(snaps[i], snapshot=f"{name}{i}", base=f"{name}{i - 1}" if i else None)
        with pytest.raises(InvalidInputError, match=r"put snapshot a3, built on it, 5 links deep; at most 4"):
            a.revise("a1", base="b2")
        assert a.manifest("a1").base == "a0" and a.manifest("a1").revision == 0
        assert [a.depth(f"a{i}") for i in range(4)] == [0, 1, 2, 3]
        assert a.revise("a2", base="b1").base == "b1" and a.depth("a3") == 3  # within the limit
    with gpupas.open_archive(tmp_path / "a", max_chain=2) as a:  # a limit a3 already passes: no deeper than it is
        assert a.revise("a2", base="b0").base == "b0" and a.depth("a3") == 2
        with pytest.raises(InvalidInputError, match=r"put snapshot a3, built on it, 3 links deep; at most 2"):
            a.revise("a2", base="a1")
        assert a.revise("a2", base=None).base is None and a.depth("a3") == 1
    with gpupas.open_archive(tmp_path / "a") as cold:
        for name, n in (("a", 4), ("b", 3)):
            for i in range(n):
                same(cold.restore(f"{name}{i}"), snaps[i])


def test_a_reader_on_an_old_manifest_finishes_or_retries(chain: tuple[Path, list[dict[str, np.ndarray]]]) -> None:
    path, snaps = chain
    with gpupas.open_archive(path) as reader, gpupas.open_archive(path) as writer:
        reader.manifest("s2")  # cached: revision 0
        writer.revise("s2", setting="fast")
        same(reader.restore("s2"), snaps[2])  # the old folder is still there
        reader.bases.clear()
        writer.gc(min_age=0)  # the old folder is gone: the reader re-reads the manifest and retries
        same(reader.restore("s2"), snaps[2])
        assert reader.manifest("s2").revision == 1


def test_a_partial_reader_on_an_old_manifest_retries(chain: tuple[Path, list[dict[str, np.ndarray]]]) -> None:
    """read_planes of a session whose cached manifest was revised and gc'd away re-reads it (it said
    "chunk missing; restore the archive from a copy")."""
    path, snaps = chain
    with gpupas.open_archive(path) as reader, gpupas.open_archive(path) as writer:
        reader.read_planes("s2", planes=2)
        writer.revise("s2", setting="fast")
        writer.revise("s1", setting="fast")
        writer.gc(min_age=0)
        got = reader.read_planes("s2", planes=2)  # of the new forms: bounds that hold the values
        for k in ("w", "b"):
            assert np.all((got.lo[k] <= snaps[2][k]) & (snaps[2][k] <= got.hi[k])), k
        assert reader.manifest("s2").revision == 1


def test_concurrent_revisions_conflict_instead_of_mixing(chain: tuple[Path, list[dict[str, np.ndarray]]]) -> None:
    path, snaps = chain
    with gpupas.open_archive(path) as a, gpupas.open_archive(path) as b:
        old = b.manifest("s1")
        a.revise("s1", setting="fast")
        with pytest.raises(ConflictError, match="revised by another writer"):
            b.store.replace_manifest(old.revise(old.streams, old.tensors, "now", setting=old.setting,
                                                segment=old.segment, base=old.base, grand=old.grand), old.revision)
        same(b.restore("s1"), snaps[1])


CHILD = r"""
import sys, gpupas
path = sys.argv[1]
forms = [dict(setting="strong"), dict(setting="fast", layout=gpupas.Layout(groups=(1,), chunk_size=1 << 15)),
         dict(setting="default"), dict(setting="default", layout=gpupas.Layout(groups=(1, 2)))]
with gpupas.open_archive(path) as a:
    print("ready", flush=True)
    i = 0
    while True:
        a.revise("s1", **forms[i % len(forms)])
        i += 1
"""


def test_killed_revisions_never_show_a_mix(chain: tuple[Path, list[dict[str, np.ndarray]]]) -> None:
    path, snaps = chain
    rng = random.Random(1)
    seen: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:  # reads before, during and after the revisions, each from fresh manifests
        while not stop.is_set():
            try:
                with gpupas.open_archive(path) as r:
                    seen.append(r.manifest("s1").revision)
                    same(r.restore("s1"), snaps[1])
                    same(r.restore("s2"), snaps[2])
            except BaseException as exc:
                errors.append(exc)
                return

    reader = threading.Thread(target=read)
    reader.start()
    revisions = []
    try:
        for _ in range(16):
            proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True,
                                    env=os.environ | {"PYTHONUNBUFFERED": "1"})
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 0.4))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            with gpupas.open_archive(path) as a:  # after the kill: whole, at the old or a new revision
                revisions.append(a.manifest("s1").revision)
                for i, s in enumerate(snaps):
                    same(a.restore(f"s{i}"), s)
    finally:
        stop.set()
        reader.join()
    assert not errors, errors[0]
    assert revisions == sorted(revisions) and revisions[-1] > 0  # revisions went through, none went back
    assert len(seen) > 16
    with gpupas.open_archive(path) as a:
        removed = a.gc(min_age=0)  # what killed revisions left, and the superseded forms
        assert removed and a.store.orphan_folders() == []
        for i, s in enumerate(snaps):
            same(a.restore(f"s{i}"), s)
            a.verify(f"s{i}")
