"""The control arms' selections and the threshold search for routed signals (routing.py).

Every non-uniform arm at one refine_target must refine that fraction: `stride` exactly
(to rounding) at every prefix, `random` in expectation with a reproducible, fresh draw
per forward, routed signals after calibration on held-out scores.

    python -m pytest tests/trial/test_routing.py
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loopgolf.trial.routing import refined_fraction, stride_mask, threshold_for_fraction
from tests.trial.makers import build, small, tokens


@pytest.mark.parametrize("target", [0.1, 0.25, 0.3, 1 / 3, 0.5, 0.9, 1.0])
def test_stride_refines_the_target_of_every_prefix(target: float) -> None:
    config = small(refine_passes=1, signal="stride", refine_target=target, refine_cap=1.0, seq_len=1000)
    model = build(config).eval()
    refined = model(tokens(config, batch=2)).refined
    assert refined is not None
    counts = refined.long().cumsum(1)
    n = torch.arange(1, config.seq_len + 1)
    assert torch.equal(counts, torch.floor(target * n.double() + 1e-9).long().expand_as(counts))
    assert torch.equal(refined, stride_mask((2, config.seq_len), target))
    assert torch.equal(model(tokens(config, batch=2, seed=5)).refined, refined)  # the same for any tokens


def test_random_draws_are_fresh_per_forward_and_replay_run_to_run() -> None:
    config = small(refine_passes=1, signal="random", refine_target=0.25, refine_cap=0.5, seq_len=256)
    idx = tokens(config, batch=8)

    def masks(seed: int, train: bool, n: int) -> list[torch.Tensor]:
        model = build(config).train(train)
        model.router_seed = seed
        model.threshold_frozen = True
        return [model(idx).refined for _ in range(n)]

    first = masks(seed=7, train=False, n=3)
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])  # fresh per batch
    again = masks(seed=7, train=False, n=3)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # reproducible
    assert not torch.equal(masks(seed=8, train=False, n=1)[0], first[0])  # the trial seed matters
    assert not torch.equal(masks(seed=7, train=True, n=1)[0], first[0])  # training has its own stream
    fraction = torch.stack(first).double().mean().item()
    assert fraction == pytest.approx(0.25, abs=0.02)
    model = build(config).eval()
    model.router_seed = 7
    model(idx)
    model.restart_draws()  # an evaluation starts its draws over
    assert torch.equal(model(idx).refined, first[0])


def test_uniform_refines_every_token_whatever_the_cap() -> None:
    config = small(refine_passes=1, signal="uniform", refine_target=0.1, refine_cap=0.1)
    out = build(config).eval()(tokens(config))
    assert out.refined is not None and out.refined.all() and out.stats.refined_fraction == 1.0


def brute_force_best(score: torch.Tensor, target: float, cap: float) -> float:
    """The smallest |fraction - target| over every threshold that gives a distinct selection."""
    thresholds = [-math.inf, *torch.unique(score).tolist()]
    return min(abs(refined_fraction(score, t, cap) - target) for t in thresholds)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    rows=st.integers(1, 6),
    seq_len=st.integers(1, 80),
    target=st.floats(0.01, 1.0),
    cap_extra=st.floats(0.0, 1.0),
    ties=st.sampled_from([0, 3, 1000]),  # 0: continuous scores; k: k distinct values
    seed=st.integers(0, 2**16),
)
def test_threshold_for_fraction_is_the_nearest_attainable_fraction(
    rows: int, seq_len: int, target: float, cap_extra: float, ties: int, seed: int
) -> None:
    cap = min(1.0, target + cap_extra * (1.0 - target))
    gen = torch.Generator().manual_seed(seed)
    score = torch.rand(rows, seq_len, generator=gen, dtype=torch.float64)
    if ties:
        score = torch.floor(score * ties)
    thr = threshold_for_fraction(score, target, cap)
    got = abs(refined_fraction(score, thr, cap) - target)
    assert got == pytest.approx(brute_force_best(score, target, cap), abs=1e-12)


def test_threshold_for_fraction_with_the_cap_hits_the_target_on_many_tokens() -> None:
    """Skewed scores at T=1024: the cap trims early bursts, the threshold search compensates."""
    gen = torch.Generator().manual_seed(0)
    score = torch.rand(64, 1024, generator=gen) ** 4 + torch.linspace(0.6, 0, 1024)  # early tokens score higher
    thr = threshold_for_fraction(score, 0.25, 0.3)
    assert refined_fraction(score, thr, 0.3) == pytest.approx(0.25, abs=1e-3)
    naive = torch.quantile(score.flatten(), 0.75).item()  # the plain quantile ignores the cap
    assert refined_fraction(score, naive, 0.3) < 0.25 - 0.02


@pytest.mark.parametrize("drift", [-0.05, 0.05])  # entropy falls while a model trains; resid_norm can rise
def test_the_training_threshold_follows_a_drifting_score(drift: float) -> None:
    """Training selects with the threshold of earlier batches: with scores drifting by 0.05 sd a
    step, each batch must still refine the target (0.25) within 0.05, below a cap of 0.5."""
    model = build(small(refine_passes=1, signal="entropy", refine_target=0.25, refine_cap=0.5)).train()
    gen = torch.Generator().manual_seed(0)
    fractions = []
    for step in range(40):
        score = torch.randn(32, 256, generator=gen, dtype=torch.float64) + drift * step
        fractions.append(float(model.select(score).double().mean()))
        model._track_threshold(score)
    assert all(abs(f - 0.25) <= 0.05 for f in fractions[1:]), [round(f, 3) for f in fractions]
