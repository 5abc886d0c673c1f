"""SweepSearch: an Optuna study behind Ray Tune's public `Searcher` interface.

The study in `<sweep>/optuna.db` is the sweep's search state; the searcher holds
nothing that is not in it, so a resumed sweep builds a fresh searcher on the same
study (no pickles). It uses only Optuna's public ask / tell / enqueue API:

- Proposals, seeds and arms. A configuration the sampler proposes enqueues what belongs
  behind it, each its own Tune trial and its own Optuna trial, with a `follows` user
  attribute naming the proposal's key: its other replicates (`enqueue_trial` with the
  same params and a `seed_index`), and, when it is routed (orchestrator/arms.py) and
  the sweep lists control arms, each arm at each of its seeds, unless another routed
  configuration of its pair (the same but for its signal: arms.pair_key) queued that arm
  at those seeds already: one run serves every routed configuration of the pair. The
  proposal's `controls` attribute lists the arms it queued. An arm trial carries
  `arm`, `pair_id`, `seed_index` and the routed trial's params with only the routing
  changed (`arm_params`); the routing values the
  space cannot hold go in the `fixed` attribute, which ConfigSampler applies without
  suggesting them. So the sampler learns from an arm trial its value at every
  non-routing param, and at the routing params the space can hold. A configuration the
  sampler proposes again continues its seeds rather than repeating one.
- Accounting. `num_samples` counts proposals: the searcher proposes that many, runs
  everything queued behind them, then returns FINISHED, so a pair is never left
  incomplete. Trials = (proposals + arms of the routed ones) x seeds (`planned_trials`).
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
  are failed and re-enqueued with their params and user attributes (key, seed, arm,
  pair), so the re-run finds its directory and checkpoints; then every proposal's queue
  is completed (a driver killed while queuing left some out), by (arm, seed): each
  runs exactly once.
- Errors. An exception inside Optuna (e.g. GridSampler calling `study.stop()` when the
  grid is exhausted, which raises outside `optimize`) stops new suggestions; the
  running trials finish and are recorded, and the sweep reports the error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from loopgolf.orchestrator.arms import arm_of, arm_params, arm_values, is_routed, pair_key
from loopgolf.orchestrator.protocol import TrialRequest
from loopgolf.orchestrator.study import (  # noqa: F401  (part of the searcher's API too)
    ARM,
    FOLLOWS,
    KEY,
    PAIR,
    PROMOTED,
    QUEUED_ARMS,
    REPLAY_OF,
    SEED_INDEX,
    counted_keys,
    final_trials,
    planned_trials,
    proposals,
    trial_key,
)
from loopgolf.search_spaces.spaces import FIXED, Dimension

CONSTRAINTS = ("byte_violation", "eval_violation")
REJECTED_SENTINEL = 1e9  # objective value of a never-trained configuration (it is infeasible anyway)
_KEPT_ATTRS = (SEED_INDEX, FOLLOWS, QUEUED_ARMS, ARM, PAIR, FIXED, KEY, PROMOTED)  # what a re-run of an orphan keeps
OWN = "proposal"  # in a proposal's queue, beside its arms: a replicate of the proposal's own configuration


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
        num_samples: int,
        storage: str | optuna.storages.BaseStorage,
        study_name: str,
        sampler: optuna.samplers.BaseSampler,
        space: Mapping[str, Dimension] | None = None,
        controls: Collection[str] = (),
        promoted: Sequence[Mapping[str, Any]] = (),
        fidelity: str | None = None,
    ) -> None:
        super().__init__()  # Tune's metric/mode stay unset: the study holds the directions
        self.sample = sample
        self.objectives = dict(objectives)
        self.seeds = seeds
        self.num_samples = num_samples
        self.space = dict(space or {})  # the sampler's space: which arm values an arm trial's params can hold
        self.controls = tuple(controls)
        self.study = optuna.create_study(
            # a sweep's sqlite file; a replay (bench/replay_search.py) passes Optuna's in-memory storage
            storage=optuna.storages.RDBStorage(storage) if isinstance(storage, str) else storage,
            study_name=study_name,
            sampler=sampler,
            directions=["minimize" if mode == "min" else "maximize" for mode in self.objectives.values()],
            load_if_exists=True,
        )
        self.live: dict[str, optuna.Trial] = {}  # Tune trial id -> its Optuna trial (asked, not yet told)
        self.error: str | None = None  # the first exception raised inside Optuna; no suggestions after it
        self.fidelity = fidelity  # a promoted sweep's: the fields it changed from its source (JSON)
        self.promoted = self.enqueue_promoted(promoted)
        self.requeued = self.requeue_orphans()
        self.completed = self.complete_queues()

    @property
    def max_trials(self) -> int:
        """The most trials the sweep can run (Tune's num_samples): every proposal routed."""
        return planned_trials(None, self.num_samples, self.seeds, len(self.controls))

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
        if not waiting and (len(proposals(self.study)) >= self.num_samples or self.grid_exhausted()):
            return Searcher.FINISHED  # everything queued behind the proposals has run (or runs now)
        trial = self.study.ask()  # a queued trial first, if any
        if KEY not in trial.user_attrs:
            trial.set_user_attr(KEY, trial_key(trial.number))
        config = self.sample(trial)
        if SEED_INDEX not in trial.user_attrs:  # proposed by the sampler, not queued
            self._propose(trial, config)
        kind = config.get("kind", "builtin")
        request = TrialRequest(
            key=trial.user_attrs[KEY], kind=kind, config=config["trial_config"], config_id=config["config_id"],
            predicted_artifact_bytes=config.get("predicted_artifact_bytes"),
            arm=arm_of(config["trial_config"]) if kind == "builtin" else None, pair_id=trial.user_attrs.get(PAIR),
            promoted_from=trial.user_attrs.get(PROMOTED), fidelity=self.fidelity,
        )  # fmt: skip
        self.live[trial_id] = trial
        return request.to_tune()

    def _propose(self, trial: optuna.Trial, config: dict[str, Any]) -> None:
        """Plan a proposal's queue in its user attributes (seed index last), then queue it."""
        first = self._earlier_runs_of(trial.params, trial.user_attrs[KEY])
        controls = self.controls if is_routed(config["trial_config"]) else ()
        if controls:
            pair = pair_key(config["trial_config"])
            trial.set_user_attr(PAIR, pair)
            # an arm another routed configuration of the pair queued at these seeds serves this one too
            queued = self._arms_queued(pair, first)
            controls = tuple(arm for arm in controls if arm not in queued)
        trial.set_user_attr(QUEUED_ARMS, list(controls))  # the arms this proposal queues (owns)
        trial.set_user_attr(SEED_INDEX, first)  # set last: a proposal with a seed index has its plan
        config["trial_config"]["seed"] += first  # the sample function assumed seed_index 0
        self._queue_behind(trial, queued=set())

    def _queue_behind(self, proposal: optuna.Trial | optuna.trial.FrozenTrial, queued: set[tuple[str, int]]) -> int:
        """Enqueue the proposal's replicates and arms that are not in `queued` ((arm, seed index))."""
        attrs, params = proposal.user_attrs, proposal.params
        first, pair = int(attrs[SEED_INDEX]), attrs.get(PAIR)
        added = 0
        for index in range(first, first + self.seeds):  # seed by seed: a pair's trials run close together
            for arm in (OWN, *attrs.get(QUEUED_ARMS, ())):
                if (arm, index) in queued or (arm == OWN and index == first):
                    continue
                follower = {SEED_INDEX: index, FOLLOWS: attrs[KEY]} | ({PAIR: pair} if pair else {})
                follower |= {PROMOTED: attrs[PROMOTED]} if PROMOTED in attrs else {}
                if arm == OWN:  # a replicate of the proposal itself, routed or not
                    self.study.enqueue_trial(params, user_attrs=follower)
                else:
                    fixed = {ARM: arm, FIXED: arm_values(arm)}
                    self.study.enqueue_trial(arm_params(self.space, params, arm), user_attrs=follower | fixed)
                added += 1
        return added

    def _arms_queued(self, pair: str, seed_index: int) -> set[str]:
        """The arms the pair already has at `seed_index` (one read of the study, not one per arm)."""
        attrs = (t.user_attrs for t in self.study.get_trials(deepcopy=False))
        return {a[ARM] for a in attrs if ARM in a and a.get(PAIR) == pair and a.get(SEED_INDEX) == seed_index}

    def _earlier_runs_of(self, params: dict, key: str) -> int:
        """Earlier trials of the same configuration; a key's re-runs count once, this one's not at all."""
        keys, unkeyed = set(), 0
        for t in self.study.get_trials(deepcopy=False):
            if t.params != params or t.user_attrs.get(KEY) == key:
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

    def enqueue_promoted(self, promoted: Sequence[Mapping[str, Any]]) -> int:
        """A promoted sweep's proposals: each chosen configuration's params, queued once (a driver
        killed while queuing them left some out; the rest are queued by the next one)."""
        present = {t.user_attrs.get(PROMOTED) for t in self.study.get_trials(deepcopy=False)}
        added = 0
        for item in promoted:
            if item[PROMOTED] not in present:
                self.study.enqueue_trial(dict(item["params"]), user_attrs={PROMOTED: item[PROMOTED]})
                added += 1
        return added

    def requeue_orphans(self) -> int:
        """Fail the trials a dead driver left RUNNING and enqueue them again, key and seed kept."""
        orphans = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for trial in orphans:
            attrs = {k: v for k, v in trial.user_attrs.items() if k in _KEPT_ATTRS}
            attrs.setdefault(KEY, trial_key(trial.number))
            self.study.tell(trial.number, state=TrialState.FAIL)
            self.study.enqueue_trial(trial.params, user_attrs=attrs | {REPLAY_OF: trial.number})
        return len(orphans)

    def complete_queues(self) -> int:
        """Enqueue what a driver killed while queuing left out: every proposal's (arm, seed) once."""
        queued: dict[str, set[tuple[str, int]]] = {}
        for t in self.study.get_trials(deepcopy=False):
            if FOLLOWS in t.user_attrs:  # an orphan and its re-run are one (arm, seed)
                queued.setdefault(t.user_attrs[FOLLOWS], set()).add(
                    (t.user_attrs.get(ARM, OWN), int(t.user_attrs[SEED_INDEX]))
                )
        added = 0
        for key, proposal in proposals(self.study).items():
            if SEED_INDEX in proposal.user_attrs:  # else it is proposed afresh when its re-run starts
                added += self._queue_behind(proposal, queued.get(key, set()))
        return added
