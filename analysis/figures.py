"""The report's figures. Every function writes its PNG whatever the data holds: an empty panel says
what is missing instead of the file going missing.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas, never pyplot, so no global
figure state or interactive backend is involved (safe in Ray workers and tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

from analysis import stats
from analysis.runs import select
from analysis.summary import Analysis, dense_reference
from sdd.phases import NEVER_INTERPOLATED, NO_IT, sdd_phases

PHASE_COLORS = {"light": "#9ecae1", "critical": "#fc9272", "sweet": "#a1d99b", "collapsed": "#bdbdbd"}
# Density ticks, labelled as sparsity: fine ones for short chains, coarse ones once they would crowd.
FINE_TICKS = (1.0, 0.8, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0005, 0.0002, 0.0001)
COARSE_TICKS = (1.0, 0.5, 0.1, 0.05, 0.01, 0.005, 0.001, 0.0005, 0.0001)
MAX_TICKS = 7
DPI = 110
MIN_WIDTH = 8.0


def _figure(nrows: int, ncols: int, width: float, height: float) -> tuple[Figure, np.ndarray]:
    # A floor on the width keeps the title and the figure legend inside a one-panel figure.
    fig = Figure(figsize=(max(MIN_WIDTH, width * ncols), height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=10, color="0.3", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _noise_label(noise: float | None) -> str:
    return "noise ?" if noise is None or (isinstance(noise, float) and math.isnan(noise)) else f"noise {noise:.0%}"


def _width_colors(widths: Sequence[float]) -> Callable[[float], tuple]:
    """One colour per starting width, on a log scale so 8..1024 spread evenly."""
    from matplotlib import colormaps

    values = [w for w in widths if w and not math.isnan(w)]
    if not values:
        return lambda _w: (0.2, 0.2, 0.6, 1.0)
    low, high = min(values), max(values)
    norm = LogNorm(vmin=low / 1.5, vmax=high * 1.5) if high > low else None
    cmap = colormaps["viridis"]
    return lambda w: cmap(norm(w)) if norm is not None else cmap(0.4)


def _sparsity_axis(ax: Axes, densities: Sequence[float]) -> None:
    """x = density on a log scale, decreasing to the right, labelled as sparsity: the usual SDD axis."""
    ax.set_xscale("log")
    finite = [d for d in densities if d > 0 and math.isfinite(d)]
    low = min(finite) if finite else 0.01
    ax.set_xlim(1.15, low / 1.15)
    ticks = [t for t in FINE_TICKS if t >= low / 1.15]
    if len(ticks) > MAX_TICKS:
        ticks = [t for t in COARSE_TICKS if t >= low / 1.15]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda d, _pos: f"{(1 - d) * 100:.4g}%"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("sparsity (log scale of density)")


def _shade_phases(ax: Axes, densities: Sequence[float], phases: Sequence[str]) -> None:
    """Each level owns the log-interval between the midpoints to its neighbours."""
    d = [max(x, 1e-12) for x in densities]
    if len(d) < 2:
        return
    edges = [math.sqrt(d[i] * d[i + 1]) for i in range(len(d) - 1)]
    edges = [d[0] * (d[0] / edges[0])] + edges + [d[-1] * (d[-1] / edges[-1])]
    for i, phase in enumerate(phases):
        if phase in PHASE_COLORS:
            ax.axvspan(edges[i], edges[i + 1], color=PHASE_COLORS[phase], alpha=0.35, lw=0)


def _phase_handles() -> list[Patch]:
    return [Patch(color=c, alpha=0.6, label=p) for p, c in PHASE_COLORS.items()]


def _chain_history(a: Analysis, chain_id: str) -> pd.DataFrame:
    return a.levels[a.levels["chain_run_id"] == chain_id].sort_values("level")


# --- DD curve -------------------------------------------------------------------------------------

DD_LINES = (("test_err", "C3", "-", "test error"), ("train_err", "C0", "--", "train error"),
            ("noisy_err", "C2", ":", "train error on noisy-label subset"))


def _missing_noises(a: Analysis) -> list[float]:
    """Noise levels the dense trials asked for that gave no finished run."""
    asked = {float(t.config["noise"]) for t in a.study.trials if t.step == "train" and "noise" in t.config}
    have = set(a.curve["noise"].dropna().astype(float))
    return sorted(asked - have)


def dd_figure(a: Analysis, path: Path) -> Path:
    """Train/test error vs width (top) and vs parameter count (bottom), per family and noise level."""
    panels = [(f, n) for f, n in a.thresholds[["family", "noise"]].itertuples(index=False)]
    panels += [(None, n) for n in _missing_noises(a)]
    fig, axes = _figure(2, max(1, len(panels)), 5.0, 3.4)
    if not panels:
        _note(axes[0, 0], "no finished dense runs in this study")
        _note(axes[1, 0], "no finished dense runs in this study")
    for j, (family, noise) in enumerate(panels):
        if family is None:
            for row in (0, 1):
                _note(axes[row, j], f"{_noise_label(noise)}: no finished dense run\n(see the report: what is missing)")
                axes[row, j].set_title(_noise_label(noise), fontsize=9)
            continue
        part = select(a.curve, family, noise).sort_values("width")
        it = select(a.thresholds, family, noise).iloc[0]
        spread = part["n_seeds"].max() >= 2
        seeds = f"{part['n_seeds'].min()}" + (f"–{part['n_seeds'].max()}" if part["n_seeds"].nunique() > 1 else "")
        if not pd.isna(it["it_width"]):
            it_text = f"IT at width {it['it_width']:g}"
        else:
            it_text = "no IT: " + ("no noisy labels" if not it["noisy_fit_available"]
                                   else f"no width fits the noisy labels to {a.threshold:g}")
        band = f"{seeds} seeds; band: 95% CI of the mean" if spread else "1 seed: no band"
        for row, xcol in ((0, "width"), (1, "num_params")):
            ax = axes[row, j]
            x = part[xcol].to_numpy(float)
            for metric, color, style, label in DD_LINES:
                mean = part[f"{metric}_mean"]
                if mean.isna().all():
                    continue
                ax.plot(x, mean, color=color, ls=style, marker="o", ms=3.5, label=label)
                if spread:
                    ax.fill_between(x, part[f"{metric}_lo"], part[f"{metric}_hi"], color=color, alpha=0.15, lw=0)
            if not pd.isna(it["it_width"]):
                ax.axvline(it["it_width"] if xcol == "width" else it["it_num_params"], color="k", ls="-.", lw=1.2,
                           label=f"interpolation threshold (noisy-subset fit ≥ {a.threshold:g})")
            ax.set_xscale("log", base=2 if xcol == "width" else 10)
            ax.set_xlabel("width (log)" if xcol == "width" else "parameters (log)")
            ax.set_ylabel("error (1 − accuracy)")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.set_title(f"{family}, {_noise_label(noise)}: {it_text}\n{band}", fontsize=9)
    _figure_legend(fig, axes)
    fig.suptitle("Deep double descent: error vs model size\n(mean over seeds, 95% CI bands)")
    return _save(fig, path)


def _figure_legend(fig: Figure, axes: np.ndarray, extra: Sequence = (), ncol: int = 4) -> None:
    """One legend below all panels, with every distinct entry of the panels (plus `extra` handles)."""
    seen: dict[str, object] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    handles = list(seen.values()) + list(extra)
    if handles:
        fig.legend(handles=handles, labels=list(seen) + [h.get_label() for h in extra], loc="outside lower center",
                   ncol=ncol, fontsize=8, frameon=False)


# --- SDD curves -----------------------------------------------------------------------------------

def group_curves(a: Analysis, members: pd.DataFrame, n_test: int | None) -> pd.DataFrame:
    """One seed group's curve per level: mean and 95% CI band over its chains (seeds) of the test and
    noisy-subset accuracy, mean density and nonzero parameters. Each level uses the seeds that reached it."""
    table = a.levels[a.levels["chain_run_id"].isin(members["chain_run_id"])]
    out = table.groupby("level")[["density", "nonzero_params"]].mean()
    for metric, floor in (("test_acc", n_test), ("train_acc_noisy", None)):
        wide = table.pivot_table(index="level", columns="chain_run_id", values=metric).reindex(out.index)
        mean, low, high = stats.seed_band(wide.T.to_numpy(), floor) if wide.size else ([], [], [])
        out[f"{metric}_mean"], out[f"{metric}_lo"], out[f"{metric}_hi"] = mean, low, high
    out["seeds"] = table.groupby("level")["chain_run_id"].nunique()
    return out.reset_index()


def _it_text(members: pd.DataFrame, threshold: float) -> tuple[str, list[int]]:
    """The group's IT as its chains have it (only where the dense parent interpolated), and the IT levels."""
    statuses = members["it_status"].tolist()
    levels = sorted({int(s) for s in statuses if s not in (NO_IT, NEVER_INTERPOLATED)})
    never = statuses.count(NEVER_INTERPOLATED)
    if levels:
        text = f"IT level {', '.join(map(str, levels))}"
    elif never:
        fit = members["dense_noisy_fit"].mean()
        text = f"never interpolated (dense noisy fit {fit:.3f} < {threshold:g})"
    else:
        text = "no IT: noisy labels stay fitted"
    others = len(statuses) - sum(s not in (NO_IT, NEVER_INTERPOLATED) for s in statuses) if levels else 0
    return text + (f"; {others} of {len(statuses)} seeds without" if others else ""), levels


def _group_members(a: Analysis) -> list[tuple[dict, pd.DataFrame]]:
    if a.groups.empty or a.chains.empty:
        return []
    return [(g, a.chains[a.chains["group"] == g["group"]]) for g in a.groups.to_dict("records")]


def _n_test(group: dict) -> int | None:
    value = group.get("sdd_n_test")
    return None if value is None or pd.isna(value) else int(value)


def sdd_figure(a: Analysis, path: Path) -> Path:
    """Per group of chains differing only in the seed: mean test accuracy and noisy-subset train accuracy
    vs sparsity with 95% CI bands over seeds, phases of the mean curve shaded, the chains' IT levels marked."""
    groups = _group_members(a)
    ncols = min(3, max(1, len(groups)))
    nrows = max(1, math.ceil(len(groups) / ncols))
    fig, axes = _figure(nrows, ncols, 4.8, 3.2)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    if not groups:
        axes[0, 0].set_visible(True)
        _note(axes[0, 0], "no finished pruning chains in this study")
    for ax, (group, members) in zip(axes.flat, groups):
        h = group_curves(a, members, _n_test(group))
        if h.empty:
            _note(ax, f"{group['group']}:\nno level metrics logged")
            continue
        dens = h["density"].tolist()
        noisy = h["train_acc_noisy_mean"].fillna(1.0).tolist()
        _shade_phases(ax, dens, sdd_phases(h["test_acc_mean"].tolist(), noisy, a.threshold))
        ax.plot(dens, h["test_acc_mean"], color="C3", marker="o", ms=3, label="test accuracy (mean)")
        ax.fill_between(dens, h["test_acc_lo"], h["test_acc_hi"], color="C3", alpha=0.2, lw=0)
        if h["train_acc_noisy_mean"].notna().any():
            ax.plot(dens, h["train_acc_noisy_mean"], color="C2", ls="--", marker=".", ms=3,
                    label="train accuracy on the noisy-label subset (mean)")
            ax.fill_between(dens, h["train_acc_noisy_lo"], h["train_acc_noisy_hi"], color="C2", alpha=0.15, lw=0)
        ax.axhline(h["test_acc_mean"].iloc[0], color="C3", lw=0.8, ls=":", label="dense test accuracy")
        it_text, it_levels = _it_text(members, a.threshold)
        for level in it_levels:
            at = h.loc[h["level"] == level, "density"]
            if len(at):
                ax.axvline(at.iloc[0], color="k", ls="-.", lw=1, label="interpolation threshold (IT) level")
        _sparsity_axis(ax, dens)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        seeds = len(members)
        first = members.iloc[0]
        start = f"w{first['width']}" + (f" e{first['start_epoch']}" if not pd.isna(first["start_epoch"]) else "")
        ax.set_title(f"{start} {first['setting']}{' ' + first['variant'] if first.get('variant') else ''}, "
                     f"{_noise_label(first['noise'])}\n{seeds} seed{'s' if seeds != 1 else ''}"
                     f"{'; band: 95% CI' if seeds > 1 else ''}; {it_text}", fontsize=8)
    _figure_legend(fig, axes, _phase_handles() if groups else ())
    fig.suptitle(f"Sparse double descent, mean over seeds\n(phases of the mean curve; IT where a dense parent that "
                 f"fitted its noisy labels to {a.threshold:g} drops below it)")
    return _save(fig, path)


# --- trajectories on the DD curve -----------------------------------------------------------------

def trajectory_figure(a: Analysis, path: Path) -> Path:
    """The dense DD curve and every group of chains (mean over seeds, 95% CI bands) on one log axis of
    nonzero parameters."""
    keys = set(a.thresholds[["family", "noise"]].itertuples(index=False, name=None))
    if not a.chains.empty:
        keys |= set(a.chains[["family", "noise"]].itertuples(index=False, name=None))
    panels = sorted(keys, key=lambda k: (str(k[0]), -1 if pd.isna(k[1]) else k[1]))
    fig, axes = _figure(1, max(1, len(panels)), 6.0, 5.0)
    if not panels:
        _note(axes[0, 0], "no finished runs to draw")
    color = _width_colors(a.chains["width"].tolist() if not a.chains.empty else [])
    groups = _group_members(a)
    for ax, (family, noise) in zip(axes.flat, panels):
        ref = dense_reference(a.curve, family, noise)
        if len(ref):
            x = ref["num_params"].to_numpy(float)
            ax.plot(x, ref["test_acc_mean"], color="k", lw=2, marker="s", ms=4, label="dense DD curve (mean)", zorder=3)
            if ref["n_seeds"].max() >= 2:
                ax.fill_between(x, ref["test_acc_lo"], ref["test_acc_hi"], color="k", alpha=0.12, lw=0)
            for xi, yi, w in zip(x, ref["test_acc_mean"], ref["width"]):
                ax.annotate(f"w{w:g}", (xi, yi), textcoords="offset points", xytext=(0, 6), fontsize=6,
                            ha="center", color="0.25")
            it = select(a.thresholds, family, noise)
            if len(it) and it["it_width"].iloc[0] is not None and not pd.isna(it["it_width"].iloc[0]):
                ax.axvline(it["it_num_params"].iloc[0], color="k", ls="-.", lw=1,
                           label=f"dense IT (width {it['it_width'].iloc[0]:g})")
        else:
            ax.text(0.02, 0.95, "no finished dense runs: no DD curve", transform=ax.transAxes, fontsize=8,
                    color="0.3", va="top")
        mine = [(g, m) for g, m in groups if g["family"] == family
                and (pd.isna(noise) and pd.isna(g["noise"]) or g["noise"] == noise)]
        for group, members in mine:
            h = group_curves(a, members, _n_test(group))
            c = color(group["width"])
            ls = "--" if group["step"] == "distill" else "-"
            first = members.iloc[0]
            label = f"w{first['width']} {first['setting']}" + (f" {first['variant']}" if first.get("variant") else "")
            ax.plot(h["nonzero_params"], h["test_acc_mean"], color=c, ls=ls, marker=".", ms=4, lw=1.2,
                    label=f"chains {label} ({len(members)} seed{'s' if len(members) != 1 else ''})")
            if len(members) > 1:
                ax.fill_between(h["nonzero_params"], h["test_acc_lo"], h["test_acc_hi"], color=c, alpha=0.15, lw=0)
            ax.plot(h["nonzero_params"].iloc[:1], h["test_acc_mean"].iloc[:1], color=c, marker="o", ms=8, mec="k",
                    ls="")

        ax.set_xscale("log")
        ax.set_xlabel("nonzero parameters (log)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        how = "no pruning chains at this noise level" if not mine else \
            "chains start at ● and run leftwards; dashed = distilled; bands: 95% CI over seeds"
        ax.set_title(f"{family}, {_noise_label(noise)}\n({how})", fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.suptitle("Does pruning retrace the dense DD curve?\nTest accuracy vs nonzero parameters (means over seeds)")
    return _save(fig, path)


# --- entropy and learning distance ----------------------------------------------------------------

ENTROPY_PANELS = (("entropy", "activation entropy (bits, mean over layers)"),
                  ("learning_distance", "learning distance ‖θ − θ₀‖ (from init)"),
                  ("learning_distance_level", "learning distance within the level"))


def entropy_figure(a: Analysis, path: Path) -> Path:
    """Entropy and learning distances vs sparsity, with where the entropy early stop would stop."""
    fig, axes = _figure(1, len(ENTROPY_PANELS), 4.8, 3.8)
    chains = a.chains.to_dict("records")
    for ax, (metric, label) in zip(axes.flat, ENTROPY_PANELS):
        drawn = []
        for i, chain in enumerate(chains):
            h = _chain_history(a, chain["chain_run_id"])
            if h[metric].isna().all():
                continue
            ls = "--" if chain["step"] == "distill" else "-"
            ax.plot(h["density"], h[metric], color=f"C{i % 10}", ls=ls, marker=".", ms=4, label=chain["label"])
            drawn.extend(h["density"].tolist())
            if metric == "entropy" and not pd.isna(chain["early_stop_level"]):
                at = h[h["level"] == chain["early_stop_level"]]
                ax.plot(at["density"], at[metric], marker="X", ms=10, color=f"C{i % 10}", mec="k", ls="")
        if not drawn:
            _note(ax, f"no {metric} logged by any chain" if chains else "no finished pruning chains")
            ax.set_title(label, fontsize=9)
            continue
        _sparsity_axis(ax, drawn)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.set_title(label, fontsize=9)
    stops = a.chains["early_stop_level"].notna().any() if not a.chains.empty else False
    marker = [Line2D([], [], marker="X", ms=8, color="0.5", mec="k", ls="",
                     label="where the entropy early stop would stop")] if stops else []
    _figure_legend(fig, axes, marker, ncol=3)
    fig.suptitle("Activation entropy and learning distance vs sparsity\n(dashed = distilled)")
    return _save(fig, path)


# --- vanilla vs distilled -------------------------------------------------------------------------

DISTILL_ROWS = (("test_acc", "test accuracy"), ("train_acc_noisy", "train accuracy, noisy-label subset"))
VANILLA_COLOR = "C3"
DISTILL_COLORS = ("C0", "C2", "C4", "C1", "C5", "C6")


def _distill_starts(a: Analysis) -> list[tuple[tuple, list]]:
    """The distillation verdicts (a distilled group and its vanilla group, over their common seeds) by parent
    start: family, noise, width and start epoch."""
    starts: dict[tuple, list] = {}
    for v in a.verdicts:
        if v.kind == "distill":
            k = v.key
            start = (k["family"], _noise_label(k["noise"]), k["width"], None if pd.isna(k["start_epoch"])
                     else k["start_epoch"])
            starts.setdefault(start, []).append(v)
    return list(starts.items())


def distill_figure(a: Analysis, path: Path) -> Path:
    """Per parent start (a column): the vanilla and the distilled chains' mean test accuracy and noisy-subset
    train accuracy vs sparsity, with 95% CI bands over the seeds their distillation verdict compares."""
    starts = _distill_starts(a)
    fig, axes = _figure(len(DISTILL_ROWS), max(1, len(starts)), 4.8, 3.2)
    if not starts:
        has_distill = not a.chains.empty and (a.chains["step"] == "distill").any()
        text = "no distilled chain has a vanilla chain of the same start" if has_distill \
            else "no distillation chains in this study"
        for ax in axes.flat:
            _note(ax, text)
    for col, ((family, noise, width, epoch), verdicts) in enumerate(starts):
        seeds = max(len(v.key["chain_run_ids"]) for v in verdicts)
        densities: list[float] = []
        # each vanilla group once, in the vanilla colour; each distilled setting in a colour of its own
        curves = {tuple(v.key["vanilla_chain_run_ids"]): ("vanilla", "-", VANILLA_COLOR, v.n_test) for v in verdicts}
        for i, v in enumerate(verdicts):
            curves[tuple(v.key["chain_run_ids"])] = ("distilled", "--", DISTILL_COLORS[i % len(DISTILL_COLORS)],
                                                     v.n_test)
        for ids, (name, ls, color, n_test) in curves.items():
            members = a.chains[a.chains["chain_run_id"].isin(ids)]
            h = group_curves(a, members, n_test)
            setting = members["setting"].iloc[0] if len(members) else "?"
            densities += h["density"].tolist()
            for row, (metric, _label) in enumerate(DISTILL_ROWS):
                ax = axes[row, col]
                ax.plot(h["density"], h[f"{metric}_mean"], color=color, ls=ls, marker=".", ms=4,
                        label=f"{name}: {setting} ({len(ids)} seed{'s' if len(ids) != 1 else ''})")
                ax.fill_between(h["density"], h[f"{metric}_lo"], h[f"{metric}_hi"], color=color, alpha=0.15, lw=0)
        for row, (_metric, label) in enumerate(DISTILL_ROWS):
            ax = axes[row, col]
            _sparsity_axis(ax, densities)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        start = f"w{width}" + (f" from epoch {epoch}" if epoch is not None else "")
        band = "band: 95% CI over seeds" if seeds > 1 else "1 seed: no band"
        axes[0, col].set_title(f"{family}, {noise}: start {start}\n{band}", fontsize=8)
    _figure_legend(fig, axes, ncol=2)
    fig.suptitle("Does distillation make the SDD curve monotonic?\n(mean over seeds; one parent start per column; "
                 "solid = vanilla, dashed = distilled)")
    return _save(fig, path)


FIGURES: dict[str, tuple[Callable[[Analysis, Path], Path], str]] = {
    "dd_curve.png": (dd_figure, "Deep double descent: train and test error vs width and vs parameter count"),
    "sdd_curves.png": (sdd_figure, "Sparse double descent per chain: test and noisy-subset accuracy, phases"),
    "trajectory.png": (trajectory_figure, "Pruning trajectories overlaid on the dense DD curve"),
    "entropy_distance.png": (entropy_figure, "Entropy and learning distance vs sparsity, entropy early stop"),
    "distill_vs_vanilla.png": (distill_figure, "Vanilla vs distilled chains from the same start, mean over seeds"),
}


def draw_all(a: Analysis, out_dir: Path) -> dict[str, Path]:
    """Every figure of the report, by file name."""
    return {name: draw(a, out_dir / name) for name, (draw, _caption) in FIGURES.items()}
