"""Quantization-aware training: the STE and noise transforms, and which layers get one.

    python -m pytest tests/trial/test_qat.py
"""

from __future__ import annotations

import dataclasses

import torch

from loopgolf.trial import qat as QAT
from loopgolf.trial import quantize as Q
from loopgolf.trial.blocks import QATLinear
from tests.conftest import RICH, trained_like


def test_ste_forward_is_the_export_and_gradient_is_identity() -> None:
    w = torch.randn(16, 32, requires_grad=True)
    out = QAT.fake_quantize(w, 5, "ste", 0.0)
    assert torch.equal(out.detach(), Q.quantize_dequantize(w, 5, 0.0))
    (out * torch.arange(32.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(32.0).expand(16, 32))


def test_noise_is_within_half_a_step_and_passes_gradient() -> None:
    w = torch.randn(16, 32, requires_grad=True)
    out = QAT.fake_quantize(w, 4, "noise", 0.0)
    step = Q.row_scales(w, 4, 0.0).float()[:, None]
    assert ((out - w).abs() <= step / 2).all() and not torch.equal(out, w)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    assert QAT.fake_quantize(w, 4, "none", 0.0) is w


def test_install_qat_covers_exactly_the_layers_exported_at_bits() -> None:
    model = trained_like(RICH)
    cfg = dataclasses.replace(RICH.compress, qat="ste", protect=("core.0.*",))
    n = QAT.install_qat(model, cfg)
    plans = {e.name: Q.plan_entry(e, cfg) for e in Q.state_entries(model)}
    expected = {name for name, m in model.named_modules() if isinstance(m, QATLinear)
                and plans[f"{name}.weight"].group == "quantized"}
    got = {name for name, m in model.named_modules() if isinstance(m, QATLinear) and m.weight_transform is not None}
    assert got == expected and n == len(expected) > 0
    assert not any(name.startswith("core.0.") for name in got)
    layer = model.core[1].attn.q
    x = torch.randn(3, RICH.model.d_model)
    with torch.no_grad():
        assert torch.equal(layer(x), x @ Q.quantize_dequantize(layer.weight, cfg.bits, cfg.clip_sigma).T)
    QAT.remove_qat(model)
    assert all(m.weight_transform is None for m in model.modules() if isinstance(m, QATLinear))
    assert QAT.install_qat(model, dataclasses.replace(cfg, qat="none")) == 0


def test_noise_qat_is_off_under_no_grad() -> None:
    model = trained_like(RICH)
    QAT.install_qat(model, dataclasses.replace(RICH.compress, qat="noise"))
    layer = model.core[0].mlp.fc
    x = torch.randn(2, RICH.model.d_model)
    with torch.no_grad():
        assert torch.equal(layer(x), x @ layer.weight.T)
    assert not torch.equal(layer(x).detach(), x @ layer.weight.T)


def test_noise_is_drawn_once_per_model_forward_not_per_pass() -> None:
    """The shared core runs n_passes (+ refinement) times per forward; its noise must not change between."""
    model = trained_like(RICH).train()
    cfg = dataclasses.replace(RICH.compress, qat="noise")
    QAT.install_qat(model, cfg)
    layer = model.core[0].mlp.fc
    transform = layer.weight_transform
    assert transform is not None
    seen: list[torch.Tensor] = []  # the weight each call used (the transform is a pure function of the noise)
    hook = layer.register_forward_hook(lambda m, args, out: seen.append(transform(m.weight).detach()))
    idx = torch.randint(0, RICH.model.vocab_size, (2, RICH.model.seq_len))
    model(idx)
    per_forward = RICH.model.n_passes + RICH.model.refine_passes
    assert len(seen) == per_forward and all(torch.equal(w, seen[0]) for w in seen)
    step = Q.row_scales(layer.weight, cfg.bits, cfg.clip_sigma).float()[:, None]
    assert ((seen[0] - layer.weight).abs() <= step / 2 + 1e-7).all() and not torch.equal(seen[0], layer.weight)
    model(idx)
    assert len(seen) == 2 * per_forward and not torch.equal(seen[per_forward], seen[0])  # a fresh draw next forward
    hook.remove()
    QAT.remove_qat(model)
    noise = transform.noise.clone()
    model(idx)  # the redraw hook left with the transforms
    assert torch.equal(transform.noise, noise)
