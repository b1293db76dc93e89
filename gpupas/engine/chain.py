"""Delta chains: which snapshots a read needs, decoded oldest first, each once.

A snapshot's delta tensors need its base's bits; its 'pred' tensors also the bits of the snapshot
they extrapolate from (its ``grand``: the base's base when it was encoded, named in the manifest,
so re-encoding or re-basing the base never changes what a child reads). :func:`read_bits`
collects per snapshot exactly the tensors its dependents need, stops where bits are cached,
then decodes dependencies first, keeping each snapshot's bits only while a dependent still needs
them. :func:`read_all` decodes every snapshot of an archive once (verifying a chain of 17 links
decodes 17 snapshots, not 153); only a snapshot whose base failed is decoded again, along its own chain.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from gpupas.engine import decode
from gpupas.engine.bases import BaseCache
from gpupas.errors import (
    UNREACHABLE,
    FormatError,
    GpupasError,
    IntegrityError,
    NotFoundError,
    SnapshotNotFoundError,
)
from gpupas.format.manifest import Manifest
from gpupas.store.archive import ArchiveStore

Manifests = Callable[[str], Manifest]


def grand_of(m: Manifest, manifests: Manifests) -> str | None:
    """The snapshot ``m``'s 'pred' tensors extrapolate from (formats 1 and 2: the base's base)."""
    if not m.implicit_grand or m.base is None:
        return m.grand
    return manifests(m.base).base


def dependencies(m: Manifest, names: set[str] | None, manifests: Manifests) -> list[tuple[str, set[str]]]:
    """(snapshot, tensor names) that decoding ``names`` of ``m`` (all when None) reads."""
    entries = m.tensors if names is None else [m.by_name[n] for n in names]
    base = {e.name for e in entries if e.reads_base}
    pred = {e.name for e in entries if e.enc == "pred"}
    out = []
    for sid, want, what in ((m.base, base, "delta base"), (grand_of(m, manifests) if pred else None, pred,
                                                             "'pred' base")):
        if want:
            if sid is None:
                raise IntegrityError(f"snapshot {m.id} has tensors that read its {what}, but names none (damaged "
                                     "manifest)")
            out.append((sid, want))
    return out


def _plan(sid: str, names: set[str] | None, manifests: Manifests, cache: BaseCache | None,
          crc32_many: Callable[[Any], list[int]], usable: Callable[[Any], bool],
          ) -> tuple[dict[str, Manifest], dict[str, set[str] | None], dict[str, list[tuple[str, set[str]]]],
                     dict[str, dict[str, Any]]]:
    """The snapshots a read of ``names`` of ``sid`` needs: manifests, tensor names per snapshot, their
    dependencies, and the bits the cache already holds."""
    need: dict[str, set[str] | None] = {sid: names}
    found: dict[str, Manifest] = {}
    deps: dict[str, list[tuple[str, set[str]]]] = {}
    hits: dict[str, dict[str, Any]] = {}
    work = [sid]
    while work:  # a fixpoint: a snapshot is visited again when a new dependent asks it for more tensors
        x = work.pop()
        if x not in found:
            try:
                found[x] = manifests(x)
            except SnapshotNotFoundError:
                if x == sid:
                    raise
                users = [y for y, ds in deps.items() if any(d == x for d, _ in ds)]
                raise IntegrityError(f"snapshot {users[0] if users else sid}: the snapshot {x} it is a delta on is "
                                     "missing; restore the archive from a copy") from None
        m = found[x]
        try:
            entries = m.select(None if need[x] is None else sorted(need[x]))  # type: ignore[arg-type]
        except NotFoundError as exc:
            if x == sid:
                raise
            raise IntegrityError(f"snapshot {x} lacks tensors that snapshots built on it need ({exc})") from None
        if cache is not None and x != sid:
            hit = cache.get(x, entries, crc32_many, usable)
            if hit is not None:
                hits[x], deps[x] = hit, []
                continue
        hits.pop(x, None)
        try:
            deps[x] = dependencies(m, need[x], manifests)
        except SnapshotNotFoundError:
            raise IntegrityError(f"snapshot {x}: the base of its base is missing; restore the archive from a "
                                 "copy") from None
        for y, want in deps[x]:
            have = need.get(y, set())
            if y not in need or (have is not None and not want <= have):
                need[y] = None if have is None else have | want
                work.append(y)
    return found, need, deps, hits


def dependencies_first(starts: Iterable[str], deps_of: Callable[[str], Iterable[str]],
                       on_loop: Callable[[str, str], None] | None = None) -> list[str]:
    """``starts`` and every snapshot they depend on, each after all it depends on (depth first, taking
    ``deps_of(x)`` in order). A dependency met again before it is placed closes a loop: ``on_loop(start,
    snapshot)`` is called (it may raise) and that edge is left out."""
    order: list[str] = []
    placed: set[str] = set()
    for s in starts:
        stack: list[tuple[str, bool]] = [(s, False)]
        path: set[str] = set()  # entered, not yet placed: the snapshots above the one being expanded
        while stack:
            x, expanded = stack.pop()
            if x in placed:
                continue
            if expanded:
                path.discard(x)
                placed.add(x)
                order.append(x)
                continue
            if x in path:
                if on_loop is not None:
                    on_loop(s, x)
                continue
            path.add(x)
            stack.append((x, True))
            stack.extend((d, False) for d in reversed(list(deps_of(x))) if d not in placed)
    return order


def _loops_back(sid: str, x: str) -> None:
    raise IntegrityError(f"snapshot {sid}: its delta chain loops back to {x} (damaged or hostile manifests)")


def read_bits(store: ArchiveStore, sid: str, names: Iterable[str] | None, *, manifests: Manifests,
              backend: Any, executor: Any, cache: BaseCache | None = None) -> tuple[dict[str, Any], bool]:
    """Raw bits of tensors ``names`` (all when None) of snapshot ``sid``, and whether they came
    from the cache (the caller's or an earlier restore's arrays) rather than a decode.

    With a cache, a fully decoded snapshot and its fully decoded base are remembered.
    """
    wanted = None if names is None else set(names)
    top = manifests(sid)
    crc32_many = functools.partial(backend.crc32_many, executor=executor)
    if cache is not None:
        hit = cache.get(sid, top.select(None if wanted is None else sorted(wanted)), crc32_many, backend.usable)
        if hit is not None:
            return ({n: hit[n] for n in names} if names is not None else hit), True
    found, need, deps, hits = _plan(sid, wanted, manifests, cache, crc32_many, backend.usable)
    order = dependencies_first([sid], lambda x: [y for y, _ in deps.get(x, [])], _loops_back)
    users: dict[str, int] = {}
    for x in order:
        for y, _ in deps.get(x, []):
            users[y] = users.get(y, 0) + 1
    bits: dict[str, dict[str, Any]] = dict(hits)
    for x in order:
        if x in hits:
            continue
        m = found[x]
        entries = m.select(None if need[x] is None else sorted(need[x]))  # type: ignore[arg-type]
        base = bits.get(m.base, {}) if m.base is not None else {}
        pred = [e for e in entries if e.enc == "pred"]
        grand = bits.get(grand_of(m, manifests), {}) if pred else {}  # type: ignore[arg-type]
        try:
            got = decode.decode_snapshot(store, m, entries, {e.name: base[e.name] for e in entries if e.reads_base},
                                         {e.name: grand[e.name] for e in pred}, backend, executor)
        except IntegrityError:
            if not hits:
                raise
            # a cached base changed after its check (whoever holds its arrays stepped them): read without the cache
            return read_bits(store, sid, names, manifests=manifests, backend=backend, executor=executor)
        bits[x] = got
        if cache is not None and len(got) == len(m.tensors) and x in (sid, top.base):
            cache.put(x, got)
        for y, _ in deps.get(x, []):
            users[y] -= 1
            if users[y] == 0 and y != sid:
                bits.pop(y, None)
    out = bits[sid]
    return ({n: out[n] for n in names} if names is not None else out), False


def read_all(store: ArchiveStore, sids: Iterable[str], *, manifests: Manifests, backend: Any, executor: Any,
             ) -> Iterator[tuple[str, int | Exception]]:
    """Decode every snapshot of ``sids`` whole, each once, dependencies first (of the snapshots they depend
    on, only the tensors read); yields (snapshot, tensors checked) or (snapshot, the error) for each of
    ``sids``. Bits are kept only while a dependent still needs them. A snapshot whose base failed is
    judged by the tensors it reads of its chain: damage in the base's others is the base's alone."""
    wanted = list(dict.fromkeys(sids))
    known: dict[str, Manifest | Exception] = {}

    def manifest(s: str) -> Manifest | Exception:
        if s not in known:
            try:
                known[s] = manifests(s)
            except (SnapshotNotFoundError, IntegrityError, FormatError) as exc:
                known[s] = exc
        return known[s]

    def deps_of(s: str) -> list[str]:
        m = manifest(s)
        if isinstance(m, Exception):
            return []
        try:
            return [d for d, _ in dependencies(m, None, manifests)]
        except (IntegrityError, SnapshotNotFoundError, FormatError):
            return [d for d in (m.base,) if d is not None]

    order = dependencies_first(wanted, deps_of)  # a loop is reported when its snapshots are decoded
    need: dict[str, set[str] | None] = dict.fromkeys(wanted)  # tensors to decode (None: all)
    for x in reversed(order):  # dependents before what they depend on
        mx = manifest(x)
        if isinstance(mx, Exception) or x not in need:
            continue
        try:
            for d, want in dependencies(mx, need[x], manifests):
                have = need.get(d, set())
                if have is not None:
                    need[d] = have | want
        except (GpupasError, KeyError):  # found again, and reported, as ``x`` is decoded
            pass

    def alone(s: str, names: set[str] | None) -> dict[str, Any] | None:
        """``names`` of ``s`` decoded with only what they read of its chain; None where that fails too."""
        try:
            return read_bits(store, s, names, manifests=manifests, backend=backend, executor=executor)[0]
        except (GpupasError, KeyError, OSError, MemoryError):
            return None

    users: dict[str, int] = {}
    for x in order:
        for d in deps_of(x):
            users[d] = users.get(d, 0) + 1
    bits: dict[str, dict[str, Any] | Exception] = {}
    for s in order:
        m = manifest(s)
        result: dict[str, Any] | Exception
        if isinstance(m, Exception):
            result = m
        else:
            try:
                names = need.get(s, set())
                entries = m.select(None if names is None else sorted(names))
                needed = dependencies(m, names, manifests)
                failed = any(isinstance(bits.get(d), Exception) for d, _ in needed)
                part = alone(s, names) if failed else None  # what it reads of a failed base may be intact
                if part is not None:
                    result = part
                else:
                    inputs = []
                    for d, _ in needed:
                        got = bits.get(d)
                        if not isinstance(got, dict):
                            why = f" ({got})" if isinstance(got, Exception) else " (it depends on itself)"
                            kind = type(got) if isinstance(got, UNREACHABLE) else \
                                IntegrityError  # a base out of reach leaves its child out of reach, not damaged
                            raise kind(f"snapshot {s}: the snapshot {d} it is a delta on cannot be restored" + why)
                        inputs.append(got)
                    base = inputs[0] if m.base is not None and needed and needed[0][0] == m.base else {}
                    grand = inputs[-1] if any(e.enc == "pred" for e in entries) else {}
                    result = decode.decode_snapshot(
                        store, m, entries, {e.name: base[e.name] for e in entries if e.reads_base},
                        {e.name: grand[e.name] for e in entries if e.enc == "pred"}, backend, executor)
            except (IntegrityError, FormatError, SnapshotNotFoundError) as exc:
                result = exc if not isinstance(exc, SnapshotNotFoundError) else IntegrityError(str(exc))
            except GpupasError as exc:  # e.g. a codec that cannot run here: that snapshot's result, not the end
                result = exc
            except (KeyError, OSError, MemoryError) as exc:
                result = IntegrityError(f"snapshot {s}: {type(exc).__name__}: {exc}")
        for d in deps_of(s):
            users[d] -= 1
            if users[d] <= 0:
                bits.pop(d, None)
        if users.get(s, 0) > 0:
            bits[s] = result
        if s in wanted:
            yield s, (result if isinstance(result, Exception) else len(result))
