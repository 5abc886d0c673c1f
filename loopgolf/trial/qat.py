"""Quantization-aware training: show training the weights the artifact will store.

A QATLinear (blocks.py) passes its weight through `weight_transform` in forward;
`install_qat` sets that transform on exactly the layers the export quantizes at
`bits` (quantize.py's plan), and `remove_qat` clears it.

Noise QAT draws the noise of a weight once per model forward, not per call: a shared
core block runs n_passes times in one forward, and the export's rounding error is the
same on every pass, so the noise that stands for it must be too (a forward pre-hook on
the model redraws it).
"""

from __future__ import annotations

import copy
import dataclasses
import weakref

import torch
from torch import Tensor

from loopgolf.trial.blocks import QATLinear
from loopgolf.trial.config import CompressConfig
from loopgolf.trial.model import RecurrentLM
from loopgolf.trial.quantize import (
    as_rows,
    dequantize,
    plan_entry,
    quantize_dequantize,
    quantize_model,
    row_scales,
    state_entries,
)


def fake_quantize(weight: Tensor, bits: int, mode: str, clip_sigma: float = 0.0) -> Tensor:
    """The weight as training should see it under QAT at the export bit width.

    "ste": the exported (quantized-dequantized) weight in the forward pass, identity
    gradient (straight-through). "noise": weight + U(-s/2, s/2) per row, s the row's export
    step (noise sized to int8 hurts an int5 export, so the step is that of `bits`).
    "none": the weight unchanged. Scales come from the detached weight: they are not
    trained through.
    """
    if mode == "none":
        return weight
    if mode == "ste":  # exported value forward (w - w.detach() is exactly 0), gradient 1
        return quantize_dequantize(weight, bits, clip_sigma).to(weight.dtype) + (weight - weight.detach())
    if mode == "noise":
        step = row_scales(weight, bits, clip_sigma).to(weight.dtype)
        noise = (torch.rand(as_rows(weight).shape, device=weight.device, dtype=weight.dtype) - 0.5) * step[:, None]
        return weight + noise.reshape(weight.shape)
    raise ValueError(f"qat mode {mode!r}: expected 'none', 'noise' or 'ste'")


@dataclasses.dataclass(frozen=True)
class QatTransform:
    """A QATLinear's `weight_transform`: fake-quantize at the export bits in forward.

    Noise is a training regularizer, so under torch.no_grad (evaluation) a noise transform
    passes the weight unchanged; an STE transform always shows the exported weight.
    `noise` (mode "noise"): U(-1/2, 1/2) per element in units of the row's export step,
    redrawn in place once per model forward (`redraw_noise`).
    """

    bits: int
    mode: str
    clip_sigma: float
    noise: Tensor | None = None

    def __call__(self, weight: Tensor) -> Tensor:
        if self.mode != "noise":
            return fake_quantize(weight, self.bits, self.mode, self.clip_sigma)
        if not torch.is_grad_enabled() or self.noise is None:
            return weight
        step = row_scales(weight, self.bits, self.clip_sigma).to(weight.dtype)
        return weight + (self.noise.to(weight.dtype) * step[:, None]).reshape(weight.shape)


_REDRAW_HOOKS: weakref.WeakKeyDictionary[torch.nn.Module, object] = weakref.WeakKeyDictionary()


def redraw_noise(model: torch.nn.Module) -> None:
    """A fresh noise draw for every noise-QAT weight of `model` (once per forward)."""
    for _, module in _qat_modules(model):
        t = module.weight_transform
        if isinstance(t, QatTransform) and t.noise is not None:
            t.noise.uniform_(-0.5, 0.5)


def _redraw_before_training_forward(model: torch.nn.Module, args: object) -> None:
    if model.training and torch.is_grad_enabled():
        redraw_noise(model)


def _qat_modules(model: torch.nn.Module) -> list[tuple[str, QATLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QATLinear)]


def install_qat(model: torch.nn.Module, cfg: CompressConfig) -> int:
    """Set `weight_transform` on every QATLinear the export quantizes at `cfg.bits`.

    Protected, small and other tensors are left alone (their export is not `bits`).
    Returns how many modules got a transform; cfg.qat == "none" installs nothing.
    """
    remove_qat(model)
    if cfg.qat == "none":
        return 0
    first = {id(e.tensor): e for e in state_entries(model) if e.alias_of is None}
    installed = 0
    for _, module in _qat_modules(model):
        e = first[id(module.weight)]
        if plan_entry(e, cfg).group == "quantized":
            noise = None
            if cfg.qat == "noise":
                w = module.weight.detach()
                noise = torch.empty(as_rows(w).shape, device=w.device, dtype=torch.float32).uniform_(-0.5, 0.5)
            module.weight_transform = QatTransform(cfg.bits, cfg.qat, cfg.clip_sigma, noise)
            installed += 1
    if cfg.qat == "noise" and installed:
        _REDRAW_HOOKS[model] = model.register_forward_pre_hook(_redraw_before_training_forward)
    return installed


def remove_qat(model: torch.nn.Module) -> None:
    for _, module in _qat_modules(model):
        module.weight_transform = None
    hook = _REDRAW_HOOKS.pop(model, None)
    if hook is not None:
        hook.remove()  # type: ignore[attr-defined]


def quantized_model(model: RecurrentLM, cfg: CompressConfig) -> RecurrentLM:
    """A copy of `model` with the weights the artifact stores: what loading it gives back."""
    clone = copy.deepcopy(model)
    remove_qat(clone)
    clone.load_state_dict(dequantize(quantize_model(model, cfg)))
    return clone
