"""search_spaces/spaces.py: dimensions, overrides, derivation, the smallest point, Optuna's side.

Optuna calls here go through a real in-memory study (`study.ask()`), so what is checked
is what Optuna records: the distribution of each parameter and the constraint value.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from loopgolf.search_spaces.budget import attention_design, solve_width
from loopgolf.search_spaces.spaces import (
    SPACES,
    Choice,
    ConfigSampler,
    FloatRange,
    IntRange,
    SpaceError,
    apply_overrides,
    config_id,
    derive,
    grid_values,
    named_space,
    smallest_predicted_bytes,
    suggest,
)
from loopgolf.trial.code_bytes import code_bytes
from loopgolf.trial.config import TrialConfig, preset
from loopgolf.trial.estimate import predict_artifact_bytes

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _trial(**user_attrs: Any) -> optuna.trial.Trial:
    study = optuna.create_study()
    trial = study.ask()
    for key, value in user_attrs.items():
        trial.set_user_attr(key, value)
    return trial


# ---------------------------------------------------------------------- dimensions


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Choice(()), "Choice: expected at least one value, got an empty list"),
        (lambda: IntRange(3, 2), r"IntRange\(low=3, high=2, step=1\): empty range"),
        (lambda: IntRange(1, 4, 0), r"IntRange\(low=1, high=4, step=0\): empty range"),
        (lambda: FloatRange(0.5, 0.4), r"FloatRange\(low=0.5, high=0.4, log=False\): empty range"),
        (lambda: FloatRange(0.0, 1.0, log=True), r"FloatRange\(low=0.0, high=1.0, log=True\): empty range"),
    ],
)
def test_empty_dimensions_are_refused(make: Any, message: str) -> None:
    with pytest.raises(SpaceError, match=f"^{message}$"):
        make()


def test_one_point_dimensions_are_valid() -> None:
    assert (IntRange(2, 2).low, IntRange(2, 2, 1).high) == (2, 2)
    assert FloatRange(0.5, 0.5).low == 0.5 and FloatRange(0.0, 1.0).high == 1.0
    assert FloatRange(1e-3, 1e-3, log=True).log


def test_named_spaces() -> None:
    assert named_space("routing") is SPACES["routing"]
    full = named_space("full")
    for part in ("shared_vs_unique", "routing", "phase", "compression"):
        assert set(SPACES[part]) <= set(full)
    with pytest.raises(SpaceError, match=r"^space 'nope': expected one of \['compression', 'full', "):
        named_space("nope")


def test_every_named_space_samples_valid_configs() -> None:
    """A point of every space (first and last choice of each dimension) is a valid config."""
    base = preset("tiny")
    for space in SPACES.values():
        for pick in (0, -1):
            values = {k: d.values[pick] if isinstance(d, Choice) else (d.low, d.high)[pick] for k, d in space.items()}
            config = derive(values, base, equal_bytes=False, byte_budget=0)
            assert config.model.d_model % config.model.n_heads == 0


# ----------------------------------------------------------------------- overrides

SPACE = {"n_blocks": Choice((1, 2, 3)), "d_model": Choice((64, 128)), "refine_target": FloatRange(0.1, 0.5)}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (4, Choice((4,))),  # a scalar fixes the field
        ([2, 5], Choice((2, 5))),  # a list replaces the choices
        ({"choices": [5, 6, 5]}, Choice((5, 6))),
        ({"add": [4, 2]}, Choice((1, 2, 3, 4))),  # adds to the choices, once each, in order
        ({"low": 1, "high": 6}, IntRange(1, 6, 1)),
        ({"low": 2, "high": 8, "step": 2}, IntRange(2, 8, 2)),
        ({"low": 1, "high": 6.0}, FloatRange(1.0, 6.0)),
        ({"low": 1, "high": 8, "log": True}, FloatRange(1.0, 8.0, log=True)),
        ({"low": 2, "high": 8, "step": 2, "log": False}, IntRange(2, 8, 2)),  # every key at once
    ],
)
def test_override_forms(override: Any, expected: Any) -> None:
    result = apply_overrides(SPACE, {"n_blocks": override})
    assert result["n_blocks"] == expected
    assert {k: v for k, v in result.items() if k != "n_blocks"} == {k: v for k, v in SPACE.items() if k != "n_blocks"}
    assert SPACE["n_blocks"] == Choice((1, 2, 3))  # the named space itself is untouched


def test_override_adds_a_field_the_space_does_not_have() -> None:
    result = apply_overrides(SPACE, {"bits": {"add": [4, 8]}, "codec": "lzma"})
    assert result["bits"] == Choice((4, 8)) and result["codec"] == Choice(("lzma",))
    assert apply_overrides(SPACE, {"refine_target": {"add": [0.2]}})["refine_target"] == Choice((0.2,))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_blockz": 2}, r"^override 'n_blockz': unknown config field; expected one of \["),
        ({"n_blocks": {"low": 1}}, r"^override n_blocks=\{'low': 1\}: expected a value, \{low, high\}, "
                                   r"\{choices: \[\.\.\.\]\} or \{add: \[\.\.\.\]\}$"),
        ({"n_blocks": {"choices": [1], "add": [2]}}, r"^override n_blocks=.*: expected a value"),
        ({"n_blocks": {"low": 1, "high": 2, "by": 1}}, r"^override n_blocks=.*: expected a value"),
        ({"n_blocks": {"low": 3, "high": 1}}, r"^IntRange\(low=3, high=1, step=1\): empty range$"),
    ],
)
def test_bad_overrides(overrides: dict, message: str) -> None:
    with pytest.raises(SpaceError, match=message):
        apply_overrides(SPACE, overrides)


# ---------------------------------------------------------------------- derivation


def test_derive_takes_heads_from_the_width_and_protect_from_a_string() -> None:
    base = preset("tiny")
    config = derive({"d_model": 256, "n_blocks": 3, "protect": "tok_emb.weight,blocks.0.*"}, base, False, 0)
    assert (config.model.d_model, config.model.n_heads, config.model.n_kv_heads) == (256, 8, 4)  # tiny: 32 / head, 2:1
    assert config.model.n_blocks == 3 and config.compress.protect == ("tok_emb.weight", "blocks.0.*")
    assert derive({"protect": ""}, base.replace(protect=("x",)), False, 0).compress.protect == ()
    assert derive({"d_model": 64}, base, False, 0).model.n_heads == 2


def test_derive_with_equal_bytes_spends_the_budget() -> None:
    base = preset("tiny").replace(bits=8, codec="zlib")
    budget_bytes = code_bytes() + 1_000_000  # the code counts too (and is larger under mutation testing)
    config = derive({"n_blocks": 2}, base, equal_bytes=True, byte_budget=budget_bytes)
    assert config == solve_width(base.replace(n_blocks=2), budget_bytes)
    assert config.model.d_model > base.model.d_model


def test_derive_with_equal_bytes_and_nothing_fitting_takes_the_narrowest() -> None:
    config = derive({"n_blocks": 2}, preset("tiny"), equal_bytes=True, byte_budget=1)
    head_dim, kv_ratio = attention_design(preset("tiny"))
    assert config.model.d_model == head_dim * kv_ratio
    assert predict_artifact_bytes(config) > 1


def _brute_force_smallest(space: dict, base: TrialConfig) -> int:
    axes = {k: list(d.values) if isinstance(d, Choice) else [d.low, d.high] for k, d in space.items()}
    points = (dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values()))
    return min(predict_artifact_bytes(derive(p, base, False, 0)) for p in points)


@pytest.mark.parametrize("seed", range(4))
def test_smallest_predicted_bytes_matches_enumerating_the_space(seed: int) -> None:
    """Random small spaces, values in random order, against the whole product enumerated."""
    rng = random.Random(seed)
    pool = {
        "d_model": [32, 64, 96, 128], "n_blocks": [1, 2, 3], "n_passes": [1, 2], "bits": [4, 6, 8],
        "codec": ["zlib", "lzma"], "n_coda": [0, 1], "tie_embeddings": [True, False],
    }  # fmt: skip
    names = rng.sample(sorted(pool), 4)
    space = {n: Choice(tuple(rng.sample(pool[n], rng.randint(1, len(pool[n]))))) for n in names}
    if rng.random() < 0.5:
        space["n_prelude"] = IntRange(0, 1)
    base = preset("tiny")
    assert smallest_predicted_bytes(space, base, equal_bytes=False) == _brute_force_smallest(space, base)


# ------------------------------------------------------------------------ identity


def test_config_id_ignores_only_the_seed() -> None:
    config = preset("tiny")
    ident = config_id(config)
    assert len(ident) == 12 and int(ident, 16) >= 0
    assert config_id(config.replace(seed=5)) == ident
    for change in ({"n_blocks": 3}, {"codec": "lzma"}, {"lr_embed": 0.05}, {"protect": ("a",)}):
        assert config_id(config.replace(**change)) != ident, change


# ------------------------------------------------------------------- Optuna's side


@pytest.mark.parametrize(
    ("dim", "distribution"),
    [
        (Choice((1, 2, 4)), CategoricalDistribution([1, 2, 4])),
        (IntRange(2, 10, 2), IntDistribution(2, 10, step=2)),
        (FloatRange(0.1, 0.5), FloatDistribution(0.1, 0.5)),
        (FloatRange(1e-3, 1.0, log=True), FloatDistribution(1e-3, 1.0, log=True)),
    ],
)
def test_suggest_asks_optuna_for_the_dimensions_distribution(dim: Any, distribution: Any) -> None:
    trial = _trial()
    value = suggest(trial, "x", dim)
    assert trial.distributions["x"] == distribution
    assert trial.params["x"] == value


def test_grid_values_needs_choices_only() -> None:
    assert grid_values({"a": Choice((1, 2)), "b": Choice(("x",))}) == {"a": [1, 2], "b": ["x"]}
    with pytest.raises(SpaceError, match=r"^algorithm=grid: field 'b' is a range; override it with a list"):
        grid_values({"a": Choice((1,)), "b": IntRange(1, 3)})


@pytest.mark.parametrize(("d_model", "over"), [(64, False), (256, True)])
def test_config_sampler_returns_the_flat_config_and_sets_the_signed_byte_violation(d_model: int, over: bool) -> None:
    base = preset("tiny").replace(seed=3, bits=8, codec="zlib")
    limit = predict_artifact_bytes(derive({"d_model": 128}, base, False, 0))  # between the two widths
    sampler = ConfigSampler({"d_model": Choice((d_model,)), "n_blocks": IntRange(2, 2)}, base, False, limit)
    trial = _trial(seed_index=2)
    out = sampler(trial)
    config = TrialConfig.from_flat(out["trial_config"])
    assert config == derive({"d_model": d_model, "n_blocks": 2}, base, False, limit).replace(seed=5)
    assert out["config_id"] == config_id(config)
    assert out["predicted_artifact_bytes"] == predict_artifact_bytes(config)
    violation = _constraint(trial, "predicted_byte_violation")
    assert violation == out["predicted_artifact_bytes"] - limit
    assert (violation > 0) == over  # Optuna: feasible iff every constraint value is <= 0


def _constraint(trial: optuna.trial.Trial, key: str) -> float:
    """The constraint value the sampler stored, read back through the study's public API."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    return frozen.system_attrs[f"constraints:{key}"]


def test_config_sampler_seed_index_defaults_to_zero() -> None:
    base = preset("tiny").replace(seed=3)
    out = ConfigSampler({"n_blocks": Choice((2,))}, base, False, 10**9)(_trial())
    assert out["trial_config"]["seed"] == 3


def test_config_sampler_with_equal_bytes_solves_the_width_for_its_budget() -> None:
    base = preset("tiny").replace(bits=8, codec="zlib")
    trial = _trial()
    budget_bytes = code_bytes() + 1_000_000
    out = ConfigSampler({"n_blocks": Choice((2,))}, base, equal_bytes=True, byte_budget=budget_bytes)(trial)
    config = TrialConfig.from_flat(out["trial_config"])
    assert config == solve_width(base.replace(n_blocks=2), budget_bytes)
    assert config.model.d_model > base.model.d_model  # the budget buys a wider model than the preset's
    assert _constraint(trial, "predicted_byte_violation") == out["predicted_artifact_bytes"] - budget_bytes <= 0
