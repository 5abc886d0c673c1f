"""Benchmark: the report's tests measured by simulation — false-positive rate and power.

    python bench/bench_report_stats.py [--sweeps 4000] [--docs 100]

Each simulated sweep is a seeds x documents matrix of per-byte differences (bits per
byte) with a seed effect, a document effect and per-document noise (noise shrinks with
the document's length). Prints, per scenario, the share of sweeps the crossed
seeds x documents t-test rejects at alpha 0.05: under a planted null (FPR) and under a
planted gain (power); the held-out "best of a side" selection against picking and
testing on the same data; and how often a percentile bootstrap's 95% interval misses 0.
tests/analysis/test_stats.py asserts the bounds; this prints the figures.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from scipy import stats

from loopgolf.analysis.stats import bootstrap_ratio, crossed_arrays, select_best

ALPHA = 0.05
MIXES = [(0.003, 0.0, 0.01), (0.003, 0.01, 0.02), (0.0, 0.01, 0.02), (0.01, 0.0, 1e-4), (0.001, 0.003, 0.05)]


def reject(value: np.ndarray, var: np.ndarray, df: np.ndarray) -> np.ndarray:
    return 2 * stats.t.sf(np.abs(value) / np.sqrt(var), df) < ALPHA


def per_byte(rng: np.random.Generator, shape: tuple[int, ...], d: int, sd: tuple[float, float, float],
             scale: np.ndarray) -> np.ndarray:  # fmt: skip
    seed_sd, doc_sd, noise_sd = sd
    *lead, s = shape
    return (rng.normal(0, seed_sd, (*lead, s, 1)) + rng.normal(0, doc_sd, (*lead, 1, d)) * scale
            + rng.normal(0, noise_sd, (*lead, s, d)) * scale)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", type=int, default=4000)
    parser.add_argument("--docs", type=int, default=100)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    r, d = args.sweeps, args.docs
    nbytes = rng.integers(200, 4000, d).astype(np.float64)
    scale = np.sqrt(1000 / nbytes)
    start = time.perf_counter()
    print(f"load average {os.getloadavg()[0]:.2f}; {r} simulated sweeps per figure, {d} documents")
    for s in (2, 3, 5):
        for mix in MIXES:
            paired = reject(*crossed_arrays(per_byte(rng, (r, s), d, mix, scale) * nbytes, nbytes)).mean()
            hard = rng.normal(1.2, 0.3, (r, 1, d))
            a = (hard + per_byte(rng, (r, s), d, mix, scale)) * nbytes
            b = (hard + per_byte(rng, (r, s), d, (mix[0], 0.0, mix[2]), scale)) * nbytes
            unpaired = reject(*crossed_arrays(a, nbytes, b, nbytes, paired=False)).mean()
            print(f"null  seeds={s} sd(seed, doc, noise)={mix}: FPR paired {paired:.3f}, unpaired {unpaired:.3f}")
    bytes200 = rng.integers(200, 4000, 200).astype(np.float64)
    for s in (3, 5):
        x = (-0.005 + per_byte(rng, (r, s), 200, (0.002, 0.005, 0.03), np.sqrt(1000 / bytes200))) * bytes200
        value, var, df = crossed_arrays(x, bytes200)
        print(f"power seeds={s}, gain 0.005 bpb, sd(seed, doc, noise)=(0.002, 0.005, 0.03), 200 documents: "
              f"{(reject(value, var, df) & (value < 0)).mean():.3f}")  # fmt: skip
    configs = lambda c: (1.2 + rng.normal(0, 0.004, (r, c, 4, 1)) + rng.normal(0, 0.02, (r, c, 4, 60))) * 1000  # noqa: E731
    a, b = configs(20), configs(1)
    take = lambda x, i: np.take_along_axis(x, i[:, None, None, None], axis=1)[:, 0]  # noqa: E731
    seeds, docs = np.arange(4) < 1, np.arange(60) % 2 == 0
    ha = take(a, select_best(a, 1000.0, seeds, docs))[:, ~seeds][:, :, ~docs]
    hb = take(b, select_best(b, 1000.0, seeds, docs))[:, ~seeds][:, :, ~docs]
    held = reject(*crossed_arrays(ha, np.full(30, 1000.0), hb, np.full(30, 1000.0), paired=False)).mean()
    sa, sb = take(a, select_best(a, 1000.0)), take(b, select_best(b, 1000.0))
    same = reject(*crossed_arrays(sa, np.full(60, 1000.0), sb, np.full(60, 1000.0), paired=False)).mean()
    print(f"best of 20 vs 1, null: FPR held-out selection {held:.3f}, picked and tested on the same data {same:.3f}")
    x = per_byte(rng, (400, 3), 50, (0.003, 0.0, 0.01), np.sqrt(1000 / nbytes[:50])) * nbytes[:50]
    misses = np.mean([not (lambda q: q[0] <= 0 <= q[1])(np.quantile(bootstrap_ratio(m, nbytes[:50], 400, rng),
                                                                      [0.025, 0.975])) for m in x])  # fmt: skip
    print(f"percentile bootstrap over 3 seeds x 50 documents, null: 95% interval misses 0 in {misses:.3f}")
    print(f"wall {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
