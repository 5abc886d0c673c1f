"""Statistics of the report: intervals, paired and unpaired tests, bootstrap, corrections.

Pure functions of numbers; nothing here knows the ledger.

The unit of evidence is a matrix over seeds x documents. Every trial of a sweep scores
the same validation tokens, so a trial yields, per document d, its summed cross-entropy
in bits and the document's bytes; bits per byte is a ratio of sums. Two sources of
variation make a difference in bpb uncertain, and both are crossed: the seed (a trained
model is luckier or unluckier on every document) and the document (some text suits one
model more than the other, on every seed). The variance of the estimate is that of a
two-way crossed random-effects design,

    Var(mean) = s_seed^2 / S + s_doc^2 / D + s_resid^2 / (S D),

estimated from the ANOVA mean squares of the linearized ratio, with Satterthwaite's
degrees of freedom for a t reference. The headline tests use this rather than a
bootstrap because with the 2-5 seeds a sweep affords, a bootstrap over seeds cannot see
the t-distribution's tails and its intervals are too short (tests/analysis/test_stats.py measures
both). The pigeonhole bootstrap (seeds and documents resampled independently) is here for
statistics that are not ratios of sums.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

EXACT_RANK_MAX_N = 8  # n! <= 40,320 permutations: enumerate them for exact rank-correlation p-values


# ------------------------------------------------------------------------- one side: mean over seeds


@dataclasses.dataclass(frozen=True)
class Summary:
    """Mean of n values with a t-distribution confidence interval (NaN bounds when n < 2)."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float

    def text(self, digits: int = 4) -> str:
        if self.n == 0:
            return "–"
        if self.n < 2:
            return f"{self.mean:.{digits}f} (n=1)"
        return f"{self.mean:.{digits}f} ± {(self.ci_high - self.ci_low) / 2:.{digits}f} (n={self.n})"


def summarize(values: Iterable[float], confidence: float = 0.95) -> Summary:
    """Mean, sample std and the t-based confidence interval of the finite values."""
    x = np.asarray([v for v in values if v is not None and not pd.isna(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(t, two-sided p) of Welch's unequal-variance t-test; NaN with < 2 values a side or no variance."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(x) < 2 or len(y) < 2:
        return math.nan, math.nan
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se2 = vx + vy
    if se2 == 0:
        return math.nan, math.nan
    t = (x.mean() - y.mean()) / math.sqrt(se2)
    dof = se2**2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))  # Welch–Satterthwaite
    return float(t), float(2 * stats.t.sf(abs(t), dof))


# ------------------------------------------------------------------------- crossed seeds x documents


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A difference (or a level) with its standard error, t interval and two-sided p-value vs `null`."""

    value: float
    se: float
    df: float
    ci_low: float
    ci_high: float
    p_value: float  # NaN when the variance cannot be estimated (e.g. one seed)
    n_seeds: int  # the smaller side's
    n_docs: int  # 1 when only per-trial values were available

    @property
    def testable(self) -> bool:
        return not math.isnan(self.p_value)

    def text(self, digits: int = 4) -> str:
        if math.isnan(self.value):
            return "–"
        if math.isnan(self.ci_low):
            return f"{self.value:+.{digits}f}"
        return f"{self.value:+.{digits}f} [{self.ci_low:+.{digits}f}, {self.ci_high:+.{digits}f}]"


def _mean_squares(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ANOVA mean squares (seed rows, document columns, residual) of z[..., S, D]; NaN where undefined."""
    s, d = z.shape[-2:]
    grand = z.mean(axis=(-2, -1), keepdims=True)
    rows = z.mean(axis=-1, keepdims=True)
    cols = z.mean(axis=-2, keepdims=True)
    nan = np.full(z.shape[:-2], np.nan)
    ms_seed = d * ((rows - grand) ** 2).sum(axis=(-2, -1)) / (s - 1) if s > 1 else nan
    ms_doc = s * ((cols - grand) ** 2).sum(axis=(-2, -1)) / (d - 1) if d > 1 else nan
    resid = ((z - rows - cols + grand) ** 2).sum(axis=(-2, -1))
    ms_err = resid / ((s - 1) * (d - 1)) if s > 1 and d > 1 else nan
    return ms_seed, ms_doc, ms_err


def _satterthwaite(terms: Sequence[tuple[np.ndarray, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Sum of variance terms (value, its df) and Satterthwaite's df for the sum."""
    total = sum(t for t, _ in terms)
    denom = sum(t**2 / df for t, df in terms)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(denom > 0, total**2 / np.where(denom > 0, denom, 1), np.nan)
    return total, df


def _seed_term(z: np.ndarray) -> tuple[np.ndarray, float]:
    """One side's seed term MS_seed / (S D) = s_seed^2 / S + s_resid^2 / (S D), never truncated.

    Truncating it at (MS_seed - MS_resid) would drop the seed variance whenever its 1-4
    degrees of freedom happen to fall low, which is often: the test would then rest on the
    documents alone and reject a true null about twice as often as it should.
    """
    s, d = z.shape[-2:]
    ms_seed, _, _ = _mean_squares(z)
    return ms_seed / (s * d), s - 1


def linearize(num: np.ndarray, den: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ratio of sums T = sum(num) / sum(den) over seeds x documents, and its linearization.

    z[s, d] = (num - T den) * S D / sum(den) has mean 0 and, to first order, the same
    sampling variance as T under resampling of seeds and documents (the delta method for
    a ratio estimator). `num`, `den`: [..., S, D] (`den` broadcasts, e.g. bytes per document).
    """
    den = np.broadcast_to(den, num.shape)
    total = den.sum(axis=(-2, -1), keepdims=True)
    ratio = num.sum(axis=(-2, -1), keepdims=True) / total
    s, d = num.shape[-2:]
    return ratio[..., 0, 0], (num - ratio * den) * (s * d / total)


def crossed_arrays(
    num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray | None = None, den_b: np.ndarray | None = None,
    *, paired: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(value, variance, df) of a ratio of sums over seeds x documents, batched over leading axes.

    One matrix: the ratio itself (for a paired difference pass num_a - num_b). Two matrices
    with `paired=False`: ratio(A) - ratio(B), with independent seeds and shared documents.
    """
    if num_b is None:
        value, z = linearize(num_a, den_a)
        s, d = z.shape[-2:]
        terms = [_seed_term(z)]
        if d > 1:  # + s_doc^2 / D = (MS_doc - MS_resid) / (S D), truncated at 0
            _, ms_doc, ms_err = _mean_squares(z)
            positive = ms_doc > ms_err
            terms += [
                (np.where(positive, ms_doc, 0.0) / (s * d), d - 1),
                (np.where(positive, -ms_err, 0.0) / (s * d), (s - 1) * (d - 1)),
            ]
        var, df = _satterthwaite(terms)
        if d > 1:
            # Satterthwaite's df is liberal here: when the 1-4 df seed term happens to come out
            # small, the estimated df grows with the documents' (a true null was rejected 7-12% of
            # the time at 2-3 seeds in simulation). The seed term's own df, S - 1, is the
            # conservative bound (Banerjee): never below the nominal level.
            df = np.minimum(df, s - 1)
        return value, var, df
    if paired:
        raise ValueError("paired=True takes one matrix: pass the per-seed differences")
    assert den_b is not None
    value_a, z_a = linearize(num_a, den_a)
    value_b, z_b = linearize(num_b, den_b)
    (s_a, d), s_b = z_a.shape[-2:], z_b.shape[-2]
    terms = [_seed_term(z_a), _seed_term(z_b)]
    if d > 1:
        # + Var(doc effect of A - doc effect of B) / D: the variance of the column-mean
        # differences over documents, less the residuals the seed terms already hold
        cols = z_a.mean(axis=-2) - z_b.mean(axis=-2)
        ms_err_a, ms_err_b = _mean_squares(z_a)[2], _mean_squares(z_b)[2]
        var_cols = cols.var(axis=-1, ddof=1)
        positive = var_cols > ms_err_a / s_a + ms_err_b / s_b
        terms += [
            (np.where(positive, var_cols, 0.0) / d, d - 1),
            (-np.where(positive, ms_err_a, 0.0) / (s_a * d), (s_a - 1) * (d - 1)),
            (-np.where(positive, ms_err_b, 0.0) / (s_b * d), (s_b - 1) * (d - 1)),
        ]
    var, df = _satterthwaite(terms)
    return value_a - value_b, var, df


def t_estimate(
    value: float, var: float, df: float, *, n_seeds: int, n_docs: int, confidence: float = 0.95, null: float = 0.0
) -> Estimate:
    """Interval and two-sided p from a t reference; NaN p when the variance is not estimable."""
    if not (np.isfinite(var) and np.isfinite(df)) or var <= 0 or df <= 0:
        return Estimate(value, math.nan, math.nan, math.nan, math.nan, math.nan, n_seeds, n_docs)
    se = math.sqrt(var)
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    p = float(2 * stats.t.sf(abs(value - null) / se, df))
    return Estimate(value, se, float(df), value - half, value + half, p, n_seeds, n_docs)


def crossed_ratio(
    num: np.ndarray, den: np.ndarray, *, confidence: float = 0.95, null: float = 0.0
) -> Estimate:
    """Ratio of sums of one seeds x documents matrix (e.g. a paired bpb difference) with its test.

    Fewer than 2 seeds: the seed variance is not estimable, so no interval and no p-value.
    """
    num = np.asarray(num, dtype=np.float64)
    den = np.broadcast_to(np.asarray(den, dtype=np.float64), num.shape)
    s, d = num.shape
    if s < 2:
        value = float(num.sum() / den.sum())
        return Estimate(value, math.nan, math.nan, math.nan, math.nan, math.nan, s, d)
    value, var, df = crossed_arrays(num, den)
    return t_estimate(float(value), float(var), float(df), n_seeds=s, n_docs=d, confidence=confidence, null=null)


def crossed_difference(
    num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray, den_b: np.ndarray, *, confidence: float = 0.95
) -> Estimate:
    """ratio(A) - ratio(B) for independent seeds on shared documents (different configurations)."""
    arrays = [np.asarray(x, dtype=np.float64) for x in (num_a, den_a, num_b, den_b)]
    num_a, num_b = arrays[0], arrays[2]
    den_a, den_b = np.broadcast_to(arrays[1], num_a.shape), np.broadcast_to(arrays[3], num_b.shape)
    if num_a.shape[-1] != num_b.shape[-1]:
        raise ValueError(f"documents differ: {num_a.shape[-1]} vs {num_b.shape[-1]}")
    s = min(num_a.shape[0], num_b.shape[0])
    if s < 2:
        value = float(num_a.sum() / den_a.sum() - num_b.sum() / den_b.sum())
        return Estimate(value, math.nan, math.nan, math.nan, math.nan, math.nan, s, num_a.shape[1])
    value, var, df = crossed_arrays(num_a, den_a, num_b, den_b, paired=False)
    return t_estimate(float(value), float(var), float(df), n_seeds=s, n_docs=num_a.shape[1], confidence=confidence)


def bootstrap_ratio(
    num: np.ndarray, den: np.ndarray, n_boot: int = 2000, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Pigeonhole bootstrap of a ratio of sums: seeds and documents resampled independently.

    num, den: [S, D]; returns n_boot draws. Multiplicity weights make each draw two small
    matrix products instead of a copy of the data.
    """
    rng = rng or np.random.default_rng(0)
    num = np.asarray(num, dtype=np.float64)
    den = np.broadcast_to(np.asarray(den, dtype=np.float64), num.shape)
    s, d = num.shape
    ws = rng.multinomial(s, np.full(s, 1 / s), size=n_boot).astype(np.float64)
    wd = rng.multinomial(d, np.full(d, 1 / d), size=n_boot).astype(np.float64)
    top = np.einsum("bs,sd,bd->b", ws, num, wd)
    bottom = np.einsum("bs,sd,bd->b", ws, den, wd)
    with np.errstate(divide="ignore", invalid="ignore"):
        return top / bottom


def select_best(
    num: np.ndarray, den: np.ndarray, seeds: np.ndarray | None = None, docs: np.ndarray | None = None
) -> np.ndarray:
    """Index of the configuration with the lowest ratio of sums, on the selected seeds and documents.

    num: [..., C, S, D] per configuration; den broadcasts (bytes [D]); `seeds` [S] and `docs`
    [D] are boolean masks of the data the choice may look at (default: all). Testing the
    winner on the rest keeps the test honest: a configuration picked for lucky seeds or
    documents is not then scored on the same luck.
    """
    den = np.broadcast_to(den, num.shape)
    s, d = num.shape[-2:]
    seeds = np.ones(s, dtype=bool) if seeds is None else np.asarray(seeds, dtype=bool)
    docs = np.ones(d, dtype=bool) if docs is None else np.asarray(docs, dtype=bool)
    mask = seeds[:, None] & docs[None, :]
    ratio = (num * mask).sum(axis=(-2, -1)) / (den * mask).sum(axis=(-2, -1))
    return np.argmin(ratio, axis=-1)


# ------------------------------------------------------------------------- multiplicity


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN entries stay NaN and do not count in m)."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    if m == 0:
        return out
    order = valid[np.argsort(p[valid], kind="stable")]
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out[order] = adjusted
    return out


# ------------------------------------------------------------------------- rank correlation


@dataclasses.dataclass(frozen=True)
class RankCorrelation:
    n: int
    spearman: float
    spearman_p: float
    kendall: float
    kendall_p: float
    exact: bool  # p-values by enumerating all n! pairings (n <= EXACT_RANK_MAX_N)


def _kendall_tau_b(rx: np.ndarray, ry: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of rx[n] against each row of ry[..., n]."""
    sx = np.sign(rx[:, None] - rx[None, :])
    sy = np.sign(ry[..., :, None] - ry[..., None, :])
    concord = (sx * sy).sum(axis=(-2, -1))
    norm = np.sqrt(np.abs(sx).sum() * np.abs(sy).sum(axis=(-2, -1)))
    return concord / norm


def _pearson(rx: np.ndarray, ry: np.ndarray) -> np.ndarray:
    x = rx - rx.mean()
    y = ry - ry.mean(axis=-1, keepdims=True)
    return (y @ x) / np.sqrt((x @ x) * (y * y).sum(axis=-1))


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> RankCorrelation:
    """Spearman's rho and Kendall's tau-b with two-sided p-values; exact for n <= 8.

    Exact: the share of the n! pairings of the two rankings whose |correlation| is at
    least the observed one (ties handled by mid-ranks). Larger n: scipy's asymptotic
    p-values. Fewer than 3 values or a constant side: NaN.
    """
    rx, ry = stats.rankdata(np.asarray(x, dtype=np.float64)), stats.rankdata(np.asarray(y, dtype=np.float64))
    n = len(rx)
    if n < 3 or np.ptp(rx) == 0 or np.ptp(ry) == 0:
        return RankCorrelation(n, math.nan, math.nan, math.nan, math.nan, False)
    rho, tau = float(_pearson(rx, ry)), float(_kendall_tau_b(rx, ry))
    if n <= EXACT_RANK_MAX_N:
        perms = ry[np.array(list(itertools.permutations(range(n))))]
        eps = 1e-12  # the observed pairing must count itself despite rounding
        rho_p = float(np.mean(np.abs(_pearson(rx, perms)) >= abs(rho) - eps))
        tau_p = float(np.mean(np.abs(_kendall_tau_b(rx, perms)) >= abs(tau) - eps))
        return RankCorrelation(n, rho, rho_p, tau, tau_p, True)
    rho_p = float(stats.spearmanr(rx, ry).pvalue)
    tau_p = float(stats.kendalltau(rx, ry).pvalue)
    return RankCorrelation(n, rho, rho_p, tau, tau_p, False)


# ------------------------------------------------------------------------- AUC


def placement_values(score: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Per positive token: the share of negatives it outranks (ties count one half).

    Their mean is the AUC (Mann–Whitney); as per-token values they can be summed per seed
    and document, so the AUC gets the same crossed interval as bpb (DeLong's placements).
    """
    score = np.asarray(score, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    negatives = np.sort(score[~positive])
    if len(negatives) == 0:
        return np.full(int(positive.sum()), np.nan)
    pos = score[positive]
    below = np.searchsorted(negatives, pos, side="left")
    ties = np.searchsorted(negatives, pos, side="right") - below
    return (below + 0.5 * ties) / len(negatives)
