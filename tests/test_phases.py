from sdd.phases import entropy_early_stop, pruning_threshold, sdd_phases, width_threshold


def test_pruning_threshold_is_first_level_below():
    assert pruning_threshold([1.0, 1.0, 0.995, 0.95, 0.5]) == 3
    assert pruning_threshold([1.0, 1.0, 1.0]) is None
    assert pruning_threshold([0.5, 0.4]) == 1  # level 0 (dense) is never the threshold


def test_width_threshold_is_first_width_reaching():
    assert width_threshold([64, 8, 16, 32], [1.0, 0.2, 0.5, 0.995]) == 32
    assert width_threshold([8, 16], [0.1, 0.2]) is None


def test_phases_of_a_textbook_sdd_curve():
    test = [0.80, 0.80, 0.795, 0.75, 0.70, 0.78, 0.85, 0.84, 0.60]
    noisy = [1.0, 1.0, 1.0, 1.0, 1.0, 0.90, 0.60, 0.40, 0.20]
    assert sdd_phases(test, noisy) == ["dense", "light", "light", "critical", "critical", "sweet", "sweet",
                                       "sweet", "collapsed"]


def test_phases_without_threshold_stay_before_it():
    assert sdd_phases([0.8, 0.8, 0.7], [1.0, 1.0, 1.0]) == ["dense", "light", "critical"]


def test_early_stop_waits_for_both_conditions():
    entropy = [1.0, 0.99, 0.98, 0.85, 0.80, 0.70]
    val = [0.80, 0.81, 0.82, 0.815, 0.79, 0.70]
    # Level 3 has left the entropy plateau but val is within tolerance of the best (0.82).
    stop = entropy_early_stop(entropy, val, entropy_drop=0.1, acc_tolerance=0.02)
    assert stop is not None and stop.level == 4  # 0.79 < 0.82 - 0.02
    assert entropy_early_stop(entropy, val, entropy_drop=0.5, acc_tolerance=0.02) is None
    # Accuracy falling while entropy is still on its plateau does not stop the chain.
    assert entropy_early_stop([1.0, 1.0, 0.99], [0.8, 0.5, 0.4], 0.1, 0.02) is None
