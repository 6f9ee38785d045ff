"""benchmark/speed_vs_trl.py: the pure helpers behind the report's numbers (no TRL, no runs)."""

import pytest

import speed_vs_trl


def test_steady_eps_skips_the_warmup_update():
    # updates end at 10 s (warm-up), 12 s, 14 s, 16 s: 3 steady updates of 64 episodes in 6 s
    assert speed_vs_trl.steady_eps([10.0, 12.0, 14.0, 16.0], 64) == pytest.approx(32.0)
    assert speed_vs_trl.steady_eps([10.0, 12.0, 15.0], 32, warmup=2) == pytest.approx(32 / 3)


def test_steady_eps_needs_an_update_past_the_warmup():
    with pytest.raises(ValueError, match="at least 2 updates"):
        speed_vs_trl.steady_eps([10.0], 64)


def test_median_ratio_pairs_the_alternated_runs():
    assert speed_vs_trl.median_ratio([2.0, 3.0, 10.0], [1.0, 1.0, 1.0]) == 3.0
    assert speed_vs_trl.median_ratio([4.0, 6.0], [2.0, 2.0]) == 2.5  # pairwise, then the median
    with pytest.raises(ValueError, match="as many runs"):
        speed_vs_trl.median_ratio([1.0], [1.0, 2.0])


def test_shares_leave_the_rest_to_other():
    s = speed_vs_trl.shares({"generation": 1.0, "scoring": 0.5, "training": 2.0}, 4.0)
    assert s == pytest.approx({"generation": 0.25, "scoring": 0.125, "training": 0.5, "other": 0.125})
