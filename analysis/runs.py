"""Read a study's runs back from MLflow into pandas tables.

The study's stage runs hold `trials.json`, the authoritative list of what the study asked for: a
dense run may have been reused from an earlier study (found by config hash), so it can be nested
under another study's stage; only the trial list finds it. Runs tagged `sdd.study_run_id` and runs
nested under the stages are added in case a stage died before writing its trial list.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID as PARENT_TAG

from sdd.config import PruneConfig, TrainConfig, flat_fields, parse_value
from sdd.errors import UsageError
from sdd.names import CHAIN_METRICS
from sdd.sweep.lineage import TRIALS_ARTIFACT

log = logging.getLogger(__name__)

CHAIN_STEPS = ("prune", "distill")
RUN_ID = re.compile(r"[0-9a-f]{32}")
DENSE_METRICS = ("test_acc", "train_acc", "train_acc_noisy", "train_acc_clean", "val_acc", "num_params",
                 "nonzero_params", "entropy")
# Dense runs that differ only in these share one DD curve: the seeds replicate a run (the noise seed
# follows the seed) and the width is the curve's axis. Every other value that enters the config hash
# (noise kind, epochs, lr, train size, depth, ...) splits the curve; unhashed ones (device, force, data
# folder) never do. A teacher enters by being there or not (its run differs from seed to seed).
DENSE_POOLED = ("seed", "noise_seed", "width", "teacher")
# Chains that differ only in these are the seeds of one SDD curve; the options the group name shows
# anyway (start epoch, criterion, retraining, scope, rate) are left out of its variant suffix.
CHAIN_POOLED = ("seed", "parent", "start_epoch", "criterion", "retrain", "scope", "rate")
# The convergence record of a level or dense run: metric `converged` (1/0), tag `sdd.converged`.
CONVERGED = "converged"
CHAIN_SUMMARY_METRICS = ("levels_run", "epochs_spent", "epochs_full", "train_flops_spent", "train_flops_full",
                         "best_level", "best_val_acc", "best_test_acc", "best_sparsity")


@dataclass(frozen=True)
class Trial:
    """One entry of a stage's trials.json."""

    stage: str
    trial: str
    step: str
    config: Mapping[str, Any]
    run_id: str | None
    status: str
    reused: bool
    error: str | None
    attempts: int


@dataclass
class Study:
    """A study's runs as tables.

    `dense`: one row per finished dense run; `chains`: one row per finished chain (params, tags,
    summary metrics, its dense parent's seed); `levels`: one row per chain level (metric histories);
    `missing`: every trial or run of the study that did not give a finished run.
    """

    run: Run
    stages: list[Run]
    trials: list[Trial]
    dense: pd.DataFrame
    chains: pd.DataFrame
    levels: pd.DataFrame
    missing: pd.DataFrame
    level_runs: int

    @property
    def id(self) -> str:
        return self.run.info.run_id

    @property
    def name(self) -> str:
        return self.run.info.run_name or self.id[:8]

    def recorded_threshold(self) -> tuple[float | None, str]:
        """The IT threshold the study ran with and where it was read: the chain stages' start selection
        (tag `sdd.it_threshold` on the stage runs), else the chains' own (tag `sdd.it_threshold`, else
        param `it_threshold`) when they agree; (None, why) when neither is recorded."""
        staged = {float(t) for r in self.stages if (t := r.data.tags.get("sdd.it_threshold"))}
        if staged:
            if len(staged) > 1:
                log.warning("study %s: its stages selected starts with different thresholds %s; using the "
                            "lowest", self.id[:8], sorted(staged))
            return min(staged), "the study's start selection (stage runs' sdd.it_threshold)"
        chained = set(self.chains["it_threshold"].dropna()) if "it_threshold" in self.chains else set()
        if len(chained) == 1:
            return float(chained.pop()), "its chains' it_threshold"
        if len(chained) > 1:
            return None, f"its chains disagree ({', '.join(f'{x:g}' for x in sorted(chained))})"
        return None, "not recorded on the study's runs"

    @property
    def study_file(self) -> str | None:
        """The study file, as the study run recorded it (tag `sdd.study_file`, else param `file`)."""
        return self.run.data.tags.get("sdd.study_file") or self.run.data.params.get("file") or None


# --- finding the study ---------------------------------------------------------------------------

def _experiment_ids(client: MlflowClient) -> list[str]:
    ids: list[str] = []
    token = None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, page_token=token)
        ids.extend(e.experiment_id for e in page)
        token = page.token
        if not token:
            return ids


def search_all(client: MlflowClient, filter_string: str, *, order_by: list[str] | None = None,
               limit: int | None = None) -> list[Run]:
    """Active runs of every active experiment matching `filter_string`."""
    exp_ids = _experiment_ids(client)
    runs: list[Run] = []
    token = None
    while exp_ids:
        page = client.search_runs(exp_ids, filter_string, max_results=min(limit or 1000, 1000),
                                  order_by=order_by or ["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token or (limit is not None and len(runs) >= limit):
            break
    return runs[:limit] if limit is not None else runs


def _quote(value: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise UsageError(f"study name {value!r} contains both quote characters; pass the study run id instead")


def resolve_study(client: MlflowClient, ref: str) -> Run:
    """The study run named by `ref`: a run id (or runs:/ID), else the newest study run of that name."""
    ref = ref.strip()
    if not ref:
        raise UsageError("--study is empty; pass a study run id or run name")
    run_id = ref[len("runs:/"):].strip("/").split("/")[0] if ref.startswith("runs:/") else ref
    run: Run | None = None
    if RUN_ID.fullmatch(run_id):
        try:
            run = client.get_run(run_id)
        except MlflowException:
            run = None
    if run is None:
        found = search_all(client, f"tags.`sdd.step` = 'study' and attributes.run_name = {_quote(ref)}",
                           order_by=["attributes.start_time DESC"], limit=1)
        run = found[0] if found else None
    if run is None or run.info.lifecycle_stage != "active":
        raise UsageError(f"no study run with id or name {ref!r} in {client.tracking_uri}")
    step = run.data.tags.get("sdd.step")
    if step != "study":
        raise UsageError(f"run {run.info.run_id} is not a study run (sdd.step={step or 'missing'}); "
                         "pass the run id or name of an `sdd study` run")
    return run


# --- reading --------------------------------------------------------------------------------------

def load_study(client: MlflowClient, study_run: Run) -> Study:
    """Every run of the study, as tables; a UsageError if nothing finished that could be analysed."""
    study_id = study_run.info.run_id
    stages = search_all(client, f"tags.`{PARENT_TAG}` = '{study_id}' and tags.`sdd.step` = 'sweep'")
    trials = [t for stage in stages for t in _trials(client, stage)]
    runs = _study_runs(client, study_id, stages, trials)
    finished = {rid: r for rid, r in runs.items() if r.info.status == "FINISHED"}
    dense_runs = [r for r in finished.values() if r.data.tags.get("sdd.step") == "train"]
    chain_runs = [r for r in finished.values() if r.data.tags.get("sdd.step") in CHAIN_STEPS]
    if not dense_runs and not chain_runs:
        raise UsageError(f"study {study_run.info.run_name or study_id} ({study_id}) has no finished dense or "
                         f"chain runs to analyse ({len(trials)} trials in {len(stages)} stage runs)")
    reused = {t.run_id for t in trials if t.reused and t.run_id}
    dense = _dense_table(dense_runs, study_id, reused)
    chains = _chain_table(client, chain_runs, dense, study_id, reused)
    levels = _level_table(client, chain_runs)
    missing = _missing_table(trials, runs, stages)
    level_runs = sum(_count_level_runs(client, r) for r in chain_runs)
    log.info("study %s: %d dense runs, %d chains (%d levels), %d missing", study_id[:8], len(dense), len(chains),
             len(levels), len(missing))
    return Study(study_run, stages, trials, dense, chains, levels, missing, level_runs)


def _trials(client: MlflowClient, stage: Run) -> list[Trial]:
    stage_name = stage.data.tags.get("sdd.stage") or stage.info.run_name or stage.info.run_id[:8]
    names = {a.path for a in client.list_artifacts(stage.info.run_id)}
    if TRIALS_ARTIFACT not in names:
        log.warning("stage run %s (%s) has no %s; its runs are found by tags only", stage.info.run_id,
                    stage_name, TRIALS_ARTIFACT)
        return []
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(client.download_artifacts(stage.info.run_id, TRIALS_ARTIFACT, tmp)).read_text()
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as err:
        log.warning("stage run %s: unreadable %s (%s)", stage.info.run_id, TRIALS_ARTIFACT, err)
        return []
    return [Trial(stage=stage_name, trial=str(e.get("trial", "")), step=str(e.get("step", "")),
                  config=e.get("config") or {}, run_id=e.get("run_id") or None,
                  status=str(e.get("status") or "UNKNOWN"), reused=bool(e.get("reused")), error=e.get("error"),
                  attempts=int(e.get("attempts") or 0))
            for e in entries]


def _study_runs(client: MlflowClient, study_id: str, stages: list[Run], trials: list[Trial]) -> dict[str, Run]:
    runs: dict[str, Run] = {}
    for trial in trials:
        if trial.run_id and trial.run_id not in runs:
            try:
                run = client.get_run(trial.run_id)
            except MlflowException:
                log.warning("trial %s names run %s, which does not exist", trial.trial, trial.run_id)
                continue
            if run.info.lifecycle_stage == "active":
                runs[trial.run_id] = run
    extra = search_all(client, f"tags.`sdd.study_run_id` = '{study_id}'")
    for stage in stages:
        extra += search_all(client, f"tags.`{PARENT_TAG}` = '{stage.info.run_id}'")
    for run in extra:
        if run.data.tags.get("sdd.step") in ("train", *CHAIN_STEPS):
            runs.setdefault(run.info.run_id, run)
    return runs


def _num(values: Mapping[str, str], key: str) -> float | None:
    text = values.get(key)
    if text in (None, "", "None"):
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _int(values: Mapping[str, str], key: str) -> int | None:
    value = _num(values, key)
    return int(value) if value is not None else None


def family_label(dataset: str, model: str, depth: int | None) -> str:
    return f"{dataset} {model}" + (f" d{depth}" if depth and depth != 1 else "")


def _curve_fields(cls: type, pooled: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    """{name: (default, type)} of the hashed config fields that split a curve."""
    return {name: (f.default, tp) for name, (f, tp) in flat_fields(cls).items()
            if f.metadata.get("hashed", True) and name not in pooled}


def _config_values(params: Mapping[str, str], fields: Mapping[str, tuple[Any, Any]]) -> dict[str, str]:
    """Each field's value, parsed so that one value has one spelling ("1e-3" and "0.001"); a param
    missing from an older run reads as the field's default."""
    out = {}
    for name, (default, tp) in fields.items():
        text = params.get(name)
        try:
            value = default if text is None else parse_value(tp, text)
        except ValueError:
            value = text
        out[name] = f"{value:g}" if isinstance(value, float) else str(value)
    return out


def _variant_labels(values: Sequence[Mapping[str, str]], shown: Sequence[str] = ()) -> list[str]:
    """Per row, "k=v" for every key whose value differs between rows (`shown` keys are printed elsewhere)."""
    keys = [k for k in (values[0] if values else {}) if k not in shown and len({v[k] for v in values}) > 1]
    return [" ".join(f"{k}={v[k]}" for k in keys) for v in values]


def _converged(run: Run) -> bool | None:
    """Whether the run's training converged (tag sdd.converged, else metric converged); None: not recorded."""
    tag = run.data.tags.get(f"sdd.{CONVERGED}")
    if tag in ("true", "false"):
        return tag == "true"
    value = run.data.metrics.get(CONVERGED)
    return None if value is None else value >= 0.5


def _dense_table(runs: Iterable[Run], study_id: str, reused: set[str]) -> pd.DataFrame:
    rows, keys = [], []
    fields = _curve_fields(TrainConfig, DENSE_POOLED)
    for run in runs:
        p, m, t = run.data.params, run.data.metrics, run.data.tags
        dataset, model, depth = p.get("dataset", "?"), p.get("model", "?"), _int(p, "depth")
        rows.append({
            "run_id": run.info.run_id, "run_name": run.info.run_name, "family": family_label(dataset, model, depth),
            "dataset": dataset, "model": model, "depth": depth, "width": _int(p, "width"),
            "noise": _num(p, "noise"), "noise_kind": p.get("noise_kind"), "seed": _int(p, "seed"),
            "epochs": _int(p, "epochs"), "test_size": _test_size(run),
            **{k: m.get(k, float("nan")) for k in DENSE_METRICS}, CONVERGED: _converged(run),
            "reused": run.info.run_id in reused or t.get("sdd.study_run_id") not in (None, study_id),
        })
        keys.append({**_config_values(p, fields), "teacher": str(p.get("teacher", "none") not in ("", "none", "None"))})
    # The family names one DD curve per noise level: its model plus every other value that differs
    # between the study's dense runs (the dataset, model, depth and noise are shown already).
    for row, variant in zip(rows, _variant_labels(keys, ("dataset", "model", "depth", "noise"))):
        row["family"] += f" {variant}" if variant else ""
    frame = pd.DataFrame(rows, columns=["run_id", "run_name", "family", "dataset", "model", "depth", "width",
                                        "noise", "noise_kind", "seed", "epochs", "test_size", *DENSE_METRICS,
                                        CONVERGED, "reused"])
    return frame.sort_values(["family", "noise", "width", "seed"], ignore_index=True)


def _test_size(run: Run) -> int | None:
    """The run's test-set size (the binomial floor of every verdict): param `test_size`, else the
    `num_rows` of its logged test dataset input (the param is empty when the dataset's default was used)."""
    size = _int(run.data.params, "test_size")
    if size is not None:
        return size
    for item in run.inputs.dataset_inputs if run.inputs else ():
        if any(t.key == MLFLOW_DATASET_CONTEXT and t.value == "test" for t in item.tags):
            try:
                return int(json.loads(item.dataset.profile or "{}")["num_rows"])
            except (KeyError, TypeError, ValueError):
                return None
    return None


def _chain_table(client: MlflowClient, runs: Iterable[Run], dense: pd.DataFrame, study_id: str,
                 reused: set[str]) -> pd.DataFrame:
    seeds = dict(zip(dense["run_id"], dense["seed"]))
    families = dict(zip(dense["run_id"], dense["family"]))
    fields = _curve_fields(PruneConfig, CHAIN_POOLED)
    rows, keys = [], []
    for run in runs:
        p, m, t = run.data.params, run.data.metrics, run.data.tags
        dense_id = t.get("sdd.dense_run_id") or p.get("parent", "")
        if dense_id not in seeds:
            seeds[dense_id] = _parent_seed(client, dense_id)
        step = t.get("sdd.step", "prune")
        depth = _int(p, "dense_depth")
        row = {
            "chain_run_id": run.info.run_id, "run_name": run.info.run_name, "step": step, "dense_run_id": dense_id,
            # the parent's DD curve; a parent outside the study's dense runs: its model
            "family": families.get(dense_id) or family_label(p.get("dataset", "?"), p.get("dense_model", "?"), depth),
            "dataset": p.get("dataset"), "model": p.get("dense_model"), "depth": depth,
            "width": _int(p, "dense_width"), "noise": _num(p, "noise"), "dense_seed": seeds[dense_id],
            "start_epoch": _int(p, "start_epoch"), "criterion": p.get("criterion"), "retrain": p.get("retrain"),
            "scope": p.get("scope"), "rate": _num(p, "rate"),
            "alpha": _num(p, "alpha") if step == "distill" else None,
            "temperature": _num(p, "temperature") if step == "distill" else None,
            "teacher": t.get("sdd.teacher_uri") or p.get("teacher") or None,
            "it_threshold": _num(t, "sdd.it_threshold") or _num(p, "it_threshold"),
            "start_role": t.get("sdd.start_role"), "entropy_drop": _num(p, "entropy_drop"),
            "acc_tolerance": _num(p, "acc_tolerance"), "early_stop": p.get("early_stop"),
            "it_level_tag": t.get("sdd.it_level"), "phases_tag": t.get("sdd.phases"),
            "early_stop_level_tag": _int(t, "sdd.early_stop_level"),
            **{k: m.get(k, float("nan")) for k in CHAIN_SUMMARY_METRICS},
            "reused": run.info.run_id in reused or t.get("sdd.study_run_id") not in (None, study_id),
        }
        row["setting"] = _setting(row)
        rows.append(row)
        keys.append(_config_values(p, fields))
    # Chains that differ in any other option (levels, epochs, lr, early stop, ...) are different curves.
    for row, variant in zip(rows, _variant_labels(keys)):
        row["variant"] = variant
        row["label"] = f"w{row['width']} s{row['dense_seed']}" + \
            (f" e{row['start_epoch']}" if row["start_epoch"] is not None else "") + f" {row['setting']}" + \
            (f" {variant}" if variant else "")
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=["chain_run_id", "step", "dense_run_id", "family", "width", "noise",
                                     "dense_seed", "start_epoch", "setting", "label", "reused"])
    # Chains that differ only in the dense seed form one group: its members are the seeds of one curve.
    # The teacher is left out: a distilled chain's teacher is usually its own seed's dense model.
    frame["group"] = frame.apply(lambda r: f"{r['family']} n{r['noise']} w{r['width']}"
                                 + (f" e{r['start_epoch']}" if r["start_epoch"] is not None else "")
                                 + f" {r['setting']}"
                                 + "".join(f" {k}={r[k]}" for k in ("scope", "rate") if pd.notna(r[k]))
                                 + (f" {r['variant']}" if r["variant"] else ""), axis=1)
    frame["start_epoch"] = frame["start_epoch"].astype("object")
    order = frame["step"].map({step: i for i, step in enumerate(CHAIN_STEPS)})  # vanilla before distilled
    frame = frame.assign(_order=order).sort_values(["family", "noise", "width", "_order", "setting", "dense_seed"])
    return frame.drop(columns="_order").reset_index(drop=True)


def _setting(row: Mapping[str, Any]) -> str:
    text = f"{row['step']} {row['criterion']}/{row['retrain']}"
    if row["step"] == "distill" and row["alpha"] is not None:
        text += f" a{row['alpha']:g} T{row['temperature']:g}"
    return text


def _parent_seed(client: MlflowClient, run_id: str) -> int | None:
    try:
        return _int(client.get_run(run_id).data.params, "seed")
    except MlflowException:
        return None


def _level_table(client: MlflowClient, runs: Iterable[Run]) -> pd.DataFrame:
    rows: list[dict[str, Any]] = []
    for run in runs:
        per_level: dict[int, dict[str, float]] = {}
        for key in dict.fromkeys((*CHAIN_METRICS, CONVERGED)):
            if key not in run.data.metrics:
                continue
            # A resumed chain may log a level twice: the later value wins.
            for metric in sorted(client.get_metric_history(run.info.run_id, key), key=lambda x: (x.step, x.timestamp)):
                per_level.setdefault(metric.step, {})[key] = metric.value
        rows.extend({"chain_run_id": run.info.run_id, "level": level, **values}
                    for level, values in sorted(per_level.items()))
    frame = pd.DataFrame(rows, columns=["chain_run_id", "level", *dict.fromkeys((*CHAIN_METRICS, CONVERGED))])
    frame["density"] = 1.0 - frame["sparsity"]
    return frame


def _missing_table(trials: list[Trial], runs: Mapping[str, Run], stages: list[Run]) -> pd.DataFrame:
    rows = [{"stage": stage.data.tags.get("sdd.stage", ""), "trial": "(the whole stage)", "step": "sweep",
             "status": "NOT RUN", "run_id": stage.info.run_id, "attempts": 0,
             "error": _one_line(stage.data.tags["sdd.not_run"]), "config": {}}
            for stage in stages if "sdd.not_run" in stage.data.tags]
    seen: set[str] = set()
    for trial in trials:
        run = runs.get(trial.run_id) if trial.run_id else None
        status = run.info.status if run is not None else trial.status
        if trial.run_id:
            seen.add(trial.run_id)
        if status == "FINISHED":
            continue
        error = trial.error or (run.data.tags.get("sdd.error") if run is not None else None)
        if trial.run_id and run is None and trial.status == "FINISHED":
            status, error = "MISSING", f"run {trial.run_id} no longer exists"
        rows.append({"stage": trial.stage, "trial": trial.trial, "step": trial.step, "status": status,
                     "run_id": trial.run_id, "attempts": trial.attempts, "error": _one_line(error),
                     "config": dict(trial.config)})
    for run_id, run in runs.items():
        if run_id not in seen and run.info.status != "FINISHED":
            rows.append({"stage": "", "trial": run.info.run_name, "step": run.data.tags.get("sdd.step"),
                         "status": run.info.status, "run_id": run_id, "attempts": 0,
                         "error": _one_line(run.data.tags.get("sdd.error")), "config": dict(run.data.params)})
    return pd.DataFrame(rows, columns=["stage", "trial", "step", "status", "run_id", "attempts", "error", "config"])


def _one_line(text: str | None) -> str:
    if not text:
        return ""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    line = lines[-1] if lines else ""  # a traceback's last line names the error
    return line if len(line) <= 200 else line[:197] + "..."


def _count_level_runs(client: MlflowClient, chain: Run) -> int:
    count, token = 0, None
    while True:
        page = client.search_runs([chain.info.experiment_id],
                                  f"tags.`{PARENT_TAG}` = '{chain.info.run_id}' and tags.`sdd.step` = 'level' "
                                  "and attributes.status = 'FINISHED'",
                                  max_results=1000, page_token=token)
        count += len(page)
        token = page.token
        if not token:
            return count


# --- reading the tables ------------------------------------------------------------------------

def select(frame: pd.DataFrame, family: str, noise: float | None) -> pd.DataFrame:
    """Rows of one family and noise level (a missing noise param matches missing)."""
    same_noise = frame["noise"].isna() if pd.isna(noise) else frame["noise"] == noise
    return frame[(frame["family"] == family) & same_noise]
