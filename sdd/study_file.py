"""Study files (`sweeps/*.yaml`): the stages of a study, parsed into typed dataclasses and validated on load.

A study file names up to three stages, run in this order:

```yaml
name: mnist1d_quick            # optional, default: the file's stem
experiment: sdd                # optional MLflow experiment name (default: $MLFLOW_EXPERIMENT_NAME or 'sdd')
storage_path: /shared/ray      # optional Ray Tune storage (shared storage or s3:// on multi-node clusters)
retries: 1                     # optional, failed trials are run again this many times (default 1)
max_concurrent: 4              # optional cap on trials running at once (default: as resources allow)
stages:
  dense:                       # one dense run per grid point
    recipe: {dataset: mnist1d, model: mlp, epochs: 2000}   # any `sdd train` option, shared by all points
    grid: {width: [8, 16, 32], seed: [0, 1]}               # any `sdd train` option, one axis per key
    resources: {cpu: 1, gpu: 0}                            # or rules by width, see below
  prune:                       # one chain per starting checkpoint x grid point
    start: {select: [before, below, at, above, after]}     # or a list of {width:, noise:, seed:, epoch:}
    recipe: {levels: 20, epochs: 500}                      # any `sdd prune` option except parent / start-epoch
    grid: {retrain: [lr_rewind, finetune]}
  distill:                     # as prune; also any `sdd distill` option, e.g. teacher, alpha, temperature
    start: {select: [at]}
    recipe: {teacher: best_dense, alpha: 0.8, temperature: 10}
```

`start.select` picks, per group of dense runs that differ only in width and seed (e.g. per noise level),
the widths around the interpolation threshold (IT = smallest width whose mean noisy-subset train accuracy
over seeds reaches `threshold`): `below` / `at` / `above` the IT, and the control widths `before`
(largest width <= IT / control_factor) and `after` (smallest width >= IT * control_factor).

Teachers (distill): `best_dense` (the dense run of the study's dense stage with the best val_acc among
those with the same data settings as the chain's start, e.g. the same noise level), `parent` (the chain's
own dense parent: self-distillation), or any reference `sdd distill --teacher` accepts.

`resources` is `{cpu:, gpu:}` (fractional GPUs below 1 share a GPU) or a list of rules
`[{max_width: 16, cpu: 1, gpu: 0.25}, {cpu: 1, gpu: 0.5}]`: the first rule whose max_width is >= the
model's width applies (for chains: the dense parent's width); a rule without max_width covers the rest.

Every error is one line naming the file, the key path and what is accepted.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sdd import config as C
from sdd.errors import UsageError

STAGES = ("dense", "prune", "distill")
ROLES = ("before", "below", "at", "above", "after")
TEACHER_SELECTORS = ("best_dense", "parent")
# Set by the starting checkpoint, never by the file.
CHAIN_RESERVED = ("parent", "start_epoch")
_TOP_KEYS = ("name", "description", "experiment", "storage_path", "retries", "max_concurrent", "stages")
_STAGE_KEYS = {"dense": ("recipe", "grid", "resources"),
               "prune": ("recipe", "grid", "resources", "start"),
               "distill": ("recipe", "grid", "resources", "start")}
_START_KEYS = ("select", "threshold", "control_factor", "seeds", "epoch")
_RULE_KEYS = ("max_width", "cpu", "gpu")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_PLACEHOLDER_RUN = "0" * 32


@dataclass(frozen=True)
class ResourceRule:
    cpu: float
    gpu: float
    max_width: int | None = None


@dataclass(frozen=True)
class Resources:
    """Per-trial resources, chosen by model width."""

    rules: tuple[ResourceRule, ...] = (ResourceRule(1.0, 0.0),)

    def for_width(self, width: int) -> ResourceRule | None:
        for rule in self.rules:
            if rule.max_width is None or width <= rule.max_width:
                return rule
        return None


@dataclass(frozen=True)
class AutoStart:
    """Starting checkpoints chosen from the dense stage's results, around its interpolation threshold."""

    roles: tuple[str, ...] = ROLES
    threshold: float = 0.99
    control_factor: float = 4.0
    seeds: tuple[int, ...] | None = None  # None: the smallest seed of the dense stage
    epoch: int | None = None  # None: the dense runs' final weights


@dataclass(frozen=True)
class ExplicitStart:
    """One starting checkpoint named by dense-stage settings (width, noise, seed, ...) and an epoch."""

    match: dict[str, Any]
    epoch: int | None = None

    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.match.items())


@dataclass(frozen=True)
class Stage:
    """One stage: shared `recipe` values, `grid` axes (file order), resources; chains also `start`."""

    kind: str
    recipe: dict[str, Any]
    grid: dict[str, tuple[Any, ...]]
    resources: Resources = Resources()
    start: AutoStart | tuple[ExplicitStart, ...] | None = None

    def points(self) -> list[tuple[str, dict[str, Any]]]:
        """Every grid point as (label of its axis values, recipe + axis values)."""
        axes = list(self.grid)
        out = []
        for values in itertools.product(*(self.grid[a] for a in axes)):
            chosen = dict(zip(axes, values))
            label = ",".join(f"{k}={show_value(v)}" for k, v in chosen.items())
            out.append((label, {**self.recipe, **chosen}))
        return out

    def values(self, key: str, default: Any) -> tuple[Any, ...]:
        """All values `key` takes in this stage."""
        if key in self.grid:
            return self.grid[key]
        return (self.recipe.get(key, default),)


@dataclass(frozen=True)
class StudyFile:
    path: Path
    display_path: str  # as the lineage tag sdd.study_file records it
    name: str
    content_hash: str
    text: str
    experiment: str | None = None
    storage_path: str | None = None
    retries: int = 1
    max_concurrent: int | None = None
    description: str = ""
    stages: dict[str, Stage] = field(default_factory=dict)

    def stage_names(self) -> list[str]:
        return [s for s in STAGES if s in self.stages]


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def display_path(path: Path) -> str:
    """The path relative to the working directory when inside it (stable across machines and
    `ray job submit` working-dir copies), else absolute."""
    resolved = path.resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(resolved)


def load_study(path: str | Path) -> StudyFile:
    """Read and validate a study file; UsageError (one line: file, key path, what is accepted) if bad."""
    import yaml

    path = Path(path)
    shown = display_path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"study file {path} not found") from None
    except OSError as err:
        raise UsageError(f"study file {path}: cannot read it ({err.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "syntax error"
        raise UsageError(f"{shown}: not valid YAML{where}: {problem}") from None
    return _Parser(shown).study(data, path, text)


class _Parser:
    def __init__(self, shown: str) -> None:
        self.shown = shown

    def fail(self, key: str, message: str) -> UsageError:
        return UsageError(f"{self.shown}: {key}: {message}" if key else f"{self.shown}: {message}")

    def mapping(self, value: Any, key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping with keys {', '.join(allowed)}, got {_kind(value)}")
        unknown = [k for k in value if k not in allowed]
        if unknown:
            raise self.fail(f"{key}.{unknown[0]}" if key else str(unknown[0]),
                            f"unknown key; accepted: {', '.join(allowed)}")
        return value

    def number(self, value: Any, key: str, *, minimum: float, integer: bool = False,
               strict: bool = False) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (not integer or float(value).is_integer())
        ok = ok and (value > minimum if strict else value >= minimum)
        if not ok:
            what = "an integer" if integer else "a number"
            raise self.fail(key, f"expected {what} {'>' if strict else '>='} {minimum:g}, got {value!r}")
        return int(value) if integer else float(value)

    # --- the file -----------------------------------------------------------------------------

    def study(self, data: Any, path: Path, text: str) -> StudyFile:
        data = self.mapping(data, "", _TOP_KEYS)
        if "stages" not in data:
            raise self.fail("stages", f"missing; give at least one of: {', '.join(STAGES)}")
        stages_data = data["stages"]
        if not isinstance(stages_data, dict) or not stages_data:
            raise self.fail("stages", f"expected a non-empty mapping of stages ({', '.join(STAGES)})")
        self.mapping(stages_data, "stages", STAGES)
        name = self.text(data.get("name", path.stem), "name")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise self.fail("name", f"expected letters, digits, '_', '-', '.', got {name!r}")
        stages: dict[str, Stage] = {}
        if "dense" in stages_data:
            stages["dense"] = self.dense(stages_data["dense"])
        for kind in ("prune", "distill"):
            if kind in stages_data:
                if "dense" not in stages:
                    raise self.fail(f"stages.{kind}", "needs a dense stage in the same file: its starting "
                                                      "checkpoints are dense runs of that stage")
                stages[kind] = self.chain(kind, stages_data[kind], stages["dense"])
        max_concurrent = data.get("max_concurrent")
        if max_concurrent is not None:
            max_concurrent = int(self.number(max_concurrent, "max_concurrent", minimum=1, integer=True))
        return StudyFile(
            path=path, display_path=self.shown, name=name, content_hash=content_hash(text), text=text,
            experiment=self.optional_text(data.get("experiment"), "experiment"),
            storage_path=self.optional_text(data.get("storage_path"), "storage_path"),
            retries=int(self.number(data.get("retries", 1), "retries", minimum=0, integer=True)),
            max_concurrent=max_concurrent, description=self.optional_text(data.get("description"),
                                                                            "description") or "",
            stages=stages)

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"expected a non-empty string, got {_kind(value)}")
        return value.strip()

    def optional_text(self, value: Any, key: str) -> str | None:
        return None if value is None else self.text(value, key)

    # --- stages -------------------------------------------------------------------------------

    def dense(self, data: Any) -> Stage:
        key = "stages.dense"
        data = self.mapping(data, key, _STAGE_KEYS["dense"])
        fields = C.flat_fields(C.TrainConfig)
        recipe, grid = self.recipe_and_grid(data, key, fields)
        stage = Stage("dense", recipe, grid, self.resources(data.get("resources"), f"{key}.resources"))
        for label, point in stage.points():
            try:
                C.from_flat_dict(C.TrainConfig, point).validate()
            except UsageError as err:
                raise self.fail(key, f"grid point {label or '(recipe)'}: {_plain(err)}") from None
        self.cover_widths(stage.resources, stage.values("width", C.ModelConfig().width), f"{key}.resources")
        return stage

    def chain(self, kind: str, data: Any, dense: Stage) -> Stage:
        key = f"stages.{kind}"
        data = self.mapping(data, key, _STAGE_KEYS[kind])
        cls = C.PruneConfig if kind == "prune" else C.DistillChainConfig
        fields = {k: v for k, v in C.flat_fields(cls).items() if k not in CHAIN_RESERVED}
        for part in ("recipe", "grid"):
            reserved = [k for k in (data.get(part) or {}) if k in CHAIN_RESERVED] \
                if isinstance(data.get(part), dict) else []
            if reserved:
                raise self.fail(f"{key}.{part}.{reserved[0]}", "is set by the starting checkpoint; name "
                                                               "checkpoints under `start` instead")
        recipe, grid = self.recipe_and_grid(data, key, fields)
        if kind == "distill":
            teachers = grid.get("teacher") or (recipe.get("teacher"),)
            if teachers == (None,):
                raise self.fail(f"{key}.recipe.teacher", "missing; give best_dense, parent, models:/NAME@ALIAS, "
                                                         "models:/NAME/VERSION, runs:/ID/model or a run id")
            where = f"{key}.grid.teacher" if "teacher" in grid else f"{key}.recipe.teacher"
            for teacher in teachers:
                self.teacher(teacher, where)
        if "start" not in data:
            raise self.fail(f"{key}.start", "missing; give {select: [" + ", ".join(ROLES) + "]} or a list of "
                                            "{width:, noise:, seed:, epoch:} naming dense checkpoints")
        start = self.start(data["start"], f"{key}.start", dense)
        stage = Stage(kind, recipe, grid, self.resources(data.get("resources"), f"{key}.resources"), start)
        for label, point in stage.points():
            try:
                self.chain_config(kind, point).validate()
            except UsageError as err:
                raise self.fail(key, f"grid point {label or '(recipe)'}: {_plain(err)}") from None
        self.cover_widths(stage.resources, dense.values("width", C.ModelConfig().width), f"{key}.resources")
        return stage

    @staticmethod
    def chain_config(kind: str, point: dict[str, Any]) -> Any:
        """The chain's config with a placeholder parent and teacher, to validate everything else."""
        values = {**point, "parent": _PLACEHOLDER_RUN}
        if kind == "prune":
            return C.from_flat_dict(C.PruneConfig, values)
        values["teacher"] = _PLACEHOLDER_RUN
        return C.from_flat_dict(C.DistillChainConfig, values)

    def teacher(self, value: Any, key: str) -> None:
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {_kind(value)}")
        ok = value in TEACHER_SELECTORS or value.startswith(("models:/", "runs:/")) or _RUN_ID.match(value)
        if not ok:
            raise self.fail(key, f"{value!r} is not a teacher; accepted: {', '.join(TEACHER_SELECTORS)}, "
                                 "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a run id")

    def recipe_and_grid(self, data: dict[str, Any], key: str,
                        fields: dict[str, tuple[Any, Any]]) -> tuple[dict[str, Any], dict[str, tuple[Any, ...]]]:
        accepted = ", ".join(fields)
        recipe_data = data.get("recipe") or {}
        grid_data = data.get("grid") or {}
        for part, value in (("recipe", recipe_data), ("grid", grid_data)):
            if not isinstance(value, dict):
                raise self.fail(f"{key}.{part}", f"expected a mapping of options, got {_kind(value)}")
            for name in value:
                if name not in fields:
                    raise self.fail(f"{key}.{part}.{name}", f"unknown option; accepted: {accepted}")
        recipe = {name: self.value(v, f"{key}.recipe.{name}", fields[name]) for name, v in recipe_data.items()}
        grid: dict[str, tuple[Any, ...]] = {}
        for name, values in grid_data.items():
            where = f"{key}.grid.{name}"
            if name in recipe:
                raise self.fail(where, "is also in recipe; an option is either shared (recipe) or an axis (grid)")
            if not isinstance(values, list) or not values:
                raise self.fail(where, f"expected a non-empty list of values (a grid axis), got {_kind(values)}")
            parsed = tuple(self.value(v, f"{where}[{i}]", fields[name]) for i, v in enumerate(values))
            if len(set(map(show_value, parsed))) != len(parsed):
                raise self.fail(where, "lists a value twice")
            grid[name] = parsed
        return recipe, grid

    def value(self, value: Any, key: str, spec: tuple[Any, Any]) -> Any:
        """A typed option value: native YAML values of the field's type, or text the CLI would accept."""
        f, tp = spec
        optional, inner = C.is_optional(tp)
        choices = f.metadata.get("choices")
        expected = _type_name(inner, choices, optional)
        if value is None:
            if optional:
                return None
            raise self.fail(key, f"expected {expected}, got null")
        if isinstance(value, str) and not (inner is str):
            try:
                value = C.parse_value(tp, value)
            except ValueError:
                raise self.fail(key, f"expected {expected}, got {value!r}") from None
            return list(value) if isinstance(value, tuple) else value
        if inner is bool:
            ok = isinstance(value, bool)
        elif inner is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif inner is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            value = float(value) if ok else value
        elif inner is str:
            ok = isinstance(value, str) and (not choices or value in choices)
        else:  # tuple[int, ...]
            ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if not ok:
            raise self.fail(key, f"expected {expected}, got {value!r}")
        return value

    # --- starting checkpoints and resources ---------------------------------------------------

    def start(self, data: Any, key: str, dense: Stage) -> AutoStart | tuple[ExplicitStart, ...]:
        if isinstance(data, dict):
            return self.auto_start(data, key, dense)
        if not isinstance(data, list) or not data:
            raise self.fail(key, "expected {select: [...]} or a non-empty list of {width:, noise:, seed:, epoch:}")
        return tuple(self.explicit_start(item, f"{key}[{i}]", dense) for i, item in enumerate(data))

    def auto_start(self, data: dict[str, Any], key: str, dense: Stage) -> AutoStart:
        self.mapping(data, key, _START_KEYS)
        roles = data.get("select", list(ROLES))
        if not isinstance(roles, list) or not roles or any(r not in ROLES for r in roles):
            raise self.fail(f"{key}.select", f"expected a non-empty list of: {', '.join(ROLES)}, got {roles!r}")
        threshold = self.number(data.get("threshold", 0.99), f"{key}.threshold", minimum=0.0, strict=True)
        if threshold > 1:
            raise self.fail(f"{key}.threshold", f"expected a noisy-subset accuracy in (0, 1], got {threshold}")
        factor = self.number(data.get("control_factor", 4.0), f"{key}.control_factor", minimum=1.0, strict=True)
        seeds = data.get("seeds")
        if seeds is not None:
            dense_seeds = dense.values("seed", C.OptimConfig().seed)
            if not isinstance(seeds, list) or not seeds or any(s not in dense_seeds for s in seeds):
                raise self.fail(f"{key}.seeds", f"expected a non-empty list of dense seeds "
                                                f"({', '.join(map(str, dense_seeds))}), got {seeds!r}")
            seeds = tuple(seeds)
        epoch = self.start_epoch(data.get("epoch"), f"{key}.epoch", dense)
        return AutoStart(tuple(dict.fromkeys(roles)), threshold, factor, seeds, epoch)

    def explicit_start(self, item: Any, key: str, dense: Stage) -> ExplicitStart:
        fields = C.flat_fields(C.TrainConfig)
        if not isinstance(item, dict) or "width" not in item:
            raise self.fail(key, "expected a mapping naming a dense checkpoint, e.g. {width: 64, noise: 0.2, "
                                 "seed: 0, epoch: 500}")
        match: dict[str, Any] = {}
        for name, value in item.items():
            if name == "epoch":
                continue
            if name not in fields:
                raise self.fail(f"{key}.{name}", "unknown key; accepted: epoch and the dense stage's options "
                                                 "(width, noise, seed, ...)")
            value = self.value(value, f"{key}.{name}", fields[name])
            options = dense.values(name, fields[name][0].default)
            if not any(show_value(value) == show_value(o) for o in options):
                raise self.fail(f"{key}.{name}", f"{show_value(value)} is not a {name} of the dense stage "
                                                 f"({', '.join(map(show_value, options))})")
            match[name] = value
        unpinned = [axis for axis, values in dense.grid.items() if len(values) > 1 and axis not in match]
        if unpinned:
            raise self.fail(key, f"matches several dense runs; also give: {', '.join(unpinned)}")
        return ExplicitStart(match, self.start_epoch(item.get("epoch"), f"{key}.epoch", dense))

    def start_epoch(self, value: Any, key: str, dense: Stage) -> int | None:
        if value is None:
            return None
        epoch = int(self.number(value, key, minimum=0, integer=True))
        for saved in dense.values("save_epochs", ()):
            if epoch not in (saved or ()):
                raise self.fail(key, f"epoch {epoch} is not saved by the dense stage (save_epochs: "
                                     f"{', '.join(map(str, saved or ())) or 'none'}); add it to its save_epochs")
        return epoch

    def resources(self, data: Any, key: str) -> Resources:
        if data is None:
            return Resources()
        if isinstance(data, dict):
            if "max_width" in data:
                raise self.fail(f"{key}.max_width", "only allowed in a list of rules")
            return Resources((self.rule(data, key),))
        if not isinstance(data, list) or not data:
            raise self.fail(key, "expected {cpu:, gpu:} or a non-empty list of {max_width:, cpu:, gpu:} rules")
        rules = tuple(self.rule(item, f"{key}[{i}]") for i, item in enumerate(data))
        bounds = [r.max_width for r in rules]
        if None in bounds[:-1]:
            raise self.fail(key, "only the last rule may omit max_width")
        numeric = [b for b in bounds if b is not None]
        if numeric != sorted(set(numeric)):
            raise self.fail(key, f"rules must have increasing max_width, got {numeric}")
        return Resources(rules)

    def rule(self, item: Any, key: str) -> ResourceRule:
        item = self.mapping(item, key, _RULE_KEYS)
        cpu = self.number(item.get("cpu", 1), f"{key}.cpu", minimum=0.0, strict=True)
        gpu = self.number(item.get("gpu", 0), f"{key}.gpu", minimum=0.0)
        if gpu > 1 and not gpu.is_integer():
            raise self.fail(f"{key}.gpu", f"fractions are for sharing one GPU (gpu < 1); above 1 give a whole "
                                          f"number, got {gpu:g}")
        max_width = item.get("max_width")
        if max_width is not None:
            max_width = int(self.number(max_width, f"{key}.max_width", minimum=1, integer=True))
        return ResourceRule(cpu, gpu, max_width)

    def cover_widths(self, resources: Resources, widths: tuple[Any, ...], key: str) -> None:
        uncovered = [w for w in widths if resources.for_width(int(w)) is None]
        if uncovered:
            raise self.fail(key, f"no rule covers width {uncovered[0]}; end with a rule without max_width")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return type(value).__name__
    return repr(value)


def show_value(value: Any) -> str:
    """A value as labels and messages print it (0.2, not 0.20000000000000001; lists as [a,b])."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _type_name(tp: Any, choices: tuple[str, ...] | None, optional: bool) -> str:
    if choices:
        name = "one of " + ", ".join(choices)
    else:
        name = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
            tp, "a list of integers")
    return name + (" or null" if optional else "")


def _plain(err: Exception) -> str:
    """A config error as the study file spells options (width, not --width)."""
    return re.sub(r"--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), str(err))


def with_storage(study: StudyFile, storage_path: str | None) -> StudyFile:
    """The study with a command-line storage path taking precedence over the file's."""
    return replace(study, storage_path=storage_path) if storage_path else study
