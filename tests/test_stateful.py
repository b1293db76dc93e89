"""A model-based (stateful) test of the archive and its versions: random sequences of commits (whole, delta,
lossy), discards, revisions (re-bases, whole again, other settings and layouts), tier moves, gc, partial
restores, reopens, and versions with tags, against a Python model of what each snapshot holds.

After every step: every snapshot the model holds restores bit for bit (in this session and in a fresh one),
the archive lists exactly the model's snapshots, the chain and dependency bookkeeping agrees with the model,
and verify finds nothing wrong. ``GPUPAS_STATEFUL_EXAMPLES`` raises the number of runs (to hunt locally).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 and the float8 types with NumPy)
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import gpupas
from gpupas.errors import ArchiveExistsError, InvalidInputError, VersionNotFoundError
from gpupas.pas.planes import LAYOUTS
from gpupas.versions.repository import Repository

MAX_CHAIN = 3
EXAMPLES = int(os.environ.get("GPUPAS_STATEFUL_EXAMPLES", "50"))
STEPS = int(os.environ.get("GPUPAS_STATEFUL_STEPS", "30"))
NAMES = ["a", "b", "c", "d", "e"]
DTYPES = ["float32", "float16", "bfloat16", "float64", "int8", "int32", "uint16", "int64", "bool", "float8_e4m3fn"]
SHAPES = [(0,), (1,), (7,), (5, 3), (16, 4), (33,), (0, 3), (3, 0), (9, 2, 3), (), (48, 64)]
IDS = ["s", "s.1", "s.1.x", "x-1", "ck.100"]  # snapshot ids of their own: dotted ones prefix each other's folders
LAYOUTS_ = [None, gpupas.Layout(rotate=False), gpupas.Layout(groups=(1,), chunk_size=64),
            gpupas.Layout(segment=64, chunk_size=16)]
LOSSY = ["bf16", "fp16", "fixed:16", "quant:8"]
SPECIAL = {2: [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E01, 0xFE00, 0x0001, 0x83FF],
           4: [0x0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00001, 0xFFFFFFFF, 0x1, 0x807FFFFF],
           8: [0x0, 1 << 63, 0x7FF0 << 48, 0xFFF0 << 48, (0x7FF8 << 48) | 5, (1 << 64) - 1, 0x1, 0x800FFFFFFFFFFFFF]}


def values(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Random values of ``dtype``: checkpoint-like floats mixed with NaN payloads, -0.0, Inf and subnormals."""
    n = int(np.prod(shape, dtype=np.int64))
    layout = LAYOUTS[dtype]
    if dtype == "bool":
        return rng.integers(0, 2, n).astype(bool).reshape(shape)
    if layout.rotate and layout.width >= 2:
        a = (rng.standard_normal(n) * 0.02).astype(np.dtype(dtype))
        bits = a.view(layout.uint).copy()
        special = SPECIAL.get(layout.width if dtype != "bfloat16" else 4)
        k = rng.integers(0, n // 3 + 1) if n else 0
        if k:
            spec = np.array(special, dtype=np.uint64)
            if dtype == "bfloat16":
                spec = spec >> np.uint64(16)
            bits[rng.integers(0, n, k)] = spec[rng.integers(0, spec.size, k)].astype(layout.uint)
        return bits.view(np.dtype(dtype)).reshape(shape)
    return rng.integers(0, 256, n * layout.width, dtype=np.uint8).view(layout.uint).view(np.dtype(dtype)).reshape(shape)


def changed(rng: np.random.Generator, a: np.ndarray, how: str) -> np.ndarray:
    """``a`` with some of its values moved a little (bit patterns nudged by small integers, wrapping)."""
    if a.dtype == bool or a.size == 0:
        out = a.copy()
        if a.size:
            flat = out.reshape(-1)
            flat[rng.integers(0, a.size)] ^= True
        return out
    uint = LAYOUTS[a.dtype.name].uint
    bits = a.copy().view(uint)
    rows = bits.reshape(bits.shape[0] if bits.ndim else 1, -1)
    pick = rng.choice(rows.shape[0], size=max(1, rows.shape[0] // 8), replace=False) if how == "rows" \
        else np.arange(rows.shape[0])
    if how == "flip":  # low bits flipped: what XOR deltas are for
        rows[pick] ^= rng.integers(0, 16, rows[pick].shape).astype(uint)
    else:
        rows[pick] = rows[pick] + rng.integers(-3, 4, rows[pick].shape).astype(np.int64).astype(uint)
    return bits.view(a.dtype)


def from_torch(t: Any, like: np.ndarray) -> np.ndarray:
    """A torch tensor's bits as a NumPy array of ``like``'s dtype (torch has no NumPy view of bfloat16, float8)."""
    import torch

    assert tuple(t.shape) == like.shape
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().view(like.dtype).reshape(like.shape)


class ArchiveMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="gpupas-stateful-")
        self.path = os.path.join(self.tmp, "arc")
        self.archive = gpupas.create_archive(self.path, max_chain=MAX_CHAIN, workers=1)
        self.archive.add_tier("cold", os.path.join(self.tmp, "cold"))
        self.repo = Repository(self.archive, own_archive=False)
        self.snaps: dict[str, dict[str, Any]] = {}  # sid -> {"tensors", "base", "grand", "version"}
        self.versions: dict[int, dict[str, Any]] = {}  # vid -> {"name", "snapshots"}
        self.tags: dict[str, int] = {}
        self.live: dict[str, dict[str, np.ndarray]] = {}  # arrays given to commits, which the archive borrows

    def teardown(self) -> None:
        self.repo.close()
        self.archive.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------------------------------------
    def new_tensors(self, data: st.DataObject, base: dict[str, np.ndarray] | None,
                    grand: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Tensors of a new snapshot: ``base``'s, some changed (``grand``: the base's base, for changes that go on
        along the last one, as Adam's do), some new, some dropped."""
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
        out: dict[str, np.ndarray] = {}
        hows = ["same", "rows", "all", "flip", "trend", "fresh", "dtype", "shape", "drop"]
        for name, a in (base or {}).items():
            how = data.draw(st.sampled_from(hows), label=name)
            g = (grand or {}).get(name)
            if how == "trend" and g is not None and g.dtype == a.dtype and g.shape == a.shape and a.dtype.kind == "f":
                with np.errstate(all="ignore"):
                    x, y = a.astype(np.float64), g.astype(np.float64)
                    out[name] = (x + 0.9 * (x - y)).astype(a.dtype)
            elif how in ("rows", "all", "flip", "trend"):
                out[name] = changed(rng, a, "rows" if how == "rows" else how)
            elif how == "fresh":
                out[name] = values(rng, a.dtype.name, a.shape)
            elif how == "dtype":
                out[name] = values(rng, data.draw(st.sampled_from(DTYPES)), a.shape)
            elif how == "shape":
                out[name] = values(rng, a.dtype.name, data.draw(st.sampled_from(SHAPES)))
        for name in NAMES:
            if name not in out and data.draw(st.booleans(), label=f"add {name}"):
                if out and data.draw(st.integers(0, 4)) == 0:  # the bits of another tensor of this snapshot (tied)
                    out[name] = out[data.draw(st.sampled_from(sorted(out)))].copy()
                else:
                    out[name] = values(rng, data.draw(st.sampled_from(DTYPES)), data.draw(st.sampled_from(SHAPES)))
        return out

    def record(self, m: Any, tensors: dict[str, np.ndarray], lossy: bool, version: int | None = None,
               orphan: bool = False) -> None:
        self.live = {m.id: tensors, **{k: v for k, v in list(self.live.items())[-2:]}}
        if lossy:  # what the scheme kept: the first restore; exact for what it did not touch
            got = self.archive.restore(m.id)
            scheme = {e.name: e.scheme for e in m.tensors if e.scheme is not None}
            for name, a in tensors.items():
                g = got[name]
                assert g.dtype == a.dtype and g.shape == a.shape
                if name not in scheme:
                    assert g.tobytes() == a.tobytes(), name
                    continue
                x, y = a.astype(np.float64), g.astype(np.float64)
                if scheme[name]["name"] == "cast":  # rounded to nearest, even (NaN stays NaN)
                    want = a.astype(np.dtype(scheme[name]["to"])).astype(a.dtype).astype(np.float64)
                    assert np.array_equal(y, want, equal_nan=True), (name, scheme[name], a, g)
                ok = np.isfinite(x) & np.isfinite(y)
                err = scheme[name]["error"]  # what the scheme cost, as the manifest reports it
                assert float(np.abs(y[ok] - x[ok]).max(initial=0.0)) <= err["max_abs"], (name, scheme[name])
                assert int((np.isfinite(x) & ~ok).sum()) == err["overflow"], (name, scheme[name])
            tensors = {k: v.copy() for k, v in got.items()}
        for e in m.tensors:
            event(f"enc {e.enc}{' masked' if e.masked else ''}")
        if m.grand is not None:
            event("extrapolates from a grand-base")
        self.snaps[m.id] = {"tensors": {k: v.copy() for k, v in tensors.items()}, "base": m.base, "grand": m.grand,
                            "version": version, "orphan": orphan}

    def grand_tensors(self, sid: str) -> dict[str, np.ndarray] | None:
        b = self.snaps[sid]["base"]
        return None if b is None else self.snaps[b]["tensors"]

    def users(self, sid: str) -> list[str]:
        return sorted(o for o, s in self.snaps.items() if sid in (s["base"], s["grand"]))

    def depth(self, sid: str) -> int:
        d = 0
        while self.snaps[sid]["base"] is not None:
            sid, d = self.snaps[sid]["base"], d + 1
        return d

    def chain(self, sid: str) -> list[str]:
        out = [sid]
        while self.snaps[out[-1]]["base"] is not None:
            out.append(self.snaps[out[-1]]["base"])
        return out

    def height(self, sid: str) -> int:
        kids = [o for o, s in self.snaps.items() if s["base"] == sid]
        return 1 + max(self.height(k) for k in kids) if kids else 0

    def pick(self, data: st.DataObject, pool: list[str] | None = None) -> str:
        """A snapshot in the order they were made (ids are random: sorting them would draw differently on replay)."""
        return data.draw(st.sampled_from(list(self.snaps) if pool is None else pool), label="snapshot")

    def snapshot_id(self, data: st.DataObject) -> str | None:
        free = [s for s in IDS if s not in self.snaps]
        if free and data.draw(st.integers(0, 3), label="own id?") == 0:
            return data.draw(st.sampled_from(free), label="id")
        return None

    # -- archive rules -------------------------------------------------------------------------------------------
    @rule(data=st.data())
    def commit_whole(self, data: st.DataObject) -> None:
        tensors = self.new_tensors(data, None)
        layout = data.draw(st.sampled_from(LAYOUTS_), label="layout")
        if self.snaps and data.draw(st.integers(0, 5), label="taken id?") == 0:  # refused, nothing changed
            with pytest.raises(ArchiveExistsError, match="already exists"):
                self.archive.commit(tensors, snapshot=self.pick(data), layout=layout)
            return
        m = self.archive.commit(tensors, snapshot=self.snapshot_id(data), layout=layout)
        assert m.base is None
        self.record(m, tensors, False)

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def commit_delta(self, data: st.DataObject) -> None:
        base = self.pick(data)
        tensors = self.new_tensors(data, self.snaps[base]["tensors"], self.grand_tensors(base))
        setting = data.draw(st.sampled_from(["fast", "default", "strong"]), label="setting")
        layout = data.draw(st.sampled_from(LAYOUTS_), label="layout")
        m = self.archive.commit(tensors, base=base, snapshot=self.snapshot_id(data), setting=setting, layout=layout)
        want = base if self.depth(base) + 1 <= MAX_CHAIN else None  # too long a chain: a new one starts
        assert m.base == want, (m.base, want)
        assert m.grand in (None, self.snaps[base]["base"])
        self.record(m, tensors, False)

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def commit_for_a_version_never_published(self, data: st.DataObject) -> None:
        """What a commit killed before its version record leaves: a snapshot that names a version (repo gc's)."""
        base = self.pick(data) if data.draw(st.booleans(), label="on a base?") else None
        tensors = self.new_tensors(data, None if base is None else self.snaps[base]["tensors"])
        m = self.archive.commit(tensors, base=base, meta={"version_name": "killed", "step": 1})
        self.record(m, tensors, False, orphan=True)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def train_in_place(self, data: st.DataObject) -> None:
        """The caller changes arrays it committed (a training step): the archive must not take them for the
        snapshot's bits (a delta on it, a restore)."""
        sid = data.draw(st.sampled_from(list(self.live)), label="live")
        for a in self.live[sid].values():
            if a.size and a.flags.writeable:
                a.reshape(-1).view(np.uint8)[: 1 + a.nbytes // 2] ^= 0x5A

    @rule(data=st.data())
    def commit_training_step(self, data: st.DataObject) -> None:
        """A checkpoint of a training run: a delta on the run's last one, each float tensor moving on along its
        last change (where the base is a delta: what 'pred' extrapolates), else by noise, some rows left alone."""
        base = self.pick(data) if self.snaps and data.draw(st.integers(0, 3), label="new run?") else None
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
        if base is None:
            tensors = {"w": (rng.standard_normal((48, 64)) * 0.02).astype(np.float32),
                       "v": (rng.standard_normal((40, 64)) * 0.02).astype(np.float16)}
        else:
            tensors, grand = {}, self.grand_tensors(base) or {}
            for n, a in self.snaps[base]["tensors"].items():
                g = grand.get(n)
                if a.dtype.name not in ("float32", "float16", "float64") or a.ndim != 2:
                    tensors[n] = a.copy()
                    continue
                x = a.astype(np.float64)
                with np.errstate(all="ignore"):
                    if g is not None and g.shape == a.shape and g.dtype == a.dtype:  # Adam's momentum
                        step = 0.9 * (x - g.astype(np.float64))
                    else:
                        step = rng.standard_normal(a.shape) * 1e-3 * (np.abs(x).mean() if x.size else 0.0)
                        step[rng.random(a.shape[0]) < 0.25] = 0.0  # rows the batch did not touch
                    tensors[n] = (x + step).astype(a.dtype)
        m = self.archive.commit(tensors, base=base)
        self.record(m, tensors, False)

    @rule(data=st.data())
    def commit_lossy(self, data: st.DataObject) -> None:
        base = self.pick(data) if self.snaps and data.draw(st.booleans(), label="on a base?") else None
        tensors = self.new_tensors(data, None if base is None else self.snaps[base]["tensors"])
        scheme = data.draw(st.sampled_from(LOSSY), label="scheme")
        before = sorted(self.archive.snapshots())
        try:
            m = self.archive.commit(tensors, base=base, lossy=scheme)
        except InvalidInputError:  # a scheme that cannot hold some values: refused, nothing stored
            assert sorted(self.archive.snapshots()) == before
            return
        self.record(m, tensors, True)

    @precondition(lambda self: self.snaps)
    @rule(data=st.data(), torch_=st.booleans(), scribble=st.booleans())
    def restore_some(self, data: st.DataObject, torch_: bool, scribble: bool) -> None:
        """A restore of some tensors (NumPy or torch); then the caller changes what it got, in place."""
        sid = self.pick(data)
        want = self.snaps[sid]["tensors"]
        names = data.draw(st.lists(st.sampled_from(sorted(want)), unique=True), label="names") if want else []
        got = self.archive.restore(sid, names=names, framework="torch" if torch_ else "numpy")
        assert sorted(got) == sorted(names)
        for n in names:
            g = got[n]
            if torch_:
                assert str(g.dtype) == f"torch.{want[n].dtype.name}", n
                g = from_torch(g, want[n])
            self.same(g, want[n], f"{sid}:{n}")
            if scribble and g.size and g.flags.writeable:
                g.reshape(-1).view(np.uint8)[:] ^= 0xFF

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        plain = [s for s, v in self.snaps.items() if v["version"] is None]  # a version's are the repository's
        if not plain:
            return
        sid = self.pick(data, plain)
        users = self.users(sid)
        if users:
            with pytest.raises(InvalidInputError, match="is read by"):
                self.archive.discard(sid)
            return
        self.archive.discard(sid)
        del self.snaps[sid]
        self.live.pop(sid, None)

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def discard_by_force(self, data: st.DataObject) -> None:
        """A forced discard: the snapshots that read its bits can no longer be restored (and say so); then they
        are discarded too, those built on others first."""
        def below(sid: str) -> list[str]:  # sid and everything that reads its bits, at any remove
            out = [sid]
            for u in self.users(sid):
                out += [x for x in below(u) if x not in out]
            return out

        plain = [s for s in self.snaps if all(self.snaps[x]["version"] is None for x in below(s))]
        if not plain:
            return
        sid = self.pick(data, plain)
        gone = below(sid)
        self.archive.discard(sid, force=True)
        del self.snaps[sid]
        with gpupas.open_archive(self.path, workers=1) as fresh:  # (this session may still hold their bits)
            bad = {s for s, r in fresh.verify_all() if isinstance(r, Exception)}
            for u in gone[1:]:
                m = fresh.manifest(u)
                reads = any(e.reads_base for e in m.tensors) if m.base == sid else \
                    any(e.enc == "pred" for e in m.tensors) if m.grand == sid else False
                try:  # a snapshot none of whose tensors read the bits that are gone still restores
                    got = fresh.restore(u)
                except gpupas.IntegrityError as exc:
                    assert "missing" in str(exc) or "cannot be restored" in str(exc), exc
                    assert u in bad
                    continue
                assert not reads and u not in bad, u
                for n, a in self.snaps[u]["tensors"].items():
                    self.same(got[n], a, f"{u}:{n}")
        while left := [u for u in gone[1:] if u in self.snaps]:
            u = next(u for u in left if not self.users(u))  # one nothing reads any more
            self.archive.discard(u)
            del self.snaps[u]
        for x in gone:
            self.live.pop(x, None)

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def revise(self, data: st.DataObject) -> None:
        sid = self.pick(data)
        choice = data.draw(st.sampled_from(["keep", "whole", "other"]), label="base")
        setting = data.draw(st.sampled_from(["fast", "default", "strong"]), label="setting")
        layout = data.draw(st.sampled_from(LAYOUTS_), label="layout")
        old = self.snaps[sid]
        kw: dict[str, Any] = {}
        new_base = old["base"]
        if choice == "whole":
            kw["base"] = new_base = None
        elif choice == "other":
            kw["base"] = new_base = self.pick(data)
        refuse = None
        if new_base is not None and sid in self.chain(new_base):
            refuse = "cannot be its base"
        elif new_base is not None and self.depth(new_base) + 1 > MAX_CHAIN:
            refuse = "links"
        elif new_base != old["base"] and new_base is not None:
            h = self.height(sid)
            deep = self.depth(new_base) + 1 + h
            if h and deep > MAX_CHAIN and deep > self.depth(sid) + h:
                refuse = "links deep"
        if refuse:
            with pytest.raises(InvalidInputError, match=refuse):
                self.archive.revise(sid, setting=setting, layout=layout, **kw)
            return
        m = self.archive.revise(sid, setting=setting, layout=layout, **kw)
        assert m.base == new_base
        old["base"], old["grand"] = m.base, m.grand

    @precondition(lambda self: self.snaps)
    @rule(data=st.data(), planes_from=st.sampled_from([1, 2, 3, None]))
    def tier(self, data: st.DataObject, planes_from: int | None) -> None:
        sid = self.pick(data)
        to = None if planes_from is None else "cold"
        # planes as stored (a float32 tensor kept as bf16 has 2)
        width = max((e.width for e in self.archive.manifest(sid).tensors), default=0)
        if planes_from is not None and planes_from >= max(width, 1):  # not a plane of this snapshot
            with pytest.raises(InvalidInputError, match="planes_from must be a plane"):
                self.archive.tier(sid, planes_from=planes_from, to=to)
            return
        m = self.archive.tier(sid, planes_from=planes_from, to=to)
        assert m.base == self.snaps[sid]["base"]
        self.snaps[sid]["grand"] = m.grand

    @precondition(lambda self: self.snaps)
    @rule(data=st.data(), planes=st.sampled_from([1, 2, 3, 8]))
    def read_planes(self, data: st.DataObject, planes: int) -> None:
        """A read of the top planes bounds every value (where no NaN was possible); all planes give them back."""
        sid = self.pick(data)
        want = self.snaps[sid]["tensors"]
        r = self.archive.read_planes(sid, planes=planes)
        assert sorted(r.approx) == sorted(want)
        for n, a in want.items():
            if r.exact[n]:
                self.same(r.approx[n], a, f"{sid}:{n} (all planes)")
            assert planes < LAYOUTS[a.dtype.name].width or r.exact[n], (sid, n)
            if a.dtype == bool or not a.size:
                continue
            v, lo, hi = (x if a.dtype.kind in "iu" else x.astype(np.float64) for x in (a, r.lo[n], r.hi[n]))
            ok = r.unbounded[n] | (v != v) | ((lo <= v) & (v <= hi))
            assert ok.all(), (sid, n, planes, a[~ok][:3], r.lo[n][~ok][:3], r.hi[n][~ok][:3])

    @rule()
    def gc(self) -> None:
        removed = self.archive.gc(min_age=0)
        named = {f for s in self.snaps for f in self.archive.manifest(s).folders()}
        assert not {r.split(":")[-1] for r in removed} & named, removed

    @rule(cache=st.sampled_from([{}, {"cache_size": 0}, {"cache_size": 1}, {"cache_bytes": 64}]))
    def reopen(self, cache: dict[str, int]) -> None:
        self.repo.close()
        self.archive.close()
        self.archive = gpupas.open_archive(self.path, max_chain=MAX_CHAIN, workers=1, **cache)
        self.repo = Repository(self.archive, own_archive=False)

    # -- repository rules ----------------------------------------------------------------------------------------
    @rule(data=st.data(), name=st.sampled_from(["net", "run"]))
    def repo_commit(self, data: st.DataObject, name: str) -> None:
        parent = data.draw(st.sampled_from([None, *sorted(self.versions)]), label="parent")
        base = None if parent is None else self.versions[parent]["snapshots"][-1]
        tensors = self.new_tensors(data, None if base is None else self.snaps[base]["tensors"])
        v = self.repo.commit(name, tensors, parents=[] if parent is None else [parent])
        sid = v.latest
        self.versions[v.id] = {"name": name, "snapshots": [sid]}
        self.record(self.archive.manifest(sid), tensors, False, v.id)

    @precondition(lambda self: self.versions)
    @rule(data=st.data())
    def repo_add_snapshot(self, data: st.DataObject) -> None:
        vid = data.draw(st.sampled_from(sorted(self.versions)), label="version")
        latest = self.versions[vid]["snapshots"][-1]
        tensors = self.new_tensors(data, self.snaps[latest]["tensors"], self.grand_tensors(latest))
        v = self.repo.add_snapshot(vid, tensors)
        assert v.latest not in self.snaps
        self.versions[vid]["snapshots"].append(v.latest)
        self.record(self.archive.manifest(v.latest), tensors, False, vid)

    @precondition(lambda self: self.versions)
    @rule(data=st.data())
    def repo_export(self, data: st.DataObject) -> None:
        from safetensors.torch import load_file

        vid = data.draw(st.sampled_from(sorted(self.versions)), label="version")
        sid = self.versions[vid]["snapshots"][-1]
        out = self.repo.export(vid, os.path.join(self.tmp, "out.safetensors"), force=True)
        got = load_file(out)
        want = self.snaps[sid]["tensors"]
        assert sorted(got) == sorted(want)
        for n, a in want.items():
            assert str(got[n].dtype) == f"torch.{a.dtype.name}", n
            self.same(from_torch(got[n], a), a, f"export {vid}:{n}")

    @precondition(lambda self: self.versions)
    @rule(data=st.data(), tag=st.sampled_from(["best", "prod"]), force=st.booleans())
    def repo_tag(self, data: st.DataObject, tag: str, force: bool) -> None:
        vid = data.draw(st.sampled_from(sorted(self.versions)), label="version")
        if tag in self.tags and self.tags[tag] != vid and not force:
            with pytest.raises(ArchiveExistsError):
                self.repo.tag(tag, vid)
            return
        assert self.repo.tag(tag, vid, force=force) == vid
        self.tags[tag] = vid

    @rule(tag=st.sampled_from(["best", "prod"]))
    def repo_untag(self, tag: str) -> None:
        if tag not in self.tags:
            with pytest.raises(VersionNotFoundError):
                self.repo.untag(tag)
            return
        assert self.repo.untag(tag) == self.tags.pop(tag)

    @rule()
    def repo_gc(self) -> None:
        """Removes the snapshots of versions never published, except those something kept is built on."""
        keep = [s for s, v in self.snaps.items() if not v["orphan"]]
        reach: set[str] = set()
        while keep:
            sid = keep.pop()
            if sid not in reach:
                reach.add(sid)
                keep += [b for b in (self.snaps[sid]["base"], self.snaps[sid]["grand"]) if b is not None]
        removed = self.repo.gc(min_age=0)
        assert sorted(r["name"] for r in removed if r["kind"] == "snapshot") == sorted(set(self.snaps) - reach)
        for sid in set(self.snaps) - reach:
            del self.snaps[sid]
            self.live.pop(sid, None)

    # -- invariants ----------------------------------------------------------------------------------------------
    @staticmethod
    def same(got: np.ndarray, want: np.ndarray, what: str) -> None:
        assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, got.shape, want.dtype,
                                                                     want.shape)
        assert got.tobytes() == want.tobytes(), what

    def check(self, archive: gpupas.Archive) -> None:
        assert archive.snapshots() == list(self.snaps)  # oldest first
        for sid, s in self.snaps.items():
            m = archive.manifest(sid)
            assert (m.base, m.grand) == (s["base"], s["grand"]), sid
            assert archive.depth(sid) == self.depth(sid) <= MAX_CHAIN
            got = archive.restore(sid)
            assert sorted(got) == sorted(s["tensors"]), sid
            for n, a in s["tensors"].items():
                self.same(got[n], a, f"{sid}:{n}")

    @invariant()
    def restores_exactly(self) -> None:
        self.check(self.archive)

    @invariant()
    def restores_exactly_in_a_fresh_session(self) -> None:
        with gpupas.open_archive(self.path, workers=1) as fresh:
            self.check(fresh)
            bad = [(s, r) for s, r in fresh.verify_all() if isinstance(r, Exception)]
            assert not bad, bad

    @invariant()
    def versions_and_tags(self) -> None:
        assert self.repo.tags() == self.tags
        for vid, v in self.versions.items():
            got = self.repo.version(vid)
            assert got.name == v["name"] and [s["id"] for s in got.snapshots] == v["snapshots"]

    @invariant()
    def repository_verifies(self) -> None:
        if self.versions:
            report = self.repo.verify()
            assert report["ok"] and not report["problems"], report


TestArchiveMachine = ArchiveMachine.TestCase
TestArchiveMachine.settings = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
                                       phases=[p for p in Phase if p is not Phase.explain],
                                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
