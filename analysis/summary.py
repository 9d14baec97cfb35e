"""The numbers behind the report: DD curve and IT per noise level, phases and SDD shape per chain,
seed spread, how far pruning strays from the dense DD curve, and what the entropy early stop saves.

Phases and thresholds are recomputed from the metric histories with `sdd.phases`, the functions the
chains used for their tags, so a figure, a table and a tag follow one rule (and disagree only when a
chain was tagged with another threshold, which the report points out).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from mlflow import MlflowClient

from analysis.runs import Study
from sdd import registry
from sdd.phases import LEVEL_PHASES, best_level, entropy_early_stop, pruning_threshold, sdd_phases, width_threshold

log = logging.getLogger(__name__)

# Accuracy differences up to this are noise (sdd_phases' own tolerance); the seed spread raises it.
TOLERANCE = 0.01
# A pruned model "retraces" the DD curve when it stays this close to the dense model of equal size.
RETRACE_TOLERANCE = 0.02
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
    chains: pd.DataFrame       # per chain: phases, dip/recovery, retracing, early stop
    groups: pd.DataFrame       # per seed group of chains: mean-curve shape vs seed spread
    pairs: pd.DataFrame        # vanilla / distilled chains of the same dense parent
    registered: pd.DataFrame   # the best-sparse registered model of each dataset x model family


def analyse(client: MlflowClient, study: Study, threshold: float = 0.99) -> Analysis:
    """Everything the report needs from a loaded study; `threshold` is the IT rule's noisy-fit level."""
    curve = dd_curve(study.dense)
    thresholds = interpolation_thresholds(curve, threshold)
    levels = study.levels.copy()
    levels["phase"] = pd.Series(dtype="object")
    rows = []
    for chain in study.chains.to_dict("records"):
        mask = levels["chain_run_id"] == chain["chain_run_id"]
        history = levels[mask].sort_values("level")
        result = chain_result(chain, history, curve, thresholds, threshold)
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
    groups = seed_groups(chains, levels, curve)
    return Analysis(study, threshold, curve, thresholds, levels, chains, groups, distill_pairs(chains), registered)


# --- DD curve ---------------------------------------------------------------------------------------

def dd_curve(dense: pd.DataFrame) -> pd.DataFrame:
    """Mean, min, max and std over seeds of every curve metric, per family, noise and width."""
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
    return stats.reset_index().sort_values(keys, ignore_index=True)


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


# --- curve shapes -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dip:
    """The SDD shape of a test-accuracy curve over levels (index 0 = dense)."""

    dip_level: int | None       # index of the lowest point of the dip
    dip_depth: float            # dense test accuracy minus the dip's
    recovery_level: int | None  # index of the best point after the dip, if it rises by > tolerance
    recovery: float             # that point's accuracy minus the dip's

    def shows(self, tolerance: float) -> bool:
        return self.dip_depth > tolerance and self.recovery > tolerance


def dip_and_recovery(test: Sequence[float], tolerance: float = TOLERANCE) -> Dip:
    """The dip below the dense accuracy followed by the largest recovery; without a recovery, the
    lowest point. A dip counts only if it is more than `tolerance` below dense."""
    t = [float(x) for x in test]
    if len(t) < 2:
        return Dip(None, 0.0, None, 0.0)
    best: tuple[int, int, float] | None = None
    for d in range(1, len(t) - 1):
        if t[0] - t[d] <= tolerance:
            continue
        r = max(range(d + 1, len(t)), key=lambda i: (t[i], -i))
        if best is None or t[r] - t[d] > best[2]:
            best = (d, r, t[r] - t[d])
    if best is not None and best[2] > tolerance:
        d, r, gain = best
        return Dip(d, t[0] - t[d], r, gain)
    d = min(range(1, len(t)), key=lambda i: (t[i], i))
    return Dip(d, t[0] - t[d], None, 0.0)


def max_rise(test: Sequence[float]) -> float:
    """Largest rise of the curve over any earlier level (0 for a non-increasing curve)."""
    rise, low = 0.0, math.inf
    for value in test:
        rise = max(rise, value - low)
        low = min(low, value)
    return rise


def phase_bounds(levels: Sequence[int], phases: Sequence[str]) -> dict[str, int | None]:
    bounds: dict[str, int | None] = {}
    for phase in LEVEL_PHASES:
        at = [lv for lv, p in zip(levels, phases) if p == phase]
        bounds[f"{phase}_first"] = at[0] if at else None
        bounds[f"{phase}_last"] = at[-1] if at else None
    return bounds


def select(frame: pd.DataFrame, family: str, noise: float | None) -> pd.DataFrame:
    """Rows of one family and noise level (a missing noise param matches missing)."""
    same_noise = frame["noise"].isna() if pd.isna(noise) else frame["noise"] == noise
    return frame[(frame["family"] == family) & same_noise]


def dense_reference(curve: pd.DataFrame, family: str, noise: float) -> pd.DataFrame:
    """The dense DD curve (mean test accuracy vs parameter count) of one family and noise level."""
    part = select(curve, family, noise)
    return part.dropna(subset=["num_params", "test_acc_mean"]).sort_values("num_params")


def retrace_gaps(nonzero: Sequence[float], test: Sequence[float], reference: pd.DataFrame) -> np.ndarray:
    """Pruned minus dense test accuracy at equal parameter count (log-interpolated along the dense
    curve), for the points that fall inside the dense sweep's parameter range."""
    if len(reference) < 2:
        return np.array([])
    x = np.log(reference["num_params"].to_numpy(float))
    y = reference["test_acc_mean"].to_numpy(float)
    nz = np.log(np.asarray(nonzero, float))
    acc = np.asarray(test, float)
    inside = (nz >= x.min()) & (nz <= x.max())
    return acc[inside] - np.interp(nz[inside], x, y)


# --- per chain ------------------------------------------------------------------------------------

def _level_at(levels: Sequence[int], index: int | None) -> int | None:
    return int(levels[index]) if index is not None else None


def chain_result(chain: dict, history: pd.DataFrame, curve: pd.DataFrame, thresholds: pd.DataFrame,
                 threshold: float) -> dict:
    """One chain's row of the summary (plus its per-level phases under the key 'phases')."""
    levels = history["level"].astype(int).tolist()
    test = history["test_acc"].astype(float).tolist()
    noisy = history["train_acc_noisy"].astype(float).fillna(1.0).tolist()  # no noisy subset: nothing to lose
    val = history["val_acc"].astype(float).fillna(history["test_acc"]).tolist()
    sparsity = history["sparsity"].astype(float).fillna(0.0).tolist()
    entropy = history["entropy"].astype(float).fillna(0.0).tolist()
    phases = sdd_phases(test, noisy, threshold)
    it = pruning_threshold(noisy, threshold)
    it_level = _level_at(levels, it)
    tag_phases, tag_it = (None if pd.isna(chain.get(k)) else chain.get(k) for k in ("phases_tag", "it_level_tag"))
    dip = dip_and_recovery(test)
    dd = select(thresholds, chain["family"], chain["noise"])
    gaps = retrace_gaps(history["nonzero_params"].astype(float).tolist()[1:], test[1:],
                        dense_reference(curve, chain["family"], chain["noise"]))
    row = {
        "kind": "chain", **{k: chain.get(k) for k in ("chain_run_id", "step", "family", "noise", "width",
                                                      "dense_seed", "start_epoch", "setting", "label", "group",
                                                      "dense_run_id", "reused")},
        "dd_it_width": dd["it_width"].iloc[0] if len(dd) else None,
        "dense_test_acc": test[0] if test else math.nan, "levels": max(levels) if levels else 0,
        "final_sparsity": sparsity[-1] if sparsity else math.nan,
        "it_level": it_level, "it_sparsity": sparsity[it] if it is not None else math.nan,
        "it_level_tag": tag_it,
        "phases_match": None if tag_phases is None else (tag_phases == ",".join(phases)
                                                        and tag_it == (str(it_level) if it is not None else "none")),
        "tag_threshold": chain.get("it_threshold_param"),
        **phase_bounds(levels, phases),
        "dip_level": _level_at(levels, dip.dip_level), "dip_depth": dip.dip_depth,
        "dip_test_acc": test[dip.dip_level] if dip.dip_level is not None else math.nan,
        "dip_sparsity": sparsity[dip.dip_level] if dip.dip_level is not None else math.nan,
        "dip_nonzero_params": history["nonzero_params"].iloc[dip.dip_level] if dip.dip_level is not None else math.nan,
        "recovery_level": _level_at(levels, dip.recovery_level), "recovery": dip.recovery,
        "recovery_test_acc": test[dip.recovery_level] if dip.recovery_level is not None else math.nan,
        "recovery_sparsity": sparsity[dip.recovery_level] if dip.recovery_level is not None else math.nan,
        "max_rise": max_rise(test),
        "retrace_points": len(gaps), "retrace_mean_gap": float(gaps.mean()) if len(gaps) else math.nan,
        "retrace_mean_abs_gap": float(np.abs(gaps).mean()) if len(gaps) else math.nan,
    }
    best = best_level(val, sparsity)
    logged_best = chain.get("best_level")
    if logged_best is not None and not math.isnan(logged_best):
        row.update(best_level=int(logged_best), best_test_acc=chain.get("best_test_acc"),
                   best_sparsity=chain.get("best_sparsity"))
    else:
        row.update(best_level=_level_at(levels, best), best_test_acc=test[best] if best is not None else math.nan,
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
               early_stop_best_level=_level_at(levels, best),
               early_stop_best_test_acc=test[best] if best is not None else math.nan,
               early_stop_best_sparsity=sparsity[best] if best is not None else math.nan)
    if run > 0 and spent and full and not math.isnan(spent) and not math.isnan(full):
        out["early_stop_epochs_saved"] = 1.0 - spent * stop / run / full
    if run > 0 and flops_spent and flops_full and not math.isnan(flops_spent) and not math.isnan(flops_full):
        share = sum(density[1:stop + 1]) / sum(density[1:run + 1])
        out["early_stop_flops_saved"] = 1.0 - flops_spent * share / flops_full
    return out


# --- across chains ----------------------------------------------------------------------------------

def seed_groups(chains: pd.DataFrame, levels: pd.DataFrame, curve: pd.DataFrame) -> pd.DataFrame:
    """Per group of chains differing only in the dense seed: the SDD shape of the mean curve, judged
    against the seed spread (across chain seeds, else across the dense runs at that width)."""
    rows = []
    if chains.empty:
        return pd.DataFrame()
    for group, members in chains.groupby("group", sort=False):
        first = members.iloc[0]
        ids = members["chain_run_id"].tolist()
        table = levels[levels["chain_run_id"].isin(ids)]
        by_level = table.pivot_table(index="level", columns="chain_run_id", values="test_acc")
        complete = by_level.dropna()  # levels every seed reached
        mean = complete.mean(axis=1)
        sparsity = table.groupby("level")["sparsity"].mean().reindex(complete.index)
        if len(ids) >= 2 and len(complete):
            spread = float((complete.max(axis=1) - complete.min(axis=1)).mean())
            source = f"mean range over {len(ids)} chain seeds"
        else:
            dense = select(curve, first["family"], first["noise"])
            dense = dense[dense["width"] == first["width"]]
            if len(dense) and dense["n_seeds"].iloc[0] >= 2:
                spread = float(dense["test_acc_max"].iloc[0] - dense["test_acc_min"].iloc[0])
                source = f"range of dense test accuracy over {int(dense['n_seeds'].iloc[0])} seeds at this width"
            else:
                spread, source = math.nan, "one seed: no spread"
        tol = max(TOLERANCE, 0.0 if math.isnan(spread) else spread)
        dip = dip_and_recovery(mean.tolist(), tol)
        lv = complete.index.tolist()
        rows.append({
            "group": group, "family": first["family"], "noise": first["noise"], "width": first["width"],
            "start_epoch": first["start_epoch"], "step": first["step"], "setting": first["setting"],
            "n_seeds": len(ids), "levels": lv[-1] if lv else 0,
            "dense_test_acc": mean.iloc[0] if len(mean) else math.nan,
            "seed_spread": spread, "spread_source": source, "tolerance": tol,
            "dip_level": _level_at(lv, dip.dip_level), "dip_depth": dip.dip_depth,
            "dip_test_acc": mean.iloc[dip.dip_level] if dip.dip_level is not None else math.nan,
            "dip_sparsity": sparsity.iloc[dip.dip_level] if dip.dip_level is not None else math.nan,
            "recovery_level": _level_at(lv, dip.recovery_level), "recovery": dip.recovery,
            "recovery_test_acc": mean.iloc[dip.recovery_level] if dip.recovery_level is not None else math.nan,
            "recovery_sparsity": sparsity.iloc[dip.recovery_level] if dip.recovery_level is not None else math.nan,
            "sdd_shape": dip.shows(tol), "max_rise": max_rise(mean.tolist()),
            "monotonic": max_rise(mean.tolist()) <= tol,
            "retrace_points": int(members["retrace_points"].sum()),
            "retrace_mean_gap": members["retrace_mean_gap"].mean(),
            "retrace_mean_abs_gap": members["retrace_mean_abs_gap"].mean(),
            "dip_nonzero_params": members["dip_nonzero_params"].mean(),
        })
    frame = pd.DataFrame(rows)
    order = frame["step"].map({"prune": 0, "distill": 1})  # vanilla before distilled
    return frame.assign(_order=order).sort_values(["family", "noise", "width", "_order", "setting"]) \
        .drop(columns="_order").reset_index(drop=True)


def distill_pairs(chains: pd.DataFrame) -> pd.DataFrame:
    """Each distilled chain with the vanilla chain of the same dense parent (same start, criterion and
    retraining if there is one)."""
    rows = []
    if not chains.empty:
        vanilla = chains[chains["step"] == "prune"]
        for d in chains[chains["step"] == "distill"].to_dict("records"):
            same = vanilla[vanilla["dense_run_id"] == d["dense_run_id"]]
            if same.empty:
                continue
            setting = d["setting"].split(" ")[1]  # criterion/retrain
            exact = same[same["setting"] == f"prune {setting}"]
            v = (exact if len(exact) else same).iloc[0]
            rows.append({"dense_run_id": d["dense_run_id"], "vanilla_run_id": v["chain_run_id"],
                         "distill_run_id": d["chain_run_id"], "vanilla_label": v["label"], "distill_label": d["label"],
                         "vanilla_max_rise": v["max_rise"], "distill_max_rise": d["max_rise"],
                         "vanilla_dip_depth": v["dip_depth"], "vanilla_recovery": v["recovery"],
                         "distill_dip_depth": d["dip_depth"], "distill_recovery": d["recovery"],
                         "vanilla_best_test_acc": v["best_test_acc"], "distill_best_test_acc": d["best_test_acc"]})
    return pd.DataFrame(rows, columns=["dense_run_id", "vanilla_run_id", "distill_run_id", "vanilla_label",
                                       "distill_label", "vanilla_max_rise", "distill_max_rise", "vanilla_dip_depth",
                                       "vanilla_recovery", "distill_dip_depth", "distill_recovery",
                                       "vanilla_best_test_acc", "distill_best_test_acc"])


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
