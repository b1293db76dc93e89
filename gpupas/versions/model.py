"""What a model version is: its record (built here, in one place), the read-only :class:`Version` view,
and the checks on names a version, tag, file or checkpoint may have.

A version is ``(name, id, parents, network, snapshots, hyperparameters, metrics, files)`` plus
author, message, creation time and a revision counter for later changes (snapshots appended, a
best mark). Records are sealed JSON (:mod:`gpupas.format.sealed`).
"""

from __future__ import annotations

import getpass
import json
import numbers
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gpupas.errors import InvalidInputError, SnapshotNotFoundError
from gpupas.format.keys import check_name
from gpupas.format.manifest import Manifest, now
from gpupas.network import Network
from gpupas.pas.schemes import describe
from gpupas.tensors import INDEX_SUFFIX, TORCH_SUFFIXES, unknown_type

RECORD_FORMAT = 1
CHECKPOINT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
SHARD = re.compile(r"-\d{5}-of-\d{5}\.[a-z]+$")  # Hugging Face's shard names: model-00001-of-00003.safetensors
MAX_VERSION_ID = 10**18 - 1
MAX_FILE_NAME = 1024  # an attached file's logical name, '/'-separated parts and all
MAX_NESTING = 200  # lists and objects in a record, one inside another
Record = dict[str, Any]


def default_author() -> str:
    try:
        return os.environ.get("GPUPAS_AUTHOR") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray) and obj.size <= 1024:
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON")


def check_text(value: Any, what: str) -> None:
    """Every string in ``value`` must be valid Unicode text (no lone surrogates from undecodable bytes), and lists
    and objects nest at most :data:`MAX_NESTING` deep (a record nested near Python's recursion limit is written,
    then cannot be read back: it reads as damaged)."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_NESTING:
            raise InvalidInputError(f"{what} nests lists or objects deeper than {MAX_NESTING} levels")
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidInputError(f"{what} holds text that is not valid UTF-8 ({v!r}); give it as UTF-8") \
                    from None
        elif isinstance(v, Mapping):
            stack.extend((k, depth + 1) for k in v.keys())
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend((x, depth + 1) for x in v)


def to_json(obj: Any, what: str) -> Any:
    """``obj`` as plain JSON values; InvalidInputError names ``what`` when it is not JSON."""
    try:
        out = json.loads(json.dumps(obj, default=_json_default, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as exc:  # RecursionError: nested thousands deep
        raise InvalidInputError(f"{what} must be JSON values (numbers, strings, lists, objects; no NaN): {exc}") \
            from None
    check_text(out, what)
    return out


def natural_key(name: str) -> list[Any]:
    """Sort key that orders ``step-9`` before ``step-10``."""
    return [int(t) if t.isdecimal() else t.lower() for t in re.split(r"(\d+)", name)]  # "²": isdigit, not int


def step_of(path: str | os.PathLike[str]) -> int | None:
    """The training step in a checkpoint's file name (its last number; a shard index's: its folder's), if any."""
    p = Path(path)
    nums = re.findall(r"\d+", p.parent.name if p.name.endswith(INDEX_SUFFIX) else p.stem)
    return int(nums[-1]) if nums and len(nums[-1]) <= 18 else None  # longer: no step (nor a SQLite integer)


def check_version_name(name: str, what: str = "version name") -> str:
    """``name`` if it can name a version or tag: a safe path component that is not only digits."""
    check_name(name, what)
    if name.isdigit():
        raise InvalidInputError(f"{what} {name!r} is not allowed: names of digits only would read as version ids")
    return name


def file_key(name: str) -> str:
    """A file name as a case-insensitive file system (macOS, Windows) sees it (file names are ASCII)."""
    return name.casefold()


def check_file_name(name: str) -> str:
    """A file's logical name: relative, '/'-separated, every part a safe name, at most :data:`MAX_FILE_NAME`
    characters in all (a longer path cannot be written by a checkout: macOS's limit is 1024)."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name:
        raise InvalidInputError(f"file name {name!r} is not allowed: give a relative path with '/' separators")
    if len(name) > MAX_FILE_NAME:
        raise InvalidInputError(f"file name {name[:60]!r}... is {len(name)} characters long: a file name is at most "
                                f"{MAX_FILE_NAME} characters in all, folders included (a checkout could not write it)")
    for part in name.split("/"):
        check_name(part, f"file name part of {name!r}:")
    return name


def checkpoint_files(path: str | os.PathLike[str], skipped: list[str] | None = None) -> list[Path]:
    """The checkpoints at ``path``, in natural order of their names: a checkpoint file, a model folder
    (sharded weights with their index; or that index, ``model.safetensors.index.json``), or a folder of those
    (e.g. a training run's ``checkpoint-500/`` folders). Other files in a folder are listed in ``skipped``."""
    from gpupas.tensors import is_model_folder

    p = Path(path)
    if p.is_dir():
        if is_model_folder(p):
            return [p]
        found, other = [], []
        for f in sorted(p.iterdir(), key=lambda f: natural_key(f.name)):
            if (f.is_file() and f.suffix in CHECKPOINT_SUFFIXES) or is_model_folder(f):
                found.append(f)
            elif not f.name.startswith("."):
                other.append(f.name)
        if not found:
            raise InvalidInputError(f"{p} holds no checkpoints ({', '.join(CHECKPOINT_SUFFIXES)} files or model "
                                    "folders)")
        shards = [f.name for f in found if f.is_file() and SHARD.search(f.name)]
        if shards:  # each would be a snapshot of its own, each a part of one model
            more = "..." if len(shards) > 2 else ""
            raise InvalidInputError(f"{p} holds shards of a model ({', '.join(shards[:2])}{more}) "
                                    f"without their index (*{INDEX_SUFFIX}, which names the shard of each tensor); "
                                    "copy the index beside them (Hugging Face writes model.safetensors.index.json)")
        if skipped is not None and other:
            skipped.append(f"{p}: not checkpoints, left out: {', '.join(other[:8])}{'...' if len(other) > 8 else ''}")
        return found
    if not p.is_file():
        raise InvalidInputError(f"checkpoint {p} does not exist")
    if p.suffix not in CHECKPOINT_SUFFIXES and not p.name.endswith(INDEX_SUFFIX):
        raise InvalidInputError(unknown_type(p, f"a shard index (*{INDEX_SUFFIX}), a model folder or a folder of "
                                                "those"))
    return [p]


def snapshot_entry(m: Manifest, step: int | None, source: str | None) -> dict[str, Any]:
    """A version's entry for snapshot ``m``."""
    entry = {"id": m.id, "created": m.created, "step": step, "source": source, "base": m.base,
             "raw_bytes": m.raw_bytes, "stored_bytes": m.stored_bytes, "tensors": len(m.tensors)}
    if m.lossy:  # said in every listing: it does not restore bit-exactly
        entry["lossy"] = ",".join(sorted({describe(e.scheme) for e in m.tensors if e.scheme is not None}))
    return entry


def new_record(name: str, *, parents: list[int], snapshots: list[dict[str, Any]], network: Any,
               hyperparameters: Any, metrics: Any, files: Any, message: str = "", author: str | None = None,
               best: str | None = None) -> Record:
    """A version record (its id is given when it is published)."""
    record: Record = {
        "format": RECORD_FORMAT, "id": 0, "name": name, "parents": parents, "created": now(),
        "author": author if author is not None else default_author(), "message": message, "rev": 0,
        "snapshots": snapshots, "latest": snapshots[-1]["id"] if snapshots else None, "best": best,
        "network": network, "hyperparameters": hyperparameters, "metrics": metrics, "files": files,
    }
    check_text(record, f"version {name!r}")
    return record


def well_formed(r: Any) -> bool:
    """Whether ``r`` has the fields every reader relies on, with the right types."""
    try:
        return (isinstance(r, dict) and 0 < int(r["id"]) <= MAX_VERSION_ID and isinstance(r["name"], str)
                and isinstance(r["created"], str) and all(isinstance(p, int) for p in r["parents"])
                and all(isinstance(s["id"], str) for s in r["snapshots"]))
    except (KeyError, TypeError, ValueError):
        return False


class Version:
    """One committed model version (a read-only view of its record)."""

    def __init__(self, record: Record):
        self.record = record

    def __repr__(self) -> str:
        return f"Version(id={self.id}, name={self.name!r}, parents={self.parents}, snapshots={len(self.snapshots)})"

    def __eq__(self, other: object) -> bool:
        """Equal where the records are (the same version at the same revision: ``rev``), as read."""
        if not isinstance(other, Version):
            return NotImplemented
        return self.record is other.record or ((self.id, self.rev) == (other.id, other.rev) and json.dumps(
            self.record, sort_keys=True) == json.dumps(other.record, sort_keys=True))  # (a NaN metric equals itself)

    def __hash__(self) -> int:
        return hash((self.id, self.rev, self.record.get("created")))

    id = property(lambda self: int(self.record["id"]))
    name = property(lambda self: str(self.record["name"]))
    parents = property(lambda self: [int(p) for p in self.record["parents"]])
    created = property(lambda self: str(self.record["created"]))
    author = property(lambda self: self.record.get("author"))
    message = property(lambda self: self.record.get("message", ""))
    snapshots = property(lambda self: list(self.record["snapshots"]))
    latest = property(lambda self: self.record.get("latest"))
    best = property(lambda self: self.record.get("best"))
    hyperparameters = property(lambda self: dict(self.record.get("hyperparameters") or {}))
    metrics = property(lambda self: dict(self.record.get("metrics") or {}))
    files = property(lambda self: dict(self.record.get("files") or {}))
    rev = property(lambda self: int(self.record.get("rev", 0)))

    @property
    def network(self) -> Network:
        return Network.from_dict(self.record.get("network"))

    def snapshot(self, selector: str | int | None = None) -> dict[str, Any]:
        """A snapshot entry: ``None``/"latest", "best", a 1-based index, or a snapshot id."""
        return select_snapshot(self.record["snapshots"], selector, self.latest, self.best, f"version {self.id}")

    def to_dict(self) -> Record:
        return json.loads(json.dumps(self.record))


def select_snapshot(snaps: list[dict[str, Any]], selector: str | int | None, latest: str | None, best: str | None,
                    what: str) -> dict[str, Any]:
    """The entry of ``snaps`` that ``selector`` names ("latest", "best", a 1-based index, an id)."""
    if selector is not None and (isinstance(selector, bool) or not isinstance(selector, str | numbers.Integral)):
        raise InvalidInputError(f"snapshot {selector!r:.60}: name a snapshot of {what} by 'latest', 'best', its "
                                "number (1 is the first) or its id")
    if not snaps:
        raise SnapshotNotFoundError(f"{what} has no snapshots")
    sel = "latest" if selector is None else str(selector)
    if sel in ("latest", "best"):
        sid = latest if sel == "latest" else best
        if sid is None:
            raise SnapshotNotFoundError(f"{what} has no snapshot marked best; select one by its number "
                                        f"(1..{len(snaps)}) or id instead, or mark one (`gpupas best VERSION N`, "
                                        "Repository.mark_best, `gpupas commit --best-by`, "
                                        "CheckpointHook(best_by=...))")
        sel = sid
    for s in snaps:  # an id first: one of digits only would otherwise read as a number
        if s["id"] == sel:
            return s
    if sel.isascii() and sel.isdigit():  # "²" is a digit to str.isdigit, not to int
        i = int(sel) if len(sel) <= 20 else -1  # (past 20 digits no position, and int() refuses 4,300)
        if not 1 <= i <= len(snaps):
            raise SnapshotNotFoundError(f"{what} has snapshots 1..{len(snaps)}, not {sel:.24}")
        return snaps[i - 1]
    raise SnapshotNotFoundError(f"{what} has no snapshot {sel!r}; it has "
                                f"{', '.join(s['id'] for s in snaps[:5])}{'...' if len(snaps) > 5 else ''}")
