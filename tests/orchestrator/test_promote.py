"""Promote and export: the choice of configurations, the fidelity rule, fresh seeds, the
source left untouched, and a record folder whose numbers are the ledger's."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from loopgolf.analysis.pareto import choose_configurations, config_means
from loopgolf.errors import LoopgolfError
from loopgolf.orchestrator.promote import PromoteError, fidelity_changes

FAKE = Path(__file__).resolve().parents[1] / "fixtures" / "fake_train_gpt.py"
REPO = Path(__file__).resolve().parents[2]


def _ledger(rows: list[tuple[str, int, float, int]], **extra: object) -> pd.DataFrame:
    return pd.DataFrame([{"sweep": "s", "trial_id": f"t{i}", "config_id": c, "seed": seed, "val_bpb": bpb,
                          "artifact_bytes": size, "status": "complete", "feasible": True, **extra}
                         for i, (c, seed, bpb, size) in enumerate(rows)])  # fmt: skip


def test_configurations_are_chosen_by_their_mean_over_seeds_never_one_seed() -> None:
    df = _ledger([("lucky", 0, 1.00, 30), ("lucky", 1, 3.00, 30),  # best single seed, mean 2.0
                  ("steady", 0, 1.90, 20), ("steady", 1, 1.90, 20),  # mean 1.9
                  ("small", 0, 2.50, 5), ("small", 1, 2.50, 5)])  # fmt: skip
    objectives = {"val_bpb": "min", "artifact_bytes": "min"}
    assert config_means(df, objectives)["config_id"].tolist() == ["steady", "lucky", "small"]
    assert choose_configurations(df, objectives, top=1) == ["steady"]
    assert choose_configurations(df, objectives, top=2) == ["steady", "lucky"]
    assert sorted(choose_configurations(df, objectives, front=True)) == ["small", "steady"]  # lucky: dominated
    with pytest.raises(LoopgolfError, match=r"^promote: expected exactly one of --front or --top K$"):
        choose_configurations(df, objectives)


def test_infeasible_failed_and_arm_trials_are_not_candidates() -> None:
    df = _ledger([("a", 0, 1.0, 10), ("b", 0, 2.0, 10), ("c", 0, 0.5, 10), ("d", 0, 0.1, 10)])
    df.loc[df["config_id"] == "c", "feasible"] = False
    df.loc[df["config_id"] == "d", "status"] = "failed"
    df["arm"] = ["routed", "uniform", None, None]
    df["pair_id"] = ["p", "p", None, None]
    assert choose_configurations(df, {"val_bpb": "min"}, top=5) == ["a"]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["overrides.n_passes=2"], "--set overrides.n_passes: promote re-runs the same configurations, so only "
                                   "fidelity may change"),
        (["base.d_model=128"], "--set base.d_model: promote re-runs the same configurations"),
        (["trial.env.NUM_HEADS=4"], "--set trial.env.NUM_HEADS: promote re-runs the same configurations"),
        (["seeds=5"], "--set seeds: promote re-runs"),
    ],
)  # fmt: skip
def test_only_fidelity_may_change(sets: list[str], message: str) -> None:
    with pytest.raises(PromoteError) as info:
        fidelity_changes(sets)
    assert str(info.value).startswith(message)


def test_fidelity_fields_are_taken_as_given() -> None:
    sets = ["budget.train_seconds=600", "resources.gpu=8", "base.max_steps=4950", "budget.artifact_bytes=16000000"]
    expected = {"budget.train_seconds": 600, "resources.gpu": 8, "base.max_steps": 4950,
                "budget.artifact_bytes": 16000000}  # fmt: skip
    assert fidelity_changes(sets) == expected


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loopgolf.cli", *args], capture_output=True, text=True,
                          timeout=900, cwd=REPO)  # fmt: skip


@pytest.mark.slow
@pytest.mark.ray
def test_promote_then_export_a_script_configuration(corpus_data: Path, tmp_path: Path) -> None:
    spec = {"name": "proxy", "data": str(corpus_data), "storage": str(tmp_path),
            "trial": {"script": str(FAKE), "env": {"MODEL_SIZE": 500}}, "space": {"FAKE_BPB": [2.5, 2.6, 2.7]},
            "budget": {"artifact_bytes": 100_000, "train_seconds": 5}, "seeds": 2,
            "search": {"algorithm": "grid", "num_samples": 3, "objectives": {"val_bpb": "min"}}}  # fmt: skip
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    assert _cli("sweep", str(tmp_path / "spec.yaml")).returncode == 0
    source = tmp_path / "proxy"
    before = _digest(source)
    proxy = pd.read_parquet(source / "results" / "trials.parquet")
    best = proxy.groupby("config_id")["val_bpb"].mean().sort_values().index[:2].tolist()
    proc = _cli("promote", str(source), "--top", "2", "--name", "full", "--seeds", "3",
                "--set", "budget.train_seconds=20")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _digest(source) == before  # the source is read, never written
    full = pd.read_parquet(tmp_path / "full" / "results" / "trials.parquet")
    assert len(full) == 6 and (full["status"] == "complete").all()
    assert sorted(set(full["promoted_from"])) == sorted(f"proxy:{c}" for c in best)
    assert set(full["fidelity"]) == {json.dumps({"budget.train_seconds": 20})}
    assert sorted(full["seed"]) == [2, 2, 3, 3, 4, 4]  # fresh: after every seed the source ran (0, 1)
    assert (full["train_budget_seconds"] == 20).all()
    for cid, part in full.groupby("config_id"):  # the same configuration: its env values, once per seed
        source_id = part["promoted_from"].iloc[0].split(":")[1]
        assert set(part["FAKE_BPB"]) == set(proxy.loc[proxy["config_id"] == source_id, "FAKE_BPB"])
        assert sorted(part["seed"]) == [2, 3, 4], cid

    target = full.sort_values("val_bpb")["config_id"].iloc[0]
    refused = _cli("export", str(tmp_path / "full"), target, "--out", str(tmp_path / "rec"), "--seeds", "4")
    assert refused.returncode == 2 and "3 complete seed(s) (2, 3, 4); --seeds asks for 4" in refused.stderr
    assert not (tmp_path / "rec").exists()
    done = _cli("export", str(tmp_path / "full"), target, "--out", str(tmp_path / "rec"), "--author", "A. Golfer")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = full[full["config_id"] == target].sort_values("seed")
    payload = json.loads((tmp_path / "rec" / "submission.json").read_text())
    assert payload["seeds"] == [2, 3, 4] and payload["author"] == "A. Golfer" and "github_id" not in payload
    assert payload["val_bpb"] == rows["val_bpb"].mean() and payload["val_loss"] == rows["val_loss"].mean()
    assert payload["bytes_total"] == int(rows["artifact_bytes"].max()) == 500 + FAKE.stat().st_size
    assert payload["bytes_code"] == FAKE.stat().st_size
    for _, row in rows.iterrows():
        result = payload["seed_results"][str(row["seed"])]
        assert result == {"val_loss": row["val_loss"], "val_bpb": row["val_bpb"],
                          "artifact_bytes": row["artifact_bytes"], "steps": row["train_steps"],
                          "step_avg_ms": row["step_avg_ms"]}  # fmt: skip
        log = (tmp_path / "rec" / f"train_seed{row['seed']}.log").read_text()
        assert f"val_bpb:{row['val_bpb']:.8f}" in log  # the seed's own log, as the script wrote it
    assert (tmp_path / "rec" / FAKE.name).read_bytes() == FAKE.read_bytes()
    assert "torch==" in (tmp_path / "rec" / "requirements.txt").read_text()
    text = (tmp_path / "rec" / "README.md").read_text()
    assert "## Reproduce" in text and "SEED=2 " in text and "FAKE_BPB=" in text


@pytest.mark.slow
@pytest.mark.ray
def test_a_builtin_configuration_is_promoted_with_its_arms_and_exported_with_its_artifacts(
    corpus_data: Path, tmp_path: Path
) -> None:
    """A routed builtin configuration: its control arms come along to the promoted sweep, and the
    export holds each seed's artifact byte for byte and says it is not a train_gpt.py submission."""
    spec = {"name": "b", "data": str(corpus_data), "storage": str(tmp_path), "space": "shared_vs_unique",
            "overrides": {"n_blocks": 1, "n_passes": 2, "n_prelude": 0, "n_coda": 0, "d_model": 32,
                          "refine_passes": 1},
            "base": {"preset": "tiny", "batch_size": 8, "eval_tokens": 4096, "quick_eval_tokens": 1024,
                     "calibration_tokens": 4096, "signal": "entropy", "bits": 8, "codec": "zlib",
                     "report_every_seconds": 1.0, "checkpoint_every_seconds": 1.0},
            "controls": ["no_refine"], "budget": {"artifact_bytes": 2_000_000, "train_seconds": 1},
            "search": {"algorithm": "grid", "num_samples": 1}, "seeds": 1, "max_concurrent": 2}  # fmt: skip
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    assert _cli("sweep", str(tmp_path / "spec.yaml")).returncode == 0
    proc = _cli("promote", str(tmp_path / "b"), "--top", "1", "--name", "b2", "--seeds", "3",
                "--set", "budget.train_seconds=2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = pd.read_parquet(tmp_path / "b2" / "results" / "trials.parquet")
    assert sorted(zip(full["arm"], full["seed"], strict=True)) == [
        ("no_refine", 1), ("no_refine", 2), ("no_refine", 3), ("routed", 1), ("routed", 2), ("routed", 3)]
    assert full["promoted_from"].nunique() == 1 and (full["status"] == "complete").all()
    routed = full[full["arm"] == "routed"].sort_values("seed")
    done = _cli("export", str(tmp_path / "b2"), routed["config_id"].iloc[0], "--out", str(tmp_path / "rec"))
    assert done.returncode == 0, done.stderr[-3000:]
    for _, row in routed.iterrows():
        exported = (tmp_path / "rec" / f"model_seed{row['seed']}.lgart").read_bytes()
        assert exported == (tmp_path / "b2" / row["artifact_path"]).read_bytes()
    payload = json.loads((tmp_path / "rec" / "submission.json").read_text())
    assert payload["bytes_total"] == int(routed["artifact_bytes"].max()) and payload["seeds"] == [1, 2, 3]
    assert "author" not in payload and "github_id" not in payload  # never invented
    assert "Not a single-file `train_gpt.py` submission" in (tmp_path / "rec" / "README.md").read_text()
