"""Paired bootstrap intervals for perplexities computed over the same windows.

A perplexity is ``exp(sum of NLL / tokens)`` over evaluation windows. Windows,
not tokens, are the independent units (the tokens of a window share its
context), so intervals resample windows with replacement. Every mode is
evaluated on the *same* resampled windows ("paired"), which keeps the
comparison between modes honest: a window that is hard for one mode is hard
for all of them in the same replicate.
"""

from __future__ import annotations

import numpy as np


def resample_indices(windows: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, windows) int64 window indices drawn with replacement."""
    if windows < 1:
        raise ValueError("at least one window is needed for a bootstrap")
    rng = np.random.default_rng(seed)
    return rng.integers(0, windows, size=(resamples, windows))


def paired_ppl_intervals(nll: dict[str, np.ndarray], tokens: np.ndarray, resamples: int = 1000,
                         seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of ``exp(sum nll / sum tokens)`` for every mode.

    Args:
        nll: mode -> (W,) float64 per-window sums of next-token NLL, same window order.
        tokens: (W,) per-window counts of predicted tokens.
        resamples: bootstrap replicates.
        seed: seed of the window resampling (shared by every mode).
        level: coverage of the two-sided interval.
    Returns:
        mode -> (lo, hi).
    """
    tokens = np.asarray(tokens, dtype=np.float64)
    idx = resample_indices(len(tokens), resamples, seed)
    # Counting how often each window is drawn turns the resample sums into one matmul.
    counts = np.zeros((resamples, len(tokens)))
    np.add.at(counts, (np.repeat(np.arange(resamples), len(tokens)), idx.ravel()), 1.0)
    denom = counts @ tokens
    alpha = (1.0 - level) / 2
    out = {}
    for mode, values in nll.items():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != tokens.shape:
            raise ValueError(f"mode {mode!r}: {values.shape} NLL sums for {tokens.shape} windows")
        ppl = np.exp(counts @ values / denom)
        lo, hi = np.quantile(ppl, [alpha, 1.0 - alpha])
        out[mode] = (float(lo), float(hi))
    return out
