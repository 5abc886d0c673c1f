"""The artifact's codecs (artifact.py frames each part with one), each at its strongest setting.

zstd and brotli need packages beyond the standard library, imported only when used: a
machine without them (a bare GPU box) runs zlib and lzma. lzma writes raw LZMA2 (preset
9 | extreme, a 64 MiB dictionary the decoder is told): the .xz container would add about
50 bytes per frame for checks the outer crc32 already makes. zstd writes the content size,
which its decompressor needs.
"""

from __future__ import annotations

import importlib
import lzma
import zlib
from collections.abc import Callable, Mapping

_LZMA_ENCODE = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
_LZMA_DECODE = [{"id": lzma.FILTER_LZMA2, "dict_size": 64 << 20}]
_ZSTD_MAX_WINDOW = 1 << 27  # level 22's largest window


def _zstd_compress(raw: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=22, write_content_size=True).compress(raw)


def _zstd_decompress(raw: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().decompress(raw)


def _brotli_compress(raw: bytes) -> bytes:
    import brotli

    return brotli.compress(raw, quality=11, lgwin=24)


def _brotli_decompress(raw: bytes) -> bytes:
    import brotli

    return brotli.decompress(raw)


CODECS: Mapping[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]] = {
    "zlib": (lambda raw: zlib.compress(raw, 9), zlib.decompress),
    "lzma": (
        lambda raw: lzma.compress(raw, format=lzma.FORMAT_RAW, filters=_LZMA_ENCODE),
        lambda raw: lzma.decompress(raw, format=lzma.FORMAT_RAW, filters=_LZMA_DECODE),
    ),
    "zstd": (_zstd_compress, _zstd_decompress),
    "brotli": (_brotli_compress, _brotli_decompress),
}


# The codecs beyond the standard library, and the package each one needs.
CODEC_PACKAGES: Mapping[str, str] = {"zstd": "zstandard", "brotli": "brotli"}


def codec_available(codec: str) -> bool:
    package = CODEC_PACKAGES.get(codec)
    if package is None:
        return codec in CODECS
    try:
        importlib.import_module(package)
    except ImportError:
        return False
    return True


def unavailable(codec: str) -> str | None:
    """Why this machine cannot write `codec` (one line), or None when it can."""
    if codec_available(codec):
        return None
    here = sorted(c for c in CODECS if codec_available(c))
    return (
        f"CompressConfig.codec={codec!r} needs the Python package {CODEC_PACKAGES.get(codec, codec)!r}, "
        f"which is not importable here: expected one of the codecs available here {here}"
    )


def compress_bytes(raw: bytes, codec: str) -> bytes:
    return CODECS[codec][0](raw)


def decompress_bytes(raw: bytes, codec: str) -> bytes:
    return CODECS[codec][1](raw)


def decompress_bounded(raw: bytes, codec: str, limit: int) -> bytes:
    """Decompress at most `limit` bytes (+1, to see an overflow); ValueError if the frame holds
    more: memory stays bounded by what the header declares, whatever the frame says."""
    if codec == "zlib":
        out = zlib.decompressobj().decompress(raw, limit + 1)
    elif codec == "lzma":
        out = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_DECODE).decompress(raw, max_length=limit + 1)
    elif codec == "zstd":
        import zstandard

        reader = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW).stream_reader(raw)
        out = reader.read(limit + 1)
    elif codec == "brotli":
        import brotli

        out = brotli.Decompressor().process(raw, output_buffer_limit=limit + 1)
    else:
        raise ValueError(f"unknown codec {codec!r}")
    if len(out) > limit:
        raise ValueError(f"decompresses to more than the {limit} bytes the header declares")
    return out
