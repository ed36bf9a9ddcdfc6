"""FFN weight bytes read per token, as a fraction of the dense FFN's: the compute-fair axis.

Every mode reads each FFN weight matrix (gate, up, down; ungated: fc1 as ``up``, fc2 as
``down``) at some fraction of its rows or columns, counted from what was kept at the
masked positions. A matrix weighs by its number of weights (all share the dtype), a layer
that is not masked reads everything, and the overall fraction sums bytes over layers:

- teal, wina: gate and up at the kept share of ``x``, down at the kept share of ``h``;
- cats: gate whole (``g`` must exist to be thresholded), up and down at the kept share;
- masks that need the token's true mask (oracle; cluster with K > 1; random in mask mode
  ``and``): gate and up whole, down at the kept share. These are upper bounds, not
  operating points;
- masks known before the FFN runs (the static K = 1 centroid, random replace, predicted):
  gate and up at the mask's density, down at the kept share (in mask mode ``and``, m AND
  the mask; in replace, the mask itself). A predictor adds its own parameters as a
  fraction of the FFN's.
"""

from __future__ import annotations

import numpy as np

from actclust.budget import fraction, split_reads
from actclust.evaluation.metrics import F
from actclust.io.centroid_store import slots

BYTES_DEFINITION = (
    "per mode, FFN weight bytes read per token over the dense FFN's at masked positions "
    "(site intermediate only): oracle, cluster (k > 1) and random-and need the true mask, so "
    "gate and up count whole and down at the kept share; a static centroid (k = 1), random "
    "replace and predicted read gate and up at the mask's density and down at the kept "
    "share, predicted plus the predictor's parameters")


def mode_fractions(results: list, baseline: dict, meta: dict, mask_mode: str,
                   predictor: dict | None = None) -> dict | None:
    """ffn_bytes_fraction of every mode (None with sites other than intermediate)."""
    masked = slots(meta)
    if any(site != "intermediate" for site, _, _, _ in masked):
        return None
    stats = sum(r["stats"] for r in results)
    stats[:, F["oracle_bits"]] = baseline["oracle_bits"]
    layers = [layer for _, layer, _, _ in masked]
    width = masked[0][2]
    weights = results[0]["ffn_weights"]
    fractions = mask_fractions(stats, layers, width, weights, meta["k"], mask_mode)
    if "random" not in results[0]["nll"]:  # the random pass did not run
        fractions["random"] = None
    if predictor is not None:
        fractions["predicted"] = predicted_fraction(
            sum(r["predicted_stats"] for r in results), layers, width, weights, mask_mode,
            predictor["params_fraction"])
    return fractions


def per_layer(weights: list[dict], reads: dict[int, dict]) -> list[float]:
    return [fraction([weights[layer]], {0: reads.get(layer, {})}) for layer in range(len(weights))]


def anchor_reads(method: str, kept: dict[str, list[float]]) -> dict[int, dict]:
    """Layer -> matrix -> share read, from each input's per-layer kept share."""
    if method == "cats":
        return {layer: {"gate": 1.0, "up": share, "down": share}
                for layer, share in enumerate(kept["g"])}
    return {layer: split_reads(x, h) for layer, (x, h) in enumerate(zip(kept["x"], kept["h"]))}


def mask_fractions(stats: np.ndarray, layers: list[int], width: int, weights: list[dict],
                   k: int, mask_mode: str) -> dict:
    """ffn_bytes_fraction of dense, oracle, cluster and random from their per-slot sums
    (one site, ``intermediate``; ``layers`` the model layer of each slot)."""
    cells = stats[:, F["tokens"]] * width

    def share(field: str) -> np.ndarray:
        return np.divide(stats[:, F[field]], cells, out=np.zeros(len(cells)), where=cells > 0)

    def reads(down_field: str, in_field: str | None) -> dict:
        """gate and up at ``in_field``'s share (None: whole), down at ``down_field``'s."""
        ins = np.ones(len(cells)) if in_field is None else share(in_field)
        return {layer: split_reads(float(i), float(d))
                for layer, i, d in zip(layers, ins, share(down_field))}

    # One centroid is known before the FFN runs: gate and up read at its density (in mask
    # mode and, down then reads the kept share of it, as a predicted mask does).
    static = k == 1
    return {"dense": 1.0,
            "oracle": fraction(weights, reads("oracle_bits", None)),
            "cluster": fraction(weights, reads("kept_bits", "centroid_bits" if static else None)),
            "random": fraction(weights, reads("random_kept_bits",
                                              None if mask_mode == "and" else "random_kept_bits"))}


def predicted_fraction(stats: np.ndarray, layers: list[int], width: int, weights: list[dict],
                       mask_mode: str, params_fraction: float) -> float:
    """ffn_bytes_fraction of the predicted mode from the predictor's per-layer sums
    (columns: tokens, agree, predicted bits, true bits, overlap, ...)."""
    cells = stats[:, 0] * width
    shares = {}
    for layer, row, n in zip(layers, stats, cells):
        density = row[2] / n if n else 0.0
        shares[layer] = split_reads(density, (row[4] / n if n else 0.0)
                                    if mask_mode == "and" else density)
    return fraction(weights, shares) + params_fraction
