"""Chunk coders: standard formats that stock libraries decode, checksums that catch damage."""

from __future__ import annotations

import gzip
from typing import Any

import numcodecs
import numpy as np
import pytest
import zstandard

from gpupas.codecs import registry
from gpupas.codecs.deflate import code as code_deflate
from gpupas.codecs.policy import DEFLATE_MIN_GAIN, ChunkPolicy, encode_cpu, huffman_floor
from gpupas.codecs.zstd import BLOCK, read_raw
from gpupas.codecs.zstd import code as code_zstd
from gpupas.codecs.zstd import raw_frame as raw_zstd
from gpupas.engine.encode import CHUNK_SIZE
from gpupas.errors import CodecUnavailableError, FormatError, IntegrityError
from gpupas.format.checksum import check_crc32c_suffix, crc32c
from gpupas.pas.settings import SETTINGS, Setting


def encode_chunk(data: np.ndarray, bounds: list[int], size: int, setting: Setting) -> tuple[str, bytes]:
    policy = ChunkPolicy(setting.codecs, setting.try_all, setting.zstd_level)
    ((letter, payload),) = encode_cpu(policy, [data], [bounds], size)
    return policy.table()[letter], payload


def decode_chunk(codec_id: str, payload: bytes, out: np.ndarray) -> None:
    registry.get(codec_id, "cpu").decode_batch([check_crc32c_suffix(payload)], [out])


def _exponent_plane(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    u = (rng.standard_normal(n) * 0.02).astype(np.float32).view(np.uint32)
    return ((u << 1 | u >> 31) >> 24).astype(np.uint8)


CASES = {
    "exponent": _exponent_plane(CHUNK_SIZE),
    "random": np.random.default_rng(1).integers(0, 256, CHUNK_SIZE, dtype=np.uint8),
    "zeros": np.zeros(CHUNK_SIZE, np.uint8),
    "short": _exponent_plane(1001),
    "empty": np.zeros(0, np.uint8),
    "odd-random": np.random.default_rng(2).integers(0, 256, 200_003, dtype=np.uint8),
}


def _decoded(kind: str, payload: bytes) -> bytes:
    out = np.full(CHUNK_SIZE, 0xAA, np.uint8)
    decode_chunk(kind, payload, out)
    return out.tobytes()


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_roundtrip_and_stock_decoders(setting: str, case: str) -> None:
    data = CASES[case]
    bounds = [len(data) // 3, len(data) // 2] if len(data) > 10 else []
    kind, payload = encode_chunk(data, bounds, CHUNK_SIZE, SETTINGS[setting])
    expect = data.tobytes() + bytes(CHUNK_SIZE - len(data))
    assert _decoded(kind, payload) == expect
    body = payload[:-4]
    if kind == "zstd":  # both the zstandard library and numcodecs read it
        assert zstandard.ZstdDecompressor().decompress(body) == expect
        assert bytes(numcodecs.Zstd().decode(body)) == expect
    else:
        assert gzip.decompress(body) == expect
        assert bytes(numcodecs.GZip().decode(body)) == expect


def test_compressible_plane_shrinks_and_random_stays_raw() -> None:
    _, small = encode_chunk(CASES["exponent"], [], CHUNK_SIZE, SETTINGS["default"])
    assert len(small) < 0.4 * CHUNK_SIZE
    kind, raw = encode_chunk(CASES["random"], [], CHUNK_SIZE, SETTINGS["default"])
    assert kind == "zstd" and len(raw) < CHUNK_SIZE + 64


@pytest.mark.parametrize("case", ["exponent", "random", "zeros", "odd-random", "short"])
def test_huffman_floor_is_what_deflate_needs_at_least(case: str) -> None:
    data = CASES[case]
    bounds = [len(data) // 3, len(data) // 2]
    need = len(code_deflate(memoryview(data), bounds))
    floor = huffman_floor(data, bounds)
    assert floor <= 1.01 * need  # a sampled bound: never much above what Deflate writes
    if case not in ("zeros", "short"):  # tight where bytes are independent and headers are small
        assert floor >= 0.97 * need - 64


@pytest.mark.parametrize("case", ["exponent", "short"])
def test_default_takes_deflate_where_it_saves_enough(case: str) -> None:
    data, bounds = CASES[case], [len(CASES[case]) // 3]
    view = memoryview(data)
    zstd, deflate = len(code_zstd(view, bounds, CHUNK_SIZE, 0)), len(code_deflate(view, bounds))
    kind, payload = encode_chunk(data, bounds, CHUNK_SIZE, SETTINGS["default"])
    padded = len(data) < CHUNK_SIZE  # a gzip member cannot pad: Zstandard only
    takes_deflate = not padded and deflate + DEFLATE_MIN_GAIN * len(data) <= zstd
    assert (kind, len(payload)) == (("deflate", deflate + 4) if takes_deflate else ("zstd", zstd + 4))
    runs = np.repeat(np.arange(64, dtype=np.uint8), CHUNK_SIZE // 64)  # under one bit a byte: Deflate cannot win
    kind, payload = encode_chunk(runs, [], CHUNK_SIZE, SETTINGS["default"])
    assert kind == "zstd" and len(payload) < CHUNK_SIZE / 64


def test_raw_frame_with_padding_is_valid_zstd() -> None:
    data = np.arange(300_001, dtype=np.uint32).view(np.uint8)[:300_001]
    frame = raw_zstd(memoryview(data), 2 * CHUNK_SIZE)
    out = zstandard.ZstdDecompressor().decompress(frame)
    assert out == data.tobytes() + bytes(2 * CHUNK_SIZE - data.size)


@pytest.mark.parametrize("where", [0, 7, -5, -1])
def test_flipped_byte_is_caught(where: int) -> None:
    kind, payload = encode_chunk(CASES["exponent"], [], CHUNK_SIZE, SETTINGS["default"])
    damaged = bytearray(payload)
    damaged[where] ^= 0x40
    with pytest.raises(IntegrityError):
        _decoded(kind, bytes(damaged))


def test_truncated_chunk_is_caught() -> None:
    kind, payload = encode_chunk(CASES["exponent"], [], CHUNK_SIZE, SETTINGS["default"])
    with pytest.raises(IntegrityError):
        _decoded(kind, payload[:100])
    with pytest.raises(IntegrityError):
        _decoded(kind, b"")


# -- the registry: ids on disk, implementations per backend ------------------------------------------------------
# Each codec id's CPU implementation and the stock implementation readers use (numcodecs, as stock Zarr
# does) must decode each other's output: that is what sharing an id means.
STOCK = {"zstd": numcodecs.Zstd(level=3), "deflate": numcodecs.GZip(level=6)}


@pytest.mark.parametrize("codec_id", ["zstd", "deflate"])
@pytest.mark.parametrize("case", ["exponent", "random", "zeros"])
def test_implementations_sharing_an_id_decode_each_other(codec_id: str, case: str) -> None:
    data = CASES[case]
    ours = registry.get(codec_id, "cpu")
    body = ours.encode_batch([data], [[len(data) // 2]], CHUNK_SIZE)[0]
    assert bytes(STOCK[codec_id].decode(body)) == data.tobytes()
    stock_body = STOCK[codec_id].encode(data)
    out = np.empty(CHUNK_SIZE, np.uint8)
    ours.decode_batch([stock_body], [out])
    assert out.tobytes() == data.tobytes()


def test_every_known_portable_codec_has_a_stock_twin() -> None:
    portable = [c for c in registry.known() if registry.info(c).portable]
    assert sorted(portable) == sorted(STOCK)


def test_unknown_codec_asks_for_an_upgrade() -> None:
    with pytest.raises(FormatError, match="upgrade gpupas"):
        registry.get("lz77-from-the-future", "cpu")


def test_gpu_only_codec_on_a_cpu_names_the_remedy() -> None:
    with pytest.raises(CodecUnavailableError, match=r"CUDA GPU.*compact --codec zstd"):
        registry.get("nvcomp-ans", "cpu")


def test_inflation_bomb_stops_at_the_declared_size() -> None:
    import resource

    bomb = gzip.compress(bytes(256 << 20), 9)  # 256 MiB of zeros in ~250 KiB
    out = np.empty(CHUNK_SIZE, np.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(IntegrityError, match="exactly"):
        registry.get("deflate", "cpu").decode_batch([bomb], [out])
    with pytest.raises(IntegrityError, match="exactly"):
        registry.get("zstd", "cpu").decode_batch([zstandard.ZstdCompressor().compress(bytes(64 << 20))], [out])
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 << 10  # never inflated to the bomb's size


# -- raw frames read straight into place (a local restore's scatter read) -------------------------------------
def _scatter_from(stored: bytes) -> Any:
    """A ``read(views)`` that fills the views from ``stored`` as a local shard reader would."""

    def read(views: list[memoryview]) -> bool | None:
        if sum(len(v) for v in views) != len(stored):
            return None
        at = 0
        for v in views:
            v[:] = stored[at : at + len(v)]
            at += len(v)
        return True

    return read


def _stored_raw(data: np.ndarray) -> bytes:
    frame = raw_zstd(memoryview(data), data.size)
    return frame + crc32c(frame).to_bytes(4, "little")


@pytest.mark.parametrize("n", [1, 1000, BLOCK, BLOCK + 1, CHUNK_SIZE])
def test_raw_frame_is_read_straight_into_place(n: int) -> None:
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    out = np.zeros(n, np.uint8)
    assert read_raw(_scatter_from(_stored_raw(data)), out)
    assert out.tobytes() == data.tobytes()


def test_raw_frame_size_is_one_formula_for_the_cpu_and_gpu_policies() -> None:
    """The size of a raw frame (the CPU policy's framing.raw_frame_size, the GPU policy's raw_frame_sizes, the
    kernels' mirror) comes from codecs.framing alone, and is the length of the frame built."""
    from gpupas.codecs import framing, policy
    from gpupas.codecs.gpu_policy import raw_frame_sizes

    raw_size = policy.raw_frame_size
    assert BLOCK == framing.ZSTD_BLOCK and raw_size is framing.raw_frame_size
    for size in (0, 1, 1000, BLOCK, BLOCK + 1, CHUNK_SIZE, 1 << 20):
        ns = sorted({n for n in (0, 1, size // 2, size - 1, size, BLOCK, BLOCK + 1) if 0 <= n <= size})
        built = [len(raw_zstd(memoryview(bytes(n)), size)) for n in ns]
        assert [raw_size(n, size) for n in ns] == built, size
        assert raw_frame_sizes(np.array(ns), size).tolist() == built, size


def test_raw_read_declines_what_is_not_a_raw_frame_of_that_size() -> None:
    data = CASES["random"]
    out = np.zeros(data.size, np.uint8)
    assert not read_raw(lambda views: None, out)  # the reader cannot, or the chunk is another length
    assert not read_raw(_scatter_from(_stored_raw(data[:-1])), out)  # one byte short: not read at all
    frame = bytearray(raw_zstd(memoryview(data), data.size))
    frame[9] |= 0b010  # the first block's type: RLE, not raw (a frame of this length that is not raw blocks)
    assert not read_raw(_scatter_from(bytes(frame) + crc32c(bytes(frame)).to_bytes(4, "little")), out)
    coded = code_zstd(memoryview(CASES["exponent"]), [], CHUNK_SIZE, 0)  # a coded frame declines too
    assert not read_raw(_scatter_from(coded + crc32c(coded).to_bytes(4, "little")), out)


@pytest.mark.parametrize("where", [0, 5, 9, 12, BLOCK + 13, -5, -1])
def test_raw_read_catches_a_flipped_byte(where: int) -> None:
    damaged = bytearray(_stored_raw(CASES["random"]))
    damaged[where] ^= 0x10
    with pytest.raises(IntegrityError, match="checksum"):
        read_raw(_scatter_from(bytes(damaged)), np.zeros(CHUNK_SIZE, np.uint8))
