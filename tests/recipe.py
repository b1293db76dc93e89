"""An independent decoder of gpupas archives, written from ``docs/FORMAT.md`` alone.

It uses stock ``zarr``, NumPy, ``ml_dtypes`` and the standard library, and never imports gpupas:
if this module and gpupas disagree, one of them (or the specification) is wrong. It favours
plain code over speed: whole streams are read at once, every snapshot of a chain is decoded whole.

    bits = decode_snapshot(root, sid)          # tensor name -> flat little-endian unsigned patterns
    arrays = restore(root, sid)                # tensor name -> array of its dtype and shape
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import zarr

FORMATS = (1, 2, 3)  # manifest formats this recipe reads
ENCODINGS = ("mat", "sub", "xor", "pred")
PORTABLE = ("zstd", "deflate")  # codec ids stock zarr decodes
KNOWN_CODECS = ("zstd", "deflate", "nvcomp-ans")
FRAC = 13  # fixed-point fraction bits of the 'pred' factors
EMPTY = 2**64 - 1  # a shard index slot of a chunk the shard does not hold
LEGACY_CHUNK = 1 << 18
LEGACY_SEGMENT = 1 << 20

TOP_FIELDS = {"format", "id", "revision", "created", "revised", "base", "grand", "setting", "segment", "streams",
              "tensors", "raw_bytes", "stored_bytes", "commit_seconds", "meta"}
STREAM_FIELDS = {"folder", "length", "chunk_size", "shard_chunks", "codecs", "chunks", "stored", "tier"}
TENSOR_FIELDS = {"name", "dtype", "shape", "nbytes", "crc32", "enc", "ctx", "rows", "parts", "extras", "stored",
                 "plane_bytes", "rot", "scheme"}

ROTATED = ("float64", "float32", "float16", "bfloat16")  # sign bit rotated to the bottom
DTYPES = {name: np.dtype(getattr(ml_dtypes, name)) for name in (
    "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")}
DTYPES |= {name: np.dtype(name) for name in ("float64", "float32", "float16", "int8", "int16", "int32", "int64",
                                             "uint8", "uint16", "uint32", "uint64", "bool")}


class FormatError(ValueError):
    """The archive needs a newer reader (format, field, encoding, dtype or codec unknown): upgrade."""


class DamagedError(ValueError):
    """Bytes that do not match their checksum or their manifest."""


# -- CRC-32C (Castagnoli, reflected, polynomial 0x82F63B78: what zarr's crc32c codec uses) -------------------------
def _table() -> list[int]:
    out = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        out.append(c)
    return out


_CRC32C_TABLE = _table()


def crc32c_py(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C in plain Python (slow: manifests and shard indexes only)."""
    c = 0xFFFFFFFF
    t = _CRC32C_TABLE
    for b in bytes(data):
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


try:  # any CRC-32C implementation gives the same numbers; a compiled one is just faster
    import google_crc32c

    def crc32c(data: bytes | bytearray | memoryview) -> int:
        return int(google_crc32c.value(bytes(data)))
except ImportError:  # pragma: no cover
    crc32c = crc32c_py


# -- sealed JSON ----------------------------------------------------------------------------------------------------
_SEAL = re.compile(rb',"checksum":"crc32c:([0-9a-f]{8})"\}\s*$')


def unseal(data: bytes) -> tuple[dict[str, Any], bool]:
    """The object of a JSON document and whether it was sealed; a sealed one is checked first."""
    m = _SEAL.search(data)
    if m is None:
        return json.loads(data), False
    body = data[: m.start()] + b"}"
    if crc32c(body) != int(m.group(1), 16):
        raise DamagedError("the document does not match its checksum")
    return json.loads(body), True


def seal(obj: dict[str, Any]) -> bytes:
    """``obj`` as sealed JSON (what gpupas writes; used by tests to forge manifests)."""
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    return body[:-1] + b',"checksum":"crc32c:%08x"}\n' % crc32c(body)


# -- dtypes ---------------------------------------------------------------------------------------------------------
def dtype_of(name: str) -> np.dtype:
    if name not in DTYPES:
        raise FormatError(f"dtype {name!r} is unknown: upgrade")
    return DTYPES[name]


def uint_of(name: str) -> np.dtype:
    return np.dtype(f"<u{dtype_of(name).itemsize}")


def rows_of(shape: list[int]) -> tuple[int, int]:
    """(rows, values per row): rows are the first axis of a tensor of two or more axes whose first
    axis is not empty; any other tensor is one row."""
    n = math.prod(shape)
    if len(shape) >= 2 and shape[0] > 0:
        return shape[0], n // shape[0]
    return 1, n


# -- the archive and its manifests ----------------------------------------------------------------------------------
def archive_format(root: Path) -> int:
    doc = json.loads((Path(root) / "zarr.json").read_bytes())
    fmt = doc.get("attributes", {}).get("gpupas", {}).get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise DamagedError("not a gpupas archive")
    if fmt > max(FORMATS):
        raise FormatError(f"archive format {fmt}: upgrade")
    return fmt


def read_manifest(root: Path, sid: str) -> dict[str, Any]:
    """The manifest of ``sid`` as a format-3 object (formats 1 and 2 mapped onto it), checked."""
    data = (Path(root) / "manifests" / f"{sid}.json").read_bytes()
    doc, sealed = unseal(data)
    fmt = doc.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise DamagedError("no format number")
    if fmt not in FORMATS:
        raise FormatError(f"manifest format {fmt}: upgrade")
    if doc.get("id", sid) != sid:
        raise DamagedError(f"the manifest names snapshot {doc.get('id')!r}")
    if fmt < 3:
        return from_legacy(doc, sid)
    if not sealed:
        raise DamagedError("a format-3 manifest must be sealed")
    _known(doc, TOP_FIELDS, "manifest")
    for s in doc["streams"]:
        _known(s, STREAM_FIELDS, "stream")
        if len(s["chunks"]) != -(-s["length"] // s["chunk_size"]) or not set(s["chunks"]) <= set(s["codecs"]):
            raise DamagedError("chunk string does not fit the stream")
    for t in doc["tensors"]:
        _known(t, TENSOR_FIELDS, "tensor")
        t.setdefault("ctx", False)
        t.setdefault("rows", None)
        t.setdefault("extras", None)
    _check(doc)
    return doc


def _known(d: dict[str, Any], allowed: set[str], where: str) -> None:
    if set(d) - allowed:
        raise FormatError(f"{where} has unknown fields {sorted(set(d) - allowed)}: upgrade")


def from_legacy(d: dict[str, Any], sid: str) -> dict[str, Any]:
    """A format 1 or 2 manifest as format 3: one stream, tensors at their offsets, all planes in one part."""
    length, chunk = d["length"], d.get("chunk_size", LEGACY_CHUNK)
    nchunks = -(-length // chunk)
    stream = {"folder": d.get("data", sid), "length": length, "chunk_size": chunk,
              "shard_chunks": max(1, min(4096, nchunks)), "codecs": {"z": "zstd", "d": "deflate"},
              "chunks": d["chunks"]}
    if len(stream["chunks"]) != nchunks or not set(stream["chunks"]) <= {"z", "d"}:
        raise DamagedError("chunk string does not fit the stream")
    tensors = []
    for t in d["tensors"]:
        w = dtype_of(t["dtype"]).itemsize
        e = {"name": t["name"], "dtype": t["dtype"], "shape": t["shape"], "nbytes": t["nbytes"], "crc32": t["crc32"],
             "enc": t["enc"], "ctx": t.get("ctx") is True, "rows": t.get("kept"),
             "parts": [[0, t["offset"], 0, w]], "extras": None}
        if extras_nbytes(e):  # the row mask and the factors follow the tensor's planes
            e["extras"] = [0, t["offset"] + values(e) * w]
        tensors.append(e)
    out = {"format": d["format"], "id": sid, "revision": 0, "base": d.get("base"),
           "segment": d.get("segment", LEGACY_SEGMENT), "streams": [stream], "tensors": tensors}
    _check(out)
    return out


def values(e: dict[str, Any]) -> int:
    """Values coded: every value, or those of the changed rows where a row mask is stored."""
    rows, per = rows_of(e["shape"])
    return (rows if e["rows"] is None else e["rows"]) * per


def mask_nbytes(e: dict[str, Any]) -> int:
    return 0 if e["rows"] is None else -(-rows_of(e["shape"])[0] // 8)


def alpha_nbytes(e: dict[str, Any]) -> int:
    if e["enc"] != "pred":
        return 0
    return 2 * (rows_of(e["shape"])[0] if e["rows"] is None else e["rows"])


def extras_nbytes(e: dict[str, Any]) -> int:
    return mask_nbytes(e) + alpha_nbytes(e)


def reads_base(e: dict[str, Any]) -> bool:
    return e["enc"] != "mat" or e["rows"] is not None


def _check(m: dict[str, Any]) -> None:
    for e in m["tensors"]:
        if e["enc"] not in ENCODINGS:
            raise FormatError(f"encoding {e['enc']!r} is unknown: upgrade")
        dtype_of(e["dtype"])
    if m["base"] is None and any(reads_base(e) for e in m["tensors"]):
        raise DamagedError("a delta without a base")
    for e in m["tensors"]:
        if e["nbytes"] != math.prod(e["shape"]) * dtype_of(e["dtype"]).itemsize:
            raise DamagedError(f"{e['name']}: nbytes does not fit shape and dtype")
        if e.get("scheme") is not None and (e["enc"] != "mat" or e["rows"] is not None):
            raise DamagedError(f"{e['name']}: a lossy tensor is stored whole")
        w = dtype_of(coded_dtype(e)).itemsize
        first = 0
        for s, offset, p0, count in e["parts"]:
            if p0 != first or count < 1 or offset + count * values(e) > m["streams"][s]["length"]:
                raise DamagedError(f"{e['name']}: bad parts")
            first += count
        if first != w or (e["extras"] is None) != (extras_nbytes(e) == 0):
            raise DamagedError(f"{e['name']}: bad parts or extras")


def depth(root: Path, sid: str) -> int:
    """Links below ``sid`` in its delta chain (derived from the manifests: never stored)."""
    n, seen, m = 0, {sid}, read_manifest(root, sid)
    while m["base"] is not None:
        if m["base"] in seen:
            raise DamagedError("the delta chain loops")
        seen.add(m["base"])
        n += 1
        m = read_manifest(root, m["base"])
    return n


# -- streams --------------------------------------------------------------------------------------------------------
def stream_root(root: Path, stream: dict[str, Any]) -> Path:
    """Where a stream's folder lies: the archive, or the root of the tier it names (section 18; local tiers)."""
    name = stream.get("tier")
    if name is None:
        return Path(root)
    entry = json.loads((Path(root) / "zarr.json").read_bytes())["attributes"]["gpupas"].get("tiers", {}).get(name)
    if entry is None:
        raise FormatError(f"the stream names tier {name!r}, which the archive does not define")
    tier = Path(entry["url"])
    mark = json.loads((tier / "zarr.json").read_bytes())["attributes"]["gpupas"]["tier"]
    if mark.get("id") != entry.get("id"):
        raise DamagedError(f"{tier} is not tier {name!r} of this archive")
    return tier


def read_stream(root: Path, stream: dict[str, Any]) -> np.ndarray:
    """The stream's bytes: the bitwise OR of its codec arrays (each chunk is in exactly one; the
    others read as zeros there)."""
    out = np.zeros(stream["length"], np.uint8)
    for cid in sorted({stream["codecs"][letter] for letter in set(stream["chunks"])}):
        if cid not in KNOWN_CODECS:
            raise FormatError(f"chunk codec {cid!r} is unknown: upgrade")
        if cid not in PORTABLE:
            raise FormatError(f"chunk codec {cid!r} needs a GPU reader")
        arr = zarr.open_array(stream_root(root, stream) / "snapshots" / stream["folder"] / cid, mode="r")
        if arr.shape != (stream["length"],) or arr.dtype != np.uint8:
            raise DamagedError(f"array {cid} of {stream['folder']} does not match its stream")
        out |= arr[:]
    return out


def shard_index(path: Path, per: int) -> np.ndarray:
    """The (per, 2) index (offset, nbytes) at the end of a shard file, after checking its CRC-32C."""
    data = Path(path).read_bytes()
    tail = data[len(data) - 16 * per - 4 :]
    if len(tail) != 16 * per + 4 or struct.unpack("<I", tail[-4:])[0] != crc32c(tail[:-4]):
        raise DamagedError(f"the index of {path} is damaged")
    index = np.frombuffer(tail[:-4], "<u8").reshape(per, 2)
    for off, n in index:
        if off != EMPTY and int(off) + int(n) > len(data) - len(tail):
            raise DamagedError(f"the index of {path} points past its data")
    return index


def stored_chunks(root: Path, stream: dict[str, Any]) -> dict[int, tuple[str, bytes]]:
    """Chunk -> (codec id, stored bytes: body then CRC-32C) as the shard indexes of every codec
    array of ``stream`` list them (each chunk must be listed by exactly one array)."""
    per = stream["shard_chunks"]
    out: dict[int, tuple[str, bytes]] = {}
    for cid in stream["codecs"].values():
        folder = stream_root(root, stream) / "snapshots" / stream["folder"] / cid / "c"
        for f in sorted(folder.iterdir()) if folder.is_dir() else []:
            shard = int(f.name)
            data = f.read_bytes()
            for slot, (off, n) in enumerate(shard_index(f, per)):
                if off == EMPTY:
                    continue
                c = shard * per + slot
                if c in out:
                    raise DamagedError(f"chunk {c} is in two arrays")
                out[c] = (cid, data[int(off) : int(off) + int(n)])
    return out


# -- the encodings --------------------------------------------------------------------------------------------------
def _shift(x: np.ndarray, k: int) -> Any:
    return x.dtype.type(k)


def rotate(u: np.ndarray, rot: bool) -> np.ndarray:
    if not rot:
        return u.copy()
    bits = 8 * u.dtype.itemsize
    return (u << _shift(u, 1)) | (u >> _shift(u, bits - 1))


def unrotate(r: np.ndarray, rot: bool) -> np.ndarray:
    if not rot:
        return r
    bits = 8 * r.dtype.itemsize
    return (r >> _shift(r, 1)) | (r << _shift(r, bits - 1))


def top_byte(u: np.ndarray, rot: bool) -> np.ndarray:
    """The top byte of the (rotated, where ``rot``) patterns of raw ``u``: the context byte."""
    return plane(rotate(u, rot), 0)



def coded_dtype(e: dict[str, Any]) -> str:
    """The dtype whose patterns a tensor's planes code: its own, or its lossy representation's."""
    sc = e.get("scheme")
    if sc is None:
        return e["dtype"]
    if sc["name"] == "cast":
        return sc["to"]
    if sc["name"] == "fixed":
        return "int8" if sc["bits"] <= 8 else "int16" if sc["bits"] <= 16 else "int32"
    if sc["name"] == "quant":
        return "uint8"
    raise FormatError(f"lossy scheme {sc['name']!r} is unknown: upgrade")


def rotated(e: dict[str, Any]) -> bool:
    return coded_dtype(e) in ROTATED and e.get("rot", True) is not False


def restore_lossy(q: np.ndarray, sc: dict[str, Any], dtype: np.dtype) -> np.ndarray:
    """Values of ``dtype`` from representation ``q`` (FORMAT.md 9.9)."""
    if sc["name"] == "cast":
        return q.astype(dtype)
    if sc["name"] == "fixed":
        return np.ldexp(q.astype(np.float64), int(sc["exponent"])).astype(dtype)
    levels = np.asarray(sc["levels"], np.float64)
    if q.size and int(q.max()) >= levels.size:
        raise DamagedError("a quantized code beyond the table of levels")
    return levels[q].astype(dtype)


def plane(coded: np.ndarray, k: int) -> np.ndarray:
    """Plane ``k`` of coded patterns: byte ``w - 1 - k`` of each little-endian value (high byte first)."""
    w = coded.dtype.itemsize
    return coded.view(np.uint8).reshape(-1, w)[:, w - 1 - k]


def join(planes: list[np.ndarray], uint: np.dtype) -> np.ndarray:
    w = len(planes)
    le = np.empty((planes[0].size, w), np.uint8)
    for k, p in enumerate(planes):
        le[:, w - 1 - k] = p
    return le.reshape(-1).view(uint)


def unzigzag(c: np.ndarray) -> np.ndarray:
    one = _shift(c, 1)
    return (c >> one) ^ (np.zeros_like(c) - (c & one))


def prediction(ub: np.ndarray, ub2: np.ndarray, alpha: np.ndarray, row: np.ndarray) -> np.ndarray:
    """``ub + (alpha[row] * step + 2^(FRAC-1)) >> FRAC`` with ``step = ub - ub2`` as a signed integer
    of the pattern width; the sum wraps around."""
    w = ub.dtype.itemsize
    step = (ub - ub2).view(f"<i{w}").astype(np.int64)
    adj = (alpha[row].astype(np.int64) * step + (1 << (FRAC - 1))) >> FRAC  # arithmetic shift
    return ub + (adj % (1 << (8 * w))).astype(ub.dtype)


def decode_segment(planes: list[np.ndarray], enc: str, ctx: bool, name: str, base: np.ndarray | None,
                   rot: bool) -> np.ndarray:
    """Raw patterns of one segment from its planes (natural order restored, delta undone); ``base``
    is what the segment was coded against (the prediction, for 'pred'); ``name``: the coded dtype."""
    uint = uint_of(name)
    n = planes[0].size
    if ctx:
        key = planes[0] if enc == "mat" else top_byte(base, rot)
        order = np.argsort(key, kind="stable")
        if enc == "mat":  # plane 0 is stored in natural order; the others sorted by it
            planes = [key[order], *planes[1:]]
        coded = np.empty(n, uint)
        coded[order] = join(planes, uint)
    else:
        coded = join(planes, uint)
    if enc == "mat":
        return unrotate(coded, rot)
    if enc == "xor":
        return unrotate(coded, rot) ^ base
    return unzigzag(coded) + base  # 'sub', and 'pred' against its prediction


def decode_tensor(e: dict[str, Any], streams: list[np.ndarray], segment: int, base: np.ndarray | None,
                  grand: np.ndarray | None) -> np.ndarray:
    """The raw patterns (flat) of tensor entry ``e`` given its streams' bytes, its base's patterns and
    (for 'pred') its base's base's patterns."""
    uint = uint_of(coded_dtype(e))
    rows, per = rows_of(e["shape"])
    n = values(e)
    changed = None
    alpha = None
    if e["extras"] is not None:
        s, off = e["extras"]
        extra = streams[s][off : off + extras_nbytes(e)]
        if e["rows"] is not None:
            changed = np.unpackbits(extra[: mask_nbytes(e)], count=rows).astype(bool)
            if int(changed.sum()) != e["rows"]:
                raise DamagedError(f"{e['name']}: row mask does not match rows")
        if e["enc"] == "pred":
            f = extra[mask_nbytes(e) :]
            k = f.size // 2
            alpha = ((f[:k].astype(np.uint16) << np.uint16(8)) | f[k:]).view(np.int16)
    ub, ub2 = base, grand
    if changed is not None:
        ub = base.reshape(rows, per)[changed].reshape(-1)
        ub2 = None if grand is None else grand.reshape(rows, per)[changed].reshape(-1)
    coded = np.empty(n, uint)
    for a in range(0, n, segment):
        b = min(n, a + segment)
        planes = []
        for s, offset, _first, count in e["parts"]:
            start = offset + a * count
            planes += [streams[s][start + k * (b - a) : start + (k + 1) * (b - a)] for k in range(count)]
        against = None if ub is None else ub[a:b]
        if e["enc"] == "pred":
            against = prediction(against, ub2[a:b], alpha, np.arange(a, b) // per)
        coded[a:b] = decode_segment(planes, e["enc"], e["ctx"], coded_dtype(e), against, rotated(e))
    if e.get("scheme") is not None:  # a lossy representation: the values it restores to
        q = coded.view(dtype_of(coded_dtype(e)))
        return restore_lossy(q, e["scheme"], dtype_of(e["dtype"])).reshape(-1).view(uint_of(e["dtype"]))
    if changed is None:
        return coded
    out = base.reshape(rows, per).copy()  # unchanged rows are the base's
    out[changed] = coded.reshape(-1, per)
    return out.reshape(-1)


def decode_snapshot(root: Path, sid: str, memo: dict[str, dict[str, np.ndarray]] | None = None,
                    _seen: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """Every tensor of snapshot ``sid`` as raw patterns, checked by CRC-32; decodes its chain first."""
    memo = {} if memo is None else memo
    if sid in memo:
        return memo[sid]
    if sid in _seen:
        raise DamagedError("the delta chain loops")
    archive_format(root)
    m = read_manifest(root, sid)
    base = grand = {}
    if any(reads_base(e) for e in m["tensors"]):
        base = decode_snapshot(root, m["base"], memo, _seen | {sid})
    if any(e["enc"] == "pred" for e in m["tensors"]):
        grand_id = m.get("grand") if m["format"] >= 3 else read_manifest(root, m["base"])["base"]
        if grand_id is None:
            raise DamagedError(f"snapshot {sid} has 'pred' tensors but names no snapshot they extrapolate from")
        grand = decode_snapshot(root, grand_id, memo, _seen | {sid})
    streams = [read_stream(root, s) for s in m["streams"]]
    out = {}
    for e in m["tensors"]:
        bits = decode_tensor(e, streams, m["segment"], base.get(e["name"]) if reads_base(e) else None,
                             grand.get(e["name"]) if e["enc"] == "pred" else None)
        if zlib.crc32(bits.tobytes()) != e["crc32"]:
            raise DamagedError(f"snapshot {sid}: tensor {e['name']!r} does not match its CRC-32")
        out[e["name"]] = bits
    memo[sid] = out
    return out


def restore(root: Path, sid: str) -> dict[str, np.ndarray]:
    """Every tensor of ``sid`` as an array of its dtype and shape."""
    m = read_manifest(root, sid)
    bits = decode_snapshot(root, sid)
    return {e["name"]: bits[e["name"]].view(dtype_of(e["dtype"])).reshape(e["shape"]) for e in m["tensors"]}
