"""Shared helpers for the side-by-side benchmarks: data, timing, reporting."""
from __future__ import annotations

import json
import os
import platform
import time

import numpy as np


def random_masks(n: int, d: int, density: float = 0.5, seed: int = 0) -> np.ndarray:
    """(n, ceil(d/8)) uint8 packed masks with i.i.d. bits."""
    rng = np.random.default_rng(seed)
    return np.packbits(rng.random((n, d)) < density, axis=1, bitorder="little")


def planted_masks(n: int, k: int, d: int, flip: float = 0.05, density: float = 0.3, seed: int = 0):
    """Masks around k random centers, each bit flipped with probability flip.

    Returns:
        x: (n, ceil(d/8)) uint8 packed masks.
        truth: (n,) int64 planted cluster of each row.
    """
    rng = np.random.default_rng(seed)
    centers = rng.random((k, d)) < density
    truth = rng.integers(0, k, n)
    bits = centers[truth] ^ (rng.random((n, d)) < flip)
    return np.packbits(bits, axis=1, bitorder="little"), truth


def best_of(fn, repeats: int = 3):
    """Run fn() repeats times; (fastest wall seconds, last result)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def machine() -> dict:
    """What the numbers were measured on."""
    info = {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    return info


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Print rows as an aligned text table (floats with 4 significant digits)."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def print_json(name: str, **fields) -> None:
    """One machine-readable line: {"benchmark": name, ...}."""
    print(json.dumps({"benchmark": name, **fields}, default=float))
