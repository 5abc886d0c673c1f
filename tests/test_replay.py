"""The search replay harness (bench/replay_search.py, bench/replay_halving.py) on a hand-made table."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the bench scripts import each other

import replay_halving
import replay_search
from record_search_table import base_config

from loopgolf.search_spaces.spaces import ConfigSampler

CAP = 1_000_000
OBJECTIVES = ("val_bpb", "artifact_bytes")


def hand_made_table() -> replay_search.ReplayTable:
    """Four configurations x two seeds, not a full grid: (2, 2) and (4, 1) have no row."""
    rows = []
    for n_blocks, n_passes, bpb, size in [(1, 1, 2.0, 100), (1, 2, 1.8, 100), (2, 1, 1.9, 200), (4, 2, 1.5, 400)]:
        for seed in (0, 1):
            rows.append({
                "n_blocks": n_blocks, "n_passes": n_passes, "seed": seed, "status": "complete",
                "val_bpb": bpb + 0.01 * seed, "artifact_bytes": size * 1000 + seed,
                "eval_flops_per_token": 1e5 * n_blocks * n_passes, "predicted_artifact_bytes": size * 1000,
                "train_seconds": 6.0, "curve_seconds": [1.0, 2.0, 4.0, 6.0],
                "curve_bpb": [bpb + 1.0, bpb + 0.5, bpb + 0.2, bpb],
            })  # fmt: skip
    return replay_search.ReplayTable(pd.DataFrame(rows), ("n_blocks", "n_passes"), CAP)


def test_a_suggestion_is_answered_by_its_nearest_configuration_and_a_recorded_seed() -> None:
    table = hand_made_table()
    rng = np.random.default_rng(0)
    answers = [table.answer({"n_blocks": 3, "n_passes": 2}, rng) for _ in range(40)]
    assert {int(table.column("n_blocks")[r]) for r in answers} == {4}
    assert {int(table.column("seed")[r]) for r in answers} == {0, 1}
    exact = table.answer({"n_blocks": 2, "n_passes": 1}, rng)
    assert (table.column("n_blocks")[exact], table.column("n_passes")[exact]) == (2, 1)


def test_the_replay_drives_the_real_sweep_search_and_answers_what_it_proposed() -> None:
    table = hand_made_table()
    space = table.space("shared_vs_unique", {"n_prelude": 0, "n_coda": 0, "d_model": 64})
    sample = ConfigSampler(space, base_config(), equal_bytes=False, byte_budget=CAP)
    search = replay_search.replay_search(sample, OBJECTIVES, 10, optuna.samplers.RandomSampler(seed=3))
    trials = replay_search.drive(
        search, table, OBJECTIVES, 10, np.random.default_rng(1), replay_search.run_to_end(table)
    )
    study = search.study.get_trials(deepcopy=False)
    assert [t.state for t in study] == [TrialState.COMPLETE] * 10
    # the grid (n_blocks x n_passes) holds two points the table lacks: their nearest, by hand (L1 over ranges 3 and 1)
    nearest = {(2, 2): (1, 2), (4, 1): (2, 1)}
    for told, trial in zip(study, trials, strict=True):
        proposed = (told.params["n_blocks"], told.params["n_passes"])
        answered = (table.column("n_blocks")[trial.row], table.column("n_passes")[trial.row])
        assert answered == nearest.get(proposed, proposed)
        assert told.values == [table.column(m)[trial.row] for m in OBJECTIVES]
    assert len({(t.params["n_blocks"], t.params["n_passes"]) for t in study}) > 1


def test_hypervolume_is_normalised_to_the_tables_box() -> None:
    table = hand_made_table()
    box = replay_search.Box.from_table(table, OBJECTIVES)
    assert box.low.tolist() == [1.5, 100_000] and box.high.tolist() == [2.01, 400_001]
    row = {(table.column("n_blocks")[r], table.column("n_passes")[r], table.column("seed")[r]): r for r in range(8)}
    trials = [
        replay_search.ReplayedTrial(row[1, 1, 0], "complete", 6.0),
        replay_search.ReplayedTrial(row[4, 2, 0], "stopped", 1.0),
    ]
    # (2.0, 100000) alone: (1 - 0.5/0.51) x (1 - 0) of the unit box
    assert replay_search.hypervolume_after(table, trials, 2, OBJECTIVES, box) == pytest.approx(1 - 0.5 / 0.51)
    assert replay_search.hypervolume_after(table, trials[1:], 1, OBJECTIVES, box) == 0.0  # stopped: no front


def test_summary_ratios_are_to_randoms_median() -> None:
    figures = pd.DataFrame({
        "front": "bytes", "trials": 8, "algorithm": ["random"] * 3 + ["tpe"] * 3, "rep": [0, 1, 2] * 2,
        "hv": [0.2, 0.4, 0.6, 0.5, 0.6, 0.7],
    })  # fmt: skip
    summary = replay_search.summarize(figures).set_index("algorithm")
    assert summary.loc["tpe", "median_vs_random"] == pytest.approx(0.6 / 0.4)
    assert summary.loc["random", "q25_vs_random"] == pytest.approx(0.3 / 0.4)


def test_pareto_halving_stops_the_dominated_trial_at_its_rung_and_the_searcher_prunes_it() -> None:
    table = hand_made_table()
    static = replay_halving.known_before_training(table, base_config(), "artifact_bytes")
    row = {(table.column("n_blocks")[r], table.column("n_passes")[r], table.column("seed")[r]): r for r in range(8)}
    halving = replay_halving.ParetoHalving(table, static, rungs=(2.0,), eta=2)
    assert halving("a", row[1, 2, 0]) == ("complete", 6.0)  # first at the rung: continues
    assert halving("b", row[1, 1, 0]) == ("stopped", 2.0)  # same bytes, worse bpb at 2 s
    assert halving("c", row[4, 2, 0]) == ("complete", 6.0)  # more bytes, better bpb: on the front
    assert halving.seen[2.0] == {"a": (2.3, 100_000.0), "b": (2.5, 100_000.0), "c": (2.0, 400_000.0)}
    trial = replay_search.ReplayedTrial(row[1, 1, 0], "stopped", 2.0)
    assert replay_search.result_of(table, trial, OBJECTIVES) == {"status": "stopped"}


def test_analytic_flops_are_one_value_per_configuration_and_grow_with_block_applications() -> None:
    table = hand_made_table()
    flops = replay_halving.known_before_training(table, base_config(), "eval_flops_per_token")
    by_config = {}
    for rows in table.members:
        values = set(flops[rows].tolist())
        assert len(values) == 1
        by_config[table.column("n_blocks")[rows[0]], table.column("n_passes")[rows[0]]] = values.pop()
    assert by_config[1, 1] < by_config[1, 2] == by_config[2, 1] < by_config[4, 2]  # 1, 2, 2, 8 applications
