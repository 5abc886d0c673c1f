"""A trial's speed on one accelerator: the challenge's baseline, a middle loop, and routing.

Run on the GPU machine, from the source tree (needs python3, torch with CUDA, numpy,
sentencepiece, pyyaml; no Ray, Optuna, MLflow, zstandard or brotli):

    PYTHONPATH=. python3 bench/bench_gpu.py [--seconds 60] [--no-compile]
    PYTHONPATH=. python3 bench/bench_gpu.py --smoke          # tiny shapes, seconds, any device

It prepares data from the built-in corpus (1024-piece tokenizer), then trains each
configuration with a real `run_trial` (training clock, artifact, evaluation from it):

- pg_baseline: the challenge's shape and recipe at its 524,288-token step
  (512 x 1024), in micro-batches of 64 sequences (the challenge's per-GPU micro batch);
- middle_loop: the same width, 3 prelude + 3 core blocks x 3 passes + 3 coda;
- middle_loop_routed: that, plus one refinement pass on the 25% most uncertain tokens.

Per configuration it prints tokens/s, ms/step, model FLOP utilisation (3 x analytic
forward FLOPs per token x tokens/s, against 790 TFLOP/s: the H200's measured bf16
matmul rate), peak memory, start-up seconds (compiling and priming, off the training
clock), and the number of graphs torch.compile captured; then the looped shape's step
time relative to its FLOP ratio to the baseline. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from loopgolf.trial.config import TrialConfig, preset
from loopgolf.trial.flops import flops_per_token
from loopgolf.trial.prepare import PrepareConfig, prepare
from loopgolf.trial.train import run_trial

PEAK_FLOPS = 790e12  # bf16 dense matmul on one H200, as measured on these machines
MIDDLE_LOOP = {"n_prelude": 3, "n_blocks": 3, "n_passes": 3, "n_coda": 3}
ROUTED = {"refine_passes": 1, "signal": "entropy", "refine_target": 0.25, "refine_cap": 0.5}


def configurations(smoke: bool, seconds: float, compile_: bool | None) -> dict[str, TrialConfig]:
    """The three configurations, at the challenge's scale or (smoke) at a CPU's."""
    common: dict[str, Any] = {
        "train_seconds": seconds, "eval_tokens": 65_536, "codec": "zlib",
        "report_every_seconds": 1e9, "checkpoint_every_seconds": 1e9,
    }  # fmt: skip
    if compile_ is not None:
        common["compile"] = compile_
    base = preset("pg_baseline").replace(batch_size=512, micro_batch_size=64, **common)
    if smoke:
        base = base.replace(d_model=64, n_heads=2, n_kv_heads=1, seq_len=128, batch_size=8, micro_batch_size=4,
                            eval_tokens=4096)  # fmt: skip
    loop = base.replace(**MIDDLE_LOOP)
    return {"pg_baseline": base, "middle_loop": loop, "middle_loop_routed": loop.replace(**ROUTED)}


def graph_count() -> int:
    """Graphs torch.compile (dynamo) captured so far in this process."""
    from torch._dynamo.utils import counters  # no public equivalent in torch 2.11-2.13

    return int(counters["stats"]["unique_graphs"])


def measure(name: str, config: TrialConfig, data: Path, out: Path) -> dict[str, Any]:
    """One real trial; its throughput, utilisation, memory and compile figures."""
    cuda = torch.cuda.is_available()
    torch._dynamo.reset()  # each configuration compiles from scratch
    graphs_before = graph_count()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    m = run_trial(config, data, out / name)
    if m["status"] != "complete":
        raise RuntimeError(f"{name}: trial {m['status']}: {m.get('error')}")
    tokens_per_second = m["train_tokens"] / m["train_seconds"]
    fraction = m["train_refine_fraction"]  # the last step's; the target is 0.25
    flops = 3 * flops_per_token(config.model, fraction)
    return {
        "config": name,
        "device": m["device"],
        "params": m["params"],
        "steps": m["train_steps"],
        "tokens_per_second": tokens_per_second,
        "ms_per_step": 1000 * m["train_seconds"] / m["train_steps"],
        "train_flops_per_token": flops,
        "mfu": flops * tokens_per_second / PEAK_FLOPS,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "startup_seconds": m["startup_seconds"],
        "graphs": graph_count() - graphs_before,
        "refine_fraction": fraction,
        "val_bpb": m["val_bpb"],
        "artifact_bytes": m["artifact_bytes"],
    }


def print_row(r: dict[str, Any]) -> None:
    print(
        f"{r['config']:20s} {r['tokens_per_second']:12,.0f} tok/s  {r['ms_per_step']:8.1f} ms/step  "
        f"MFU {100 * r['mfu']:5.1f}%  peak {r['peak_memory_gib']:6.1f} GiB  start-up {r['startup_seconds']:6.1f} s  "
        f"graphs {r['graphs']:2d}  steps {r['steps']:5d}  refined {r['refine_fraction']:.2f}  "
        f"val_bpb {r['val_bpb']:.4f}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="training seconds per configuration")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and a few seconds (checks the script)")
    parser.add_argument("--compile", dest="compile_", action=argparse.BooleanOptionalAction, default=None,
                        help="force torch.compile on or off (default: the trial's, on with CUDA)")  # fmt: skip
    parser.add_argument("--only", nargs="+", metavar="NAME", help="a subset of the configurations")
    args = parser.parse_args()
    seconds = min(args.seconds, 3.0) if args.smoke else args.seconds
    start = time.perf_counter()
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"torch {torch.__version__} on {name}; load average {os.getloadavg()[0]:.2f}", flush=True)
    configs = configurations(args.smoke, seconds, args.compile_)
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only}
    rows, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare(PrepareConfig(out_dir=data, vocab_size=512 if args.smoke else 1024))
        print(f"data prepared in {time.perf_counter() - start:.1f} s", flush=True)
        for config_name, config in configs.items():
            try:
                rows.append(measure(config_name, config, data, Path(tmp)))
            except Exception as exc:  # report, and still measure the others: a GPU run is scarce
                failures.append(f"{config_name}: {type(exc).__name__}: {exc}")
                print(f"{config_name:20s} FAILED {failures[-1]}", flush=True)
                continue
            print_row(rows[-1])
    by_name = {r["config"]: r for r in rows}
    if "pg_baseline" in by_name and "middle_loop" in by_name:
        base, loop = by_name["pg_baseline"], by_name["middle_loop"]
        time_ratio = loop["ms_per_step"] / base["ms_per_step"]
        flop_ratio = loop["train_flops_per_token"] / base["train_flops_per_token"]
        print(f"middle_loop / pg_baseline: step time x{time_ratio:.3f}, FLOPs x{flop_ratio:.3f} "
              f"(time within {100 * (time_ratio / flop_ratio - 1):+.1f}% of the FLOP ratio)")  # fmt: skip
    print(f"total {time.perf_counter() - start:.1f} s; load average {os.getloadavg()[0]:.2f}")
    print(json.dumps({"rows": rows, "failures": failures}, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
