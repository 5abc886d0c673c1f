"""Per-row quantization of the trained weights, and the storage plan of each tensor.

Quantization (per tensor, first rule that applies):

1. non-float tensors (integer/bool buffers)        -> stored exactly
2. float buffers (calibrated statistics such as the router threshold, not weights)
                                                    -> stored exactly (fp32)
3. numel <= small_tensor_numel (norm gains, scales, control vectors)
                                                    -> fp16
4. per-pass parameters (phase.*), when per_pass_fp16 -> fp16 ("protected"): their learned
                                                       deviations between passes are smaller
                                                       than a low-bit row step
5. name matches a `protect` glob                   -> fp16 (protect_bits 16), or int8 per row
                                                       clipped at the row max (protect_bits 8)
6. everything else                                 -> int at `bits`, per row, clipped per
                                                       `clip_sigma`

Integer encoding at b bits: each row (each vector along the last dim of a >= 2-D tensor,
i.e. a Linear's output row or an embedding's token row; the whole tensor if 1-D) gets one
scale s = clip / qmax with qmax = 2^(b-1) - 1, and q = clamp(round(w / s), -qmax,
qmax). The clip is k * std(row) when clip_sigma = k > 0 (the challenge records' SDClip:
k is an entropy knob, bits and k trade off as about b - log2 k, and k * std may exceed the
row max, which simply makes the grid coarser); with k = 0 it is the row max |w| (nothing is
clipped). s is stored as fp16, rounded *up* to the next fp16 so that unclipped values keep
|w - q s| <= s / 2 with the stored s. Dequantization is q * s in fp32.

The `pg_int8` recipe stores what the challenge baseline's export stores (train_gpt.py):
non-float tensors exactly; float tensors of <= 65,536 elements as fp32 when their name
holds a control-tensor pattern (attn_scale, mlp_scale, resid_mix, q_gain, skip_weight),
else as fp16; larger ones as int8 per row, clipped at the row's 99.99984th percentile of
|w|, with scale max(clip / 127, 1/127) stored as the nearest fp16 (the 1/127 floor is the
challenge's). Its one difference: a large tensor of more than two dims is quantized per
row here, per tensor there (the baseline has none; only lora phases make them here).

The artifact (artifact.py) stores what `quantize_model` returns; QAT (qat.py) shows
training the same export.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Literal

import torch
from torch import Tensor

from loopgolf.errors import LoopgolfError
from loopgolf.trial.config import CompressConfig

Encoding = Literal["int", "half", "exact"]
PER_PASS_PREFIX = "phase."  # RecurrentLM's per-pass parameters (phase conditioning)


class QuantizeError(LoopgolfError):
    """Weights that cannot be stored: non-finite, or beyond the fp16 range."""


# ------------------------------------------------------------------------ quantization


def qmax(bits: int) -> int:
    """Largest integer level of symmetric b-bit quantization: values lie in [-qmax, qmax]."""
    return (1 << (bits - 1)) - 1


def n_rows(shape: tuple[int, ...]) -> int:
    """Rows of a tensor for per-row scales: every vector along the last dim if >= 2-D
    (a Linear's output rows, an embedding's token rows), else one row for the whole tensor."""
    return math.prod(shape[:-1]) if len(shape) >= 2 else 1


def as_rows(w: Tensor) -> Tensor:
    """The tensor as (rows, cols) in fp32."""
    return w.detach().float().reshape(n_rows(tuple(w.shape)), -1)


def row_scales(w: Tensor, bits: int, clip_sigma: float) -> Tensor:
    """Per-row fp16 scales (rows,): clip / qmax, rounded up to the next representable fp16.

    clip = clip_sigma * std(row) when clip_sigma > 0, else max |w| of the row. Rounding up
    keeps every unclipped value within half a step of its level with the *stored* scale.
    A row whose clip is 0 (all zeros) gets scale 1: every level is then 0, exactly.
    No host sync: this also runs inside every QAT forward.
    """
    rows = as_rows(w)
    clip = clip_sigma * rows.std(dim=1, correction=0) if clip_sigma > 0 else rows.abs().amax(dim=1)
    exact = torch.where(clip > 0, clip / qmax(bits), torch.ones_like(clip))
    half = exact.half()
    # the next fp16 up: for a positive finite fp16, its bit pattern plus one
    up = (half.view(torch.int16) + 1).view(torch.float16)
    return torch.where(half.float() < exact, up, half)


def quantize_rows(w: Tensor, scales: Tensor, bits: int) -> Tensor:
    """Integer levels (rows, cols) int8 of w for the given fp16 row scales."""
    limit = qmax(bits)
    return torch.clamp(torch.round(as_rows(w) / scales.float()[:, None]), -limit, limit).to(torch.int8)


def dequantize_rows(q: Tensor, scales: Tensor, shape: tuple[int, ...]) -> Tensor:
    """fp32 weights of the given shape from levels and fp16 row scales."""
    return (q.float() * scales.float()[:, None]).reshape(shape)


PG_CLIP_QUANTILE = 0.9999984  # the challenge's INT8_CLIP_PERCENTILE, 99.99984
PG_SMALL_NUMEL = 65_536  # its INT8_KEEP_FLOAT_MAX_NUMEL
PG_CONTROL_PATTERNS = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight")


def pg_row_scales(w: Tensor) -> Tensor:
    """The challenge's int8 row scales (rows,) fp16: quantile clip of |w|, floor 1/127."""
    clip = torch.quantile(as_rows(w).abs(), PG_CLIP_QUANTILE, dim=1)
    return (clip / 127.0).clamp_min(1.0 / 127.0).half()


def pg_quantize_rows(w: Tensor, scales: Tensor) -> Tensor:
    """Levels of w clipped at each row's quantile; the fp32 scale before rounding to fp16 divides."""
    rows = as_rows(w)
    clip = torch.quantile(rows.abs(), PG_CLIP_QUANTILE, dim=1)
    exact = (clip / 127.0).clamp_min(1.0 / 127.0)
    clipped = torch.maximum(torch.minimum(rows, clip[:, None]), -clip[:, None])
    return torch.clamp(torch.round(clipped / exact[:, None]), -127, 127).to(torch.int8)


def quantize_dequantize(w: Tensor, bits: int, clip_sigma: float) -> Tensor:
    """w as the artifact will store it (fp32, same shape): the export rule in one call."""
    scales = row_scales(w, bits, clip_sigma)
    return dequantize_rows(quantize_rows(w, scales, bits), scales, tuple(w.shape))


# ---------------------------------------------------------------------- the model's plan


Group = Literal["quantized", "protected", "small", "exact"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one tensor is stored, and which byte-accounting group it falls in."""

    enc: Encoding
    group: Group
    bits: int = 16  # int only
    clip_sigma: float = 0.0  # int only
    pg_clip: bool = False  # int only: the challenge's quantile clip (pg_int8), not clip_sigma


def plan_tensor(
    name: str, numel: int, is_float_param: bool, cfg: CompressConfig, aliases: tuple[str, ...] = ()
) -> Plan:
    """The storage rule for one tensor (the module docstring's table, in order).

    `is_float_param`: a floating-point parameter (not a buffer, not an integer tensor).
    `aliases` are other names of the same tensor (a tied head): protecting any name
    protects the tensor. estimate.py applies the same rule to its analytic inventory.
    """
    if not is_float_param:
        return Plan("exact", "exact")
    if cfg.recipe == "pg_int8":
        if numel > PG_SMALL_NUMEL:
            return Plan("int", "quantized", 8, 0.0, pg_clip=True)
        control = any(p in n for n in (name, *aliases) for p in PG_CONTROL_PATTERNS)
        return Plan("exact", "small") if control else Plan("half", "small")
    if numel <= cfg.small_tensor_numel:
        return Plan("half", "small")
    if cfg.per_pass_fp16 and name.startswith(PER_PASS_PREFIX):
        return Plan("half", "protected")
    if any(fnmatch.fnmatchcase(n, glob) for n in (name, *aliases) for glob in cfg.protect):
        # Protection keeps information, so a protected int8 tensor is never clipped.
        return Plan("half", "protected") if cfg.protect_bits == 16 else Plan("int", "protected", 8, 0.0)
    return Plan("int", "quantized", cfg.bits, cfg.clip_sigma)


@dataclasses.dataclass(frozen=True)
class StateEntry:
    """One state_dict name of a model, with what the plan needs to know about it."""

    name: str
    tensor: Tensor
    is_param: bool
    alias_of: str | None  # set on the second name of a tied tensor
    aliases: tuple[str, ...]  # set on the first: the tensor's other names


def plan_entry(e: StateEntry, cfg: CompressConfig) -> Plan:
    return plan_tensor(e.name, e.tensor.numel(), e.is_param and e.tensor.is_floating_point(), cfg, e.aliases)


def state_entries(model: torch.nn.Module) -> list[StateEntry]:
    """Every state_dict entry, ties resolved.

    A tied weight (the LM head sharing the embedding) appears in the state dict under
    two names but is stored once, under the first; the others become aliases of it.
    """
    params = {id(p) for p in model.parameters()}
    names: dict[int, list[str]] = {}
    state = model.state_dict(keep_vars=True)
    for name, t in state.items():
        names.setdefault(id(t), []).append(name)
    out = []
    for name, t in state.items():
        first, *rest = names[id(t)]
        is_first = name == first
        out.append(StateEntry(name, t, id(t) in params, None if is_first else first, tuple(rest) if is_first else ()))
    return out


# ------------------------------------------------------------------- quantized state


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """One stored tensor: int levels + fp16 row scales, an fp16 copy, or exact bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # the model's dtype, restored on load
    plan: Plan
    q: Tensor | None = None  # int8 (rows, cols), enc "int"
    scales: Tensor | None = None  # fp16 (rows,), enc "int"
    data: Tensor | None = None  # enc "half" (fp16) or "exact" (original dtype), flat
    alias_of: str | None = None  # a tied name: same tensor as `alias_of`


@dataclasses.dataclass(frozen=True)
class QuantizedState:
    """The in-memory artifact: what `save_artifact` writes and `load_artifact` reads back."""

    tensors: tuple[QuantizedTensor, ...]
    compress: CompressConfig

    def counts(self) -> dict[Group, int]:
        """Stored numel per group (tied tensors once)."""
        counts: dict[Group, int] = {"quantized": 0, "protected": 0, "small": 0, "exact": 0}
        for t in self.tensors:
            if t.alias_of is None:
                counts[t.plan.group] += math.prod(t.shape)
        return counts


def quantize_tensor(name: str, t: Tensor, plan: Plan) -> QuantizedTensor:
    shape, dtype = tuple(t.shape), t.dtype
    t = t.detach().cpu()
    if plan.enc == "exact":
        return QuantizedTensor(name, shape, dtype, plan, data=t.reshape(-1).clone())
    if not torch.isfinite(t).all():
        raise QuantizeError(f"{name}: non-finite weights cannot be quantized")
    if plan.enc == "int" and plan.pg_clip:
        scales = pg_row_scales(t)
        stored = QuantizedTensor(name, shape, dtype, plan, q=pg_quantize_rows(t, scales), scales=scales)
    elif plan.enc == "int":
        scales = row_scales(t, plan.bits, plan.clip_sigma)
        stored = QuantizedTensor(name, shape, dtype, plan, q=quantize_rows(t, scales, plan.bits), scales=scales)
    else:
        stored = QuantizedTensor(name, shape, dtype, plan, data=t.reshape(-1).half())
    if not torch.isfinite(stored.scales if stored.scales is not None else stored.data).all():
        raise QuantizeError(f"{name}: weights beyond the fp16 range")
    return stored


def quantize_model(model: torch.nn.Module, cfg: CompressConfig) -> QuantizedState:
    """Quantize every state_dict tensor of `model` by `plan_tensor` (ties stored once)."""
    out: dict[str, QuantizedTensor] = {}
    for e in state_entries(model):
        if e.alias_of is not None:
            out[e.name] = dataclasses.replace(out[e.alias_of], name=e.name, q=None, scales=None, data=None,
                                              alias_of=e.alias_of)
        else:
            out[e.name] = quantize_tensor(e.name, e.tensor, plan_entry(e, cfg))
    return QuantizedState(tuple(out.values()), cfg)


def dequantize_tensor(t: QuantizedTensor) -> Tensor:
    if t.plan.enc == "int":
        assert t.q is not None and t.scales is not None, t.name
        return dequantize_rows(t.q, t.scales, t.shape).to(t.dtype)
    assert t.data is not None, t.name
    return t.data.reshape(t.shape).to(t.dtype)


def dequantize(state: QuantizedState) -> dict[str, Tensor]:
    """A state dict (name -> tensor) of the dequantized weights; tied names share a tensor."""
    out: dict[str, Tensor] = {}
    for t in state.tensors:
        out[t.name] = out[t.alias_of] if t.alias_of is not None else dequantize_tensor(t)
    return out
