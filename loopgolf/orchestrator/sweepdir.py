"""The sweep directory as the sweep's commands read it: its spec and its planned trials.

    spec.yaml             the resolved spec (what `resume` rebuilds the Tuner from)
    optuna.db             the Optuna study

Kept apart from sweep.py (which builds and runs the Tuner) so that `status` and the
progress line read a sweep without importing Ray, and so that nothing that sweep.py
imports needs sweep.py back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from loopgolf.errors import LoopgolfError
from loopgolf.orchestrator.extend import HISTORY
from loopgolf.orchestrator.spec import SweepSpec
from loopgolf.orchestrator.spec_file import spec_from_dict
from loopgolf.orchestrator.study import STUDY_FILE, PlannedTrials
from loopgolf.trial.config import read_yaml_mapping

SPEC_FILE = "spec.yaml"
__all__ = ["SPEC_FILE", "STUDY_FILE", "SweepError", "planned_trials_of", "read_sweep_raw", "read_sweep_spec"]


class SweepError(LoopgolfError):
    """A sweep directory is missing, or not in the state the command needs."""


def read_sweep_spec(sweep_dir: str | os.PathLike[str]) -> SweepSpec:
    raw = read_sweep_raw(sweep_dir)
    raw.pop(HISTORY, None)  # what `resume --set` changed, and when (extend.py)
    return spec_from_dict(raw)


def read_sweep_raw(sweep_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """spec.yaml as written: the spec's fields and its history (the safe loader: a tag that would
    construct an object is an error, never run)."""
    path = Path(sweep_dir) / SPEC_FILE
    if not path.is_file():
        raise SweepError(f"{str(sweep_dir)!r} is not a sweep directory (no {SPEC_FILE})")
    return read_yaml_mapping(path, "sweep spec", SweepError)


def planned_trials_of(sweep_dir: str | os.PathLike[str], spec: SweepSpec) -> PlannedTrials:
    """The trials the sweep runs (study.planned_trials), as a callable that loads the study once and
    re-reads it per call: exact once the sampler has proposed num_samples configurations, an upper
    bound before (an unrouted proposal brings no arms)."""
    return PlannedTrials(sweep_dir, spec.name, spec.num_samples, spec.seeds, len(spec.control_arms()))
