import math

import pytest
import torch

from actclust.errors import UserError
from actclust.io.models import TINY_FAMILIES, ffn_sites, load_model, load_tokenizer, site_width

D_FF = {"opt": 256, "llama": 192, "gpt2": 256, "gpt-neox": 256}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_family_loads_and_ffn_sites_are_found(family):
    loaded = load_model(f"tiny:{family}")
    sites = ffn_sites(loaded.model)
    assert len(sites) == loaded.model.config.num_hidden_layers == 2
    assert {site_width(m, "intermediate") for m in sites} == {D_FF[family]}
    assert loaded.is_relu == (family == "opt")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_weights_are_identical_across_loads(family):
    a = load_model(f"tiny:{family}").model.state_dict()
    b = load_model(f"tiny:{family}").model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gated_sites_exist_only_for_gated_models():
    llama = load_model("tiny:llama").model
    assert len(ffn_sites(llama, "gate")) == len(ffn_sites(llama, "up")) == 2
    assert site_width(ffn_sites(llama, "down_out")[0], "down_out") == 64
    with pytest.raises(UserError, match="gated FFN"):
        ffn_sites(load_model("tiny:opt").model, "gate")


def test_unsupported_architecture_is_named():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                                 vocab_size=50, d_kv=8))
    with pytest.raises(UserError, match="T5ForConditionalGeneration is not supported"):
        ffn_sites(model)


@pytest.mark.parametrize("name", ["tiny:bert", "nonsense", "embedded:gpt9", "./no/such/dir"])
def test_unknown_model_ids_are_user_errors(name):
    with pytest.raises(UserError):
        load_tokenizer(name)


@pytest.mark.slow
def test_embedded_model_dense_perplexity_matches_transformers_loss():
    from actclust.io.corpus import load_windows
    from actclust.evaluation.metrics import window_nll

    loaded = load_model("embedded:smollm2-135m")
    assert loaded.model.config.num_hidden_layers == 30
    assert site_width(ffn_sites(loaded.model)[0], "intermediate") == 1536
    windows = load_windows("embedded:pydoc", loaded.tokenizer, 64, split="heldout", max_tokens=128)
    ids = torch.tensor(windows.ids)
    with torch.inference_mode():
        out = loaded.model(ids, labels=ids)
        ours = window_nll(out.logits, ids).sum() / (ids.shape[0] * (ids.shape[1] - 1))
    # Two float32 reductions in different orders: 1.8e-5 apart on an AVX2-only EPYC.
    assert math.exp(ours) == pytest.approx(math.exp(out.loss.item()), rel=1e-4)
    assert 2 < math.exp(ours) < 100
