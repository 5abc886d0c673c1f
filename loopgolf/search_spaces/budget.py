"""Equal bytes: the configuration that fills a byte budget, by the analytic estimate.

The attention design is held constant across widths, so that width and depth are the
only things a comparison at equal bytes varies: every width has heads of the base
configuration's `head_dim` and the same ratio of query to KV heads (`derive_heads`).
Width therefore moves in steps of whole GQA groups (head_dim x kv_ratio), which is too
coarse to fill a budget; the remainder is filled by the MLP's hidden size, a multiple of
`MLP_STEP`. `solve_width` picks, among the (width, hidden) pairs whose predicted artifact
fills the budget to within `FILL`, the one whose MLP ratio is nearest the base's.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction

from loopgolf.errors import LoopgolfError
from loopgolf.trial.code_bytes import code_bytes
from loopgolf.trial.config import TrialConfig
from loopgolf.trial.estimate import bytes_with_margin

__all__ = [
    "EQUAL_BYTES_MARGIN", "FILL", "MLP_RATIO_BAND", "MLP_STEP", "BudgetError", "Fill",
    "attention_design", "candidates", "derive_heads", "in_ratio_band", "solve_width", "width_grid",
]

MLP_STEP = 32  # MLP hidden sizes are multiples of this (whole tensor-core tiles on GPUs)
FILL = 0.99  # a solved configuration's predicted bytes (with the margin) are in [FILL, 1] x the budget
# Predicted model bytes are multiplied by this before filling: trained for 40 steps, three
# solved models measured 0.4%, 1.3% and 0.4% above their point prediction
# (tests/search_spaces/test_budget.py, 2026-12-02), so filling the point prediction to 99.5% put them
# over the cap; 2% keeps the measured fill just under it.
EQUAL_BYTES_MARGIN = 1.02
# The MLP ratio (hidden / width) of a solved shape stays within this factor of the base's when
# any width allows it: at small caps the finest byte steps are at the narrowest widths, and
# filling to 1% there gave d_model 32 with a 59x MLP, a shape nobody would train. The price,
# at caps of 0.5-1 MB only: a few deep families fill 94-98% instead of 99% (16 MB: unchanged).
MLP_RATIO_BAND = 4.0


class BudgetError(LoopgolfError):
    """No configuration of the requested family fits the byte budget."""


def attention_design(config: TrialConfig) -> tuple[int, int]:
    """(head_dim, kv_ratio) of a configuration: what equal-bytes widths hold fixed."""
    m = config.model
    return m.head_dim, m.n_heads // m.n_kv_heads


def derive_heads(d_model: int, head_dim: int, kv_ratio: int) -> tuple[int, int]:
    """(n_heads, n_kv_heads) of width `d_model` with exactly `kv_ratio` query heads per KV
    head, and heads of `head_dim` when d_model is a multiple of head_dim x kv_ratio (every
    width of `width_grid`). A hand-picked width off that grid gets the largest even head
    size below head_dim that divides it, so the query-to-KV ratio is never given up."""
    if head_dim < 2 or head_dim % 2 or kv_ratio < 1:
        raise ValueError(f"derive_heads: head_dim={head_dim}, kv_ratio={kv_ratio}: expected an even head_dim >= 2 "
                         "and kv_ratio >= 1")
    for size in range(head_dim, 1, -2):
        if d_model % (size * kv_ratio) == 0:
            n_heads = d_model // size
            return n_heads, n_heads // kv_ratio
    raise ValueError(f"derive_heads: d_model={d_model}: expected a multiple of 2 x kv_ratio = {2 * kv_ratio} "
                     f"(even heads, {kv_ratio} query heads per KV head)")


def width_grid(head_dim: int, kv_ratio: int, max_d_model: int = 8192) -> list[int]:
    """Every width `derive_heads` accepts up to max_d_model, ascending."""
    group = head_dim * kv_ratio
    return list(range(group, max_d_model + 1, group))


@dataclasses.dataclass(frozen=True)
class Fill:
    """One candidate of the solver: a width, its MLP size and predicted bytes."""

    config: TrialConfig
    predicted: int

    @property
    def mlp_ratio(self) -> Fraction:
        """MLP hidden size / d_model, exact: shapes equally near a ratio tie exactly."""
        return Fraction(self.config.model.mlp_hidden, self.config.model.d_model)


def ratio_factor(ratio: Fraction, base: Fraction) -> Fraction:
    """How far `ratio` is from `base`, as a factor either way (1 when equal)."""
    quotient = ratio / base
    return max(quotient, 1 / quotient)


def _at(config: TrialConfig, d: int, hidden: int, design: tuple[int, int]) -> TrialConfig:
    n_heads, n_kv = derive_heads(d, *design)
    return config.replace(d_model=d, n_heads=n_heads, n_kv_heads=n_kv, mlp_dim=hidden)


def _widest_mlp(config: TrialConfig, d: int, budget: int, margin: float, code: int,
                design: tuple[int, int]) -> Fill | None:
    """The largest MLP (a multiple of MLP_STEP) at width d that fits; None if none does.

    Bytes grow with the hidden size once the MLP matrices are quantized (below
    small_tensor_numel they are fp16, and larger per value), almost linearly (the clip
    of a row grows with its length): a secant guess, a gallop and a bisection find it.
    """

    def predicted(steps: int) -> int:
        return bytes_with_margin(_at(config, d, steps * MLP_STEP, design), margin, code)

    first = 1 + config.compress.small_tensor_numel // (d * MLP_STEP)  # the first quantized MLP
    if predicted(first) > budget:
        fits = [s for s in range(1, first) if predicted(s) <= budget]
        return Fill(_at(config, d, fits[-1] * MLP_STEP, design), predicted(fits[-1])) if fits else None
    probe = first + max(1, d // MLP_STEP)
    slope = max(1.0, (predicted(probe) - predicted(first)) / (probe - first))
    guess = first + int((budget - predicted(first)) // slope)
    if predicted(guess) <= budget:  # gallop up from the guess, then bisect
        lo, hi, delta = guess, None, 1
        while hi is None:
            lo, hi = (lo + delta, None) if predicted(lo + delta) <= budget else (lo, lo + delta)
            delta *= 2
    else:
        lo, hi, delta = None, guess, 1
        while lo is None:
            below = max(first, hi - delta)
            lo, hi = (below, hi) if predicted(below) <= budget else (None, below)
            delta *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if predicted(mid) <= budget else (lo, mid)
    return Fill(_at(config, d, lo * MLP_STEP, design), predicted(lo))


def candidates(config: TrialConfig, budget: int, *, margin: float = EQUAL_BYTES_MARGIN,
               max_d_model: int = 8192) -> list[Fill]:
    """For each width of the grid at which anything fits, the widest MLP that fits."""
    design, code = attention_design(config), code_bytes()
    fills = []
    for d in width_grid(*design, max_d_model):
        fill = _widest_mlp(config, d, budget, margin, code, design)
        if fill is None:  # bytes grow with width: no wider one fits either
            break
        fills.append(fill)
    return fills


def solve_width(config: TrialConfig, byte_budget: int | None = None, *, margin: float = EQUAL_BYTES_MARGIN,
                max_d_model: int = 8192) -> TrialConfig:
    """`config` at the width and MLP size that fill `byte_budget` (default: its
    max_artifact_bytes) to within FILL, with the MLP ratio nearest the base's.

    Only shapes whose MLP ratio is within MLP_RATIO_BAND of the base's compete, when any
    fits. Predicted model bytes are multiplied by `margin` (EQUAL_BYTES_MARGIN; 1 fills the
    point estimate); code bytes are exact. If no pair reaches FILL, the fullest is
    returned. Raises BudgetError if nothing fits.
    """
    budget = config.compress.max_artifact_bytes if byte_budget is None else byte_budget
    fills = candidates(config, budget, margin=margin, max_d_model=max_d_model)
    if not fills:
        head_dim, kv_ratio = attention_design(config)
        narrowest = _at(config, head_dim * kv_ratio, MLP_STEP, (head_dim, kv_ratio))
        raise BudgetError(
            f"no width fits {budget:,} bytes: the narrowest, d_model={narrowest.model.d_model} with a "
            f"{MLP_STEP}-wide MLP, is predicted at {bytes_with_margin(narrowest, margin):,} bytes"
        )
    ratio = Fraction(config.model.mlp_hidden, config.model.d_model)
    fills = in_ratio_band(fills, ratio) or fills
    full = [f for f in fills if f.predicted >= FILL * budget]
    if not full:
        return max(fills, key=lambda f: f.predicted).config
    return min(full, key=lambda f: (ratio_factor(f.mlp_ratio, ratio), -f.config.model.d_model)).config


def in_ratio_band(fills: list[Fill], ratio: Fraction | float) -> list[Fill]:
    """The candidates whose MLP ratio is within MLP_RATIO_BAND of `ratio`."""
    return [f for f in fills if ratio_factor(f.mlp_ratio, Fraction(ratio)) <= MLP_RATIO_BAND]
