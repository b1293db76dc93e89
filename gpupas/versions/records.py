"""Version records, tags and file blobs, read and written through the archive's store (local or S3).

Publishing a version is create-if-absent of ``versions/<id>.json``, so two processes committing at
once get distinct ids without a lock file, and a killed commit leaves no visible half version.
Records that change later (a snapshot appended, a best mark) are replaced by the store's atomic
read-modify-write: no update is lost, readers see the record before or after. Records and tags
are sealed JSON, so a flipped bit is caught; records written before sealing are read as they are.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

from gpupas.errors import IntegrityError, InvalidInputError, StoreUnavailableError
from gpupas.format import keys
from gpupas.format.manifest import Manifest
from gpupas.format.sealed import seal, unseal
from gpupas.store.archive import ArchiveStore
from gpupas.versions.model import MAX_VERSION_ID, Record

Fingerprint = tuple[int, int, int]
LEGACY = b"{\n"  # records written before sealing: indented JSON (sealed ones are compact)
_VERSION_FILE = re.compile(r"^([1-9][0-9]{0,17})\.json$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def key_path(key: str) -> str:
    """The store key behind a catalog key: ``v/<id>``, ``t/<tag>``, ``m/<snapshot>``."""
    kind, _, name = key.partition("/")
    if kind == "v":
        return keys.version(int(name))
    if kind == "t":
        return keys.tag(name)
    if kind == "m":
        return keys.manifest(name)
    raise ValueError(f"bad record key {key!r}")


_KEPT = ("the snapshots written for it are kept: once the store is back, see whether the version is there "
         "(`gpupas log`); `gpupas gc` removes snapshots no version names")


class Records:
    def __init__(self, archive: ArchiveStore):
        self.archive = archive
        self.store = archive.store

    @property
    def location(self) -> str:
        return self.archive.location

    # -- reading ---------------------------------------------------------------------------------------------
    def fingerprints(self) -> dict[str, Fingerprint]:
        """A fingerprint of every version record, tag and manifest: what the catalog compares."""
        out: dict[str, Fingerprint] = {}
        for prefix, kind in ((keys.VERSIONS, "v/"), (keys.TAGS, "t/"), (keys.MANIFESTS, "m/")):
            for name, fp in self.store.stat_children(prefix).items():
                if kind == "v/":
                    m = _VERSION_FILE.match(name)
                    if m:
                        out[kind + m.group(1)] = fp
                elif name.endswith(".json") and keys.is_name(name[:-5]):
                    out[kind + name[:-5]] = fp
        return out

    def read(self, key: str) -> tuple[Record, Fingerprint] | None:
        """The record behind catalog key ``v/<id>`` or ``t/<tag>`` and its fingerprint, or None."""
        path = key_path(key)
        got = self.store.get_stat(path)
        if got is None:
            return None
        data, fp = got
        rec = unseal(data, f"{path} in {self.location}", required=False, legacy=LEGACY)
        return rec, fp

    def version_ids(self) -> list[int]:
        return sorted(int(m.group(1)) for n in self.store.list(keys.VERSIONS) if (m := _VERSION_FILE.match(n)))

    def version(self, vid: int) -> Record | None:
        got = self.read(f"v/{vid}")
        if got is None:
            return None
        rec = got[0]
        if rec.get("id") != vid:
            raise IntegrityError(f"{keys.version(vid)} in {self.location} holds version {rec.get('id')!r} "
                                 "(damaged or moved); restore it from a copy")
        return rec

    def every_version(self) -> tuple[list[Record], list[int]]:
        """Every version record, and the ids listed (a record gone meanwhile is left out); raises what reading one
        raises."""
        ids = self.version_ids()
        return [r for r in (self.version(v) for v in ids) if r is not None], ids

    def tag(self, name: str) -> int | None:
        got = self.read(f"t/{name}")
        if got is None or got[0].get("tag", name) != name:  # another tag's file, found by a case-insensitive FS
            return None
        try:
            return int(got[0]["version"])
        except (KeyError, TypeError, ValueError):
            raise IntegrityError(f"tag {name!r} in {self.location} is damaged") from None

    def tag_names(self) -> list[str]:
        return [n[:-5] for n in self.store.list(keys.TAGS) if n.endswith(".json") and keys.is_name(n[:-5])]

    def has_version(self, vid: int) -> bool:
        return 0 < vid <= MAX_VERSION_ID and self.store.exists(keys.version(vid))

    # -- writing ---------------------------------------------------------------------------------------------
    def publish_version(self, record: Record) -> int:
        """Give ``record`` the next free id and publish it; distinct ids across processes."""
        while True:
            ids = self.version_ids()
            vid = (ids[-1] if ids else 0) + 1
            if vid > MAX_VERSION_ID:
                raise InvalidInputError(f"archive {self.location} has a version {ids[-1]}: version ids are used up; "
                                        "remove or renumber that record")
            record["id"] = vid
            data = seal(record)
            try:
                created = self.store.create(keys.version(vid), data)
            except StoreUnavailableError as exc:  # it may have landed, its answer lost: it names our snapshots
                created = self.archive.landed(keys.version(vid), data, exc, f"version {vid} was published",
                                                    _KEPT)
            if created:
                return vid

    def update_version(self, vid: int, change: Callable[[Record], bool | None]) -> Record:
        """Apply ``change`` to version ``vid``'s record atomically (no concurrent update is lost); a change that
        returns False finds nothing to change: the record is left as it is (and returned as read)."""
        result: list[Record] = []

        def apply(old: bytes | None) -> bytes | None:
            if old is None:
                raise IntegrityError(f"version {vid} disappeared while being updated")
            rec = unseal(old, f"{keys.version(vid)} in {self.location}", required=False, legacy=LEGACY)
            unchanged = change(rec) is False
            result[:] = [rec]
            return None if unchanged else seal(rec)

        try:
            self.store.update(keys.version(vid), apply)
        except StoreUnavailableError as exc:  # it may have landed, its answer lost: it may name our snapshots
            if not result:
                raise
            self.archive.landed(keys.version(vid), seal(result[0]), exc, f"version {vid} was updated", _KEPT)
        return result[0]

    def create_tag(self, name: str, record: Record) -> bool:
        return self.store.create(keys.tag(name), seal(record))

    def replace_tag(self, name: str, record: Record) -> None:
        self.store.update(keys.tag(name), lambda _old: seal(record))

    def delete_tag(self, name: str) -> None:
        self.store.delete(keys.tag(name))

    # -- files by content ------------------------------------------------------------------------------------
    def put_blob(self, data: bytes) -> str:
        h = hashlib.sha256(data).hexdigest()
        if not self.store.exists(keys.blob(h)):
            self.store.create(keys.blob(h), data)  # False: another process stored the same bytes first
        return h

    def blob(self, sha256: str) -> bytes:
        """A stored file's bytes, checked against their hash."""
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise InvalidInputError(f"{sha256!r} is not a sha256 hex digest")
        data = self.store.get(keys.blob(sha256))
        if data is None:
            raise IntegrityError(f"file blob {sha256} is missing from {self.location}")
        if hashlib.sha256(data).hexdigest() != sha256:
            raise IntegrityError(f"file blob {sha256} in {self.location} is damaged (hash mismatch)")
        return data

    def read_manifest(self, sid: str) -> tuple[Manifest, Fingerprint] | None:
        """A snapshot's manifest and its fingerprint (for the catalog), or None."""
        got = self.store.get_stat(keys.manifest(sid))
        if got is None:
            return None
        return Manifest.from_bytes(got[0], sid), got[1]
