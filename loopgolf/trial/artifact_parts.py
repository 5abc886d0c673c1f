"""The artifact's parts, uncompressed: a quantized state as the JSON header (config and
tensor table) and the data sections, and back. artifact.py's docstring is the byte-level
specification; it compresses each part as a frame of the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from loopgolf.trial.config import CompressConfig, ModelConfig, TrainConfig, TrialConfig
from loopgolf.trial.quantize import Plan, QuantizedState, QuantizedTensor, n_rows, qmax

VERSION = 2  # the container's version; 2: the header carries a digest of the config and tensor shapes
FORMAT = "loopgolf-artifact"

# # Measured with bench/bench_compress.py --packing (d_model 512 model trained 200 steps,
# 6.0M params, 2026-11-22); "+x%" is bytes relative to the chosen layout:
# - levels: bit-packing 6-bit levels costs zlib/lzma/zstd/brotli +4.6/+6.9/+9.2/+7.0%,
#   5-bit +3.5/+11.3/+16.4/+12.7%, against one int8 per level (packing misaligns symbols
#   with bytes, so the entropy coder cannot see the level distribution). At 4 bits two
#   levels per byte (nibbles, still byte-aligned) beat int8 by 11.5/7.0/0.5/0.9%. So
#   4-bit levels are nibble-packed and wider ones are one int8 each.
# - fp16 data (scales, fp16 tensors) go as two byte planes (low bytes: mantissa noise;
#   high bytes: sign and exponent), each its own frame: plain fp16 costs +4-8% on fp16
#   tensors and +6-17% on scales; both planes in one frame still +0.1-7.5% (zstd-22 and
#   zlib then share one entropy table between them).
# - each part is compressed as its own frame: one stream of the same parts costs zstd-22
#   +3.7% (a JSON header ahead of the levels spoils its first block: up to +8% on small
#   models) and the others under +0.1%; interleaving levels and scales per tensor costs
#   +0.9-2.5%. Separate frames also make each part's bytes predictable on its own
#   (estimate.py).

_EXACT_DTYPES: dict[str, tuple[str, torch.dtype]] = {
    "float32": ("<f4", torch.float32), "float64": ("<f8", torch.float64), "float16": ("<f2", torch.float16),
    "bfloat16": ("<i2", torch.bfloat16), "int64": ("<i8", torch.int64), "int32": ("<i4", torch.int32),
    "int16": ("<i2", torch.int16), "int8": ("i1", torch.int8), "uint8": ("u1", torch.uint8), "bool": ("?", torch.bool),
}
SECTIONS = ("q", "scale", "half", "exact")  # the data sections tensor slices point into
_FP16 = ("scale", "half")  # stored as two byte planes: low bytes, then high bytes
PARTS = ("header", "q", "scale.lo", "scale.hi", "half.lo", "half.hi", "exact")  # frame order in the payload
# The whole TrialConfig travels in the header (about 400 compressed bytes): the model
# config to rebuild, the compress settings to decode, the train settings to evaluate alike.
_CONFIG_SECTIONS: dict[str, type] = {"model": ModelConfig, "compress": CompressConfig, "train": TrainConfig}


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _EXACT_DTYPES:
        raise ValueError(f"dtype {dtype} cannot be stored (expected one of {sorted(_EXACT_DTYPES)})")
    return name


def _byte_planes(raw: bytes) -> tuple[bytes, bytes]:
    """fp16 bytes as two planes: every low byte (mostly mantissa noise), every high byte
    (sign, exponent: compressible)."""
    pairs = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 2)
    return pairs[:, 0].tobytes(), pairs[:, 1].tobytes()


def _join_planes(lo: bytes, hi: bytes) -> bytes:
    if len(lo) != len(hi):
        raise ValueError(f"fp16 byte planes of different lengths ({len(lo)}, {len(hi)})")
    return np.stack([np.frombuffer(lo, dtype=np.uint8), np.frombuffer(hi, dtype=np.uint8)], axis=1).tobytes()


def _pack_levels(q: Tensor, bits: int) -> bytes:
    """int8 levels as stored: one byte each, or two per byte (low nibble first) at 4 bits."""
    flat = q.reshape(-1).numpy()
    if bits != 4:
        return flat.tobytes()
    u = (flat.astype(np.int16) + qmax(4)).astype(np.uint8)  # [0, 14]
    if u.size % 2:
        u = np.append(u, np.uint8(qmax(4)))  # pad with level 0
    return (u[0::2] | (u[1::2] << 4)).tobytes()


def _unpack_levels(raw: bytes, bits: int, n: int) -> np.ndarray:
    if bits != 4:
        return np.frombuffer(raw, dtype=np.int8, count=n)
    b = np.frombuffer(raw, dtype=np.uint8)
    u = np.stack([b & 0x0F, b >> 4], axis=1).reshape(-1)[:n]
    return u.astype(np.int8) - np.int8(qmax(4))


def _levels_nbytes(n: int, bits: int) -> int:
    return (n + 1) // 2 if bits == 4 else n


def encode_parts(state: QuantizedState, config: TrialConfig) -> dict[str, bytes]:
    """The uncompressed parts (PARTS): the JSON header, then the data sections, fp16 ones
    split into byte planes."""
    if config.compress != state.compress:
        raise ValueError("the state was quantized with other compress settings than config.compress")
    chunks: dict[str, list[bytes]] = {s: [] for s in SECTIONS}
    sizes = dict.fromkeys(SECTIONS, 0)

    def put(section: str, raw: bytes) -> list[int]:
        chunks[section].append(raw)
        sizes[section] += len(raw)
        return [sizes[section] - len(raw), len(raw)]

    entries: list[dict[str, Any]] = []
    for t in state.tensors:
        if t.alias_of is not None:
            entries.append({"name": t.name, "alias": t.alias_of})
            continue
        entry: dict[str, Any] = {
            "name": t.name, "shape": list(t.shape), "dtype": _dtype_name(t.dtype), "enc": t.plan.enc,
            "group": t.plan.group,
        }
        if t.plan.enc == "int":
            assert t.q is not None and t.scales is not None
            entry.update(bits=t.plan.bits, clip_sigma=t.plan.clip_sigma, rows=int(t.q.shape[0]))
            entry["q"] = put("q", _pack_levels(t.q, t.plan.bits))
            entry["scale"] = put("scale", t.scales.numpy().astype("<f2").tobytes())
        elif t.plan.enc == "half":
            assert t.data is not None
            entry["data"] = put("half", t.data.numpy().astype("<f2").tobytes())
        else:
            assert t.data is not None
            data = t.data.view(torch.int16) if t.data.dtype == torch.bfloat16 else t.data
            entry["data"] = put("exact", data.numpy().astype(_EXACT_DTYPES[entry["dtype"]][0]).tobytes())
        entries.append(entry)
    header = {
        "format": FORMAT, "version": VERSION,
        "config": {s: dataclasses.asdict(getattr(config, s)) for s in _CONFIG_SECTIONS},
        "sections": [[s, sizes[s]] for s in SECTIONS],
        "tensors": entries,
    }
    header["digest"] = header_digest(header)
    parts = {"header": json.dumps(header, separators=(",", ":")).encode("utf-8")}
    for s in SECTIONS:
        raw = b"".join(chunks[s])
        if s in _FP16:
            parts[f"{s}.lo"], parts[f"{s}.hi"] = _byte_planes(raw)
        else:
            parts[s] = raw
    return parts


def header_digest(header: Mapping[str, Any]) -> str:
    """sha256 of the config and every tensor's name, shape, dtype and encoding.

    A config edited in the file (`n_passes` changes no tensor shape, so the weights would
    load and silently run another model) no longer matches; the crc32 alone can be fixed up.
    """
    tensors = [
        [t.get("name"), t.get("alias"), t.get("shape"), t.get("dtype"), t.get("enc"), t.get("bits")]
        for t in header.get("tensors", [])
    ]
    canonical = json.dumps({"config": header.get("config"), "tensors": tensors}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def header_config(header: Mapping[str, Any]) -> TrialConfig:
    """The trial's config a decoded header carries (TypeError / ValueError if it is not one)."""
    return TrialConfig(**{s: cls(**header["config"][s]) for s, cls in _CONFIG_SECTIONS.items()})


class _Sections:
    """The body's sections, read strictly in order: each tensor's slice must start where the
    previous one in its section ended, and every section must be used up exactly."""

    def __init__(self, raw: Mapping[str, bytes]) -> None:
        self.raw, self.cursor = raw, dict.fromkeys(raw, 0)

    def take(self, section: str, where: Any, expected: int, what: str) -> bytes:
        if not (isinstance(where, list) and len(where) == 2 and all(type(v) is int for v in where)):
            raise ValueError(f"{what}: bad slice {where!r}")
        offset, nbytes = where
        if offset != self.cursor[section] or nbytes != expected or offset + nbytes > len(self.raw[section]):
            raise ValueError(f"{what}: slice {where} is not the next {expected} bytes of section {section!r}")
        self.cursor[section] += nbytes
        return self.raw[section][offset : offset + nbytes]

    def check_used_up(self) -> None:
        for name, used in self.cursor.items():
            if used != len(self.raw[name]):
                raise ValueError(f"section {name!r}: {len(self.raw[name]) - used} bytes belong to no tensor")


def _decode_tensor(entry: Mapping[str, Any], sections: _Sections) -> QuantizedTensor:
    name = entry["name"]
    shape = tuple(entry["shape"])
    if not (isinstance(name, str) and all(type(d) is int and d >= 0 for d in shape)):
        raise ValueError(f"tensor entry {entry!r}: bad name or shape")
    dtype_name = entry["dtype"]
    np_dtype, dtype = _EXACT_DTYPES[dtype_name]
    n = math.prod(shape)
    enc, group = entry["enc"], entry["group"]
    if group not in ("quantized", "protected", "small", "exact"):
        raise ValueError(f"{name}: unknown group {group!r}")
    if enc == "int":
        bits, rows, clip_sigma = entry["bits"], entry["rows"], float(entry["clip_sigma"])
        if bits not in (4, 5, 6, 8) or rows != n_rows(shape):
            raise ValueError(f"{name}: bad bits {bits!r} or rows {rows!r}")
        q = _unpack_levels(sections.take("q", entry["q"], _levels_nbytes(n, bits), f"{name}.q"), bits, n)
        if q.size and int(np.abs(q.astype(np.int16)).max()) > qmax(bits):  # int8 |-128| would overflow to -128
            raise ValueError(f"{name}: levels outside [-{qmax(bits)}, {qmax(bits)}]")
        scales = np.frombuffer(sections.take("scale", entry["scale"], 2 * rows, f"{name}.scale"), dtype="<f2")
        return QuantizedTensor(
            name, shape, dtype, Plan("int", group, bits, clip_sigma),
            q=torch.from_numpy(q.copy()).reshape(rows, -1), scales=torch.from_numpy(scales.astype(np.float16)),
        )
    if enc == "half":
        raw = sections.take("half", entry["data"], 2 * n, f"{name}.data")
        data = torch.from_numpy(np.frombuffer(raw, dtype="<f2").astype(np.float16))
        return QuantizedTensor(name, shape, dtype, Plan("half", group), data=data)
    if enc == "exact":
        itemsize = np.dtype(np_dtype).itemsize
        arr = np.frombuffer(sections.take("exact", entry["data"], itemsize * n, f"{name}.data"), dtype=np_dtype)
        data = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="))).view(dtype)
        return QuantizedTensor(name, shape, dtype, Plan("exact", group), data=data)
    raise ValueError(f"{name}: unknown encoding {enc!r}")


def decode_parts(parts: Mapping[str, bytes]) -> tuple[dict[str, Any], QuantizedState]:
    """Parse the parts written by `encode_parts`; ValueError/KeyError/TypeError if malformed."""
    try:
        header = json.loads(parts["header"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the header part is not JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ValueError("the JSON header is not a loopgolf artifact header of this version")
    sections = {s: _join_planes(parts[f"{s}.lo"], parts[f"{s}.hi"]) if s in _FP16 else parts[s] for s in SECTIONS}
    if header.get("digest") != header_digest(header):
        raise ValueError("the header's config or tensor shapes do not match its digest: the file was edited")
    if header["sections"] != [[s, len(sections[s])] for s in SECTIONS]:
        raise ValueError(f"sections {header['sections']!r} do not match the parts' sizes")
    compress = CompressConfig(**header["config"]["compress"])
    reader = _Sections(sections)
    tensors: list[QuantizedTensor] = []
    seen: dict[str, QuantizedTensor] = {}
    for entry in header["tensors"]:
        if "alias" in entry:
            target = seen[entry["alias"]]
            t = dataclasses.replace(target, name=entry["name"], q=None, scales=None, data=None, alias_of=target.name)
        else:
            t = _decode_tensor(entry, reader)
        if t.name in seen:
            raise ValueError(f"tensor {t.name!r} appears twice")
        seen[t.name] = t
        tensors.append(t)
    reader.check_used_up()
    return header, QuantizedState(tuple(tensors), compress)


def declared_sizes(header: bytes) -> dict[str, int]:
    """Each part's uncompressed size, from the header's "sections" (fp16 ones as two planes)."""
    try:
        sections = dict(json.loads(header.decode("utf-8"))["sections"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"the header part is not JSON with a sections list ({type(exc).__name__})") from None
    if set(sections) != set(SECTIONS) or not all(type(n) is int and n >= 0 for n in sections.values()):
        raise ValueError(f"the header's sections {sections!r} are not {list(SECTIONS)} with sizes")
    sizes = {"header": len(header)}
    for s in SECTIONS:
        for part in (f"{s}.lo", f"{s}.hi") if s in _FP16 else (s,):
            sizes[part] = sections[s] // 2 if s in _FP16 else sections[s]
    return sizes
