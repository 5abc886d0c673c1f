"""The report's six sections on synthetic sweeps with planted effects, and their absence."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from loopgolf.analysis.evidence import Matrix, ReportConfig, competing, held_out_best
from loopgolf.analysis.questions import after_compression, routed_vs_controls, routing_overhead, shared_vs_unique
from loopgolf.analysis.report import report
from loopgolf.analysis.results import load_results
from loopgolf.analysis.token_questions import robustness, where_refinement_helps
from loopgolf.analysis.tokens import TokenStore
from loopgolf.errors import LoopgolfError
from tests.analysis.synthetic_sweeps import LOOPED, UNIQUE, SweepWriter, full_sweep

CFG = ReportConfig()


def _load(*dirs: Path) -> tuple[pd.DataFrame, TokenStore]:
    frames = [load_results(d) for d in dirs]
    df = pd.concat(frames, ignore_index=True)
    where = {t: d for d, f in zip(dirs, frames, strict=True) for t in f["trial_id"]}
    return competing(df), TokenStore(df, where)


def test_routed_vs_no_refine_equals_the_hand_computed_paired_delta(tmp_path: Path) -> None:
    sweep = full_sweep(tmp_path)
    rows, store = _load(sweep)
    table = routed_vs_controls(rows, store, CFG).table
    no_refine = table[table["control"] == "no_refine"].iloc[0]
    # by hand, from the files: sum over seeds of CE(routed) - CE(no_refine), in bits, over the bytes
    delta_bits, total_bytes = 0.0, 0.0
    for seed in range(3):
        pick = lambda arm: rows[(rows["arm"] == arm) & (rows["seed"] == seed)].iloc[0]  # noqa: B023, E731
        a = pd.read_parquet(sweep / pick("routed")["eval_tokens_path"])
        b = pd.read_parquet(sweep / pick("no_refine")["eval_tokens_path"])
        delta_bits += (a["ce"].astype(float) - b["ce"].astype(float)).sum() / math.log(2)
        total_bytes += a["bytes"].sum()
    assert no_refine["_value"] == pytest.approx(delta_bits / total_bytes, rel=1e-9)
    assert no_refine["_low"] < no_refine["_value"] < no_refine["_high"] < 0  # planted gain: found
    assert no_refine["significant"] and no_refine["docs"] == 40 and no_refine["seeds"] == 3
    assert list(table["control"]) == ["no_refine", "uniform", "stride", "random"]
    assert (table["p (Holm)"] >= table["p"]).all()


def test_no_planted_gain_is_not_found(tmp_path: Path) -> None:
    rows, store = _load(full_sweep(tmp_path, refine_gain=0.0, looped_effect=0.0))
    assert not routed_vs_controls(rows, store, CFG).table["significant"].any()
    assert not shared_vs_unique(rows, store, CFG).table["significant"].any()


def test_shared_vs_unique_splits_and_finds_the_looped_gain(tmp_path: Path) -> None:
    rows, store = _load(full_sweep(tmp_path, seeds=4))
    answer = shared_vs_unique(rows, store, CFG)
    overview = answer.extra[0][1]  # every configuration with its eval standard error from documents
    assert len(overview) == 8 and (overview["seeds"] == 4).all()
    assert ((overview["eval SE (documents)"] > 0) & (overview["eval SE (documents)"] < 0.05)).all()
    table = answer.table.set_index("looped subset")
    assert set(table.index) == {"all looped", "strict sharing (phase none)", "relaxed (per-pass phase)",
                                "single block", "few blocks", "narrow (d <= 256)", "wide (d > 256)"}  # fmt: skip
    strict = table.loc["strict sharing (phase none)"]
    assert strict["significant"] and strict["_value"] < 0 and "2x3" in strict["looped"]
    assert strict["selection"].startswith("looped: best of 2, picked on the even documents and its first 1 seed")
    assert strict["selection"].endswith("unique: the only configuration")
    relaxed = table.loc["relaxed (per-pass phase)"]
    assert relaxed["selection"].startswith("looped: the only configuration") and not relaxed["significant"]
    assert table.loc["all looped", "fill A/B"] == "0.900/0.900"


def test_held_out_best_tests_the_winner_on_data_it_was_not_picked_on() -> None:
    rng = np.random.default_rng(0)
    configs = {c: Matrix((0, 1, 2, 3), rng.random((4, 10)), np.ones((4, 10))) for c in "abc"}
    configs["b"] = Matrix((0, 1, 2, 3), configs["b"].num - 1.0, np.ones((4, 10)))  # clearly best
    pick = held_out_best(configs, min_seeds=2)
    assert pick.config_id == "b" and pick.test.seeds == (1, 2, 3) and pick.test.num.shape == (3, 5)
    np.testing.assert_array_equal(pick.test.num, configs["b"].num[1:, 1::2])


def test_where_refinement_helps_profiles_and_auc(tmp_path: Path) -> None:
    rows, store = _load(full_sweep(tmp_path))
    table = where_refinement_helps(rows, store, CFG).table
    deciles = table[table["by"] == "decile"].set_index("bucket")
    assert deciles.loc["9", "_value"] < -0.5 and deciles.loc["9", "significant"]  # planted: top decile gains
    assert not deciles.loc["8", "significant"]  # refined, but no gain planted there
    auc = table[table["by"] == "AUC (score vs gain)"].iloc[0]
    assert 0.5 < auc["_value"] < 1 and auc["significant"]
    assert set(table["by"]) == {"decile", "position", "frequency", "AUC (score vs gain)"}


def test_overhead_compression_and_robustness(tmp_path: Path) -> None:
    rows, store = _load(full_sweep(tmp_path))
    overhead = routing_overhead(rows, store, CFG).table.set_index("phase")
    assert overhead.loc["eval", "FLOP ratio"] == pytest.approx(0.8)
    assert overhead.loc["eval", "time ratio [95% CI]"].startswith("0.6")  # 2 s vs 3 s
    assert overhead.loc["train", "time ratio [95% CI]"] == "1.000" and math.isnan(overhead.loc["train", "p"])
    compression = after_compression(rows, store, CFG)
    assert list(compression.table["gain"]) == ["before", "after", "after − before"]
    assert compression.extra[0][1]["exact"].all()
    robust = robustness(rows, store, CFG).table
    assert list(robust["seed"]) == [0, 1, 2] and (robust["docs where routing hurt"] < 0.2).all()
    assert (robust["top 10% docs' share of gain"] > 0.1).all()


def test_sections_say_what_is_missing(tmp_path: Path) -> None:
    w = SweepWriter(tmp_path, "plain", per_token=False, fingerprint=None)
    for seed in range(3):
        w.trial(UNIQUE, seed)
        w.trial(LOOPED, seed, effect=-0.2)
    rows, store = _load(w.write())
    for question in (routed_vs_controls, where_refinement_helps, routing_overhead, after_compression, robustness):
        answer = question(rows, store, CFG)
        assert answer.table.empty and answer.missing.startswith("No paired arms in this sweep")
    q1 = shared_vs_unique(rows, store, CFG).table.iloc[0]
    assert q1["docs"] == 1 and "optimistic" not in q1["selection"]  # one config a side: nothing picked
    assert len(shared_vs_unique(rows, store, CFG).table) == 1  # the splits split nothing: not repeated


def test_groups_never_pool_different_data(tmp_path: Path) -> None:
    dirs = []
    for name, fingerprint in (("a", "data-a"), ("b", "data-b")):
        w = SweepWriter(tmp_path, name, fingerprint=fingerprint, seed=len(dirs))
        for seed in range(3):
            w.trial(UNIQUE, seed)
            w.trial(LOOPED, seed, effect=-0.2 if name == "a" else 0.0)
        dirs.append(w.write())
    rows, store = _load(*dirs)
    table = shared_vs_unique(rows, store, CFG).table
    overall = table[table["looped subset"] == "all looped"]
    assert len(overall) == 2 and overall["group"].str.contains("data_fingerprint=data-a").sum() == 1
    assert overall.set_index(overall["group"].str.extract(r"(data-.)")[0])["significant"].to_dict() == {
        "data-a": True, "data-b": False,
    }


def test_report_writes_every_section_and_file(tmp_path: Path) -> None:
    path = report(full_sweep(tmp_path), out_dir=tmp_path / "out")
    text = path.read_text()
    for k in range(1, 7):
        assert f"\n## {k}. " in text
    assert "Not answered" not in text and "## Pareto fronts" in text and "## Learning curves" in text
    names = {p.name for p in path.parent.iterdir()}
    assert names == {"report.md", "report.html", "learning_curves.png", "pareto_bytes.png", "pareto_flops.png",
                     *(f"section{k}.png" for k in range(1, 7))}  # fmt: skip
    for name in names - {"report.md", "report.html"}:
        assert f"]({name})" in text and (path.parent / name).read_bytes()[:4] == b"\x89PNG"
    page = (path.parent / "report.html").read_text()
    assert "<script src" not in page and 'src="http' not in page  # self-contained: the JS is inlined
    assert page.count("Plotly.newPlot") == 3  # two fronts and the learning curves
    assert page.count("<img alt=") == 6 and page.count("<h2>") == 8  # six sections, fronts, curves


def test_report_on_a_sweep_without_arms_or_tokens(tmp_path: Path) -> None:
    w = SweepWriter(tmp_path, "plain", per_token=False, fingerprint=None)
    w.trial(UNIQUE, 0)
    text = report(w.write()).read_text()
    assert text.count("**Not answered:** No paired arms in this sweep") == 5
    assert "no per-token evaluation files" in text and "has no `data_fingerprint`" in text


def test_a_per_token_file_of_the_wrong_length_is_an_error(tmp_path: Path) -> None:
    sweep = full_sweep(tmp_path)
    rows, store = _load(sweep)
    victim = rows[rows["arm"] == "routed"].iloc[0]["eval_tokens_path"]
    pd.read_parquet(sweep / victim).head(10).to_parquet(sweep / victim)
    with pytest.raises(LoopgolfError, match=r"10 scored positions, expected 2400 stream positions"):
        routed_vs_controls(rows, store, CFG)


def test_report_config_validates() -> None:
    with pytest.raises(LoopgolfError, match="min_seeds"):
        ReportConfig(min_seeds=1)


def test_without_per_token_files_pairs_fall_back_to_seeds(tmp_path: Path) -> None:
    rows, store = _load(full_sweep(tmp_path, per_token=False))
    table = routed_vs_controls(rows, store, CFG).table
    assert (table["evidence"] == "seeds only (no per-token files)").all() and (table["docs"] == 1).all()
    assert table["p"].notna().all()  # paired over 3 seeds: still a test
    robust = robustness(rows, store, CFG)
    assert robust.table["p"].isna().all() and "No per-token files" in robust.verdict
    assert where_refinement_helps(rows, store, CFG).missing.startswith("No pair has per-token files")


def test_section_2_shows_the_fraction_each_routed_configuration_trained_at(tmp_path: Path) -> None:
    rows, store = _load(full_sweep(tmp_path))
    routed = rows["arm"] == "routed"
    evaluated = rows.loc[routed, "refine_fraction"].mean()
    rows.loc[routed, "train_refine_fraction"] = [0.01 * (i + 1) for i in range(int(routed.sum()))]
    trained = rows.loc[routed, "train_refine_fraction"].mean()
    cells = set(routed_vs_controls(rows, store, CFG).table["refined (target)"])
    assert cells == {f"{evaluated:.3f} (0.200); trained {trained:.3f}"}  # the EMA-trained fraction, beside eval's
    without = rows.drop(columns="train_refine_fraction")
    assert set(routed_vs_controls(without, store, CFG).table["refined (target)"]) == {f"{evaluated:.3f} (0.200)"}
