"""Paired control arms: every routed configuration is run beside its controls.

A routed configuration refines the tokens a router picks (signal in ROUTED_SIGNALS, at
least one refinement pass). Whether routing helps is only answered against the same
configuration with the routing changed and nothing else: the same seeds, the same
tokens, the same byte cap. Each control arm changes the routing alone:

- `no_refine`: refine_passes = 0 (the base model, no extra compute);
- `uniform`: every token refined (uniform extra depth);
- `stride`: a fixed causal pattern at refine_target;
- `random`: i.i.d. tokens at refine_target, seeded by the trial seed.

Routed configurations that differ only in their signal have the very same controls
(each arm sets the signal, or turns refinement off and with it the signal), so they form
one pair and its arms run once for all of them. `pair_id` (`pair_key`) is the identity
of the configuration without its signal and seed: every routed configuration of the
pair, every arm and every seed carries it, and seeds pair by their value. Trials the
sampler proposes that are not routed, or routed ones in a sweep without controls, have
no pair.

How the searcher queues arms in the Optuna study (search.py) is built from two pure
pieces here: `arm_values`, the routing fields an arm sets, and `arm_params`, the fixed
Optuna params of an arm trial (an arm's routing value goes into them only where the
search space can hold it; Optuna refuses a fixed categorical value outside its choices).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from loopgolf.errors import LoopgolfError
from loopgolf.jsonio import short_digest
from loopgolf.orchestrator.ledger_schema import CONTROL_ARMS, NO_REFINE, ROUTED_ARM
from loopgolf.search_spaces.spaces import Choice, Dimension, contains
from loopgolf.trial.config import ROUTED_SIGNALS

# Without refinement the signal is unused: no_refine sets it to one value, so the no_refine
# arms of configurations that differ only in signal are one configuration.
NO_REFINE_SIGNAL = "entropy"


class ArmsError(LoopgolfError):
    """A list of control arms is not valid."""


def parse_controls(value: Iterable[str] | None) -> tuple[str, ...]:
    """The `controls:` spec key: None means every control arm; duplicates are an error."""
    if value is None:
        return CONTROL_ARMS
    if isinstance(value, str):
        raise ArmsError(f"controls={value!r}: expected a list, a subset of {list(CONTROL_ARMS)}")
    arms = tuple(value)
    for arm in arms:
        if arm not in CONTROL_ARMS:
            raise ArmsError(f"controls: unknown arm {arm!r}; expected a subset of {list(CONTROL_ARMS)}")
    if len(set(arms)) != len(arms):
        raise ArmsError(f"controls={list(arms)}: an arm is listed twice")
    return tuple(arm for arm in CONTROL_ARMS if arm in arms)  # a fixed order: resumes queue the same way


def is_routed(flat: Mapping[str, Any]) -> bool:
    """Does this flat trial configuration route refinement by a learned signal?"""
    return int(flat.get("refine_passes", 0)) > 0 and flat.get("signal") in ROUTED_SIGNALS


def arm_of(flat: Mapping[str, Any]) -> str:
    """The arm a flat configuration is: routed, a signal control, or no_refine."""
    if int(flat.get("refine_passes", 0)) == 0:
        return NO_REFINE
    return ROUTED_ARM if flat.get("signal") in ROUTED_SIGNALS else str(flat["signal"])


def arm_values(arm: str) -> dict[str, Any]:
    """The routing fields a control arm sets; everything else stays the routed configuration's."""
    if arm == NO_REFINE:
        return {"refine_passes": 0, "signal": NO_REFINE_SIGNAL}
    if arm not in CONTROL_ARMS:
        raise ArmsError(f"arm {arm!r}: expected one of {list(CONTROL_ARMS)}")
    return {"signal": arm}


def pair_key(flat: Mapping[str, Any]) -> str:
    """The pair of a routed flat configuration: its identity without signal and seed."""
    rest = {k: v for k, v in flat.items() if k not in ("signal", "seed")}
    return short_digest(rest, 12, default=str)


def control_config(flat: Mapping[str, Any], arm: str) -> dict[str, Any]:
    """The routed configuration `flat` with only its routing changed to `arm`."""
    if not is_routed(flat):
        raise ArmsError(f"control arm {arm!r} of a configuration that is not routed "
                        f"(signal={flat.get('signal')!r}, refine_passes={flat.get('refine_passes')!r})")
    return {**flat, **arm_values(arm)}


def arm_params(space: Mapping[str, Dimension], routed_params: Mapping[str, Any], arm: str) -> dict[str, Any]:
    """The fixed Optuna params of an arm trial: the routed trial's params, with each routing
    field the arm sets replaced where the space holds the arm's value, and dropped where it
    does not (the sampler then sets it without suggesting it: ConfigSampler's `fixed`)."""
    values = arm_values(arm)
    params = {k: v for k, v in routed_params.items() if k not in values}
    params |= {k: v for k, v in values.items() if k in space and contains(space[k], v)}
    return params


def _reachable(dim: Dimension | None, default: Any) -> list[Any]:
    if dim is None:
        return [default]
    return list(dim.values) if isinstance(dim, Choice) else [dim.high]  # a range reaches its top


def space_can_route(space: Mapping[str, Dimension], base: Mapping[str, Any]) -> bool:
    """Can the sampler propose a routed configuration (so arms default on)?"""
    passes = _reachable(space.get("refine_passes"), base.get("refine_passes", 0))
    signals = _reachable(space.get("signal"), base.get("signal"))
    return any(int(p) > 0 for p in passes) and any(s in ROUTED_SIGNALS for s in signals)
