"""SweepSearch without Ray: seeds as enqueued replicates, constraints, outcomes, resume, searcher errors."""

from __future__ import annotations

import contextlib
import itertools
import pickle
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from ray.tune.search import Searcher

from loopgolf.orchestrator.arms import arm_of, control_config, is_routed, pair_key
from loopgolf.orchestrator.ledger_schema import CONTROL_ARMS
from loopgolf.orchestrator.search import KEY, REJECTED_SENTINEL, SweepSearch, counted_keys, final_trials, make_sampler
from loopgolf.orchestrator.study import PlannedTrials, planned_trials, proposals
from loopgolf.search_spaces.spaces import Choice, ConfigSampler
from loopgolf.trial.config import preset
from tests.orchestrator.sweeps import OBJECTIVES, SPACE, searcher


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
    refusal = r"^a sweep resumes from its Optuna study, not from a searcher checkpoint$"
    with pytest.raises(NotImplementedError, match=refusal):
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
    assert copy.study is None and copy.num_samples == search.num_samples
    config = search.suggest("t0")
    assert isinstance(config, dict) and config["trial_config"]["n_blocks"] in (1, 2, 3)


@pytest.mark.parametrize("base_seed", [0, 10])
def test_a_configuration_proposed_again_continues_its_seeds(base_seed: int, tmp_path: Path) -> None:
    base = preset("tiny").replace(bits=8, codec="zlib", max_artifact_bytes=2_000_000, seed=base_seed)
    search = searcher(tmp_path, seeds=2, total=6, space={"n_blocks": Choice((1,))}, base=base)
    configs = [search.suggest(f"t{i}") for i in range(6)]
    assert len({c["config_id"] for c in configs}) == 1  # the space holds one configuration
    assert sorted(c["trial_config"]["seed"] for c in configs) == [base_seed + i for i in range(6)]


def test_a_proposal_after_a_crash_counts_each_earlier_run_once(tmp_path: Path) -> None:
    """Seeds continue after every earlier run of the configuration: an orphan and its re-run
    (one key) are one run; trials from before keys existed count one each."""
    space = {"n_blocks": Choice((1,))}
    search = searcher(tmp_path, seeds=2, total=8, space=space)
    lost = [search.suggest(f"t{i}") for i in range(2)]  # seeds 0 and 1 start; the driver dies
    resumed = searcher(tmp_path, seeds=2, total=8, space=space)
    assert resumed.requeued == 2
    reruns = [resumed.suggest(f"u{i}") for i in range(2)]
    assert sorted(c["trial_config"]["seed"] for c in reruns) == [0, 1]
    assert {c[KEY] for c in reruns} == {c[KEY] for c in lost}
    for i in range(2):
        resumed.on_trial_complete(f"u{i}", complete({}))
    done = resumed.study.trials[-1]
    for _ in range(3):  # runs recorded before trials had keys
        resumed.study.add_trial(optuna.trial.create_trial(
            params=done.params, distributions=done.distributions, values=done.values))
    proposal = resumed.suggest("u2")
    assert proposal["trial_config"]["seed"] == 2 + 3  # two keys + three unkeyed runs


def test_the_study_minimizes_and_maximizes_as_the_objectives_say(tmp_path: Path) -> None:
    search = searcher(tmp_path, objectives={"val_bpb": "min", "params": "max"})
    assert search.study.directions == [optuna.study.StudyDirection.MINIMIZE, optuna.study.StudyDirection.MAXIMIZE]


def test_an_errored_or_non_finite_trial_fails_in_the_study(tmp_path: Path) -> None:
    search = searcher(tmp_path, seeds=1, total=4)
    for i in range(4):
        search.suggest(f"t{i}")
    search.on_trial_complete("t0", complete({}), error=True)  # Tune's error flag wins over a result
    search.on_trial_complete("t1", complete({}, bpb=float("nan")))
    search.on_trial_complete("t2", complete({}, bpb=float("inf")))
    search.on_trial_complete("t3", {k: v for k, v in complete({}).items() if k != "val_bpb"})
    assert [t.state for t in search.study.trials] == [TrialState.FAIL] * 4


def test_an_exception_when_telling_optuna_is_reported(tmp_path: Path) -> None:
    """Only a grid's end is not an error; any other exception from `tell`, a RuntimeError
    included, is recorded (first one kept) and stops the sweep's suggestions."""
    class BrokenAfter(optuna.samplers.RandomSampler):
        def after_trial(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("after_trial broke")

    search = searcher(tmp_path, seeds=1, total=4, sampler=BrokenAfter(seed=0))
    search.suggest("t0")
    search.suggest("t1")
    search.on_trial_complete("t0", complete({}))
    search.on_trial_complete("t1", complete({}))
    assert search.error == "RuntimeError: after_trial broke"
    assert search.suggest("t2") == Searcher.FINISHED


def test_the_searcher_takes_an_optuna_storage_object(tmp_path: Path) -> None:
    storage = optuna.storages.InMemoryStorage()
    search = SweepSearch(
        ConfigSampler(SPACE, preset("tiny"), equal_bytes=False, byte_budget=2_000_000), OBJECTIVES, seeds=1,
        num_samples=1, storage=storage, study_name="s", sampler=make_sampler("random", seed=0), space=SPACE,
    )
    search.suggest("t0")
    assert len(storage.get_all_studies()) == 1 and len(search.study.trials) == 1


# ------------------------------------------------------------------ paired control arms

# Routed signals only: the controls' signals are outside the space; refine_passes 0 is inside it.
ROUTING_SPACE = {
    "refine_passes": Choice((0, 1)),
    "signal": Choice(("entropy", "margin")),
    "aux_loss": Choice((0.0, 0.1)),
    "n_passes": Choice((1, 2)),
}


def routing_searcher(tmp_path: Path, num_samples: int, seeds: int, sampler: Any = None, space: Any = None) -> Any:
    return searcher(tmp_path, seeds=seeds, total=num_samples * seeds, sampler=sampler, space=space or ROUTING_SPACE,
                    controls=CONTROL_ARMS)  # fmt: skip


def expected_runs(study: optuna.Study, seeds: int) -> set[tuple[str, str, int]]:
    """(proposal key, arm, seed index) of every trial the proposals plan, from the study."""
    out = set()
    for key, proposal in proposals(study).items():
        first = proposal.user_attrs["seed_index"]
        for arm in ("proposal", *proposal.user_attrs["controls"]):
            out |= {(key, arm, i) for i in range(first, first + seeds)}
    return out


def test_each_routed_proposal_runs_every_arm_at_every_seed_and_nothing_else(tmp_path: Path) -> None:
    search = routing_searcher(tmp_path, num_samples=4, seeds=2)
    assert search.max_trials == 4 * 2 * 5 == planned_trials(search.study, 4, 2, len(CONTROL_ARMS))
    configs = []
    while (config := search.suggest(f"t{len(configs)}")) != Searcher.FINISHED:
        configs.append(config)
    routed = [c for c in configs if c["arm"] == "routed"]
    unrouted = [c for c in configs if c["pair_id"] is None]
    assert routed and unrouted  # this sampler seed proposes both kinds
    assert all(not is_routed(c["trial_config"]) for c in unrouted)
    routed_at: dict[str, dict[tuple[str, int], dict]] = {}  # pair -> (routed config_id, seed) -> flat
    arms_at: dict[str, dict[tuple[str, int], dict]] = {}  # pair -> (arm, seed) -> flat
    for c in configs:
        assert c["arm"] == arm_of(c["trial_config"])
        if c["pair_id"] is not None:
            table = routed_at if c["arm"] == "routed" else arms_at
            slot = (c["config_id"] if c["arm"] == "routed" else c["arm"], c["trial_config"]["seed"])
            assert slot not in table.setdefault(c["pair_id"], {})  # exactly once
            table[c["pair_id"]][slot] = c["trial_config"]
            assert c["pair_id"] == pair_key(c["trial_config"]) or c["arm"] != "routed"
    assert sorted(arms_at) == sorted(routed_at)
    for pair_id, routed_runs in routed_at.items():  # every arm is control_config of each routed config, seed by seed
        seeds = {seed for _, seed in routed_runs}
        assert set(arms_at[pair_id]) == {(arm, seed) for arm in CONTROL_ARMS for seed in seeds}, pair_id
        for (_, seed), flat in routed_runs.items():
            for arm in CONTROL_ARMS:
                assert arms_at[pair_id][(arm, seed)] == control_config(flat, arm)
    # Each proposal brings its seeds; each pair its 4 arms at every seed its routed configurations run.
    arm_trials = sum(len(slots) for slots in arms_at.values())
    assert len(configs) == planned_trials(search.study, 4, 2, len(CONTROL_ARMS)) == 2 * 4 + arm_trials
    # What the study holds: an arm's routing value is a param where the space can hold it.
    by_key = {t.user_attrs[KEY]: t for t in search.study.trials}
    for c in configs:
        params, flat = by_key[c[KEY]].params, c["trial_config"]
        if c["pair_id"] is not None and c["arm"] != "routed":
            assert by_key[c[KEY]].user_attrs["arm"] == c["arm"]
        if c["arm"] == "no_refine" and c["pair_id"] is not None:
            assert params["refine_passes"] == 0 and params["signal"] == flat["signal"] == "entropy"
        if c["arm"] in ("uniform", "stride", "random"):
            assert "signal" not in params and params["refine_passes"] == 1


def test_a_routing_grid_queues_arms_as_fully_fixed_trials(tmp_path: Path) -> None:
    # GridSampler refuses a queued trial that suggests a param it does not fix.
    space = {"signal": Choice(("entropy", "kl")), "aux_loss": Choice((0.0, 0.1))}
    grid = make_sampler("grid", seed=0, grid={"signal": ["entropy", "kl"], "aux_loss": [0.0, 0.1]})
    base = preset("tiny").replace(bits=8, codec="zlib", max_artifact_bytes=2_000_000, refine_passes=1)
    search = SweepSearch(
        ConfigSampler(space, base, equal_bytes=False, byte_budget=2_000_000), OBJECTIVES, seeds=1, num_samples=4,
        storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="s", sampler=grid, space=space,
        controls=("no_refine", "uniform"),
    )  # fmt: skip
    configs = []
    while (config := search.suggest(f"t{len(configs)}")) != Searcher.FINISHED:
        configs.append(config)
        search.on_trial_complete(f"t{len(configs) - 1}", complete(config))
    assert search.error is None and search.grid_exhausted()
    routed = {(c["trial_config"]["signal"], c["trial_config"]["aux_loss"]) for c in configs if c["arm"] == "routed"}
    assert routed == {("entropy", 0.0), ("entropy", 0.1), ("kl", 0.0), ("kl", 0.1)}
    # entropy and kl at one aux_loss are one pair: its arms run once for both
    assert sorted(c["arm"] for c in configs) == sorted(["routed"] * 4 + ["no_refine", "uniform"] * 2)
    pairs = {c["pair_id"]: c["trial_config"]["aux_loss"] for c in configs}
    assert sorted(pairs.values()) == [0.0, 0.1]


def dies_on_the_third(enqueue: Any, calls: list[int]) -> Any:
    """`enqueue_trial` of a driver killed at its third call."""

    def enqueue_or_die(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed while queuing")
        enqueue(*args, **kwargs)

    return enqueue_or_die


def test_killed_drivers_leave_every_proposal_arm_and_seed_run_exactly_once(tmp_path: Path) -> None:
    """A fake Tune loop (no Ray): trials start and end in random order; four times the driver
    is killed (its running trials left RUNNING), the first while queuing a proposal's arms;
    a fresh searcher on the study continues. Every (proposal, arm, seed) ends exactly once,
    and a re-run is handed the same configuration as the lost run."""
    import random

    rng, seeds = random.Random(0), 2
    search = routing_searcher(tmp_path, num_samples=4, seeds=seeds)
    requeued: list[int] = []  # per resume: orphans queued again
    completed: list[int] = []  # per resume: followers a killed driver had not queued
    handed: dict[str, list[dict]] = {}  # key -> every config handed to Tune for it
    running: list[str] = []
    kills, broken_queue, names = 0, False, iter(f"t{i}" for i in range(10_000))
    for event in itertools.count():  # running trials stay RUNNING when the driver dies
        if kills < 4 and event >= 9 * kills + 4 and (kills == 0 or len(running) >= 2):  # the driver dies
            if kills == 0:  # this time in the middle of queuing a proposal's followers
                calls: list[int] = []
                search.study.enqueue_trial = dies_on_the_third(search.study.enqueue_trial, calls)  # type: ignore
                while len(calls) < 3:  # suggest until a proposal queues (its trials start, then the kill)
                    with contextlib.suppress(KeyboardInterrupt):
                        config = search.suggest(next(names))
                        if isinstance(config, dict):
                            handed.setdefault(config[KEY], []).append(config)
                broken_queue = True
            kills += 1
            search = routing_searcher(tmp_path, num_samples=4, seeds=seeds)
            requeued.append(search.requeued)
            completed.append(search.completed)
            running = []
            continue
        if running and (len(running) >= 3 or rng.random() < 0.5):
            trial_id = running.pop(rng.randrange(len(running)))
            search.on_trial_complete(trial_id, complete({}, bpb=rng.uniform(1, 3)))
            continue
        trial_id = next(names)
        config = search.suggest(trial_id)
        if config == Searcher.FINISHED:
            if not running:
                break
            continue
        handed.setdefault(config[KEY], []).append(config)
        running.append(trial_id)
    assert kills == 4 and broken_queue and search.error is None
    assert completed[0] > 0 and completed[1:] == [0, 0, 0] and all(n > 0 for n in requeued), (completed, requeued)
    study = search.study
    final = final_trials(study)
    assert all(t.state == TrialState.COMPLETE for t in final.values())
    ran = [(t.user_attrs.get("follows", key), t.user_attrs.get("arm", "proposal"), t.user_attrs["seed_index"])
           for key, t in final.items()]  # fmt: skip
    assert len(ran) == len(set(ran))  # exactly once
    assert set(ran) == expected_runs(study, seeds)  # nothing missing
    assert len(ran) == planned_trials(study, 4, seeds, len(CONTROL_ARMS))
    assert len(proposals(study)) == 4
    for key, configs in handed.items():  # a re-run runs the very same configuration, in the same directory
        assert all(c == configs[0] for c in configs), key
    pairs = {}
    for key in final:
        config = handed[key][0]
        if config["pair_id"] is not None:
            slot = (config["pair_id"], config["arm"], config["trial_config"]["seed"])
            assert slot not in pairs
            pairs[slot] = key


def test_the_progress_lines_total_loads_the_study_once_and_sees_every_later_proposal(tmp_path: Path) -> None:
    total = PlannedTrials(tmp_path, "s", num_samples=4, seeds=2, n_arms=len(CONTROL_ARMS))
    assert total() == 4 * 2 * (1 + len(CONTROL_ARMS))  # no database yet: the upper bound
    search = routing_searcher(tmp_path, num_samples=4, seeds=2)
    configs = []
    while (config := search.suggest(f"t{len(configs)}")) != Searcher.FINISHED:
        configs.append(config)
        assert total() == planned_trials(search.study, 4, 2, len(CONTROL_ARMS))  # this proposal's arms counted
    study = total.study
    assert total() == len(configs) and total.study is study  # exact at the end, from the one study object
