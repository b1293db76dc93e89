"""Property test: archives built from a valid one by hostile mutation (issue 15).

A small archive (several snapshots: whole ones, deltas with row masks, plane groups, small chunks, two
settings) is built once. Each example copies it, then mutates one file the way an attacker or bit rot
would: a manifest changed at the JSON level (numbers, strings, lists, keys dropped or added) and sealed
again so that the change reaches the validator; a manifest's raw bytes (the seal must catch them); a
shard index changed (offsets, lengths, slots) and given a fresh CRC-32C so that it reaches the bound
checks; a shard's raw bytes. Then every snapshot is restored and verified: each either gives back the
committed bits exactly or raises IntegrityError / FormatError (or a not-found error where the mutation
renamed something), within a deadline and bounded memory, and nothing outside the archive is opened
(every ``os.open`` is checked) and nothing is written anywhere.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import gpupas  # noqa: E402
from gpupas.engine.encode import Layout  # noqa: E402
from gpupas.errors import CodecUnavailableError, FormatError, IntegrityError, NotFoundError  # noqa: E402
from gpupas.format.checksum import crc32c  # noqa: E402
from gpupas.format.sealed import seal, unseal  # noqa: E402

ALLOWED = (IntegrityError, FormatError, NotFoundError, CodecUnavailableError)
EMPTY = 2**64 - 1
DEADLINE_S = 60
MAX_RSS_MB = 1500


# -- the valid archive ------------------------------------------------------------------------------------------
class Golden:
    def __init__(self, root: Path):
        self.root = root
        self.expected: dict[str, dict[str, bytes]] = {}
        self.folders: list[str] = []
        self.per: dict[str, int] = {}  # folder -> shard_chunks


def _build(root: Path) -> Golden:
    g = Golden(root)
    rng = np.random.default_rng(7)
    w0 = {"w": (rng.standard_normal((64, 96)) * 0.02).astype(np.float32),
          "h": rng.standard_normal((33, 7)).astype(np.float16),
          "i": rng.integers(-1000, 1000, 300).astype(np.int32),
          "b": rng.random(50) > 0.5,
          "z": np.array(3.5, np.float64),
          "e": np.zeros((0, 4), np.float32)}
    trend = (rng.standard_normal((64, 96)) * 1e-3).astype(np.float32)
    w1 = dict(w0, w=w0["w"] + trend, i=w0["i"] + 1)
    w1["w"][::2] = w0["w"][::2]  # half the rows unchanged: a row mask
    w2 = dict(w1, w=(w1["w"] + trend * np.float32(1.01)).astype(np.float32), h=(w0["h"] * 2).astype(np.float16))
    other = {"x": rng.standard_normal(3000).astype(np.float32), "y": rng.integers(0, 3, (40, 40)).astype(np.uint8)}
    with gpupas.create_archive(root) as a:
        s0 = a.commit(w0, layout=Layout(groups=(1,), chunk_size=4096))
        s1 = a.commit(w1, base=s0.id, layout=Layout(chunk_size=2048))
        s2 = a.commit(w2, base=s1.id, layout=Layout(groups=(1, 2), chunk_size=1024))
        s3 = a.commit(other, setting="strong", layout=Layout(chunk_size=512))
        s4 = a.commit(dict(other, x=other["x"] + np.float32(1.0)), base=s3.id, setting="fast")
        for m, src in ((s0, w0), (s1, w1), (s2, w2), (s3, other), (s4, dict(other, x=other["x"] + np.float32(1)))):
            g.expected[m.id] = {k: np.ascontiguousarray(v).tobytes() for k, v in src.items()}
            for s in m.streams:
                g.folders.append(s.folder)
                g.per[s.folder] = s.shard_chunks
        encs = {e.enc for m in (s1, s2, s4) for e in m.tensors} | {"masked" for e in s1.tensors if e.rows is not None}
        assert {"sub", "masked"} <= encs, encs
    return g


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Golden]:
    """Built in memory (/dev/shm) where there is one: each example copies and deletes an archive."""
    shm = Path("/dev/shm")
    base = Path(tempfile.mkdtemp(prefix="gpupas-mutation-", dir=shm)) if os.access(shm, os.W_OK) else (
        tmp_path_factory.mktemp("golden"))
    try:
        yield _build(base / "arc")
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- mutations --------------------------------------------------------------------------------------------------
INTS = [0, 1, 2, 3, 4, 7, 8, 255, 256, 1023, 1024, 4096, 65535, 2**20, 2**24, 2**30, 2**31, 2**32 - 1, 2**32,
        2**40, 2**44, 2**50, 2**50 + 1, 2**53 + 1, 2**63, 2**64 - 1, 2**64, 10**30, -1, -(2**63)]
STRINGS = ["", ".", "..", "../outside", "../../outside", "/etc/passwd", "snapshots", "zarr.json", "a/b", "x" * 300,
           "mat", "sub", "xor", "pred", "bogus", "float32", "int32", "uint8", "bfloat16", "float8_e5m2", "complex64",
           "z", "d", "a", "zz", "zstd", "deflate", "lz4", "fast", "strong", "é", "\u0000", "crc32c:00000000"]
OTHER = [None, True, False, [], {}, 0.5, -0.0, 1e300, [0], [0, 0, 0, 0], [[0, 0, 0, 1]], {"z": "zstd"}]
KEYS = ["format", "id", "base", "grand", "streams", "tensors", "folder", "length", "chunk_size", "shard_chunks",
        "codecs", "chunks", "name", "dtype", "shape", "nbytes", "crc32", "enc", "ctx", "rows", "parts", "extras",
        "depth", "data", "offset", "unknown_field"]


def _slots(obj: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) of a JSON document, depth first."""
    out: list[tuple[Any, Any]] = []
    stack = [obj]
    while stack:
        c = stack.pop()
        items = c.items() if isinstance(c, dict) else enumerate(c) if isinstance(c, list) else []
        for k, v in items:
            out.append((c, k))
            if isinstance(v, (dict, list)):
                stack.append(v)
    return out


def _value(data: st.DataObject, old: Any, g: Golden) -> Any:
    near = []
    if isinstance(old, int) and not isinstance(old, bool):
        near = [old + 1, old - 1, old * 2, old // 2, -old, old + 4096, old ^ 1]
    elif isinstance(old, str):
        near = [old[:-1], old + "x", old.upper(), old[::-1]]
    pool = INTS + STRINGS + OTHER + near + list(g.expected) + g.folders
    return data.draw(st.sampled_from(pool), label="value")


def mutate_manifest_json(data: st.DataObject, root: Path, g: Golden) -> str:
    sid = data.draw(st.sampled_from(sorted(g.expected)), label="snapshot")
    path = root / "manifests" / f"{sid}.json"
    doc = unseal(path.read_bytes(), sid)
    for _ in range(data.draw(st.integers(1, 3), label="ops")):
        slots = _slots(doc)
        c, k = slots[data.draw(st.integers(0, len(slots) - 1), label="slot")]
        op = data.draw(st.sampled_from(["replace", "replace", "replace", "delete", "duplicate", "add", "swap"]),
                       label="op")
        if op == "replace":
            c[k] = _value(data, c[k], g)
        elif op == "delete" and (isinstance(c, dict) or len(c) > 0):
            del c[k]
        elif op == "duplicate" and isinstance(c, list):
            c.insert(k, json.loads(json.dumps(c[k])))
        elif op == "add" and isinstance(c, dict):
            c[data.draw(st.sampled_from(KEYS), label="key")] = _value(data, None, g)
        elif op == "swap" and isinstance(c, list) and len(c) > 1:
            j = data.draw(st.integers(0, len(c) - 1), label="other")
            c[k], c[j] = c[j], c[k]
    doc.pop("checksum", None)
    path.write_bytes(seal(doc) if doc else b"{}")
    return f"manifest {sid} (json, resealed)"


def mutate_manifest_bytes(data: st.DataObject, root: Path, g: Golden) -> str:
    sid = data.draw(st.sampled_from(sorted(g.expected)), label="snapshot")
    path = root / "manifests" / f"{sid}.json"
    raw = bytearray(path.read_bytes())
    how = data.draw(st.sampled_from(["flip", "flip", "truncate", "append", "byte"]), label="how")
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 3), label="flips")):
            raw[data.draw(st.integers(0, len(raw) - 1), label="at")] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    elif how == "byte":
        raw[data.draw(st.integers(0, len(raw) - 1), label="at")] = data.draw(st.integers(0, 255), label="to")
    elif how == "truncate":
        del raw[data.draw(st.integers(0, len(raw) - 1), label="at") :]
    else:
        raw += data.draw(st.sampled_from([b"\x00", b"}", b' {"x":1}', b"\xff" * 10]), label="tail")
    path.write_bytes(bytes(raw))
    return f"manifest {sid} ({how})"


def _shard(data: st.DataObject, root: Path, g: Golden) -> tuple[Path, int]:
    files = sorted((p, g.per[f]) for f in g.folders for p in (root / "snapshots" / f).rglob("c/*") if p.is_file())
    return data.draw(st.sampled_from(files), label="shard")


def mutate_index(data: st.DataObject, root: Path, g: Golden) -> str:
    path, per = _shard(data, root, g)
    raw = path.read_bytes()
    size = per * 16 + 4
    index = np.frombuffer(raw[-size:-4], "<u8").reshape(per, 2).copy()
    end = len(raw) - size
    for _ in range(data.draw(st.integers(1, 3), label="ops")):
        j = data.draw(st.integers(0, per - 1), label="slot")
        if data.draw(st.booleans(), label="swap") and per > 1:
            k = data.draw(st.integers(0, per - 1), label="with")
            index[[j, k]] = index[[k, j]]
            continue
        f = data.draw(st.integers(0, 1), label="field")
        old = int(index[j, f])
        new = data.draw(st.sampled_from([0, 1, 4, 5, EMPTY, EMPTY - 1, end, end - 1, end + 1, end - 4, len(raw),
                                         (old + 1) % 2**64, (old - 1) % 2**64, (old + 4) % 2**64, (old - 4) % 2**64,
                                         2**63, 2**32, int(index[(j + 1) % per, f])]), label="to")
        index[j, f] = new
    tail = index.astype("<u8").tobytes()
    path.write_bytes(raw[:end] + tail + struct.pack("<I", crc32c(tail)))
    return f"index of {path.relative_to(root)} (re-CRC'd)"


def mutate_shard_bytes(data: st.DataObject, root: Path, g: Golden) -> str:
    path, _ = _shard(data, root, g)
    raw = bytearray(path.read_bytes())
    how = data.draw(st.sampled_from(["flip", "flip", "truncate", "append", "zero"]), label="how")
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            raw[data.draw(st.integers(0, len(raw) - 1), label="at")] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    elif how == "truncate":
        del raw[data.draw(st.integers(0, len(raw) - 1), label="at") :]
    elif how == "zero":
        a = data.draw(st.integers(0, len(raw) - 1), label="at")
        raw[a : a + data.draw(st.integers(1, 64), label="n")] = bytes(min(len(raw) - a, 64))[: len(raw[a : a + 64])]
    else:
        raw += bytes(data.draw(st.integers(1, 40), label="n"))
    path.write_bytes(bytes(raw))
    return f"{path.relative_to(root)} ({how})"


MUTATIONS = [mutate_manifest_json, mutate_manifest_json, mutate_manifest_json, mutate_manifest_bytes, mutate_index,
             mutate_index, mutate_shard_bytes]


# -- the checks -------------------------------------------------------------------------------------------------
class Deadline(Exception):
    pass


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    def expired(signum: int, frame: Any) -> None:
        raise Deadline(f"no answer within {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextmanager
def confined(root: Path) -> Iterator[list[str]]:
    """Every ``os.open`` must name a path inside ``root`` (resolved through its ``dir_fd``) and only read;
    nothing may be created, renamed or removed. Yields the list of violations."""
    roots = {os.path.normpath(str(root)), os.path.realpath(root)}
    # caches of compiled code (Python's __pycache__, numba's kernel cache) are the library's, not the archive's
    caches = tuple(os.path.normpath(c) for c in (os.environ.get("NUMBA_CACHE_DIR") or "",
                                                 os.path.expanduser("~/.cache")) if c)
    bad: list[str] = []

    def cache(p: str) -> bool:
        return "__pycache__" in p.split(os.sep) or p.startswith(caches)
    real = {n: getattr(os, n) for n in ("open", "mkdir", "unlink", "rmdir", "rename", "replace", "link", "symlink")}

    def inside(path: Any, dir_fd: int | None) -> str | None:
        p = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(p):
            p = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), p)
        p = os.path.normpath(p)
        return None if any(p == r or p.startswith(r + os.sep) for r in roots) else p

    def guarded_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        where = inside(path, dir_fd)
        if where is not None and not cache(where):
            bad.append(f"opened {where}")
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) and not cache(where or ""):
            bad.append(f"opened {os.fsdecode(path)} for writing")
        return real["open"](path, flags, mode, dir_fd=dir_fd)

    def refuse(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if not all(cache(os.fsdecode(a)) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
                bad.append(f"os.{name}{args}")
            return real[name](*args, **kwargs)

        return call

    os.open = guarded_open  # type: ignore[assignment]
    for n in real:
        if n != "open":
            setattr(os, n, refuse(n))
    try:
        yield bad
    finally:
        for n, f in real.items():
            setattr(os, n, f)


def _committed_bits(got: dict[str, np.ndarray], want: dict[str, bytes], what: str) -> None:
    """What a restore returned is the committed bits: by name, or (a renamed tensor) some committed tensor's."""
    every = set(want.values())
    for name, arr in got.items():
        b = np.ascontiguousarray(arr).tobytes()
        if name in want:
            assert b == want[name], f"{what}: tensor {name!r} restored to other bits"
        else:
            assert b in every, f"{what}: tensor {name!r} restored to bits that were never committed"


def check_archive(root: Path, g: Golden, what: str) -> list[str]:
    """Restore and verify every snapshot; returns the error class of each refused restore."""
    refused = []
    with confined(root) as bad, deadline(DEADLINE_S):
        with gpupas.open_archive(root, workers=1) as a:
            for sid, want in g.expected.items():
                try:
                    got = a.restore(sid)
                except ALLOWED as exc:
                    refused.append(type(exc).__name__)
                    continue
                _committed_bits(got, want, f"{what}: restore {sid}")
        with gpupas.open_archive(root, workers=1) as a:
            for sid, result in a.verify_all():
                assert isinstance(result, (int, *ALLOWED)), f"{what}: verify_all {sid}: {result!r}"
        with gpupas.open_archive(root, workers=1) as a:
            for sid in g.expected:
                try:
                    a.verify(sid)
                except ALLOWED:
                    pass
    assert not bad, f"{what}: touched outside the archive or wrote: {bad[:5]}"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert rss < MAX_RSS_MB, f"{what}: peak memory {rss:.0f} MB"
    return refused


def test_golden_archive_is_intact(golden: Golden) -> None:
    check_archive(golden.root, golden, "unmutated")
    with gpupas.open_archive(golden.root) as a:
        assert sorted(dict(a.verify_all())) == sorted(golden.expected)
        for sid, want in golden.expected.items():
            assert {k: v.tobytes() for k, v in a.restore(sid).items()} == want


@settings(max_examples=400, deadline=None, database=None, derandomize=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_archives_restore_exactly_or_fail_cleanly(golden: Golden, data: st.DataObject) -> None:
    work = golden.root.parent / "work"
    shutil.rmtree(work, ignore_errors=True)
    root = work / "arc"
    shutil.copytree(golden.root, root, symlinks=True)
    outside = work / "outside"
    shutil.copytree(golden.root / "snapshots", outside / "snapshots")  # what an escaping folder would find
    (outside / "secret").write_bytes(b"secret")
    before = sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in outside.rglob("*"))
    try:
        mutation = data.draw(st.sampled_from(MUTATIONS), label="mutation")
        what = mutation(data, root, golden)
        refused = check_archive(root, golden, what)
        event(f"{mutation.__name__}: " + (", ".join(sorted(set(refused))) or "all restored exactly"))
        after = sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in outside.rglob("*"))
        assert after == before, f"{what}: the folder beside the archive changed"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_row_mask_on_an_empty_tensor_is_damage(golden: Golden, tmp_path: Path) -> None:
    root = tmp_path / "arc"
    shutil.copytree(golden.root, root)
    with gpupas.open_archive(root) as a:
        child = next(s for s in a.snapshots() if a.manifest(s).base is not None and "e" in a.manifest(s).by_name)
    path = root / "manifests" / f"{child}.json"
    doc = unseal(path.read_bytes(), child)
    e = next(t for t in doc["tensors"] if t["name"] == "e")
    assert e["shape"] == [0, 4]
    e.update(rows=0, extras=[0, 0])  # a mask of one byte for the one "row" of an empty tensor
    path.write_bytes(seal(doc))
    with gpupas.open_archive(root) as a:
        with pytest.raises(IntegrityError, match=child):
            a.restore(child)
        results = dict(a.verify_all())  # every snapshot answered: the damaged one with an integrity error
    assert sorted(results) == sorted(golden.expected) and isinstance(results[child], IntegrityError)
