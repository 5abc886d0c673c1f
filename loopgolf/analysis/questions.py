"""The research questions: one function per section, each returning its table, plot and verdict.

Each function takes the feasible, complete trials (`competing(df)`), the per-token store
(None when the sweep wrote no per-token files) and the report's knobs, and returns an
`Answer`. A section that lacks what it needs says so plainly in `missing`. Within a
section, p-values are Holm-corrected across all its comparisons.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from loopgolf.analysis import plots
from loopgolf.analysis.evidence import (
    METRIC,
    Matrix,
    ReportConfig,
    all_per_token,
    budget_groups,
    describe_config,
    estimate_cells,
    finish_section,
    held_out_best,
    int_column,
    matrix,
)
from loopgolf.analysis.results import CONTROL_ARMS, NO_REFINE, ROUTED_ARM
from loopgolf.analysis.stats import crossed_difference, crossed_ratio, linearize, rank_correlation
from loopgolf.analysis.tokens import TokenStore


@dataclasses.dataclass(frozen=True)
class Answer:
    title: str
    method: str  # how to read the section
    table: pd.DataFrame
    verdict: str
    missing: str = ""  # what the sweep lacks for this section, in plain words
    figure: object | None = None  # a matplotlib Figure
    extra: tuple[tuple[str, pd.DataFrame], ...] = ()


def _fill(rows: pd.DataFrame) -> float:
    if "byte_fill" in rows and rows["byte_fill"].notna().any():
        return float(rows["byte_fill"].mean())
    return float((rows["artifact_bytes"].astype(float) / rows["max_artifact_bytes"].astype(float)).mean())


def _configs(rows: pd.DataFrame, store: TokenStore | None, per_token: bool) -> dict[str, Matrix]:
    return {str(c): matrix(g, store, per_token) for c, g in rows.groupby("config_id", sort=True)}


# ------------------------------------------------------------------------- 1. shared vs unique


def _q1_subsets(looped: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    phase = looped["phase"].fillna("none") if "phase" in looped else pd.Series("none", index=looped.index)
    blocks = int_column(looped, "n_blocks", 1)
    width = int_column(looped, "d_model", 0)
    median = float(width.median()) if len(width) else 0.0
    share = looped["share"].fillna("all") if "share" in looped else pd.Series("all", index=looped.index)
    return [
        ("all looped", looped),
        ("fully shared (share all)", looped[share == "all"]),
        ("attention shared, MLP per pass (share attn)", looped[share == "attn"]),
        ("MLP shared, attention per pass (share mlp)", looped[share == "mlp"]),
        ("strict sharing (phase none)", looped[phase == "none"]),
        ("relaxed (per-pass phase)", looped[phase != "none"]),
        ("single block", looped[blocks == 1]),
        ("few blocks", looped[blocks > 1]),
        (f"narrow (d <= {median:g})", looped[width <= median]),
        (f"wide (d > {median:g})", looped[width > median]),
    ]


def shared_vs_unique(rows: pd.DataFrame, store: TokenStore | None, cfg: ReportConfig) -> Answer:
    """Looped without refinement vs unique depth, per group, split by share mode, phase mode, blocks and width."""
    passes, refine = int_column(rows, "n_passes", 1), int_column(rows, "refine_passes", 0)
    out: list[dict[str, object]] = []
    for group, part in budget_groups(rows):
        p, r = passes.loc[part.index], refine.loc[part.index]
        looped, unique = part[(p > 1) & (r == 0)], part[(p == 1) & (r == 0)]
        if looped.empty or unique.empty:
            continue
        per_token = all_per_token(pd.concat([looped, unique]), store)
        unique_pick = held_out_best(_configs(unique, store, per_token), cfg.min_seeds)
        for label, subset in _q1_subsets(looped):
            same_as_all = label != "all looped" and set(subset["config_id"]) == set(looped["config_id"])
            if subset.empty or same_as_all:  # a split that splits nothing would only repeat the first row
                continue
            pick = held_out_best(_configs(subset, store, per_token), cfg.min_seeds)
            a, b = pick.test, unique_pick.test
            if a.num.shape[1] != b.num.shape[1]:  # held-out documents differ when only one side picked
                a, b = _same_docs(a, b)
            estimate = None
            if min(len(a.seeds), len(b.seeds)) >= cfg.min_seeds:
                estimate = crossed_difference(a.num, a.den, b.num, b.den, confidence=cfg.confidence)
            chosen_a = part[part["config_id"] == pick.config_id]
            chosen_b = part[part["config_id"] == unique_pick.config_id]
            out.append({
                "group": group, "looped subset": label,
                "looped": describe_config(chosen_a.iloc[0]), "unique": describe_config(chosen_b.iloc[0]),
                "fill A/B": f"{_fill(chosen_a):.3f}/{_fill(chosen_b):.3f}",
                "steps A/B": f"{chosen_a['train_steps'].mean():.0f}/{chosen_b['train_steps'].mean():.0f}",
                **estimate_cells(estimate), "selection": f"looped: {pick.note}; unique: {unique_pick.note}",
            })  # fmt: skip
    table, verdict = finish_section(out, cfg.alpha)
    missing = "" if out else "No group holds both a looped (n_passes > 1, no refinement) and a unique-depth trial."
    overview = configurations(rows, store)
    return Answer(
        "1. Shared vs unique depth (no refinement), at equal bytes and equal wall-clock",
        "Δ = looped − unique in val bpb (negative: looped is better). Each side's best configuration is picked "
        "on data it is not tested on. Fill = artifact bytes / cap; every trial of a group had the same train "
        "seconds.",
        table, verdict, missing,
        plots.forest(table, "looped − unique (bpb)", ("looped subset", "looped")) if out else None,
        (("Every configuration (mean over seeds; seed sd; eval standard error from documents)", overview),),
    )


def configurations(rows: pd.DataFrame, store: TokenStore | None) -> pd.DataFrame:
    """Per group and configuration: seeds, mean val bpb, its seed sd, and the eval standard error
    from documents (how much the score would move on other text of the same kind)."""
    out = []
    for group, part in budget_groups(rows):
        for config_id, trials in part.groupby("config_id", sort=True):
            per_token = all_per_token(trials, store)
            m = matrix(trials, store, per_token)
            per_seed = m.num.sum(axis=1) / m.den.sum(axis=1)
            doc_se = float("nan")
            if per_token:
                _, z = linearize(m.num, m.den)
                doc_se = float(z.mean(axis=0).std(ddof=1) / np.sqrt(z.shape[1]))
            out.append({
                "group": group, "configuration": describe_config(trials.iloc[0]), "config_id": str(config_id)[:10],
                "arm": trials["arm"].iloc[0] if "arm" in trials else None, "seeds": len(m.seeds),
                "mean bpb": float(per_seed.mean()), "seed sd": float(per_seed.std(ddof=1)) if len(per_seed) > 1
                else float("nan"), "eval SE (documents)": doc_se,
            })  # fmt: skip
    return pd.DataFrame(out)


def _same_docs(a: Matrix, b: Matrix) -> tuple[Matrix, Matrix]:
    """Restrict a side that kept every document to the odd ones the other side was tested on."""
    if a.num.shape[1] > b.num.shape[1]:
        return a.take(docs=np.arange(a.num.shape[1]) % 2 == 1), b
    return a, b.take(docs=np.arange(b.num.shape[1]) % 2 == 1)


# ------------------------------------------------------------------------- pairs (sections 2, 4, 5, 6)


def pairs(rows: pd.DataFrame) -> list[tuple[str, pd.DataFrame, dict[str, pd.DataFrame]]]:
    """(routed config_id, routed rows, {arm: rows}) of every routed configuration that has
    arms. A pair (pair_id) holds the routed configurations that differ only in signal and
    the one set of arms they share; each routed configuration is compared with them."""
    if "arm" not in rows or "pair_id" not in rows or rows["arm"].isna().all():
        return []
    out = []
    for _, part in rows[rows["pair_id"].notna()].groupby("pair_id", sort=True):
        arms = {a: part[part["arm"] == a] for a in CONTROL_ARMS if (part["arm"] == a).any()}
        for config_id, routed in part[part["arm"] == ROUTED_ARM].groupby("config_id", sort=True):
            if arms:
                out.append((str(config_id), routed, arms))
    return out


def _paired(a: pd.DataFrame, b: pd.DataFrame, store: TokenStore | None) -> tuple[np.ndarray, np.ndarray, bool]:
    """Matched seeds of two arms: (A - B bits [S, D], bytes [S, D], per-token?)."""
    seeds = sorted(set(a["seed"].dropna().astype(int)) & set(b["seed"].dropna().astype(int)))
    a, b = a[a["seed"].isin(seeds)], b[b["seed"].isin(seeds)]
    per_token = all_per_token(pd.concat([a, b]), store)
    ma, mb = matrix(a, store, per_token), matrix(b, store, per_token)
    return ma.num - mb.num, ma.den, per_token


NO_PAIRS = "No paired arms in this sweep (the ledger has no `arm`/`pair_id`, or no routed configuration has arms)."


def routed_vs_controls(rows: pd.DataFrame, store: TokenStore | None, cfg: ReportConfig) -> Answer:
    """Each routed configuration against each of its own control arms, paired by seed and token."""
    out: list[dict[str, object]] = []
    for pair_id, routed, arms in pairs(rows):
        for arm, control in arms.items():
            num, den, per_token = _paired(routed, control, store)
            estimate = crossed_ratio(num, den, confidence=cfg.confidence) if len(num) else None
            out.append({
                "pair": pair_id[:10], "routed": describe_config(routed.iloc[0]), "control": arm,
                "refined (target)": _fraction(routed), **estimate_cells(estimate),
                "evidence": "seeds x documents" if per_token else "seeds only (no per-token files)",
            })  # fmt: skip
    table, verdict = finish_section(out, cfg.alpha)
    return Answer(
        "2. Routed refinement vs its own controls",
        "Δ = routed − control in val bpb, paired by seed and, with per-token files, by token (negative: routing "
        "helps). Controls run the same configuration and seeds with only the routing changed.",
        table, verdict, "" if out else NO_PAIRS,
        plots.forest(table, "routed − control (bpb)", ("pair", "control")) if out else None,
    )


def _fraction(rows: pd.DataFrame) -> str:
    """Evaluated fraction (target), and the fraction the last training step refined: a routed
    signal trains with an EMA threshold that lags a drifting score, so in short runs it can
    train far from the target its controls train at."""
    def mean(column: str) -> float:
        return float(rows[column].mean()) if column in rows else float("nan")

    text = f"{mean('refine_fraction'):.3f} ({mean('refine_target'):.3f})"
    trained = mean("train_refine_fraction")
    return text if np.isnan(trained) else f"{text}; trained {trained:.3f}"


# ------------------------------------------------------------------------- 4. overhead


def routing_overhead(rows: pd.DataFrame, store: TokenStore | None, cfg: ReportConfig) -> Answer:
    """Measured time per token of routed vs uniform, against their analytic FLOP ratio."""
    out: list[dict[str, object]] = []
    for pair_id, routed, arms in pairs(rows):
        if "uniform" not in arms:
            continue
        uniform = arms["uniform"]
        seeds = sorted(set(routed["seed"].astype(int)) & set(uniform["seed"].astype(int)))
        r = routed.set_index("seed").loc[seeds]
        u = uniform.set_index("seed").loc[seeds]
        flops = float((r["eval_flops_per_token"] / u["eval_flops_per_token"]).mean())
        eval_ratio = np.log((r["eval_seconds"] / u["eval_seconds"]).to_numpy(np.float64))
        train_ratio = np.log((_train_rate(u) / _train_rate(r)).to_numpy(np.float64))
        for what, logs in (("eval", eval_ratio), ("train", train_ratio)):
            e = crossed_ratio(logs[:, None], np.ones((len(logs), 1)), confidence=cfg.confidence)
            ratio = np.exp(e.value)
            out.append({
                "pair": pair_id[:10], "routed": describe_config(routed.iloc[0]), "phase": what,
                "FLOP ratio": flops,
                "time ratio [95% CI]": f"{ratio:.3f}" + (
                    f" [{np.exp(e.ci_low):.3f}, {np.exp(e.ci_high):.3f}]" if e.testable else ""
                ),
                "saving realized": (1 - ratio) / (1 - flops) if flops != 1 else float("nan"),
                "p": e.p_value, "seeds": e.n_seeds,
            })  # fmt: skip
    table, verdict = finish_section(out, cfg.alpha)
    missing = "" if out else NO_PAIRS.replace("has arms", "has a `uniform` arm")
    return Answer(
        "4. Does routing overhead cancel the saving?",
        "Per token, routed time / uniform time (geometric mean over seeds) beside the analytic FLOP ratio. "
        "p tests time ratio = 1; 'saving realized' = (1 − time ratio) / (1 − FLOP ratio): 1 means the FLOP "
        "saving shows in full in seconds, <= 0 that the overhead cancels it.",
        table, verdict, missing, plots.overhead(table) if out else None,
    )


def _train_rate(rows: pd.DataFrame) -> pd.Series:
    if "tokens_per_second" in rows and rows["tokens_per_second"].notna().all():
        return rows["tokens_per_second"].astype(float)
    return rows["train_tokens"].astype(float) / rows["train_seconds"].astype(float)


# ------------------------------------------------------------------------- 5. after compression


def after_compression(rows: pd.DataFrame, store: TokenStore | None, cfg: ReportConfig) -> Answer:
    """Refinement gain (routed − no_refine) before and after quantization, per bit width."""
    units: list[dict[str, object]] = []
    for _, routed, arms in pairs(rows):
        if NO_REFINE not in arms:
            continue
        nr = arms[NO_REFINE]
        seeds = sorted(set(routed["seed"].astype(int)) & set(nr["seed"].astype(int)))
        r, n = routed.set_index("seed").loc[seeds], nr.set_index("seed").loc[seeds]
        for s in seeds:
            pre = r.loc[s, "val_bpb_prequant"] - n.loc[s, "val_bpb_prequant"]
            units.append({"bits": int(r.loc[s, "bits"]), "pre": pre, "post": r.loc[s, METRIC] - n.loc[s, METRIC]})
    out: list[dict[str, object]] = []
    for bits, part in pd.DataFrame(units).groupby("bits", sort=True) if units else []:
        gains = (("before", part["pre"]), ("after", part["post"]), ("after − before", part["post"] - part["pre"]))
        for what, values in gains:
            x = values.to_numpy(np.float64)[:, None]
            e = crossed_ratio(x, np.ones_like(x), confidence=cfg.confidence)
            out.append({"bits": bits, "gain": what, **estimate_cells(e)})
    table, verdict = finish_section(out, cfg.alpha)
    extra = _ranking_tables(rows)
    return Answer(
        "5. After compression: does the refinement gain survive quantization?",
        "Gain = routed − no_refine val bpb (paired by seed; units are (pair, seed)), before quantization and "
        "from the artifact, per bit width. Below: whether the ranking of configurations survives quantization "
        "(exact permutation p-values for n <= 8).",
        table, verdict, "" if out else NO_PAIRS.replace("has arms", "has a `no_refine` arm"),
        plots.forest(table, "gain (bpb)", label_columns=("bits", "gain")) if out else None, extra,
    )


def _ranking_tables(rows: pd.DataFrame) -> tuple[tuple[str, pd.DataFrame], ...]:
    out = []
    for group, part in budget_groups(rows[rows["val_bpb_prequant"].notna()]):
        per = part.groupby("config_id").agg(pre=("val_bpb_prequant", "mean"), post=(METRIC, "mean"))
        rc = rank_correlation(per["pre"].to_numpy(), per["post"].to_numpy())
        out.append({"group": group, "configurations": rc.n, "Spearman ρ": rc.spearman, "p (ρ)": rc.spearman_p,
                    "Kendall τ": rc.kendall, "p (τ)": rc.kendall_p, "exact": rc.exact})  # fmt: skip
    return (("Ranking through quantization", pd.DataFrame(out)),) if out else ()
