"""Sealed JSON: a JSON object whose last member is a CRC-32C of the text before it.

    {"format":3, ... ,"checksum":"crc32c:1a2b3c4d"}

The checksum covers the document's bytes up to (not including) ``,"checksum":`` followed by
``}``: the same object without its checksum, exactly as written. Any JSON parser reads a sealed
document; checking it needs only string slicing and a CRC-32C. Text is ASCII (``\\u`` escapes), so
the bytes do not depend on an encoding.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gpupas.errors import IntegrityError
from gpupas.format.checksum import crc32c

_SEAL = re.compile(rb',"checksum":"crc32c:([0-9a-f]{8})"\}\s*$')


def seal(obj: dict[str, Any]) -> bytes:
    """``obj`` (a non-empty dict without a "checksum" key) as sealed JSON bytes."""
    if not obj or "checksum" in obj:
        raise ValueError("seal() takes a non-empty object without a 'checksum' member")
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    return body[:-1] + b',"checksum":"crc32c:%08x"}\n' % crc32c(body)


def unseal(data: bytes, what: str, *, required: bool = True, legacy: bytes = b"") -> dict[str, Any]:
    """The object of sealed JSON ``data`` after checking its checksum; IntegrityError names ``what``.

    With ``required=False`` a document without a checksum (written before sealing existed) is
    accepted as it is, if it starts with ``legacy`` (how the old writer began: a sealed document whose
    seal was damaged is then not taken for an old one).
    """
    m = _SEAL.search(data)
    if m is None:
        if required or not data.startswith(legacy):
            raise IntegrityError(f"{what} has no valid checksum (damaged, or not written by gpupas)")
        obj = _parse(data, what)
        if "checksum" in obj:
            raise IntegrityError(f"{what} has a damaged checksum")
        return obj
    body = data[: m.start()] + b"}"
    if crc32c(body) != int(m.group(1), 16):
        raise IntegrityError(f"{what} does not match its checksum (damaged)")
    return _parse(body, what)


def is_sealed(data: bytes) -> bool:
    return _SEAL.search(data) is not None


def _parse(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise IntegrityError(f"{what} is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise IntegrityError(f"{what} is not a JSON object")
    return obj


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")
