"""Prediction: per-layer maps from the FFN input to a cluster id or a neuron mask,
trained with Ray Train and used by evaluation and sparse execution.

``load_predictor(directory) -> PredictorSet`` is the public entry point.
"""

from __future__ import annotations


def load_predictor(directory):
    """Load a predictor directory (see :class:`actclust.predict.model.PredictorSet`)."""
    from actclust.predict.model import load_predictor as _load

    return _load(directory)


def __getattr__(name):
    if name == "PredictorSet":
        from actclust.predict.model import PredictorSet

        return PredictorSet
    raise AttributeError(name)
