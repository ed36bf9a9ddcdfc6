"""The sparse FFN equals the dense FFN with its activation masked by the token's centroid."""

from __future__ import annotations

import pytest
import torch

from actclust.errors import UserError
from actclust.io.models import load_model
from actclust.sparse.ffn import SparseFFN, sparse_ffns
from actclust.sparse.layout import SparseLayout, ffn_parts, neuron_major

K = 6


@pytest.fixture(scope="module", params=["tiny:llama", "tiny:opt"])
def loaded(request):
    return load_model(request.param)


def centroid_masks(d_ff: int, seed: int = 0) -> torch.Tensor:
    """(K, d_ff) bool: densities 0.3..0.8, plus an empty and a full centroid."""
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(K, d_ff, generator=gen) < torch.linspace(0.3, 0.8, K)[:, None]
    masks[K - 2] = False
    masks[K - 1] = True
    return masks


def projection_chooser(d_model: int, layers: int, seed: int = 1):
    """choose(layer, h): argmax of a fixed random projection of h, one per layer."""
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(layers, d_model, K, generator=gen)

    def choose(layer, h):
        return (h @ proj[layer]).argmax(dim=-1)
    return choose


def reference(part, h, mask):
    """Masked dense FFN, written on the model's own modules: out(act(in(h)) * c)."""
    if part.family == "gated":
        gate, up = part.inputs
        a = part.act(gate(h)) * up(h)
    else:
        a = part.act(part.inputs[0](h))
    return part.output(a * mask.to(a.dtype))


def hidden(loaded, tokens: int, seed: int = 2) -> torch.Tensor:
    d = loaded.model.config.hidden_size
    return torch.randn(tokens, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", ["slab", "gather"])
@pytest.mark.parametrize("path", ["auto", "sparse", "dense"])
@pytest.mark.parametrize("tokens", [1, 37])
def test_sparse_ffn_equals_masked_dense(loaded, layout, path, tokens):
    parts = ffn_parts(loaded.model)
    choose = projection_chooser(loaded.model.config.hidden_size, len(parts))
    for layer, part in enumerate(parts):
        weights = neuron_major(part)
        masks = centroid_masks(weights.d_ff, seed=layer)
        lay = SparseLayout(weights, masks, layout=layout)
        assert len(lay.slabs) == (K if layout == "slab" else 0)
        ffn = SparseFFN(lay, layer, choose, part.act, path=path)
        h = hidden(loaded, tokens, seed=layer)
        ids = choose(layer, h)
        if tokens > 1:
            assert len(set(ids.tolist())) > 1  # really a mixed batch
        with torch.no_grad():
            got = ffn(h)
            want = reference(part, h, masks[ids])
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # A leading batch dimension is kept.
        with torch.no_grad():
            torch.testing.assert_close(ffn(h[None]), want[None], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["slab", "gather"])
@pytest.mark.parametrize("path", ["auto", "sparse", "dense"])
@pytest.mark.parametrize("tokens", [1, 37])
def test_mask_mode_and_keeps_only_the_centroids_neurons_above_tau(loaded, layout, path, tokens):
    # Cluster, then threshold: out(a * (c AND |a| > tau)), tau the median |a| of the layer.
    parts = ffn_parts(loaded.model)
    choose = projection_chooser(loaded.model.config.hidden_size, len(parts))
    kept, dropped, differs = 0, 0, False
    for layer, part in enumerate(parts):
        weights = neuron_major(part)
        masks = centroid_masks(weights.d_ff, seed=layer)
        h = hidden(loaded, tokens, seed=layer)
        with torch.no_grad():
            full = reference(part, h, torch.ones(weights.d_ff, dtype=torch.bool))
            a = (part.act(part.inputs[0](h)) * part.inputs[1](h) if part.family == "gated"
                 else part.act(part.inputs[0](h)))
            tau = float(a.abs().median())
            ids = choose(layer, h)
            keep = masks[ids] & (a.abs() > tau)
            want = reference(part, h, keep)
            ffn = SparseFFN(SparseLayout(weights, masks, layout=layout), layer, choose,
                            part.act, path=path, tau=tau)
            got = ffn(h)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        kept += int(keep.sum())
        dropped += int((masks[ids] & ~keep).sum())
        differs |= not torch.allclose(got, full, rtol=1e-3, atol=1e-3)
    assert kept > 0 and dropped > 0 and differs  # neurons kept, and the threshold drops some


def test_paths_taken(loaded):
    """One token reads one block; a batch is grouped or dense by the documented rule."""
    part = ffn_parts(loaded.model)[0]
    weights = neuron_major(part)
    masks = centroid_masks(weights.d_ff)
    lay = SparseLayout(weights, masks, layout="slab")
    h = hidden(loaded, 64)
    one_cluster = SparseFFN(lay, 0, lambda layer, x: torch.zeros(x.shape[:-1], dtype=torch.long),
                            part.act)
    all_clusters = SparseFFN(lay, 0, lambda layer, x: torch.arange(x.shape[0]) % K, part.act)
    with torch.no_grad():
        one_cluster(h[:1])
        one_cluster(h)  # one cluster reads fewer bytes than dense: grouped
        all_clusters(h)  # K clusters, ~3x the dense bytes: dense
        all_clusters.min_group_tokens = 8
        all_clusters(h)  # 64/6 >= 8 tokens each: grouped
    assert one_cluster.calls == {"single": 1, "grouped": 1}
    assert all_clusters.calls == {"dense": 1, "grouped": 1}


def test_auto_layout_keeps_slabs_within_budget(loaded):
    weights = neuron_major(ffn_parts(loaded.model)[0])
    masks = centroid_masks(weights.d_ff)
    full = SparseLayout(weights, masks, layout="slab")
    sizes = [full.slab_bytes(c) for c in range(K)]
    assert full.slab_bytes_used == pytest.approx(sum(sizes))
    priority = [3, 0, 5, 1, 2, 4]
    budget = sizes[3] + sizes[0] + 1
    auto = SparseLayout(weights, masks, layout="auto", slab_budget_bytes=budget, priority=priority)
    # 3 and 0 fit; then only clusters that still fit the rest (the empty one, 4).
    assert set(auto.slabs) == {3, 0, 4}
    assert auto.slab_bytes_used <= budget
    for c in auto.slabs:
        torch.testing.assert_close(auto.slabs[c].in_w, full.slabs[c].in_w)


def test_swap_restores_the_model_even_on_error(loaded):
    model = loaded.model
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = model(ids).logits
    parts = ffn_parts(model)
    originals = [(p.layer, dict(p.layer.named_modules())) for p in parts]
    layouts = {i: SparseLayout(neuron_major(p), centroid_masks(neuron_major(p).d_ff))
               for i, p in enumerate(parts)}

    def broken(layer, h):
        raise RuntimeError("chooser failed")
    with pytest.raises(RuntimeError, match="chooser failed"):
        with torch.no_grad(), sparse_ffns(model, layouts, broken) as modules:
            assert all(isinstance(m, SparseFFN) for m in modules.values())
            model(ids)
    for layer, named in originals:
        assert dict(layer.named_modules()).keys() == named.keys()
        assert all(named[k] is v for k, v in layer.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)


def test_full_centroids_give_the_dense_model(loaded):
    """All-ones centroids: the swapped model's logits equal the original model's."""
    model = loaded.model
    ids = torch.tensor([[7, 1, 2, 3, 9, 4]])
    parts = ffn_parts(model)
    layouts = {i: SparseLayout(neuron_major(p), torch.ones(2, neuron_major(p).d_ff, dtype=bool))
               for i, p in enumerate(parts)}

    def choose_full(layer, h):
        return torch.ones(h.shape[:-1], dtype=torch.long)
    with torch.no_grad():
        dense = model(ids).logits
        with sparse_ffns(model, layouts, choose_full):
            sparse = model(ids).logits
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny:gpt2", "tiny:gpt-neox"])
def test_unsupported_families_are_a_user_error(name):
    model = load_model(name).model
    with pytest.raises(UserError, match="does not support .* gated FFNs .* ReLU FFNs"):
        ffn_parts(model)


def test_centroid_width_must_match(loaded):
    weights = neuron_major(ffn_parts(loaded.model)[0])
    with pytest.raises(UserError, match="d_ff"):
        SparseLayout(weights, torch.ones(3, weights.d_ff + 8, dtype=bool))
