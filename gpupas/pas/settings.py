"""Named encoder settings: what a commit tries, from fastest to smallest."""

from __future__ import annotations

from dataclasses import dataclass

from gpupas.errors import InvalidInputError


@dataclass(frozen=True)
class Setting:
    """Knobs of one encoder setting.

    ``context``: allow the context split; ``min_group``: smallest group (bytes) that gets
    statistics of its own; ``zstd_level``: level for Zstandard chunks; ``try_all``: code every
    chunk with each coder and keep the smallest (else pick one coder from the sampled entropy).
    """

    name: str
    context: bool = True
    min_group: int = 32768
    zstd_level: int = 1
    try_all: bool = False


SETTINGS: dict[str, Setting] = {
    "fast": Setting("fast", context=False),
    "default": Setting("default"),
    "strong": Setting("strong", min_group=16384, zstd_level=19, try_all=True),
}


def get_setting(name: str | Setting) -> Setting:
    """The setting called ``name`` (or ``name`` itself when it already is one)."""
    if isinstance(name, Setting):
        return name
    if name not in SETTINGS:
        raise InvalidInputError(f"unknown setting {name!r}; choose one of {', '.join(SETTINGS)}")
    return SETTINGS[name]
