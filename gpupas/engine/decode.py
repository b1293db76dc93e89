"""Rebuilding tensors from a snapshot's streams, given the bits of its base (and the base's base).

:func:`decode_snapshot` reads only the chunks that hold the requested tensors, decodes them on the
backend, rebuilds each segment (join planes, undo the context sort and the delta, put the base's
unchanged rows back) and checks every tensor's CRC-32. It does not follow the delta chain: the
caller (:mod:`gpupas.engine.chain`) passes the bases in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from gpupas.codecs import registry
from gpupas.errors import IntegrityError, LinkedError
from gpupas.format.layout import holders, needed_chunks
from gpupas.format.manifest import Manifest, TensorEntry
from gpupas.pas import schemes
from gpupas.pas.planes import LAYOUTS, from_bits, to_bits
from gpupas.pas.schemes import repr_dtype
from gpupas.store.archive import ArchiveStore
from gpupas.store.shards import ShardReader

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
    # per stream, the chunks from its first needed to its last (not the stream's others: a layer of a huge snapshot)
    sizes = {s: (cs[-1] + 1 - cs[0]) * m.streams[s].chunk_size for s, cs in need.items()}
    _fits(sum(sizes.values()) + sum(e.nbytes for e in entries), m)
    try:
        return _decode(store, m, entries, need, sizes, base_bits, grand_bits, backend, executor, small)
    except MemoryError:
        raise IntegrityError(f"snapshot {m.id} declares {sum(sizes.values()) + sum(e.nbytes for e in entries)} "
                             "bytes of tensors and planes and this process could not allocate them: its manifest "
                             "is damaged or hostile, or restore it with more memory (ulimit -v)") from None


def _decode(store: ArchiveStore, m: Manifest, entries: Sequence[TensorEntry], need: Mapping[int, list[int]],
            sizes: Mapping[int, int], base_bits: Mapping[str, Any], grand_bits: Mapping[str, Any], backend: Any,
            executor: Any, small: bool) -> dict[str, Any]:
    coded = [_coded(e) for e in entries]
    windows = getattr(backend, "decode_windows", None)  # the NumPy backend: planes through a bounded window

    readers: dict[int, ShardReader] = {}  # one per stream for all windows: each shard index read once (remotely
    # two requests and the whole index each time)

    def read(s: int, chunks: list[int], buf: Any, first: int) -> None:
        if s not in readers:
            readers[s] = store.reader(m.streams[s])
        _read_stream(store, m, s, chunks, buf, backend, executor, small, first, readers[s])

    known: dict[str, int] = {}  # CRC-32s the backend computed while rebuilding (of the decoded bits)
    try:
        out = None if windows is None else windows(m, coded, read, base_bits, grand_bits, executor, small, crcs=known)
    finally:
        for reader in readers.values():
            reader.close()
    if out is None:
        with backend.workspace(sum(sizes.values())) as ws:
            bufs: dict[int, Any] = {}
            at = 0
            for s in sorted(need):
                bufs[s] = ws[at : at + sizes[s]]
                at += sizes[s]
            for s, chunks in need.items():  # chunk c at (c - first needed) * chunk size
                _read_stream(store, m, s, chunks, bufs[s], backend, executor, small, chunks[0])
            skip = {s: cs[0] * m.streams[s].chunk_size for s, cs in need.items()}
            out = backend.decode_planes(m, [_moved(e, skip) for e in coded], bufs, base_bits, grand_bits, executor,
                                        small)
    for e in entries:
        if e.scheme is not None:
            out[e.name] = _restore(e, out[e.name], backend)
    left = [e for e in entries if e.scheme is not None or e.name not in known]  # a lossy tensor: its restored bits
    # one launch on a GPU; large tensors in pieces on the executor's threads on the CPU
    got = dict(zip([e.name for e in left], backend.crc32_many([out[e.name] for e in left], executor)))
    for e in entries:
        crc = got[e.name] if e.name in got else known[e.name]
        if crc != e.crc32:
            raise IntegrityError(
                f"snapshot {m.id}: tensor {e.name!r} does not match its checksum after decoding"
                + (f" (is its base {m.base} intact? run verify on it)" if e.reads_base else ""))
    return out


def _moved(e: TensorEntry, skip: Mapping[int, int]) -> TensorEntry:
    """``e`` with its planes (and mask and factors) at offsets into buffers that start ``skip[stream]`` bytes
    into each stream."""
    parts = tuple(replace(p, offset=p.offset - skip.get(p.stream, 0)) for p in e.parts)  # (none: nothing read)
    extras = None if e.extras is None else (e.extras[0], e.extras[1] - skip.get(e.extras[0], 0))
    return replace(e, parts=parts, extras=extras)


def _coded(e: TensorEntry) -> TensorEntry:
    """The entry whose planes the backend decodes: a lossy tensor's representation."""
    if e.scheme is None:
        return e
    rep = repr_dtype(e.scheme)
    return replace(e, dtype=rep, nbytes=e.values * LAYOUTS[rep].width, scheme=None)


def _restore(e: TensorEntry, rep_bits: Any, backend: Any) -> Any:
    """The bits a lossy tensor restores to, from its representation's bits (on the host: the schemes are
    NumPy code; a GPU backend gets them back on the device)."""
    coding = e.coding
    host = backend.to_host(rep_bits, meta=True) if backend.name != "numpy" else rep_bits
    rep = from_bits(host, LAYOUTS[coding.name], e.shape)
    bits = to_bits(schemes.restore(rep, e.scheme, e.dtype), e.layout).reshape(-1)  # type: ignore[arg-type]
    return bits if backend.name == "numpy" else backend.xp.asarray(bits)


def memory_bytes() -> int:
    """Physical memory of this machine (what no single restore can exceed)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - platforms without sysconf
        return 1 << 46


def _fits(nbytes: int, m: Manifest) -> None:
    """Refuse before allocating what cannot be held (a damaged or hostile manifest declaring 2^44 values)."""
    limit = memory_bytes()
    if nbytes > limit:
        raise IntegrityError(f"snapshot {m.id} declares {nbytes} bytes of tensors and planes, more than this "
                             f"machine's memory ({limit}): its manifest is damaged or hostile, or it needs a larger "
                             "machine")


def _read_stream(store: ArchiveStore, m: Manifest, s: int, chunks: list[int], buf: Any, backend: Any, executor: Any,
                 small: bool, first: int = 0, given: ShardReader | None = None) -> None:
    """Decode ``chunks`` of stream ``s`` into ``buf``, chunk ``c`` at ``(c - first) * chunk_size``; through
    ``given`` where given (the caller's to close: released here), else a reader of its own."""
    stream = m.streams[s]
    reader = store.reader(stream) if given is None else given

    def damaged(c: int, exc: Exception) -> IntegrityError:
        return damaged_chunk(store, m, s, reader, c, exc)

    try:
        try:
            missing = reader.prepare(chunks)
        except IntegrityError as exc:
            place, what = _where(store, stream)
            if isinstance(exc, LinkedError):  # intact, perhaps: only not where gpupas reads it
                raise LinkedError(f"snapshot {m.id} in {place}, stream {s} was not read (nothing found damaged): "
                                  f"{exc}") from None
            raise IntegrityError(f"snapshot {m.id} in {place}, stream {s}: {exc}; restore {what} "
                                 "from a copy or commit that snapshot again") from None
        if missing:
            raise store.changed(m) or damaged(missing[0], IntegrityError("chunk is missing"))
        if first:  # the same chunks, numbered from ``first``
            moved = _From(reader, first)  # (its fetch a bound method, as the reader's: the GPU asks it for sizes)
            backend.decode_chunks(replace(stream, chunks=stream.chunks[first:]), [c - first for c in chunks],
                                  moved.fetch, buf, executor, small, lambda c, exc: damaged(c + first, exc),
                                  moved.scatter)
        else:
            backend.decode_chunks(stream, chunks, reader.fetch, buf, executor, small, damaged, reader.scatter)
    finally:
        if given is None:
            reader.close()
        else:
            reader.release()


def _where(store: ArchiveStore, stream: Any) -> tuple[str, str]:
    """Where a stream lies, and what to restore from a copy if it is damaged there (a tier, with its URL)."""
    if not stream.tier:
        return store.location, "the archive"
    url = store.tier_table().get(stream.tier, {}).get("url", "?")
    return f"{store.location}, tier {stream.tier!r} ({url})", f"tier {stream.tier!r}"


def damaged_chunk(store: ArchiveStore, m: Manifest, s: int, reader: Any, c: int, exc: Exception) -> IntegrityError:
    """The error for chunk ``c`` of stream ``s`` found damaged: where it lies, its shard file, the tensors in it."""
    held = holders(m, s, c)
    place, what = _where(store, m.streams[s])
    try:
        where = reader.locate(c)
    except IntegrityError:
        where = None
    return IntegrityError(
        f"snapshot {m.id} in {place}: chunk {c} of stream {s}"
        + (f" (in shard file {where[0]})" if where else "") + f" is damaged ({exc}); it holds tensor(s) "
        f"{', '.join(held[:5])}{'...' if len(held) > 5 else ''}. Restore {what} from a copy or commit "
        "that snapshot again.")


class _From:
    """A stream reader's chunks numbered from ``first``: chunk ``c`` here is the reader's ``c + first``."""

    def __init__(self, reader: Any, first: int):
        self.reader, self.first = reader, first

    def fetch(self, c: int) -> Any:
        return self.reader.fetch(c + self.first)

    def locate(self, c: int) -> Any:
        return self.reader.locate(c + self.first)

    def scatter(self, c: int, views: Any) -> Any:
        return self.reader.scatter(c + self.first, views)
