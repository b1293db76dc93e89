"""Weights out of the archive: one file (``export``), or a version's folder (``checkout``)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpupas.errors import ArchiveExistsError, InvalidInputError
from gpupas.outputs import cannot_write, check_parents, sweep_temporaries, temporary, write_file
from gpupas.store.base import is_remote
from gpupas.store.tiers import inside
from gpupas.tensors import TORCH_SUFFIXES
from gpupas.versions.model import Version, check_file_name, file_key

if TYPE_CHECKING:
    from gpupas.versions.repository import Repository

METADATA = "gpupas-version.json"


def outside_archive(repo: Repository, path: Path) -> None:
    """InvalidInputError where ``path`` lies in the archive's folder or a tier's: a file there is read as the
    archive's own (a file in manifests/ as a damaged snapshot) or, with --force, replaces one."""
    for name, location in [("archive", repo.archive.location),
                           *((f"tier {t!r}", d["url"]) for t, d in repo.archive.tiers().items())]:
        if not is_remote(location) and inside(os.fspath(path), location):
            raise InvalidInputError(f"{path} is in (or is) the {name} at {location}; nothing written: write it outside "
                                    "(gpupas reads every file there as its own)")


def export(repo: Repository, ref: str | int | Version, path: str | os.PathLike[str], *,
           snapshot: str | int | None = None, format: str | None = None, force: bool = False) -> Path:
    """Write a version's weights to one safetensors or torch file (format from the suffix). Each tensor is its own
    copy: tied weights committed as one storage (an embedding and its ``lm_head``) come out as two equal tensors,
    which ``load_state_dict`` takes; a safetensors file's own metadata, as committed, is written back."""
    p = Path(path)
    if os.fspath(path).endswith(("/", os.sep)) or p.is_dir():  # (Path drops a trailing slash: "out/" is "out")
        raise InvalidInputError(f"{os.fspath(path)} {'is' if p.is_dir() else 'names'} a folder; nothing written: "
                                "give export the path of a file "
                                f"({p / 'model.safetensors'}, say), or write a version to a folder with checkout")
    said = "torch" if p.suffix in TORCH_SUFFIXES else "safetensors" if p.suffix == ".safetensors" else None
    fmt = format or said or "safetensors"
    if fmt not in ("safetensors", "torch"):
        raise InvalidInputError(f"format must be 'safetensors' or 'torch', not {fmt!r}")
    if said and fmt != said:  # torch.load, safetensors and gpupas commit would each refuse the file by its name
        raise InvalidInputError(f"{p.name} names a {said} file, not a {fmt} one; nothing written: name it to end in "
                                f"{'.pt' if fmt == 'torch' else '.safetensors'}, or leave out --format")
    outside_archive(repo, p)
    if (p.exists() or p.is_symlink()) and not force:
        raise ArchiveExistsError(f"{p} exists; nothing written (use --force to overwrite)")
    v = repo.version(ref)
    vid, sid = v.id, v.snapshot(snapshot)["id"]
    tensors = repo.archive.restore(sid)
    if fmt == "safetensors":
        from gpupas.integrations.safetensors import save_file

        # the file's own metadata, as committed; "format": "pt" where it had none, as torch's writers put it
        # (transformers' from_pretrained refuses a file without it)
        kept = repo.archive.manifest(sid).meta.get("file_metadata")
        kept = {k: x for k, x in kept.items() if isinstance(x, str)} if isinstance(kept, dict) else {}
        save_file(tensors, p, metadata={"format": "pt", **kept, "gpupas_version": str(vid)}, replace=force)
    else:
        from gpupas.integrations.torch import _torch, numpy_to_state_dict

        # the restored arrays, shared (a copy held the snapshot twice); a dtype torch lacks: refused, nothing written
        torch, state = _torch(), numpy_to_state_dict(tensors, copy=False)

        def fill(f: Any) -> None:
            try:
                torch.save(state, f)
            except RuntimeError as exc:  # torch's writer reports a failed write (a full disk) as "unexpected pos"
                if isinstance(exc.__context__, OSError):
                    raise exc.__context__ from None
                raise

        write_file(p, fill, replace=force)
    return p


def checkout(repo: Repository, ref: str | int | Version, out_dir: str | os.PathLike[str], *,
             snapshot: str | int | None = None, format: str | None = None, force: bool = False,
             weights_name: str | None = None) -> list[Path]:
    """Write a version to a directory: its weights (``model.safetensors``, or ``model.pt`` for torch,
    or ``weights_name``, whose suffix picks the format unless ``format``), its files under their names, and
    ``gpupas-version.json`` (metadata and network). Returns the paths. A new (or empty) directory appears whole or
    not at all; with ``force``, over an earlier checkout, the files that one wrote and this version lacks
    are removed (other files are left)."""
    v = repo.version(ref)
    snap = v.snapshot(snapshot)
    out = Path(out_dir)
    weights = weights_name or ("model.pt" if format == "torch" else "model.safetensors")
    check_file_name(weights)
    if file_key(weights.split("/")[0]) == file_key(METADATA):  # the metadata would overwrite the weights
        raise InvalidInputError(f"weights name {weights!r}: checkout writes its metadata to {METADATA}; choose "
                                "another name for the weights (--weights-name)")
    if out.exists() and not out.is_dir():
        raise ArchiveExistsError(f"{out} is a file, not a folder; nothing written: give checkout a folder (export "
                                 "writes the weights to one file)")
    for written_to in (out, out / weights, out / METADATA, *(out / f for f in v.files)):  # (or the archive in out)
        outside_archive(repo, written_to)
    if out.exists() and any(out.iterdir()) and not force:
        raise ArchiveExistsError(f"{out} is not empty; nothing written (use --force to write into it)")
    names = {file_key(check_file_name(f)) for f in v.files}  # as a case-insensitive file system sees them
    names |= {n.split("/")[0] for n in names}  # a file's folder
    for reserved in (weights, METADATA):
        if file_key(reserved) in names:
            raise InvalidInputError(f"version {v.id} has an attached file (or folder) named {reserved!r}, where the "
                                    "checkout writes " + ("its weights; choose another name for the weights "
                                                          "(--weights-name)" if reserved == weights else
                                                          "its metadata, so it cannot be checked out; `gpupas "
                                                          "export` writes its weights to one file (its files: "
                                                          "Repository.file_bytes)"))
    for name in (weights, *v.files):  # (the file itself, a link, is replaced: a rename does not follow it)
        linked = _linked_folder(out, name)
        if linked is not None:
            raise InvalidInputError(f"{linked} is a link; checkout would write {name!r} through it, outside {out}; "
                                    "nothing written: remove the link, or check out to another folder")
    blobs = {f: repo.file_bytes(r["sha256"]) for f, r in v.files.items()}  # all checked before writing
    check_parents(out)
    stale = _stale(out, {weights, METADATA, *v.files}) if force else []
    fresh = not out.exists()
    empty = not fresh and not any(out.iterdir())  # what a failure wrote there is taken back, as a new folder is
    target = temporary(out) if fresh else out
    written: list[Path] = []
    try:
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # named by the folder asked for, not by the temporary one
            raise cannot_write(out, exc) from None
        export(repo, v, target / weights, snapshot=snap["id"], format=format, force=True)
        written.append(out / weights)
        for fname, data in blobs.items():
            write_file(target / fname, data, replace=True)
            written.append(out / fname)
        meta: dict[str, Any] = v.to_dict() | {"checked_out_snapshot": snap["id"], "checked_out_weights": weights}
        write_file(target / METADATA, json.dumps(meta, indent=1).encode(), replace=True)
        written.append(out / METADATA)
        _remove(out, stale)
        if fresh:
            try:
                os.rename(target, out)
            except OSError as exc:
                raise cannot_write(out, exc) from None
            sweep_temporaries(out)  # what a killed checkout of this folder left beside it
    except BaseException as exc:
        if fresh:
            shutil.rmtree(target, ignore_errors=True)
            if type(exc) is OSError and str(target) in str(exc.strerror):  # named by the folder asked for
                raise OSError(exc.errno, str(exc.strerror).replace(str(target), str(out))) from None
        elif empty:
            for top in {weights.split("/")[0], METADATA, *(f.split("/")[0] for f in blobs)}:
                if (out / top).is_dir() and not (out / top).is_symlink():
                    shutil.rmtree(out / top, ignore_errors=True)
                elif (out / top).exists() or (out / top).is_symlink():
                    with contextlib.suppress(OSError):  # (the error that stopped the checkout is the one to report)
                        (out / top).unlink()
        raise
    return written


def _stale(out: Path, writing: set[str]) -> list[str]:
    """The files an earlier checkout wrote into ``out`` (its weights and attached files, as its metadata
    file names them) that this one will not write over: a checkout with ``force`` removes them, so the
    folder holds one version, not a mix. Names the metadata gives that are not plain relative file names
    are ignored (the metadata file is the folder's, not the archive's)."""
    try:
        old = json.loads((out / METADATA).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(old, dict):
        return []
    files = old.get("files")
    named = [*(files if isinstance(files, dict) else ()), old.get("checked_out_weights")]
    keep = {file_key(n) for n in writing}
    stale = []
    for name in named:
        try:
            name = check_file_name(name)
        except (InvalidInputError, TypeError):
            continue
        if file_key(name) not in keep and name not in stale:
            stale.append(name)
    return stale


def _linked_folder(out: Path, name: str) -> Path | None:
    """The folder on the way to file ``name`` under ``out`` that is a symbolic link (leading elsewhere), or None."""
    return next((out / f for f in list(Path(name).parents)[:-1] if (out / f).is_symlink()), None)


def _remove(out: Path, stale: list[str]) -> None:
    """Unlink the files ``stale`` names under ``out`` (not folders, not what a link leads to), then the
    folders they leave empty."""
    for name in stale:
        if _linked_folder(out, name) is not None:  # a folder linked elsewhere
            continue
        path, folders = out / name, list(Path(name).parents)[:-1]  # "a/b/c.txt": a/b, then a
        if path.is_symlink() or path.is_file():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for f in folders:
            with contextlib.suppress(OSError):  # not empty, or gone
                (out / f).rmdir()
