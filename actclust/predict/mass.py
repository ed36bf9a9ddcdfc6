"""Magnitude-aware centroid bits: ``actclust mass-bits``.

    actclust mass-bits --centroids runs/c --features runs/p/features --out runs/c-mass

A fitted centroid keeps the neurons its members fire most often. Perplexity depends on
the activation mass a mask drops, not on how many neurons it drops, so here each
centroid keeps, at the same bit count, the neurons with the largest summed ``|a_i|``
over its members instead. The members are the fitted assignment (each fitting token's
true mask assigned by the clustering's own rule); ``a`` comes from the predictor's
feature shards (the FFN inputs of every fitting window, written once per run), through
the model's own FFN, so this needs no second forward pass of the whole model.

The output is a clustering directory like any other: ``cluster.json`` records
``bits_by: activation_mass`` and ``bits_from`` (the fitted directory). A token is then
assigned (by the oracle, or by a predictor trained on these centroids) under the same
rule against the new bits.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from actclust import budget
from actclust.capture.hooks import captured
from actclust.errors import UserError
from actclust.io import centroid_store, mask_store, outdir, predictor_store, storage
from actclust.io.centroid_store import load_centroids, require_single_site
from actclust.io.corpus import load_windows
from actclust.io.models import (ffn_input_modules, ffn_projections, load_model, load_tokenizer,
                                matrix_weights, residual_energy)
from actclust.kernels.rules import AssignRule
from actclust.predict import allocation as A
from actclust.predict import features as F

log = logging.getLogger(__name__)

CHUNK = 2048  # tokens per FFN call
RUN_MARKER = "mass_bits_run.json"


def feature_spec(features: str, meta: dict, d_model: int,
                 trust_remote_code: bool = False) -> tuple[F.FeatureSpec, int]:
    """The spec and shard count of a feature directory, checked against the clustering it
    is used with."""
    path = storage.join(features, predictor_store.FEATURES_RECORD)
    if not storage.is_file(path):
        raise UserError(f"{features} holds no predictor features ({predictor_store.FEATURES_RECORD} "
                        "missing); train a predictor on these centroids first")
    record = storage.read_json(path)
    for key in ("model", "corpus", "seq_len", "heldout_every"):
        if record.get(key) != meta.get(key):
            raise UserError(f"the features in {features} were written with {key} "
                            f"{record.get(key)!r}, the centroids were fitted with {meta.get(key)!r}")
    taus = dict(zip(record["layers"], record["thresholds"]))
    if any(taus.get(layer) != tau for layer, tau in zip(meta["layers"], meta["thresholds"])):
        raise UserError(f"the features in {features} were written for other layers or mask "
                        "thresholds than the centroids'")
    n_shards = F.shard_count(record["windows"], record["shard_windows"])
    missing = [i for i in range(n_shards)
               if not predictor_store.shard_complete(features, F.shard_name(i))]
    if missing:
        raise UserError(f"{features} is missing {len(missing)} of its {n_shards} feature shards; "
                        "rerun the train-predictor command that writes them")
    spec = F.FeatureSpec(root=storage.normalize(features), model=meta["model"],
                         site=meta["sites"], layers=tuple(record["layers"]),
                         thresholds=tuple(record["thresholds"]), d_model=d_model,
                         width=meta["d_ff"], shard_windows=record["shard_windows"],
                         trust_remote_code=trust_remote_code)
    return spec, n_shards


def layer_activations(model, modules, acts, h: np.ndarray, layer: int, width: int):
    """Activations ``a`` (N, width) entering ``layer``'s down projection, float32 torch,
    from its stored FFN inputs ``h`` (N, d_model), CHUNK tokens per FFN call."""
    import torch

    parts = []
    for s in range(0, len(h), CHUNK):
        modules[layer](torch.from_numpy(h[s:s + CHUNK]))
        parts.append(acts[layer].reshape(-1, width).float())
    return torch.cat(parts)


def cluster_mass(model, spec: F.FeatureSpec, n_shards: int, centroids: list[np.ndarray], rule,
                 layers: list[int]) -> tuple[np.ndarray, int]:
    """(len(layers), K, width) float64: per cluster, the summed |a| of its members; and the
    number of tokens read.

    Every feature shard (all fitting windows) is read once; each layer's FFN runs on its
    stored inputs, the capture hook takes ``a`` and the true masks give the assignment.
    """
    import torch

    slot = {layer: i for i, layer in enumerate(spec.layers)}
    picked = [slot[layer] for layer in layers]
    targets = F.Targets("cluster", centroids, spec.width, rule)
    k = len(centroids[0])
    mass = torch.zeros(len(layers), k, spec.width, dtype=torch.float64)
    modules = ffn_input_modules(model)
    tokens = 0
    with torch.inference_mode(), captured(model, spec.site) as acts:
        for index in range(n_shards):
            h, bits = F.read_shard(spec, index)
            labels = torch.from_numpy(targets.labels(np.ascontiguousarray(bits[:, picked])))
            tokens += len(h)
            for i, (j, layer) in enumerate(zip(picked, layers)):
                a = layer_activations(model, modules, acts, h[:, j], layer, spec.width)
                mass[i].index_add_(0, labels[:, i], a.abs().to(torch.float64))
    return mass.numpy(), tokens


def bits_by_mass(packed: np.ndarray, mass: np.ndarray, width: int,
                 density: float | None = None, counts: str = "equal") -> np.ndarray:
    """(K, B) packed centroids with their bits on the neurons of largest mass (ties to the
    lower index): each keeps its bit count, or at a new layer density takes
    ``round(density width)`` bits (``counts`` equal) or its count scaled to that mean
    (fitted). A cluster without members keeps its bits, or at a new density takes the
    layer's whole mass."""
    bits = mask_store.unpack(packed, width)
    if density is not None:
        fitted = bits.sum(axis=1) if counts == "fitted" else None
        return mask_store.pack(A.mass_centroids(mass, density, fitted))
    out = A.top_mass_bits(mass, bits.sum(axis=1))
    empty = mass.sum(axis=1) == 0
    out[empty] = bits[empty]
    return mask_store.pack(out)


def allocate(model, spec: F.FeatureSpec, mass: np.ndarray, rule, layers: list[int],
             fitted_counts: list[np.ndarray] | None, target: float, mask_mode: str,
             sample_tokens: int, dense_prefix: int) -> tuple[list[float], dict]:
    """Per-layer densities meeting the bytes fraction ``target`` over the clustered layers
    (:mod:`actclust.predict.allocation`), measured on the first ``sample_tokens`` fitting
    tokens at positions >= ``dense_prefix`` (the evaluation never masks the others, and a
    window's first token carries the residual stream's outlier norms); and the record of
    the search. ``fitted_counts``: per layer, the fitted bit counts the densities scale
    (None: every centroid of a layer gets the layer's density)."""
    import torch

    h, bits = _sample(spec, sample_tokens, dense_prefix)
    energy = residual_energy(model, _first_windows(spec), dense_prefix=dense_prefix)
    slot = {layer: i for i, layer in enumerate(spec.layers)}
    projections = ffn_projections(model)
    weights = matrix_weights(projections)
    modules = ffn_input_modules(model)
    errors, nbytes = [], []
    with torch.inference_mode(), captured(model, spec.site) as acts:
        for i, layer in enumerate(layers):
            j = slot[layer]
            a = layer_activations(model, modules, acts, h[:, j], layer, spec.width)
            err, in_shares, kept_shares = A.layer_errors(
                a.numpy(), np.ascontiguousarray(bits[:, j]), mass[i], rule,
                projections[layer].down.weight, mask_mode=mask_mode,
                fitted_counts=None if fitted_counts is None else fitted_counts[i])
            errors.append(err / energy[layer])
            nbytes.append(budget.layer_bytes(weights[layer], in_shares, kept_shares))
    errors, nbytes = np.asarray(errors), np.asarray(nbytes)
    layer_weights = np.asarray([sum(weights[layer].values()) for layer in layers], float)
    pick = budget.greedy(errors, nbytes, target, layer_weights)
    rows = np.arange(len(layers))
    record = {"budget": target, "mask_mode": mask_mode, "grid": list(budget.GRID),
              "sample_tokens": int(len(h)), "dense_prefix": dense_prefix,
              "objective": A.OBJECTIVE,
              "ffn_bytes_fraction": float(layer_weights @ nbytes[rows, pick]
                                          / layer_weights.sum()),
              "errors": [float(e) for e in errors[rows, pick]]}
    return [float(budget.GRID[g]) for g in pick], record


def _first_windows(spec: F.FeatureSpec, windows: int = 8) -> np.ndarray:
    """Token ids (W, T) of the first fitting windows of the features' corpus."""
    record = storage.read_json(storage.join(spec.root, predictor_store.FEATURES_RECORD))
    tokenizer = load_tokenizer(spec.model, trust_remote_code=spec.trust_remote_code)
    return load_windows(record["corpus"], tokenizer, record["seq_len"], split="train",
                        max_tokens=windows * record["seq_len"],
                        heldout_every=record["heldout_every"],
                        text_column=record.get("text_column") or "text").ids


def _sample(spec: F.FeatureSpec, tokens: int, dense_prefix: int = 0
            ) -> tuple[np.ndarray, np.ndarray]:
    """FFN inputs and packed true masks of the first ``tokens`` fitting tokens at window
    positions >= ``dense_prefix`` (a shard holds whole windows, position-major)."""
    seq_len = storage.read_json(storage.join(spec.root, predictor_store.FEATURES_RECORD))["seq_len"]
    hs, masks, have, index = [], [], 0, 0
    while have < tokens and predictor_store.shard_complete(spec.root, F.shard_name(index)):
        h, bits = F.read_shard(spec, index)
        body = np.arange(len(h)) % seq_len >= dense_prefix
        hs.append(h[body]), masks.append(bits[body])
        have, index = have + int(body.sum()), index + 1
    return np.concatenate(hs)[:tokens], np.concatenate(masks)[:tokens]


def run_mass_bits(cfg) -> dict:
    """Write the magnitude-aware clustering of ``cfg.centroids``; returns its cluster.json.
    A rerun with the same inputs returns the finished directory's record."""
    import torch

    meta, packed = load_centroids(cfg.centroids)
    require_single_site(meta, cfg.centroids, "mass-bits")
    if meta.get("pooled"):
        raise UserError("mass-bits needs per-layer centroids, not --pool-layers ones")
    if meta.get("bits_by") == "activation_mass":
        raise UserError(f"{cfg.centroids} already holds activation-mass bits")
    out = storage.normalize(cfg.out)
    ident = {"centroids": storage.normalize(cfg.centroids),
             "centroids_sha256": mask_store.sha256_file(
                 storage.join(cfg.centroids, centroid_store.CENTROIDS_FILE)),
             "features": storage.normalize(cfg.features)}
    # Only what was asked for: a marker written before these options still matches.
    if cfg.density is not None:
        ident["density"] = cfg.density
    if cfg.budget is not None:
        ident.update(budget=cfg.budget, mask_mode=cfg.mask_mode, sample_tokens=cfg.sample_tokens,
                     dense_prefix=cfg.dense_prefix)
    if (cfg.density is not None or cfg.budget is not None) and cfg.counts != "equal":
        ident["counts"] = cfg.counts
    start = time.perf_counter()
    model = load_model(meta["model"], trust_remote_code=cfg.trust_remote_code).model
    spec, n_shards = feature_spec(cfg.features, meta, int(model.config.hidden_size),
                                  cfg.trust_remote_code)
    outdir.open_output(out, RUN_MARKER, ident, "activation-mass centroids of other inputs")
    if centroid_store.is_finished(out):
        log.info("%s already holds these centroids", out)
        return centroid_store.read_meta(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rule = AssignRule.from_json(meta["rule"]) if meta.get("rule") else None
    layers = list(meta["layers"])
    mass, tokens = cluster_mass(model, spec, n_shards, packed, rule, layers)
    densities, allocation = [cfg.density] * len(layers), None
    fitted = [mask_store.unpack(c, meta["d_ff"]).sum(axis=1) for c in packed] \
        if cfg.counts == "fitted" else None
    if cfg.budget is not None:
        densities, allocation = allocate(model, spec, mass, rule, layers, fitted, cfg.budget,
                                         cfg.mask_mode, cfg.sample_tokens, cfg.dense_prefix)
    new = [bits_by_mass(c, m, meta["d_ff"], d, cfg.counts)
           for c, m, d in zip(packed, mass, densities)]
    resized = cfg.density is not None or allocation is not None
    seconds = time.perf_counter() - start
    record = {**meta, "bits_by": "activation_mass", "bits_from": ident["centroids"],
              "bits_density": densities if resized else None,
              "bits_counts": cfg.counts if resized else None,
              "allocation": allocation, "mass_seconds": round(seconds, 1)}
    centroid_store.write_from_meta(out, record, new)
    moved = np.mean([np.mean(mask_store.unpack(a, meta["d_ff"])
                             != mask_store.unpack(b, meta["d_ff"])) for a, b in zip(packed, new)])
    log.info("mass-bits: %d layers, %.1f%% of centroid bits moved, %s tokens in %.1f s "
             "(%.0f tokens/s)", len(new), 100 * moved, f"{tokens:,}", seconds,
             tokens / max(seconds, 1e-9))
    return record
