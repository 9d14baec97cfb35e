import math

from sdd.phases import (NEVER_INTERPOLATED, NO_IT, entropy_early_stop, it_level_label, pruning_threshold, sdd_phases,
                        width_threshold)

THRESHOLD = 0.95


def test_pruning_threshold_is_first_level_below():
    assert pruning_threshold([1.0, 1.0, 0.995, 0.95, 0.5], 0.99) == 3
    assert pruning_threshold([1.0, 1.0, 0.995, 0.95, 0.5], THRESHOLD) == 4
    assert pruning_threshold([1.0, 1.0, 1.0], THRESHOLD) is None
    assert pruning_threshold([0.96, 0.4], THRESHOLD) == 1  # level 0 (dense) is never the threshold


def test_no_it_when_the_dense_parent_never_interpolated():
    # A w32 parent that fits 18.5% of its noisy labels: it never interpolated, so losing them is no IT.
    noisy = [0.185, 0.17, 0.12, 0.10]
    assert pruning_threshold(noisy, THRESHOLD) is None
    assert it_level_label(noisy, THRESHOLD) == NEVER_INTERPOLATED
    assert it_level_label([1.0, 1.0, 1.0], THRESHOLD) == NO_IT
    assert it_level_label([1.0, 0.97, 0.9], THRESHOLD) == "2"
    phases = sdd_phases([0.60, 0.60, 0.55, 0.58, 0.50], noisy, THRESHOLD)
    assert phases == ["dense", "light", "critical", "critical", "critical"]  # no IT: neither sweet nor collapsed


def test_width_threshold_is_first_width_reaching():
    assert width_threshold([64, 8, 16, 32], [1.0, 0.2, 0.5, 0.995], 0.99) == 32
    assert width_threshold([64, 8, 16, 32], [1.0, 0.2, 0.5, 0.96], THRESHOLD) == 32
    assert width_threshold([8, 16], [0.1, 0.2], THRESHOLD) is None


def test_phases_of_a_textbook_sdd_curve():
    test = [0.80, 0.80, 0.795, 0.75, 0.70, 0.78, 0.85, 0.84, 0.60]
    noisy = [1.0, 1.0, 1.0, 1.0, 1.0, 0.90, 0.60, 0.40, 0.20]
    assert sdd_phases(test, noisy, THRESHOLD) == ["dense", "light", "light", "critical", "critical", "sweet",
                                                  "sweet", "sweet", "collapsed"]


def test_a_monotone_decline_is_not_sweet():
    # The noisy labels are lost from level 1 on and the test accuracy only falls: flat, then both fall.
    test = [0.70, 0.695, 0.67, 0.64, 0.60, 0.55]
    noisy = [1.0, 0.90, 0.80, 0.60, 0.40, 0.20]
    assert sdd_phases(test, noisy, THRESHOLD) == ["dense", "light", "collapsed", "collapsed", "collapsed",
                                                  "collapsed"]
    # Flat after the IT: never sweet either.
    assert "sweet" not in sdd_phases([0.70, 0.70, 0.70, 0.70], [1.0, 0.9, 0.8, 0.7], THRESHOLD)


def test_the_it_level_is_labelled_by_the_rule():
    # IT at level 3 (noisy fit 0.90), which is the bottom of the dip (0.70): still critical. The rise out
    # of it (level 4: 0.72, more than 0.01 above the running minimum) is the first sweet level; the best
    # after it (0.79, level 6) ends the sweet phase once the test accuracy is 0.01 below it.
    test = [0.80, 0.80, 0.75, 0.70, 0.72, 0.78, 0.79, 0.70, 0.60]
    noisy = [1.0, 1.0, 1.0, 0.90, 0.70, 0.50, 0.40, 0.30, 0.20]
    assert sdd_phases(test, noisy, THRESHOLD) == ["dense", "light", "critical", "critical", "sweet", "sweet",
                                                  "sweet", "collapsed", "collapsed"]
    # The dip's bottom before the IT and the test accuracy already up at it: the IT level is sweet.
    test = [0.80, 0.75, 0.70, 0.74, 0.78, 0.60]
    noisy = [1.0, 1.0, 1.0, 0.90, 0.60, 0.30]
    assert sdd_phases(test, noisy, THRESHOLD) == ["dense", "critical", "critical", "sweet", "sweet", "collapsed"]


def test_phases_without_threshold_stay_before_it():
    assert sdd_phases([0.8, 0.8, 0.7], [1.0, 1.0, 1.0], THRESHOLD) == ["dense", "light", "critical"]


def test_early_stop_waits_for_both_conditions():
    entropy = [1.0, 0.99, 0.98, 0.85, 0.80, 0.70]
    val = [0.80, 0.81, 0.82, 0.815, 0.79, 0.70]
    # Level 3 leaves the entropy plateau: from there the best val_acc is tracked (0.815, not the 0.82 of the plateau).
    stop = entropy_early_stop(entropy, val, entropy_drop=0.1, acc_tolerance=0.02)
    assert stop is not None and stop.level == 4  # 0.79 < 0.815 - 0.02
    assert entropy_early_stop(entropy, val, entropy_drop=0.5, acc_tolerance=0.02) is None
    # Accuracy falling while entropy is still on its plateau does not stop the chain.
    assert entropy_early_stop([1.0, 1.0, 0.99], [0.8, 0.5, 0.4], 0.1, 0.02) is None


def test_early_stop_does_not_stop_at_the_bottom_of_the_dip():
    # Dense 0.80, a light plateau, a critical dip whose bottom (0.70, level 4) is where the entropy leaves its
    # plateau, a sweet recovery to 0.78 and a collapse. The dip's bottom lies far below the dense accuracy, but
    # the best val_acc is tracked only from the plateau's exit, so the chain runs on through the sweet phase.
    entropy = [1.0, 1.0, 0.99, 0.97, 0.85, 0.80, 0.78, 0.75, 0.70]
    val = [0.80, 0.80, 0.79, 0.74, 0.70, 0.75, 0.78, 0.77, 0.72]
    stop = entropy_early_stop(entropy, val, entropy_drop=0.1, acc_tolerance=0.02)
    assert stop is not None and stop.level == 8  # 0.72 < 0.78 - 0.02: the collapse after the sweet best
    # A fall right after the exit is the traditional criterion at work: it stops there.
    assert entropy_early_stop(entropy, [0.80, 0.80, 0.79, 0.74, 0.70, 0.65, 0.60, 0.55, 0.5], 0.1, 0.02).level == 5


def test_missing_entropy_is_no_information():
    # A level without an entropy value (None or NaN) says nothing about the plateau: it neither ends it
    # nor, once the rule is on, turns it off.
    val = [0.80, 0.70, 0.60, 0.50]
    assert entropy_early_stop([1.0, None, math.nan, None], val, 0.1, 0.02) is None
    assert entropy_early_stop([None, 0.5, 0.4, 0.3], val, 0.1, 0.02) is None  # no dense entropy: no rule
    stop = entropy_early_stop([1.0, 0.8, None, 0.7], [0.80, 0.70, 0.72, 0.60], 0.1, 0.02)
    assert stop is not None and stop.level == 3  # on from level 1 (best 0.70, then 0.72); 0.60 < 0.72 - 0.02
