"""The claims of the report, each decided by `analysis.stats` from the seeds' curves: the DD and SDD
dip-and-recovery, retracing the dense curve, distillation making the curve monotonic, and the IT
being a bad start; each a `Verdict` with the points it rests on and whether those converged.

A curve is a seeds x points matrix: the dense runs of one family and noise level by width, or a group
of chains (one per dense seed) by level, column 0 the dense parents. Nothing here judges a curve by a
fixed tolerance; the test-set size is each claim's binomial floor.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from analysis import stats
from analysis.runs import CONVERGED, select


def level_at(levels: Sequence[int], index: int | None) -> int | None:
    """The level number at position `index` of a curve (None for no position)."""
    return int(levels[index]) if index is not None else None


NOT_RECORDED = "convergence not recorded"
# Shown in place of a verdict when no dense run of the curve records its test-set size (the binomial floor).
NO_TEST_SIZE = "test-set size unknown (no test_size param or test dataset input): not tested"
Result = stats.DipRecovery | stats.Retrace | stats.DistillationMonotonic | stats.BadStart


@dataclass(frozen=True)
class Verdict:
    """One claim about one curve: its identifying fields and the analysis.stats result deciding it."""

    kind: str                  # "dd" (width sweep), "sdd" (pruning chain), "retrace", "distill" or "bad_start"
    key: dict[str, Any]        # the fields naming the curve (family, noise, width, setting, chain ids...)
    n_test: int | None
    result: Result | None      # None: not tested, for the reason in `untested`
    untested: str = NO_TEST_SIZE
    unconverged: int | None = None   # unconverged points the verdict rests on (None: convergence not recorded)
    convergence: str = NOT_RECORDED  # that, as the report prints it beside the verdict

    def columns(self) -> dict[str, Any]:
        """The verdict's summary.csv columns: claim, effect with 95% CI, p-value, seeds, verdict string."""
        r = self.result
        if r is None:
            return {"claim": False, "effect_name": None, "effect": math.nan, "ci_low": math.nan,
                    "ci_high": math.nan, "p_value": math.nan, "seeds": None, "n_test": None,
                    "verdict": self.untested, "unconverged_levels": self.unconverged, "convergence": self.convergence}
        extra: dict[str, Any] = {}
        if isinstance(r, stats.DipRecovery):
            # The recovery is the effect: a dip alone is plain decline, the rise after it is the claim.
            claim, name, effect, ci = r.significant, "recovery", r.recovery, r.recovery_ci
            extra = {"dip": r.dip, "dip_ci_low": r.dip_ci[0], "dip_ci_high": r.dip_ci[1]}
        elif isinstance(r, stats.Retrace):
            claim, name, effect, ci = r.retraces, "largest gap", r.effect, r.ci
            extra = {"departs": r.departs}
        elif isinstance(r, stats.DistillationMonotonic):
            claim, name, effect, ci = r.monotonic, "recovery reduction", r.difference, r.difference_ci
        else:
            claim, name, effect, ci = r.bad_start, "best test accuracy, IT - controls", r.effect, r.ci
        return {"claim": bool(claim), "effect_name": name, "effect": effect, "ci_low": ci[0], "ci_high": ci[1],
                "p_value": r.p_value, "seeds": r.seeds, "n_test": self.n_test, "verdict": r.verdict,
                "unconverged_levels": self.unconverged, "convergence": self.convergence, **extra}

    def record(self) -> dict[str, Any]:
        """Its verdicts.json record."""
        return {"kind": self.kind, **self.key, "n_test": self.n_test,
                "result": None if self.result is None else self.result.to_dict(),
                "verdict": self.columns()["verdict"], "unconverged_levels": self.unconverged,
                "convergence": self.convergence}


def _test_size(sizes: pd.Series) -> int | None:
    """One test-set size for a curve's runs: the smallest recorded (the widest binomial floor, conservative)."""
    known = pd.to_numeric(sizes, errors="coerce").dropna()
    return int(known.min()) if len(known) else None


def _complete(table: pd.DataFrame, index: str, columns: str, values: str) -> pd.DataFrame:
    """`values` as index x columns keeping only the rows every column (seed) reached: stats needs full curves."""
    return table.pivot_table(index=index, columns=columns, values=values).dropna()


def _as_float(value: Any) -> float:
    """A convergence record (True/False from a tag, 1.0/0.0 from a metric, None/NaN: none) as 1.0/0.0/NaN."""
    return math.nan if value is None or pd.isna(value) else float(bool(value))


def converged_matrix(table: pd.DataFrame, index: str, columns: str, like: pd.DataFrame) -> pd.DataFrame:
    """`converged` (1.0 / 0.0, NaN: not recorded) in the shape of the accuracy matrix `like`."""
    if CONVERGED not in table or table.empty:
        return pd.DataFrame(math.nan, index=like.index, columns=like.columns)
    values = table[CONVERGED].map(_as_float)
    return table.assign(_c=values).pivot_table(index=index, columns=columns, values="_c", dropna=False) \
        .reindex(index=like.index, columns=like.columns)


def convergence_note(converged: pd.DataFrame, rests_on: Sequence[int] | None, what: str) -> tuple[int | None, str]:
    """How many unconverged points (rows of `converged`: points x seeds) a verdict rests on, and the line
    the report prints. `rests_on`: the row positions a claim rests on; None: all (a claim not made
    rests on the whole curve). A point is unconverged when any seed's run there did not converge."""
    known = converged.notna().to_numpy()
    if not known.any():
        return None, NOT_RECORDED
    bad = [i for i, row in enumerate(converged.to_numpy()) if (row == 0).any()]
    unknown = [i for i, row in enumerate(known) if not row.all()]
    points = set(range(len(converged))) if rests_on is None else {int(i) for i in rests_on if i >= 0}
    rest = sorted(points & set(bad))
    names = [str(converged.index[i]) for i in rest]
    plural = "" if len(rest) == 1 else "s"
    text = (f"rests on {len(rest)} unconverged {what}{plural} ({', '.join(names)})" if rest
            else f"rests on no unconverged {what}")
    missing = sorted(points & set(unknown))
    if missing:
        text += f"; convergence not recorded at {len(missing)} {what}{'' if len(missing) == 1 else 's'}"
    return len(rest), text


def _rests_on(result: Result | None) -> Sequence[int] | None:
    """The points a claim rests on (None: the whole curve, for a claim not made)."""
    if isinstance(result, stats.DipRecovery) and result.significant:
        return (result.peak_index, result.dip_index, result.recovery_index)
    if isinstance(result, stats.Retrace) and result.retraces:
        return result.levels
    return None


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
        converged = converged_matrix(part, "width", "seed", acc)
        unconverged, note = convergence_note(converged, _rests_on(result), "width")
        out.append(Verdict("dd", {"family": family, "noise": noise, "widths": [int(w) for w in acc.index]},
                           n_test, result, unconverged=unconverged, convergence=note))
    return out


# --- chain groups ----------------------------------------------------------------------------------

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
        converged = chain_converged(table, acc, members, dense)
        sdd = _noted(Verdict("sdd", key, n_test, stats.dip_and_recovery(acc.T.to_numpy(), n_test) if have else None),
                     converged)
        dense_acc, dense_params = dd_matrix(dense, first["family"], first["noise"])
        # every level, the dense parent included, so that the verdict's level numbers are the chain's levels;
        # only the pruned ones (from column 1) are evidence
        can_retrace = have and len(dense_acc) >= 2
        retrace = _noted(Verdict("retrace", key, n_test,
                                 stats.retraces(acc.T.to_numpy(), nonzero.T.to_numpy(), dense_acc.T.to_numpy(),
                                                dense_params.to_numpy(), n_test, first_pruned=1)
                                 if can_retrace else None,
                                 NO_TEST_SIZE if not have else "no dense DD curve of this family and noise level "
                                 "(two widths every seed reached): not tested"), converged)
        verdicts += [sdd, retrace]
        lv = acc.index.tolist()
        r = sdd.result

        def at(series: pd.Series, index: int) -> float:
            return float(series.iloc[index]) if r is not None and index >= 0 else math.nan

        rows.append({
            **{k: v for k, v in key.items() if k not in ("dense_seeds", "chain_run_ids")},
            "n_seeds": len(members), "levels": lv[-1] if lv else 0,
            "dense_test_acc": mean.iloc[0] if len(mean) else math.nan,
            **{f"{name}_level": level_at(lv, getattr(r, f"{name}_index")) if r is not None and
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


def chain_converged(table: pd.DataFrame, acc: pd.DataFrame, members: pd.DataFrame,
                    dense: pd.DataFrame) -> pd.DataFrame:
    """Levels x chains `converged` of a group's curve; level 0, the dense parents, from their dense runs."""
    converged = converged_matrix(table, "level", "chain_run_id", acc)
    if 0 in converged.index and CONVERGED in dense:
        parents = dense.set_index("run_id")[CONVERGED].map(_as_float)
        dense_of = dict(zip(members["chain_run_id"], members["dense_run_id"]))
        for chain_id in converged.columns:
            if pd.isna(converged.loc[0, chain_id]):
                converged.loc[0, chain_id] = parents.get(dense_of.get(chain_id), math.nan)
    return converged


def _noted(verdict: Verdict, converged: pd.DataFrame) -> Verdict:
    unconverged, note = convergence_note(converged, _rests_on(verdict.result), "level")
    return dataclasses.replace(verdict, unconverged=unconverged, convergence=note)


def distill_verdicts(chains: pd.DataFrame, levels: pd.DataFrame, groups: pd.DataFrame,
                     study_dense: pd.DataFrame) -> tuple[pd.DataFrame, list[Verdict]]:
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
            same = same[same["variant"] == first["variant"]]  # the same options but the teacher's
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
            both = pd.concat([chain_converged(levels[levels["chain_run_id"].isin(ids)], _complete(
                levels[levels["chain_run_id"].isin(ids)], "level", "chain_run_id", "test_acc")[ids], part, study_dense)
                for ids, part in ((van["chain_run_id"].tolist(), van), (dis["chain_run_id"].tolist(), dis))], axis=1)
            verdict = _noted(Verdict("distill", key, n_test,
                                     stats.distillation_monotonic(curves[0], curves[1], n_test) if have else None),
                             both)
            verdicts.append(verdict)
            rows.append({**{k: v for k, v in key.items() if not k.endswith(("_ids", "seeds"))},
                         "n_seeds": len(dis), **_verdict_columns("distill", verdict)})
    return pd.DataFrame(rows), verdicts


# --- the IT as a starting point -------------------------------------------------------------------

IT_ROLE = "at"
# The control starts of an automatic start selection (sdd.sweep.study_file): the widths a control_factor
# below and above the IT. Its neighbours ("below", "above") sit too close to it to be controls.
CONTROL_ROLES = ("before", "after")
# Chains that differ only in their start (width, role) and seed answer one bad-start question together.
_START_FREE = ("family", "noise", "start_epoch", "step", "setting", "scope", "rate", "variant")


def _same(value: Any) -> str:
    """A key field as one spelling: NaN and None (a missing param) match each other, 0.2 matches 0.2."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def bad_start_verdicts(chains: pd.DataFrame, levels: pd.DataFrame,
                       dense: pd.DataFrame) -> tuple[pd.DataFrame, list[Verdict]]:
    """Per chain setting with chains from the IT start (`sdd.start_role` "at") and from control starts:
    is the best pruned test accuracy from the IT parent below the controls'? Paired by dense seed over
    the seeds that have a chain from the IT start and from every control start; the best accuracy is
    each chain's test accuracy at its best level by val_acc (model selection never reads the test set).
    The rows (one per setting) and the verdicts."""
    rows: list[dict[str, Any]] = []
    verdicts: list[Verdict] = []
    if chains.empty or "start_role" not in chains:
        return pd.DataFrame(), verdicts
    placed = chains[chains["start_role"].isin((IT_ROLE, *CONTROL_ROLES))]
    keys = placed[list(_START_FREE)].map(_same).apply(tuple, axis=1)
    sizes = dense.set_index("run_id")["test_size"]
    for _key, part in placed.groupby(keys, sort=False):
        # one chain per start and seed (a repeated run of the same config would count twice)
        part = part.dropna(subset=["dense_seed", "best_test_acc"]).drop_duplicates(["start_role", "dense_seed"])
        roles = [r for r in CONTROL_ROLES if (part["start_role"] == r).any()]
        if not (part["start_role"] == IT_ROLE).any() or not roles:
            continue
        by_role = {r: part[part["start_role"] == r].set_index("dense_seed") for r in (IT_ROLE, *roles)}
        seeds = sorted(set.intersection(*(set(t.index) for t in by_role.values())))
        first = by_role[IT_ROLE].iloc[0]
        starts = [(r, by_role[r]["width"].iloc[0]) for r in (IT_ROLE, *roles)]
        key = {"family": first["family"], "noise": first["noise"], "width": first["width"],
               "start_epoch": first["start_epoch"], "step": first["step"], "setting": first["setting"],
               "variant": first["variant"], "control_starts": ", ".join(f"{r} w{w}" for r, w in starts[1:]),
               "dense_seeds": [int(s) for s in seeds],
               "it_chain_run_ids": by_role[IT_ROLE].loc[seeds, "chain_run_id"].tolist(),
               "control_chain_run_ids": {r: by_role[r].loc[seeds, "chain_run_id"].tolist() for r in roles}}
        ids = [cid for r in by_role for cid in by_role[r].loc[seeds, "chain_run_id"]]
        n_test = _test_size(part[part["chain_run_id"].isin(ids)]["dense_run_id"].map(sizes))
        result = None
        if seeds and n_test is not None:
            it = by_role[IT_ROLE].loc[seeds, "best_test_acc"].to_numpy(float)
            control = pd.concat([by_role[r].loc[seeds, "best_test_acc"] for r in roles], axis=1).to_numpy(float)
            result = stats.it_is_a_bad_start(it, control, n_test)
        untested = NO_TEST_SIZE if seeds else "no seed has a chain from the IT start and from every control: not tested"
        unconverged, note = convergence_note(_best_level_converged(by_role, starts, seeds, levels), None,
                                             "best level")
        verdict = Verdict("bad_start", key, n_test, result, untested, unconverged, note)
        verdicts.append(verdict)
        rows.append({**{k: v for k, v in key.items() if not isinstance(v, (list, dict))},
                     "n_seeds": len(seeds), **_verdict_columns("bad_start", verdict)})
    return pd.DataFrame(rows), verdicts


def _best_level_converged(by_role: dict[str, pd.DataFrame], starts: list[tuple[str, Any]], seeds: list[Any],
                          levels: pd.DataFrame) -> pd.DataFrame:
    """Starts x seeds: whether each chain's best level (the one the claim compares) converged."""
    table = levels.set_index(["chain_run_id", "level"])[CONVERGED] if CONVERGED in levels else pd.Series(dtype=float)
    out = pd.DataFrame(math.nan, index=[f"{r} w{w}" for r, w in starts], columns=seeds)
    for (role, width), label in zip(starts, out.index):
        for seed in seeds:
            chain = by_role[role].loc[seed]
            at = (chain["chain_run_id"], chain["best_level"])
            if not pd.isna(chain["best_level"]) and at in table.index:
                out.loc[label, seed] = _as_float(table.loc[at])
    return out
