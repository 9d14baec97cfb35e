"""`analyze_study`: a study's runs -> tables, figures and one report page, written to a folder and
logged to the study run under `report/`.

Each headline answer states the verdict `analysis.stats` reached, with its effect size, 95% CI,
p-value and seed count; verdicts.json holds every verdict's full record.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run

from analysis.figures import FIGURES, draw_all
from analysis.html import render_html
from analysis.runs import Study, load_study, resolve_study, select
from analysis.summary import Analysis, analyse
from sdd.config import PruneConfig
from sdd.errors import UsageError
from sdd.phases import LEVEL_PHASES

log = logging.getLogger(__name__)

DEFAULT_IT_THRESHOLD = PruneConfig().it_threshold  # one default, the chains' own
ARTIFACT_DIR = "report"
REPORT = "report.md"
HTML_REPORT = "report.html"
SUMMARY = "summary.csv"
DENSE_TABLE = "dense_runs.csv"
LEVEL_TABLE = "chain_levels.csv"
VERDICTS = "verdicts.json"
FLOAT_FORMAT = "%.6g"  # metrics carry no more precision; spares readers 0.42000000000000004
# Integer columns of summary.csv (levels, widths, counts), written without a decimal point.
INT_COLUMNS = {"it_width", "peak_err_width", "n_widths", "min_seeds", "max_seeds", "width", "dense_seed",
               "start_epoch", "dd_it_width", "levels", "it_level", "peak_level", "dip_level", "recovery_level",
               "best_level", "seeds", "n_test", "n_seeds", "early_stop_level", "early_stop_level_tag", "early_stop_best_level", "version",
               "level", "unconverged_levels", "convergence_recorded_levels",
               *(f"{p}_{end}" for p in LEVEL_PHASES for end in ("first", "last"))}
# Config keys worth showing for a missing trial, when the stage's trials do not differ in any.
CONFIG_KEYS = ("model", "width", "depth", "noise", "seed", "criterion", "retrain", "start_epoch", "alpha",
               "temperature", "parent")


def default_out_dir(study_run: Run) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", study_run.info.run_name or "study").strip("_") or "study"
    return Path("reports") / f"{name}-{study_run.info.run_id[:8]}"


def analyze_study(client: MlflowClient, study_run_id: str, out_dir: Path, *,
                  it_threshold: float | None = None) -> Path:
    """Analyse a study (run id, or run name) into `out_dir` and the study run's `report/` artifacts.

    `it_threshold`: the IT rule's noisy-fit level; None: the one the study ran with (`Study.recorded_threshold`),
    else the chains' default. Returns the path of report.md. Raises UsageError for a run that is missing
    or not a study, and for a study without a single finished dense or chain run.
    """
    if it_threshold is not None and not 0.0 < it_threshold <= 1.0:
        raise UsageError(f"--it-threshold must be in (0, 1], got {it_threshold}")
    study = load_study(client, resolve_study(client, study_run_id))
    threshold, source = _threshold(study, it_threshold)
    log.info("study %s: IT threshold %g (%s)", study.id[:8], threshold, source)
    analysis = analyse(client, study, threshold)
    analysis.threshold_source = source
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = list(draw_all(analysis, out_dir).values())
    written += write_tables(analysis, out_dir)
    report = out_dir / REPORT
    text = render(analysis, client)
    report.write_text(text, encoding="utf-8")
    page = out_dir / HTML_REPORT
    page.write_text(render_html(text, out_dir, f"Study report: {study.name}"), encoding="utf-8")
    written += [report, page]
    for path in written:
        client.log_artifact(study.id, str(path), ARTIFACT_DIR)
    log.info("report of study %s written to %s and logged to the study run under %s/", study.id[:8], out_dir,
             ARTIFACT_DIR)
    return report


def _threshold(study: Study, explicit: float | None) -> tuple[float, str]:
    """The IT threshold of the analysis and where it came from."""
    if explicit is not None:
        return explicit, "given with --it-threshold"
    recorded, source = study.recorded_threshold()
    if recorded is not None:
        return recorded, source
    return DEFAULT_IT_THRESHOLD, f"the chains' default; {source}"


def _json_default(value: Any) -> Any:
    """Identifying fields come from pandas: numpy scalars (NaN for a missing noise or start epoch)."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and math.isnan(value) else value


def _verdict_rows(a: Analysis) -> pd.DataFrame:
    """One row per chain-group verdict (kind=sdd, retrace, distill, bad_start): its curve's fields and verdict
    columns (the run-id lists stay in verdicts.json)."""
    rows = [{"kind": v.kind, **{k: val for k, val in v.key.items() if not isinstance(val, (list, dict))},
             "dense_seeds": " ".join(map(str, v.key.get("dense_seeds", []))), **v.columns()}
            for v in a.verdicts if v.kind != "dd"]  # the dd verdicts sit on the kind=dd rows
    return pd.DataFrame(rows)


def summary_table(a: Analysis) -> pd.DataFrame:
    """summary.csv: one row per family x noise (kind=dd, with its DD verdict), per chain-group verdict
    (kind=sdd, retrace, distill; kind=bad_start per chain setting run from the IT and control starts), per
    chain (kind=chain) and per registered model (kind=registered_model).
    Verdict columns: claim, effect_name, effect, ci_low, ci_high, p_value, seeds, n_test, verdict, convergence."""
    frames = [f for f in (a.thresholds, _verdict_rows(a), a.chains, a.registered) if not f.empty]
    if not frames:
        return pd.DataFrame(columns=["kind"])
    table = pd.concat(frames, ignore_index=True, sort=False)
    for column in INT_COLUMNS & set(table.columns):
        # Mixed row kinds leave gaps, which would turn integer columns into floats ("6.0").
        table[column] = pd.to_numeric(table[column], errors="coerce").round().astype("Int64")
    return table[["kind", *[c for c in table.columns if c != "kind"]]]


def write_tables(a: Analysis, out_dir: Path) -> list[Path]:
    paths = [out_dir / SUMMARY, out_dir / DENSE_TABLE, out_dir / LEVEL_TABLE]
    summary_table(a).to_csv(paths[0], index=False, float_format=FLOAT_FORMAT)
    paths.append(out_dir / VERDICTS)
    paths[-1].write_text(json.dumps([v.record() for v in a.verdicts], indent=1, default=_json_default) + "\n",
                         encoding="utf-8")
    a.study.dense.to_csv(paths[1], index=False, float_format=FLOAT_FORMAT)
    labels = a.chains.set_index("chain_run_id")["label"] if not a.chains.empty else pd.Series(dtype=object)
    a.levels.assign(label=a.levels["chain_run_id"].map(labels)).to_csv(paths[2], index=False,
                                                                       float_format=FLOAT_FORMAT)
    return paths


# --- formatting ---------------------------------------------------------------------------------------

def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x)) or x is pd.NA


def _f(x: Any, digits: int = 3) -> str:
    return "–" if _missing(x) else f"{float(x):.{digits}f}"


def _pct(x: Any) -> str:
    return "–" if _missing(x) else f"{float(x) * 100:.3g}%"


def _int(x: Any) -> str:
    return "–" if _missing(x) else f"{int(x)}"


def _noise(x: Any) -> str:
    return "noise ?" if _missing(x) else f"noise {float(x):.0%}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _seeds(low: int, high: int) -> str:
    return _count(low, "seed") if low == high else f"{low}–{high} seeds"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _span(first: Any, last: Any) -> str:
    if _missing(first):
        return "–"
    return f"{int(first)}" if int(first) == int(last) else f"{int(first)}–{int(last)}"


# --- the page -------------------------------------------------------------------------------------

def render(a: Analysis, client: MlflowClient) -> str:
    s = a.study
    parts = [
        f"# Study report: {s.name}",
        f"Study run `{s.id}` ({s.run.info.status}), study file `{s.study_file or 'not recorded'}`, "
        f"tracking store `{client.tracking_uri}`, generated {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC.",
        f"Interpolation threshold (IT) rule, the same along width and along pruning levels: the noisy-label "
        f"subset's train accuracy crosses {a.threshold:g} ({a.threshold_source}; first width that reaches it; first "
        "level that falls below it, for a dense parent that reached it; else the chain \"never interpolated\"). "
        "Every claim below is decided by `analysis.stats` from the seeds' curves, against the "
        "test set's binomial noise and the spread between seeds, and printed with its effect size, 95% CI, "
        f"p-value and seed count; with one seed it reads \"one seed: not tested\". Full records: [{VERDICTS}]({VERDICTS}).",
        _what_was_run(a),
        "## Headline answers",
        _answer_it(a),
        _answer_sdd(a),
        _answer_bad_start(a),
        _answer_retrace(a),
        _answer_distill(a),
        _answer_early_stop(a),
        _figures(),
        _summary_section(a),
        _registered_section(a),
        _tags_section(a),
        _missing_section(a),
        f"Tables: [{SUMMARY}]({SUMMARY}) (one row per noise level, chain and registered model), "
        f"[{DENSE_TABLE}]({DENSE_TABLE}) (one row per dense run), [{LEVEL_TABLE}]({LEVEL_TABLE}) "
        "(one row per chain level, with its recomputed phase).",
    ]
    return "\n\n".join(p for p in parts if p) + "\n"


def _what_was_run(a: Analysis) -> str:
    s = a.study
    chains = s.chains
    reused_dense = int(s.dense["reused"].sum()) if not s.dense.empty else 0
    rows = [["study", 1, ""],
            ["sweep (stages: " + (", ".join(sorted(r.data.tags.get("sdd.stage", "?") for r in s.stages)) or "none")
             + ")", len(s.stages), ""],
            ["train (dense models)", len(s.dense), reused_dense]]
    for step in ("prune", "distill"):
        part = chains[chains["step"] == step] if not chains.empty else chains
        rows.append([f"{step} (chains)", len(part), int(part["reused"].sum()) if len(part) else 0])
    rows.append(["level (one per pruning level)", s.level_runs, ""])
    statuses = Counter(t.status for t in s.trials)
    trials = (f"The stages' trial lists name {_count(len(s.trials), 'trial')}: "
              + ", ".join(f"{n} {st}" for st, n in sorted(statuses.items()))
              + f" ({sum(t.reused for t in s.trials)} reused a finished run of the same config).") if s.trials \
        else "No stage run holds a trial list (trials.json); runs were found by their tags."
    return "## What was run\n\n" + "Finished runs read back from MLflow:\n\n" + \
        _table(["step", "runs", "reused from earlier studies"], rows) + "\n\n" + trials


def _answer_it(a: Analysis) -> str:
    lines = ["### 1. Where is the interpolation threshold?"]
    if a.thresholds.empty:
        return "\n\n".join(lines + ["No finished dense runs: no DD curve, no IT."])
    for t in a.thresholds.to_dict("records"):
        part = select(a.curve, t["family"], t["noise"]).sort_values("width")
        head = f"- **{t['family']}, {_noise(t['noise'])}** ({_count(t['n_widths'], 'width')}, " \
            f"{_seeds(t['min_seeds'], t['max_seeds'])}): "
        if not t["noisy_fit_available"]:
            text = "no noisy-label subset was measured (no label noise?), so the IT rule does not apply."
        elif _missing(t["it_width"]):
            best = part.loc[part["train_acc_noisy_mean"].idxmax()]
            text = (f"**no IT in the sweep**: no width fits the noisy labels to {a.threshold:g} (best "
                    f"{best['train_acc_noisy_mean']:.3f} at width {best['width']:g}); widen the sweep.")
        else:
            at = part[part["width"] == t["it_width"]].iloc[0]
            below = part[part["width"] < t["it_width"]]
            prev = (f"; width {below['width'].iloc[-1]:g} reaches {below['train_acc_noisy_mean'].iloc[-1]:.3f}"
                    if len(below) else "; it is the smallest width of the sweep, so the IT may lie below it")
            text = (f"**IT at width {t['it_width']:g}** (≈{t['it_num_params']:,.0f} parameters): mean noisy-subset "
                    f"train accuracy {at['train_acc_noisy_mean']:.3f}{prev}.")
        text += " " + _dd_shape(part, t) + " Dip and recovery of the test accuracy along width: " + _stated(t) + "."
        lines.append(head + text)
    return "\n".join([lines[0], "", *lines[1:]])


def _dd_shape(part: pd.DataFrame, t: dict) -> str:
    """The DD peak of the test error and whether the error comes down again after it."""
    if _missing(t["peak_err_width"]):
        return "The mean test error never rises with width: no DD peak inside the sweep."
    err = part["test_err_mean"].tolist()
    peak = part["width"].tolist().index(t["peak_err_width"])
    before = min(err[:peak])
    where = "at the IT" if t["peak_err_width"] == t["it_width"] else f"at width {t['peak_err_width']:g}"
    text = (f"The mean test error peaks {where} ({t['peak_test_err']:.3f}, up from {before:.3f} for the best "
            "smaller model)")
    if peak == len(err) - 1:
        return text + "; the widest model is the peak: no second descent within the sweep."
    after = min(err[peak + 1:])
    below = "below" if after < before else "not below"
    return text + f" and falls again to {after:.3f} for wider models, {below} the best smaller model's."


def _chain_point(level: Any, acc: Any, sparsity: Any) -> str:
    return f"{_f(acc)} at level {_int(level)} (sparsity {_pct(sparsity)})"


def _p(p: Any) -> str:
    if _missing(p):
        return "p –"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}" if p < 0.01 else f"p = {p:.2f}"


def _stated(row: dict, prefix: str = "") -> str:
    """A verdict as the report states it: analysis.stats' verdict string, then the effect size with its
    95% CI, the p-value and the seed count (CI and p read "–" where one seed allows none), then whether
    it rests on points whose training did not converge."""
    def get(key: str) -> Any:
        return row.get(prefix + key)
    text = f"**{get('verdict')}**"
    # not tested at all (nothing estimated), or a verdict string that already states effect, CI, p and seeds
    if not _missing(get("effect_name")) and "[" not in text:
        dip = (f"dip {_f(get('dip'))} [{_f(get('dip_ci_low'))}, {_f(get('dip_ci_high'))}], "
               if not _missing(get("dip")) else "")
        text += (f" ({dip}{get('effect_name')} {_f(get('effect'))} [{_f(get('ci_low'))}, {_f(get('ci_high'))}], "
                 f"{_p(get('p_value'))}, {_count(int(get('seeds')), 'seed')})")
    note = get("convergence")
    if _missing(note) or not note:
        return text
    flagged = not _missing(get("unconverged_levels")) and int(get("unconverged_levels")) > 0
    return text + (f"; **{note}**" if flagged else f"; {note}")


def _answer_sdd(a: Analysis) -> str:
    head = "### 2. Per starting width: does an SDD dip-and-recovery show?"
    if a.groups.empty:
        return head + "\n\nNo finished pruning chains: nothing to say about sparse double descent."
    lines = []
    for g in a.groups[a.groups["step"] == "prune"].to_dict("records") or a.groups.to_dict("records"):
        start = f"w{g['width']:g}" + (f" from epoch {g['start_epoch']}" if not _missing(g["start_epoch"]) else "")
        who = f"- **{start}, {_noise(g['noise'])}**, {g['setting']} ({_count(g['n_seeds'], 'seed')}): "
        text = _stated(g, "sdd_")
        if not _missing(g["dip_level"]):
            text += (f". Mean test accuracy: {_f(g['dense_test_acc'])} dense, lowest point of the best dip "
                     f"{_chain_point(g['dip_level'], g['dip_test_acc'], g['dip_sparsity'])}, best after it "
                     f"{_chain_point(g['recovery_level'], g['recovery_test_acc'], g['recovery_sparsity'])}.")
        lines.append(who + text)
    note = "" if (a.groups["step"] == "prune").any() else "\n\n(Only distilled chains were run; they are shown.)"
    return head + "\n\nOne curve per group of chains that differ only in the dense seed (seeds x levels, level 0 " \
        "the dense parents); dip-and-recovery searched over every level, p-value corrected for that search " \
        "(analysis.stats.dip_and_recovery).\n\n" + "\n".join(lines) + note


def _answer_bad_start(a: Analysis) -> str:
    head = "### 3. Is the interpolation threshold a bad place to start pruning?"
    if a.starts.empty:
        return head + "\n\nNo chain setting was run from both the IT start and a control start (the study file's " \
            "`start: {select: [at, before, after, ...]}`): not tested."
    lines = []
    for s in a.starts.to_dict("records"):
        variant = f" {s['variant']}" if s.get("variant") else ""
        lines.append(f"- **{s['family']}, {_noise(s['noise'])}**, {s['setting']}{variant}: IT start w{s['width']:g} "
                     f"vs {s['control_starts']} ({_count(int(s['n_seeds']), 'common seed')}): "
                     f"{_stated(s, 'bad_start_')}")
    return head + "\n\nThe best pruned test accuracy (at each chain's best level by val_acc) from the IT parent " \
        "minus the mean over the control parents (the widths a control factor below and above the IT), paired " \
        "by dense seed; \"a bad start\" = significantly below (analysis.stats.it_is_a_bad_start, two-sided paired t-test)." \
        "\n\n" + "\n".join(lines)


def _answer_retrace(a: Analysis) -> str:
    head = "### 4. Does pruning retrace the dense DD curve backwards?"
    if a.groups.empty:
        return head + "\n\nNo finished pruning chains."
    lines = []
    for g in a.groups.to_dict("records"):
        who = f"- **w{g['width']:g}, {_noise(g['noise'])}**, {g['setting']} ({_count(g['n_seeds'], 'seed')}): "
        text = _stated(g, "retrace_")
        ref = select(a.thresholds, g["family"], g["noise"])
        if g["sdd_claim"] and len(ref) and not _missing(ref.iloc[0]["it_width"]):
            text += (f". Its dip sits at ≈{g['dip_nonzero_params']:,.0f} nonzero parameters; the dense IT at "
                     f"≈{ref.iloc[0]['it_num_params']:,.0f}.")
        lines.append(who + text)
    return head + "\n\nPruned test accuracy minus the dense DD curve's (seed means, log-interpolated) at the same " \
        "number of nonzero parameters, at every pruned level inside the dense sweep's parameter range; " \
        "\"retraces\" is an equivalence test (analysis.stats.retraces). See trajectory.png.\n\n" + "\n".join(lines)


def _answer_distill(a: Analysis) -> str:
    head = "### 5. Does distillation make the curve monotonic?"
    has_distill = not a.chains.empty and (a.chains["step"] == "distill").any()
    if not has_distill:
        return head + "\n\nNo distillation chains in this study."
    if a.distill.empty:
        return head + "\n\nThe distilled chains have no vanilla chain of the same dense parent to compare with."
    lines = [f"- **w{d['width']:g}, {_noise(d['noise'])}**, {d['setting']} vs prune {d['setting'].split(' ')[1]}"
             f" ({_count(d['n_seeds'], 'common seed')}): {_stated(d, 'distill_')}"
             for d in a.distill.to_dict("records")]
    return head + "\n\nMonotonic = the vanilla curve dips and recovers significantly, the distilled one does not, " \
        "and the recovery shrank significantly (analysis.stats.distillation_monotonic, paired by dense seed)." \
        "\n\n" + "\n".join(lines)


def _answer_early_stop(a: Analysis) -> str:
    head = "### 6. Where would the entropy early stop stop, and what would it save?"
    if a.chains.empty:
        return head + "\n\nNo finished pruning chains."
    lines = []
    for c in a.chains.to_dict("records"):
        rule = f"entropy drop ≥ {c['early_stop_entropy_drop']:g}, val_acc tolerance {c['early_stop_acc_tolerance']:g}"
        tag = ""
        if not _missing(c["early_stop_level_tag"]):
            same = c["early_stop_level_tag"] == c["early_stop_level"]
            tag = f" The chain itself stopped at level {int(c['early_stop_level_tag'])}" + \
                ("." if same else " (it ran with other settings).")
        if _missing(c["early_stop_level"]):
            lines.append(f"- {c['label']}: never triggers ({rule}) over its {c['levels']} levels.{tag}")
            continue
        lines.append(
            f"- {c['label']}: would stop at **level {int(c['early_stop_level'])}** ({rule}), saving "
            f"{_pct(c['early_stop_epochs_saved'])} of the retraining epochs and ≈{_pct(c['early_stop_flops_saved'])} "
            f"of the training FLOPs. The best level by val_acc up to there has test accuracy "
            f"{_f(c['early_stop_best_test_acc'])} at sparsity {_pct(c['early_stop_best_sparsity'])}, against the "
            f"full chain's best {_f(c['best_test_acc'])} at {_pct(c['best_sparsity'])}.{tag}")
    return head + "\n\nDSD's rule (sdd.phases.entropy_early_stop) replayed on each chain's logged entropy and " \
        "val_acc, with the chain's own settings; the chain's logged training FLOPs are split over its levels in " \
        "proportion to their density.\n\n" + "\n".join(lines)


def _figures() -> str:
    parts = ["## Figures"]
    for name, (_draw, caption) in FIGURES.items():
        parts.append(f"### {caption}\n\n![{caption}]({name})")
    return "\n\n".join(parts)


def _summary_section(a: Analysis) -> str:
    parts = ["## Summary"]
    if not a.thresholds.empty:
        parts.append(_table(
            ["family", "noise", "IT width", "IT params", "DD peak width (test error)", "peak test error", "seeds"],
            [[t["family"], _noise(t["noise"]), _int(t["it_width"]) if not _missing(t["it_width"]) else "none",
              "–" if _missing(t["it_num_params"]) else f"{t['it_num_params']:,.0f}", _int(t["peak_err_width"]),
              _f(t["peak_test_err"]), _seeds(t["min_seeds"], t["max_seeds"])]
             for t in a.thresholds.to_dict("records")]))
    if not a.chains.empty:
        header = ["chain", "noise", "dense test", "dense noisy fit", "IT level", *LEVEL_PHASES, "best level",
                  "best test", "best sparsity", "unconverged levels", "tag agrees", "registered"]
        rows = [[c["label"], _noise(c["noise"]), _f(c["dense_test_acc"]), _f(c["dense_noisy_fit"]), c["it_status"],
                 *[_span(c[f"{p}_first"], c[f"{p}_last"]) for p in LEVEL_PHASES], _int(c["best_level"]),
                 _f(c["best_test_acc"]), _pct(c["best_sparsity"]),
                 "not recorded" if _missing(c["unconverged_levels"]) else
                 f"{int(c['unconverged_levels'])} of {int(c['convergence_recorded_levels'])}",
                 "no tag" if _missing(c["phases_match"]) else "yes" if c["phases_match"] else "**no**",
                 c.get("registered") or ""]
                for c in a.chains.to_dict("records")]
        parts.append("Per chain (phase columns give the first–last level of each phase):\n\n" + _table(header, rows))
    return "\n\n".join(parts)


def _registered_section(a: Analysis) -> str:
    head = "## Registered model"
    if a.registered.empty:
        return head + "\n\nNo dataset x model family to look up."
    chains = a.chains.set_index("chain_run_id") if not a.chains.empty else pd.DataFrame()
    lines = []
    for r in a.registered.to_dict("records"):
        if _missing(r["version"]):
            lines.append(f"- `{r['name']}`: no version carries the alias @best-sparse.")
            continue
        if r["from_study"]:
            origin = f"**from this study**, chain {chains.loc[r['chain_run_id'], 'label']}"
        else:
            origin = "**not from this study** (an earlier or other study's chain still holds the best val_acc)"
        lines.append(
            f"- `models:/{r['name']}@{r['alias']}` = version {r['version']}: chain `{r['chain_run_id']}` level "
            f"{r['level']}, sparsity {_pct(r['sparsity'])}, test accuracy {_f(r['test_acc'])}, val accuracy "
            f"{_f(r['val_acc'])}; {origin}.")
    return head + "\n\n" + "\n".join(lines)


def _tags_section(a: Analysis) -> str:
    head = "## Phase tags vs recomputed phases"
    if a.chains.empty:
        return ""
    differ = a.chains[a.chains["phases_match"] == False]  # noqa: E712 (None = untagged, not a mismatch)
    untagged = int(a.chains["phases_match"].isna().sum())
    text = f"{len(a.chains) - len(differ) - untagged} of {len(a.chains)} chains' `sdd.phases` tags agree with " \
        f"the phases recomputed here" + (f"; {untagged} have no tag" if untagged else "") + "."
    lines = []
    levels = a.levels
    for c in differ.to_dict("records"):
        phases = levels[levels["chain_run_id"] == c["chain_run_id"]].sort_values("level")["phase"].tolist()
        tagged = a.study.chains.set_index("chain_run_id").loc[c["chain_run_id"], "phases_tag"]
        why = "" if _missing(c["tag_threshold"]) or c["tag_threshold"] == a.threshold else \
            f" (the chain was tagged with threshold {c['tag_threshold']:g}, this report uses {a.threshold:g})"
        lines.append(f"- {c['label']} (`{c['chain_run_id'][:8]}`): tag IT level {c['it_level_tag']}, phases "
                     f"`{tagged}`; recomputed IT level {c['it_status']}, phases `{','.join(phases)}`{why}.")
    return head + "\n\n" + text + ("\n\n" + "\n".join(lines) if lines else "") + \
        "\n\nFigures and tables use the recomputed phases."


def _config_text(config: dict, keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={config[k]}" for k in keys if k in config)


def _missing_section(a: Analysis) -> str:
    head = "## What is missing"
    missing = a.study.missing
    if missing.empty:
        return head + "\n\nNothing: every trial of the study gave a finished run."
    varying: dict[str, list[str]] = {}
    for stage, part in missing.groupby("stage"):
        configs = [t.config for t in a.study.trials if t.stage == stage] or part["config"].tolist()
        keys = sorted({k for c in configs for k in c if len({str(x.get(k)) for x in configs}) > 1})
        varying[stage] = keys or [k for k in CONFIG_KEYS if any(k in c for c in configs)]
    rows = [[m["stage"] or "–", m["trial"], m["step"], m["status"], m["attempts"],
             _config_text(m["config"], varying.get(m["stage"], CONFIG_KEYS)), m["error"] or "–"]
            for m in missing.to_dict("records")]
    return head + f"\n\n{len(missing)} trial(s) did not give a finished run; everything above is computed " \
        "without them.\n\n" + _table(["stage", "trial", "step", "status", "attempts", "config", "error"], rows)
