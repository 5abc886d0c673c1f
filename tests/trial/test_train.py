"""The trial: training under a wall-clock budget, the artifact roundtrip, resume, failures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from loopgolf.trial import model as model_module
from loopgolf.trial import train as train_module
from loopgolf.trial.compiled import compiles
from loopgolf.trial.config import ConfigError, preset
from loopgolf.trial.data import byte_table, list_shards, load_tokenizer, read_shard, token_bytes, val_tokens
from loopgolf.trial.model import RecurrentLM
from loopgolf.trial.optim import build_optimizers, lr_scale, muon_momentum
from loopgolf.trial.train import _accumulate, run_trial
from tests.trial.makers import tiny

REPO = Path(__file__).resolve().parents[2]


def unigram_bpb(data_dir: Path) -> float:
    """bpb of the add-one unigram model fitted on the train split, scored on the val split."""
    train = np.concatenate([np.asarray(read_shard(p)) for p in list_shards(data_dir, "train")])
    counts = np.bincount(train, minlength=1024) + 1.0
    log_p = np.log(counts / counts.sum())
    val = val_tokens(data_dir)
    table = byte_table(load_tokenizer(data_dir / "tokenizer.model"), 1024)
    nats = -log_p[val[1:]].sum()
    return float(nats / math.log(2) / token_bytes(val[1:], val[:-1], table).sum())


def test_lr_schedule_warms_up_then_warms_down_by_elapsed_time() -> None:
    config = tiny(train_seconds=10.0, warmup_steps=4, warmdown_frac=0.5)
    assert lr_scale(0, 0.0, config) == pytest.approx(0.25)
    assert lr_scale(3, 1.0, config) == 1.0
    assert lr_scale(100, 5.0, config) == 1.0
    assert lr_scale(100, 7.5, config) == pytest.approx(0.5)
    assert lr_scale(100, 10.0, config) == 0.0


def test_the_challenge_warmdown_spans_warmdown_steps_at_the_mean_step_time() -> None:
    config = tiny(train_seconds=60.0, warmup_steps=0, warmdown_steps=40)
    assert lr_scale(0, 0.0, config) == 1.0
    assert lr_scale(100, 30.0, config) == 1.0  # 0.3 s a step: the last 12 s decay; 30 s remain
    assert lr_scale(100, 50.0, config) == pytest.approx(0.5)  # 0.5 s a step: 20 s of warmdown, 10 s left
    assert lr_scale(100, 60.0, config) == 0.0
    assert lr_scale(20, 25.0, config) == pytest.approx(0.7)  # slow steps (1.25 s): decaying from the start
    fixed = tiny(train_seconds=1e6, max_steps=100, warmup_steps=0, warmdown_steps=40)
    assert [lr_scale(s, 0.001 * s, fixed) for s in (0, 60, 80, 100)] == pytest.approx([1.0, 1.0, 0.5, 0.0])


def test_pg_baseline_warms_muon_momentum_up_over_500_steps(corpus_data: Path, tmp_path: Path) -> None:
    recipe = preset("pg_baseline")
    assert [muon_momentum(s, recipe) for s in (0, 250, 500, 5000)] == pytest.approx([0.85, 0.90, 0.95, 0.95])
    # A real trial sets it on Muon's groups before every step (the state holds the last step's).
    config = tiny(muon_momentum_start=0.85, muon_momentum_warmup_steps=4, max_steps=3, train_seconds=1e6,
                  checkpoint_every_seconds=1e-3)  # fmt: skip
    states: list[dict[str, Any]] = []
    run_trial(config, corpus_data, tmp_path / "m", reporter=lambda p, s: states.append(s))
    momenta = [s["optimizers"][0]["param_groups"][0]["momentum"] for s in states]
    assert momenta == pytest.approx([0.85, 0.875, 0.90])


@pytest.mark.slow
def test_twenty_second_trial_beats_unigram_and_artifact_eval_reproduces_it(
    corpus_data: Path, tmp_path: Path
) -> None:
    config = tiny(train_seconds=20.0, batch_size=16, refine_passes=1, signal="entropy", bits=6, codec="lzma")
    reports: list[dict[str, Any]] = []
    metrics = run_trial(config, corpus_data, tmp_path / "t", reporter=lambda m, s: reports.append(m))
    assert metrics["status"] == "complete" and metrics["feasible"]
    step_seconds = metrics["train_seconds"] / metrics["train_steps"]
    assert abs(metrics["train_seconds"] - 20.0) <= max(0.2, step_seconds)
    assert metrics["val_bpb"] < unigram_bpb(corpus_data) - 0.3
    assert abs(metrics["val_bpb"] - metrics["val_bpb_prequant"]) < 0.1
    artifact = Path(metrics["artifact_path"])
    assert metrics["model_bytes"] == artifact.stat().st_size
    assert metrics["artifact_bytes"] == artifact.stat().st_size + metrics["code_bytes"]
    assert 0.0 < metrics["refine_fraction"] <= 0.5
    assert len(metrics["decile_ce_delta"]) == 10
    assert [r["step"] for r in reports] == sorted(r["step"] for r in reports) and len(reports) >= 3
    saved = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert saved["val_bpb"] == metrics["val_bpb"]

    proc = subprocess.run(
        [sys.executable, "-m", "loopgolf.cli", "artifact", "eval", str(artifact),
         "--data", str(corpus_data)],
        capture_output=True, text=True, check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    from_file = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(from_file["val_bpb"] - metrics["val_bpb"]) < 1e-4


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_a_stopped_trial_resumes_with_the_remaining_budget(corpus_data: Path, tmp_path: Path) -> None:
    config = tiny(train_seconds=6.0, report_every_seconds=1.0, checkpoint_every_seconds=2.0)
    saved: dict[str, Any] = {}

    def stop_after_first_checkpoint(progress: dict[str, Any], state: dict[str, Any] | None) -> None:
        if state is not None:
            saved.update(state)
            raise _Stop

    with pytest.raises(_Stop):
        run_trial(config, corpus_data, tmp_path / "a", reporter=stop_after_first_checkpoint)
    assert 2.0 <= saved["elapsed"] < 3.0 and saved["step"] > 0
    steps: list[int] = []
    metrics = run_trial(
        config, corpus_data, tmp_path / "a", reporter=lambda m, s: steps.append(m["step"]), resume_state=saved
    )
    assert metrics["status"] == "complete"
    assert abs(metrics["train_seconds"] - config.train.train_seconds) <= 1.0  # one report interval
    assert steps[0] > saved["step"] and metrics["train_steps"] > saved["step"]
    assert metrics["val_bpb"] < unigram_bpb(corpus_data)


def test_non_finite_loss_ends_as_a_failed_trial_with_a_reason(
    corpus_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_forward = model_module.RecurrentLM.forward
    calls = {"n": 0}

    def poisoned(self, *args: Any, **kwargs: Any) -> Any:
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if self.training and calls["n"] >= 3:
            out.loss = out.loss * torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(model_module.RecurrentLM, "forward", poisoned)
    # a budget in steps, not seconds: a loaded machine must still reach the poisoned third forward
    metrics = run_trial(tiny(train_seconds=600.0, max_steps=10), corpus_data, tmp_path / "nan")
    assert metrics["status"] == "failed" and not metrics["feasible"]
    assert "non-finite training loss" in metrics["error"] and "step 3" in metrics["error"]
    assert not (tmp_path / "nan" / "model.lgart").exists()


def test_a_config_predicted_over_the_cap_is_rejected_without_training(corpus_data: Path, tmp_path: Path) -> None:
    metrics = run_trial(tiny(max_artifact_bytes=10_000), corpus_data, tmp_path / "r")
    assert metrics["status"] == "rejected" and not metrics["feasible"]
    assert metrics["predicted_artifact_bytes"] > 10_000 and metrics["byte_violation"] > 0
    assert "train_steps" not in metrics and not (tmp_path / "r" / "model.lgart").exists()


@pytest.mark.parametrize(("eval_cap", "byte_cap", "feasible"), [
    (0.0, 10_000_000, True),  # no eval cap
    (1e-6, 10_000_000, False),  # evaluation always takes longer than a microsecond
    (3600.0, 10_000_000, True),
    (3600.0, 10_000, False),  # trained anyway (allow_over_cap), measured over the byte cap
])  # fmt: skip
def test_a_trial_is_feasible_only_within_both_caps(
    eval_cap: float, byte_cap: int, feasible: bool, corpus_data: Path, tmp_path: Path
) -> None:
    config = tiny(train_seconds=600.0, max_steps=2, max_eval_seconds=eval_cap, max_artifact_bytes=byte_cap,
                  allow_over_cap=True)  # fmt: skip
    metrics = run_trial(config, corpus_data, tmp_path / "t")
    assert metrics["status"] == "complete" and metrics["feasible"] is feasible
    assert (metrics["eval_violation"] > 0) == (eval_cap == 1e-6)
    assert (metrics["byte_violation"] > 0) == (byte_cap == 10_000)
    if eval_cap:  # the violation is the measured eval time over the cap, in seconds
        assert metrics["eval_violation"] == pytest.approx(metrics["eval_seconds"] - eval_cap, abs=0.05)


def test_trial_cli_prints_json_last_and_fails_cleanly_on_bad_override(corpus_data: Path, tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "loopgolf.cli", "trial", str(REPO / "examples" / "trial_tiny.yaml"),
           "--data", str(corpus_data), "--out", str(tmp_path / "cli")]  # fmt: skip
    bad = subprocess.run([*cli, "--set", "n_blockz=3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown config field 'n_blockz'" in bad.stderr
    assert bad.stderr.strip().count("\n") == 0
    ok = subprocess.run(
        [*cli, "--set", "train_seconds=2", "--set", "eval_tokens=4096"], capture_output=True, text=True, check=True
    )
    metrics = json.loads(ok.stdout.strip().splitlines()[-1])
    assert metrics["status"] == "complete" and Path(metrics["artifact_path"]).is_file()
    assert "val_bpb" in ok.stdout.splitlines()[1]


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_optimizer_groups_follow_roles_not_shapes(optimizer: str) -> None:
    """Every parameter in exactly one group; control tensors and per-pass vectors in Adam, never Muon."""
    config = preset("small").replace(
        n_prelude=1, n_coda=1, unet_skips=True, tie_embeddings=False, phase="embed", refine_passes=1,
        optimizer=optimizer,
    )
    model = RecurrentLM(config.model)
    optimizers = build_optimizers(model, config)
    group_of: dict[int, list[tuple[str, str]]] = {}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                group_of.setdefault(id(p), []).append((type(opt).__name__, group["role"]))
    named = dict(model.named_parameters())
    assert all(len(group_of.get(id(p), [])) == 1 for p in named.values())
    assert sum(len(g["params"]) for opt in optimizers for g in opt.param_groups) == len(named)
    where = {name: group_of[id(p)][0] for name, p in named.items()}
    matrix_opt = "Muon" if optimizer == "muon" else "AdamW"
    for name in ("core.0.attn_scale", "core.0.mlp_scale", "core.0.resid_mix", "core.0.attn.q_gain",
                 "prelude.0.resid_mix", "coda.0.mlp_scale", "skip_weights"):
        assert where[name] == ("AdamW", "control"), name
    assert where["phase.embed"] == ("AdamW", "per_pass")  # 2-D, but a per-pass vector
    assert where["tok_emb.weight"] == where["lm_head.weight"] == ("AdamW", "embedding")
    for name in ("core.1.attn.q.weight", "core.0.attn.k.weight", "prelude.0.mlp.fc.weight", "coda.0.attn.proj.weight"):
        assert where[name] == (matrix_opt, "matrix"), name
    assert {role for _, role in where.values()} == {"control", "per_pass", "embedding", "matrix"}


def test_compile_reads_yaml_booleans_and_defaults_to_cuda_only() -> None:
    assert tiny(compile=True).train.compile == "on" and tiny(compile=False).train.compile == "off"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [compiles(tiny(), d) for d in (cpu, cuda)] == [False, True]
    assert [compiles(tiny(compile=True), d) for d in (cpu, cuda)] == [True, True]
    assert [compiles(tiny(compile="off"), d) for d in (cpu, cuda)] == [False, False]
    assert compiles(tiny(refine_passes=1), cuda)  # routed too: padded to a bounded set of shapes
    with pytest.raises(ConfigError, match=r"TrainConfig.compile='yes': expected one of \['auto', 'on', 'off'\]"):
        tiny(compile="yes")


@pytest.mark.parametrize("accum", [2, 4])
def test_accumulated_micro_batches_give_the_whole_batch_gradient(accum: int) -> None:
    """The loss curves cannot show it (AdamW and Muon are blind to a gradient's scale): compare gradients."""
    config = tiny(batch_size=8, seq_len=32, aux_loss=0.5, refine_passes=1, signal="uniform")
    torch.manual_seed(0)
    x, y = torch.randint(0, 1024, (2, 8, 32))
    grads = []
    for n in (1, accum):
        torch.manual_seed(1)
        model = RecurrentLM(config.model).train()
        with torch.no_grad():
            for p in model.parameters():  # off the zero init, so every tensor gets a gradient
                p.add_(torch.randn_like(p) * 0.05)
        run = SimpleNamespace(config=config, device=torch.device("cpu"), forward=model, grad_accum=n, buckets=None)
        loss, _ = _accumulate(run, x, y)  # type: ignore[arg-type]
        grads.append(({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}, float(loss)))
    (whole, whole_loss), (split, split_loss) = grads
    assert split_loss == pytest.approx(whole_loss, rel=1e-6)
    assert sorted(split) == sorted(whole) and len(whole) > 10
    for name, g in whole.items():
        torch.testing.assert_close(split[name], g, rtol=1e-4, atol=1e-7, msg=name)


def test_the_loss_is_read_every_n_steps_and_at_the_budget(
    corpus_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on one CUDA device (reads every 4 steps here): the first step is read (it times the
    clock's step), then every 4th, and the last; the logged loss is the mean of the read steps'."""
    reads: list[tuple[int, int]] = []  # (step after the read, steps it read)
    read_clock = train_module._read_clock

    def recording(run: Any) -> float:
        reads.append((run.step, run.pending_steps))
        return read_clock(run)

    monkeypatch.setattr(train_module, "loss_read_every", lambda device, parallel: 4)
    monkeypatch.setattr(train_module, "_read_clock", recording)
    losses: list[torch.Tensor] = []
    forward = RecurrentLM.forward

    def keep_loss(self: RecurrentLM, *args: Any, **kwargs: Any) -> Any:
        out = forward(self, *args, **kwargs)
        losses.append(out.loss.detach())
        return out

    monkeypatch.setattr(RecurrentLM, "forward", keep_loss)
    config = tiny(max_steps=10, train_seconds=1e6, report_every_seconds=1e6, checkpoint_every_seconds=1e6)
    metrics = run_trial(config, corpus_data, tmp_path / "m")
    assert reads == [(1, 1), (5, 4), (9, 4), (10, 1)]
    assert metrics["train_steps"] == 10 and metrics["train_tokens"] == 10 * 8 * config.model.seq_len
    assert metrics["train_loss"] == pytest.approx(float(losses[9]), rel=1e-6)  # the last read held one step


@pytest.mark.parametrize(("train_seconds", "steps"), [(10.3, 10), (10.7, 11)])
def test_the_budget_stops_where_it_is_nearest_within_half_a_step(
    corpus_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, train_seconds: float, steps: int
) -> None:
    """Every step takes one second on the training clock. A 10.3 s budget stops after 10 steps
    (an 11th would end 0.7 s late); a 10.7 s budget runs the 11th (0.3 s late beats 0.7 s early)."""
    taken = 0
    step = train_module._step

    def counted(run: Any, scale: float) -> None:
        nonlocal taken
        step(run, scale)
        taken += 1

    monkeypatch.setattr(train_module, "_step", counted)
    monkeypatch.setattr(train_module, "TRAIN_CLOCK", lambda: float(taken))  # seconds = steps taken
    config = tiny(train_seconds=train_seconds, report_every_seconds=1e6, checkpoint_every_seconds=1e6)
    metrics = run_trial(config, corpus_data, tmp_path / "m")
    assert (metrics["train_steps"], metrics["train_seconds"]) == (steps, float(steps))
