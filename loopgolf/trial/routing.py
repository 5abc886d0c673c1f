"""Which tokens a refinement pass spends on: the causal cap, the control arms' selections,
and the search for the threshold that refines a target fraction.

Every arm at one `refine_target` refines the same fraction of tokens, so arms compare at
matched compute:

    routed (entropy, margin, resid_norm, kl)  score > threshold, then the causal cap; the
                                              threshold is an EMA of batch quantiles in
                                              training, set after training from held-out
                                              scores (`threshold_for_fraction`) for evaluation
    stride                                    a fixed causal pattern: refine_target of every
                                              prefix, to rounding
    random                                    i.i.d. at refine_target from a generator seeded
                                              by the trial seed, a fresh draw per batch
    uniform                                   every token: uniform extra depth (fraction 1)

Every selection is causal: whether token t is refined depends on tokens <= t only.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

CAP_EPSILON = 1e-9  # floor(0.3 * 10) must give 3, not 2


def causal_cap(want: Tensor, cap: float) -> Tensor:
    """Admit wanted tokens greedily, left to right, while the running fraction allows it.

    Token t (0-based) is admitted iff want[t] and (admitted before t) + 1 <= cap * (t + 1).
    With budget m_t = floor(cap * (t + 1)) (non-decreasing), the running count follows
    c_t = min(c_{t-1} + want_t, m_t), whose closed form with W = cumsum(want) is
    c_t = W_t + min(0, min_{s<=t} (m_s - W_s)): a prefix cummin, so no loop over T and
    every decision depends only on the prefix. More wanted tokens never admit fewer.
    """
    t1 = torch.arange(1, want.size(-1) + 1, device=want.device, dtype=torch.float64)
    budget = torch.floor(cap * t1 + CAP_EPSILON).long()
    wanted = want.long().cumsum(-1)
    count = wanted + torch.cummin(budget - wanted, dim=-1).values.clamp(max=0)
    return torch.diff(count, dim=-1, prepend=torch.zeros_like(count[..., :1])).bool()


def stride_mask(shape: tuple[int, int], target: float, device: torch.device | None = None) -> Tensor:
    """The `stride` control: t is refined iff floor(target (t+1)) > floor(target t), so every
    prefix of length n refines floor(target n) tokens, evenly spaced."""
    return causal_cap(torch.ones(shape, dtype=torch.bool, device=device), target)


def random_scores(shape: tuple[int, int], seed: int, stream: int, draw: int, device: torch.device) -> Tensor:
    """The `random` control's scores: i.i.d. U(0, 1) per token, draw `draw` of (seed, stream).

    A token is refined when its score exceeds 1 - refine_target. The same (seed, stream,
    draw) gives the same scores on any run; each forward asks for the next draw.
    """
    # One well-mixed 64-bit key per (seed, stream, draw): torch's CPU generator reads only
    # the low 32 bits of a seed, so packing the three into bit fields would collide.
    key = int(np.random.SeedSequence([seed, stream, draw]).generate_state(1, dtype=np.uint64)[0] >> 1)
    gen = torch.Generator(device=device).manual_seed(key)
    return torch.rand(shape, generator=gen, device=device)


def refined_fraction(score: Tensor, threshold: float, cap: float) -> float:
    """Fraction of tokens refined with this threshold: score > threshold, then the causal cap."""
    return float(causal_cap(score > threshold, cap).float().mean())


def threshold_for_fraction(score: Tensor, target: float, cap: float) -> float:
    """The threshold whose refined fraction (after the cap) is nearest `target` on these scores.

    `score` (rows, T) are router scores of held-out windows. The fraction is non-increasing
    in the threshold (the cap admits no fewer tokens from a larger wanted set), so a binary
    search over the distinct scores finds the nearest attainable fraction.
    """
    if score.ndim != 2 or score.numel() == 0:
        shape = tuple(score.shape)
        raise ValueError(f"threshold_for_fraction: score must be a non-empty (rows, T) tensor, got {shape}")
    score = score.double()
    candidates = torch.unique(score)  # ascending; threshold candidates[i] refines scores above it
    lo, hi = 0, candidates.numel() - 1  # the smallest i whose fraction <= target (the max refines none)
    while lo < hi:
        mid = (lo + hi) // 2
        if refined_fraction(score, float(candidates[mid]), cap) <= target:
            hi = mid
        else:
            lo = mid + 1
    best = float(candidates[lo])
    below = float(candidates[lo - 1]) if lo > 0 else float("-inf")  # one step lower refines more
    if abs(refined_fraction(score, below, cap) - target) < abs(refined_fraction(score, best, cap) - target):
        return below
    return best
