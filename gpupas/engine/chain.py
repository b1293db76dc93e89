"""Delta chains: which links a read needs, decoded oldest first, each link once.

A snapshot's delta tensors need its base's bits, its 'pred' tensors also the base's base's.
:func:`read_bits` walks down from the snapshot asked for, collecting per link exactly the tensors
the links above need, stops at a link whose bits are cached or that reads no base, then decodes
upward keeping only the two links below the one being decoded. :func:`read_all` decodes every
snapshot of an archive once (verifying a chain of 17 links decodes 17 snapshots, not 153).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from gpupas.engine import decode
from gpupas.engine.bases import BaseCache
from gpupas.errors import FormatError, IntegrityError, SnapshotNotFoundError
from gpupas.format.manifest import Manifest, TensorEntry
from gpupas.store.archive import ArchiveStore

Manifests = Callable[[str], Manifest]


Below = tuple[dict[str, Any], dict[str, Any]]


def _links(sid: str, names: Iterable[str] | None, manifests: Manifests, cache: BaseCache | None,
           crc32: Callable[[Any], int]) -> tuple[list[tuple[Manifest, list[TensorEntry]]], Below]:
    """The links to decode, newest first, with the entries each needs; and the cached bits of the
    two links below the last one (empty where the chain ends)."""
    links: list[tuple[Manifest, list[TensorEntry]]] = []
    want: list[str] | None = None if names is None else list(names)
    from_above: set[str] = set()  # names the link two above needs from this one ('pred')
    seen = {sid}
    cur = sid
    while True:
        try:
            m = manifests(cur)
        except SnapshotNotFoundError:
            if not links:
                raise
            raise IntegrityError(f"snapshot {links[0][0].id}: its delta base {cur} (down the chain from "
                                 f"{links[-1][0].id}) is missing; restore the archive from a copy") from None
        try:
            entries = m.select(want)
        except KeyError as exc:
            if not links:
                raise
            raise IntegrityError(f"snapshot {links[-1][0].id} needs tensors its base {cur} does not have "
                                 f"({exc})") from None
        if cache is not None and links:
            hit = cache.get(cur, entries, crc32)
            if hit is not None and not from_above:
                return links, (hit, {})
            if hit is not None and m.base is not None:  # the link above predicts from this one's base too
                try:
                    grand = cache.get(m.base, manifests(m.base).select(sorted(from_above)), crc32)
                except (KeyError, SnapshotNotFoundError, IntegrityError):
                    grand = None
                if grand is not None:
                    return links, (hit, grand)
        links.append((m, entries))
        below = {e.name for e in entries if e.reads_base} | from_above
        from_above = {e.name for e in entries if e.enc == "pred"}
        if not below:
            return links, ({}, {})
        if m.base is None:
            raise IntegrityError(f"snapshot {m.id} reads a base but names none (damaged manifest)")
        if m.base in seen:
            raise IntegrityError(f"snapshot {sid}: its delta chain loops back to {m.base} (damaged or hostile "
                                 "manifests)")
        seen.add(m.base)
        cur = m.base
        want = sorted(below)


def read_bits(store: ArchiveStore, sid: str, names: Iterable[str] | None, *, manifests: Manifests,
              backend: Any, executor: Any, cache: BaseCache | None = None) -> tuple[dict[str, Any], bool]:
    """Raw bits of tensors ``names`` (all when None) of snapshot ``sid``, and whether they came
    from the cache (the caller's or an earlier restore's arrays) rather than a decode.

    With a cache, a fully decoded snapshot and its fully decoded base are remembered.
    """
    if cache is not None:
        m = manifests(sid)
        hit = cache.get(sid, m.select(names), backend.crc32)
        if hit is not None:
            return hit, True
    links, below = _links(sid, names, manifests, cache, backend.crc32)
    bits: list[dict[str, Any]] = list(below)  # the link below, and the one below that
    for m, entries in reversed(links):
        base, grand = bits[0], bits[1]
        got = decode.decode_snapshot(store, m, entries, {e.name: base[e.name] for e in entries if e.reads_base},
                                     {e.name: grand[e.name] for e in entries if e.enc == "pred"}, backend, executor)
        if cache is not None and len(got) == len(m.tensors) and m.id in (sid, links[0][0].base):
            cache.put(m.id, got)
        bits = [got, base]
    return bits[0], False


def read_all(store: ArchiveStore, sids: Iterable[str], *, manifests: Manifests, backend: Any, executor: Any,
             ) -> Iterator[tuple[str, int | Exception]]:
    """Decode every snapshot of ``sids`` (and the bases they need) once, parents before children;
    yields (snapshot, tensors checked) or (snapshot, the error) for each of ``sids``.

    Bits are kept only while a child or grandchild still needs them.
    """
    wanted = list(dict.fromkeys(sids))
    known: dict[str, Manifest | Exception] = {}

    def manifest(s: str) -> Manifest | Exception:
        if s not in known:
            try:
                known[s] = manifests(s)
            except (SnapshotNotFoundError, IntegrityError, FormatError) as exc:
                known[s] = exc
        return known[s]

    # the forest: every wanted snapshot and its bases
    order: list[str] = []
    for s in wanted:
        chain, cur, seen = [], s, set()
        while cur is not None and cur not in order and cur not in seen:
            seen.add(cur)
            chain.append(cur)
            m = manifest(cur)
            cur = m.base if isinstance(m, Manifest) else None
        order.extend(reversed(chain))
    children: dict[str, list[str]] = {}
    for s in order:
        m = manifest(s)
        if isinstance(m, Manifest) and m.base is not None:
            children.setdefault(m.base, []).append(s)
    # how many later decodes read each snapshot's bits (children, and grandchildren through 'pred')
    users = {s: len(children.get(s, [])) + sum(len(children.get(c, [])) for c in children.get(s, []))
             for s in order}
    bits: dict[str, dict[str, Any] | Exception] = {}

    def release(s: str | None) -> None:
        if s is not None and s in users:
            users[s] -= 1
            if users[s] <= 0:
                bits.pop(s, None)

    for s in order:
        m = manifest(s)
        result: dict[str, Any] | Exception
        if isinstance(m, Exception):
            result = m
        else:
            base = bits.get(m.base) if m.base is not None else {}
            grand_id = manifest(m.base).base if m.base is not None and isinstance(manifest(m.base), Manifest) else None
            grand = bits.get(grand_id, {}) if grand_id is not None else {}
            if isinstance(base, Exception) or (m.base is not None and base is None):
                result = IntegrityError(f"snapshot {s}: its delta base {m.base} cannot be restored"
                                        + (f" ({base})" if isinstance(base, Exception) else ""))
            elif isinstance(grand, Exception) and any(e.enc == "pred" for e in m.tensors):
                result = IntegrityError(f"snapshot {s}: the base of its base, {grand_id}, cannot be restored")
            else:
                try:
                    grand = grand if isinstance(grand, dict) else {}
                    result = decode.decode_snapshot(
                        store, m, m.tensors, {e.name: base[e.name] for e in m.tensors if e.reads_base},
                        {e.name: grand[e.name] for e in m.tensors if e.enc == "pred"}, backend, executor)
                except (IntegrityError, FormatError, KeyError, OSError) as exc:
                    result = exc if isinstance(exc, (IntegrityError, FormatError)) else IntegrityError(
                        f"snapshot {s}: {type(exc).__name__}: {exc}")
            release(m.base)
            release(grand_id)
        if users.get(s, 0) > 0:
            bits[s] = result
        if s in wanted:
            yield s, (result if isinstance(result, Exception) else len(result))
