"""`loopgolf pareto` and `loopgolf report`: thin layers over loopgolf.analysis.

`add_analysis_parsers(subparsers)` registers both on the `loopgolf` parser; each command
sets `run=` like the others in loopgolf/orchestrator/cli.py, returns an exit status and
raises LoopgolfError (one line, exit 2) on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_OBJECTIVES = "val_bpb:min,artifact_bytes:min"
# identity and shape columns shown beside the objectives
_SHOWN = ("sweep", "trial_id", "config_id", "seed", "d_model", "n_prelude", "n_blocks", "n_passes", "n_coda",
          "refine_passes", "signal", "bits", "codec")


def pareto_command(args: argparse.Namespace) -> int:
    from loopgolf.analysis.pareto import pareto_front, parse_objectives
    from loopgolf.analysis.results import load_results

    objectives = parse_objectives(args.objectives)  # bad spec fails before any file is read
    df = load_results(*args.sweep_dirs)
    front = pareto_front(df, objectives, feasible_only=not args.all)
    columns = [c for c in _SHOWN if c in front and c not in objectives] + list(objectives)
    front = front[columns]
    if args.format == "csv":
        front.to_csv(sys.stdout, index=False)
    elif args.format == "json":
        records = json.loads(front.to_json(orient="records"))  # to_json: NA -> null, numpy -> JSON
        print(json.dumps(records, indent=None))
    else:
        print(front.to_string(index=False) if len(front) else "(no feasible complete trials with these objectives)")
    print(f"{len(front)} non-dominated of {len(df)} trials", file=sys.stderr)
    return 0


def report_command(args: argparse.Namespace) -> int:
    from loopgolf.analysis.report import report

    path = report(args.sweep_dirs, out_dir=args.out)
    print(f"wrote {path}")
    return 0


def add_analysis_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add `pareto` and `report` to the `loopgolf` sub-command parsers."""
    pareto = subparsers.add_parser("pareto", help="the Pareto front of one or many sweeps")
    pareto.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR", help="sweep directories (globs allowed)")
    pareto.add_argument(
        "--objectives", default=DEFAULT_OBJECTIVES, metavar="COL:min|max,...",
        help=f"columns and directions (default: {DEFAULT_OBJECTIVES})",
    )
    pareto.add_argument("--format", choices=("table", "csv", "json"), default="table")
    pareto.add_argument("--all", action="store_true", help="let infeasible and unfinished trials compete too")
    pareto.set_defaults(run=pareto_command)

    rep = subparsers.add_parser("report", help="write the hypothesis report (Markdown + PNG plots)")
    rep.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR", help="sweep directories (globs allowed)")
    rep.add_argument("--out", metavar="DIR", help="output directory (default: FIRST_SWEEP_DIR/report)")
    rep.set_defaults(run=report_command)
