"""FFN weights laid out once per layer for computing a subset of neurons.

Neuron-major layout: ``w_in`` (d_ff, r, d_model) holds neuron i's input rows
(gate and up for a gated FFN, r = 2; fc1 for a ReLU FFN, r = 1) and ``w_out``
(d_ff, d_model) its output-projection column, so one neuron's weights are
contiguous and a set of neurons is one ``index_select`` away.

At batch 1 the FFN is memory-bound: what reaches 1/density is reading one
contiguous block per projection. A *slab* is that block for one centroid,
gathered once: ``in_w`` (n * r, d_model) and ``out_w`` (n, d_model) with n the
centroid's neuron count. Slabs cost n / d_ff of the FFN's weights each, so K of
them cost about K * density times the FFN; the layout keeps slabs for as many
centroids as a byte budget allows (largest clusters first when their sizes are
known) and gathers the others from the neuron-major weights on each call.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from actclust.config import LAYOUTS
from actclust.errors import UserError
from actclust.io.models import decoder_layers, ffn_sites

GATED = "gated"
RELU = "relu"


@dataclasses.dataclass(frozen=True)
class FFNParts:
    """Where a decoder layer's FFN lives and how to swap it.

    ``ffn_path`` (relative to ``layer``) receives the sparse module, whose input is the
    FFN input h; ``identity_paths`` become ``nn.Identity`` (the ReLU family, where the
    FFN is not one module: fc1 -> activation -> fc2 inline in the layer).
    """

    family: str
    layer: Any
    ffn_path: str
    identity_paths: tuple
    inputs: tuple  # (gate, up) or (fc1,): nn.Linear modules
    output: Any  # down or fc2: nn.Linear
    act: Any  # the activation module the model itself uses


def ffn_parts(model) -> list[FFNParts]:
    """The FFN of every decoder layer, found through the FFN-site helpers (io.models)."""
    layers = decoder_layers(model)
    downs = ffn_sites(model, "intermediate")
    try:
        gates, ups = ffn_sites(model, "gate"), ffn_sites(model, "up")
    except UserError:
        gates = ups = None
    parts = []
    for layer, down in enumerate(downs):
        if type(down).__name__ != "Linear":
            raise UserError(_unsupported(model, f"its FFN output projection is a "
                                                f"{type(down).__name__}, not a Linear"))
        parent_path, down_name = _parent_path(layers[layer], down)
        parent = _get(layers[layer], parent_path)
        if gates is not None:
            act = getattr(parent, "act_fn", None)
            if act is None or not parent_path:
                raise UserError(_unsupported(model, "no act_fn beside the gated FFN's projections"))
            parts.append(FFNParts(GATED, layers[layer], parent_path, (), (gates[layer], ups[layer]),
                                  down, act))
            continue
        act_name, act = _relu_child(parent)
        fc1_name = _input_child(parent, down)
        if act is None or fc1_name is None:
            raise UserError(_unsupported(model, "its FFN is neither gated (gate/up/down) nor "
                                                "fc1 -> ReLU -> fc2"))
        prefix = parent_path + "." if parent_path else ""
        parts.append(FFNParts(RELU, layers[layer], prefix + fc1_name,
                              (prefix + act_name, prefix + down_name),
                              (getattr(parent, fc1_name),), down, act))
    return parts


def _unsupported(model, why: str) -> str:
    arch = ",".join(getattr(model.config, "architectures", None) or [type(model).__name__])
    return (f"the sparse FFN does not support {arch}: {why}; it supports gated FFNs "
            "(Llama/Mistral/Qwen/SmolLM) and ReLU FFNs (OPT)")


def _parent_path(layer, module) -> tuple[str, str]:
    for name, child in layer.named_modules():
        if child is module:
            parent, _, leaf = name.rpartition(".")
            return parent, leaf
    raise UserError("the FFN output projection is not inside its decoder layer")


def _relu_child(parent):
    import torch

    for name, child in parent.named_children():
        if isinstance(child, torch.nn.ReLU):
            return name, child
    return None, None


def _input_child(parent, down) -> Optional[str]:
    """The Linear beside ``down`` that maps d_model to d_ff (OPT's fc1)."""
    shape = tuple(reversed(down.weight.shape))
    for name, child in parent.named_children():
        if child is not down and type(child).__name__ == "Linear" and \
                tuple(child.weight.shape) == shape:
            return name
    return None


def _get(obj, dotted: str):
    for part in filter(None, dotted.split(".")):
        obj = getattr(obj, part)
    return obj


@dataclasses.dataclass(frozen=True)
class FFNWeights:
    """One FFN's weights, neuron-major (see the module docstring)."""

    family: str
    w_in: Any  # (d_ff, r, d_model)
    b_in: Any  # (d_ff, r) or None
    w_out: Any  # (d_ff, d_model)
    b_out: Any  # (d_model,) or None

    @property
    def d_ff(self) -> int:
        return int(self.w_in.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.w_in.shape[2])

    @property
    def r(self) -> int:
        return int(self.w_in.shape[1])


def neuron_major(parts: FFNParts) -> FFNWeights:
    """Copy the FFN's weights into the neuron-major layout (same dtype and device)."""
    import torch

    with torch.no_grad():
        w_in = torch.stack([m.weight for m in parts.inputs], dim=1).contiguous()
        biases = [m.bias for m in parts.inputs]
        b_in = None if any(b is None for b in biases) else torch.stack(biases, dim=1).contiguous()
        w_out = parts.output.weight.t().contiguous()
        b_out = None if parts.output.bias is None else parts.output.bias.detach().clone()
    return FFNWeights(parts.family, w_in, b_in, w_out, b_out)


@dataclasses.dataclass(frozen=True)
class Block:
    """The weights of one set of neurons: ``in_w`` (n * r, d_model), ``out_w`` (n, d_model).

    A gathered block has ``out_w`` None and ``index`` (n,): its output projection reads
    the neuron-major ``w_out`` rows in place (``embedding_bag``) instead of copying them.
    """

    in_w: Any
    in_b: Any  # (n * r,) or None
    out_w: Any
    index: Any = None


class SparseLayout:
    """Neuron-major weights of one layer, its centroids, and per-centroid slabs.

    ``masks``: (K, d_ff) bool tensor, centroid j's neurons. ``layout``: ``slab`` (a slab
    for every centroid), ``gather`` (none: gather on every call) or ``auto`` (slabs
    while their bytes fit ``slab_budget_bytes``, in ``priority`` order: cluster ids,
    most used first; default cluster order).
    """

    def __init__(self, weights: FFNWeights, masks, layout: str = "auto",
                 slab_budget_bytes: float = float("inf"), priority=None):
        import torch

        if layout not in LAYOUTS:
            raise UserError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
        if masks.ndim != 2 or masks.shape[1] != weights.d_ff:
            raise UserError(f"centroids are {tuple(masks.shape)}, but the FFN has d_ff "
                            f"{weights.d_ff}; use centroids fitted on this model")
        self.weights = weights
        self.masks = masks.to(device=weights.w_in.device, dtype=torch.bool)
        # 0/1 in the weights' dtype, for the masked dense path.
        self.mask_values = self.masks.to(weights.w_in.dtype)
        self.index = [torch.nonzero(m).flatten() for m in self.masks]
        self.counts = self.masks.sum(dim=1).tolist()
        self.slabs: dict[int, Block] = {}
        order = list(priority) if priority is not None else range(len(self.index))
        budget = {"slab": float("inf"), "gather": 0.0, "auto": slab_budget_bytes}[layout]
        used = 0.0
        for cluster in order:
            size = self.slab_bytes(int(cluster))
            if used + size > budget:
                if layout == "auto":
                    continue
                break
            used += size
            self.slabs[int(cluster)] = self.gather(int(cluster))
        self.slab_bytes_used = used
        self._buffers = None  # gather scratch, allocated on first use

    @property
    def k(self) -> int:
        return len(self.index)

    def slab_bytes(self, cluster: int) -> float:
        w = self.weights
        return float(self.counts[cluster] * (w.r + 1) * w.d_model * w.w_in.element_size())

    def gather(self, cluster: int) -> Block:
        """The centroid's neurons copied out of the neuron-major weights (a new slab)."""
        w, idx = self.weights, self.index[cluster]
        in_w = w.w_in.index_select(0, idx).reshape(-1, w.d_model)
        in_b = None if w.b_in is None else w.b_in.index_select(0, idx).reshape(-1)
        return Block(in_w, in_b, w.w_out.index_select(0, idx))

    def block(self, cluster: int) -> Block:
        """The centroid's slab, or its input rows gathered into a reused buffer.

        The buffer is overwritten by the next call: use the block before asking again.
        A fresh allocation per call would page-fault its way through the copy.
        """
        import torch

        slab = self.slabs.get(cluster)
        if slab is not None:
            return slab
        w, idx = self.weights, self.index[cluster]
        if self._buffers is None:
            n = max(self.counts, default=0)
            self._buffers = (w.w_in.new_empty((n, w.r, w.d_model)),
                             w.w_out.new_empty((n, w.d_model)))
        in_w = self._buffers[0][:len(idx)]
        torch.index_select(w.w_in, 0, idx, out=in_w)
        in_b = None if w.b_in is None else w.b_in.index_select(0, idx).reshape(-1)
        if w.w_out.device.type == "cpu":
            # embedding_bag reads the output rows in place on CPU; on CUDA it sums one bag
            # sequentially, far slower than a copy and a matmul.
            return Block(in_w.view(-1, w.d_model), in_b, None, idx)
        out_w = self._buffers[1][:len(idx)]
        torch.index_select(w.w_out, 0, idx, out=out_w)
        return Block(in_w.view(-1, w.d_model), in_b, out_w)

