"""The sparse FFN module and the context manager that swaps it into a model.

``SparseFFN(h)`` asks ``choose(layer, h)`` for a cluster id per token and
computes, for each token, only the neurons of that cluster's centroid c:

    gated: y = W_down[:, c] (act(W_gate[c] h) * (W_up[c] h))
    ReLU:  y = W_fc2[:, c] relu(W_fc1[c] h + b_fc1[c]) + b_fc2

which equals the dense FFN with its activation masked, ``a * c``, up to float
rounding. With a threshold ``tau`` (mask mode ``and``: cluster, then threshold) only the
centroid's neurons with ``|a| > tau`` go on to the output projection, ``a * (c AND m)``:
gate/up are read at the centroid's rows, the output projection only at the kept ones.
One token (batch-1 decode) reads one block per projection. On CPU,
several tokens are grouped by cluster, one pair of matmuls per group, when that
reads no more weight bytes than the dense FFN (few clusters); otherwise, and
always on a GPU, they take the masked dense path, one matmul per projection.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Callable, Iterator

import torch

from actclust.sparse.layout import GATED, SparseLayout, ffn_parts

Chooser = Callable[[int, "object"], "object"]  # (layer, h (..., d_model)) -> LongTensor (...)
PATHS = ("auto", "sparse", "dense")
# Tokens per cluster above which grouping would pay despite reading more weight bytes
# than the dense FFN. None: never. benchmarks/sparse_ffn.py (c) measured grouping 4x
# slower than the masked dense path at 16 tokens per group (256 tokens, K = 16).
MIN_GROUP_TOKENS = None


class SparseFFN(torch.nn.Module):
    """Replaces one layer's FFN: input h (..., d_model), output (..., d_model).

    ``path``: ``auto`` (grouped or masked dense by the rule above), ``sparse`` (always
    grouped) or ``dense`` (always the masked dense path, the reference).
    ``min_group_tokens``: mean tokens per cluster above which grouping is used even when
    the groups together read more weight bytes than the dense FFN (None: never).
    ``tau``: the layer's mask threshold for mask mode ``and`` (None: mode ``replace``).
    """

    def __init__(self, layout: SparseLayout, layer: int, choose: Chooser, act,
                 path: str = "auto", min_group_tokens: int | None = MIN_GROUP_TOKENS,
                 tau: float | None = None):
        super().__init__()
        if path not in PATHS:
            raise ValueError(f"unknown path {path!r}")
        self.layout = layout
        self.layer = layer
        self.choose = choose
        self.act = act
        self.path = path
        self.min_group_tokens = min_group_tokens
        self.tau = tau
        self.calls: collections.Counter = collections.Counter()  # path taken -> count

    def forward(self, h):
        ids = self.choose(self.layer, h)
        return self.apply_clusters(h, ids)

    def apply_clusters(self, h, ids):
        """The FFN of h (..., d_model) with token t restricted to centroid ids[t]."""
        lead = h.shape[:-1]
        x = h.reshape(-1, h.shape[-1])
        ids = ids.reshape(-1).to(device=x.device, dtype=torch.long)
        if ids.numel() != x.shape[0]:
            raise ValueError(f"choose gave {ids.numel()} cluster ids for {x.shape[0]} tokens")
        if x.shape[0] == 1 and self.path != "dense":
            self.calls["single"] += 1
            y = self._block(x, int(ids[0]))
        else:
            clusters, counts = torch.unique(ids, return_counts=True)
            if self._grouping_pays(clusters, x.shape[0]):
                self.calls["grouped"] += 1
                y = self._grouped(x, ids, clusters.tolist(), counts.tolist())
            else:
                self.calls["dense"] += 1
                y = self._masked_dense(x, ids)
        return y.reshape(*lead, y.shape[-1])

    def _grouping_pays(self, clusters, tokens: int) -> bool:
        if self.path != "auto":
            return self.path == "sparse"
        if self.layout.weights.w_in.device.type != "cpu":
            return False  # measured on a GPU: a launch per group never beat one masked matmul
        neurons = sum(self.layout.counts[c] for c in clusters.tolist())
        if neurons <= self.layout.weights.d_ff:
            return True
        return self.min_group_tokens is not None and \
            tokens >= self.min_group_tokens * len(clusters)

    def _activation(self, z):
        """z (N, n * r) -> a (N, n)."""
        r = self.layout.weights.r
        z = z.view(z.shape[0], -1, r)
        if self.layout.weights.family == GATED:
            return self.act(z[..., 0]) * z[..., 1]
        return self.act(z[..., 0])

    def _thresholded(self, a):
        """a with the entries at or under tau zeroed (mask mode and); a as is otherwise."""
        return a if self.tau is None else a * (a.abs() > self.tau)

    def _output_bias(self, y):
        b = self.layout.weights.b_out
        return y if b is None else y + b

    def _block(self, x, cluster: int):
        import torch.nn.functional as F

        block = self.layout.block(cluster)
        a = self._activation(F.linear(x, block.in_w, block.in_b))
        index = block.index
        if self.tau is not None and x.shape[0] == 1:
            # One token: read only the kept neurons' output rows.
            kept = torch.nonzero(a[0].abs() > self.tau).reshape(-1)
            if block.out_w is not None:
                return self._output_bias(a[:, kept] @ block.out_w.index_select(0, kept))
            a, index = a[:, kept], index.index_select(0, kept)
        else:
            a = self._thresholded(a)
            if block.out_w is not None:
                return self._output_bias(a @ block.out_w)
        if index.numel() == 0:
            return self._output_bias(x.new_zeros(x.shape[0], self.layout.weights.d_model))
        # Sum of a_i * w_out[i] over the gathered neurons, reading the rows in place.
        bags = index.expand(x.shape[0], -1)
        y = F.embedding_bag(bags, self.layout.weights.w_out, per_sample_weights=a.contiguous(),
                            mode="sum")
        return self._output_bias(y)

    def _grouped(self, x, ids, clusters: list, counts: list):
        order = torch.argsort(ids, stable=True)
        y = x.new_empty(x.shape[0], self.layout.weights.d_model)
        start = 0
        for cluster, count in zip(clusters, counts):
            rows = order[start:start + count]
            start += count
            y.index_copy_(0, rows, self._block(x.index_select(0, rows), cluster))
        return y

    def _masked_dense(self, x, ids):
        import torch.nn.functional as F

        w = self.layout.weights
        b_in = None if w.b_in is None else w.b_in.reshape(-1)
        a = self._activation(F.linear(x, w.w_in.reshape(-1, w.d_model), b_in))
        a = self._thresholded(a * self.layout.mask_values.index_select(0, ids))
        return self._output_bias(a @ w.w_out)


@contextlib.contextmanager
def sparse_ffns(model, layouts: dict, choose: Chooser, path: str = "auto",
                min_group_tokens: int | None = MIN_GROUP_TOKENS,
                thresholds: dict | None = None) -> Iterator[dict]:
    """Swap the FFN of every layer in ``layouts`` (layer -> SparseLayout) for a SparseFFN;
    ``thresholds`` (layer -> tau) gives mask mode ``and``, None mode ``replace``.

    Yields {layer: SparseFFN}. The original modules are always put back.
    """
    parts = ffn_parts(model)
    swapped: list = []  # (parent, name, original module)
    modules = {}
    try:
        for layer, layout in sorted(layouts.items()):
            part = parts[layer]
            tau = None if thresholds is None else float(thresholds[layer])
            module = SparseFFN(layout, layer, choose, part.act, path, min_group_tokens, tau)
            modules[layer] = module
            for dotted, new in [(part.ffn_path, module)] + \
                    [(p, torch.nn.Identity()) for p in part.identity_paths]:
                parent_path, _, name = dotted.rpartition(".")
                parent = part.layer.get_submodule(parent_path) if parent_path else part.layer
                swapped.append((parent, name, getattr(parent, name)))
                setattr(parent, name, new)
        yield modules
    finally:
        for parent, name, original in reversed(swapped):
            setattr(parent, name, original)
