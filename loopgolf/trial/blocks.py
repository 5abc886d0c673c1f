"""The model's building blocks: the layers RecurrentLM (model.py) stacks and loops.

The blocks follow the Parameter Golf baseline (train_gpt.py): pre-norm with weightless
RMSNorm, q/k RMS-normalized per head, RoPE on the full head dim, a learned per-head
q gain, grouped K/V heads, a ReLU^2 MLP, zero-initialized output projections, per-block
`attn_scale` / `mlp_scale` / `resid_mix` vectors. The attention strategies a block runs
with (causal over the whole sequence, or over the selected tokens only) are selection.py's.

Phase conditioning (`Phase`, at the end) is what lets pass p of the shared core differ
from pass q.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loopgolf.trial.config import ModelConfig
from loopgolf.trial.selection import Attend

Q_GAIN_INIT = 1.5  # the baseline's per-head query gain


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class QATLinear(nn.Linear):
    """A bias-free linear whose weight may pass through `weight_transform` in forward.

    The trainer installs a fake quantizer there for quantization-aware training; the
    stored weight stays full precision. `lora` adds a low-rank delta x A^T B^T without
    materializing it (phase conditioning, section 2).
    """

    weight_transform: Callable[[Tensor], Tensor] | None

    def __init__(self, in_features: int, out_features: int, *, zero_init: bool = False) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.weight_transform = None
        if zero_init:  # output projections start at zero: every block starts as the identity
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor, lora: tuple[Tensor, Tensor] | None = None) -> Tensor:
        w = self.weight if self.weight_transform is None else self.weight_transform(self.weight)
        y = F.linear(x, w.to(x.dtype))
        if lora is not None:
            a, b = lora
            y = y + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))
        return y


def rope_tables(seq_len: int, head_dim: int, base: float, like: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of shape (seq_len, 1, head_dim / 2): position x frequency (x heads)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=like.device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=like.device), inv_freq)
    return angles.cos()[:, None, :].to(like.dtype), angles.sin()[:, None, :].to(like.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the two halves of the head dim (the baseline's layout); x is (..., heads, head_dim)."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


@dataclasses.dataclass(frozen=True)
class PassCond:
    """What phase conditioning hands one core block for one pass (section 2)."""

    gain: Tensor | None = None  # (d,) multiplies the block's residual updates
    lora_q: tuple[Tensor, Tensor] | None = None  # (A (r, d_in), B (d_out, r))
    lora_v: tuple[Tensor, Tensor] | None = None
    lora_fc: tuple[Tensor, Tensor] | None = None


NO_COND = PassCond()


class Attention(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        kv_dim = c.n_kv_heads * c.head_dim
        self.q = QATLinear(c.d_model, c.d_model)
        self.k = QATLinear(c.d_model, kv_dim)
        self.v = QATLinear(c.d_model, kv_dim)
        self.proj = QATLinear(c.d_model, c.d_model, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((c.n_heads,), Q_GAIN_INIT))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend: Attend, cond: PassCond) -> Tensor:
        q = self.q(x, cond.lora_q).unflatten(-1, (self.n_heads, self.head_dim))
        k = self.k(x).unflatten(-1, (self.n_kv_heads, self.head_dim))
        v = self.v(x, cond.lora_v).unflatten(-1, (self.n_kv_heads, self.head_dim))
        q = apply_rope(rms_norm(q), cos, sin) * self.q_gain.to(q.dtype)[:, None]
        k = apply_rope(rms_norm(k), cos, sin)
        return self.proj(attend(q, k, v).flatten(-2))


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu2": lambda h: torch.relu(h).square(),
    "gelu": F.gelu,
    "silu": F.silu,
}


class MLP(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.fc = QATLinear(c.d_model, c.mlp_hidden)
        self.proj = QATLinear(c.mlp_hidden, c.d_model, zero_init=True)
        self.act = _ACTIVATIONS[c.activation]

    def forward(self, x: Tensor, lora: tuple[Tensor, Tensor] | None = None) -> Tensor:
        return self.proj(self.act(self.fc(x, lora)))


class Block(nn.Module):
    """Pre-norm block; x0 (the normalized embedding) is mixed back in through `resid_mix`.

    Works on any leading shape: (B, T, d) for the base pass, (n, d) for selected tokens.
    """

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.attn = Attention(c)
        self.mlp = MLP(c)
        self.attn_scale = nn.Parameter(torch.ones(c.d_model))
        self.mlp_scale = nn.Parameter(torch.ones(c.d_model))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(c.d_model), torch.zeros(c.d_model))))

    def forward(
        self, x: Tensor, x0: Tensor, cos: Tensor, sin: Tensor, attend: Attend, cond: PassCond = NO_COND,
        own: Untied | None = None,
    ) -> Tensor:
        """`own`: this pass's untied attention or MLP, in place of the block's (share attn / mlp)."""
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        attn_scale, mlp_scale = self.attn_scale, self.mlp_scale
        if cond.gain is not None:
            attn_scale, mlp_scale = attn_scale * cond.gain, mlp_scale * cond.gain
        attn = own if isinstance(own, Attention) else self.attn
        mlp = own if isinstance(own, MLP) else self.mlp
        x = x + attn_scale.to(x.dtype) * attn(rms_norm(x), cos, sin, attend, cond)
        return x + mlp_scale.to(x.dtype) * mlp(rms_norm(x), cond.lora_fc)


Untied = nn.Module  # an Attention or MLP of one (pass, core block): what `share` leaves per pass


def untied_parts(c: ModelConfig) -> nn.ModuleDict:
    """The core's per-pass parts under partial sharing: `pass<p>` (p >= 1) holds, per core block,
    its own MLP (share attn) or attention (share mlp); pass 0 uses the block's. Empty for
    share all, or a core that runs once. State-dict names say the pass: untied.pass1.0.fc.weight."""
    if c.share == "all" or c.n_passes == 1:
        return nn.ModuleDict()
    part = MLP if c.share == "attn" else Attention
    return nn.ModuleDict({f"pass{p}": nn.ModuleList(part(c) for _ in range(c.n_blocks)) for p in range(1, c.n_passes)})


# ---------------------------------------------------------------- phase conditioning


class Phase(nn.Module):
    """Per-pass parameters of the shared core, for pass p in [0, n_passes + refine_passes).

    none:  strict sharing, no parameters.
    scale: a gain vector per (pass, core block) on the block's residual updates; init 1.
    lora:  per (pass, core block) rank-r deltas on q, v and mlp.fc; A small random, B zero.
    embed: a vector per pass added to the residual at the start of the pass; init 0.
    Refinement pass r uses index n_passes + r, so it can learn to act differently.
    """

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.mode = c.phase
        n_index, d = c.n_passes + c.refine_passes, c.d_model
        if self.mode == "scale":
            self.scale = nn.Parameter(torch.ones(n_index, c.n_blocks, d))
        elif self.mode == "embed":
            self.embed = nn.Parameter(torch.zeros(n_index, d))
        elif self.mode == "lora":
            r = c.lora_rank
            for target, d_out in (("q", d), ("v", c.n_kv_heads * c.head_dim), ("fc", c.mlp_hidden)):
                a = torch.randn(n_index, c.n_blocks, r, d) / math.sqrt(d)
                self.register_parameter(f"lora_{target}_a", nn.Parameter(a))
                self.register_parameter(f"lora_{target}_b", nn.Parameter(torch.zeros(n_index, c.n_blocks, d_out, r)))

    def cond(self, p: int, j: int) -> PassCond:
        """Conditioning of core block j in pass p."""
        if self.mode == "scale":
            return PassCond(gain=self.scale[p, j])
        if self.mode == "lora":
            q, v, fc = (self._lora(t, p, j) for t in ("q", "v", "fc"))
            return PassCond(lora_q=q, lora_v=v, lora_fc=fc)
        return NO_COND

    def _lora(self, target: str, p: int, j: int) -> tuple[Tensor, Tensor]:
        return getattr(self, f"lora_{target}_a")[p, j], getattr(self, f"lora_{target}_b")[p, j]

    def start(self, x: Tensor, p: int) -> Tensor:
        """The residual entering pass p."""
        return x + self.embed[p].to(x.dtype) if self.mode == "embed" else x
