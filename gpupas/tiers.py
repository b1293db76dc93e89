"""Moving planes between tiers: a snapshot's low-order planes in a second store, its high ones local.

A tier is a second store the archive names in its root (:mod:`gpupas.store.tiers`). Moving planes
is a revision (:meth:`gpupas.archive.Archive.revise`): the snapshot is rewritten under the same id
with its planes split in two groups, the group of planes ``planes_from..`` written into the tier;
the new form is decoded and compared bit for bit before the manifest switches, so every published
snapshot stays restorable at every moment. A read that needs only the high planes (those in local
streams) never opens the tier.

>>> import numpy as np, gpupas, tempfile
>>> root = tempfile.mkdtemp()
>>> a = gpupas.create_archive(root + "/arc")
>>> s = a.commit({"w": np.linspace(-1, 1, 4096, dtype=np.float32)})
>>> _ = a.add_tier("cold", root + "/cold")
>>> [st.tier for st in a.tier(s.id, planes_from=2, to="cold").streams]
[None, 'cold']
>>> a.restore(s.id)["w"][-1]
np.float32(1.0)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from gpupas.engine.encode import layout_of_snapshot, placement
from gpupas.errors import InvalidInputError, TierNotFoundError
from gpupas.format.manifest import Manifest
from gpupas.store.tiers import LOCAL

if TYPE_CHECKING:
    from gpupas.archive import Archive


def width(m: Manifest) -> int:
    """Planes of the widest tensor of ``m``."""
    return max((e.width for e in m.tensors), default=0)


def move(archive: Archive, snapshot: str, *, planes_from: int | None = 2, to: str | None = "cold") -> Manifest:
    """Put planes ``planes_from..`` of ``snapshot`` into tier ``to`` (None or "local": the archive's own
    store), planes ``0..planes_from-1`` in a stream of their own in the archive; returns the manifest.

    A revision: atomic, checked bit for bit before it is published; nothing happens where the snapshot
    is already in that form. ``planes_from`` None with ``to`` local: bring back whatever is in tiers,
    keeping the plane groups.
    """
    to = None if to in (None, LOCAL) else to
    if to is not None and to not in archive.store.tier_table():
        raise TierNotFoundError(f"archive {archive.location} has no tier {to!r} to move planes to: add it with "
                                f"`gpupas tier add {to} URL`, or list them with `gpupas tier list`")
    m = archive.manifest(snapshot)
    groups, tiers_now = placement(m)
    if planes_from is None:
        if to is not None:
            raise InvalidInputError("say from which plane on the planes go to the tier (planes_from)")
        target = layout_of_snapshot(m, groups, tuple(None for _ in tiers_now))
    else:
        w = width(m)
        if not 0 <= planes_from < max(w, 1):
            raise InvalidInputError(f"planes_from must be a plane of snapshot {snapshot} (0..{max(w - 1, 0)}: its "
                                    f"widest tensor has {w} planes), not {planes_from}")
        new_groups = (planes_from,) if planes_from > 0 else ()
        target = layout_of_snapshot(m, new_groups, (None, to) if planes_from > 0 else (to,))
    if (target.groups, _pad(target.tiers, len(tiers_now))) == (groups, tiers_now):
        return m
    return archive.revise(snapshot, setting=m.setting or "default", layout=target)


def _pad(tiers: tuple[str | None, ...], n: int) -> tuple[str | None, ...]:
    return tuple(tiers[:n]) + (None,) * max(0, n - len(tiers))


def move_many(archive: Archive, snapshots: Iterable[str], *, planes_from: int | None = 2,
              to: str | None = "cold") -> list[dict[str, Any]]:
    """:func:`move` for each snapshot; rows of snapshot, tier, planes moved, bytes local and in tiers."""
    out = []
    for sid in snapshots:
        before = archive.manifest(sid)
        m = move(archive, sid, planes_from=planes_from, to=to)
        out.append({"snapshot": sid, "to": to or LOCAL, "planes_from": planes_from,
                    "changed": m.revision != before.revision, **where(m)})
    return out


def where(m: Manifest) -> dict[str, Any]:
    """Stored bytes of ``m`` by store: ``{"local": n, "tiers": {name: n}}``."""
    tiers: dict[str, int] = {}
    for s in m.streams:
        if s.tier is not None:
            tiers[s.tier] = tiers.get(s.tier, 0) + s.stored
    return {"local": sum(s.stored for s in m.streams if s.tier is None), "tiers": tiers}


def summary(archive: Archive) -> list[dict[str, Any]]:
    """One row per store of the archive (``local`` first, then each tier): url, snapshots with data
    there, stored bytes there (from the manifests: no tier is opened)."""
    table = archive.store.tier_table()
    rows: dict[str, dict[str, Any]] = {LOCAL: {"tier": LOCAL, "url": archive.location, "snapshots": 0,
                                               "stored_bytes": 0}}
    for name, entry in sorted(table.items()):
        rows[name] = {"tier": name, "url": entry["url"], "snapshots": 0, "stored_bytes": 0,
                      "options": sorted(entry.get("options", {}))}
    for sid in archive.snapshots():
        seen = set()
        for s in archive.manifest(sid).streams:
            name = s.tier or LOCAL
            row = rows.setdefault(name, {"tier": name, "url": None, "snapshots": 0, "stored_bytes": 0,
                                         "missing": True})
            row["stored_bytes"] += s.stored
            if name not in seen:
                row["snapshots"] += 1
                seen.add(name)
    return list(rows.values())
