"""`sdd study [FILE]`: every stage of a study file under one study run, then the study's report.

The stages run as `sdd sweep FILE` runs them (`sdd.sweep.run_sweep`); the analysis then reads the
study back from MLflow and writes figures, tables and report.md (also logged to the study run).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from sdd.study_file import AutoStart, StudyFile
from sdd.sweep import SweepOutcome, add_ray_options, print_outcome, run_sweep

log = logging.getLogger(__name__)

DEFAULT_FILE = "sweeps/mnist1d_quick.yaml"
HELP = "run a whole study (dense width sweep, pruning and distillation chains) and write its report"


@dataclass
class StudyResult:
    sweep: SweepOutcome
    report: Path
    seconds: float


def it_threshold(study: StudyFile) -> float:
    """The noisy-fit threshold the study selected starting widths with, so the report's interpolation
    threshold is the one the chains were chosen around (0.99, the analysis default, otherwise)."""
    for stage in study.stages.values():
        if isinstance(stage.start, AutoStart):
            return stage.start.threshold
    return 0.99


def run_study(path: str | Path, *, address: str | None = None, storage_path: str | None = None,
              out_dir: Path | None = None) -> StudyResult:
    """Run every stage, then the analysis; the report goes to `out_dir` (default reports/<name>-<id8>/)."""
    from analysis.report import analyze_study, default_out_dir
    from sdd import tracking

    started = time.monotonic()
    outcome = run_sweep(path, address=address, storage_path=storage_path)
    client = tracking.get_client(outcome.tracking_uri)
    study_run = client.get_run(outcome.study_run_id)
    log.info("analysis of study run %s", outcome.study_run_id)
    report = analyze_study(client, outcome.study_run_id, out_dir or default_out_dir(study_run),
                           it_threshold=it_threshold(outcome.study))
    seconds = time.monotonic() - started
    client.log_metric(outcome.study_run_id, "wall_time_s", seconds)
    return StudyResult(outcome, report, seconds)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", default=DEFAULT_FILE, type=lambda text: text.strip() or DEFAULT_FILE,
                   help=f"study file (default: {DEFAULT_FILE})")
    add_ray_options(p)
    p.add_argument("--out", type=lambda text: Path(text) if text.strip() else None, default=None,
                   help="report folder (default: reports/<study name>-<first 8 characters of the study run id>/)")


def command(args: argparse.Namespace) -> int:
    result = run_study(args.file, address=args.address, storage_path=args.storage_path, out_dir=args.out)
    print_outcome(result.sweep)
    minutes, seconds = divmod(int(result.seconds), 60)
    print(f"study finished in {minutes}m{seconds:02d}s; report: {result.report.resolve()}")
    print(f"browse the runs: mlflow ui --backend-store-uri {result.sweep.tracking_uri}")
    return 0 if result.sweep.complete else 1
