"""Interpolation threshold, SDD phases and the entropy early-stop rule, as pure functions of curves.

The same rules serve a pruning chain (curves over levels), a width sweep (curves over width) and
the analysis, so a figure and a tag can never disagree about where the threshold is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

PHASES = ("dense", "light", "critical", "sweet", "collapsed")
LEVEL_PHASES = PHASES[1:]  # the phases a pruned level can be in


NO_IT = "none"                              # the noisy labels stay fitted at every level
NEVER_INTERPOLATED = "never interpolated"   # the dense parent did not fit its noisy labels to the threshold


def interpolated(noisy_acc: Sequence[float], threshold: float) -> bool:
    """Whether the dense model (index 0) fits its noisy labels to `threshold`: only then can pruning
    cross an interpolation threshold (a w32 parent fitting 18% of them has none to cross)."""
    return bool(noisy_acc) and noisy_acc[0] >= threshold


def pruning_threshold(noisy_acc: Sequence[float], threshold: float) -> int | None:
    """First level (index) whose noisy-subset train accuracy falls below `threshold` (He et al.), for a
    dense parent (index 0) that interpolated; None when the labels stay fitted or it never interpolated."""
    if not interpolated(noisy_acc, threshold):
        return None
    for i, acc in enumerate(noisy_acc):
        if i > 0 and acc < threshold:
            return i
    return None


def it_level_label(noisy_acc: Sequence[float], threshold: float) -> str:
    """The chain's IT as tags and reports print it: the level, `NO_IT` or `NEVER_INTERPOLATED`."""
    if not interpolated(noisy_acc, threshold):
        return NEVER_INTERPOLATED
    it = pruning_threshold(noisy_acc, threshold)
    return NO_IT if it is None else str(it)


def width_threshold(widths: Sequence[float], noisy_acc: Sequence[float], threshold: float) -> float | None:
    """Smallest width whose noisy-subset train accuracy reaches `threshold`: the model starts to
    interpolate the noisy labels there (the same rule as along pruning levels, read the other way)."""
    for width, acc in sorted(zip(widths, noisy_acc)):
        if acc >= threshold:
            return width
    return None


def sdd_phases(test_acc: Sequence[float], noisy_acc: Sequence[float], threshold: float,
               tolerance: float = 0.01) -> list[str]:
    """Phase of every level (index 0 is the dense start): light, critical, sweet, collapsed.

    Descriptive (whether a dip and rise are significant is decided in analysis.stats), with the IT of
    `pruning_threshold`:

    - before the IT (noisy labels fitted), or everywhere when there is none: `light` while the test
      accuracy stays within `tolerance` of the dense model's, `critical` from the first level below;
    - sweet needs a rise: the first sweet level is the first level from the IT on whose test accuracy
      is more than `tolerance` above the running minimum (the lowest test accuracy up to it); it lasts
      through the best test accuracy after it, and while the test accuracy stays within `tolerance`
      of that best; `collapsed` after;
    - the levels from the IT up to the first sweet one (the rest of the dip) keep the light/critical
      rule; with no sweet level at all (a decline, or flat, after the IT) the levels from the IT on
      are `collapsed` from the first one more than `tolerance` below the dense model: both fell.
    """
    n = len(test_acc)
    if n == 0:
        return []
    it = pruning_threshold(noisy_acc, threshold)
    low = [min(test_acc[:i + 1]) for i in range(n)]
    sweet = next((i for i in range(it, n) if test_acc[i] > low[i] + tolerance), None) if it is not None else None
    end = sweet if sweet is not None else (it if it is not None else n)
    out = ["dense"]
    fallen = False
    for i in range(1, end):
        fallen = fallen or test_acc[i] < test_acc[0] - tolerance
        out.append("critical" if fallen else "light")
    if sweet is None:
        for i in range(end, n):
            fallen = fallen or test_acc[i] < test_acc[0] - tolerance
            out.append("collapsed" if fallen else "light")
        return out
    peak = max(range(sweet, n), key=lambda i: (test_acc[i], -i))
    collapsed = False
    for i in range(sweet, n):
        collapsed = collapsed or (i > peak and test_acc[i] < test_acc[peak] - tolerance)
        out.append("collapsed" if collapsed else "sweet")
    return out


@dataclass(frozen=True)
class StopDecision:
    level: int
    reason: str


def _known(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def entropy_early_stop(entropy: Sequence[float | None], val_acc: Sequence[float], entropy_drop: float,
                       acc_tolerance: float) -> StopDecision | None:
    """DSD's Algorithm 2 (Quétu & Tartaglione): an entropy measure "enabling the use of traditional
    stop criteria" on a pruning chain. Index 0 is the dense model.

    Sparse double descent defeats a traditional early stop: the validation accuracy falls through
    the critical phase and rises again in the sweet one, so "stop once val_acc falls" stops at the
    bottom of the dip. DSD's answer: the activation entropy stays on a plateau while the model still
    memorises, and leaves it as the model leaves the critical phase; the stop criterion is
    disabled on the plateau and *re-enabled* once the entropy leaves it. Here:

    1. the plateau ends at the first level whose entropy lies `entropy_drop` (relative) or more
       below the dense model's; from that level on the rule stays on;
    2. from that level on the best val_acc is tracked (the plateau's levels, the dip included,
       never count as the best);
    3. the chain stops at the first later level whose val_acc is more than `acc_tolerance` below
       that best — the traditional criterion, with no patience.

    A missing entropy (None or NaN, e.g. a level measured without it) is no information: it
    neither ends the plateau nor, once the rule is on, turns it off. Without a dense entropy the
    rule never triggers.
    """
    if not entropy or not _known(entropy[0]) or entropy[0] <= 0:
        return None
    best: float | None = None
    for i in range(1, min(len(entropy), len(val_acc))):
        if best is None:
            if _known(entropy[i]) and (entropy[0] - entropy[i]) / entropy[0] >= entropy_drop:
                best = val_acc[i]  # the plateau's exit: the criterion is re-enabled from here
            continue
        if val_acc[i] < best - acc_tolerance:
            return StopDecision(i, f"entropy left its plateau (>= {entropy_drop:.0%} below dense) and val_acc "
                                   f"{val_acc[i]:.4f} is {best - val_acc[i]:.4f} below the best {best:.4f} since")
        best = max(best, val_acc[i])
    return None


def selection_key(val_acc: float | None, sparsity: float) -> tuple[float, float]:
    """Model selection: the better val_acc wins; on a tie the sparser model wins. Rounded to 6
    decimals (far below evaluation noise) so a float-noise tie is a tie wherever it is decided."""
    val = -math.inf if val_acc is None or math.isnan(val_acc) else round(val_acc, 6)
    return (val, round(sparsity, 6))


def best_level(val_acc: Sequence[float | None], sparsity: Sequence[float], last: int | None = None) -> int | None:
    """The best pruned level (1..last, default all) of a chain whose index 0 is the dense parent."""
    end = len(val_acc) - 1 if last is None else min(last, len(val_acc) - 1)
    return max(range(1, end + 1), key=lambda i: selection_key(val_acc[i], sparsity[i]), default=None)
