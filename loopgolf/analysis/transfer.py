"""Transfer: a question one sweep cannot answer alone.

- Transfer: a proxy sweep ranks configurations at a low fidelity (short runs, one GPU);
  `loopgolf promote` re-runs some of them at a higher fidelity with fresh seeds. Does the
  proxy's ranking, and above all its winner, hold there? If not, the proxy is choosing on
  noise or on an effect that does not scale, and a longer search at that fidelity is wasted.
- Record-grade (record.py): whether a configuration clears the challenge's acceptance rule.

Pure functions of ledger rows (one row per trial); nothing here reads files.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pandas as pd

from loopgolf.analysis.evidence import METRIC, competing, describe_config, seed_rows
from loopgolf.analysis.plots import pyplot as _pyplot
from loopgolf.analysis.questions import Answer
from loopgolf.analysis.results import ROUTED_ARM
from loopgolf.analysis.stats import (
    RankCorrelation,
    Summary,
    rank_correlation,
    summarize,
    welch_t_test,
)
from loopgolf.errors import LoopgolfError

PROMOTED = "promoted_from"  # "<source sweep>:<source config_id>" on a promoted sweep's trials
FIDELITY = "fidelity"  # the fields the promoted sweep changed (JSON)
NO_PROMOTED = "No promoted sweep among these: run `loopgolf promote SWEEP --top K --name NEW` and report both."
TRANSFER_TITLE = "Transfer: does the proxy ranking hold?"
MIN_RANKED = 3  # configurations with both fidelities below which a rank correlation says nothing


def _interval(s: Summary, digits: int = 4) -> str:
    if s.n == 0:
        return "–"
    if s.n < 2:
        return f"{s.mean:.{digits}f} (1 seed)"
    return f"{s.mean:.{digits}f} [{s.ci_low:.{digits}f}, {s.ci_high:.{digits}f}]"


# ------------------------------------------------------------------------- transfer


@dataclasses.dataclass(frozen=True)
class TransferResult:
    """One promoted sweep against its source: per configuration, and across configurations."""

    source: str  # the proxy sweep
    promoted: str  # the promoted sweep
    fidelity: str  # what the promotion changed, as text ("" when the ledger does not say)
    configs: pd.DataFrame  # one row per promoted configuration, in proxy order (see _pair_row)
    correlation: RankCorrelation  # proxy means vs promoted means, configurations with both
    proxy_best: str | None  # source config_id with the lowest proxy mean (None: no configuration has both)
    best_still_best: bool | None  # None with fewer than 2 configurations to compare
    p_best: float  # bootstrap over promoted seeds: P(the proxy's best has the lowest promoted mean)
    flipped: pd.DataFrame  # pairs whose order reversed (see _flipped)

    @property
    def spearman(self) -> float:
        return self.correlation.spearman

    @property
    def kendall(self) -> float:
        return self.correlation.kendall

    @property
    def both(self) -> pd.DataFrame:
        """The configurations measured at both fidelities: what the statistics use."""
        return self.configs[(self.configs["proxy_n"] > 0) & (self.configs["promoted_n"] > 0)]


def _split_source(value: str) -> tuple[str, str]:
    sweep, colon, config_id = str(value).rpartition(":")  # config ids are hex; a sweep name may hold ':'
    if not colon or not sweep or not config_id:
        raise LoopgolfError(f"promoted_from {value!r}: expected '<source sweep>:<source config_id>'")
    return sweep, config_id


def _fidelity_text(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return ""
    try:
        changes = json.loads(str(value))
    except json.JSONDecodeError:
        return str(value)
    if not isinstance(changes, dict):
        return str(value)
    return ", ".join(f"{k}={v}" for k, v in sorted(changes.items()))


def _proposal_rows(promoted: pd.DataFrame, source: str) -> pd.DataFrame:
    """The promoted configuration's own trials. A routed configuration's control arms carry the
    same `promoted_from` but are other configurations: only the routed one is the promoted one."""
    if promoted["config_id"].nunique() == 1:
        return promoted
    own = promoted[promoted["arm"] == ROUTED_ARM] if "arm" in promoted else promoted.iloc[:0]
    if own["config_id"].nunique() != 1:
        ids = ", ".join(sorted(map(str, promoted["config_id"].unique())))
        raise LoopgolfError(f"promoted_from {source!r}: several promoted configurations ({ids}) and no one routed")
    return own


def _pair_row(df: pd.DataFrame, ok: pd.Series, promoted: pd.DataFrame, source: str) -> dict[str, object]:
    """One promoted configuration beside its source: means, intervals and seed counts at each fidelity."""
    src_sweep, src_config = _split_source(source)
    promoted = _proposal_rows(promoted, source)
    src_all = df[(df["sweep"] == src_sweep) & (df["config_id"] == src_config)]
    proxy = seed_rows(src_all[ok.loc[src_all.index]])
    high = seed_rows(promoted[ok.loc[promoted.index]])
    p, q = summarize(proxy[METRIC]), summarize(high[METRIC])
    described = src_all.iloc[0] if len(src_all) else promoted.iloc[0]
    return {
        "config_id": src_config, "promoted_config_id": str(promoted["config_id"].iloc[0]),
        "configuration": describe_config(described),
        "proxy_n": p.n, "proxy_mean": p.mean, "proxy_low": p.ci_low, "proxy_high": p.ci_high,
        "promoted_n": q.n, "promoted_mean": q.mean, "promoted_low": q.ci_low, "promoted_high": q.ci_high,
        "promoted_values": tuple(high[METRIC].astype(float)),
        "proxy_summary": p, "promoted_summary": q,
    }  # fmt: skip


def _best_still_best(both: pd.DataFrame, bootstrap: int, seed: int) -> tuple[bool | None, float]:
    """Whether the first row (lowest proxy mean) has the lowest promoted mean, and how often it
    does when each configuration's promoted seeds are resampled (independently, with replacement)."""
    if len(both) < 2:
        return None, math.nan
    promoted = both["promoted_mean"].to_numpy(np.float64)
    still = bool(promoted[0] < promoted[1:].min())
    rng = np.random.default_rng(seed)
    means = np.column_stack([
        rng.choice(np.asarray(v, dtype=np.float64), size=(bootstrap, len(v))).mean(axis=1)
        for v in both["promoted_values"]
    ])  # fmt: skip
    return still, float(np.mean(means[:, 0] < means[:, 1:].min(axis=1)))


FLIP_COLUMNS = ("a", "a config_id", "b", "b config_id", "proxy Δ (a − b)", "promoted Δ (a − b)",
                "p (promoted Δ, Welch)")  # fmt: skip


def _flipped(both: pd.DataFrame) -> pd.DataFrame:
    """Pairs (a better than b at the proxy) that are in the opposite order at the promoted fidelity;
    a tie at either fidelity is not a flip. Δ = a − b in val_bpb (proxy Δ < 0 < promoted Δ)."""
    out = []
    for (_, a), (_, b) in itertools.combinations(both.iterrows(), 2):
        if a["proxy_mean"] > b["proxy_mean"]:
            a, b = b, a
        proxy_delta, promoted_delta = a["proxy_mean"] - b["proxy_mean"], a["promoted_mean"] - b["promoted_mean"]
        if proxy_delta < 0 < promoted_delta:
            out.append(dict(zip(FLIP_COLUMNS, (
                a["configuration"], a["config_id"], b["configuration"], b["config_id"], proxy_delta, promoted_delta,
                welch_t_test(a["promoted_values"], b["promoted_values"])[1],
            ), strict=True)))  # fmt: skip
    return pd.DataFrame(out, columns=list(FLIP_COLUMNS))


def _result(key: tuple[str, str, str], configs: pd.DataFrame, bootstrap: int, seed: int) -> TransferResult:
    configs = configs.sort_values(["proxy_mean", "config_id"], na_position="last", kind="stable")
    configs = configs.reset_index(drop=True)
    has_both = (configs["proxy_n"] > 0) & (configs["promoted_n"] > 0)
    both = configs[has_both]
    configs["proxy_rank"] = both["proxy_mean"].rank(method="min").astype("Int64")
    configs["promoted_rank"] = both["promoted_mean"].rank(method="min").astype("Int64")
    correlation = rank_correlation(both["proxy_mean"].to_numpy(), both["promoted_mean"].to_numpy())
    still, p_best = _best_still_best(both, bootstrap, seed)
    best = str(both["config_id"].iloc[0]) if len(both) else None
    return TransferResult(*key, configs, correlation, best, still, p_best, _flipped(both))


def transfer_stats(df: pd.DataFrame, bootstrap: int = 10_000, seed: int = 0) -> list[TransferResult]:
    """One result per (source sweep, promoted sweep, fidelity): the numbers behind `transfer`.

    Only complete, feasible trials count; a promoted configuration none of whose trials did
    is still listed, with 0 seeds (it did not survive the higher fidelity).
    """
    if bootstrap < 1:
        raise LoopgolfError(f"bootstrap={bootstrap}: expected at least 1 resample")
    if PROMOTED not in df or df[PROMOTED].isna().all():
        return []
    df = df.reset_index(drop=True)
    ok = pd.Series(False, index=df.index)
    ok.loc[competing(df).index] = True
    promoted = df[df[PROMOTED].notna()]
    fidelity = promoted[FIDELITY].map(_fidelity_text) if FIDELITY in promoted else ""
    promoted = promoted.assign(_source=promoted[PROMOTED].map(lambda v: _split_source(v)[0]), _fidelity=fidelity)
    out = []
    for (source, sweep, fid), part in promoted.groupby(["_source", "sweep", "_fidelity"], sort=True):
        rows = [_pair_row(df, ok, group, str(src)) for src, group in part.groupby(PROMOTED, sort=True)]
        out.append(_result((str(source), str(sweep), str(fid)), pd.DataFrame(rows), bootstrap, seed))
    return out


def _p(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3g}"


def _correlation_text(r: TransferResult, alpha: float) -> str:
    c, n = r.correlation, len(r.both)
    if n < MIN_RANKED:
        return f"A rank correlation needs at least {MIN_RANKED} configurations measured at both fidelities; n = {n}."
    if math.isnan(c.spearman):
        return f"No rank correlation: every configuration ties at one fidelity (n = {n})."
    kind = "exact" if c.exact else "asymptotic"
    if c.spearman_p < alpha:
        agree = "agree beyond chance" if c.spearman > 0 else "are reversed beyond chance"
    else:
        agree = "agree no more than chance could explain"
    return (f"Spearman ρ = {c.spearman:.2f} ({kind} p = {_p(c.spearman_p)}, n = {n}), Kendall τ = {c.kendall:.2f} "
            f"({kind} p = {_p(c.kendall_p)}): the two rankings {agree} at α = {alpha:g}.")  # fmt: skip


def _best_text(r: TransferResult) -> str:
    if r.best_still_best is None:
        return ""
    best = r.both.iloc[0]
    name = f"{best['configuration']} ({str(best['config_id'])[:10]})"
    still = "is still the best" if r.best_still_best else "is no longer the best"
    return (f"The proxy's best, {name}, {still} at the promoted fidelity; resampling the promoted seeds, it is "
            f"best in {r.p_best:.1%} of bootstraps.")  # fmt: skip


def _transfer_verdict(r: TransferResult, alpha: float) -> str:
    flips = len(r.flipped)
    significant = int((r.flipped["p (promoted Δ, Welch)"] < alpha).sum()) if flips else 0
    flip = f"{flips} pair(s) flipped order ({significant} with a promoted Δ at p < {alpha:g}, uncorrected)."
    parts = [f"{_label(r)}:", _correlation_text(r, alpha), _best_text(r), flip if flips else "No pair flipped order."]
    return " ".join(p for p in parts if p)


def _label(r: TransferResult) -> str:
    return f"{r.source} → {r.promoted}" + (f" ({r.fidelity})" if r.fidelity else "")


def _transfer_table(r: TransferResult) -> pd.DataFrame:
    c = r.configs
    return pd.DataFrame({
        "proxy → promoted": _label(r), "configuration": c["configuration"], "config_id": c["config_id"].str[:10],
        "proxy val_bpb [95% CI]": c["proxy_summary"].map(_interval), "proxy seeds": c["proxy_n"],
        "promoted val_bpb [95% CI]": c["promoted_summary"].map(_interval), "promoted seeds": c["promoted_n"],
        "proxy rank": c["proxy_rank"], "promoted rank": c["promoted_rank"],
        "_proxy": c["proxy_mean"], "_promoted": c["promoted_mean"],
    })  # fmt: skip


def transfer_figure(results: list[TransferResult]) -> object:
    """Promoted mean against proxy mean, one panel per promotion, coloured by proxy rank and
    labelled with the config id: the axes measure different things, so no y = x line."""
    plt = _pyplot()
    shown = [r for r in results if len(r.both)]
    fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 4.5), squeeze=False)
    for ax, r in zip(axes[0], shown, strict=True):
        b = r.both
        x, y = b["proxy_mean"].to_numpy(np.float64), b["promoted_mean"].to_numpy(np.float64)
        bound = {c: b[c].to_numpy(np.float64) for c in ("proxy_low", "proxy_high", "promoted_low", "promoted_high")}
        xerr = [np.nan_to_num(x - bound["proxy_low"]), np.nan_to_num(bound["proxy_high"] - x)]
        yerr = [np.nan_to_num(y - bound["promoted_low"]), np.nan_to_num(bound["promoted_high"] - y)]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="none", ecolor="grey", capsize=3)
        rank = b["proxy_rank"].to_numpy(np.float64)
        points = ax.scatter(x, y, c=rank, cmap="viridis_r", zorder=3)
        for xi, yi, k, cid in zip(x, y, rank, b["config_id"], strict=True):
            ax.annotate(f"#{k:.0f} {str(cid)[:6]}", (xi, yi), fontsize=7, xytext=(4, 4), textcoords="offset points")
        fig.colorbar(points, ax=ax, label="proxy rank")
        ax.set_xlabel(f"proxy val_bpb ({r.source}), 95% interval")
        ax.set_ylabel(f"promoted val_bpb ({r.promoted}), 95% interval")
        ax.set_title(_label(r), fontsize=9)
    fig.tight_layout()
    return fig


def transfer(df: pd.DataFrame, alpha: float = 0.05, bootstrap: int = 10_000, seed: int = 0) -> Answer:
    """Per promoted configuration its mean at each fidelity; across them, rank agreement, whether the
    proxy's winner still wins, and which pairs flipped."""
    if not 0 < alpha < 1:
        raise LoopgolfError(f"alpha={alpha}: expected a fraction in (0, 1)")
    results = transfer_stats(df, bootstrap, seed)
    method = (
        "Each configuration a promoted sweep re-ran, beside the same configuration in its source (proxy) sweep: "
        "mean val_bpb over seeds with a 95% t interval. Across configurations measured at both: rank correlation "
        "of the means (two-sided, exact over all pairings for n <= 8), whether the proxy's best is still best, "
        f"and how often it is when the promoted seeds are resampled ({bootstrap:,} bootstraps). A routed "
        "configuration's control arms are left out. Flipped pairs: Δ = a − b in val_bpb at each fidelity."
    )
    if not results:
        return Answer(TRANSFER_TITLE, method, pd.DataFrame(), "", NO_PROMOTED)
    answered = [r for r in results if len(r.both)]
    unanswered = [f"{r.promoted} re-runs configurations of {r.source}, whose complete feasible trials of them are "
                  f"not among these: report both (`loopgolf report {r.source} {r.promoted}`)." for r in results
                  if not len(r.both)]  # fmt: skip
    table = pd.concat([_transfer_table(r) for r in results], ignore_index=True)
    verdict = " ".join([_transfer_verdict(r, alpha) for r in answered] + (unanswered if answered else []))
    flips = [r.flipped.assign(**{"proxy → promoted": _label(r)}) for r in answered if len(r.flipped)]
    extra = (("Pairs whose order flipped between fidelities", pd.concat(flips, ignore_index=True)),) if flips else ()
    figure = transfer_figure(answered) if answered else None
    return Answer(TRANSFER_TITLE, method, table, verdict, "" if answered else " ".join(unanswered), figure, extra)
