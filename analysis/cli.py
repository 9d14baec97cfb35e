"""`sdd analyze --study RUN_OR_NAME [--out DIR] [--it-threshold 0.99]`.

Wired into `sdd.cli.COMMANDS` as ("analyze", help, configure_parser, command). Importing this module
is cheap: the analysis (pandas, matplotlib, mlflow) loads when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "turn a study's runs into figures, tables and a report (report.md, also logged to the study run)"


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True,
                   help="study run id (or runs:/ID), or a study run name (the newest study run of that name)")
    p.add_argument("--out", default="",
                   help="output folder (default, also for an empty value as MLproject passes it: "
                        "reports/<study name>-<first 8 characters of the run id>/)")
    p.add_argument("--it-threshold", dest="it_threshold", type=float, default=0.99,
                   help="noisy-subset train accuracy that marks the interpolation threshold, along width and "
                        "along pruning levels (default: 0.99)")


def command(args: argparse.Namespace) -> int:
    from analysis.report import analyze_study, default_out_dir
    from analysis.runs import resolve_study
    from sdd.tracking import discard_project_run, get_client

    client = get_client()
    study = resolve_study(client, args.study)
    out_dir = Path(args.out) if args.out else default_out_dir(study)
    report = analyze_study(client, study.info.run_id, out_dir, it_threshold=args.it_threshold)
    # The report is logged to the study run; the run `mlflow run` made for this entry point stays empty.
    discard_project_run(client)
    print(report.resolve())
    return 0
