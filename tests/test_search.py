"""SweepSearch without Ray: seeds as enqueued replicates, constraints, outcomes, crash recovery."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from optuna.trial import TrialState
from ray.tune.search import Searcher

from loopgolf.orchestrator.search import ORPHANED, REJECTED_SENTINEL, SweepSearch, make_sampler
from loopgolf.search_spaces.spaces import Choice, ConfigSampler
from loopgolf.trial.config import preset

OBJECTIVES = {"val_bpb": "min", "artifact_bytes": "min"}


def searcher(tmp_path: Path, seeds: int = 2, total: int = 6) -> SweepSearch:
    base = preset("tiny").replace(bits=8, codec="zlib", max_artifact_bytes=2_000_000)
    space = {"n_blocks": Choice((1, 2, 3)), "n_passes": Choice((1, 2)), "d_model": Choice((32, 64))}
    search = SweepSearch(
        ConfigSampler(space, base, equal_bytes=False, byte_budget=2_000_000),
        OBJECTIVES,
        seeds=seeds,
        total_trials=total,
        storage_url=f"sqlite:///{tmp_path / 'optuna.db'}",
        study_name="s",
        sampler=make_sampler("random", seed=0),
    )
    return search


def complete(config: dict[str, Any], bpb: float = 2.0, **extra: Any) -> dict[str, Any]:
    return {"status": "complete", "val_bpb": bpb, "artifact_bytes": 1000.0, "byte_violation": -5.0,
            "eval_violation": 0.0} | extra  # fmt: skip


def test_each_configuration_runs_once_per_seed(tmp_path: Path) -> None:
    search = searcher(tmp_path, seeds=3, total=6)
    configs = [search.suggest(f"t{i}") for i in range(6)]
    assert search.suggest("t6") == Searcher.FINISHED
    first, second = configs[:3], configs[3:]
    assert len({c["config_id"] for c in first}) == 1 and len({c["config_id"] for c in second}) == 1
    assert [c["trial_config"]["seed"] for c in first] == [0, 1, 2]
    assert {k: v for k, v in first[0]["trial_config"].items() if k != "seed"} == {
        k: v for k, v in first[2]["trial_config"].items() if k != "seed"
    }
    study = search._ot_study
    assert len(study.trials) == 6 and all(t.state == TrialState.RUNNING for t in study.trials)


def test_outcomes_reach_the_study_with_constraints(tmp_path: Path) -> None:
    search = searcher(tmp_path, seeds=1, total=4)
    for i in range(4):
        search.suggest(f"t{i}")
    search.on_trial_complete("t0", complete({}, byte_violation=123.0))
    search.on_trial_complete("t1", {"status": "rejected", "byte_violation": 999.0})
    search.on_trial_complete("t2", {"status": "failed", "error": "non-finite"})
    search.on_trial_complete("t3", {"step": 5, "quick_val_bpb": 3.0})  # stopped early: no final metrics
    t0, t1, t2, t3 = search._ot_study.trials
    assert t0.state == TrialState.COMPLETE and t0.values == [2.0, 1000.0]
    assert t0.system_attrs["constraints:byte_violation"] == 123.0
    assert t0.system_attrs["constraints:eval_violation"] == 0.0
    assert "constraints:predicted_byte_violation" in t0.system_attrs
    assert t1.state == TrialState.COMPLETE and t1.values == [REJECTED_SENTINEL, REJECTED_SENTINEL]
    assert t1.system_attrs["constraints:byte_violation"] == 999.0
    assert (t2.state, t3.state) == (TrialState.FAIL, TrialState.PRUNED)


def test_a_stale_searcher_never_tells_a_trial_twice_nor_loses_a_configuration(tmp_path: Path) -> None:
    search = searcher(tmp_path, seeds=2, total=4)
    search.suggest("t0")  # a new config; its second seed waits in the study
    saved = tmp_path / "searcher.pkl"
    search.save(str(saved))  # the last experiment checkpoint before the crash
    search.on_trial_complete("t0", complete({}))
    lost = search.suggest("t1")  # popped the waiting replicate; Tune never saved this trial
    # The driver dies here. Tune restores the searcher from the older pickle:
    restored = searcher(tmp_path, seeds=2, total=4)
    restored.restore(str(saved))
    restored.on_trial_complete("t0", complete({}, bpb=9.9))  # t0 finishes again after the restore
    states = [(t.number, t.state, t.user_attrs.get(ORPHANED, False)) for t in restored._ot_study.trials]
    assert states[0] == (0, TrialState.COMPLETE, False) and restored._ot_study.trials[0].values[0] == 2.0
    assert states[1] == (1, TrialState.FAIL, True)  # the lost trial's Optuna twin, failed and marked
    again = restored.suggest("t2")  # ... and its configuration and seed come back
    assert again["trial_config"] == lost["trial_config"]
    restored.on_trial_complete("t2", complete({}))
    for i in (3, 4):
        restored.suggest(f"t{i}")
    assert restored.suggest("t5") == Searcher.FINISHED  # 4 counted trials; the orphan does not count


@pytest.mark.parametrize("algorithm", ["tpe", "nsga2", "random", "grid"])
def test_every_algorithm_has_a_sampler(algorithm: str) -> None:
    sampler = make_sampler(algorithm, seed=1, grid={"n_blocks": [1, 2]})
    assert sampler is not None


def test_a_configuration_proposed_again_continues_its_seeds(tmp_path: Path) -> None:
    base = preset("tiny").replace(bits=8, codec="zlib")
    search = SweepSearch(
        ConfigSampler({"n_blocks": Choice((1,))}, base, equal_bytes=False, byte_budget=2_000_000),
        OBJECTIVES, seeds=2, total_trials=6, storage_url=f"sqlite:///{tmp_path / 'optuna.db'}",
        study_name="s", sampler=make_sampler("random", seed=0),
    )  # fmt: skip
    configs = [search.suggest(f"t{i}") for i in range(6)]
    assert len({c["config_id"] for c in configs}) == 1  # the space holds one configuration
    assert sorted(c["trial_config"]["seed"] for c in configs) == [0, 1, 2, 3, 4, 5]
