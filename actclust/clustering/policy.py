"""Clustering policy: the assignment rule and iteration cap a clustering config fits with.

The centroid store records both in cluster.json; evaluation assigns masks by the rule.
"""

from __future__ import annotations

from actclust.kernels.rules import AssignRule


def assignment_rule(cfg) -> AssignRule:
    """The assignment rule that evaluation must use for centroids fitted with ``cfg``.

    hamming-kmeans fits its own theta or density objective. The baselines' centroids
    are binarised at 0.5 (BRB) or at their own quantile (activation-aware) and are
    assigned by Hamming distance, or by highest overlap with ``--density``.
    """
    if cfg.density is not None:
        return AssignRule.from_args(density=cfg.density)
    if cfg.algorithm == "hamming-kmeans" and not cfg.pool_layers:
        return AssignRule.from_args(theta=cfg.theta)
    return AssignRule.hamming()


def fit_policy(cfg) -> dict:
    """cluster.json's ``rule`` (as JSON) and ``max_iter`` of a fit made with ``cfg``: every
    algorithm runs under the same iteration cap (BRB-KMeans to its own tolerance within it)."""
    return {"rule": assignment_rule(cfg).to_json(), "max_iter": cfg.max_iter}
