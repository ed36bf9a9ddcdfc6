"""Prediction: per-layer maps from the FFN input to a cluster id or a neuron mask,
trained with Ray Train and used by evaluation and sparse execution.

``load_predictor(directory) -> PredictorSet`` is the public entry point.
"""

from __future__ import annotations

from actclust.predict.model import PredictorSet, load_predictor

__all__ = ["PredictorSet", "load_predictor"]
