"""Transfer (proxy ranking vs promoted ranking) and the record-grade test, on small synthetic
ledgers whose answers are known: perfect and permuted rankings, one inverted pair, a winner
that holds or falls, and t-tests checked against scipy's own implementations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from loopgolf.analysis.record import Reference, parse_reference, record_test
from loopgolf.analysis.report import md_table
from loopgolf.analysis.transfer import NO_PROMOTED, transfer, transfer_stats
from loopgolf.errors import LoopgolfError

NATS_PER_BPB = math.log(2) * 3.5  # val_loss / val_bpb at 3.5 bytes per token
NOISE = (-1e-4, 0.0, 1e-4)  # per-seed offsets: means stay exact, intervals stay tiny
FIDELITY = '{"budget.train_seconds": 600}'


def _trials(sweep: str, config_id: str, bpb: list[float], *, loss: list[float] | None = None, first_seed: int = 0,
            ratio: float = NATS_PER_BPB, **columns: object) -> list[dict[str, object]]:  # fmt: skip
    """One row per seed; val_loss = val_bpb x ratio unless given."""
    loss = [b * ratio for b in bpb] if loss is None else loss
    return [
        {"sweep": sweep, "trial_id": f"{sweep}-{config_id}-{k}", "config_id": config_id, "seed": first_seed + k,
         "status": "complete", "feasible": True, "val_bpb": b, "val_loss": v, "artifact_bytes": 900_000,
         "d_model": 256, "n_blocks": 2, "n_passes": 3, "promoted_from": None, "fidelity": None} | columns
        for k, (b, v) in enumerate(zip(bpb, loss, strict=True))
    ]  # fmt: skip


def _promotion(proxy: list[float], promoted: list[float], noise: tuple[float, ...] = NOISE) -> pd.DataFrame:
    """Source sweep "proxy" (configs src0..) and promoted sweep "big" (big0.., fresh seeds) with the given means."""
    rows = []
    for i, (p, q) in enumerate(zip(proxy, promoted, strict=True)):
        rows += _trials("proxy", f"src{i}", [p + e for e in noise], d_model=128 + 64 * i)
        rows += _trials("big", f"big{i}", [q + e for e in noise], first_seed=10, d_model=128 + 64 * i,
                        promoted_from=f"proxy:src{i}", fidelity=FIDELITY)  # fmt: skip
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------- transfer


def test_perfect_transfer_has_rho_and_tau_one_with_the_exact_p() -> None:
    df = _promotion([1.00, 1.01, 1.02, 1.03, 1.04], [0.90, 0.92, 0.94, 0.96, 0.98])
    [r] = transfer_stats(df)
    assert (r.source, r.promoted, r.fidelity) == ("proxy", "big", "budget.train_seconds=600")
    assert r.spearman == 1.0 and r.kendall == 1.0 and r.correlation.exact and r.correlation.n == 5
    # two-sided: 2 of the 5! = 120 pairings are as extreme (the identity and its reverse)
    assert r.correlation.spearman_p == pytest.approx(2 / 120, rel=1e-12)
    assert r.correlation.kendall_p == pytest.approx(2 / 120, rel=1e-12)
    assert r.proxy_best == "src0" and r.best_still_best is True and r.p_best == 1.0
    assert r.flipped.empty
    assert "the two rankings agree beyond chance at α = 0.05" in transfer(df).verdict
    first = r.configs.iloc[0]
    values = np.array([1.00 + e for e in NOISE])
    half = stats.t.ppf(0.975, 2) * values.std(ddof=1) / math.sqrt(3)
    assert first["config_id"] == "src0" and first["promoted_config_id"] == "big0"
    assert (first["proxy_n"], first["promoted_n"]) == (3, 3)
    assert first["proxy_mean"] == pytest.approx(1.00, abs=1e-12)
    assert first["proxy_low"] == pytest.approx(values.mean() - half, abs=1e-12)
    assert first["proxy_high"] == pytest.approx(values.mean() + half, abs=1e-12)
    assert list(r.configs["config_id"]) == [f"src{i}" for i in range(5)]


def _exact_p(statistic: object, ranks: list[int]) -> float:
    """Share of the n! pairings whose |statistic| is at least the observed one (written out)."""
    n = len(ranks)
    observed = abs(statistic(list(range(1, n + 1)), ranks))  # type: ignore[operator]
    perms = list(itertools.permutations(ranks))
    return sum(abs(statistic(list(range(1, n + 1)), list(p))) >= observed - 1e-12 for p in perms) / len(perms)  # type: ignore[operator]


def _spearman(x: list[int], y: list[int]) -> float:
    n = len(x)
    return 1 - 6 * sum((a - b) ** 2 for a, b in zip(x, y, strict=True)) / (n * (n * n - 1))


def _kendall(x: list[int], y: list[int]) -> float:
    pairs = list(itertools.combinations(range(len(x)), 2))
    return sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i, j in pairs) / len(pairs)


def test_a_known_permutation_gives_its_rho_tau_and_flipped_pairs() -> None:
    ranks = [3, 1, 4, 5, 2]  # promoted ranks of the proxy's 1st..5th: sum d^2 = 16, 6 concordant / 4 discordant
    df = _promotion([1.00, 1.01, 1.02, 1.03, 1.04], [0.90 + 0.01 * k for k in ranks])
    [r] = transfer_stats(df)
    assert r.spearman == pytest.approx(0.2, abs=1e-12) and r.kendall == pytest.approx(0.2, abs=1e-12)
    assert r.correlation.spearman_p == pytest.approx(_exact_p(_spearman, ranks), rel=1e-12)
    assert r.correlation.kendall_p == pytest.approx(_exact_p(_kendall, ranks), rel=1e-12)
    assert 0.5 < r.correlation.spearman_p < 1  # sanity: the written-out count is not trivially 1
    pairs = {(a, b) for a, b in zip(r.flipped["a config_id"], r.flipped["b config_id"], strict=True)}
    assert pairs == {("src0", "src1"), ("src0", "src4"), ("src2", "src4"), ("src3", "src4")}
    assert (r.flipped["proxy Δ (a − b)"] < 0).all() and (r.flipped["promoted Δ (a − b)"] > 0).all()
    # the proxy's best is 3rd at the promoted fidelity, by 0.02 against 1e-4 noise: never best
    assert r.proxy_best == "src0" and r.best_still_best is False and r.p_best == 0.0
    assert list(r.configs["promoted_rank"]) == [3, 1, 4, 5, 2]


def test_exactly_one_inverted_pair_is_listed_with_both_deltas() -> None:
    df = _promotion([1.00, 1.01, 1.02, 1.03], [0.90, 0.92, 0.91, 0.93])
    [r] = transfer_stats(df)
    assert len(r.flipped) == 1
    flip = r.flipped.iloc[0]
    assert (flip["a config_id"], flip["b config_id"]) == ("src1", "src2")
    assert flip["proxy Δ (a − b)"] == pytest.approx(-0.01, abs=1e-12)
    assert flip["promoted Δ (a − b)"] == pytest.approx(0.01, abs=1e-12)
    assert flip["p (promoted Δ, Welch)"] < 1e-4  # 0.01 apart with 1e-4 noise: a real flip
    assert r.best_still_best is True and r.p_best == 1.0
    assert r.kendall == pytest.approx(4 / 6, abs=1e-12)


def test_bootstrap_probability_matches_the_enumerated_bootstrap_distribution() -> None:
    # two seeds each, dyadic values (exact means): resampled means of best: .5, .6875, .875 (1/4, 1/2, 1/4);
    # of the other: .625, .71875, .8125. P(best strictly lower) = 1/4 + 1/2 * 3/4 = 0.625
    rows = _trials("proxy", "src0", [1.00, 1.00]) + _trials("proxy", "src1", [1.05, 1.05])
    rows += _trials("big", "big0", [0.5, 0.875], first_seed=10, promoted_from="proxy:src0")
    rows += _trials("big", "big1", [0.625, 0.8125], first_seed=10, promoted_from="proxy:src1")
    df = pd.DataFrame(rows)
    [r] = transfer_stats(df, bootstrap=20_000, seed=3)
    assert r.best_still_best is True and r.p_best == pytest.approx(0.625, abs=0.015)  # 4.4 standard errors
    assert transfer_stats(df, bootstrap=20_000, seed=3)[0].p_best == r.p_best  # a fixed seed: reproducible
    assert math.isnan(r.spearman)  # two configurations: no rank correlation


def test_two_configurations_give_the_table_and_say_a_correlation_needs_three() -> None:
    answer = transfer(_promotion([1.00, 1.01], [0.90, 0.91]))
    assert len(answer.table) == 2 and not answer.missing
    assert "needs at least 3 configurations" in answer.verdict and "n = 2" in answer.verdict
    assert "is still the best" in answer.verdict and answer.figure is not None


def test_transfer_answer_states_the_numbers_in_words_and_renders() -> None:
    answer = transfer(_promotion([1.00, 1.01, 1.02, 1.03, 1.04], [0.90, 0.92, 0.91, 0.93, 0.94]))
    assert answer.title == "Transfer: does the proxy ranking hold?" and not answer.missing
    assert "Spearman ρ = 0.90 (exact p = 0.0833, n = 5)" in answer.verdict
    assert "Kendall τ = 0.80 (exact p = 0.0833): the two rankings agree no more than chance" in answer.verdict
    assert "1 pair(s) flipped order" in answer.verdict and "best in 100.0% of bootstraps" in answer.verdict
    assert list(answer.table["proxy seeds"]) == [3] * 5 and list(answer.table["config_id"]) == [
        f"src{i}" for i in range(5)]  # fmt: skip
    assert answer.table["proxy val_bpb [95% CI]"].iloc[0].startswith("1.0000 [0.99")
    [(caption, flips)] = answer.extra
    assert "flipped" in caption and len(flips) == 1 and flips["proxy → promoted"].iloc[0].startswith("proxy → big")
    assert "| configuration |" in md_table(answer.table) and answer.figure is not None


def test_no_promoted_sweep_says_how_to_make_one() -> None:
    plain = pd.DataFrame(_trials("proxy", "src0", [1.0, 1.01, 1.02]))
    for df in (plain, plain.drop(columns=["promoted_from", "fidelity"])):
        answer = transfer(df)
        assert answer.missing == NO_PROMOTED and answer.table.empty and answer.figure is None
        assert transfer_stats(df) == []


def test_a_promoted_sweep_without_its_source_asks_for_both() -> None:
    df = _promotion([1.00, 1.01, 1.02], [0.90, 0.91, 0.92])
    answer = transfer(df[df["sweep"] == "big"])
    assert "loopgolf report proxy big" in answer.missing and answer.figure is None
    assert (answer.table["proxy seeds"] == 0).all() and (answer.table["promoted seeds"] == 3).all()


def test_a_configuration_that_failed_at_the_promoted_fidelity_is_listed_and_left_out() -> None:
    df = _promotion([1.00, 1.01, 1.02, 1.03], [0.90, 0.91, 0.92, 0.93])
    df.loc[df["config_id"] == "big0", "feasible"] = False  # e.g. over the byte cap at the longer budget
    crashed = _trials("proxy", "src3", [0.1], first_seed=7, status="failed")  # a failed proxy trial: not counted
    df = pd.concat([df, pd.DataFrame(crashed)], ignore_index=True)
    [r] = transfer_stats(df)
    assert r.configs.set_index("config_id").loc["src3", "proxy_n"] == 3
    assert len(r.configs) == 4 and len(r.both) == 3 and r.correlation.n == 3
    failed = r.configs.set_index("config_id").loc["src0"]
    assert failed["promoted_n"] == 0 and failed["proxy_n"] == 3
    assert r.proxy_best == "src1" and r.spearman == 1.0


def test_a_routed_configurations_control_arms_are_not_paired_with_it() -> None:
    df = _promotion([1.00, 1.01, 1.02], [0.90, 0.91, 0.92])
    df["arm"] = "routed"
    arm = _trials("big", "bigN", [0.5, 0.5, 0.5], first_seed=10, promoted_from="proxy:src0", arm="no_refine",
                  fidelity=FIDELITY)  # fmt: skip
    [r] = transfer_stats(pd.concat([df, pd.DataFrame(arm)], ignore_index=True))
    first = r.configs.iloc[0]
    assert first["promoted_config_id"] == "big0" and first["promoted_mean"] == pytest.approx(0.90, abs=1e-12)


def test_promotions_to_two_fidelities_are_separate_results() -> None:
    df = _promotion([1.00, 1.01, 1.02], [0.90, 0.91, 0.92])
    longer = df[df["sweep"] == "big"].assign(sweep="bigger", config_id=lambda f: f["config_id"] + "x",
                                             fidelity='{"budget.train_seconds": 1200}')  # fmt: skip
    results = transfer_stats(pd.concat([df, longer], ignore_index=True))
    assert [(r.promoted, r.fidelity) for r in results] == [
        ("big", "budget.train_seconds=600"), ("bigger", "budget.train_seconds=1200")]  # fmt: skip


def test_a_malformed_promoted_from_is_one_line_naming_it() -> None:
    df = _promotion([1.00, 1.01, 1.02], [0.90, 0.91, 0.92])
    df.loc[df["sweep"] == "big", "promoted_from"] = "no-colon"
    with pytest.raises(LoopgolfError, match="promoted_from 'no-colon'") as info:
        transfer_stats(df)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------- record-grade


def _record_ledger() -> pd.DataFrame:
    rows = _trials("s", "good", [0.0] * 3, loss=[2.040, 2.042, 2.044])  # clears the bar easily
    rows += _trials("s", "noisy", [0.0] * 3, loss=[2.050, 2.060, 2.055])  # Δ ok, p about 0.02
    rows += _trials("s", "close", [0.0] * 3, loss=[2.0695, 2.0705, 2.0700])  # Δ = -0.0027: too small
    rows += _trials("s", "short", [0.0] * 2, loss=[2.000, 2.001])  # 2 seeds
    df = pd.DataFrame(rows)
    df["val_bpb"] = df["val_loss"] / NATS_PER_BPB
    return df


def test_record_against_a_published_loss_is_the_one_sample_t_test() -> None:
    df = _record_ledger()
    reference = parse_reference("val_loss=2.0727", df)
    answer = record_test(df, reference)
    table = answer.table.set_index("config_id")
    for cid in ("good", "noisy", "close"):
        loss = df.loc[df["config_id"] == cid, "val_loss"].to_numpy()
        expected = stats.ttest_1samp(loss, 2.0727 - 0.005, alternative="less")
        assert table.loc[cid, "_t"] == pytest.approx(expected.statistic, abs=1e-12)
        assert table.loc[cid, "p (one-sided)"] == pytest.approx(expected.pvalue, abs=1e-12)
        assert table.loc[cid, "Δ nats"] == pytest.approx(loss.mean() - 2.0727, abs=1e-12)
        bpb = loss / NATS_PER_BPB  # the reference in bpb: 2.0727 / the same ratio
        low, high = stats.t.interval(0.95, 2, loc=bpb.mean(), scale=stats.sem(bpb))
        assert table.loc[cid, "_value"] == pytest.approx(bpb.mean() - 2.0727 / NATS_PER_BPB, abs=1e-12)
        assert table.loc[cid, "_low"] == pytest.approx(low - 2.0727 / NATS_PER_BPB, abs=1e-12)
        assert table.loc[cid, "_high"] == pytest.approx(high - 2.0727 / NATS_PER_BPB, abs=1e-12)
    assert table.loc["good", "record-grade"].startswith("yes: Δ = -0.0307 nats, p = ")
    assert table.loc["noisy", "record-grade"] == f"no: p = {table.loc['noisy', 'p (one-sided)']:.3g} ≥ 0.01"
    assert 0.01 < table.loc["noisy", "p (one-sided)"] < 0.05
    assert table.loc["close", "record-grade"] == "no: Δ = -0.0027 nats, needs ≤ -0.005"
    assert table.loc["short", "record-grade"] == "no: 2 seeds, needs 3"
    assert math.isnan(table.loc["short", "p (one-sided)"]) and table.loc["short", "bpb Δ [95% CI]"] == "–"
    assert list(answer.table["config_id"]) == ["good", "noisy", "close", "short"]  # passed, tested, untested
    assert answer.table["_record"].sum() == 1
    assert answer.title == "Record-grade: the challenge's acceptance rule"
    assert "1 of 3 tested configuration(s) are record-grade; 1 had fewer than 3 seeds" in answer.verdict


def test_a_bpb_reference_is_put_in_nats_with_each_configurations_own_ratio() -> None:
    other_ratio = math.log(2) * 4.1  # another tokenizer: another bytes per token
    rows = _trials("s", "a", [1.190, 1.192, 1.191]) + _trials("s", "b", [1.200, 1.203, 1.201], ratio=other_ratio)
    df = pd.DataFrame(rows)
    reference = parse_reference("val_bpb=1.2244", df)
    assert (reference.metric, reference.value, reference.per_seed) == ("val_bpb", 1.2244, False)
    answer = record_test(df, reference)
    table = answer.table.set_index("config_id")
    for cid, ratio in (("a", NATS_PER_BPB), ("b", other_ratio)):
        loss = df.loc[df["config_id"] == cid, "val_loss"].to_numpy()
        ref_loss = 1.2244 * ratio
        expected = stats.ttest_1samp(loss, ref_loss - 0.005, alternative="less")
        assert table.loc[cid, "Δ nats"] == pytest.approx(loss.mean() - ref_loss, abs=1e-12)
        assert table.loc[cid, "p (one-sided)"] == pytest.approx(expected.pvalue, abs=1e-12)
        bpb = df.loc[df["config_id"] == cid, "val_bpb"].to_numpy()
        assert table.loc[cid, "_value"] == pytest.approx(bpb.mean() - 1.2244, abs=1e-12)
    assert "ln 2" in answer.method and "val_loss / val_bpb" in answer.method


def test_record_against_a_reference_configuration_is_welchs_test() -> None:
    rng = np.random.default_rng(5)
    ref_loss = 2.07 + rng.normal(0, 0.003, 4)
    cand_loss = 2.055 + rng.normal(0, 0.002, 3)
    rows = _trials("s", "ref0001", list(ref_loss / NATS_PER_BPB), loss=list(ref_loss))
    rows += _trials("s", "cand", list(cand_loss / NATS_PER_BPB), loss=list(cand_loss), first_seed=10)
    df = pd.DataFrame(rows)
    reference = parse_reference("ref0001", df)
    assert reference.per_seed and reference.config_id == "ref0001" and len(reference.loss) == 4
    answer = record_test(df, reference)
    assert list(answer.table["config_id"]) == ["cand"]  # the reference is not tested against itself
    row = answer.table.iloc[0]
    expected = stats.ttest_ind(cand_loss, ref_loss - 0.005, equal_var=False, alternative="less")
    assert row["_t"] == pytest.approx(expected.statistic, abs=1e-12)
    assert row["p (one-sided)"] == pytest.approx(expected.pvalue, abs=1e-12)
    assert row["Δ nats"] == pytest.approx(cand_loss.mean() - ref_loss.mean(), abs=1e-12)
    a, b = cand_loss / NATS_PER_BPB, ref_loss / NATS_PER_BPB
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 4
    dof = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)  # Welch–Satterthwaite
    half = stats.t.ppf(0.975, dof) * math.sqrt(va + vb)
    assert row["_value"] == pytest.approx(a.mean() - b.mean(), abs=1e-12)
    assert row["_low"] == pytest.approx(a.mean() - b.mean() - half, abs=1e-12)
    assert row["_high"] == pytest.approx(a.mean() - b.mean() + half, abs=1e-12)
    assert "Welch" in answer.method


def test_a_one_seed_reference_configuration_is_not_tested() -> None:
    rows = _trials("s", "ref", [1.0], loss=[2.07]) + _trials("s", "cand", [0.9] * 3, loss=[2.00, 2.001, 2.002])
    df = pd.DataFrame(rows)
    row = record_test(df, parse_reference("ref", df)).table.iloc[0]
    assert row["record-grade"].startswith("no: the reference has 1 seed") and math.isnan(row["p (one-sided)"])


def test_too_few_seeds_are_listed_and_not_tested() -> None:
    rows = _trials("s", "one", [0.9], loss=[1.0]) + _trials("s", "two", [0.9, 0.9], loss=[1.0, 1.001])
    answer = record_test(pd.DataFrame(rows), Reference("val_loss=2", "val_loss = 2", "val_loss", 2.0), min_seeds=3)
    grades = dict(zip(answer.table["config_id"], answer.table["record-grade"], strict=True))
    assert grades == {"one": "no: 1 seed, needs 3", "two": "no: 2 seeds, needs 3"}
    assert answer.table["p (one-sided)"].isna().all() and "0 of 0 tested" in answer.verdict


def test_parse_reference_reads_numbers_config_ids_prefixes_and_sweeps() -> None:
    rows = _trials("base", "abc111", [1.30, 1.31, 1.32]) + _trials("base", "abc222", [1.20, 1.22, 1.21])
    rows += _trials("other", "def333", [1.25, 1.25, 1.26])
    df = pd.DataFrame(rows)
    assert parse_reference("val_loss = 2.0727", df).value == 2.0727
    assert parse_reference("abc111", df).config_id == "abc111"
    assert parse_reference("def", df).config_id == "def333"  # a unique prefix
    best = parse_reference("base", df)  # a sweep: its best configuration by mean val_bpb
    assert best.config_id == "abc222" and best.bpb == pytest.approx((1.20, 1.22, 1.21))
    assert "best of sweep base" in best.label


@pytest.mark.parametrize(("text", "says"), [
    ("val_bpb=abc", "'abc' is not a number"),
    ("val_loss=-1", "expected a positive finite val_loss"),
    ("val_bpb=nan", "expected a positive finite val_bpb"),
    ("abc", "ambiguous, begins 2 config_ids (abc111, abc222)"),
    ("zzz", "expected val_bpb=NUMBER, val_loss=NUMBER, a config_id or a sweep name in the report"),
    ("", "expected val_bpb=NUMBER"),
    ("bpb=1.2", "expected val_bpb=NUMBER"),
    ("weird\nname", "expected val_bpb=NUMBER"),
])  # fmt: skip
def test_parse_reference_errors_are_one_line_naming_the_value(text: str, says: str) -> None:
    df = pd.DataFrame(_trials("base", "abc111", [1.3, 1.31]) + _trials("base", "abc222", [1.2, 1.21]))
    with pytest.raises(LoopgolfError) as info:
        parse_reference(text, df)
    message = str(info.value)
    assert "\n" not in message and f"--reference {text!r}" in message and says in message


def test_a_reference_configuration_with_no_usable_trial_is_refused() -> None:
    df = pd.DataFrame(_trials("base", "abc111", [1.3, 1.31]) + _trials("base", "dead", [1.2], status="failed"))
    with pytest.raises(LoopgolfError, match="configuration dead has no complete feasible trial"):
        parse_reference("dead", df)


def _random_ledger(rng: np.random.Generator, reference: float) -> pd.DataFrame:
    rows = []
    for c in range(60):
        n = int(rng.integers(2, 7))
        loss = reference - rng.uniform(-0.005, 0.03) + rng.normal(0, rng.uniform(0.001, 0.012), n)
        rows += _trials("r", f"c{c:02d}", list(loss / NATS_PER_BPB), loss=list(loss))
    return pd.DataFrame(rows)


def test_the_decision_is_p_below_alpha_and_delta_below_the_margin() -> None:
    rng = np.random.default_rng(11)
    df = _random_ledger(rng, 2.07)
    ref_rows = 2.07 + rng.normal(0, 0.004, 5)
    with_ref = pd.concat([df, pd.DataFrame(_trials("r", "ref", list(ref_rows / NATS_PER_BPB), loss=list(ref_rows),
                                                   first_seed=100))], ignore_index=True)  # fmt: skip
    cases = (
        (df, parse_reference("val_loss=2.07", df),
         lambda x: stats.ttest_1samp(x, 2.07 - 0.005, alternative="less").pvalue, lambda x: x.mean() - 2.07),
        (with_ref, parse_reference("ref", with_ref),
         lambda x: stats.ttest_ind(x, ref_rows - 0.005, equal_var=False, alternative="less").pvalue,
         lambda x: x.mean() - ref_rows.mean()),
    )  # fmt: skip
    for ledger, reference, p_value, delta in cases:
        table = record_test(ledger, reference).table.set_index("config_id")
        decisions = []
        for cid, part in df.groupby("config_id"):
            x = part["val_loss"].to_numpy()
            expected = len(x) >= 3 and p_value(x) < 0.01 and delta(x) <= -0.005
            assert bool(table.loc[cid, "_record"]) == expected, cid
            assert table.loc[cid, "record-grade"].startswith("yes" if expected else "no")
            decisions.append(expected)
        assert 3 <= sum(decisions) <= len(decisions) - 10  # the data exercise both answers
