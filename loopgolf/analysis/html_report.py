"""report.html: the report's sections as one self-contained page that opens offline.

plotly writes the interactive Pareto fronts and learning curves; its JavaScript is
inlined once (no CDN, so the page works without a network), and the sections' PNGs are
inlined as data URIs. Tables are escaped HTML. Element ids the browser test relies on:
`pareto-<view>` (a front's plot div) and `curves` (the learning curves' div).
"""

from __future__ import annotations

import base64
import html as html_lib
from typing import TYPE_CHECKING

import pandas as pd

from loopgolf.analysis import plots
from loopgolf.analysis.parts import Front, Section, cell, visible

if TYPE_CHECKING:
    from loopgolf.analysis.evidence import ReportConfig

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; font-size: 12px; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; }
th { background: #f3f3f3; }
.missing { color: #8a4b00; }
.verdict { font-weight: 600; }
img { max-width: 100%; }
"""


def _table(table: pd.DataFrame, max_rows: int) -> str:
    table = visible(table)
    if table.empty:
        return "<p><em>(no rows)</em></p>"
    head = "".join(f"<th>{html_lib.escape(str(c))}</th>" for c in table.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html_lib.escape(cell(v).replace(chr(92) + '|', '|'))}</td>" for v in row) + "</tr>"
        for row in table.head(max_rows).itertuples(index=False)
    )
    more = f"<p><em>{len(table) - max_rows} more rows not shown.</em></p>" if len(table) > max_rows else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


def _png(data: bytes, alt: str) -> str:
    return f'<img alt="{html_lib.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _section(section: Section, max_rows: int) -> str:
    a = section.answer
    parts = [f"<h2>{html_lib.escape(a.title)}</h2>", f"<p>{html_lib.escape(a.method)}</p>"]
    if a.missing:
        parts.append(f'<p class="missing"><strong>Not answered:</strong> {html_lib.escape(a.missing)}</p>')
    if not a.table.empty:
        parts += [_table(a.table, max_rows), f'<p class="verdict">{html_lib.escape(a.verdict)}</p>']
    for caption, table in a.extra:
        parts += [f"<p>{html_lib.escape(caption)}:</p>", _table(table, max_rows)]
    if section.png:
        parts.append(_png(section.png, a.title))
    return "\n".join(parts)


def _figure_div(fig: object, div_id: str, with_js: bool) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=with_js, div_id=div_id)  # type: ignore[attr-defined]


def render(
    header: list[str], sections: list[Section], fronts: list[Front], quick: pd.DataFrame | None, cfg: ReportConfig
) -> str:
    """The whole page as one string."""
    body = ["<h1>loopgolf report</h1>", *(f"<p>{html_lib.escape(line)}</p>" for line in header)]
    body += [_section(s, cfg.max_listed) for s in sections]
    body.append("<h2>Pareto fronts</h2><p>Hover a point for its configuration, seed, arm, bpb, bytes and eval "
                "FLOPs. Grey: every feasible trial; red: the front.</p>")  # fmt: skip
    js_included = False
    for front in fronts:
        body.append(f"<h3>{html_lib.escape(plots.METRIC)} × {html_lib.escape(front.x)}</h3>")
        if front.rows.empty:
            body.append(f"<p>No feasible trial has {html_lib.escape(front.x)}.</p>")
            continue
        fig = plots.interactive_front(front.rows, front.front_rows, front.x)
        body += [_figure_div(fig, f"pareto-{front.name}", not js_included), _table(front.table, cfg.max_listed)]
        js_included = True
    body.append("<h2>Learning curves</h2>")
    if quick is None:
        body.append("<p>No learning curves (results/curves.parquet has no quick_val_bpb).</p>")
    else:
        body.append(_figure_div(plots.interactive_curves(quick), "curves", not js_included))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>loopgolf report</title>'
        f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
