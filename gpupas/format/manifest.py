"""The manifest of a snapshot as typed objects: parsed and validated on read, written in one place.

A manifest says everything needed to rebuild a snapshot's tensors from its chunk streams (see
``docs/FORMAT.md``). Format 3 is written; formats 1 and 2 (one stream, implicit layout) are read
and turned into the same objects. Every field is checked before anything uses it: a damaged or
hostile manifest costs an :class:`~gpupas.errors.IntegrityError` naming it, one from a newer
gpupas a :class:`~gpupas.errors.FormatError` that says to upgrade.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from gpupas.errors import FormatError, IntegrityError, TensorNotFoundError
from gpupas.format import keys
from gpupas.format.sealed import is_sealed, seal, unseal
from gpupas.pas.planes import LAYOUTS, Layout, coding_layout
from gpupas.pas.rows import rows_of
from gpupas.pas.schemes import FLOATS as SCHEME_FLOATS
from gpupas.pas.schemes import NAMES as SCHEME_NAMES
from gpupas.pas.schemes import parse as parse_scheme
from gpupas.pas.schemes import repr_dtype
from gpupas.pas.transform import MIN_SEGMENT, SEGMENT

FORMAT = 3  # what this gpupas writes
NAMED_GRAND = 3  # from this format on, a manifest names what its 'pred' tensors extrapolate from (grand)
ENCODINGS = ("mat", "sub", "xor", "pred")
LEGACY_CHUNK = 1 << 18
LEGACY_SEGMENT = 1 << 20  # a format 1/2 manifest without "segment" (FORMAT.md 14): fixed, whatever SEGMENT becomes
LEGACY_SHARD_CHUNKS = 4096
LEGACY_CODECS = {"z": "zstd", "d": "deflate"}
MAX_LENGTH = 1 << 50  # bytes in one stream; far beyond any model, small enough for exact float math
MAX_NDIM = 64
_LISTED = "; list a snapshot's tensors with Archive.manifest(snapshot).tensors or `gpupas show VERSION --tensors`"

_TOP = {"format", "id", "revision", "created", "revised", "base", "grand", "setting", "segment", "streams",
        "tensors", "raw_bytes", "stored_bytes", "commit_seconds", "meta"}
_STREAM = {"folder", "length", "chunk_size", "shard_chunks", "codecs", "chunks", "stored", "tier"}
_TENSOR = {"name", "dtype", "shape", "nbytes", "crc32", "enc", "ctx", "rows", "parts", "extras", "stored",
           "plane_bytes", "rot", "scheme"}


def now() -> str:
    """The time as manifests and version records write it (``created``, ``revised``): ISO 8601, UTC."""
    return datetime.now(UTC).isoformat()


@dataclass(frozen=True, slots=True)
class Stream:
    """One logical byte stream of a snapshot, cut into ``chunk_size`` chunks, kept in ``folder``.

    Chunk ``c`` is stored with codec ``codecs[chunks[c]]``, in the sharded Zarr array named after
    that codec; ``shard_chunks`` chunks make one shard file.
    """

    folder: str
    length: int
    chunk_size: int
    shard_chunks: int
    codecs: dict[str, str]
    chunks: str
    stored: int = 0
    tier: str | None = None  # the store it lives in: one of the archive's tiers (None: the archive itself)

    @property
    def nchunks(self) -> int:
        return len(self.chunks)

    def codec_of(self, c: int) -> str:
        """The codec id of chunk ``c``."""
        return self.codecs[self.chunks[c]]

    def codec_ids(self) -> list[str]:
        """The codec ids this stream's chunks use, in table order (every codec of the table has an
        array in the folder; arrays of the others hold no chunk)."""
        used = set(self.chunks)
        return [cid for letter, cid in self.codecs.items() if letter in used]

    def to_dict(self) -> dict[str, Any]:
        d = {"folder": self.folder, "length": self.length, "chunk_size": self.chunk_size,
             "shard_chunks": self.shard_chunks, "codecs": dict(self.codecs), "chunks": self.chunks,
             "stored": self.stored}
        return d | ({"tier": self.tier} if self.tier is not None else {})


@dataclass(frozen=True, slots=True)
class Part:
    """Planes ``first .. first+count-1`` of a tensor, at ``offset`` of stream ``stream``.

    Segment by segment (segments of the manifest's ``segment`` coded values), each segment's
    planes one after another, highest first.
    """

    stream: int
    offset: int
    first: int
    count: int


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a snapshot: what it is, how it was coded, and where its bytes are."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    crc32: int
    enc: str
    ctx: bool
    parts: tuple[Part, ...]
    rows: int | None = None  # rows coded (the changed ones) where a row mask is stored
    extras: tuple[int, int] | None = None  # (stream, offset) of the row mask, then the 'pred' factors
    stored: int = 0  # stored bytes attributed to this tensor (an estimate where tensors share chunks)
    plane_bytes: tuple[int, ...] = ()  # of which, per plane
    rot: bool = True  # floats coded with their sign bit rotated to the bottom (False: patterns as they are)
    scheme: dict[str, Any] | None = None  # a lossy representation (see gpupas.pas.schemes); None: lossless

    @property
    def layout(self) -> Layout:
        """The layout of the tensor as restored (its dtype)."""
        return LAYOUTS[self.dtype]

    @property
    def coding(self) -> Layout:
        """The layout its planes were coded with: of the lossy representation, rotated or not."""
        return coding_layout(self.dtype if self.scheme is None else repr_dtype(self.scheme), self.rot)

    @property
    def width(self) -> int:
        """Planes: bytes per coded value."""
        return self.coding.width

    @property
    def lossy(self) -> bool:
        return self.scheme is not None

    @property
    def reads_base(self) -> bool:
        """Whether decoding this tensor reads the base snapshot (a delta, or rows kept from it)."""
        return self.enc != "mat" or self.rows is not None

    @property
    def masked(self) -> bool:
        return self.rows is not None

    @property
    def values(self) -> int:
        """Values coded: all of the tensor, or the changed rows where a row mask is stored."""
        rows, per = rows_of(self.shape)
        return (rows if self.rows is None else self.rows) * per

    @property
    def mask_nbytes(self) -> int:
        return 0 if self.rows is None else -(-rows_of(self.shape)[0] // 8)

    @property
    def alpha_nbytes(self) -> int:
        """Bytes of the 'pred' factors: two (high, low byte planes) per coded row."""
        if self.enc != "pred":
            return 0
        return 2 * (rows_of(self.shape)[0] if self.rows is None else self.rows)

    @property
    def extras_nbytes(self) -> int:
        return self.mask_nbytes + self.alpha_nbytes

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                             "nbytes": self.nbytes, "crc32": self.crc32, "enc": self.enc, "ctx": self.ctx}
        if self.rows is not None:
            d["rows"] = self.rows
        d["parts"] = [[p.stream, p.offset, p.first, p.count] for p in self.parts]
        if self.extras is not None:
            d["extras"] = list(self.extras)
        if not self.rot:
            d["rot"] = False
        if self.scheme is not None:
            d["scheme"] = dict(self.scheme)
        d["stored"] = self.stored
        d["plane_bytes"] = list(self.plane_bytes)
        return d


@dataclass(frozen=True)
class Manifest:
    """A snapshot: its tensors, their encodings, the streams holding them, and its delta base."""

    id: str
    created: str
    base: str | None
    streams: tuple[Stream, ...]
    tensors: tuple[TensorEntry, ...]
    format: int = FORMAT
    grand: str | None = None  # what 'pred' tensors extrapolate from with the base (format 3; engine.chain.grand_of)
    revision: int = 0
    revised: str | None = None
    setting: str = "default"
    segment: int = SEGMENT
    raw_bytes: int = 0
    stored_bytes: int = 0
    commit_seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def by_name(self) -> dict[str, TensorEntry]:
        return {e.name: e for e in self.tensors}

    def tensor(self, name: str) -> TensorEntry:
        try:
            return self.by_name[name]
        except KeyError:
            raise TensorNotFoundError(f"snapshot {self.id} has no tensor {name!r}{_LISTED}") from None

    def select(self, names: Any = None) -> list[TensorEntry]:
        """Entries of ``names`` (all when None), in the order given; TensorNotFoundError names the missing."""
        if names is None:
            return list(self.tensors)
        wanted = list(names)
        missing = [n for n in wanted if n not in self.by_name]
        if missing:
            raise TensorNotFoundError(f"snapshot {self.id} has no tensor(s) {missing[:5]}"
                                      f"{'...' if len(missing) > 5 else ''}{_LISTED}")
        return [self.by_name[n] for n in wanted]

    @property
    def lossy(self) -> bool:
        """Whether any tensor is stored in a lossy representation (restores are then not bit-exact)."""
        return any(e.scheme is not None for e in self.tensors)

    @property
    def has_pred(self) -> bool:
        return any(e.enc == "pred" for e in self.tensors)

    @property
    def implicit_grand(self) -> bool:
        """Formats 1 and 2: 'pred' tensors extrapolate from the base's base, which the manifest does not name."""
        return self.format < NAMED_GRAND

    def folders(self) -> list[str]:
        return [s.folder for s in self.streams]

    def revise(self, streams: tuple[Stream, ...], tensors: tuple[TensorEntry, ...], revised: str, *,
               setting: str, segment: int, base: str | None, grand: str | None) -> Manifest:
        """The next revision: same id and tensors' bits; new streams, layout and (optionally) bases."""
        stored = sum(s.stored for s in streams)
        return replace(self, format=FORMAT, revision=self.revision + 1, revised=revised, streams=streams,
                       tensors=tensors, stored_bytes=stored, setting=setting, segment=segment, base=base,
                       grand=grand)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "id": self.id, "revision": self.revision, "created": self.created,
            "revised": self.revised, "base": self.base, "grand": self.grand, "setting": self.setting,
            "segment": self.segment,
            "streams": [s.to_dict() for s in self.streams], "tensors": [e.to_dict() for e in self.tensors],
            "raw_bytes": self.raw_bytes, "stored_bytes": self.stored_bytes, "commit_seconds": self.commit_seconds,
            "meta": self.meta,
        }

    def to_bytes(self) -> bytes:
        """The manifest as written: sealed JSON (format 3)."""
        return seal(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes, sid: str) -> Manifest:
        """Parse and validate the manifest file of snapshot ``sid`` (any format this gpupas reads)."""
        what = f"the manifest of snapshot {sid}"
        d = unseal(data, what, required=False)
        sealed = is_sealed(data)
        fmt = d.get("format")
        if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
            raise IntegrityError(f"{what} has no valid format number (damaged)")
        if fmt > FORMAT:
            raise FormatError(f"snapshot {sid} was written in format {fmt} by a newer gpupas; this one reads formats "
                              f"up to {FORMAT}: upgrade gpupas (pip install -U gpupas)")
        if fmt == FORMAT and not sealed:
            raise IntegrityError(f"{what} has no checksum (damaged)")
        return _added_up(_parse(d, sid, what) if fmt == FORMAT else _parse_legacy(d, sid, what))


# -- parsing ---------------------------------------------------------------------------------------------------
def _added_up(m: Manifest) -> Manifest:
    """``m`` with its tensors' stored bytes adding up to the snapshot's, as gpupas writes them now: earlier ones
    (formats 1 to 3) rounded each tensor's share of the chunks on its own, so the sum missed by up to a byte a
    tensor, and reports that add tensors (stats, log, per layer) disagreed with those that take the snapshot's
    (show, plan, compact). The largest tensors take (or give back) the difference, a byte each."""
    left = m.stored_bytes - sum(e.stored for e in m.tensors)
    if not 0 < abs(left) <= len(m.tensors):  # more is not rounding: left as written
        return m
    out = list(m.tensors)
    for i in sorted(range(len(out)), key=lambda i: -out[i].stored)[:abs(left)]:
        out[i] = replace(out[i], stored=max(0, out[i].stored + (1 if left > 0 else -1)))
    return replace(m, tensors=tuple(out))


def _fail(what: str, msg: str) -> IntegrityError:
    return IntegrityError(f"{what} is damaged: {msg}; restore the archive from a copy")


def _int(v: Any, what: str, name: str, lo: int = 0, hi: int = MAX_LENGTH) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _fail(what, f"{name} is {v!r}, not an integer in [{lo}, {hi}]")
    return v


def _str(v: Any, what: str, name: str) -> str:
    if not isinstance(v, str):
        raise _fail(what, f"{name} is not a string")
    return v


def _seconds(v: Any) -> float:
    """A manifest's commit_seconds (informative): 0.0 where it is not a finite number (an int past a double's
    range, 10**400, too: math.isfinite raises OverflowError on it)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return 0.0
    try:
        f = float(v)
    except OverflowError:
        return 0.0
    return f if math.isfinite(f) else 0.0


def _unknown(d: dict[str, Any], allowed: set[str], what: str, where: str) -> None:
    extra = set(d) - allowed
    if extra:
        raise FormatError(f"{what}: {where} has field(s) {sorted(extra)} that this gpupas does not know (written "
                          "by a newer gpupas): upgrade gpupas")


def _list(v: Any, what: str) -> list[Any]:
    if not isinstance(v, list):
        raise _fail(what, "a per-plane size list is not a list")
    return v


def _name_list(d: dict[str, Any], key: str, what: str) -> list[Any]:
    v = d.get(key)
    if not isinstance(v, list):
        raise _fail(what, f"{key} is not a list")
    return v


def _dtype(v: Any, what: str, name: str) -> str:
    if not isinstance(v, str):
        raise _fail(what, f"dtype of tensor {name!r} is not a string")
    if v not in LAYOUTS:
        raise FormatError(f"{what}: tensor {name!r} has dtype {v!r}, which this gpupas does not know: upgrade gpupas")
    return v


def _shape(v: Any, what: str, name: str) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > MAX_NDIM:
        raise _fail(what, f"shape of tensor {name!r} is not a list of at most {MAX_NDIM} sizes")
    return tuple(_int(s, what, f"shape of tensor {name!r}") for s in v)


def _enc(v: Any, what: str, name: str) -> str:
    if not isinstance(v, str):
        raise _fail(what, f"encoding of tensor {name!r} is not a string")
    if v not in ENCODINGS:
        raise FormatError(f"{what}: tensor {name!r} uses encoding {v!r}, which this gpupas does not know: "
                          "upgrade gpupas")
    return v


def _scheme(v: Any, what: str, name: str) -> dict[str, Any] | None:
    if v is None:
        return None
    if not isinstance(v, dict) or v.get("name") not in SCHEME_NAMES:
        raise FormatError(f"{what}: tensor {name!r} is stored in a lossy scheme this gpupas does not know: "
                          "upgrade gpupas")
    try:
        s = parse_scheme(v)
    except ValueError as exc:
        raise _fail(what, f"lossy scheme of tensor {name!r}: {exc}") from None
    if s["name"] == "fixed" and not (isinstance(s.get("exponent"), int) and -1100 <= s["exponent"] <= 1100):
        raise _fail(what, f"fixed-point exponent of tensor {name!r} is missing or out of range")
    if s["name"] == "quant" and not (isinstance(s.get("levels"), list) and 1 <= len(s["levels"]) <= 2 ** s["bits"]
                                     and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                             for x in s["levels"])):
        raise _fail(what, f"the levels of quantized tensor {name!r} are not a list of at most 2**bits numbers")
    return s


def _stream(d: Any, what: str, i: int) -> Stream:
    if not isinstance(d, dict):
        raise _fail(what, f"stream {i} is not an object")
    _unknown(d, _STREAM, what, f"stream {i}")
    folder = d.get("folder")
    if not keys.is_folder(folder):
        raise _fail(what, f"stream {i} names folder {folder!r}, not one folder inside the archive")
    length = _int(d.get("length"), what, f"length of stream {i}")
    chunk = _int(d.get("chunk_size"), what, f"chunk_size of stream {i}", 1, 1 << 30)
    per = _int(d.get("shard_chunks"), what, f"shard_chunks of stream {i}", 1, 1 << 24)
    codecs = d.get("codecs")
    if not isinstance(codecs, dict) or not all(isinstance(k, str) and len(k) == 1 and keys.is_name(v)
                                               for k, v in codecs.items()):
        raise _fail(what, f"codec table of stream {i} is not a map of one letter to a codec id")
    chunks = _str(d.get("chunks"), what, f"chunks of stream {i}")
    if len(chunks) != -(-length // chunk):
        raise _fail(what, f"stream {i} lists {len(chunks)} chunks; {length} bytes in chunks of {chunk} need "
                          f"{-(-length // chunk)}")
    if not set(chunks) <= set(codecs):
        raise _fail(what, f"stream {i} has chunk codes {sorted(set(chunks) - set(codecs))} not in its codec table")
    tier = d.get("tier")
    if tier is not None and not keys.is_name(tier):
        raise _fail(what, f"stream {i} names tier {tier!r}, not a tier name")
    return Stream(folder, length, chunk, per, dict(codecs), chunks, _int(d.get("stored", 0), what, "stored"), tier)


def _parse(d: dict[str, Any], sid: str, what: str) -> Manifest:
    _unknown(d, _TOP, what, "the manifest")
    if d.get("id") != sid:
        raise _fail(what, f"it names snapshot {d.get('id')!r}")
    base = d.get("base")
    if base is not None and (not keys.is_name(base) or base == sid):
        raise _fail(what, f"base {base!r} is not another snapshot's id")
    grand = d.get("grand")
    if grand is not None and (not keys.is_name(grand) or grand == sid):
        raise _fail(what, f"grand {grand!r} is not another snapshot's id")
    segment = _int(d.get("segment"), what, "segment", MIN_SEGMENT, 1 << 31)
    streams = tuple(_stream(s, what, i) for i, s in enumerate(_name_list(d, "streams", what)))
    tensors = []
    seen: set[str] = set()
    for i, t in enumerate(_name_list(d, "tensors", what)):
        if not isinstance(t, dict):
            raise _fail(what, f"tensor {i} is not an object")
        _unknown(t, _TENSOR, what, f"tensor {i}")
        name = t.get("name")
        if not isinstance(name, str) or not name or "\0" in name or name in seen:
            raise _fail(what, f"tensor {i} has a missing, empty or repeated name")
        seen.add(name)
        dtype = _dtype(t.get("dtype"), what, name)
        shape = _shape(t.get("shape"), what, name)
        parts = t.get("parts")
        if not isinstance(parts, list) or not all(isinstance(p, list) and len(p) == 4 for p in parts):
            raise _fail(what, f"parts of tensor {name!r} are not [stream, offset, first, count] lists")
        extras = t.get("extras")
        if extras is not None and not (isinstance(extras, list) and len(extras) == 2):
            raise _fail(what, f"extras of tensor {name!r} are not [stream, offset]")
        entry = TensorEntry(
            name=name, dtype=dtype, shape=shape,
            nbytes=_int(t.get("nbytes"), what, f"nbytes of {name!r}"),
            crc32=_int(t.get("crc32"), what, f"crc32 of {name!r}", 0, 2**32 - 1),
            enc=_enc(t.get("enc"), what, name),
            ctx=t.get("ctx") is True,
            rows=None if t.get("rows") is None else _int(t.get("rows"), what, f"rows of {name!r}"),
            parts=tuple(Part(*(_int(x, what, f"parts of {name!r}") for x in p)) for p in parts),
            extras=None if extras is None else (_int(extras[0], what, f"extras of {name!r}"),
                                                _int(extras[1], what, f"extras of {name!r}")),
            stored=_int(t.get("stored", 0), what, f"stored of {name!r}"),
            plane_bytes=tuple(_int(x, what, "plane_bytes") for x in _list(t.get("plane_bytes", []), what)),
            rot=t.get("rot", True) is not False,
            scheme=_scheme(t.get("scheme"), what, name),
        )
        for flag, default in (("ctx", False), ("rot", True)):
            if not isinstance(t.get(flag, default), bool):
                raise _fail(what, f"{flag} of tensor {name!r} is not true or false")
        tensors.append(entry)
    m = Manifest(
        id=sid, created=_str(d.get("created"), what, "created"), base=base, streams=streams,
        tensors=tuple(tensors), format=FORMAT, grand=grand,
        revision=_int(d.get("revision"), what, "revision", 0, 1 << 40),
        revised=None if d.get("revised") is None else _str(d.get("revised"), what, "revised"),
        setting=_str(d.get("setting", ""), what, "setting"), segment=segment,
        raw_bytes=_int(d.get("raw_bytes", 0), what, "raw_bytes"),
        stored_bytes=_int(d.get("stored_bytes", 0), what, "stored_bytes"),
        commit_seconds=_seconds(d.get("commit_seconds")),
        meta=meta if isinstance(meta := d.get("meta"), dict) else {},
    )
    check(m, what)
    return m


def _parse_legacy(d: dict[str, Any], sid: str, what: str) -> Manifest:
    """A format 1 or 2 manifest: one stream of 256 KiB chunks, tensors one after another in it."""
    if d.get("id", sid) != sid:
        raise _fail(what, f"it names snapshot {d.get('id')!r}")
    folder = d.get("data", sid)
    if not keys.is_folder(folder):
        raise _fail(what, f"its data folder {folder!r} is not one folder inside the archive")
    length = _int(d.get("length"), what, "length")
    chunk = _int(d.get("chunk_size", LEGACY_CHUNK), what, "chunk_size", 1, 1 << 30)
    chunks = _str(d.get("chunks"), what, "chunks")
    nchunks = -(-length // chunk)
    if len(chunks) != nchunks or not set(chunks) <= set(LEGACY_CODECS):
        raise _fail(what, f"chunks lists {len(chunks)} codes; {nchunks} of 'z'/'d' expected")
    stream = Stream(folder, length, chunk, max(1, min(LEGACY_SHARD_CHUNKS, nchunks)), dict(LEGACY_CODECS), chunks,
                    _int(d.get("stored_bytes", 0), what, "stored_bytes"))
    base = d.get("base")
    if base is not None and (not keys.is_name(base) or base == sid):
        raise _fail(what, f"base {base!r} is not another snapshot's id")
    tensors = []
    seen: set[str] = set()
    for i, t in enumerate(_name_list(d, "tensors", what)):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"] or t["name"] in seen:
            raise _fail(what, f"tensor {i} is not an object with a unique name")
        name = t["name"]
        seen.add(name)
        dtype = _dtype(t.get("dtype"), what, name)
        shape = _shape(t.get("shape"), what, name)
        enc = _enc(t.get("enc"), what, name)
        kept = None if t.get("kept") is None else _int(t.get("kept"), what, f"kept of {name!r}")
        offset = _int(t.get("offset"), what, f"offset of {name!r}")
        entry = TensorEntry(name=name, dtype=dtype, shape=shape, nbytes=_int(t.get("nbytes"), what, "nbytes"),
                            crc32=_int(t.get("crc32"), what, "crc32", 0, 2**32 - 1), enc=enc, ctx=t.get("ctx") is True,
                            parts=(Part(0, offset, 0, LAYOUTS[dtype].width),), rows=kept,
                            stored=_int(t.get("stored", 0), what, "stored"),
                            plane_bytes=tuple(_int(x, what, "planes") for x in _list(t.get("planes", []), what)))
        if entry.extras_nbytes:  # the row mask and factors followed the planes
            entry = replace(entry, extras=(0, offset + entry.values * entry.width))
        tensors.append(entry)
    m = Manifest(id=sid, created=_str(d.get("created", ""), what, "created"), base=base, streams=(stream,),
                 tensors=tuple(tensors), format=d["format"], setting=str(d.get("setting", "")),
                 segment=_int(d.get("segment", LEGACY_SEGMENT), what, "segment", MIN_SEGMENT, 1 << 31),
                 raw_bytes=_int(d.get("raw_bytes", 0), what, "raw_bytes"),
                 stored_bytes=_int(d.get("stored_bytes", 0), what, "stored_bytes"),
                 commit_seconds=_seconds(d.get("commit_seconds")),
                 meta=meta if isinstance(meta := d.get("meta"), dict) else {})
    check(m, what)
    return m


def check(m: Manifest, what: str) -> None:
    """Cross-field checks: sizes agree with shapes, every byte a tensor names lies inside its stream."""
    if m.base is None and any(e.reads_base for e in m.tensors):
        raise _fail(what, "a tensor is a delta but the snapshot has no base")
    if not m.implicit_grand and m.has_pred != (m.grand is not None):
        raise _fail(what, "'pred' tensors and the snapshot they extrapolate from ('grand') go together")
    for e in m.tensors:
        w = e.width
        if e.nbytes != math.prod(e.shape) * e.layout.width:
            raise _fail(what, f"tensor {e.name!r}: {e.nbytes} bytes do not fit shape {list(e.shape)} of {e.dtype}")
        if e.scheme is not None and (e.enc != "mat" or e.rows is not None or e.layout.name not in SCHEME_FLOATS):
            raise _fail(what, f"tensor {e.name!r}: a lossy tensor is a float tensor stored whole")
        if e.enc == "pred" and w > 4:
            raise _fail(what, f"tensor {e.name!r}: 'pred' is defined for values of up to 4 bytes, not {e.dtype}")
        rows, per = rows_of(e.shape)
        if e.rows is not None and not (0 <= e.rows <= rows):
            raise _fail(what, f"tensor {e.name!r} codes {e.rows} of {rows} rows")
        if e.rows is not None and per == 0:
            raise _fail(what, f"tensor {e.name!r} has no values but a row mask")
        n = e.values
        first = 0
        for p in e.parts:
            if p.first != first or p.count < 1 or p.stream >= len(m.streams):
                raise _fail(what, f"tensor {e.name!r}: its parts do not cover planes 0..{w - 1} in order")
            first += p.count
            if p.offset + p.count * n > m.streams[p.stream].length:
                raise _fail(what, f"tensor {e.name!r} runs past the end of stream {p.stream}")
        if first != w:
            raise _fail(what, f"tensor {e.name!r}: its parts hold {first} planes, its dtype has {w}")
        if (e.extras is None) != (e.extras_nbytes == 0):
            raise _fail(what, f"tensor {e.name!r}: row mask or factors missing or unexpected")
        if e.extras is not None:
            s, off = e.extras
            if s >= len(m.streams) or off + e.extras_nbytes > m.streams[s].length:
                raise _fail(what, f"tensor {e.name!r}: its row mask or factors lie outside stream {s}")
