"""The hypothesis report: assembles report.md from the questions (questions.py), their
statistics (stats.py) and plots (plots.py); only `report()` reads Parquet and writes files.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from loopgolf.analysis import plots
from loopgolf.analysis.pareto import pareto_front
from loopgolf.analysis.questions import (
    METRIC,
    PARETO_VIEWS,
    ReportConfig,
    competing,
    decile_profile,
    front_table,
    looped_vs_unique,
    quantization_ranking,
    refinement_configs,
    refinement_vs_controls,
)
from loopgolf.analysis.results import STATUSES, load_results, trials_files
from loopgolf.analysis.stats import Comparison

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
    config: ReportConfig | None = None,
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
    cfg = config or ReportConfig()
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
        plot = plots.plot_comparisons(q1, "Looped vs unique depth", out / "looped_vs_unique.png")
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
        md += [f"![refinement by signal]({plots.plot_refinement(q2_table, out / 'refinement_signals.png')})", ""]

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
            f"![CE change by decile]({plots.plot_deciles(profile, out / 'decile_ce_delta.png')})",
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
        md += [f"![quantization]({plots.plot_quantization(ranking, out / 'quantization_ranks.png')})", ""]

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
        md += [f"![front]({plots.plot_front(usable, pareto_front(df, objectives), x, out / f'pareto_{name}.png')})", ""]  # type: ignore[arg-type]
    if not rows.empty:
        html = plots.plotly_fronts(rows, out / "pareto.html")
        if html:
            md += [f"Interactive version: [{html}]({html})", ""]

    path = out / "report.md"
    plots.atomic_write(path, "\n".join(md).encode("utf-8"))
    return path
