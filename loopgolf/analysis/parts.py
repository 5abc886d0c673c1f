"""The report's parts, shared by both renderers (report.py writes Markdown, html_report.py
HTML): a section (an answer and its plot), a Pareto front, and Markdown tables and cells."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from loopgolf.analysis.questions import Answer

# ------------------------------------------------------------------------- Markdown


def cell(value: object) -> str:
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
        return f"{value:.3g}" if abs(value) >= 1e3 or (value != 0 and abs(value) < 1e-3) else f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def visible(table: pd.DataFrame) -> pd.DataFrame:
    """The columns a reader sees (`_`-prefixed ones feed the plots)."""
    return table[[c for c in table.columns if not str(c).startswith("_")]]


def md_table(table: pd.DataFrame, max_rows: int | None = None) -> str:
    """A GitHub-flavoured Markdown table (no dependency on `tabulate`)."""
    table = visible(table)
    if table.empty:
        return "_(no rows)_"
    shown = table if max_rows is None else table.head(max_rows)
    lines = ["| " + " | ".join(map(str, shown.columns)) + " |", "|" + "---|" * len(shown.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    if max_rows is not None and len(table) > max_rows:
        lines.append(f"\n_{len(table) - max_rows} more rows not shown._")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Section:
    """One section as both renderers need it: the answer, its PNG (file name and bytes)."""

    answer: Answer
    png_name: str | None
    png: bytes | None


@dataclasses.dataclass(frozen=True)
class Front:
    name: str
    x: str
    table: pd.DataFrame  # front_table rows
    rows: pd.DataFrame  # all competing trials with a value of x
    front_rows: pd.DataFrame
    png: bytes | None
