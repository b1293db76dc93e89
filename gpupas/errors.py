"""Every error gpupas raises: one root, subclasses that also inherit the builtin a caller catches."""

from __future__ import annotations


class GpupasError(Exception):
    """Root of all gpupas errors."""


class ArchiveNotFoundError(GpupasError, FileNotFoundError):
    """No archive at the given location."""


class ArchiveExistsError(GpupasError, FileExistsError):
    """An archive (or other data) already occupies the location."""


class SnapshotNotFoundError(GpupasError, KeyError):
    """No committed snapshot has that id."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class VersionNotFoundError(GpupasError, KeyError):
    """No model version has that id, tag or name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnsupportedDtypeError(GpupasError, TypeError):
    """A tensor's dtype cannot be archived."""


class InvalidInputError(GpupasError, ValueError):
    """Input that cannot be committed as given (bad name, shape, base...)."""


class IntegrityError(GpupasError, ValueError):
    """Stored bytes do not match their checksum or their manifest."""


class BackendUnavailableError(GpupasError, ImportError):
    """An optional backend (CuPy, nvCOMP, torch) is needed but not installed."""
