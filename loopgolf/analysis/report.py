"""The hypothesis report: the research question's four comparisons, Pareto fronts, plots.

Everything above `report()` is a pure function of the trials DataFrame (as
`load_results` returns it), so each statistic is testable on a hand-built frame; only
`report()` reads Parquet and writes files.

Statistics, everywhere: replicates (rows sharing `config_id`, one per seed) are one
configuration; a configuration's value is the mean over its seeds with a 95% confidence
interval from the t-distribution; two configurations are compared with Welch's t-test
over their seeds. Fewer than `min_seeds` seeds on either side is reported as "too few
seeds to conclude", never as a difference. Only feasible, complete trials count.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.util
import io
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from loopgolf.analysis.pareto import pareto_front
from loopgolf.analysis.results import STATUSES, feasible_complete, load_results, trials_files
from loopgolf.atomic import atomic_write_bytes
from loopgolf.errors import LoopgolfError

METRIC = "val_bpb"  # the challenge's score: lower is better
DECILES = 10


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """The report's knobs; the defaults are what `loopgolf report` uses."""

    alpha: float = 0.05  # significance level of every test
    confidence: float = 0.95  # of every confidence interval
    min_seeds: int = 2  # per side, below which a comparison is "too few seeds"
    # configurations whose eval FLOPs/token lie within this ratio of a group's smallest are "matched"
    flops_match_ratio: float = 1.10
    # equal bytes and equal wall-clock: every trial of a sweep has the same caps (DESIGN: Budgets)
    budget_keys: tuple[str, ...] = ("sweep", "max_artifact_bytes")
    routed_signals: tuple[str, ...] = ("entropy", "margin", "resid_norm", "kl")
    controls: tuple[str, ...] = ("uniform", "random")
    max_listed: int = 20  # rows of the rank-change and Pareto tables

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1 or not 0 < self.confidence < 1:
            raise LoopgolfError(f"alpha={self.alpha}, confidence={self.confidence}: expected fractions in (0, 1)")
        if self.min_seeds < 2:
            raise LoopgolfError(f"min_seeds={self.min_seeds}: a t-test needs at least 2 seeds per side")
        if self.flops_match_ratio < 1:
            raise LoopgolfError(f"flops_match_ratio={self.flops_match_ratio}: expected >= 1")


# ------------------------------------------------------------------------- statistics


@dataclasses.dataclass(frozen=True)
class Summary:
    """Mean of n values with a t-distribution confidence interval (NaN bounds when n < 2)."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float

    def text(self, digits: int = 4) -> str:
        if self.n == 0:
            return "–"
        if self.n < 2:
            return f"{self.mean:.{digits}f} (n=1)"
        return f"{self.mean:.{digits}f} ± {(self.ci_high - self.ci_low) / 2:.{digits}f} (n={self.n})"


def summarize(values: Iterable[float], confidence: float = 0.95) -> Summary:
    """Mean, sample std and the t-based confidence interval of the finite values."""
    x = np.asarray([v for v in values if v is not None and not pd.isna(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(t, two-sided p) of Welch's unequal-variance t-test; NaN when undefined.

    Written out (not scipy's ttest_ind) so the degenerate cases are ours to define: fewer
    than 2 values on a side, or no variance on either side, give NaN.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(x) < 2 or len(y) < 2:
        return math.nan, math.nan
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se2 = vx + vy
    if se2 == 0:
        return math.nan, math.nan
    t = (x.mean() - y.mean()) / math.sqrt(se2)
    dof = se2**2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))  # Welch–Satterthwaite
    return float(t), float(2 * stats.t.sf(abs(t), dof))


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A vs B on one metric (lower is better): summaries, difference, Welch p, a plain verdict."""

    context: str  # which group the two come from (a budget, a matched-compute bin)
    a_label: str
    b_label: str
    a: Summary
    b: Summary
    diff: float  # mean(A) - mean(B); negative means A is better
    p_value: float  # NaN when the test is not possible
    conclusive: bool  # enough seeds and a test was possible
    significant: bool  # conclusive and p < alpha
    verdict: str
    a_detail: str = ""  # e.g. which configuration stands for side A
    b_detail: str = ""


def compare_groups(
    a: Sequence[float],
    b: Sequence[float],
    *,
    a_label: str = "A",
    b_label: str = "B",
    context: str = "",
    alpha: float = 0.05,
    confidence: float = 0.95,
    min_seeds: int = 2,
) -> Comparison:
    """Compare two sets of per-seed values of a lower-is-better metric."""
    sa, sb = summarize(a, confidence), summarize(b, confidence)
    diff = sa.mean - sb.mean
    if sa.n < min_seeds or sb.n < min_seeds:
        verdict = f"too few seeds to conclude (n={sa.n} vs n={sb.n}; need >= {min_seeds} per side)"
        return Comparison(context, a_label, b_label, sa, sb, diff, math.nan, False, False, verdict)
    _, p = welch_t_test([v for v in a if not pd.isna(v)], [v for v in b if not pd.isna(v)])
    if math.isnan(p):
        verdict = "identical values" if diff == 0 else "no seed-to-seed variance on either side: cannot test"
        return Comparison(context, a_label, b_label, sa, sb, diff, p, False, False, verdict)
    if p < alpha:
        better = a_label if diff < 0 else b_label
        verdict = f"{better} is better by {abs(diff):.4f} (p={p:.2g} < {alpha})"
    else:
        verdict = f"no significant difference (p={p:.2g} >= {alpha})"
    return Comparison(context, a_label, b_label, sa, sb, diff, p, True, p < alpha, verdict)


# ------------------------------------------------------------------------- per-configuration view


def describe_config(row: pd.Series | dict) -> str:
    """A short human name: width, prelude + blocks x passes + coda, phase, refinement, quantization."""

    def get(name: str, default: object = "?") -> object:
        value = row.get(name, default)
        return default if value is None or (not isinstance(value, (list, np.ndarray)) and pd.isna(value)) else value

    text = f"d{get('d_model')} {get('n_prelude', 0)}+{get('n_blocks')}x{get('n_passes')}+{get('n_coda', 0)}"
    if get("phase", "none") != "none":
        text += f" {get('phase')}"
    if int(get("refine_passes", 0)) > 0:
        text += f" +{get('refine_passes')}r:{get('signal')}"
    return text + f" int{get('bits')}/{get('codec')}"


def competing(df: pd.DataFrame) -> pd.DataFrame:
    """Feasible, complete rows with a score."""
    return df[feasible_complete(df) & df[METRIC].notna()]


def config_table(rows: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """One row per config_id: its description, seeds, mean ± CI of val_bpb, and mean costs.

    Sorted best first (lowest mean val_bpb; more seeds, then config_id, break ties).
    """
    columns = ["config_id", "config", "n", "mean", "ci_low", "ci_high", "artifact_bytes", "eval_flops_per_token"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    records = []
    for config_id, group in rows.groupby("config_id", sort=True, dropna=False):
        s = summarize(group[METRIC], confidence)
        records.append(
            {
                "config_id": config_id,
                "config": describe_config(group.iloc[0]),
                "n": s.n,
                "mean": s.mean,
                "ci_low": s.ci_low,
                "ci_high": s.ci_high,
                "artifact_bytes": _mean(group["artifact_bytes"]),
                "eval_flops_per_token": _mean(group["eval_flops_per_token"]),
            }
        )
    table = pd.DataFrame.from_records(records, columns=columns)
    table["_neg_n"] = -table["n"]
    table = table.sort_values(["mean", "_neg_n", "config_id"], kind="stable")
    return table.drop(columns="_neg_n").reset_index(drop=True)


def _mean(values: pd.Series) -> float:
    x = values.to_numpy(dtype=np.float64, na_value=np.nan)
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else math.nan


def _values(rows: pd.DataFrame, config_id: str) -> list[float]:
    return rows.loc[rows["config_id"] == config_id, METRIC].astype(float).tolist()


def best_config(rows: pd.DataFrame, cfg: ReportConfig = ReportConfig()) -> pd.Series:
    """The configuration with the lowest mean val_bpb among those with >= min_seeds seeds
    (a lucky single seed should not stand for a side); among all when none has enough."""
    table = config_table(rows, cfg.confidence)
    enough = table[table["n"] >= cfg.min_seeds]
    return (enough if len(enough) else table).iloc[0]


def _compare_best(
    rows_a: pd.DataFrame, rows_b: pd.DataFrame, context: str, cfg: ReportConfig, labels: tuple[str, str]
) -> Comparison | None:
    """Best configuration of side A vs best of side B, over their seeds."""
    if rows_a.empty or rows_b.empty:
        return None
    best_a, best_b = best_config(rows_a, cfg), best_config(rows_b, cfg)
    comparison = compare_groups(
        _values(rows_a, best_a["config_id"]),
        _values(rows_b, best_b["config_id"]),
        a_label=labels[0],
        b_label=labels[1],
        context=context,
        alpha=cfg.alpha,
        confidence=cfg.confidence,
        min_seeds=cfg.min_seeds,
    )
    n_a, n_b = rows_a["config_id"].nunique(), rows_b["config_id"].nunique()
    return dataclasses.replace(
        comparison,
        a_detail=f"{best_a['config']} [{str(best_a['config_id'])[:8]}], best of {n_a}",
        b_detail=f"{best_b['config']} [{str(best_b['config_id'])[:8]}], best of {n_b}",
    )


def _int_column(rows: pd.DataFrame, name: str, default: int) -> pd.Series:
    return rows[name].astype("Int64").fillna(default) if name in rows else pd.Series(default, index=rows.index)


# ------------------------------------------------------------------------- the four questions


def looped_vs_unique(df: pd.DataFrame, cfg: ReportConfig = ReportConfig()) -> list[Comparison]:
    """Q1: best looped/shared configuration vs best unique-depth one, per budget group.

    Looped: n_passes > 1. Unique depth: n_passes == 1 and no refinement (a refinement pass
    re-applies the core, i.e. shares weights). Budget groups are `cfg.budget_keys`: the
    same byte cap and the same training wall-clock.
    """
    rows = competing(df)
    passes, refine = _int_column(rows, "n_passes", 1), _int_column(rows, "refine_passes", 0)
    side = np.select([passes > 1, (passes == 1) & (refine == 0)], ["looped", "unique"], default="")
    rows = rows.assign(_side=side)
    keys = [k for k in cfg.budget_keys if k in rows]
    out = []
    for key, group in rows.groupby(keys, sort=True, dropna=False) if keys else [((), rows)]:
        key = key if isinstance(key, tuple) else (key,)
        context = ", ".join(f"{k}={v}" for k, v in zip(keys, key, strict=True))
        looped, unique = group[group["_side"] == "looped"], group[group["_side"] == "unique"]
        comparison = _compare_best(looped, unique, context, cfg, ("looped", "unique"))
        if comparison is not None:
            out.append(comparison)
    return out


def match_by_flops(flops: pd.Series, ratio: float) -> pd.Series:
    """Group ids for "matched eval compute": sorted values, a new group whenever a value
    exceeds `ratio` x the group's smallest. Greedy and deterministic; NaN gets <NA>."""
    groups = pd.Series(pd.NA, index=flops.index, dtype="Int64")
    current, start = -1, math.nan
    for index, value in flops.dropna().sort_values(kind="stable").items():
        if current < 0 or value > start * ratio:
            current, start = current + 1, value
        groups[index] = current
    return groups


def refinement_configs(df: pd.DataFrame, cfg: ReportConfig = ReportConfig()) -> pd.DataFrame:
    """Q2's table: refining configurations (refine_passes > 0) with their signal and compute group."""
    rows = _refining(df, cfg)
    table = config_table(rows, cfg.confidence)
    if table.empty:
        return table.assign(budget="", signal=pd.Series(dtype=str), flops_group=pd.Series(dtype="Int64"))
    firsts = rows.groupby("config_id").first()
    table["budget"] = table["config_id"].map(firsts["_budget"])
    table["signal"] = table["config_id"].map(firsts["signal"])
    # compute groups are numbered across budgets, but formed within one budget each
    table["flops_group"] = pd.Series(pd.NA, index=table.index, dtype="Int64")
    offset = 0
    for _, part in table.groupby("budget", sort=True):
        groups = match_by_flops(part["eval_flops_per_token"], cfg.flops_match_ratio)
        table.loc[part.index, "flops_group"] = groups + offset
        offset += int(groups.max()) + 1 if groups.notna().any() else 0
    return table


def _budget_label(rows: pd.DataFrame, keys: Sequence[str]) -> pd.Series:
    present = [k for k in keys if k in rows]
    if not present or rows.empty:
        return pd.Series("", index=rows.index, dtype=object)
    return rows[present].astype(str).apply(lambda r: ", ".join(f"{k}={r[k]}" for k in present), axis=1)


def _refining(df: pd.DataFrame, cfg: ReportConfig = ReportConfig()) -> pd.DataFrame:
    rows = competing(df)
    rows = rows[(_int_column(rows, "refine_passes", 0) > 0) & rows["signal"].notna()]
    return rows.assign(_budget=_budget_label(rows, cfg.budget_keys))


def refinement_vs_controls(df: pd.DataFrame, cfg: ReportConfig = ReportConfig()) -> list[Comparison]:
    """Q2: within each budget and matched-compute group, the best configuration of each
    routed signal vs the best uniform-extra-pass and the best random-routing configuration."""
    rows = _refining(df, cfg)
    table = refinement_configs(df, cfg)
    out = []
    for group_id, group in table.dropna(subset=["flops_group"]).groupby("flops_group", sort=True):
        lo, hi = group["eval_flops_per_token"].min(), group["eval_flops_per_token"].max()
        budget = group["budget"].iloc[0]
        context = f"compute group {group_id}: eval FLOPs/token {lo:.3g}–{hi:.3g}" + (f" ({budget})" if budget else "")
        by_signal = {s: rows[rows["config_id"].isin(g["config_id"])] for s, g in group.groupby("signal")}
        for signal in cfg.routed_signals:
            for control in cfg.controls:
                if signal in by_signal and control in by_signal:
                    comparison = _compare_best(by_signal[signal], by_signal[control], context, cfg, (signal, control))
                    if comparison is not None:
                        out.append(comparison)
    return out


@dataclasses.dataclass(frozen=True)
class DecileProfile:
    """Q3: mean per router-score decile, per signal (rows: signals; columns: deciles 0..9)."""

    ce_delta: pd.DataFrame  # mean of (final CE - base CE); negative = refinement helped
    ce_delta_ci: pd.DataFrame  # half-width of its confidence interval (NaN for < 2 trials)
    refined_frac: pd.DataFrame  # mean fraction of the decile's tokens refined
    trials: pd.Series  # trials per signal


def _is_deciles(value: object) -> bool:
    return isinstance(value, (list, tuple, np.ndarray)) and len(value) == DECILES


def decile_profile(df: pd.DataFrame, confidence: float = 0.95) -> DecileProfile:
    """Mean of `decile_ce_delta` (and `decile_refined_frac`) across trials, per signal."""
    rows = competing(df)
    rows = rows[np.array([_is_deciles(v) for v in rows["decile_ce_delta"]], dtype=bool)]
    columns = list(range(DECILES))
    delta, ci, frac, counts = {}, {}, {}, {}
    for signal, group in rows.groupby("signal", sort=True):
        values = np.stack([np.asarray(v, dtype=np.float64) for v in group["decile_ce_delta"]])
        per_decile = [summarize(values[:, k], confidence) for k in columns]
        delta[signal] = [s.mean for s in per_decile]
        ci[signal] = [(s.ci_high - s.ci_low) / 2 for s in per_decile]
        fracs = [np.asarray(v, dtype=np.float64) for v in group["decile_refined_frac"] if _is_deciles(v)]
        frac[signal] = np.mean(fracs, axis=0).tolist() if fracs else [math.nan] * DECILES
        counts[signal] = len(group)
    frame = lambda d: pd.DataFrame.from_dict(d, orient="index", columns=columns)  # noqa: E731
    return DecileProfile(frame(delta), frame(ci), frame(frac), pd.Series(counts, name="trials", dtype="int64"))


@dataclasses.dataclass(frozen=True)
class QuantizationRanking:
    """Q4: does the ranking of configurations by val_bpb survive quantization?"""

    n_configs: int
    spearman: float
    spearman_p: float
    kendall: float
    kendall_p: float
    table: pd.DataFrame  # per config: mean pre/post val_bpb, their ranks, the change; biggest moves first
    gap_by_bits: pd.DataFrame  # mean (val_bpb - val_bpb_prequant) per bit width


def quantization_ranking(df: pd.DataFrame) -> QuantizationRanking:
    """Rank configurations by mean val_bpb_prequant and by mean val_bpb (1 = best) and correlate."""
    rows = competing(df)
    rows = rows[rows["val_bpb_prequant"].notna()]
    per_config = rows.groupby("config_id", sort=True).agg(
        pre=("val_bpb_prequant", "mean"), post=(METRIC, "mean"), n=(METRIC, "size")
    )
    per_config["config"] = [describe_config(rows[rows["config_id"] == c].iloc[0]) for c in per_config.index]
    per_config["rank_pre"] = per_config["pre"].rank(method="min").astype("int64")
    per_config["rank_post"] = per_config["post"].rank(method="min").astype("int64")
    per_config["change"] = per_config["rank_post"] - per_config["rank_pre"]  # > 0: fell after quantization
    order = per_config["change"].abs().sort_values(ascending=False, kind="stable").index
    table = per_config.loc[order].reset_index()
    gap = (rows[METRIC] - rows["val_bpb_prequant"]).groupby(rows["bits"]).agg(["mean", "size"])
    gap = gap.rename(columns={"mean": "mean_gap", "size": "trials"}).reset_index()
    n = len(per_config)
    if n >= 3 and per_config["pre"].nunique() > 1 and per_config["post"].nunique() > 1:
        rho, rho_p = stats.spearmanr(per_config["pre"], per_config["post"])
        tau, tau_p = stats.kendalltau(per_config["pre"], per_config["post"])
    else:
        rho = rho_p = tau = tau_p = math.nan
    return QuantizationRanking(n, float(rho), float(rho_p), float(tau), float(tau_p), table, gap)


PARETO_VIEWS: tuple[tuple[str, dict[str, str]], ...] = (
    ("bytes", {METRIC: "min", "artifact_bytes": "min"}),
    ("flops", {METRIC: "min", "eval_flops_per_token": "min"}),
)

_FRONT_COLUMNS = ("trial_id", "config_id", "seed", "val_bpb", "artifact_bytes", "eval_flops_per_token", "sweep")


def front_table(df: pd.DataFrame, objectives: dict[str, str]) -> pd.DataFrame:
    """The Pareto front of feasible complete trials, with a config description column."""
    front = pareto_front(df, objectives)  # type: ignore[arg-type]
    table = front[[c for c in _FRONT_COLUMNS if c in front]].copy()
    table.insert(1, "config", [describe_config(row) for _, row in front.iterrows()])
    return table.reset_index(drop=True)


# ------------------------------------------------------------------------- Markdown


def _cell(value: object) -> str:
    if value is None or (not isinstance(value, (list, np.ndarray)) and pd.isna(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if value.is_integer() and abs(value) >= 1e3:
            return f"{value:,.0f}" if abs(value) < 1e7 else f"{value:.4g}"
        return f"{value:.4g}" if abs(value) >= 1e3 or (value != 0 and abs(value) < 1e-3) else f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def md_table(table: pd.DataFrame, max_rows: int | None = None) -> str:
    """A GitHub-flavoured Markdown table (no dependency on `tabulate`)."""
    if table.empty:
        return "_(no rows)_"
    shown = table if max_rows is None else table.head(max_rows)
    lines = ["| " + " | ".join(map(str, shown.columns)) + " |", "|" + "---|" * len(shown.columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    if max_rows is not None and len(table) > max_rows:
        lines.append(f"\n_{len(table) - max_rows} more rows not shown._")
    return "\n".join(lines)


def comparisons_table(comparisons: Sequence[Comparison]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "group": c.context,
                "A": c.a_label,
                "A configuration": c.a_detail,
                "A val_bpb": c.a.text(),
                "B": c.b_label,
                "B configuration": c.b_detail,
                "B val_bpb": c.b.text(),
                "Δ (A−B)": c.diff,
                "p (Welch)": c.p_value,
                "verdict": c.verdict,
            }
            for c in comparisons
        ]
    )


def _verdict_lines(comparisons: Sequence[Comparison]) -> list[str]:
    if not comparisons:
        return []
    conclusive = [c for c in comparisons if c.conclusive]
    significant = [c for c in conclusive if c.significant]
    lines = [
        f"{len(comparisons)} comparison(s); {len(conclusive)} with enough seeds to test; "
        f"{len(significant)} significant."
    ]
    if not conclusive:
        lines.append("**Too few seeds to conclude anything here**: rerun with more seeds per configuration.")
    return lines


# ------------------------------------------------------------------------- files


def _save(fig: object, path: Path) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    atomic_write_bytes(path, buffer.getvalue())
    return path.name


def _plot_comparisons(comparisons: Sequence[Comparison], title: str, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.9 * len(comparisons)))
    labels, means, errors, colors = [], [], [], []
    for i, c in enumerate(comparisons):
        for side, s, color in (("A", c.a, "tab:blue"), ("B", c.b, "tab:orange")):
            label = c.a_label if side == "A" else c.b_label
            detail = c.a_detail if side == "A" else c.b_detail
            labels.append(f"{i}: {label} {detail}"[:70])
            means.append(s.mean)
            errors.append((s.ci_high - s.ci_low) / 2 if s.n >= 2 else 0.0)
            colors.append(color)
    y = np.arange(len(labels))[::-1]
    ax.barh(y, means, xerr=errors, color=colors, alpha=0.8, capsize=3)
    ax.set_yticks(y, labels, fontsize=7)
    lo = min(m - e for m, e in zip(means, errors, strict=True))
    hi = max(m + e for m, e in zip(means, errors, strict=True))
    pad = 0.1 * (hi - lo) + 1e-3
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_xlabel(f"{METRIC} (mean over seeds, 95% CI)")
    ax.set_title(title)
    return _save(fig, path)


def _plot_refinement(table: pd.DataFrame, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for signal, group in table.groupby("signal", sort=True):
        errors = ((group["ci_high"] - group["ci_low"]) / 2).fillna(0)
        ax.errorbar(group["eval_flops_per_token"], group["mean"], yerr=errors, fmt="o", capsize=3, label=signal)
    ax.set_xscale("log")
    ax.set_xlabel("eval FLOPs / token")
    ax.set_ylabel(f"{METRIC} (mean over seeds, 95% CI)")
    ax.set_title("Refinement by routing signal")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_deciles(profile: DecileProfile, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for signal in profile.ce_delta.index:
        ax.errorbar(
            profile.ce_delta.columns, profile.ce_delta.loc[signal], yerr=profile.ce_delta_ci.loc[signal].fillna(0),
            marker="o", capsize=3, label=f"{signal} ({profile.trials[signal]} trials)",
        )
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(DECILES))
    ax.set_xlabel("router-score decile (0 = lowest score)")
    ax.set_ylabel("mean CE change (final − base)")
    ax.set_title("Where refinement helps")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_quantization(ranking: QuantizationRanking, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(ranking.table["pre"], ranking.table["post"], s=18)
    lo = min(ranking.table["pre"].min(), ranking.table["post"].min())
    hi = max(ranking.table["pre"].max(), ranking.table["post"].max())
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, label="no quantization loss")
    ax.set_xlabel("val_bpb before quantization (mean over seeds)")
    ax.set_ylabel("val_bpb from the artifact (mean over seeds)")
    ax.set_title(f"Ranking through quantization (Spearman {ranking.spearman:.2f})")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_front(rows: pd.DataFrame, front: pd.DataFrame, x: str, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    front = front.sort_values(x, kind="stable")  # the staircase runs along x
    ax.scatter(rows[x].astype(float), rows[METRIC], s=10, color="lightgrey", label="feasible trials")
    ax.step(front[x].astype(float), front[METRIC], where="post", color="tab:red", lw=1)
    ax.scatter(front[x].astype(float), front[METRIC], s=22, color="tab:red", label="Pareto front", zorder=3)
    ax.set_xlabel(x)
    ax.set_ylabel(METRIC)
    ax.set_title(f"Pareto front: {METRIC} x {x}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _plotly_fronts(rows: pd.DataFrame, path: Path) -> str | None:
    """Optional interactive version of the fronts; skipped when plotly is not installed."""
    if importlib.util.find_spec("plotly") is None:
        return None
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    titles = [f"{METRIC} x {list(o)[1]}" for _, o in PARETO_VIEWS]
    fig = make_subplots(rows=1, cols=len(PARETO_VIEWS), subplot_titles=titles)
    hover = [f"{t} {describe_config(r)}" for t, (_, r) in zip(rows["trial_id"], rows.iterrows(), strict=True)]
    for col, (_, objectives) in enumerate(PARETO_VIEWS, start=1):
        x = list(objectives)[1]
        front = pareto_front(rows, objectives)  # type: ignore[arg-type]
        fig.add_trace(go.Scatter(x=rows[x], y=rows[METRIC], mode="markers", text=hover, name="trials"), row=1, col=col)
        fig.add_trace(go.Scatter(x=front[x], y=front[METRIC], mode="lines+markers", name="front"), row=1, col=col)
    atomic_write_bytes(path, fig.to_html(include_plotlyjs="cdn").encode())
    return path.name


# ------------------------------------------------------------------------- the report


def _decile_columns(table: pd.DataFrame) -> pd.DataFrame:
    return table.rename(columns=lambda k: f"d{k}")


def _default_out_dir(sweep_dirs: Sequence[str | os.PathLike[str]]) -> Path:
    first = trials_files(*sweep_dirs)[0]
    sweep_dir = first.parent.parent if first.parent.name == "results" else first.parent
    return sweep_dir / "report"


def report(
    sweep_dirs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    config: ReportConfig = ReportConfig(),
) -> Path:
    """Write `report.md` and its PNG plots for one or many sweeps; returns the report's path.

    `out_dir` defaults to `<first sweep dir>/report`. Each file is replaced atomically and
    report.md is written last, so it never points at a plot that is not there.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display; files only

    dirs = [sweep_dirs] if isinstance(sweep_dirs, (str, os.PathLike)) else list(sweep_dirs)
    df = load_results(*dirs)
    out = Path(out_dir) if out_dir is not None else _default_out_dir(dirs)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config
    rows = competing(df)
    md: list[str] = ["# loopgolf report", ""]

    counts = df["status"].value_counts()
    sweeps = ", ".join(sorted(df["sweep"].dropna().unique())) or "(none)"
    md += [
        f"Sweeps: {sweeps}. Generated {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M UTC}.",
        "",
        f"{len(df)} trials: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES)
        + f"; {len(rows)} feasible and complete, in {rows['config_id'].nunique()} configurations.",
        "",
        f"How to read: only feasible, complete trials count. Replicates (same `config_id`, different seeds) "
        f"form one configuration, shown as mean ± half-width of the {cfg.confidence:.0%} t-interval (n seeds). "
        f"A vs B is Welch's t-test over seeds at α = {cfg.alpha}; with fewer than {cfg.min_seeds} seeds on a side "
        "the report says so instead of concluding. A side's best configuration is the lowest mean among those "
        f"with at least {cfg.min_seeds} seeds (among all when none has); it is picked on the same seeds it is "
        "tested on, so p-values are optimistic when a side has many configurations.",
        "",
    ]

    # 1
    md += ["## 1. Looped/shared blocks vs unique depth, at equal bytes and wall-clock", ""]
    md += [
        f"Within each budget group ({', '.join(cfg.budget_keys)}: same byte cap, same training seconds), the best "
        "looped configuration (n_passes > 1) against the best unique-depth one (n_passes = 1, no refinement), on "
        f"{METRIC}.",
        "",
    ]
    q1 = looped_vs_unique(df, cfg)
    if q1:
        md += [md_table(comparisons_table(q1)), "", *_verdict_lines(q1), ""]
        plot = _plot_comparisons(q1, "Looped vs unique depth", out / "looped_vs_unique.png")
        md += [f"![looped vs unique]({plot})", ""]
    else:
        md += ["No budget group has both a looped and a unique-depth feasible trial: nothing to compare.", ""]

    # 2
    md += ["## 2. Routed refinement vs uniform extra pass vs random routing, at matched eval compute", ""]
    md += [
        f"Within each budget group, refining configurations (refine_passes > 0) are matched by eval FLOPs/token: "
        "sorted by their mean, a "
        f"configuration joins the current compute group when it is within {cfg.flops_match_ratio:.2f}x of the "
        "group's cheapest, else it starts a new group. In each group, the best configuration of each routed signal "
        f"({', '.join(cfg.routed_signals)}) against the best of each control ({', '.join(cfg.controls)}).",
        "",
    ]
    q2_table = refinement_configs(df, cfg)
    q2 = refinement_vs_controls(df, cfg)
    if q2:
        md += [md_table(comparisons_table(q2)), "", *_verdict_lines(q2), ""]
    else:
        md += ["No compute group holds both a routed signal and a control: nothing to compare.", ""]
    if not q2_table.empty:
        shown = q2_table[
            ["flops_group", "signal", "config", "config_id", "n", "mean", "ci_low", "ci_high", "eval_flops_per_token"]
        ]
        md += ["Refining configurations:", "", md_table(shown.sort_values(["flops_group", "mean"]), cfg.max_listed), ""]
        md += [f"![refinement by signal]({_plot_refinement(q2_table, out / 'refinement_signals.png')})", ""]

    # 3
    md += ["## 3. Where refinement helps: CE change by router-score decile", ""]
    profile = decile_profile(df, cfg.confidence)
    if profile.ce_delta.empty:
        md += ["No feasible trial recorded per-decile refinement statistics.", ""]
    else:
        md += [
            "Mean over trials of (final CE − base CE) per router-score decile (decile 0 = lowest score); "
            "negative means refinement lowered the loss there.",
            "",
            md_table(_decile_columns(profile.ce_delta).assign(trials=profile.trials).reset_index(names="signal")),
            "",
        ]
        if profile.refined_frac.notna().any().any():
            md += [
                "Mean fraction of each decile's tokens refined:",
                "",
                md_table(_decile_columns(profile.refined_frac).reset_index(names="signal")),
                "",
            ]
        md += [
            f"![CE change by decile]({_plot_deciles(profile, out / 'decile_ce_delta.png')})",
            "",
        ]

    # 4
    md += ["## 4. Does the ranking survive quantization?", ""]
    ranking = quantization_ranking(df)
    if ranking.n_configs < 3 or math.isnan(ranking.spearman):
        md += [f"{ranking.n_configs} configuration(s) with both scores: too few to correlate rankings (need 3).", ""]
    else:
        md += [
            f"Configurations ranked by mean val_bpb_prequant and by mean val_bpb from the artifact "
            f"({ranking.n_configs} configurations): Spearman ρ = {ranking.spearman:.3f} (p={ranking.spearman_p:.2g}), "
            f"Kendall τ = {ranking.kendall:.3f} (p={ranking.kendall_p:.2g}). "
            f"{int((ranking.table['change'] != 0).sum())} configuration(s) change rank.",
            "",
        ]
    if ranking.n_configs:
        moved = ranking.table[["config", "config_id", "n", "pre", "post", "rank_pre", "rank_post", "change"]]
        md += ["Rank changes (positive = worse after quantization), largest first:", ""]
        md += [md_table(moved, cfg.max_listed), ""]
        md += ["Quantization gap (val_bpb − val_bpb_prequant) by bit width:", "", md_table(ranking.gap_by_bits), ""]
        md += [f"![quantization]({_plot_quantization(ranking, out / 'quantization_ranks.png')})", ""]

    # Pareto
    md += ["## Pareto fronts", "", "Non-dominated feasible trials (replicates are separate points; ties all kept).", ""]
    for name, objectives in PARETO_VIEWS:
        x = list(objectives)[1]
        md += [f"### {METRIC} × {x}", ""]
        usable = rows[rows[x].notna()]
        if usable.empty:
            md += [f"No feasible trial has {x}.", ""]
            continue
        table = front_table(df, objectives)
        md += [md_table(table, cfg.max_listed), ""]
        md += [f"![front]({_plot_front(usable, pareto_front(df, objectives), x, out / f'pareto_{name}.png')})", ""]  # type: ignore[arg-type]
    if not rows.empty:
        html = _plotly_fronts(rows, out / "pareto.html")
        if html:
            md += [f"Interactive version: [{html}]({html})", ""]

    path = out / "report.md"
    atomic_write_bytes(path, "\n".join(md).encode("utf-8"))
    return path
