"""Rebuilding tensors from a snapshot's streams, given the bits of its base (and the base's base).

:func:`decode_snapshot` reads only the chunks that hold the requested tensors, decodes them on the
backend, rebuilds each segment (join planes, undo the context sort and the delta, put the base's
unchanged rows back) and checks every tensor's CRC-32. It does not follow the delta chain: the
caller (:mod:`gpupas.engine.chain`) passes the bases in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gpupas.codecs import registry
from gpupas.errors import IntegrityError
from gpupas.format.layout import holders, needed_chunks, segments
from gpupas.format.manifest import Manifest, TensorEntry
from gpupas.pas.predict import alpha_from_planes, predict
from gpupas.pas.rows import gather, mask_from_bytes, rows_of
from gpupas.pas.transform import Plan, decode_segment
from gpupas.store.archive import ArchiveStore

SMALL = 1 << 20  # reads of up to this many bytes run on the calling thread


def decode_snapshot(store: ArchiveStore, m: Manifest, entries: Sequence[TensorEntry], base_bits: Mapping[str, Any],
                    grand_bits: Mapping[str, Any], backend: Any, executor: Any) -> dict[str, Any]:
    """Raw bit patterns (flat, one allocation) of ``entries`` of snapshot ``m``, checked by CRC-32.

    ``base_bits`` holds the base's bits of every entry that reads its base; ``grand_bits`` the
    base's base's bits of every 'pred' entry.
    """
    need = needed_chunks(m, entries)
    for s, chunks in need.items():  # a codec this gpupas does not know (or cannot run here) says so first
        stream = m.streams[s]
        for letter in {stream.chunks[c] for c in chunks}:
            registry.get(stream.codecs[letter], backend.codec_backend)
    small = sum(len(cs) * m.streams[s].chunk_size for s, cs in need.items()) <= SMALL
    sizes = {s: m.streams[s].nchunks * m.streams[s].chunk_size for s in need}
    with backend.workspace(sum(sizes.values())) as ws:
        bufs: dict[int, Any] = {}
        at = 0
        for s in sorted(need):
            bufs[s] = ws[at : at + sizes[s]]
            at += sizes[s]
        for s, chunks in need.items():
            _read_stream(store, m, s, chunks, bufs[s], backend, executor, small)
        out = _rebuild(m, entries, bufs, base_bits, grand_bits, backend, executor, small)
    for e in entries:
        if backend.crc32(out[e.name]) != e.crc32:
            raise IntegrityError(
                f"snapshot {m.id}: tensor {e.name!r} does not match its checksum after decoding"
                + (f" (is its base {m.base} intact? run verify on it)" if e.reads_base else ""))
    return out


def _read_stream(store: ArchiveStore, m: Manifest, s: int, chunks: list[int], buf: Any, backend: Any, executor: Any,
                 small: bool) -> None:
    stream = m.streams[s]
    reader = store.reader(stream)

    def damaged(c: int, exc: Exception) -> IntegrityError:
        held = holders(m, s, c)
        try:
            where = reader.locate(c)
        except IntegrityError:
            where = None
        return IntegrityError(
            f"snapshot {m.id} in {store.location}: chunk {c} of stream {s}"
            + (f" (in shard file {where[0]})" if where else "") + f" is damaged ({exc}); it holds tensor(s) "
            f"{', '.join(held[:5])}{'...' if len(held) > 5 else ''}. Restore the archive from a copy or commit "
            "that snapshot again.")

    try:
        try:
            stored = reader.get_many(chunks)
        except IntegrityError as exc:
            raise IntegrityError(f"snapshot {m.id} in {store.location}, stream {s}: {exc}; restore the archive "
                                 "from a copy or commit that snapshot again") from None
        missing = [c for c, v in stored.items() if v is None]
        if missing:
            raise damaged(missing[0], IntegrityError("chunk is missing"))
        backend.decode_chunks(stream, stored, buf, executor, small, damaged)
        del stored
    finally:
        reader.close()


def _rebuild(m: Manifest, entries: Sequence[TensorEntry], bufs: Mapping[int, Any], base_bits: Mapping[str, Any],
             grand_bits: Mapping[str, Any], backend: Any, executor: Any, small: bool) -> dict[str, Any]:
    """The raw bits of ``entries`` from their decoded planes (in ``bufs``, by stream) and the bases."""
    nbytes = [e.nbytes for e in entries]
    starts = np.cumsum([0] + [-(-n // 64) * 64 for n in nbytes]).tolist()  # 64-byte aligned tensors
    block = backend.empty(starts[-1])  # one allocation: huge pages
    out = {e.name: block[lo : lo + n].view(e.layout.uint) for e, lo, n in zip(entries, starts, nbytes)}
    jobs: dict[str, tuple[Any, Any, Any, Any, Any]] = {}  # name: (target, base, base's base, factors, mask)
    units = []
    for e in entries:
        values = e.values
        rows, per = rows_of(e.shape)
        ub = base_bits.get(e.name) if e.reads_base else None
        ub2 = grand_bits.get(e.name) if e.enc == "pred" else None
        target, changed, alpha = out[e.name], None, None
        if e.reads_base and ub is None:
            raise IntegrityError(f"snapshot {m.id}: the base's bits of tensor {e.name!r} are missing")
        if e.enc == "pred" and ub2 is None:
            raise IntegrityError(f"snapshot {m.id}: the bits of tensor {e.name!r} two snapshots down are missing")
        for name, arr in (("base", ub), ("base's base", ub2)):
            if arr is not None and arr.size != rows * per:
                raise IntegrityError(f"snapshot {m.id}: tensor {e.name!r} has {rows * per} values, its {name} "
                                     f"{arr.size}")
        if e.extras is not None:
            s, off = e.extras
            extra = bufs[s][off : off + e.extras_nbytes]
            if e.masked:
                changed = mask_from_bytes(backend.to_host(extra[: e.mask_nbytes]), rows)
                if int(changed.sum()) != e.rows:
                    raise IntegrityError(f"snapshot {m.id}: the row mask of tensor {e.name!r} is damaged")
                ub = gather(ub, changed, per)
                ub2 = None if ub2 is None else gather(ub2, changed, per)
                target = backend.xp.empty(values, out[e.name].dtype)
            if e.enc == "pred":
                alpha = alpha_from_planes(extra[e.mask_nbytes :])
        jobs[e.name] = (target, ub, ub2, alpha, changed)
        units.extend((e, a, b) for a, b in segments(values, m.segment))

    def rebuild(unit: tuple[TensorEntry, int, int]) -> None:
        e, a, b = unit
        target, ub, ub2, alpha, _ = jobs[e.name]
        n = b - a
        planes = []
        for p in e.parts:
            start = p.offset + a * p.count
            block = bufs[p.stream][start : start + p.count * n]
            planes.extend(block[k * n : (k + 1) * n] for k in range(p.count))
        base = None if ub is None else ub[a:b]
        if e.enc == "pred":
            base = predict(base, ub2[a:b], alpha, e.layout, rows_of(e.shape)[1], a)
        decode_segment(planes, base, e.layout, Plan(e.enc, e.ctx), target[a:b])

    backend.run(rebuild, units, executor, small)
    for e in entries:
        target, _, _, _, changed = jobs[e.name]
        if changed is not None:  # unchanged rows are the base's
            whole = out[e.name].reshape(changed.size, -1)
            whole[...] = base_bits[e.name].reshape(changed.size, -1)
            whole[backend.xp.asarray(changed)] = target.reshape(-1, whole.shape[1])
    return out
