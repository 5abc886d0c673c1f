"""Control arms: which configurations are routed, and their controls change the routing only.

    python -m pytest tests/orchestrator/test_arms.py
"""

from __future__ import annotations

import itertools
from typing import Any

import optuna
import pytest

from loopgolf.orchestrator.arms import (
    ArmsError,
    arm_of,
    arm_params,
    arm_values,
    control_config,
    is_routed,
    pair_key,
    parse_controls,
    space_can_route,
)
from loopgolf.orchestrator.ledger_schema import ARMS, CONTROL_ARMS
from loopgolf.search_spaces.spaces import FIXED, Choice, ConfigSampler, FloatRange, IntRange, config_id, contains
from loopgolf.trial.config import TrialConfig, preset


def test_controls_change_the_routing_and_nothing_else() -> None:
    routed = preset("small").replace(refine_passes=2, signal="kl", refine_target=0.2, seed=7).to_flat()
    for arm in CONTROL_ARMS:
        control = control_config(routed, arm)
        TrialConfig.from_flat(control)  # a valid configuration
        changed = {k for k in routed if control[k] != routed[k]}
        # no_refine also sets the signal it no longer uses to one value (NO_REFINE_SIGNAL)
        assert changed == ({"refine_passes", "signal"} if arm == "no_refine" else {"signal"})
        assert arm_of(control) == arm and not is_routed(control)
    assert arm_of(routed) == "routed"


def test_routed_configurations_that_differ_only_in_signal_share_their_pair_and_arms() -> None:
    base = preset("small").replace(refine_passes=1, refine_target=0.2, seed=7)
    by_signal = {s: base.replace(signal=s).to_flat() for s in ("entropy", "margin", "resid_norm", "kl")}
    assert len({pair_key(flat) for flat in by_signal.values()}) == 1
    assert pair_key(by_signal["kl"]) == pair_key({**by_signal["kl"], "seed": 8})  # seeds pair by value
    for arm in CONTROL_ARMS:  # one configuration per arm, whichever signal it controls
        assert len({config_id(TrialConfig.from_flat(control_config(f, arm))) for f in by_signal.values()}) == 1
    for other in ({"refine_target": 0.3}, {"aux_loss": 0.1}, {"n_passes": 3}):  # anything else: another pair
        assert pair_key(base.replace(signal="kl", **other).to_flat()) != pair_key(by_signal["kl"])


def test_which_configurations_are_routed() -> None:
    for passes, signal in itertools.product((0, 1, 2), ("entropy", "margin", "resid_norm", "kl", "uniform", "random")):
        flat = preset("tiny").replace(refine_passes=passes, signal=signal).to_flat()
        assert is_routed(flat) == (passes > 0 and signal in ("entropy", "margin", "resid_norm", "kl"))
        assert arm_of(flat) in ARMS
    with pytest.raises(ArmsError, match="not routed"):
        control_config(preset("tiny").replace(refine_passes=1, signal="uniform").to_flat(), "random")


def test_each_arm_is_its_own_configuration() -> None:
    routed = preset("tiny").replace(refine_passes=1, signal="entropy").to_flat()
    ids = {config_id(TrialConfig.from_flat(control_config(routed, arm))) for arm in CONTROL_ARMS}
    assert len(ids | {config_id(TrialConfig.from_flat(routed))}) == len(CONTROL_ARMS) + 1


def test_parse_controls() -> None:
    assert parse_controls(None) == CONTROL_ARMS
    assert parse_controls(["random", "no_refine"]) == ("no_refine", "random")  # the fixed order
    with pytest.raises(ArmsError, match="unknown arm 'dense'"):
        parse_controls(["dense"])
    with pytest.raises(ArmsError, match="listed twice"):
        parse_controls(["random", "random"])
    with pytest.raises(ArmsError, match="expected a list"):
        parse_controls("random")


def test_space_can_route() -> None:
    base = preset("tiny").to_flat()  # refine_passes 0
    assert space_can_route({"refine_passes": Choice((0, 1)), "signal": Choice(("uniform", "kl"))}, base)
    assert not space_can_route({"refine_passes": Choice((0, 1)), "signal": Choice(("uniform", "random"))}, base)
    assert not space_can_route({"signal": Choice(("kl",)), "refine_target": FloatRange(0.1, 0.5)}, base)
    assert space_can_route({"signal": Choice(("kl",))}, {**base, "refine_passes": 1})


def test_arm_params_hold_the_arms_routing_only_where_the_space_can() -> None:
    space = {"refine_passes": Choice((0, 1)), "signal": Choice(("entropy", "kl")), "d_model": Choice((32, 64))}
    routed = {"refine_passes": 1, "signal": "kl", "d_model": 64}
    assert arm_params(space, routed, "no_refine") == {"refine_passes": 0, "signal": "entropy", "d_model": 64}
    for arm in ("uniform", "stride", "random"):  # not a choice of `signal`: left out, set by `fixed`
        assert arm_params(space, routed, arm) == {"refine_passes": 1, "d_model": 64}
    wide = {**space, "signal": Choice(("entropy", "kl", "uniform"))}
    assert arm_params(wide, routed, "uniform") == {"refine_passes": 1, "signal": "uniform", "d_model": 64}
    narrow = {**space, "refine_passes": IntRange(1, 2)}
    assert arm_params(narrow, routed, "no_refine") == {"signal": "entropy", "d_model": 64}
    only_kl = {**space, "signal": Choice(("kl", "margin"))}  # no_refine's signal outside the space: left out
    assert arm_params(only_kl, routed, "no_refine") == {"refine_passes": 0, "d_model": 64}


@pytest.mark.parametrize(
    ("dim", "inside", "outside"),
    [
        (Choice(("entropy", "kl")), ["kl"], ["uniform", 0]),
        (Choice((0, 1, 2)), [0, 2], [3, False, 1.5, "1"]),
        (IntRange(1, 5, step=2), [1, 3, 5], [0, 2, 6, 3.0, True]),
        (FloatRange(0.1, 0.5), [0.1, 0.25, 0.5], [0.05, 0.6, "0.2"]),
    ],
)  # fmt: skip
def test_contains_is_what_optuna_can_hold_as_the_dimensions_param(dim: Any, inside: list, outside: list) -> None:
    assert all(contains(dim, v) for v in inside) and not any(contains(dim, v) for v in outside)


def test_the_sampler_sets_fixed_values_and_suggests_only_those_the_space_holds() -> None:
    space = {"refine_passes": Choice((1,)), "signal": Choice(("entropy", "kl")), "aux_loss": Choice((0.0, 0.1))}
    base = preset("tiny").replace(bits=8, codec="zlib")
    sampler = ConfigSampler(space, base, equal_bytes=False, byte_budget=2_000_000)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    routed = {"refine_passes": 1, "signal": "kl", "aux_loss": 0.1}
    for arm in ("no_refine", "uniform"):
        study.enqueue_trial(arm_params(space, routed, arm), user_attrs={FIXED: arm_values(arm), "seed_index": 1})
    for arm in ("no_refine", "uniform"):
        trial = study.ask()
        flat = sampler(trial)["trial_config"]
        assert flat == control_config({**base.replace(seed=base.train.seed + 1).to_flat(), **routed}, arm)
        assert trial.params == arm_params(space, routed, arm)  # what the sampler learns this trial is
