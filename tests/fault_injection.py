"""Fault injection for the tests: hooks handed to the library's actors.

The library calls :class:`actclust.orchestration.actors.FaultHooks` at fixed
points and does nothing there itself; these subclasses add latency or crash the
actor's process. They are pickled by value, so Ray workers need not import
this module.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import ray.cloudpickle

from actclust.orchestration.actors import FaultHooks


class Delay(FaultHooks):
    """Every k-means iteration and every evaluation chunk takes ``seconds`` longer."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def kmeans_iteration(self, rank: int, layer: int, iteration: int) -> None:
        time.sleep(self.seconds)

    def evaluation_chunk(self, chunk: int) -> None:
        time.sleep(self.seconds)


class CrashOnce(FaultHooks):
    """The process of one k-means rank exits abruptly after one iteration of one
    layer, once: ``marker`` records that it fired."""

    def __init__(self, rank: int, layer: int, iteration: int, marker: Path):
        self.where = (rank, layer, iteration)
        self.marker = Path(marker)

    def kmeans_iteration(self, rank: int, layer: int, iteration: int) -> None:
        if (rank, layer, iteration) == self.where and not self.marker.exists():
            self.marker.touch()
            os._exit(1)


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
