"""The report's plots: PNG files for report.md (matplotlib, no display)."""

from __future__ import annotations

import importlib.util
import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from loopgolf.analysis.pareto import pareto_front
from loopgolf.analysis.questions import (
    DECILES,
    METRIC,
    PARETO_VIEWS,
    DecileProfile,
    QuantizationRanking,
    describe_config,
)
from loopgolf.analysis.stats import Comparison


def atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_png(fig: object, path: Path) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    atomic_write(path, buffer.getvalue())
    return path.name


def plot_comparisons(comparisons: Sequence[Comparison], title: str, path: Path) -> str:
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
    return save_png(fig, path)


def plot_refinement(table: pd.DataFrame, path: Path) -> str:
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
    return save_png(fig, path)


def plot_deciles(profile: DecileProfile, path: Path) -> str:
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
    return save_png(fig, path)


def plot_quantization(ranking: QuantizationRanking, path: Path) -> str:
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
    return save_png(fig, path)


def plot_front(rows: pd.DataFrame, front: pd.DataFrame, x: str, path: Path) -> str:
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
    return save_png(fig, path)


def plotly_fronts(rows: pd.DataFrame, path: Path) -> str | None:
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
    atomic_write(path, fig.to_html(include_plotlyjs="cdn").encode())
    return path.name
