"""Data-parallel trials: N ranks over gloo give the 1-process trajectory; Ray Train runs them in a sweep."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from loopgolf.trial import distributed
from loopgolf.trial.config import ConfigError, TrialConfig, preset
from loopgolf.trial.distributed import DataParallel, GradientBuckets, check_divisible
from loopgolf.trial.optim import lr_scale
from loopgolf.trial.train import run_trial

# A fixed-step trial: the schedule follows steps (train_seconds is out of reach), so runs
# that take different times still see the same learning rates at the same steps; a
# report after every step (a step takes far more than 1 ms) records the loss per step.
FIXED_STEPS = {
    "batch_size": 8, "eval_tokens": 4096, "quick_eval_tokens": 128, "bits": 8, "codec": "zlib",
    "max_steps": 8, "train_seconds": 1e6, "warmup_steps": 2, "warmdown_frac": 0.5,
    "report_every_seconds": 1e-3, "checkpoint_every_seconds": 1e6,
}  # fmt: skip


def fixed_steps(**values: Any) -> TrialConfig:
    return preset("tiny").replace(**(FIXED_STEPS | values))


def _rank_main(rank: int, world: int, init_file: str, runs: dict[str, TrialConfig], data: str, out: str) -> None:
    """One spawned rank: join the gloo group, run each trial, write what it saw."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, config in runs.items():
            reports: list[dict[str, Any]] = []
            metrics = run_trial(
                config, data, Path(out, name), reporter=lambda p, s, seen=reports: seen.append(p | {"state": s}),
                parallel=DataParallel.from_process_group(),
            )  # fmt: skip
            result = {"reports": reports, "metrics": metrics}
            Path(out, f"{name}.rank{rank}.json").write_text(json.dumps(result, default=str), encoding="utf-8")
    finally:
        dist.destroy_process_group()


def _rank_main_float64(rank: int, *args: Any) -> None:
    torch.set_default_dtype(torch.float64)
    _rank_main(rank, *args)


def run_ranks(
    world: int, runs: dict[str, TrialConfig], data: Path, out: Path, float64: bool = False
) -> dict[str, list[dict[str, Any]]]:
    """Each trial of `runs` on `world` spawned gloo ranks: {name: [rank 0's record, rank 1's, ...]}."""
    out.mkdir(parents=True)
    main = _rank_main_float64 if float64 else _rank_main
    mp.spawn(main, args=(world, str(out / "pg"), runs, str(data), str(out)), nprocs=world, join=True)
    return {n: [json.loads((out / f"{n}.rank{r}.json").read_text()) for r in range(world)] for n in runs}


def losses_by_step(reports: list[dict[str, Any]]) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in reports}


# Relative tolerance per trial. AdamW sees the 1-process gradient up to float32 rounding
# (the global mean is summed in another order); its division by sqrt(v) amplifies that
# rounding on small gradients: 3.3e-6 of the loss by step 8 on the built-in corpus. Muon
# orthogonalizes in bfloat16, which turns those 1e-7 differences into bf16 rounding flips: ~1e-5 after a few steps. With
# refinement, each rank tracks the router threshold on its slice and the ranks
# average it, which is close to, not exactly, the global batch's quantile.
TRAJECTORIES = {
    "adamw": ({"optimizer": "adamw"}, 1e-5),
    "muon_refine": ({"refine_passes": 1, "signal": "entropy"}, 1e-4),
}


@pytest.mark.slow
def test_two_gloo_ranks_follow_the_one_process_loss_trajectory(corpus_data: Path, tmp_path: Path) -> None:
    runs = {name: fixed_steps(**values) for name, (values, _) in TRAJECTORIES.items()}
    ranked = run_ranks(2, runs, corpus_data, tmp_path / "two")
    for name, config in runs.items():
        tolerance = TRAJECTORIES[name][1]
        seen: list[dict[str, Any]] = []
        single = run_trial(config, corpus_data, tmp_path / name, reporter=lambda p, s, seen=seen: seen.append(p))
        rank0, rank1 = ranked[name]
        assert single["train_steps"] == rank0["metrics"]["train_steps"] == rank1["metrics"]["train_steps"] == 8
        assert single["train_tokens"] == rank0["metrics"]["train_tokens"] == 8 * 8 * 128
        one, two = losses_by_step(seen), losses_by_step(rank0["reports"])
        common = sorted(set(one) & set(two))
        assert len(common) >= 6 and common[-1] == 8, name
        for step in common:
            assert two[step] == pytest.approx(one[step], rel=tolerance), f"{name}, step {step}"
        assert rank0["metrics"]["val_bpb"] == pytest.approx(single["val_bpb"], rel=10 * tolerance), name
        # The ranks report the same steps and losses and stay identical; rank 0 alone evaluates and writes.
        assert [r["step"] for r in rank1["reports"]] == [r["step"] for r in rank0["reports"]]
        assert losses_by_step(rank1["reports"]) == two
        assert all("quick_val_bpb" in r for r in rank0["reports"])
        assert not any("quick_val_bpb" in r for r in rank1["reports"])
        assert rank0["metrics"]["replica_drift"] == 0.0 and rank0["metrics"]["world_size"] == 2
        assert "val_bpb" not in rank1["metrics"] and rank1["metrics"]["status"] == "complete"
        saved = json.loads((tmp_path / "two" / name / "metrics.json").read_text())
        assert saved["val_bpb"] == rank0["metrics"]["val_bpb"] and math.isfinite(saved["val_bpb"])


def test_a_batch_that_does_not_split_over_the_ranks_is_one_clear_error(corpus_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        run_trial(fixed_steps(batch_size=6), corpus_data, tmp_path / "x", parallel=DataParallel(0, 4))
    assert str(info.value) == (
        "TrainConfig.batch_size=6: expected a multiple of the 4 data-parallel workers "
        "(each worker trains on an equal slice of the global batch)"
    )
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_micro_batches_and_ranks_follow_the_one_batch_loss_trajectory(corpus_data: Path, tmp_path: Path) -> None:
    """batch_size is the global batch whatever the split: 16 at once, 4 x 4 micro-batches, 2 ranks x 2 x 4.

    In float64, so that what is compared is the accumulation, not float32 summation order
    (AdamW's g / sqrt(v) turns 1e-7 differences of near-zero gradients into ~1e-6 of the loss).
    """
    whole = fixed_steps(optimizer="adamw", batch_size=16, micro_batch_size=16)
    seen: dict[str, list[dict[str, Any]]] = {"whole": [], "micro4": []}
    curves = {}
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for name, config in (("whole", whole), ("micro4", whole.replace(micro_batch_size=4))):
            metrics = run_trial(config, corpus_data, tmp_path / name, reporter=lambda p, s, n=name: seen[n].append(p))
            assert metrics["train_tokens"] == 8 * 16 * 128
            curves[name] = losses_by_step(seen[name])
    finally:
        torch.set_default_dtype(default)
    ranked = run_ranks(2, {"micro4": whole.replace(micro_batch_size=4)}, corpus_data, tmp_path / "two", float64=True)
    curves["ranks2_micro4"] = losses_by_step(ranked["micro4"][0]["reports"])
    assert ranked["micro4"][0]["metrics"]["train_tokens"] == 8 * 16 * 128
    for name in ("micro4", "ranks2_micro4"):
        assert sorted(curves[name]) == sorted(curves["whole"]) and max(curves[name]) == 8, name
        for step, loss in curves["whole"].items():
            assert curves[name][step] == pytest.approx(loss, rel=1e-6), f"{name}, step {step}"
    assert curves["whole"][8] < curves["whole"][1]  # it trained


def test_a_micro_batch_that_does_not_split_the_batch_is_one_clear_error(corpus_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        fixed_steps(batch_size=16, micro_batch_size=6)
    assert str(info.value) == "TrainConfig.micro_batch_size=6: expected a divisor of batch_size=16"
    with pytest.raises(ConfigError) as info:
        run_trial(fixed_steps(batch_size=16, micro_batch_size=8), corpus_data, tmp_path / "x",
                  parallel=DataParallel(0, 4))  # fmt: skip
    assert str(info.value) == (
        "TrainConfig.micro_batch_size=8: expected batch_size=16 to be a multiple of "
        "micro_batch_size x 4 data-parallel worker(s)"
    )
    assert not (tmp_path / "x").exists()


def test_max_steps_ends_a_trial_at_that_step_and_drives_the_schedule(corpus_data: Path, tmp_path: Path) -> None:
    config = fixed_steps(max_steps=10, warmup_steps=0, warmdown_frac=0.5)
    assert lr_scale(4, 0.0, config) == 1.0 and lr_scale(8, 0.0, config) == pytest.approx(0.4)
    assert lr_scale(2, 0.9e6, config) == pytest.approx(0.2)  # the time budget, when it is further along
    with pytest.raises(ConfigError, match="max_steps=-1"):
        fixed_steps(max_steps=-1)
    metrics = run_trial(fixed_steps(max_steps=3), corpus_data, tmp_path / "m")
    assert metrics["status"] == "complete" and metrics["train_steps"] == 3 and metrics["world_size"] == 1


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_the_ranks_slices_tile_the_global_batch_in_rank_order(world: int) -> None:
    """Rank r keeps rows [r * B / W, (r + 1) * B / W): together, the single-process batch, each row once."""
    x = np.arange(8 * 5).reshape(8, 5)
    y = x + 1000
    shards = [DataParallel(rank, world).shard((x, y)) for rank in range(world)]
    assert all(len(sx) == len(sy) == 8 // world for sx, sy in shards)
    assert np.array_equal(np.concatenate([sx for sx, _ in shards]), x)
    assert np.array_equal(np.concatenate([sy for _, sy in shards]), y)


@pytest.mark.parametrize(("rank", "world"), [(0, 0), (2, 2), (-1, 2)])
def test_a_rank_outside_the_world_is_refused(rank: int, world: int) -> None:
    with pytest.raises(ValueError, match=f"^DataParallel: rank={rank}, world_size={world}$"):
        DataParallel(rank, world)
    assert DataParallel(world - 1 if world > 0 else 0, max(world, 1)).world_size == max(world, 1)


def test_the_batch_must_split_over_the_ranks() -> None:
    config = fixed_steps(batch_size=6)
    check_divisible(config, 1)
    check_divisible(config, 3)
    with pytest.raises(ConfigError, match=r"^TrainConfig\.batch_size=6: expected a multiple of the 4 data-parallel"):
        check_divisible(config, 4)


def _spec(data: Path, tmp_path: Path, resources: dict[str, Any], batch_size: int = 8) -> dict[str, Any]:
    return {
        "name": "dp", "data": str(data), "storage": str(tmp_path / "sweeps"), "space": "shared_vs_unique",
        "overrides": {"n_blocks": 2, "n_passes": 2, "n_prelude": 0, "n_coda": 0, "d_model": 64},
        "base": {"preset": "tiny", "batch_size": batch_size},
        "budget": {"artifact_bytes": 2_000_000, "train_seconds": 3},
        "resources": resources,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("resources", "batch_size", "message"),
    [
        ({"workers": 0}, 8, "resources.workers=0: expected an integer >= 1"),
        ({"workers": 1.5}, 8, "resources.workers=1.5: expected an integer >= 1"),
        ({"workers": 2, "gpu": 0.5}, 8, "resources.gpu=0.5 with workers=2: expected 0 or 1"),
        ({"workers": 3}, 8, "base.batch_size=8 with resources.workers=3: expected a multiple of workers"),
    ],
)
def test_bad_worker_resources_fail_with_one_line(
    corpus_data: Path, tmp_path: Path, resources: dict[str, Any], batch_size: int, message: str
) -> None:
    from loopgolf.orchestrator.spec import SpecError  # the sweep layer: only where a test needs it
    from loopgolf.orchestrator.spec_file import spec_from_dict

    with pytest.raises(SpecError) as info:
        spec_from_dict(_spec(corpus_data, tmp_path, resources, batch_size))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_workers_default_to_one_and_round_trip_through_the_saved_spec(corpus_data: Path, tmp_path: Path) -> None:
    from loopgolf.orchestrator.spec_file import spec_from_dict  # the sweep layer: only where a test needs it

    assert spec_from_dict(_spec(corpus_data, tmp_path, {"cpu": 1})).workers == 1
    spec = spec_from_dict(_spec(corpus_data, tmp_path, {"cpu": 2, "gpu": 1, "workers": 8}))
    assert (spec.cpu, spec.gpu, spec.workers) == (2, 1, 8)
    assert spec_from_dict(spec.to_yaml_dict()) == spec


@pytest.mark.slow
@pytest.mark.ray
def test_a_sweep_with_two_workers_runs_each_trial_through_ray_train(corpus_data: Path, tmp_path: Path) -> None:
    spec = _spec(corpus_data, tmp_path, {"cpu": 1, "gpu": 0, "workers": 2}) | {
        "search": {"algorithm": "random", "objectives": {"val_bpb": "min"}, "num_samples": 1},
        "seeds": 1, "max_concurrent": 1,
    }  # fmt: skip
    spec["base"] |= {"eval_tokens": 4096, "quick_eval_tokens": 512, "bits": 8, "codec": "zlib",
                     "report_every_seconds": 0.5, "checkpoint_every_seconds": 1.0}  # fmt: skip
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "loopgolf.cli", "sweep", str(tmp_path / "spec.yaml")],
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dir = tmp_path / "sweeps" / "dp"
    trials = pd.read_parquet(sweep_dir / "results" / "trials.parquet")
    assert len(trials) == 1
    row = trials.iloc[0]
    assert row["status"] == "complete" and row["feasible"] and row["world_size"] == 2
    # the budget stops at the step boundary nearest it: within a step, and a step of two gloo ranks on a
    # busy 2-core machine (CI under a CPU hog) took over a second
    step = row["train_seconds"] / row["train_steps"]
    assert row["replica_drift"] == 0.0 and row["config_id"] and abs(row["train_seconds"] - 3.0) <= max(0.5, step)
    assert not Path(row["artifact_path"]).is_absolute() and (sweep_dir / row["artifact_path"]).is_file()
    curves = pd.read_parquet(sweep_dir / "results" / "curves.parquet")
    reported = curves["step"].nunique()  # each step's report (one a step at most every 0.5 s; a starved trial made 1)
    assert {"train_loss", "quick_val_bpb"} <= set(curves["metric"]) and reported >= min(3, int(row["train_steps"]))
    # rank 0's resumable state: Ray Train checkpoints in the trial's directory, found again by name on a restart
    assert list(sweep_dir.glob("trials/*/train/checkpoint_*/training_state.pt"))


# --------------------------------------------------------------------- sharded Muon

SHAPES = [(48, 32), (32, 32), (16, 32), (64, 16), (32, 48)]  # five matrices: shares of 3/2 (world 2), 2/2/1 (3)


def _muon_params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in SHAPES]


def _muon_steps(params: list[torch.nn.Parameter], steps: int, parallel: DataParallel | None) -> torch.optim.Muon:
    """`steps` Muon steps on gradients every rank computes alike (a fixed function of step and matrix)."""
    muon = torch.optim.Muon(params, lr=0.05, weight_decay=0.01, momentum=0.95, adjust_lr_fn="original")
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        if parallel is None:
            muon.step()
        else:
            parallel.step_sharded(muon)
        muon.zero_grad(set_to_none=True)
    return muon


def _sharded_rank(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        parallel = DataParallel.from_process_group()
        params = _muon_params()
        muon = _muon_steps(params, 4, parallel)
        stepped = [i for i, p in enumerate(params) if "momentum_buffer" in muon.state.get(p, {})]
        parallel.gather_optimizer_state(muon)
        whole = [muon.state[p]["momentum_buffer"] for p in params]
        torch.save({"params": [p.detach() for p in params], "stepped": stepped, "momentum": whole},
                   Path(out, f"rank{rank}.pt"))  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])  # 3: spawns three ranks
def test_sharded_muon_equals_one_process_and_each_rank_steps_only_its_share(world: int, tmp_path: Path) -> None:
    single_params = _muon_params()
    single = _muon_steps(single_params, 4, None)
    mp.spawn(_sharded_rank, args=(world, str(tmp_path / "pg"), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["stepped"] == [i for i in range(len(SHAPES)) if i % world == rank]  # its share, no other
        for mine, one in zip(got["params"], single_params, strict=True):
            torch.testing.assert_close(mine, one.detach(), rtol=0, atol=0)  # the same arithmetic, per matrix
        for mine, p in zip(got["momentum"], single_params, strict=True):  # rank 0's checkpoint copy is whole
            torch.testing.assert_close(mine, single.state[p]["momentum_buffer"], rtol=0, atol=0)


# --------------------------------------------------------------------- gradients during backward


class _Net(torch.nn.Module):
    """Three layers; rank-dependent use: the last is used by rank 0 only, the middle by no rank when told."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, rank: int, skip_b: bool) -> torch.Tensor:
        h = self.a(x)
        h = h if skip_b else self.b(h).relu()
        return (self.c(h) if rank == 0 else h).square().mean()


def _bucket_rank(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    distributed.BUCKET_BYTES = 8 * 9 * 4  # one Linear's weight and bias a bucket: several buckets
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        parallel = DataParallel.from_process_group()
        results = {}
        for skip_b in (False, True):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))
            flat_net, bucket_net = _Net(), _Net()
            flat_net(x, rank, skip_b).backward()
            parallel.average_gradients(list(flat_net.parameters()))
            buckets = GradientBuckets(parallel, list(bucket_net.parameters()))
            buckets.arm()
            bucket_net(x, rank, skip_b).backward()
            started_in_backward = len(buckets.handles)
            buckets.finish()
            buckets.remove()
            results[skip_b] = {
                "started": started_in_backward, "n_buckets": len(buckets.buckets),
                # gloo may sum three ranks in another order for another buffer size: equal to rounding
                "same": [(p.grad is None and q.grad is None) or (p.grad is not None and q.grad is not None
                          and torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-9))
                         for p, q in zip(flat_net.parameters(), bucket_net.parameters(), strict=True)],
                "none": [q.grad is None for q in bucket_net.parameters()],
            }  # fmt: skip
        torch.save(results, Path(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])  # 3: spawns three ranks
def test_gradient_buckets_equal_the_flat_average_and_start_during_backward(world: int, tmp_path: Path) -> None:
    mp.spawn(_bucket_rank, args=(world, str(tmp_path / "pg"), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for skip_b, got in results.items():
            assert all(got["same"]), (rank, skip_b)  # the very gradients of the flat all-reduce
            assert got["n_buckets"] == 3
            # b unused by every rank keeps no gradient; c, used by rank 0 only, is averaged with zeros
            assert got["none"] == [False, False, skip_b, skip_b, False, False]
        # backward started the buckets it completed, in order: rank 0 all three; the others none
        # (their first bucket, c's, never fills: finish() starts it, then the rest, in the same order)
        assert results[False]["started"] == (3 if rank == 0 else 0)
