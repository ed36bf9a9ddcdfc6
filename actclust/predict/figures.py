"""After training: the neuron thresholds and the train/validation figures of predictor.json.

The clustering's effective density on the training tokens (the use-weighted mean of
|c| / width under its own assignment) is the density a neuron predictor is held to:
its per-layer threshold is the logit quantile that switches on that share of neurons
on a sample of training tokens.
"""

from __future__ import annotations

import numpy as np

from actclust import kernels
from actclust.io.centroid_store import load_centroids
from actclust.predict import features as F

CHUNK = 512  # tokens per forward, to keep (chunk, L, width) logits small
THRESHOLD_SAMPLE_TOKENS = 8192


def _chunks(net, spec, shards):
    """Yield (logits (n, L, O) tensor, packed true masks (n, L, B)) over the shards."""
    import torch

    with torch.no_grad():
        for i in shards:
            h, bits = F.read_shard(spec, i)
            for s in range(0, len(h), CHUNK):
                yield net(torch.from_numpy(h[s:s + CHUNK])), bits[s:s + CHUNK]


def finish(net, spec, loop) -> dict:
    """Thresholds (kind neuron) and per-layer figures; streams the feature shards."""
    import torch

    net.eval()
    kind = loop.kind
    meta, centroids = load_centroids(loop.centroids)
    targets = F.Targets(kind, centroids, spec.width, meta.get("rule"))
    norms = [kernels.popcount(c).astype(np.int64) for c in centroids]
    L = len(spec.layers)
    train, val = F.split_shards(F.shard_count(len(loop.seq), spec.shard_windows))

    tokens, hits, centroid_bits, sample, sampled = 0, np.zeros(L), np.zeros(L), [], 0
    for logits, bits in _chunks(net, spec, train):
        labels = targets.labels(bits)
        centroid_bits += [norms[i][labels[:, i]].sum() for i in range(L)]
        tokens += len(bits)
        if kind == "cluster":
            hits += (logits.argmax(-1).numpy() == labels).sum(axis=0)
        elif sampled < THRESHOLD_SAMPLE_TOKENS:
            sample.append(logits[:THRESHOLD_SAMPLE_TOKENS - sampled])
            sampled += len(sample[-1])
    density = centroid_bits / (tokens * spec.width)
    out = {"training_tokens": tokens, "cluster_density": float(density.mean())}
    rows = [{"layer": layer, "cluster_density": float(density[i])}
            for i, layer in enumerate(spec.layers)]

    if kind == "cluster":
        val_hits, val_tokens = np.zeros(L), 0
        for logits, bits in _chunks(net, spec, val):
            val_hits += (logits.argmax(-1).numpy() == targets.labels(bits)).sum(axis=0)
            val_tokens += len(bits)
        for i, row in enumerate(rows):
            row["train_accuracy"] = float(hits[i] / tokens)
            row["validation_accuracy"] = float(val_hits[i] / val_tokens) if val_tokens else None
        out["train_accuracy"] = float(hits.sum() / (tokens * L))
        out["validation_accuracy"] = float(val_hits.sum() / (val_tokens * L)) if val_tokens \
            else None
        out["validation_tokens"] = val_tokens
    else:
        sample = torch.cat(sample)  # (n, L, width)
        thresholds = []
        for i in range(L):
            values = sample[:, i].reshape(-1)
            off = int(round((1.0 - density[i]) * values.numel()))  # neurons left off
            thresholds.append(float(values.kthvalue(max(1, off)).values) if off else -np.inf)
        for split, shards in (("train", train), ("validation", val)):
            counts, n = _neuron_counts(net, spec, shards, thresholds)
            for i, row in enumerate(rows):
                row.update(_ratios(split, counts[i], n, spec.width))
            out.update(_ratios(split, counts.sum(axis=0), n * L, spec.width))
            if split == "validation":
                out["validation_tokens"] = n
        for row, t in zip(rows, thresholds):
            row["threshold"] = t
    out["per_layer"] = rows
    return out


def _neuron_counts(net, spec, shards, thresholds):
    """Per layer [predicted bits, true bits, overlap] over the shards, and the token count."""
    import torch

    counts, n = np.zeros((len(spec.layers), 3)), 0
    t = torch.tensor(thresholds)[None, :, None]
    for logits, bits in _chunks(net, spec, shards):
        pred = (logits > t).numpy()
        true = np.unpackbits(bits, axis=-1, count=spec.width, bitorder="little").astype(bool)
        counts += np.stack([pred.sum(axis=(0, 2)), true.sum(axis=(0, 2)),
                            (pred & true).sum(axis=(0, 2))], axis=1)
        n += len(bits)
    return counts, n


def _ratios(split: str, c, tokens: int, width: int) -> dict:
    pred, true, both = (float(v) for v in c)
    return {f"{split}_recall": both / true if true else None,
            f"{split}_precision": both / pred if pred else None,
            f"{split}_density": pred / (tokens * width) if tokens else None}
