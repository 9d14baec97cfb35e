"""Study files: typed parsing, grid points, starting checkpoints, resources, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdd.errors import UsageError
from sdd.sweep.study_file import AutoStart, ExplicitStart, ResourceRule, TeacherSelector, load_study, parse_teacher

ROOT = Path(__file__).resolve().parents[1]

GOOD = """
name: demo
retries: 2
stages:
  dense:
    recipe: {dataset: mnist1d, model: mlp, epochs: 100, lr: 1e-3, save_epochs: [50]}
    grid: {width: [8, 64], noise: [0.1, 0.2], seed: [0, 1]}
    resources:
      - {max_width: 16, cpu: 1, gpu: 0.25}
      - {cpu: 2, gpu: 1}
  prune:
    start: {select: [below, at], threshold: 0.9, epoch: 50}
    seeds: [1]
    recipe: {levels: 3, epochs: 20}
    grid: {retrain: [lr_rewind, finetune], criterion: [magnitude]}
  distill:
    start:
      - {width: 64, noise: 0.2, seed: 0}
    recipe: {levels: 2}
    grid: {teacher: [best_dense, "best_dense:width=8", parent]}
"""


def write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(UsageError) as info:
        load_study(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_good_file_is_typed(tmp_path):
    study = load_study(write(tmp_path, GOOD))
    assert study.name == "demo" and study.retries == 2 and study.stage_names() == ["dense", "prune", "distill"]
    dense = study.stages["dense"]
    assert dense.recipe["lr"] == 1e-3  # YAML reads 1e-3 as text; the field's type decides
    points = dense.points()
    assert len(points) == 8
    assert points[0] == ("width=8,noise=0.1,seed=0", {"dataset": "mnist1d", "model": "mlp", "epochs": 100,
                                                      "lr": 1e-3, "save_epochs": [50], "width": 8, "noise": 0.1,
                                                      "seed": 0})
    assert dense.resources.for_width(8) == ResourceRule(1.0, 0.25, 16)
    assert dense.resources.for_width(64) == ResourceRule(2.0, 1.0, None)
    assert study.stages["prune"].start == AutoStart(("below", "at"), 0.9, 4.0, 50)
    assert study.stages["prune"].seeds == (1,)
    assert study.stages["distill"].start == (ExplicitStart({"width": 64, "noise": 0.2, "seed": 0}, None, (0,)),)
    assert study.it_threshold == 0.9
    assert [p for _, p in study.stages["distill"].points()][1]["teacher"] == "best_dense:width=8"


def test_union_of_grids(tmp_path):
    study = load_study(write(tmp_path, """
stages:
  dense:
    recipe: {epochs: 10}
    grid:
      - {model: [mlp], width: [8, 16]}
      - {model: [cnn1d], width: [4]}
  prune:
    start: [{model: cnn1d}]
"""))
    assert [label for label, _ in study.stages["dense"].points()] == [
        "model=mlp,width=8", "model=mlp,width=16", "model=cnn1d,width=4"]
    assert study.name == "study"  # the file's stem


def test_teacher_selector():
    assert parse_teacher("best_dense") == TeacherSelector({})
    assert parse_teacher("best_dense:model=resnet18,width=64") == TeacherSelector({"model": "resnet18", "width": 64})
    assert parse_teacher("parent") == "parent"
    with pytest.raises(ValueError):
        parse_teacher("best_dense:colour=red")


@pytest.mark.parametrize("text, expected", [
    ("stages: {dense: {grid: {width: [8]}}, extra: 1}", "stages.extra: unknown key; accepted: dense, prune, distill"),
    ("color: red\nstages: {dense: {}}", "color: unknown key; accepted: name,"),
    ("stages: {}", "stages: expected a non-empty mapping of stages"),
    ("stages: {dense: {grid: {widht: [8]}}}",
     "stages.dense.grid.widht: unknown option (did you mean width?); accepted: dataset,"),
    ("stages: {dense: {grid: {width: []}}}", "stages.dense.grid.width: expected a non-empty list of values"),
    ("stages: {dense: {grid: {width: 8}}}", "stages.dense.grid.width: expected a non-empty list of values"),
    ("stages: {dense: {grid: {width: [8, eight]}}}", "stages.dense.grid.width[1]: expected an integer, got 'eight'"),
    ("stages: {dense: {grid: {width: [8, 8]}}}", "stages.dense.grid.width: lists a value twice"),
    ("stages: {dense: {recipe: {augment: 3}}}", "stages.dense.recipe.augment: expected true or false, got 3"),
    ("stages: {dense: {recipe: {model: lstm}}}", "stages.dense.recipe.model: expected one of mlp, cnn1d,"),
    ("stages: {dense: {recipe: {width: 8}, grid: {width: [8]}}}", "stages.dense.grid.width: is also in recipe"),
    ("stages: {dense: {grid: {width: [0]}}}", "stages.dense: grid point width=0: width must be > 0, got 0"),
    ("stages: {dense: {recipe: {noise: 1.5}}}", "stages.dense: grid point (recipe): noise must be in [0, 1)"),
    ("stages: {prune: {start: [{width: 8}]}}", "stages.prune: needs a dense stage in the same file"),
    ("stages: {dense: {grid: {width: [8, 16]}}, prune: {start: [{width: 48}]}}",
     "stages.prune.start[0].width: 48 is not a width of the dense stage (it has: 8, 16)"),
    ("stages: {dense: {grid: {width: [8], noise: [0.1, 0.2], seed: [0, 1]}}, prune: {start: [{width: 8}]}}",
     "stages.prune.start[0]: matches 4 dense runs; also give: noise"),
    ("stages: {dense: {grid: {width: [8], seed: [0, 1]}}, prune: {start: {}, seeds: [0, 2]}}",
     "stages.prune.seeds: expected seeds the dense stage trains (0, 1), got [0, 2]"),
    ("stages: {dense: {grid: {width: [8], seed: [0, 1]}}, prune: {start: {}, seeds: [1, 1]}}",
     "stages.prune.seeds: lists a seed twice"),
    ("stages: {dense: {grid: {width: [8]}}, prune: {start: {}, recipe: {seed: 1}}}",
     "stages.prune.recipe.seed: is the dense parent's seed; choose the chains' seeds with the stage's `seeds`"),
    ("stages: {dense: {grid: {width: [8]}}, distill: {start: {}, grid: {seed: [0, 1]}}}",
     "stages.distill.grid.seed: is the dense parent's seed"),
    ("stages: {dense: {grid: {width: [8], seed: [0, 1]}}, prune: {start: [{width: 8, seed: 1}], seeds: [0]}}",
     "stages.prune.start[0]: seed 1 is not one of the stage's seeds (0)"),
    ("stages: {dense: {grid: {width: [8], seed: [0, 1]}}, prune: {start: [{width: 8}, {width: 8, seed: 1}]}}",
     "stages.prune.start[1]: names the same checkpoint as an earlier entry"),
    ("stages: {dense: {grid: [{width: [8], seed: [0, 1]}, {width: [16]}]}, prune: {start: [{width: 16}], "
     "seeds: [0, 1]}}", "stages.prune.start[0]: the dense stage trains width=16 with seeds 0 only, not 1"),
    ("stages: {dense: {grid: {width: [8]}}, prune: {start: {threshold: 0.9}}, "
     "distill: {start: {threshold: 0.95}, recipe: {teacher: parent}}}",
     "stages.distill.start.threshold: 0.95 differs from stages.prune.start.threshold (0.9); a study has one"),
    ("stages: {dense: {recipe: {epochs: 10, save_epochs: [5]}, grid: {width: [8]}}, prune: {start: {epochs: [5, 7]}}}",
     "stages.prune.start.epochs[1]: epoch 7 is not saved by the dense stage (save_epochs: 5)"),
    ("stages: {dense: {grid: {width: [8]}}, prune: {start: {epochs: []}}}",
     "stages.prune.start.epochs: expected a non-empty list"),
    ("stages: {dense: {recipe: {epochs: 10, save_epochs: [5]}}, prune: {start: {epochs: [5, 5]}}}",
     "stages.prune.start.epochs: lists an epoch twice"),
    ("stages: {dense: {recipe: {epochs: 10, save_epochs: [5]}, grid: {width: [8, 16]}}, prune: {start: {epochs: [5]}}}",
     "stages.prune.start: matches 2 dense runs; also give: width"),
    ("stages: {dense: {recipe: {epochs: 10, save_epochs: [5]}}, prune: {start: {epochs: [5], select: [at]}}}",
     "stages.prune.start.select: unknown option"),
    ("stages: {dense: {grid: {width: [8]}}, prune: {start: [{width: 8, epoch: 5}]}}",
     "stages.prune.start[0].epoch: epoch 5 is not saved by the dense stage"),
    ("stages: {dense: {grid: {width: [8]}}, prune: {start: {select: [middle]}}}",
     "stages.prune.start.select: expected a non-empty list of: before, below, at, above, after"),
    ("stages: {dense: {grid: {width: [8]}}, prune: {}}", "stages.prune.start: missing"),
    ("stages: {dense: {grid: {width: [8]}}, prune: {start: {}, recipe: {parent: abc}}}",
     "stages.prune.recipe.parent: is set by the starting checkpoint"),
    ("stages: {dense: {grid: {width: [8]}}, prune: {start: {}, recipe: {rate: 2}}}",
     "stages.prune: grid point (recipe): rate must be in (0, 1), got 2.0"),
    ("stages: {dense: {grid: {width: [8]}}, distill: {start: {}}}", "stages.distill (grid point (recipe)): no teacher"),
    ("stages: {dense: {grid: {width: [8]}}, distill: {start: {}, recipe: {teacher: best}}}",
     "teacher 'best': accepted: best_dense,"),
    ("stages: {dense: {grid: {width: [8]}}, distill: {start: {}, recipe: {teacher: 'best_dense:width=9'}}}",
     "teacher 'best_dense:width=9': no dense run of the study has these options"),
    ("stages: {dense: {resources: {cpu: 0}}}", "stages.dense.resources.cpu: expected a number > 0, got 0"),
    ("stages: {dense: {resources: {cpu: 1, gpu: 1.5}}}", "stages.dense.resources.gpu: fractions share one GPU"),
    ("stages: {dense: {resources: {cpu: 1, ram: 4}}}", "stages.dense.resources.ram: unknown key; accepted: max_width"),
    ("stages: {dense: {grid: {width: [8, 64]}, resources: [{max_width: 16, cpu: 1}]}}",
     "stages.dense.resources: no rule covers width 64"),
    ("stages: {dense: {resources: [{cpu: 1}, {max_width: 16, cpu: 1}]}}",
     "stages.dense.resources: only the last rule may omit max_width"),
    ("retries: -1\nstages: {dense: {}}", "retries: expected an integer >= 0, got -1"),
    ("name: 'a b'\nstages: {dense: {}}", "name: expected letters, digits"),
    ("stages: [dense]", "stages: expected a non-empty mapping of stages"),
    ("stages: {dense: {grid: {width: [8}}", "not valid YAML at line 1"),
])
def test_bad_files_fail_with_one_line(tmp_path, text, expected):
    message = error(tmp_path, text)
    assert message.startswith(str(tmp_path / "study.yaml") + ": ") or message.startswith("study.yaml: ")
    assert expected in message, message


def test_chain_seeds_follow_the_dense_seeds(tmp_path):
    # Without `seeds`, every start runs one chain per dense seed; a start that names a seed runs that one.
    study = load_study(write(tmp_path, """
stages:
  dense:
    recipe: {epochs: 100, save_epochs: [10, 50, 100]}
    grid: {width: [8, 64], seed: [0, 1, 2]}
  prune:
    start: [{width: 8}, {width: 64, seed: 2, epoch: 50}]
  distill:
    start: {epochs: [10, 100], width: 64}
    seeds: [0, 2]
    recipe: {teacher: parent}
"""))
    prune, distill = study.stages["prune"], study.stages["distill"]
    assert prune.seeds is None and prune.start == (ExplicitStart({"width": 8}, None, (0, 1, 2)),
                                                   ExplicitStart({"width": 64, "seed": 2}, 50, (2,)))
    # Along training time: one start per epoch (the final one too, when saved), each for the stage's seeds.
    assert distill.seeds == (0, 2)
    assert distill.start == (ExplicitStart({"width": 64}, 10, (0, 2)), ExplicitStart({"width": 64}, 100, (0, 2)))


def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match="study file .*nope.yaml not found"):
        load_study(tmp_path / "nope.yaml")


def test_display_path_is_relative_inside_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweeps").mkdir()
    write(tmp_path / "sweeps", "stages: {dense: {}}", "s.yaml")
    study = load_study("sweeps/s.yaml")
    assert study.display_path == "sweeps/s.yaml"
    assert len(study.content_hash) == 16


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "sweeps").glob("*.yaml")))
def test_presets_load(preset):
    study = load_study(ROOT / "sweeps" / preset)
    assert "dense" in study.stages and study.description
