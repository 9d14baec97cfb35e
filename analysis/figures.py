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

from analysis.summary import Analysis, dense_reference, select

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
        band = f"{seeds} seeds; band: min–max over seeds" if spread else "1 seed: no spread band"
        for row, xcol in ((0, "width"), (1, "num_params")):
            ax = axes[row, j]
            x = part[xcol].to_numpy(float)
            for metric, color, style, label in DD_LINES:
                mean = part[f"{metric}_mean"]
                if mean.isna().all():
                    continue
                ax.plot(x, mean, color=color, ls=style, marker="o", ms=3.5, label=label)
                if spread:
                    ax.fill_between(x, part[f"{metric}_min"], part[f"{metric}_max"], color=color, alpha=0.15, lw=0)
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
    fig.suptitle("Deep double descent: error vs model size\n(mean over seeds)")
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

def sdd_figure(a: Analysis, path: Path) -> Path:
    """Test accuracy and noisy-subset train accuracy vs sparsity per chain, phases shaded."""
    chains = a.chains.to_dict("records")
    ncols = min(3, max(1, len(chains)))
    nrows = max(1, math.ceil(len(chains) / ncols))
    fig, axes = _figure(nrows, ncols, 4.8, 3.2)
    for ax in axes.flat[len(chains):]:
        ax.set_visible(False)
    if not chains:
        axes[0, 0].set_visible(True)
        _note(axes[0, 0], "no finished pruning chains in this study")
    for ax, chain in zip(axes.flat, chains):
        h = _chain_history(a, chain["chain_run_id"])
        if h.empty:
            _note(ax, f"{chain['label']}:\nno level metrics logged")
            continue
        dens = h["density"].tolist()
        _shade_phases(ax, dens, h["phase"].tolist())
        ax.plot(dens, h["test_acc"], color="C3", marker="o", ms=3, label="test accuracy")
        if h["train_acc_noisy"].notna().any():
            ax.plot(dens, h["train_acc_noisy"], color="C2", ls="--", marker=".", ms=3,
                    label="train accuracy on the noisy-label subset")
        ax.axhline(h["test_acc"].iloc[0], color="C3", lw=0.8, ls=":", label="dense test accuracy")
        if not pd.isna(chain["it_level"]):
            ax.axvline(h.loc[h["level"] == chain["it_level"], "density"].iloc[0], color="k", ls="-.", lw=1,
                       label="interpolation threshold (IT) level")
            it_text = f"IT level {int(chain['it_level'])}"
        else:
            it_text = "no IT: noisy labels stay fitted"
        best = h[h["level"] == chain["best_level"]] if not pd.isna(chain["best_level"]) else h.iloc[0:0]
        if len(best):
            ax.plot(best["density"], best["test_acc"], marker="*", ms=11, color="gold", mec="k", ls="",
                    label="best level by val_acc")
        _sparsity_axis(ax, dens)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        tag = "" if pd.isna(chain["phases_match"]) else ("; tag agrees" if chain["phases_match"] else "; TAG DIFFERS")
        ax.set_title(f"{chain['label']}, {_noise_label(chain['noise'])}\n{it_text}{tag}", fontsize=8)
    _figure_legend(fig, axes, _phase_handles() if chains else ())
    fig.suptitle(f"Sparse double descent per chain\n(phases recomputed; IT where the noisy-subset fit drops "
                 f"below {a.threshold:g})")
    return _save(fig, path)


# --- trajectories on the DD curve -----------------------------------------------------------------

def trajectory_figure(a: Analysis, path: Path) -> Path:
    """The dense DD curve and every chain on one log axis of nonzero parameters."""
    keys = set(a.thresholds[["family", "noise"]].itertuples(index=False, name=None))
    if not a.chains.empty:
        keys |= set(a.chains[["family", "noise"]].itertuples(index=False, name=None))
    panels = sorted(keys, key=lambda k: (str(k[0]), -1 if pd.isna(k[1]) else k[1]))
    fig, axes = _figure(1, max(1, len(panels)), 6.0, 5.0)
    if not panels:
        _note(axes[0, 0], "no finished runs to draw")
    color = _width_colors(a.chains["width"].tolist() if not a.chains.empty else [])
    for ax, (family, noise) in zip(axes.flat, panels):
        ref = dense_reference(a.curve, family, noise)
        if len(ref):
            x = ref["num_params"].to_numpy(float)
            ax.plot(x, ref["test_acc_mean"], color="k", lw=2, marker="s", ms=4, label="dense DD curve (mean)", zorder=3)
            if ref["n_seeds"].max() >= 2:
                ax.fill_between(x, ref["test_acc_min"], ref["test_acc_max"], color="k", alpha=0.12, lw=0)
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
        chains = select(a.chains, family, noise) if not a.chains.empty else a.chains
        for chain in chains.to_dict("records"):
            h = _chain_history(a, chain["chain_run_id"])
            c = color(chain["width"])
            ls = "--" if chain["step"] == "distill" else "-"
            ax.plot(h["nonzero_params"], h["test_acc"], color=c, ls=ls, marker=".", ms=4, lw=1.2,
                    label=f"chain {chain['label']}")
            ax.plot(h["nonzero_params"].iloc[:1], h["test_acc"].iloc[:1], color=c, marker="o", ms=8, mec="k", ls="")

        ax.set_xscale("log")
        ax.set_xlabel("nonzero parameters (log)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        how = "no pruning chains at this noise level" if chains.empty else \
            "chains start at ● and run leftwards; dashed = distilled"
        ax.set_title(f"{family}, {_noise_label(noise)}\n({how})", fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.suptitle("Does pruning retrace the dense DD curve?\nTest accuracy vs nonzero parameters")
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

def distill_figure(a: Analysis, path: Path) -> Path:
    """Vanilla and distilled chains of the same dense parent side by side."""
    pairs = a.pairs.to_dict("records")
    fig, axes = _figure(max(1, len(pairs)), 2, 4.8, 3.4)
    if not pairs:
        has_distill = not a.chains.empty and (a.chains["step"] == "distill").any()
        text = "no distilled chain has a vanilla chain of the same dense parent" if has_distill \
            else "no distillation chains in this study"
        _note(axes[0, 0], text)
        _note(axes[0, 1], text)
    for row, pair in enumerate(pairs):
        vanilla = _chain_history(a, pair["vanilla_run_id"])
        densities = vanilla["density"].tolist() + _chain_history(a, pair["distill_run_id"])["density"].tolist()
        for col, (key, title) in enumerate((("vanilla", "vanilla pruning"), ("distill", "pruning + distillation"))):
            ax = axes[row, col]
            h = _chain_history(a, pair[f"{key}_run_id"])
            _shade_phases(ax, h["density"].tolist(), h["phase"].tolist())
            ax.plot(h["density"], h["test_acc"], color="C3", marker="o", ms=3, label="test accuracy")
            if h["train_acc_noisy"].notna().any():
                ax.plot(h["density"], h["train_acc_noisy"], color="C2", ls="--", marker=".", ms=3,
                        label="train accuracy on the noisy-label subset")
            if key == "distill":
                ax.plot(vanilla["density"], vanilla["test_acc"], color="0.4", lw=1, ls=":",
                        label="vanilla chain's test accuracy")
            _sparsity_axis(ax, densities)
            ax.set_ylabel("accuracy")
            ax.grid(alpha=0.3)
            ax.set_title(f"{title}: {pair[f'{key}_label']}", fontsize=8)
        axes[row, 1].sharey(axes[row, 0])
    _figure_legend(fig, axes, _phase_handles() if pairs else ())
    fig.suptitle("Does distillation make the SDD curve monotonic?\n(one dense parent per row)")
    return _save(fig, path)


FIGURES: dict[str, tuple[Callable[[Analysis, Path], Path], str]] = {
    "dd_curve.png": (dd_figure, "Deep double descent: train and test error vs width and vs parameter count"),
    "sdd_curves.png": (sdd_figure, "Sparse double descent per chain: test and noisy-subset accuracy, phases"),
    "trajectory.png": (trajectory_figure, "Pruning trajectories overlaid on the dense DD curve"),
    "entropy_distance.png": (entropy_figure, "Entropy and learning distance vs sparsity, entropy early stop"),
    "distill_vs_vanilla.png": (distill_figure, "Vanilla vs distilled chains of the same dense parent"),
}


def draw_all(a: Analysis, out_dir: Path) -> dict[str, Path]:
    """Every figure of the report, by file name."""
    return {name: draw(a, out_dir / name) for name, (draw, _caption) in FIGURES.items()}
