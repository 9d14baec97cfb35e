"""The numbers behind the report: DD curve and IT per noise level, phases per chain, what the entropy
early stop saves, the registered model, and (from `analysis.verdicts`) every claim with its statistics.

Phases and thresholds are recomputed from the metric histories with `sdd.phases`, the functions the
chains used for their tags, so a figure, a table and a tag follow one rule (and disagree only when a
chain was tagged with another threshold, which the report points out).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from mlflow import MlflowClient

from analysis import stats
from analysis.runs import CONVERGED, Study, select
from analysis.verdicts import Verdict, bad_start_verdicts, dd_verdicts, distill_verdicts, level_at, seed_groups
from sdd import registry
from sdd.phases import (LEVEL_PHASES, NEVER_INTERPOLATED, NO_IT, best_level, entropy_early_stop, it_level_label,
                        pruning_threshold, sdd_phases, width_threshold)

log = logging.getLogger(__name__)

DEFAULT_ENTROPY_DROP = 0.1
DEFAULT_ACC_TOLERANCE = 0.02
CURVE_METRICS = ("test_acc", "train_acc", "train_acc_noisy", "val_acc", "test_err", "train_err", "noisy_err")


@dataclass
class Analysis:
    """Everything the figures and the report show, computed once."""

    study: Study
    threshold: float
    curve: pd.DataFrame        # per family, noise, width: seed statistics of the dense runs
    thresholds: pd.DataFrame   # per family, noise: IT width and DD test-error peak
    levels: pd.DataFrame       # study.levels + recomputed phase per level
    chains: pd.DataFrame       # per chain: phases, best level, early stop
    groups: pd.DataFrame       # per seed group of chains: SDD and retrace verdicts of its seeds x levels curve
    distill: pd.DataFrame      # per distilled group: the distillation verdict against its vanilla group
    starts: pd.DataFrame       # per chain setting: is the IT a bad start, against the control starts
    registered: pd.DataFrame   # the best-sparse registered model of each dataset x model family
    verdicts: list[Verdict]    # every claim, as decided by analysis.stats (verdicts.json)
    threshold_source: str = "given"  # where `threshold` came from, as the report says it


def analyse(client: MlflowClient, study: Study, threshold: float) -> Analysis:
    """Everything the report needs from a loaded study; `threshold` is the IT rule's noisy-fit level."""
    dense = curve_runs(study.dense)
    curve = dd_curve(dense)
    thresholds = interpolation_thresholds(curve, threshold)
    dd = dd_verdicts(dense)
    if len(thresholds):
        columns = pd.DataFrame([{"family": v.key["family"], "noise": v.key["noise"], **v.columns()} for v in dd])
        thresholds = thresholds.merge(columns, on=["family", "noise"], how="left")
    levels = study.levels.copy()
    levels["phase"] = pd.Series(dtype="object")
    rows = []
    for chain in study.chains.to_dict("records"):
        mask = levels["chain_run_id"] == chain["chain_run_id"]
        history = levels[mask].sort_values("level")
        result = chain_result(chain, history, thresholds, threshold)
        levels.loc[history.index, "phase"] = result.pop("phases")
        if result["phases_match"] is False:
            log.warning("chain %s: its sdd.phases / sdd.it_level tags disagree with the phases recomputed at "
                        "threshold %g (the report shows both)", chain["chain_run_id"], threshold)
        rows.append(result)
    chains = pd.DataFrame(rows)
    registered = registered_models(client, study)
    if not chains.empty:
        holders = {r["chain_run_id"]: f"{r['name']} v{r['version']}" for r in registered.to_dict("records")
                   if not pd.isna(r["version"])}
        chains["registered"] = chains["chain_run_id"].map(holders).fillna("")
    groups, chain_verdicts = seed_groups(chains, levels, dense)
    distill, distill_found = distill_verdicts(chains, levels, groups, dense)
    starts, start_found = bad_start_verdicts(chains, levels, dense)
    return Analysis(study, threshold, curve, thresholds, levels, chains, groups, distill, starts, registered,
                    dd + chain_verdicts + distill_found + start_found)


# --- DD curve ---------------------------------------------------------------------------------------

def curve_runs(dense: pd.DataFrame) -> pd.DataFrame:
    """The dense runs that have a place on a DD curve: those without a width param are left out, with a warning."""
    missing = dense["width"].isna()
    if missing.any():
        log.warning("%d dense run(s) have no width param and are left out of the DD curves: %s", int(missing.sum()),
                    ", ".join(dense.loc[missing, "run_id"].str[:8]))
    return dense[~missing].reset_index(drop=True)


# test metrics: their band keeps the test set's binomial floor under the seeds' spread
BAND_FLOORED = ("test_acc", "test_err")


def dd_curve(dense: pd.DataFrame) -> pd.DataFrame:
    """Mean, min, max and std over seeds of every curve metric, per family, noise and width, and the
    mean's 95% CI over seeds (`<metric>_lo`, `<metric>_hi`; analysis.stats.seed_band)."""
    frame = dense.assign(test_err=1 - dense["test_acc"], train_err=1 - dense["train_acc"],
                         noisy_err=1 - dense["train_acc_noisy"])
    keys = ["family", "noise", "width"]
    if frame.empty:
        cols = keys + ["n_seeds", "num_params"] + [f"{m}_{s}" for m in CURVE_METRICS
                                                    for s in ("mean", "min", "max", "std")]
        return pd.DataFrame(columns=cols)
    grouped = frame.groupby(keys, dropna=False)
    stats = grouped[list(CURVE_METRICS)].agg(["mean", "min", "max", "std"])
    stats.columns = [f"{m}_{s}" for m, s in stats.columns]
    stats["n_seeds"] = grouped["run_id"].count()
    stats["num_params"] = grouped["num_params"].mean()
    for metric in CURVE_METRICS:  # groups iterate in the order of the aggregate's rows
        bands = [band(part[metric].to_numpy(float), part["test_size"].min() if metric in BAND_FLOORED else None)
                 for _key, part in grouped]
        stats[f"{metric}_lo"] = [low for low, _ in bands]
        stats[f"{metric}_hi"] = [high for _, high in bands]
    return stats.reset_index().sort_values(keys, ignore_index=True)


def band(values: Sequence[float], n_test: Any = None) -> tuple[float, float]:
    """The 95% CI over seeds of one point's mean (NaN with fewer than two seeds)."""
    known = [v for v in values if not math.isnan(v)]
    if len(known) < 2:
        return math.nan, math.nan
    size = None if n_test is None or pd.isna(n_test) else int(n_test)
    _, low, high = stats.seed_band([[v] for v in known], size)
    return float(low[0]), float(high[0])


def interpolation_thresholds(curve: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Per family and noise level: the IT width (first width whose mean noisy-subset train accuracy
    reaches `threshold`) and the DD peak of the mean test error (see `dd_peak`)."""
    rows = []
    for (family, noise), part in curve.groupby(["family", "noise"], dropna=False, sort=True):
        part = part.sort_values("width")
        noisy = part["train_acc_noisy_mean"]
        has_noisy = bool(noisy.notna().any())
        it = width_threshold(part["width"].tolist(), noisy.fillna(-1.0).tolist(), threshold) if has_noisy else None
        peak = dd_peak(part["test_err_mean"].tolist())
        peak = part.iloc[peak] if peak is not None else None
        it_params = part.loc[part["width"] == it, "num_params"].iloc[0] if it is not None else math.nan
        rows.append({"kind": "dd", "family": family, "noise": noise, "it_width": it, "it_num_params": it_params,
                     "it_threshold": threshold, "noisy_fit_available": has_noisy,
                     "max_noisy_fit": float(noisy.max()) if has_noisy else math.nan,
                     "peak_err_width": peak["width"] if peak is not None else None,
                     "peak_test_err": peak["test_err_mean"] if peak is not None else math.nan,
                     "n_widths": len(part), "min_seeds": int(part["n_seeds"].min()),
                     "max_seeds": int(part["n_seeds"].max())})
    return pd.DataFrame(rows, columns=["kind", "family", "noise", "it_width", "it_num_params", "it_threshold",
                                       "noisy_fit_available", "max_noisy_fit", "peak_err_width", "peak_test_err",
                                       "n_widths", "min_seeds", "max_seeds"])


def dd_peak(test_err: Sequence[float]) -> int | None:
    """Index of the DD peak along width: the point whose test error rises most above the best
    smaller model's. None when the error never rises with width (no peak inside the sweep)."""
    best, low, peak = 0.0, math.inf, None
    for i, err in enumerate(test_err):
        if not math.isnan(err):
            if err - low > best:
                best, peak = err - low, i
            low = min(low, err)
    return peak



def phase_bounds(levels: Sequence[int], phases: Sequence[str]) -> dict[str, int | None]:
    bounds: dict[str, int | None] = {}
    for phase in LEVEL_PHASES:
        at = [lv for lv, p in zip(levels, phases) if p == phase]
        bounds[f"{phase}_first"] = at[0] if at else None
        bounds[f"{phase}_last"] = at[-1] if at else None
    return bounds



def dense_reference(curve: pd.DataFrame, family: str, noise: float) -> pd.DataFrame:
    """The dense DD curve (mean test accuracy vs parameter count) of one family and noise level."""
    part = select(curve, family, noise)
    return part.dropna(subset=["num_params", "test_acc_mean"]).sort_values("num_params")


# --- per chain ------------------------------------------------------------------------------------


def chain_result(chain: dict, history: pd.DataFrame, thresholds: pd.DataFrame, threshold: float) -> dict:
    """One chain's row of the summary (plus its per-level phases under the key 'phases')."""
    levels = history["level"].astype(int).tolist()
    test = history["test_acc"].astype(float).tolist()
    noisy = history["train_acc_noisy"].astype(float).fillna(1.0).tolist()  # no noisy subset: nothing to lose
    val = history["val_acc"].astype(float).fillna(history["test_acc"]).tolist()
    sparsity = history["sparsity"].astype(float).fillna(0.0).tolist()
    entropy = history["entropy"].astype(float).fillna(0.0).tolist()
    phases = sdd_phases(test, noisy, threshold)
    it = pruning_threshold(noisy, threshold)
    it_level = level_at(levels, it)
    it_label = it_level_label(noisy, threshold) if noisy else NO_IT
    if it_label not in (NO_IT, NEVER_INTERPOLATED):
        it_label = str(it_level)  # a level number, not the index in a history with gaps
    converged = history[CONVERGED] if CONVERGED in history else pd.Series(dtype=float)
    recorded = pd.to_numeric(converged, errors="coerce").iloc[1:].dropna()  # the pruned levels
    tag_phases, tag_it = (None if pd.isna(chain.get(k)) else chain.get(k) for k in ("phases_tag", "it_level_tag"))
    dd = select(thresholds, chain["family"], chain["noise"])
    row = {
        "kind": "chain", **{k: chain.get(k) for k in ("chain_run_id", "step", "family", "noise", "width",
                                                      "dense_seed", "start_epoch", "setting", "label", "group",
                                                      "dense_run_id", "variant", "scope", "rate", "start_role",
                                                      "reused")},
        "dd_it_width": dd["it_width"].iloc[0] if len(dd) else None,
        "dense_test_acc": test[0] if test else math.nan, "levels": max(levels) if levels else 0,
        "final_sparsity": sparsity[-1] if sparsity else math.nan,
        "it_level": it_level, "it_sparsity": sparsity[it] if it is not None else math.nan,
        "it_status": it_label, "dense_noisy_fit": history["train_acc_noisy"].iloc[0] if len(history) else math.nan,
        "it_level_tag": tag_it,
        "phases_match": None if tag_phases is None else (tag_phases == ",".join(phases) and tag_it == it_label),
        "tag_threshold": chain.get("it_threshold"),
        "unconverged_levels": int((recorded < 0.5).sum()) if len(recorded) else None,
        "convergence_recorded_levels": len(recorded),
        **phase_bounds(levels, phases),
    }
    best = best_level(val, sparsity)
    logged_best = chain.get("best_level")
    if logged_best is not None and not math.isnan(logged_best):
        row.update(best_level=int(logged_best), best_test_acc=chain.get("best_test_acc"),
                   best_sparsity=chain.get("best_sparsity"))
    else:
        row.update(best_level=level_at(levels, best), best_test_acc=test[best] if best is not None else math.nan,
                   best_sparsity=sparsity[best] if best is not None else math.nan)
    row.update(_early_stop(chain, levels, val, test, sparsity, entropy))
    row["phases"] = phases
    return row


def _param_or(value: float | None, default: float) -> float:
    return default if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _early_stop(chain: dict, levels: list[int], val: list[float], test: list[float], sparsity: list[float],
                entropy: list[float]) -> dict:
    """Where DSD's entropy rule would stop this chain, and the training it would skip.

    Every level trains the same number of epochs, so epochs scale with the number of levels; the
    FLOPs of a level scale with its density (dense matmuls over the surviving weights), which splits
    the chain's logged total over its levels.
    """
    drop = _param_or(chain.get("entropy_drop"), DEFAULT_ENTROPY_DROP)
    tol = _param_or(chain.get("acc_tolerance"), DEFAULT_ACC_TOLERANCE)
    decision = entropy_early_stop(entropy, val, drop, tol) if any(entropy) else None
    out = {"early_stop_entropy_drop": drop, "early_stop_acc_tolerance": tol,
           "early_stop_level": None, "early_stop_reason": "", "early_stop_level_tag": chain.get("early_stop_level_tag"),
           "early_stop_epochs_saved": math.nan, "early_stop_flops_saved": math.nan,
           "early_stop_best_level": None, "early_stop_best_test_acc": math.nan,
           "early_stop_best_sparsity": math.nan}
    if decision is None:
        return out
    stop = decision.level
    run = len(levels) - 1
    density = [1.0 - s for s in sparsity]
    spent, full = chain.get("epochs_spent"), chain.get("epochs_full")
    flops_spent, flops_full = chain.get("train_flops_spent"), chain.get("train_flops_full")
    best = best_level(val, sparsity, last=stop)
    out.update(early_stop_level=levels[stop], early_stop_reason=decision.reason,
               early_stop_best_level=level_at(levels, best),
               early_stop_best_test_acc=test[best] if best is not None else math.nan,
               early_stop_best_sparsity=sparsity[best] if best is not None else math.nan)
    if run > 0 and spent and full and not math.isnan(spent) and not math.isnan(full):
        out["early_stop_epochs_saved"] = 1.0 - spent * stop / run / full
    if run > 0 and flops_spent and flops_full and not math.isnan(flops_spent) and not math.isnan(flops_full):
        share = sum(density[1:stop + 1]) / sum(density[1:run + 1])
        out["early_stop_flops_saved"] = 1.0 - flops_spent * share / flops_full
    return out



def registered_models(client: MlflowClient, study: Study) -> pd.DataFrame:
    """The `best-sparse` version of every dataset x model family of the study, and whether a chain of
    this study produced it."""
    families = set()
    for frame in (study.dense, study.chains):
        if not frame.empty:
            families |= set(zip(frame["dataset"], frame["model"]))
    chain_ids = set(study.chains["chain_run_id"]) if not study.chains.empty else set()
    rows = []
    for dataset, model in sorted(f for f in families if None not in f):
        name = registry.registered_name(dataset, model)
        version = registry.current_best(client, name)
        if version is None:
            rows.append({"kind": "registered_model", "name": name, "version": None})
            continue
        tags = version.tags
        chain = tags.get("chain_run_id", "")
        rows.append({"kind": "registered_model", "name": name, "version": version.version, "alias": registry.ALIAS,
                     "chain_run_id": chain, "level": tags.get("level"), "dense_run_id": tags.get("dense_run_id"),
                     "level_run_id": tags.get("run_id"),
                     "sparsity": float(tags["sparsity"]) if tags.get("sparsity") else math.nan,
                     "test_acc": float(tags["test_acc"]) if tags.get("test_acc") else math.nan,
                     "val_acc": float(tags["val_acc"]) if tags.get("val_acc") else math.nan,
                     "from_study": chain in chain_ids})
    return pd.DataFrame(rows, columns=["kind", "name", "version", "alias", "chain_run_id", "level", "dense_run_id",
                                       "level_run_id", "sparsity", "test_acc", "val_acc", "from_study"])
