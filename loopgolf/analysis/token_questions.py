"""Sections 3 and 6: the questions answered token by token and document by document.

3. Where refinement helps: CE change on the refined tokens against the `no_refine` arm of
   the same pair and seed (paired by token), by router-score decile, by position in the
   document and by token-frequency bucket; and the AUC of the router score for "refinement
   lowered the CE". Units of the interval: (pair, seed) as seeds, documents as documents.
6. Robustness: per pair, how the gain spreads over documents (is it carried by a few?)
   and over seeds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from loopgolf.analysis import plots
from loopgolf.analysis.evidence import ReportConfig, all_per_token, describe_config, estimate_cells, finish_section
from loopgolf.analysis.questions import NO_PAIRS, Answer, _paired, pairs
from loopgolf.analysis.results import NO_REFINE
from loopgolf.analysis.stats import Estimate, crossed_ratio, placement_values, t_estimate
from loopgolf.analysis.tokens import TokenStore, document_index

DECILES = 10
POSITION_EDGES = (0, 16, 64, 256, 1024)  # position-in-document buckets: [0, 16), [16, 64), ...


def _position_bucket(position: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.asarray(POSITION_EDGES[1:]), position, side="right")


def _bucket_labels(kind: str, n: int) -> list[str]:
    if kind == "position":
        edges = [*POSITION_EDGES, None]
        return [f"[{edges[i]}, {edges[i + 1] or '∞'})" for i in range(len(POSITION_EDGES))]
    return [str(i) for i in range(n)]


def _by_bucket(delta: np.ndarray, keep: np.ndarray, bucket: np.ndarray, doc: np.ndarray, n_buckets: int,
               n_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """(sum of delta, count) per [bucket, document] over the kept tokens."""
    index = bucket[keep] * n_docs + doc[keep]
    size = n_buckets * n_docs
    sums = np.bincount(index, weights=delta[keep], minlength=size).reshape(n_buckets, n_docs)
    counts = np.bincount(index, minlength=size).reshape(n_buckets, n_docs).astype(np.float64)
    return sums, counts


def _token_units(rows: pd.DataFrame, store: TokenStore) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per routing signal, one dict of per-token arrays per (pair, seed) with a no_refine arm."""
    units: dict[str, list[dict[str, np.ndarray]]] = {}
    for _, routed, arms in pairs(rows):
        control = arms.get(NO_REFINE)
        if control is None or not all_per_token(pd.concat([routed, control]), store):
            continue
        for seed in sorted(set(routed["seed"].astype(int)) & set(control["seed"].astype(int))):
            r_id = routed.loc[routed["seed"] == seed, "trial_id"].iloc[0]
            c_id = control.loc[control["seed"] == seed, "trial_id"].iloc[0]
            r, c, stream = store.tokens(r_id), store.tokens(c_id), store.stream(r_id)
            assert stream is not None
            score = r["router_score"].to_numpy(np.float64)
            ranks = pd.Series(score).rank(method="first").to_numpy() - 1
            units.setdefault(str(routed["signal"].iloc[0]), []).append({
                "delta": r["ce"].to_numpy(np.float64) - c["ce"].to_numpy(np.float64),
                "refined": r["refined"].to_numpy(bool), "score": score,
                "decile": np.minimum((ranks * DECILES // len(score)).astype(np.int64), DECILES - 1),
                "position": _position_bucket(stream["position"].to_numpy()),
                "frequency": stream["freq_bucket"].to_numpy(np.int64), "doc": document_index(stream),
            })  # fmt: skip
    return units


def _profile_rows(signal: str, units: list[dict[str, np.ndarray]], cfg: ReportConfig) -> list[dict[str, object]]:
    n_docs = int(units[0]["doc"].max()) + 1
    out: list[dict[str, object]] = []
    for kind, n in (("decile", DECILES), ("position", len(POSITION_EDGES)),
                    ("frequency", int(max(u["frequency"].max() for u in units)) + 1)):  # fmt: skip
        sums, counts = zip(*(_by_bucket(u["delta"], u["refined"], u[kind], u["doc"], n, n_docs) for u in units),
                           strict=True)
        sums, counts = np.stack(sums, axis=1), np.stack(counts, axis=1)  # [bucket, unit, doc]
        for b, label in enumerate(_bucket_labels(kind, n)):
            if counts[b].sum() == 0:
                continue
            e = crossed_ratio(sums[b], counts[b], confidence=cfg.confidence)
            out.append({"signal": signal, "by": kind, "bucket": label, "refined tokens": int(counts[b].sum()),
                        **estimate_cells(e)})  # fmt: skip
    # AUC of the score for "refinement lowered the CE", over all scored tokens of each unit
    num, den = [], []
    for u in units:
        gain = u["delta"] < 0
        v = np.zeros(len(gain))
        v[gain] = placement_values(u["score"], gain)
        num.append(np.bincount(u["doc"], weights=v, minlength=n_docs))
        den.append(np.bincount(u["doc"], weights=gain.astype(np.float64), minlength=n_docs))
    e = crossed_ratio(np.stack(num), np.stack(den), confidence=cfg.confidence, null=0.5)
    out.append({"signal": signal, "by": "AUC (score vs gain)", "bucket": "all tokens", "refined tokens": "",
                **estimate_cells(e), "Δ bpb [95% CI]": e.text(3)})  # fmt: skip
    return out


def where_refinement_helps(rows: pd.DataFrame, store: TokenStore | None, cfg: ReportConfig) -> Answer:
    units = _token_units(rows, store) if store is not None else {}
    out = [row for signal, u in sorted(units.items()) for row in _profile_rows(signal, u, cfg)]
    table, verdict = finish_section(out, cfg.alpha)
    if not table.empty:
        table = table.rename(columns={"Δ bpb [95% CI]": "mean ΔCE nats [95% CI] (AUC row: AUC)"})
    missing = ""
    if not out:
        missing = NO_PAIRS if not pairs(rows) else (
            "No pair has per-token files for both its routed and its `no_refine` arm (ledger column "
            "`eval_tokens_path` and results/eval_stream.parquet)."
        )
    return Answer(
        "3. Where refinement helps",
        "Mean CE change per refined token, routed − no_refine of the same pair and seed, paired by token "
        "(negative: refinement helped), by router-score decile (0 = lowest score), position in the document "
        "and token-frequency bucket. The AUC row: how well the router score ranks the tokens whose CE fell "
        "(0.5 = no better than chance; p tests AUC = 0.5).",
        table, verdict, missing, plots.profile(table) if out else None,
    )


# ------------------------------------------------------------------------- 6. robustness


def _doc_estimate(num: np.ndarray, den: np.ndarray, confidence: float) -> Estimate:
    """A single seed's delta with a documents-only t interval."""
    total = den.sum()
    value = num.sum() / total
    z = (num - value * den) * len(num) / total
    return t_estimate(value, float(z.var(ddof=1) / len(z)), len(z) - 1, n_seeds=1, n_docs=len(z),
                      confidence=confidence)


def robustness(rows: pd.DataFrame, store: TokenStore | None, cfg: ReportConfig) -> Answer:
    """Per pair (routed vs no_refine): per-seed gains, and how concentrated the gain is in documents."""
    out: list[dict[str, object]] = []
    curves: dict[str, np.ndarray] = {}
    for pair_id, routed, arms in pairs(rows):
        if NO_REFINE not in arms:
            continue
        num, den, per_token = _paired(routed, arms[NO_REFINE], store)
        seeds = sorted(set(routed["seed"].astype(int)) & set(arms[NO_REFINE]["seed"].astype(int)))
        concentration = {}
        if per_token:
            gain = -num.sum(axis=0)  # bits saved per document, all seeds
            order = np.sort(gain)[::-1]
            total = gain.sum()
            top = max(1, len(gain) // 10)
            curves[pair_id[:10]] = np.cumsum(order) / total if total else np.zeros_like(order)
            concentration = {"top 10% docs' share of gain": order[:top].sum() / total if total else np.nan,
                             "docs where routing hurt": float((gain < 0).mean())}  # fmt: skip
        for k, seed in enumerate(seeds):
            e = _doc_estimate(num[k], den[k], cfg.confidence) if per_token else None
            value = float(num[k].sum() / den[k].sum())
            out.append({"pair": pair_id[:10], "routed": describe_config(routed.iloc[0]), "seed": seed,
                        **estimate_cells(e), "Δ bpb": value, **concentration})  # fmt: skip
    table, verdict = finish_section(
        out, cfg.alpha, "No per-token files: a seed's gain has no interval over documents, and how the gain "
        "spreads over documents is not known; only the per-seed values are shown.",
    )
    return Answer(
        "6. Robustness: across documents and seeds",
        "Per pair and seed, routed − no_refine val bpb with an interval over documents; the share of the total "
        "gain carried by the best 10% of documents and the fraction of documents where routing hurt. A gain "
        "carried by a few documents or by one seed is fragile.",
        table, verdict, "" if out else NO_PAIRS.replace("has arms", "has a `no_refine` arm"),
        plots.concentration(curves) if curves else (plots.forest(table, "routed − no_refine by seed (bpb)",
                                                                  label_columns=("pair", "seed")) if out else None),
    )
