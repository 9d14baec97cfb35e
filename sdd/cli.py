"""The `sdd` command line. The only module that reads argv.

Options of the step commands are derived from the config dataclasses in `sdd.config`, so a new
config field is a new option everywhere (CLI, MLproject parameter, MLflow param, config hash).
Exit status: 0 done, 2 bad input (one line on stderr, nothing logged), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdd import config
from sdd.errors import UsageError
from sdd.steps import STEP_OF_STAGE, STEPS, Step
from sdd.sweep.presets import DEFAULT as DEFAULT_FILE

if TYPE_CHECKING:
    from sdd.sweep.run import SweepOutcome

log = logging.getLogger("sdd")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit; we want one line and status 2
        raise UsageError(f"{self.prog}: {message}")


def _argtype(tp: Any) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return config.parse_value(tp, text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse


def add_config_options(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """One `--flag` per (nested) field of `cls`; values absent from the command line keep the default."""
    for name, (f, tp) in config.flat_fields(cls).items():
        if name in skip:
            continue
        _, inner = config.is_optional(tp)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "type": _argtype(tp),
                                  # argparse formats help with %: a literal one in a config's text must not be read as a code.
                                  "help": f"{f.metadata['help']} (default: {_show(f.default)})".replace("%", "%%")}
        if inner is bool:
            kwargs.update(nargs="?", const=True)
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
            kwargs["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


def config_from_args(cls: type, args: argparse.Namespace, skip: Sequence[str] = ()) -> Any:
    values = {k: v for k, v in vars(args).items() if k not in ("command", "func", "verbose", *skip)}
    return config.from_flat_dict(cls, values)


# MLproject entry points pass every parameter, an unset one as "": it means the option's default.

def _text_or_none(text: str) -> str | None:
    return text.strip() or None


def _number_or_none(text: str) -> float | None:
    value = _text_or_none(text)
    try:
        return None if value is None else float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _choice_or_none(choices: tuple[str, ...]) -> Callable[[str], str | None]:
    def parse(text: str) -> str | None:
        value = _text_or_none(text)
        if value is not None and value not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {text!r}")
        return value
    return parse


def _flag(text: str) -> bool:
    try:
        return bool(config.parse_value(bool, text or "false"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


@dataclass(frozen=True)
class Command:
    """A subcommand: its help line, the options it adds to its parser, and what it runs."""

    help: str
    configure_parser: Callable[[argparse.ArgumentParser], None]
    command: Callable[[argparse.Namespace], int]


# --- step commands ----------------------------------------------------------------------------------

# A step command checks its config before its run function imports torch and mlflow (seconds), so
# bad input is answered at once.

def _step_command(step: Step) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        cfg = config_from_args(step.config_class, args, skip=("experiment",))
        cfg.validate()
        result = step.run(cfg, experiment=getattr(args, "experiment", None))
        _report(result.run_id, result.reused, result.metrics)
        return 0
    return command


def _report(run_id: str, reused: bool, metrics: dict[str, float]) -> None:
    keys = [k for k in ("test_acc", "val_acc", "train_acc_noisy", "sparsity") if k in metrics]
    summary = ", ".join(f"{k} {metrics[k]:.4f}" for k in keys)
    state = "reused finished run" if reused else "run"
    print(f"{state} {run_id}: {summary}")
    print(f"browse it: {_run_link(run_id)}")


def _run_link(run_id: str, uri: str | None = None) -> str:
    from sdd import tracking

    uri = uri or tracking.tracking_uri()
    return tracking.ui_link(uri, tracking.get_client(uri).get_run(run_id).info.experiment_id, run_id)


# --- sweep and study -------------------------------------------------------------------------------

def add_ray_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", type=_text_or_none, default=None,
                   help="Ray cluster: auto, host:port (GCS) or ray://host:port (default: $RAY_ADDRESS, else a "
                        "new local Ray)")
    p.add_argument("--storage-path", type=_text_or_none, default=None,
                   help="Ray Tune storage (shared folder or s3:// on multi-node clusters; overrides the file's "
                        "storage_path; default: ~/ray_results)")


def _configure_sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="study file: a path, or a preset's name (see `sdd presets`), e.g. mnist1d_quick")
    stages = tuple(STEP_OF_STAGE)
    p.add_argument("--stage", type=_choice_or_none(stages), default=None, metavar="{" + ",".join(stages) + "}",
                   help="run only this stage, inside the file's most recent study run (default: every stage)")
    add_ray_options(p)
    p.add_argument("--dry-run", nargs="?", const=True, default=False, type=_flag, metavar="true|false",
                   help="print every trial with its resources and whether a finished run covers it; run nothing")


def _sweep_command(args: argparse.Namespace) -> int:
    from sdd.sweep.run import dry_run, run_sweep

    if args.dry_run:
        for line in dry_run(args.file, stage=args.stage):
            print(line)
        if os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run`: a dry run leaves nothing behind
            from sdd.tracking import discard_project_run

            discard_project_run()
        return 0
    outcome = run_sweep(args.file, stage=args.stage, address=args.address, storage_path=args.storage_path)
    print_outcome(outcome)
    print(f"browse the study: {_run_link(outcome.study_run_id, outcome.tracking_uri)}")
    return 0 if outcome.complete else 1


def print_outcome(outcome: SweepOutcome) -> None:
    for stage in outcome.stages:
        if stage.not_run:
            print(f"{stage.stage}: not run: {stage.not_run} (stage run {stage.run_id})")
            continue
        finished = sum(r["status"] == "FINISHED" for r in stage.records)
        print(f"{stage.stage}: {finished}/{len(stage.records)} trials finished, {stage.failed} failed "
              f"({stage.seconds:.0f}s), stage run {stage.run_id}")
    print(f"study run {outcome.study_run_id} ({outcome.study.name})")


def _configure_study(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", default=DEFAULT_FILE, type=lambda text: text.strip() or DEFAULT_FILE,
                   help=f"study file (default: {DEFAULT_FILE})")
    add_ray_options(p)
    p.add_argument("--out", type=lambda text: Path(text) if text.strip() else None, default=None,
                   help="report folder (default: reports/<study name>-<first 8 characters of the study run id>/)")


def _study_command(args: argparse.Namespace) -> int:
    from sdd.sweep.run import run_study

    result = run_study(args.file, address=args.address, storage_path=args.storage_path, out_dir=args.out)
    print_outcome(result.sweep)
    minutes, seconds = divmod(int(result.seconds), 60)
    print(f"study finished in {minutes}m{seconds:02d}s; report: {result.report.resolve()}")
    print(f"browse the study: {_run_link(result.sweep.study_run_id, result.sweep.tracking_uri)} "
          f"(its artifacts report/report.html and report/report.md hold the report)")
    return 0 if result.sweep.complete else 1


SWEEP = Command("run a study file's stages as Ray Tune grids (dense widths, pruning and distillation chains)",
                _configure_sweep, _sweep_command)
STUDY = Command("run a whole study (dense width sweep, pruning and distillation chains) and write its report",
                _configure_study, _study_command)


def _configure_presets(p: argparse.ArgumentParser) -> None:
    pass


def _presets_command(args: argparse.Namespace) -> int:
    from sdd.sweep import presets

    for preset in presets.available():
        print(f"{preset.name:24} {preset.description}\n{'':24} cost: {preset.cost}")
    return 0


PRESETS = Command("list the shipped study files (usable by name: sdd study mnist1d_quick)", _configure_presets,
                  _presets_command)


# --- analyze and bench ------------------------------------------------------------------------------

def _configure_analyze(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True,
                   help="study run id (or runs:/ID), or a study run name (the newest study run of that name)")
    p.add_argument("--out", default="",
                   help="output folder (default, also for an empty value as MLproject passes it: "
                        "reports/<study name>-<first 8 characters of the run id>/)")
    p.add_argument("--it-threshold", dest="it_threshold", type=_number_or_none, default=None,
                   help="noisy-subset train accuracy that marks the interpolation threshold, along width and "
                        "along pruning levels (default, also for an empty value: the study's own, recorded on "
                        "its runs by start selection and the chains, else 0.95)")


def _analyze_command(args: argparse.Namespace) -> int:
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


def _configure_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="smaller workloads and fewer repeats (a few minutes on "
                                                        "2 cores)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the test suite's size
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="also write the figures as JSON to PATH; without PATH, print JSON instead of the table")
    p.add_argument("--loader-workers", type=int, default=0, metavar="N",
                   help="DataLoader workers of the baseline (default 0: on a 2-core machine workers compete "
                        "with the training threads)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch threads of both sides (default 1: figures per core; on a shared machine more "
                        "threads measure OpenMP waiting for descheduled threads more than the work)")


def _bench_command(args: argparse.Namespace) -> int:
    if args.loader_workers < 0:
        raise UsageError(f"--loader-workers must be >= 0, got {args.loader_workers}")
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    # The benchmark is no part of the library: only this command imports it.
    from sdd.bench.report import format_table
    from sdd.bench.suite import run

    report = run("tiny" if args.tiny else "quick" if args.quick else "full", workers=args.loader_workers,
                 threads=args.threads)
    text = json.dumps(report.as_json(), indent=1)
    if args.json == "-":
        print(text)
        return 0
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(format_table(report))
    return 0


ANALYZE = Command("turn a study's runs into figures, tables and a report (report.md, also logged to the study run)",
                  _configure_analyze, _analyze_command)
BENCH = Command("time the project's fast paths against a plain PyTorch loop doing the same work (ratios)",
                _configure_bench, _bench_command)


def _reap_command(args: argparse.Namespace) -> int:
    from sdd.tracking import _reap

    _reap(args.uri, args.run_id)
    return 0


# --- the parser -------------------------------------------------------------------------------------

COMMANDS: dict[str, Command] = {
    **{name: Command(step.help, lambda p, cls=step.config_class: add_config_options(p, cls), _step_command(step))
       for name, step in STEPS.items()},
    "sweep": SWEEP,
    "study": STUDY,
    "analyze": ANALYZE,
    "bench": BENCH,
    "presets": PRESETS,
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdd", description="Sparse double descent studies, tracked in MLflow.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # The metavar lists the commands a user may give; `_reap` is left out of it and of the help.
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                metavar="{" + ",".join(COMMANDS) + "}")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if name == "train":
            p.add_argument("--experiment", default=None,
                           help="MLflow experiment name (default: $MLFLOW_EXPERIMENT_NAME or 'sdd')")
        cmd.configure_parser(p)
        p.set_defaults(func=cmd.command)
    # The detached reaper `tracking.discard_project_run` spawns (`python -m sdd _reap URI RUN_ID`).
    reap = sub.add_parser("_reap")
    reap.add_argument("uri")
    reap.add_argument("run_id")
    reap.set_defaults(func=_reap_command)
    return parser


def setup_logging(verbose: bool) -> None:
    # MLflow draws a progress bar on stderr for every artifact download once tqdm is installed: a
    # step downloads several checkpoints, and a bad-input error must stay one line.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # MLflow warns on every pickle-format save and alembic chatters on every new store.
    for noisy in ("mlflow", "mlflow.pytorch", "mlflow.store.db.utils", "alembic", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="mlflow")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        setup_logging(args.verbose)
        return args.func(args)
    except UsageError as err:
        print(f"sdd: error: {err}", file=sys.stderr)
        if os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run`: its run must not stay behind, empty
            from sdd.tracking import discard_project_run

            discard_project_run()
        return 2
    except KeyboardInterrupt:
        print("sdd: interrupted", file=sys.stderr)
        return 1
    except Exception as err:
        log.exception("failed: %s: %s", type(err).__name__, err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
