"""The evaluation actor: one forward pass per mode over a chunk of held-out windows.

- ``dense``: no mask;
- ``oracle``: every layer's `a` times its own true mask ``|a| > tau_l``;
- ``cluster``: `a` times the centroid nearest (Hamming) to its true mask (mask mode
  ``replace``), or times both (``and``, the paper artifact's metric); the clustering
  metrics are measured here, on the activation each mask is applied to;
- ``random``: `a` times a random mask with exactly as many bits, per layer and chunk,
  as the centroids used in the cluster pass (so ``random_density == density``);
- ``predicted``: the predictor's mask (:mod:`actclust.predict.evaluation`);
- ``anchor``: a training-free method's own sparsity (:mod:`actclust.evaluation.anchors`).

With several sites (format version 2) every (site, layer) is masked in the same forward
pass, each by its own threshold and centroids; a *slot* is one masked (site, layer),
site-major (:func:`actclust.io.centroid_store.slots`).

Positions ``< dense_prefix`` of every window are never masked: the first token is an
attention sink whose activations are two orders of magnitude above the rest. Masks are
computed on the fly from the activation that reaches each layer in that same pass (as
the paper's artifact does).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from actclust.evaluation.anchors import AnchorSpec, Sparsifier, calibrate
from actclust.evaluation.metrics import F, MODES, empty_stats, window_nll
from actclust.io import centroid_store
from actclust.io.centroid_store import load_centroids, slots
from actclust.runtime.actors import FaultHooks


@dataclasses.dataclass(frozen=True)
class EvaluatorSpec:
    """What an evaluation actor is built from; travels from the driver to the actors.

    ``meta`` (cluster.json's model, sites, layers, thresholds, d_ff) stands in for the
    centroids when only centroid-free modes (dense, oracle, anchor) are evaluated.
    """

    model: str
    centroids_dir: str | None = None
    num_cpus: float = 1
    seed: int = 0
    trust_remote_code: bool = False
    use_gpu: bool = False
    predictor_dir: str | None = None
    top_m: int = 1
    dense_prefix: int = 1
    mask_mode: str = "and"
    meta: dict | None = None
    neuron_select: str = "threshold"
    anchor: AnchorSpec | None = None


# What an evaluation actor loads once; the rest of its spec changes from trial to trial.
MODEL_FIELDS = ("model", "num_cpus", "trust_remote_code", "use_gpu")


class Evaluator:
    """Loads the model once; evaluates one chunk of windows per call.

    The centroids, predictor and anchor of ``spec`` are loaded with the model. A call
    that brings another spec (a run's next trial, on an actor that lives for the run)
    loads that spec's instead; the model stays.
    """

    def __init__(self, spec: EvaluatorSpec, faults: FaultHooks | None = None):
        from actclust.devices import place_model
        from actclust.io.models import ffn_projections, load_model, matrix_weights
        from actclust.runtime.raycluster import set_threads

        set_threads(spec.num_cpus)
        self.model = load_model(spec.model, trust_remote_code=spec.trust_remote_code).model
        self.device = place_model(self.model, spec.use_gpu)
        self.faults = faults or FaultHooks()
        self.ffn_weights = matrix_weights(ffn_projections(self.model))
        self.shape = (0, 0)  # (windows, seq_len) of the chunk in flight
        self.spec = None
        self._load_trial(spec)

    def _load_trial(self, spec: EvaluatorSpec) -> None:
        """Everything of ``spec`` beyond the model: slots, centroids, predictor, anchor."""
        from actclust import kernels

        if self.spec is not None and any(getattr(spec, f) != getattr(self.spec, f)
                                         for f in MODEL_FIELDS):
            raise ValueError("an evaluation actor keeps its model; start another for "
                             f"{spec.model!r}")
        meta, centroids = spec.meta, None
        if spec.centroids_dir is not None:
            meta, centroids = load_centroids(spec.centroids_dir)
        masked = slots(meta)
        self.sites = centroid_store.sites_of(meta)
        # (site, model layer) -> its slot among the clustered ones (others stay unmasked).
        self.slot = {(site, layer): i for i, (site, layer, _, _) in enumerate(masked)}
        self.thresholds = [tau for _, _, _, tau in masked]
        self.seed = spec.seed
        self.dense_prefix = spec.dense_prefix
        self.mask_mode = spec.mask_mode
        # Unpacked once onto the model's device, where the masks are made; masks are
        # assigned by the rule the centroids were fitted with (absent: Hamming).
        self.centroids = [kernels.device_centroids(c, width, self.device, meta.get("rule"))
                          for c, (_, _, width, _) in zip(centroids or [], masked)]
        self.sparsifier = None if spec.anchor is None else Sparsifier(
            self.model, spec.anchor, spec.dense_prefix, spec.model)
        self.predicted = None
        if spec.predictor_dir is not None:
            from actclust.predict.evaluation import PredictedMasks

            self.predicted = PredictedMasks(spec.predictor_dir, self, spec.top_m,
                                            spec.neuron_select)
        self.spec = spec

    def calibrate(self, ids: np.ndarray, method: str, sparsity: float, dense_prefix: int,
                  batch_windows: int, allocation: str = "uniform") -> dict:
        """An anchor's thresholds from dense passes over ``ids`` (fitting windows)."""
        return calibrate(self.model, ids, method, sparsity, dense_prefix, batch_windows,
                         self.spec.model, allocation)

    def bare_forward(self, ids: np.ndarray) -> float:
        """Seconds of one plain forward of ``ids``: no hooks, no loss (a run's floor rate)."""
        import time

        import torch

        from actclust.devices import model_input

        ids_t = model_input(self.model, ids)
        start = time.perf_counter()
        with torch.inference_mode():
            float(self.model(ids_t).logits[0, -1, 0])  # waits for the device
        return time.perf_counter() - start

    def evaluate(self, chunk: int, ids: np.ndarray, modes=MODES,
                 spec: EvaluatorSpec | None = None) -> dict:
        """Per-window NLL sums (W,) per mode, tokens per window (W,), STAT_FIELDS (L, F);
        with ``spec``, evaluated with that spec's centroids, predictor and anchor."""
        import contextlib

        import torch

        from actclust.capture.hooks import masking
        from actclust.devices import model_input

        if spec is not None and spec != self.spec:
            self._load_trial(spec)
        self.faults.evaluation_chunk(chunk)
        if "random" in modes and ("cluster" not in modes
                                  or modes.index("random") < modes.index("cluster")):
            raise ValueError("the random pass takes its bit counts from a cluster pass before it")
        self.shape = ids.shape
        ids_t = model_input(self.model, ids)
        out = {"nll": {}, "tokens": np.full(len(ids), ids.shape[1] - 1, dtype=np.int64),
               "ffn_weights": self.ffn_weights}
        stats = empty_stats(len(self.slot))
        if "anchor" in modes:
            out["anchor_stats"] = self.sparsifier.empty_stats()
        if self.predicted is not None:
            modes = tuple(modes) + ("predicted",)
        for mode in modes:
            fn = self._mask_fn(mode, chunk, stats)
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.inference_mode())
                if mode == "predicted":
                    stack.enter_context(self.predicted.capturing(self.model))
                if mode == "anchor":
                    stack.enter_context(self.sparsifier.applied(self.shape, out["anchor_stats"]))
                else:
                    for site in self.sites:  # every site masked in this same pass
                        stack.enter_context(masking(self.model, self._by_layer(site, fn), site))
                logits = self.model(ids_t).logits
            out["nll"][mode] = window_nll(logits, ids_t)
        out["stats"] = stats
        if self.predicted is not None:
            out["predicted_stats"] = self.predicted.take_stats()
        return out

    def _body(self, a):
        """The activations of the masked positions (>= dense_prefix) as rows (N, d)."""
        windows, length = self.shape
        a3 = a.reshape(windows, length, a.shape[-1])  # OPT hands its FFN (W*T, d)
        return a3[:, self.dense_prefix:].reshape(-1, a.shape[-1])

    def _full(self, a, body_mask):
        """A mask shaped like ``a``: ``body_mask`` on masked positions, ones on the prefix."""
        import torch

        if self.dense_prefix == 0:
            return body_mask.reshape(a.shape)
        windows, length = self.shape
        full = torch.ones((windows, length, a.shape[-1]), dtype=a.dtype, device=a.device)
        full[:, self.dense_prefix:] = body_mask.reshape(windows, length - self.dense_prefix,
                                                        a.shape[-1]).to(a.dtype)
        return full.reshape(a.shape)

    def _with_dense_prefix(self, a, mask):
        """``mask`` (shaped like ``a``) with the dense-prefix positions set to 1."""
        if self.dense_prefix == 0:
            return mask
        windows, length = self.shape
        full = mask.to(a.dtype).reshape(windows, length, a.shape[-1]).clone()
        full[:, :self.dense_prefix] = 1
        return full.reshape(a.shape)

    def _true_mask(self, slot: int, a):
        from actclust.capture.hooks import mask_of

        return mask_of(a, self.thresholds[slot])

    def _cluster_mask(self, slot: int, body, stats: np.ndarray):
        """Centroid (or m AND centroid) rows for masked positions; records the metrics."""
        import torch

        m = self._true_mask(slot, body)
        centroids = self.centroids[slot]
        labels, overlap = centroids.nearest(m)
        c = centroids.rows[labels]  # (N, d) 0/1
        kept = c * m if self.mask_mode == "and" else c
        mf = m.to(c.dtype)
        mass = body.abs().to(c.dtype) * mf
        f64 = torch.float64
        true_bits = mf.sum(dtype=f64)
        cent_bits = centroids.norms[labels].sum(dtype=f64)
        inter = overlap.sum(dtype=f64)
        row = stats[slot]
        row[F["tokens"]] += len(m)
        row[F["true_bits"]] += float(true_bits)
        row[F["centroid_bits"]] += float(cent_bits)
        row[F["hamming"]] += float(true_bits + cent_bits - 2 * inter)
        row[F["overlap"]] += float(inter)
        row[F["kept_bits"]] += float(kept.sum(dtype=f64))
        row[F["true_mass"]] += float(mass.sum(dtype=f64))
        row[F["kept_mass"]] += float((mass * c).sum(dtype=f64))
        return kept

    def _random_mask(self, slot: int, body, chunk: int, stats: np.ndarray):
        """Exactly as many random bits as the cluster pass used at this layer and chunk."""
        import torch

        bits = int(round(stats[slot, F["centroid_bits"]]))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + chunk * 1009 + slot)
        flat = torch.zeros(body.numel(), dtype=torch.bool)
        flat[torch.randperm(body.numel(), generator=gen)[:bits]] = True
        r = flat.reshape(body.shape).to(body.device)  # drawn on the host: same on every device
        if self.mask_mode == "and":
            r = r & self._true_mask(slot, body)
        stats[slot, F["random_bits"]] += bits
        stats[slot, F["random_kept_bits"]] += float(r.sum())
        return r

    def _mask_fn(self, mode: str, chunk: int, stats: np.ndarray):
        if mode in ("dense", "anchor"):  # an anchor sparsifies through its own hooks
            def fn(slot, a):
                return None
        elif mode == "oracle":
            def fn(slot, a):
                m = self._true_mask(slot, self._body(a))
                stats[slot, F["oracle_bits"]] += float(m.sum())
                return self._full(a, m)
        elif mode == "cluster":
            def fn(slot, a):
                return self._full(a, self._cluster_mask(slot, self._body(a), stats))
        elif mode == "predicted":
            def fn(slot, a):
                return self._with_dense_prefix(a, self.predicted.mask(slot, a))
        elif mode == "random":
            def fn(slot, a):
                return self._full(a, self._random_mask(slot, self._body(a), chunk, stats))
        else:
            raise ValueError(f"unknown mode {mode!r}")
        return fn

    def _by_layer(self, site: str, fn):
        """The hook's mask function of ``site``: the slot of (site, layer), or unmasked."""
        def by_layer(layer, a):
            slot = self.slot.get((site, layer))
            return None if slot is None else fn(slot, a)
        return by_layer
