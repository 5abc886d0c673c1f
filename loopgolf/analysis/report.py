"""The hypothesis report: assembles report.md (with PNG plots) and report.html (one
self-contained file) from the six questions (questions.py, token_questions.py), their
statistics (stats.py) and plots (plots.py). Only `report()` reads Parquet and writes files.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from loopgolf.analysis import html_report, plots
from loopgolf.analysis.evidence import METRIC, ReportConfig, competing, describe_config, group_columns
from loopgolf.analysis.pareto import pareto_front
from loopgolf.analysis.parts import Front, Section, md_table
from loopgolf.analysis.questions import (
    after_compression,
    routed_vs_controls,
    routing_overhead,
    shared_vs_unique,
)
from loopgolf.analysis.record import parse_reference, record_test
from loopgolf.analysis.results import CURVES_FILE, RESULTS_DIR, STATUSES, load_curves, load_results, trials_files
from loopgolf.analysis.token_questions import robustness, where_refinement_helps
from loopgolf.analysis.tokens import TokenStore, sweep_dir_of
from loopgolf.analysis.transfer import transfer
from loopgolf.atomic import atomic_write_bytes
from loopgolf.errors import LoopgolfError

__all__ = ["PARETO_VIEWS", "ReportConfig", "front_table", "md_table", "report"]

QUESTIONS = (shared_vs_unique, routed_vs_controls, where_refinement_helps, routing_overhead, after_compression,
             robustness)  # fmt: skip

PARETO_VIEWS: tuple[tuple[str, dict[str, str]], ...] = (
    ("bytes", {METRIC: "min", "artifact_bytes": "min"}),
    ("flops", {METRIC: "min", "eval_flops_per_token": "min"}),
)
_FRONT_COLUMNS = ("trial_id", "config", "seed", "arm", "val_bpb", "artifact_bytes", "eval_flops_per_token", "sweep")


def front_table(df: pd.DataFrame, objectives: dict[str, str]) -> pd.DataFrame:
    """The Pareto front of feasible complete trials, with a configuration description column."""
    front = pareto_front(df, objectives)  # type: ignore[arg-type]
    front = front.assign(config=[describe_config(row) for _, row in front.iterrows()])
    return front[[c for c in _FRONT_COLUMNS if c in front]].reset_index(drop=True)


def _load(dirs: Sequence[str | os.PathLike[str]]) -> tuple[pd.DataFrame, dict[str, Path], pd.DataFrame | None]:
    """Trials of every sweep, trial id -> its sweep directory, and the learning curves (if any)."""
    frames, where, curves = [], {}, []
    for d in dirs:
        df = load_results(d)
        frames.append(df)
        where |= dict.fromkeys(df["trial_id"], sweep_dir_of(d))
        if (sweep_dir_of(d) / CURVES_FILE).is_file():  # a sweep without curves: the section says so
            curves.append(load_curves(d))
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return df, where, (pd.concat(curves, ignore_index=True) if curves else None)


def _expand(dirs: Sequence[str | os.PathLike[str]]) -> list[str | os.PathLike[str]]:
    """Globs and Parquet paths -> one sweep directory per trials file."""
    return [f.parent.parent if f.parent.name == RESULTS_DIR.name else f for f in trials_files(*dirs)]


NOT_APPLICABLE = ("Not applicable to script trials: loopgolf sees a script's environment variables, not its "
                  "model, so it cannot tell looped from unique depth or route refinement; compare configurations "
                  "in the table and the Pareto fronts below.")  # fmt: skip


def _sections(rows: pd.DataFrame, store: TokenStore, cfg: ReportConfig) -> list[Section]:
    out = []
    scripts_only = bool(len(rows)) and "kind" in rows and bool((rows["kind"] == "script").all())
    for k, question in enumerate(QUESTIONS, start=1):
        answer = question(rows, store, cfg)
        if scripts_only:  # the per-configuration table (section 1) still applies; the verdicts do not
            answer = dataclasses.replace(answer, missing=NOT_APPLICABLE, verdict="", figure=None)
        png = plots.png_bytes(answer.figure) if answer.figure is not None else None
        out.append(Section(answer, f"section{k}.png" if png else None, png))
    return out


def _promotion_sections(df: pd.DataFrame, reference: str | None) -> list[Section]:
    """Transfer (when a promoted sweep is among the sweeps) and the record test (with --reference)."""
    answers = []
    if "promoted_from" in df and df["promoted_from"].notna().any():
        answers.append(transfer(df))
    if reference is not None:
        answers.append(record_test(df, parse_reference(reference, df)))
    out = []
    for k, answer in enumerate(answers, start=len(QUESTIONS) + 1):
        png = plots.png_bytes(answer.figure) if answer.figure is not None else None
        out.append(Section(answer, f"section{k}.png" if png else None, png))
    return out


def _fronts(df: pd.DataFrame, rows: pd.DataFrame) -> list[Front]:
    out = []
    for name, objectives in PARETO_VIEWS:
        x = list(objectives)[1]
        usable = rows[rows[x].notna()]
        front_rows = pareto_front(df, objectives) if not usable.empty else usable  # type: ignore[arg-type]
        table = front_table(df, objectives) if not usable.empty else usable
        png = plots.png_bytes(plots.front(usable, front_rows, x)) if not usable.empty else None
        described = usable.assign(config=[describe_config(r) for _, r in usable.iterrows()])
        front_described = front_rows.assign(config=[describe_config(r) for _, r in front_rows.iterrows()])
        out.append(Front(name, x, table, described, front_described, png))
    return out


def _curves(curves: pd.DataFrame | None, df: pd.DataFrame) -> pd.DataFrame | None:
    """quick_val_bpb rows with each trial's configuration description."""
    if curves is None:
        return None
    quick = curves[(curves["metric"] == "quick_val_bpb") & curves["value"].notna()]
    configs = dict(zip(df["trial_id"], [describe_config(r) for _, r in df.iterrows()], strict=True))
    quick = quick[quick["trial_id"].isin(configs)]
    if quick.empty:
        return None
    return quick.assign(config=quick["trial_id"].map(configs)).sort_values(["trial_id", "elapsed_seconds"])


def _header(df: pd.DataFrame, rows: pd.DataFrame, cfg: ReportConfig, store_notes: list[str]) -> list[str]:
    counts = df["status"].value_counts()
    sweeps = ", ".join(sorted(df["sweep"].dropna().astype(str).unique())) or "(none)"
    _, notes = group_columns(df)
    return [
        f"Sweeps: {sweeps}. Generated {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M UTC}.",
        f"{len(df)} trials: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES)
        + f"; {len(rows)} feasible and complete, in {rows['config_id'].nunique()} configurations.",
        "How to read: only feasible, complete trials count, and only within one group of equal data, byte cap, "
        "train budget and hardware. Every Δ comes with a 95% interval that accounts for seed-to-seed and (with "
        "per-token files) document-to-document variation: a crossed seeds × documents random-effects t interval on "
        f"the bytes-weighted ratio. p-values are Holm-corrected within each section at α = {cfg.alpha}. With fewer "
        f"than {cfg.min_seeds} seeds on a side nothing is tested. 'Best of a side' is picked on data it is not "
        "tested on.",
        *[f"Note: {n}." for n in notes + store_notes],
    ]


def report(
    sweep_dirs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    config: ReportConfig | None = None,
    reference: str | None = None,
) -> Path:
    """Write report.md (+ PNGs) and report.html for one or many sweeps; returns report.md's path.

    `out_dir` defaults to `<first sweep dir>/report`. Each file is replaced atomically and
    report.md is written last, so it never points at a plot that is not there.
    """
    cfg = config or ReportConfig()
    dirs = _expand([sweep_dirs] if isinstance(sweep_dirs, (str, os.PathLike)) else list(sweep_dirs))
    df, where, curves = _load(dirs)
    out = Path(out_dir) if out_dir is not None else Path(dirs[0]) / "report"
    if out.exists() and not out.is_dir():
        raise LoopgolfError(f"report directory {str(out)!r}: is a file; expected a directory (or a new path)")
    out.mkdir(parents=True, exist_ok=True)
    rows = competing(df)
    store = TokenStore(df, where)
    has_tokens = any(store.has(t) for t in rows["trial_id"])
    store_notes = [] if has_tokens else ["no per-token evaluation files: intervals cover seeds only"]
    sections = _sections(rows, store, cfg) + _promotion_sections(df, reference)
    fronts = _fronts(df, rows)
    quick = _curves(curves, df)
    header = _header(df, rows, cfg, store_notes)
    atomic_write_bytes(out / "report.html", html_report.render(header, sections, fronts, quick, cfg).encode("utf-8"))
    return _write_markdown(out, header, sections, fronts, quick, cfg)


def _write_markdown(
    out: Path, header: list[str], sections: list[Section], fronts: list[Front], quick: pd.DataFrame | None,
    cfg: ReportConfig,
) -> Path:
    md = ["# loopgolf report", ""]
    for line in header:
        md += [line, ""]
    for section in sections:
        a = section.answer
        md += [f"## {a.title}", "", a.method, ""]
        if a.missing:
            md += [f"**Not answered:** {a.missing}", ""]
        if not a.table.empty:
            md += [md_table(a.table, cfg.max_listed), "", a.verdict, ""]
        for caption, table in a.extra:
            md += [f"{caption}:", "", md_table(table, cfg.max_listed), ""]
        if section.png_name and section.png:
            atomic_write_bytes(out / section.png_name, section.png)
            md += [f"![{a.title}]({section.png_name})", ""]
    md += ["## Pareto fronts", "", "Non-dominated feasible trials (replicates are separate points; ties all kept).", ""]
    for front in fronts:
        md += [f"### {METRIC} × {front.x}", ""]
        if front.png is None:
            md += [f"No feasible trial has {front.x}.", ""]
            continue
        atomic_write_bytes(out / f"pareto_{front.name}.png", front.png)
        md += [md_table(front.table, cfg.max_listed), "", f"![front](pareto_{front.name}.png)", ""]
    md += ["## Learning curves", ""]
    if quick is None:
        md += ["No learning curves (results/curves.parquet has no quick_val_bpb).", ""]
    else:
        labels = {c: c for c in quick["config"].unique()}
        atomic_write_bytes(out / "learning_curves.png", plots.png_bytes(plots.learning_curves(quick, labels)))
        md += ["Quick val bpb against elapsed seconds, one colour per configuration.", "",
               "![learning curves](learning_curves.png)", ""]  # fmt: skip
    md += ["Interactive version (hover for configuration, seed, arm, bytes, FLOPs): [report.html](report.html)", ""]
    path = out / "report.md"
    atomic_write_bytes(path, "\n".join(md).encode("utf-8"))
    return path
