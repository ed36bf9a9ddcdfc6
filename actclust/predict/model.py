"""The predictor: per layer a low-rank map from the FFN input to K cluster logits
(kind ``cluster``) or to one logit per neuron (kind ``neuron``), and its files.

    d_model --down--> rank --GELU--> --up--> K or width     (one map per layer)

All layers' maps live in three stacked tensors so one einsum runs every layer.
Files (:mod:`actclust.io.predictor_store`): ``predictor.json`` (the commit record,
written last) and ``predictor.safetensors`` (``down`` (L, d, R), ``up`` (L, R, O), ``bias`` (L, O), and
for kind ``neuron`` ``threshold`` (L,)).
"""

from __future__ import annotations

from actclust.errors import UserError
from actclust.io import predictor_store
from actclust.io.predictor_store import KINDS, META, WEIGHTS, read_meta, save  # noqa: F401
DEFAULT_BUDGET = 0.02  # of the FFN's parameters, per layer


def params_per_layer(d_model: int, rank: int, out: int) -> int:
    return d_model * rank + rank * out + out


def default_rank(d_model: int, out: int, ffn_params: int, budget: float = DEFAULT_BUDGET) -> int:
    """The largest rank whose map fits ``budget`` of the FFN's parameters."""
    rank = int((budget * ffn_params - out) // (d_model + out))
    if rank < 1:
        raise UserError(f"no rank fits {budget:.0%} of this FFN's {ffn_params} parameters with "
                        f"{out} outputs; pass --rank R explicitly")
    return rank


def make_net(n_layers: int, d_model: int, rank: int, out: int, seed: int = 0):
    import torch

    class LowRankMaps(torch.nn.Module):
        """(N, L, d) FFN inputs -> (N, L, out) logits, every layer in one einsum pair."""

        def __init__(self):
            super().__init__()
            gen = torch.Generator().manual_seed(seed)
            self.down = torch.nn.Parameter(
                torch.randn(n_layers, d_model, rank, generator=gen) / d_model ** 0.5)
            self.up = torch.nn.Parameter(
                torch.randn(n_layers, rank, out, generator=gen) / rank ** 0.5)
            self.bias = torch.nn.Parameter(torch.zeros(n_layers, out))

        def forward(self, h):
            z = torch.nn.functional.gelu(torch.einsum("nld,ldr->nlr", h, self.down))
            return torch.einsum("nlr,lro->nlo", z, self.up) + self.bias

    return LowRankMaps()


class PredictorSet:
    """A trained predictor, per layer; every method works on the device ``h`` is on.

    ``h`` is the FFN input of ``layer`` (a model layer index), shaped (..., d_model).
    """

    def __init__(self, meta: dict, tensors: dict):
        self.meta = meta
        self.kind: str = meta["kind"]
        self.k: int = meta["k"]
        self.rank: int = meta["rank"]
        self.width: int = meta["width"]
        self.layers: list[int] = list(meta["layers"])
        self._slot = {layer: i for i, layer in enumerate(self.layers)}
        self._tensors = tensors  # name -> CPU tensor
        self._on: dict = {}  # device -> moved tensors

    def _weights(self, layer: int, device):
        if layer not in self._slot:
            raise KeyError(f"the predictor has no layer {layer}; it covers {self.layers}")
        key = str(device)
        if key not in self._on:
            self._on[key] = {n: t.to(device) for n, t in self._tensors.items()}
        w = self._on[key]
        i = self._slot[layer]
        return w["down"][i], w["up"][i], w["bias"][i], (w["threshold"][i] if "threshold" in w
                                                        else None)

    def logits(self, layer: int, h):
        """(..., d_model) -> (..., K) cluster logits or (..., width) neuron logits."""
        import torch

        down, up, bias, _ = self._weights(layer, h.device)
        z = torch.nn.functional.gelu(h.to(down.dtype) @ down)
        return z @ up + bias

    def cluster_ids(self, layer: int, h):
        """Top-1 predicted cluster id, (...,) int64."""
        self._need("cluster")
        return self.logits(layer, h).argmax(dim=-1)

    def top_clusters(self, layer: int, h, m: int):
        """The ``m`` most likely cluster ids, (..., m) int64, most likely first."""
        self._need("cluster")
        if not 1 <= m <= self.k:
            raise ValueError(f"m must be in [1, {self.k}], got {m}")
        return self.logits(layer, h).topk(m, dim=-1).indices

    def neuron_mask(self, layer: int, h, select: str = "threshold"):
        """Neuron prediction, (..., width) bool: logits above the layer's threshold, or with
        ``select="topk"`` the :meth:`neuron_budget` highest logits of each token."""
        import torch

        self._need("neuron")
        _, _, _, threshold = self._weights(layer, h.device)
        logits = self.logits(layer, h)
        if select == "threshold":
            return logits > threshold
        if select != "topk":
            raise ValueError(f"select must be threshold or topk, got {select!r}")
        keep = torch.zeros_like(logits, dtype=torch.bool)
        return keep.scatter_(-1, logits.topk(self.neuron_budget(layer), dim=-1).indices, True)

    def neuron_budget(self, layer: int) -> int:
        """Neurons kept per token under ``topk``: the clustering's density at this layer on
        the training tokens (predictor.json's per-layer ``cluster_density``) times width."""
        density = self.meta["per_layer"][self._slot[layer]]["cluster_density"]
        return int(round(density * self.width))

    def _need(self, kind: str) -> None:
        if self.kind != kind:
            raise ValueError(f"this is a {self.kind} predictor; that call needs kind {kind}")


def load_predictor(directory) -> PredictorSet:
    """Read a predictor directory (local path or object-store URI) written by
    ``actclust train-predictor``."""
    meta = predictor_store.read_meta(directory)
    tensors = predictor_store.read_tensors(directory)
    if meta["kind"] == "neuron" and "threshold" not in tensors:
        raise UserError(f"{directory}/{WEIGHTS} lacks the neuron thresholds")
    return PredictorSet(meta, tensors)
