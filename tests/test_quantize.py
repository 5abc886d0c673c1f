"""Per-row quantization: the error bound, scale rounding, SDClip, and the plan per tensor.

    python -m pytest tests/test_quantize.py
"""

from __future__ import annotations

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
