"""The artifact: the container, codecs, save/load roundtrip, byte accounting, and
rejection of bad files.

    python -m pytest tests/test_artifact.py
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loopgolf.errors import LoopgolfError
from loopgolf.trial import artifact as A
from loopgolf.trial import qat as QAT
from loopgolf.trial import quantize as Q
from loopgolf.trial.config import CompressConfig, TrialConfig
from loopgolf.trial.model import RecurrentLM
from tests.conftest import RICH, trained_like

CODECS = ("zlib", "lzma", "zstd", "brotli")


@pytest.fixture(scope="module")
def rich_model() -> RecurrentLM:
    return trained_like(RICH)


def test_nibble_packing_roundtrips_odd_lengths() -> None:
    q = torch.randint(-7, 8, (3, 5), dtype=torch.int8)
    raw = A._pack_levels(q, 4)
    assert len(raw) == 8
    assert torch.equal(torch.from_numpy(A._unpack_levels(raw, 4, 15).copy()).reshape(3, 5), q)


@pytest.mark.parametrize("codec", CODECS)
def test_codecs_roundtrip_bytes(codec: str) -> None:
    raw = bytes(range(256)) * 40 + b"loopgolf" * 100
    packed = A.compress_bytes(raw, codec)
    assert len(packed) < len(raw) and A.decompress_bytes(packed, codec) == raw


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
    ]:
        data = torch.tensor(values, dtype=dtype)
        tensors.append(Q.QuantizedTensor(f"x_{dtype}", (2,), dtype, exact, data=data))
    state = Q.QuantizedState(tuple(tensors), cfg)
    _, back = A.decode_parts(A.encode_parts(state, TrialConfig(compress=cfg)))
    before, after = Q.dequantize(state), Q.dequantize(back)
    for name in before:
        assert after[name].dtype == before[name].dtype, name
        assert torch.equal(after[name].view(-1).view(torch.uint8), before[name].view(-1).view(torch.uint8)), name
    assert after["tied"] is after["w"]


# -------------------------------------------------------------------- byte accounting


def test_reported_bytes_are_the_file_and_the_code_files(rich_model: RecurrentLM, tmp_path: Path) -> None:
    config = RICH.replace(codec="zlib", bits=6)
    info = A.save_artifact(rich_model, config, tmp_path / "a.lga")
    root = Path(A.__file__).resolve().parents[2]
    assert info.model_bytes == os.path.getsize(tmp_path / "a.lga")
    assert info.code_bytes == sum(os.path.getsize(root / f) for f in A.CODE_FILES) == A.code_bytes()
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
    assert json.loads(done.stdout) == sorted(A.CODE_FILES)


def test_saving_a_model_that_does_not_match_its_config_fails(rich_model: RecurrentLM, tmp_path: Path) -> None:
    with pytest.raises(A.ArtifactError, match="does not match config"):
        A.save_artifact(rich_model, RICH.replace(d_model=128), tmp_path / "a.lga")
    assert not (tmp_path / "a.lga").exists()


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
    parts = dict.fromkeys(A.PARTS, b"") | {"header": pickle.dumps({"evil": True})}
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


def test_rejects_an_unknown_version_or_codec(good_file: bytes, tmp_path: Path) -> None:
    _rejected(tmp_path, good_file[:4] + b"\x09" + good_file[5:], "version")
    _rejected(tmp_path, good_file[:6] + b"zzzz" + good_file[10:], "unknown codec")


def test_rejects_a_header_whose_slices_lie(good_file: bytes, tmp_path: Path) -> None:
    """A well-formed container and JSON header whose tensor slice lies: caught, not read past."""
    codec, parts = A.unpack_parts(good_file)
    forged = parts | {"header": parts["header"].replace(b'"q":[0,', b'"q":[1,', 1)}
    _rejected(tmp_path, A.pack_parts(forged, codec), "slice")


def test_rejects_a_frame_that_does_not_decompress(tmp_path: Path) -> None:
    payload = b"".join(struct.pack("<I", len(f)) + f for f in (b"not zlib data", *([b""] * (len(A.PARTS) - 1))))
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
    header["digest"] = A.header_digest(header)  # an edit that keeps the digest consistent loads as what it says
    (tmp_path / "resigned.lga").write_bytes(A.pack_parts(parts | {"header": json.dumps(header).encode()}, codec))
    assert A.load_artifact(tmp_path / "resigned.lga").config.refine_cap == 0.75


_BOMB = """
import json, lzma, resource, sys, zlib
import brotli, zstandard
from loopgolf.trial import artifact as A

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
parts = dict.fromkeys(A.PARTS, b"")
header = {"format": A.FORMAT, "version": A.VERSION, "config": {}, "tensors": [],
          "sections": [[s, 1024 if s == "q" else 0] for s in A.SECTIONS]}
parts["header"] = json.dumps(header).encode()
frames = [A.compress_bytes(parts["header"], codec), frame(codec, 1 << 29)] + [b""] * (len(A.PARTS) - 2)
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
