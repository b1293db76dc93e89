"""Every error gpupas raises: one root, subclasses that also inherit the builtin a caller catches.

The command line maps each to a stable exit code (:data:`EXIT_CODES`, first match wins).
"""

from __future__ import annotations


class GpupasError(Exception):
    """Root of all gpupas errors."""


class _Plain:
    """For subclasses of KeyError: print the message, not its repr."""

    args: tuple[object, ...]  # (an exception's, as the class it is mixed into)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NotFoundError(_Plain, GpupasError, KeyError):
    """Something named does not exist (root of the not-found errors)."""


class ArchiveNotFoundError(GpupasError, FileNotFoundError):
    """No archive at the given location."""


class ArchiveExistsError(GpupasError, FileExistsError):
    """An archive (or other data) already occupies the location."""


class SnapshotNotFoundError(NotFoundError):
    """No committed snapshot has that id."""


class TierNotFoundError(NotFoundError):
    """A manifest or a command names a storage tier that the archive does not define."""


class VersionNotFoundError(NotFoundError):
    """No model version has that id, tag or name."""


class TensorNotFoundError(NotFoundError):
    """A snapshot has no tensor of that name."""


class UnsupportedDtypeError(GpupasError, TypeError):
    """A tensor's dtype cannot be archived."""


class InvalidInputError(GpupasError, ValueError):
    """Input that cannot be committed as given (bad name, shape, base...)."""


class IntegrityError(GpupasError, ValueError):
    """Stored bytes do not match their checksum or their manifest: damaged (or hostile) data."""


class LinkedError(IntegrityError):
    """A folder or file of a local archive that is a symbolic link (moved to another disk and linked back): not
    followed, so its data is not read, but not found damaged either; the message names the link and the remedy."""


class FormatError(GpupasError, ValueError):
    """Data written by a newer gpupas (a format, field, encoding or codec this one does not know)."""


class ConflictError(GpupasError, RuntimeError):
    """Another writer changed the same thing first (a revision raced another); retry."""


class BackendUnavailableError(GpupasError, ImportError):
    """An optional backend (CuPy, nvCOMP, torch) is needed but not installed."""


class CodecUnavailableError(BackendUnavailableError):
    """A chunk codec gpupas knows but that cannot run here (a GPU-only codec on a CPU machine)."""


class StoreUnavailableError(GpupasError, OSError):
    """An archive's remote store, or one of its tiers, cannot be reached (missing credentials, a wrong
    endpoint, a server down): nothing is known to be damaged there."""


class Unreachable(str):
    """A problem report (a string) saying what could not be read because a store or tier cannot be
    reached (:data:`UNREACHABLE`): nothing was found damaged there (``gpupas verify`` exits 4 for these, not 3).
    ``recheck``: the archive did not name the tier when it was read (worth one look on fresh manifests: the
    snapshot may have been moved out of a tier removed since); an unreachable store is not tried again."""

    recheck: bool = False

    @classmethod
    def of(cls, exc: BaseException, text: str | None = None) -> Unreachable:
        got = cls(str(exc) if text is None else text)
        got.recheck = isinstance(exc, TierNotFoundError)
        return got


class TierUnavailableError(StoreUnavailableError):
    """A storage tier the archive defines cannot be reached or is not the tier it names (wrong URL,
    missing credentials, a server down)."""


UNREACHABLE: tuple[type[GpupasError], ...] = (StoreUnavailableError, TierNotFoundError)
"""What keeps a snapshot from being read without anything being damaged: a store or tier that cannot be
reached, or a tier the archive no longer names (``tier add`` it back); reported as :class:`Unreachable`."""


class CatalogError(GpupasError, RuntimeError):
    """The catalog could not be opened or updated (disk full, permissions...)."""


class ReadOnlyError(GpupasError, PermissionError):
    """A write to an archive that can only be read here (read-only mount, another user's files)."""


class DeviceMemoryError(GpupasError, RuntimeError):
    """The GPU ran out of memory for a commit or restore (nothing was written or damaged)."""


OK, NOT_FOUND, BAD_INPUT, INTEGRITY, FAILURE, NEEDS_UPGRADE = 0, 1, 2, 3, 4, 5
EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (NotFoundError, NOT_FOUND),
    (ArchiveNotFoundError, NOT_FOUND),
    (FormatError, NEEDS_UPGRADE),
    (IntegrityError, INTEGRITY),
    (InvalidInputError, BAD_INPUT),
    (UnsupportedDtypeError, BAD_INPUT),
    (ArchiveExistsError, BAD_INPUT),
]


def exit_code(exc: BaseException) -> int:
    """The command line's exit code for ``exc``: 1 not found, 2 bad input, 3 damaged data,
    4 any other failure, 5 needs a newer gpupas."""
    for kind, code in EXIT_CODES:
        if isinstance(exc, kind):
            return code
    return FAILURE
