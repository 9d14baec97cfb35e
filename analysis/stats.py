"""Every claim the tool prints is decided here, from several seeds, with effect size, 95% CI and p-value.

Four claims, one function each; each returns a frozen dataclass whose ``verdict`` is the sentence the
report prints and whose ``to_dict()`` is the JSON-safe record for ``verdicts.json``:

* `dip_and_recovery` -- a curve (a pruning chain's levels, or a width sweep) falls significantly and then
  rises significantly ("dip", "recovery", "SDD shows", "DD shows");
* `retraces` -- a pruned chain's curve stays on the dense width-sweep curve at equal nonzero-parameter count;
* `distillation_monotonic` -- distillation removed the recovery the vanilla chain shows;
* `it_is_a_bad_start` -- pruning from the interpolation-threshold parent ends worse than from the controls.

With one seed every function answers "one seed: not tested" (significant False, p-value NaN).

Longer than most modules on purpose: the evidence rules want every verdict decided in one place, and
each test's calibration argument is written beside its code.
Imports numpy and the standard library only (no scipy, torch or mlflow): the t distribution is computed
here from the regularised incomplete beta function.

Noise model (shared by all four)
--------------------------------
Accuracies are means over ``n_test`` test samples, so one seed's accuracy has at least the binomial
variance ``p(1-p)/n_test`` (the "binomial floor"). Seeds add training noise on top. Per point the
variance of one seed's value is estimated in units of that floor: the between-seed ratio
``r_p = s_p^2 / floor_p`` is moderated towards the curve's mean ratio with ``NU0 = 4`` pseudo-degrees of
freedom (``(NU0 * mean(r) + (S-1) r_p) / (NU0 + S - 1)``, the empirical-Bayes "moderated variance" of
limma), and never taken below 1: ``var_p = max(1, r~_p) * floor_p``, ``se_p^2 = var_p / S``. With three
seeds a raw per-point variance has two degrees of freedom and its small values make every
max-over-pairs statistic heavy-tailed; the moderation keeps each point's own level (a noisier collapse
region stays noisier) while borrowing strength from the others. The floor treats the test noise of
different points and seeds as independent. When they share one test set, the noise of a difference
between two similar models is smaller than that (conservative), and every claim here rests on
differences; what the floor would understate is the uncertainty of an absolute accuracy, which no
claim here uses.

Dip and recovery: statistic and look-everywhere calibration
-----------------------------------------------------------
For points i < j < k the standardised fall is ``z(i,j) = (m_i - m_j) / sqrt(se_i^2 + se_j^2)`` and the
standardised rise ``z(k,j)``; the statistic is ``T = max_j min(max_{i<j} z(i,j), max_{k>j} z(k,j))`` -- the
best point, a significant fall into it and a significant rise out of it, searched everywhere.

Its p-value comes from a parametric Monte Carlo of the same statistic under the *least favourable* curve
without a dip-then-rise, not under a flat curve. A flat curve is not least favourable: on a curve that
collapses, every point after the collapse already has a huge "fall" into it, so any noise rise among those
points makes ``T`` large (measured while designing this: calibrating against a flat curve claimed a
dip-and-recovery on 8% of flat-then-collapse curves of 12 points at alpha = 0.05, 400 curves). For any
non-increasing mean curve, ``min(fall, rise) <= rise <= noise rise`` for every triple (the mean part of a
rise is <= 0), so
``T <= R_up = max_{1 <= j < k <= P-1} z_noise(k,j)``, the largest standardised rise of pure noise among the
points that have a point before them; a curve that falls off a cliff after its first point and is then
flat attains it. By the mirror argument, non-decreasing curves are bounded by the largest noise fall among
the first P-1 points, ``R_down``. The p-value is ``(1 + #{R >= T}) / (1 + simulations)`` for each of the two
and the larger is reported, so the test is valid (up to the noise model) for every monotone curve, and
measured conservative for rise-then-fall (inverted U) curves. The standard errors in the simulation are
computed by the same estimator from the simulated seeds (same floor vector, same moderation). The
simulated per-seed noise is Gaussian with standard deviation ``sqrt(floor_p * c_p^2)`` where the noise
ratio ``c_p^2 = max(1, r~_p * d / chi2_d)``, ``d = NU0 + S - 1``, is drawn afresh for every simulation and
point from its approximate posterior rather than plugged in: a plugged-in ratio that happens to be low
makes the simulated statistic too light-tailed (measured while designing this: 9-10% false claims with 3
seeds and twice the binomial noise, 5 and 12 points). The draws are seeded (``seed``), so a call is
reproducible, and vectorised: one call with the default 4000 simulations takes about 4 ms for 5 points,
10 ms for 12 and 30 ms for 30 (one core).

Measured with 3 seeds, 10,000 test samples, 400 curves per case, alpha = 0.05 (tests/test_stats.py pins
these): false claims 0-3% on flat, flat-then-collapse (to chance), monotone-declining and cliff-then-flat
curves of 5, 12 and 30 points with binomial noise, and 0-4% with twice the binomial noise between seeds
or with 2 or 5 seeds; with three times the binomial noise on half of the points only (heteroscedastic
seeds), 4.5-6.8% on the cliff cases (the worst, 5 points, is within two Monte Carlo SEs of 5%). Power for a
fall and a rise of 4 per-seed binomial SEs (3 seeds): 97-99% for a smooth dip, 94-98.5% for a one-point
dip, at 12 and 30 points. A naive p-value (one z-test at the best dip and rise, no look-everywhere
correction) claims 40% of flat 12-point curves and 92% of flat 30-point ones.

The reported ``dip`` and ``recovery`` are the mean fall from the peak ``i`` (the point before the dip
with the largest standardised fall into it -- the highest point when the standard errors are equal) to
the dip ``j``, and the mean rise from the dip to the best point ``k`` after it. Their 95% CIs use the
Gaussian approximation with the standard errors above (pointwise: they are not widened for the search
over points, which the p-value accounts for; with few seeds that disagree more than the binomial floor
they are somewhat narrow).

Other claims
------------
* `retraces`: the dense mean curve is interpolated linearly in log(parameters) at each pruned level inside
  the dense range; gap = pruned - dense with variance ``se_pruned^2 + se_dense_interp^2``. "retraces" is an
  equivalence claim, decided by TOST (two one-sided z-tests against +-margin) at every level combined as
  an intersection-union test (p = max over levels: no multiplicity correction is needed for an "all levels"
  claim and none is taken). The default margin is 4 per-seed binomial SEs at the dense accuracy (about
  0.02 for 10,000 test samples, the fixed tolerance the analysis used before): with 3 seeds per curve the gap's SE is
  about 0.8 per-seed SE, and on curves that coincide TOST over 8 / 16 levels succeeds 1% / 0.3% of the
  time at a 2-SE margin, 77% / 63% at 3 SE and 99% / 99% at 4 SE (measured). "does not retrace" needs the
  opposite evidence: some level's gap significantly
  beyond the margin (one-sided z-test per level, Bonferroni over levels). Neither: "inconclusive".
* `distillation_monotonic`: both curves through `dip_and_recovery`; the recoveries are compared at the
  same dip and recovery points, chosen on the *average* of the two mean curves (with equal noise the sum
  of two curves is independent of their difference, so choosing the points does not bias the
  difference); when the curves have different numbers of points each curve's own recovery is used.
  One-sided t-test, paired by seed when the seed counts match, else Welch, with the binomial floor under
  the variance. The claim needs all three: vanilla significant, distilled not, difference significant.
* `it_is_a_bad_start`: two-sided paired t-test (df = seeds - 1; the claim also needs IT < control) on the per-seed difference IT - control
  with variance ``max(sample variance, floor_IT + floor_control)``; CI from the same t distribution.

Every verdict built on curves can be told which levels did not converge (``converged``); a verdict that
rests on such a level says so.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = [
    "NU0",
    "ONE_SEED",
    "DipRecovery",
    "Retrace",
    "DistillationMonotonic",
    "BadStart",
    "dip_and_recovery",
    "retraces",
    "distillation_monotonic",
    "it_is_a_bad_start",
    "seed_band",
]

NU0 = 4.0                     # pseudo-degrees of freedom of the curve-wide noise ratio (variance moderation)
ONE_SEED = "one seed: not tested"
DEFAULT_SIMULATIONS = 4000
DEFAULT_MARGIN_SE = 4.0       # retraces: equivalence margin in per-seed binomial SEs
_Z975 = NormalDist().inv_cdf(0.975)
_CHUNK = 200_000              # Monte Carlo: pair statistics per chunk (cache-sized; bounds memory)


# --- small numerics ------------------------------------------------------------------------------------

def _norm_sf(x: float) -> float:
    return 0.5 * math.erfc(x / math.sqrt(2.0))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` (not necessarily integer) degrees of freedom."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    if math.isinf(df):
        return _norm_sf(t)
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


def _t_ppf(q: float, df: float) -> float:
    """Quantile of Student's t (bisection on the survival function; only used for CIs)."""
    if math.isinf(df):
        return NormalDist().inv_cdf(q)
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 1.0 - _t_sf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def _fmt(x: float) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.3f}"


def _fmt_ci(ci: tuple[float, float]) -> str:
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _fmt_p(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "p = nan"
    if p < 0.001:
        return "p < 0.001"
    if p < 0.01:
        return f"p = {p:.3f}"
    return f"p = {p:.2f}"


def _seeds_text(seeds: int) -> str:
    return f"{seeds} seed" + ("" if seeds == 1 else "s")


def _jsonable(value: Any) -> Any:
    if isinstance(value, _Result):
        return value.to_dict()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


class _Result:
    """Shared `to_dict`: every field, JSON-safe (NaN and inf become None, tuples lists)."""

    test: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"test": self.test}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            out[field.name] = _jsonable(getattr(self, field.name))
        return out


# --- input checks and the noise model ------------------------------------------------------------------

def _curve(acc: Any, name: str) -> np.ndarray:
    a = np.asarray(acc, dtype=float)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name} must be a (seeds x points) array, got shape {np.shape(acc)}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has missing or non-finite values: drop incomplete seeds or points first")
    if np.any(a < 0) or np.any(a > 1):
        raise ValueError(f"{name} must hold accuracies in [0, 1]")
    return a


def _check_n_test(n_test: Any) -> int:
    if isinstance(n_test, bool) or not float(n_test).is_integer() or int(n_test) < 1:
        raise ValueError(f"n_test must be a positive integer, got {n_test!r}")
    return int(n_test)


def _check_alpha(alpha: float) -> float:
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    return float(alpha)


def _floor(p: np.ndarray, n_test: int) -> np.ndarray:
    """Per-seed binomial variance p(1-p)/n, with p kept half a sample away from 0 and 1."""
    q = np.clip(p, 0.5 / n_test, 1.0 - 0.5 / n_test)
    return q * (1.0 - q) / n_test


def _noise_ratio(acc: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """Moderated between-seed variance in units of the binomial floor, per point (..., P); not clipped."""
    seeds = acc.shape[-2]
    r = acc.var(axis=-2, ddof=1) / floor
    rbar = r.mean(axis=-1, keepdims=True)
    return (NU0 * rbar + (seeds - 1) * r) / (NU0 + seeds - 1)


def _se2(acc: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """Squared standard error of each point's seed mean: max(1, moderated ratio) * floor / seeds."""
    return np.maximum(1.0, _noise_ratio(acc, floor)) * floor / acc.shape[-2]


def _converged_mask(converged: Any, shape: tuple[int, int], name: str) -> np.ndarray | None:
    if converged is None:
        return None
    c = np.asarray(converged, dtype=bool)
    if c.ndim == 1:
        c = np.broadcast_to(c, shape)
    if c.shape != shape:
        raise ValueError(f"{name} must have the shape of its accuracies {shape}, got {c.shape}")
    return c.all(axis=0)


def _unconverged_note(points: Sequence[int], ok: np.ndarray | None,
                      what: str = "points") -> tuple[tuple[int, ...], str]:
    if ok is None:
        return (), ""
    bad = tuple(sorted({int(p) for p in points if p >= 0 and not ok[p]}))
    if not bad:
        return (), ""
    return bad, f"; rests on unconverged {what} {', '.join(map(str, bad))}"


# --- bands for figures ---------------------------------------------------------------------------------

def seed_band(values: Any, n_test: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per point: the mean over seeds and its 95% CI (t with seeds - 1 df), what the figures draw.

    `values`: seeds x points; NaN marks a seed that did not reach a point (a shorter chain), so every
    point uses the seeds it has. With `n_test` the binomial floor p(1-p)/n_test is kept under the
    between-seed variance (a test accuracy), as in the verdicts. A point with one seed has no band (NaN).
    """
    a = np.asarray(values, dtype=float)
    if a.ndim == 1:
        a = a[:, None]
    count = np.sum(np.isfinite(a), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, np.nansum(np.where(np.isfinite(a), a, np.nan), axis=0) / count, np.nan)
        dev = np.where(np.isfinite(a), a - mean, 0.0)
        var = np.sum(dev ** 2, axis=0) / np.maximum(count - 1, 1)
    if n_test is not None:
        var = np.maximum(var, _floor(np.nan_to_num(mean, nan=0.5), _check_n_test(n_test)))
    half = np.array([_t_ppf(0.975, c - 1) * math.sqrt(v / c) if c >= 2 else math.nan for c, v in zip(count, var)])
    return mean, mean - half, mean + half


# --- dip and recovery ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DipRecovery(_Result):
    """A curve's significant fall then significant rise (look-everywhere calibrated; see module doc)."""

    significant: bool
    p_value: float
    dip_index: int             # the dip's point (column of `acc`); -1 when there is none
    recovery_index: int        # best point after the dip
    peak_index: int            # best point before the dip
    dip: float                 # mean fall from the peak to the dip
    recovery: float            # mean rise from the dip to the recovery point
    dip_ci: tuple[float, float]
    recovery_ci: tuple[float, float]
    seeds: int
    points: int
    statistic: float           # T: min(standardised fall, standardised rise) at the best dip
    noise_ratio: float         # mean moderated between-seed variance / binomial floor (>= 1 used)
    alpha: float
    simulations: int
    unconverged_points: tuple[int, ...]
    verdict: str
    test = "dip_and_recovery"


def _pair_index(points: int) -> tuple[np.ndarray, np.ndarray, slice, slice]:
    """Pairs j < k ordered so that both least-favourable subsets are contiguous slices (no copies):
    A = (j = 0, k < P-1), B = (j >= 1, k < P-1), C = (j >= 1, k = P-1); rises use B + C, falls A + B."""
    j, k = np.triu_indices(points, 1)
    keep = ~((j == 0) & (k == points - 1))
    j, k = j[keep], k[keep]
    block = np.where(j == 0, 0, np.where(k < points - 1, 1, 2))
    order = np.argsort(block, kind="stable")
    j, k, block = j[order], k[order], block[order]
    a, b = int(np.count_nonzero(block == 0)), int(np.count_nonzero(block == 1))
    return j, k, slice(a, j.size), slice(0, a + b)


def _triple(m: np.ndarray, se2: np.ndarray) -> tuple[float, int, int, int]:
    """T and its (peak, dip, recovery) indices for one mean curve."""
    points = m.shape[0]
    z = (m[:, None] - m[None, :]) / np.sqrt(se2[:, None] + se2[None, :])   # z[a, b]: a above b
    rows = np.arange(points)
    fall = np.where(rows[:, None] < rows[None, :], z, -np.inf)             # fall[i, j], i < j
    rise = np.where(rows[:, None] > rows[None, :], z, -np.inf)             # rise[k, j], k > j
    f, r = fall.max(axis=0), rise.max(axis=0)
    both = np.minimum(f, r)
    both[[0, points - 1]] = -np.inf
    j = int(np.argmax(both))
    return float(both[j]), int(np.argmax(fall[:, j])), j, int(np.argmax(rise[:, j]))


def _null_exceedances(stat: float, seeds: int, floor: np.ndarray, ratio: np.ndarray, simulations: int,
                      rng: np.random.Generator) -> int:
    """Count simulations whose least-favourable null statistic (max over R_up and R_down separately) >= stat."""
    points = floor.shape[0]
    j, k, up, down = _pair_index(points)
    dof = NU0 + seeds - 1
    chunk = max(1, _CHUNK // max(1, j.size))
    floor32 = floor.astype(np.float32)
    above_up = above_down = 0
    done = 0
    while done < simulations:
        b = min(chunk, simulations - done)
        c2 = np.maximum(1.0, ratio * dof / rng.chisquare(dof, size=(b, 1, points))).astype(np.float32)
        e = rng.standard_normal((b, seeds, points), dtype=np.float32) * np.sqrt(c2 * floor32)
        m = e.mean(axis=1)
        se2 = _se2(e, floor32)
        z = m[:, k] - m[:, j]
        z /= np.sqrt(se2[:, j] + se2[:, k])                                 # standardised rise j -> k
        above_up += int(np.count_nonzero(z[:, up].max(axis=1) >= stat))
        above_down += int(np.count_nonzero(-z[:, down].min(axis=1) >= stat))
        done += b
    return max(above_up, above_down)


def dip_and_recovery(acc: Any, n_test: int, alpha: float = 0.05, *, simulations: int = DEFAULT_SIMULATIONS,
                     seed: int = 0, converged: Any = None) -> DipRecovery:
    """Does the curve fall significantly and then rise significantly?

    `acc`: test accuracies, seeds x points, in curve order (a chain's levels with column 0 the dense
    parents, or a width sweep in width order; a 1-D array is one seed). `n_test`: test-set size (binomial
    floor). `converged`: optional booleans of the same shape (or one per point); a verdict resting on an
    unconverged point says so. The p-value is a seeded Monte Carlo over `simulations` draws (see the module docstring).
    """
    a = _curve(acc, "acc")
    n = _check_n_test(n_test)
    alpha = _check_alpha(alpha)
    if int(simulations) < 1:
        raise ValueError("simulations must be >= 1")
    seeds, points = a.shape
    ok = _converged_mask(converged, a.shape, "converged")
    m = a.mean(axis=0)
    floor = _floor(m, n)
    nan2 = (math.nan, math.nan)

    def result(significant, p, stat, i, j, k, dip, rec, dip_ci, rec_ci, ratio, verdict, bad=()):
        return DipRecovery(bool(significant), float(p), j, k, i, float(dip), float(rec), dip_ci, rec_ci, seeds,
                           points, float(stat), float(ratio), alpha, int(simulations), tuple(bad), verdict)

    if points < 3:
        return result(False, math.nan, math.nan, -1, -1, -1, math.nan, math.nan, nan2, nan2, math.nan,
                      f"{points} point{'s' if points != 1 else ''}: no dip and recovery to test")
    if seeds < 2:
        stat, i, j, k = _triple(m, floor)
        return result(False, math.nan, stat, i, j, k, m[i] - m[j], m[k] - m[j], nan2, nan2, math.nan, ONE_SEED)

    se2 = _se2(a, floor)
    ratio = _noise_ratio(a, floor)
    stat, i, j, k = _triple(m, se2)
    rng = np.random.default_rng(seed)
    count = _null_exceedances(stat, seeds, floor, ratio, int(simulations), rng)
    p = (1 + count) / (1 + int(simulations))
    significant = p <= alpha and stat > 0
    dip, rec = m[i] - m[j], m[k] - m[j]
    h_dip, h_rec = _Z975 * math.sqrt(se2[i] + se2[j]), _Z975 * math.sqrt(se2[k] + se2[j])
    dip_ci, rec_ci = (dip - h_dip, dip + h_dip), (rec - h_rec, rec + h_rec)
    if significant:
        bad, note = _unconverged_note((i, j, k), ok)
        verdict = (f"dip {_fmt(dip)} {_fmt_ci(dip_ci)} then recovery {_fmt(rec)} {_fmt_ci(rec_ci)}, "
                   f"{_fmt_p(p)}, {_seeds_text(seeds)} (points {i} -> {j} -> {k}){note}")
    else:
        bad, note = (), ""
        verdict = f"no significant dip and recovery ({_fmt_p(p)}, {_seeds_text(seeds)})"
    return result(significant, p, stat, i, j, k, dip, rec, dip_ci, rec_ci, float(np.mean(np.maximum(1, ratio))),
                  verdict, bad)


# --- retracing the dense curve -------------------------------------------------------------------------

@dataclass(frozen=True)
class Retrace(_Result):
    """Does a pruned chain's curve stay on the dense width-sweep curve at equal parameter count?"""

    retraces: bool             # equivalence shown: every compared level within +-margin (TOST, IUT)
    departs: bool              # some level significantly beyond the margin (Bonferroni over levels)
    effect: float              # the gap (pruned - dense) at the level with the largest |gap|
    ci: tuple[float, float]    # its 95% CI
    p_value: float             # p of the verdict: p_departure when it departs, else p_equivalence
    p_equivalence: float
    p_departure: float
    mean_abs_gap: float
    worst_level: int
    levels: tuple[int, ...]    # the pruned levels inside the dense parameter range (the ones compared)
    gaps: tuple[float, ...]
    gap_cis: tuple[tuple[float, float], ...]
    margins: tuple[float, ...]
    seeds: int                 # pruned seeds
    dense_seeds: int
    alpha: float
    unconverged_levels: tuple[int, ...]
    verdict: str
    test = "retraces"


def _params(params: Any, columns: int, name: str) -> np.ndarray:
    p = np.asarray(params, dtype=float)
    if p.ndim == 2:
        if np.any(p <= 0):
            raise ValueError(f"{name} must be positive parameter counts")
        p = np.exp(np.log(p).mean(axis=0))
    if p.ndim != 1 or p.shape[0] != columns:
        raise ValueError(f"{name} must hold one parameter count per column ({columns}), got shape {np.shape(params)}")
    if not np.all(np.isfinite(p)) or np.any(p <= 0):
        raise ValueError(f"{name} must be positive parameter counts")
    return p


def retraces(pruned_acc: Any, pruned_params: Any, dense_acc: Any, dense_params: Any, n_test: int,
             alpha: float = 0.05, *, margin: float | None = None, converged: Any = None,
             first_pruned: int = 0) -> Retrace:
    """Does the pruned curve (seeds x levels, nonzero params per level) retrace the dense curve (seeds x widths)?

    The dense mean curve is interpolated linearly in log(params) at every pruned level inside the dense
    parameter range. `margin`: the equivalence margin in accuracy; None = 4 per-seed binomial SEs at the
    interpolated dense accuracy. `converged`: optional booleans for the pruned levels. `first_pruned`: the
    first column that is a pruned level (1 when column 0 holds the dense parents: a parent lies on the dense
    curve by construction, so it must not count as evidence that pruning retraces it).
    """
    pa = _curve(pruned_acc, "pruned_acc")
    da = _curve(dense_acc, "dense_acc")
    n = _check_n_test(n_test)
    alpha = _check_alpha(alpha)
    px = np.log(_params(pruned_params, pa.shape[1], "pruned_params"))
    dx = np.log(_params(dense_params, da.shape[1], "dense_params"))
    if margin is not None and not float(margin) > 0:
        raise ValueError("margin must be positive")
    ok = _converged_mask(converged, pa.shape, "converged")
    order = np.argsort(dx, kind="stable")
    dx, da = dx[order], da[:, order]
    seeds, dense_seeds = pa.shape[0], da.shape[0]
    nan2 = (math.nan, math.nan)

    def result(ret, dep, effect, ci, p, p_eq, p_dep, mag, worst, levels, gaps, cis, margins, verdict, bad=()):
        return Retrace(bool(ret), bool(dep), float(effect), ci, float(p), float(p_eq), float(p_dep), float(mag),
                       int(worst), tuple(int(x) for x in levels), tuple(float(g) for g in gaps),
                       tuple(cis), tuple(float(x) for x in margins), seeds, dense_seeds, alpha, tuple(bad), verdict)

    inside = np.flatnonzero((px >= dx[0] - 1e-12) & (px <= dx[-1] + 1e-12))
    inside = inside[inside >= first_pruned]
    if inside.size == 0:
        return result(False, False, math.nan, nan2, math.nan, math.nan, math.nan, math.nan, -1, (), (), (), (),
                      "no pruned level inside the dense models' parameter range: not tested")
    if seeds < 2 or dense_seeds < 2:
        return result(False, False, math.nan, nan2, math.nan, math.nan, math.nan, math.nan, -1, inside, (), (), (),
                      ONE_SEED)

    pm = pa.mean(axis=0)
    pse2 = _se2(pa, _floor(pm, n))
    dm = da.mean(axis=0)
    dse2 = _se2(da, _floor(dm, n))
    x = np.clip(px[inside], dx[0], dx[-1])
    hi = np.clip(np.searchsorted(dx, x, side="left"), 1, max(1, dx.size - 1)) if dx.size > 1 else np.zeros_like(inside)
    lo = np.maximum(hi - 1, 0)
    span = dx[hi] - dx[lo]
    w = np.where(span > 0, (x - dx[lo]) / np.where(span > 0, span, 1.0), 0.0)
    dense_at = (1 - w) * dm[lo] + w * dm[hi]
    dense_var = (1 - w) ** 2 * dse2[lo] + w ** 2 * dse2[hi]
    gaps = pm[inside] - dense_at
    se = np.sqrt(pse2[inside] + dense_var)
    margins = (np.full(inside.size, float(margin)) if margin is not None
               else DEFAULT_MARGIN_SE * np.sqrt(_floor(dense_at, n)))
    cis = tuple((float(g - _Z975 * s), float(g + _Z975 * s)) for g, s in zip(gaps, se))
    # equivalence: TOST per level (both one-sided tests), intersection-union over levels (p = max)
    p_tost = np.array([max(_norm_sf((g + d) / s), _norm_sf((d - g) / s)) for g, s, d in zip(gaps, se, margins)])
    p_eq = float(p_tost.max())
    # departure: some |gap| > margin, one-sided per level, Bonferroni over levels
    p_out = np.array([_norm_sf((abs(g) - d) / s) for g, s, d in zip(gaps, se, margins)])
    p_dep = float(min(1.0, inside.size * p_out.min()))
    worst = int(np.argmax(np.abs(gaps)))
    effect, ci = float(gaps[worst]), cis[worst]
    level = int(inside[worst])
    mag = float(np.mean(np.abs(gaps)))
    tail = f"{_seeds_text(seeds)}" + (f" ({dense_seeds} dense)" if dense_seeds != seeds else "")
    band = (f"+-{_fmt(float(margin))}" if margin is not None
            else f"+-{DEFAULT_MARGIN_SE:g} binomial SE (~{_fmt(float(np.mean(margins)))})")
    retr, dep = p_eq <= alpha, p_dep <= alpha
    if dep:
        hit = int(inside[int(np.argmin(p_out))])
        g_hit = float(gaps[int(np.argmin(p_out))])
        bad, note = _unconverged_note((hit,), ok, "levels")
        verdict = (f"does not retrace: gap {_fmt(g_hit)} {_fmt_ci(cis[int(np.argmin(p_out))])} at level {hit}, "
                   f"beyond {band}, {_fmt_p(p_dep)}, {tail}{note}")
        p = p_dep
    elif retr:
        bad, note = _unconverged_note(tuple(int(i) for i in inside), ok, "levels")
        verdict = (f"retraces: every gap within {band} over {inside.size} levels (largest {_fmt(effect)} "
                   f"{_fmt_ci(ci)} at level {level}), {_fmt_p(p_eq)}, {tail}{note}")
        p = p_eq
    else:
        bad, note = (), ""
        verdict = (f"inconclusive: largest gap {_fmt(effect)} {_fmt_ci(ci)} at level {level}; neither within "
                   f"{band} at every level ({_fmt_p(p_eq)}) nor beyond it at any ({_fmt_p(p_dep)}), {tail}")
        p = p_eq
    return result(retr, dep, effect, ci, p, p_eq, p_dep, mag, level, inside, gaps, cis, margins, verdict, bad)


# --- distillation made the curve monotonic -------------------------------------------------------------

@dataclass(frozen=True)
class DistillationMonotonic(_Result):
    """Vanilla dips and recovers, distilled does not, and the recovery shrank significantly."""

    monotonic: bool
    vanilla: DipRecovery
    distilled: DipRecovery
    difference: float          # vanilla recovery - distilled recovery (at the common points when paired)
    difference_ci: tuple[float, float]
    p_value: float             # one-sided: the distilled recovery is smaller
    paired: bool
    common_points: bool        # recoveries compared at the same dip and recovery points
    dip_index: int
    recovery_index: int
    seeds: int
    alpha: float
    verdict: str
    test = "distillation_monotonic"


def _rise_per_seed(a: np.ndarray, j: int, k: int) -> np.ndarray:
    return a[:, k] - a[:, j]


def distillation_monotonic(vanilla_acc: Any, distilled_acc: Any, n_test: int, alpha: float = 0.05, *,
                           simulations: int = DEFAULT_SIMULATIONS, seed: int = 0) -> DistillationMonotonic:
    """Did distillation remove the recovery? Both curves seeds x levels, in the same level order."""
    va = _curve(vanilla_acc, "vanilla_acc")
    da = _curve(distilled_acc, "distilled_acc")
    n = _check_n_test(n_test)
    alpha = _check_alpha(alpha)
    van = dip_and_recovery(va, n, alpha, simulations=simulations, seed=seed)
    dis = dip_and_recovery(da, n, alpha, simulations=simulations, seed=seed + 1)
    seeds = min(va.shape[0], da.shape[0])
    paired = va.shape[0] == da.shape[0]
    common = va.shape[1] == da.shape[1]
    nan2 = (math.nan, math.nan)
    if seeds < 2 or va.shape[1] < 3 or da.shape[1] < 3:
        why = ONE_SEED if seeds < 2 else "fewer than 3 points: not tested"
        return DistillationMonotonic(False, van, dis, math.nan, nan2, math.nan, paired, common, -1, -1, seeds,
                                     alpha, why)

    if common:
        # points chosen on the average of the two mean curves: independent of their difference under equal noise
        vm, dm = va.mean(axis=0), da.mean(axis=0)
        avg = (vm + dm) / 2
        se2 = (_se2(va, _floor(vm, n)) + _se2(da, _floor(dm, n))) / 4
        _, _, j, k = _triple(avg, se2)
        jv = jd = j
        kv = kd = k
    else:
        jv, kv, jd, kd = van.dip_index, van.recovery_index, dis.dip_index, dis.recovery_index
        j, k = -1, -1
    rv, rd = _rise_per_seed(va, jv, kv), _rise_per_seed(da, jd, kd)
    fv = _floor(va[:, [jv, kv]].mean(axis=0), n).sum()
    fd = _floor(da[:, [jd, kd]].mean(axis=0), n).sum()
    if paired:
        diff = rv - rd
        var = max(float(diff.var(ddof=1)), fv + fd)
        se = math.sqrt(var / seeds)
        dof = seeds - 1.0
        est = float(diff.mean())
    else:
        sv = max(float(rv.var(ddof=1)), fv) / rv.size
        sd = max(float(rd.var(ddof=1)), fd) / rd.size
        se = math.sqrt(sv + sd)
        dof = (sv + sd) ** 2 / (sv ** 2 / (rv.size - 1) + sd ** 2 / (rd.size - 1))
        est = float(rv.mean() - rd.mean())
    p = _t_sf(est / se, dof)
    h = _t_ppf(0.975, dof) * se
    ci = (est - h, est + h)
    monotonic = van.significant and not dis.significant and p <= alpha
    how = f"paired over {_seeds_text(seeds)}" if paired else f"unpaired, {va.shape[0]} vs {da.shape[0]} seeds"
    where = f" (levels {j} -> {k})" if common else ""
    diff_text = f"recovery reduced by {_fmt(est)} {_fmt_ci(ci)}{where}, {_fmt_p(p)}, {how}"
    if monotonic:
        verdict = (f"distillation made the curve monotonic: vanilla {van.verdict}; distilled shows none "
                   f"({_fmt_p(dis.p_value)}); {diff_text}")
    elif not van.significant:
        verdict = f"not shown: the vanilla curve shows no significant dip and recovery ({_fmt_p(van.p_value)})"
    elif dis.significant:
        verdict = f"not monotonic: the distilled curve still dips and recovers ({dis.verdict})"
    else:
        verdict = (f"not shown: the distilled curve shows no significant recovery ({_fmt_p(dis.p_value)}) but the "
                   f"{diff_text} is not significant")
    return DistillationMonotonic(bool(monotonic), van, dis, est, ci, float(p), paired, common, j, k, seeds, alpha,
                                 verdict)


# --- the IT is a bad start -----------------------------------------------------------------------------

@dataclass(frozen=True)
class BadStart(_Result):
    """Best pruned accuracy from the IT parent is below that from the control parents (paired by seed)."""

    bad_start: bool
    effect: float              # mean over seeds of IT - control (negative: the IT start is worse)
    ci: tuple[float, float]
    p_value: float             # two-sided; the claim also needs IT - control < 0
    seeds: int
    alpha: float
    verdict: str
    test = "it_is_a_bad_start"


def it_is_a_bad_start(it_best: Any, control_best: Any, n_test: int, alpha: float = 0.05) -> BadStart:
    """Paired two-sided t-test (binomial floor under the variance) of IT-parent vs control-parent best accuracy.

    `it_best`: one best pruned test accuracy per seed. `control_best`: the same per seed, or seeds x
    controls (then averaged over the controls per seed).
    """
    it = np.asarray(it_best, dtype=float)
    ctl = np.asarray(control_best, dtype=float)
    if it.ndim != 1:
        raise ValueError(f"it_best must have shape (seeds,), got {it.shape}")
    if ctl.ndim == 1:
        ctl = ctl[:, None]
    if ctl.ndim != 2 or ctl.shape[0] != it.shape[0] or ctl.shape[1] < 1:
        raise ValueError(f"control_best must have shape (seeds,) or (seeds, controls) with {it.shape[0]} seeds, "
                         f"got {np.shape(control_best)}")
    for arr, name in ((it, "it_best"), (ctl, "control_best")):
        if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr > 1):
            raise ValueError(f"{name} must hold finite accuracies in [0, 1]")
    n = _check_n_test(n_test)
    alpha = _check_alpha(alpha)
    seeds = it.shape[0]
    if seeds == 0:
        raise ValueError("it_best and control_best need at least one seed")
    diff = it - ctl.mean(axis=1)
    est = float(diff.mean())
    if seeds < 2:
        return BadStart(False, est, (math.nan, math.nan), math.nan, seeds, alpha, ONE_SEED)
    # floor of the control average: (mean of the controls' binomial SDs)^2, exact when their test noise is shared
    f_ctl = float(np.mean(np.sqrt(_floor(ctl.mean(axis=0), n)))) ** 2
    floor = float(_floor(np.array([it.mean()]), n)[0]) + f_ctl
    var = max(float(diff.var(ddof=1)), floor)
    se = math.sqrt(var / seeds)
    dof = seeds - 1.0
    # Two-sided, so that the printed 95% CI excludes 0 exactly when the claim is made (a one-sided p of
    # 0.04 beside a CI through zero reads as a contradiction); "bad" also needs the IT side to be lower.
    p = min(1.0, 2.0 * _t_sf(abs(est) / se, dof))
    h = _t_ppf(1.0 - alpha / 2.0, dof) * se
    ci = (est - h, est + h)
    bad = p <= alpha and est < 0
    if bad:
        verdict = (f"the IT is a bad start: best pruned accuracy {_fmt(-est)} {_fmt_ci((-ci[1], -ci[0]))} below the "
                   f"controls, {_fmt_p(p)}, {_seeds_text(seeds)}")
    else:
        verdict = (f"not significant: best pruned accuracy IT - controls {_fmt(est)} {_fmt_ci(ci)}, {_fmt_p(p)}, "
                   f"{_seeds_text(seeds)}")
    return BadStart(bool(bad), est, ci, float(p), seeds, alpha, verdict)
