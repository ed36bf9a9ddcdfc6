"""Mode ``predicted`` of evaluation: mask each layer with what the predictor says,
from that layer's FFN input in the same masked pass, before the FFN runs.

Kind ``cluster``: the centroid of the top-1 predicted cluster (the union of the top-M
centroids with ``--top-m M``); kind ``neuron``: the thresholded neuron prediction, or
with ``--neuron-select topk`` each token's top neurons at the clustering's density.
Per layer the pass also counts, against the token's true mask in that pass and at
the masked positions only (the dense prefix is excluded, as in the cluster pass):
top-1 agreement with the true mask's own assignment (kind cluster), the predicted
mask's bits, the true bits, their overlap, and the activation mass sum |a| m and
the part of it the predicted mask keeps, sum |a| m p.
"""

from __future__ import annotations

import contextlib

import numpy as np

from actclust.errors import UserError
from actclust.io import mask_store as store
from actclust.io import storage
from actclust.io.corpus import in_split
from actclust.predict.features import ffn_inputs
from actclust.predict.model import load_predictor, read_meta

# Per-layer sums of the predicted pass (float64: counts exact below 2**53).
FIELDS = ("tokens", "agree", "predicted_bits", "true_bits", "overlap", "true_mass", "kept_mass")


def check_predictor(predictor_dir: str, cfg, meta: dict, windows) -> dict:
    """The predictor's record, after refusing one that does not belong to this evaluation."""
    record = read_meta(predictor_dir)
    ident = record["identity"]
    digest = store.sha256_file(storage.join(cfg.centroids, "centroids.parquet"))
    if ident.get("centroids_sha256") != digest:
        raise UserError(f"predictor {predictor_dir} was trained against other centroids than "
                        f"{cfg.centroids}; train one with --centroids {cfg.centroids}")
    if ident["model"] != cfg.model:
        raise UserError(f"predictor {predictor_dir} was trained on model {ident['model']!r}, "
                        f"not {cfg.model!r}")
    if ident["seq_len"] != cfg.seq_len:
        raise UserError(f"predictor {predictor_dir} was trained on {ident['seq_len']}-token "
                        f"windows; evaluate with --seq-len {ident['seq_len']}")
    if list(record["layers"]) != list(meta["layers"]) or record["k"] != meta["k"]:
        raise UserError(f"predictor {predictor_dir} covers layers {record['layers']} with "
                        f"k={record['k']}; the centroids have {meta['layers']} with k={meta['k']}")
    if ident["corpus"] == cfg.corpus:
        seen = [int(s) for s in windows.seq
                if ident["first_seq"] <= s <= ident["last_seq"]
                and in_split(int(s), ident["split"], ident["heldout_every"])]
        if seen:
            raise UserError(f"predictor {predictor_dir} was trained on {len(seen)} of the windows "
                            f"this evaluation would use (first: seq {seen[0]}); evaluate on the "
                            "held-out split with the predictor's --heldout-every")
    if record["kind"] == "cluster" and cfg.neuron_select != "threshold":
        raise UserError("--neuron-select applies to a neuron predictor; this one is a cluster "
                        "predictor")
    if cfg.neuron_select == "topk" and not all(
            "cluster_density" in row for row in record.get("per_layer", [])):
        raise UserError(f"predictor {predictor_dir} records no per-layer cluster_density for "
                        "--neuron-select topk; train it again with actclust train-predictor")
    if record["kind"] == "neuron" and cfg.top_m != 1:
        raise UserError("--top-m applies to a cluster predictor; this one is a neuron predictor")
    if not 1 <= cfg.top_m <= record["k"]:
        raise UserError(f"--top-m must be in [1, {record['k']}], got {cfg.top_m}")
    return record


class PredictedMasks:
    """Holds the predictor on the evaluator's device and counts FIELDS per layer."""

    def __init__(self, predictor_dir: str, evaluator, top_m: int = 1,
                 neuron_select: str = "threshold"):
        self.predictor = load_predictor(predictor_dir)
        self.ev = evaluator
        self.top_m = top_m
        self.neuron_select = neuron_select
        self.layers = self.predictor.layers
        self.inputs: list = []
        self.stats = np.zeros((len(self.layers), len(FIELDS)), dtype=np.float64)

    @contextlib.contextmanager
    def capturing(self, model):
        """Keep every layer's FFN input of the pass running inside this context."""
        with ffn_inputs(model) as self.inputs:
            yield

    def mask(self, slot: int, a):
        """The predicted mask of clustered layer ``slot``, shaped like its activation ``a``
        (ones on the dense prefix)."""
        import torch

        layer = self.layers[slot]
        body = self.ev._body(a)  # (N, width) masked positions
        h = self.ev._body(self.inputs[layer])
        true = self.ev._true_mask(slot, body)
        row = [len(true), 0]
        if self.predictor.kind == "cluster":
            ids = self.predictor.top_clusters(layer, h, self.top_m)  # (N, M)
            centroids = self.ev.centroids[slot]
            pred = centroids.rows[ids].amax(dim=1)  # (N, width) 0/1: union of top-M
            labels, _ = centroids.nearest(true)
            row[1] = int((ids[:, 0] == labels).sum())
        else:
            pred = self.predictor.neuron_mask(layer, h, self.neuron_select).to(
                self.ev.centroids[slot].dtype)
        f64 = torch.float64  # sums in float64, elementwise in the centroids' dtype as the
        tf = true.to(pred.dtype)  # cluster pass does
        mass = body.abs().to(pred.dtype) * tf
        self.stats[slot] += np.array(row + [float(pred.sum(dtype=f64)), float(tf.sum(dtype=f64)),
                                            float((pred * tf).sum(dtype=f64)),
                                            float(mass.sum(dtype=f64)),
                                            float((mass * pred).sum(dtype=f64))])
        # Mask mode and: of the predicted neurons, only those the token really fires.
        return self.ev._full(a, pred * tf if self.ev.mask_mode == "and" else pred)

    def take_stats(self) -> np.ndarray:
        stats, self.stats = self.stats, np.zeros_like(self.stats)
        return stats


def _figures(row: np.ndarray, width: int, kind: str, prefix_tokens: int) -> dict:
    """Figures of summed FIELDS; ``prefix_tokens`` dense-prefix (token, layer) pairs count
    at density 1.0 in the effective density, as in the other modes."""
    tokens, agree, pred, true, overlap, true_mass, kept_mass = (float(v) for v in row)
    all_cells = (tokens + prefix_tokens) * width
    return {"predicted_accuracy": agree / tokens if kind == "cluster" and tokens else None,
            "predicted_precision": overlap / pred if pred else 0.0,
            "predicted_recall": overlap / true if true else 0.0,
            "predicted_weighted_recall": kept_mass / true_mass if true_mass else 0.0,
            "predicted_density": pred / (tokens * width) if tokens else 0.0,
            "predicted_effective_density": (pred + prefix_tokens * width) / all_cells
            if all_cells else 0.0}


def summarize_predicted(stats: np.ndarray, record: dict, width: int, top_m: int,
                        prefix_tokens: int = 0, neuron_select: str = "threshold") -> dict:
    """eval.json's predicted_* figures from summed per-layer FIELDS (L, F);
    ``prefix_tokens``: dense-prefix tokens per layer."""
    kind = record["kind"]
    return {**_figures(stats.sum(axis=0), width, kind, prefix_tokens * len(stats)),
            "predictor_params_fraction": record["params_fraction"],
            "predictor_kind": kind, "predictor_rank": record["rank"], "top_m": top_m,
            "neuron_select": neuron_select if kind == "neuron" else None,
            "predicted_per_layer": [{"layer": int(layer), **_figures(stats[i], width, kind,
                                                                     prefix_tokens)}
                                    for i, layer in enumerate(record["layers"])]}


def add_predicted(report: dict, results: list, record: dict, meta: dict, top_m: int,
                  neuron_select: str = "threshold") -> None:
    """Add predicted_ppl and the predicted_* figures (overall and per layer) to eval.json."""
    import math

    nll = math.fsum(float(v) for r in results for v in r["nll"]["predicted"])
    figures = summarize_predicted(sum(r["predicted_stats"] for r in results), record,
                                  meta["d_ff"], top_m,
                                  report["windows"] * report["dense_prefix"], neuron_select)
    for row, extra in zip(report["per_layer"], figures.pop("predicted_per_layer")):
        row.update({k: v for k, v in extra.items() if k != "layer"})
    report.update(predicted_ppl=math.exp(nll / report["predicted_tokens"]), **figures)
    report["definitions"] = dict(report["definitions"])  # not the shared module constant
    report["definitions"]["predicted_ppl"] = (
        "a * the mask predicted from the layer's FFN input before the FFN runs: the centroid "
        "of the top-1 predicted cluster (union of the top-M with top_m), or a neuron "
        "predictor's output: logits above its per-layer threshold (neuron_select threshold) "
        "or each token's top round(d * width) logits, d the clustering's per-layer density "
        "on the training tokens (neuron_select topk)")
    report["definitions"]["predicted_accuracy"] = (
        "share of (token, layer) whose top-1 predicted cluster is the true mask's assignment")
    report["definitions"]["predicted_weighted_recall"] = (
        "sum |a| m p / sum |a| m, p the predicted mask, at masked positions of the predicted "
        "pass: the share of active activation mass the predicted mask keeps")
