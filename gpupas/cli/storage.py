"""``gpupas tier`` (add, list, move, remove) and ``gpupas inspect``: where planes live, and what is stored.

Registered on :data:`gpupas.cli.app.app` by importing this module. ``tier move`` calls
:func:`gpupas.tiers.move_many`; ``inspect`` prints the records of :mod:`gpupas.inspect` (the same
rows the notebooks plot).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from gpupas.cli import render
from gpupas.cli.app import ArchiveOpt, JsonOpt, SnapOpt, _command, _kv, _location, _out, _repo, app
from gpupas.errors import IntegrityError, InvalidInputError

tier_app = typer.Typer(no_args_is_help=True, help=(
    "Storage tiers: keep the low-order planes of chosen snapshots in a second store (a directory or S3 "
    "through fsspec) while the high-order planes stay in the archive."))
app.add_typer(tier_app, name="tier")

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="Tier name (letters, digits, . _ -; not 'local').")]


@tier_app.command("add")
@_command
def tier_add(name: NameArg,
             url: Annotated[str, typer.Argument(metavar="URL", help=(
                 "Where the tier lives: a directory, or an fsspec URL such as s3://bucket/prefix."))],
             option: Annotated[list[str] | None, typer.Option("--option", "-o", metavar="KEY=VALUE", help=(
                 "A storage option (JSON values), e.g. endpoint_url=http://host:9000; repeatable. Keys, secrets "
                 "and tokens are never written: give them in $GPUPAS_TIER_OPTIONS_<NAME> (JSON) or the "
                 "filesystem's own variables (AWS_ACCESS_KEY_ID...)."))] = None,
             force: Annotated[bool, typer.Option("--force", help=(
                 "Point an existing tier at a new location that holds a copy of its data, or add a removed tier "
                 "back at the location that still holds it."))] = False,
             archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Define a storage tier (creates its root at URL)."""
    from gpupas.archive import open_archive

    with open_archive(_location(archive)) as a:
        entry = a.add_tier(name, url, _kv(option or [], "--option"), force=force)
    if as_json:
        _out().json({"tier": name, **entry})
    else:
        _out().line(f"tier {name} at {entry['url']}")


@tier_app.command("list")
@_command
def tier_list(archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """The archive's stores (local, then each tier): location and what is stored there."""
    from gpupas.archive import open_archive
    from gpupas.tiers import summary

    with open_archive(_location(archive)) as a:
        rows = summary(a)
    if as_json:
        _out().json(rows)
        return
    t = render.table(["tier", "location", "snapshots", "stored", "written options"],
                     right=["snapshots", "stored"])
    for r in rows:
        render.row(t, r["tier"], r["url"] or "(not defined: add it)", r["snapshots"], render.size(r["stored_bytes"]),
                   ", ".join(r.get("options", [])) or "-")
    _out().table(t)


@tier_app.command("move")
@_command
def tier_move(refs: Annotated[list[str], typer.Argument(metavar="VERSION", help=(
                  "Versions (id, tag or name) whose snapshots to move; every snapshot unless --snapshot."))],
              to: Annotated[str, typer.Option("--to", metavar="TIER", help=(
                  "The tier that gets the low-order planes, or 'local' to bring them back."))],
              planes_from: Annotated[int | None, typer.Option("--planes-from", metavar="K", help=(
                  "Planes K and below in significance go to the tier (0 = most significant byte); default 2, "
                  "or with --to local: the planes where they are."))] = None,
              snapshot: Annotated[str | None, typer.Option("--snapshot", "-s", metavar="SNAPSHOT", help=(
                  "Only this snapshot of each version (best, latest, a 1-based index or an id); default: all."
              ))] = None,
              archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Move planes of snapshots between the archive and a tier (an atomic, bit-checked revision each)."""
    from gpupas.tiers import LOCAL, move_many

    if planes_from is None and to != LOCAL:
        planes_from = 2
    with _repo(archive) as repo:
        sids: list[str] = []
        for ref in refs:
            v = repo.version(ref)
            picked = [v.snapshot(snapshot)] if snapshot is not None else v.snapshots
            sids += [s["id"] for s in picked if s["id"] not in sids]
        if not sids:
            raise InvalidInputError("those versions have no snapshots to move")
        rows = move_many(repo.archive, sids, planes_from=planes_from, to=to)
    o = _out()
    if as_json:
        o.json(rows)
        return
    for r in rows:
        where = ", ".join(f"{render.size(n)} in {k}" for k, n in r["tiers"].items()) or "nothing in tiers"
        verb = "moved" if r["changed"] else "already in place:"
        o.data(f"{verb} {r['snapshot']}: {render.size(r['local'])} local, {where}")
    o.line(f"{sum(r['changed'] for r in rows)} of {len(rows)} snapshot(s) revised; old forms are garbage for "
           "`gpupas gc` after its grace period")


@tier_app.command("remove")
@_command
def tier_remove(name: NameArg, archive: ArchiveOpt = None) -> None:
    """Forget a tier (its data stays where it is: `tier add NAME URL --force` adds it back); refused while
    snapshots have planes there."""
    from gpupas.archive import open_archive

    with open_archive(_location(archive)) as a:
        a.remove_tier(name)
    _out().line(f"removed tier {name}")


# -- inspect -----------------------------------------------------------------------------------------------------
VIEWS: dict[str, list[tuple[str, str]]] = {  # columns shown: (record key, header)
    "snapshot": [("version", "version"), ("index", "#"), ("snapshot", "snapshot"), ("base", "base"),
                 ("depth", "depth"), ("delta_tensors", "deltas"), ("raw_bytes", "raw"), ("stored_bytes", "stored"),
                 ("ratio", "ratio"), ("local_bytes", "local"), ("tier_bytes", "in tiers")],
    "tensor": [("name", "tensor"), ("dtype", "dtype"), ("shape", "shape"), ("enc", "enc"), ("nbytes", "raw"),
               ("stored", "stored"), ("ratio", "ratio"), ("rows_coded", "rows coded"), ("tiers", "stores"),
               ("lossy", "lossy")],
    "layer": [("layer", "layer"), ("tensors", "tensors"), ("params", "params"), ("nbytes", "raw"),
              ("stored", "stored"), ("ratio", "ratio"), ("encodings", "encodings")],
    "plane": [("plane", "plane"), ("bytes", "raw"), ("stored", "stored"), ("bits_per_byte", "bits/byte"),
              ("entropy", "entropy"), ("tier", "stores")],
}
_SIZES = {"raw_bytes", "stored_bytes", "local_bytes", "tier_bytes", "nbytes", "stored", "bytes"}


@app.command()
@_command
def inspect(ref: Annotated[str, typer.Argument(metavar="VERSION", help="Version: id, tag or name (its newest).")],
            by: Annotated[str, typer.Option("--by", metavar="WHAT", help=(
                "One row per snapshot (of the version), tensor, layer or plane (of the snapshot given by --snapshot)."
                ))] = "layer",
            snapshot: SnapOpt = None,
            planes: Annotated[int | None, typer.Option("--planes", metavar="K", min=1, max=8, help=(
                "With --by plane only: the K most significant planes (reads only their chunks)."))] = None,
            archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """What a version's snapshots store: per snapshot, tensor, layer or plane (the records notebooks plot).
    --by snapshot lists a snapshot whose manifest cannot be read too, then exits 3."""
    from gpupas import inspect as records

    if by not in VIEWS:
        raise InvalidInputError(f"--by must be one of {', '.join(VIEWS)}, not {by!r}")
    if planes is not None and by != "plane":  # refused, not ignored (it changed nothing)
        raise InvalidInputError(f"--planes reads the top planes for --by plane; --by {by} reads no planes")
    if snapshot is not None and by == "snapshot":
        raise InvalidInputError("--by snapshot lists every snapshot of the version; leave out --snapshot, or pick "
                                "one snapshot's --by tensor, layer or plane")
    extras = 0  # --by plane: bytes of the snapshot in no plane
    with _repo(archive) as repo:
        v = repo.version(ref)
        sid = v.snapshot(snapshot)["id"]
        if by == "snapshot":
            rows = records.snapshots(repo, [s["id"] for s in v.snapshots])
        elif by == "tensor":
            rows = records.tensors(repo, sid)
        elif by == "layer":
            rows = records.layers(repo, sid)
        else:
            rows = records.plane_summary(repo, sid, planes=planes, entropy=True)
            extras = repo.archive.manifest(sid).stored_bytes - sum(r["stored"] for r in rows)
    damaged = [r for r in rows if r.get("damaged")]
    if as_json:
        _out().json(rows)
        _damaged(damaged)
        return
    cols = VIEWS[by]
    t = render.table([h for _, h in cols], right=[h for k, h in cols if k not in ("snapshot", "base", "name", "layer",
                                                                                 "dtype", "shape", "enc", "tiers",
                                                                                 "encodings", "tier", "lossy")],
                     title=f"version {v.id} ({v.name})" + ("" if by == "snapshot" else f", snapshot {sid}"))
    for r in rows:
        render.row(t, *(_cell(k, r.get(k)) for k, _ in cols))
    _out().table(t)
    if by == "plane" and planes is None and extras > 0:
        _out().note(f"row masks and 'pred' factors: {render.size(extras)} more, in no plane")
    _damaged(damaged)


def _damaged(rows: list[dict[str, Any]]) -> None:
    """After the rows are shown: what is wrong with the damaged ones, and the exit code a damaged archive has."""
    if rows:
        raise IntegrityError("; ".join(f"snapshot {r['snapshot']}: {r['damaged']}" for r in rows[:3])
                             + "; run `gpupas verify` for the whole archive")


def _cell(key: str, value: Any) -> str:
    if value is None or value == "":
        return "-"
    if key in _SIZES:
        return render.size(value)
    if key in ("ratio", "rows_coded"):
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


__all__ = ["inspect", "tier_app"]
