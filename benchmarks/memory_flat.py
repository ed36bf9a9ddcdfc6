"""Peak memory of extraction at two corpus sizes: flat means bounded by a shard.

    python benchmarks/memory_flat.py                  # 250,000 and 1,000,000 tokens, tiny:opt
    python benchmarks/memory_flat.py --smoke-test     # 20,000 and 80,000 tokens

The corpus is pydoc's text repeated into a local .txt file (byte tokens for the
tiny models). Each size runs in a fresh process; it reports the driver's peak
RSS and the largest peak RSS any extraction actor reported, plus tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_size(model: str, corpus: str, tokens: int, out: str, workers: int) -> dict:
    from actclust.config import ExtractConfig, build
    from actclust.capture.extract import run_extract

    start = time.perf_counter()
    manifest = run_extract(build(ExtractConfig, dict(
        model=model, corpus=corpus, seq_len=256, max_tokens=tokens, workers=workers,
        shard_windows=16, out=out)))
    seconds = time.perf_counter() - start
    return {"tokens": manifest["tokens"], "shards": len(manifest["shards"]),
            "seconds": round(seconds, 1), "tokens_per_s": round(manifest["tokens"] / seconds),
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "actor_peak_rss_mb": max(s["peak_rss_mb"] for s in manifest["shards"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:opt")
    parser.add_argument("--sizes", type=int, nargs="+", default=[250_000, 1_000_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--smoke-test", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("CORPUS", "TOKENS", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        corpus, tokens, out = args.child
        print(json.dumps(one_size(args.model, corpus, int(tokens), out, args.workers)))
        return
    if args.smoke_test:
        args.sizes = [20_000, 80_000]
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        repeats = max(args.sizes) // len(text.encode()) + 2
        corpus.write_text("\n\n".join([text] * repeats), encoding="utf-8")
        results = []
        for size in args.sizes:
            proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--workers",
                                   str(args.workers), "--child", str(corpus), str(size),
                                   f"{tmp}/out-{size}"], capture_output=True, text=True,
                                  env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
            if proc.returncode != 0:
                sys.exit(proc.stderr[-3000:])
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    for r in results:
        print(f"{r['tokens']:>9,} tokens  {r['shards']:4d} shards  {r['tokens_per_s']:>7,} tok/s  "
              f"driver peak {r['driver_peak_rss_mb']:7.1f} MB  actor peak {r['actor_peak_rss_mb']:7.1f} MB")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
