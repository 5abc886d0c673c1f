"""SweepSearch: an Optuna study behind Ray Tune's public `Searcher` interface.

The study in `<sweep>/optuna.db` is the sweep's search state; the searcher holds
nothing that is not in it, so a resumed sweep builds a fresh searcher on the same
study (no pickles). It uses only Optuna's public ask / tell / enqueue API:

- Seeds. A sampled configuration enqueues its other replicates (`enqueue_trial` with
  the same params and a `seed_index` user attribute), so every seed is its own Tune
  trial and its own Optuna trial. A configuration the sampler proposes again
  continues its seeds rather than repeating one.
- Trial keys. Each trial gets a `trial_key` user attribute when it first runs; it
  names the trial's directory (`<sweep>/trials/<key>/`: checkpoints, artifact,
  metrics.json) and its ledger row, and stays the same when the trial is re-run.
- Constraints. `ConfigSampler` sets the predicted byte violation at ask time; the
  measured byte and eval-cap violations are set (`Trial.set_constraint`, which
  TPE / NSGA-II read) before `tell`.
- Outcomes. "rejected" trials enter the study as COMPLETE with a sentinel value and a
  positive constraint (the sampler learns the boundary without compute); "failed"
  trials (diverged) and trials that raised as FAIL; trials stopped early by ASHA (no
  final metrics) as PRUNED. A trial is told once.
- Resume. Trials left RUNNING by a dead driver (the sweep lock guarantees it is dead)
  are failed and re-enqueued with their params, seed and key, so the re-run finds its
  directory and checkpoints. The total is counted from the study: distinct keys.
- Errors. An exception inside Optuna (e.g. GridSampler calling `study.stop()` when the
  grid is exhausted, which raises outside `optimize`) stops new suggestions; the
  running trials finish and are recorded, and the sweep reports the error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from loopgolf.orchestrator.study import (  # noqa: F401  (part of the searcher's API too)
    KEY,
    REPLAY_OF,
    counted_keys,
    final_trials,
    trial_key,
)

CONSTRAINTS = ("byte_violation", "eval_violation")
REJECTED_SENTINEL = 1e9  # objective value of a never-trained configuration (it is infeasible anyway)
_KEPT_ATTRS = ("seed_index", "replicate_of", KEY)


def make_sampler(algorithm: str, seed: int, grid: Mapping[str, list] | None = None) -> optuna.samplers.BaseSampler:
    if algorithm == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if algorithm == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if algorithm == "grid":
        return optuna.samplers.GridSampler(dict(grid or {}), seed=seed)
    raise ValueError(f"algorithm={algorithm!r}: expected tpe, nsga2, random or grid")


class SweepSearch(Searcher):
    def __init__(
        self,
        sample: Callable[[optuna.Trial], dict[str, Any]],
        objectives: Mapping[str, str],
        *,
        seeds: int,
        total_trials: int,
        storage_url: str,
        study_name: str,
        sampler: optuna.samplers.BaseSampler,
    ) -> None:
        super().__init__()  # Tune's metric/mode stay unset: the study holds the directions
        self.sample = sample
        self.objectives = dict(objectives)
        self.seeds = seeds
        self.total_trials = total_trials
        self.study = optuna.create_study(
            storage=optuna.storages.RDBStorage(storage_url),
            study_name=study_name,
            sampler=sampler,
            directions=["minimize" if mode == "min" else "maximize" for mode in self.objectives.values()],
            load_if_exists=True,
        )
        self.live: dict[str, optuna.Trial] = {}  # Tune trial id -> its Optuna trial (asked, not yet told)
        self.error: str | None = None  # the first exception raised inside Optuna; no suggestions after it
        self.requeued = self.requeue_orphans()

    # ------------------------------------------------------------------ suggest

    def suggest(self, trial_id: str) -> dict | None:
        if self.error is not None:
            return Searcher.FINISHED
        try:
            return self._suggest(trial_id)
        except Exception as exc:  # recorded and reported by the sweep; running trials still finish
            self.error = f"{type(exc).__name__}: {exc}"
            return Searcher.FINISHED

    def _suggest(self, trial_id: str) -> dict | None:
        waiting = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        replays = any(KEY in t.user_attrs for t in waiting)
        if not replays and len(counted_keys(self.study)) >= self.total_trials:
            return Searcher.FINISHED
        if not waiting and self.grid_exhausted():  # every grid point ran; queued seeds above still do
            return Searcher.FINISHED
        trial = self.study.ask()
        config = self.sample(trial)
        if "seed_index" not in trial.user_attrs:  # sampled, not a queued replicate
            first = self._earlier_runs_of(trial.params, exclude=trial.number)
            trial.set_user_attr("seed_index", first)
            config["trial_config"]["seed"] += first  # the sample function assumed seed_index 0
            for index in range(first + 1, first + self.seeds):
                self.study.enqueue_trial(trial.params, user_attrs={"seed_index": index, "replicate_of": trial.number})
        if KEY not in trial.user_attrs:
            trial.set_user_attr(KEY, trial_key(trial.number))
        config[KEY] = trial.user_attrs[KEY]
        self.live[trial_id] = trial
        return config

    def _earlier_runs_of(self, params: dict, exclude: int) -> int:
        """Earlier trials of the same configuration, queued included; a key's re-runs count once."""
        keys, unkeyed = set(), 0
        for t in self.study.get_trials(deepcopy=False):
            if t.number == exclude or t.params != params:
                continue
            if KEY in t.user_attrs:
                keys.add(t.user_attrs[KEY])
            else:
                unkeyed += 1
        return len(keys) + unkeyed

    # ------------------------------------------------------------------ results

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Intermediate values do not go to Optuna: its pruner is unused (ASHA stops trials)."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        trial = self.live.pop(trial_id, None)
        if trial is None:  # not ours, or told already
            return
        state, values = self.outcome(result, error)
        try:
            if state == TrialState.COMPLETE:  # every complete trial carries every constraint
                assert result is not None
                for key in CONSTRAINTS:
                    trial.set_constraint(key, float(result.get(key) or 0.0))
            self.study.tell(trial, values, state=state)
        except Exception as exc:  # Optuna stores the state before the sampler's hook raises
            # GridSampler calls study.stop() once its grid is exhausted, which raises outside
            # study.optimize: that is the end of the grid, not an error.
            if not (isinstance(exc, RuntimeError) and self.grid_exhausted()):
                self.error = self.error or f"{type(exc).__name__}: {exc}"

    def grid_exhausted(self) -> bool:
        sampler = self.study.sampler
        return isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(self.study)

    def outcome(self, result: dict | None, error: bool) -> tuple[TrialState, list[float] | None]:
        if error or not result:
            return TrialState.FAIL, None
        status = result.get("status")
        if status == "rejected":
            return TrialState.COMPLETE, [
                REJECTED_SENTINEL if mode == "min" else -REJECTED_SENTINEL for mode in self.objectives.values()
            ]
        if status == "failed":
            return TrialState.FAIL, None
        if status != "complete":  # stopped by the scheduler before its final metrics
            return TrialState.PRUNED, None
        values = [result.get(metric) for metric in self.objectives]
        if any(v is None or not math.isfinite(float(v)) for v in values):
            return TrialState.FAIL, None
        return TrialState.COMPLETE, [float(v) for v in values]  # type: ignore[arg-type]

    # ------------------------------------------------------------------ resume

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its search algorithm into its own experiment files (tuner.pkl). The
        study cannot go there (NSGA-II's sampler holds a thread lock) and need not: resume
        never reads those files, it opens the study again. The pickled copy is inert."""
        state = self.__dict__.copy()
        state["study"] = None
        state["live"] = {}
        return state

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: the study is the state, and resume never reads Tune's searcher files."""

    def restore(self, checkpoint_path: str) -> None:
        raise NotImplementedError("a sweep resumes from its Optuna study, not from a searcher checkpoint")

    def requeue_orphans(self) -> int:
        """Fail the trials a dead driver left RUNNING and enqueue them again, key and seed kept."""
        orphans = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for trial in orphans:
            attrs = {k: v for k, v in trial.user_attrs.items() if k in _KEPT_ATTRS}
            attrs.setdefault(KEY, trial_key(trial.number))
            self.study.tell(trial.number, state=TrialState.FAIL)
            self.study.enqueue_trial(trial.params, user_attrs=attrs | {REPLAY_OF: trial.number})
        return len(orphans)
