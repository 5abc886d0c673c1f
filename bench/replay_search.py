"""Replay the project's real searcher against a recorded table: hundreds of sweeps in minutes.

    python bench/replay_search.py [--table bench/data/search_table.parquet] [--reps 50] [--gp]

Each simulated sweep builds the sweep's own `SweepSearch` (an Optuna study behind Ray
Tune's Searcher) with the sweep's `ConfigSampler` over the table's grid, and drives it
through the calls Ray Tune makes: `suggest(trial_id)`, then `on_trial_complete(trial_id,
result)`. Each suggestion is answered at once from the table: the nearest recorded
configuration (exact on the grid), one of its recorded seeds drawn at random. Trials
run one at a time (max_concurrent 1). Constraints work as in a sweep: the sampler sets
the predicted byte violation, the replay reports the measured one.

Figures: hypervolume of the (val_bpb, artifact_bytes) and (val_bpb, eval_flops_per_token)
fronts after 8/16/32/64 trials, each searched with those two objectives, per sampler,
median and IQR over the repetitions, as ratios to random's median. Objectives are
normalised to a fixed box from the table (its best and worst trained, feasible values),
the reference point at the box's worst corner.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd

from loopgolf.analysis.pareto import hypervolume_of
from loopgolf.orchestrator.search import SweepSearch, make_sampler
from loopgolf.search_spaces.spaces import ConfigSampler, apply_overrides, named_space
from loopgolf.trial.config import TrialConfig

TABLE = Path(__file__).resolve().parent / "data" / "search_table.parquet"
FRONTS: Mapping[str, tuple[str, str]] = {
    "bytes": ("val_bpb", "artifact_bytes"),
    "flops": ("val_bpb", "eval_flops_per_token"),
}
CHECKPOINTS = (8, 16, 32, 64)
# Decides how a suggested trial runs: given its table row, its status and training seconds spent.
RunDecision = Callable[[str, int], tuple[str, float]]


@dataclasses.dataclass(frozen=True)
class ReplayTable:
    """Recorded trials: one row per (configuration, seed); `fields` are the grid's columns.

    A replayed trial is a row position; `column(name)[position]` reads its values.
    """

    rows: pd.DataFrame
    fields: tuple[str, ...]
    cap: int  # the artifact byte cap the trials ran under

    def __post_init__(self) -> None:
        needed = {*self.fields, "seed", "status", "val_bpb", "artifact_bytes", "eval_flops_per_token",
                  "predicted_artifact_bytes", "train_seconds", "curve_seconds", "curve_bpb"}  # fmt: skip
        missing = needed - set(self.rows.columns)
        if missing:
            raise ValueError(f"replay table: missing columns {sorted(missing)}")
        if self.rows.empty:
            raise ValueError("replay table: no rows")

    @functools.cached_property
    def configs(self) -> np.ndarray:
        """The distinct recorded configurations (grid values, one per row), in table order."""
        grid = self.rows[list(self.fields)].to_numpy(dtype=np.float64)
        _, first = np.unique(grid, axis=0, return_index=True)
        return grid[np.sort(first)]

    @functools.cached_property
    def members(self) -> list[np.ndarray]:
        """Row positions of each configuration's recorded seeds."""
        grid = self.rows[list(self.fields)].to_numpy(dtype=np.float64)
        return [np.flatnonzero((grid == config).all(axis=1)) for config in self.configs]

    def column(self, name: str) -> np.ndarray:
        return self.by_column[name]

    @functools.cached_property
    def by_column(self) -> dict[str, np.ndarray]:
        return {name: self.rows[name].to_numpy() for name in self.rows.columns}

    def nearest(self, values: Mapping[str, Any]) -> int:
        """Index into `configs` of the recorded configuration nearest `values` (L1, each field scaled
        by its recorded range; the first of equals)."""
        span = np.ptp(self.configs, axis=0)
        target = np.array([float(values[f]) for f in self.fields])
        distance = (np.abs(self.configs - target) / np.where(span > 0, span, 1.0)).sum(axis=1)
        return int(np.argmin(distance))

    def answer(self, values: Mapping[str, Any], rng: np.random.Generator) -> int:
        """The row position of the nearest configuration for one of its recorded seeds, drawn at random."""
        seeds = self.members[self.nearest(values)]
        return int(seeds[rng.integers(len(seeds))])

    def space(self, space_name: str, fixed: Mapping[str, Any]) -> dict[str, Any]:
        """The named space narrowed to the table's grid (and `fixed` values): what the sweep searched."""
        overrides = {f: sorted({v.item() if hasattr(v, "item") else v for v in self.rows[f]}) for f in self.fields}
        return apply_overrides(named_space(space_name), {**overrides, **fixed})

    def competing(self) -> np.ndarray:
        """Per row: may it enter a front (trained to the end and under the byte cap)?"""
        return (self.column("status") == "complete") & (self.column("artifact_bytes").astype(np.float64) <= self.cap)


def load_table(path: Path, fields: Sequence[str], cap: int) -> ReplayTable:
    return ReplayTable(pd.read_parquet(path), tuple(fields), cap)


def make_replay_sampler(algorithm: str, seed: int) -> optuna.samplers.BaseSampler:
    """The sweep's samplers (make_sampler), plus Optuna's GP sampler, which the sweep does not offer yet."""
    if algorithm == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return make_sampler(algorithm, seed)


def run_to_end(table: ReplayTable) -> RunDecision:
    """No early stopping: every trained trial runs its whole budget."""

    def decide(_trial_key: str, row: int) -> tuple[str, float]:
        seconds = table.column("train_seconds")[row]
        return str(table.column("status")[row]), float(seconds) if seconds == seconds else 0.0  # NaN: untrained

    return decide


@dataclasses.dataclass(frozen=True)
class ReplayedTrial:
    row: int  # position in the table
    status: str  # complete, stopped (by early stopping), rejected or failed
    seconds: float  # training seconds spent


def result_of(table: ReplayTable, trial: ReplayedTrial, objectives: Sequence[str]) -> dict[str, Any]:
    """What the trainable would report to Ray Tune for this trial (the searcher's input)."""

    def value(name: str) -> float:
        return float(table.column(name)[trial.row])

    if trial.status == "complete":
        return {"status": "complete", **{m: value(m) for m in objectives},
                "byte_violation": value("artifact_bytes") - table.cap, "eval_violation": 0.0}  # fmt: skip
    if trial.status == "rejected":
        return {"status": "rejected", "byte_violation": value("predicted_artifact_bytes") - table.cap}
    return {"status": trial.status}


def replay_search(
    sample: ConfigSampler, objectives: Sequence[str], n_trials: int, sampler: optuna.samplers.BaseSampler
) -> SweepSearch:
    """The sweep's SweepSearch on Optuna's in-memory storage (on SQLite, even in memory, the
    storage's queries cost ~10 s of CPU per 64-trial sweep, most of a replay). One seed per
    configuration and no control arms: each of the n_trials proposals is one trial."""
    return SweepSearch(
        sample, {m: "min" for m in objectives}, seeds=1, num_samples=n_trials,
        storage=optuna.storages.InMemoryStorage(), study_name=f"replay-{uuid.uuid4().hex[:8]}", sampler=sampler,
    )  # fmt: skip


def replay_sweep(
    table: ReplayTable,
    base: TrialConfig,
    space: Mapping[str, Any],
    objectives: Sequence[str],
    sampler: optuna.samplers.BaseSampler,
    n_trials: int,
    rng: np.random.Generator,
    decide: RunDecision | None = None,
) -> list[ReplayedTrial]:
    """One simulated sweep of `n_trials` through the real SweepSearch, answered from the table."""
    search = replay_search(ConfigSampler(space, base, equal_bytes=False, byte_budget=table.cap), objectives,
                           n_trials, sampler)  # fmt: skip
    return drive(search, table, objectives, n_trials, rng, decide or run_to_end(table))


def drive(
    search: SweepSearch,
    table: ReplayTable,
    objectives: Sequence[str],
    n_trials: int,
    rng: np.random.Generator,
    decide: RunDecision,
) -> list[ReplayedTrial]:
    """Ray Tune's calls, one trial at a time: suggest, answer from the table, on_trial_complete."""
    trials: list[ReplayedTrial] = []
    for number in range(n_trials):
        trial_id = f"replay_{number:05d}"
        config = search.suggest(trial_id)
        if not isinstance(config, dict):
            raise RuntimeError(f"SweepSearch stopped after {number} of {n_trials} trials: {search.error or config}")
        row = table.answer(config["trial_config"], rng)
        status, seconds = decide(config["trial_key"], row)
        trial = ReplayedTrial(row, status, seconds)
        search.on_trial_complete(trial_id, result_of(table, trial, objectives))
        trials.append(trial)
    if search.error:
        raise RuntimeError(f"SweepSearch: {search.error}")
    return trials


@dataclasses.dataclass(frozen=True)
class Box:
    """A fixed normalisation box per objective: 0 at the table's best value, 1 at its worst."""

    low: np.ndarray
    high: np.ndarray

    @classmethod
    def from_table(cls, table: ReplayTable, objectives: Sequence[str]) -> Box:
        values = objective_values(table, objectives)[table.competing()]
        if len(values) == 0:
            raise ValueError("replay table: no complete, feasible row to set the normalisation box")
        return cls(values.min(axis=0), values.max(axis=0))

    def hypervolume(self, values: np.ndarray) -> float:
        """Hypervolume of the normalised points, reference at the box's worst corner (1, 1)."""
        span = np.where(self.high > self.low, self.high - self.low, 1.0)
        return hypervolume_of((values - self.low) / span, np.ones(len(self.low))) if len(values) else 0.0


def objective_values(table: ReplayTable, objectives: Sequence[str]) -> np.ndarray:
    return np.column_stack([table.column(m).astype(np.float64) for m in objectives])


def hypervolume_after(table: ReplayTable, trials: Sequence[ReplayedTrial], count: int, objectives: Sequence[str],
                      box: Box) -> float:  # fmt: skip
    """Hypervolume of the front of the first `count` trials (stopped ones never enter it)."""
    may_compete = table.competing()
    rows = [t.row for t in trials[:count] if t.status == "complete" and may_compete[t.row]]
    return box.hypervolume(objective_values(table, objectives)[rows])


def sampler_figures(
    table: ReplayTable,
    base: TrialConfig,
    space: Mapping[str, Any],
    algorithms: Sequence[str],
    reps: int,
    checkpoints: Sequence[int] = CHECKPOINTS,
) -> pd.DataFrame:
    """Hypervolume per (front, algorithm, repetition, trials): one row each."""
    records = []
    for front, objectives in FRONTS.items():
        box = Box.from_table(table, objectives)
        for algorithm in algorithms:
            for rep in range(reps):
                rng = np.random.default_rng(rep)  # the seed draws: the same stream for every sampler
                trials = replay_sweep(table, base, space, objectives, make_replay_sampler(algorithm, rep),
                                      max(checkpoints), rng)  # fmt: skip
                for count in checkpoints:
                    hv = hypervolume_after(table, trials, count, objectives, box)
                    records.append({"front": front, "algorithm": algorithm, "rep": rep, "trials": count, "hv": hv})
    return pd.DataFrame(records)


def summarize(figures: pd.DataFrame, baseline: str = "random") -> pd.DataFrame:
    """Median and IQR of hypervolume per (front, algorithm, trials), and each as a ratio to the baseline's median."""
    grouped = figures.groupby(["front", "algorithm", "trials"])["hv"]
    summary = pd.DataFrame({
        "median": grouped.median(), "q25": grouped.quantile(0.25), "q75": grouped.quantile(0.75),
        "reps": grouped.size(),
    }).reset_index()  # fmt: skip
    base = summary[summary["algorithm"] == baseline].set_index(["front", "trials"])["median"]
    reference = summary.set_index(["front", "trials"]).index.map(base)
    for column in ("median", "q25", "q75"):
        summary[f"{column}_vs_{baseline}"] = summary[column].to_numpy() / np.asarray(reference, dtype=np.float64)
    return summary


def main() -> None:
    from record_search_table import ARTIFACT_CAP, GRID, base_config  # bench/ (the script's own directory)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, default=TABLE)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--algorithms", default="tpe,nsga2,random")
    parser.add_argument("--gp", action="store_true", help="add Optuna's GP sampler (slow: seconds per trial)")
    parser.add_argument("--checkpoints", default=",".join(map(str, CHECKPOINTS)), help="trial counts to report")
    parser.add_argument("--out", type=Path, help="also write the per-repetition figures here (CSV)")
    args = parser.parse_args()
    checkpoints = tuple(int(n) for n in args.checkpoints.split(","))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    table = load_table(args.table, tuple(GRID), ARTIFACT_CAP)
    space = table.space("shared_vs_unique", {"n_prelude": 0, "n_coda": 0})
    algorithms = args.algorithms.split(",") + (["gp"] if args.gp else [])
    tick = time.perf_counter()
    figures = sampler_figures(table, base_config(), space, algorithms, args.reps, checkpoints)
    seconds = time.perf_counter() - tick
    if args.out:
        figures.to_csv(args.out, index=False)
    print(f"table: {args.table} ({len(table.rows)} rows, {len(table.configs)} configurations); load {os.getloadavg()}")
    print(f"{args.reps} repetitions x {len(algorithms)} samplers x {len(FRONTS)} fronts in {seconds:.0f} s")
    print(summarize(figures).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
