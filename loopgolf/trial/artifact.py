"""The artifact: quantize the trained weights, pack them in a documented container, compress.

    artifact_bytes = model_bytes + code_bytes

`model_bytes` is the size of the artifact file on disk; `code_bytes` is the size of the
source files needed to rebuild and run the model from it (code_bytes.py's `CODE_FILES`).
Nothing in the reported number is estimated.

What is stored per tensor, and how integers are encoded, is quantize.py's plan; the parts
below (the header and the data sections) are written and read by artifact_parts.py; the
codecs that compress each frame are codecs.py's. This file holds the outer header, the
frames, and save / load.

File layout (all integers little-endian):

    outer header, uncompressed (readable without any codec):
        4 bytes   magic b"LGAF" (LoopGolf Artifact File)
        1 byte    container version (2)
        1 byte    n, then n bytes: codec name in ASCII ("zlib", "lzma", "zstd", "brotli")
        4 bytes   uint32 payload length (bytes after this header; must end the file)
        4 bytes   uint32 crc32 of the payload
    payload: seven frames in this order, each a uint32 length then codec(part); an empty
    part is an empty frame (length 0). Each part is compressed on its own (see the
    container notes below). The parts:
        "header"  JSON {"format": "loopgolf-artifact", "version": 2,
                        "config": {"model": ModelConfig fields, "compress": CompressConfig
                                   fields, "train": TrainConfig fields},
                        "sections": [["q", nbytes], ["scale", ...], ["half", ...], ["exact", ...]],
                        "tensors": [{"name", "shape", "dtype", "enc", "group", ...}, ...],
                        "digest": sha256 of the config and each tensor's name, shape, dtype,
                                  encoding and bits (`header_digest`)}
        "q"       every int payload back to back: one int8 per level, or two levels per
                  byte (low nibble first, stored as level + 7) at 4 bits
        "scale.lo", "scale.hi"   every fp16 row scale: the low bytes, then the high bytes
        "half.lo", "half.hi"     every fp16 tensor, as the same two byte planes
        "exact"   every exactly-stored tensor in its own dtype
    The data form four sections, "q", "scale", "half" and "exact" ("scale" and "half"
    being their two byte planes interleaved back); "sections" gives their sizes. A tensor
    entry names its slices as [offset, nbytes]: "q" and "scale" for enc "int" (plus "bits",
    "clip_sigma", "rows"), "data" for "half" / "exact". Slices follow each other in tensor
    order and use their sections up exactly; the reader checks this. A tied weight is
    stored once; its second name is {"name", "alias": the name it is stored under}.

Loading reads only json and numpy buffers: no pickle, no torch.load, no code from the file.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from loopgolf.errors import LoopgolfError
from loopgolf.trial.artifact_parts import PARTS, VERSION, declared_sizes, decode_parts, encode_parts, header_config
from loopgolf.trial.codecs import CODECS, compress_bytes, decompress_bounded, unavailable
from loopgolf.trial.config import ModelConfig, TrialConfig
from loopgolf.trial.model import RecurrentLM
from loopgolf.trial.quantize import QuantizedState, QuantizeError, dequantize, quantize_model

MAGIC = b"LGAF"


class ArtifactError(LoopgolfError):
    """An artifact file is missing, corrupt, truncated, or not a loopgolf artifact."""


# ----------------------------------------------------------------------------- codecs
#
# The codecs themselves are codecs.py's; a trial asks here, before training, whether this
# machine can write its artifact.


def require_codec(codec: str) -> None:
    """Fail before any training when this machine cannot write `codec` (one line)."""
    reason = unavailable(codec)
    if reason is not None:
        raise ArtifactError(reason)


# ------------------------------------------------------------------------- the file

# A real header is a few KB per hundred tensors; nothing declares its size, so it gets a cap.
MAX_HEADER_BYTES = 16 << 20


def _outer_header(codec: str, payload: bytes) -> bytes:
    name = codec.encode("ascii")
    return MAGIC + struct.pack("<BB", VERSION, len(name)) + name + struct.pack("<II", len(payload), zlib.crc32(payload))


def pack_parts(parts: Mapping[str, bytes], codec: str) -> bytes:
    """Outer header + one compressed frame per part, in PARTS order: the file's bytes."""
    frames = [compress_bytes(parts[p], codec) if parts[p] else b"" for p in PARTS]
    payload = b"".join(struct.pack("<I", len(f)) + f for f in frames)
    return _outer_header(codec, payload) + payload


def encode_artifact(state: QuantizedState, config: TrialConfig) -> bytes:
    """The artifact file's bytes."""
    return pack_parts(encode_parts(state, config), state.compress.codec)


def _looks_like(raw: bytes) -> str:
    if raw[:1] == b"\x80":
        return " (it looks like a pickle; loading never unpickles)"
    if raw[:4] == b"PK\x03\x04":
        return " (it looks like a zip / torch.save file; loading never unpickles)"
    return ""


def _read_payload(raw: bytes) -> tuple[str, bytes]:
    """Check the outer header and crc; return (codec, payload). ValueError if bad."""
    if raw[:4] != MAGIC:
        raise ValueError(f"not a loopgolf artifact: magic {raw[:4]!r}, expected {MAGIC!r}{_looks_like(raw)}")
    if len(raw) < 6:
        raise ValueError("truncated inside the outer header")
    version, n_name = raw[4], raw[5]
    if version != VERSION:
        raise ValueError(f"container version {version}, this loopgolf reads version {VERSION}")
    end = 6 + n_name + 8
    if len(raw) < end:
        raise ValueError("truncated inside the outer header")
    codec = raw[6 : 6 + n_name].decode("ascii", errors="replace")
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}, expected one of {sorted(CODECS)}")
    n_payload, crc = struct.unpack_from("<II", raw, 6 + n_name)
    if len(raw) != end + n_payload:
        what = "truncated" if len(raw) < end + n_payload else "has trailing bytes"
        raise ValueError(f"{what}: header says {n_payload} payload bytes, file holds {len(raw) - end}")
    payload = raw[end:]
    if zlib.crc32(payload) != crc:
        raise ValueError("payload crc32 mismatch: the file is corrupt")
    return codec, payload


def _split_frames(payload: bytes) -> list[bytes]:
    frames, pos = [], 0
    for part in PARTS:
        if pos + 4 > len(payload):
            raise ValueError(f"payload ends before the {part!r} frame")
        (n,) = struct.unpack_from("<I", payload, pos)
        if pos + 4 + n > len(payload):
            raise ValueError(f"the {part!r} frame ({n} bytes) runs past the payload")
        frames.append(payload[pos + 4 : pos + 4 + n])
        pos += 4 + n
    if pos != len(payload):
        raise ValueError(f"{len(payload) - pos} bytes after the last frame")
    return frames


def unpack_parts(raw: bytes) -> tuple[str, dict[str, bytes]]:
    """(codec, uncompressed parts) of a file's bytes, after checking header, length and crc.

    The header frame is decompressed first (at most MAX_HEADER_BYTES); every other frame
    at most to the size the header declares for it, so a decompression bomb is refused
    after allocating no more than a legitimate file of that size would.
    """
    codec, payload = _read_payload(raw)
    frames = dict(zip(PARTS, _split_frames(payload), strict=True))
    parts: dict[str, bytes] = {"header": _decompress_part("header", frames["header"], codec, MAX_HEADER_BYTES)}
    sizes = declared_sizes(parts["header"])
    for part in PARTS[1:]:
        parts[part] = _decompress_part(part, frames[part], codec, sizes[part])
        if len(parts[part]) != sizes[part]:
            raise ValueError(f"the {part!r} frame holds {len(parts[part])} bytes, the header declares {sizes[part]}")
    return codec, parts


def _decompress_part(part: str, frame: bytes, codec: str, limit: int) -> bytes:
    if not frame:
        return b""
    try:
        return decompress_bounded(frame, codec, limit)
    except ValueError as exc:
        raise ValueError(f"the {part!r} frame {exc}") from None
    except Exception as exc:  # each codec raises its own error type
        raise ValueError(f"the {part!r} frame does not decompress with {codec} ({type(exc).__name__})") from None


def decode_artifact(raw: bytes) -> tuple[dict[str, Any], QuantizedState]:
    """(JSON header, quantized state) of an artifact file's bytes; ValueError if invalid."""
    return decode_parts(unpack_parts(raw)[1])


# ------------------------------------------------------------------- save and load


@dataclasses.dataclass(frozen=True)
class ArtifactInfo:
    """What `save_artifact` wrote, and the bytes that count against the cap."""

    path: str
    model_bytes: int  # size of the artifact file on disk
    code_bytes: int  # summed sizes of code_bytes.CODE_FILES
    artifact_bytes: int  # model_bytes + code_bytes: the number checked against the cap
    params: int  # unique stored float parameters (tied tensors once)
    quantized_params: int  # stored at `bits`
    protected_params: int  # stored at protect_bits
    small_params: int  # small tensors stored as fp16
    bits: int
    codec: str
    max_artifact_bytes: int
    save_seconds: float

    @property
    def fits(self) -> bool:
        return self.artifact_bytes <= self.max_artifact_bytes


def _check_matches(model: torch.nn.Module, model_cfg: ModelConfig) -> None:
    """The artifact must rebuild: `model`'s tensors must be those RecurrentLM(model_cfg) has."""
    with torch.device("meta"):
        reference = RecurrentLM(model_cfg)
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))[:4]
        raise ArtifactError(f"the model does not match config.model (first differences: {diff})")


def save_artifact(model: RecurrentLM, config: TrialConfig, path: str | os.PathLike[str]) -> ArtifactInfo:
    """Quantize, pack and compress `model` into `path` (atomically); report the bytes."""
    tick = time.perf_counter()
    _check_matches(model, config.model)
    try:
        state = quantize_model(model, config.compress)
    except QuantizeError as exc:
        raise ArtifactError(str(exc)) from exc
    raw = encode_artifact(state, config)
    # Saving only: loading needs neither the writer nor the accounting, so neither is in CODE_FILES.
    from loopgolf.atomic import atomic_write_bytes
    from loopgolf.trial.code_bytes import code_bytes

    path = atomic_write_bytes(path, raw)
    model_bytes = os.path.getsize(path)
    code = code_bytes()
    counts = state.counts()
    return ArtifactInfo(
        path=str(path), model_bytes=model_bytes, code_bytes=code, artifact_bytes=model_bytes + code,
        params=counts["quantized"] + counts["protected"] + counts["small"],
        quantized_params=counts["quantized"], protected_params=counts["protected"], small_params=counts["small"],
        bits=config.compress.bits, codec=config.compress.codec,
        max_artifact_bytes=config.compress.max_artifact_bytes, save_seconds=time.perf_counter() - tick,
    )


@dataclasses.dataclass(frozen=True)
class LoadedArtifact:
    model: RecurrentLM
    config: TrialConfig
    state: QuantizedState


def read_artifact(path: str | os.PathLike[str]) -> LoadedArtifact:
    """Rebuild the model (eval mode, CPU) and its TrialConfig from an artifact file.

    Any problem with the file is one ArtifactError naming it.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ArtifactError(f"artifact {str(path)!r}: cannot read ({exc.strerror or exc})") from None
    try:
        header, state = decode_artifact(raw)
        config = header_config(header)
        model = RecurrentLM(config.model, router_seed=config.train.seed)
        model.load_state_dict(dequantize(state), strict=True)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError, UnicodeDecodeError) as exc:
        # LoopgolfError (bad config values) is a ValueError; RuntimeError is load_state_dict's
        raise ArtifactError(f"artifact {str(path)!r}: {exc}") from None
    model.eval()
    return LoadedArtifact(model, config, state)


def load_artifact(path: str | os.PathLike[str]) -> RecurrentLM:
    """The model rebuilt from an artifact file alone (eval mode, CPU)."""
    return read_artifact(path).model


def load_artifact_with_config(path: str | os.PathLike[str]) -> tuple[RecurrentLM, TrialConfig]:
    """(model, the TrialConfig it was trained and saved with), from the file alone."""
    loaded = read_artifact(path)
    return loaded.model, loaded.config
