"""The sweep's Optuna study as the sweep reads it: trial keys and finished trials.

Kept apart from the searcher (search.py), which needs Ray, so that `loopgolf status`
reads the study without importing Ray.
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

KEY = "trial_key"  # user attr: the trial's directory and ledger id, kept across re-runs
REPLAY_OF = "replay_of"  # user attr of a re-enqueued trial: the number of the orphan it repeats


def trial_key(number: int) -> str:
    return f"trial_{number:05d}"


def counted_keys(study: optuna.Study) -> set[str]:
    """Keys of the trials that count toward the total: every trial that ran, once per key."""
    trials = study.get_trials(deepcopy=False)
    return {t.user_attrs[KEY] for t in trials if t.state != TrialState.WAITING and KEY in t.user_attrs}


def final_trials(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    """The last finished Optuna trial of every key (an orphan's re-run supersedes it)."""
    latest: dict[str, optuna.trial.FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False):
        if t.state.is_finished() and KEY in t.user_attrs:
            latest[t.user_attrs[KEY]] = t
    replayed = {t.user_attrs.get(REPLAY_OF) for t in study.get_trials(deepcopy=False)}
    return {k: t for k, t in latest.items() if t.number not in replayed}
