"""Generation with the sparse FFN: transformers' ``generate`` (greedy, KV cache) with
every clustered layer's FFN swapped for a :class:`~actclust.sparse.ffn.SparseFFN`.

    actclust generate --model embedded:smollm2-135m --centroids runs/demo/clusters/k=64-theta=0.5 \
        --predictor runs/demo/predictor --prompt "The for statement" --max-new-tokens 32

The cluster id of each token at each layer comes from ``choose(layer, h)`` (a
predictor's ``cluster_ids``), computed from the FFN input h before the FFN runs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Optional

import numpy as np

from actclust.config import DEFAULT_SLAB_BUDGET_MB, GenerateConfig
from actclust.errors import UserError
from actclust.io import mask_store, storage
from actclust.io.centroid_store import check_width, load_centroids, require_single_site
from actclust.io.models import load_model
from actclust.sparse.layout import SparseLayout, ffn_parts, neuron_major

log = logging.getLogger(__name__)

MODES = ("sparse", "masked", "dense")  # masked: the masked dense FFN, the reference
D_FF_SITES = ("intermediate", "gate", "up")


@dataclasses.dataclass(frozen=True)
class Generation:
    """What one generation produced and how long it took."""

    mode: str
    prompt_tokens: int
    tokens: list  # the new token ids
    text: str  # their decoding
    seconds: float  # the whole generate call (prefill + decode)

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("inf")


def centroid_masks(centroids_dir, model_name: Optional[str] = None) -> tuple[dict, dict, dict]:
    """Per-layer centroids of a clustering directory as (K, d_ff) bool tensors.

    Returns (cluster.json, {layer: masks}, {layer: cluster ids, most used first}).
    """
    import torch

    meta, packed = load_centroids(centroids_dir)
    require_single_site(meta, centroids_dir, "the sparse FFN of actclust generate")
    check_width(meta, packed)
    if meta.get("sites", "intermediate") not in D_FF_SITES:
        raise UserError(f"centroids in {centroids_dir} are over site {meta['sites']!r}; the "
                        f"sparse FFN needs neuron centroids (sites {', '.join(D_FF_SITES)})")
    if model_name is not None and meta.get("model") not in (None, model_name):
        raise UserError(f"centroids in {centroids_dir} were fitted on model {meta['model']!r}, "
                        f"not {model_name!r}; pass --model {meta['model']}")
    masks, priority = {}, {}
    sizes = meta.get("sizes") or {}
    for layer, bits in zip(meta["layers"], packed):
        masks[layer] = torch.from_numpy(mask_store.unpack(bits, meta["d_ff"]).astype(bool))
        key = "-1" if meta.get("pooled") else str(layer)
        if key in sizes and len(sizes[key]) == len(bits):
            priority[layer] = np.argsort(-np.asarray(sizes[key]), kind="stable").tolist()
    return meta, masks, priority


def build_layouts(model, masks: dict, layout: str = "auto",
                  slab_budget_mb: float = DEFAULT_SLAB_BUDGET_MB,
                  priority: Optional[dict] = None) -> dict:
    """{layer: SparseLayout} for the layers in ``masks``; the slab budget is split evenly."""
    parts = ffn_parts(model)
    budget = slab_budget_mb * 2**20 / max(len(masks), 1)
    layouts = {}
    for layer, m in masks.items():
        if not 0 <= layer < len(parts):
            raise UserError(f"centroids name layer {layer}, but the model has {len(parts)} layers")
        layouts[layer] = SparseLayout(neuron_major(parts[layer]), m, layout=layout,
                                      slab_budget_bytes=budget,
                                      priority=(priority or {}).get(layer))
    used = sum(lay.slab_bytes_used for lay in layouts.values())
    slabs = sum(len(lay.slabs) for lay in layouts.values())
    total = sum(lay.k for lay in layouts.values())
    log.info("sparse FFN layout %s: %d of %d centroids as slabs (%.0f MB)", layout, slabs, total,
             used / 2**20)
    return layouts


def greedy_tokens(model, input_ids, max_new_tokens: int, eos_token_id=None) -> list:
    """New token ids of greedy decoding with a KV cache; input_ids (1, T) LongTensor."""
    import torch

    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             num_beams=1, eos_token_id=eos_token_id,
                             pad_token_id=eos_token_id if eos_token_id is not None else 0)
    return out[0, input_ids.shape[1]:].tolist()


def generate(loaded, prompt: str, max_new_tokens: int = 32, mode: str = "sparse",
             layouts: Optional[dict] = None, choose=None, stop_at_eos: bool = True,
             thresholds: Optional[dict] = None) -> Generation:
    """Greedy continuation of ``prompt`` with the FFNs of ``layouts`` swapped in.

    ``mode``: ``sparse`` (only the centroid's neurons), ``masked`` (dense FFN times the
    centroid) or ``dense`` (the model as it is; layouts and choose unused).
    ``thresholds`` (layer -> tau): mask mode ``and``, the centroid's neurons with
    ``|a| > tau`` only.
    """
    import torch

    from actclust.sparse.ffn import sparse_ffns  # lazy: sparse.ffn imports torch at top

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    ids = loaded.tokenizer.encode(prompt)
    if not ids:
        raise UserError("the prompt encodes to no tokens; give a non-empty --prompt")
    input_ids = torch.tensor([ids], dtype=torch.long)
    eos = loaded.tokenizer.eos_token_id if stop_at_eos else None
    start = time.perf_counter()
    if mode == "dense":
        new = greedy_tokens(loaded.model, input_ids, max_new_tokens, eos)
    else:
        if layouts is None or choose is None:
            raise ValueError("sparse and masked generation need layouts and choose")
        path = "auto" if mode == "sparse" else "dense"
        with sparse_ffns(loaded.model, layouts, choose, path=path, thresholds=thresholds):
            new = greedy_tokens(loaded.model, input_ids, max_new_tokens, eos)
    seconds = time.perf_counter() - start
    return Generation(mode, len(ids), new, loaded.tokenizer.decode(new), seconds)


def load_chooser(predictor_dir, meta: dict):
    """``predictor.cluster_ids`` of a trained cluster predictor, checked against the centroids."""
    try:
        from actclust.predict import load_predictor
    except ImportError:
        raise UserError("this installation has no cluster predictor (actclust.predict); "
                        "train one with `actclust train-predictor` on a build that has it") \
            from None

    if not storage.exists(predictor_dir):
        raise UserError(f"predictor directory {predictor_dir} does not exist; train one with "
                        "`actclust train-predictor --centroids DIR --out DIR`")
    predictor = load_predictor(predictor_dir)
    if getattr(predictor, "kind", "cluster") != "cluster":
        raise UserError(f"the predictor in {predictor_dir} is a {predictor.kind} predictor; "
                        "the sparse FFN needs a cluster predictor (--kind cluster)")
    if int(predictor.k) != int(meta["k"]):
        raise UserError(f"the predictor in {predictor_dir} predicts {predictor.k} clusters, the "
                        f"centroids have {meta['k']}; train it on these centroids")
    missing = sorted(set(predictor.layers) - set(meta["layers"]))
    if missing:
        raise UserError(f"the predictor covers layers {missing} that have no centroids")
    return predictor.cluster_ids, list(predictor.layers)


def run_generate(cfg: GenerateConfig, choose=None, layers=None) -> Generation:
    """Load what ``cfg`` names and generate. ``choose``/``layers`` replace the predictor."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    meta = None
    if cfg.centroids is not None:
        meta, masks, priority = centroid_masks(cfg.centroids, cfg.model)
        cfg.model = cfg.model or meta["model"]
    loaded = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if cfg.dense:
        return generate(loaded, cfg.prompt, cfg.max_new_tokens, mode="dense")
    if choose is None:
        choose, layers = load_chooser(cfg.predictor, meta)
    if layers is not None:
        masks = {layer: masks[layer] for layer in layers}
    layouts = build_layouts(loaded.model, masks, cfg.layout, cfg.slab_budget_mb, priority)
    thresholds = mask_thresholds(meta) if mask_mode_of(cfg, meta or {}) == "and" else None
    return generate(loaded, cfg.prompt, cfg.max_new_tokens, mode="sparse", layouts=layouts,
                    choose=choose, thresholds=thresholds)


def mask_mode_of(cfg: GenerateConfig, meta: dict) -> str:
    """The mask mode of a generation: as given, else and for centroids of the FFN
    activation (site intermediate, the thresholds are |a|'s) and replace for gate or up."""
    site = meta.get("sites", "intermediate")
    if cfg.mask_mode is None:
        return "and" if site == "intermediate" else "replace"
    if cfg.mask_mode == "and" and site != "intermediate":
        raise UserError(f"--mask-mode and thresholds the FFN activation a; centroids in "
                        f"{cfg.centroids} are over site {site!r}: use --mask-mode replace")
    return cfg.mask_mode


def mask_thresholds(meta: dict) -> dict:
    """layer -> tau_l, the masks' threshold of each clustered layer (cluster.json)."""
    return {int(layer): float(tau) for layer, tau in zip(meta["layers"], meta["thresholds"])}
