"""The spec file: its YAML layout read into a SweepSpec (spec.py), `--set` overrides applied,
and the checks a spec passes against the world before a sweep starts: its data (manifest,
shards, tokenizer), its space (names, ranges, a grid's size), and the byte cap (some
configuration must fit it).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loopgolf.orchestrator.arms import space_can_route
from loopgolf.orchestrator.script import (
    ScriptError,
    ScriptTrial,
    check_script_data,
    env_text,
    script_trial_from_dict,
    tokenizer_for,
)
from loopgolf.orchestrator.spec import SpecError, SweepSpec
from loopgolf.search_spaces.spaces import (
    Choice,
    apply_overrides,
    grid_values,
    named_space,
    smallest_predicted_bytes,
)
from loopgolf.trial.config import ConfigError, number_from_text, parse_override, read_yaml_mapping
from loopgolf.trial.prepare import check_data

# Numeric spec fields and their type: YAML 1.1 reads `1e6` as a string, so text is converted.
_NUMERIC = {"artifact_bytes": int, "train_seconds": float, "eval_seconds": float, "num_samples": int,
            "search_seed": int, "seeds": int, "max_concurrent": int, "cpu": float, "gpu": float, "workers": int}
# YAML layout -> SweepSpec field names.
_NESTED = {
    "budget": {"artifact_bytes": "artifact_bytes", "train_seconds": "train_seconds", "eval_seconds": "eval_seconds"},
    "search": {"algorithm": "algorithm", "objectives": "objectives", "num_samples": "num_samples",
               "seed": "search_seed"},
    "resources": {"cpu": "cpu", "gpu": "gpu", "workers": "workers"},
}  # fmt: skip
_TOP = {"name", "data", "storage", "space", "overrides", "base", "equal_bytes", "seeds", "max_concurrent",
        "tracking_uri", "early_stopping", "controls", "trial", "promotion"}  # fmt: skip


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    head, _, rest = key.partition(".")
    if not rest:
        raw[head] = value
        return
    node = raw.setdefault(head, {})
    if not isinstance(node, dict):
        raise SpecError(f"--set {key}: {head!r} is not a mapping in the spec")
    set_dotted(node, rest, value)


def spec_from_dict(raw: Mapping[str, Any]) -> SweepSpec:
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _NESTED:
            if not isinstance(value, Mapping):
                raise SpecError(f"{key}: expected a mapping, got {value!r}")
            for sub, sub_value in value.items():
                if sub not in _NESTED[key]:
                    raise SpecError(f"{key}.{sub}: unknown field; expected one of {sorted(_NESTED[key])}")
                values[_NESTED[key][sub]] = sub_value
        elif key == "early_stopping" and isinstance(value, Mapping):
            values |= _early_stopping_fields(value)
        elif key in _TOP:
            values[key] = value
        else:
            raise SpecError(f"unknown spec field {key!r}; expected one of {sorted(_TOP | set(_NESTED))}")
    if "name" not in values or "data" not in values:
        raise SpecError("spec: expected at least `name` and `data`")
    for key, kind in _NUMERIC.items():
        if key in values:
            values[key] = _numeric(key, values[key], kind)
    values["data"] = Path(str(values["data"])).expanduser().resolve()
    if isinstance(values.get("objectives"), (list, str)):  # "val_bpb" or [val_bpb, artifact_bytes] -> all min
        names = [values["objectives"]] if isinstance(values["objectives"], str) else values["objectives"]
        values["objectives"] = {n: "min" for n in names}
    for key in ("overrides", "base"):
        if key in values and not isinstance(values[key], Mapping):
            raise SpecError(f"{key}: expected a mapping of config field: value")
    if values.get("trial") is not None:
        if not isinstance(values["trial"], Mapping):
            raise SpecError(f"trial: expected a mapping with `script: path/to/train_gpt.py`, got {values['trial']!r}")
        try:
            values["trial"] = script_trial_from_dict(values["trial"])
        except ScriptError as exc:
            raise SpecError(str(exc)) from None
        values["base"] = {k: _numeric(f"base.{k}", v, int) for k, v in dict(values.get("base") or {}).items()}
    try:
        spec = SweepSpec(**values)
    except TypeError as exc:
        raise SpecError(f"spec: {exc}") from None
    _check_space(spec)
    return spec


_EARLY_STOPPING = {"algorithm": "early_stopping", "eta": "halving_eta", "min_seconds": "halving_min_seconds"}


def _early_stopping_fields(value: Mapping[str, Any]) -> dict[str, Any]:
    """`early_stopping: {algorithm: pareto_halving, eta: 3, min_seconds: 2}` -> SweepSpec fields."""
    for sub in value:
        if sub not in _EARLY_STOPPING:
            raise SpecError(f"early_stopping.{sub}: unknown field; expected one of {sorted(_EARLY_STOPPING)}")
    if "algorithm" not in value:
        raise SpecError("early_stopping: expected an algorithm (asha or pareto_halving)")
    if value["algorithm"] != "pareto_halving" and set(value) - {"algorithm"}:
        raise SpecError(f"early_stopping: eta and min_seconds are pareto_halving's; algorithm={value['algorithm']!r}")
    fields = {_EARLY_STOPPING[k]: v for k, v in value.items()}
    for key in ("halving_eta", "halving_min_seconds"):  # `eta: "3"` from --set; a float eta stays one, refused
        if isinstance(fields.get(key), str):
            fields[key] = number_from_text(fields[key])
    return fields


def _numeric(key: str, value: Any, kind: type) -> Any:
    number = number_from_text(value) if isinstance(value, str) else value
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise SpecError(f"{key}={value!r}: expected a number")
    if kind is int and isinstance(number, float) and number.is_integer():
        return int(number)
    return float(number) if kind is float else number


def _check_space(spec: SweepSpec) -> None:
    """Unknown space or field, empty range, or a space where nothing fits the byte cap."""
    if spec.trial is not None:
        try:
            _check_script_space(spec, spec.trial)
        except ScriptError as exc:
            raise SpecError(str(exc)) from None
        return

    try:
        base = spec.base_config()
    except ConfigError as exc:
        raise SpecError(f"base: {exc}") from None
    check_data(spec.data, base.model.vocab_size)  # manifest, shards, tokenizer: before any compute
    if base.train.batch_size % spec.workers:
        raise SpecError(
            f"base.batch_size={base.train.batch_size} with resources.workers={spec.workers}: expected a multiple "
            "of workers (each data-parallel worker trains on an equal slice of the global batch)"
        )
    space = apply_overrides(named_space(spec.space), spec.overrides)
    if spec.algorithm == "grid":
        grid_values(space)
    if spec.controls and not space_can_route(space, base.to_flat()):
        raise SpecError(
            f"controls={list(spec.controls)}: space {spec.space!r} never proposes a routed configuration (signal "
            "entropy, margin, resid_norm or kl with refine_passes > 0), so no arm would run; remove `controls`"
        )
    smallest = smallest_predicted_bytes(space, base, spec.equal_bytes)
    if smallest > spec.artifact_bytes:
        raise SpecError(
            f"space {spec.space!r}: no configuration fits budget.artifact_bytes={spec.artifact_bytes:,}; "
            f"the smallest predicts {smallest:,} bytes"
        )


def _check_script_space(spec: SweepSpec, trial: ScriptTrial) -> None:
    """A script sweep: its data (shards and a tokenizer), its space's names and dimensions."""
    check_script_data(spec.data)
    tokenizer_for(trial, spec.data)
    trial.check_space(list(spec.space))
    space = spec.search_space()
    for name, dim in space.items():
        values = dim.values if isinstance(dim, Choice) else ()
        for value in values:
            env_text(f"space.{name}", value)
    if spec.algorithm == "grid":
        grid_values(space)


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = (), **fields: Any) -> SweepSpec:
    """Read a spec file, apply `--set dotted.key=value` overrides and explicit fields (CLI flags)."""
    raw = read_yaml_mapping(path, "spec", SpecError)
    for text in overrides:
        try:
            key, value = parse_override(text)
        except ConfigError as exc:
            raise SpecError(str(exc)) from None
        set_dotted(raw, key, value)
    for key, value in fields.items():
        if value is not None:
            raw[key] = value
    return spec_from_dict(raw)
