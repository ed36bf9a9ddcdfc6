"""FFN weight bytes read per token, and one byte budget split across layers by a greedy
search, shared by the clusterings (``actclust mass-bits --budget``) and the anchors
(``evaluate --anchor teal --anchor-allocation greedy``). Pure numpy: the evaluation's byte
accounting (:mod:`actclust.evaluation.ffn_bytes`) builds on :func:`fraction`.

Layers differ in how much a dropped neuron costs. Given, for every layer, a grid of
candidate densities with an error of the layer's FFN output and the FFN bytes read at
each, :func:`greedy` picks one candidate per layer: every layer starts at its densest
candidate and, while the weighted mean of bytes is above the budget, the layer whose next
step down adds the least error per byte saved takes it (the block-wise greedy of TEAL,
arXiv 2408.14690, by marginal cost).
"""

from __future__ import annotations

import numpy as np

from actclust.errors import UserError

# Candidate densities (kept shares), ascending; 1.0 keeps every neuron.
GRID = tuple(round(0.2 + 0.05 * i, 2) for i in range(17))


def fraction(weights: list[dict], reads: dict[int, dict]) -> float:
    """Bytes read over dense bytes; ``reads`` layer -> matrix -> share read (absent: 1)."""
    total = sum(sum(layer.values()) for layer in weights)
    read = sum(count * reads.get(layer, {}).get(name, 1.0)
               for layer, matrices in enumerate(weights) for name, count in matrices.items())
    return read / total


def split_reads(in_share: float, down_share: float) -> dict:
    return {"gate": in_share, "up": in_share, "down": down_share}


def layer_bytes(weights: dict, in_shares, down_shares) -> np.ndarray:
    """Bytes fraction of one layer at each candidate: gate and up at ``in_shares``, down at
    ``down_shares`` (a centroid's density, and the share kept of it)."""
    return np.asarray([fraction([weights], {0: split_reads(float(i), float(d))})
                       for i, d in zip(in_shares, down_shares)])


def greedy(errors: np.ndarray, nbytes: np.ndarray, budget: float,
           layer_weights: np.ndarray | None = None) -> np.ndarray:
    """(L,) index into the grid per layer: the least summed error found with the weighted
    mean of bytes at most ``budget``.

    A layer's step goes to its next sparser candidate that reads fewer bytes: candidates
    that read as many (centroids clipped at full width, say) are passed over rather than
    costing the step nothing saved, which would stall the layer above them.

    Args:
        errors, nbytes: (L, G), candidates in ascending density (bytes non-decreasing).
        budget: FFN bytes fraction to meet.
        layer_weights: (L,) each layer's share of the FFN's weights (default: equal).
    """
    n_layers, n_grid = errors.shape
    share = np.full(n_layers, 1.0 / n_layers) if layer_weights is None \
        else np.asarray(layer_weights, dtype=np.float64) / np.sum(layer_weights)
    floor = float(share @ nbytes.min(axis=1))
    if floor > budget + 1e-12:
        raise UserError(f"budget {budget} is below the sparsest candidate's "
                        f"{floor:.3f} FFN bytes; raise --budget")
    pick = np.full(n_layers, n_grid - 1)
    spent = float(share @ nbytes[np.arange(n_layers), pick])
    while spent > budget + 1e-12:
        best, best_to, best_cost = -1, -1, np.inf
        for layer in range(n_layers):
            g = pick[layer]
            cheaper = np.flatnonzero(nbytes[layer, :g] < nbytes[layer, g] - 1e-12)
            if len(cheaper) == 0:
                continue
            to = int(cheaper[-1])
            saved = share[layer] * (nbytes[layer, g] - nbytes[layer, to])
            cost = (errors[layer, to] - errors[layer, g]) / saved
            if cost < best_cost:
                best, best_to, best_cost = layer, to, cost
        if best < 0:
            raise ValueError(f"no finite step left: layer errors {errors.tolist()}")
        spent -= share[best] * (nbytes[best, pick[best]] - nbytes[best, best_to])
        pick[best] = best_to
    return pick
