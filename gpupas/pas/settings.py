"""Named encoder settings: what a commit tries, from fastest to smallest."""

from __future__ import annotations

from dataclasses import dataclass

from gpupas.errors import InvalidInputError


@dataclass(frozen=True)
class Setting:
    """Knobs of one encoder setting.

    ``context``: the encodings ('mat', 'sub', 'xor') that may use the context split ('mat-int': 'mat' of
    integer dtypes only; 'mat-float': 'mat' of float dtypes where the split saves a tenth, as mostly-zero
    weights do);
    ``min_group``: smallest group (bytes) that gets coder tables of its own;
    ``try_all``: code every chunk with each coder and keep the smallest (the compaction setting),
    else code with fast literal-only Zstandard and try Huffman-only Deflate only where Zstandard
    lands above the least Deflate could need (:func:`gpupas.codecs.policy.huffman_floor`); ``zstd_level``: the extra
    Zstandard level ``try_all`` runs; ``predict``: try the row-wise extrapolation of
    :mod:`gpupas.pas.predict` where the base is itself a delta; ``row_mask``: code only the rows
    of a delta that changed, where enough did not (:mod:`gpupas.pas.rows`); ``codecs``: the chunk
    codecs to choose among (:mod:`gpupas.codecs.policy`).
    """

    name: str
    context: tuple[str, ...] = ("sub", "xor", "mat-int", "mat-float")
    min_group: int = 8192
    try_all: bool = False
    zstd_level: int = 19
    predict: bool = True
    row_mask: bool = True
    codecs: tuple[str, ...] = ("zstd", "deflate")  # chunk codec ids the chunk policy chooses among

    def __post_init__(self) -> None:
        if "zstd" not in self.codecs:  # chunks that do not compress are stored as raw Zstandard frames
            raise InvalidInputError(f"chunk codecs {', '.join(self.codecs) or '(none)'} lack zstd, which every "
                                    "archive needs (incompressible chunks are stored as raw Zstandard frames): "
                                    "add zstd, e.g. " + ",".join(("zstd", *self.codecs)))


SETTINGS: dict[str, Setting] = {
    "fast": Setting("fast", context=(), predict=False),
    "default": Setting("default"),
    "strong": Setting("strong", context=("mat", "sub", "xor"), min_group=4096, try_all=True),
}


def get_setting(name: str | Setting) -> Setting:
    """The setting called ``name`` (or ``name`` itself when it already is one)."""
    if isinstance(name, Setting):
        return name
    if name not in SETTINGS:
        raise InvalidInputError(f"unknown setting {name!r}; choose one of {', '.join(SETTINGS)}")
    return SETTINGS[name]
