"""Evaluate one anchor (teal, cats, wina at sparsity s) on a masks directory's windows.

The masks directory (``actclust extract --split train``) gives the model, corpus, window
length and held-out rule. Thresholds are calibrated on its first ``calibration_windows``
fitting windows by an evaluation actor; the held-out windows are evaluated by the same actors,
chunks and paired bootstrap (same seed, same windows) as every other mode, so the
anchor's interval pairs with dense, oracle, cluster and predicted.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import ray

from actclust.errors import UserError
from actclust.evaluation import ffn_bytes
from actclust.evaluation.anchors import AnchorSpec, check_anchor
from actclust.evaluation.bootstrap import paired_ppl_intervals
from actclust.evaluation.compare import PER_WINDOW_DEFINITION, window_losses
from actclust.evaluation.evaluate import (baseline_identity, evaluator_spec, evaluators,
                                          load_eval_windows, resolve, run_chunks)
from actclust.io import eval_store, mask_store, storage
from actclust.runtime.actors import run_lived_actors

DEFINITIONS = {
    "anchor_ppl": "perplexity with the anchor's FFN sparsity at masked positions (attention "
                  "dense); teal: x_i = 0 where |x_i| <= t_x and h_i = 0 where |h_i| <= t_h; "
                  "cats: neuron i dropped where |act(gate(x))_i| <= t_g; wina: per token the "
                  "top round((1 - s) n) inputs by |x_i| * ||W[:, i]||_2 (x: gate or fc1 "
                  "column norms, h: down column norms)",
    "thresholds": "per layer, the s-quantile of |x|, |h| or |g| over the masked positions "
                  "of the calibration windows (fitting split), dense forward",
    "anchor_allocation": "null: every layer at anchor_sparsity; greedy (teal): per-layer "
                         "sparsities with the FFN bytes of uniform anchor_sparsity, chosen "
                         "greedily on each layer's output error against the residual "
                         "stream",
    "anchor_realized_sparsity": "share of each input's entries zeroed at masked positions of "
                                "the evaluated windows",
    "ffn_bytes_fraction": "FFN weight bytes read per token over the dense FFN's at masked "
                          "positions; teal, wina: gate and up at the kept share of x, down at "
                          "the kept share of h; cats: gate whole, up and down at the kept share",
    "ci95": "percentile bootstrap over windows, the same resampled windows for every mode",
    "per_window": PER_WINDOW_DEFINITION,
}


def fitting_meta(masks: str) -> dict:
    """The evaluation meta of a masks directory; refuse one without fitting windows."""
    manifest = mask_store.read_manifest(masks)
    if manifest.get("split") != "train" or not manifest.get("windows"):
        raise UserError(f"{masks} holds no fitting windows (split {manifest.get('split')!r}, "
                        f"{manifest.get('windows') or 0} windows); an anchor calibrates on "
                        "masks from actclust extract --split train")
    meta = mask_store.evaluation_meta(manifest)
    meta["max_tokens"] = manifest.get("identity", {}).get("max_tokens")
    return meta


def calibrate_anchor(cfg, meta: dict) -> dict:
    """Calibration of ``cfg.anchor`` at ``cfg.anchor_sparsity`` on the fitting windows, by
    one of the evaluation actors (the run's own inside a run)."""
    fitting = load_eval_windows(cfg, split="train", max_tokens=meta["max_tokens"])
    ids = fitting.ids[:cfg.calibration_windows]
    spec, options = evaluator_spec(cfg, meta)
    with evaluators(spec, options, cfg.workers) as group:
        return ray.get(group.first_actor().calibrate.remote(
            ids, cfg.anchor, cfg.anchor_sparsity, cfg.dense_prefix, cfg.batch_windows,
            cfg.anchor_allocation))


def run_anchor(cfg) -> dict:
    """Calibrate and evaluate one anchor; writes and returns eval.json's content."""
    with run_lived_actors():  # calibration and evaluation share the actors
        return _run_anchor(cfg)


def _run_anchor(cfg) -> dict:
    check_anchor(cfg.anchor, cfg.anchor_sparsity)
    masks = storage.normalize(cfg.masks)
    meta = fitting_meta(masks)
    cfg = resolve(dataclasses.replace(cfg, masks=masks), meta, where=f"masks in {masks}")
    windows = load_eval_windows(cfg)
    calibration = calibrate_anchor(cfg, meta)
    spec = AnchorSpec(cfg.anchor, cfg.anchor_sparsity, calibration["thresholds"])
    ident = baseline_identity(cfg, meta)
    baseline = eval_store.read_baseline(cfg.baseline, ident, [int(s) for s in windows.seq])
    modes = ("anchor",) if baseline is not None else ("dense", "anchor")
    results = run_chunks(cfg, meta, None, windows, modes, anchor=spec)
    report = summarize_anchor(results, baseline, spec, calibration, windows, cfg)
    report["identity"] = {**ident, "masks": masks, "anchor": cfg.anchor,
                          "anchor_sparsity": cfg.anchor_sparsity,
                          "calibration_windows": cfg.calibration_windows,
                          # absent when uniform: identities written before the option match
                          **({"anchor_allocation": cfg.anchor_allocation}
                             if cfg.anchor_allocation != "uniform" else {}),
                          "first_seq": int(windows.seq[0]), "last_seq": int(windows.seq[-1])}
    eval_store.write_eval(report, cfg.out)
    return report


def kept_shares(stats: np.ndarray, inputs: tuple) -> dict[str, np.ndarray]:
    """Input -> per-layer kept share at masked positions, from the Sparsifier's sums."""
    return {name: stats[:, 1 + 2 * j] / stats[:, 2 + 2 * j] for j, name in enumerate(inputs)}


def summarize_anchor(results: list, baseline: dict | None, spec: AnchorSpec,
                     calibration: dict, windows, cfg) -> dict:
    """eval.json of an anchor: perplexities with paired intervals, sparsity, bytes."""
    tokens = np.concatenate([r["tokens"] for r in results]).astype(np.float64)
    nll = {"anchor": np.concatenate([r["nll"]["anchor"] for r in results])}
    if baseline is not None:
        nll.update({m: np.asarray(v, dtype=np.float64) for m, v in baseline["nll"].items()})
    else:
        nll["dense"] = np.concatenate([r["nll"]["dense"] for r in results])
    intervals = paired_ppl_intervals(nll, tokens, resamples=cfg.bootstrap_resamples,
                                     seed=cfg.seed)
    stats = sum(r["anchor_stats"] for r in results)
    kept = kept_shares(stats, spec.inputs)
    weights = results[0]["ffn_weights"]
    reads = ffn_bytes.anchor_reads(spec.method, {n: list(v) for n, v in kept.items()})
    per_layer_bytes = ffn_bytes.per_layer(weights, reads)
    report = {"anchor": spec.method, "anchor_sparsity": spec.sparsity}
    for mode in ("anchor", *sorted(m for m in nll if m != "anchor")):
        report[f"{mode}_ppl"] = math.exp(math.fsum(nll[mode]) / tokens.sum())
        report[f"{mode}_ppl_ci95"] = list(intervals[mode])
    total = {name: float(stats[:, 1 + 2 * j].sum() / stats[:, 2 + 2 * j].sum())
             for j, name in enumerate(spec.inputs)}
    report.update({
        "anchor_realized_sparsity": {name: 1.0 - share for name, share in total.items()},
        "ffn_bytes_fraction": {"dense": 1.0, "anchor": ffn_bytes.fraction(weights, reads)},
        "thresholds": spec.thresholds,
        "anchor_allocation": calibration.get("allocation"),
        "calibration": {"windows": cfg.calibration_windows, "split": "train",
                        "tokens": calibration["calibration_tokens"],
                        "sparsity": calibration["calibration_sparsity"]},
        "per_layer": [{"layer": layer,
                       "sparsity": {name: float(1.0 - kept[name][layer]) for name in kept},
                       "ffn_bytes_fraction": per_layer_bytes[layer]}
                      for layer in range(len(stats))],
        "dense_prefix": cfg.dense_prefix,
        "tokens": int(len(windows) * cfg.seq_len),
        "masked_tokens": int(stats[0, 0]),
        "predicted_tokens": int(tokens.sum()),
        "windows": len(windows),
        "bootstrap": {"unit": "window", "resamples": cfg.bootstrap_resamples, "seed": cfg.seed,
                      "paired": True},
        "per_window": window_losses(windows.seq, tokens, nll),
        "definitions": DEFINITIONS,
    })
    return report
