"""Training-free activation sparsity of the FFN: TEAL, CATS and WINA as evaluation modes.

Each anchor zeroes inputs of the FFN's projections at a target sparsity ``s``. Attention
stays dense, as it does for our masks, and positions < ``dense_prefix`` are never
sparsified. The inputs, per layer:

- ``x``: the FFN input (the hidden state entering gate/up, or fc1), width d_model;
- ``h``: the input of the down projection (fc2), width d_ff;
- ``g``: the gate activation ``act(gate(x))`` of a gated FFN, width d_ff.

Methods (FFN-only forms of the published ones):

- ``teal`` (arXiv 2408.14690): ``x_i = 0`` where ``|x_i| <= t_x`` and ``h_i = 0`` where
  ``|h_i| <= t_h``; uniform ``s``, no block-wise allocation between the two inputs.
- ``cats`` (arXiv 2404.08763, gated FFNs only): ``g`` computed dense, neuron ``i`` kept iff
  ``|g_i| > t_g``; up and down run only for kept neurons, which is the same as setting the
  dropped neurons' gate pre-activation to 0 (``act(0) = 0`` for SiLU, GELU and ReLU).
- ``wina`` (arXiv 2505.19427, without its SVD rotation): per token, keep the top
  ``round((1 - s) n)`` of a projection's ``n`` inputs by ``|x_i| * ||W[:, i]||_2``: for ``x``
  with the gate's (ungated: fc1's) column norms, for ``h`` with the down projection's.

The thresholds ``t`` are per layer: the ``s``-quantile of ``|x|``, ``|h|`` or ``|g|`` over the
masked positions of calibration windows, in a dense forward pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import numpy as np
import torch

from actclust.capture.hooks import captured_modules
from actclust.config import ANCHORS
from actclust.devices import model_input, to_host
from actclust.evaluation.anchor_allocation import allocate_teal, even_sample, threshold
from actclust.errors import UserError
from actclust.io.models import (ffn_input_modules, ffn_projections, input_column_norms,
                                residual_energy)

INPUTS = {"teal": ("x", "h"), "cats": ("g",), "wina": ("x", "h")}
CALIBRATED = ("teal", "cats")  # wina keeps a fixed count per token: no threshold


@dataclasses.dataclass(frozen=True)
class AnchorSpec:
    """One anchor operating point: method, target sparsity, per-layer thresholds per input
    (empty for wina)."""

    method: str
    sparsity: float
    thresholds: dict = dataclasses.field(default_factory=dict)

    @property
    def inputs(self) -> tuple:
        return INPUTS[self.method]


def check_anchor(method: str, sparsity: float) -> None:
    """Refuse an unknown method or a sparsity outside (0, 1), in one line."""
    if method not in ANCHORS:
        raise UserError(f"unknown anchor {method!r}; choose one of {', '.join(ANCHORS)}")
    if not 0.0 < sparsity < 1.0:
        raise UserError(f"anchor_sparsity must be in (0, 1), got {sparsity}")


def check_model(method: str, projections: list, model_name: str) -> None:
    if method == "cats" and projections[0].gate is None:
        raise UserError(f"cats thresholds the gate activation, and {model_name} has no gated "
                        "FFN; use --anchor teal or --anchor wina")


def kept_count(width: int, sparsity: float) -> int:
    """Inputs wina keeps per token: round((1 - s) n)."""
    return int(round((1.0 - sparsity) * width))


def _input_modules(model, projections: list) -> dict:
    """Input name -> (one module per layer, whether its hook reads the module's input)."""
    return {"x": (ffn_input_modules(model), True),
            "h": ([p.down for p in projections], True),
            "g": ([p.gate for p in projections], False)}


class Sparsifier:
    """Applies one anchor to a model's FFNs, counting kept inputs at masked positions.

    ``stats`` rows are layers; column 0 counts masked tokens, column ``1 + 2j`` the kept
    entries of input ``spec.inputs[j]`` and ``2 + 2j`` all its entries, at masked positions.
    """

    def __init__(self, model, spec: AnchorSpec, dense_prefix: int, model_name: str = "model"):
        self.model = model
        self.spec = spec
        self.dense_prefix = dense_prefix
        self.projections = ffn_projections(model)
        check_model(spec.method, self.projections, model_name)
        self.modules = _input_modules(model, self.projections)
        self.norms: dict = {}
        if spec.method == "wina":
            self.norms = {"x": [input_column_norms(p.gate if p.gate is not None else p.up)
                                for p in self.projections],
                          "h": [input_column_norms(p.down) for p in self.projections]}

    def empty_stats(self) -> np.ndarray:
        return np.zeros((len(self.projections), 1 + 2 * len(self.spec.inputs)),
                        dtype=np.float64)

    @contextlib.contextmanager
    def applied(self, shape: tuple, stats: np.ndarray) -> Iterator[None]:
        """Sparsify every layer during the forward passes of (windows, seq_len) ``shape``
        inside this context; the hooks are always removed."""
        handles = []
        for column, name in zip(range(1, 2 * len(self.spec.inputs), 2), self.spec.inputs):
            modules, reads_input = self.modules[name]
            for layer, module in enumerate(modules):
                def apply(a, layer=layer, name=name, column=column):
                    keep = self._keep(name, layer, a)
                    self._count(keep, shape, stats, layer, column)
                    return a * keep.to(a.dtype)
                if reads_input:
                    handles.append(module.register_forward_pre_hook(
                        lambda mod, args, apply=apply: (apply(args[0]),) + tuple(args[1:])))
                else:
                    handles.append(module.register_forward_hook(
                        lambda mod, args, out, apply=apply: apply(out)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _keep(self, name: str, layer: int, a):
        """Bool mask of the entries of ``a`` the method keeps (every position)."""
        if self.spec.method == "wina":
            norms = self.norms[name][layer].to(a.device)
            scores = a.abs().float() * norms
            top = scores.topk(kept_count(a.shape[-1], self.spec.sparsity), dim=-1).indices
            return torch.zeros(a.shape, dtype=torch.bool, device=a.device).scatter_(-1, top, True)
        threshold = self.spec.thresholds[name][layer]
        if name == "g":
            return self.projections[layer].act(a).abs() > threshold
        return a.abs() > threshold

    def _count(self, keep, shape: tuple, stats: np.ndarray, layer: int, column: int) -> None:
        """Set the dense prefix of ``keep`` to kept (in place); count the masked positions."""
        windows, length = shape
        keep3 = keep.view(windows, length, keep.shape[-1])  # OPT hands its FFN (W*T, d)
        keep3[:, :self.dense_prefix] = True
        body = keep3[:, self.dense_prefix:]
        stats[layer, column] += float(body.sum(dtype=torch.float64))
        stats[layer, column + 1] += body.numel()
        if column == 1:
            stats[layer, 0] += windows * (length - self.dense_prefix)


def calibrate(model, ids: np.ndarray, method: str, sparsity: float, dense_prefix: int,
              batch_windows: int = 4, model_name: str = "model",
              allocation: str = "uniform") -> dict:
    """Per-layer thresholds of each input of ``method`` from a dense pass over ``ids`` (W, T).

    Returns ``thresholds`` (input -> per-layer quantile of ``|v|`` at masked positions, at
    ``sparsity``, or with ``allocation`` greedy (teal) at each layer's own sparsity, under
    the same FFN-byte budget: :mod:`actclust.evaluation.anchor_allocation`),
    ``calibration_sparsity`` (input -> per-layer share of ``|v| <= t`` on those tokens),
    ``calibration_tokens`` and ``allocation`` (the greedy search's record, or None).
    """
    projections = ffn_projections(model)
    check_model(method, projections, model_name)
    tokens = int(len(ids) * (ids.shape[1] - dense_prefix))
    if method not in CALIBRATED:
        return {"thresholds": {}, "calibration_sparsity": {}, "calibration_tokens": tokens,
                "allocation": None}
    greedy = allocation == "greedy"
    if greedy and method != "teal":
        raise UserError(f"--anchor-allocation greedy applies to teal, not {method}")
    modules = _input_modules(model, projections)
    values: dict = {name: [[] for _ in projections] for name in INPUTS[method]}
    raw_x: list = [[] for _ in projections]  # greedy: FFN inputs at masked positions
    with contextlib.ExitStack() as stack, torch.inference_mode():
        acts = {name: stack.enter_context(captured_modules(*modules[name])) for name in values}
        for start in range(0, len(ids), batch_windows):
            batch = ids[start:start + batch_windows]
            model(model_input(model, batch))
            for name, per_layer in acts.items():
                for layer, a in enumerate(per_layer):
                    if name == "g":
                        a = projections[layer].act(a)
                    body = a.reshape(len(batch), batch.shape[1], a.shape[-1])[:, dense_prefix:]
                    values[name][layer].append(to_host(body.abs().reshape(-1).float()))
                    if greedy and name == "x":
                        raw_x[layer].append(body.reshape(-1, a.shape[-1]).float().cpu())
    per_layer_sparsity, record = [sparsity] * len(projections), None
    if greedy:
        samples = [even_sample(torch.cat(chunks)) for chunks in raw_x]
        energy = residual_energy(model, ids, dense_prefix, batch_windows)
        per_layer_sparsity, record = allocate_teal(projections, samples, energy, sparsity)
    thresholds: dict = {}
    realized: dict = {}
    for name, per_layer in values.items():
        flat = [np.concatenate(chunks) for chunks in per_layer]
        thresholds[name] = [threshold(v, s) for v, s in zip(flat, per_layer_sparsity)]
        realized[name] = [float(np.mean(v <= t)) for v, t in zip(flat, thresholds[name])]
    return {"thresholds": thresholds, "calibration_sparsity": realized,
            "calibration_tokens": tokens, "allocation": record}
