"""Extraction overhead: `actclust extract` (one worker) vs a bare transformers forward.

Same model, same windows, same batch size and thread count, in one run:

    python benchmarks/extract_overhead.py                 # embedded model, 8,192 tokens
    python benchmarks/extract_overhead.py --smoke-test    # tiny model, seconds

Reports tokens/s of both, the ratio steady-state (the actor's time per shard,
model already loaded) and end to end (Ray start, model load and Parquet writes
included), and bytes per mask on disk vs d_ff/8.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path



def bare_forward_seconds(model_name: str, windows, batch: int, threads: int) -> float:
    import torch

    from actclust.io.models import load_model

    torch.set_num_threads(threads)
    model = load_model(model_name).model
    with torch.inference_mode():
        model(torch.tensor(windows.ids[:batch]))  # warm-up
        start = time.perf_counter()
        for i in range(0, len(windows), batch):
            model(torch.tensor(windows.ids[i:i + batch]))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    if args.smoke_test:
        args.model, args.tokens, args.seq_len = "tiny:llama", 4096, 64

    from actclust.config import ExtractConfig, build
    from actclust.io.corpus import load_windows
    from actclust.capture.extract import run_extract
    from actclust.io.models import load_tokenizer

    threads = os.cpu_count() or 1
    windows = load_windows("embedded:pydoc", load_tokenizer(args.model), args.seq_len,
                           max_tokens=args.tokens)
    cfg_values = dict(model=args.model, corpus="embedded:pydoc", seq_len=args.seq_len,
                      max_tokens=args.tokens, workers=1, shard_windows=8, batch_windows=4)
    bare = bare_forward_seconds(args.model, windows, 4, threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build(ExtractConfig, {**cfg_values, "out": f"{tmp}/masks"})
        start = time.perf_counter()
        manifest = run_extract(cfg)
        end_to_end = time.perf_counter() - start
        steady = sum(s["seconds"] for s in manifest["shards"])
        files = list(Path(tmp, "masks", "masks").rglob("*.parquet"))
        disk = sum(f.stat().st_size for f in files)
    rows = windows.tokens * len(manifest["layers"])
    result = {
        "model": args.model, "tokens": windows.tokens, "threads": threads,
        "bare_tokens_per_s": windows.tokens / bare,
        "extract_steady_tokens_per_s": windows.tokens / steady,
        "extract_end_to_end_tokens_per_s": windows.tokens / end_to_end,
        "ratio_steady": steady / bare,
        "ratio_end_to_end": end_to_end / bare,
        "bytes_per_mask_on_disk": disk / rows,
        "bytes_per_mask_packed": manifest["d_ff"] / 8,
    }
    print(f"bare forward      {result['bare_tokens_per_s']:8.0f} tokens/s")
    print(f"extract (steady)  {result['extract_steady_tokens_per_s']:8.0f} tokens/s  "
          f"ratio {result['ratio_steady']:.3f}x (goal <= 1.15x)")
    print(f"extract (end2end) {result['extract_end_to_end_tokens_per_s']:8.0f} tokens/s  "
          f"ratio {result['ratio_end_to_end']:.3f}x (Ray start + model load included)")
    print(f"bytes per mask on disk {result['bytes_per_mask_on_disk']:.1f} "
          f"(packed d_ff/8 = {result['bytes_per_mask_packed']:.0f})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
