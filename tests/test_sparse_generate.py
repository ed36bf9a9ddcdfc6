"""Greedy decoding with the sparse FFN gives the tokens of the masked dense FFN."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from actclust.io import mask_store
from actclust.capture.hooks import masking
from actclust.io.models import load_model
from actclust.sparse.ffn import sparse_ffns
from actclust.errors import UserError
from actclust.sparse.generate import (GenerateConfig, build_layouts, centroid_masks, generate,
                                      greedy_tokens, mask_mode_of, run_generate)
from actclust.sparse.layout import ffn_parts
from helpers import assert_user_error, run_cli

K = 8
PROMPT = "The for statement is used to iterate"


def random_masks(model, density: float, seed: int = 0) -> dict:
    parts = ffn_parts(model)
    gen = torch.Generator().manual_seed(seed)
    d_ff = parts[0].output.weight.shape[1]
    return {layer: torch.rand(K, d_ff, generator=gen) < density for layer in range(len(parts))}


def projection_chooser(model, seed: int = 1):
    d = model.config.hidden_size
    layers = len(ffn_parts(model))
    proj = torch.randn(layers, d, K, generator=torch.Generator().manual_seed(seed))
    return lambda layer, h: (h @ proj[layer]).argmax(dim=-1)


@contextlib.contextmanager
def masked_by_chooser(model, masks: dict, choose):
    """Reference: the model's own FFN, its activation times the chosen centroid (hooks)."""
    parts = ffn_parts(model)
    chosen: dict = {}
    handles = []
    for layer, part in enumerate(parts):
        def pre(mod, args, layer=layer):
            chosen[layer] = choose(layer, args[0])
        handles.append(part.inputs[0].register_forward_pre_hook(pre))

    def mask_fn(layer, a):
        return masks[layer][chosen[layer]].reshape(a.shape)
    try:
        with masking(model, mask_fn):
            yield
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("name", ["tiny:llama", "tiny:opt"])
@pytest.mark.parametrize("layout", ["slab", "gather"])
def test_sparse_greedy_equals_masked_dense_greedy(name, layout):
    loaded = load_model(name)
    model = loaded.model
    masks = random_masks(model, 0.4)
    choose = projection_chooser(model)
    ids = torch.tensor([loaded.tokenizer.encode(PROMPT)])
    n = 12
    with masked_by_chooser(model, masks, choose):
        want = greedy_tokens(model, ids, n)
        with torch.no_grad():
            masked_logits = model(ids).logits
    with torch.no_grad():
        dense_logits = model(ids).logits
    layouts = build_layouts(model, masks, layout=layout)
    with sparse_ffns(model, layouts, choose) as modules:
        got = greedy_tokens(model, ids, n)
    assert len(want) == n
    assert got == want
    # The centroids (density 0.4) really change the model.
    assert (masked_logits - dense_logits).abs().max() > 1e-2
    for module in modules.values():
        assert module.calls["single"] == n - 1  # every decode step read one block
        assert module.calls["grouped"] + module.calls["dense"] == 1  # the prefill
    # The library's entry point, both modes, gives the same tokens.
    for mode in ("sparse", "masked"):
        result = generate(loaded, PROMPT, n, mode=mode, layouts=layouts, choose=choose,
                          stop_at_eos=False)
        assert result.tokens == want
        assert result.tokens_per_s > 0


@pytest.mark.parametrize("name", ["tiny:llama", "tiny:opt"])
def test_mask_mode_and_greedy_equals_the_thresholded_masked_dense_greedy(name):
    loaded = load_model(name)
    model = loaded.model
    masks = random_masks(model, 0.6)
    choose = projection_chooser(model)
    ids = torch.tensor([loaded.tokenizer.encode(PROMPT)])
    taus = {}

    def record(layer, a):  # tau_l: the median |a| of the prompt's tokens
        taus[layer] = float(a.abs().median())
        return torch.ones_like(a, dtype=torch.bool)
    with torch.no_grad(), masking(model, record):
        model(ids)
    n = 10
    with torch.no_grad(), masked_by_chooser(model, masks, choose):
        plain_logits = model(ids).logits
    parts = ffn_parts(model)
    chosen: dict = {}
    handles = [part.inputs[0].register_forward_pre_hook(
        lambda mod, args, layer=layer: chosen.__setitem__(layer, choose(layer, args[0])))
        for layer, part in enumerate(parts)]
    try:
        # The reference: the model's own FFN, its activation times (c AND |a| > tau_l).
        with masking(model, lambda layer, a: masks[layer][chosen[layer]].reshape(a.shape)
                     & (a.abs() > taus[layer])):
            want = greedy_tokens(model, ids, n)
            with torch.no_grad():
                thresholded_logits = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    layouts = build_layouts(model, masks, layout="gather")
    got = generate(loaded, PROMPT, n, mode="sparse", layouts=layouts, choose=choose,
                   stop_at_eos=False, thresholds=taus)
    assert len(want) == n and got.tokens == want
    assert (thresholded_logits - plain_logits).abs().max() > 1e-3  # the threshold matters


def write_clustering(directory, model_name: str, masks: dict) -> None:
    """A clustering directory as `actclust cluster` writes it (centroids.parquet, cluster.json)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    layers = sorted(masks)
    d_ff = masks[layers[0]].shape[1]
    tables = []
    for layer in layers:
        packed = mask_store.pack(masks[layer].numpy())
        tables.append(pa.table({"layer": pa.array(np.full(K, layer, np.int32)),
                                "cluster": pa.array(np.arange(K, dtype=np.int32)),
                                "bits": mask_store.bits_array(packed),
                                "size": pa.array(np.arange(K, dtype=np.int64) + 1)}))
    pq.write_table(pa.concat_tables(tables), directory / "centroids.parquet")
    meta = {"k": K, "theta": 0.5, "model": model_name, "layers": layers, "d_ff": d_ff,
            "sites": "intermediate", "pooled": False, "seq_len": 64,
            "sizes": {str(layer): list(range(1, K + 1)) for layer in layers}}
    (directory / "cluster.json").write_text(json.dumps(meta), encoding="utf-8")


def test_run_generate_reads_a_clustering_directory(tmp_path):
    loaded = load_model("tiny:llama")
    masks = random_masks(loaded.model, 0.5)
    write_clustering(tmp_path / "clusters", "tiny:llama", masks)
    meta, read, priority = centroid_masks(tmp_path / "clusters")
    assert meta["k"] == K and sorted(read) == sorted(masks)
    assert all(torch.equal(read[layer], masks[layer]) for layer in masks)
    assert priority[0] == list(range(K - 1, -1, -1))  # largest cluster first
    choose = projection_chooser(loaded.model)
    cfg = GenerateConfig(centroids=str(tmp_path / "clusters"), predictor="unused", prompt=PROMPT,
                         max_new_tokens=6, layout="auto", slab_budget_mb=0.05,
                         mask_mode="replace")
    cfg.validate()
    result = run_generate(cfg, choose=choose, layers=[1])
    with masked_by_chooser(loaded.model, {0: torch.ones_like(masks[0]), 1: masks[1]}, choose):
        want = generate(loaded, PROMPT, 6, mode="dense").tokens
    assert result.mode == "sparse"
    assert result.tokens == want


def test_cli_generate_dense_prints_continuation_and_speed():
    proc = run_cli("generate", "--model", "tiny:llama", "--dense", "--prompt", "hello",
                   "--max-new-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    assert "dense: 5 new tokens" in proc.stderr or "dense:" in proc.stderr
    assert "tokens/s" in proc.stderr
    assert proc.stdout.strip() != ""


def test_cli_generate_bad_input(tmp_path):
    assert_user_error(run_cli("generate", "--model", "tiny:llama", "--prompt", "hi"),
                      "--centroids", "--predictor")
    assert_user_error(run_cli("generate", "--model", "tiny:llama", "--dense"), "--prompt")
    masks = random_masks(load_model("tiny:llama").model, 0.5)
    write_clustering(tmp_path / "c", "tiny:llama", masks)
    assert_user_error(run_cli("generate", "--centroids", str(tmp_path / "c"), "--predictor",
                              str(tmp_path / "missing"), "--prompt", "hi"), "predictor")
    assert_user_error(run_cli("generate", "--model", "tiny:opt", "--centroids", str(tmp_path / "c"),
                              "--predictor", str(tmp_path / "missing"), "--prompt", "hi"),
                      "tiny:llama")


@pytest.mark.slow
def test_embedded_model_sparse_greedy_equals_masked_dense():
    loaded = load_model("embedded:smollm2-135m")
    model = loaded.model
    masks = random_masks(model, 0.5)
    choose = projection_chooser(model)
    ids = torch.tensor([loaded.tokenizer.encode(PROMPT)])
    with masked_by_chooser(model, masks, choose):
        want = greedy_tokens(model, ids, 6)
    with sparse_ffns(model, build_layouts(model, masks, layout="auto", slab_budget_mb=64),
                     choose):
        got = greedy_tokens(model, ids, 6)
    assert got == want


def test_generate_thresholds_only_the_ffn_activation():
    """Mask mode and (the default for site intermediate) thresholds |a|; centroids of gate
    or up default to replace, and and is refused for them in one line."""
    assert mask_mode_of(GenerateConfig(prompt="x"), {"sites": "intermediate"}) == "and"
    assert mask_mode_of(GenerateConfig(prompt="x"), {}) == "and"
    assert mask_mode_of(GenerateConfig(prompt="x"), {"sites": "gate"}) == "replace"
    assert mask_mode_of(GenerateConfig(prompt="x", mask_mode="replace"),
                        {"sites": "intermediate"}) == "replace"
    with pytest.raises(UserError, match="over site 'up': use --mask-mode replace"):
        mask_mode_of(GenerateConfig(prompt="x", mask_mode="and", centroids="c"), {"sites": "up"})
