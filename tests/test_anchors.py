"""TEAL, CATS and WINA anchors: each against an independent masked forward written here
with plain hooks, calibration against its target, FFN bytes by hand, bad input."""

import functools
import math

import numpy as np
import pytest
import torch

from actclust.capture.extract import run_extract
from actclust.errors import UserError
from actclust.config import EvaluateConfig, ExtractConfig, build
from actclust.evaluation import ffn_bytes, fronts
from actclust.evaluation.anchor_eval import run_anchor
from actclust.evaluation.metrics import F, STAT_FIELDS
from actclust.io.corpus import load_windows
from actclust.io.models import load_model, load_tokenizer
from helpers import assert_user_error, run_cli

SEQ = 32
PREFIX = 1


def extract(name, root, split="train", tokens=SEQ * 40):
    out = root / f"masks-{split}"
    run_extract(build(ExtractConfig, dict(model=name, corpus="embedded:pydoc", seq_len=SEQ,
                                           max_tokens=tokens, split=split, sparsity=0.5,
                                           out=str(out))))
    return out


@pytest.fixture(scope="module", params=["tiny:llama", "tiny:opt"])
def masks(request, tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp(request.param.replace(":", "-"))
    return request.param, extract(request.param, root)


def anchor(masks_dir, method, sparsity, out, **kw):
    values = dict(anchor=method, anchor_sparsity=sparsity, masks=str(masks_dir), out=str(out),
                  max_tokens=SEQ * 8, dense_prefix=PREFIX)
    values.update(kw)
    return run_anchor(build(EvaluateConfig, values))


def ffn_parts(layer):
    """(module whose input is x, gate or None, up/fc1, down/fc2, act) of a decoder layer."""
    if hasattr(layer, "mlp"):
        mlp = layer.mlp
        return mlp, mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
    return layer.fc1, None, layer.fc1, layer.fc2, None


def body(t, windows):
    return t.reshape(windows, SEQ, t.shape[-1])[:, PREFIX:]


def keep_prefix(keep, windows):
    keep = keep.reshape(windows, SEQ, keep.shape[-1]).clone()
    keep[:, :PREFIX] = True
    return keep


@functools.lru_cache(maxsize=None)
def _reference_model(name):
    """The model the reference forwards run on, loaded once per module (hooks are removed
    after every use)."""
    return load_model(name).model


def reference(name, method, report):
    """Held-out perplexity and per-layer kept counts of ``method``, from eval.json's
    thresholds, with hooks written independently of actclust's."""
    model = _reference_model(name)
    layers = model.model.layers if hasattr(model.model, "layers") else model.model.decoder.layers
    windows = load_windows("embedded:pydoc", load_tokenizer(name), SEQ, split="heldout",
                           max_tokens=SEQ * 8)
    t = report["thresholds"]
    s = report["anchor_sparsity"]
    kept = {}
    handles = []

    def count(key, keep, w):
        kept[key] = kept.get(key, 0) + int(body(keep, w).sum())

    def topk_keep(a, weight):
        n = a.shape[-1]
        scores = a.abs() * weight.norm(dim=0)
        idx = scores.topk(int(round((1 - s) * n)), dim=-1).indices
        return torch.zeros_like(a, dtype=torch.bool).scatter(-1, idx, True)

    current = {}
    for i, layer in enumerate(layers):
        x_module, gate, up, down, act = ffn_parts(layer)
        if method == "cats":
            def cats(mod, args, out, i=i, gate=gate, up=up, down=down, act=act):
                x = args[0]
                g = act(gate(x))
                keep = keep_prefix(g.abs() > t["g"][i], current["w"]).reshape(g.shape)
                count((i, "g"), keep, current["w"])
                return down(g * keep * up(x))
            handles.append(layer.mlp.register_forward_hook(cats))
            continue

        def sparsify(a, key, i, weight):
            if method == "teal":
                keep = a.abs() > t[key][i]
            else:
                keep = topk_keep(a, weight)
            keep = keep_prefix(keep, current["w"]).reshape(a.shape)
            count((i, key), keep, current["w"])
            return a * keep
        handles.append(x_module.register_forward_pre_hook(
            lambda mod, args, i=i, w=(gate if gate is not None else up).weight:
            (sparsify(args[0], "x", i, w),)))
        handles.append(down.register_forward_pre_hook(
            lambda mod, args, i=i, w=down.weight: (sparsify(args[0], "h", i, w),)))
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(windows), 4):
            ids = torch.tensor(windows.ids[start:start + 4])
            current["w"] = len(ids)
            logp = torch.log_softmax(model(ids).logits[:, :-1].double(), dim=-1)
            total += float(-logp.gather(-1, ids[:, 1:, None]).sum())
            tokens += ids.shape[0] * (SEQ - 1)
    for h in handles:
        h.remove()
    return math.exp(total / tokens), kept


@pytest.fixture(scope="module")
def embedded_masks(tmp_path_factory, ray_session):
    name = "embedded:smollm2-135m"
    return name, extract(name, tmp_path_factory.mktemp("embedded"), tokens=SEQ * 20)


def widths_of(name):
    config = load_model(name).model.config
    d_ff = getattr(config, "intermediate_size", None) or config.ffn_dim
    return {"x": config.hidden_size, "h": d_ff, "g": d_ff}


@pytest.mark.parametrize("method", ["teal", "cats", "wina"])
def test_anchor_equals_an_independent_masked_forward(masks, method, tmp_path):
    name, masks_dir = masks
    if method == "cats" and name == "tiny:opt":
        with pytest.raises(UserError, match="no gated FFN"):
            anchor(masks_dir, method, 0.5, tmp_path / method)
        return
    check_against_reference(name, masks_dir, method, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["teal", "cats", "wina"])
def test_anchor_on_the_embedded_model(embedded_masks, method, tmp_path):
    check_against_reference(*embedded_masks, method, tmp_path)


def check_against_reference(name, masks_dir, method, tmp_path):
    report = anchor(masks_dir, method, 0.5, tmp_path / method)
    ppl, kept = reference(name, method, report)
    assert report["anchor_ppl"] == pytest.approx(ppl, rel=1e-6)
    assert report["anchor_ppl"] != pytest.approx(report["dense_ppl"], rel=1e-9)
    masked_tokens = 8 * (SEQ - PREFIX)
    assert report["masked_tokens"] == masked_tokens
    widths = widths_of(name)
    assert {key for _, key in kept} == set(report["anchor_realized_sparsity"])
    for row in report["per_layer"]:
        for key, sparsity in row["sparsity"].items():
            entries = masked_tokens * widths[key]
            assert kept[(row["layer"], key)] == round((1 - sparsity) * entries)
    lo, hi = report["anchor_ppl_ci95"]
    assert lo <= report["anchor_ppl"] <= hi
    assert report["bootstrap"]["paired"] and report["dense_ppl_ci95"][0] <= report["dense_ppl"]


def test_wina_keeps_exactly_its_count_and_bytes_follow(masks, tmp_path):
    name, masks_dir = masks
    report = anchor(masks_dir, "wina", 0.4, tmp_path / "w")
    d_model, d_ff = 64, (192 if name == "tiny:llama" else 256)
    kx, kh = round(0.6 * d_model) / d_model, round(0.6 * d_ff) / d_ff
    assert report["anchor_realized_sparsity"] == pytest.approx({"x": 1 - kx, "h": 1 - kh})
    gated = name == "tiny:llama"
    matrices = 3 if gated else 2
    expected = ((matrices - 1) * kx + kh) / matrices  # every matrix d_model x d_ff
    assert report["ffn_bytes_fraction"]["anchor"] == pytest.approx(expected, rel=1e-12)
    assert all(row["ffn_bytes_fraction"] == pytest.approx(expected) for row in report["per_layer"])


def test_calibration_meets_the_target_on_the_calibration_tokens(masks, tmp_path):
    name, masks_dir = masks
    s = 0.3
    report = anchor(masks_dir, "teal", s, tmp_path / "t", calibration_windows=6)
    assert report["calibration"]["tokens"] == 6 * (SEQ - PREFIX)
    # Independently: |x| of the first six fitting windows, dense, at masked positions.
    model = load_model(name).model
    fitting = load_windows("embedded:pydoc", load_tokenizer(name), SEQ, split="train",
                           max_tokens=SEQ * 40)
    layers = model.model.layers if hasattr(model.model, "layers") else model.model.decoder.layers
    seen = {}
    handles = [ffn_parts(layer)[0].register_forward_pre_hook(
        lambda mod, args, i=i: seen.__setitem__(i, args[0].detach()))
        for i, layer in enumerate(layers)]
    with torch.inference_mode():
        model(torch.tensor(fitting.ids[:6]))
    for h in handles:
        h.remove()
    for i, threshold in enumerate(report["thresholds"]["x"]):
        share = float((body(seen[i], 6).abs() <= threshold).float().mean())
        assert abs(share - s) <= 0.01
        assert abs(report["calibration"]["sparsity"]["x"][i] - s) <= 0.01
    if name == "tiny:llama":  # h of a SiLU FFN has no ties at zero
        assert all(abs(v - s) <= 0.01 for v in report["calibration"]["sparsity"]["h"])


def test_ffn_bytes_by_hand():
    weights = [{"gate": 6, "up": 6, "down": 6}, {"gate": 6, "up": 6, "down": 6}]
    teal = ffn_bytes.anchor_reads("teal", {"x": [0.5, 1.0], "h": [0.25, 0.5]})
    # layer 0: 3 + 3 + 1.5 of 18; layer 1: 6 + 6 + 3 of 18
    assert ffn_bytes.fraction(weights, teal) == pytest.approx((7.5 + 15) / 36)
    cats = ffn_bytes.anchor_reads("cats", {"g": [0.25, 0.5]})
    assert ffn_bytes.fraction(weights, cats) == pytest.approx((6 + 3 + 6 + 6) / 36)
    # One clustered slot (model layer 1) of width 4 over 10 tokens; layer 0 stays dense.
    stats = np.zeros((1, len(STAT_FIELDS)))
    stats[0, F["tokens"]] = 10
    stats[0, F["oracle_bits"]] = 20  # density 0.5
    stats[0, F["kept_bits"]] = 10  # 0.25
    stats[0, F["centroid_bits"]] = 10  # in mask mode replace the kept bits are the centroid's
    stats[0, F["random_kept_bits"]] = 10
    replace = ffn_bytes.mask_fractions(stats, [1], 4, weights, k=8, mask_mode="replace")
    assert replace["oracle"] == pytest.approx((18 + 12 + 3) / 36)
    assert replace["cluster"] == pytest.approx((18 + 12 + 1.5) / 36)  # needs the true mask
    assert replace["random"] == pytest.approx((18 + 4.5) / 36)  # known before the FFN
    static = ffn_bytes.mask_fractions(stats, [1], 4, weights, k=1, mask_mode="replace")
    assert static["cluster"] == pytest.approx((18 + 4.5) / 36)
    # Mask mode and: the one centroid (density 0.5) is known before the FFN runs, so gate
    # and up read at its density and down at the kept share (m AND c, 0.25).
    stats[0, F["centroid_bits"]] = 20
    static_and = ffn_bytes.mask_fractions(stats, [1], 4, weights, k=1, mask_mode="and")
    assert static_and["cluster"] == pytest.approx((18 + 3 + 3 + 1.5) / 36)
    assert static_and["random"] == pytest.approx((18 + 12 + 1.5) / 36)  # needs the true mask
    predicted = np.array([[10, 0, 10, 20, 5, 0, 0]], dtype=float)  # density 0.25, m AND p 0.125
    assert ffn_bytes.predicted_fraction(predicted, [1], 4, weights, "and", 0.01) == \
        pytest.approx((18 + 3 + 0.75) / 36 + 0.01)
    assert ffn_bytes.predicted_fraction(predicted, [1], 4, weights, "replace", 0.0) == \
        pytest.approx((18 + 4.5) / 36)


def test_bad_anchor_input_is_one_line(masks, tmp_path):
    name, masks_dir = masks
    base = ("evaluate", "--masks", str(masks_dir), "--out", str(tmp_path / "e"))
    assert_user_error(run_cli(*base, "--anchor", "deja-vu", "--anchor-sparsity", "0.5"),
                      "anchor must be one of teal, cats, wina")
    for s in ("0", "1", "1.5"):
        assert_user_error(run_cli(*base, "--anchor", "teal", "--anchor-sparsity", s),
                          "anchor_sparsity must be in (0, 1)")
    if name == "tiny:opt":
        assert_user_error(run_cli(*base, "--anchor", "cats", "--anchor-sparsity", "0.5"),
                          "no gated FFN")
        heldout = extract(name, tmp_path, split="heldout", tokens=SEQ * 20)
        assert_user_error(run_cli("evaluate", "--masks", str(heldout), "--out",
                                  str(tmp_path / "h"), "--anchor", "teal",
                                  "--anchor-sparsity", "0.5"), "holds no fitting windows")
    assert not (tmp_path / "e" / "eval.json").exists()


def test_greedy_teal_spreads_the_same_budget_over_layers(masks, tmp_path):
    name, masks_dir = masks
    base = ("evaluate", "--masks", str(masks_dir), "--out", str(tmp_path / "e"),
            "--anchor-sparsity", "0.5", "--anchor-allocation", "greedy")
    if name == "tiny:opt":
        assert_user_error(run_cli(*base, "--anchor", "teal"), "not gated")
        return
    assert_user_error(run_cli(*base, "--anchor", "wina"), "applies to teal, not wina")
    report = anchor(masks_dir, "teal", 0.5, tmp_path / "g", anchor_allocation="greedy")
    record = report["anchor_allocation"]
    assert record["budget"] == 0.5 and record["ffn_bytes_fraction"] <= 0.5
    assert record["sample_tokens"] == 16 * (SEQ - PREFIX)
    assert len(record["sparsity"]) == len(report["per_layer"]) == 2
    for i, s in enumerate(record["sparsity"]):  # each layer's own quantile
        assert abs(report["calibration"]["sparsity"]["x"][i] - s) <= 0.01
        assert abs(report["calibration"]["sparsity"]["h"][i] - s) <= 0.01
    ppl, _ = reference(name, "teal", report)
    assert report["anchor_ppl"] == pytest.approx(ppl, rel=1e-6)
    assert report["identity"]["anchor_allocation"] == "greedy"
    assert "anchor_allocation" not in anchor(masks_dir, "teal", 0.5, tmp_path / "u")["identity"]


def test_budget_table_takes_each_method_best_within_the_budget():
    rows = [{"k": 1, "objective": "theta=0.5", "algorithm": "hamming-kmeans",
             "mask_mode": "replace", "cluster_ffn_bytes_fraction": 0.45, "cluster_ppl": 30.0,
             "cluster_ppl_ci95": [29.0, 31.0]},
            {"k": 64, "objective": "theta=0.5", "algorithm": "hamming-kmeans",
             "mask_mode": "replace", "cluster_ffn_bytes_fraction": 0.8, "cluster_ppl": 12.0,
             "cluster_ppl_ci95": [11.5, 12.5], "predictor_kind": "cluster",
             "predicted_ffn_bytes_fraction": 0.52, "predicted_ppl": 20.0,
             "predicted_ppl_ci95": [19.0, 21.0]}]
    anchors = [{"anchor": "teal", "anchor_sparsity": s, "ffn_bytes_fraction": f,
                "anchor_ppl": p, "anchor_ppl_ci95": [p - 1, p + 1]}
               for s, f, p in ((0.6, 0.4, 25.0), (0.5, 0.5, 19.5), (0.4, 0.6, 15.0))]
    found = fronts.points(rows, anchors)
    assert sum(p["method"] == fronts.UPPER_BOUND for p in found) == 1  # K=64, oracle assignment
    table = {row["budget"]: row for row in fronts.budget_table(found)}
    assert table[0.4]["winner"] == "teal" and table[0.4]["best"]["static"] is None
    assert table[0.5]["winner"] == "teal" and table[0.5]["best"]["static"]["ppl"] == 30.0
    assert table[0.5]["best"]["teal"]["ppl"] == 19.5
    assert table[0.6]["winner"] == "teal" and table[0.6]["best"]["predicted cluster"]["ppl"] == 20
    assert table[0.5]["best"]["predicted cluster"] is None  # 0.52 > 0.5
    assert not table[0.6]["overlaps"] and not table[0.5]["overlaps"]
    assert "| 0.6 | 20 [19, 21] @ 0.520" in fronts.markdown(fronts.budget_table(found))


def test_budget_winner_is_separated_by_the_paired_ratio_when_windows_pair():
    rng = np.random.default_rng(3)
    tokens = np.full(40, 255)
    hard = rng.uniform(1.5, 4.5, 40) * tokens  # windows differ far more than the methods
    teal_nll = hard + rng.normal(0, 2, 40)

    def per_window(mode, nll):
        return {"seq": list(range(40)), "tokens": tokens.tolist(), "nll": {mode: nll.tolist()}}

    def ppl(nll):
        return float(np.exp(nll.sum() / tokens.sum()))

    def table_for(cluster_nll):
        row = {"k": 64, "objective": "theta=0.5", "algorithm": "hamming-kmeans",
               "mask_mode": "and", "predictor_kind": "cluster",
               "predicted_ffn_bytes_fraction": 0.48, "predicted_ppl": ppl(cluster_nll),
               "predicted_ppl_ci95": [ppl(cluster_nll) * 0.8, ppl(cluster_nll) * 1.2],
               "per_window": per_window("predicted", cluster_nll)}
        anchor = {"anchor": "teal", "anchor_sparsity": 0.5, "ffn_bytes_fraction": 0.49,
                  "anchor_ppl": ppl(teal_nll),
                  "anchor_ppl_ci95": [ppl(teal_nll) * 0.8, ppl(teal_nll) * 1.2],
                  "per_window": per_window("anchor", teal_nll)}
        return {r["budget"]: r for r in fronts.budget_table(fronts.points([row], [anchor]))}

    # 2% lower on every window: the own intervals overlap, the paired ratio separates.
    lower = table_for(teal_nll - 0.02 * tokens)[0.5]
    assert lower["winner"] == "predicted cluster" and lower["runner_up"] == "teal"
    ratio, lo, hi = lower["ratio"]
    assert ratio == pytest.approx(np.exp(-0.02)) and hi < 1.0 and not lower["overlaps"]
    line = fronts.markdown([lower]).splitlines()[-1]
    assert line.endswith(f"predicted cluster (lower than teal: paired ratio {ratio:.3f} "
                         f"[{lo:.3f}, {hi:.3f}]) |")
    # A difference far smaller than the windows' noise: not separated, either way round.
    noisy = table_for(teal_nll - 0.002 * tokens + rng.normal(0, 40, 40))[0.5]
    assert noisy["ratio"][1] < 1.0 <= noisy["ratio"][2] and noisy["overlaps"]
    assert "not separated from" in fronts.markdown([noisy])
    # Losses of other windows do not pair: the own intervals decide (they overlap).
    found = fronts.points([], [{"anchor": "teal", "anchor_sparsity": 0.5,
                                "ffn_bytes_fraction": 0.49, "anchor_ppl": 20.0,
                                "anchor_ppl_ci95": [19.0, 21.0],
                                "per_window": per_window("anchor", teal_nll)},
                               {"anchor": "wina", "anchor_sparsity": 0.5,
                                "ffn_bytes_fraction": 0.49, "anchor_ppl": 20.5,
                                "anchor_ppl_ci95": [19.5, 21.5],
                                "per_window": {**per_window("anchor", teal_nll),
                                               "seq": list(range(1, 41))}}])
    unpaired = fronts.budget_table(found)[1]
    assert unpaired["winner"] == "teal" and unpaired["ratio"] is None and unpaired["overlaps"]
    assert "(interval overlaps wina)" in fronts.markdown([unpaired])


def test_trials_table_has_a_row_per_trial_with_its_predictors():
    rows = [{"k": 1, "objective": "theta=0.5", "algorithm": "hamming-kmeans",
             "cluster_ffn_bytes_fraction": 0.45, "cluster_ppl": 30.0,
             "cluster_ppl_ci95": [29.0, 31.0], "weighted_recall": 0.7},
            {"k": 64, "objective": "density=0.5", "algorithm": "hamming-kmeans",
             "cluster_ffn_bytes_fraction": 0.8, "cluster_ppl": 12.0,
             "cluster_ppl_ci95": [11.5, 12.5], "weighted_recall": 0.81234,
             "predictor_kind": "cluster", "predicted_ffn_bytes_fraction": 0.52,
             "predicted_ppl": 20.0, "predicted_ppl_ci95": [19.0, 21.0],
             "neuron_predicted_ppl": 18.0, "neuron_predicted_ppl_ci95": [17.0, 19.5],
             "neuron_predicted_ffn_bytes_fraction": 0.6}]
    lines = fronts.trials_markdown(rows).splitlines()
    assert len(lines) == 4 and lines[0].count("|") == lines[1].count("|") == 11
    assert lines[2] == ("| hamming-kmeans | theta=0.5 | 1 | 30 [29, 31] | 0.450 | 0.700 | – | – "
                        "| – | – |")
    assert lines[3] == ("| hamming-kmeans | density=0.5 | 64 | 12 [11.5, 12.5] | 0.800 | 0.812 "
                        "| 20 [19, 21] | 0.520 | 18 [17, 19.5] | 0.600 |")


def test_a_union_of_top_m_clusters_is_named_on_the_front_and_in_the_trials_table():
    row = {"k": 256, "objective": "theta=0.5", "algorithm": "hamming-kmeans",
           "mask_mode": "and", "bits_by": "activation_mass", "predictor_kind": "cluster",
           "top_m": 2, "predicted_ffn_bytes_fraction": 0.58, "predicted_ppl": 19.3,
           "predicted_ppl_ci95": [17.8, 21.0], "neuron_predicted_ppl": 25.0,
           "neuron_predicted_ppl_ci95": [23.0, 27.0],
           "neuron_predicted_ffn_bytes_fraction": 0.5}
    labels = {p["method"]: p["label"] for p in fronts.points([row], [])}
    assert labels["predicted cluster"] == "K=256 theta=0.5 mass bits hamming-kmeans top-2"
    assert labels["neuron predictor"] == "K=256 theta=0.5 mass bits hamming-kmeans"
    assert "| 19.3 [17.8, 21] (top-2) | 0.580 |" in fronts.trials_markdown([row])
    top1 = {**row, "top_m": 1}
    assert {p["label"] for p in fronts.points([top1], [])} == \
        {"K=256 theta=0.5 mass bits hamming-kmeans"}
    assert "(top-" not in fronts.trials_markdown([top1])
