"""gpupas: archival storage and versioning for deep-learning checkpoints (ModelHub's PAS).

The public surface: snapshots of tensors in an :class:`Archive` (:func:`create_archive`,
:func:`open_archive`: commit / restore / report / verify); model versions with lineage, metadata
and files in a :class:`Repository` (:func:`create_repository`, :func:`open_repository`) with
:class:`CheckpointHook` for training loops; the errors; the checkpoint reader.
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
    VersionNotFoundError,
)
from gpupas.integrations.training import CheckpointHook
from gpupas.repo import Repository, Version, create_repository, open_repository
from gpupas.tensors import load_checkpoint

__version__ = "0.1.0"
__all__ = [
    "Archive",
    "ArchiveExistsError",
    "ArchiveNotFoundError",
    "BackendUnavailableError",
    "CheckpointHook",
    "GpupasError",
    "IntegrityError",
    "InvalidInputError",
    "Repository",
    "SnapshotNotFoundError",
    "UnsupportedDtypeError",
    "Version",
    "VersionNotFoundError",
    "create_archive",
    "create_repository",
    "load_checkpoint",
    "open_archive",
    "open_repository",
]
