"""Quantization-aware training: show training the weights the artifact will store.

A QATLinear (model.py) passes its weight through `weight_transform` in forward;
`install_qat` sets that transform on exactly the layers the export quantizes at
`bits` (quantize.py's plan), and `remove_qat` clears it.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor

from loopgolf.trial.config import CompressConfig
from loopgolf.trial.model import QATLinear, RecurrentLM
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
    """

    bits: int
    mode: str
    clip_sigma: float

    def __call__(self, weight: Tensor) -> Tensor:
        if self.mode == "noise" and not torch.is_grad_enabled():
            return weight
        return fake_quantize(weight, self.bits, self.mode, self.clip_sigma)


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
            module.weight_transform = QatTransform(cfg.bits, cfg.qat, cfg.clip_sigma)
            installed += 1
    return installed


def remove_qat(model: torch.nn.Module) -> None:
    for _, module in _qat_modules(model):
        module.weight_transform = None


def quantized_model(model: RecurrentLM, cfg: CompressConfig) -> RecurrentLM:
    """A copy of `model` with the weights the artifact stores: what loading it gives back."""
    clone = copy.deepcopy(model)
    remove_qat(clone)
    clone.load_state_dict(dequantize(quantize_model(model, cfg)))
    return clone
