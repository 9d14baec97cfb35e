"""Study files (`sweeps/*.yaml`): the stages of a study, parsed into typed dataclasses and validated on load.

A study file names up to three stages, run in this order:

```yaml
name: mnist1d_quick            # optional, default: the file's stem
experiment: sdd                # optional MLflow experiment name (default: $MLFLOW_EXPERIMENT_NAME or 'sdd')
storage_path: /shared/ray      # optional Ray Tune storage (shared storage or s3:// on multi-node clusters)
retries: 1                     # optional, a failed trial is run again this many times (default 1)
max_concurrent: 4              # optional cap on trials running at once (default: as resources allow)
description: ...               # optional, what the study shows (the study run's note in the UI)
cost: ~3 min on 2 CPU cores    # optional, what running it takes (measured or estimated; `sdd presets`)
stages:
  dense:                       # one dense run per grid point
    recipe: {dataset: mnist1d, model: mlp, epochs: 2000}   # any `sdd train` option, shared by all points
    grid: {width: [8, 16, 32], seed: [0, 1]}               # any `sdd train` option, one axis per key
    resources: {cpu: 1, gpu: 0}
    pack_seeds: auto           # optional, any stage: seeds trained as one batched model: auto, true, false or a size
  prune:                       # one chain per starting checkpoint x chain seed x grid point
    start: {select: [before, below, at, above, after]}     # or a list of {width:, noise:, seed:, epoch:}
    seeds: [0, 1]                                          # optional; default: every seed of the dense stage
    recipe: {levels: 20, epochs: 500}                      # any `sdd prune` option but parent, start_epoch, seed
    grid: {retrain: [lr_rewind, finetune]}
  distill:                     # as prune, plus the `sdd distill` options teacher, alpha, temperature
    start: {select: [at]}
    recipe: {teacher: best_dense, alpha: 0.8, temperature: 10}
```

`grid` may also be a list of such mappings: the union of their products, for points that share no
product (e.g. a ResNet-18 teacher and a VGG-like student in one dense stage).

`start: {select: [...]}` picks, per group of dense runs that differ only in width and seed (e.g. per
noise level), widths around the interpolation threshold (IT: the smallest width whose noisy-subset
train accuracy, mean over seeds, reaches `threshold`, default PruneConfig's it_threshold): `below`,
`at` and `above` it, and the controls `before` (largest width <= IT / control_factor) and `after`
(smallest width >= IT * control_factor; control_factor defaults to 4). `epoch` (default: final
weights; else one of the dense stage's save_epochs) says which checkpoint. The threshold is also the
chains' `it_threshold` (their IT level and phases) unless their recipe or grid sets one: one
threshold for the whole study (stages that select starts must agree on it).
A list instead names checkpoints by dense options: `[{width: 64, noise: 0.2, seed: 0, epoch: 500}]`.
`start: {epochs: [100, 500], width: 64}` starts chains from those save_epochs checkpoints of the dense
run with these options: "the IT in epochs" (epoch-wise double descent) rather than in width.

Seeds: the chain stage's `seeds` (default: every seed the dense stage trained) are its chains' seeds,
and chain seed s prunes the dense parent of seed s, so each seed is one independent replicate of the
whole dense-then-prune pipeline; a start that names a `seed` runs that seed only. `seed` is therefore
not a chain option in `recipe` or `grid`.

Teachers (distill): `best_dense` (of the study's dense runs trained on the same data as the chain's
start, e.g. the same noise level, the one with the best val_acc), `best_dense:model=resnet18` (the same,
among the dense runs with these options), `parent` (the chain's own dense parent: self-distillation), or
any reference `sdd distill --teacher` accepts (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model,
a run id).

`resources`: `{cpu:, gpu:}` per trial (gpu below 1 shares a GPU), or a list of rules by model width
`[{max_width: 16, cpu: 1, gpu: 0.25}, {cpu: 1, gpu: 0.5}]`: the first rule with max_width >= the
width applies (for chains, the dense parent's width); the last rule may omit max_width.

`pack_seeds` (any stage): trials that differ only in their seed (chains: and in their dense parent, the
run of that seed) train as one seed pack (`sdd.packs`: one batched model in one Ray trial, each seed
still its own runs, masks and checkpoints): `auto` (default) where `sdd.packs.pack_pays` says it is
faster (the rule `sdd bench` measures), `true` always, `false` never, or a number: packs of at most
that many seeds.

Any error is one line naming the file, the key path and what is accepted.

The keys are pydantic models (`_File` down to `_Rule`: strict types, no unknown keys); the checks that
need the dense stage run once it is parsed, and every grid point is checked by building its step config.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, ClassVar, Optional, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, PrivateAttr,
                      StringConstraints, Tag, ValidationError, create_model, model_validator)
from pydantic_core import PydanticCustomError

from sdd import config, names
from sdd.errors import UsageError
from sdd.steps import STEP_OF_STAGE

STAGES = tuple(STEP_OF_STAGE)  # the stage names the step table runs
AUTO_PACK = "auto"  # `pack_seeds`: pack where sdd.packs.pack_pays says it is faster
ROLES = ("before", "below", "at", "above", "after")
BEST_DENSE, PARENT = "best_dense", "parent"
# Set from the starting checkpoint, never by the file.
CHAIN_RESERVED = ("parent", "start_epoch", "seed")
_RESERVED_WHY = {"seed": "is the dense parent's seed; choose the chains' seeds with the stage's `seeds`"}
_START_WHY = "is set by the starting checkpoint; name checkpoints under `start` instead"
# The chains' own default, so a study that sets no threshold labels and selects with the same one.
DEFAULT_THRESHOLD = config.PruneConfig().it_threshold
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_PLACEHOLDER_RUN = "0" * 32
_REFERENCES = "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a run id"
_TEACHERS = f"{BEST_DENSE}, {BEST_DENSE}:OPTION=VALUE[,...], {PARENT}, {_REFERENCES}"
_CHECKPOINT = "a mapping naming a dense checkpoint, e.g. {width: 64, noise: 0.2, seed: 0, epoch: 500}"
_TRAIN_FIELDS = config.flat_fields(STEP_OF_STAGE["dense"].config_class)
# Config messages spell options as flags; longest first, so --noise-kind is not read as --noise + "-kind".
_FLAGS = sorted({n for kind in STAGES for n in config.flat_fields(STEP_OF_STAGE[kind].config_class)},
                key=len, reverse=True)


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
    threshold: float = DEFAULT_THRESHOLD
    control_factor: float = 4.0
    epoch: int | None = None  # None: the dense runs' final weights


@dataclass(frozen=True)
class ExplicitStart:
    """One starting checkpoint, named by dense-stage options (width, noise, ...) and an epoch, for each of
    `seeds`: the named seed, else the chain stage's seeds."""

    match: dict[str, Any]
    epoch: int | None
    seeds: tuple[int, ...]

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
    """One stage: shared `recipe` values, `grids` (their union of products), resources; chains: `start`
    and `seeds` (None: every seed the dense stage trained at the chosen start)."""

    kind: str
    recipe: dict[str, Any]
    grids: tuple[dict[str, tuple[Any, ...]], ...]
    resources: Resources = Resources()
    start: AutoStart | tuple[ExplicitStart, ...] | None = None
    seeds: tuple[int, ...] | None = None
    pack_seeds: bool | int | str = AUTO_PACK  # "auto", True, False or the largest pack

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
    cost: str = ""  # what running it takes, measured or estimated (`sdd presets` shows it)
    stages: dict[str, Stage] = field(default_factory=dict)

    def stage_names(self) -> list[str]:
        return [s for s in STAGES if s in self.stages]

    @property
    def it_threshold(self) -> float:
        """The study's one interpolation threshold: its start selection's (the stages agree on it), else
        the first chain's own it_threshold, else the chains' default."""
        chains = [self.stages[s] for s in STAGES[1:] if s in self.stages]
        for stage in chains:
            if isinstance(stage.start, AutoStart):
                return stage.start.threshold
        for stage in chains:
            for _, point in stage.points():
                return float(point.get("it_threshold", DEFAULT_THRESHOLD))
        return DEFAULT_THRESHOLD


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
    try:
        study = _File.model_validate({"name": path.stem, **data} if isinstance(data, dict) else data)
    except ValidationError as err:
        raise UsageError(f"{shown}: {_one_line(err.errors()[0])}") from None
    return StudyFile(path=path, display_path=shown, name=study.name, content_hash=content_hash(text), text=text,
                     experiment=study.experiment, storage_path=study.storage_path, retries=study.retries,
                     max_concurrent=study.max_concurrent, description=study.description or "",
                     cost=study.cost or "", stages=study.stages._built)


# --- errors: a pydantic error as one line --------------------------------------------------------

_EXPECTED = {"int": "an integer", "float": "a number", "finite": "a finite number", "bool": "true or false",
             "string": "a string", "list": "a list", "dict": "a mapping"}
_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _fail(message: str, at: Any = None) -> PydanticCustomError:
    """An error in this file's wording; `at` extends the error's location (a key, or a path below it)."""
    return PydanticCustomError("study_file", "{message}", {"message": message, "at": None if at is None else str(at)})


def _must(ok: Callable[[Any], Any], message: str, *, before: bool = False,
          then: Callable[[Any], Any] | None = None) -> Any:
    """A validator: `message` (`{value}`, `{kind}` filled in) unless ok(value); then `then(value)`."""
    def check(value: Any) -> Any:
        if not ok(value):
            raise _fail(message.format(value=value, kind=_kind(value)))
        return then(value) if then else value
    return (BeforeValidator if before else AfterValidator)(check)


def _one_line(err: Any) -> str:
    """`key.path[i]: what is wrong`, from the error's location (less union tags, `<...>`) and type."""
    ctx, kind = err.get("ctx") or {}, err["type"]
    loc = [p for p in err["loc"] if not str(p).startswith("<")] + ([ctx["at"]] if ctx.get("at") is not None else [])
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    bound = next(((op, ctx[k]) for k, op in _BOUNDS.items() if k in ctx), None)
    if kind == "study_file":
        message = ctx["message"]
    elif bound:  # the bound's type tells integer fields (ge=0) from number fields (gt=0.0)
        message = f"expected {'an integer' if isinstance(bound[1], int) else 'a number'} {bound[0]} {bound[1]:g}"
    elif kind.endswith("too_short"):
        message = f"expected a non-empty {'string' if kind.startswith('string') else 'list'}"
    else:
        message = f"expected {_EXPECTED[kind.split('_')[0]]}" if kind.split("_")[0] in _EXPECTED else err["msg"]
    message += f", got {_kind(err['input'])}" if message.startswith("expected") and kind != "study_file" else ""
    return f"{path}: {message}" if path else message


def _kind(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__}" if value and isinstance(value, (dict, list)) \
        else repr(value)


def _plain(err: Exception) -> str:
    """A config error as the study file spells options (width, not --width)."""
    text = str(err)
    for name in _FLAGS:
        text = text.replace("--" + name.replace("_", "-"), name)
    return text


# --- the file's keys: pydantic models ----------------------------------------------------------

class _Model(BaseModel):
    """Strict types (no 'five' for an integer, no 1 for true), no unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, defer_build=True)
    _noun: ClassVar[str] = "key"
    _what: ClassVar[str] = ""  # what a non-mapping is told is expected; default: the keys
    _reserved: ClassVar[tuple[str, ...]] = ()  # keys the file may not set (_RESERVED_WHY, else _START_WHY)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        accepted = list(cls.model_fields)
        if not isinstance(data, dict):
            raise _fail(f"expected {cls._what or 'a mapping with keys ' + ', '.join(accepted)}, got {_kind(data)}")
        for key in data:
            if key in cls._reserved:
                raise _fail(_RESERVED_WHY.get(key, _START_WHY), key)
            if key not in accepted:
                close = difflib.get_close_matches(str(key), accepted, n=1) if cls._noun == "option" else []
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise _fail(f"unknown {cls._noun}{hint}; accepted: {', '.join(accepted)}", key)
        return data


class _Options(_Model):
    """A step's options (a model per step, from its config's fields); `given()` in the file's order."""

    _noun, _what = "option", "a mapping of options"
    _order: tuple[str, ...] = PrivateAttr(())

    @model_validator(mode="wrap")
    @classmethod
    def _keep_order(cls, data: Any, handler: Any) -> Any:
        model = handler(data)
        model._order = tuple(data)
        return model

    def given(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._order}


class _ChainOptions(_Options):
    _reserved = CHAIN_RESERVED


class _Start(_Options):  # an explicit starting checkpoint: epoch and the dense options (added by _options)
    _what = _CHECKPOINT
    epoch: Annotated[int, Field(ge=0)] | None = None


_PackSeeds = Annotated[Union[bool, int, str], _must(
    lambda v: v == AUTO_PACK or isinstance(v, bool) or (isinstance(v, int) and v >= 2),
    f"expected {AUTO_PACK}, true, false or a pack size >= 2, got {{value!r}}", before=True)]

_Seeds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1),
                   _must(lambda v: len(set(v)) == len(v), "lists a seed twice")]


class _EpochStart(_Options):  # checkpoints along training time of one dense run (dense options added by _options)
    epochs: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1),
                      _must(lambda v: len(set(v)) == len(v), "lists an epoch twice")]


def _option_type(f: Any, tp: Any) -> Any:
    """The field's type, strict; text is read as the command line reads it (YAML reads 1e-4 as text)."""
    optional, inner = config.is_optional(tp)
    choices = f.metadata.get("choices")
    value: Any = inner if inner in (bool, int, float, str) else list[int]
    if choices:
        value = Annotated[str, _must(lambda v: v in choices, f"expected one of {', '.join(choices)}, got {{value!r}}")]
    value = Optional[value] if optional else value
    if inner is str:
        return value

    def parse(text: Any) -> Any:
        try:
            parsed = config.parse_value(tp, text) if isinstance(text, str) else text
        except ValueError:
            return text  # the strict type says what is expected
        return list(parsed) if isinstance(parsed, tuple) else parsed
    return Annotated[value, BeforeValidator(parse)]


_AXIS = _must(lambda v: isinstance(v, list) and v, "expected a non-empty list of values (a grid axis), got {kind}",
              before=True)


def _options(name: str, base: type[_Options], kind: str, *, axis: bool) -> Any:
    """The model of a step's options, less the keys `base` reserves or defines itself (`epochs` of a start)."""
    fields = {}
    for option, (f, tp) in config.flat_fields(STEP_OF_STAGE[kind].config_class).items():
        if option in base._reserved or option in base.model_fields:
            continue
        value = _option_type(f, tp)
        if axis:
            value = Annotated[list[value], _AXIS, _must(lambda v: len(set(map(show_value, v))) == len(v),
                                                          "lists a value twice")]
        fields[option] = (value, None)
    with warnings.catch_warnings():  # PruneConfig.register shadows ABCMeta.register: harmless
        warnings.filterwarnings("ignore", message='Field name "register"')
        return create_model(name, __base__=base, **fields)


def _one_or_list(one: Any, item: Any) -> Any:
    """`one` for a mapping, else a non-empty list of `item`; error locations name no union member."""
    return Annotated[Union[Annotated[one, Tag("<mapping>")], Annotated[list[item], Field(min_length=1), Tag("<list>")]],
                     Discriminator(lambda v: "<list>" if isinstance(v, list) else "<mapping>")]


class _Rule(_Model):
    max_width: Annotated[int, Field(ge=1)] | None = None
    cpu: Annotated[float, Field(gt=0.0)] = 1.0
    gpu: Annotated[float, Field(ge=0.0), _must(lambda g: g <= 1 or g.is_integer(), "fractions share one GPU "
                                               "(gpu < 1); above 1 give a whole number, got {value:g}")] = 0.0


def _resources(value: _Rule | list[_Rule]) -> Resources:
    if isinstance(value, _Rule) and value.max_width is not None:
        raise _fail("only allowed in a list of rules", "max_width")
    rules = [value] if isinstance(value, _Rule) else value
    bounds = [r.max_width for r in rules]
    if None in bounds[:-1]:
        raise _fail("only the last rule may omit max_width")
    numeric = [b for b in bounds if b is not None]
    if numeric != sorted(set(numeric)):
        raise _fail(f"rules must have increasing max_width, got {numeric}")
    return Resources(tuple(ResourceRule(r.cpu, r.gpu, r.max_width) for r in rules))


class _Auto(_Model):
    select: Annotated[tuple[str, ...], _must(
        lambda v: isinstance(v, list) and v and all(r in ROLES for r in v),
        f"expected a non-empty list of: {', '.join(ROLES)}, got {{value!r}}", before=True,
        then=lambda v: tuple(dict.fromkeys(v)))] = ROLES
    threshold: Annotated[float, Field(gt=0.0, le=1.0)] = DEFAULT_THRESHOLD
    control_factor: Annotated[float, Field(gt=1.0)] = 4.0
    epoch: Annotated[int, Field(ge=0)] | None = None


class _Stage(_Model):
    """A stage's keys; `recipe`, `grid` (and `start`) are added per stage by `_stage_model`."""

    pack_seeds: _PackSeeds = AUTO_PACK

    def stage(self, kind: str) -> Stage:
        grids = self.grid if isinstance(self.grid, list) else [self.grid]
        return Stage(kind, self.recipe.given() if self.recipe else {},
                     tuple({k: tuple(v) for k, v in g.given().items()} if g else {} for g in grids),
                     self.resources or Resources(), pack_seeds=self.pack_seeds)

    @model_validator(mode="after")
    def _distinct_points(self) -> _Stage:
        stage = self.stage("")
        for i, grid in enumerate(stage.grids):
            for key in (k for k in grid if k in stage.recipe):
                raise _fail("is also in recipe; an option is either shared (recipe) or an axis (grid)",
                            f"grid[{i}].{key}" if isinstance(self.grid, list) else f"grid.{key}")
        labels = [label for grid in stage.grids for label, _ in replace(stage, grids=(grid,)).points()]
        for twice in (lb for i, lb in enumerate(labels) if lb in labels[:i]):
            raise _fail(f"the point {twice} appears twice", "grid")
        return self


def _stage_model(kind: str) -> Any:
    base, name = (_Options if kind == "dense" else _ChainOptions), kind.title()
    grid = _options(f"_{name}Grid", base, kind, axis=True)
    fields: dict[str, Any] = {
        "recipe": (Optional[_options(f"_{name}Recipe", base, kind, axis=False)], None),
        "grid": (Optional[_one_or_list(grid, grid)], None),
        "resources": (Optional[Annotated[_one_or_list(_Rule, _Rule), AfterValidator(_resources)]], None)}
    if kind != "dense":
        fields["start"] = (Optional[_start_type()], None)
        fields["seeds"] = (Optional[_Seeds], None)
    return create_model(f"_{name}", __base__=_Stage, **fields)


def _start_type() -> Any:
    """`start`: a list of checkpoints, `{epochs: [...], ...}` (along training time) or `{select: ...}`."""
    def which(value: Any) -> str:
        if isinstance(value, list):
            return "<list>"
        return "<epochs>" if isinstance(value, dict) and "epochs" in value else "<mapping>"
    explicit = _options("_Explicit", _Start, "dense", axis=False)
    return Annotated[Union[Annotated[_Auto, Tag("<mapping>")],
                           Annotated[_options("_Epochs", _EpochStart, "dense", axis=False), Tag("<epochs>")],
                           Annotated[list[explicit], Field(min_length=1), Tag("<list>")]], Discriminator(which)]


_Dense, _Prune, _Distill = (_stage_model(kind) for kind in STAGES)


class _Stages(_Model):
    dense: _Dense = None  # absent, not null
    prune: _Prune = None
    distill: _Distill = None
    _built: dict[str, Stage] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _with_dense(self) -> _Stages:
        """The checks that need the dense stage: starting checkpoints, teachers, resources for its widths."""
        chains = [kind for kind in STAGES[1:] if getattr(self, kind) is not None]
        if self.dense is None:
            raise _fail("needs a dense stage in the same file: its starting checkpoints are runs of that stage",
                        chains[0])
        for kind in ("dense", *chains):
            raw, at = getattr(self, kind), f"{kind}.start"
            stage = raw.stage(kind)
            dense = self._built.setdefault("dense", stage)
            if kind != "dense" and 0 in dense.values("val_size", config.DataConfig().val_size):
                raise _fail("the dense runs have val_size 0: a chain selects its levels by val_acc, never by "
                            "test accuracy; give the dense stage val_size > 0", kind)
            if kind != "dense" and raw.start is None:
                raise _fail(f"missing; give {{select: [{', '.join(ROLES)}]}} or a list of "
                            "{width:, noise:, seed:, epoch:} naming dense checkpoints", at)
            if kind != "dense":
                seeds = _chain_seeds(raw.seeds, f"{kind}.seeds", dense)
                if isinstance(raw.start, _Auto):
                    start: Any = _auto_start(raw.start, at, dense)
                    _same_threshold(start, kind, self._built)
                elif isinstance(raw.start, _EpochStart):
                    start = _epoch_starts(raw.start, at, dense, seeds)
                else:
                    start = _explicit_starts(raw.start, at, dense, seeds)
                stage = replace(stage, start=start, seeds=seeds)
            _check_points(stage, dense)
            _check_packable(stage, dense)
            for width in dense.values("width", config.ModelConfig().width):
                if stage.resources.for_width(int(width)) is None:
                    raise _fail(f"no rule covers width {width}; end with a rule without max_width", f"{kind}.resources")
            self._built[kind] = stage
        return self


def _check_packable(stage: Stage, dense: Stage) -> None:
    """`pack_seeds: true` or a size asks for packs: every model the stage trains (a chain: its dense
    parents' models) must be one that packs."""
    if stage.pack_seeds in (AUTO_PACK, False):
        return
    for model in dense.values("model", config.ModelConfig().model):
        if model not in names.PACKABLE_MODELS:
            raise _fail(f"model {model!r} cannot be trained as a seed pack (packable: "
                        f"{', '.join(names.PACKABLE_MODELS)}); use auto or false", f"{stage.kind}.pack_seeds")


def _check_points(stage: Stage, dense: Stage) -> None:
    """Every grid point builds a valid step config (the config's own checks), with a usable teacher."""
    for label, point in stage.points():
        where, teacher = f"grid point {label or '(recipe)'}", point.get("teacher")
        if stage.kind == "distill":
            _teacher(teacher, f"distill ({where})", dense)
        # Chains get a placeholder parent: the real one is chosen when the dense stage has run.
        extra = {} if stage.kind == "dense" else {"parent": _PLACEHOLDER_RUN}
        try:
            STEP_OF_STAGE[stage.kind].from_flat({**point, **extra}).validate()
        except UsageError as err:
            raise _fail(f"{where}: {_plain(err)}", stage.kind) from None
        if stage.kind == "dense" and teacher is not None and not _is_reference(teacher):
            raise _fail(f"{where}: teacher {teacher!r}: a dense run takes {_REFERENCES}", "dense")


def _is_reference(teacher: str) -> bool:
    return teacher.startswith(("models:/", "runs:/")) or bool(_RUN_ID.match(teacher))


def _teacher(value: str | None, at: str, dense: Stage) -> None:
    if value is None:
        raise _fail(f"no teacher; set teacher in recipe or grid: {_TEACHERS}", at)
    try:
        parsed = parse_teacher(value)
    except ValueError as err:
        raise _fail(f"teacher {value!r}: {err}", at) from None
    if isinstance(parsed, TeacherSelector):
        if not any(parsed.accepts({**_defaults(), **p}) for _, p in dense.points()):
            raise _fail(f"teacher {value!r}: no dense run of the study has these options", at)
    elif parsed != PARENT and not _is_reference(parsed):
        raise _fail(f"teacher {value!r}: accepted: {_TEACHERS}", at)


def _chain_seeds(seeds: list[int] | None, at: str, dense: Stage) -> tuple[int, ...] | None:
    """The chain stage's seeds, each one the dense stage trained (None: all of them)."""
    trained = dense.values("seed", config.OptimConfig().seed)
    if seeds is not None and any(s not in trained for s in seeds):
        raise _fail(f"expected seeds the dense stage trains ({', '.join(map(str, trained))}), got {seeds!r}", at)
    return None if seeds is None else tuple(seeds)


def _auto_start(start: _Auto, at: str, dense: Stage) -> AutoStart:
    if start.epoch is not None:
        _saved(start.epoch, [p for _, p in dense.points()], f"{at}.epoch")
    return AutoStart(start.select, start.threshold, start.control_factor, start.epoch)


def _same_threshold(start: AutoStart, kind: str, built: dict[str, Stage]) -> None:
    for other, stage in built.items():
        if isinstance(stage.start, AutoStart) and stage.start.threshold != start.threshold:
            raise _fail(f"{start.threshold:g} differs from stages.{other}.start.threshold ({stage.start.threshold:g}); "
                        "a study has one interpolation threshold", f"{kind}.start.threshold")


def _explicit_starts(items: list[Any], at: str, dense: Stage,
                     seeds: tuple[int, ...] | None) -> tuple[ExplicitStart, ...]:
    starts: list[ExplicitStart] = []
    named: set[tuple[Any, ...]] = set()  # (dense point, epoch, seed): entries may spell one point differently
    for key, item in ((f"{at}[{i}]", item) for i, item in enumerate(items)):
        options = {k: v for k, v in item.given().items() if k != "epoch"}
        start = _checkpoint(options, item.epoch, key, dense, seeds)
        point = _point_of(start.match, dense)
        checkpoints = {(point, start.epoch, seed) for seed in start.seeds}
        if checkpoints & named:
            raise _fail("names the same checkpoint as an earlier entry", key)
        named |= checkpoints
        starts.append(start)
    return tuple(starts)


def _point_of(match: dict[str, Any], dense: Stage) -> tuple[str, ...]:
    """The dense grid point (seed aside) that `match` names, as its axis values."""
    point = next({**_defaults(), **p} for _, p in dense.points()
                 if all(show_value({**_defaults(), **p}[k]) == show_value(v) for k, v in match.items()))
    return tuple(show_value(point[a]) for a in dense.axes if a != "seed")


def _epoch_starts(item: Any, at: str, dense: Stage, seeds: tuple[int, ...] | None) -> tuple[ExplicitStart, ...]:
    # No options: the dense stage's only configuration (its seeds aside).
    options = {k: v for k, v in item.given().items() if k != "epochs"}
    return tuple(_checkpoint(options, epoch, at, dense, seeds, f"{at}.epochs[{i}]")
                 for i, epoch in enumerate(item.epochs))


def _checkpoint(match: dict[str, Any], epoch: int | None, key: str, dense: Stage, seeds: tuple[int, ...] | None,
                epoch_at: str | None = None) -> ExplicitStart:
    """The start named by these dense options (one dense grid point but for its seed), at `epoch`."""
    if not match and epoch_at is None:
        raise _fail(f"expected {_CHECKPOINT}", key)
    for name, value in match.items():
        options = dense.values(name, _TRAIN_FIELDS[name][0].default)
        if show_value(value) not in map(show_value, options):
            raise _fail(f"{show_value(value)} is not a {name} of the dense stage (it has: "
                        f"{', '.join(map(show_value, options))})", f"{key}.{name}")
    label = ",".join(f"{k}={show_value(v)}" for k, v in match.items()) or "(no options)"
    matches = [p for p in (({**_defaults(), **p} for _, p in dense.points()))
               if all(show_value(p[k]) == show_value(v) for k, v in match.items())]
    if not matches:
        raise _fail(f"no dense grid point has {label}", key)
    differ = [a for a in dense.axes if a != "seed" and len({show_value(p[a]) for p in matches}) > 1]
    if differ:
        raise _fail(f"matches {len(matches)} dense runs; also give: {', '.join(differ)}", key)
    trained = sorted({int(p["seed"]) for p in matches})
    if "seed" in match:
        chosen = (int(match["seed"]),)
        if seeds is not None and chosen[0] not in seeds:
            raise _fail(f"seed {chosen[0]} is not one of the stage's seeds ({', '.join(map(str, seeds))})", key)
    else:
        chosen = seeds or tuple(trained)
        missing = [s for s in chosen if s not in trained]
        if missing:
            raise _fail(f"the dense stage trains {label} with seeds {', '.join(map(str, trained))} only, not "
                        f"{', '.join(map(str, missing))}", key)
    if epoch is not None:
        _saved(epoch, matches, epoch_at or f"{key}.epoch")
    return ExplicitStart(match, epoch, chosen)


def _saved(epoch: int, points: list[dict[str, Any]], at: str) -> None:
    for saved in (point.get("save_epochs") or [] for point in points):
        if epoch not in saved:
            raise _fail(f"epoch {epoch} is not saved by the dense stage (save_epochs: "
                        f"{', '.join(map(str, saved)) or 'none'}); add it to its save_epochs", at)


def _defaults() -> dict[str, Any]:
    return {name: f.default for name, (f, _) in _TRAIN_FIELDS.items()}


_Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class _File(_Model):
    name: Annotated[_Text, _must(lambda n: re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", n),
                                 "expected letters, digits, '_', '-' and '.', got {value!r}")]
    description: Optional[_Text] = None
    cost: Optional[_Text] = None
    experiment: Optional[_Text] = None
    storage_path: Optional[_Text] = None
    retries: Annotated[int, Field(ge=0)] = 1
    max_concurrent: Annotated[int, Field(ge=1)] | None = None
    stages: Annotated[_Stages, _must(lambda v: isinstance(v, dict) and v, "expected a non-empty mapping of stages "
                                     f"({', '.join(STAGES)}), got {{kind}}", before=True)] = \
        Field(None, validate_default=True)
