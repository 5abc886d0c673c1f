"""The artifact: the container, codecs, save/load roundtrip, byte accounting, and
rejection of bad files.

    python -m pytest tests/trial/test_artifact.py
"""

from __future__ import annotations

import json
import lzma
import os
import pickle
import re
import struct
import subprocess
import sys
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from loopgolf.errors import LoopgolfError
from loopgolf.trial import artifact as A
from loopgolf.trial import artifact_parts as AP
from loopgolf.trial import codecs as C
from loopgolf.trial import qat as QAT
from loopgolf.trial import quantize as Q
from loopgolf.trial.code_bytes import CODE_FILES, code_bytes
from loopgolf.trial.config import CompressConfig, TrialConfig
from loopgolf.trial.model import RecurrentLM
from tests.conftest import RICH, trained_like

CODECS = ("zlib", "lzma", "zstd", "brotli")


@pytest.fixture(scope="module")
def rich_model() -> RecurrentLM:
    return trained_like(RICH)


def test_nibble_packing_roundtrips_odd_lengths() -> None:
    q = torch.randint(-7, 8, (3, 5), dtype=torch.int8)
    raw = AP._pack_levels(q, 4)
    assert len(raw) == 8
    assert torch.equal(torch.from_numpy(AP._unpack_levels(raw, 4, 15).copy()).reshape(3, 5), q)


@pytest.mark.parametrize("codec", CODECS)
def test_codecs_roundtrip_bytes(codec: str) -> None:
    raw = bytes(range(256)) * 40 + b"loopgolf" * 100
    packed = C.compress_bytes(raw, codec)
    assert len(packed) < len(raw) and C.decompress_bytes(packed, codec) == raw


def test_non_finite_weights_are_refused_at_save(tmp_path: Path) -> None:
    model = trained_like(RICH)
    with torch.no_grad():
        model.core[0].mlp.fc.weight[0, 0] = float("nan")
    with pytest.raises(A.ArtifactError, match=r"core\.0\.mlp\.fc\.weight: non-finite"):
        A.save_artifact(model, RICH, tmp_path / "a.lga")


# -------------------------------------------------------------------------- roundtrip


@pytest.mark.parametrize(("codec", "bits"), [("zlib", 8), ("lzma", 6), ("zstd", 5), ("brotli", 4), ("zstd", 6)])
def test_roundtrip_logits_identical_to_in_memory_quantized_model(
    rich_model: RecurrentLM, tmp_path: Path, codec: str, bits: int
) -> None:
    config = RICH.replace(codec=codec, bits=bits, protect=["tok_emb.weight"], protect_bits=8)
    in_memory = QAT.quantized_model(rich_model, config.compress).eval()
    A.save_artifact(rich_model, config, tmp_path / "a.lga")
    loaded, loaded_config = A.load_artifact_with_config(tmp_path / "a.lga")
    assert loaded_config == config
    x = torch.randint(0, config.model.vocab_size, (2, config.model.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = in_memory(x), loaded(x)
    assert torch.equal(expected.logits, got.logits)
    assert torch.equal(expected.refined, got.refined)
    assert not torch.equal(expected.logits, rich_model(x).logits)  # quantization did something


def test_loaded_state_equals_the_dequantized_state_exactly(rich_model: RecurrentLM, tmp_path: Path) -> None:
    config = RICH.replace(codec="zstd", bits=6, clip_sigma=3.0)
    A.save_artifact(rich_model, config, tmp_path / "a.lga")
    loaded = A.load_artifact(tmp_path / "a.lga").state_dict()
    expected = Q.dequantize(Q.quantize_model(rich_model, config.compress))
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    assert loaded["router_threshold"].item() == rich_model.router_threshold.item()  # exact, not fp16


def test_exact_dtypes_and_aliases_survive_the_body(tmp_path: Path) -> None:
    cfg = CompressConfig(bits=5, small_tensor_numel=4)
    int_plan, exact = Q.Plan("int", "quantized", 5, 0.0), Q.Plan("exact", "exact")
    w = torch.randn(6, 7)
    scales = Q.row_scales(w, 5, 0.0)
    tensors = [
        Q.QuantizedTensor("w", (6, 7), torch.float32, int_plan, q=Q.quantize_rows(w, scales, 5), scales=scales),
        Q.QuantizedTensor("tied", (6, 7), torch.float32, int_plan, alias_of="w"),
        Q.QuantizedTensor("h", (2,), torch.bfloat16, Q.Plan("half", "small"), data=torch.tensor([1.5, -2.0]).half()),
    ]
    for dtype, values in [
        (torch.int64, [-(2**40), 3]), (torch.bool, [True, False]), (torch.bfloat16, [1.0, -3.5]),
        (torch.float32, [float("nan"), 1e-30]), (torch.uint8, [0, 255]), (torch.int32, [-7, 2**30]),
        (torch.float32, []),  # an empty tensor: a dimension of 0 is a shape like any other
    ]:
        data = torch.tensor(values, dtype=dtype)
        tensors.append(Q.QuantizedTensor(f"x_{dtype}_{len(values)}", (len(values),), dtype, exact, data=data))
    state = Q.QuantizedState(tuple(tensors), cfg)
    _, back = AP.decode_parts(AP.encode_parts(state, TrialConfig(compress=cfg)))
    assert back.compress == cfg
    assert [_stored(t) for t in back.tensors] == [_stored(t) for t in state.tensors]
    before, after = Q.dequantize(state), Q.dequantize(back)
    for name in before:
        assert after[name].dtype == before[name].dtype, name
        assert _bytes_of(after[name]) == _bytes_of(before[name]), name
    assert after["tied"] is after["w"]


def _bytes_of(x: torch.Tensor) -> list[int]:
    return x.contiguous().view(-1).view(torch.uint8).tolist() if x.numel() else []


def _stored(t: Q.QuantizedTensor) -> tuple:
    """Everything a QuantizedTensor holds, its tensors as (dtype, shape, bytes); None where absent."""
    def raw(x: torch.Tensor | None) -> tuple | None:
        return None if x is None else (x.dtype, tuple(x.shape), _bytes_of(x))

    return t.name, t.shape, t.dtype, t.plan, t.alias_of, raw(t.q), raw(t.scales), raw(t.data)


# -------------------------------------------------------------------- byte accounting


def test_reported_bytes_are_the_file_and_the_code_files(rich_model: RecurrentLM, tmp_path: Path) -> None:
    config = RICH.replace(codec="zlib", bits=6)
    info = A.save_artifact(rich_model, config, tmp_path / "a.lga")
    root = Path(A.__file__).resolve().parents[2]
    assert info.model_bytes == os.path.getsize(tmp_path / "a.lga")
    assert info.code_bytes == sum(os.path.getsize(root / f) for f in CODE_FILES) == code_bytes()
    assert info.artifact_bytes == info.model_bytes + info.code_bytes
    assert info.params == rich_model.unique_params()
    assert info.quantized_params + info.protected_params + info.small_params == info.params
    assert info.fits and info.max_artifact_bytes == config.compress.max_artifact_bytes
    assert [p.name for p in tmp_path.iterdir()] == ["a.lga"]  # no temp file left behind


_LOAD_AND_RUN = """
import json, sys
from pathlib import Path
import torch
from loopgolf.trial.artifact import load_artifact

model = load_artifact(sys.argv[1])
with torch.no_grad():
    out = model(torch.zeros(1, 16, dtype=torch.long))
assert out.refined is not None  # the refinement path ran too
root = Path(sys.argv[2])
files = [Path(m.__file__).resolve().relative_to(root).as_posix()
         for name, m in sys.modules.items() if name == "loopgolf" or name.startswith("loopgolf.")]
print(json.dumps(sorted(files)))
"""


def test_code_files_are_exactly_what_loading_and_running_imports(rich_model: RecurrentLM, tmp_path: Path) -> None:
    """CODE_FILES against the real import graph, in a fresh interpreter: nothing missing,
    nothing counted that loading and running the model does not need."""
    path = tmp_path / "a.lga"
    A.save_artifact(rich_model, RICH, path)
    root = Path(A.__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", _LOAD_AND_RUN, str(path), str(root)], cwd=root,
                          capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == sorted(CODE_FILES)


def test_saving_a_model_that_does_not_match_its_config_fails(rich_model: RecurrentLM, tmp_path: Path) -> None:
    with pytest.raises(A.ArtifactError, match="does not match config"):
        A.save_artifact(rich_model, RICH.replace(d_model=128), tmp_path / "a.lga")
    assert not (tmp_path / "a.lga").exists()


def test_the_mismatch_message_names_the_first_differing_tensors(rich_model: RecurrentLM, tmp_path: Path) -> None:
    """A config with one more core block: the differences are that block's tensors, and the
    message lists the first four of them by name (the model has none of them)."""
    with pytest.raises(A.ArtifactError) as caught:
        A.save_artifact(rich_model, RICH.replace(n_blocks=RICH.model.n_blocks + 1), tmp_path / "a.lga")
    listed = re.findall(r"\('([\w.]+)', \(", str(caught.value))
    extra = f"core.{RICH.model.n_blocks}."
    assert len(listed) == 4 and all(name.startswith(extra) for name in listed), str(caught.value)
    assert listed == sorted(listed) and not any(name in rich_model.state_dict() for name in listed)


def test_read_artifact_gives_the_trials_router_seed_and_the_stored_state(
    rich_model: RecurrentLM, tmp_path: Path
) -> None:
    """The `random` signal's draws replay from the file: the model gets the trial's seed."""
    config = RICH.replace(seed=7)
    A.save_artifact(rich_model, config, tmp_path / "a.lga")
    loaded = A.read_artifact(tmp_path / "a.lga")
    assert loaded.model.router_seed == 7 and loaded.config == config
    stored = Q.quantize_model(rich_model, config.compress)
    assert [t.name for t in loaded.state.tensors] == [t.name for t in stored.tensors]
    assert loaded.state.compress == config.compress


# ------------------------------------------------------------------------- bad files


@pytest.fixture(scope="module")
def good_file(rich_model: RecurrentLM, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("good") / "a.lga"
    A.save_artifact(rich_model, RICH.replace(codec="zlib", bits=6), path)
    return path.read_bytes()


def _rejected(tmp_path: Path, raw: bytes, match: str) -> None:
    path = tmp_path / "bad.lga"
    path.write_bytes(raw)
    with pytest.raises(A.ArtifactError, match=match) as info:
        A.load_artifact(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, LoopgolfError)


def test_rejects_a_torch_save_file(rich_model: RecurrentLM, tmp_path: Path) -> None:
    torch.save(rich_model.state_dict(), tmp_path / "model.pt")
    _rejected(tmp_path, (tmp_path / "model.pt").read_bytes(), "never unpickles")


def test_rejects_a_raw_pickle(tmp_path: Path) -> None:
    _rejected(tmp_path, pickle.dumps({"tok_emb.weight": [1.0]}), "bad magic|never unpickles")


def test_rejects_a_pickled_header_inside_a_valid_container(tmp_path: Path) -> None:
    parts = dict.fromkeys(AP.PARTS, b"") | {"header": pickle.dumps({"evil": True})}
    _rejected(tmp_path, A.pack_parts(parts, "zlib"), "header part is not JSON")


def test_rejects_wrong_magic(good_file: bytes, tmp_path: Path) -> None:
    _rejected(tmp_path, b"XXXX" + good_file[4:], "magic")


@pytest.mark.parametrize("keep", [0, 3, 9, 20, -1])
def test_rejects_truncated_files(good_file: bytes, tmp_path: Path, keep: int) -> None:
    _rejected(tmp_path, good_file[:keep] if keep >= 0 else good_file[:-1], "truncated|magic")


def test_rejects_trailing_bytes(good_file: bytes, tmp_path: Path) -> None:
    _rejected(tmp_path, good_file + b"\0", "trailing")


def test_rejects_a_flipped_byte(good_file: bytes, tmp_path: Path) -> None:
    raw = bytearray(good_file)
    raw[len(raw) // 2] ^= 0x40
    _rejected(tmp_path, bytes(raw), "crc32")


def test_a_wrong_payload_length_and_a_corrupt_payload_are_named_exactly(good_file: bytes, tmp_path: Path) -> None:
    n_name = good_file[5]
    (n_payload,) = struct.unpack_from("<I", good_file, 6 + n_name)
    said = f"header says {n_payload} payload bytes, file holds"
    _rejected(tmp_path, good_file[:-1], re.escape(f"truncated: {said} {n_payload - 1}") + "$")
    _rejected(tmp_path, good_file + b"\0\0", re.escape(f"has trailing bytes: {said} {n_payload + 2}") + "$")
    raw = bytearray(good_file)
    raw[len(raw) // 2] ^= 0x40
    _rejected(tmp_path, bytes(raw), "payload crc32 mismatch: the file is corrupt$")


def test_rejects_an_unknown_version_or_codec(good_file: bytes, tmp_path: Path) -> None:
    _rejected(tmp_path, good_file[:4] + b"\x09" + good_file[5:], "version")
    _rejected(tmp_path, good_file[:6] + b"zzzz" + good_file[10:], "unknown codec")


def test_rejects_a_header_whose_slices_lie(good_file: bytes, tmp_path: Path) -> None:
    """A well-formed container and JSON header whose tensor slice lies: caught, not read past."""
    codec, parts = A.unpack_parts(good_file)
    forged = parts | {"header": parts["header"].replace(b'"q":[0,', b'"q":[1,', 1)}
    _rejected(tmp_path, A.pack_parts(forged, codec), "slice")


def test_rejects_a_frame_that_does_not_decompress(tmp_path: Path) -> None:
    payload = b"".join(struct.pack("<I", len(f)) + f for f in (b"not zlib data", *([b""] * (len(AP.PARTS) - 1))))
    _rejected(tmp_path, A._outer_header("zlib", payload) + payload, "does not decompress")


def test_rejects_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(A.ArtifactError, match="cannot read"):
        A.load_artifact(tmp_path / "nope.lga")


def test_rejects_a_config_edited_in_the_file(good_file: bytes, tmp_path: Path) -> None:
    """n_passes changes no tensor shape: without the digest the weights would load into another model."""
    codec, parts = A.unpack_parts(good_file)
    header = json.loads(parts["header"])
    header["config"]["model"]["n_passes"] += 1
    edited = parts | {"header": json.dumps(header).encode()}
    _rejected(tmp_path, A.pack_parts(edited, codec), "digest: the file was edited")
    header["config"]["model"]["n_passes"] -= 1
    header["config"]["model"]["refine_cap"] = 0.75  # no shape depends on it: only the digest can tell
    _rejected(tmp_path, A.pack_parts(parts | {"header": json.dumps(header).encode()}, codec), "digest")
    header["digest"] = AP.header_digest(header)  # an edit that keeps the digest consistent loads as what it says
    (tmp_path / "resigned.lga").write_bytes(A.pack_parts(parts | {"header": json.dumps(header).encode()}, codec))
    assert A.load_artifact(tmp_path / "resigned.lga").config.refine_cap == 0.75


_BOMB = """
import json, lzma, resource, sys, zlib
import brotli, zstandard
from loopgolf.trial import artifact as A
from loopgolf.trial import artifact_parts as AP
from loopgolf.trial import codecs as C

def frame(codec, size):  # `size` zero bytes, compressed without ever holding them
    chunk, n = bytes(1 << 20), size >> 20
    if codec == "zlib":
        c = zlib.compressobj(9); return b"".join(c.compress(chunk) for _ in range(n)) + c.flush()
    if codec == "lzma":
        c = lzma.LZMACompressor(format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 1}])
        return b"".join(c.compress(chunk) for _ in range(n)) + c.flush()
    if codec == "zstd":
        c = zstandard.ZstdCompressor(level=1).compressobj(size=size)
        return b"".join(c.compress(chunk) for _ in range(n)) + c.flush()
    c = brotli.Compressor(quality=1); return b"".join(c.process(chunk) for _ in range(n)) + c.finish()

codec = sys.argv[1]
parts = dict.fromkeys(AP.PARTS, b"")
header = {"format": AP.FORMAT, "version": AP.VERSION, "config": {}, "tensors": [],
          "sections": [[s, 1024 if s == "q" else 0] for s in AP.SECTIONS]}
parts["header"] = json.dumps(header).encode()
frames = [C.compress_bytes(parts["header"], codec), frame(codec, 1 << 29)] + [b""] * (len(AP.PARTS) - 2)
payload = b"".join(len(f).to_bytes(4, "little") + f for f in frames)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    A.unpack_parts(A._outer_header(codec, payload) + payload)
    print(json.dumps({"error": None}))
except ValueError as exc:
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"error": str(exc), "grown_kib": grown, "frame_bytes": len(frames[1])}))
"""


@pytest.mark.parametrize("codec", ["zlib", "lzma", "zstd", "brotli"])
def test_a_decompression_bomb_is_refused_within_the_declared_size(codec: str) -> None:
    """A frame of 512 MiB of zeros where the header declares 1 KiB: refused, memory barely moves."""
    proc = subprocess.run([sys.executable, "-c", _BOMB, codec], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["error"] == "the 'q' frame decompresses to more than the 1024 bytes the header declares"
    assert result["grown_kib"] < 150 * 1024, result  # lzma's 64 MiB dictionary; was the whole frame
    assert result["frame_bytes"] < 8 << 20


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_levels_beyond_qmax_are_rejected_and_qmax_itself_is_read(
    rich_model: RecurrentLM, tmp_path: Path, bits: int
) -> None:
    """A container whose q section holds a level outside [-qmax(bits), qmax(bits)] is refused."""
    path = tmp_path / "a.lga"
    A.save_artifact(rich_model, RICH.replace(codec="zlib", bits=bits), path)
    codec, parts = A.unpack_parts(path.read_bytes())
    limit = Q.qmax(bits)

    def with_first_level(level: int) -> bytes:
        q = bytearray(parts["q"])
        if bits == 4:  # two levels a byte, low nibble first, stored as level + 7
            q[0] = (q[0] & 0xF0) | (level + limit)
        else:
            q[0] = level & 0xFF
        return A.pack_parts(parts | {"q": bytes(q)}, codec)

    for level in (limit, -limit):
        _, state = A.decode_artifact(with_first_level(level))
        first = next(t for t in state.tensors if t.q is not None)
        assert int(first.q.reshape(-1)[0]) == level
    for level in (limit + 1, -limit - 1) if bits != 4 else (limit + 1,):  # a nibble holds no level below -7
        _rejected(tmp_path, with_first_level(level), rf"levels outside \[-{limit}, {limit}\]")


# ------------------------------------------------------------------ the pg_int8 recipe

PG_CONTROL = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight")


def challenge_roundtrip(name: str, t: torch.Tensor) -> torch.Tensor:
    """The challenge baseline's export and reload of one float parameter, as its facts state:
    <= 65,536 elements pass through (fp32 for control tensors, fp16 otherwise); larger 2-D
    tensors become int8 per row, clipped at the 99.99984th percentile of |w|, with scale
    clip / 127 floored at 1/127, kept as fp16."""
    t32 = t.detach().float()
    if t32.numel() <= 65_536:
        return t32 if any(p in name for p in PG_CONTROL) else t32.half().float()
    assert t32.ndim == 2, name
    clip = torch.quantile(t32.abs(), 0.9999984, dim=1)
    scale = torch.clamp(clip / 127.0, min=1.0 / 127.0)
    q = torch.round(torch.clamp(t32, -clip[:, None], clip[:, None]) / scale[:, None]).clamp(-127, 127)
    return q * scale.half().float()[:, None]


@pytest.mark.parametrize("seed", [0, 1])
def test_pg_int8_reloads_exactly_the_weights_the_challenge_export_reloads(seed: int, tmp_path: Path) -> None:
    # Wide enough that embedding and MLP matrices pass 65,536 elements (quantized) while
    # attention matrices stay below (fp16); skips, scales and q gains are control tensors.
    config = TrialConfig().replace(
        vocab_size=1024, d_model=256, n_heads=4, n_kv_heads=2, n_blocks=1, n_passes=2, n_prelude=1, n_coda=1,
        unet_skips=True, seq_len=32, recipe="pg_int8",
    )  # fmt: skip
    model = trained_like(config, seed)
    with torch.no_grad():  # outliers and tiny rows: the clip and the 1/127 floor both act
        model.tok_emb.weight[3, 7] = 9.0
        model.core[0].mlp.fc.weight[5].mul_(1e-3)
    A.save_artifact(model, config, tmp_path / "m.lgart")
    reloaded = dict(A.load_artifact(tmp_path / "m.lgart").named_parameters())
    kinds = {"int8": 0, "fp32": 0, "fp16": 0}
    for name, p in model.named_parameters():
        expected = challenge_roundtrip(name, p)
        assert torch.equal(reloaded[name].float(), expected), name
        kinds["int8" if p.numel() > 65_536 else "fp32" if any(c in name for c in PG_CONTROL) else "fp16"] += 1
    assert all(kinds.values()), kinds


def test_pg_int8_needs_int8_and_zlib() -> None:
    with pytest.raises(LoopgolfError) as info:
        CompressConfig(recipe="pg_int8", codec="lzma")
    expected = "CompressConfig.recipe='pg_int8': expected bits=8 and codec='zlib' (got bits=8, codec='lzma')"
    assert str(info.value) == expected


# ------------------------------------------------- malformed files, layer by layer
#
# Each row: one thing wrong, and the exact one-line message that names it.


def _outer(payload: bytes, codec: bytes = b"zlib") -> bytes:
    """A well-formed outer header (right length and crc) around `payload`."""
    header = A.MAGIC + bytes([AP.VERSION, len(codec)]) + codec + struct.pack("<II", len(payload), zlib.crc32(payload))
    return header + payload


def _frames(*frames: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(f)) + f for f in frames)


def _container(sections: dict[str, int], **frames: bytes) -> bytes:
    """A container whose header declares `sections` (the rest 0), its other frames zlib'd."""
    sizes = {s: 0 for s in AP.SECTIONS} | sections
    header = json.dumps({"sections": [[s, n] for s, n in sizes.items()]}).encode()
    parts = {p: frames.get(p.replace(".", "_"), b"") for p in AP.PARTS} | {"header": zlib.compress(header)}
    return _outer(_frames(*(zlib.compress(f) if p != "header" and f else f for p, f in parts.items())))


_NO_CODEC = "expected one of ['brotli', 'lzma', 'zlib', 'zstd']"
_FOUR = "are not ['q', 'scale', 'half', 'exact'] with sizes"
BAD_CONTAINERS = [
    ("other magic", b"GIF89a" + bytes(20), "not a loopgolf artifact: magic b'GIF8', expected b'LGAF'"),
    ("a pickle", b"\x80\x04K\x01.", "not a loopgolf artifact: magic b'\\x80\\x04K\\x01', expected b'LGAF' "
     "(it looks like a pickle; loading never unpickles)"),
    ("a zip", b"PK\x03\x04" + bytes(9), "not a loopgolf artifact: magic b'PK\\x03\\x04', expected b'LGAF' "
     "(it looks like a zip / torch.save file; loading never unpickles)"),
    ("no version byte", A.MAGIC + b"\x02", "truncated inside the outer header"),
    ("another version", A.MAGIC + b"\x09\x04", "container version 9, this loopgolf reads version 2"),
    ("cut in the codec name", A.MAGIC + b"\x02\x04zli", "truncated inside the outer header"),
    ("a non-ASCII codec", _outer(b"", codec=b"\xc3\xa9"), f"unknown codec '\ufffd\ufffd', {_NO_CODEC}"),
    ("no frames", _outer(b""), "payload ends before the 'header' frame"),
    ("a frame past the end", _outer(struct.pack("<I", 5) + b"ab"),
     "the 'header' frame (5 bytes) runs past the payload"),
    ("a frame length over 2**31", _outer(struct.pack("<I", 2**31 + 1) + b"ab"),
     "the 'header' frame (2147483649 bytes) runs past the payload"),
    ("bytes after the frames", _outer(_frames(*[b""] * 7) + b"xyz"), "3 bytes after the last frame"),
    ("a frame that is not zlib", _outer(_frames(b"not zlib", *[b""] * 6)),
     "the 'header' frame does not decompress with zlib (error)"),
    ("a header that is not JSON", _outer(_frames(zlib.compress(b"{nope"), *[b""] * 6)),
     "the header part is not JSON with a sections list (JSONDecodeError)"),
    ("sections missing", _outer(_frames(zlib.compress(b'{"sections": [["q", 1]]}'), *[b""] * 6)),
     f"the header's sections {{'q': 1}} {_FOUR}"),
    ("a negative section", _container({"q": -1}),
     f"the header's sections {{'q': -1, 'scale': 0, 'half': 0, 'exact': 0}} {_FOUR}"),
    ("a frame over its size", _container({"q": 1}, q=b"abc"),
     "the 'q' frame decompresses to more than the 1 bytes the header declares"),
    ("a frame under its size", _container({"q": 4}, q=b"ab"), "the 'q' frame holds 2 bytes, the header declares 4"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "message"), [pytest.param(r, m, id=i) for i, r, m in BAD_CONTAINERS])
def test_a_bad_container_is_refused_naming_what_is_wrong(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError) as info:
        A.unpack_parts(raw)
    assert str(info.value) == message


def test_empty_sections_unpack_to_empty_parts() -> None:
    """Sections of 0 bytes (a model with no fp16 tensor has them) are empty frames, read as b""."""
    codec, parts = A.unpack_parts(_container({}))
    assert codec == "zlib" and {p: parts[p] for p in AP.PARTS[1:]} == dict.fromkeys(AP.PARTS[1:], b"")
    with pytest.raises(ValueError, match=r"^the JSON header is not a loopgolf artifact header of this version$"):
        AP.decode_parts(parts)


@pytest.fixture(scope="module")
def body_parts() -> dict[str, bytes]:
    """The parts of a small state: an int tensor "w" (6x7 at 5 bits: 42 level bytes, 12 scale
    bytes), an fp16 "h" (4 bytes) and an exact float32 "x" (8 bytes)."""
    cfg = CompressConfig(bits=5, small_tensor_numel=4)
    w = torch.randn(6, 7, generator=torch.Generator().manual_seed(0))
    scales = Q.row_scales(w, 5, 0.0)
    state = Q.QuantizedState((
        Q.QuantizedTensor("w", (6, 7), torch.float32, Q.Plan("int", "quantized", 5, 0.0),
                          q=Q.quantize_rows(w, scales, 5), scales=scales),
        Q.QuantizedTensor("h", (2,), torch.float32, Q.Plan("half", "small"), data=torch.tensor([1.5, -2.0]).half()),
        Q.QuantizedTensor("x", (2,), torch.float32, Q.Plan("exact", "exact"), data=torch.tensor([3.0, 4.0])),
    ), cfg)  # fmt: skip
    return AP.encode_parts(state, TrialConfig(compress=cfg))


def _tensor(i: int, **fields: Any) -> Callable[[dict, dict], None]:
    return lambda header, parts: header["tensors"][i].update(fields)


def _section(name: str, size: int, raw: bytes) -> Callable[[dict, dict], None]:
    def edit(header: dict, parts: dict) -> None:
        header["sections"] = [[s, size if s == name else n] for s, n in header["sections"]]
        parts[name] = raw

    return edit


def _lie_about_q(header: dict, parts: dict) -> None:
    header["sections"][0][1] += 1


BAD_BODIES = [
    ("fp16 planes differ", lambda h, p: p.update({"scale.hi": p["scale.hi"][:-1]}),
     "fp16 byte planes of different lengths (6, 5)"),
    ("sections lie", _lie_about_q,
     "sections [['q', 43], ['scale', 12], ['half', 4], ['exact', 8]] do not match the parts' sizes"),
    ("a name not a string", _tensor(0, name=5), "bad name or shape"),
    ("a negative dimension", _tensor(0, shape=[-6, -7]), "bad name or shape"),
    ("an unknown group", _tensor(0, group="bogus"), "w: unknown group 'bogus'"),
    ("bits not stored", _tensor(0, bits=7), "w: bad bits 7 or rows 6"),
    ("rows not the shape's", _tensor(0, rows=7), "w: bad bits 5 or rows 7"),
    ("a slice of three", _tensor(0, q=[0, 42, 0]), "w.q: bad slice [0, 42, 0]"),
    ("a slice of a string", _tensor(0, q=["0", 42]), "w.q: bad slice ['0', 42]"),
    ("levels not first", _tensor(0, q=[1, 42]), "w.q: slice [1, 42] is not the next 42 bytes of section 'q'"),
    ("scales too short", _tensor(0, scale=[0, 10]),
     "w.scale: slice [0, 10] is not the next 12 bytes of section 'scale'"),
    ("fp16 data off", _tensor(1, data=[2, 4]), "h.data: slice [2, 4] is not the next 4 bytes of section 'half'"),
    ("exact data off", _tensor(2, data=[0, 4]), "x.data: slice [0, 4] is not the next 8 bytes of section 'exact'"),
    ("exact section empty", _section("exact", 0, b""),
     "x.data: slice [0, 8] is not the next 8 bytes of section 'exact'"),
    ("a byte of no tensor", _section("exact", 9, bytes(9)), "section 'exact': 1 bytes belong to no tensor"),
    ("an unknown encoding", _tensor(2, enc="float"), "x: unknown encoding 'float'"),
    ("a name twice", _tensor(2, name="w"), "tensor 'w' appears twice"),
]  # fmt: skip


@pytest.mark.parametrize(("edit", "message"), [pytest.param(e, m, id=i) for i, e, m in BAD_BODIES])
def test_a_bad_body_is_refused_naming_what_is_wrong(
    body_parts: dict[str, bytes], edit: Callable[[dict, dict], None], message: str
) -> None:
    """The header is re-signed after each edit, so the check under test is the one that fires."""
    parts = dict(body_parts)
    header = json.loads(parts["header"])
    edit(header, parts)
    header["digest"] = AP.header_digest(header)
    parts["header"] = json.dumps(header).encode()
    with pytest.raises(ValueError) as info:
        AP.decode_parts(parts)
    assert str(info.value) == message or (message == "bad name or shape" and str(info.value).endswith(message))


_NOT_OURS = "the JSON header is not a loopgolf artifact header of this version"


@pytest.mark.parametrize(("header", "message"), [
    (b"\x80\x04K\x01.", "the header part is not JSON (UnicodeDecodeError)"),
    (b"{nope", "the header part is not JSON (JSONDecodeError)"),
    (b"[]", _NOT_OURS),
    (json.dumps({"format": AP.FORMAT, "version": 1}).encode(), _NOT_OURS),
    (json.dumps({"format": "other", "version": AP.VERSION}).encode(), _NOT_OURS),
])  # fmt: skip
def test_a_header_that_is_not_ours_is_refused(body_parts: dict[str, bytes], header: bytes, message: str) -> None:
    with pytest.raises(ValueError) as info:
        AP.decode_parts(body_parts | {"header": header})
    assert str(info.value) == message


def test_an_edited_header_is_refused_by_its_digest(body_parts: dict[str, bytes]) -> None:
    header = json.loads(body_parts["header"])
    header["config"]["model"]["n_passes"] += 1
    with pytest.raises(ValueError) as info:
        AP.decode_parts(body_parts | {"header": json.dumps(header).encode()})
    assert str(info.value) == "the header's config or tensor shapes do not match its digest: the file was edited"


def _bomb(codec: str, size: int) -> bytes:
    """`size` zero bytes at each codec's fastest setting (the decoder does not care)."""
    zeros = bytes(size)
    if codec == "zlib":
        return zlib.compress(zeros, 1)
    if codec == "lzma":
        return lzma.compress(zeros, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 1}])
    if codec == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=1).compress(zeros)
    import brotli

    return brotli.compress(zeros, quality=1)


@pytest.mark.parametrize("codec", CODECS)
def test_decompression_stops_past_the_limit_without_holding_the_rest(codec: str) -> None:
    """In process (the subprocess bomb test above measures the whole interpreter): exactly the
    limit decompresses; 8 MiB where 1 KiB is declared is refused after allocating well under 1 MiB
    (beyond lzma's 64 MiB dictionary, which its decoder allocates up front)."""
    assert C.decompress_bounded(_bomb(codec, 1024), codec, 1024) == bytes(1024)
    bomb = _bomb(codec, 8 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as info:
            C.decompress_bounded(bomb, codec, 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(info.value) == "decompresses to more than the 1024 bytes the header declares"
    assert peak < (1 << 20) + (64 << 20 if codec == "lzma" else 0), peak


def test_decompressing_with_an_unknown_codec_names_it() -> None:
    with pytest.raises(ValueError) as info:
        C.decompress_bounded(b"x", "gzip", 10)
    assert str(info.value) == "unknown codec 'gzip'"


def test_zstd_compresses_at_its_strongest_level() -> None:
    """Level 22, not zstd's default (3), which leaves bytes on the table (here: on source text)."""
    import zstandard

    raw = Path(A.__file__).read_bytes()
    assert len(C.compress_bytes(raw, "zstd")) < 0.95 * len(zstandard.ZstdCompressor().compress(raw))


def test_a_codec_whose_package_is_missing_is_refused_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    assert [C.codec_available(c) for c in (*CODECS, "gzip")] == [True, True, True, True, False]
    A.require_codec("zstd")  # importable here: no error
    monkeypatch.setattr(C, "CODEC_PACKAGES", {"zstd": "no_such_package_here", "brotli": "brotli"})
    assert [C.codec_available(c) for c in CODECS] == [True, True, False, True]
    for codec, package in [("zstd", "no_such_package_here"), ("gzip", "gzip")]:
        with pytest.raises(A.ArtifactError) as info:
            A.require_codec(codec)
        assert str(info.value) == (
            f"CompressConfig.codec={codec!r} needs the Python package {package!r}, which is not importable "
            "here: expected one of the codecs available here ['brotli', 'lzma', 'zlib']"
        )
