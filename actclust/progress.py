"""One progress facility: a single updating line on a TTY, silent otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    """Counts units of work and shows done/total, rate and ETA on stderr."""

    def __init__(self, total: int, desc: str, unit: str = "tokens", stream=None):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.stream = stream or sys.stderr
        self.enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.monotonic()
        self.done_units = 0
        self.done_steps = 0
        self.total_steps = None

    def update(self, units: int, steps: int = 1, total_steps: int | None = None) -> None:
        self.done_units += units
        self.done_steps += steps
        if total_steps is not None:
            self.total_steps = total_steps
        if not self.enabled:
            return
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done_units / elapsed
        left = max(self.total - self.done_units, 0)
        eta = left / rate if rate > 0 else float("inf")
        steps_txt = f"{self.done_steps}/{self.total_steps} " if self.total_steps else ""
        self.stream.write(f"\r{self.desc}: {steps_txt}{self.done_units}/{self.total} {self.unit}"
                          f"  {rate:,.0f} {self.unit}/s  ETA {eta:,.0f}s ")
        self.stream.flush()

    def close(self) -> float:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
        return time.monotonic() - self.start
