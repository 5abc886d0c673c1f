"""The widest model that fits a byte budget, by the analytic estimate (trial/estimate.py).

Heads are derived from width by one function (`derive_heads`); `solve_width` picks the
widest width on the grid whose predicted artifact, with the codec's safety margin, fits.
"""

from __future__ import annotations

from loopgolf.errors import LoopgolfError
from loopgolf.trial.artifact import code_bytes
from loopgolf.trial.config import TrialConfig
from loopgolf.trial.estimate import SAFETY_MARGIN, bytes_with_margin

__all__ = ["BudgetError", "derive_heads", "solve_width", "width_grid"]


class BudgetError(LoopgolfError):
    """No configuration of the requested family fits the byte budget."""


def derive_heads(d_model: int, head_dim: int = 64, kv_ratio: int = 2, min_heads: int = 4) -> tuple[int, int]:
    """(n_heads, n_kv_heads) for a width: the one rule the search spaces use.

    Heads of `head_dim` when that gives at least `min_heads` heads (d_model must then be a
    multiple of head_dim); narrower models keep `min_heads` heads of d_model / min_heads
    (which must be even, for RoPE). KV heads: the divisor of n_heads closest to
    n_heads / kv_ratio (ties to fewer), so GQA groups stay whole.
    """
    if kv_ratio < 1 or min_heads < 1 or head_dim < 2 or head_dim % 2:
        raise ValueError(f"derive_heads: head_dim={head_dim} (even, >= 2), kv_ratio={kv_ratio}, "
                         f"min_heads={min_heads} (>= 1)")
    if d_model >= head_dim * min_heads:
        if d_model % head_dim:
            raise ValueError(f"derive_heads: d_model={d_model}: expected a multiple of head_dim={head_dim}")
        n_heads = d_model // head_dim
    else:
        if d_model % (2 * min_heads):
            raise ValueError(f"derive_heads: d_model={d_model}: expected a multiple of {2 * min_heads} "
                             f"(min_heads={min_heads} heads of even size)")
        n_heads = min_heads
    divisors = [k for k in range(1, n_heads + 1) if n_heads % k == 0]
    n_kv = min(divisors, key=lambda k: (abs(k - n_heads / kv_ratio), k))
    return n_heads, n_kv


def width_grid(head_dim: int = 64, min_heads: int = 4, max_d_model: int = 8192) -> list[int]:
    """Every width `derive_heads` accepts, ascending: multiples of 2 * min_heads below
    head_dim * min_heads, multiples of head_dim from there."""
    narrow = range(2 * min_heads, head_dim * min_heads, 2 * min_heads)
    return [*narrow, *range(head_dim * min_heads, max_d_model + 1, head_dim)]


def solve_width(
    config: TrialConfig,
    byte_budget: int | None = None,
    *,
    head_dim: int = 64,
    min_heads: int = 4,
    margin: float | None = None,
    max_d_model: int = 8192,
) -> TrialConfig:
    """The widest `config` (d_model, heads derived by `derive_heads`) whose predicted
    artifact fits `byte_budget` (default: config's max_artifact_bytes) with the margin.

    Predicted model bytes are multiplied by `margin` (default SAFETY_MARGIN[codec]); code
    bytes are exact. The KV ratio is config's n_heads / n_kv_heads. Raises BudgetError if
    even the narrowest does not fit.
    """
    budget = config.compress.max_artifact_bytes if byte_budget is None else byte_budget
    kv_ratio = max(1, config.model.n_heads // config.model.n_kv_heads)
    code = code_bytes()

    def fitted(d: int) -> tuple[TrialConfig, int]:
        n_heads, n_kv = derive_heads(d, head_dim, kv_ratio, min_heads)
        candidate = config.replace(d_model=d, n_heads=n_heads, n_kv_heads=n_kv)
        return candidate, bytes_with_margin(candidate, margin, code)

    grid = width_grid(head_dim, min_heads, max_d_model)
    for d in reversed(grid):
        candidate, predicted = fitted(d)
        if predicted <= budget:
            return candidate
    _, smallest = fitted(grid[0])
    raise BudgetError(
        f"no width fits {budget:,} bytes: the narrowest, d_model={grid[0]}, is predicted at {smallest:,} bytes "
        f"(model bytes x {SAFETY_MARGIN[config.compress.codec] if margin is None else margin} margin "
        f"+ {code:,} code bytes)"
    )
