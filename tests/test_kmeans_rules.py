"""k-means under theta and density objectives: descent, consistency, theta = 0.5 unchanged."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from actclust import hamming, kmeans
from actclust.kernels.rules import AssignRule
from actclust.kernels import assign_scored

REFERENCE = Path(__file__).parent / "data" / "kmeans_theta05_reference.json"


def synthetic_masks(n, d, seed):
    """20 overlapping clusters, 20% bit flips (the generator of the stored reference)."""
    rng = np.random.default_rng(seed)
    centers = rng.random((20, d)) < 0.35
    truth = rng.integers(0, 20, n)
    bits = centers[truth] ^ (rng.random((n, d)) < 0.2)
    return np.packbits(bits, axis=1, bitorder="little")


def digest(res):
    h = hashlib.sha256()
    for a in (res.centroids, res.labels, res.sizes):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tiny_masks():
    """Real masks: tiny:llama on English text, 50% sparsity, two layers (about 2k tokens)."""
    from pydoc_data.topics import topics

    from actclust.capture.hooks import calibrate_thresholds, layer_masks
    from actclust.io.models import load_model

    loaded = load_model("tiny:llama")
    text = " ".join(topics[k] for k in sorted(topics)[:8]).encode()[: 16 * 128]
    ids = np.frombuffer(text, dtype=np.uint8).astype(np.int64).reshape(16, 128)
    taus = calibrate_thresholds(loaded.model, ids, 0.5)
    per_layer = layer_masks(loaded.model, ids, taus)
    width = per_layer[0].shape[1]
    return [np.packbits(m, axis=1, bitorder="little") for m in per_layer[:2]], width


def test_theta_half_matches_stored_reference():
    """Centroids, labels, sizes and cost history at theta = 0.5 equal the pre-rule code's."""
    stored = json.loads(REFERENCE.read_text())
    for case in stored["cases"]:
        x = synthetic_masks(case["n"], case["d"], case["seed"])
        res = kmeans.fit(x, case["k"], theta=0.5, seed=case["seed"], init=case["init"],
                         batch_size=case["batch_size"], max_iter=15, tol=0, backend=case["backend"])
        assert digest(res) == case["digest"], case
        assert [h["cost"] for h in res.history] == case["costs"]
        assert res.iterations == case["iterations"] and res.cost == case["cost"]


def full_cost(x, centroids, rule):
    _, costs = assign_scored(x, centroids, rule, backend="numpy")
    return costs.sum() * rule.cost_scale / len(x)


def assert_descent(res, x, rule):
    costs = [h["cost"] for h in res.history]
    assert all(b <= a + 1e-12 for a, b in zip(costs, costs[1:])), costs
    assert res.cost <= costs[-1] + 1e-12
    assert res.cost == pytest.approx(full_cost(x, res.centroids, rule))
    # the labels are the rule's own assignment, and the centroids its update of them
    labels, _ = assign_scored(x, res.centroids, rule, backend="numpy")
    np.testing.assert_array_equal(res.labels, labels)


@pytest.mark.parametrize("objective", [dict(theta=0.3), dict(theta=0.5), dict(theta=0.7),
                                       dict(density=0.3), dict(density=0.5)],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_lloyd_is_a_descent_on_tiny_model_masks(tiny_masks, objective):
    per_layer, width = tiny_masks
    rule = AssignRule.from_args(**objective)
    for layer, x in enumerate(per_layer):
        res = kmeans.fit(x, 24, seed=0, max_iter=12, tol=0, layer=layer, width=width, **objective)
        assert len(res.history) >= 3
        assert_descent(res, x, rule)
        if rule.kind == "density":
            assert (hamming.popcount(res.centroids) == rule.centroid_bits(width)).all()


def test_theta_rule_beats_hamming_assignment_on_its_own_cost():
    """At theta = 0.3 the consistent fit reaches a lower weighted cost than Hamming assignment."""
    rng = np.random.default_rng(5)
    centers = rng.random((16, 256)) < np.linspace(0.1, 0.7, 16)[:, None]  # mixed densities
    bits = centers[rng.integers(0, 16, 3000)] ^ (rng.random((3000, 256)) < 0.25)
    x = np.packbits(bits, axis=1, bitorder="little")
    rule = AssignRule.from_args(theta=0.3)
    res = kmeans.fit(x, 16, theta=0.3, seed=0, max_iter=30, tol=0)
    assert_descent(res, x, rule)
    labels, _ = hamming.assign(x, res.centroids)
    _, best = assign_scored(x, res.centroids, rule)
    p, q = rule.weights
    m = np.unpackbits(x, axis=1, bitorder="little").astype(np.int64)
    c = np.unpackbits(res.centroids, axis=1, bitorder="little").astype(np.int64)[labels]
    hamming_cost = ((q - p) * m.sum(1) + p * c.sum(1) - q * (m * c).sum(1))
    assert (best <= hamming_cost).all() and (best < hamming_cost).any()


def test_density_fit_workers_resume_and_width():
    x = synthetic_masks(2400, 200, 7)
    one = kmeans.fit(x, 12, density=0.25, width=197, seed=1, max_iter=10, tol=0)
    assert (hamming.popcount(one.centroids) == 49).all()  # floor(0.25 * 197 + 0.5)
    assert not np.unpackbits(one.centroids, axis=1, bitorder="little")[:, 197:].any()
    states = []
    part = kmeans.fit(x, 12, density=0.25, width=197, seed=1, max_iter=4, tol=0,
                      checkpoint=states.append)
    resumed = kmeans.fit(x, 12, density=0.25, width=197, seed=1, max_iter=10, tol=0,
                         resume=states[-1])
    assert part.iterations == 4
    np.testing.assert_array_equal(resumed.centroids, one.centroids)
    assert resumed.history == one.history
    with pytest.raises(ValueError, match="does not match"):
        kmeans.fit(x, 12, theta=0.3, seed=1, max_iter=10, resume=states[-1])


def test_mini_batch_density_keeps_the_budget():
    x = synthetic_masks(2000, 128, 8)
    res = kmeans.fit(x, 10, density=0.4, batch_size=256, seed=0, max_iter=8)
    assert (hamming.popcount(res.centroids) == 51).all()


def test_bad_objective_combinations():
    x = synthetic_masks(100, 64, 0)
    with pytest.raises(ValueError, match="not both"):
        kmeans.fit(x, 2, theta=0.5, density=0.5)
    for bad, message in ((dict(density=0), "density"), (dict(density=1.5), "density"),
                         (dict(theta=0), "theta"), (dict(density=0.5, width=65), "width")):
        with pytest.raises(ValueError, match=message):
            kmeans.fit(x, 2, **bad)


@pytest.mark.slow
def test_descent_on_embedded_model_masks():
    """Real SmolLM2-135M masks (3 layers, 4,096 tokens, 50% sparsity), theta 0.3 / 0.5 / 0.7
    and density 0.5: the full-batch cost never increases."""
    from pydoc_data.topics import topics

    from actclust.capture.hooks import calibrate_thresholds, layer_masks
    from actclust.io.models import load_model, load_tokenizer

    loaded = load_model("embedded:smollm2-135m")
    tok = load_tokenizer("embedded:smollm2-135m")
    text = "\n\n".join(topics[k] for k in sorted(topics)[:40])
    ids = np.asarray(tok.encode(text)[: 16 * 256], dtype=np.int64).reshape(16, 256)
    taus = calibrate_thresholds(loaded.model, ids[:2], 0.5)
    per_layer = layer_masks(loaded.model, ids, taus)
    for layer in (0, 14, 29):
        x = np.packbits(per_layer[layer], axis=1, bitorder="little")
        for objective in (dict(theta=0.3), dict(theta=0.5), dict(theta=0.7), dict(density=0.5)):
            rule = AssignRule.from_args(**objective)
            res = kmeans.fit(x, 64, seed=0, max_iter=15, tol=0, layer=layer, **objective)
            assert len(res.history) >= 5, (layer, objective)
            assert_descent(res, x, rule)
