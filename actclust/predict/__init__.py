"""Prediction: per-layer maps from the FFN input to a cluster id or a neuron mask,
trained with Ray Train and used by evaluation and sparse execution.

``load_predictor(directory) -> PredictorSet`` is the public entry point.
"""

from __future__ import annotations

from actclust.predict.model import PredictorSet  # noqa: F401
from actclust.predict.model import load_predictor as _load


def load_predictor(directory):
    """Load a predictor directory (see :class:`actclust.predict.model.PredictorSet`)."""
    return _load(directory)
