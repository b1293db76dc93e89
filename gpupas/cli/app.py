"""The ``gpupas`` commands: each parses its options, calls the library (a version command: the
:class:`~gpupas.versions.repository.Repository` method of the same name) and hands the result to
:mod:`~gpupas.cli.render`.

The archive is ``--archive/-A`` (before or after the command, as git's ``-C``), else
``$GPUPAS_ARCHIVE``, else ``./gpupas-archive``; every read command takes ``--json``. Exit codes,
stable for scripts: 0 ok; 1 not found; 2 bad usage or bad input (nothing changed); 3 damaged
data; 4 other failures (missing optional backend, I/O, catalog); 5 needs a newer gpupas; 130
interrupted; 141 the reader of the output went away (``gpupas log | head``: no message).
Errors are one line on stderr: ``error: <what happened and how to fix it>``.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
import typer.core

from gpupas.cli import render
from gpupas.errors import BAD_INPUT, FAILURE, INTEGRITY, GpupasError, InvalidInputError, exit_code

if TYPE_CHECKING:  # the library is imported by the commands that use it, not by `gpupas --help`
    from gpupas.versions.model import Version
    from gpupas.versions.repository import Repository

DEFAULT_ARCHIVE = "gpupas-archive"
SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for `git log | head`
F = TypeVar("F", bound=Callable[..., Any])
# Arguments are shown by their metavar alone (DIR, VERSION...), not followed by a Python type (<list[Path]>)
typer.core.TyperArgument.display_type_rich = lambda self, ctx: None  # type: ignore[method-assign, assignment]

app = typer.Typer(
    name="gpupas", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Versions, lineage and compact storage of deep-learning checkpoints (ModelHub's dlv + PAS).\n\n"
         "Archive: --archive/-A (before or after the command), else $GPUPAS_ARCHIVE, else ./gpupas-archive. "
         "Exit codes: 0 ok, 1 not found, 2 bad input, 3 damaged data, 4 other failure, 5 needs a newer gpupas.",
)


class State:
    archive: str | None = None  # a path or a URL (a Path would turn s3://b into s3:/b)
    quiet: bool = False


STATE = State()

GlobalArchiveOpt = Annotated[str | None, typer.Option(
    "--archive", "-A", envvar="GPUPAS_ARCHIVE", show_envvar=True, metavar="DIR",
    help="Archive directory or URL (default: ./gpupas-archive).")]
ArchiveOpt = Annotated[str | None, typer.Option(
    "--archive", "-A", metavar="DIR", help="Archive directory or URL (as before the command).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")]
SnapOpt = Annotated[str | None, typer.Option("--snapshot", "-s", metavar="SNAPSHOT",
                                             help="Which snapshot: latest (default), best, a 1-based index or an id.")]
RefArg = Annotated[str, typer.Argument(metavar="VERSION", help="Version: id, tag or name (its newest version).")]


def _version(value: bool) -> None:
    if value:
        from gpupas import __version__

        typer.echo(f"gpupas {__version__}")
        raise typer.Exit()


QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only requested data and errors.")]


@app.callback()
def main(archive: GlobalArchiveOpt = None, quiet: QuietOpt = False,
         version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False) -> None:
    """Versions, lineage and compact storage of deep-learning checkpoints (ModelHub's dlv + PAS)."""
    STATE.archive, STATE.quiet = archive, quiet


def _out() -> render.Output:
    return render.Output(quiet=STATE.quiet)


def _command(fn: F) -> F:
    """Turn library errors into one ``error:`` line and a stable exit code; and take ``--quiet/-q`` after the
    command too (``gpupas verify -q``, as before it), as ``--archive/-A`` is."""

    @functools.wraps(fn)
    def wrapper(*args: Any, quiet: bool = False, **kwargs: Any) -> Any:
        STATE.quiet = STATE.quiet or quiet
        o = _out()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return fn(*args, **kwargs)
            except (typer.Exit, typer.Abort, SystemExit):
                raise
            except render.OutputGone:  # `gpupas log | head`: stop quietly, as a program killed by SIGPIPE
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (nothing to flush at exit)
                raise typer.Exit(SIGPIPE_EXIT) from None
            except Exception as exc:
                if not isinstance(exc, (GpupasError, OSError)) and type(exc).__module__ != "sqlite3":
                    o.error(f"unexpected {type(exc).__name__}: {exc}; please report it with the command that failed")
                    raise typer.Exit(FAILURE) from None
                msg = str(exc) or type(exc).__name__
                if isinstance(exc, OSError) and not isinstance(exc, GpupasError):
                    msg = f"{exc.strerror or exc}: {exc.filename}" if exc.filename else exc.strerror or str(exc)
                o.error(msg)
                raise typer.Exit(exit_code(exc)) from None
            except KeyboardInterrupt:
                o.error("interrupted; nothing half-written is visible")
                raise typer.Exit(130) from None
            finally:
                if not STATE.quiet:
                    for w in caught:
                        o.warn(str(w.message))

    sig = inspect.signature(fn, eval_str=True)  # typer reads the options from it: the command's own, then --quiet
    wrapper.__signature__ = sig.replace(parameters=[  # type: ignore[attr-defined]
        *sig.parameters.values(), inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False,
                                                    annotation=QuietOpt)])
    wrapper.__annotations__ = {**fn.__annotations__, "quiet": QuietOpt}
    return wrapper  # type: ignore[return-value]


def _location(archive: str | None) -> str:
    loc = archive if archive is not None else STATE.archive
    return str(loc) if loc is not None else DEFAULT_ARCHIVE


@contextmanager
def _repo(archive: str | None) -> Iterator[Repository]:
    from gpupas.versions.repository import open_repository

    repo = open_repository(_location(archive))
    try:
        yield repo
    finally:
        repo.close()


@contextmanager
def _progress(what: str) -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar on stderr (only on a terminal) fed by the library's progress callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    o = _out()
    bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=o.err, transient=True, disable=not o.err.is_terminal or STATE.quiet)
    with bar:
        task = bar.add_task(what, total=None)

        def update(desc: str, done: int, total: int) -> None:
            bar.update(task, description=render.plain(desc), completed=done, total=total)  # (user text: names)

        yield update


def _kv(pairs: list[str], what: str) -> dict[str, Any]:
    """KEY=VALUE strings; values parse as JSON where they can (0.1, true, [1,2]), else stay strings."""
    out: dict[str, Any] = {}
    for p in pairs:
        key, sep, val = p.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"{what} {p!r} must look like KEY=VALUE")
        try:
            out[key] = json.loads(val)
        except json.JSONDecodeError:
            out[key] = val
    return out


def _json_file(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidInputError(f"{what} file {path} does not exist") from None
    except IsADirectoryError:
        raise InvalidInputError(f"{what} file {path} is a folder; give a JSON file") from None
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


def _summary(v: Version) -> dict[str, Any]:
    return {"id": v.id, "name": v.name, "parents": v.parents, "snapshots": len(v.snapshots), "latest": v.latest,
            "best": v.best, "created": v.created}


def _sizes(snapshots: list[dict[str, Any]]) -> str:
    raw, stored = sum(s["raw_bytes"] for s in snapshots), sum(s["stored_bytes"] for s in snapshots)
    return f"{render.size(raw)} -> {render.size(stored)} ({render.pct(stored, raw)})"


MessageOpt = Annotated[str, typer.Option("--message", "-m", metavar="TEXT", help="What this version is.")]
AuthorOpt = Annotated[str | None, typer.Option("--author", metavar="NAME",
                                               help="Who made it (default: $GPUPAS_AUTHOR or the user name).")]
HpOpt = Annotated[list[str] | None, typer.Option("--hp", metavar="KEY=VALUE",
                                                 help="A hyperparameter (JSON values); repeatable.")]
HparamsOpt = Annotated[Path | None, typer.Option("--hparams", metavar="FILE",
                                                 help="Hyperparameters from a JSON file.")]
FileOpt = Annotated[list[Path] | None, typer.Option("--file", "-f", metavar="PATH",
                                                    help="A file or directory to keep with the version; repeatable.")]
SettingOpt = Annotated[str, typer.Option("--setting", metavar="NAME",
                                         help="Encoder setting: fast, default or strong.")]


# -- versions -------------------------------------------------------------------------------------------------
@app.command()
@_command
def init(path: Annotated[str | None, typer.Argument(
        metavar="DIR", help="Where to create the archive (a directory or a URL).")] = None,
         archive: ArchiveOpt = None) -> None:
    """Create an empty archive."""
    from gpupas.versions.repository import create_repository

    with create_repository(str(path) if path is not None else _location(archive)) as repo:
        _out().line(f"created archive {repo.location}")


@app.command()
@_command
def commit(
    checkpoints: Annotated[list[Path], typer.Argument(metavar="CHECKPOINT", help=(
        "Checkpoint files (.safetensors, .pt, .pth, .bin, .ckpt, a shard index *.index.json) or directories of "
        "them: the version's snapshots, in natural order of their names."))],
    name: Annotated[str, typer.Option("--name", "-n", metavar="NAME", help="Version name (letters, digits, . _ -).")],
    parent: Annotated[list[str] | None, typer.Option("--parent", "-p", metavar="VERSION", help=(
        "Parent version (id, tag or name); repeat for several."))] = None,
    from_snapshot: Annotated[str | None, typer.Option("--from-snapshot", metavar="N", help=(
        "The first parent's snapshot this version starts from (1-based index, id, best; default: its latest): "
        "the first snapshot is stored as a delta on it."))] = None,
    message: MessageOpt = "", author: AuthorOpt = None, hp: HpOpt = None, hparams: HparamsOpt = None,
    metrics: Annotated[Path | None, typer.Option("--metrics", metavar="FILE",
                                                 help="Training log: CSV, JSON or JSON lines.")] = None,
    metric: Annotated[list[str] | None, typer.Option("--metric", metavar="NAME=VALUE",
                                                     help="A final metric value; repeatable.")] = None,
    file: FileOpt = None,
    network: Annotated[Path | None, typer.Option("--network", metavar="FILE",
                                                 help="Network definition JSON (default: from tensor names).")] = None,
    best_by: Annotated[str | None, typer.Option("--best-by", metavar="METRIC[:min|:max]",
                                                help="Mark the best snapshot by a metric: accuracy, loss:min.")] = None,
    setting: SettingOpt = "default",
    lossy: Annotated[str | None, typer.Option("--lossy", metavar="SCHEME", help=(
        "Store float tensors lossily: bf16, fp16 (add :truncate), fixed:BITS, quant:BITS or kmeans:BITS "
        "(fixed: BITS 2..32; quant, kmeans: BITS 1..8): each float tensor the scheme makes smaller. Restores "
        "are then not bit-exact; log and show say so."
    ))] = None,
    archive: ArchiveOpt = None, as_json: JsonOpt = False,
) -> None:
    """Commit checkpoints as a new version (a directory: its files become time-ordered snapshots; a model folder
    with a shard index, one snapshot)."""
    from gpupas.versions.metrics import final_metrics, normalize_metrics
    from gpupas.versions.model import checkpoint_files, step_of

    skipped: list[str] = []
    paths = [p for c in checkpoints for p in checkpoint_files(c, skipped)]  # checked before anything is written
    for note in skipped:
        warnings.warn(note, stacklevel=1)
    series = normalize_metrics(metrics) if metrics is not None else {}
    if metric:
        final_metrics(series, _kv(metric, "--metric"), step_of(paths[-1]) if paths else None)
    net = None
    if network is not None:
        from gpupas.network import Network

        net = Network.from_dict(_json_file(network, "network"))
    with _repo(archive) as repo, _progress("commit") as progress:
        v = repo.commit(name, paths, parents=parent or [], message=message, author=author,
                        hyperparameters=_hparams(hp or [], hparams), metrics=series, files=file or [], network=net,
                        best_by=best_by, setting=setting, progress=progress, lossy=lossy,
                        from_snapshot=from_snapshot)
    if as_json:
        _out().json(v.to_dict())
        return
    lossy_done = any(s.get("lossy") for s in v.snapshots)
    _out().line(f"committed version {v.id} ({v.name}): {len(v.snapshots)} snapshot(s), {_sizes(v.snapshots)}"
                + (f", parents {', '.join(map(str, v.parents))}" if v.parents else "")
                + (f", LOSSY ({lossy}): restores are not bit-exact" if lossy_done else ""))
    if lossy and not lossy_done:
        _out().warn(f"--lossy {lossy} makes no tensor of these checkpoints smaller: stored losslessly")


@app.command("import")
@_command
def import_folder(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help=(
        "Directory of checkpoint files, taken in natural name order."))],
    name: Annotated[str, typer.Option("--name", "-n", metavar="NAME", help="Name of the versions.")],
    parent: Annotated[str | None, typer.Option("--parent", "-p", metavar="VERSION",
                                               help="Parent of the first version.")] = None,
    message: MessageOpt = "", author: AuthorOpt = None, hp: HpOpt = None, hparams: HparamsOpt = None,
    metrics: Annotated[Path | None, typer.Option("--metrics", metavar="FILE", help=(
        "Training log (CSV/JSON): each version gets the points up to its step."))] = None,
    file: FileOpt = None, setting: SettingOpt = "default", archive: ArchiveOpt = None, as_json: JsonOpt = False,
) -> None:
    """Import a folder of existing checkpoints as a lineage chain (one version per file)."""
    from gpupas.versions.model import checkpoint_files

    checkpoint_files(folder)
    with _repo(archive) as repo, _progress("import") as progress:
        versions = repo.import_folder(folder, name, parent=parent, hyperparameters=_hparams(hp or [], hparams),
                                      metrics=metrics, files=file or [], message=message, author=author,
                                      setting=setting, progress=progress)
    if as_json:
        _out().json([_summary(v) for v in versions])
        return
    _out().line(f"imported {render.count(len(versions), 'version')} of {name}: {versions[0].id}..{versions[-1].id}, "
                f"{_sizes([s for v in versions for s in v.snapshots])}")


@app.command()
@_command
def copy(ref: RefArg,
         name: Annotated[str, typer.Option("--name", "-n", metavar="NAME", help="Name of the new version.")],
         message: MessageOpt = "", archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Scaffold a new version from an old one (same network, hyperparameters, files and weights)."""
    with _repo(archive) as repo:
        v = repo.copy(ref, name, message=message)
    if as_json:
        _out().json(v.to_dict())
    else:
        _out().line(f"created version {v.id} ({v.name}) from version {v.parents[0]}")


@app.command()
@_command
def best(ref: Annotated[str, typer.Argument(metavar="VERSION", help="The version (id, tag or name).")],
         snapshot: Annotated[str, typer.Argument(metavar="SNAPSHOT", help="Its snapshot: 1-based index or id.")],
         archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Mark one of a version's snapshots as its best (what `checkout -s best` and `show` read)."""
    with _repo(archive) as repo:
        v = repo.mark_best(ref, snapshot)
    if as_json:
        _out().json(v.to_dict())
    else:
        _out().line(f"version {v.id}: snapshot {v.best} is its best")


@app.command()
@_command
def drop(ref: RefArg,
         snapshots: Annotated[list[str] | None, typer.Argument(metavar="SNAPSHOT", help=(
             "Snapshots to drop: 1-based index, id, latest or best."))] = None,
         keep_last: Annotated[int | None, typer.Option("--keep-last", metavar="N", min=0, help=(
             "Drop all but the last N snapshots (the best is kept too)."))] = None,
         best_by: Annotated[str | None, typer.Option("--best-by", metavar="METRIC[:min|:max]", help=(
             "Where the best is dropped, mark the best of those left by this metric (else none is best)."))] = None,
         drop_all: Annotated[bool, typer.Option("--all", help=(
             "Allow dropping every snapshot (the version keeps its metadata)."))] = False,
         dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="Say what would be dropped; change nothing.")
                            ] = False,
         archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Drop snapshots from a version (the record no longer names them); `gpupas gc` then frees their bytes,
    except those another version names or kept snapshots are built on (`gpupas compact` re-bases those, then
    gc frees them)."""
    from gpupas.store.archive import remote_floor
    from gpupas.versions import verify as _verify

    with _repo(archive) as repo:
        before = repo.version(ref)
        v, gone = repo.dropping(before, snapshots or [], keep_last=keep_last, best_by=best_by,
                                allow_empty=drop_all, dry_run=dry_run)
        unknown = None
        try:  # (it reads every record and manifest: a damaged one elsewhere must not hide that the drop was done)
            fate = _verify.fate(repo, [s["id"] for s in gone], v.record) if gone else {}
        except GpupasError as exc:
            fate, unknown = {s["id"]: {"gc": "unknown", "why": None} for s in gone}, exc
        floor = remote_floor(repo.archive.store, 0.0)  # an object store keeps a drop an hour whatever --min-age
    o = _out()
    if as_json:
        o.json({"version": v.id, "dry_run": dry_run, "dropped": [s["id"] for s in gone],
                "snapshots": [s["id"] for s in v.snapshots], "latest": v.latest, "best": v.best,
                "gc": fate})
        return
    if not gone:
        o.line(f"nothing to drop: version {v.id} ({v.name}) keeps its {render.count(len(v.snapshots), 'snapshot')}")
        return
    verb = "would drop" if dry_run else "dropped"
    o.line(f"{verb} {render.count(len(gone), 'snapshot')} of version {v.id} ({v.name}): "
           f"{', '.join(s['id'] for s in gone)}; {render.count(len(v.snapshots), 'snapshot')} left"
           + (f", latest {v.latest}" if v.latest else "") + (f", best {v.best}" if v.best else "")
           + (", no best now" if not v.best and any(s["id"] == before.best for s in gone) else ""))
    if unknown is not None:
        o.warn(f"what `gpupas gc` then frees could not be worked out ({unknown}); `gpupas verify` says more")
    frees = [s for s in gone if fate[s["id"]]["gc"] == "frees"]
    if frees:
        when = ("`gpupas gc` an hour after the drop (gc in an object store keeps a drop that long, whatever "
                "--min-age)" if floor else "`gpupas gc --min-age 0`")
        o.line(f"{when} then frees {render.count(len(frees), 'snapshot')}, "
               f"{render.size(sum(s['stored_bytes'] for s in frees))}: {', '.join(s['id'] for s in frees)}"
               + ("" if floor else " (`gpupas gc` alone an hour after the drop: a reader that read the version "
                  "before may be restoring them)"))
    for s in gone:
        if fate[s["id"]]["gc"] == "keeps":
            why = fate[s["id"]]["why"]
            then = ": gc frees this one once `gpupas compact` re-bases that (onto a kept snapshot, or whole)"
            o.line(f"{s['id']} stays, {why}" + (then if why.startswith("the base") else ""))


@app.command()
@_command
def tag(tag_name: Annotated[str | None, typer.Argument(
            metavar="TAG", help="Tag name (not another tag's in another case); none: list tags.")] = None,
        ref: Annotated[str | None, typer.Argument(metavar="VERSION", help="Version to tag (id, tag or name).")] = None,
        delete: Annotated[bool, typer.Option("--delete", "-d", help="Delete the tag.")] = False,
        force: Annotated[bool, typer.Option("--force", help="Move an existing tag.")] = False,
        archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Tag a version (gpupas tag v1.0 3), delete a tag (-d), or list tags (no arguments)."""
    o = _out()
    if delete and (tag_name is None or ref is not None):  # git's `tag -d a b` deletes both: refuse, not ignore b
        raise InvalidInputError("give exactly one tag to delete: gpupas tag -d TAG")
    if force and tag_name is None:
        raise InvalidInputError("--force moves a tag: gpupas tag --force TAG VERSION")
    with _repo(archive) as repo:
        if tag_name is None:
            tags = repo.tags()
            if as_json:
                o.json(tags)
            elif not tags:
                o.note("no tags yet; tag a version with `gpupas tag NAME VERSION`")
            else:
                for t, vid in tags.items():
                    o.data(f"{t}\t{vid}")
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
        o.json({"tag": tag_name, "version": vid, "deleted": delete})
    else:
        o.line(msg)


# -- exploration ------------------------------------------------------------------------------------------------
@app.command()
@_command
def log(ref: Annotated[str | None, typer.Argument(metavar="VERSION", help=(
            "Only versions connected to this one (its ancestors and descendants)."))] = None,
        archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Versions and their lineage as a tree (a straight chain stays at one level, and so does a line of work that
    keeps its name past its branch points; branches indent)."""
    with _repo(archive) as repo:
        rows = repo.log(ref)
        location = repo.location
    o = _out()
    if as_json:
        o.json(rows)
    elif not rows:
        o.note("no versions yet; add one with `gpupas commit` or `gpupas import`")
    else:
        o.table(render.log_tree(rows, location))


app.command("list", help="Same as log.")(log)


@app.command()
@_command
def show(ref: RefArg, snapshot: SnapOpt = None,
         tensors: Annotated[bool, typer.Option("--tensors", "-t", help="Also list every tensor.")] = False,
         network: Annotated[bool, typer.Option("--network", "-N", help=(
             f"List every network node (shown by default up to {render.MAX_NODES} nodes)."))] = False,
         archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Metadata, network, sizes and per-layer storage of a version."""
    with _repo(archive) as repo:
        d = repo.show(ref, snapshot)
    if as_json:
        _out().json(d)
    else:
        render.show(_out(), d, tensors, network)


app.command("desc", help="Same as show.")(show)


@app.command()
@_command
def diff(a: Annotated[str, typer.Argument(metavar="VERSION_A", help="First version.")],
         b: Annotated[str, typer.Argument(metavar="VERSION_B", help="Second version.")],
         snapshot_a: Annotated[str | None, typer.Option("--snapshot-a", metavar="SNAPSHOT", help=(
             "Snapshot of the first version (default: latest).")) ] = None,
         snapshot_b: Annotated[str | None, typer.Option("--snapshot-b", metavar="SNAPSHOT", help=(
             "Snapshot of the second version (default: latest).")) ] = None,
         weights: Annotated[bool, typer.Option("--weights/--no-weights", help="Compare the weights too.")] = True,
         top: Annotated[int, typer.Option("--top", metavar="N", min=0, help=(
             "Tensors (and added/removed names) to list, most changed first; 0: all."))] = 10,
         archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Two versions side by side: network, hyperparameters, metrics and per-tensor weight changes."""
    with _repo(archive) as repo:
        d = repo.diff(a, b, snapshot_a=snapshot_a, snapshot_b=snapshot_b, weights=weights)
    if as_json:
        _out().json(d)
    else:
        render.diff(_out(), d, top)


@app.command()
@_command
def query(statement: Annotated[str, typer.Argument(metavar="DQL", help=(
              'A DQL select, e.g. \'select m where m.name like "cnn%" and m.hp.lr < 0.01 and '
              'm["conv[1-3]"].next has POOL("MAX")\''))],
          archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Select versions with DQL: name, time, hyperparameter, metric and network conditions.

    Fields: m.id m.name m.created m.author m.message m.snapshots m.layers m.raw_bytes m.stored_bytes
    m.parent m.tag m.hp.KEY m.metric.NAME[.last|.min|.max|.count]; layer predicates: m["regex"]
    [.next|.prev] has POOL("MAX"), CONV, FC, NORM("batch"), RELU, TYPE("MaxPool2d"); and / or / not /
    parentheses; order by m.FIELD [desc]; limit N. m.id, m.snapshots, m.layers, m.raw_bytes,
    m.stored_bytes (what the manifests store now) and m.parent compare with numbers; m.name, m.created,
    m.author, m.message and m.tag with quoted strings, and LIKE takes a quoted pattern on these (and on
    m.hp.KEY): % any run, _ any one character, case counts; ESCAPE "!" makes !_ and !% plain characters.
    Inside a quoted string a backslash takes the next character as it is (\\" a quote, \\\\ a backslash),
    so like "a\\_b" is the pattern a_b: use ESCAPE to match a plain _ or %.
    """
    with _repo(archive) as repo:
        rows = repo.query(statement)
    if as_json:
        _out().json(rows)
    else:
        render.query(_out(), rows)


# -- weights out ------------------------------------------------------------------------------------------------
@app.command()
@_command
def checkout(ref: RefArg,
             output: Annotated[Path, typer.Option("--output", "-o", metavar="DIR",
                                                  help="Directory to write (empty or new).")],
             snapshot: SnapOpt = None,
             fmt: Annotated[str | None, typer.Option("--format", metavar="FORMAT", help=(
                 "safetensors or torch (default: from --weights-name's suffix, else safetensors)."))] = None,
             weights_name: Annotated[str | None, typer.Option("--weights-name", metavar="FILE", help=(
                 "File name of the weights (default: model.safetensors, or model.pt for torch)."))] = None,
             force: Annotated[bool, typer.Option("--force", help=(
                 "Write into a non-empty directory (files an earlier checkout there wrote that this version "
                 "lacks are removed; other files are left)."))] = False,
             archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Write a version's weights, files and metadata (gpupas-version.json) to a directory."""
    if fmt not in (None, "safetensors", "torch"):
        raise InvalidInputError(f"--format must be safetensors or torch, not {fmt!r}")
    with _repo(archive) as repo:
        v = repo.version(ref)  # resolved once: a name may reach a newer version by the time the note is made
        paths = repo.checkout(v, output, snapshot=snapshot, format=fmt, force=force, weights_name=weights_name)
        note = _lossy_note(v, snapshot)
    if as_json:
        _out().json([str(x) for x in paths])
    else:
        _out().line(f"checked out to {output}: " + ", ".join(str(x.relative_to(output)) for x in paths) + note)


def _lossy_note(v: Version, snapshot: str | None) -> str:
    """What to add where weights of a lossy snapshot of ``v`` are written: they are not the committed bits."""
    scheme = v.snapshot(snapshot).get("lossy")
    return f" (LOSSY snapshot, {scheme}: not bit-exact)" if scheme else ""


@app.command()
@_command
def export(ref: RefArg,
           output: Annotated[str, typer.Option("--output", "-o", metavar="FILE",  # (a Path drops a trailing /)
                                               help="File; unless --format, a torch file where it ends in .pt, "
                                               ".pth, .bin or .ckpt, else safetensors.")],
           snapshot: SnapOpt = None,
           fmt: Annotated[str | None, typer.Option("--format", metavar="FORMAT",
                                                   help="safetensors or torch (default: from the suffix).")] = None,
           force: Annotated[bool, typer.Option("--force", help="Overwrite the file.")] = False,
           archive: ArchiveOpt = None) -> None:
    """Write a version's weights to one safetensors or torch file."""
    with _repo(archive) as repo:
        v = repo.version(ref)  # (as checkout's)
        path = repo.export(v, output, snapshot=snapshot, format=fmt, force=force)
        note = _lossy_note(v, snapshot)
    _out().line(f"exported to {path}{note}")


# -- archive-wide -------------------------------------------------------------------------------------------------
@app.command()
@_command
def verify(refs: Annotated[list[str] | None, typer.Argument(metavar="VERSION", help=(
               "Versions to check (default: everything)."))] = None,
           scheduler: Annotated[str | None, typer.Option("--scheduler", metavar="ADDRESS", help=(
               "Run the checks on a Dask cluster: a scheduler address, or 'local' for a cluster of worker "
               "processes here (default: in this process)."))] = None,
           archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Re-read and check every chunk, tensor, record and file; exit code 3 if anything is damaged, 4 if some
    snapshot could not be read because a store or tier cannot be reached (and nothing is damaged)."""
    with _repo(archive) as repo, _progress("verify") as progress:
        result = repo.verify(refs or None, progress=progress,
                             scheduler=None if scheduler == "local" else (scheduler or "sync"))
    o = _out()
    if as_json:
        o.json(result)
    else:
        c = result["checked"]
        summary = ", ".join(render.count(c[k + "s"], k) for k in ("version", "snapshot", "tensor", "file")) + " checked"
        for note in result["notes"]:  # not damage: what may need a look (snapshots no version names)
            o.err.print(render.Text(render.plain(f"note: {note}")))
        if result["ok"]:
            o.line(f"ok: {summary}")
        else:
            for problem in result["problems"]:  # a folder linked back in place: its data not read, not damaged
                what = "not read" if "(nothing found damaged)" in problem else "damaged"
                o.err.print(render.Text(render.plain(f"{what}: {problem}")))
            for problem in result["unreachable"]:
                o.err.print(render.Text(render.plain(f"not checked: {problem}")))
            if result["problems"]:
                o.error(f"{len(result['problems'])} problem(s) in {summary}; restore the damaged parts from a copy "
                        "(each says what to do)")
            else:
                o.error(f"{len(result['unreachable'])} snapshot(s) could not be read (a store or tier cannot be "
                        f"reached; nothing found damaged) in {summary}; make it reachable and verify again")
    if not result["ok"]:
        raise typer.Exit(INTEGRITY if result["problems"] else FAILURE)


@app.command()
@_command
def stats(archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """What the archive stores, how it is encoded, and what that saves."""
    with _repo(archive) as repo:
        s = repo.stats()
    if as_json:
        _out().json(s)
    else:
        render.stats(_out(), s)


@app.command()
@_command
def gc(min_age: Annotated[float, typer.Option("--min-age", metavar="SECONDS", help=(
           "Only folders untouched for this many seconds (commits in progress stay safe; on an object store, "
           "which has no locks, at least 3600)."))] = 3600.0,
       dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="List what would be removed; remove nothing.")
                          ] = False,
       archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Delete what no version and no kept snapshot needs: snapshots of commits that never published (a
    killed commit), chunk folders no snapshot names (interrupted commits, revised snapshots), temporary files
    of killed writes."""
    if not min_age >= 0:  # NaN too
        raise InvalidInputError(f"--min-age {min_age:g}: give a number of seconds, at least 0 (0: whatever the age)")
    with _repo(archive) as repo:
        removed = repo.gc(min_age, dry_run=dry_run)
    o = _out()
    if as_json:
        o.json({"removed": removed, "dry_run": dry_run})
        return
    verb = "would remove" if dry_run else "removed"
    for r in removed:
        o.data(f"{verb} {r['kind']} {r['name']} ({render.size(r['bytes'])})"
               + (f", dropped from version {r['dropped_from']}" if "dropped_from" in r else ""))
    total = sum(r["bytes"] for r in removed)
    o.line(f"{verb} {len(removed)} unreferenced item(s), {render.size(total)}"
           + ("" if removed or min_age <= 0 else f" (only what is older than {min_age:g} s: --min-age 0 for all)"))


@app.command()
@_command
def reindex(archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Rebuild the SQLite catalog from the archive's records and manifests (removing the temporary
    catalogs that killed rebuilds left beside it)."""
    with _repo(archive) as repo:
        counts = repo.reindex()
    if as_json:
        _out().json(counts)
    else:
        _out().line("catalog rebuilt: " + ", ".join(f"{v} {k}" for k, v in counts.items()))


def run() -> None:
    """Entry point of the ``gpupas`` script."""
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        raise SystemExit(130) from None


from gpupas.cli import jobs as _jobs  # noqa: E402, F401  (registers `gpupas plan` and `gpupas compact`)
from gpupas.cli import storage as _storage  # noqa: E402, F401  (registers `gpupas tier` and `gpupas inspect`)

__all__ = ["BAD_INPUT", "app", "run"]
