"""SweepSearch: Ray Tune's OptunaSearch, taught seeds, constraints and crash-safe resume.

What OptunaSearch does not do by itself, and this subclass adds:

- Seeds. Each new configuration enqueues its other replicates in the Optuna study
  (`enqueue_trial` with the same params and a `seed_index` user attribute), so every
  seed is its own Tune trial and its own Optuna trial, the queue lives in the sqlite
  study, and a resumed sweep still runs every replicate exactly once.
- Constraints. The measured byte and eval-cap violations of a finished trial are set
  on the Optuna trial (`set_constraint`) before `tell`, so TPE / NSGA-II see them;
  `ConfigSampler` already set the predicted violation (`predicted_byte_violation`,
  its own key: Optuna keeps the first value set for a key).
- Outcomes. "rejected" trials enter the study as COMPLETE with a sentinel value and a
  positive constraint (the sampler learns the boundary without compute); "failed"
  trials (diverged, crashed) as FAIL; trials stopped early by ASHA (no final metrics)
  as PRUNED, never as COMPLETE with truncated values.
- Resume. The searcher pickle can be older than the sqlite study when the driver is
  killed. A trial already told is never told again; an Optuna trial left RUNNING by a
  lost Tune trial is failed and its configuration re-enqueued; and the total is
  counted from the study, so the sweep ends with exactly num_samples x seeds trials.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

CONSTRAINTS = ("byte_violation", "eval_violation")
ORPHANED = "orphaned"  # user attr of an Optuna trial whose Tune trial was lost in a crash
REJECTED_SENTINEL = 1e9  # objective value of a never-trained configuration (it is infeasible anyway)


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


class SweepSearch(OptunaSearch):
    def __init__(
        self,
        space: Any,
        objectives: Mapping[str, str],
        *,
        seeds: int,
        total_trials: int,
        storage_url: str,
        study_name: str,
        sampler: optuna.samplers.BaseSampler,
    ) -> None:
        metrics, modes = list(objectives), list(objectives.values())
        super().__init__(
            space=space,
            metric=metrics if len(metrics) > 1 else metrics[0],
            mode=modes if len(modes) > 1 else modes[0],
            sampler=sampler,
            storage=optuna.storages.RDBStorage(storage_url),
            study_name=study_name,
        )
        self._objectives = dict(objectives)
        self._seeds = seeds
        self._total_trials = total_trials

    # ------------------------------------------------------------------ suggest

    def _counted_trials(self) -> int:
        """Trials that count toward the total: every study trial but queued and orphaned ones."""
        return sum(
            1
            for t in self._ot_study.get_trials(deepcopy=False)
            if t.state != TrialState.WAITING and not t.user_attrs.get(ORPHANED)
        )

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id not in self._ot_trials and self._counted_trials() >= self._total_trials:
            return Searcher.FINISHED
        config = super().suggest(trial_id)
        ot_trial = self._ot_trials[trial_id]
        if "seed_index" not in ot_trial.user_attrs:  # sampled, not a queued replicate
            # A sampler may propose a configuration again: it then continues that
            # configuration's seeds rather than repeating one.
            first = self._trials_with_params(ot_trial.params, exclude=ot_trial.number)
            ot_trial.set_user_attr("seed_index", first)
            config["trial_config"]["seed"] += first  # ConfigSampler assumed seed_index 0
            for index in range(first + 1, first + self._seeds):
                self._ot_study.enqueue_trial(
                    ot_trial.params, user_attrs={"seed_index": index, "replicate_of": ot_trial.number}
                )
        return config

    def _trials_with_params(self, params: dict, exclude: int) -> int:
        """Earlier trials (queued included, orphaned not) of the same configuration."""
        return sum(
            1
            for t in self._ot_study.get_trials(deepcopy=False)
            if t.number != exclude and t.params == params and not t.user_attrs.get(ORPHANED)
        )

    # ------------------------------------------------------------------ results

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Intermediate values do not go to Optuna: its pruner is unused (ASHA stops trials)."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        stored = self._ot_study._storage.get_trial(ot_trial._trial_id)
        if stored.state.is_finished():  # told before a crash; the searcher pickle is older than the study
            self._completed_trials.add(trial_id)
            return
        state, values = self._outcome(result, error)
        if state == TrialState.COMPLETE:  # every complete trial carries every constraint
            assert result is not None
            for key in CONSTRAINTS:
                ot_trial.set_constraint(key, float(result.get(key) or 0.0))
        self._ot_study.tell(ot_trial, values, state=state)
        self._completed_trials.add(trial_id)

    def _outcome(self, result: dict | None, error: bool) -> tuple[TrialState, list[float] | None]:
        if error or not result:
            return TrialState.FAIL, None
        status = result.get("status")
        if status == "rejected":
            return TrialState.COMPLETE, [
                REJECTED_SENTINEL if mode == "min" else -REJECTED_SENTINEL for mode in self._objectives.values()
            ]
        if status == "failed":
            return TrialState.FAIL, None
        if status != "complete":  # stopped by the scheduler before its final metrics
            return TrialState.PRUNED, None
        values = [result.get(metric) for metric in self._objectives]
        if any(v is None or not math.isfinite(float(v)) for v in values):
            return TrialState.FAIL, None
        return TrialState.COMPLETE, [float(v) for v in values]  # type: ignore[arg-type]

    # ------------------------------------------------------------------ resume

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self.reconcile()

    def reconcile(self) -> None:
        """Fail and re-enqueue Optuna trials left RUNNING by Tune trials this searcher never saved."""
        known = {t.number for t in self._ot_trials.values()}
        for trial in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.number in known:
                continue
            self._ot_study._storage.set_trial_user_attr(trial._trial_id, ORPHANED, True)
            self._ot_study.tell(trial.number, state=TrialState.FAIL)
            attrs = {k: v for k, v in trial.user_attrs.items() if k in ("seed_index", "replicate_of")}
            self._ot_study.enqueue_trial(trial.params, user_attrs=attrs or None)
