"""End-to-end greedy decode: the dense model against the sparse FFN, interleaved rounds.

    python benchmarks/decode.py --run runs/decode-smollm            # K = 256, slabs as the
    python benchmarks/decode.py --run runs/decode-smollm --k 16 \
        --slab-budget-mb 4096                                       # budget allows; all slabs
    python benchmarks/decode.py --run runs/decode-qwen --k 16 --slab-budget-mb 12000
    python benchmarks/decode.py --run runs/decode-smollm --smoke-test

``--run`` is an ``actclust run`` directory with trials k=K-density=D (and its cluster
predictor, ``predictor_trials: [k=K-density=D]``) and k=1-density=D, e.g. ``k: [1, 16,
256]``, ``density: [0.5]``, ``predictor: cluster``. Modes, at batch 1 with a KV cache,
--tokens new tokens after a fixed prompt:

- ``dense``: the model as it is;
- ``sparse``: the sparse FFN, each token's cluster named by the trained predictor from
  the FFN input before the FFN runs (the chooser's cost included);
- ``masked``: the dense FFN times the same predicted centroid (sparsity only simulated;
  its tokens are the reference the sparse FFN must reproduce);
- ``static``: the sparse FFN with the K = 1 centroid, no chooser: the floor a predictor
  must pay for itself against.

The modes are interleaved over --rounds rounds; each figure is the median over rounds
with the min and max beside it. Decode tokens/s counts the steps after the prefill. The
ceiling is the speed-up if only the skipped FFN bytes mattered: 1 / ((1 - f) + f (d + p)),
f the FFN's share of the weight bytes a decode step reads (every decoder layer and the
output head), d the centroids' density and p the predictor's parameters over the FFN's.
Beside each speed, the same centroids' held-out perplexity from the run's eval.json.
A step's split (attention, FFN, chooser, rest) comes from one extra hooked round per mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _anchors import machine, print_json, print_table
from sparse_ffn import step_breakdown

PROMPT = "The for statement is used to iterate over the elements of a sequence"


class StepTimes:
    """Start and end of every model forward during one generate call (hooks on the model)."""

    def __init__(self, model):
        self.model, self.starts, self.ends, self.handles = model, [], [], []

    def __enter__(self):
        self.handles = [
            self.model.register_forward_pre_hook(lambda m, a: self.starts.append(
                time.perf_counter())),
            self.model.register_forward_hook(lambda m, a, o: self.ends.append(
                time.perf_counter()))]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def decode_tokens_per_s(self) -> float:
        """Steps after the prefill: from the second forward's start to the last one's end."""
        steps = len(self.starts) - 1
        return steps / (self.ends[-1] - self.starts[1])


def ffn_share_of_weight_bytes(model, ffn_params: int) -> float:
    """f: the FFN's share of the weights a decode step reads (the decoder layers and the
    output head; the embedding lookup reads one row, the final norm is negligible)."""
    from actclust.io.models import decoder_layers

    layers = sum(p.numel() for layer in decoder_layers(model) for p in layer.parameters())
    head = model.get_output_embeddings().weight.numel()
    return ffn_params / (layers + head)


def trial_files(run: Path, k: int, density: float) -> dict:
    name = f"density={density:g}"
    files = {"centroids": run / "clusters" / f"k={k}-{name}",
             "predictor": run / "predictors" / f"k={k}-{name}" / "cluster",
             "static": run / "clusters" / f"k=1-{name}",
             "eval": run / "eval" / f"k={k}-{name}" / "eval.json",
             "static_eval": run / "eval" / f"k=1-{name}" / "eval.json"}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise SystemExit(f"decode.py: {run} lacks {', '.join(missing)}; run actclust run with "
                         f"k: [1, {k}], density: [{density:g}], predictor: cluster, "
                         "mask_mode: replace, bits_by: frequency first")
    if json.loads(files["eval"].read_text()).get("mask_mode", "replace") != "replace":
        raise SystemExit(f"decode.py: {files['eval']} was evaluated in mask mode and; this "
                         "benchmark decodes mask mode replace: run with mask_mode: replace")
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path, help="an actclust run directory")
    parser.add_argument("--k", type=int, default=256, help="clusters of the sparse mode")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--slab-budget-mb", type=float, default=1024,
                        help="per-centroid slabs, all layers together (actclust generate's)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per generation")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke-test", action="store_true", help="8 tokens, 2 rounds")
    args = parser.parse_args()
    if args.smoke_test:
        args.tokens, args.rounds = 8, 2

    import torch

    from actclust.io.models import ffn_param_counts, load_model
    from actclust.predict import load_predictor
    from actclust.sparse.ffn import sparse_ffns
    from actclust.sparse.generate import build_layouts, centroid_masks, greedy_tokens
    from actclust.sparse.layout import ffn_parts

    torch.set_num_threads(args.threads)
    files = trial_files(args.run, args.k, args.density)
    meta, masks, priority = centroid_masks(files["centroids"])
    _, static_masks, _ = centroid_masks(files["static"])
    loaded = load_model(meta["model"])
    model = loaded.model.eval()
    predictor = load_predictor(files["predictor"])
    layouts = build_layouts(model, masks, "auto", args.slab_budget_mb, priority)
    static_layouts = build_layouts(model, static_masks, "auto", args.slab_budget_mb)
    slabs = sum(len(lay.slabs) for lay in layouts.values())
    prompt = torch.tensor([loaded.tokenizer.encode(PROMPT)])
    zeros = torch.zeros(1, dtype=torch.long)

    def static_choose(layer, h):
        return zeros.expand(h.shape[:-1])

    setups = {"dense": None, "sparse": (layouts, predictor.cluster_ids, "auto"),
              "masked": (layouts, predictor.cluster_ids, "dense"),
              "static": (static_layouts, static_choose, "auto")}

    def generate(mode):
        clock = StepTimes(model)
        with clock:
            if setups[mode] is None:
                tokens = greedy_tokens(model, prompt, args.tokens)
            else:
                lays, choose, path = setups[mode]
                with sparse_ffns(model, lays, choose, path=path):
                    tokens = greedy_tokens(model, prompt, args.tokens)
        return tokens, clock.decode_tokens_per_s()

    for mode in setups:  # warm: allocations, lazy init, the page cache
        generate(mode)
    rates = {mode: [] for mode in setups}
    tokens = {}
    for _ in range(args.rounds):
        for mode in setups:
            tokens[mode], rate = generate(mode)
            rates[mode].append(rate)

    f = ffn_share_of_weight_bytes(model, sum(ffn_param_counts(model)))
    p = float(json.loads((files["predictor"] / "predictor.json").read_text())["params_fraction"])
    density = sum(lay.masks.float().mean().item() for lay in layouts.values()) / len(layouts)
    static_density = sum(lay.masks.float().mean().item()
                         for lay in static_layouts.values()) / len(static_layouts)
    ev = json.loads(files["eval"].read_text())
    static_ev = json.loads(files["static_eval"].read_text())
    quality = {"dense": (ev["dense_ppl"], ev["dense_ppl_ci95"]),
               "sparse": (ev["predicted_ppl"], ev["predicted_ppl_ci95"]),
               "masked": (ev["predicted_ppl"], ev["predicted_ppl_ci95"]),
               "static": (static_ev["cluster_ppl"], static_ev["cluster_ppl_ci95"])}
    ceiling = {"dense": 1.0, "sparse": 1 / ((1 - f) + f * (density + p)),
               "masked": 1.0, "static": 1 / ((1 - f) + f * static_density)}
    dense = statistics.median(rates["dense"])
    rows = []
    for mode, values in rates.items():
        ppl, ci = quality[mode]
        rows.append({"mode": mode, "tok_s": statistics.median(values), "min": min(values),
                     "max": max(values), "speedup": statistics.median(values) / dense,
                     "ceiling": ceiling[mode], "ppl": ppl, "ppl_lo": ci[0], "ppl_hi": ci[1]})
        print_json("decode", model=meta["model"], tokens=args.tokens, rounds=args.rounds,
                   **rows[-1])
    print(json.dumps({"machine": machine(), "model": meta["model"], "k": meta["k"],
                      "slabs": slabs, "centroids": sum(lay.k for lay in layouts.values()),
                      "slab_budget_mb": args.slab_budget_mb,
                      "density": density, "static_density": static_density,
                      "ffn_share_of_bytes": f, "predictor_params_fraction": p,
                      "sparse_tokens_equal_masked": tokens["sparse"] == tokens["masked"]}))
    print_table(rows, ["mode", "tok_s", "min", "max", "speedup", "ceiling", "ppl", "ppl_lo",
                       "ppl_hi"])
    parts = ffn_parts(model)
    step_breakdown(model, parts, prompt, layouts, predictor.cluster_ids, args.tokens)
    print(f"K={meta['k']} ({slabs} of {sum(lay.k for lay in layouts.values())} centroids as "
          f"slabs): sparse decode {rows[1]['speedup']:.2f}x dense ({rows[1]['tok_s']:.1f} against "
          f"{dense:.1f} tokens/s, ceiling {ceiling['sparse']:.2f}x); sparse tokens equal "
          f"masked: {tokens['sparse'] == tokens['masked']}")


if __name__ == "__main__":
    main()
