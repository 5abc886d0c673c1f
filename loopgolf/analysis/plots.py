"""The report's plots: matplotlib figures (PNG, for report.md and inlined in report.html) and
plotly figures (the interactive Pareto fronts and learning curves of report.html).

Every function returns a figure and writes nothing; the report saves them.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pandas as pd

METRIC = "val_bpb"


def pyplot():  # type: ignore[no-untyped-def]
    """matplotlib.pyplot, drawing off-screen (imported here: only the figures need it)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: object) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return buffer.getvalue()


def forest(table: pd.DataFrame, xlabel: str, label_columns: Sequence[str] | None = None) -> object:
    """Estimates with their intervals, one row each; significant ones (after Holm) in red."""
    plt = pyplot()
    shown = table[np.isfinite(table["_value"].astype(float))]
    fig, ax = plt.subplots(figsize=(8, 0.8 + 0.35 * max(1, len(shown))))
    if label_columns is None:
        label_columns = [c for c in table.columns if not c.startswith("_")][:2]
    labels = [" | ".join(str(r[c])[:40] for c in label_columns) for _, r in shown.iterrows()]
    y = np.arange(len(shown))[::-1]
    value = shown["_value"].astype(float).to_numpy()
    low = np.nan_to_num(value - shown["_low"].astype(float).to_numpy(), nan=0.0)
    high = np.nan_to_num(shown["_high"].astype(float).to_numpy() - value, nan=0.0)
    colors = ["tab:red" if s else "tab:blue" for s in shown.get("significant", [False] * len(shown))]
    ax.errorbar(value, y, xerr=[low, high], fmt="none", ecolor="grey", capsize=3)
    ax.scatter(value, y, c=colors, zorder=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlabel(f"{xlabel}, 95% interval (red: significant after Holm)")
    return fig


def overhead(table: pd.DataFrame) -> object:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for phase, part in table.groupby("phase"):
        ratio = part["time ratio [95% CI]"].str.split(" ").str[0].astype(float)
        ax.scatter(part["FLOP ratio"], ratio, label=phase)
    lo = float(np.nanmin([table["FLOP ratio"].min(), 0.5]))
    ax.plot([lo, 1.5], [lo, 1.5], color="grey", lw=0.8, label="time ∝ FLOPs")
    ax.axhline(1, color="black", lw=0.6)
    ax.set_xlabel("FLOP ratio, routed / uniform")
    ax.set_ylabel("time ratio, routed / uniform")
    ax.legend(fontsize=8)
    return fig


def profile(table: pd.DataFrame) -> object:
    """Mean CE change per refined token by bucket, one panel per bucketing."""
    plt = pyplot()
    kinds = [k for k in ("decile", "position", "frequency") if (table["by"] == k).any()]
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(4.5 * max(1, len(kinds)), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=False):
        for signal, part in table[table["by"] == kind].groupby("signal"):
            x = np.arange(len(part))
            value = part["_value"].astype(float).to_numpy()
            low, high = part["_low"].astype(float).to_numpy(), part["_high"].astype(float).to_numpy()
            err = [np.nan_to_num(value - low), np.nan_to_num(high - value)]
            ax.errorbar(x, value, yerr=err, marker="o", capsize=3, label=signal)
            ax.set_xticks(x, part["bucket"], fontsize=7, rotation=45)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"by {kind}")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("mean ΔCE per refined token (nats)")  # once: the panels share its meaning
    fig.tight_layout()
    return fig


def concentration(curves: dict[str, np.ndarray]) -> object:
    """Cumulative share of the gain against the share of documents, best documents first."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for label, curve in curves.items():
        ax.plot(np.arange(1, len(curve) + 1) / len(curve), curve, label=label)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, label="spread evenly")
    ax.set_xlabel("share of documents (largest gain first)")
    ax.set_ylabel("share of the total gain")
    ax.legend(fontsize=7)
    return fig


def front(rows: pd.DataFrame, front_rows: pd.DataFrame, x: str) -> object:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    front_rows = front_rows.sort_values(x, kind="stable")  # the staircase runs along x
    ax.scatter(rows[x].astype(float), rows[METRIC], s=10, color="lightgrey", label="feasible trials")
    ax.step(front_rows[x].astype(float), front_rows[METRIC], where="post", color="tab:red", lw=1)
    ax.scatter(front_rows[x].astype(float), front_rows[METRIC], s=22, color="tab:red", label="Pareto front", zorder=3)
    ax.set_xlabel(x)
    ax.set_ylabel(METRIC)
    ax.set_title(f"Pareto front: {METRIC} x {x}")
    ax.legend(fontsize=8)
    return fig


def learning_curves(curves: pd.DataFrame, labels: dict[str, str]) -> object:
    """Quick val bpb against elapsed seconds, one line per trial, one colour per configuration."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, (config, part) in enumerate(curves.groupby("config", sort=True)):
        for i, (_, trial) in enumerate(part.groupby("trial_id", sort=True)):
            ax.plot(trial["elapsed_seconds"], trial["value"], color=f"C{k % 10}", lw=1,
                    label=labels.get(config, config) if i == 0 else None)  # fmt: skip
    ax.set_xlabel("elapsed seconds")
    ax.set_ylabel("quick val bpb")
    if curves["config"].nunique() <= 12:
        ax.legend(fontsize=6)
    return fig


# ------------------------------------------------------------------------- interactive (plotly)


HOVER_COLUMNS = ("config", "seed", "arm", METRIC, "artifact_bytes", "eval_flops_per_token")


def interactive_front(rows: pd.DataFrame, front_rows: pd.DataFrame, x: str) -> object:
    """All feasible trials (grey) and the front (red); hovering a point shows its configuration,
    seed, arm, bpb, bytes and eval FLOPs. The front's trace is named "Pareto front"."""
    import plotly.graph_objects as go

    def hover(frame: pd.DataFrame) -> list[str]:
        return [
            "<br>".join(f"{c}: {r.get(c, '–')}" for c in HOVER_COLUMNS) for _, r in frame.iterrows()
        ]

    front_rows = front_rows.sort_values(x, kind="stable")
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=rows[x].astype(float), y=rows[METRIC], mode="markers", name="feasible trials",
                             marker={"color": "lightgrey", "size": 6}, text=hover(rows), hoverinfo="text"))
    fig.add_trace(go.Scatter(x=front_rows[x].astype(float), y=front_rows[METRIC], mode="markers+lines",
                             name="Pareto front", line={"shape": "hv", "color": "crimson"},
                             marker={"size": 9}, text=hover(front_rows), hoverinfo="text"))  # fmt: skip
    fig.update_layout(title=f"Pareto front: {METRIC} × {x}", xaxis_title=x, yaxis_title=METRIC, height=450)
    return fig


def interactive_curves(curves: pd.DataFrame) -> object:
    """Quick val bpb against elapsed seconds, one trace per trial, grouped (legend) by configuration."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for config, part in curves.groupby("config", sort=True):
        for i, (trial_id, trial) in enumerate(part.groupby("trial_id", sort=True)):
            fig.add_trace(go.Scatter(
                x=trial["elapsed_seconds"], y=trial["value"], mode="lines", name=str(config), legendgroup=str(config),
                showlegend=i == 0, hovertext=f"{config} · {trial_id}", hoverinfo="text+x+y",
            ))  # fmt: skip
    fig.update_layout(title="Learning curves", xaxis_title="elapsed seconds", yaxis_title="quick val bpb", height=450)
    return fig
