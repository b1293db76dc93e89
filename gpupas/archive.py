"""The archive API: commit named tensors as snapshots, restore them bit-exactly, report sizes.

>>> import numpy as np, gpupas, tempfile
>>> a = gpupas.create_archive(tempfile.mkdtemp() + "/arc")
>>> s1 = a.commit({"w": np.arange(6, dtype=np.float32)})
>>> s2 = a.commit({"w": np.arange(6, dtype=np.float32) + 1}, base=s1["id"])
>>> a.restore(s2["id"])["w"].tolist()
[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
"""

from __future__ import annotations

import bisect
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from gpupas.errors import ArchiveExistsError, IntegrityError, SnapshotNotFoundError
from gpupas.pas.codecs import CHUNK_SIZE, decode_chunk, encode_chunk
from gpupas.pas.codecs import crc32 as _crc32
from gpupas.pas.context import entropy, sample_index
from gpupas.pas.planes import Layout, from_bits, layout_of, to_bits
from gpupas.pas.predict import alpha_from_planes, alpha_planes, fit, predict, supports
from gpupas.pas.rows import changed_rows, gather, mask_bytes, mask_from_bytes, rows_of
from gpupas.pas.settings import Setting, get_setting
from gpupas.pas.shards import ShardReader, ShardWriter, shard_chunks
from gpupas.pas.store import FORMAT, ArchiveStore, check_name, new_id
from gpupas.pas.transform import (
    MIN_ESTIMATE_VALUES,
    SEGMENT,
    Plan,
    choose_plan,
    decode_segment,
    encode_segment,
    segments,
)
from gpupas.pas.workspace import workspace
from gpupas.tensors import as_tensor_dict

Manifest = dict[str, Any]
_KIND_CODE = {"zstd": "z", "deflate": "d"}
_ENCODINGS = {"mat", "sub", "xor", "pred"}
SMALL = 1 << 20  # snapshots (or reads) up to this many bytes run on the calling thread
_CODE_KIND = {v: k for k, v in _KIND_CODE.items()}


def create_archive(location: str | os.PathLike[str], **kw: Any) -> Archive:
    """Create an archive at ``location`` (an empty or missing directory, or an fsspec URL)."""
    return Archive(ArchiveStore.open(location, create=True, **kw))


def open_archive(location: str | os.PathLike[str], **kw: Any) -> Archive:
    """Open the existing archive at ``location``; ArchiveNotFoundError says how to create one."""
    return Archive(ArchiveStore.open(location, **kw))


def _run_all(pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Iterable[Any],
             inline: bool = False) -> list[Any]:
    """``fn`` over ``items`` in ``pool`` (or here, ``inline``: for small snapshots the hand-offs
    cost more than the work); waits for every task before raising the first error.

    (``Executor.map`` raises at once while running tasks still write into shared buffers.)
    """
    if inline:
        return [fn(x) for x in items]
    futures = [pool.submit(fn, x) for x in items]
    wait(futures)
    return [f.result() for f in futures]


def _crc(bits: np.ndarray) -> int:
    """CRC-32 of a tensor's bytes (ISA-L: ~25 GB/s here), no copy."""
    return _crc32(memoryview(bits).cast("B"))


@dataclass
class _Staged:
    """One tensor on its way into a snapshot: its bits, and what gets coded (the changed rows only,
    where a row mask pays; against the base, or a prediction from it and its own base)."""

    name: str
    arr: Any
    layout: Layout
    bits: np.ndarray  # all its raw patterns
    crc: int
    u: Any  # the patterns that get coded
    ub: Any | None  # what they are coded against
    shape: tuple[int, ...]  # the shape of ``u``
    plan: Plan = field(default_factory=lambda: Plan("mat", False))
    changed: np.ndarray | None = None  # bool per row, where a row mask is stored
    alpha: np.ndarray | None = None  # prediction factors, for 'pred'
    ub2: Any | None = None  # the base's base (rows as ``u``), for 'pred': predicted segment by segment

    def extra(self) -> np.ndarray:
        """What is stored after the planes: the row mask, then the prediction factors."""
        parts = [] if self.changed is None else [mask_bytes(self.changed)]
        if self.alpha is not None:
            parts.append(alpha_planes(self.alpha))
        return np.concatenate(parts) if parts else np.empty(0, np.uint8)


class Archive:
    """Snapshots of named tensors in one store. Thread pool sized to the machine's cores."""

    def __init__(self, store: ArchiveStore, workers: int | None = None, cache_size: int = 2, max_chain: int = 16):
        self.store = store
        self.max_chain = max_chain  # a snapshot whose delta chain would grow longer is stored whole
        self.workers = workers or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="gpupas")
        self._cache: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._borrowed: set[str] = set()  # cached snapshots whose arrays are the committer's own
        self._manifests: OrderedDict[str, Manifest] = OrderedDict()
        self._cache_size = cache_size

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker threads and drop cached snapshots."""
        self._pool.shutdown()
        self._cache.clear()
        self._borrowed.clear()

    @property
    def location(self) -> str:
        return self.store.location

    def discard(self, snapshot: str) -> None:
        """Delete ``snapshot`` for good (a snapshot nothing references, e.g. of a failed version).

        Snapshots committed as deltas against it, or against a delta on it ('pred' tensors read
        the base's base), can no longer be restored: the caller must know that none exist.
        """
        self._cache.pop(snapshot, None)
        self._borrowed.discard(snapshot)
        self._manifests.pop(snapshot, None)
        self.store.discard(snapshot)

    def gc(self, min_age: float = 3600.0) -> list[str]:
        """Delete the chunk folders of commits that never published (killed or failed), once they
        are ``min_age`` seconds old; returns their names."""
        return self.store.remove_orphans(min_age)

    # -- listing ---------------------------------------------------------------------------
    def manifest(self, snapshot: str) -> Manifest:
        """The manifest of ``snapshot`` (tensors, encodings, sizes); do not modify it."""
        m = self._manifests.get(snapshot)
        if m is None:  # published manifests never change: read each once
            m = self._manifests[snapshot] = self.store.read_manifest(snapshot)
            while len(self._manifests) > 1024:
                self._manifests.popitem(last=False)
        return m

    def snapshots(self) -> list[str]:
        """Committed snapshot ids, oldest first."""
        ids = self.store.list_snapshots()
        return sorted(ids, key=lambda s: (self.manifest(s)["created"], s))

    # -- commit ----------------------------------------------------------------------------
    def commit(self, tensors: Any, *, base: str | None = None, snapshot: str | None = None,
               setting: str | Setting = "default", meta: Mapping[str, Any] | None = None) -> Manifest:
        """Store ``tensors`` as a new snapshot, as deltas against snapshot ``base`` where that pays.

        ``tensors`` is a mapping of names to NumPy/CuPy arrays or torch tensors, or the path of a
        safetensors/torch checkpoint. Tensors missing from ``base`` or of another shape or dtype
        are stored whole. The snapshot becomes visible only once all of it is written.
        Returns the manifest.
        """
        t0 = time.perf_counter()
        arrays = as_tensor_dict(tensors)
        cfg = get_setting(setting)
        sid = check_name(snapshot) if snapshot is not None else new_id()
        if self.store.has_manifest(sid):
            raise ArchiveExistsError(f"snapshot {sid!r} already exists in {self.location}; choose another id")
        base_bits: dict[str, np.ndarray] = {}
        grand_bits: dict[str, np.ndarray] = {}
        base_entries: dict[str, dict[str, Any]] = {}
        depth = 0
        if base is not None:
            base_m = self.manifest(base)
            depth = base_m.get("depth", 0) + 1
            if depth > self.max_chain:  # keep restores bounded: start a new chain
                base, depth = None, 0
            else:
                base_entries = {e["name"]: e for e in base_m["tensors"]}
                memo: dict[str, dict[str, np.ndarray]] = {}
                base_bits = self._bits(base, memo=memo)
                grand_bits = self._grand_bits(base_m, arrays, cfg, memo)

        def prepare(item: tuple[str, np.ndarray]) -> _Staged:
            name, arr = item
            layout = layout_of(arr.dtype)
            u = to_bits(arr, layout)
            b = base_entries.get(name)
            same = b is not None and b["dtype"] == layout.name and tuple(b["shape"]) == arr.shape
            st = _Staged(name, arr, layout, u, _crc(u), u, base_bits[name] if same else None, arr.shape)
            if st.ub is not None and cfg.row_mask:
                st.changed = changed_rows(u, st.ub, arr.shape)
                if st.changed is not None:  # code the changed rows only
                    per = rows_of(arr.shape)[1]
                    st.u, st.ub = gather(u, st.changed, per), gather(st.ub, st.changed, per)
                    st.shape = (int(st.changed.sum()), per)
            st.plan = choose_plan(st.u, st.ub, layout, cfg)
            ub2 = grand_bits.get(name) if same else None
            if ub2 is not None and ub2.size == u.size and supports(layout) and st.u.size >= MIN_ESTIMATE_VALUES:
                if st.changed is not None:
                    ub2 = gather(ub2, st.changed, st.shape[1])
                alpha = fit(st.u, st.ub, ub2, layout, st.shape)
                if alpha is not None:  # keep the prediction only where it beats the plain delta (on a sample)
                    idx = sample_index(st.u.size)
                    pos = idx if isinstance(idx, np.ndarray) else np.arange(st.u.size)  # a slice: few values
                    rows = pos // rows_of(st.shape)[1]
                    pred = predict(st.ub[idx], ub2[idx], alpha[rows], layout, 1)  # one value per "row"
                    alt = choose_plan(st.u[idx], pred, layout, cfg, encs=("sub",))
                    if alt.estimate * st.u.size + 16 * alpha.size < st.plan.estimate * st.u.size:
                        st.plan, st.alpha, st.ub2 = Plan("pred", alt.ctx, alt.estimate), alpha, ub2
            return st

        small = sum(int(a.nbytes) for a in arrays.values()) <= SMALL
        prepared = _run_all(self._pool, prepare, arrays.items(), small)
        if any(st.plan.enc == "pred" or st.changed is not None for st in prepared):
            self.store.upgrade_format()  # older readers must refuse this archive, not misread it
        data = f"{sid}.{new_id()[:8]}"  # a folder of its own: concurrent commits never share one
        extras = [st.extra() for st in prepared]
        offsets = np.cumsum([0] + [st.u.size * st.layout.width + x.size for st, x in zip(prepared, extras)]).tolist()
        length = offsets[-1]
        with workspace(length) as buf:
            coded = self._encode(data, prepared, extras, offsets, buf, cfg, small)
            tensors_meta = []
            for i, st in enumerate(prepared):
                tensors_meta.append({
                    "name": st.name, "dtype": st.layout.name, "shape": list(st.arr.shape), "offset": offsets[i],
                    "enc": st.plan.enc, "ctx": st.plan.ctx, "crc32": st.crc, "nbytes": int(st.arr.nbytes),
                } | ({} if st.changed is None else {"kept": st.shape[0]}))
            _attribute(tensors_meta, buf, [size for _, size in coded])
        self.store.sync_dirs(data)
        manifest: Manifest = {
            "format": FORMAT, "id": sid, "created": datetime.now(UTC).isoformat(),
            "base": base, "depth": depth, "data": data, "setting": cfg.name, "chunk_size": CHUNK_SIZE,
            "segment": SEGMENT,
            "length": length, "chunks": "".join(_KIND_CODE[k] for k, _ in coded),
            "raw_bytes": sum(int(a.nbytes) for a in arrays.values()),
            "stored_bytes": sum(size for _, size in coded),
            "commit_seconds": round(time.perf_counter() - t0, 6),
            "tensors": tensors_meta, "meta": dict(meta or {}),
        }
        self.store.write_manifest(sid, manifest)
        self._remember(sid, {st.name: st.bits for st in prepared}, borrowed=True)  # checked by CRC before use
        return manifest

    def _encode(self, data: str, prepared: list[_Staged], extras: list[np.ndarray], offsets: list[int],
                buf: np.ndarray, cfg: Setting, small: bool = False) -> list[tuple[str, int]]:
        """Planes of every segment into ``buf``, then each chunk coded and written; (kind, size) per chunk."""
        length = buf.size
        units = [(i, a, b) for i, st in enumerate(prepared) for a, b in segments(st.u.size)]
        starts = []  # a tensor's row mask and prediction factors follow its planes
        for i, (st, extra) in enumerate(zip(prepared, extras)):
            if extra.size:
                lo = offsets[i] + st.u.size * st.layout.width
                buf[lo : lo + extra.size] = extra
                starts.append(lo)

        def encode(unit: tuple[int, int, int]) -> list[int]:
            i, a, b = unit
            st = prepared[i]
            lo = offsets[i] + a * st.layout.width
            region = buf[lo : lo + (b - a) * st.layout.width].reshape(st.layout.width, b - a)
            ub = None if st.ub is None else st.ub[a:b]
            if st.alpha is not None:
                ub = predict(ub, st.ub2[a:b], st.alpha, st.layout, rows_of(st.shape)[1], a)
            inner = encode_segment(st.u[a:b], ub, st.layout, st.plan, region, cfg.min_group)
            return [lo, *(lo + x for x in inner)]

        bounds = sorted({*starts, *(x for xs in _run_all(self._pool, encode, units, small) for x in xs)})
        nchunks = -(-length // CHUNK_SIZE)
        self.store.create_arrays(data, length, shard_chunks(nchunks))
        shards = ShardWriter(self.store, data, nchunks)

        def code(c: int) -> tuple[str, int]:
            lo, hi = c * CHUNK_SIZE, min(length, (c + 1) * CHUNK_SIZE)
            inner = [b - lo for b in bounds[bisect.bisect_right(bounds, lo) : bisect.bisect_left(bounds, hi)]]
            kind, payload = encode_chunk(buf[lo:hi], inner, CHUNK_SIZE, cfg)
            shards.add(kind, c, payload)
            return kind, len(payload)

        try:
            coded = _run_all(self._pool, code, range(nchunks), small)
            shards.close()
        except BaseException:
            shards.abort()
            raise
        return coded

    # -- restore ---------------------------------------------------------------------------
    def restore(self, snapshot: str, names: Iterable[str] | None = None, *,
                framework: str = "numpy") -> dict[str, Any]:
        """The tensors of ``snapshot`` (all, or ``names``), bit-exact, as NumPy or torch.

        The arrays of one restore are views of one allocation (huge pages, so fewer page faults);
        copy a tensor that should outlive the others without keeping them in memory.
        """
        held = self._cache.get(snapshot, {})  # arrays someone else may already hold
        bits = self._bits(snapshot, names)
        entries = {e["name"]: e for e in self.manifest(snapshot)["tensors"]}
        out = {}
        for name, r in bits.items():
            e = entries[name]
            values = from_bits(r, layout_of(e["dtype"]), tuple(e["shape"]))
            out[name] = values.copy() if held.get(name) is r else values  # never hand out shared arrays
        if snapshot in self._cache:
            self._borrowed.add(snapshot)  # the caller now holds the cached arrays
        if framework == "torch":
            from gpupas.integrations.torch import numpy_to_state_dict

            return numpy_to_state_dict(out)
        if framework != "numpy":
            raise ValueError(f"framework must be 'numpy' or 'torch', not {framework!r}")
        return out

    def verify(self, snapshot: str) -> int:
        """Re-read every chunk and tensor of ``snapshot``; raises IntegrityError. Returns tensor count."""
        self._cache.pop(snapshot, None)
        n = len(self._bits(snapshot, use_cache=False))
        return n

    def _grand_bits(self, base_m: Manifest, arrays: Mapping[str, Any], cfg: Setting,
                    memo: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Bits of the base's own base for the tensors the base stores as deltas (what a 'pred'
        encoding extrapolates from); empty where there is none or the setting does not predict."""
        names = [e["name"] for e in base_m["tensors"] if _reads_base(e) and e["name"] in arrays]
        if not (cfg.predict and names and base_m["base"] is not None):
            return {}
        try:
            return self._bits(base_m["base"], names, memo=memo)
        except (SnapshotNotFoundError, IntegrityError, KeyError):
            return {}  # the base cannot be restored either; store plain deltas, which need only it

    def _remember(self, sid: str, bits: dict[str, np.ndarray], borrowed: bool = False) -> None:
        self._cache[sid] = bits
        self._cache.move_to_end(sid)
        (self._borrowed.add if borrowed else self._borrowed.discard)(sid)
        while len(self._cache) > self._cache_size:
            self._borrowed.discard(self._cache.popitem(last=False)[0])

    def _bits(self, sid: str, names: Iterable[str] | None = None, use_cache: bool = True,
              memo: dict[str, dict[str, np.ndarray]] | None = None) -> dict[str, np.ndarray]:
        """Raw bit patterns (flat) of the tensors of ``sid``, checked against their CRC-32.

        ``memo`` keeps, during one restore, the two snapshots below the one being decoded, so a
        chain of 'pred' deltas (which read a base and its base) decodes each link once.
        """
        memo = {} if memo is None else memo
        m = self.manifest(sid)
        if m.get("segment", SEGMENT) != SEGMENT:
            raise IntegrityError(f"snapshot {sid} uses segments of {m['segment']} values; this gpupas reads "
                                 f"{SEGMENT}: upgrade gpupas")
        entries = m["tensors"]
        if names is not None:
            by_name = {e["name"]: e for e in entries}
            wanted = list(names)
            missing = [n for n in wanted if n not in by_name]
            if missing:
                raise KeyError(f"snapshot {sid} has no tensor(s) {missing}")
            entries = [by_name[n] for n in wanted]
        if sid in memo and all(e["name"] in memo[sid] for e in entries):
            return {e["name"]: memo[sid][e["name"]] for e in entries}
        if use_cache and sid in self._cache:
            cached = self._cache[sid]
            # the cache holds the caller's own arrays: use them only while their bits are unchanged
            if all(_crc(cached[e["name"]]) == e["crc32"] for e in entries):
                return {e["name"]: cached[e["name"]] for e in entries}
            del self._cache[sid]
            self._borrowed.discard(sid)
        unknown = {e["enc"] for e in entries} - _ENCODINGS
        if unknown:
            raise IntegrityError(f"snapshot {sid} uses encoding(s) {sorted(unknown)} that this gpupas does not "
                                 "know: upgrade gpupas")
        deltas = [e["name"] for e in entries if _reads_base(e)]
        preds = [e["name"] for e in entries if e["enc"] == "pred"]
        try:
            grand = self.manifest(m["base"])["base"] if preds else None
            base_bits = self._bits(m["base"], deltas, use_cache, memo) if deltas else {}
            grand_bits = self._bits(grand, preds, use_cache, memo) if preds else {}
        except (SnapshotNotFoundError, KeyError) as exc:
            raise IntegrityError(
                f"snapshot {sid}: its delta base {m['base']} (or that one's base) is missing or incomplete "
                f"({exc})") from None
        kinds = m["chunks"]
        spans = dict(zip((e["name"] for e in m["tensors"]), _spans(m)))
        needed = sorted({c for e in entries for lo, hi in [spans[e["name"]]] if hi > lo
                         for c in range(lo // CHUNK_SIZE, -(-hi // CHUNK_SIZE))})
        with workspace(len(kinds) * CHUNK_SIZE) as buf:
            out = self._decode(sid, m, entries, spans, needed, buf, base_bits, grand_bits)
        for e in entries:
            if _crc(out[e["name"]]) != e["crc32"]:
                raise IntegrityError(
                    f"snapshot {sid}: tensor {e['name']!r} does not match its checksum after decoding"
                    + (f" (is its base {m['base']} intact? run verify on it)" if e["enc"] != "mat" else "")
                )
        memo.clear()  # what the caller can still need: this snapshot and its base
        memo[sid] = out
        if m["base"] is not None:
            memo[m["base"]] = base_bits
        if names is None:
            if m["base"] is not None and len(base_bits) == len(self.manifest(m["base"])["tensors"]):
                self._remember(m["base"], base_bits)  # the next snapshot's 'pred' tensors read it
            self._remember(sid, out)
        return out

    def _decode(self, sid: str, m: Manifest, entries: list[dict[str, Any]], spans: dict[str, tuple[int, int]],
                needed: list[int], buf: np.ndarray, base_bits: dict[str, np.ndarray],
                grand_bits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Read and decode chunks ``needed`` into ``buf``, then rebuild the raw bits of ``entries``."""
        kinds = m["chunks"]
        shards = ShardReader(self.store, m.get("data", sid), len(kinds))

        def decode(c: int) -> None:
            kind = _CODE_KIND[kinds[c]]
            try:
                payload = shards.get(kind, c)
                if payload is None:
                    raise IntegrityError("chunk is missing")
                decode_chunk(kind, payload, buf[c * CHUNK_SIZE : (c + 1) * CHUNK_SIZE])
            except IntegrityError as exc:
                held = [n for n, (lo, hi) in spans.items() if lo < (c + 1) * CHUNK_SIZE and hi > c * CHUNK_SIZE]
                raise IntegrityError(
                    f"snapshot {sid} in {self.location}: chunk {c} (in shard file {kind}/c/{c // shards.per}) "
                    f"is damaged ({exc}); it holds "
                    f"tensor(s) {', '.join(held[:5])}{'...' if len(held) > 5 else ''}. Restore the archive "
                    "from a copy or commit that snapshot again."
                ) from None

        small = len(needed) * CHUNK_SIZE <= SMALL
        try:
            _run_all(self._pool, decode, needed, small)
        finally:
            shards.close()
        nbytes = [int(e["nbytes"]) for e in entries]
        starts = np.cumsum([0] + [-(-n // 64) * 64 for n in nbytes]).tolist()  # 64-byte aligned tensors
        block = np.empty(starts[-1], np.uint8)  # one allocation: huge pages
        out = {e["name"]: block[lo : lo + n].view(layout_of(e["dtype"]).uint)
               for e, lo, n in zip(entries, starts, nbytes)}
        jobs = {}  # name: (where its coded values go, their base, the base's base, factors, row mask)
        units = []
        for e in entries:
            name, width = e["name"], layout_of(e["dtype"]).width
            values, mask_n, alpha_n = _stored(e)
            rows, per = rows_of(e["shape"])
            lo = e["offset"] + values * width
            ub, ub2, target, changed, alpha = base_bits.get(name), grand_bits.get(name), out[name], None, None
            if "kept" in e:
                changed = mask_from_bytes(buf[lo : lo + mask_n], rows)
                if int(changed.sum()) != e["kept"]:
                    raise IntegrityError(f"snapshot {sid}: the row mask of tensor {name!r} is damaged")
                ub = gather(ub, changed, per)
                ub2 = None if ub2 is None else gather(ub2, changed, per)
                target = np.empty(values, out[name].dtype)
            if e["enc"] == "pred":
                alpha = alpha_from_planes(buf[lo + mask_n : lo + mask_n + alpha_n])
            jobs[name] = (target, ub, ub2, alpha, changed)
            units.extend((e, a, b) for a, b in segments(values))

        def rebuild(unit: tuple[dict[str, Any], int, int]) -> None:
            e, a, b = unit
            target, ub, ub2, alpha, _ = jobs[e["name"]]
            layout = layout_of(e["dtype"])
            lo = e["offset"] + a * layout.width
            planes = buf[lo : lo + (b - a) * layout.width].reshape(layout.width, b - a)
            base = None if ub is None else ub[a:b]
            if e["enc"] == "pred":
                base = predict(base, ub2[a:b], alpha, layout, rows_of(e["shape"])[1], a)
            decode_segment(planes, base, layout, Plan(e["enc"], e["ctx"]), target[a:b])

        _run_all(self._pool, rebuild, units, small)
        for name, (target, _, _, _, changed) in jobs.items():
            if changed is not None:  # unchanged rows are the base's
                whole = out[name].reshape(changed.size, -1)
                whole[...] = base_bits[name].reshape(changed.size, -1)
                whole[changed] = target.reshape(-1, whole.shape[1])
        return out

    # -- reporting -------------------------------------------------------------------------
    def report(self, snapshot: str) -> list[dict[str, Any]]:
        """Per-tensor rows: name, dtype, shape, encoding, raw and stored bytes, stored per plane."""
        rows = []
        for e in self.manifest(snapshot)["tensors"]:
            rows.append({k: e[k] for k in ("name", "dtype", "shape", "enc", "ctx", "nbytes", "stored", "planes")}
                        | {"ratio": e["stored"] / e["nbytes"] if e["nbytes"] else 0.0})
        return rows


def _reads_base(e: dict[str, Any]) -> bool:
    """Whether restoring manifest entry ``e`` reads its snapshot's base (a delta, or a row mask)."""
    return e["enc"] != "mat" or "kept" in e


def _stored(e: dict[str, Any]) -> tuple[int, int, int]:
    """(values coded, row-mask bytes, factor bytes) of a manifest entry: a tensor with a row mask
    codes its changed rows only and stores a bit per row; a 'pred' tensor two bytes per coded row."""
    rows, per = rows_of(e["shape"])
    kept = e.get("kept")
    coded_rows = rows if kept is None else kept
    return coded_rows * per, (0 if kept is None else -(-rows // 8)), (2 * coded_rows if e["enc"] == "pred" else 0)


def _spans(m: Manifest) -> list[tuple[int, int]]:
    """The byte range of each tensor (planes, then row mask and factors) in the snapshot's stream."""
    out = []
    for e in m["tensors"]:
        values, mask_n, alpha_n = _stored(e)
        lo = e["offset"]
        out.append((lo, lo + values * layout_of(e["dtype"]).width + mask_n + alpha_n))
    return out


def _attribute(entries: list[dict[str, Any]], buf: np.ndarray, chunk_sizes: list[int]) -> None:
    """Share each chunk's stored bytes among the tensor planes in it, weighted by sampled entropy.

    Exact for planes that fill their chunks; an estimate where small planes share one. A 'pred'
    tensor's factors and a row mask count in its "stored" bytes, not in its "planes".
    """
    segs = []  # (start, end, entry index, plane), in stream order
    for i, e in enumerate(entries):
        w = layout_of(e["dtype"]).width
        values, mask_n, alpha_n = _stored(e)
        for a, b in segments(values):
            lo = e["offset"] + a * w
            segs.extend((lo + p * (b - a), lo + (p + 1) * (b - a), i, p) for p in range(w))
        if mask_n + alpha_n:
            end = e["offset"] + values * w
            segs.append((end, end + mask_n + alpha_n, i, w))
    starts = [s[0] for s in segs]
    shares = [[0.0] * (layout_of(e["dtype"]).width + 1) for e in entries]
    for c, size in enumerate(chunk_sizes):
        lo, hi = c * CHUNK_SIZE, min(len(buf), (c + 1) * CHUNK_SIZE)
        parts = []
        for s in segs[max(0, bisect.bisect_right(starts, lo) - 1) :]:
            if s[0] >= hi:
                break
            a, b = max(lo, s[0]), min(hi, s[1])
            if b > a:
                parts.append((s[2], s[3], a, b))
        if len(parts) == 1:  # the common case: one plane fills the chunk
            shares[parts[0][0]][parts[0][1]] += size
            continue
        weights = [(b - a) * max(0.05, entropy(buf[a:b:max(1, (b - a) // 2048)])) for *_, a, b in parts]
        total = sum(weights) or 1.0
        for (i, p, _, _), w in zip(parts, weights):
            shares[i][p] += size * w / total
    for e, sh in zip(entries, shares):
        e["planes"] = [round(x) for x in sh[:-1]]
        e["stored"] = round(sum(sh))
