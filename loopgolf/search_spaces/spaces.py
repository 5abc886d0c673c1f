"""What Optuna may propose: named search spaces over TrialConfig's flat fields.

A space maps field names to a `Choice`, `IntRange` or `FloatRange`. A sweep names one
space and may override it per field (fix a value, narrow a range, replace or add
choices). Values that follow from others are never sampled: heads come from the
width (`derive_heads`), and with `equal_bytes` the width itself is solved so every
configuration spends the same byte budget (`solve_width`).

`sample_config(trial, ...)` is the define-by-run function Optuna calls; it returns the
whole flat trial configuration, and marks a configuration predicted over the byte cap
as infeasible (`trial.set_constraint`) so the sampler learns the boundary before any
compute is spent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from loopgolf.errors import LoopgolfError
from loopgolf.jsonio import short_digest
from loopgolf.trial.config import FIELD_SECTION, FIXED_SIGNALS, ROUTED_SIGNALS, TrialConfig, coerce_field

Scalar = bool | int | float | str
FIXED = "fixed"  # user attr of an enqueued trial: field values set outside the space (ConfigSampler)


class SpaceError(LoopgolfError):
    """A search space or an override of one is not valid."""


@dataclasses.dataclass(frozen=True)
class Choice:
    values: tuple[Scalar, ...]

    def __post_init__(self) -> None:
        if not self.values:
            raise SpaceError("Choice: expected at least one value, got an empty list")


@dataclasses.dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    step: int = 1

    def __post_init__(self) -> None:
        if self.low > self.high or self.step < 1:
            raise SpaceError(f"IntRange(low={self.low}, high={self.high}, step={self.step}): empty range")


@dataclasses.dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        if self.low > self.high or (self.log and self.low <= 0):
            raise SpaceError(f"FloatRange(low={self.low}, high={self.high}, log={self.log}): empty range")


Dimension = Choice | IntRange | FloatRange
Space = Mapping[str, Dimension]

# `protect` is a tuple of globs; Optuna's categorical values must be scalars, so the
# space names them by one string, "" meaning nothing protected.
_PROTECT_FIELD = "protect"

SHARED_VS_UNIQUE: Space = {
    "n_blocks": Choice((1, 2, 3, 4, 6)),
    "n_passes": Choice((1, 2, 3, 4)),
    "n_prelude": Choice((0, 1)),
    "n_coda": Choice((0, 1)),
    "d_model": Choice((64, 96, 128, 192, 256)),
    "share": Choice(("all", "attn", "mlp")),  # what the passes share; the rest is per pass
}
ROUTING: Space = {
    "refine_passes": Choice((0, 1, 2)),
    "signal": Choice((*ROUTED_SIGNALS, *FIXED_SIGNALS)),
    "refine_target": FloatRange(0.1, 0.5),
    "refine_cap": FloatRange(0.5, 1.0),  # >= every refine_target the space proposes
    "aux_loss": Choice((0.0, 0.1, 0.3)),
}
PHASE: Space = {"phase": Choice(("none", "scale", "lora", "embed")), "lora_rank": Choice((2, 4, 8))}
COMPRESSION: Space = {
    "bits": Choice((4, 5, 6, 8)),
    "codec": Choice(("zlib", "lzma", "zstd", "brotli")),
    _PROTECT_FIELD: Choice(("", "tok_emb.weight")),
    "qat": Choice(("none", "noise", "ste")),
}
SPACES: Mapping[str, Space] = {
    "shared_vs_unique": SHARED_VS_UNIQUE,
    "routing": ROUTING,
    "phase": PHASE,
    "compression": COMPRESSION,
    "full": {**SHARED_VS_UNIQUE, **ROUTING, **PHASE, **COMPRESSION},
}


def named_space(name: str) -> Space:
    if name not in SPACES:
        raise SpaceError(f"space {name!r}: expected one of {sorted(SPACES)}")
    return SPACES[name]


def apply_overrides(space: Space, overrides: Mapping[str, Any]) -> dict[str, Dimension]:
    """Override per field: a scalar fixes it; {low, high} narrows; {choices} replaces; {add} adds."""
    result: dict[str, Dimension] = dict(space)
    for field, spec in overrides.items():
        if field not in FIELD_SECTION:
            raise SpaceError(f"override {field!r}: unknown config field; expected one of {sorted(FIELD_SECTION)}")
        result[field] = dimension(field, spec, result.get(field))
    return result


def dimension(name: str, spec: Any, current: Dimension | None = None) -> Dimension:
    """One dimension from its YAML form (the syntax of `overrides`, and of a script's `space`)."""
    if isinstance(spec, Mapping):
        keys = set(spec)
        if keys == {"choices"} or keys == {"add"}:
            values = tuple(spec.get("choices", ())) or (
                (current.values if isinstance(current, Choice) else ()) + tuple(spec["add"])
            )
            return Choice(tuple(dict.fromkeys(values)))
        if keys <= {"low", "high", "step", "log"} and {"low", "high"} <= keys:
            if isinstance(spec["low"], int) and isinstance(spec["high"], int) and not spec.get("log"):
                return IntRange(spec["low"], spec["high"], spec.get("step", 1))
            return FloatRange(float(spec["low"]), float(spec["high"]), bool(spec.get("log", False)))
        raise SpaceError(
            f"override {name}={dict(spec)!r}: expected a value, {{low, high}}, {{choices: [...]}} or {{add: [...]}}"
        )
    if isinstance(spec, list):
        return Choice(tuple(spec))
    return Choice((spec,))


def derive(values: Mapping[str, Any], base: TrialConfig, equal_bytes: bool, byte_budget: int) -> TrialConfig:
    """The whole configuration from sampled values: heads from width, with the base's head
    size and query-to-KV ratio; with equal bytes, width and MLP size solved to fill the budget.

    With equal bytes, a configuration that fits at no width gets the narrowest width:
    its prediction is then over the budget, and the trial is rejected before training.
    """
    # Here, not at the top: budget and estimate import torch, which reading a spec or status does not need.
    from loopgolf.search_spaces.budget import BudgetError, attention_design, derive_heads, solve_width

    flat = {k: coerce_field(k, v) for k, v in values.items() if k != _PROTECT_FIELD}
    if _PROTECT_FIELD in values:
        flat[_PROTECT_FIELD] = tuple(p for p in str(values[_PROTECT_FIELD]).split(",") if p)
    head_dim, kv_ratio = attention_design(base)
    config = TrialConfig.from_flat(flat, base=base)
    if equal_bytes:
        try:
            return solve_width(config, byte_budget)
        except BudgetError:
            config = config.replace(d_model=head_dim * kv_ratio)
    try:
        n_heads, n_kv_heads = derive_heads(config.model.d_model, head_dim, kv_ratio)
    except ValueError as exc:
        raise SpaceError(f"d_model={config.model.d_model}: {exc} (the base's attention design)") from None
    return config.replace(n_heads=n_heads, n_kv_heads=n_kv_heads)


def smallest_predicted_bytes(space: Space, base: TrialConfig, equal_bytes: bool) -> int:
    """The smallest predicted artifact in a space, found coordinate-wise.

    Bytes move monotonically along each dimension we have (width, blocks, bits, ...), so
    setting each dimension in turn to the value that minimizes the prediction, twice
    over, finds the minimum without enumerating the product of all dimensions.
    """
    from loopgolf.search_spaces.budget import MLP_STEP, attention_design  # torch: see derive
    from loopgolf.trial.estimate import predict_artifact_bytes

    head_dim, kv_ratio = attention_design(base)
    narrowest = head_dim * kv_ratio

    def candidates(name: str, dim: Dimension) -> list[Scalar]:
        if equal_bytes and name == "d_model":
            return [narrowest]
        if isinstance(dim, Choice):
            return list(dim.values)
        return [dim.low, dim.high]

    point = {name: candidates(name, dim)[0] for name, dim in space.items()}
    if equal_bytes:  # the solver's smallest: the narrowest width with one step of MLP
        point.update(d_model=narrowest, mlp_dim=MLP_STEP)

    def predicted(values: Mapping[str, Any]) -> int:
        return predict_artifact_bytes(derive(values, base, equal_bytes=False, byte_budget=0))

    for _ in range(2):
        for name, dim in space.items():
            point[name] = min(candidates(name, dim), key=lambda v: predicted({**point, name: v}))
    return predicted(point)


def config_id(config: TrialConfig) -> str:
    """Identity of a configuration without its seed: replicates share it."""
    return flat_config_id(config.to_flat())


def flat_config_id(flat: Mapping[str, Any]) -> str:
    """Identity of a flat configuration (any kind of trial) without its seed."""
    rest = {k: v for k, v in flat.items() if k != "seed"}
    return short_digest(rest, 12)


def contains(dim: Dimension, value: Any) -> bool:
    """Can Optuna hold `value` as this dimension's param (a fixed, enqueued value included)?"""
    if isinstance(dim, Choice):
        return any(type(value) is type(v) and value == v for v in dim.values)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(dim, IntRange):
        return isinstance(value, int) and dim.low <= value <= dim.high and (value - dim.low) % dim.step == 0
    return dim.low <= value <= dim.high


def suggest(trial: Any, name: str, dim: Dimension) -> Scalar:
    if isinstance(dim, Choice):
        return trial.suggest_categorical(name, list(dim.values))
    if isinstance(dim, IntRange):
        return trial.suggest_int(name, dim.low, dim.high, step=dim.step)
    return trial.suggest_float(name, dim.low, dim.high, log=dim.log)


def grid_values(space: Space) -> dict[str, list[Scalar]]:
    """The grid of a space for Optuna's GridSampler: every dimension must be a Choice."""
    grid = {}
    for name, dim in space.items():
        if not isinstance(dim, Choice):
            raise SpaceError(f"algorithm=grid: field {name!r} is a range; override it with a list of choices")
        grid[name] = list(dim.values)
    return grid


@dataclasses.dataclass(frozen=True)
class ConfigSampler:
    """Optuna's define-by-run function for one sweep (a picklable object, no closures).

    The returned dict is the Tune trial's config: the flat TrialConfig (`trial_config`),
    its `config_id`, and the analytic byte prediction that rejects it before training.

    An enqueued trial may carry a `fixed` user attribute: field values set from outside
    the space's suggestions (a control arm's routing, orchestrator/arms.py). A fixed value
    the space can hold is suggested (the enqueued params fix it), so the study records it
    as the trial's param; one it cannot hold (`signal: uniform` when the space's signals
    are the routed ones, `refine_passes: 0` when the space fixes 1) is set without being
    suggested, because Optuna refuses a fixed categorical value outside its choices. So
    what a sampler learns from such a trial is its value at the params it has: every
    non-routing field of the space, and the routing fields the space can hold; a routing
    field the space cannot hold is absent from that trial's params.
    """

    space: Mapping[str, Dimension]
    base: TrialConfig
    equal_bytes: bool
    byte_budget: int

    def __call__(self, trial: Any) -> dict[str, Any]:
        from loopgolf.trial.estimate import predict_artifact_bytes  # torch: see derive

        fixed = dict(trial.user_attrs.get(FIXED, {}))
        values = {
            name: suggest(trial, name, dim)
            for name, dim in self.space.items()
            if name not in fixed or contains(dim, fixed[name])
        }
        values |= fixed
        seed = self.base.train.seed + int(trial.user_attrs.get("seed_index", 0))
        config = derive(values, self.base, self.equal_bytes, self.byte_budget).replace(seed=seed)
        predicted = predict_artifact_bytes(config)
        trial.set_constraint("predicted_byte_violation", float(predicted - self.byte_budget))
        return {
            "trial_config": config.to_flat(),
            "config_id": config_id(config),
            "predicted_artifact_bytes": predicted,
        }
