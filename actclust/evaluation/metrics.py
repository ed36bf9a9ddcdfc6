"""Evaluation metrics: next-token NLL per window, clustering metrics from per-layer sums,
and the eval.json summary of per-chunk results.

Per-layer sums are kept in one float64 row per layer, indexed by STAT_FIELDS
(integer counts stay exact below 2**53); the first five are the kernels'
:data:`actclust.kernels.STAT_FIELDS`. Every count is taken over the *masked*
positions of each window (positions >= dense_prefix); the prefix tokens enter
only ``*effective_density``, where they count as fully dense. Chunks are added
in window order, so any number of workers gives the same numbers.

The dense and oracle passes do not depend on the centroids. Their per-window
NLL sums and the oracle's kept bits form the *baseline*, which a run computes
once and every trial of that run reuses (:mod:`actclust.io.eval_store`).
"""

from __future__ import annotations

import math

import numpy as np

from actclust.devices import to_host
from actclust.evaluation.bootstrap import paired_ppl_intervals
from actclust.evaluation.compare import PER_WINDOW_DEFINITION, window_losses
from actclust.io.centroid_store import slots

MODES = ("dense", "oracle", "cluster", "random")
BASELINE_MODES = ("dense", "oracle")
# Per-layer sums over masked positions. Cluster pass: tokens, |m|, |c|, Hamming d,
# |m AND c|, bits kept (|c|, or |m AND c| in mask mode "and"), sum |a| m, sum |a| m c.
# Random pass: bits kept. Oracle pass: bits kept (|m|).
STAT_FIELDS = ("tokens", "true_bits", "centroid_bits", "hamming", "overlap", "kept_bits",
               "true_mass", "kept_mass", "random_bits", "random_kept_bits", "oracle_bits")
F = {name: i for i, name in enumerate(STAT_FIELDS)}  # the first five: kernels.STAT_FIELDS


def window_nll(logits, ids) -> np.ndarray:
    """Per-window sum of next-token NLL: logits (W, T, V), ids (W, T) -> (W,) float64."""
    import torch  # lazy: the driver summarizes without torch

    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return to_host(nll.sum(dim=1))


def empty_stats(layers: int) -> np.ndarray:
    return np.zeros((layers, len(STAT_FIELDS)), dtype=np.float64)


def metric_values(stats: np.ndarray, width, prefix_tokens: int = 0) -> dict:
    """Micro-averaged metrics from summed STAT_FIELDS.

    ``stats`` one row (one slot, or summed over slots of one ``width``) with
    ``prefix_tokens`` the dense-prefix (token, slot) pairs behind it; or (R, F) rows of
    slots with ``width`` a list of their widths and ``prefix_tokens`` the prefix tokens of
    each row. Bit shares divide by the cells (tokens x width) summed over rows, so several
    sites weigh by their widths; the prefix cells count at density 1.0 in the effective
    densities.
    """
    rows = np.atleast_2d(np.asarray(stats, dtype=np.float64))
    widths = np.broadcast_to(np.asarray(width, dtype=np.float64), (len(rows),))
    # The kernels' assignment_stats give the first five fields only; the rest count as 0.
    s = {name: float(rows[:, i].sum()) if i < rows.shape[1] else 0.0 for name, i in F.items()}
    precision = s["overlap"] / s["centroid_bits"] if s["centroid_bits"] else 0.0
    recall = s["overlap"] / s["true_bits"] if s["true_bits"] else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    cells = float((rows[:, F["tokens"]] * widths).sum())
    prefix_cells = float(prefix_tokens * widths.sum())
    all_cells = cells + prefix_cells

    def share(bits):
        return bits / cells if cells else 0.0

    def effective(bits):
        return (bits + prefix_cells) / all_cells if all_cells else 0.0

    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": 1.0 - share(s["hamming"]),
        "weighted_recall": s["kept_mass"] / s["true_mass"] if s["true_mass"] else 0.0,
        "density": share(s["centroid_bits"]),
        "true_density": share(s["true_bits"]),
        "random_density": share(s["random_bits"]),
        "effective_density": effective(s["kept_bits"]),
        "random_effective_density": effective(s["random_kept_bits"]),
        "oracle_effective_density": effective(s["oracle_bits"]),
    }


def _without_random(stats: np.ndarray, widths, prefix_tokens: int) -> dict:
    """metric_values of an evaluation without the random pass: its figures are null."""
    return {**metric_values(stats, widths, prefix_tokens), "random_density": None,
            "random_effective_density": None}


def baseline_from(results: list, windows, identity: dict) -> dict:
    """The centroid-free part of chunk results (dense/oracle NLL, oracle kept bits)."""
    stats = sum(r["stats"] for r in results)
    return {"identity": identity, "seq": [int(s) for s in windows.seq],
            "nll": {m: [float(v) for r in results for v in r["nll"][m]] for m in BASELINE_MODES},
            "oracle_bits": [float(v) for v in stats[:, F["oracle_bits"]]]}


def summarize(results: list, baseline: dict, meta: dict, windows, *, dense_prefix: int,
              mask_mode: str, resamples: int = 1000, seed: int = 0) -> dict:
    """eval.json content from per-chunk results (window order) and the baseline."""
    per_window_tokens = np.concatenate([r["tokens"] for r in results]).astype(np.float64)
    nll = {m: np.asarray(baseline["nll"][m], dtype=np.float64) for m in BASELINE_MODES}
    ran = [m for m in ("cluster", "random") if m in results[0]["nll"]]
    for mode in ran:
        nll[mode] = np.concatenate([r["nll"][mode] for r in results])
    stats = sum(r["stats"] for r in results)  # (slots, fields): (site, layer), site-major
    stats[:, F["oracle_bits"]] = baseline["oracle_bits"]
    masked = slots(meta)
    widths = [width for _, _, width, _ in masked]
    sites = list(dict.fromkeys(site for site, _, _, _ in masked))
    several = meta.get("format_version") == 2
    predicted = float(per_window_tokens.sum())
    prefix = len(windows) * dense_prefix  # per layer
    intervals = paired_ppl_intervals(nll, per_window_tokens, resamples=resamples, seed=seed)
    report = {}
    for mode in MODES:
        report[f"{mode}_ppl"] = math.exp(math.fsum(nll[mode]) / predicted) if mode in nll else None
        report[f"{mode}_ppl_ci95"] = list(intervals[mode]) if mode in nll else None
    # The random pass is opt-in in actclust run and sweep: without it its figures are null.
    values = (metric_values if "random" in ran else _without_random)
    report.update(values(stats, widths, prefix))  # over all masked (site, layer)
    report.update({
        "dense_prefix": dense_prefix,
        "mask_mode": mask_mode,
        "tokens": int(stats[0, F["tokens"]]) + prefix,
        "masked_tokens": int(stats[0, F["tokens"]]),
        "predicted_tokens": int(predicted),
        "windows": len(windows),
        "bootstrap": {"unit": "window", "resamples": resamples, "seed": seed, "paired": True},
        "k": meta["k"],
        "theta": meta["theta"],
        "algorithm": meta.get("algorithm", "hamming-kmeans"),
        "sites": sites if several else sites[0],
        "per_layer": [{**({"site": site} if several else {}), "layer": int(layer),
                       **values(stats[i], width, prefix)}
                      for i, (site, layer, width, _) in enumerate(masked)],
        "per_site": [{"site": site, "d_ff": next(w for s, _, w, _ in masked if s == site),
                      **values(stats[rows], [widths[i] for i in rows], prefix)}
                     for site in sites
                     for rows in [[i for i, m in enumerate(masked) if m[0] == site]]],
        "per_window": window_losses(windows.seq, per_window_tokens, nll),
        "definitions": DEFINITIONS,
    })
    return report


DEFINITIONS = {
    "precision": "|m AND c| / |c|, micro-averaged over (token, layer) at masked positions",
    "recall": "|m AND c| / |m| (the paper's 'clustering precision')",
    "weighted_recall": "sum |a| m c / sum |a| m: the share of active activation mass kept",
    "cluster_ppl": "a * c (mask mode replace) or a * m * c (and), c the centroid nearest "
                   "(Hamming) to the token's true mask m",
    "random_ppl": "random masks with exactly as many bits per layer as the centroids used",
    "effective_density": "fraction of FFN neurons kept over all evaluated tokens, the "
                         "dense-prefix tokens at 1.0; with several sites, of all masked-site "
                         "neurons, each site weighted by its width (gate/up d_ff, down_out "
                         "d_model)",
    "per_window": PER_WINDOW_DEFINITION,
    "per_site": "the same metrics over the layers of one masked site (all sites masked in "
                "the same forward pass)",
    "dense_prefix": "positions < dense_prefix of every window are never masked",
    "metrics_measured_in": "the cluster pass, on the activation each mask is applied to",
    "ci95": "percentile bootstrap over windows, the same resampled windows for every mode",
}
