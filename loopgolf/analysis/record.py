"""Record-grade: does a configuration clear the challenge's acceptance rule?

The challenge accepts a record only for an improvement of at least 0.005 nats of val_loss
over the reference at one-sided p < 0.01. A configuration that wins the report's
comparisons may still not clear that bar. The reference is a published number or a
configuration's per-seed trials (`loopgolf report --reference`).

Pure functions of ledger rows (one row per trial); nothing here reads files.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pandas as pd
from scipy import stats as sp

from loopgolf.analysis.evidence import METRIC, competing, describe_config, seed_rows
from loopgolf.analysis.questions import Answer
from loopgolf.analysis.stats import crossed_difference, holm, summarize, welch_t_test
from loopgolf.errors import LoopgolfError

LOSS = "val_loss"  # nats per token
RECORD_TITLE = "Record-grade: the challenge's acceptance rule"


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
    kept = seed_rows(rows[rows["config_id"] == config_id], (LOSS, METRIC))
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
    kept = seed_rows(part, (LOSS, METRIC))
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
