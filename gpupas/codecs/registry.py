"""Codec ids (the names stored on disk) -> implementations per backend, loaded on first use.

An id gpupas does not know means the archive was written by a newer gpupas (FormatError, "upgrade
gpupas"); an id it knows but cannot run here (a GPU-only codec on a CPU machine) raises
CodecUnavailableError naming the remedy.

An implementation is a class with ``encode_batch(chunks, bounds, size) -> list[bytes]``, which codes
chunks of at most ``size`` bytes each as if zero-padded to ``size``, ending a coder block at each
offset in the chunk's ``bounds`` where the format allows it, and returns the bodies (no checksum);
and ``decode_batch(bodies, outs)``, which fills each output (exactly ``size`` bytes) from a body and
raises IntegrityError where a body is undecodable or does not decode to exactly that many bytes
(never writing past it). Implementations of one id (one per backend) each decode the other's output.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from typing import Any

from gpupas.errors import CodecUnavailableError, FormatError


@dataclass(frozen=True)
class CodecInfo:
    codec_id: str
    letter: str
    portable: bool  # decodable by stock Zarr and by every backend
    impls: dict[str, str]  # backend -> "module:Class"
    zarr_codecs: tuple[dict[str, Any], ...] = ()  # how stock Zarr decodes a body (crc32c follows)
    remedy: str = ""


_KNOWN: dict[str, CodecInfo] = {}
_LOADED: dict[tuple[str, str], Any] = {}
_lock = threading.Lock()


def register(info: CodecInfo) -> None:
    """Make ``info.codec_id`` known (replacing an earlier registration of the same id)."""
    letters = {i.letter: i.codec_id for i in _KNOWN.values() if i.codec_id != info.codec_id}
    if info.letter in letters:
        raise ValueError(f"codec letter {info.letter!r} is taken by {letters[info.letter]!r}")
    _KNOWN[info.codec_id] = info
    with _lock:
        for key in [k for k in _LOADED if k[0] == info.codec_id]:
            del _LOADED[key]


def info(codec_id: str) -> CodecInfo:
    try:
        return _KNOWN[codec_id]
    except KeyError:
        raise FormatError(f"chunk codec {codec_id!r} is unknown to this gpupas (written by a newer one): "
                          "upgrade gpupas (pip install -U gpupas)") from None


def known() -> list[str]:
    return sorted(_KNOWN)


def get(codec_id: str, backend: str = "cpu") -> Any:
    """The implementation of ``codec_id`` for ``backend`` ("cpu" or "gpu"), created once."""
    key = (codec_id, backend)
    codec = _LOADED.get(key)
    if codec is not None:
        return codec
    meta = info(codec_id)
    target = meta.impls.get(backend)
    if target is None:
        have = ", ".join(sorted(meta.impls)) or "none"
        raise CodecUnavailableError(f"chunk codec {codec_id!r} has no {backend} implementation (it runs on: {have})"
                                    + (f"; {meta.remedy}" if meta.remedy else ""))
    module, _, cls = target.partition(":")
    with _lock:
        if key not in _LOADED:
            _LOADED[key] = getattr(importlib.import_module(module), cls)()
        return _LOADED[key]


def table(codec_ids: list[str]) -> dict[str, str]:
    """A stream's codec table: letter -> codec id."""
    return {info(c).letter: c for c in codec_ids}


register(CodecInfo("zstd", "z", True, {"cpu": "gpupas.codecs.zstd:Zstd", "gpu": "gpupas.codecs.nvcomp:NvcompZstd"},
                   ({"name": "zstd", "configuration": {"level": 1, "checksum": False}},)))
register(CodecInfo("deflate", "d", True, {"cpu": "gpupas.codecs.deflate:Deflate",
                                          "gpu": "gpupas.codecs.nvcomp:NvcompDeflate"},
                   ({"name": "gzip", "configuration": {"level": 6}},)))
register(CodecInfo("nvcomp-ans", "a", False, {"gpu": "gpupas.codecs.nvcomp:NvcompAns"},
                   ({"name": "gpupas.nvcomp_ans"},),
                   remedy="restore it on a machine with a CUDA GPU and nvCOMP (pip install 'gpupas[gpu-cu13]' "
                          "or 'gpupas[gpu-cu12]', device='cuda'), or convert the archive there to a portable codec: "
                          "gpupas compact --codec zstd"))
