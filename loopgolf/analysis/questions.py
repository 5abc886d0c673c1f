"""The research questions: one function per question, each a pure function of the trials DataFrame.

Replicates (rows sharing `config_id`, one per seed) are one configuration. Only feasible,
complete trials count.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from loopgolf.analysis.pareto import pareto_front
from loopgolf.analysis.results import feasible_complete
from loopgolf.analysis.stats import Comparison, compare_groups, summarize
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
