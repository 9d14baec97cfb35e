"""analysis.stats: Monte Carlo pins of the false-claim rate and the power of every verdict, plus behaviour.

All curves use binomial test noise (10,000 test samples) drawn from seeded generators, so every number
here is reproducible. False-claim rates are estimated over 400 curves and must stay below
alpha + 2 Monte Carlo SEs; the p-values inside those loops use 500 simulations (a Monte Carlo p-value
(1 + count) / (1 + N) is valid for any N; the default, 4000, only sharpens it).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from analysis import stats
from analysis.stats import (
    ONE_SEED,
    dip_and_recovery,
    distillation_monotonic,
    it_is_a_bad_start,
    retraces,
)

N_TEST = 10_000
ALPHA = 0.05
CURVES = 400
BOUND = ALPHA + 2 * math.sqrt(ALPHA * (1 - ALPHA) / CURVES)   # 0.0718
SIMS = 500
P0 = 0.65
SE0 = math.sqrt(P0 * (1 - P0) / N_TEST)                        # per-seed binomial SE at P0


def draw(mu: np.ndarray, rng: np.random.Generator, seeds: int = 3, extra: float = 0.0) -> np.ndarray:
    """Seeds x points accuracies: binomial test noise around `mu`, plus Gaussian seed noise `extra` x floor."""
    acc = rng.binomial(N_TEST, np.broadcast_to(mu, (seeds, mu.size))) / N_TEST
    if extra:
        acc = acc + extra * rng.standard_normal(acc.shape) * np.sqrt(mu * (1 - mu) / N_TEST)
    return np.clip(acc, 0, 1)


def null_curve(shape: str, points: int) -> np.ndarray:
    x = np.arange(points)
    if shape == "flat":
        return np.full(points, P0)
    if shape == "flat_then_collapse":          # flat, then a cliff to chance level and flat there
        return np.where(x < (points + 1) // 2, P0, 0.10)
    if shape == "declining":                   # monotone decline
        return np.linspace(P0, 0.35, points)
    if shape == "cliff_then_flat":             # the least favourable curve without a rise
        return np.where(x < 1, P0, 0.30)
    if shape == "rising":                      # the mirror case: no fall
        return np.linspace(0.35, P0, points)
    raise ValueError(shape)


def dip_curve(points: int, depth_se: float = 4.0, shape: str = "bump") -> np.ndarray:
    """Flat at P0, a fall of `depth_se` per-seed binomial SEs, and a rise of as much back to P0."""
    x = np.arange(points)
    if shape == "spike":                       # one point at the bottom
        mu = np.full(points, P0)
        mu[points // 2] -= depth_se * SE0
        return mu
    a, b = points / 4, 3 * points / 4          # smooth dip over the middle half
    t = np.clip((x - a) / (b - a), 0, 1)
    return P0 - depth_se * SE0 * 0.5 * (1 - np.cos(2 * np.pi * t))


def claim_rate(mu: np.ndarray, seed: int, curves: int = CURVES, **kwargs) -> float:
    rng = np.random.default_rng(seed)
    hits = [dip_and_recovery(draw(mu, rng, **kwargs), N_TEST, ALPHA, simulations=SIMS, seed=i).significant
            for i in range(curves)]
    return float(np.mean(hits))


# --- dip and recovery: calibration against the look-everywhere effect ----------------------------------

@pytest.mark.parametrize("points", [5, 12, 30])
@pytest.mark.parametrize("shape", ["flat", "flat_then_collapse", "declining", "cliff_then_flat"])
def test_no_rise_is_claimed_at_most_alpha_of_the_time(shape, points):
    rate = claim_rate(null_curve(shape, points), seed=points * 7 + len(shape))
    assert rate <= BOUND, f"{shape}, {points} points: false-claim rate {rate:.3f} > {BOUND:.3f}"


def test_calibration_holds_with_seed_noise_above_the_binomial_floor():
    rate = claim_rate(null_curve("cliff_then_flat", 12), seed=11, extra=2.0)
    assert rate <= BOUND


def test_a_curve_without_a_fall_is_not_claimed():
    assert claim_rate(null_curve("rising", 12), seed=5, curves=100) <= BOUND


@pytest.mark.parametrize("points", [12, 30])
@pytest.mark.parametrize("shape", ["bump", "spike"])
def test_power_for_a_four_se_fall_and_rise_over_three_seeds(points, shape):
    rate = claim_rate(dip_curve(points, 4.0, shape), seed=points + len(shape), curves=200)
    assert rate >= 0.8, f"{shape}, {points} points: power {rate:.3f} < 0.8"


def test_naive_pairwise_test_fails_the_calibration_harness():
    """The harness can fail: one z-test at the observed best dip and rise (no look-everywhere) over-claims."""
    nz = stats.NormalDist().inv_cdf(1 - ALPHA)
    rng = np.random.default_rng(3)
    mu = null_curve("flat_then_collapse", 30)
    hits = []
    for _ in range(CURVES):
        a = draw(mu, rng)
        m = a.mean(axis=0)
        se2 = stats._se2(a, stats._floor(m, N_TEST))
        stat, *_ = stats._triple(m, se2)
        hits.append(stat >= nz)
    assert np.mean(hits) > BOUND


def test_dip_and_recovery_reports_where_and_how_big():
    mu = dip_curve(12, 8.0)
    a = draw(mu, np.random.default_rng(0))
    r = dip_and_recovery(a, N_TEST)
    assert r.significant and r.p_value <= ALPHA and r.seeds == 3 and r.points == 12
    assert 0 <= r.peak_index < r.dip_index < r.recovery_index < 12
    assert abs(r.dip_index - 6) <= 1
    m = a.mean(axis=0)
    assert r.dip == pytest.approx(m[r.peak_index] - m[r.dip_index])
    assert r.recovery == pytest.approx(m[r.recovery_index] - m[r.dip_index])
    assert r.dip_ci[0] < r.dip < r.dip_ci[1] and r.recovery_ci[0] < r.recovery < r.recovery_ci[1]
    assert r.dip_ci[0] < 8 * SE0 < r.dip_ci[1] + 3 * SE0
    assert r.verdict.startswith(f"dip {r.dip:.3f} [") and "then recovery" in r.verdict and "3 seeds" in r.verdict


def test_no_dip_verdict_and_reproducibility():
    a = draw(null_curve("flat", 12), np.random.default_rng(1))
    r1, r2 = dip_and_recovery(a, N_TEST, seed=4), dip_and_recovery(a, N_TEST, seed=4)
    assert r1 == r2 and not r1.significant
    assert r1.verdict.startswith("no significant dip and recovery (p = ") and r1.verdict.endswith(", 3 seeds)")
    assert 0 < r1.p_value <= 1


def test_one_seed_is_not_tested():
    a = draw(dip_curve(12, 20.0), np.random.default_rng(2), seeds=1)
    r = dip_and_recovery(a, N_TEST)
    assert r.verdict == ONE_SEED and not r.significant and math.isnan(r.p_value) and r.seeds == 1
    assert r.dip > 0 and r.recovery > 0                           # described, not tested
    assert dip_and_recovery(a[0], N_TEST).verdict == ONE_SEED      # a 1-D curve is one seed


def test_unconverged_levels_are_named():
    a = draw(dip_curve(12, 8.0), np.random.default_rng(0))
    ok = np.ones(12, bool)
    r = dip_and_recovery(a, N_TEST)
    ok[r.dip_index] = False
    r2 = dip_and_recovery(a, N_TEST, converged=ok)
    assert f"rests on unconverged points {r.dip_index}" in r2.verdict
    assert r2.unconverged_points == (r.dip_index,)


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        dip_and_recovery([[0.5, np.nan, 0.5]] * 3, N_TEST)
    with pytest.raises(ValueError):
        dip_and_recovery([[0.5, 1.5, 0.5]] * 3, N_TEST)
    with pytest.raises(ValueError):
        dip_and_recovery([[0.5, 0.4, 0.5]] * 3, 0)
    assert "no dip and recovery to test" in dip_and_recovery([[0.5, 0.4]] * 3, N_TEST).verdict


# --- retraces ------------------------------------------------------------------------------------------

DENSE_PARAMS = 1000.0 * 2.0 ** np.arange(7)                         # 1k .. 64k
DENSE_MU = np.array([0.55, 0.62, 0.66, 0.60, 0.58, 0.63, 0.67])     # a DD curve
PRUNED_PARAMS = 60_000 * 0.8 ** np.arange(16)                        # 60k .. 2.1k, all inside


def dense_at(params):
    return np.interp(np.log(params), np.log(DENSE_PARAMS), DENSE_MU)


def test_a_pruned_curve_on_the_dense_curve_retraces():
    rng = np.random.default_rng(0)
    hits = []
    for _ in range(100):
        r = retraces(draw(dense_at(PRUNED_PARAMS), rng), PRUNED_PARAMS, draw(DENSE_MU, rng), DENSE_PARAMS, N_TEST)
        hits.append(r.retraces)
    assert np.mean(hits) >= 0.8
    assert r.levels == tuple(range(16)) and r.seeds == 3 and r.dense_seeds == 3


def test_a_pruned_curve_ten_se_below_does_not_retrace():
    rng = np.random.default_rng(1)
    mu = dense_at(PRUNED_PARAMS)
    r = retraces(draw(mu - 10 * np.sqrt(mu * (1 - mu) / N_TEST), rng), PRUNED_PARAMS, draw(DENSE_MU, rng),
                 DENSE_PARAMS, N_TEST)
    assert r.departs and not r.retraces and r.p_value == r.p_departure <= ALPHA
    assert r.effect < 0 and r.ci[1] < 0
    assert r.verdict.startswith("does not retrace: gap -0.0") and "3 seeds" in r.verdict


def test_retraces_is_not_claimed_when_one_level_sits_on_the_margin():
    """Equivalence is the claim: a gap exactly at the margin at one level must be called 'retraces' <= alpha."""
    rng = np.random.default_rng(2)
    mu = dense_at(PRUNED_PARAMS)
    off = mu.copy()
    off[5] -= stats.DEFAULT_MARGIN_SE * np.sqrt(mu[5] * (1 - mu[5]) / N_TEST)
    hits = [retraces(draw(off, rng), PRUNED_PARAMS, draw(DENSE_MU, rng), DENSE_PARAMS, N_TEST).retraces
            for _ in range(CURVES)]
    assert np.mean(hits) <= BOUND


def test_retraces_compares_only_inside_the_dense_range_and_one_seed_is_not_tested():
    rng = np.random.default_rng(3)
    params = np.array([200_000, 30_000, 5_000, 500])
    r = retraces(draw(dense_at(params.clip(1000, 64_000)), rng), params, draw(DENSE_MU, rng), DENSE_PARAMS,
                 N_TEST, margin=0.03)
    assert r.levels == (1, 2) and r.margins == (0.03, 0.03)
    outside = retraces(draw(np.full(2, 0.5), rng), [1e6, 2e6], draw(DENSE_MU, rng), DENSE_PARAMS, N_TEST)
    assert "not tested" in outside.verdict and not outside.retraces
    one = retraces(draw(dense_at(PRUNED_PARAMS), rng, seeds=1), PRUNED_PARAMS, draw(DENSE_MU, rng), DENSE_PARAMS,
                   N_TEST)
    assert one.verdict == ONE_SEED and math.isnan(one.p_value)


# --- distillation made the curve monotonic -------------------------------------------------------------

def sdd_curve(points: int, dip_se: float, rise_se: float) -> np.ndarray:
    """Flat, a fall of dip_se SEs to the middle, then a rise of rise_se SEs (0: stays at the bottom)."""
    x = np.arange(points)
    mid = points // 2
    fall = np.clip((x - points / 4) / (mid - points / 4), 0, 1) * dip_se * SE0
    rise = np.clip((x - mid) / (3 * points / 4 - mid), 0, 1) * rise_se * SE0
    return P0 - fall + rise


def test_distillation_that_removes_a_clear_rise_is_monotonic():
    rng = np.random.default_rng(0)
    r = distillation_monotonic(draw(sdd_curve(12, 8, 8), rng), draw(sdd_curve(12, 8, 0), rng), N_TEST)
    assert r.vanilla.significant and not r.distilled.significant
    assert r.monotonic and r.paired and r.common_points and r.p_value <= ALPHA
    assert r.difference_ci[0] > 0 and r.difference == pytest.approx(8 * SE0, abs=4 * SE0)
    assert r.verdict.startswith("distillation made the curve monotonic")


def test_distillation_that_keeps_the_rise_is_not_monotonic():
    rng = np.random.default_rng(1)
    r = distillation_monotonic(draw(sdd_curve(12, 8, 8), rng), draw(sdd_curve(12, 8, 8), rng), N_TEST)
    assert r.vanilla.significant and r.distilled.significant and not r.monotonic
    assert r.verdict.startswith("not monotonic")


def test_distillation_that_changes_nothing_is_claimed_at_most_alpha():
    """A weak rise (distilled often not significant on its own): the difference test must hold the line."""
    rng = np.random.default_rng(2)
    mu = sdd_curve(12, 4, 4)
    hits = [distillation_monotonic(draw(mu, rng), draw(mu, rng), N_TEST, simulations=300, seed=i).monotonic
            for i in range(200)]
    assert np.mean(hits) <= ALPHA + 2 * math.sqrt(ALPHA * (1 - ALPHA) / 200)


def test_distillation_unpaired_and_one_seed():
    rng = np.random.default_rng(3)
    r = distillation_monotonic(draw(sdd_curve(12, 8, 8), rng, seeds=3), draw(sdd_curve(12, 8, 0), rng, seeds=4),
                               N_TEST)
    assert not r.paired and r.monotonic and "unpaired, 3 vs 4 seeds" in r.verdict
    one = distillation_monotonic(draw(sdd_curve(12, 8, 8), rng, seeds=1), draw(sdd_curve(12, 8, 0), rng, seeds=1),
                                 N_TEST)
    assert one.verdict == ONE_SEED and not one.monotonic and math.isnan(one.p_value)


# --- the IT is a bad start -----------------------------------------------------------------------------

def test_an_it_start_clearly_worse_is_a_bad_start():
    rng = np.random.default_rng(0)
    r = it_is_a_bad_start(draw(np.array([0.60]), rng, seeds=3)[:, 0], draw(np.array([0.65]), rng, seeds=3)[:, 0],
                          N_TEST)
    assert r.bad_start and r.p_value <= ALPHA and r.effect == pytest.approx(-0.05, abs=0.01)
    assert r.ci[1] < 0 and r.verdict.startswith("the IT is a bad start: best pruned accuracy 0.0")


def test_an_equal_start_is_claimed_at_most_alpha_and_a_better_one_never():
    rng = np.random.default_rng(1)
    hits = []
    for _ in range(CURVES):
        it = draw(np.array([P0]), rng, seeds=3, extra=1.0)[:, 0]
        ctl = draw(np.array([P0, P0]), rng, seeds=3, extra=1.0)          # two control parents per seed
        hits.append(it_is_a_bad_start(it, ctl, N_TEST).bad_start)
    assert np.mean(hits) <= BOUND
    better = it_is_a_bad_start(np.full(3, 0.70), np.full(3, 0.65), N_TEST)
    assert not better.bad_start and better.effect > 0 and better.verdict.startswith("not significant: ")
    one = it_is_a_bad_start([0.6], [0.65], N_TEST)
    assert one.verdict == ONE_SEED and not one.bad_start


# --- records and numerics ------------------------------------------------------------------------------

def test_every_result_is_a_json_record_with_its_verdict():
    rng = np.random.default_rng(0)
    results = [
        dip_and_recovery(draw(dip_curve(12, 8.0), rng), N_TEST),
        dip_and_recovery(draw(dip_curve(12, 8.0), rng, seeds=1), N_TEST),
        retraces(draw(dense_at(PRUNED_PARAMS), rng), PRUNED_PARAMS, draw(DENSE_MU, rng), DENSE_PARAMS, N_TEST),
        retraces(draw(dense_at(PRUNED_PARAMS), rng, seeds=1), PRUNED_PARAMS, draw(DENSE_MU, rng), DENSE_PARAMS,
                 N_TEST),
        distillation_monotonic(draw(sdd_curve(12, 8, 8), rng), draw(sdd_curve(12, 8, 0), rng), N_TEST),
        it_is_a_bad_start([0.6, 0.61, 0.6], [0.65, 0.66, 0.64], N_TEST),
        it_is_a_bad_start([0.6], [0.65], N_TEST),
    ]
    for r in results:
        d = r.to_dict()
        text = json.dumps(d, allow_nan=False)
        back = json.loads(text)
        assert back["verdict"] == r.verdict and back["test"] == type(r).test
        for key in ("p_value", "seeds"):
            assert key in back
    nested = results[4].to_dict()
    assert nested["vanilla"]["test"] == "dip_and_recovery"
    assert nested["vanilla"]["verdict"] == results[4].vanilla.verdict
    assert results[1].to_dict()["p_value"] is None


def test_student_t_matches_scipy():
    sst = pytest.importorskip("scipy.stats")
    for t, df in [(1.3, 2), (-0.4, 2), (2.9, 5.5), (10.0, 1), (0.01, 30), (-3.0, 7.3)]:
        assert stats._t_sf(t, df) == pytest.approx(sst.t.sf(t, df), rel=1e-9, abs=1e-12)
        assert stats._t_ppf(0.975, df) == pytest.approx(sst.t.ppf(0.975, df), rel=1e-8)


def test_seed_band_is_the_t_interval_of_the_seed_mean():
    from analysis.stats import seed_band

    # two seeds at 0.50 and 0.52: mean 0.51, s = 0.01414, t(0.975, 1) = 12.706 -> half-width 0.127
    mean, low, high = seed_band([[0.50, 0.6, math.nan], [0.52, 0.6, 0.7]])
    assert mean[:2] == pytest.approx([0.51, 0.6]) and (high[0] - mean[0]) == pytest.approx(12.706 * 0.01, rel=1e-3)
    assert low[1] == high[1] == pytest.approx(0.6)  # seeds agree, no test-set floor: no width
    assert math.isnan(low[2]) and mean[2] == pytest.approx(0.7)  # one seed reached it: no band
    # with the test set's size the binomial floor keeps the band open where the seeds agree
    _, low, high = seed_band([[0.6], [0.6]], 1000)
    assert (high[0] - 0.6) == pytest.approx(12.706 * math.sqrt(0.24 / 1000 / 2), rel=1e-3)


def test_a_bad_start_is_claimed_exactly_when_its_ci_lies_below_zero():
    # The printed 95% CI and the claim must never disagree (a one-sided p = 0.04 beside a CI through zero did).
    rng = np.random.default_rng(7)
    for _ in range(300):
        it = np.clip(0.6 + rng.normal(0, 0.03, 3), 0, 1)
        controls = np.clip(it[:, None] + rng.normal(0.02, 0.03, (3, 2)), 0, 1)
        result = stats.it_is_a_bad_start(it, controls, n_test=10_000)
        assert result.bad_start == (result.ci[1] < 0), (it, controls, result)


def test_the_dense_parent_is_no_evidence_that_pruning_retraces():
    # A w8 chain whose only level inside the dense range was its own parent (level 0) read "retraces".
    rng = np.random.default_rng(4)
    params = np.array([2_000, 800, 300])          # level 0 inside the dense range, the pruned levels below it
    acc = draw(np.array([dense_at(2_000), 0.3, 0.2]), rng)
    parent_only = retraces(acc, params, draw(DENSE_MU, rng), DENSE_PARAMS, N_TEST, first_pruned=1)
    assert not parent_only.retraces and "not tested" in parent_only.verdict
    with_parent = retraces(acc, params, draw(DENSE_MU, rng), DENSE_PARAMS, N_TEST)
    assert with_parent.levels == (0,)
