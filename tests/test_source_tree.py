"""The trial runs where the accelerator is: from the source tree, without the sweep stack.

A GPU machine may have only python3, torch, numpy, sentencepiece, pandas, pyarrow, scipy
and pyyaml. There, `PYTHONPATH=. python3 -m loopgolf data prepare / trial / artifact eval`
must work with no Ray, Optuna or MLflow, and with the zlib and lzma codecs when neither
zstandard nor brotli is installed. The subprocesses below run with a `sitecustomize`
whose import hook makes those packages unimportable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ABSENT = ("ray", "optuna", "mlflow", "zstandard", "brotli")

BLOCKER = f'''
import importlib.abc
import sys

ABSENT = {ABSENT!r}


class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, Absent())
'''


@pytest.fixture
def bare_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python cannot import the sweep stack nor the optional codecs."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER, encoding="utf-8")
    return os.environ | {"PYTHONPATH": f"{site}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"}


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_blocker_makes_the_sweep_stack_unimportable(bare_env: dict[str, str], tmp_path: Path) -> None:
    for name in ABSENT:
        out = run(["-c", f"import {name}"], bare_env, tmp_path)
        assert out.returncode == 1 and "blocked by the test" in out.stderr, name


@pytest.mark.slow
def test_prepare_trial_and_artifact_eval_run_from_the_source_tree_without_the_sweep_stack(
    bare_env: dict[str, str], tmp_path: Path
) -> None:
    cwd = tmp_path / "elsewhere"  # not the repo: the package comes from PYTHONPATH
    cwd.mkdir()
    prepared = run(["-m", "loopgolf", "data", "prepare", "--vocab-size", "512", "--out", "data"], bare_env, cwd)
    assert prepared.returncode == 0, prepared.stderr
    config = cwd / "trial.yaml"
    config.write_text(
        "preset: tiny\nvocab_size: 512\nbatch_size: 4\nmax_steps: 3\ntrain_seconds: 600\neval_tokens: 2048\n"
        "quick_eval_tokens: 512\nrefine_passes: 1\nbits: 6\n",
        encoding="utf-8",
    )
    for codec in ("zlib", "lzma"):
        trial = run(["-m", "loopgolf", "trial", "trial.yaml", "--data", "data", "--out", codec, "--set",
                     f"codec={codec}"], bare_env, cwd)  # fmt: skip
        assert trial.returncode == 0, trial.stderr
        metrics = json.loads(trial.stdout.strip().splitlines()[-1])
        assert metrics["status"] == "complete" and metrics["train_steps"] == 3
        artifact = cwd / metrics["artifact_path"]
        assert artifact.stat().st_size == metrics["model_bytes"]
        again = run(["-m", "loopgolf", "artifact", "eval", str(artifact), "--data", "data"], bare_env, cwd)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout.strip().splitlines()[-1])["val_bpb"] == metrics["val_bpb"]


def test_a_codec_whose_package_is_missing_fails_before_training_in_one_line(
    bare_env: dict[str, str], tmp_path: Path
) -> None:
    prepared = run(["-m", "loopgolf", "data", "prepare", "--vocab-size", "512", "--out", "data"], bare_env, tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    (tmp_path / "trial.yaml").write_text("preset: tiny\nvocab_size: 512\ncodec: zstd\n", encoding="utf-8")
    out = run(["-m", "loopgolf", "trial", "trial.yaml", "--data", "data", "--out", "t"], bare_env, tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "loopgolf: error: CompressConfig.codec='zstd' needs the Python package 'zstandard', "
        "which is not importable here: expected one of the codecs available here ['lzma', 'zlib']"
    )
    assert not (tmp_path / "t" / "model.lgart").exists()


@pytest.mark.slow
def test_the_gpu_benchmark_smoke_run_needs_no_sweep_stack(bare_env: dict[str, str], tmp_path: Path) -> None:
    out = run([str(REPO / "bench" / "bench_gpu.py"), "--smoke"], bare_env, tmp_path)
    assert out.returncode == 0, out.stderr
    rows = {r["config"]: r for r in json.loads(out.stdout.strip().splitlines()[-1])["rows"]}
    assert sorted(rows) == ["middle_loop", "middle_loop_routed", "pg_baseline"]
    assert all(r["steps"] >= 1 and r["tokens_per_second"] > 0 for r in rows.values())
    assert rows["middle_loop"]["train_flops_per_token"] > rows["pg_baseline"]["train_flops_per_token"]
    # Within refine_cap (after two steps an untrained router may select nothing: near-equal scores).
    assert 0 <= rows["middle_loop_routed"]["refine_fraction"] <= 0.5
