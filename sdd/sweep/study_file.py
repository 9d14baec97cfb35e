"""Study files (`sweeps/*.yaml`): the stages of a study, parsed into typed dataclasses and validated on load.

A study file names up to three stages, run in this order:

```yaml
name: mnist1d_quick            # optional, default: the file's stem
experiment: sdd                # optional MLflow experiment name (default: $MLFLOW_EXPERIMENT_NAME or 'sdd')
storage_path: /shared/ray      # optional Ray Tune storage (shared storage or s3:// on multi-node clusters)
retries: 1                     # optional, a failed trial is run again this many times (default 1)
max_concurrent: 4              # optional cap on trials running at once (default: as resources allow)
stages:
  dense:                       # one dense run per grid point
    recipe: {dataset: mnist1d, model: mlp, epochs: 2000}   # any `sdd train` option, shared by all points
    grid: {width: [8, 16, 32], seed: [0, 1]}               # any `sdd train` option, one axis per key
    resources: {cpu: 1, gpu: 0}
  prune:                       # one chain per starting checkpoint x grid point
    start: {select: [before, below, at, above, after]}     # or a list of {width:, noise:, seed:, epoch:}
    recipe: {levels: 20, epochs: 500}                      # any `sdd prune` option but parent, start_epoch
    grid: {retrain: [lr_rewind, finetune]}
  distill:                     # as prune, plus the `sdd distill` options teacher, alpha, temperature
    start: {select: [at]}
    recipe: {teacher: best_dense, alpha: 0.8, temperature: 10}
```

`grid` may also be a list of such mappings: the union of their products, for points that share no
product (e.g. a ResNet-18 teacher and a VGG-like student in one dense stage).

`start: {select: [...]}` picks, per group of dense runs that differ only in width and seed (e.g. per
noise level), widths around the interpolation threshold (IT: the smallest width whose noisy-subset
train accuracy, mean over seeds, reaches `threshold`, default 0.99): `below`, `at` and `above` it, and
the controls `before` (largest width <= IT / control_factor) and `after` (smallest width >= IT *
control_factor; control_factor defaults to 4). `seeds` (default: the smallest dense seed) and `epoch`
(default: final weights; else one of the dense stage's save_epochs) say which checkpoints. A list
instead names checkpoints by dense options: `[{width: 64, noise: 0.2, seed: 0, epoch: 500}]`.

Teachers (distill): `best_dense` (of the study's dense runs trained on the same data as the chain's
start, e.g. the same noise level, the one with the best val_acc), `best_dense:model=resnet18` (the same,
among the dense runs with these options), `parent` (the chain's own dense parent: self-distillation), or
any reference `sdd distill --teacher` accepts (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model,
a run id).

`resources`: `{cpu:, gpu:}` per trial (gpu below 1 shares a GPU), or a list of rules by model width
`[{max_width: 16, cpu: 1, gpu: 0.25}, {cpu: 1, gpu: 0.5}]`: the first rule with max_width >= the
width applies (for chains, the dense parent's width); the last rule may omit max_width.

Any error is one line naming the file, the key path and what is accepted.

Longer than the package's other modules (about 600 lines) on purpose: this docstring is the format's
reference and `_Parser` checks every key it names, so a key's rule and its check stay side by side.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sdd import config
from sdd.errors import UsageError
from sdd.steps import STEP_OF_STAGE

STAGES = ("dense", "prune", "distill")
ROLES = ("before", "below", "at", "above", "after")
BEST_DENSE, PARENT = "best_dense", "parent"
# Set from the starting checkpoint, never by the file.
CHAIN_RESERVED = ("parent", "start_epoch")
_TOP_KEYS = ("name", "description", "experiment", "storage_path", "retries", "max_concurrent", "stages")
_STAGE_KEYS = {"dense": ("recipe", "grid", "resources"),
               "prune": ("recipe", "grid", "resources", "start"),
               "distill": ("recipe", "grid", "resources", "start")}
_START_KEYS = ("select", "threshold", "control_factor", "seeds", "epoch")
_RULE_KEYS = ("max_width", "cpu", "gpu")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_PLACEHOLDER_RUN = "0" * 32
_TEACHERS = (f"{BEST_DENSE}, {BEST_DENSE}:OPTION=VALUE[,...], {PARENT}, models:/NAME@ALIAS, models:/NAME/VERSION, "
             "runs:/ID/model or a run id")
_TRAIN_FIELDS = config.flat_fields(STEP_OF_STAGE["dense"].config_class)


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
    """One starting checkpoint, named by dense-stage options (width, noise, seed, ...) and an epoch."""

    match: dict[str, Any]
    epoch: int | None = None

    def label(self) -> str:
        return ",".join(f"{k}={show_value(v)}" for k, v in self.match.items())


@dataclass(frozen=True)
class TeacherSelector:
    """`best_dense[:k=v,...]`: the best-val_acc dense run on the chain's data, among runs with these options."""

    where: dict[str, Any]

    def accepts(self, options: dict[str, Any]) -> bool:
        return all(show_value(options.get(k)) == show_value(v) for k, v in self.where.items())


@dataclass(frozen=True)
class Stage:
    """One stage: shared `recipe` values, `grids` (their union of products), resources; chains: `start`."""

    kind: str
    recipe: dict[str, Any]
    grids: tuple[dict[str, tuple[Any, ...]], ...]
    resources: Resources = Resources()
    start: AutoStart | tuple[ExplicitStart, ...] | None = None

    @property
    def axes(self) -> list[str]:
        return list(dict.fromkeys(k for grid in self.grids for k in grid))

    def points(self) -> list[tuple[str, dict[str, Any]]]:
        """Every grid point as (label of its axis values, recipe + axis values)."""
        out = []
        for grid in self.grids:
            for values in itertools.product(*grid.values()):
                chosen = dict(zip(grid, values))
                label = ",".join(f"{k}={show_value(v)}" for k, v in chosen.items())
                out.append((label, {**self.recipe, **chosen}))
        return out

    def values(self, key: str, default: Any) -> list[Any]:
        """The distinct values `key` takes over the stage's points (`default` where no point sets it)."""
        seen: dict[str, Any] = {}
        for _, point in self.points():
            value = point.get(key, default)
            seen.setdefault(show_value(value), value)
        return list(seen.values())


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


def show_value(value: Any) -> str:
    """A value as labels and messages print it (0.2, not 0.20000000000000001; lists as [a,b])."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def display_path(path: Path) -> str:
    """Relative to the working directory when inside it (stable across clones and `ray job submit`
    working-dir copies), else absolute."""
    resolved = path.resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(resolved)


def parse_teacher(value: str) -> TeacherSelector | str:
    """A `best_dense[:k=v,...]` selector, or the reference / `parent` as given."""
    if value != BEST_DENSE and not value.startswith(BEST_DENSE + ":"):
        return value
    where: dict[str, Any] = {}
    for part in filter(None, value[len(BEST_DENSE) + 1:].split(",")):
        name, _, text = part.partition("=")
        name = name.strip()
        if name not in _TRAIN_FIELDS or not text.strip():
            raise ValueError(f"{part!r} is not OPTION=VALUE with a dense option")
        where[name] = config.parse_value(_TRAIN_FIELDS[name][1], text)
    return TeacherSelector(where)


def with_storage(study: StudyFile, storage_path: str | None) -> StudyFile:
    """The study with a command-line storage path taking precedence over the file's."""
    return replace(study, storage_path=storage_path) if storage_path else study


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
        raise UsageError(f"{shown}: not valid YAML{where}: {getattr(err, 'problem', None) or 'syntax error'}") \
            from None
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

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"expected a non-empty string, got {_kind(value)}")
        return value.strip()

    def optional_text(self, value: Any, key: str) -> str | None:
        return None if value is None else self.text(value, key)

    # --- the file -----------------------------------------------------------------------------

    def study(self, data: Any, path: Path, text: str) -> StudyFile:
        data = self.mapping(data, "", _TOP_KEYS)
        stages_data = data.get("stages")
        if not isinstance(stages_data, dict) or not stages_data:
            raise self.fail("stages", f"expected a non-empty mapping of stages ({', '.join(STAGES)}), got "
                                      f"{_kind(stages_data)}")
        self.mapping(stages_data, "stages", STAGES)
        name = self.text(data.get("name", path.stem), "name")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise self.fail("name", f"expected letters, digits, '_', '-' and '.', got {name!r}")
        stages: dict[str, Stage] = {}
        if "dense" in stages_data:
            stages["dense"] = self.dense(stages_data["dense"])
        for kind in ("prune", "distill"):
            if kind in stages_data:
                if "dense" not in stages:
                    raise self.fail(f"stages.{kind}", "needs a dense stage in the same file: its starting "
                                                      "checkpoints are runs of that stage")
                stages[kind] = self.chain(kind, stages_data[kind], stages["dense"])
        max_concurrent = data.get("max_concurrent")
        if max_concurrent is not None:
            max_concurrent = int(self.number(max_concurrent, "max_concurrent", minimum=1, integer=True))
        return StudyFile(
            path=path, display_path=self.shown, name=name, content_hash=content_hash(text), text=text,
            experiment=self.optional_text(data.get("experiment"), "experiment"),
            storage_path=self.optional_text(data.get("storage_path"), "storage_path"),
            retries=int(self.number(data.get("retries", 1), "retries", minimum=0, integer=True)),
            max_concurrent=max_concurrent,
            description=self.optional_text(data.get("description"), "description") or "", stages=stages)

    # --- stages -------------------------------------------------------------------------------

    def dense(self, data: Any) -> Stage:
        key = "stages.dense"
        data = self.mapping(data, key, _STAGE_KEYS["dense"])
        recipe, grids = self.recipe_and_grids(data, key, _TRAIN_FIELDS)
        stage = Stage("dense", recipe, grids, self.resources(data.get("resources"), f"{key}.resources"))
        for label, point in stage.points():
            try:
                STEP_OF_STAGE["dense"].from_flat(point).validate()
            except UsageError as err:
                raise self.fail(key, f"grid point {label or '(recipe)'}: {_plain(err)}") from None
            teacher = point.get("teacher")
            if teacher is not None and not (teacher.startswith(("models:/", "runs:/")) or _RUN_ID.match(teacher)):
                raise self.fail(key, f"grid point {label or '(recipe)'}: teacher {teacher!r}: a dense run takes "
                                     "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a run id")
        self.cover_widths(stage.resources, stage, f"{key}.resources")
        return stage

    def chain(self, kind: str, data: Any, dense: Stage) -> Stage:
        key = f"stages.{kind}"
        data = self.mapping(data, key, _STAGE_KEYS[kind])
        fields = {k: v for k, v in config.flat_fields(STEP_OF_STAGE[kind].config_class).items()
                  if k not in CHAIN_RESERVED}
        for part in ("recipe", "grid"):
            for mapping in _mappings(data.get(part)):
                reserved = [k for k in mapping if k in CHAIN_RESERVED]
                if reserved:
                    raise self.fail(f"{key}.{part}.{reserved[0]}", "is set by the starting checkpoint; name "
                                                                   "checkpoints under `start` instead")
        recipe, grids = self.recipe_and_grids(data, key, fields)
        if "start" not in data:
            raise self.fail(f"{key}.start", "missing; give {select: [" + ", ".join(ROLES) + "]} or a list of "
                                            "{width:, noise:, seed:, epoch:} naming dense checkpoints")
        start = self.start(data["start"], f"{key}.start", dense)
        stage = Stage(kind, recipe, grids, self.resources(data.get("resources"), f"{key}.resources"), start)
        for label, point in stage.points():
            where = f"grid point {label or '(recipe)'}"
            if kind == "distill":
                self.teacher(point.get("teacher"), f"{key} ({where})", dense)
            try:
                # A placeholder parent: the real one is chosen when the dense stage has run.
                STEP_OF_STAGE[kind].from_flat({**point, "parent": _PLACEHOLDER_RUN}).validate()
            except UsageError as err:
                raise self.fail(key, f"{where}: {_plain(err)}") from None
        self.cover_widths(stage.resources, dense, f"{key}.resources")
        return stage

    def teacher(self, value: Any, key: str, dense: Stage) -> None:
        if value is None:
            raise self.fail(key, f"no teacher; set teacher in recipe or grid: {_TEACHERS}")
        if not isinstance(value, str):
            raise self.fail(key, f"teacher: expected a string, got {_kind(value)}")
        try:
            parsed = parse_teacher(value)
        except ValueError as err:
            raise self.fail(key, f"teacher {value!r}: {err}") from None
        if isinstance(parsed, TeacherSelector):
            if not any(parsed.accepts({**_defaults(), **p}) for _, p in dense.points()):
                raise self.fail(key, f"teacher {value!r}: no dense run of the study has these options")
        elif not (parsed == PARENT or parsed.startswith(("models:/", "runs:/")) or _RUN_ID.match(parsed)):
            raise self.fail(key, f"teacher {value!r}: accepted: {_TEACHERS}")

    def recipe_and_grids(self, data: dict[str, Any], key: str, fields: dict[str, tuple[Any, Any]]
                         ) -> tuple[dict[str, Any], tuple[dict[str, tuple[Any, ...]], ...]]:
        recipe_data = data.get("recipe") or {}
        if not isinstance(recipe_data, dict):
            raise self.fail(f"{key}.recipe", f"expected a mapping of options, got {_kind(recipe_data)}")
        self.known(recipe_data, f"{key}.recipe", fields)
        recipe = {name: self.value(v, f"{key}.recipe.{name}", fields[name]) for name, v in recipe_data.items()}
        grid_data = data.get("grid") or {}
        if isinstance(grid_data, list):
            if not grid_data:
                raise self.fail(f"{key}.grid", "expected a mapping of axes or a non-empty list of such mappings")
            grids = tuple(self.grid(g, f"{key}.grid[{i}]", fields, recipe) for i, g in enumerate(grid_data))
        else:
            grids = (self.grid(grid_data, f"{key}.grid", fields, recipe),)
        labels = [label for grid in grids for label, _ in Stage("", {}, (grid,)).points()]
        twice = next((lb for i, lb in enumerate(labels) if lb in labels[:i]), None)
        if twice is not None:
            raise self.fail(f"{key}.grid", f"the point {twice} appears twice")
        return recipe, grids

    def grid(self, data: Any, key: str, fields: dict[str, tuple[Any, Any]],
             recipe: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
        if not isinstance(data, dict):
            raise self.fail(key, f"expected a mapping of option: [values], got {_kind(data)}")
        self.known(data, key, fields)
        grid: dict[str, tuple[Any, ...]] = {}
        for name, values in data.items():
            where = f"{key}.{name}"
            if name in recipe:
                raise self.fail(where, "is also in recipe; an option is either shared (recipe) or an axis (grid)")
            if not isinstance(values, list) or not values:
                raise self.fail(where, f"expected a non-empty list of values (a grid axis), got {_kind(values)}")
            parsed = tuple(self.value(v, f"{where}[{i}]", fields[name]) for i, v in enumerate(values))
            if len({show_value(v) for v in parsed}) != len(parsed):
                raise self.fail(where, "lists a value twice")
            grid[name] = parsed
        return grid

    def known(self, data: dict[str, Any], key: str, fields: dict[str, tuple[Any, Any]]) -> None:
        for name in data:
            if name not in fields:
                close = difflib.get_close_matches(str(name), fields, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise self.fail(f"{key}.{name}", f"unknown option{hint}; accepted: {', '.join(fields)}")

    def value(self, value: Any, key: str, spec: tuple[Any, Any]) -> Any:
        """A typed option value: a YAML value of the field's type, or text the command line would accept."""
        f, tp = spec
        optional, inner = config.is_optional(tp)
        choices = f.metadata.get("choices")
        expected = _type_name(inner, choices, optional)
        if value is None:
            if optional:
                return None
            raise self.fail(key, f"expected {expected}, got null")
        if isinstance(value, str) and inner is not str:
            # YAML reads 1e-4 (no dot) as text: accept what `sdd train --lr 1e-4` accepts.
            try:
                value = config.parse_value(tp, value)
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
        starts = tuple(self.explicit_start(item, f"{key}[{i}]", dense) for i, item in enumerate(data))
        labels = [(s.label(), s.epoch) for s in starts]
        twice = next((i for i, lb in enumerate(labels) if lb in labels[:i]), None)
        if twice is not None:
            raise self.fail(f"{key}[{twice}]", "names the same checkpoint as an earlier entry")
        return starts

    def auto_start(self, data: dict[str, Any], key: str, dense: Stage) -> AutoStart:
        self.mapping(data, key, _START_KEYS)
        roles = data.get("select", list(ROLES))
        if not isinstance(roles, list) or not roles or any(r not in ROLES for r in roles):
            raise self.fail(f"{key}.select", f"expected a non-empty list of: {', '.join(ROLES)}, got {roles!r}")
        threshold = self.number(data.get("threshold", 0.99), f"{key}.threshold", minimum=0.0, strict=True)
        if threshold > 1:
            raise self.fail(f"{key}.threshold", f"expected a noisy-subset accuracy in (0, 1], got {threshold:g}")
        factor = self.number(data.get("control_factor", 4.0), f"{key}.control_factor", minimum=1.0, strict=True)
        seeds = data.get("seeds")
        if seeds is not None:
            dense_seeds = dense.values("seed", config.OptimConfig().seed)
            if not isinstance(seeds, list) or not seeds or any(s not in dense_seeds for s in seeds):
                raise self.fail(f"{key}.seeds", f"expected a non-empty list of dense seeds "
                                                f"({', '.join(map(str, dense_seeds))}), got {seeds!r}")
            seeds = tuple(seeds)
        epoch = data.get("epoch")
        if epoch is not None:
            epoch = int(self.number(epoch, f"{key}.epoch", minimum=0, integer=True))
            self.saved(epoch, [p for _, p in dense.points()], f"{key}.epoch")
        return AutoStart(tuple(dict.fromkeys(roles)), threshold, factor, seeds, epoch)

    def explicit_start(self, item: Any, key: str, dense: Stage) -> ExplicitStart:
        if not isinstance(item, dict) or not item or set(item) == {"epoch"}:
            raise self.fail(key, "expected a mapping naming a dense checkpoint, e.g. {width: 64, noise: 0.2, "
                                 "seed: 0, epoch: 500}")
        match: dict[str, Any] = {}
        for name, value in item.items():
            if name == "epoch":
                continue
            if name not in _TRAIN_FIELDS:
                raise self.fail(f"{key}.{name}", "unknown key; accepted: epoch and the dense stage's options "
                                                 "(width, noise, seed, ...)")
            value = self.value(value, f"{key}.{name}", _TRAIN_FIELDS[name])
            options = dense.values(name, _TRAIN_FIELDS[name][0].default)
            if not any(show_value(value) == show_value(o) for o in options):
                raise self.fail(f"{key}.{name}", f"{show_value(value)} is not a {name} of the dense stage "
                                                 f"(it has: {', '.join(map(show_value, options))})")
            match[name] = value
        points = [{**_defaults(), **p} for _, p in dense.points()]
        matches = [p for p in points if all(show_value(p[k]) == show_value(v) for k, v in match.items())]
        if not matches:
            named = ", ".join(f"{k}={show_value(v)}" for k, v in match.items())
            raise self.fail(key, f"no dense grid point has {named}")
        if len(matches) > 1:
            differ = [a for a in dense.axes if len({show_value(p[a]) for p in matches}) > 1]
            raise self.fail(key, f"matches {len(matches)} dense runs; also give: {', '.join(differ)}")
        epoch = item.get("epoch")
        if epoch is not None:
            epoch = int(self.number(epoch, f"{key}.epoch", minimum=0, integer=True))
            self.saved(epoch, matches, f"{key}.epoch")
        return ExplicitStart(match, epoch)

    def saved(self, epoch: int, points: list[dict[str, Any]], key: str) -> None:
        for point in points:
            saved = point.get("save_epochs") or []
            if epoch not in saved:
                raise self.fail(key, f"epoch {epoch} is not saved by the dense stage (save_epochs: "
                                     f"{', '.join(map(str, saved)) or 'none'}); add it to its save_epochs")

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
            raise self.fail(f"{key}.gpu", f"fractions share one GPU (gpu < 1); above 1 give a whole number, "
                                          f"got {gpu:g}")
        max_width = item.get("max_width")
        if max_width is not None:
            max_width = int(self.number(max_width, f"{key}.max_width", minimum=1, integer=True))
        return ResourceRule(cpu, gpu, max_width)

    def cover_widths(self, resources: Resources, dense: Stage, key: str) -> None:
        widths = dense.values("width", config.ModelConfig().width)
        uncovered = [w for w in widths if resources.for_width(int(w)) is None]
        if uncovered:
            raise self.fail(key, f"no rule covers width {uncovered[0]}; end with a rule without max_width")


def _defaults() -> dict[str, Any]:
    return {name: f.default for name, (f, _) in _TRAIN_FIELDS.items()}


def _mappings(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, dict):
        return [value]
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return f"a {type(value).__name__}"
    return repr(value)


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
