"""The ``gpupas`` command line: a thin layer over :mod:`gpupas.repo`.

Every command takes ``--archive/-A`` (default: ``$GPUPAS_ARCHIVE``, else ``./gpupas-archive``);
every read command takes ``--json`` (one JSON document on stdout). Exit codes, stable for
scripts: 0 ok; 1 not found (version, tag, snapshot, archive); 2 bad usage or bad input (nothing
was changed); 3 integrity error (damaged data found); 4 other failures (missing optional
backend, I/O, catalog). Errors are one line on stderr: ``error: <what and how to fix it>``.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from gpupas.errors import (
    ArchiveExistsError,
    ArchiveNotFoundError,
    GpupasError,
    IntegrityError,
    InvalidInputError,
    SnapshotNotFoundError,
    UnsupportedDtypeError,
)

OK, NOT_FOUND, BAD_INPUT, INTEGRITY, FAILURE = 0, 1, 2, 3, 4
DEFAULT_ARCHIVE = "gpupas-archive"

app = typer.Typer(
    name="gpupas", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Versions, lineage and compact storage of deep-learning checkpoints (ModelHub's dlv + PAS).\n\n"
         "Archive: --archive/-A, else $GPUPAS_ARCHIVE, else ./gpupas-archive. Exit codes: 0 ok, 1 not found, "
         "2 bad input, 3 integrity error, 4 other failure.",
)
out = Console(highlight=False, soft_wrap=False)
err = Console(stderr=True, highlight=False)

ArchiveOpt = Annotated[Path | None, typer.Option("--archive", "-A", envvar="GPUPAS_ARCHIVE", show_envvar=True,
                                                 help="Archive directory (default: ./gpupas-archive).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")]
SnapOpt = Annotated[str | None, typer.Option("--snapshot", "-s", help="latest (default), best, 1-based index or id.")]
F = TypeVar("F", bound=Callable[..., Any])


def _exit_code(exc: BaseException) -> int:
    from gpupas.errors import VersionNotFoundError

    if isinstance(exc, (VersionNotFoundError, SnapshotNotFoundError, ArchiveNotFoundError)):
        return NOT_FOUND
    if isinstance(exc, IntegrityError):
        return INTEGRITY
    if isinstance(exc, (InvalidInputError, UnsupportedDtypeError, ArchiveExistsError)):
        return BAD_INPUT
    return FAILURE


def _command(fn: F) -> F:
    """Turn library errors into one ``error:`` line and a stable exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return fn(*args, **kwargs)
            except (typer.Exit, typer.Abort, SystemExit):
                raise
            except (GpupasError, OSError, sqlite3.Error) as exc:
                msg = str(exc) or type(exc).__name__
                if isinstance(exc, OSError) and not isinstance(exc, GpupasError):
                    msg = f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)
                err.print("error: " + " ".join(msg.split()), markup=False, soft_wrap=True)  # one line
                raise typer.Exit(_exit_code(exc)) from None
            except KeyboardInterrupt:
                err.print("error: interrupted; nothing half-written is visible", markup=False)
                raise typer.Exit(130) from None
            except Exception as exc:  # a bug or an unforeseen state: never exit 1 ("not found")
                err.print(f"error: unexpected {type(exc).__name__}: {' '.join(str(exc).split())}; please "
                          "report it with the command that failed", markup=False, soft_wrap=True)
                raise typer.Exit(FAILURE) from None
            finally:
                for w in caught:
                    err.print(f"warning: {w.message}", markup=False, soft_wrap=True)

    return wrapper  # type: ignore[return-value]


def _location(archive: Path | None) -> Path:
    return archive if archive is not None else Path(DEFAULT_ARCHIVE)


@contextmanager
def _repo(archive: Path | None) -> Iterator[Any]:
    from gpupas.repo import open_repository

    repo = open_repository(_location(archive))
    try:
        yield repo
    finally:
        repo.close()


@contextmanager
def _progress(what: str) -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar on stderr (only on a terminal) fed by the library's progress callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=err, transient=True, disable=not err.is_terminal)
    with bar:
        task = bar.add_task(what, total=None)

        def update(desc: str, done: int, total: int) -> None:
            bar.update(task, description=desc, completed=done, total=total)

        yield update


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=1, default=str))


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _pct(stored: float | None, raw: float | None) -> str:
    return f"{100 * stored / raw:.1f}%" if raw and stored is not None else "-"


def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _kv(pairs: list[str], what: str) -> dict[str, Any]:
    """KEY=VALUE strings; values parse as JSON where they can (0.1, true, [1,2]), else stay strings."""
    outd: dict[str, Any] = {}
    for p in pairs:
        key, sep, val = p.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"{what} {p!r} must look like KEY=VALUE")
        try:
            outd[key] = json.loads(val)
        except json.JSONDecodeError:
            outd[key] = val
    return outd


def _json_file(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidInputError(f"{what} file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{what} file {path} is not JSON: {exc}") from None


def _hparams(hp: list[str], hparams: Path | None) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if hparams is not None:
        loaded = _json_file(hparams, "hyperparameters")
        if not isinstance(loaded, dict):
            raise InvalidInputError(f"hyperparameters file {hparams} must hold a JSON object")
        d |= loaded
    return d | _kv(hp, "--hp")


def _version_summary(v: Any) -> dict[str, Any]:
    return {"id": v.id, "name": v.name, "parents": v.parents, "snapshots": len(v.snapshots), "latest": v.latest,
            "best": v.best, "created": v.created}


# -- versions ---------------------------------------------------------------------------------------
@app.command()
@_command
def init(path: Annotated[Path | None, typer.Argument(help="Where to create the archive.")] = None,
         archive: ArchiveOpt = None) -> None:
    """Create an empty archive."""
    from gpupas.repo import create_repository

    loc = path or _location(archive)
    with create_repository(loc) as repo:
        out.print(f"created archive {repo.location}", markup=False)


@app.command()
@_command
def commit(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoint files (.safetensors, .pt, .pth, .bin, .ckpt) "
                                                           "or directories of them: the version's snapshots.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Version name (letters, digits, . _ -).")],
    parent: Annotated[list[str] | None, typer.Option("--parent", "-p", help="Parent version (id, tag or name); "
                                                                            "repeat for several.")] = None,
    message: Annotated[str, typer.Option("--message", "-m")] = "",
    author: Annotated[str | None, typer.Option(help="Default: $GPUPAS_AUTHOR or the user name.")] = None,
    hp: Annotated[list[str] | None, typer.Option("--hp", help="Hyperparameter KEY=VALUE (JSON values).")] = None,
    hparams: Annotated[Path | None, typer.Option(help="Hyperparameters from a JSON file.")] = None,
    metrics: Annotated[Path | None, typer.Option(help="Training log: CSV, JSON or JSON lines.")] = None,
    metric: Annotated[list[str] | None, typer.Option("--metric", help="Final metric NAME=VALUE.")] = None,
    file: Annotated[list[Path] | None, typer.Option("--file", "-f", help="A file or directory to keep with the "
                                                                         "version; repeatable.")] = None,
    network: Annotated[Path | None, typer.Option(help="Network definition JSON (default: from tensor names).")] = None,
    best_by: Annotated[str | None, typer.Option(help="Mark the best snapshot by a metric: accuracy, loss:min.")] = None,
    setting: Annotated[str, typer.Option(help="Encoder setting: fast, default, strong.")] = "default",
    archive: ArchiveOpt = None, as_json: JsonOpt = False,
) -> None:
    """Commit checkpoints as a new version (a directory: its files become time-ordered snapshots)."""
    from gpupas.repo import checkpoint_files, normalize_metrics, step_of

    paths = [p for c in checkpoints for p in checkpoint_files(c)]  # checked before anything is written
    series = normalize_metrics(metrics) if metrics is not None else {}
    if metric:
        last_step = step_of(paths[-1]) if paths else None
        for k, v in _kv(metric, "--metric").items():
            series.setdefault(k, []).extend(normalize_metrics({k: [[last_step or 0, v]]})[k])
    net = _json_file(network, "network") if network is not None else None
    if net is not None:
        from gpupas.network import Network

        net = Network.from_dict(net)
    with _repo(archive) as repo, _progress("commit") as progress:
        v = repo.commit(name, paths, parents=parent or [], message=message, author=author,
                        hyperparameters=_hparams(hp or [], hparams), metrics=series, files=file or [], network=net,
                        best_by=best_by, setting=setting, progress=progress)
    if as_json:
        _print_json(v.to_dict())
        return
    raw = sum(s["raw_bytes"] for s in v.snapshots)
    stored = sum(s["stored_bytes"] for s in v.snapshots)
    out.print(f"committed version {v.id} ({v.name}): {len(v.snapshots)} snapshot(s), {_size(raw)} -> {_size(stored)}"
              f" ({_pct(stored, raw)})" + (f", parents {', '.join(map(str, v.parents))}" if v.parents else ""),
              markup=False)


@app.command("import")
@_command
def import_(
    folder: Annotated[Path, typer.Argument(help="Directory of checkpoint files, taken in natural name order.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Name of the versions.")],
    parent: Annotated[str | None, typer.Option("--parent", "-p", help="Parent of the first version.")] = None,
    message: Annotated[str, typer.Option("--message", "-m")] = "",
    author: Annotated[str | None, typer.Option()] = None,
    hp: Annotated[list[str] | None, typer.Option("--hp", help="Hyperparameter KEY=VALUE.")] = None,
    hparams: Annotated[Path | None, typer.Option(help="Hyperparameters from a JSON file.")] = None,
    metrics: Annotated[Path | None, typer.Option(help="Training log (CSV/JSON): each version gets the points up "
                                                      "to its step.")] = None,
    file: Annotated[list[Path] | None, typer.Option("--file", "-f")] = None,
    setting: Annotated[str, typer.Option(help="Encoder setting: fast, default, strong.")] = "default",
    archive: ArchiveOpt = None, as_json: JsonOpt = False,
) -> None:
    """Import a folder of existing checkpoints as a lineage chain (one version per file)."""
    from gpupas.repo import checkpoint_files

    checkpoint_files(folder)
    with _repo(archive) as repo, _progress("import") as progress:
        versions = repo.import_folder(folder, name, parent=parent, hyperparameters=_hparams(hp or [], hparams),
                                      metrics=metrics, files=file or [], message=message, author=author,
                                      setting=setting, progress=progress)
    if as_json:
        _print_json([_version_summary(v) for v in versions])
        return
    raw = sum(s["raw_bytes"] for v in versions for s in v.snapshots)
    stored = sum(s["stored_bytes"] for v in versions for s in v.snapshots)
    out.print(f"imported {len(versions)} versions of {name}: {versions[0].id}..{versions[-1].id}, "
              f"{_size(raw)} -> {_size(stored)} ({_pct(stored, raw)})", markup=False)


@app.command()
@_command
def copy(ref: Annotated[str, typer.Argument(help="Version to copy (id, tag or name).")],
         name: Annotated[str, typer.Option("--name", "-n", help="Name of the new version.")],
         message: Annotated[str, typer.Option("--message", "-m")] = "",
         archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Scaffold a new version from an old one (same network, hyperparameters, files and weights)."""
    with _repo(archive) as repo:
        v = repo.copy(ref, name, message=message)
    if as_json:
        _print_json(v.to_dict())
    else:
        out.print(f"created version {v.id} ({v.name}) from version {v.parents[0]}", markup=False)


@app.command()
@_command
def tag(tag_name: Annotated[str | None, typer.Argument(metavar="TAG", help="Tag name; none: list tags.")] = None,
        ref: Annotated[str | None, typer.Argument(help="Version to tag (id, tag or name).")] = None,
        delete: Annotated[bool, typer.Option("--delete", "-d", help="Delete the tag.")] = False,
        force: Annotated[bool, typer.Option("--force", help="Move an existing tag.")] = False,
        archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Tag a version (gpupas tag v1.0 3), delete a tag (-d), or list tags (no arguments)."""
    with _repo(archive) as repo:
        if tag_name is None:
            tags = repo.tags()
            if as_json:
                _print_json(tags)
            else:
                for t, vid in tags.items():
                    out.print(f"{t}\t{vid}", markup=False)
            return
        if delete:
            vid = repo.untag(tag_name)
            msg = f"deleted tag {tag_name} (was version {vid})"
        else:
            if ref is None:
                raise InvalidInputError("give the version to tag: gpupas tag TAG VERSION")
            vid = repo.tag(tag_name, ref, force=force)
            msg = f"tagged version {vid} as {tag_name}"
    if as_json:
        _print_json({"tag": tag_name, "version": vid, "deleted": delete})
    else:
        out.print(msg, markup=False)


# -- exploration ----------------------------------------------------------------------------------------
def _label(r: dict[str, Any]) -> str:
    tags = f" [bold yellow]({escape(', '.join(r['tags']))})[/]" if r["tags"] else ""
    parents = f" ← {', '.join(f'#{p}' for p in r['parents'])}" if r["parents"] else ""
    msg = f"  [dim]{escape(r['message'])}[/]" if r["message"] else ""
    return (f"[bold cyan]#{r['id']}[/] {escape(r['name'])}{tags}{parents}  {r['n_snapshots']} snap  "
            f"{_size(r['stored_bytes'])} ({_pct(r['stored_bytes'], r['raw_bytes'])})  "
            f"{r['created'][:16].replace('T', ' ')}{msg}")


def _log(ref: str | None, archive: Path | None, as_json: bool) -> None:
    with _repo(archive) as repo:
        rows = repo.lineage()
        if ref is not None:  # the versions connected to ref: ancestors and descendants
            vid = repo.resolve(ref)
            by_id = {r["id"]: r for r in rows}
            children: dict[int, list[int]] = {}
            for r in rows:
                for p in r["parents"]:
                    children.setdefault(p, []).append(r["id"])
            keep, stack = set(), [vid]
            while stack:
                x = stack.pop()
                if x not in keep and x in by_id:
                    keep.add(x)
                    stack += by_id[x]["parents"]
            stack, below = [vid], set()
            while stack:
                x = stack.pop()
                if x not in below:
                    below.add(x)
                    stack += children.get(x, [])
            keep |= below
            rows = [r for r in rows if r["id"] in keep]
        location = repo.location
    if as_json:
        _print_json(rows)
        return
    if not rows:
        out.print("no versions yet; add one with `gpupas commit` or `gpupas import`", markup=False)
        return
    by_id = {r["id"]: r for r in rows}
    kids: dict[int, list[int]] = {}
    roots = []
    for r in rows:
        first = next((p for p in r["parents"] if p in by_id), None)
        if first is None:
            roots.append(r["id"])
        else:
            kids.setdefault(first, []).append(r["id"])
    tree = Tree(f"[bold]{location}[/]")

    todo = [(r, tree) for r in reversed(roots)]  # a loop, not recursion: chains can be long
    while todo:
        vid, container = todo.pop()
        item = container.add(_label(by_id[vid]))
        ks = kids.get(vid, [])
        if len(ks) == 1:  # a straight line of work stays at one level; branches indent
            todo.append((ks[0], container))
        else:
            todo.extend((k, item) for k in reversed(ks))
    out.print(tree)


@app.command()
@_command
def log(ref: Annotated[str | None, typer.Argument(help="Only versions connected to this one.")] = None,
        archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Versions and their lineage as a tree (a straight chain stays at one level, branches indent)."""
    _log(ref, archive, as_json)


@app.command("list")
@_command
def list_(ref: Annotated[str | None, typer.Argument(help="Only versions connected to this one.")] = None,
          archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Same as log."""
    _log(ref, archive, as_json)


_MAX_NODES = 25
_SHOWN_ATTRS = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride", "num_features",
                "normalized_shape", "num_embeddings", "embedding_dim", "p")


def _show(ref: str, snapshot: str | None, tensors: bool, network: bool, archive: Path | None, as_json: bool) -> None:
    with _repo(archive) as repo:
        d = repo.describe(ref, snapshot)
    if as_json:
        _print_json(d)
        return
    p = functools.partial(out.print, markup=False)
    p(f"version {d['id']}  {d['name']}" + (f"  tags: {', '.join(d['tags'])}" if d["tags"] else ""))
    p(f"  parents: {', '.join(map(str, d['parents'])) or '-'}   children: {', '.join(map(str, d['children'])) or '-'}")
    p(f"  author: {d.get('author')}   created: {d['created']}"
      + (f"   updated: {d['updated']}" if "updated" in d else ""))
    if d.get("message"):
        p(f"  message: {d['message']}")
    t = Table(title="snapshots", title_justify="left")
    for c in ("#", "id", "step", "source", "raw", "stored", "%", ""):
        t.add_column(c, justify="right" if c in ("#", "step", "raw", "stored", "%") else "left")
    for i, s in enumerate(d["snapshots"], 1):
        marks = " ".join(m for m, sid in (("latest", d["latest"]), ("best", d["best"])) if sid == s["id"])
        t.add_row(str(i), s["id"], _num(s.get("step")), s.get("source") or "", _size(s["raw_bytes"]),
                  _size(s["stored_bytes"]), _pct(s["stored_bytes"], s["raw_bytes"]), marks)
    out.print(t)
    if d["hyperparameters"]:
        from gpupas.catalog import flatten

        t = Table(title="hyperparameters", title_justify="left")
        t.add_column("key")
        t.add_column("value")
        for k, v in flatten(d["hyperparameters"]).items():
            t.add_row(k, json.dumps(v))
        out.print(t)
    if d["metrics"]:
        t = Table(title="metrics", title_justify="left")
        for c in ("name", "points", "first step", "last step", "last", "min", "max"):
            t.add_column(c, justify="left" if c == "name" else "right")
        for k, series in d["metrics"].items():
            vals = [v for _, v in series if v is not None]
            steps = [_num(series[0][0]), _num(series[-1][0])] if series else ["-", "-"]
            summary = [_num(vals[-1]), _num(min(vals)), _num(max(vals))] if vals else ["-", "-", "-"]
            t.add_row(k, str(len(series)), *steps, *summary)
        out.print(t)
    if d["files"]:
        t = Table(title="files", title_justify="left")
        t.add_column("name")
        t.add_column("size", justify="right")
        t.add_column("sha256")
        for k, f in d["files"].items():
            t.add_row(k, _size(f["size"]), f["sha256"][:16])
        out.print(t)
    net = d.get("network") or {}
    nodes = net.get("nodes", [])
    types: dict[str, int] = {}
    for n in nodes:
        types[n["type"]] = types.get(n["type"], 0) + 1
    p(f"network: {len(nodes)} nodes, {len(net.get('edges', []))} edges (from {net.get('source', 'none')}): "
      + " ".join(f"{t}×{c}" if c > 1 else t for t, c in sorted(types.items(), key=lambda x: -x[1])))
    if nodes and (network or len(nodes) <= _MAX_NODES):
        names = {n["id"]: n["name"] for n in nodes}
        nxt: dict[int, list[str]] = {}
        for a, b in net.get("edges", []):
            nxt.setdefault(a, []).append(names[b])
        t = Table()
        for c in ("node", "type", "next", "attributes"):
            t.add_column(c)
        for n in nodes:
            attrs = {k: v for k, v in n.get("attrs", {}).items() if k in _SHOWN_ATTRS}
            t.add_row(n["name"], n["type"], ", ".join(nxt.get(n["id"], [])),
                      " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in attrs.items()))
        out.print(t)
    if d.get("snapshot"):
        s = d["snapshot"]
        p(f"storage per layer, snapshot {s['index']} ({s['id']}, delta base {s['base'] or 'none'}):")
        t = Table()
        for c in ("layer", "type", "tensors", "params", "raw", "stored", "%", "encoding"):
            t.add_column(c, justify="right" if c in ("tensors", "params", "raw", "stored", "%") else "left")
        for r in d["layers"]:
            t.add_row(r["layer"], r["type"], str(r["tensors"]), f"{r['params']:,}", _size(r["raw_bytes"]),
                      _size(r["stored_bytes"]), _pct(r["stored_bytes"], r["raw_bytes"]),
                      " ".join(f"{k}×{n}" if n > 1 else k for k, n in r["enc"].items()))
        raw = sum(r["raw_bytes"] for r in d["layers"])
        stored = sum(r["stored_bytes"] for r in d["layers"])
        count, params = sum(r["tensors"] for r in d["layers"]), sum(r["params"] for r in d["layers"])
        t.add_row("total", "", str(count), f"{params:,}", _size(raw), _size(stored), _pct(stored, raw), "",
                  style="bold")
        out.print(t)
        if tensors:
            t = Table(title="tensors", title_justify="left")
            for c in ("name", "dtype", "shape", "enc", "raw", "stored", "%", "per plane"):
                t.add_column(c, justify="right" if c in ("raw", "stored", "%") else "left")
            for r in d["tensors"]:
                enc = r["enc"] + ("+ctx" if r["ctx"] else "")
                t.add_row(r["name"], r["dtype"], "x".join(map(str, r["shape"])), enc, _size(r["nbytes"]),
                          _size(r["stored"]), _pct(r["stored"], r["nbytes"]), " ".join(_size(x) for x in r["planes"]))
            out.print(t)


@app.command()
@_command
def show(ref: Annotated[str, typer.Argument(help="Version: id, tag or name (its newest version).")],
         snapshot: SnapOpt = None,
         tensors: Annotated[bool, typer.Option("--tensors", "-t", help="Also list every tensor.")] = False,
         network: Annotated[bool, typer.Option("--network", "-N", help="List every network node (shown by "
                                                                        "default up to 25 nodes).")] = False,
         archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Metadata, network, sizes and per-layer storage of a version."""
    _show(ref, snapshot, tensors, network, archive, as_json)


@app.command()
@_command
def desc(ref: Annotated[str, typer.Argument(help="Version: id, tag or name.")], snapshot: SnapOpt = None,
         tensors: Annotated[bool, typer.Option("--tensors", "-t")] = False,
         network: Annotated[bool, typer.Option("--network", "-N")] = False,
         archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Same as show."""
    _show(ref, snapshot, tensors, network, archive, as_json)


@app.command()
@_command
def diff(a: Annotated[str, typer.Argument(help="First version.")],
         b: Annotated[str, typer.Argument(help="Second version.")],
         snapshot_a: Annotated[str | None, typer.Option("--snapshot-a")] = None,
         snapshot_b: Annotated[str | None, typer.Option("--snapshot-b")] = None,
         weights: Annotated[bool, typer.Option("--weights/--no-weights", help="Compare the weights too.")] = True,
         top: Annotated[int, typer.Option(help="Tensors to list, most changed first (0: all).")] = 10,
         archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Two versions side by side: network, hyperparameters, metrics and per-tensor weight changes."""
    with _repo(archive) as repo:
        d = repo.diff(a, b, snapshot_a=snapshot_a, snapshot_b=snapshot_b, weights=weights)
    if as_json:
        _print_json(d)
        return
    p = functools.partial(out.print, markup=False)
    p(f"diff version {d['a']['id']} ({d['a']['name']}) -> version {d['b']['id']} ({d['b']['name']})")
    n = d["network"]
    if any(n.values()):
        p(f"network: +{len(n['added'])} layers, -{len(n['removed'])} layers, {len(n['changed'])} changed, "
          f"+{len(n['edges_added'])}/-{len(n['edges_removed'])} edges")
        for x in n["added"]:
            p(f"  + {x['name']} ({x['type']})")
        for x in n["removed"]:
            p(f"  - {x['name']} ({x['type']})")
        for x in n["changed"]:
            p(f"  ~ {x['name']} {x['type']}: " + ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in x["attrs"].items()))
    else:
        p("network: same")
    if d["hyperparameters"]:
        t = Table(title="hyperparameters", title_justify="left")
        for c in ("key", "a", "b"):
            t.add_column(c)
        for k, (x, y) in d["hyperparameters"].items():
            t.add_row(k, json.dumps(x), json.dumps(y))
        out.print(t)
    else:
        p("hyperparameters: same")
    if d["metrics"]:
        t = Table(title="metrics (last value)", title_justify="left")
        for c in ("metric", "a", "b"):
            t.add_column(c, justify="left" if c == "metric" else "right")
        for k, (x, y) in d["metrics"].items():
            t.add_row(k, _num(x), _num(y))
        out.print(t)
    for k, (x, y) in d["files"].items():
        p(f"file {k}: {(x or '-')[:12]} -> {(y or '-')[:12]}")
    w = d.get("weights")
    if w:
        rows = sorted(w["tensors"], key=lambda r: -(r.get("rel_l2") or 0.0))
        p(f"weights: {len(rows)} common tensors, {w['identical']} identical, overall relative L2 change "
          f"{w['rel_l2']:.4g}; most changed first:")
        t = Table()
        for c in ("tensor", "shape", "changed", "max |Δ|", "mean |Δ|", "rel L2"):
            t.add_column(c, justify="left" if c in ("tensor", "shape") else "right")
        for r in rows[: top or None]:
            if isinstance(r["shape"][0], list):
                t.add_row(r["name"], f"{r['shape'][0]} -> {r['shape'][1]}", "-", "-", "-", "-")
                continue
            t.add_row(r["name"], "x".join(map(str, r["shape"])), f"{100 * r['changed']:.1f}%",
                      _num(r.get("max_abs")), _num(r.get("mean_abs")), _num(r.get("rel_l2")))
        out.print(t)
        for k in w["added"]:
            p(f"  + tensor {k}")
        for k in w["removed"]:
            p(f"  - tensor {k}")


@app.command()
@_command
def query(statement: Annotated[str, typer.Argument(help='DQL select, e.g. \'select m where m.name like "cnn%" and '
                                                        'm.hp.lr < 0.01 and m["conv[1-3]"].next has POOL("MAX")\'')],
          archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Select versions with DQL: name, time, hyperparameter, metric and network conditions.

    Fields: m.id m.name m.created m.author m.message m.snapshots m.parent m.tag m.hp.KEY
    m.metric.NAME[.last|.min|.max|.count]; layer predicates: m["regex"] [.next|.prev] has POOL("MAX"),
    CONV, FC, NORM("batch"), RELU, TYPE("MaxPool2d"); and / or / not / parentheses; order by m.FIELD
    [desc]; limit N.
    """
    with _repo(archive) as repo:
        rows = repo.query(statement)
    if as_json:
        _print_json(rows)
        return
    t = Table()
    for c in ("id", "name", "parents", "snapshots", "stored", "created", "message"):
        t.add_column(c, justify="right" if c in ("id", "snapshots", "stored") else "left")
    for r in rows:
        t.add_row(str(r["id"]), r["name"], ", ".join(map(str, r["parents"])) or "-", str(r["n_snapshots"]),
                  _size(r["stored_bytes"]), r["created"][:19].replace("T", " "), r["message"] or "")
    out.print(t)
    err.print(f"{len(rows)} version(s)", markup=False)


# -- weights out ----------------------------------------------------------------------------------------------
@app.command()
@_command
def checkout(ref: Annotated[str, typer.Argument(help="Version: id, tag or name.")],
             output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write (empty or new).")],
             snapshot: SnapOpt = None,
             fmt: Annotated[str, typer.Option("--format", help="safetensors or torch.")] = "safetensors",
             force: Annotated[bool, typer.Option("--force", help="Write into a non-empty directory.")] = False,
             archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Write a version's weights, files and metadata (gpupas-version.json) to a directory."""
    if fmt not in ("safetensors", "torch"):
        raise InvalidInputError(f"--format must be safetensors or torch, not {fmt!r}")
    with _repo(archive) as repo:
        paths = repo.checkout(ref, output, snapshot=snapshot, format=fmt, force=force)
    if as_json:
        _print_json([str(x) for x in paths])
    else:
        out.print(f"checked out to {output}: " + ", ".join(str(x.relative_to(output.resolve()) if x.is_absolute()
                                                              else x.relative_to(output)) for x in paths), markup=False)


@app.command()
@_command
def export(ref: Annotated[str, typer.Argument(help="Version: id, tag or name.")],
           output: Annotated[Path, typer.Option("--output", "-o", help="File: .safetensors, or .pt/.pth for torch.")],
           snapshot: SnapOpt = None,
           fmt: Annotated[str | None, typer.Option("--format", help="safetensors or torch (default: suffix).")] = None,
           force: Annotated[bool, typer.Option("--force", help="Overwrite the file.")] = False,
           archive: ArchiveOpt = None) -> None:
    """Write a version's weights to one safetensors or torch file."""
    with _repo(archive) as repo:
        path = repo.export(ref, output, snapshot=snapshot, format=fmt, force=force)
    out.print(f"exported to {path}", markup=False)


# -- archive-wide -------------------------------------------------------------------------------------
@app.command()
@_command
def verify(refs: Annotated[list[str] | None, typer.Argument(help="Versions to check (default: everything).")] = None,
           archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Re-read and check every chunk, tensor and file; exit code 3 if anything is damaged."""
    with _repo(archive) as repo, _progress("verify") as progress:
        result = repo.verify(refs or None, progress=progress)
    if as_json:
        _print_json(result)
    else:
        c = result["checked"]
        summary = (f"{c['versions']} versions, {c['snapshots']} snapshots, {c['tensors']} tensors, "
                   f"{c['files']} files checked")
        if result["ok"]:
            out.print(f"ok: {summary}", markup=False)
        else:
            for problem in result["problems"]:
                err.print(f"damaged: {problem}", markup=False, soft_wrap=True)
            err.print(f"error: {len(result['problems'])} problem(s) in {summary}; restore the damaged parts from a "
                      "copy", markup=False)
    if not result["ok"]:
        raise typer.Exit(INTEGRITY)


@app.command()
@_command
def stats(archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """What the archive stores, how it is encoded, and what that saves."""
    with _repo(archive) as repo:
        s = repo.stats()
    if as_json:
        _print_json(s)
        return
    p = functools.partial(out.print, markup=False)
    p(f"archive {s['location']}: {s['versions']} versions ({s['names']} names, {s['tags']} tags), "
      f"{s['snapshots']} snapshots, {s['tensors']} tensors")
    p(f"weights: {_size(s['raw_bytes'])} raw -> {_size(s['stored_bytes'])} stored "
      f"({_pct(s['stored_bytes'], s['raw_bytes'])}), saves {_size(s['saved_bytes'])}")
    p("encodings: mat = stored whole, sub/xor = delta to the base snapshot")
    for key, col in (("by_encoding", "enc"), ("by_dtype", "dtype")):
        t = Table()
        for c in (col, "tensors", "raw", "stored", "%"):
            t.add_column(c, justify="left" if c == col else "right")
        for r in s[key]:
            t.add_row(r[col], str(r["tensors"]), _size(r["raw_bytes"]), _size(r["stored_bytes"]),
                      _pct(r["stored_bytes"], r["raw_bytes"]))
        out.print(t)
    f = s["files"]
    p(f"files: {f['references']} references to {f['blobs']} stored blobs, {_size(f['logical_bytes'])} -> "
      f"{_size(f['stored_bytes'])} (deduplication saves {_size(f['saved_bytes'])})")
    if s["unreferenced_snapshots"] or s["incomplete_snapshots"]:
        p(f"not part of any version: {len(s['unreferenced_snapshots'])} complete and "
          f"{len(s['incomplete_snapshots'])} incomplete snapshot(s) (interrupted commits or plain Archive use)")
    p(f"on disk: {_size(s['disk_bytes'])} in all (chunks, manifests, records, files, catalog)")


@app.command()
@_command
def gc(min_age: Annotated[float, typer.Option("--min-age", help="Only folders untouched for this many seconds "
                                                               "(commits in progress stay safe).")] = 3600.0,
       archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Delete the chunk folders of interrupted commits (never visible, listed by `stats`)."""
    with _repo(archive) as repo:
        removed = repo.archive.gc(min_age)
    if as_json:
        _print_json({"removed": removed})
    else:
        out.print(f"removed {len(removed)} incomplete snapshot folder(s)", markup=False)


@app.command()
@_command
def reindex(archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Rebuild the SQLite catalog from the archive's records and manifests."""
    with _repo(archive) as repo:
        counts = repo.reindex()
    if as_json:
        _print_json(counts)
    else:
        out.print("catalog rebuilt: " + ", ".join(f"{v} {k}" for k, v in counts.items()), markup=False)


def main() -> None:
    """Entry point of the ``gpupas`` script."""
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        sys.exit(130)


if __name__ == "__main__":
    main()
