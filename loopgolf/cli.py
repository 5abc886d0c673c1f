"""The `loopgolf` command: a thin layer over the Python API.

Every sub-command is defined here, in `build_parser`; each is run by a `_cmd_<command>`
function (`_cmd_<command>_<action>` for the two-level `data prepare` and `artifact
eval`) that parses nothing itself, calls the API and prints. Errors about input
(LoopgolfError) become one line on stderr and exit status 2. tests/test_cli.py freezes
the surface (sub-commands, flags, defaults), so a change to it is deliberate.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loopgolf.errors import LoopgolfError

DEFAULT_OBJECTIVES = "val_bpb:min,artifact_bytes:min"
# identity and shape columns `pareto` shows beside the objectives
PARETO_COLUMNS = ("sweep", "trial_id", "config_id", "seed", "d_model", "n_prelude", "n_blocks", "n_passes", "n_coda",
                  "refine_passes", "signal", "bits", "codec")  # fmt: skip


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from loopgolf.trial.prepare import PrepareConfig, prepare

    config = PrepareConfig(
        out_dir=Path(args.out),
        text_files=tuple(Path(p) for p in args.text or ()),
        tokenizer=Path(args.tokenizer) if args.tokenizer else None,
        vocab_size=args.vocab_size,
        byte_fallback=not args.no_byte_fallback,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        overwrite=args.overwrite,
    )
    source = ", ".join(args.text) if args.text else "the built-in corpus (Python's pydoc topics)"
    print(f"preparing {config.out_dir} from {source}", file=sys.stderr)
    manifest = prepare(config)
    for split in ("train", "val"):
        s = manifest["splits"][split]
        print(
            f"{split:5s}: {s['documents']:6d} docs  {s['tokens']:10,d} tokens  {s['bytes']:11,d} bytes  "
            f"({s['bytes'] / max(1, s['tokens']):.3f} bytes/token, {len(s['shards'])} shard(s))"
        )
    print(f"wrote {config.out_dir}/manifest.json")
    return 0


def _print_progress(metrics: dict, state: dict | None) -> None:
    print(
        f"  step {metrics['step']:6d}  {metrics['elapsed_seconds']:7.1f}s  loss {metrics['train_loss']:.4f}  "
        f"quick val_bpb {metrics['quick_val_bpb']:.4f}  refined {metrics['refine_fraction']:.2f}",
        file=sys.stderr,
    )


def _cmd_trial(args: argparse.Namespace) -> int:
    from loopgolf.trial.config import load_trial_config
    from loopgolf.trial.train import run_trial

    config = load_trial_config(args.config, args.set or ())
    out = Path(args.out) if args.out else Path("runs") / "trials" / Path(args.config).stem
    print(f"trial {args.config} -> {out} ({config.train.train_seconds:g} s of training)", file=sys.stderr)
    metrics = run_trial(config, args.data, out, reporter=_print_progress)
    print(f"status      {metrics['status']}" + (f" ({metrics['error']})" if metrics.get("error") else ""))
    if metrics["status"] == "complete":
        print(f"val_bpb     {metrics['val_bpb']:.4f} from the artifact (prequant {metrics['val_bpb_prequant']:.4f})")
        print(f"artifact    {metrics['artifact_bytes']:,} bytes (model {metrics['model_bytes']:,} + code "
              f"{metrics['code_bytes']:,}); cap {metrics['max_artifact_bytes']:,}; feasible {metrics['feasible']}")
        print(f"training    {metrics['train_steps']} steps, {metrics['train_tokens']:,} tokens in "
              f"{metrics['train_seconds']:.1f} s ({metrics['tokens_per_second']:,.0f} tokens/s, {metrics['device']})")
    print_json_line(metrics)
    return 0 if metrics["status"] != "failed" else 1


def _cmd_artifact_eval(args: argparse.Namespace) -> int:
    from loopgolf.trial.evaluate import evaluate_artifact

    metrics = evaluate_artifact(args.artifact, args.data, eval_tokens=args.eval_tokens, device=args.device)
    scored, nbytes = metrics["eval_tokens_scored"], metrics["eval_bytes"]
    print(f"val_bpb {metrics['val_bpb']:.6f} over {scored:,} tokens ({nbytes:,} bytes)")
    print_json_line(metrics)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from loopgolf.orchestrator.spec_file import load_spec
    from loopgolf.orchestrator.sweep import run_sweep

    spec = load_spec(args.spec, args.set or (), storage=args.storage, name=args.name, data=args.data)
    controls = spec.control_arms()
    arms = f" (each routed one with its arms: {', '.join(controls)})" if controls else ""
    print(f"sweep {spec.name}: {spec.num_samples} configurations{arms} x {spec.seeds} seed(s), space {spec.space!r}, "
          f"{spec.train_seconds:g} s per trial -> {spec.sweep_dir}", file=sys.stderr)
    outcome = run_sweep(spec, address=args.address)
    return _summarize(outcome, spec.objectives)


def _cmd_resume(args: argparse.Namespace) -> int:
    from loopgolf.orchestrator.sweep import resume_sweep
    from loopgolf.orchestrator.sweepdir import read_sweep_spec

    outcome = resume_sweep(args.sweep_dir, address=args.address, sets=args.set or ())
    return _summarize(outcome, read_sweep_spec(args.sweep_dir).objectives)


def _cmd_promote(args: argparse.Namespace) -> int:
    from loopgolf.analysis.pareto import choose_configurations
    from loopgolf.orchestrator.promote import check_new, describe, promoted_spec, source_trials
    from loopgolf.orchestrator.sweep import run_sweep
    from loopgolf.orchestrator.sweepdir import read_sweep_spec

    source_dir = Path(args.sweep_dir).resolve()
    source = read_sweep_spec(source_dir)
    trials = source_trials(source_dir)
    chosen = choose_configurations(trials, dict(source.objectives), top=args.top, front=args.front)
    spec = promoted_spec(source_dir, trials, chosen, args.name, args.seeds, args.set or ())
    check_new(spec, source_dir)
    print(describe(spec), file=sys.stderr)
    return _summarize(run_sweep(spec, address=args.address), spec.objectives)


def _cmd_export(args: argparse.Namespace) -> int:
    from loopgolf.orchestrator.export import export_record

    record = _record_markdown(args.sweep_dir, args.config_id, args.reference) if args.reference else ""
    out = export_record(args.sweep_dir, args.config_id, args.out, seeds=args.seeds, name=args.title,
                        blurb=args.blurb or "", author=args.author, github_id=args.github_id,
                        record_test=record)  # fmt: skip
    print(f"wrote {out}")
    return 0


def _record_markdown(sweep_dir: str, config_id: str, reference: str) -> str:
    """The record test's row of one configuration, as the export README shows it."""
    from loopgolf.analysis.record import parse_reference, record_test
    from loopgolf.analysis.report import md_table
    from loopgolf.analysis.results import load_results

    df = load_results(sweep_dir)
    answer = record_test(df, parse_reference(reference, df))
    table = answer.table
    if "config_id" in table:
        table = table[table["config_id"].astype(str).str.startswith(config_id[:10])]
    return "\n\n".join(part for part in (answer.method, md_table(table, 50) if len(table) else "", answer.verdict)
                       if part)


def _summarize(outcome: Any, objectives: dict) -> int:
    """The end of a sweep: status, the Pareto front, the report; the last line counts errors.

    Exit status (sweep.SweepOutcome): 0 every trial ran and none raised (a diverged trial is
    an outcome, not an error); 1 some trial raised; 3 the searcher failed (finished trials
    are recorded; `resume` continues). Bad input, or a sweep held by another driver: 2.
    """
    from loopgolf.analysis.pareto import pareto_front
    from loopgolf.analysis.report import report
    from loopgolf.analysis.results import load_results
    from loopgolf.orchestrator.progress import print_status, read_status

    sweep_dir = outcome.sweep_dir
    print_status(read_status(sweep_dir))
    front_objectives = dict(objectives) if len(objectives) > 1 else {**objectives, "artifact_bytes": "min"}
    front = pareto_front(load_results(sweep_dir), front_objectives)
    shape = [c for c in front if str(c).isupper()] or ["n_blocks", "n_passes", "d_model", "refine_passes", "signal"]
    columns = ["trial_id", *front_objectives, *shape, "seed"]  # a script sweep's shape: its env columns
    print("\nPareto front (" + ", ".join(f"{k}:{v}" for k, v in front_objectives.items()) + "):")
    print(front[[c for c in columns if c in front]].to_string(index=False) if len(front) else "  (no feasible trial)")
    path = report([sweep_dir])
    print(f"\nresults: {sweep_dir}/results/trials.parquet\nreport:  {path}")
    if (path.parent / "pareto_bytes.png").is_file():
        print(f"plot:    {path.parent / 'pareto_bytes.png'}")
    print(outcome.last_line())
    return int(outcome.exit_status)


def _cmd_status(args: argparse.Namespace) -> int:
    from loopgolf.orchestrator.progress import as_dict, print_status, read_counts, read_status, render, watch

    if args.watch:
        watch(lambda: read_counts(args.sweep_dir), args.interval)
        return 0
    status = read_status(args.sweep_dir)
    print_status(status)
    print(render(status.counts))
    print_json_line(as_dict(status))
    return 0


def _cmd_pareto(args: argparse.Namespace) -> int:
    from loopgolf.analysis.pareto import pareto_front, parse_objectives
    from loopgolf.analysis.results import load_results

    objectives = parse_objectives(args.objectives)  # bad spec fails before any file is read
    df = load_results(*args.sweep_dirs)
    front = pareto_front(df, objectives, feasible_only=not args.all)
    env = [c for c in front if str(c).isupper()]  # a script sweep's configuration: its environment variables
    shown = [c for c in (*PARETO_COLUMNS, *env) if c in front and c not in objectives]
    shown = [c for c in shown if not len(front) or front[c].notna().any()]  # a script's rows have no d_model, ...
    front = front[shown + list(objectives)]
    if args.format == "csv":
        front.to_csv(sys.stdout, index=False)
    elif args.format == "json":
        print(json.dumps(json.loads(front.to_json(orient="records"))))  # to_json: NA -> null, numpy -> JSON
    else:
        print(front.to_string(index=False) if len(front) else "(no feasible complete trials with these objectives)")
    print(f"{len(front)} non-dominated of {len(df)} trials", file=sys.stderr)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from loopgolf.analysis.report import report

    path = report(args.sweep_dirs, out_dir=args.out, reference=args.reference)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopgolf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    # `sub` is argparse's sub-parsers action, typed Any below: its class is private to argparse
    _add_trial_commands(sub)
    _add_sweep_commands(sub)
    _add_analysis_commands(sub)
    return parser


def _add_trial_commands(sub: Any) -> None:
    """`data prepare`, `trial`, `artifact eval`: one configuration, no Ray."""
    data = sub.add_parser("data", help="prepare challenge-format shards").add_subparsers(dest="action", required=True)
    prep = data.add_parser("prepare", help="tokenize text into shards + manifest.json")
    prep.add_argument("--text", nargs="+", metavar="FILE", help="text files (default: a built-in English corpus)")
    tok = prep.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="MODEL", help="a SentencePiece .model file")
    tok.add_argument("--vocab-size", type=int, metavar="N", help="train a SentencePiece BPE of N pieces")
    prep.add_argument("--no-byte-fallback", action="store_true",
                      help="with --vocab-size: unseen characters become unknown pieces (0 bytes) instead of bytes")
    prep.add_argument("--out", required=True, metavar="DIR")
    prep.add_argument("--val-fraction", type=float, default=0.1, metavar="F")
    prep.add_argument("--shard-tokens", type=int, default=100_000_000, metavar="N")
    prep.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    prep.set_defaults(run=_cmd_data_prepare)

    trial = sub.add_parser("trial", help="train, compress and evaluate one configuration (no Ray)")
    trial.add_argument("config", metavar="CONFIG.yaml")
    trial.add_argument("--data", required=True, metavar="DIR", help="a prepared data directory")
    trial.add_argument("--out", metavar="DIR", help="where the artifact and metrics.json go")
    trial.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    trial.set_defaults(run=_cmd_trial)

    artifact = sub.add_parser("artifact", help="work with artifact files").add_subparsers(dest="action", required=True)
    art_eval = artifact.add_parser("eval", help="bits per byte from the artifact file alone")
    art_eval.add_argument("artifact", metavar="ARTIFACT")
    art_eval.add_argument("--data", required=True, metavar="DIR")
    art_eval.add_argument("--eval-tokens", type=int, metavar="N", help="default: the trial's own eval_tokens")
    art_eval.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    art_eval.set_defaults(run=_cmd_artifact_eval)


def _add_sweep_commands(sub: Any) -> None:
    """`sweep`, `resume`, `status`: Ray Tune + Optuna (status reads the directory alone)."""
    sweep = sub.add_parser("sweep", help="run a sweep (Ray Tune + Optuna) from a YAML spec")
    sweep.add_argument("spec", metavar="SPEC.yaml")
    sweep.add_argument("--address", metavar="ADDR", help="a Ray cluster (default: start a local Ray)")
    sweep.add_argument("--storage", metavar="DIR", help="override the spec's storage")
    sweep.add_argument("--name", help="override the spec's name")
    sweep.add_argument("--data", metavar="DIR", help="override the spec's data dir")
    sweep.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a spec field (dotted keys)")
    sweep.set_defaults(run=_cmd_sweep)

    resume = sub.add_parser("resume", help="continue an interrupted sweep")
    resume.add_argument("sweep_dir", metavar="SWEEP_DIR")
    resume.add_argument("--address", metavar="ADDR")
    extend = "extend the sweep: search.num_samples=N, max_concurrent, or narrow a range (overrides.F={low, high})"
    resume.add_argument("--set", action="append", metavar="KEY=VALUE", help=extend)
    resume.set_defaults(run=_cmd_resume)

    promote = sub.add_parser("promote", help="re-run a sweep's best configurations at a higher fidelity, fresh seeds")
    promote.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the source sweep (read, never written)")
    choice = promote.add_mutually_exclusive_group()  # one of them: choose_configurations says so in one line
    choice.add_argument("--top", type=int, metavar="K", help="the K best configurations by their mean over seeds")
    choice.add_argument("--front", action="store_true", help="the feasible Pareto front of the configurations' means")
    promote.add_argument("--name", required=True, help="the new sweep's name (beside the source unless --set storage)")
    promote.add_argument("--seeds", type=int, default=3, metavar="N", help="fresh seeds per configuration (default 3)")
    promote.add_argument("--set", action="append", metavar="KEY=VALUE",
                         help="a fidelity field: budget.train_seconds, base.max_steps, resources.gpu, data, ...")
    promote.add_argument("--address", metavar="ADDR")
    promote.set_defaults(run=_cmd_promote)

    export = sub.add_parser("export", help="a configuration's trials as a record folder (submission.json, logs)")
    export.add_argument("sweep_dir", metavar="SWEEP_DIR")
    export.add_argument("config_id", metavar="CONFIG_ID", help="a config_id of the sweep (a unique prefix will do)")
    export.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) directory")
    export.add_argument("--seeds", type=int, default=3, metavar="N", help="refuse fewer complete seeds (default 3)")
    export.add_argument("--reference", metavar="REF", help="the record test against val_bpb=X, a config_id or a sweep")
    export.add_argument("--title", metavar="NAME", help="submission.json's name (default: sweep and config_id)")
    export.add_argument("--blurb", metavar="TEXT")
    export.add_argument("--author", metavar="NAME", help="written to submission.json only when given")
    export.add_argument("--github-id", metavar="ID", help="written to submission.json only when given")
    export.set_defaults(run=_cmd_export)

    status = sub.add_parser("status", help="progress of a sweep and of its running trials, without Ray")
    status.add_argument("sweep_dir", metavar="SWEEP_DIR")
    status.add_argument("--watch", action="store_true", help="redraw until the sweep has finished (Ctrl-C stops)")
    status.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help="--watch's refresh period")
    status.set_defaults(run=_cmd_status)


def _add_analysis_commands(sub: Any) -> None:
    """`pareto`, `report`: read the results' Parquet files."""
    pareto = sub.add_parser("pareto", help="the Pareto front of one or many sweeps")
    pareto.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR", help="sweep directories (globs allowed)")
    pareto.add_argument("--objectives", default=DEFAULT_OBJECTIVES, metavar="COL:min|max,...",
                        help=f"columns and directions (default: {DEFAULT_OBJECTIVES})")
    pareto.add_argument("--format", choices=("table", "csv", "json"), default="table")
    pareto.add_argument("--all", action="store_true", help="let infeasible and unfinished trials compete too")
    pareto.set_defaults(run=_cmd_pareto)

    report = sub.add_parser("report", help="write the hypothesis report (Markdown + PNG plots)")
    report.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR", help="sweep directories (globs allowed)")
    report.add_argument("--out", metavar="DIR", help="output directory (default: FIRST_SWEEP_DIR/report)")
    report.add_argument("--reference", metavar="REF", help="add the record test: val_bpb=X, val_loss=X, a config_id "
                        "or a sweep name")  # fmt: skip
    report.set_defaults(run=_cmd_report)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except LoopgolfError as exc:
        print(f"loopgolf: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loopgolf: interrupted", file=sys.stderr)
        return 130


def print_json_line(payload: dict) -> None:
    """The machine-readable last line of a command's standard output."""
    print(json.dumps(payload, sort_keys=True, default=str))


if __name__ == "__main__":
    sys.exit(main())
