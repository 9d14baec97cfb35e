"""The `sdd` command line. The only module that reads argv.

Options of the step commands are derived from the config dataclasses in `sdd.config`, so a new
config field is a new option everywhere (CLI, MLproject parameter, MLflow param, config hash).
Exit status: 0 done, 2 bad input (one line on stderr, nothing logged), 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from analysis import cli as analysis_cli
from sdd import bench, study, sweep
from sdd import config as C
from sdd.errors import UsageError

log = logging.getLogger("sdd")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit; we want one line and status 2
        raise UsageError(f"{self.prog}: {message}")


def _argtype(tp: Any) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return C.parse_value(tp, text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse


def add_config_options(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """One `--flag` per (nested) field of `cls`; values absent from the command line keep the default."""
    for name, (f, tp) in C.flat_fields(cls).items():
        if name in skip:
            continue
        _, inner = C.is_optional(tp)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "type": _argtype(tp),
                                  "help": f"{f.metadata['help']} (default: {_show(f.default)})"}
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
    return C.from_flat_dict(cls, values)


# --- commands ---------------------------------------------------------------------------------------

# Each command checks its config before importing the step (torch, mlflow: seconds), so bad input
# is answered at once.

def _cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(C.TrainConfig, args, skip=("experiment",))
    cfg.validate()
    from sdd.dense import run_train

    result = run_train(cfg, experiment=args.experiment)
    _report(result.run_id, result.reused, result.metrics)
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    cfg = config_from_args(C.PruneConfig, args)
    cfg.validate()
    from sdd.chain import run_prune

    result = run_prune(cfg)
    _report(result.run_id, result.reused, result.metrics)
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    cfg = config_from_args(C.DistillChainConfig, args)
    cfg.validate()
    from sdd.chain import run_prune

    result = run_prune(cfg.prune, cfg.distill)
    _report(result.run_id, result.reused, result.metrics)
    return 0


def _report(run_id: str, reused: bool, metrics: dict[str, float]) -> None:
    from sdd.tracking import tracking_uri

    keys = [k for k in ("test_acc", "val_acc", "train_acc_noisy", "sparsity") if k in metrics]
    summary = ", ".join(f"{k} {metrics[k]:.4f}" for k in keys)
    state = "reused finished run" if reused else "run"
    print(f"{state} {run_id}: {summary}")
    print(f"browse it: mlflow ui --backend-store-uri {tracking_uri()}")


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "train": ("train one dense model (an MLflow run)",
              lambda p: add_config_options(p, C.TrainConfig), _cmd_train),
    "prune": ("prune a dense run level by level, retraining in between (a chain of MLflow runs)",
              lambda p: add_config_options(p, C.PruneConfig), _cmd_prune),
    "distill": ("a pruning chain whose retraining distils from a teacher model",
                lambda p: add_config_options(p, C.DistillChainConfig), _cmd_distill),
    "sweep": (sweep.HELP, sweep.configure_parser, sweep.command),
    "study": (study.HELP, study.configure_parser, study.command),
    "analyze": (analysis_cli.HELP, analysis_cli.configure_parser, analysis_cli.command),
    "bench": (bench.HELP, bench.configure_parser, bench.command),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdd", description="Sparse double descent studies, tracked in MLflow.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (help_text, add_options, func) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "train":
            p.add_argument("--experiment", default=None,
                           help="MLflow experiment name (default: $MLFLOW_EXPERIMENT_NAME or 'sdd')")
        add_options(p)
        p.set_defaults(func=func)
    return parser


def setup_logging(verbose: bool) -> None:
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
