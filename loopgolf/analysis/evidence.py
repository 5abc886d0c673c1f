"""From ledger rows to the matrices the statistics take, and back to report rows.

- `budget_groups`: trials are compared only within one (data, byte cap, train budget,
  hardware); never pooled across different data.
- `matrix`: a set of trials (one configuration's seeds) as seeds x documents of bits and
  bytes from the per-token files, or seeds x 1 of val_bpb when a trial has none.
- `held_out_best`: "best of a side", picked on data it is not then tested on.
- `finish_section`: Holm across a section's comparisons, significance, verdict.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

from loopgolf.analysis.results import feasible_complete
from loopgolf.analysis.stats import Estimate, holm
from loopgolf.analysis.tokens import TokenStore
from loopgolf.errors import LoopgolfError

METRIC = "val_bpb"
# (column the ledger may carry, what stands in when it does not, what the stand-in means)
GROUP_KEYS: tuple[tuple[str, str, str], ...] = (
    ("data_fingerprint", "sweep", "data"),
    ("max_artifact_bytes", "", "byte cap"),
    ("train_budget_seconds", "sweep", "train budget"),
    ("hardware", "sweep", "hardware"),
)


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """The report's knobs; the defaults are what `loopgolf report` uses."""

    alpha: float = 0.05  # family-wise level of each section (Holm)
    confidence: float = 0.95  # of every interval
    min_seeds: int = 2  # per side, below which a comparison is not tested
    max_listed: int = 20  # rows of long tables

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1 or not 0 < self.confidence < 1:
            raise LoopgolfError(f"alpha={self.alpha}, confidence={self.confidence}: expected fractions in (0, 1)")
        if self.min_seeds < 2:
            raise LoopgolfError(f"min_seeds={self.min_seeds}: a test needs at least 2 seeds per side")


def seed_rows(rows: pd.DataFrame, columns: tuple[str, ...] = (METRIC,)) -> pd.DataFrame:
    """One row per seed (ascending; the first trial of a repeated seed), with every column present."""
    present = rows[rows[list(columns)].notna().all(axis=1)] if all(c in rows for c in columns) else rows.iloc[:0]
    return present.sort_values("seed", kind="stable").drop_duplicates("seed")


def competing(df: pd.DataFrame) -> pd.DataFrame:
    """Feasible, complete rows with a score."""
    return df[feasible_complete(df) & df[METRIC].notna()]


def int_column(rows: pd.DataFrame, name: str, default: int) -> pd.Series:
    if name not in rows:
        return pd.Series(default, index=rows.index, dtype="Int64")
    return rows[name].astype("Int64").fillna(default)


def group_columns(df: pd.DataFrame) -> tuple[list[str], list[str]]:
    """The columns that define a comparable group, and plain notes on stand-ins used."""
    columns, notes = [], []
    for column, stand_in, meaning in GROUP_KEYS:
        if column in df and df[column].notna().all():
            columns.append(column)
        elif stand_in:
            if stand_in not in columns:
                columns.append(stand_in)
            notes.append(f"the ledger has no `{column}`: {meaning} is assumed constant within a sweep only")
    return columns, notes


def budget_groups(rows: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(label, rows) per comparable group, in a stable order."""
    if rows.empty:
        return []
    columns, _ = group_columns(rows)
    out = []
    for key, group in rows.groupby(columns, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        out.append((", ".join(f"{c}={v}" for c, v in zip(columns, key, strict=True)), group))
    return out


def describe_config(row: pd.Series | dict) -> str:
    """A short human name: width, prelude + blocks x passes + coda, phase, refinement, quantization."""

    def get(name: str, default: object = "?") -> object:
        value = row.get(name, default)
        return default if value is None or (not isinstance(value, (list, np.ndarray)) and pd.isna(value)) else value

    if get("kind", "builtin") == "script":  # a script trial is its environment: the upper-case columns
        names = row.index if isinstance(row, pd.Series) else list(row)
        settings = {k: get(k) for k in names if isinstance(k, str) and k.isupper() and get(k) != "?"}
        return " ".join(f"{k}={v}" for k, v in sorted(settings.items())) or "script"
    text = f"d{get('d_model')} {get('n_prelude', 0)}+{get('n_blocks')}x{get('n_passes')}+{get('n_coda', 0)}"
    if get("share", "all") != "all" and int(get("n_passes", 1)) > 1:  # type: ignore[call-overload]
        text += f" share:{get('share')}"  # what the passes share, when not whole blocks
    if get("phase", "none") != "none":
        text += f" {get('phase')}"
    if int(get("refine_passes", 0)) > 0:  # type: ignore[call-overload]
        text += f" +{get('refine_passes')}r:{get('signal')}"
    return text + f" int{get('bits')}/{get('codec')}"


@dataclasses.dataclass(frozen=True)
class Matrix:
    """One configuration's evidence: bits and bytes over seeds x documents (D = 1: per-trial bpb)."""

    seeds: tuple[int, ...]
    num: np.ndarray  # [S, D]
    den: np.ndarray  # [S, D]

    @property
    def per_token(self) -> bool:
        return self.num.shape[1] > 1

    def take(self, seeds: np.ndarray | None = None, docs: np.ndarray | None = None) -> Matrix:
        s = np.ones(len(self.seeds), bool) if seeds is None else seeds
        d = np.ones(self.num.shape[1], bool) if docs is None else docs
        kept = tuple(v for v, k in zip(self.seeds, s, strict=True) if k)
        return Matrix(kept, self.num[s][:, d], self.den[s][:, d])


def matrix(rows: pd.DataFrame, store: TokenStore | None, per_token: bool) -> Matrix:
    """Seeds (ascending) x documents of one configuration's trials; one row per seed."""
    rows = rows.sort_values("seed", kind="stable").drop_duplicates("seed")
    seeds = tuple(int(s) for s in rows["seed"])
    if per_token and store is not None:
        sums = [store.doc_sums(t) for t in rows["trial_id"]]
        return Matrix(seeds, np.stack([b for b, _ in sums]), np.stack([n for _, n in sums]))
    values = rows[METRIC].to_numpy(np.float64)[:, None]
    return Matrix(seeds, values, np.ones_like(values))


def all_per_token(rows: pd.DataFrame, store: TokenStore | None) -> bool:
    return store is not None and len(rows) > 0 and all(store.has(t) for t in rows["trial_id"])


@dataclasses.dataclass(frozen=True)
class Pick:
    config_id: str
    test: Matrix  # the winner's data it was not picked on
    note: str  # how it was picked


def held_out_best(configs: dict[str, Matrix], min_seeds: int) -> Pick:
    """The best configuration of a side (lowest bpb), picked on half the documents and, when
    every configuration has >= min_seeds + 1 seeds, on its first seeds; tested on the rest.

    A lone configuration needs no picking and keeps all its data.
    """
    ids = sorted(configs)
    if len(ids) == 1:
        return Pick(ids[0], configs[ids[0]], "the only configuration")
    d = next(iter(configs.values())).num.shape[1]
    pick_docs = np.arange(d) % 2 == 0 if d > 1 else np.ones(1, bool)
    fewest = min(len(m.seeds) for m in configs.values())
    split_seeds = fewest >= min_seeds + 1
    n_pick = max(1, fewest // 3) if split_seeds else fewest
    scores = []
    for c in ids:
        m = configs[c]
        seeds = np.arange(len(m.seeds)) < n_pick if split_seeds else np.ones(len(m.seeds), bool)
        docs = pick_docs if d > 1 else None
        scores.append(m.take(seeds, docs))
    # per-configuration ratio on its picking data (seeds may differ in number, so one at a time)
    best = ids[int(np.argmin([m.num.sum() / m.den.sum() for m in scores]))]
    m = configs[best]
    seeds = np.arange(len(m.seeds)) >= n_pick if split_seeds else np.ones(len(m.seeds), bool)
    docs = ~pick_docs if d > 1 else None
    parts = []
    if d > 1:
        parts.append("picked on the even documents")
    if split_seeds:
        parts.append(f"its first {n_pick} seed(s)")
    if not parts:
        note = f"best of {len(ids)} picked on the data it is tested on (optimistic: no per-token files, < 3 seeds)"
    else:
        note = f"best of {len(ids)}, " + " and ".join(parts) + "; tested on the rest"
    return Pick(best, m.take(seeds, docs), note)


def estimate_cells(e: Estimate | None) -> dict[str, object]:
    """Table cells of an estimate; `_`-prefixed ones are for plots, not shown."""
    if e is None:
        return {"Δ bpb [95% CI]": "–", "p": math.nan, "seeds": 0, "docs": 0,
                "_value": math.nan, "_low": math.nan, "_high": math.nan}  # fmt: skip
    return {"Δ bpb [95% CI]": e.text(), "p": e.p_value, "seeds": e.n_seeds, "docs": e.n_docs,
            "_value": e.value, "_low": e.ci_low, "_high": e.ci_high}  # fmt: skip


def finish_section(
    rows: list[dict[str, object]], alpha: float, untested: str = "Too few seeds to test anything here: rerun with "
    "more seeds per configuration."
) -> tuple[pd.DataFrame, str]:
    """Holm-adjust the section's p-values; mark significance; a one-paragraph verdict
    (`untested`: what it says when no comparison could be tested)."""
    table = pd.DataFrame(rows)
    if table.empty:
        return table, ""
    table["p (Holm)"] = holm(table["p"].astype(float).to_numpy())
    table["significant"] = table["p (Holm)"] < alpha
    tested = int(table["p"].notna().sum())
    found = table[table["significant"]]
    verdict = (
        f"{len(table)} comparison(s), {tested} testable; {len(found)} significant at family-wise "
        f"α = {alpha} (Holm)."
    )
    if tested == 0:
        verdict += " " + untested
    return table, verdict
