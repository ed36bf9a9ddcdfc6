"""Sparse FFN vs the dense torch FFN, side by side in one run.

    python benchmarks/sparse_ffn.py                  # CPU, 2 threads (about 10 minutes)
    python benchmarks/sparse_ffn.py --smoke-test     # seconds
    python3 benchmarks/sparse_ffn.py --device cuda --dtypes bfloat16 --skip-e2e  # a GPU

(a) One FFN, batch-1 decode, at the embedded model's dims (576 -> 1536) and
    Mistral-7B's (4096 -> 14336), random weights, per dtype and density: the dense
    FFN (three nn.Linear, as transformers runs it) against the sparse FFN reading
    one per-centroid slab and gathering from the neuron-major weights per call.
    Small FFNs are cycled over enough copies that the weights do not sit in cache
    (a model's decode step touches every layer's weights once).
(b) End-to-end greedy decode on the embedded model (KV cache): the dense model,
    the masked dense FFN (sparsity only simulated) and the sparse FFN, the cost of
    choosing clusters included (a rank-64 linear chooser, or --predictor), and
    where the time of one decode step goes.
(c) Prefill of 256 tokens with random cluster ids, K in {16, 256}: dense, masked
    dense, grouped by cluster (slabs and gather) and what the auto rule picks.

Methods are interleaved, --repeats rounds of --calls calls each, and the fastest
single call is reported (wall clock, and process CPU time beside it). The last
line is the figure of (a) at density 0.5, 4096x14336, float32.
"""

from __future__ import annotations

import argparse
import time

# The script's own folder is on sys.path when run as a script.
from _anchors import machine, print_json, print_table

MISTRAL = (4096, 14336)
EMBEDDED = (576, 1536)


def parse_dims(text: str) -> list:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(fn, calls: int, device: str) -> tuple:
    """(wall, process CPU) seconds of the fastest of ``calls`` calls. On a shared,
    overloaded CPU the fastest single call is the one least interrupted; CPU time counts
    only this process (all threads together, spin-waits included)."""
    fn()  # warm: allocations, lazy init
    sync(device)
    wall = cpu = float("inf")
    for _ in range(calls):
        w, c = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    return wall, cpu


def interleaved_best(methods: dict, calls: int, repeats: int, device: str) -> tuple:
    """({name: best wall s per call}, {name: best CPU s per call}), methods in rotating
    order each round."""
    wall = {name: float("inf") for name in methods}
    cpu = dict(wall)
    names = list(methods)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            w, c = seconds_per_call(methods[name], calls, device)
            wall[name], cpu[name] = min(wall[name], w), min(cpu[name], c)
    return wall, cpu


def random_ffn(d: int, f: int, dtype, device: str, seed: int):
    """A gated FFN of three bias-free nn.Linear and its FFNParts."""
    import torch

    from actclust.sparse.layout import GATED, FFNParts

    gen = torch.Generator().manual_seed(seed)
    linears = []
    for shape in ((f, d), (f, d), (d, f)):
        lin = torch.nn.Linear(shape[1], shape[0], bias=False, device="meta")
        lin.weight = torch.nn.Parameter(
            (torch.randn(shape, generator=gen) * 0.02).to(dtype=dtype, device=device),
            requires_grad=False)
        linears.append(lin)
    gate, up, down = linears
    act = torch.nn.SiLU()
    return FFNParts(GATED, None, "", (), (gate, up), down, act)


def dense_call(part, x):
    gate, up = part.inputs
    return part.output(part.act(gate(x)) * up(x))


def centroid(f: int, density: float, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, f, dtype=torch.bool)
    mask[0, torch.randperm(f, generator=gen)[:round(density * f)]] = True
    return mask


def bench_single(args) -> list:
    """(a): rows of time per token, dense vs slab vs gather."""
    import torch

    from actclust.sparse.ffn import SparseFFN
    from actclust.sparse.layout import SparseLayout, neuron_major

    rows = []
    for d, f in args.dims:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            dense_bytes = 3 * d * f * dtype.itemsize
            copies = max(1, -(-int(args.working_set_mb * 2**20) // dense_bytes))
            parts = [random_ffn(d, f, dtype, args.device, seed) for seed in range(copies)]
            weights = [neuron_major(p) for p in parts]
            x = torch.randn(1, d, generator=torch.Generator().manual_seed(9)).to(args.device, dtype)
            ids = torch.zeros(1, dtype=torch.long, device=args.device)
            for density in args.densities:
                mask = centroid(f, density, seed=int(density * 100))
                slab = [SparseFFN(SparseLayout(w, mask, layout="slab"), 0, None, p.act)
                        for w, p in zip(weights, parts)]
                gather = [SparseFFN(SparseLayout(w, mask, layout="gather"), 0, None, p.act)
                          for w, p in zip(weights, parts)]
                methods = {
                    "dense": lambda: [dense_call(p, x) for p in parts],
                    "slab": lambda: [m.apply_clusters(x, ids) for m in slab],
                    "gather": lambda: [m.apply_clusters(x, ids) for m in gather],
                }
                with torch.inference_mode():
                    gate, up = parts[0].inputs
                    want = parts[0].output(parts[0].act(gate(x)) * up(x) * mask.to(args.device))
                    err = max(float((m[0].apply_clusters(x, ids) - want).abs().max())
                              for m in (slab, gather))
                    calls = args.calls if dense_bytes < 2**28 else max(1, args.calls // 4)
                    best, cpu = interleaved_best(methods, calls, args.repeats, args.device)
                per_ffn = {k: v / copies for k, v in best.items()}
                row = {"dims": f"{d}x{f}", "dtype": dtype_name, "density": density,
                       "copies": copies, "dense_ms": per_ffn["dense"] * 1e3,
                       "slab_ms": per_ffn["slab"] * 1e3, "gather_ms": per_ffn["gather"] * 1e3,
                       "slab_speedup": best["dense"] / best["slab"],
                       "gather_speedup": best["dense"] / best["gather"],
                       "ideal": 1 / density, "max_abs_err": err,
                       "cpu_slab_speedup": cpu["dense"] / cpu["slab"]}
                row["slab_of_ideal"] = row["slab_speedup"] / row["ideal"]
                rows.append(row)
                print_json("sparse_ffn_single", **row)
                del slab, gather
            del parts, weights
    return rows


def low_rank_chooser(d: int, k: int, layers: int, rank: int, seed: int = 0):
    """choose(layer, h) = argmax(h @ A_l @ B_l): the size of a low-rank cluster predictor."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(layers, d, rank, generator=gen) / d ** 0.5
    b = torch.randn(layers, rank, k, generator=gen) / rank ** 0.5

    def choose(layer, h):
        return ((h @ a[layer]) @ b[layer]).argmax(dim=-1)
    return choose


class StepClock:
    """Wall time inside given modules during decode steps (every model call after the first,
    which is the prefill), through forward hooks on the modules and on the model."""

    def __init__(self, model, groups: dict):
        self.model = model
        self.groups = groups  # name -> list of modules
        self.seconds = dict.fromkeys(list(groups) + ["forward", "chooser"], 0.0)
        self.calls = 0
        self.decode_start = None
        self.handles = []

    def add(self, name: str, seconds: float) -> None:
        if self.calls > 1:
            self.seconds[name] += seconds

    def _hooks(self, name, modules):
        for m in modules:
            def pre(mod, args):
                mod._clock_start = time.perf_counter()

            def post(mod, args, out, name=name):
                self.add(name, time.perf_counter() - mod._clock_start)
            self.handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]

    def __enter__(self):
        def count(mod, args, kwargs):
            self.calls += 1
        self.handles.append(self.model.register_forward_pre_hook(count, with_kwargs=True))
        for name, modules in self.groups.items():
            self._hooks(name, modules)
        self._hooks("forward", [self.model])

        def first_done(mod, args, out):
            if self.calls == 1:
                self.decode_start = time.perf_counter()
        self.handles.append(self.model.register_forward_hook(first_done))
        return self

    def __exit__(self, *exc):
        self.decode_seconds = time.perf_counter() - self.decode_start
        for h in self.handles:
            h.remove()


def bench_end_to_end(args) -> list:
    """(b): decode tokens/s of dense, masked dense and sparse; where a step's time goes."""
    import torch

    from actclust.io.models import load_model
    from actclust.sparse.ffn import sparse_ffns
    from actclust.sparse.generate import build_layouts, centroid_masks, greedy_tokens
    from actclust.sparse.layout import ffn_parts

    loaded = load_model(args.model)
    model = loaded.model.to(args.device)
    parts = ffn_parts(model)
    d = model.config.hidden_size
    if args.centroids:
        _, masks, priority = centroid_masks(args.centroids, args.model)
    else:
        f = parts[0].output.weight.shape[1]
        masks = {layer: torch.stack([centroid(f, args.e2e_density, seed=layer * 1000 + j)[0]
                                     for j in range(args.k)]) for layer in range(len(parts))}
        priority = None
    k = next(iter(masks.values())).shape[0]
    if args.predictor:
        from actclust.predict import load_predictor

        choose = load_predictor(args.predictor).cluster_ids
    else:
        choose = low_rank_chooser(d, k, len(parts), args.chooser_rank)
    layouts = build_layouts(model, masks, "auto", args.slab_budget_mb, priority)
    density = sum(lay.masks.float().mean().item() for lay in layouts.values()) / len(layouts)
    prompt = torch.tensor([loaded.tokenizer.encode(
        "The for statement is used to iterate over the elements of a sequence")])
    n = args.decode_tokens

    def run(mode, tokens):
        if mode == "dense":
            return greedy_tokens(model, prompt, tokens)
        with sparse_ffns(model, layouts, choose, path="dense" if mode == "masked" else "auto"):
            return greedy_tokens(model, prompt, tokens)

    methods = {f"{mode}:{t}": (lambda mode=mode, t=t: run(mode, t))
               for mode in ("dense", "masked", "sparse") for t in (1, n)}
    best, cpu = interleaved_best(methods, 1, args.repeats, args.device)
    rows = []
    for mode in ("dense", "masked", "sparse"):
        step = (best[f"{mode}:{n}"] - best[f"{mode}:1"]) / (n - 1)
        cpu_step = (cpu[f"{mode}:{n}"] - cpu[f"{mode}:1"]) / (n - 1)
        rows.append({"mode": mode, "decode_tok_s": 1 / step, "step_ms": step * 1e3,
                     "cpu_step_ms": cpu_step * 1e3,
                     "prefill_plus_first_ms": best[f"{mode}:1"] * 1e3})
    for row in rows:
        row["speedup"] = rows[0]["step_ms"] / row["step_ms"]
        row["cpu_speedup"] = rows[0]["cpu_step_ms"] / row["cpu_step_ms"]
        print_json("sparse_ffn_e2e", model=args.model, k=k, density=density, **row)
    breakdown = step_breakdown(model, parts, prompt, layouts, choose, n)
    return rows, breakdown, density, k


def step_breakdown(model, parts, prompt, layouts, choose, n: int) -> list:
    """Per decode step: ms in attention, FFN (and its chooser), the rest of the forward
    (embedding, norms, lm_head, residuals), and outside the forward (generate's own work).
    Hooks add a little to every figure."""
    from actclust.sparse.ffn import sparse_ffns
    from actclust.sparse.generate import greedy_tokens

    attn = [p.layer.self_attn for p in parts]
    rows = []
    for mode in ("dense", "sparse"):
        clock = None

        def timed_choose(layer, h):
            start = time.perf_counter()
            ids = choose(layer, h)
            clock.add("chooser", time.perf_counter() - start)
            return ids
        if mode == "dense":
            clock = StepClock(model, {"attention": attn, "ffn": [
                p.layer.get_submodule(p.ffn_path) for p in parts]})
            with clock:
                greedy_tokens(model, prompt, n)
        else:
            with sparse_ffns(model, layouts, timed_choose) as modules:
                clock = StepClock(model, {"attention": attn, "ffn": list(modules.values())})
                with clock:
                    greedy_tokens(model, prompt, n)
        steps = clock.calls - 1
        ms = {key: value / steps * 1e3 for key, value in clock.seconds.items()}
        wall = clock.decode_seconds / steps * 1e3
        rows.append({"mode": mode, "step_ms": wall, "attention_ms": ms["attention"],
                     "ffn_ms": ms["ffn"], "of_which_chooser_ms": ms["chooser"],
                     "other_forward_ms": ms["forward"] - ms["attention"] - ms["ffn"],
                     "outside_forward_ms": wall - ms["forward"]})
        print_json("sparse_ffn_breakdown", **rows[-1])
    return rows


def bench_prefill(args) -> list:
    """(c): 256 tokens with uniform random cluster ids, K in args.prefill_k."""
    import torch

    from actclust.sparse.ffn import SparseFFN
    from actclust.sparse.layout import SparseLayout, neuron_major

    rows = []
    dtype = getattr(torch, args.dtypes[0])
    for d, f in args.prefill_dims:
        part = random_ffn(d, f, dtype, args.device, seed=1)
        weights = neuron_major(part)
        x = torch.randn(args.prefill_tokens, d, generator=torch.Generator().manual_seed(3))
        x = x.to(args.device, dtype)
        for k in args.prefill_k:
            masks = torch.cat([centroid(f, 0.5, seed=j) for j in range(k)])
            ids = torch.randint(0, k, (args.prefill_tokens,),
                                generator=torch.Generator().manual_seed(k)).to(args.device)
            slab_bytes = k * 0.5 * 3 * d * f * dtype.itemsize
            budget = args.slab_budget_mb * 2**20
            gather = SparseLayout(weights, masks, layout="gather")
            ffns = {"masked dense": SparseFFN(gather, 0, None, part.act, path="dense"),
                    "grouped gather": SparseFFN(gather, 0, None, part.act, path="sparse")}
            if slab_bytes <= budget:
                slab = SparseLayout(weights, masks, layout="slab")
                ffns["grouped slab"] = SparseFFN(slab, 0, None, part.act, path="sparse")
            auto = SparseFFN(SparseLayout(weights, masks, "auto", budget), 0, None, part.act)
            ffns["auto"] = auto
            methods = {"dense": lambda: dense_call(part, x)}
            methods.update({name: (lambda m=m: m.apply_clusters(x, ids))
                            for name, m in ffns.items()})
            with torch.inference_mode():
                best, cpu = interleaved_best(methods, max(1, args.calls // 4), args.repeats,
                                             args.device)
            picked = max(auto.calls, key=auto.calls.get)
            for name, seconds in best.items():
                row = {"dims": f"{d}x{f}", "k": k, "groups": int(ids.unique().numel()),
                       "method": name + (f" ({picked})" if name == "auto" else ""),
                       "ms": seconds * 1e3, "speedup": best["dense"] / seconds,
                       "cpu_speedup": cpu["dense"] / cpu[name],
                       "slab_mb_all_k": slab_bytes / 2**20}
                rows.append(row)
                print_json("sparse_ffn_prefill", **row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dims", type=parse_dims, default=[EMBEDDED, MISTRAL])
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=["float32", "bfloat16"])
    parser.add_argument("--densities", type=lambda s: [float(v) for v in s.split(",")],
                        default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=8, help="calls per timing")
    parser.add_argument("--working-set-mb", type=float, default=300,
                        help="cycle small FFNs over copies to exceed the caches")
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--centroids", help="clustering directory for (b); default random")
    parser.add_argument("--predictor", help="cluster predictor for (b); default rank-64 chooser")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--e2e-density", type=float, default=0.5)
    parser.add_argument("--chooser-rank", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--slab-budget-mb", type=float, default=2048)
    parser.add_argument("--prefill-dims", type=parse_dims, default=[EMBEDDED])
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--prefill-k", type=lambda s: [int(v) for v in s.split(",")],
                        default=[16, 256])
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    if args.smoke_test:
        args.dims, args.dtypes, args.densities = [EMBEDDED, MISTRAL], ["float32"], [0.5]
        args.repeats, args.calls, args.working_set_mb = 1, 2, 32
        args.model, args.decode_tokens, args.k = "tiny:llama", 4, 8
        args.prefill_k, args.prefill_tokens = [16], 64

    import torch

    torch.set_num_threads(args.threads)
    print_json("sparse_ffn_machine", **machine(), device=args.device)
    single = bench_single(args)
    print("\n(a) one FFN, batch-1 decode, ms per token (fastest call of %d x %d, %d threads)"
          % (args.repeats, args.calls, args.threads))
    print_table(single, ["dims", "dtype", "density", "dense_ms", "slab_ms", "gather_ms",
                         "slab_speedup", "gather_speedup", "ideal", "slab_of_ideal",
                         "cpu_slab_speedup", "max_abs_err"])
    if not args.skip_e2e:
        e2e, breakdown, density, k = bench_end_to_end(args)
        print(f"\n(b) {args.model}, greedy decode, K={k}, mean centroid density {density:.2f}, "
              f"chooser {'predictor' if args.predictor else f'rank {args.chooser_rank}'}")
        print_table(e2e, ["mode", "decode_tok_s", "step_ms", "speedup", "cpu_step_ms",
                          "cpu_speedup", "prefill_plus_first_ms"])
        print("\n    where one decode step's time goes (ms, with timing hooks)")
        print_table(breakdown, ["mode", "step_ms", "attention_ms", "ffn_ms",
                                "of_which_chooser_ms", "other_forward_ms", "outside_forward_ms"])
    if not args.skip_prefill:
        prefill = bench_prefill(args)
        print(f"\n(c) prefill of {args.prefill_tokens} tokens, uniform random cluster ids, "
              "density 0.5")
        print_table(prefill, ["dims", "k", "groups", "method", "ms", "speedup", "cpu_speedup",
                              "slab_mb_all_k"])
    headline = [r for r in single if r["dims"] == "4096x14336" and r["dtype"] == "float32"
                and r["density"] == 0.5]
    if headline:
        print(f"decode speedup at density 0.5, 4096x14336 float32: "
              f"{headline[0]['slab_speedup']:.2f}x")


if __name__ == "__main__":
    main()
