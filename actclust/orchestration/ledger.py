"""What a run did and the least it could have taken: its floor.

A run's floor is the tokens it forwarded through the model divided by the bare-forward
rate measured in the same run (the same actors on the same windows, no hooks), plus the
assignment GEMMs of the fits it ran (iterations x rows x K x bits at the exact int8 kernel's
rate, measured in the same run). Stages reused from an earlier run count neither in the
wall time nor in the floor. Each stage logs one line with its tokens/s; the run ends with
one line: wall time, floor and their ratio.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from actclust import kernels

log = logging.getLogger(__name__)

# The assignment GEMM timed for the floor: this many rows against this many centroids.
_GEMM_ROWS, _GEMM_K, _GEMM_REPEATS = 8192, 256, 3


@dataclasses.dataclass
class Ledger:
    start: float = dataclasses.field(default_factory=time.monotonic)
    forwarded: int = 0  # tokens through the model, every pass counted
    gemm_macs: float = 0.0  # multiply-adds of the fits' assignment GEMMs
    bare_rate: float | None = None  # tokens/s of a bare forward on the run's actors
    gemm_rate: float | None = None  # multiply-adds/s of the exact assignment kernel
    stages: list = dataclasses.field(default_factory=list)

    def stage(self, name: str, seconds: float, tokens: int = 0, macs: float = 0.0) -> None:
        """Record a stage that ran (reused stages are not recorded) and log its rate."""
        self.forwarded += tokens
        self.gemm_macs += macs
        self.stages.append({"stage": name, "seconds": seconds, "tokens": tokens})
        rate = f", {tokens / seconds:,.0f} tokens/s" if tokens and seconds > 0 else ""
        log.info("%s: %.1f s%s", name, seconds, rate)

    def floor_seconds(self) -> float | None:
        if not self.bare_rate or self.gemm_rate is None:
            return None
        return self.forwarded / self.bare_rate + self.gemm_macs / self.gemm_rate

    def summary(self) -> dict:
        wall = time.monotonic() - self.start
        floor = self.floor_seconds()
        return {"wall_seconds": wall, "floor_seconds": floor,
                "wall_over_floor": wall / floor if floor else None,
                "forwarded_tokens": self.forwarded, "bare_forward_tokens_per_s": self.bare_rate,
                "assignment_macs": self.gemm_macs, "assignment_macs_per_s": self.gemm_rate,
                "stages": self.stages}

    def close(self) -> dict:
        """Log the run's closing line; returns :meth:`summary`."""
        s = self.summary()
        if not s["floor_seconds"]:
            log.info("run: wall %.0f s; every stage was reused, nothing forwarded or fitted",
                     s["wall_seconds"])
        else:
            log.info("run: wall %.0f s, floor %.0f s (%s tokens forwarded at %.0f tokens/s bare, "
                     "%.0f s of assignment GEMMs): %.2fx its floor", s["wall_seconds"],
                     s["floor_seconds"], f"{self.forwarded:,}", self.bare_rate,
                     self.gemm_macs / self.gemm_rate, s["wall_over_floor"])
        return s


def fit_macs(meta: dict) -> float:
    """Multiply-adds of a fit's assignment GEMMs: iterations x rows x K x bits per layer
    (with several sites, iterations are keyed ``site:layer`` and each site has its width)."""
    widths = meta["d_ff"]

    def width(key: str) -> int:
        return widths if isinstance(widths, int) else widths[key.split(":")[0]]

    return float(sum(n * width(key) for key, n in meta["iterations"].items())) \
        * meta["tokens"] * meta["k"]


def measure_gemm_rate(width: int, seed: int = 0) -> float:
    """Multiply-adds/s of the exact assignment kernel at ``width`` bits, here."""
    rng = np.random.default_rng(seed)
    x = np.packbits(rng.random((_GEMM_ROWS, width)) < 0.5, axis=1, bitorder="little")
    c = x[rng.choice(_GEMM_ROWS, _GEMM_K, replace=False)]
    kernels.assign(x, c)  # warm-up: the backend's first call sets itself up
    start = time.perf_counter()
    for _ in range(_GEMM_REPEATS):
        kernels.assign(x, c)
    seconds = time.perf_counter() - start
    return _GEMM_REPEATS * _GEMM_ROWS * _GEMM_K * width / seconds
