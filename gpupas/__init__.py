"""gpupas: archival storage and versioning for deep-learning checkpoints (ModelHub's PAS).

The public surface: snapshots of tensors in an :class:`Archive` (:func:`create_archive`,
:func:`open_archive`: commit / restore / revise / report / verify); model versions with lineage,
metadata and files in a :class:`Repository` (:func:`create_repository`, :func:`open_repository`)
with :class:`CheckpointHook` for training loops; the errors; the checkpoint reader.

Names are imported on first use, so ``import gpupas`` stays light (no Zarr, torch or CuPy).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gpupas.errors import (
    ArchiveExistsError,
    ArchiveNotFoundError,
    BackendUnavailableError,
    CodecUnavailableError,
    FormatError,
    GpupasError,
    IntegrityError,
    InvalidInputError,
    SnapshotNotFoundError,
    TensorNotFoundError,
    UnsupportedDtypeError,
    VersionNotFoundError,
)

__version__ = "0.2.0"

_LAZY = {
    "Archive": "gpupas.archive",
    "create_archive": "gpupas.archive",
    "open_archive": "gpupas.archive",
    "Layout": "gpupas.engine.encode",
    "Manifest": "gpupas.format.manifest",
    "CheckpointHook": "gpupas.integrations.training",
    "Repository": "gpupas.versions.repository",
    "Version": "gpupas.versions.model",
    "create_repository": "gpupas.versions.repository",
    "open_repository": "gpupas.versions.repository",
    "load_checkpoint": "gpupas.tensors",
}

if TYPE_CHECKING:  # pragma: no cover
    from gpupas.archive import Archive, create_archive, open_archive
    from gpupas.engine.encode import Layout
    from gpupas.format.manifest import Manifest
    from gpupas.integrations.training import CheckpointHook
    from gpupas.tensors import load_checkpoint
    from gpupas.versions.model import Version
    from gpupas.versions.repository import Repository, create_repository, open_repository


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gpupas' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "Archive",
    "ArchiveExistsError",
    "ArchiveNotFoundError",
    "BackendUnavailableError",
    "CheckpointHook",
    "CodecUnavailableError",
    "FormatError",
    "GpupasError",
    "IntegrityError",
    "InvalidInputError",
    "Layout",
    "Manifest",
    "Repository",
    "SnapshotNotFoundError",
    "TensorNotFoundError",
    "UnsupportedDtypeError",
    "Version",
    "VersionNotFoundError",
    "create_archive",
    "create_repository",
    "load_checkpoint",
    "open_archive",
    "open_repository",
]
