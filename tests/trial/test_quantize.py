"""Per-row quantization: the error bound, scale rounding, SDClip, and the plan per tensor.

    python -m pytest tests/trial/test_quantize.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loopgolf.trial import quantize as Q
from loopgolf.trial.config import CompressConfig


@pytest.mark.parametrize("bits", [8, 6, 5, 4])
def test_unclipped_error_is_at_most_half_a_step(bits: int) -> None:
    torch.manual_seed(bits)
    w = torch.randn(64, 96) * torch.logspace(-4, 1, 64)[:, None]  # rows over five decades
    w[3, 7] = 40.0  # an outlier row
    for clip_sigma in (0.0, 2.5):
        scales = Q.row_scales(w, bits, clip_sigma)
        q = Q.quantize_rows(w, scales, bits)
        w_hat = Q.dequantize_rows(q, scales, tuple(w.shape))
        s = scales.float()[:, None]
        assert scales.dtype == torch.float16 and q.dtype == torch.int8
        assert int(q.abs().max()) <= Q.qmax(bits)
        clip = clip_sigma * w.std(dim=1, correction=0, keepdim=True) if clip_sigma else w.abs().amax(1, keepdim=True)
        # the stored (rounded-up) scale clips at s * qmax >= the nominal clip
        assert (s * Q.qmax(bits) >= clip).all()
        unclipped = w.abs() <= s * Q.qmax(bits)
        err = (w - w_hat).abs()
        bound = s / 2 + torch.finfo(torch.float32).eps * w.abs()  # half a step, plus fp32 rounding of q * s
        assert (err[unclipped] <= bound[unclipped]).all()
        # values beyond the clip land on the outermost level
        assert (q[~unclipped].abs() == Q.qmax(bits)).all()
        if clip_sigma == 0.0:
            assert unclipped.all()


def test_scales_round_up_so_the_stored_scale_covers_the_clip() -> None:
    w = torch.randn(32, 50)
    scales = Q.row_scales(w, 6, 0.0)
    assert (scales.float() * Q.qmax(6) >= w.abs().amax(1)).all()


def test_zero_and_tiny_rows_are_exact_or_bounded() -> None:
    w = torch.zeros(3, 8)
    w[1] = 1e-9  # below fp16's smallest subnormal step
    w_hat = Q.quantize_dequantize(w, 6, 0.0)
    assert torch.equal(w_hat[0], w[0])
    assert (w_hat - w).abs().max() <= 6e-8


def test_sdclip_is_an_entropy_knob() -> None:
    """A larger k gives a coarser grid (fewer distinct levels), as the challenge records use it."""
    w = torch.randn(64, 512)
    levels = [Q.quantize_rows(w, Q.row_scales(w, 6, k), 6).unique().numel() for k in (4.0, 12.85, 20.0)]
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
        ("phase.lora_fc_b", 10_000, True, "protected", "half", 16),  # per-pass: fp16 by default
        ("phase.embed", 500, True, "small", "half", 16),
    ],
)
def test_plan_rule_table(name: str, numel: int, is_float_param: bool, group: str, enc: str, bits: int) -> None:
    cfg = CompressConfig(bits=6, small_tensor_numel=1000, protect=("tok_emb.weight", "core.1.*"), protect_bits=8)
    plan = Q.plan_tensor(name, numel, is_float_param, cfg)
    assert (plan.group, plan.enc, plan.bits) == (group, enc, bits)


def test_per_pass_parameters_follow_bits_when_per_pass_fp16_is_off() -> None:
    cfg = CompressConfig(bits=4, small_tensor_numel=0, per_pass_fp16=False)
    assert Q.plan_tensor("phase.scale", 10_000, True, cfg) == Q.Plan("int", "quantized", 4, 0.0)
    assert Q.plan_tensor("phase.scale", 10_000, True, CompressConfig(bits=4, small_tensor_numel=0)).enc == "half"


def test_protect_at_16_bits_keeps_fp16_and_a_tied_alias_is_protected_too() -> None:
    cfg = CompressConfig(protect=("lm_head.weight",), protect_bits=16, small_tensor_numel=0)
    assert Q.plan_tensor("tok_emb.weight", 100, True, cfg, aliases=("lm_head.weight",)).enc == "half"
    assert Q.plan_tensor("tok_emb.weight", 100, True, cfg).enc == "int"


def test_whole_tensor_scale_for_large_1d_tensors() -> None:
    w = torch.randn(5000)
    q = Q.quantize_tensor("v", w, Q.Plan("int", "quantized", 6, 0.0))
    assert q.scales is not None and q.scales.shape == (1,)


# ------------------------------------------------------------- scales against an oracle


def _scale_oracle(w: torch.Tensor, bits: int, clip_sigma: float) -> list[float]:
    """Row scales from the docstring's definition, in float64: clip / qmax (population std
    when clip_sigma > 0, else the row max; 1 for a zero clip), rounded up to an fp16."""
    rows = w.double().reshape(-1, w.shape[-1]) if w.dim() >= 2 else w.double().reshape(1, -1)
    out = []
    for row in rows:
        clip = clip_sigma * float(row.std(correction=0)) if clip_sigma > 0 else float(row.abs().max())
        exact = clip / Q.qmax(bits) if clip > 0 else 1.0
        half = np.float16(exact)
        out.append(float(np.nextafter(half, np.float16(np.inf)) if float(half) < exact else half))
    return out


@pytest.mark.parametrize(("bits", "clip_sigma"), [(6, 0.0), (6, 0.5), (6, 2.5), (4, 1.0), (8, 0.0)])
def test_row_scales_equal_the_definition(bits: int, clip_sigma: float) -> None:
    torch.manual_seed(bits)
    w = torch.randn(12, 40) * torch.logspace(-3, 0.5, 12)[:, None]  # clips below and above 1
    w[0] = 0.0
    w[1] = 15.5 * torch.sign(torch.randn(40))  # amax / qmax(6) = 0.5, exactly an fp16: no rounding up
    assert Q.row_scales(w, bits, clip_sigma).tolist() == _scale_oracle(w, bits, clip_sigma)


def test_a_scale_already_an_fp16_is_kept_and_others_go_one_fp16_step_up() -> None:
    w = torch.tensor([[15.5, -3.0], [0.1 * 31, 1.0], [0.0, 0.0]])
    s = Q.row_scales(w, 6, 0.0)
    assert s[0].item() == 0.5  # exact
    above = torch.tensor(0.1, dtype=torch.float32).half()  # 0.1 rounds down in fp16: the scale is the next one
    assert float(above) < 0.1 and s[1] == (above.view(torch.int16) + 1).view(torch.float16)
    assert s[2].item() == 1.0  # an all-zero row


def test_pg_int8_levels_ignore_the_stored_scales_argument() -> None:
    """pg_quantize_rows divides by the unrounded fp32 scale, as the challenge's export does."""
    w = torch.randn(4, 300)
    scales = Q.pg_row_scales(w)
    assert torch.equal(Q.pg_quantize_rows(w, scales), Q.pg_quantize_rows(w, torch.ones_like(scales)))


# ------------------------------------------------------------- ties, groups and dtypes


class _Tied(torch.nn.Module):
    """Two names for one weight (like a tied head), a buffer and an integer buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(40, 30)
        self.head = torch.nn.Linear(30, 40, bias=False)
        self.head.weight = self.emb.weight
        self.gain = torch.nn.Parameter(torch.ones(30))
        self.register_buffer("threshold", torch.tensor([0.25]))
        self.register_buffer("count", torch.tensor([7], dtype=torch.int64))


def test_state_entries_store_a_tied_weight_once_under_its_first_name() -> None:
    entries = {e.name: e for e in Q.state_entries(_Tied())}
    assert list(entries) == ["gain", "threshold", "count", "emb.weight", "head.weight"]  # state_dict order
    assert [(e.alias_of, e.aliases, e.is_param) for e in entries.values()] == [
        (None, (), True), (None, (), False), (None, (), False),
        (None, ("head.weight",), True), ("emb.weight", (), True),
    ]


def test_protecting_the_second_name_of_a_tied_weight_protects_the_stored_tensor() -> None:
    cfg = CompressConfig(bits=6, small_tensor_numel=100, protect=("head.weight",), protect_bits=16)
    state = Q.quantize_model(_Tied(), cfg)
    plans = {t.name: t.plan for t in state.tensors}
    assert plans["emb.weight"] == plans["head.weight"] == Q.Plan("half", "protected")
    stored, tied = (t for t in state.tensors if t.name.endswith(".weight"))
    assert stored.data is not None and tied.data is None and tied.alias_of == "emb.weight"  # stored once
    assert plans["gain"] == Q.Plan("half", "small") and plans["threshold"] == plans["count"] == Q.Plan("exact", "exact")


def test_a_tied_name_is_an_alias_holding_no_data() -> None:
    model = _Tied()
    state = Q.quantize_model(model, CompressConfig(bits=6, small_tensor_numel=100))
    first, tied = state.tensors[3], state.tensors[4]
    assert (tied.name, tied.alias_of, tied.plan, tied.shape) == ("head.weight", "emb.weight", first.plan, (40, 30))
    assert tied.q is None and tied.scales is None and tied.data is None and first.q is not None
    assert state.counts() == {"quantized": 1200, "protected": 0, "small": 30, "exact": 2}  # the tie once
    weights = Q.dequantize(state)
    assert weights["head.weight"] is weights["emb.weight"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("plan", [Q.Plan("int", "quantized", 6, 0.0), Q.Plan("half", "small")])
def test_dequantizing_restores_the_models_dtype(dtype: torch.dtype, plan: Q.Plan) -> None:
    t = torch.randn(8, 16).to(dtype)
    back = Q.dequantize_tensor(Q.quantize_tensor("w", t, plan))
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.allclose(back.double(), t.double(), atol=0.1)


def test_weights_beyond_the_fp16_range_are_refused_with_their_name() -> None:
    with pytest.raises(Q.QuantizeError, match=r"^big: weights beyond the fp16 range$"):
        Q.quantize_tensor("big", torch.full((4,), 1e6), Q.Plan("half", "small"))
    with pytest.raises(Q.QuantizeError, match=r"^bad: non-finite weights cannot be quantized$"):
        Q.quantize_tensor("bad", torch.tensor([1.0, float("inf")]), Q.Plan("half", "small"))


def test_small_tensor_numel_is_the_largest_small_tensor() -> None:
    cfg = CompressConfig(small_tensor_numel=64, bits=6)
    assert Q.plan_tensor("w", 64, True, cfg) == Q.Plan("half", "small")
    assert Q.plan_tensor("w", 65, True, cfg) == Q.Plan("int", "quantized", 6, cfg.clip_sigma)
