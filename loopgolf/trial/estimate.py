"""What a configuration costs before it is trained: params, artifact bytes, FLOPs.

Everything here is analytic and takes milliseconds, so a configuration over the byte cap
can be rejected, or its width solved for an equal-bytes sweep (search_spaces/budget.py),
before a trial starts. The number that counts is still the compressed file
(artifact.py); the prediction is calibrated against it and carries a measured safety
margin.

1. The inventory: the model's state dict (names and shapes) in closed form.
2. Params per storage group, by quantize.py's own `plan_tensor` rule.
3. Bytes: the entropy of Gaussian weights quantized by the export rule, times a measured
   codec overhead, plus measured bytes for scales, fp16 tensors and the header.
4. FLOPs: flops.py's analytic count.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math

import torch

from loopgolf.trial.artifact import MAGIC
from loopgolf.trial.artifact_parts import PARTS
from loopgolf.trial.code_bytes import code_bytes
from loopgolf.trial.config import CompressConfig, ModelConfig, TrialConfig
from loopgolf.trial.flops import flops_per_token
from loopgolf.trial.quantize import n_rows, plan_tensor, qmax

__all__ = [
    "SAFETY_MARGIN",
    "ByteEstimate",
    "ParamCounts",
    "TensorSpec",
    "bytes_with_margin",
    "count_params",
    "estimate_bytes",
    "flops_per_token",
    "inventory",
    "predict_artifact_bytes",
]


# ------------------------------------------------------------------------ 1. inventory


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One state-dict entry of RecurrentLM: name, shape, and whether it is a float parameter."""

    name: str
    shape: tuple[int, ...]
    is_float_param: bool = True

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _block(prefix: str, c: ModelConfig) -> list[TensorSpec]:
    d, kv, h = c.d_model, c.n_kv_heads * c.head_dim, c.mlp_hidden
    shapes = {
        "attn_scale": (d,), "mlp_scale": (d,), "resid_mix": (2, d),
        "attn.q_gain": (c.n_heads,), "attn.q.weight": (d, d), "attn.k.weight": (kv, d), "attn.v.weight": (kv, d),
        "attn.proj.weight": (d, d), "mlp.fc.weight": (h, d), "mlp.proj.weight": (d, h),
    }
    return [TensorSpec(f"{prefix}.{name}", shape) for name, shape in shapes.items()]


def _untied(c: ModelConfig) -> list[TensorSpec]:
    """The per-pass parts partial sharing stores (model.untied_parts): passes 1.. of each core block."""
    if c.share == "all" or c.n_passes == 1:
        return []
    part = "mlp" if c.share == "attn" else "attn"
    specs = []
    for p in range(1, c.n_passes):
        for j in range(c.n_blocks):
            specs += [TensorSpec(f"untied.pass{p}.{j}.{s.name.split('.', 3)[3]}", s.shape)
                      for s in _block(f"x.{j}", c) if s.name.startswith(f"x.{j}.{part}.")]  # fmt: skip
    return specs


def _phase(c: ModelConfig) -> list[TensorSpec]:
    n_index, d = c.n_passes + c.refine_passes, c.d_model
    if c.phase == "scale":
        return [TensorSpec("phase.scale", (n_index, c.n_blocks, d))]
    if c.phase == "embed":
        return [TensorSpec("phase.embed", (n_index, d))]
    if c.phase == "lora":
        r, outs = c.lora_rank, {"q": d, "v": c.n_kv_heads * c.head_dim, "fc": c.mlp_hidden}
        return [
            spec for t, d_out in outs.items() for spec in (
                TensorSpec(f"phase.lora_{t}_a", (n_index, c.n_blocks, r, d)),
                TensorSpec(f"phase.lora_{t}_b", (n_index, c.n_blocks, d_out, r)),
            )
        ]
    return []


def inventory(c: ModelConfig) -> tuple[TensorSpec, ...]:
    """RecurrentLM(c).state_dict() as names and shapes (tests hold the two equal)."""
    specs = [TensorSpec("tok_emb.weight", (c.vocab_size, c.d_model))]
    for part, n in (("prelude", c.n_prelude), ("core", c.n_blocks), ("coda", c.n_coda)):
        specs += [spec for i in range(n) for spec in _block(f"{part}.{i}", c)]
    specs += _untied(c)
    if c.unet_skips and c.effective_depth // 2:
        specs.append(TensorSpec("skip_weights", (c.effective_depth // 2, c.d_model)))
    specs += _phase(c)
    if not c.tie_embeddings:
        specs.append(TensorSpec("lm_head.weight", (c.vocab_size, c.d_model)))
    if c.refine_passes:
        specs.append(TensorSpec("router_threshold", (), is_float_param=False))
    return tuple(specs)


# ------------------------------------------------------------------- 2. param counts


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """Unique parameters, split by how the artifact stores them."""

    total: int  # == RecurrentLM(config).unique_params()
    quantized: int  # int at `bits`
    protected: int  # protect globs, at protect_bits
    small: int  # small tensors, fp16
    quantized_rows: int  # fp16 scales of the int tensors (quantized + protected at int8)
    n_tensors: int  # state-dict entries, buffers included


def count_params(model_cfg: ModelConfig, compress: CompressConfig | None = None) -> ParamCounts:
    """Closed-form params of RecurrentLM(model_cfg), grouped by quantize.py's storage rule."""
    compress = compress or CompressConfig()
    groups = {"quantized": 0, "protected": 0, "small": 0, "exact": 0}
    rows = 0
    specs = inventory(model_cfg)
    for spec in specs:
        plan = plan_tensor(spec.name, spec.numel, spec.is_float_param, compress)
        groups[plan.group] += spec.numel
        if plan.enc == "int":
            rows += n_rows(spec.shape)
    total = groups["quantized"] + groups["protected"] + groups["small"]
    return ParamCounts(total, groups["quantized"], groups["protected"], groups["small"], rows, len(specs))


# ---------------------------------------------------------------------------- 3. bytes
#
# Trained weights of the tiny family, standardized per row, are close to Gaussian (Muon
# and AdamW, 150-200 steps on real text: kurtosis 2.7-3.9, row max / row std within 6%
# of a Gaussian sample's), and the entropy of their quantization levels matches that of
# Gaussian rows quantized by the same rule to within 2.6% in the worst case of the
# calibration grid, 0.5% typically (bench/bench_compress.py --calibrate prints it). So
# the int payload is predicted as
#
#     bytes = sum over int tensors of numel * H(bits, r) / 8 * codec_ratio(codec, bits, H)
#
# where H is the entropy (bits per value) of a standard Gaussian quantized with step
# r / qmax and clamped at +-qmax, and r is the clip in row-std units: clip_sigma when > 0,
# else the expected max |z| of a Gaussian row of that length. codec_ratio (actual codec
# bytes / entropy) is measured; it grows as the entropy falls (zlib's Huffman codes waste
# most on peaked distributions) and is interpolated in H between measured points.


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(x)


@functools.lru_cache(maxsize=4096)
def expected_max_abs_z(n: int) -> float:
    """E[max |z|] over n i.i.d. standard normal values: integral of 1 - (2 Phi(t) - 1)^n."""
    t = torch.linspace(0.0, 12.0, 6001, dtype=torch.float64)
    return float(torch.trapezoid(1.0 - (2.0 * _std_normal_cdf(t) - 1.0) ** n, t))


@functools.lru_cache(maxsize=4096)
def level_entropy(bits: int, r: float) -> float:
    """Entropy in bits of round(z / (r / qmax)) clamped to [-qmax, qmax], z ~ N(0, 1)."""
    limit = qmax(bits)
    step = r / limit
    j = torch.arange(-limit, limit + 1, dtype=torch.float64)
    lo = torch.where(j == -limit, torch.tensor(-math.inf, dtype=torch.float64), (j - 0.5) * step)
    hi = torch.where(j == limit, torch.tensor(math.inf, dtype=torch.float64), (j + 0.5) * step)
    p = _std_normal_cdf(hi) - _std_normal_cdf(lo)
    p = p[p > 0]
    return float(-(p * torch.log2(p)).sum())


def clip_ratio(row_len: int, clip_sigma: float) -> float:
    """The clip in units of the row std: k for SDClip, else a Gaussian row's expected max."""
    return clip_sigma if clip_sigma > 0 else expected_max_abs_z(row_len)


# The tables below were measured by `python bench/bench_compress.py --calibrate`
# (2026-11-22, CPU, torch 2.13): five tiny-family models (d 64-256; tied and untied heads,
# U-Net skips, prelude/coda, phase scale/lora/embed, refinement) trained 150 steps on
# tinyshakespeare (fineweb_1024_bpe tokens) with the trial's own optimizers (Muon +
# AdamW), each quantized at bits {8, 6, 5, 4} x clip_sigma {0, 4, 8, 12.85, 20} and
# compressed with every codec, one kind of content at a time (the file compresses each
# part as its own frame).
#   CODEC_RATIO[codec][bits]: (entropy in bits per level, codec bytes / entropy bytes)
#     points ascending in entropy: the SDClip points, and one row-max point per model.
#   SCALE_BYTES_PER_ROW: the fp16 scale part (byte-shuffled), per row.
#   FP16_BYTES_PER_VALUE: the fp16 part, per value: "matrix" for weights (small matrices,
#     a protected embedding, LoRA factors), "control" for gains, mixes and skip weights.
#   HEADER_BYTES: the compressed JSON header, a + b * (state-dict entries).
CODEC_RATIO: dict[str, dict[int, tuple[tuple[float, float], ...]]] = {
    "zlib": {
        8: (
            (4.715, 1.0929), (5.353, 1.0394), (6.036, 1.0153), (7.036, 1.0071), (7.378, 1.0064), (7.442, 0.9999),
            (7.487, 1.0084), (7.494, 1.01), (7.591, 1.0024),
        ),
        6: (
            (2.704, 1.1649), (3.328, 1.1502), (4.005, 1.1345), (5.002, 1.0657), (5.348, 1.0468), (5.417, 1.0335),
            (5.46, 1.0384), (5.467, 1.033), (5.572, 1.008),
        ),
        5: (
            (1.732, 1.202), (2.313, 1.1785), (2.971, 1.1581), (3.958, 1.1354), (4.304, 1.1232), (4.376, 1.1162),
            (4.418, 1.1202), (4.425, 1.1112), (4.533, 1.0768),
        ),
        4: (
            (0.771, 1.2649), (1.344, 1.199), (1.929, 1.1439), (2.874, 1.0318), (3.215, 1.0226), (3.288, 1.0233),
            (3.329, 1.019), (3.337, 1.0115), (3.447, 0.9928),
        ),
    },
    "lzma": {
        8: (
            (4.715, 1.0209), (5.353, 1.0174), (6.036, 1.0144), (7.036, 1.011), (7.378, 1.0118), (7.442, 1.003),
            (7.487, 1.0137), (7.494, 1.0128), (7.591, 0.9982),
        ),
        6: (
            (2.704, 1.099), (3.328, 1.0523), (4.005, 1.0315), (5.002, 1.0193), (5.348, 1.0185), (5.417, 1.0148),
            (5.46, 1.0201), (5.467, 1.0124), (5.572, 0.9942),
        ),
        5: (
            (1.732, 1.1153), (2.313, 1.1044), (2.971, 1.0691), (3.958, 1.0272), (4.304, 1.0285), (4.376, 1.0278),
            (4.418, 1.0296), (4.425, 1.0202), (4.533, 1.0008),
        ),
        4: (
            (0.771, 1.1599), (1.344, 1.1192), (1.929, 1.0259), (2.874, 1.0109), (3.215, 1.0105), (3.288, 1.0201),
            (3.329, 1.017), (3.337, 1.0113), (3.447, 0.9993),
        ),
    },
    "zstd": {
        8: (
            (4.715, 1.0077), (5.353, 1.0066), (6.036, 1.009), (7.036, 1.0081), (7.378, 1.0049), (7.442, 1.0003),
            (7.487, 1.0078), (7.494, 1.0088), (7.591, 0.9972),
        ),
        6: (
            (2.704, 1.0351), (3.328, 1.0167), (4.005, 1.0124), (5.002, 1.0186), (5.348, 1.0047), (5.417, 1.0087),
            (5.46, 1.0123), (5.467, 1.0249), (5.572, 1.0107),
        ),
        5: (
            (1.732, 1.129), (2.313, 1.0351), (2.971, 1.0262), (3.958, 1.01), (4.304, 1.0074), (4.376, 1.0225),
            (4.418, 1.0166), (4.425, 1.0214), (4.533, 0.986),
        ),
        4: (
            (0.771, 1.1562), (1.344, 1.0709), (1.929, 1.0186), (2.874, 1.0198), (3.215, 1.0296), (3.288, 1.0214),
            (3.329, 1.0195), (3.337, 1.0116), (3.447, 0.99),
        ),
    },
    "brotli": {
        8: (
            (4.715, 0.9991), (5.353, 0.9994), (6.036, 1.0016), (7.036, 1.0012), (7.378, 1.0004), (7.442, 0.9906),
            (7.487, 1.0028), (7.494, 0.9998), (7.591, 0.9907),
        ),
        6: (
            (2.704, 1.01), (3.328, 1.0028), (4.005, 1.0033), (5.002, 1.0013), (5.348, 1.0008), (5.417, 0.9946),
            (5.46, 1.0026), (5.467, 0.9957), (5.572, 0.9783),
        ),
        5: (
            (1.732, 1.0615), (2.313, 1.0156), (2.971, 1.0132), (3.958, 1.0025), (4.304, 1.0008), (4.376, 0.9994),
            (4.418, 1.0037), (4.425, 0.9958), (4.533, 0.9762),
        ),
        4: (
            (0.771, 1.098), (1.344, 1.0253), (1.929, 0.9999), (2.874, 0.9976), (3.215, 0.9988), (3.288, 1.0038),
            (3.329, 1.0047), (3.337, 0.9984), (3.447, 0.9839),
        ),
    },
}
SCALE_BYTES_PER_ROW: dict[str, float] = {"zlib": 1.3418, "lzma": 1.3179, "zstd": 1.3219, "brotli": 1.288}
FP16_BYTES_PER_VALUE: dict[str, dict[str, float]] = {
    "zlib": {"matrix": 1.7174, "control": 1.4717},
    "lzma": {"matrix": 1.696, "control": 1.4402},
    "zstd": {"matrix": 1.6963, "control": 1.4657},
    "brotli": {"matrix": 1.6844, "control": 1.3765},
}
HEADER_BYTES: dict[str, tuple[float, float]] = {
    "zlib": (783.83, 8.98),
    "lzma": (868.18, 5.76),
    "zstd": (843.55, 6.77),
    "brotli": (732.45, 5.7),
}

# Predicted model bytes are multiplied by SAFETY_MARGIN[codec] before comparing with a
# budget. bench/bench_compress.py --check (2026-11-22; the five calibration models x bits
# {8,6,5,4} x five compress settings, 100 files per codec) measured predicted / actual - 1:
#     zlib [-1.2%, +1.6%]   lzma [-1.2%, +5.7%]   zstd [-5.3%, +2.4%]   brotli [-1.3%, +1.5%]
# The extremes are all SDClip k = 12.85 at 4 bits (~1.3 bits per level), where zstd-22's
# output varies by +-5% from model to model (lzma's only upward). Held-out models (other
# seeds and shapes, 60 steps: tests/search_spaces/test_budget.py) stayed within [-1.9%, +2.4%]. The
# margin is the worst under-prediction plus about 1.5% for families the grid did not see.
SAFETY_MARGIN: dict[str, float] = {"zlib": 1.03, "lzma": 1.03, "zstd": 1.07, "brotli": 1.03}


def codec_ratio(codec: str, bits: int, entropy: float) -> float:
    """Measured codec bytes per entropy byte, interpolated in entropy (clamped at the ends)."""
    points = CODEC_RATIO[codec][bits]
    xs = [h for h, _ in points]
    i = bisect.bisect_left(xs, entropy)
    if i == 0:
        return points[0][1]
    if i == len(points):
        return points[-1][1]
    (h0, r0), (h1, r1) = points[i - 1], points[i]
    return r0 + (r1 - r0) * (entropy - h0) / (h1 - h0)


def fp16_kind(name: str) -> str:
    """The fp16 kind of a tensor: weights ("matrix") or gains, mixes and skips ("control")."""
    return "matrix" if name.endswith(".weight") or ".lora_" in name else "control"


@dataclasses.dataclass(frozen=True)
class ByteEstimate:
    """Predicted artifact bytes, by part (floats; `artifact_bytes` rounds the total up)."""

    quantized: float  # int levels of the tensors at `bits`
    protected: float  # protected tensors (int8 levels or fp16)
    scales: float  # fp16 row scales of every int tensor
    small: float  # fp16 small tensors
    exact: float  # exactly stored buffers
    header: float  # JSON header + outer header
    code_bytes: int

    @property
    def model_bytes(self) -> float:
        return self.quantized + self.protected + self.scales + self.small + self.exact + self.header

    @property
    def artifact_bytes(self) -> int:
        return math.ceil(self.model_bytes) + self.code_bytes


def _int_bytes(shape: tuple[int, ...], bits: int, clip_sigma: float, codec: str) -> float:
    entropy = level_entropy(bits, clip_ratio(shape[-1] if shape else 1, clip_sigma))
    return math.prod(shape) * entropy / 8 * codec_ratio(codec, bits, entropy)


def estimate_bytes(config: TrialConfig, code: int | None = None) -> ByteEstimate:
    """Predicted bytes of `config`'s artifact, part by part (see the table comments above)."""
    cc, codec = config.compress, config.compress.codec
    parts = {"quantized": 0.0, "protected": 0.0, "scales": 0.0, "small": 0.0, "exact": 0.0}
    specs = inventory(config.model)
    for spec in specs:
        plan = plan_tensor(spec.name, spec.numel, spec.is_float_param, cc)
        if plan.enc == "int":
            parts[plan.group] += _int_bytes(spec.shape, plan.bits, plan.clip_sigma, codec)
            parts["scales"] += n_rows(spec.shape) * SCALE_BYTES_PER_ROW[codec]
        elif plan.enc == "half":
            parts[plan.group] += spec.numel * FP16_BYTES_PER_VALUE[codec][fp16_kind(spec.name)]
        else:
            parts["exact"] += spec.numel * 4
    a, b = HEADER_BYTES[codec]
    outer = len(MAGIC) + 2 + len(codec) + 8 + 4 * len(PARTS)  # magic, version, codec, length, crc, frame lengths
    header = outer + a + b * len(specs)
    return ByteEstimate(**parts, header=header, code_bytes=code_bytes() if code is None else code)


def predict_artifact_bytes(config: TrialConfig) -> int:
    """Predicted artifact_bytes (model + code) of `config`: the point estimate, no margin."""
    return estimate_bytes(config).artifact_bytes


def bytes_with_margin(config: TrialConfig, margin: float | None = None, code: int | None = None) -> int:
    """Predicted artifact_bytes with the model bytes times the codec's safety margin: what
    `solve_width` holds against a budget."""
    estimate = estimate_bytes(config, code)
    margin = SAFETY_MARGIN[config.compress.codec] if margin is None else margin
    return math.ceil(estimate.model_bytes * margin) + estimate.code_bytes
