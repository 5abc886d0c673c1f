"""Promote: re-run chosen configurations of a sweep at a higher fidelity, with fresh seeds.

    loopgolf promote SWEEP_DIR --top 3 --name big --seeds 3 --set budget.train_seconds=600 --set resources.gpu=8

The new sweep is an ordinary sweep (resume, status, extend, report) whose proposals are
the chosen configurations, queued in its own study with the params they were proposed
with in the source (read from a copy of the source's study: the source is never written).
What may change is the fidelity: the train and eval budgets, `base.max_steps`, the
resources, the data, the byte cap (only when asked), concurrency and storage. What may
not is the configuration: any other `--set` is refused with one line.

Seeds are fresh: the new sweep's seeds start after the largest seed any trial of the
source ran, so no configuration is judged on a seed it was chosen on. Early stopping is
off (a promoted configuration is re-measured, not raced). A routed configuration's
control arms come along: the new sweep keeps the source's `controls`, and the searcher
queues the arms behind it as in any sweep. Every trial carries `promoted_from`
("<source sweep>:<source config_id>") and `fidelity` (the changed fields, JSON).
The choice of configurations (by their mean over seeds, or the feasible Pareto front) is
the caller's: `loopgolf promote` makes it from the source's ledger (analysis/pareto.py).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from loopgolf.errors import LoopgolfError
from loopgolf.orchestrator.extend import HISTORY
from loopgolf.orchestrator.ledger_schema import TRIALS_FILE
from loopgolf.orchestrator.spec import SweepSpec
from loopgolf.orchestrator.spec_file import set_dotted, spec_from_dict
from loopgolf.orchestrator.study import ARM, KEY
from loopgolf.orchestrator.sweepdir import read_sweep_raw, read_sweep_spec
from loopgolf.trial.config import ConfigError, parse_override

# What a promotion may change (dotted spec keys; a key ending in "." is a prefix).
FIDELITY = ("budget.train_seconds", "budget.eval_seconds", "budget.artifact_bytes", "base.max_steps", "resources.",
            "data", "max_concurrent", "storage", "tracking_uri", "trial.grace_seconds")  # fmt: skip
DEFAULT_SEEDS = 3  # the challenge's "most often" for a record claim


class PromoteError(LoopgolfError):
    """A promotion that cannot be made as asked."""


def _allowed(key: str) -> bool:
    return any(key == f or (f.endswith(".") and key.startswith(f)) for f in FIDELITY)


def fidelity_changes(sets: Sequence[str]) -> dict[str, Any]:
    """`--set` pairs, each a fidelity field; anything that would change the configuration is refused."""
    changes: dict[str, Any] = {}
    for text in sets:
        try:
            key, value = parse_override(text)
        except ConfigError as exc:
            raise PromoteError(str(exc)) from None
        if not _allowed(key):
            raise PromoteError(f"--set {key}: promote re-runs the same configurations, so only fidelity may change "
                               f"({', '.join(f.rstrip('.') for f in FIDELITY)})")  # fmt: skip
        changes[key] = value
    return changes


def chosen_params(sweep_dir: Path, name: str, trials: pd.DataFrame, config_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Each configuration's params as the source's study holds them (a proposal's or a replicate's,
    never an arm's), read from a copy of optuna.db so the source is not touched."""
    keys = {cid: set(trials.loc[trials["config_id"] == cid, "trial_id"]) for cid in config_ids}
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy2(sweep_dir / "optuna.db", Path(tmp) / "optuna.db")
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{Path(tmp) / 'optuna.db'}")
        by_key = {t.user_attrs.get(KEY): t for t in study.get_trials(deepcopy=False) if ARM not in t.user_attrs}
        out = []
        for cid in config_ids:
            found = next((by_key[k] for k in sorted(keys[cid]) if k in by_key), None)
            if found is None:
                raise PromoteError(f"config_id {cid}: no proposal of the source's study ran it (an arm cannot be "
                                   "promoted alone; promote its routed configuration)")  # fmt: skip
            out.append(dict(found.params))
        del study  # its connection closes before the copy is removed
    return out


def promoted_spec(
    source_dir: Path, trials: pd.DataFrame, config_ids: Sequence[str], name: str, seeds: int, sets: Sequence[str]
) -> SweepSpec:
    """The new sweep's spec: the source's, the fidelity changed, its proposals the chosen configurations."""
    if not config_ids:
        raise PromoteError("promote: no configuration chosen (the source has no feasible complete trial)")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise PromoteError(f"--seeds={seeds!r}: expected an integer >= 1")
    source = read_sweep_spec(source_dir)
    changes = fidelity_changes(sets)
    raw = copy.deepcopy(read_sweep_raw(source_dir))
    raw.pop(HISTORY, None)
    for key, value in changes.items():
        set_dotted(raw, key, value)
    params = chosen_params(source_dir, source.name, trials, config_ids)
    fresh = int(pd.to_numeric(trials["seed"]).max()) + 1 if len(trials) else 0
    raw |= {"name": name, "seeds": seeds, "early_stopping": None}
    raw["base"] = dict(raw.get("base") or {}) | {"seed": fresh}
    raw["search"] = dict(raw["search"]) | {"num_samples": len(config_ids)}
    raw["promotion"] = {
        "source": str(source_dir),
        "fidelity": changes,
        "configs": [{"promoted_from": f"{source.name}:{cid}", "params": p} for cid, p in zip(config_ids, params,
                                                                                             strict=True)],
    }  # fmt: skip
    if "storage" not in changes:  # beside the source by default
        raw["storage"] = str(source_dir.parent)
    return spec_from_dict(raw)


def source_trials(sweep_dir: Path) -> pd.DataFrame:
    """The source's ledger as written (pyarrow through pandas; nothing in it executes)."""
    path = sweep_dir / TRIALS_FILE
    if not path.is_file():
        raise PromoteError(f"{sweep_dir}: no results/trials.parquet (run or resume the sweep first)")
    return pd.read_parquet(path)


def check_new(spec: SweepSpec, source_dir: Path) -> None:
    if Path(spec.sweep_dir).resolve() == source_dir.resolve():
        raise PromoteError(f"--name {spec.name}: that is the source sweep; expected a new name")


def describe(spec: SweepSpec) -> str:
    promotion: Mapping[str, Any] = spec.promotion or {}
    changed = ", ".join(f"{k}={v}" for k, v in promotion.get("fidelity", {}).items()) or "nothing (same fidelity)"
    return (f"promoting {len(promotion.get('configs', []))} configuration(s) to {spec.sweep_dir} with {spec.seeds} "
            f"fresh seed(s) from {spec.base.get('seed', 0)}; changed: {changed}")  # fmt: skip
