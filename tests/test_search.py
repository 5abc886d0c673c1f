"""SweepSearch without Ray: seeds as enqueued replicates, constraints, outcomes, resume, searcher errors."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from ray.tune.search import Searcher

from loopgolf.orchestrator.search import KEY, REJECTED_SENTINEL, SweepSearch, counted_keys, final_trials, make_sampler
from loopgolf.search_spaces.spaces import Choice, ConfigSampler
from loopgolf.trial.config import preset

OBJECTIVES = {"val_bpb": "min", "artifact_bytes": "min"}


SPACE = {"n_blocks": Choice((1, 2, 3)), "n_passes": Choice((1, 2)), "d_model": Choice((32, 64))}


def searcher(
    tmp_path: Path, seeds: int = 2, total: int = 6, sampler: Any = None, space: Any = None, objectives: Any = None
) -> SweepSearch:
    base = preset("tiny").replace(bits=8, codec="zlib", max_artifact_bytes=2_000_000)
    return SweepSearch(
        ConfigSampler(space or SPACE, base, equal_bytes=False, byte_budget=2_000_000),
        objectives or OBJECTIVES,
        seeds=seeds,
        total_trials=total,
        storage_url=f"sqlite:///{tmp_path / 'optuna.db'}",
        study_name="s",
        sampler=sampler or make_sampler("random", seed=0),
    )


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
    study = search.study
    assert len(study.trials) == 6 and all(t.state == TrialState.RUNNING for t in study.trials)
    assert [c[KEY] for c in configs] == [t.user_attrs[KEY] for t in study.trials]  # one directory per trial
    assert len({c[KEY] for c in configs}) == 6


def test_outcomes_reach_the_study_with_constraints(tmp_path: Path) -> None:
    search = searcher(tmp_path, seeds=1, total=4)
    for i in range(4):
        search.suggest(f"t{i}")
    search.on_trial_complete("t0", complete({}, byte_violation=123.0))
    search.on_trial_complete("t1", {"status": "rejected", "byte_violation": 999.0})
    search.on_trial_complete("t2", {"status": "failed", "error": "non-finite"})
    search.on_trial_complete("t3", {"step": 5, "quick_val_bpb": 3.0})  # stopped early: no final metrics
    t0, t1, t2, t3 = search.study.trials
    assert t0.state == TrialState.COMPLETE and t0.values == [2.0, 1000.0]
    assert t0.system_attrs["constraints:byte_violation"] == 123.0
    assert t0.system_attrs["constraints:eval_violation"] == 0.0
    assert "constraints:predicted_byte_violation" in t0.system_attrs
    assert t1.state == TrialState.COMPLETE and t1.values == [REJECTED_SENTINEL, REJECTED_SENTINEL]
    assert t1.system_attrs["constraints:byte_violation"] == 999.0
    assert (t2.state, t3.state) == (TrialState.FAIL, TrialState.PRUNED)


def test_trials_a_dead_driver_left_running_run_again_with_their_key_and_seed(tmp_path: Path) -> None:
    search = searcher(tmp_path, seeds=2, total=4)
    first = search.suggest("t0")  # a new config; its second seed waits in the study
    search.on_trial_complete("t0", complete({}))
    lost = search.suggest("t1")  # the waiting replicate starts; then the driver dies
    search.on_trial_complete("t0", complete({}, bpb=9.9))  # told once: a second tell is ignored
    assert search.study.trials[0].values[0] == 2.0
    # A fresh searcher on the same study (what `resume` builds): the lost trial is re-queued.
    resumed = searcher(tmp_path, seeds=2, total=4)
    assert resumed.requeued == 1
    assert search.study.trials[1].state == TrialState.FAIL
    again = resumed.suggest("u0")
    assert again["trial_config"] == lost["trial_config"] and again[KEY] == lost[KEY] != first[KEY]
    resumed.on_trial_complete("u0", complete({}))
    for i in (1, 2):  # the lost run and its re-run count once: two more trials run before the total
        assert isinstance(resumed.suggest(f"u{i}"), dict), i
    assert resumed.suggest("u3") == Searcher.FINISHED  # 4 trials: the lost run and its re-run are one
    assert len(counted_keys(resumed.study)) == 4
    final = final_trials(resumed.study)
    assert final[lost[KEY]].state == TrialState.COMPLETE and len(final) == 2  # two told so far, once each


def test_a_resumed_searcher_with_nothing_left_running_changes_nothing(tmp_path: Path) -> None:
    search = searcher(tmp_path, seeds=1, total=2)
    for i in range(2):
        search.suggest(f"t{i}")
        search.on_trial_complete(f"t{i}", complete({}))
    resumed = searcher(tmp_path, seeds=1, total=2)
    assert resumed.requeued == 0 and resumed.suggest("u0") == Searcher.FINISHED
    assert len(resumed.study.trials) == 2


def test_a_grid_that_runs_out_ends_the_sweep_instead_of_raising(tmp_path: Path) -> None:
    # Optuna's GridSampler calls study.stop() in `tell` once every grid point ran; outside
    # study.optimize that raised RuntimeError and killed the driver (issue 13, case 5).
    space = {"n_blocks": Choice((1, 2))}
    grid = make_sampler("grid", seed=0, grid={"n_blocks": [1, 2]})
    search = searcher(tmp_path, seeds=1, total=4, sampler=grid, space=space)
    search.suggest("t0")
    search.suggest("t1")
    search.on_trial_complete("t0", complete({}))
    search.on_trial_complete("t1", {"status": "failed", "error": "non-finite loss"})  # the last one fails
    assert search.error is None
    assert search.suggest("t2") == Searcher.FINISHED
    assert [t.state for t in search.study.trials] == [TrialState.COMPLETE, TrialState.FAIL]


def test_an_exception_inside_optuna_stops_suggestions_and_is_reported(tmp_path: Path) -> None:
    class Broken(optuna.samplers.RandomSampler):
        def sample_independent(self, *args: Any, **kwargs: Any) -> Any:
            raise ValueError("sampler broke")

    search = searcher(tmp_path, seeds=1, total=4, sampler=Broken(seed=0))
    assert search.suggest("t0") == Searcher.FINISHED
    assert search.error == "ValueError: sampler broke"


def test_the_searcher_writes_no_checkpoint_and_refuses_one(tmp_path: Path) -> None:
    search = searcher(tmp_path)
    search.save(str(tmp_path / "searcher.pkl"))
    assert not (tmp_path / "searcher.pkl").exists()
    with pytest.raises(NotImplementedError):
        search.restore(str(tmp_path / "searcher.pkl"))


@pytest.mark.parametrize(
    ("algorithm", "kind"),
    [("tpe", optuna.samplers.TPESampler), ("nsga2", optuna.samplers.NSGAIISampler),
     ("random", optuna.samplers.RandomSampler), ("grid", optuna.samplers.GridSampler)],
)  # fmt: skip
def test_every_algorithm_has_its_seeded_sampler(algorithm: str, kind: type) -> None:
    grid = {"n_blocks": [1, 2, 3, 4]}
    assert type(make_sampler(algorithm, seed=1, grid=grid)) is kind

    def first_points(seed: int) -> list[int]:
        study = optuna.create_study(sampler=make_sampler(algorithm, seed=seed, grid=grid))
        space = {"n_blocks": optuna.distributions.IntDistribution(1, 4)}
        return [study.ask(space).params["n_blocks"] for _ in range(4)]

    assert first_points(1) == first_points(1)  # the sweep's search.seed makes the proposals reproducible


def test_an_unknown_algorithm_is_one_line() -> None:
    with pytest.raises(ValueError, match=r"^algorithm='cma': expected tpe, nsga2, random or grid$"):
        make_sampler("cma", seed=0)


def test_a_rejected_configuration_scores_worst_in_each_objectives_direction(tmp_path: Path) -> None:
    """A never-trained configuration must not look best to a sampler maximizing an objective."""
    search = searcher(tmp_path, seeds=1, total=2, objectives={"val_bpb": "min", "params": "max"})
    search.suggest("t0")
    search.on_trial_complete("t0", {"status": "rejected", "byte_violation": 10.0})
    (rejected,) = search.study.trials
    assert rejected.values == [REJECTED_SENTINEL, -REJECTED_SENTINEL]


@pytest.mark.parametrize("algorithm", ["tpe", "nsga2", "random", "grid"])
def test_every_algorithm_survives_tunes_pickling_of_the_searcher(algorithm: str, tmp_path: Path) -> None:
    # Tuner pickles its search algorithm when it starts; NSGA-II's sampler holds a lock.
    grid = {"n_blocks": [1, 2, 3], "n_passes": [1, 2], "d_model": [32, 64]}
    search = searcher(tmp_path, sampler=make_sampler(algorithm, seed=1, grid=grid))
    copy = pickle.loads(pickle.dumps(search))
    assert copy.study is None and copy.total_trials == search.total_trials
    config = search.suggest("t0")
    assert isinstance(config, dict) and config["trial_config"]["n_blocks"] in (1, 2, 3)


def test_a_configuration_proposed_again_continues_its_seeds(tmp_path: Path) -> None:
    search = searcher(tmp_path, seeds=2, total=6, space={"n_blocks": Choice((1,))})
    configs = [search.suggest(f"t{i}") for i in range(6)]
    assert len({c["config_id"] for c in configs}) == 1  # the space holds one configuration
    assert sorted(c["trial_config"]["seed"] for c in configs) == [0, 1, 2, 3, 4, 5]
