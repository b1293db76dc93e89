"""The tables the CUDA kernels of ``kernels/`` read, and a NumPy mirror of every kernel.

The CuPy backend builds its launch tables here (segments, CRC messages, payload jobs: int64 rows
of addresses and sizes) and runs the kernels of ``kernels/*.cu`` over them. The ``ref_*``
functions execute the same tables with NumPy, step for step as the CUDA code does (the same
per-value arithmetic, the same counting sort, the same CRC pieces and GF(2) joins, the same frame
layout), reading and writing real host memory at the tables' addresses. The tests run them on
the CPU against :mod:`gpupas.pas`, ``zlib``, ``gzip`` and the CPU codecs, so the math of every
kernel is checked where no GPU is at hand. The constants mirror the ``#define`` lines of the
``.cu`` files (a test compares them).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gpupas.codecs.framing import GZIP_HEAD, ZSTD_BLOCK, gzip_header_size, raw_frame_size
from gpupas.pas.predict import FRAC

# -- kernels/planes.cu ---------------------------------------------------------------------------------------------
STRIDE = 17
F_VAL, F_BASE, F_BASE2, F_ALPHA, F_N, F_FIRST, F_PER, F_MODE, F_TILE0, F_PLANE = range(10)
TILE = 4096
ENC_MAT, ENC_SUB, ENC_XOR, ENC_PRED = 0, 1, 2, 3
ENCODINGS = {"mat": ENC_MAT, "sub": ENC_SUB, "xor": ENC_XOR, "pred": ENC_PRED}
PRED_FRAC = FRAC  # the fixed-point prediction factors' fraction bits (pas.predict)
CTX_THREADS = 1024  # planes_ctx's block size

# -- kernels/crc.cu ------------------------------------------------------------------------------------------------
MSG_STRIDE = 4
M_PTR, M_LEN, M_PIECE0, M_DST = range(4)
PIECE = 1024
LANE_BYTES = 32
LOG2_LANE_BITS = 8
LOG2_PIECE_BITS = 13
CRC32_POLY = 0xEDB88320  # gzip, zlib (reflected)
CRC32C_POLY = 0x82F63B78  # Castagnoli (reflected)

# -- kernels/frames.cu ---------------------------------------------------------------------------------------------
JOB_STRIDE = 7
J_KIND, J_SRC, J_SRCLEN, J_DST, J_SIZE, J_N, J_CRC = range(7)
KIND_RAW, KIND_CODED, KIND_GZIP = 0, 1, 2
GZIP_HEADER = 10
SPAN_STRIDE = 3
RUN_THREADS = 256  # run_bytes's block size

U64 = np.uint64


def kernel_dir() -> Path:
    """Where the ``.cu`` sources are: ``$GPUPAS_KERNELS``, else the checkout's ``kernels/``, else where a
    wheel installed them (``<prefix>/share/gpupas/kernels``)."""
    env = os.environ.get("GPUPAS_KERNELS")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[2] / "kernels"
    return here if here.is_dir() else Path(sys.prefix) / "share" / "gpupas" / "kernels"


def kernel_source(name: str) -> str:
    return (kernel_dir() / name).read_text()


# -- memory at an address (the reference kernels read and write what the tables point at) -------------------------
def mem(addr: int, nbytes: int) -> np.ndarray:
    """A writable uint8 view of ``nbytes`` of host memory at ``addr``."""
    if nbytes == 0:
        return np.empty(0, np.uint8)
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(addr))


def host_addr(a: np.ndarray) -> int:
    """The address of a NumPy array's first byte (what ``.data.ptr`` is for a CuPy array)."""
    return int(a.ctypes.data)


# =================================================================================================================
# planes.cu
# =================================================================================================================
def mode_of(width: int, enc: str, rotate: bool, ctx: bool) -> int:
    return width | ENCODINGS[enc] << 8 | int(rotate) << 12 | int(ctx) << 13


def segment_row(val: int, base: int, base2: int, alpha: int, n: int, first: int, per: int, mode: int,
                planes: Sequence[int]) -> list[int]:
    """One row of the segment table (``planes``: the address of each plane of the segment)."""
    row = [val, base, base2, alpha, n, first, per, mode, 0, *planes]
    return row + [0] * (STRIDE - len(row))


def tensor_rows(val: int, base: int, base2: int, alpha: int, values: int, width: int, enc: str, rotate: bool,
                ctx: bool, per: int, parts: Sequence[tuple[int, int, int, int]], where: Callable[[int, int], int],
                segment: int) -> list[list[int]]:
    """The segment rows of one tensor: ``values`` coded values of ``width`` bytes at address ``val``
    (coded against ``base``, and for 'pred' ``base2`` and the factors at ``alpha``; 0: none), its
    planes in ``parts`` (stream, offset, first plane, count) of the streams, ``where(stream, offset)``
    giving a stream byte's address (docs/FORMAT.md 8)."""
    mode = mode_of(width, enc, rotate, ctx)
    rows = []
    for a in range(0, values, segment):
        b = min(values, a + segment)
        planes = [where(s, off + a * count + k * (b - a)) for s, off, _, count in parts for k in range(count)]
        rows.append(segment_row(val + a * width, base + a * width if base else 0, base2 + a * width if base2 else 0,
                                alpha, b - a, a, max(1, per), mode, planes))
    return rows


def encode_rows(staged: Sequence[Any], placements: Sequence[Any], arrays: Sequence[tuple[Any, Any, Any]],
                alpha_addrs: dict[int, int], stream_addrs: Sequence[int], segment: int,
                addr: Callable[[Any], int]) -> list[list[int]]:
    """The segment rows of a snapshot's staged tensors (:class:`gpupas.engine.stage.Staged`), placed by
    ``placements``: ``arrays[i]`` = tensor i's (coded values, base, grand-base) as contiguous arrays
    whose address ``addr`` gives, ``alpha_addrs[i]`` its 'pred' factors, ``stream_addrs[s]`` stream s."""
    from gpupas.pas.rows import rows_of

    rows = []
    for i, (st, pl) in enumerate(zip(staged, placements)):
        u, ub, ub2 = arrays[i]
        enc = st.plan.enc
        rows += tensor_rows(addr(u), addr(ub) if enc != "mat" else 0, addr(ub2) if enc == "pred" else 0,
                            alpha_addrs.get(i, 0), int(st.u.size), st.layout.width, enc, st.layout.rotate,
                            st.plan.ctx, rows_of(st.coded_shape)[1],
                            [(p.stream, p.offset, p.first, p.count) for p in pl.parts],
                            lambda s, off: stream_addrs[s] + off, segment)
    return rows


def segment_tables(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, int, np.ndarray]:
    """Split rows into the planes_plain table (with each segment's first tile set), its tile count,
    and the planes_ctx table. Empty segments are left out."""
    rows = [r for r in rows if r[F_N] > 0]
    plain = np.array([r for r in rows if not (r[F_MODE] >> 13) & 1], np.int64).reshape(-1, STRIDE)
    ctx = np.array([r for r in rows if (r[F_MODE] >> 13) & 1], np.int64).reshape(-1, STRIDE)
    tiles = -(-plain[:, F_N] // TILE)
    plain[:, F_TILE0] = np.cumsum(tiles) - tiles
    return plain, int(tiles.sum()), ctx


class _Seg:
    """A segment table row, read as planes.cu's ``Seg``."""

    def __init__(self, e: np.ndarray):
        self.e = [int(x) for x in e]
        mode = self.e[F_MODE]
        self.w, self.enc = mode & 0xFF, (mode >> 8) & 0xF
        self.rotate, self.ctx = bool((mode >> 12) & 1), bool((mode >> 13) & 1)
        self.bits = 8 * self.w
        self.mask = U64((1 << self.bits) - 1)
        self.n = self.e[F_N]
        self.uint = np.dtype(f"<u{self.w}")

    def values(self, field: int) -> np.ndarray:
        return mem(self.e[field], self.n * self.w).view(self.uint)

    def plane(self, k: int) -> np.ndarray:
        return mem(self.e[F_PLANE + k], self.n)


def _rot(s: _Seg, u: np.ndarray) -> np.ndarray:
    return ((u << U64(1)) | (u >> U64(s.bits - 1))) & s.mask if s.rotate else u


def _unrot(s: _Seg, c: np.ndarray) -> np.ndarray:
    return (c >> U64(1)) | ((c << U64(s.bits - 1)) & s.mask) if s.rotate else c


def _top(s: _Seg, x: np.ndarray) -> np.ndarray:
    return ((x >> U64(s.bits - 9 if s.rotate else s.bits - 8)) & U64(0xFF)).astype(np.int64)


def _base_of(s: _Seg) -> np.ndarray:
    """planes.cu base_of for every value of the segment."""
    b = s.values(F_BASE).astype(U64)
    if s.enc == ENC_PRED:
        d = (b - s.values(F_BASE2).astype(U64)) & s.mask
        step = ((d << U64(64 - s.bits)).view(np.int64)) >> np.int64(64 - s.bits)
        rows = (s.e[F_FIRST] + np.arange(s.n, dtype=np.int64)) // s.e[F_PER]
        alpha_all = mem(s.e[F_ALPHA], 2 * (int(rows[-1]) + 1)).view(np.int16)
        adj = (alpha_all[rows].astype(np.int64) * step + (1 << (PRED_FRAC - 1))) >> np.int64(PRED_FRAC)
        b = (b + adj.view(U64)) & s.mask
    return b


def encode_values(s: _Seg, u: np.ndarray, b: np.ndarray) -> np.ndarray:
    """planes.cu encode_value."""
    if s.enc == ENC_MAT:
        return _rot(s, u)
    if s.enc == ENC_XOR:
        return _rot(s, u ^ b)
    d = (u - b) & s.mask
    sign = np.where((d >> U64(s.bits - 1)) & U64(1), s.mask, U64(0))
    return ((d << U64(1)) & s.mask) ^ sign


def decode_values(s: _Seg, c: np.ndarray, b: np.ndarray) -> np.ndarray:
    """planes.cu decode_value."""
    if s.enc == ENC_MAT:
        return _unrot(s, c)
    if s.enc == ENC_XOR:
        return _unrot(s, c) ^ b
    d = (c >> U64(1)) ^ ((U64(0) - (c & U64(1))) & s.mask)
    return (d + b) & s.mask


def _context(s: _Seg, decode: bool) -> np.ndarray:
    """planes.cu context_of for every value."""
    if s.enc == ENC_MAT:
        return s.plane(0).astype(np.int64) if decode else _top(s, s.values(F_VAL).astype(U64))
    return _top(s, _base_of(s))


def ctx_positions(ctx: np.ndarray, threads: int = CTX_THREADS) -> np.ndarray:
    """Where planes_ctx puts each value: its stable counting-sort position, computed the kernel's way
    (histogram, exclusive scan, then rounds of ``threads`` values ranked within and across warps)."""
    n = ctx.size
    run = np.cumsum(np.bincount(ctx, minlength=256)) - np.bincount(ctx, minlength=256)
    pos = np.empty(n, np.int64)
    nw = threads // 32
    lower = np.tri(32, 32, -1, dtype=bool)  # lower[l, j]: lane j before lane l
    for r in range(0, n, threads):
        c = np.full(threads, 256, np.int64)
        c[: min(threads, n - r)] = ctx[r : r + threads]
        lanes = c.reshape(nw, 32)
        same = lanes[:, :, None] == lanes[:, None, :]  # [warp, lane, other lane]
        rank = (same & lower).sum(axis=2)  # __popc(peers & lanemask_lt)
        counts = np.zeros((nw, 257), np.int64)
        np.add.at(counts, (np.repeat(np.arange(nw), 32), c), 1)
        counts = counts[:, :256]
        starts = run[None, :] + np.cumsum(counts, axis=0) - counts  # where each warp's values of a bin start
        run = run + counts.sum(axis=0)
        valid = c.reshape(nw, 32) < 256
        w, lane = np.nonzero(valid)
        pos[r + w * 32 + lane] = starts[w, lanes[w, lane]] + rank[w, lane]
    return pos


def ref_planes(table: np.ndarray, decode: bool) -> None:
    """planes_plain / planes_ctx over ``table`` (any mix of rows: each is coded by its own mode)."""
    for e in table:
        s = _Seg(e)
        idx = np.arange(s.n)
        pos = ctx_positions(_context(s, decode)) if s.ctx else idx
        b = _base_of(s) if s.enc != ENC_MAT else np.zeros(s.n, U64)
        natural0 = s.enc == ENC_MAT and s.ctx  # 'mat' keeps plane 0 in natural order
        if not decode:
            c = encode_values(s, s.values(F_VAL).astype(U64), b)
            for k in range(s.w):
                byte = ((c >> U64(8 * (s.w - 1 - k))) & U64(0xFF)).astype(np.uint8)
                s.plane(k)[idx if k == 0 and natural0 else pos] = byte
        else:
            c = np.zeros(s.n, U64)
            for k in range(s.w):
                c = (c << U64(8)) | s.plane(k)[idx if k == 0 and natural0 else pos].astype(U64)
            s.values(F_VAL)[:] = decode_values(s, c, b).astype(s.uint)


# =================================================================================================================
# crc.cu
# =================================================================================================================
def multmodp(a: int, b: Any, poly: int) -> Any:
    """``a * b`` modulo the CRC polynomial (reflected; ``a != 0``); ``b`` may be a uint32 array."""
    m, p = 1 << 31, b ^ b
    while True:
        if a & m:
            p = p ^ b
            if a & (m - 1) == 0:
                break
        m >>= 1
        if isinstance(b, np.ndarray):
            b = np.where(b & 1, (b >> 1) ^ poly, b >> 1).astype(np.uint32)
        else:
            b = (b >> 1) ^ poly if b & 1 else b >> 1
    return p


X2N_LEN = 64  # x^(2^k) mod P for k < 64: a length's bits are 3 + up to 60 (zlib wraps k at 32, exact for
# CRC-32, whose x has order dividing 2^32 - 1, but not for CRC-32C: there x^(2^32) is x^2)
CONST_POLY = 256 + X2N_LEN  # where ``consts`` holds P


def x2n_table(poly: int) -> list[int]:
    """``x^(2^k) mod P`` for k < :data:`X2N_LEN`."""
    out, p = [], 1 << 30  # x^1
    for _ in range(X2N_LEN):
        out.append(p)
        p = multmodp(p, p, poly)
    return out


def x2nmodp(n: int, k: int, x2n: Sequence[int], poly: int) -> int:
    """``x^(n * 2^k) mod P``."""
    p = 1 << 31
    while n:
        if n & 1:
            p = multmodp(x2n[k], p, poly)
        n >>= 1
        k += 1
    return p


def byte_table(poly: int) -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(poly), t >> 1).astype(np.uint32)
    return t


def crc_consts(poly: int) -> np.ndarray:
    """What crc.cu's kernels take as ``consts``: byte table, x^(2^k) table, the polynomial."""
    return np.concatenate([byte_table(poly), np.array(x2n_table(poly), np.uint32), [poly]]).astype(np.uint32)


def crc_messages(ptrs: Sequence[int] | np.ndarray, lens: Sequence[int] | np.ndarray,
                 dsts: Sequence[int] | np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """The message table of crc.cu and the number of pieces."""
    lens = np.asarray(lens, np.int64)
    pieces = -(-lens // PIECE)
    t = np.zeros((lens.size, MSG_STRIDE), np.int64)
    t[:, M_PTR] = np.asarray(ptrs, np.int64) if lens.size else 0
    t[:, M_LEN] = lens
    t[:, M_PIECE0] = np.cumsum(pieces) - pieces
    if dsts is not None:
        t[:, M_DST] = np.asarray(dsts, np.int64)
    return t, int(pieces.sum())


def ref_crc_pieces(msgs: np.ndarray, npieces: int, consts: np.ndarray) -> np.ndarray:
    """crc_pieces: the zero-state CRC of each PIECE-byte piece (messages left-padded with zeros)."""
    table, x2n, poly = consts[:256], [int(x) for x in consts[256:CONST_POLY]], int(consts[CONST_POLY])
    raw = np.zeros(npieces, np.uint32)
    for e in msgs:
        ptr, length, p0 = int(e[M_PTR]), int(e[M_LEN]), int(e[M_PIECE0])
        pieces = -(-length // PIECE)
        if not pieces:
            continue
        padded = np.zeros(pieces * PIECE, np.uint8)
        padded[pieces * PIECE - length :] = mem(ptr, length)
        lanes = padded.reshape(pieces, 32, LANE_BYTES)
        crc = np.zeros((pieces, 32), np.uint32)
        for j in range(LANE_BYTES):
            crc = table[(crc ^ lanes[:, :, j]) & 0xFF] ^ (crc >> np.uint32(8))
        for k in range(5):  # __shfl_down_sync by 1 << k, kept by lanes that are multiples of 2 << k
            right = np.concatenate([crc[:, 1 << k :], crc[:, -(1 << k) :]], axis=1)  # a lane past 31: its own
            keep = (np.arange(32) & ((2 << k) - 1)) == 0
            joined = multmodp(x2n[LOG2_LANE_BITS + k], crc, poly) ^ right
            crc = np.where(keep[None, :], joined, crc).astype(np.uint32)
        raw[p0 : p0 + pieces] = crc[:, 0]
    return raw


def ref_crc_combine(msgs: np.ndarray, consts: np.ndarray, raw: np.ndarray, threads: int = 256) -> np.ndarray:
    """crc_combine: each message's CRC from its pieces (and its 4 bytes written where M_DST says)."""
    x2n, poly = [int(x) for x in consts[256:CONST_POLY]], int(consts[CONST_POLY])
    out = np.zeros(len(msgs), np.uint32)
    for m, e in enumerate(msgs):
        length, p0 = int(e[M_LEN]), int(e[M_PIECE0])
        pieces = -(-length // PIECE)
        per = -(-pieces // threads)
        acc, count = [], []
        for t in range(threads):
            lo = min(pieces, t * per)
            hi = min(pieces, lo + per)
            a = 0
            for q in range(lo, hi):
                a = multmodp(x2n[LOG2_PIECE_BITS], a, poly) ^ int(raw[p0 + q])
            acc.append(a)
            count.append(hi - lo)
        stride = 1
        while stride < threads:
            for t in range(0, threads, 2 * stride):
                if t + stride < threads and count[t + stride] > 0:
                    acc[t] = multmodp(x2nmodp(count[t + stride] * PIECE, 3, x2n, poly), acc[t], poly) ^ acc[t + stride]
                    count[t] += count[t + stride]
            stride *= 2
        crc = acc[0] ^ multmodp(x2nmodp(length, 3, x2n, poly), 0xFFFFFFFF, poly) ^ 0xFFFFFFFF
        out[m] = crc
        if e[M_DST]:
            mem(int(e[M_DST]), 4)[:] = np.frombuffer(int(crc).to_bytes(4, "little"), np.uint8)
    return out


def ref_crc(data: bytes | np.ndarray, poly: int = CRC32_POLY) -> int:
    """The CRC of one message the kernels' way (for tests)."""
    buf = np.frombuffer(bytes(data), np.uint8).copy() if not isinstance(data, np.ndarray) else data
    msgs, npieces = crc_messages([host_addr(buf)], [buf.nbytes])
    consts = crc_consts(poly)
    return int(ref_crc_combine(msgs, consts, ref_crc_pieces(msgs, npieces, consts))[0])


# =================================================================================================================
# frames.cu
# =================================================================================================================
def body_sizes(kinds: np.ndarray, srclens: np.ndarray, sizes: np.ndarray, ns: np.ndarray) -> np.ndarray:
    """Body bytes of each job (the stored payload is 4 bytes more: its CRC-32C)."""
    return np.where(kinds == KIND_RAW, raw_frame_size(ns, sizes),
                    np.where(kinds == KIND_GZIP, GZIP_HEADER + srclens + 8, srclens)).astype(np.int64)


def pack_jobs(kinds: np.ndarray, srcs: np.ndarray, srclens: np.ndarray, sizes: np.ndarray, ns: np.ndarray,
              crc_index: np.ndarray, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The job table of pack_payloads for payloads laid one after another from address ``dst``;
    returns it with each payload's offset and body size (payload = body + 4 bytes of CRC-32C)."""
    bodies = body_sizes(kinds, srclens, sizes, ns)
    offsets = np.cumsum(bodies + 4) - (bodies + 4)
    jobs = np.zeros((kinds.size, JOB_STRIDE), np.int64)
    jobs[:, J_KIND], jobs[:, J_SRC], jobs[:, J_SRCLEN] = kinds, srcs, srclens
    jobs[:, J_DST], jobs[:, J_SIZE], jobs[:, J_N], jobs[:, J_CRC] = dst + offsets, sizes, ns, crc_index
    return jobs, offsets, bodies


def ref_pack_payloads(jobs: np.ndarray, crcs: np.ndarray) -> None:
    """pack_payloads: each job's body at its destination."""
    for e in jobs:
        kind, src, srclen, dst, size, n, ci = (int(x) for x in e)
        if kind == KIND_RAW:
            out = mem(dst, raw_frame_size(n, size))
            out[:9] = np.frombuffer(b"\x28\xb5\x2f\xfd\xa0" + size.to_bytes(4, "little"), np.uint8)
            nblocks = -(-n // ZSTD_BLOCK)
            i = np.arange(n)
            out[9 + 3 * (i // ZSTD_BLOCK + 1) + i] = mem(src, n)
            for b in range(nblocks):
                length = min(ZSTD_BLOCK, n - b * ZSTD_BLOCK)
                last = int(b == nblocks - 1 and size == n)
                at = 9 + b * (ZSTD_BLOCK + 3)
                out[at : at + 3] = np.frombuffer((last | length << 3).to_bytes(3, "little"), np.uint8)
            at, pad = 9 + 3 * nblocks + n, size - n
            while pad > 0:
                step = min(pad, ZSTD_BLOCK)
                pad -= step
                out[at : at + 4] = np.frombuffer(((pad == 0) | 2 | step << 3).to_bytes(3, "little") + b"\0", np.uint8)
                at += 4
            if size == 0:
                out[at : at + 3] = np.frombuffer(b"\x01\x00\x00", np.uint8)
        else:
            gz = kind == KIND_GZIP
            out = mem(dst, (GZIP_HEADER + 8 if gz else 0) + srclen)
            at = GZIP_HEADER if gz else 0
            out[at : at + srclen] = mem(src, srclen)
            if gz:
                out[:GZIP_HEADER] = np.frombuffer(GZIP_HEAD, np.uint8)
                tail = int(crcs[ci]).to_bytes(4, "little") + (size & 0xFFFFFFFF).to_bytes(4, "little")
                out[at + srclen :] = np.frombuffer(tail, np.uint8)


def ref_copy_spans(spans: np.ndarray) -> None:
    for src, dst, n in spans:
        mem(int(dst), int(n))[:] = mem(int(src), int(n))


def ref_run_bytes(src: int, stride: int, size: int, nchunks: int) -> np.ndarray:
    """Per chunk (``nchunks`` of ``size`` bytes, ``stride`` apart from address ``src``): its bytes equal to the
    three before them."""
    out = np.zeros(nchunks, np.int64)
    for c in range(nchunks):
        p = mem(src + c * stride, size)
        out[c] = int(((p[3:] == p[2:-1]) & (p[3:] == p[1:-2]) & (p[3:] == p[:-3])).sum())
    return out


# =================================================================================================================
# the restore side: what stored payloads hold, read on the host without a Python loop per chunk
# =================================================================================================================
def classify(host: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, letters: np.ndarray, size: int,
             raw_letter: str = "z", gzip_letter: str = "d") -> dict[str, np.ndarray]:
    """Per stored payload (``host[offsets[i] : offsets[i] + lengths[i]]``, body + CRC-32C), vectorized:
    ``suffix`` (its stored CRC-32C), ``raw`` (a frame of one raw block holding the whole chunk: read
    with a copy from ``offsets + 12``), ``start``/``stop`` (what a coder decodes), ``trailer_crc`` and
    ``trailer_size`` (gzip: the trailer's CRC-32 and size; 0 for others). Gzip headers with optional
    fields are parsed one by one (writers of gpupas and zlib write none)."""
    offsets, lengths = offsets.astype(np.int64), lengths.astype(np.int64)
    body = lengths - 4
    last4 = offsets[:, None] + body[:, None] + np.arange(4)
    suffix = (host[np.minimum(last4, host.size - 1)].astype(np.uint32) << (8 * np.arange(4, dtype=np.uint32))).sum(
        axis=1, dtype=np.uint64).astype(np.uint32)

    def word(at: np.ndarray, nbytes: int) -> np.ndarray:
        idx = np.minimum(at[:, None] + np.arange(nbytes), host.size - 1)
        return (host[idx].astype(np.uint64) << (8 * np.arange(nbytes, dtype=np.uint64))).sum(axis=1, dtype=np.uint64)

    is_z, is_d = letters == raw_letter, letters == gzip_letter
    raw = (is_z & (body == 12 + size) & (word(offsets, 4) == 0xFD2FB528) & (word(offsets + 4, 1) == 0xA0)
           & (word(offsets + 5, 4) == size) & (word(offsets + 9, 3) == (1 | size << 3)) & (size < ZSTD_BLOCK + 1))
    start, stop = offsets.copy(), offsets + body
    trailer_crc = np.zeros(offsets.size, np.uint32)
    trailer_size = np.zeros(offsets.size, np.uint64)
    if is_d.any():
        plain = is_d & (body >= 18) & (word(offsets, 4) == 0x00088B1F)  # 1f 8b 08, no flags
        start = np.where(plain, offsets + GZIP_HEADER, start)
        for i in np.flatnonzero(is_d & ~plain):
            h = gzip_header_size(host[offsets[i] : offsets[i] + body[i]])
            start[i] = offsets[i] + h if h >= 0 else -1
        stop = np.where(is_d, offsets + body - 8, stop)
        trailer_crc = np.where(is_d, word(stop, 4), 0).astype(np.uint32)
        trailer_size = np.where(is_d, word(stop + 4, 4), 0).astype(np.uint64)
    return {"suffix": suffix, "raw": raw, "start": start, "stop": stop, "trailer_crc": trailer_crc,
            "trailer_size": trailer_size}


def aligned_offsets(lengths: np.ndarray, lead: np.ndarray, align: int = 16) -> tuple[np.ndarray, int]:
    """Offsets for payloads laid one after another so that byte ``lead[i]`` of payload ``i`` (where
    its coder's input starts) is ``align``-aligned; returns them and the total size."""
    lengths, lead = lengths.astype(np.int64), lead.astype(np.int64)
    slots = -(-(lengths + align) // align) * align  # whole multiples of align, with room to shift
    offsets = np.cumsum(slots) - slots + (-lead) % align
    return offsets, int((offsets + lengths).max()) if lengths.size else 0
