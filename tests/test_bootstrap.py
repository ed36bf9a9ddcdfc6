"""Paired bootstrap over windows, checked against a direct loop over the same resamples."""

import math

import numpy as np
import pytest

from actclust.evaluation.bootstrap import paired_ppl_intervals, resample_indices


def direct(nll, tokens, resamples, seed):
    idx = resample_indices(len(tokens), resamples, seed)
    out = {}
    for mode, values in nll.items():
        ppl = [math.exp(sum(values[i] for i in row) / sum(tokens[i] for i in row)) for row in idx]
        out[mode] = tuple(np.quantile(ppl, [0.025, 0.975]))
    return out


def test_matches_a_direct_computation_and_is_seeded():
    rng = np.random.default_rng(3)
    tokens = rng.integers(50, 256, size=23).astype(float)
    nll = {"dense": tokens * rng.uniform(2.0, 3.5, 23), "cluster": tokens * rng.uniform(3, 5, 23)}
    got = paired_ppl_intervals(nll, tokens, resamples=300, seed=7)
    want = direct(nll, tokens, 300, 7)
    for mode in nll:
        assert got[mode] == pytest.approx(want[mode], rel=1e-12)
    assert paired_ppl_intervals(nll, tokens, resamples=300, seed=7) == got
    assert paired_ppl_intervals(nll, tokens, resamples=300, seed=8) != got


def test_interval_contains_the_point_estimate_and_shrinks_with_more_windows():
    rng = np.random.default_rng(0)

    def width(n):
        tokens = np.full(n, 255.0)
        nll = {"m": tokens * rng.uniform(2.0, 3.0, n)}
        lo, hi = paired_ppl_intervals(nll, tokens, resamples=500, seed=1)["m"]
        point = math.exp(nll["m"].sum() / tokens.sum())
        assert lo < point < hi
        return hi - lo

    assert width(400) < width(25) / 2


def test_identical_modes_get_identical_intervals_and_one_window_is_a_point():
    tokens = np.array([10.0, 20.0, 30.0])
    nll = {"a": np.array([20.0, 50.0, 90.0])}
    nll["b"] = nll["a"].copy()
    got = paired_ppl_intervals(nll, tokens, resamples=200, seed=0)
    assert got["a"] == got["b"]
    lo, hi = paired_ppl_intervals({"a": np.array([23.0])}, np.array([10.0]))["a"]
    assert lo == hi == pytest.approx(math.exp(2.3))
    with pytest.raises(ValueError):
        paired_ppl_intervals({"a": np.ones(2)}, np.ones(3))
