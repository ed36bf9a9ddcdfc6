"""Evaluation metrics: next-token NLL per window, clustering precision/recall from
integer overlap sums, and the eval.json summary of per-chunk results.

The per-layer integer sums (:data:`actclust.kernels.STAT_FIELDS`) come from the
bit kernels; everything here is arithmetic on them, and chunks are added in
window order, so any number of workers gives the same numbers.
"""

from __future__ import annotations

import math

import numpy as np

from actclust.kernels import STAT_FIELDS  # noqa: F401  (the fields summed below)

MODES = ("dense", "oracle", "cluster", "random")


def window_nll(logits, ids) -> np.ndarray:
    """Per-window sum of next-token NLL: logits (W, T, V), ids (W, T) -> (W,) float64."""
    import torch

    from actclust.devices import to_host

    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return to_host(nll.sum(dim=1))


def metric_values(stats: np.ndarray, width: int) -> dict:
    """Micro-averaged metrics from summed STAT_FIELDS (one row, or summed over layers)."""
    tokens, true_bits, centroid_bits, hamming, overlap = (float(v) for v in stats)
    precision = overlap / centroid_bits if centroid_bits else 0.0
    recall = overlap / true_bits if true_bits else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    cells = tokens * width
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": 1.0 - hamming / cells if cells else 0.0,
        "density": centroid_bits / cells if cells else 0.0,
        "true_density": true_bits / cells if cells else 0.0,
    }


def summarize(results: list, meta: dict, windows) -> dict:
    """eval.json content from per-chunk results, in window order."""
    tokens = sum(r["tokens"] for r in results)
    nll = {mode: math.fsum(float(v) for r in results for v in r["nll"][mode]) for mode in MODES}
    stats = sum(r["stats"] for r in results)  # (L, fields) int64
    width = meta["d_ff"]
    report = {
        "dense_ppl": math.exp(nll["dense"] / tokens),
        "oracle_ppl": math.exp(nll["oracle"] / tokens),
        "cluster_ppl": math.exp(nll["cluster"] / tokens),
        "random_ppl": math.exp(nll["random"] / tokens),
        **metric_values(stats.sum(axis=0), width),
        "tokens": int(stats[0, 0]),
        "predicted_tokens": tokens,
        "windows": len(windows),
        "k": meta["k"],
        "theta": meta["theta"],
        "algorithm": meta.get("algorithm", "hamming-kmeans"),
        "per_layer": [{"layer": int(layer), **metric_values(stats[i], width)}
                      for i, layer in enumerate(meta["layers"])],
        "definitions": {
            "precision": "|m AND c| / |c|, micro-averaged over (token, layer)",
            "recall": "|m AND c| / |m| (the paper's 'clustering precision')",
            "cluster_ppl": "a * centroid of the cluster nearest (Hamming) to the token's true mask",
        },
    }
    return report
