"""gpupas: archival storage and versioning for deep-learning checkpoints (ModelHub's PAS).

The public surface: :func:`create_archive`, :func:`open_archive` and :class:`Archive`
(commit / restore / report / verify), the errors, and the checkpoint readers.
"""

from __future__ import annotations

from gpupas.archive import Archive, create_archive, open_archive
from gpupas.errors import (
    ArchiveExistsError,
    ArchiveNotFoundError,
    BackendUnavailableError,
    GpupasError,
    IntegrityError,
    InvalidInputError,
    SnapshotNotFoundError,
    UnsupportedDtypeError,
)
from gpupas.tensors import load_checkpoint

__version__ = "0.1.0"
__all__ = [
    "Archive",
    "ArchiveExistsError",
    "ArchiveNotFoundError",
    "BackendUnavailableError",
    "GpupasError",
    "IntegrityError",
    "InvalidInputError",
    "SnapshotNotFoundError",
    "UnsupportedDtypeError",
    "create_archive",
    "load_checkpoint",
    "open_archive",
]
