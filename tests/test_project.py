"""The project files agree with each other: pins, MLproject parameters, CLI options."""

import re
import tomllib

import yaml

from conftest import ROOT
from sdd import config
from sdd.cli import COMMANDS, build_parser


def _pyproject_deps() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def test_conda_env_carries_the_same_pins_as_pyproject():
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    # the conda environment has the `digits` extra too, so `mlflow run` can train on mnist5k
    digits = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["digits"]
    assert sorted(p for p in pip if p != "-e .") == sorted(_pyproject_deps() + digits)
    assert "python=3.11" in conda["dependencies"]


def test_required_pins():
    deps = _pyproject_deps()
    for pin in ("torch==2.14.1", "torchvision==0.29.1", "mlflow==3.17.2", "ray[tune,default]==2.60.0"):
        assert pin in deps


def _options(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    options = {opt[2:].replace("-", "_") for a in sub._actions for opt in a.option_strings
               if opt.startswith("--") and opt != "--help"}
    return options | {a.dest for a in sub._actions if not a.option_strings}


def test_every_mlproject_entry_point_calls_the_cli_with_all_its_options():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    for name, entry in project["entry_points"].items():
        assert name in COMMANDS, f"MLproject entry point {name} has no CLI command"
        assert entry["command"].startswith(f"python -m sdd {name}")
        params = set(entry.get("parameters", {}))
        used = set(re.findall(r"\{(\w+)\}", entry["command"]))
        assert params == used, name
        assert params <= _options(name), name


def test_step_entry_points_expose_every_config_field():
    project = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    for name, cls in (("train", config.TrainConfig), ("prune", config.PruneConfig), ("distill", config.DistillChainConfig)):
        assert set(config.flat_fields(cls)) <= set(project[name]["parameters"]), name


def test_the_analysis_and_the_cli_import_no_torch():
    # The analysis runs where torch is not needed; the CLI answers bad input before importing it.
    import subprocess
    import sys

    for module in ("analysis.report", "sdd.cli", "sdd.steps", "sdd.names", "sdd.config"):
        code = f"import {module}, sys; assert 'torch' not in sys.modules, '{module} imports torch'"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]


def test_a_registry_that_disagrees_with_its_names_fails_at_import():
    import pytest

    from sdd import names

    names.check_registry("criterion", ("magnitude", "random"), {"magnitude": 1, "random": 2})
    with pytest.raises(RuntimeError, match="criterion registry"):
        names.check_registry("criterion", ("magnitude", "random"), {"magnitude": 1})


def test_every_command_prints_its_help():
    # argparse formats help texts with %-codes: one stray "%" in a config's help breaks `sdd CMD --help`.
    import contextlib
    import io

    import pytest

    parser = build_parser()
    for command in COMMANDS:
        out = io.StringIO()
        with pytest.raises(SystemExit) as done, contextlib.redirect_stdout(out):
            parser.parse_args([command, "--help"])
        assert done.value.code == 0, command
        assert "usage:" in out.getvalue(), command
