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


def pruning_threshold(noisy_acc: Sequence[float], threshold: float = 0.99) -> int | None:
    """First level (index) whose noisy-subset train accuracy falls below `threshold` (He et al.)."""
    for i, acc in enumerate(noisy_acc):
        if i > 0 and acc < threshold:
            return i
    return None


def width_threshold(widths: Sequence[float], noisy_acc: Sequence[float], threshold: float = 0.99) -> float | None:
    """Smallest width whose noisy-subset train accuracy reaches `threshold`: the model starts to
    interpolate the noisy labels there (the same rule as along pruning levels, read the other way)."""
    for width, acc in sorted(zip(widths, noisy_acc)):
        if acc >= threshold:
            return width
    return None


def sdd_phases(test_acc: Sequence[float], noisy_acc: Sequence[float], threshold: float = 0.99,
               tolerance: float = 0.01) -> list[str]:
    """Phase of every level (index 0 is the dense start): light, critical, sweet, collapsed.

    While the noisy labels are still fitted (before the threshold level): `light` as long as the test
    accuracy stays within `tolerance` of the dense model's, `critical` from the first level below it.
    From the threshold level on: `sweet` up to the best test accuracy reached after the threshold,
    and from there `collapsed` once the test accuracy is more than `tolerance` below that best.
    """
    n = len(test_acc)
    if n == 0:
        return []
    it = pruning_threshold(noisy_acc, threshold)
    out = ["dense"]
    critical = False
    for i in range(1, it if it is not None else n):
        critical = critical or test_acc[i] < test_acc[0] - tolerance
        out.append("critical" if critical else "light")
    if it is None:
        return out
    peak = max(range(it, n), key=lambda i: (test_acc[i], -i))
    collapsed = False
    for i in range(it, n):
        collapsed = collapsed or (i > peak and test_acc[i] < test_acc[peak] - tolerance)
        out.append("collapsed" if collapsed else "sweet")
    return out


@dataclass(frozen=True)
class StopDecision:
    level: int
    reason: str


def entropy_early_stop(entropy: Sequence[float], val_acc: Sequence[float], entropy_drop: float,
                       acc_tolerance: float) -> StopDecision | None:
    """DSD's Algorithm 2: stop at the first level where the entropy has left its plateau (relative
    drop from the dense model >= `entropy_drop`) and the validation accuracy has fallen more than
    `acc_tolerance` below the best seen so far. Index 0 is the dense model."""
    if not entropy or entropy[0] <= 0:
        return None
    best = val_acc[0]
    for i in range(1, min(len(entropy), len(val_acc))):
        drop = (entropy[0] - entropy[i]) / entropy[0]
        if drop >= entropy_drop and val_acc[i] < best - acc_tolerance:
            return StopDecision(i, f"entropy fell {drop:.1%} below dense and val_acc {val_acc[i]:.4f} "
                                   f"is {best - val_acc[i]:.4f} below the best {best:.4f}")
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
