"""Measured savings of Pareto-aware successive halving, replayed on the recorded table.

    python bench/replay_halving.py [--table bench/data/search_table.parquet] [--reps 50] [--algorithm tpe]

The recorded learning curves make early stopping replayable. A replayed trial reaches a
rung at its first progress report at or past the rung's training seconds; there it is
compared, by `loopgolf.orchestrator.halving.survivors`, with every trial that reached
that rung before it (asynchronous, as ASHA: trials run one at a time) on (quick val bpb
at the rung, the objective known before training: predicted artifact bytes, or analytic
eval FLOPs). A stopped trial spends the training seconds up to that report, is told to
the searcher as stopped (PRUNED) and never enters a front. A trial that ends before a
rung is never stopped there.

Per repetition, one sweep without halving and one with, each through the real SweepSearch
(bench/replay_search.py). Figures, median and IQR over the repetitions:
- equal trials: compute (training seconds) saved and hypervolume lost after N trials;
- equal compute: hypervolume of the halving sweep's longest prefix that spent no more than
  the plain sweep's N trials, against the plain sweep's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from replay_search import (  # bench/ (the script's own directory)
    FRONTS,
    TABLE,
    Box,
    ReplayedTrial,
    ReplayTable,
    hypervolume_after,
    load_table,
    make_replay_sampler,
    replay_sweep,
)

from loopgolf.orchestrator.halving import rung_seconds, survivors
from loopgolf.search_spaces.spaces import derive
from loopgolf.trial.config import TrialConfig
from loopgolf.trial.flops import flops_per_token

CHECKPOINTS = (16, 32, 64)


def known_before_training(table: ReplayTable, base: TrialConfig, objective: str) -> np.ndarray:
    """Per row, the objective the scheduler knows before training: predicted bytes or analytic eval FLOPs
    (routed trials at their refine target)."""
    if objective == "artifact_bytes":
        return table.column("predicted_artifact_bytes").astype(np.float64)
    if objective != "eval_flops_per_token":
        raise ValueError(f"objective={objective!r}: expected artifact_bytes or eval_flops_per_token")
    flops = []
    for config in table.configs:
        model = derive(dict(zip(table.fields, config.tolist(), strict=True)), base, False, table.cap).model
        flops.append(flops_per_token(model, model.refine_target if model.refine_passes else 0.0))
    by_config = np.empty(len(table.rows))
    for index, rows in enumerate(table.members):
        by_config[rows] = flops[index]
    return by_config


@dataclasses.dataclass
class ParetoHalving:
    """The replay's scheduler: the points seen at each rung so far (mutable, one per sweep)."""

    table: ReplayTable
    static: np.ndarray  # per row: the objective known before training
    rungs: tuple[float, ...]
    eta: int
    seen: dict[float, dict[str, tuple[float, float]]] = dataclasses.field(default_factory=dict)

    def __call__(self, trial_key: str, row: int) -> tuple[str, float]:
        status, full = str(self.table.column("status")[row]), float(self.table.column("train_seconds")[row])
        if status != "complete":
            return status, full if full == full else 0.0
        seconds, bpb = self.table.column("curve_seconds")[row], self.table.column("curve_bpb")[row]
        for rung in self.rungs:
            reached = np.flatnonzero(np.asarray(seconds) >= rung)
            if len(reached) == 0:  # ended before this rung: it ran its whole budget
                break
            at = int(reached[0])
            points = self.seen.setdefault(rung, {})
            points[trial_key] = (float(bpb[at]), float(self.static[row]))
            if trial_key not in survivors(points, self.eta):
                return "stopped", float(seconds[at])
        return status, full


def spent(trials: Sequence[ReplayedTrial]) -> np.ndarray:
    """Cumulative training seconds after each trial."""
    return np.cumsum([t.seconds for t in trials])


def paired_figures(
    table: ReplayTable, base: TrialConfig, algorithm: str, reps: int, eta: int, min_seconds: float, budget: float,
    checkpoints: Sequence[int] = CHECKPOINTS, halving_trials: int = 160,
) -> pd.DataFrame:  # fmt: skip
    """One row per (front, repetition, N): plain and halving compute and hypervolume."""
    space = table.space("shared_vs_unique", {"n_prelude": 0, "n_coda": 0})
    rungs = rung_seconds(budget, eta, min_seconds)
    records = []
    for front, objectives in FRONTS.items():
        box, static = Box.from_table(table, objectives), known_before_training(table, base, objectives[1])
        for rep in range(reps):
            plain = replay_sweep(table, base, space, objectives, make_replay_sampler(algorithm, rep),
                                 max(checkpoints), np.random.default_rng(rep))  # fmt: skip
            halving = ParetoHalving(table, static, rungs, eta)
            halved = replay_sweep(table, base, space, objectives, make_replay_sampler(algorithm, rep),
                                  halving_trials, np.random.default_rng(rep), decide=halving)  # fmt: skip
            plain_spent, halved_spent = spent(plain), spent(halved)
            for n in checkpoints:
                budget_n = plain_spent[n - 1]
                prefix = int(np.searchsorted(halved_spent, budget_n, side="right"))  # trials within that compute
                records.append({
                    "front": front, "rep": rep, "trials": n,
                    "plain_seconds": budget_n, "plain_hv": hypervolume_after(table, plain, n, objectives, box),
                    "halving_seconds": halved_spent[n - 1],
                    "halving_hv": hypervolume_after(table, halved, n, objectives, box),
                    "halving_stopped": sum(t.status == "stopped" for t in halved[:n]),
                    "equal_compute_trials": prefix,
                    "equal_compute_hv": hypervolume_after(table, halved, prefix, objectives, box),
                    "equal_compute_exhausted": prefix == len(halved),  # the halving sweep ran out of trials
                })  # fmt: skip
    return pd.DataFrame(records)


def summarize(figures: pd.DataFrame) -> pd.DataFrame:
    """Per (front, N): each figure as "median [q25, q75]" over the repetitions."""
    frame = figures.assign(
        compute_saved=1.0 - figures["halving_seconds"] / figures["plain_seconds"],
        hv_equal_trials=figures["halving_hv"] / figures["plain_hv"],
        hv_equal_compute=figures["equal_compute_hv"] / figures["plain_hv"],
    )
    columns = ["compute_saved", "hv_equal_trials", "hv_equal_compute", "equal_compute_trials", "halving_stopped"]
    grouped = frame.groupby(["front", "trials"])
    median, q25, q75 = grouped[columns].median(), grouped[columns].quantile(0.25), grouped[columns].quantile(0.75)
    summary = median.copy().astype(object)
    for column in columns:
        summary[column] = [f"{m:.3f} [{a:.3f}, {b:.3f}]" for m, a, b in zip(median[column], q25[column], q75[column],
                                                                        strict=True)]  # fmt: skip
    summary["ran_out"] = grouped["equal_compute_exhausted"].sum()  # reps whose halving sweep had no trials left
    return summary


def main() -> None:
    from record_search_table import ARTIFACT_CAP, GRID, TRAIN_SECONDS, base_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, default=TABLE)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--algorithm", default="tpe")
    parser.add_argument("--eta", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=0.5)
    parser.add_argument("--out", type=Path, help="also write the per-repetition figures here (CSV)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    table = load_table(args.table, tuple(GRID), ARTIFACT_CAP)
    tick = time.perf_counter()
    figures = paired_figures(table, base_config(), args.algorithm, args.reps, args.eta, args.min_seconds,
                             TRAIN_SECONDS)  # fmt: skip
    seconds = time.perf_counter() - tick
    if args.out:
        figures.to_csv(args.out, index=False)
    rungs = rung_seconds(TRAIN_SECONDS, args.eta, args.min_seconds)
    print(f"table: {args.table} ({len(table.rows)} rows); load {os.getloadavg()}")
    print(f"{args.algorithm}, eta={args.eta}, rungs at {[round(r, 3) for r in rungs]} s of {TRAIN_SECONDS} s; "
          f"{args.reps} repetitions in {seconds:.0f} s")  # fmt: skip
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print(summarize(figures).to_string())


if __name__ == "__main__":
    main()
