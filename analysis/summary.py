"""The numbers behind the report: DD curve and IT per noise level, phases per chain, the verdicts
(DD and SDD dip-and-recovery, retracing, distillation), and what the entropy early stop saves.

Every verdict is decided by `analysis.stats` from the seeds' curves (seeds x widths, seeds x levels),
with the test-set size as its binomial floor; nothing here judges a curve by a fixed tolerance.

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
from analysis.runs import Study
from sdd import registry
from sdd.phases import LEVEL_PHASES, best_level, entropy_early_stop, pruning_threshold, sdd_phases, width_threshold

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
    pairs: pd.DataFrame        # vanilla / distilled chains of the same dense parent (the figure's rows)
    registered: pd.DataFrame   # the best-sparse registered model of each dataset x model family
    verdicts: list[Verdict]    # every claim, as decided by analysis.stats (verdicts.json)


def analyse(client: MlflowClient, study: Study, threshold: float = 0.99) -> Analysis:
    """Everything the report needs from a loaded study; `threshold` is the IT rule's noisy-fit level."""
    curve = dd_curve(study.dense)
    thresholds = interpolation_thresholds(curve, threshold)
    dd = dd_verdicts(study.dense)
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
    groups, chain_verdicts = seed_groups(chains, levels, study.dense)
    distill, distill_found = distill_verdicts(chains, levels, groups)
    return Analysis(study, threshold, curve, thresholds, levels, chains, groups, distill, distill_pairs(chains),
                    registered, dd + chain_verdicts + distill_found)


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


# --- verdicts (decided by analysis.stats) ---------------------------------------------------------

# Shown in place of a verdict when no dense run of the curve records its test-set size (the binomial floor).
NO_TEST_SIZE = "test-set size unknown (no test_size param or test dataset input): not tested"
Result = stats.DipRecovery | stats.Retrace | stats.DistillationMonotonic


@dataclass(frozen=True)
class Verdict:
    """One claim about one curve: its identifying fields and the analysis.stats result deciding it."""

    kind: str                  # "dd" (width sweep), "sdd" (pruning chain), "retrace" or "distill"
    key: dict[str, Any]        # the fields naming the curve (family, noise, width, setting, chain ids...)
    n_test: int | None
    result: Result | None      # None: not tested, for the reason in `untested`
    untested: str = NO_TEST_SIZE

    def columns(self) -> dict[str, Any]:
        """The verdict's summary.csv columns: claim, effect with 95% CI, p-value, seeds, verdict string."""
        r = self.result
        if r is None:
            return {"claim": False, "effect_name": None, "effect": math.nan, "ci_low": math.nan,
                    "ci_high": math.nan, "p_value": math.nan, "seeds": None, "n_test": None,
                    "verdict": self.untested}
        extra: dict[str, Any] = {}
        if isinstance(r, stats.DipRecovery):
            # The recovery is the effect: a dip alone is plain decline, the rise after it is the claim.
            claim, name, effect, ci = r.significant, "recovery", r.recovery, r.recovery_ci
            extra = {"dip": r.dip, "dip_ci_low": r.dip_ci[0], "dip_ci_high": r.dip_ci[1]}
        elif isinstance(r, stats.Retrace):
            claim, name, effect, ci = r.retraces, "largest gap", r.effect, r.ci
            extra = {"departs": r.departs}
        else:
            claim, name, effect, ci = r.monotonic, "recovery reduction", r.difference, r.difference_ci
        return {"claim": bool(claim), "effect_name": name, "effect": effect, "ci_low": ci[0], "ci_high": ci[1],
                "p_value": r.p_value, "seeds": r.seeds, "n_test": self.n_test, "verdict": r.verdict, **extra}

    def record(self) -> dict[str, Any]:
        """Its verdicts.json record."""
        return {"kind": self.kind, **self.key, "n_test": self.n_test,
                "result": None if self.result is None else self.result.to_dict(),
                "verdict": self.columns()["verdict"]}


def _test_size(sizes: pd.Series) -> int | None:
    """One test-set size for a curve's runs: the smallest recorded (the widest binomial floor, conservative)."""
    known = pd.to_numeric(sizes, errors="coerce").dropna()
    return int(known.min()) if len(known) else None


def _complete(table: pd.DataFrame, index: str, columns: str, values: str) -> pd.DataFrame:
    """`values` as index x columns keeping only the rows every column (seed) reached: stats needs full curves."""
    return table.pivot_table(index=index, columns=columns, values=values).dropna()


def dd_matrix(dense: pd.DataFrame, family: str, noise: float) -> tuple[pd.DataFrame, pd.Series]:
    """Test accuracy as width x seed (widths every seed reached) and the mean parameter count per width."""
    part = select(dense, family, noise)
    acc = _complete(part, "width", "seed", "test_acc")
    params = part.groupby("width")["num_params"].mean().reindex(acc.index)
    return acc, params


def dd_verdicts(dense: pd.DataFrame) -> list[Verdict]:
    """Per family and noise level: does the test accuracy dip and recover along width (seeds x widths)?"""
    out = []
    for (family, noise), part in dense.groupby(["family", "noise"], dropna=False, sort=True):
        acc, _ = dd_matrix(dense, family, noise)
        n_test = _test_size(part["test_size"])
        result = (stats.dip_and_recovery(acc.T.to_numpy(), n_test)
                  if n_test is not None and len(acc) else None)
        out.append(Verdict("dd", {"family": family, "noise": noise, "widths": [int(w) for w in acc.index]},
                           n_test, result))
    return out


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


# --- per chain ------------------------------------------------------------------------------------

def _level_at(levels: Sequence[int], index: int | None) -> int | None:
    return int(levels[index]) if index is not None else None


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
    it_level = _level_at(levels, it)
    tag_phases, tag_it = (None if pd.isna(chain.get(k)) else chain.get(k) for k in ("phases_tag", "it_level_tag"))
    dd = select(thresholds, chain["family"], chain["noise"])
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

def _group_key(first: pd.Series, members: pd.DataFrame) -> dict[str, Any]:
    return {"group": first["group"], "family": first["family"], "noise": first["noise"], "width": first["width"],
            "start_epoch": first["start_epoch"], "step": first["step"], "setting": first["setting"],
            "dense_seeds": [int(x) for x in members["dense_seed"] if pd.notna(x)],
            "chain_run_ids": members["chain_run_id"].tolist()}


def _verdict_columns(prefix: str, verdict: Verdict) -> dict[str, Any]:
    return {f"{prefix}_{k}": v for k, v in verdict.columns().items()}


def seed_groups(chains: pd.DataFrame, levels: pd.DataFrame, dense: pd.DataFrame) -> tuple[pd.DataFrame, list[Verdict]]:
    """Per group of chains differing only in the dense seed (one chain = one seed): the SDD verdict of
    its curve (seeds x levels, column 0 the dense parents) and whether it retraces the dense DD curve
    (stats.retraces against seeds x widths at equal nonzero parameters); the group rows and the verdicts."""
    rows, verdicts = [], []
    if chains.empty:
        return pd.DataFrame(), verdicts
    sizes = dense.set_index("run_id")["test_size"]
    for _group, members in chains.groupby("group", sort=False):
        first = members.iloc[0]
        table = levels[levels["chain_run_id"].isin(members["chain_run_id"])]
        acc = _complete(table, "level", "chain_run_id", "test_acc")  # levels every seed reached
        nonzero = table.pivot_table(index="level", columns="chain_run_id", values="nonzero_params").reindex(acc.index)
        sparsity = table.groupby("level")["sparsity"].mean().reindex(acc.index)
        mean = acc.mean(axis=1)
        # a chain's test set is its dense parent's; else any dense run of the family and noise level
        n_test = _test_size(members["dense_run_id"].map(sizes)) or _test_size(
            select(dense, first["family"], first["noise"])["test_size"])
        key = _group_key(first, members)
        have = n_test is not None and len(acc) > 0
        sdd = Verdict("sdd", key, n_test, stats.dip_and_recovery(acc.T.to_numpy(), n_test) if have else None)
        dense_acc, dense_params = dd_matrix(dense, first["family"], first["noise"])
        # every level, the dense parent included, so that the verdict's level numbers are the chain's levels
        can_retrace = have and len(dense_acc) >= 2
        retrace = Verdict("retrace", key, n_test,
                          stats.retraces(acc.T.to_numpy(), nonzero.T.to_numpy(), dense_acc.T.to_numpy(),
                                         dense_params.to_numpy(), n_test) if can_retrace else None,
                          NO_TEST_SIZE if not have else "no dense DD curve of this family and noise level (two "
                          "widths every seed reached): not tested")
        verdicts += [sdd, retrace]
        lv = acc.index.tolist()
        r = sdd.result

        def at(series: pd.Series, index: int) -> float:
            return float(series.iloc[index]) if r is not None and index >= 0 else math.nan

        rows.append({
            **{k: v for k, v in key.items() if k not in ("dense_seeds", "chain_run_ids")},
            "n_seeds": len(members), "levels": lv[-1] if lv else 0,
            "dense_test_acc": mean.iloc[0] if len(mean) else math.nan,
            **{f"{name}_level": _level_at(lv, getattr(r, f"{name}_index")) if r is not None and
               getattr(r, f"{name}_index") >= 0 else None for name in ("peak", "dip", "recovery")},
            "dip_test_acc": at(mean, r.dip_index if r else -1),
            "dip_sparsity": at(sparsity, r.dip_index if r else -1),
            "dip_nonzero_params": at(nonzero.mean(axis=1), r.dip_index if r else -1),
            "recovery_test_acc": at(mean, r.recovery_index if r else -1),
            "recovery_sparsity": at(sparsity, r.recovery_index if r else -1),
            **_verdict_columns("sdd", sdd), **_verdict_columns("retrace", retrace),
        })
    frame = pd.DataFrame(rows)
    order = frame["step"].map({"prune": 0, "distill": 1})  # vanilla before distilled
    frame = frame.assign(_order=order).sort_values(["family", "noise", "width", "_order", "setting"]) \
        .drop(columns="_order").reset_index(drop=True)
    return frame, verdicts


def distill_verdicts(chains: pd.DataFrame, levels: pd.DataFrame, groups: pd.DataFrame) -> tuple[pd.DataFrame,
                                                                                               list[Verdict]]:
    """Per distilled group: did distillation remove the recovery of the vanilla group with the same start,
    criterion and retraining? Compared over the dense seeds both have (paired by seed)."""
    rows, verdicts = [], []
    if not chains.empty:
        vanilla = chains[chains["step"] == "prune"]
        for _group, members in chains[chains["step"] == "distill"].groupby("group", sort=False):
            first = members.iloc[0]
            setting = first["setting"].split(" ")[1]  # criterion/retrain
            same = vanilla[(vanilla["family"] == first["family"]) & (vanilla["width"] == first["width"])
                           & (vanilla["setting"] == f"prune {setting}")
                           & vanilla["dense_seed"].isin(members["dense_seed"])]
            same = same[same["noise"].isna() if pd.isna(first["noise"]) else same["noise"] == first["noise"]]
            same = same[same["start_epoch"].isna() if pd.isna(first["start_epoch"])
                        else same["start_epoch"] == first["start_epoch"]]
            if same.empty:
                continue
            van = same[same["group"] == same["group"].iloc[0]].sort_values("dense_seed")
            dis = members[members["dense_seed"].isin(van["dense_seed"])].sort_values("dense_seed")
            curves = [_complete(levels[levels["chain_run_id"].isin(ids)], "level", "chain_run_id", "test_acc")
                      [ids].T.to_numpy() for ids in (van["chain_run_id"].tolist(), dis["chain_run_id"].tolist())]
            row = groups[groups["group"] == first["group"]]
            n_test = row["sdd_n_test"].iloc[0] if len(row) else None
            n_test = None if pd.isna(n_test) else int(n_test)
            key = {**_group_key(first, dis), "vanilla_group": van["group"].iloc[0],
                   "vanilla_chain_run_ids": van["chain_run_id"].tolist()}
            have = n_test is not None and all(c.shape[1] > 0 for c in curves)
            verdict = Verdict("distill", key, n_test,
                              stats.distillation_monotonic(curves[0], curves[1], n_test) if have else None)
            verdicts.append(verdict)
            rows.append({**{k: v for k, v in key.items() if not k.endswith(("_ids", "seeds"))},
                         "n_seeds": len(dis), **_verdict_columns("distill", verdict)})
    return pd.DataFrame(rows), verdicts


def distill_pairs(chains: pd.DataFrame) -> pd.DataFrame:
    """Each distilled chain with the vanilla chain of the same dense parent (same start, criterion and
    retraining if there is one): the rows of the vanilla-vs-distilled figure."""
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
                         "vanilla_best_test_acc": v["best_test_acc"], "distill_best_test_acc": d["best_test_acc"]})
    return pd.DataFrame(rows, columns=["dense_run_id", "vanilla_run_id", "distill_run_id", "vanilla_label",
                                       "distill_label", "vanilla_best_test_acc", "distill_best_test_acc"])


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
