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


def resample_counts(windows: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, windows) float64: how often each window is drawn in each replicate.

    Counting the draws turns every replicate's sums into one matmul."""
    idx = resample_indices(windows, resamples, seed)
    counts = np.zeros((resamples, windows))
    np.add.at(counts, (np.repeat(np.arange(resamples), windows), idx.ravel()), 1.0)
    return counts


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
    counts = resample_counts(len(tokens), resamples, seed)
    denom = counts @ tokens
    alpha = (1.0 - level) / 2
    out = {}
    for mode, values in nll.items():
        values = _checked(mode, values, tokens)
        ppl = np.exp(counts @ values / denom)
        lo, hi = np.quantile(ppl, [alpha, 1.0 - alpha])
        out[mode] = (float(lo), float(hi))
    return out


def paired_ratio_intervals(nll: dict[str, np.ndarray], reference: np.ndarray,
                           tokens: np.ndarray, resamples: int = 1000, seed: int = 0,
                           level: float = 0.95) -> dict[str, tuple[float, float, float]]:
    """Percentile bootstrap intervals of each mode's perplexity over the reference's,
    ``exp((sum nll - sum reference) / sum tokens)``, both on the same resampled windows.

    This is the interval of the difference itself: two perplexity intervals that overlap
    can still give a ratio interval that excludes 1 when the windows move together.

    Returns:
        mode -> (ratio, lo, hi).
    """
    tokens = np.asarray(tokens, dtype=np.float64)
    reference = _checked("reference", reference, tokens)
    counts = resample_counts(len(tokens), resamples, seed)
    denom = counts @ tokens
    alpha = (1.0 - level) / 2
    out = {}
    for mode, values in nll.items():
        delta = _checked(mode, values, tokens) - reference
        ratio = np.exp(counts @ delta / denom)
        lo, hi = np.quantile(ratio, [alpha, 1.0 - alpha])
        out[mode] = (float(np.exp(delta.sum() / tokens.sum())), float(lo), float(hi))
    return out


def _checked(mode: str, values, tokens: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.shape != tokens.shape:
        raise ValueError(f"mode {mode!r}: {values.shape} NLL sums for {tokens.shape} windows")
    return values
