"""Sweep efficiency on a local Ray cluster of one node vs two (one CPU per node).

Run: .venv/bin/python bench/bench_cluster.py [--trials 4] [--trial-seconds 10] [--nodes 1 2]

The same sweep (`tiny` trials, one CPU each, max_concurrent 2) runs on a
ray.cluster_utils.Cluster of 1 node, then of 2 nodes, all on this machine; the driver
(this process) connects with `run_sweep(spec, address=...)`, as `loopgolf sweep --address` does.

efficiency = sum of trial train_seconds / (sweep wall time x concurrency), where the
concurrency is the number of nodes (one one-CPU trial fits on each); overhead per trial =
(wall x concurrency - sum of train_seconds) / trials. The wall time is run_sweep's: connecting
to the cluster, every trial's start-up, evaluation and compression, and the final ledger
writes; not the cluster's own start. On a machine with fewer free cores than nodes, the
trials also slow each other down: train_seconds is a fixed budget, so that shows as fewer
steps (tokens/s per trial), not as lost efficiency.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

# The driver (this process) and the cluster's nodes (its children) must agree on token auth,
# or the trials' workers cannot call the driver back; Cluster does not turn it on, and a
# driver given an address would (with ~/.ray/auth_token present). Set before Ray reads it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pandas as pd
import ray
from common import prepare_shakespeare, tiny_sweep_spec  # bench/common.py (the script's own directory)
from ray.cluster_utils import Cluster

from loopgolf.orchestrator.spec_file import spec_from_dict
from loopgolf.orchestrator.sweep import run_sweep


def process_tree(pids: list[int]) -> list[Any]:
    """These processes and everything they spawned (workers, agents), alive now."""
    import psutil  # Ray's vendored copy, on sys.path once ray is imported

    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            procs += [root, *root.children(recursive=True)]
    return procs


def run_on_cluster(nodes: int, spec_raw: dict[str, Any]) -> tuple[float, pd.DataFrame, dict[str, str]]:
    """One sweep on a fresh cluster of `nodes` one-CPU nodes; every process it started is stopped after."""
    import psutil

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        names = {node.node_id: ("head" if i == 0 else f"worker{i}") for i, node in enumerate(cluster.list_all_nodes())}
        spec = spec_from_dict(spec_raw)
        start = time.perf_counter()
        run_sweep(spec, address=cluster.address)
        wall = time.perf_counter() - start
        ray.shutdown()
        sweep_dir = Path(spec.sweep_dir)
        trials = pd.read_parquet(sweep_dir / "results" / "trials.parquet")
        # Did each trial's artifact reach the sweep directory (or only Ray's session temp dir)?
        trials["in_sweep_dir"] = [(sweep_dir / "trials" / t / "model.lgart").is_file() for t in trials["trial_id"]]
        return wall, trials, names
    finally:
        ray.shutdown()
        left = process_tree([info.process.pid for n in cluster.list_all_nodes()
                             for infos in n.all_processes.values() for info in infos])  # fmt: skip
        cluster.shutdown()  # stops the nodes' own processes; what they spawned is stopped below
        _, alive = psutil.wait_procs(left, timeout=10)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--trial-seconds", type=float, default=10.0)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    # A private Ray temp dir: the clusters' session files and "current cluster" address file
    # stay out of /tmp/ray, where a plain ray.init() of another user would find them.
    ray_tmp = tempfile.mkdtemp(prefix="lgray-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = ray_tmp
    seconds = args.trial_seconds
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            prepare_shakespeare(data)
            walls = {}
            for nodes in args.nodes:
                spec_raw = tiny_sweep_spec(f"cluster{nodes}", data, Path(tmp) / "sweeps", seconds, args.trials, 2)
                wall, trials, names = run_on_cluster(nodes, spec_raw)
                walls[nodes] = wall
                trained = float(trials["train_seconds"].sum())
                per_node = trials["node_id"].map(names).value_counts().sort_index().to_dict()
                tokens_per_s = (trials["train_tokens"] / trials["train_seconds"]).mean()
                print(
                    f"{nodes} node(s) x 1 CPU, {len(trials)} trials x {seconds:g} s "
                    f"({int((trials['status'] == 'complete').sum())} complete): wall {wall:.1f} s, "
                    f"efficiency {trained / (wall * nodes):.3f}, "
                    f"overhead {(wall * nodes - trained) / len(trials):.1f} s per trial, "
                    f"{tokens_per_s:,.0f} tokens/s per trial; trials per node {per_node}; "
                    f"artifacts in the sweep dir {int(trials['in_sweep_dir'].sum())}/{len(trials)}",
                    flush=True,
                )
            if 1 in walls and 2 in walls:
                print(f"speed-up of 2 nodes over 1: {walls[1] / walls[2]:.2f}x wall")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
