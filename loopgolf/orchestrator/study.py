"""The sweep's Optuna study as the sweep reads it: trial keys and finished trials.

Kept apart from the searcher (search.py), which needs Ray, so that `loopgolf status`
reads the study without importing Ray.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

KEY = "trial_key"  # user attr: the trial's directory and ledger id, kept across re-runs
REPLAY_OF = "replay_of"  # user attr of a re-enqueued trial: the number of the orphan it repeats
SEED_INDEX = "seed_index"  # user attr: which replicate a trial is (its seed is the base seed plus this)
FOLLOWS = "follows"  # user attr of a queued replicate or arm: the key of the proposal it belongs to
QUEUED_ARMS = "controls"  # user attr of a proposal: the control arms queued beside it ([] when unpaired)
ARM = "arm"  # user attr of a queued arm trial: its control arm
PAIR = "pair_id"  # user attr of a paired trial (routed or arm): arms.pair_key of its routed configuration
STUDY_FILE = "optuna.db"  # in the sweep directory
PROMOTED = "promoted_from"  # user attr of a promoted proposal and what follows it: "<source sweep>:<config_id>"


def trial_key(number: int) -> str:
    return f"trial_{number:05d}"


def counted_keys(study: optuna.Study) -> set[str]:
    """Keys of the trials that count toward the total: every trial that ran, once per key."""
    trials = study.get_trials(deepcopy=False)
    return {t.user_attrs[KEY] for t in trials if t.state != TrialState.WAITING and KEY in t.user_attrs}


def proposals(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    """The configurations the sampler proposed, by key (each with its replicates and arms
    queued behind it); a proposal re-run after a crash is one proposal."""
    found: dict[str, optuna.trial.FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False):
        if t.state != TrialState.WAITING and KEY in t.user_attrs and FOLLOWS not in t.user_attrs:
            found.setdefault(t.user_attrs[KEY], t)
    return found


def planned_trials(study: optuna.Study | None, num_samples: int, seeds: int, n_arms: int) -> int:
    """The trials a sweep runs: each proposal with its seeds and its arms' seeds, plus, for
    the proposals still to come, as many as a routed one brings (`n_arms` control arms each).

    Exact once the sampler has proposed `num_samples` configurations; before that an upper
    bound that shrinks when a proposal is not routed.
    """
    made = proposals(study) if study is not None else {}
    known = sum(seeds * (1 + len(t.user_attrs.get(QUEUED_ARMS, ()))) for t in made.values())
    return known + max(0, num_samples - len(made)) * seeds * (1 + n_arms)


def final_trials(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    """The last finished Optuna trial of every key (an orphan's re-run supersedes it)."""
    latest: dict[str, optuna.trial.FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False):
        if t.state.is_finished() and KEY in t.user_attrs:
            latest[t.user_attrs[KEY]] = t
    replayed = {t.user_attrs.get(REPLAY_OF) for t in study.get_trials(deepcopy=False)}
    return {k: t for k, t in latest.items() if t.number not in replayed}


def study_storage(sweep_dir: str | os.PathLike[str]) -> str:
    """The Optuna storage URL of the sweep's study."""
    return f"sqlite:///{Path(sweep_dir) / STUDY_FILE}"


def load_sweep_study(sweep_dir: str | os.PathLike[str], name: str) -> optuna.Study | None:
    """The sweep's study (`optuna.db` in its directory), or None before the database or study exists."""
    if not (Path(sweep_dir) / STUDY_FILE).is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=study_storage(sweep_dir))
    except KeyError:  # the database exists, the study not yet
        return None


@dataclasses.dataclass
class PlannedTrials:
    """planned_trials of a sweep's study, for a caller that asks on every trial event (the
    console's progress line): the study is loaded once and re-read per call (loading it per
    event cost ~0.06-0.15 s of the driver's loop; a re-read ~0.003 s)."""

    sweep_dir: str | os.PathLike[str]
    study_name: str
    num_samples: int
    seeds: int
    n_arms: int  # control arms a routed proposal brings
    study: Any = None

    def __call__(self) -> int:
        if self.study is None:
            self.study = load_sweep_study(self.sweep_dir, self.study_name)
        return planned_trials(self.study, self.num_samples, self.seeds, self.n_arms)
