"""One progress facility for every stage (extraction, clustering, evaluation, sweeps).

On a terminal it is a tqdm bar on stderr with done/total, rate and ETA, left in
place when the stage ends. Elsewhere (a log file, a pipe, a Ray job) it stays
silent while running and logs one line when the stage ends, with its figures::

    actclust: extract: 16,384 tokens in 41.2 s (398 tokens/s), 8 shards
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)
# tqdm's default, but the rate always as units per second (never "s/ layers").
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"


class Progress:
    """Counts units of work (tokens, layers, trials) and, optionally, the steps
    that deliver them (shards, chunks)."""

    def __init__(self, total: int, desc: str, unit: str = "tokens", stream=None,
                 step_unit: str | None = None, initial: int = 0):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.step_unit = step_unit
        self.start = time.monotonic()
        self.done_units = 0
        self.done_steps = 0
        self.total_steps: int | None = None
        stream = stream or sys.stderr
        self.bar = None
        if hasattr(stream, "isatty") and stream.isatty():
            from tqdm import tqdm

            # disable=False: third-party bars are silenced through TQDM_DISABLE, ours are not.
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=f" {unit}",
                            unit_scale=unit == "tokens", file=stream, dynamic_ncols=True,
                            leave=True, disable=False, bar_format=BAR_FORMAT)

    def update(self, units: int, steps: int = 1, total_steps: int | None = None) -> None:
        self.done_units += units
        self.done_steps += steps
        if total_steps is not None:
            self.total_steps = total_steps
        if self.bar is not None:
            if self.step_unit:
                self.bar.set_postfix_str(self._steps_text(), refresh=False)
            self.bar.update(units)

    def close(self) -> float:
        """End the stage; returns its seconds."""
        seconds = time.monotonic() - self.start
        if self.bar is not None:
            self.bar.close()
        elif self.done_units:
            rate = self.done_units / seconds if seconds > 0 else float("inf")
            if rate >= 100:
                speed = f"{rate:,.0f} {self.unit}/s"
            elif rate >= 1:
                speed = f"{rate:.1f} {self.unit}/s"
            else:  # slow units (layers, trials) read better as time per unit
                speed = f"{seconds / self.done_units:.1f} s per {self.unit.rstrip('s')}"
            steps = f", {self._steps_text()}" if self.step_unit else ""
            log.info("%s: %s %s in %.1f s (%s)%s", self.desc, f"{self.done_units:,}", self.unit,
                     seconds, speed, steps)
        return seconds

    def _steps_text(self) -> str:
        total = f"/{self.total_steps}" if self.total_steps else ""
        return f"{self.done_steps}{total} {self.step_unit}"
