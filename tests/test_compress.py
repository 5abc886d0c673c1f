"""The artifact: quantization error, the container, codecs, save/load roundtrip, byte
accounting, rejection of bad files, and the QAT hooks.

    python -m pytest tests/test_compress.py
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

from loopgolf.errors import LoopgolfError
from loopgolf.trial import compress as C
from loopgolf.trial.config import CompressConfig, TrialConfig, preset
from loopgolf.trial.model import QATLinear, RecurrentLM

CODECS = ("zlib", "lzma", "zstd", "brotli")


def trained_like(config: TrialConfig, seed: int = 0) -> RecurrentLM:
    """A model whose every tensor moved off its init (zero-init projections included)."""
    torch.manual_seed(seed)
    model = RecurrentLM(config.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if config.model.refine_passes:
        model.router_threshold.fill_(1.2345678)  # a calibrated threshold travels exactly
    return model.eval()


# Every tensor kind: prelude/coda, unet skips, lora phase, an untied head, the router buffer;
# a low small-tensor threshold so the block matrices are quantized.
RICH = preset("small").replace(
    d_model=64, n_heads=4, n_kv_heads=2, n_prelude=1, n_coda=1, unet_skips=True, phase="lora",
    tie_embeddings=False, refine_passes=1, small_tensor_numel=2048, seq_len=32,
)


@pytest.fixture(scope="module")
def rich_model() -> RecurrentLM:
    return trained_like(RICH)


# ---------------------------------------------------------------------- quantization


@pytest.mark.parametrize("bits", [8, 6, 5, 4])
def test_unclipped_error_is_at_most_half_a_step(bits: int) -> None:
    torch.manual_seed(bits)
    w = torch.randn(64, 96) * torch.logspace(-4, 1, 64)[:, None]  # rows over five decades
    w[3, 7] = 40.0  # an outlier row
    for clip_sigma in (0.0, 2.5):
        scales = C.row_scales(w, bits, clip_sigma)
        q = C.quantize_rows(w, scales, bits)
        w_hat = C.dequantize_rows(q, scales, tuple(w.shape))
        s = scales.float()[:, None]
        assert scales.dtype == torch.float16 and q.dtype == torch.int8
        assert int(q.abs().max()) <= C.qmax(bits)
        clip = clip_sigma * w.std(dim=1, correction=0, keepdim=True) if clip_sigma else w.abs().amax(1, keepdim=True)
        # the stored (rounded-up) scale clips at s * qmax >= the nominal clip
        assert (s * C.qmax(bits) >= clip).all()
        unclipped = w.abs() <= s * C.qmax(bits)
        err = (w - w_hat).abs()
        bound = s / 2 + torch.finfo(torch.float32).eps * w.abs()  # half a step, plus fp32 rounding of q * s
        assert (err[unclipped] <= bound[unclipped]).all()
        # values beyond the clip land on the outermost level
        assert (q[~unclipped].abs() == C.qmax(bits)).all()
        if clip_sigma == 0.0:
            assert unclipped.all()


def test_scales_round_up_so_the_stored_scale_covers_the_clip() -> None:
    w = torch.randn(32, 50)
    scales = C.row_scales(w, 6, 0.0)
    assert (scales.float() * C.qmax(6) >= w.abs().amax(1)).all()


def test_zero_and_tiny_rows_are_exact_or_bounded() -> None:
    w = torch.zeros(3, 8)
    w[1] = 1e-9  # below fp16's smallest subnormal step
    w_hat = C.quantize_dequantize(w, 6, 0.0)
    assert torch.equal(w_hat[0], w[0])
    assert (w_hat - w).abs().max() <= 6e-8


def test_sdclip_is_an_entropy_knob() -> None:
    """A larger k gives a coarser grid (fewer distinct levels), as the challenge records use it."""
    w = torch.randn(64, 512)
    levels = [C.quantize_rows(w, C.row_scales(w, 6, k), 6).unique().numel() for k in (4.0, 12.85, 20.0)]
    assert levels[0] > levels[1] > levels[2]


@pytest.mark.parametrize(
    ("name", "numel", "is_float_param", "group", "enc", "bits"),
    [
        ("core.0.attn.q.weight", 10_000, True, "quantized", "int", 6),
        ("core.0.attn_scale", 64, True, "small", "half", 16),
        ("router_threshold", 1, False, "exact", "exact", 16),
        ("tok_emb.weight", 10_000, True, "protected", "int", 8),
        ("core.1.mlp.fc.weight", 10_000, True, "protected", "int", 8),
        ("core.0.mlp.fc.weight", 10_000, True, "quantized", "int", 6),
    ],
)
def test_plan_rule_table(name: str, numel: int, is_float_param: bool, group: str, enc: str, bits: int) -> None:
    cfg = CompressConfig(bits=6, small_tensor_numel=1000, protect=("tok_emb.weight", "core.1.*"), protect_bits=8)
    plan = C.plan_tensor(name, numel, is_float_param, cfg)
    assert (plan.group, plan.enc, plan.bits) == (group, enc, bits)


def test_protect_at_16_bits_keeps_fp16_and_a_tied_alias_is_protected_too() -> None:
    cfg = CompressConfig(protect=("lm_head.weight",), protect_bits=16, small_tensor_numel=0)
    assert C.plan_tensor("tok_emb.weight", 100, True, cfg, aliases=("lm_head.weight",)).enc == "half"
    assert C.plan_tensor("tok_emb.weight", 100, True, cfg).enc == "int"


def test_nibble_packing_roundtrips_odd_lengths() -> None:
    q = torch.randint(-7, 8, (3, 5), dtype=torch.int8)
    raw = C._pack_levels(q, 4)
    assert len(raw) == 8
    assert torch.equal(torch.from_numpy(C._unpack_levels(raw, 4, 15).copy()).reshape(3, 5), q)


@pytest.mark.parametrize("codec", CODECS)
def test_codecs_roundtrip_bytes(codec: str) -> None:
    raw = bytes(range(256)) * 40 + b"loopgolf" * 100
    packed = C.compress_bytes(raw, codec)
    assert len(packed) < len(raw) and C.decompress_bytes(packed, codec) == raw


def test_non_finite_weights_are_refused_at_save(tmp_path: Path) -> None:
    model = trained_like(RICH)
    with torch.no_grad():
        model.core[0].mlp.fc.weight[0, 0] = float("nan")
    with pytest.raises(C.ArtifactError, match=r"core\.0\.mlp\.fc\.weight: non-finite"):
        C.save_artifact(model, RICH, tmp_path / "a.lga")


# -------------------------------------------------------------------------- roundtrip


@pytest.mark.parametrize(("codec", "bits"), [("zlib", 8), ("lzma", 6), ("zstd", 5), ("brotli", 4), ("zstd", 6)])
def test_roundtrip_logits_identical_to_in_memory_quantized_model(
    rich_model: RecurrentLM, tmp_path: Path, codec: str, bits: int
) -> None:
    config = RICH.replace(codec=codec, bits=bits, protect=["tok_emb.weight"], protect_bits=8)
    in_memory = C.quantized_model(rich_model, config.compress).eval()
    C.save_artifact(rich_model, config, tmp_path / "a.lga")
    loaded, loaded_config = C.load_artifact_with_config(tmp_path / "a.lga")
    assert loaded_config == config
    x = torch.randint(0, config.model.vocab_size, (2, config.model.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = in_memory(x), loaded(x)
    assert torch.equal(expected.logits, got.logits)
    assert torch.equal(expected.refined, got.refined)
    assert not torch.equal(expected.logits, rich_model(x).logits)  # quantization did something


def test_loaded_state_equals_the_dequantized_state_exactly(rich_model: RecurrentLM, tmp_path: Path) -> None:
    config = RICH.replace(codec="zstd", bits=6, clip_sigma=3.0)
    C.save_artifact(rich_model, config, tmp_path / "a.lga")
    loaded = C.load_artifact(tmp_path / "a.lga").state_dict()
    expected = C.dequantize(C.quantize_model(rich_model, config.compress))
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    assert loaded["router_threshold"].item() == rich_model.router_threshold.item()  # exact, not fp16


def test_exact_dtypes_and_aliases_survive_the_body(tmp_path: Path) -> None:
    cfg = CompressConfig(bits=5, small_tensor_numel=4)
    int_plan, exact = C.Plan("int", "quantized", 5, 0.0), C.Plan("exact", "exact")
    w = torch.randn(6, 7)
    scales = C.row_scales(w, 5, 0.0)
    tensors = [
        C.QuantizedTensor("w", (6, 7), torch.float32, int_plan, q=C.quantize_rows(w, scales, 5), scales=scales),
        C.QuantizedTensor("tied", (6, 7), torch.float32, int_plan, alias_of="w"),
        C.QuantizedTensor("h", (2,), torch.bfloat16, C.Plan("half", "small"), data=torch.tensor([1.5, -2.0]).half()),
    ]
    for dtype, values in [
        (torch.int64, [-(2**40), 3]), (torch.bool, [True, False]), (torch.bfloat16, [1.0, -3.5]),
        (torch.float32, [float("nan"), 1e-30]), (torch.uint8, [0, 255]), (torch.int32, [-7, 2**30]),
    ]:
        data = torch.tensor(values, dtype=dtype)
        tensors.append(C.QuantizedTensor(f"x_{dtype}", (2,), dtype, exact, data=data))
    state = C.QuantizedState(tuple(tensors), cfg)
    _, back = C.decode_parts(C.encode_parts(state, TrialConfig(compress=cfg)))
    before, after = C.dequantize(state), C.dequantize(back)
    for name in before:
        assert after[name].dtype == before[name].dtype, name
        assert torch.equal(after[name].view(-1).view(torch.uint8), before[name].view(-1).view(torch.uint8)), name
    assert after["tied"] is after["w"]


def test_whole_tensor_scale_for_large_1d_tensors() -> None:
    w = torch.randn(5000)
    q = C.quantize_tensor("v", w, C.Plan("int", "quantized", 6, 0.0))
    assert q.scales is not None and q.scales.shape == (1,)


# -------------------------------------------------------------------- byte accounting


def test_reported_bytes_are_the_file_and_the_code_files(rich_model: RecurrentLM, tmp_path: Path) -> None:
    config = RICH.replace(codec="zlib", bits=6)
    info = C.save_artifact(rich_model, config, tmp_path / "a.lga")
    root = Path(C.__file__).resolve().parents[2]
    assert info.model_bytes == os.path.getsize(tmp_path / "a.lga")
    assert info.code_bytes == sum(os.path.getsize(root / f) for f in C.CODE_FILES) == C.code_bytes()
    assert info.artifact_bytes == info.model_bytes + info.code_bytes
    assert info.params == rich_model.unique_params()
    assert info.quantized_params + info.protected_params + info.small_params == info.params
    assert info.fits and info.max_artifact_bytes == config.compress.max_artifact_bytes
    assert "loopgolf/trial/model.py" in C.CODE_FILES and "loopgolf/trial/compress.py" in C.CODE_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["a.lga"]  # no temp file left behind


def test_saving_a_model_that_does_not_match_its_config_fails(rich_model: RecurrentLM, tmp_path: Path) -> None:
    with pytest.raises(C.ArtifactError, match="does not match config"):
        C.save_artifact(rich_model, RICH.replace(d_model=128), tmp_path / "a.lga")
    assert not (tmp_path / "a.lga").exists()


# ------------------------------------------------------------------------- bad files


@pytest.fixture(scope="module")
def good_file(rich_model: RecurrentLM, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("good") / "a.lga"
    C.save_artifact(rich_model, RICH.replace(codec="zlib", bits=6), path)
    return path.read_bytes()


def _rejected(tmp_path: Path, raw: bytes, match: str) -> None:
    path = tmp_path / "bad.lga"
    path.write_bytes(raw)
    with pytest.raises(C.ArtifactError, match=match) as info:
        C.load_artifact(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, LoopgolfError)


def test_rejects_a_torch_save_file(rich_model: RecurrentLM, tmp_path: Path) -> None:
    torch.save(rich_model.state_dict(), tmp_path / "model.pt")
    _rejected(tmp_path, (tmp_path / "model.pt").read_bytes(), "never unpickles")


def test_rejects_a_raw_pickle(tmp_path: Path) -> None:
    _rejected(tmp_path, pickle.dumps({"tok_emb.weight": [1.0]}), "bad magic|never unpickles")


def test_rejects_a_pickled_header_inside_a_valid_container(tmp_path: Path) -> None:
    parts = dict.fromkeys(C.PARTS, b"") | {"header": pickle.dumps({"evil": True})}
    _rejected(tmp_path, C.pack_parts(parts, "zlib"), "header part is not JSON")


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
    codec, parts = C.unpack_parts(good_file)
    forged = parts | {"header": parts["header"].replace(b'"q":[0,', b'"q":[1,', 1)}
    _rejected(tmp_path, C.pack_parts(forged, codec), "slice")


def test_rejects_a_frame_that_does_not_decompress(tmp_path: Path) -> None:
    payload = b"".join(struct.pack("<I", len(f)) + f for f in (b"not zlib data", *([b""] * (len(C.PARTS) - 1))))
    _rejected(tmp_path, C._outer_header("zlib", payload) + payload, "does not decompress")


def test_rejects_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(C.ArtifactError, match="cannot read"):
        C.load_artifact(tmp_path / "nope.lga")


# ------------------------------------------------------------------------------- QAT


def test_ste_forward_is_the_export_and_gradient_is_identity() -> None:
    w = torch.randn(16, 32, requires_grad=True)
    out = C.fake_quantize(w, 5, "ste", 0.0)
    assert torch.equal(out.detach(), C.quantize_dequantize(w, 5, 0.0))
    (out * torch.arange(32.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(32.0).expand(16, 32))


def test_noise_is_within_half_a_step_and_passes_gradient() -> None:
    w = torch.randn(16, 32, requires_grad=True)
    out = C.fake_quantize(w, 4, "noise", 0.0)
    step = C.row_scales(w, 4, 0.0).float()[:, None]
    assert ((out - w).abs() <= step / 2).all() and not torch.equal(out, w)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    assert C.fake_quantize(w, 4, "none", 0.0) is w


def test_install_qat_covers_exactly_the_layers_exported_at_bits(rich_model: RecurrentLM) -> None:
    model = trained_like(RICH)
    cfg = dataclasses.replace(RICH.compress, qat="ste", protect=("core.0.*",))
    n = C.install_qat(model, cfg)
    plans = {e.name: C._plan_entry(e, cfg) for e in C._entries(model)}
    expected = {name for name, m in model.named_modules() if isinstance(m, QATLinear)
                and plans[f"{name}.weight"].group == "quantized"}
    got = {name for name, m in model.named_modules() if isinstance(m, QATLinear) and m.weight_transform is not None}
    assert got == expected and n == len(expected) > 0
    assert not any(name.startswith("core.0.") for name in got)
    layer = model.core[1].attn.q
    x = torch.randn(3, RICH.model.d_model)
    with torch.no_grad():
        assert torch.equal(layer(x), x @ C.quantize_dequantize(layer.weight, cfg.bits, cfg.clip_sigma).T)
    C.remove_qat(model)
    assert all(m.weight_transform is None for m in model.modules() if isinstance(m, QATLinear))
    assert C.install_qat(model, dataclasses.replace(cfg, qat="none")) == 0


def test_noise_qat_is_off_under_no_grad() -> None:
    model = trained_like(RICH)
    C.install_qat(model, dataclasses.replace(RICH.compress, qat="noise"))
    layer = model.core[0].mlp.fc
    x = torch.randn(2, RICH.model.d_model)
    with torch.no_grad():
        assert torch.equal(layer(x), x @ layer.weight.T)
    assert not torch.equal(layer(x).detach(), layer(x).detach())  # fresh noise each training forward
