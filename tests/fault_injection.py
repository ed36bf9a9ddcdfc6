"""Fault injection for the tests: hooks handed to the library's actors.

The library calls :class:`actclust.runtime.actors.FaultHooks` at fixed
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

from actclust.runtime.actors import FaultHooks


class Delay(FaultHooks):
    """Every k-means iteration, evaluation chunk and extraction shard takes ``seconds``
    longer."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def extraction_shard(self, shard: str) -> None:
        time.sleep(self.seconds)

    def kmeans_iteration(self, rank: int, layer: int, iteration: int) -> None:
        time.sleep(self.seconds)

    def evaluation_chunk(self, chunk: int) -> None:
        time.sleep(self.seconds)


class Together(Delay):
    """As :class:`Delay`, and each actor's first shard or chunk waits until ``peers``
    actors have reached it (each leaves a file in ``directory``), so that the work runs
    on every actor at once however slowly they start. A replacement started later finds
    them there and goes straight on."""

    def __init__(self, seconds: float, directory: Path, peers: int, timeout_s: float = 600):
        super().__init__(seconds)
        self.directory, self.peers, self.timeout_s = Path(directory), peers, timeout_s
        self.arrived = False

    def _arrive(self) -> None:
        if self.arrived:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / str(os.getpid())).touch()
        deadline = time.monotonic() + self.timeout_s
        while len(list(self.directory.iterdir())) < self.peers and time.monotonic() < deadline:
            time.sleep(0.05)
        self.arrived = True

    def extraction_shard(self, shard: str) -> None:
        self._arrive()
        super().extraction_shard(shard)

    def evaluation_chunk(self, chunk: int) -> None:
        self._arrive()
        super().evaluation_chunk(chunk)


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
