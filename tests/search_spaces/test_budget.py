"""Equal bytes: heads from width with a fixed attention design, and the (width, MLP size)
pair that fills a byte budget to 1% predicted and 2% after real compression.

    python -m pytest tests/search_spaces/test_budget.py
"""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction
from pathlib import Path

import pytest

from loopgolf.search_spaces import budget as budget_module
from loopgolf.search_spaces import spaces
from loopgolf.search_spaces.budget import (
    EQUAL_BYTES_MARGIN,
    FILL,
    MLP_RATIO_BAND,
    MLP_STEP,
    BudgetError,
    _at,
    _widest_mlp,
    attention_design,
    candidates,
    derive_heads,
    in_ratio_band,
    ratio_factor,
    solve_width,
    width_grid,
)
from loopgolf.trial.code_bytes import code_bytes
from loopgolf.trial.config import ModelConfig, TrialConfig, preset
from loopgolf.trial.estimate import bytes_with_margin, count_params, predict_artifact_bytes
from loopgolf.trial.train import run_trial

# ------------------------------------------------------------------------ heads


@pytest.mark.parametrize(("head_dim", "kv_ratio"), list(itertools.product((16, 32, 64), (1, 2, 4))))
def test_every_grid_width_keeps_head_dim_and_ratio(head_dim: int, kv_ratio: int) -> None:
    for d in width_grid(head_dim, kv_ratio, 2048):
        n_heads, n_kv = derive_heads(d, head_dim, kv_ratio)
        config = ModelConfig(d_model=d, n_heads=n_heads, n_kv_heads=n_kv)  # validates
        assert (config.head_dim, n_heads // n_kv, n_heads % n_kv) == (head_dim, kv_ratio, 0)


def test_prime_head_counts_keep_their_kv_heads() -> None:
    # 13 and 29 heads: before, the nearest divisor made them one KV head (MQA).
    assert derive_heads(13 * 64, 64, 1) == (13, 13)
    assert derive_heads(29 * 2 * 32, 32, 2) == (58, 29)
    with pytest.raises(ValueError, match="expected an even head_dim"):
        derive_heads(96, 3, 1)
    with pytest.raises(ValueError, match="expected a multiple of 2 x kv_ratio = 4"):
        derive_heads(90, 32, 2)


@pytest.mark.parametrize("kv_ratio", [1, 2, 4])
def test_widths_off_the_grid_keep_the_ratio_with_smaller_heads(kv_ratio: int) -> None:
    for d in range(2 * kv_ratio, 1025, 2 * kv_ratio):
        n_heads, n_kv = derive_heads(d, 64, kv_ratio)
        config = ModelConfig(d_model=d, n_heads=n_heads, n_kv_heads=n_kv)  # validates
        assert n_heads == kv_ratio * n_kv and config.head_dim <= 64
        assert (config.head_dim == 64) == (d % (64 * kv_ratio) == 0)
        # the largest even head size that keeps the ratio
        assert not any(d % (h * kv_ratio) == 0 for h in range(config.head_dim + 2, 65, 2))


# ------------------------------------------------------------------------ solver


def _brute_force(config: TrialConfig, budget: int) -> dict[int, int]:
    """Reference: for each width, every MLP size up to the first that is over the budget
    with its matrices quantized (below that they are fp16, and bytes do not grow with size)."""
    head_dim, kv_ratio = attention_design(config)
    best = {}
    for d in width_grid(head_dim, kv_ratio, 4096):
        n_heads, n_kv = derive_heads(d, head_dim, kv_ratio)
        at = config.replace(d_model=d, n_heads=n_heads, n_kv_heads=n_kv)
        fits, hidden = [], MLP_STEP
        while True:
            over = bytes_with_margin(at.replace(mlp_dim=hidden), EQUAL_BYTES_MARGIN) > budget
            if over and hidden * d > config.compress.small_tensor_numel:
                break
            fits += [] if over else [hidden]
            hidden += MLP_STEP
        if not fits:
            break
        best[d] = fits[-1]
    return best


def test_candidates_are_the_widest_mlp_at_every_width() -> None:
    rng = random.Random(0)
    for _ in range(6):
        config = preset(rng.choice(["tiny", "small", "middle_loop"])).replace(
            bits=rng.choice([4, 5, 6, 8]), codec=rng.choice(["zlib", "lzma", "zstd", "brotli"]),
            n_blocks=rng.choice([1, 2, 3]), phase=rng.choice(["none", "scale", "lora"]),
            tie_embeddings=rng.random() < 0.7, unet_skips=rng.random() < 0.3)
        budget = code_bytes() + rng.randrange(100_000, 400_000)
        found = {f.config.model.d_model: f.config.model.mlp_hidden for f in candidates(config, budget)}
        assert found == _brute_force(config, budget), config


def _space_configs(base: TrialConfig) -> list[TrialConfig]:
    space = spaces.named_space("shared_vs_unique")
    names = [n for n in space if n != "d_model"]  # solved
    values = itertools.product(*(space[n].values for n in names))
    return [base.replace(**dict(zip(names, combo, strict=True))) for combo in values]


@pytest.mark.parametrize("cap", [500_000, 1_000_000, 16_000_000])
@pytest.mark.parametrize("bits_codec", [(6, "lzma"), (8, "zlib")])
def test_equal_bytes_fills_the_shared_vs_unique_space(cap: int, bits_codec: tuple[int, str]) -> None:
    bits, codec = bits_codec
    base = preset("small").replace(bits=bits, codec=codec)
    solved: dict[tuple, TrialConfig] = {}  # solve each inventory once: n_passes changes it only with untied parts
    for config in _space_configs(base):
        m = config.model
        untied = m.share != "all" and m.n_passes > 1
        if untied and (m.n_passes != 4 or cap > 1_000_000):  # the most untied copies, at the caps where they
            continue  # bind; test_share.py solves a 3-pass shape per mode at 1 MB and 16 MB
        key = (m.n_blocks, m.n_prelude, m.n_coda, m.share if untied else "all", m.n_passes if untied else 1)
        if key not in solved:
            solved[key] = spaces.derive(config.to_flat(), base, equal_bytes=True, byte_budget=cap)
    # Partial sharing stores a copy per pass: at a small cap the deepest such shapes fit at no
    # width, and derive gives them the narrowest (rejected before training, never trained).
    unfit = {key for key, c in solved.items() if c.model.mlp_dim == 0}
    for key in unfit:
        assert key[3] != "all" and bytes_with_margin(solved[key], EQUAL_BYTES_MARGIN) > cap, key
    solved = {key: c for key, c in solved.items() if key not in unfit}
    fills = {key: bytes_with_margin(c, EQUAL_BYTES_MARGIN) / cap for key, c in solved.items()}
    for key, config in solved.items():
        m = config.model
        assert (m.head_dim, m.n_heads // m.n_kv_heads) == attention_design(base), key
        assert m.mlp_hidden % MLP_STEP == 0 and m.mlp_hidden == m.mlp_dim
    assert all(f <= 1.0 for f in fills.values())
    short = {k: round(f, 4) for k, f in fills.items() if f < FILL}
    # The lattice (whole GQA groups x MLP steps of 32) is too coarse for a few deep
    # families at 1 MB (8 unique blocks: one MLP step of 32 costs ~2-6% of the cap):
    # there the solver must return the fullest pair there is, and no pair may reach FILL.
    ratio = Fraction(base.model.mlp_hidden, base.model.d_model)
    for key, config in solved.items():  # a shape in the MLP-ratio band whenever the band holds one
        band = in_ratio_band(candidates(config, cap), ratio)
        solved_ratio = Fraction(config.model.mlp_hidden, config.model.d_model)
        assert not band or ratio_factor(solved_ratio, ratio) <= MLP_RATIO_BAND, key
        if key in short:
            best = max(f.predicted for f in band or candidates(config, cap))
            assert best < FILL * cap and bytes_with_margin(config, EQUAL_BYTES_MARGIN) == best, key
    print(f"cap {cap:,}: fills {min(fills.values()):.4f}-{max(fills.values()):.4f}; below {FILL}: {short}; "
          f"fit at no width: {len(unfit)}")


def test_the_mlp_ratio_stays_near_the_bases_when_it_can() -> None:
    base = preset("small")  # MLP 2x
    solved = solve_width(base.replace(n_blocks=3), 4_000_000)
    ratios = sorted(ratio_factor(f.mlp_ratio, Fraction(2)) for f in candidates(base.replace(n_blocks=3), 4_000_000)
                    if f.predicted >= FILL * 4_000_000)
    solved_ratio = Fraction(solved.model.mlp_hidden, solved.model.d_model)
    assert len(ratios) > 1 and ratio_factor(solved_ratio, Fraction(2)) == ratios[0]


def test_mlp_dim_sets_the_hidden_size_and_the_param_count() -> None:
    config = ModelConfig(d_model=128, n_heads=4, n_kv_heads=2, n_blocks=2, mlp_dim=96)
    plain = ModelConfig(d_model=128, n_heads=4, n_kv_heads=2, n_blocks=2)
    assert config.mlp_hidden == 96 and plain.mlp_hidden == 256
    assert count_params(plain).total - count_params(config).total == 2 * 2 * 128 * (256 - 96)


def test_solve_width_says_when_nothing_fits() -> None:
    with pytest.raises(BudgetError, match=r"narrowest, d_model=64 with a 32-wide MLP, is predicted at [\d,]+ bytes"):
        solve_width(preset("small"), code_bytes() + 1_000)


# ------------------------------------------------------------ measured after training


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shape", "cap"),
    [({"n_blocks": 1, "n_passes": 3, "bits": 6, "codec": "lzma"}, 400_000),
     ({"n_blocks": 3, "n_passes": 1, "n_prelude": 1, "bits": 8, "codec": "zlib"}, 400_000),
     ({"n_blocks": 2, "n_passes": 2, "refine_passes": 1, "bits": 5, "codec": "brotli"}, 600_000)],
)
def test_trained_equal_bytes_models_fill_within_2_percent(
    shape: dict[str, object], cap: int, challenge_data: Path, tmp_path: Path
) -> None:
    """In the regime the byte prediction is calibrated for: real text in the challenge's
    tokenizer, 150 training steps. Outside it the prediction drifts, measured 2026-12-03 on
    the first shape (d192, MLP 224): +2.9% after 40 steps (weights still near their uniform
    init), and -2.6% after 150 steps on the suite's built-in corpus and tokenizer."""
    base = preset("small").replace(seq_len=128, batch_size=8, train_seconds=600.0, max_steps=150, eval_tokens=4096,
                                   max_artifact_bytes=cap, **shape)
    config = solve_width(base, cap)
    # At a 400 kB cap one 32-wide MLP step is 2-6% of the cap, so the [0.99, 1] fill is not always
    # reachable here (it is checked over whole spaces at 1 MB and 16 MB above): the solver's pair
    # fits, and one more MLP step would not.
    assert bytes_with_margin(config, EQUAL_BYTES_MARGIN) / cap <= 1.0
    wider_mlp = config.replace(mlp_dim=config.model.mlp_hidden + 32)
    assert bytes_with_margin(wider_mlp, EQUAL_BYTES_MARGIN) / cap > 1.0
    predicted = predict_artifact_bytes(config) / cap
    metrics = run_trial(config, challenge_data, tmp_path / "t")
    assert metrics["status"] == "complete", metrics.get("error")
    assert metrics["byte_fill"] == metrics["artifact_bytes"] / cap
    print(f"{shape} cap {cap:,}: d={config.model.d_model} mlp={config.model.mlp_hidden} "
          f"predicted fill {predicted:.4f}, measured {metrics['byte_fill']:.4f}")
    assert abs(metrics["byte_fill"] - predicted) <= 0.02, (predicted, metrics["byte_fill"])
    assert metrics["byte_fill"] <= 1.0 and metrics["feasible"]  # under the cap


# ------------------------------------------------------------------------ edges


def test_derive_heads_bounds_and_the_grids_last_width() -> None:
    assert derive_heads(8, 2, 1) == (4, 4)  # the smallest head size is allowed
    assert derive_heads(2 * 67, 64, 1) == (67, 67)  # only heads of 2 divide 134
    for head_dim, kv_ratio in ((0, 1), (1, 1), (64, 0)):
        with pytest.raises(ValueError, match=rf"^derive_heads: head_dim={head_dim}, kv_ratio={kv_ratio}: expected "
                                             r"an even head_dim >= 2 and kv_ratio >= 1$"):
            derive_heads(128, head_dim, kv_ratio)
    assert width_grid(16, 2, 96) == [32, 64, 96] and width_grid(16, 2, 95) == [32, 64]


def test_a_fill_reports_its_mlp_ratio() -> None:
    fill = candidates(preset("tiny"), code_bytes() + 300_000)[0]
    assert fill.mlp_ratio * fill.config.model.d_model == fill.config.model.mlp_hidden  # exact, not a float


def test_the_budget_defaults_to_the_configs_cap() -> None:
    base = preset("small").replace(n_blocks=2, max_artifact_bytes=code_bytes() + 500_000)
    assert solve_width(base) == solve_width(base, code_bytes() + 500_000)
    assert solve_width(base) != solve_width(base, code_bytes() + 250_000)


def test_the_solver_uses_the_margin_it_is_given() -> None:
    base = preset("small").replace(n_blocks=2)
    budget = code_bytes() + 400_000
    for margin in (1.0, 1.1):
        for fill in candidates(base, budget, margin=margin, max_d_model=256):
            assert fill.predicted == bytes_with_margin(fill.config, margin) <= budget
            wider = fill.config.replace(mlp_dim=fill.config.model.mlp_hidden + MLP_STEP)
            assert bytes_with_margin(wider, margin) > budget
        assert max(f.config.model.d_model for f in candidates(base, budget, margin=margin, max_d_model=256)) <= 256


def test_solver_edges_the_fullest_pair_below_fill_the_ratio_rule_and_the_width_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    deep = preset("small").replace(n_blocks=8)
    with monkeypatch.context() as patch:
        # code bytes fixed at 50 kB: mutation testing's rewritten sources are far larger, and 1% of
        # a budget holding them is more than one MLP step, so no budget would be short of FILL
        patch.setattr(budget_module, "code_bytes", lambda: 50_000)
        budgets = (50_000 + extra for extra in range(450_000, 1_500_000, 25_000))
        fills, budget = next((c, b) for b in budgets
                             if (c := candidates(deep, b)) and max(f.predicted for f in c) < FILL * b)
        # the lattice is too coarse for 8 unique blocks there: the fullest pair, short of FILL
        assert solve_width(deep, budget) == max(fills, key=lambda f: f.predicted).config
    base = preset("small").replace(n_blocks=3)  # MLP 2x; several pairs reach FILL at 4 MB
    solved = solve_width(base, 4_000_000)
    full = [f for f in candidates(base, 4_000_000) if f.predicted >= FILL * 4_000_000]
    assert bytes_with_margin(solved, EQUAL_BYTES_MARGIN) >= FILL * 4_000_000
    nearest = min(ratio_factor(f.mlp_ratio, Fraction(2)) for f in full)
    assert ratio_factor(Fraction(solved.model.mlp_hidden, solved.model.d_model), Fraction(2)) == nearest
    assert max(f.config.model.d_model for f in candidates(base, 4_000_000, max_d_model=128)) == 128
    assert solve_width(base, 4_000_000, max_d_model=128).model.d_model <= 128
    narrowest = preset("small").replace(d_model=64, n_heads=2, n_kv_heads=1, mlp_dim=MLP_STEP)  # head_dim 32, GQA 2
    predicted = f"{bytes_with_margin(narrowest, 1.0):,}"
    with pytest.raises(BudgetError, match=rf"is predicted at {predicted} bytes$"):
        solve_width(preset("small"), code_bytes() + 1_000, margin=1.0)


@pytest.mark.parametrize(("n_blocks", "cap"), [(1, 2_000_000), (3, 2_000_000), (1, 8_000_000), (2, 8_000_000)])
def test_the_solver_picks_the_nearest_mlp_ratio_among_full_pairs(
    n_blocks: int, cap: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rule, from its statement: among the pairs in the ratio band that reach FILL, the
    MLP ratio nearest the base's (as a factor, either way). Cases where the fullest pair is
    not the nearest. Code bytes are fixed at 50 kB so the cases hold whatever the sources
    weigh (mutation testing rewrites them far larger)."""
    monkeypatch.setattr(budget_module, "code_bytes", lambda: 50_000)
    base = preset("small").replace(n_blocks=n_blocks)  # MLP 2x
    fills = candidates(base, cap)
    band = [f for f in fills if Fraction(1, 4) <= f.mlp_ratio / 2 <= 4] or fills  # MLP_RATIO_BAND = 4
    full = [f for f in band if f.predicted >= FILL * cap]
    assert MLP_RATIO_BAND == 4 and len(full) > 1

    def factor(f: budget_module.Fill) -> Fraction:
        return max(f.mlp_ratio / 2, 2 / f.mlp_ratio)

    expected = min(full, key=factor).config
    solved = solve_width(base, cap)
    assert (solved.model.d_model, solved.model.mlp_hidden) == (expected.model.d_model, expected.model.mlp_hidden)
    assert max(full, key=lambda f: f.predicted).config.model != expected.model  # the rule, not the fullest


def test_solve_width_fills_by_its_own_margin_and_width_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """The margin and the width cap reach the candidates, and the pair chosen is a full one."""
    monkeypatch.setattr(budget_module, "code_bytes", lambda: 50_000)
    base, cap = preset("small").replace(n_blocks=2), 4_000_000
    plain = solve_width(base, cap, margin=1.0)  # fills the point estimate, which the default margin forbids
    assert FILL * cap <= bytes_with_margin(plain, 1.0, 50_000) <= cap
    assert bytes_with_margin(plain, EQUAL_BYTES_MARGIN, 50_000) > cap
    default = solve_width(base, cap)
    assert FILL * cap <= bytes_with_margin(default, EQUAL_BYTES_MARGIN, 50_000) <= cap
    nearest_anywhere = min(candidates(base, cap), key=lambda f: ratio_factor(f.mlp_ratio, Fraction(2)))
    assert nearest_anywhere.predicted < FILL * cap  # so the rule must skip a nearer pair that is not full
    assert solve_width(base, cap, max_d_model=256).model.d_model <= 256 < default.model.d_model


def test_equally_near_ratios_go_to_the_widest_and_a_short_band_to_its_fullest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact ties: 8/3 and 3/2 are both a factor 4/3 from a base ratio of 2 (as floats their
    logs differ in the last bit, which once picked the narrower). Without a full pair in the
    band, the fullest in the band wins over a full pair outside it."""
    base, cap = preset("small"), 1_000_000
    design = attention_design(base)

    def fill(d: int, hidden: int, fullness: float) -> budget_module.Fill:
        return budget_module.Fill(budget_module._at(base, d, hidden, design), int(fullness * cap))

    tie = [fill(512, 384, 0.999), fill(384, 1024, 0.995), fill(448, 672, 0.992), fill(64, 1472, 0.9999)]
    monkeypatch.setattr(budget_module, "candidates", lambda *args, **kwargs: tie)
    assert (solve_width(base, cap).model.d_model, solve_width(base, cap).model.mlp_hidden) == (448, 672)
    short = [fill(128, 544, 0.977), fill(192, 160, 0.974), fill(64, 1472, 0.995)]
    monkeypatch.setattr(budget_module, "candidates", lambda *args, **kwargs: short)
    assert solve_width(base, cap).model.d_model == 128


@pytest.mark.parametrize("shape", ["convex", "concave"])
def test_the_widest_mlp_search_gallops_far_when_bytes_bend(shape: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes that bend away from the secant through the first probes: the guess lands many
    steps over (convex) or under (concave) the answer, so the gallop must double its way to
    a bracket, checking that each lower end fits. A scan of the same bytes is the reference."""
    def fake(steps: int) -> int:
        return 10_000 + (steps * steps if shape == "convex" else int(4_000 * math.sqrt(steps)))

    monkeypatch.setattr(budget_module, "bytes_with_margin",
                        lambda config, margin, code: fake(config.model.mlp_hidden // MLP_STEP))
    config, d = preset("tiny").replace(small_tensor_numel=0), 64  # every MLP size quantized
    design = attention_design(config)
    # every size when galloping down (convex): the lower end must land exactly on a budget
    for s in range(2, 400, 1 if shape == "convex" else 7):
        for budget in (fake(s), fake(s) + 1, fake(s + 1) - 1):
            fill = _widest_mlp(config, d, budget, EQUAL_BYTES_MARGIN, 0, design)
            widest = max(t for t in range(1, 2 * s + 2) if fake(t) <= budget)
            assert fill is not None and fill.config.model.mlp_hidden == widest * MLP_STEP, (s, budget)
            assert fill.predicted == fake(widest) <= budget


def test_the_widest_mlp_search_agrees_with_a_scan_on_every_path() -> None:
    """One width, budgets at and just under the predicted bytes of many MLP sizes: below the
    smallest, in the fp16 region (where the first quantized MLP does not fit but a smaller fp16
    one does), and where the secant guess lands over or under, so the search gallops either way.
    The answer and its predicted bytes equal a plain scan's (the reference's rule)."""
    config, d = preset("tiny"), 64
    design, code = attention_design(config), code_bytes()
    predicted = [0] + [bytes_with_margin(_at(config, d, s * MLP_STEP, design), EQUAL_BYTES_MARGIN, code)
                       for s in range(1, 80)]  # fmt: skip
    first = 1 + config.compress.small_tensor_numel // (d * MLP_STEP)
    assert predicted[first] < predicted[first - 1]  # the fp16 region exists at this width

    def scan(budget: int) -> tuple[int, int] | None:
        fits = []
        for s in range(1, len(predicted)):
            if predicted[s] > budget and s >= first:
                break
            fits += [] if predicted[s] > budget else [s]
        return (fits[-1] * MLP_STEP, predicted[fits[-1]]) if fits else None

    budgets = [predicted[1] - 1, predicted[1], predicted[first] - 1]
    budgets += [predicted[s] - k for s in (3, 4, 5, 6, 8, 11, 16, 23, 32, 45, 64, 78) for k in (0, 1)]
    for budget in budgets:
        fill = _widest_mlp(config, d, budget, EQUAL_BYTES_MARGIN, code, design)
        got = None if fill is None else (fill.config.model.mlp_hidden, fill.predicted)
        assert got == scan(budget), budget
        assert fill is None or fill.config.model.d_model == d
