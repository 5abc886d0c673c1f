"""Control arms: which configurations are routed, and their controls change the routing only.

    python -m pytest tests/test_arms.py
"""

from __future__ import annotations

import itertools

import pytest

from loopgolf.orchestrator.arms import (
    ARMS,
    ArmsError,
    arm_of,
    control_config,
    is_routed,
    parse_controls,
    space_can_route,
    supported_controls,
)
from loopgolf.search_spaces.spaces import Choice, FloatRange, config_id
from loopgolf.trial.config import TrialConfig, preset


def test_controls_change_the_routing_and_nothing_else() -> None:
    routed = preset("small").replace(refine_passes=2, signal="kl", refine_target=0.2, seed=7).to_flat()
    for arm in supported_controls():
        control = control_config(routed, arm)
        TrialConfig.from_flat(control)  # a valid configuration
        changed = {k for k in routed if control[k] != routed[k]}
        assert changed == ({"refine_passes"} if arm == "no_refine" else {"signal"})
        assert arm_of(control) == arm and not is_routed(control)
    assert arm_of(routed) == "routed"


def test_which_configurations_are_routed() -> None:
    for passes, signal in itertools.product((0, 1, 2), ("entropy", "margin", "resid_norm", "kl", "uniform", "random")):
        flat = preset("tiny").replace(refine_passes=passes, signal=signal).to_flat()
        assert is_routed(flat) == (passes > 0 and signal in ("entropy", "margin", "resid_norm", "kl"))
        assert arm_of(flat) in ARMS
    with pytest.raises(ArmsError, match="not routed"):
        control_config(preset("tiny").replace(refine_passes=1, signal="uniform").to_flat(), "random")


def test_each_arm_is_its_own_configuration() -> None:
    routed = preset("tiny").replace(refine_passes=1, signal="entropy").to_flat()
    ids = {config_id(TrialConfig.from_flat(control_config(routed, arm))) for arm in supported_controls()}
    assert len(ids | {config_id(TrialConfig.from_flat(routed))}) == len(supported_controls()) + 1


def test_parse_controls() -> None:
    assert parse_controls(None) == supported_controls()
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
