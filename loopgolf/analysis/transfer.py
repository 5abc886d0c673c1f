"""Two questions one sweep cannot answer alone.

- Transfer: a proxy sweep ranks configurations at a low fidelity (short runs, one GPU);
  `loopgolf promote` re-runs some of them at a higher fidelity with fresh seeds. Does the
  proxy's ranking, and above all its winner, hold there? If not, the proxy is choosing on
  noise or on an effect that does not scale, and a longer search at that fidelity is wasted.
- Record-grade: the challenge accepts a record only for an improvement of at least 0.005
  nats of val_loss over the reference at one-sided p < 0.01. A configuration that wins the
  report's comparisons may still not clear that bar.

Pure functions of ledger rows (one row per trial); nothing here reads files.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re

import numpy as np
import pandas as pd
from scipy import stats as sp

from loopgolf.analysis.evidence import METRIC, competing, describe_config
from loopgolf.analysis.plots import pyplot as _pyplot
from loopgolf.analysis.questions import Answer
from loopgolf.analysis.results import ROUTED_ARM
from loopgolf.analysis.stats import (
    RankCorrelation,
    Summary,
    crossed_difference,
    holm,
    rank_correlation,
    summarize,
    welch_t_test,
)
from loopgolf.errors import LoopgolfError

LOSS = "val_loss"  # nats per token
PROMOTED = "promoted_from"  # "<source sweep>:<source config_id>" on a promoted sweep's trials
FIDELITY = "fidelity"  # the fields the promoted sweep changed (JSON)
NO_PROMOTED = "No promoted sweep among these: run `loopgolf promote SWEEP --top K --name NEW` and report both."
TRANSFER_TITLE = "Transfer: does the proxy ranking hold?"
RECORD_TITLE = "Record-grade: the challenge's acceptance rule"
MIN_RANKED = 3  # configurations with both fidelities below which a rank correlation says nothing


def _seed_rows(rows: pd.DataFrame, columns: tuple[str, ...] = (METRIC,)) -> pd.DataFrame:
    """One row per seed (ascending; the first trial of a repeated seed), with every column present."""
    present = rows[rows[list(columns)].notna().all(axis=1)] if all(c in rows for c in columns) else rows.iloc[:0]
    return present.sort_values("seed", kind="stable").drop_duplicates("seed")


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
    proxy = _seed_rows(src_all[ok.loc[src_all.index]])
    high = _seed_rows(promoted[ok.loc[promoted.index]])
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


# ------------------------------------------------------------------------- record-grade


@dataclasses.dataclass(frozen=True)
class Reference:
    """What a record must beat: a published number, or a configuration's per-seed trials."""

    text: str  # as given
    label: str  # in plain words, for the report
    metric: str = LOSS  # of `value`, for a published number
    value: float = math.nan  # the published number (NaN when the reference has trials)
    config_id: str = ""  # the reference configuration ("" for a number)
    loss: tuple[float, ...] = ()  # its val_loss per seed
    bpb: tuple[float, ...] = ()  # its val_bpb per seed

    @property
    def per_seed(self) -> bool:
        return bool(self.config_id)


def _bad_reference(text: str) -> LoopgolfError:
    return LoopgolfError(f"--reference {text!r}: expected val_bpb=NUMBER, val_loss=NUMBER, a config_id or a sweep "
                         "name in the report")  # fmt: skip


def _number_reference(text: str, metric: str, number: str) -> Reference:
    try:
        value = float(number)
    except ValueError:
        raise LoopgolfError(f"--reference {text!r}: {number!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise LoopgolfError(f"--reference {text!r}: expected a positive finite {metric}")
    return Reference(text, f"{metric} = {value:g} (a published score)", metric, value)


def _trials_reference(text: str, rows: pd.DataFrame, config_id: str, label: str) -> Reference:
    kept = _seed_rows(rows[rows["config_id"] == config_id], (LOSS, METRIC))
    if kept.empty:
        raise LoopgolfError(f"--reference {text!r}: configuration {config_id} has no complete feasible trial with "
                            "a val_loss")  # fmt: skip
    n = len(kept)
    return Reference(text, f"{label} ({n} seed{'s' if n != 1 else ''})", LOSS, math.nan, config_id,
                     tuple(kept[LOSS].astype(float)), tuple(kept[METRIC].astype(float)))  # fmt: skip


def _sweep_reference(text: str, rows: pd.DataFrame, sweep: str) -> Reference:
    own = rows[rows["sweep"] == sweep]
    if own.empty:
        raise LoopgolfError(f"--reference {text!r}: sweep {sweep} has no complete feasible trial")
    means = own.groupby("config_id", sort=True)[METRIC].mean()
    best = str(means.idxmin())
    row = own[own["config_id"] == best].iloc[0]
    return _trials_reference(text, own, best, f"the best of sweep {sweep}: {describe_config(row)}, {best[:10]}")


def parse_reference(text: str, df: pd.DataFrame) -> Reference:
    """`val_bpb=X` / `val_loss=X`, a config_id (or a unique prefix of one), or a sweep name in df."""
    given = str(text).strip()
    number = re.fullmatch(r"(val_bpb|val_loss)\s*=\s*(\S+)", given)
    if number:
        return _number_reference(text, number.group(1), number.group(2))
    rows = competing(df)
    ids = sorted(set(df["config_id"].dropna().astype(str))) if "config_id" in df else []
    if given in ids:
        return _trials_reference(text, rows, given, f"configuration {describe_config(_first(df, given))}, {given[:10]}")
    if "sweep" in df and given in set(df["sweep"].dropna().astype(str)):
        return _sweep_reference(text, rows, given)
    matches = [i for i in ids if given and i.startswith(given)]
    if len(matches) > 1:
        shown = ", ".join(matches[:3]) + (", ..." if len(matches) > 3 else "")
        raise LoopgolfError(f"--reference {text!r}: ambiguous, begins {len(matches)} config_ids ({shown})")
    if len(matches) == 1:
        cid = matches[0]
        return _trials_reference(text, rows, cid, f"configuration {describe_config(_first(df, cid))}, {cid[:10]}")
    raise _bad_reference(text)


def _first(df: pd.DataFrame, config_id: str) -> pd.Series:
    return df[df["config_id"].astype(str) == config_id].iloc[0]


def one_sample_t_less(x: np.ndarray, null: float) -> tuple[float, float]:
    """(t, one-sided p) of H1: mean(x) < null; NaN with fewer than 2 values or no variance."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    sd = float(x.std(ddof=1)) if n > 1 else math.nan
    if not sd > 0:
        return math.nan, math.nan
    t = (float(x.mean()) - null) / (sd / math.sqrt(n))
    return t, float(sp.t.cdf(t, n - 1))


def _welch_less(x: np.ndarray, y: np.ndarray, margin: float) -> tuple[float, float]:
    """(t, one-sided p) of Welch's test of H1: mean(x) < mean(y) − margin."""
    t, p_two = welch_t_test(np.asarray(x) + margin, y)
    if math.isnan(t):
        return t, p_two
    return t, (p_two / 2 if t < 0 else 1 - p_two / 2)


@dataclasses.dataclass(frozen=True)
class _Test:
    delta_nats: float
    t: float
    p: float
    bpb: tuple[float, float, float]  # Δ val_bpb, 95% interval


def _against_number(loss: np.ndarray, bpb: np.ndarray, ref: Reference, margin: float) -> _Test:
    """One-sample test against a published score; a val_bpb score is put in nats with the
    candidate's own nats-per-bit-per-byte ratio (ln 2 × bytes per token)."""
    ratio = float(np.mean(loss / bpb))
    ref_loss, ref_bpb = (ref.value * ratio, ref.value) if ref.metric == METRIC else (ref.value, ref.value / ratio)
    t, p = one_sample_t_less(loss, ref_loss - margin)
    s = summarize(bpb)
    return _Test(float(loss.mean()) - ref_loss, t, p, (s.mean - ref_bpb, s.ci_low - ref_bpb, s.ci_high - ref_bpb))


def _against_trials(loss: np.ndarray, bpb: np.ndarray, ref: Reference, margin: float) -> _Test:
    """Welch's test against the reference's seeds; the bpb interval is Welch–Satterthwaite's."""
    t, p = _welch_less(loss, np.asarray(ref.loss), margin)
    ones = np.ones((1, 1))
    e = crossed_difference(bpb[:, None], ones, np.asarray(ref.bpb)[:, None], ones)  # one "document": Welch
    return _Test(float(loss.mean() - np.mean(ref.loss)), t, p, (e.value, e.ci_low, e.ci_high))


def _decision(n: int, test: _Test | None, ref: Reference, min_seeds: int, margin: float, alpha: float) -> str:
    if n < min_seeds:
        return f"no: {n} seed{'s' if n != 1 else ''}, needs {min_seeds}"
    if ref.per_seed and len(ref.loss) < 2:
        return "no: the reference has 1 seed and Welch's test needs 2 (give it as val_loss=NUMBER)"
    assert test is not None
    if test.delta_nats > -margin:
        return f"no: Δ = {test.delta_nats:+.4f} nats, needs ≤ {-margin:+.4g}"
    if math.isnan(test.p):
        return "no: the seeds do not vary, so there is no test"
    if test.p >= alpha:
        return f"no: p = {test.p:.3g} ≥ {alpha:g}"
    return f"yes: Δ = {test.delta_nats:+.4f} nats, p = {test.p:.2g} < {alpha:g}"


def _record_row(config_id: str, part: pd.DataFrame, ref: Reference, min_seeds: int, margin: float,
                alpha: float) -> dict[str, object]:  # fmt: skip
    kept = _seed_rows(part, (LOSS, METRIC))
    loss, bpb = kept[LOSS].to_numpy(np.float64), kept[METRIC].to_numpy(np.float64)
    n = len(loss)
    testable = n >= min_seeds and (not ref.per_seed or len(ref.loss) >= 2)
    test = (_against_trials if ref.per_seed else _against_number)(loss, bpb, ref, margin) if testable else None
    decision = _decision(n, test, ref, min_seeds, margin, alpha)
    nan = math.nan
    delta, low, high = test.bpb if test else (nan, nan, nan)
    return {
        "configuration": describe_config(part.iloc[0]), "config_id": config_id[:10], "seeds": n,
        "mean val_loss": float(loss.mean()) if n else nan, "Δ nats": test.delta_nats if test else nan,
        "p (one-sided)": test.p if test else nan,
        "bpb Δ [95% CI]": "–" if test is None else f"{delta:+.4f} [{low:+.4f}, {high:+.4f}]",
        "record-grade": decision, "_record": decision.startswith("yes"), "_t": test.t if test else nan,
        "_value": delta, "_low": low, "_high": high, "_config_id": config_id,
    }  # fmt: skip


def record_test(
    df: pd.DataFrame, reference: Reference, min_seeds: int = 3, margin_nats: float = 0.005, alpha: float = 0.01
) -> Answer:
    """Every configuration with enough seeds against the reference, by the challenge's rule."""
    if min_seeds < 2 or margin_nats < 0 or not 0 < alpha < 1:
        raise LoopgolfError(f"min_seeds={min_seeds}, margin_nats={margin_nats}, alpha={alpha}: expected min_seeds "
                            ">= 2, margin_nats >= 0 and alpha in (0, 1)")  # fmt: skip
    rows = competing(df)
    method = _record_method(reference, min_seeds, margin_nats, alpha)
    if LOSS not in rows or rows[LOSS].isna().all():
        return Answer(RECORD_TITLE, method, pd.DataFrame(), "", "No complete feasible trial has a val_loss.")
    out = [_record_row(str(c), part, reference, min_seeds, margin_nats, alpha)
           for c, part in rows.groupby("config_id", sort=True) if str(c) != reference.config_id]  # fmt: skip
    if not out:
        return Answer(RECORD_TITLE, method, pd.DataFrame(), "", "No configuration besides the reference.")
    table = pd.DataFrame(out)
    table["_tested"] = table["p (one-sided)"].notna()
    table["p (Holm)"] = holm(table["p (one-sided)"].astype(float).to_numpy())
    table = table.sort_values(["_record", "_tested", "mean val_loss"], ascending=[False, False, True], kind="stable")
    return Answer(RECORD_TITLE, method, table.reset_index(drop=True), _record_verdict(table, reference, min_seeds,
                                                                                       alpha))  # fmt: skip


def _record_method(ref: Reference, min_seeds: int, margin: float, alpha: float) -> str:
    text = (f"Reference: {ref.label}. A record must improve val_loss by at least {margin:g} nats per token at "
            f"one-sided p < {alpha:g}, on at least {min_seeds} seeds. ")  # fmt: skip
    if ref.per_seed:
        text += (f"Welch's t-test of H1: mean(configuration) < mean(reference) − {margin:g}; the bpb Δ "
                 "interval is Welch–Satterthwaite's.")  # fmt: skip
    else:
        text += (f"One-sample t-test of the configuration's seeds, H1: mean < reference − {margin:g}; the bpb Δ "
                 "interval is a one-sample t interval.")  # fmt: skip
    if not ref.per_seed and ref.metric == METRIC:
        text += (" The reference is a val_bpb: it is put in nats with each configuration's own val_loss / val_bpb "
                 "(constant for one dataset and tokenizer: nats per token = bpb × ln 2 × bytes per token).")
    return text + " Δ = configuration − reference (negative: better)."


def _record_verdict(table: pd.DataFrame, ref: Reference, min_seeds: int, alpha: float) -> str:
    tested = int(table["p (one-sided)"].notna().sum())
    passed = int(table["_record"].sum())
    short = int((table["seeds"] < min_seeds).sum())
    text = f"Against {ref.label}: {passed} of {tested} tested configuration(s) are record-grade"
    text += f"; {short} had fewer than {min_seeds} seeds." if short else "."
    if passed and tested > 1:
        holm_passed = int((table["_record"] & (table["p (Holm)"] < alpha)).sum())
        text += (f" The rule is applied to each configuration as to one submission; picking the best of {tested} "
                 f"inflates the chance of a false record: after Holm over the {tested}, {holm_passed} still pass. "
                 "Confirm a claim on fresh seeds.")  # fmt: skip
    return text
