"""Extend a sweep on resume: `loopgolf resume SWEEP_DIR --set search.num_samples=N --set overrides.X=...`.

Ray Tune's restore is fault tolerance only; a loopgolf sweep's state is its Optuna study
and its trial directories, so continuing a finished sweep is asking the same study for
more trials. What may change is what keeps every earlier trial comparable with the new
ones: more samples, more concurrency, a narrower space. What may not: budgets, data, byte
cap, base config, seeds, objectives, hardware — each refused with one line saying why.

Narrowing is of numeric ranges ({low, high} inside the old bounds): Optuna fixes a
categorical's choices for the whole study (it refuses a changed choice list), so a
categorical cannot be narrowed within a study.

Each accepted change is appended to the `history` list in the sweep's spec.yaml, in the
same atomic write as the new values.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from loopgolf.orchestrator.spec import SpecError
from loopgolf.orchestrator.spec_file import spec_from_dict
from loopgolf.search_spaces.spaces import Choice, FloatRange, IntRange, apply_overrides, named_space
from loopgolf.trial.config import ConfigError, parse_override

HISTORY = "history"  # spec.yaml's list of extensions: {at, code_version, set: [KEY=VALUE, ...]}
# Dotted keys a resume may change.
ALLOWED = ("search.num_samples", "max_concurrent")
# Why each other key is refused: what it changes (the first matching prefix names it).
INCOMPARABLE = {
    "budget": "the budgets (bytes, train and eval seconds)",
    "data": "the data",
    "base": "the base configuration",
    "seeds": "the seeds per configuration",
    "search.seed": "the sampler's seed",
    "search.objectives": "the objectives the study ranks",
    "search.algorithm": "the study's sampler",
    "equal_bytes": "how widths fill the byte cap",
    "space": "the search space",
    "resources": "the hardware a trial trains on (budgets are seconds)",
    "early_stopping": "which trials are stopped early",
    "name": "the study's name",
    "storage": "where the sweep lives",
    "trial": "the script a trial runs and what it receives",
}


class ExtendError(SpecError):
    """A `resume --set` would make earlier trials incomparable, or is not a change a resume can make."""


def parse_sets(sets: Sequence[str]) -> list[tuple[str, Any]]:
    pairs = []
    for text in sets:
        try:
            pairs.append(parse_override(text))
        except ConfigError as exc:
            raise ExtendError(str(exc)) from None
    return pairs


def extended_raw(stored: Mapping[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """The spec mapping with `--set`s applied, every one checked (history excluded)."""
    raw = {k: v for k, v in stored.items() if k != HISTORY}
    old_samples = int(raw.get("search", {}).get("num_samples", 0))
    for key, value in parse_sets(sets):
        _check_key(key, value)
        if key == "search.num_samples" and not (isinstance(value, int) and value > old_samples):
            raise ExtendError(
                f"--set search.num_samples={value!r}: expected an integer above the sweep's {old_samples} "
                "(a resume extends a sweep, it never shrinks it)"
            )
        _set(raw, key, value)
    _check_narrowing(raw.get("space", "shared_vs_unique"), stored.get("overrides") or {}, raw.get("overrides") or {})
    spec_from_dict(raw)  # every rule of a spec, as for a new sweep
    return raw


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    head, _, rest = key.partition(".")
    if not rest:
        raw[head] = value
        return
    node = raw[head] = dict(raw.get(head) or {})  # a copy: the stored mapping stays as it was
    _set(node, rest, value)


def _check_key(key: str, value: Any) -> None:
    if key in ALLOWED or key.startswith("overrides."):
        return
    for prefix, what in INCOMPARABLE.items():
        if key == prefix or key.startswith(prefix + "."):
            raise ExtendError(f"--set {key}={value!r}: refused: it changes {what}, so the trials so far would not "
                              "be comparable with the new ones (start a new sweep)")  # fmt: skip
    raise ExtendError(f"--set {key}: a resume may change only {', '.join(ALLOWED)} and overrides.<field>")


def _check_narrowing(space: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """Every dimension the same, or a numeric range inside its old bounds."""
    before, after = apply_overrides(named_space(space), old), apply_overrides(named_space(space), new)
    for field in sorted(set(before) | set(after)):
        was, now = before.get(field), after.get(field)
        if was == now:
            continue
        if was is None:
            raise ExtendError(f"overrides.{field}: adds a dimension the sweep did not search; a resume may only narrow")
        if isinstance(was, Choice) or type(was) is not type(now):
            raise ExtendError(
                f"overrides.{field}: {_show(was)} -> {_show(now)}: a resume may only narrow a numeric range "
                "(Optuna fixes a categorical's choices and a dimension's kind for the whole study)"
            )
        assert isinstance(was, (IntRange, FloatRange)) and isinstance(now, (IntRange, FloatRange))
        if now.low < was.low or now.high > was.high or getattr(now, "log", False) != getattr(was, "log", False):
            raise ExtendError(f"overrides.{field}: {_show(was)} -> {_show(now)}: widens the range; a resume may "
                              "only narrow it")  # fmt: skip


def _show(dim: Any) -> str:
    if dim is None:
        return "fixed"
    if isinstance(dim, Choice):
        return str(list(dim.values))
    return f"[{dim.low}, {dim.high}]"


def with_history(raw: Mapping[str, Any], stored: Mapping[str, Any], sets: Sequence[str], code: str) -> dict[str, Any]:
    """The new spec.yaml mapping: the extended values, and the history with this change appended."""
    entry = {"at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "code_version": code, "set": list(sets)}
    return {**raw, HISTORY: [*(stored.get(HISTORY) or []), entry]}
