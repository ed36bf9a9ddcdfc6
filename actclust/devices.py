"""Where tensors live: the one place that moves models, inputs and results between
host and accelerator.

An actor given a GPU puts its model there (:func:`place_model`); model inputs
go to the model's device (:func:`model_input`); activations and results come
back to the host explicitly (:func:`to_host`) before numpy sees them.
"""

from __future__ import annotations

import numpy as np


def actor_device(use_gpu: bool) -> str:
    return "cuda" if use_gpu else "cpu"


def place_model(model, use_gpu: bool) -> str:
    """Move ``model`` to this actor's device; returns the device's name."""
    device = actor_device(use_gpu)
    if use_gpu:
        model.to(device)
    return device


def model_device(model):
    """The device of ``model``'s parameters."""
    return next(model.parameters()).device


def model_input(model, ids: np.ndarray):
    """Token ids (W, T) as a tensor on ``model``'s device."""
    import torch

    return torch.tensor(ids, device=model_device(model))


def to_host(tensor) -> np.ndarray:
    """A tensor on any device as a numpy array (copied to the host if needed)."""
    return tensor.detach().cpu().numpy()
