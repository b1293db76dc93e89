"""Every key of an archive, spelled once. A key is a '/'-separated path relative to the archive root.

    zarr.json                          root group; attributes {"gpupas": {"format": N}}
    snapshots/zarr.json                group holding every snapshot folder
    snapshots/<folder>/zarr.json       group of one stream's chunk arrays
    snapshots/<folder>/<codec>/zarr.json, .../c/<shard>   one sharded uint8 array per chunk codec
    manifests/<id>.json                a snapshot exists once its manifest does
    versions/<id>.json  refs/tags/<tag>.json  files/<sha256>    model versions, tags, file blobs
"""

from __future__ import annotations

import re
from typing import TypeGuard

from gpupas.errors import InvalidInputError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
FOLDER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,159}$")  # a snapshot id, '.', a unique tag
ROOT = "zarr.json"
SNAPSHOTS = "snapshots"
MANIFESTS = "manifests"
VERSIONS = "versions"
TAGS = "refs/tags"
FILES = "files"


def check_name(name: object, what: str = "snapshot id") -> str:
    """``name`` if it is safe as one path component of the store, else InvalidInputError."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidInputError(
            f"{what} {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


def is_name(name: object) -> bool:
    """Whether ``name`` is a valid path component (see :func:`check_name`)."""
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None and ".." not in name


def is_folder(name: object) -> TypeGuard[str]:
    """Whether ``name`` may name a stream folder under ``snapshots/`` (a snapshot id plus a tag)."""
    return (isinstance(name, str) and FOLDER_RE.fullmatch(name) is not None and ".." not in name
            and name != "zarr.json")  # the group document of snapshots/


def manifest(sid: str) -> str:
    return f"{MANIFESTS}/{sid}.json"


def folder(name: str) -> str:
    return f"{SNAPSHOTS}/{name}"


def array(folder_name: str, codec_id: str) -> str:
    return f"{SNAPSHOTS}/{folder_name}/{codec_id}"


def shard(folder_name: str, codec_id: str, index: int) -> str:
    """Key of shard file ``index`` (a Zarr chunk of the outer grid) of one codec's array."""
    return f"{SNAPSHOTS}/{folder_name}/{codec_id}/c/{index}"


def version(vid: int) -> str:
    return f"{VERSIONS}/{vid}.json"


def tag(name: str) -> str:
    return f"{TAGS}/{name}.json"


def blob(sha256: str) -> str:
    return f"{FILES}/{sha256}"
