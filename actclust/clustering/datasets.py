"""k-means datasets: one worker's rows of one layer, behind one declared interface.

:class:`MaskDataset` is the protocol the k-means loop (:mod:`actclust.clustering.kmeans`)
reads every row through, full passes and mini-batches alike.
:class:`ArrayDataset` holds the rows in memory; :class:`ParquetDataset` streams
them from the layer's shard files (bounded memory). :func:`open_layer_dataset`
picks one by the worker's memory budget. Both give the same numbers.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from actclust import kernels
from actclust.io import mask_store, storage


class MaskDataset(Protocol):
    """One worker's contiguous block of a layer's packed masks."""

    global_offset: int  # global index of the first local row

    def count(self) -> int:
        """Number of local rows."""

    def row_bytes(self) -> int:
        """B, bytes per packed row."""

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """(m,) int64 local indices -> (m, B) uint8 rows."""

    def batch(self, rng: np.random.Generator, size: int, total: int) -> np.ndarray:
        """The rows this worker owns of a global mini-batch of ``size`` indices."""

    def batch_stats(self, rng: np.random.Generator, size: int, total: int,
                    centroids: np.ndarray, k: int, backend: str = "auto", rule=None):
        """(sums, counts, cost_sum, rows) of this worker's part of a mini-batch."""

    def assign(self, centroids: np.ndarray, backend: str = "auto", rule=None):
        """Assigned centroid of every local row under ``rule`` (None: Hamming):
        (n,) int64 labels, (n,) int64 integer costs (see kernels.assign_scored)."""

    def assign_stats(self, centroids: np.ndarray, k: int, backend: str = "auto", rule=None):
        """(sums, counts, cost_sum) of a full pass over the local rows."""


def owned_batch(rng: np.random.Generator, size: int, total: int, offset: int,
                count: int) -> np.ndarray:
    """Local indices of the rows in [offset, offset + count) among ``size`` global
    indices drawn uniformly with replacement from [0, total); every worker draws
    the same indices from an identically seeded ``rng``."""
    idx = rng.integers(0, total, size=size)
    mine = (idx >= offset) & (idx < offset + count)
    return idx[mine] - offset


def block_stats(x: np.ndarray, centroids: np.ndarray, k: int, backend: str, rule=None):
    """(sums, counts, cost_sum) of packed rows ``x`` against ``centroids`` under ``rule``."""
    labels, dists = kernels.assign_scored(x, centroids, rule, backend=backend)
    sums, counts = kernels.bit_sums(x, labels, k, backend=backend)
    return sums, counts, int(dists.sum(dtype=np.int64))


def batch_stats(dataset: MaskDataset, rng, size: int, total: int, centroids, k: int,
                backend: str, rule=None):
    xb = dataset.batch(rng, size, total)
    return (*block_stats(xb, centroids, k, backend, rule), xb.shape[0])


class ArrayDataset:
    """One worker's shard of packed masks, held in memory.

    Args:
        x: (n, B) uint8 packed masks.
        global_offset: index of ``x[0]`` in the global row order.
    """

    def __init__(self, x: np.ndarray, global_offset: int = 0):
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"masks must be a 2-D (rows, bytes) array, got shape {x.shape}")
        if x.dtype != np.uint8:
            raise ValueError(f"masks must have dtype uint8 (packed bits), got {x.dtype}")
        if global_offset < 0:
            raise ValueError(f"global_offset must be >= 0, got {global_offset}")
        self.x = x
        self.global_offset = int(global_offset)
        self._last_pass = None  # (labels, sums, counts) of the latest full pass

    def count(self) -> int:
        """Number of local rows."""
        return self.x.shape[0]

    def row_bytes(self) -> int:
        """B, bytes per packed row."""
        return self.x.shape[1]

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """(m,) int64 local indices -> (m, B) uint8 rows."""
        return self.x[np.asarray(indices, dtype=np.int64)]

    def batch(self, rng: np.random.Generator, size: int, total: int) -> np.ndarray:
        """This shard's part of a global mini-batch.

        Every worker draws the same ``size`` global indices, uniformly with
        replacement from ``[0, total)``, from an identically seeded ``rng``,
        and returns the (m, B) uint8 rows it owns (m is about
        ``size * count / total``).
        """
        return self.rows(owned_batch(rng, size, total, self.global_offset, self.count()))

    def batch_stats(self, rng: np.random.Generator, size: int, total: int,
                    centroids: np.ndarray, k: int, backend: str = "auto", rule=None):
        """Sums, counts, cost and row count of this shard's part of a mini-batch."""
        return batch_stats(self, rng, size, total, centroids, k, backend, rule)

    def assign(self, centroids: np.ndarray, backend: str = "auto", rule=None):
        """Assigned centroid of every local row: (n,) int64 labels, (n,) int64 integer costs."""
        return kernels.assign_scored(self.x, centroids, rule, backend=backend)

    def assign_stats(self, centroids: np.ndarray, k: int, backend: str = "auto", rule=None):
        """Assign every local row and sum per cluster.

        Returns:
            sums: (k, 8B) int64 set-bit counts per cluster and neuron.
            counts: (k,) int64 members.
            cost_sum: int, sum of the rows' integer costs under ``rule``.

        After the first pass only the rows whose cluster changed are summed again (moved
        out of their old cluster, into the new one): late Lloyd iterations move few rows,
        and the integer sums are the same as a full recount.
        """
        labels, dists = kernels.assign_scored(self.x, centroids, rule, backend=backend)
        last = self._last_pass
        if last is None or last[0].shape != labels.shape or last[1].shape[0] != k:
            sums, counts = kernels.bit_sums(self.x, labels, k, backend=backend)
        else:
            old_labels, old_sums, old_counts = last
            moved = np.flatnonzero(labels != old_labels)
            rows = self.x[moved]
            gained, gained_n = kernels.bit_sums(rows, labels[moved], k, backend=backend)
            lost, lost_n = kernels.bit_sums(rows, old_labels[moved], k, backend=backend)
            sums, counts = old_sums + gained - lost, old_counts + gained_n - lost_n
        self._last_pass = (labels, sums, counts)
        return sums, counts, int(dists.sum(dtype=np.int64))



class ParquetDataset:
    """Packed masks of one layer in ``files`` (rows in order), never all in memory.

    Args:
        files: this worker's shard files of the layer (paths or URIs), in global row order.
        rows_per_file: the row count of each file (from the manifest).
        row_bytes: B, bytes per packed mask.
        global_offset: global index of the first row of ``files[0]``.
        batch_rows: rows read at a time in a full pass.
    """

    def __init__(self, files: list, rows_per_file: list[int], row_bytes: int,
                 global_offset: int = 0, batch_rows: int = 65536):
        self.files = [str(f) for f in files]
        self.starts = np.concatenate([[0], np.cumsum(rows_per_file)]).astype(np.int64)
        self.bytes = int(row_bytes)
        self.global_offset = int(global_offset)
        self.batch_rows = int(batch_rows)

    def count(self) -> int:
        return int(self.starts[-1])

    def row_bytes(self) -> int:
        return self.bytes

    def _batches(self):
        for path in self.files:
            for batch in storage.parquet_file(path).iter_batches(batch_size=self.batch_rows,
                                                                 columns=["bits"]):
                yield mask_store.bits_to_numpy(batch.column(0))

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """(m,) local indices -> (m, B) rows, reading only the files that hold them."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.zeros((len(indices), self.bytes), dtype=np.uint8)
        which = np.searchsorted(self.starts, indices, side="right") - 1
        for f in np.unique(which):
            pick = np.flatnonzero(which == f)
            bits = mask_store.bits_to_numpy(storage.read_table(self.files[f], columns=["bits"])
                                            .column("bits"))
            out[pick] = bits[indices[pick] - self.starts[f]]
        return out

    def batch(self, rng: np.random.Generator, size: int, total: int) -> np.ndarray:
        return self.rows(owned_batch(rng, size, total, self.global_offset, self.count()))

    def batch_stats(self, rng: np.random.Generator, size: int, total: int,
                    centroids: np.ndarray, k: int, backend: str = "auto", rule=None):
        return batch_stats(self, rng, size, total, centroids, k, backend, rule)

    def assign(self, centroids: np.ndarray, backend: str = "auto", rule=None):
        labels, dists = [], []
        for x in self._batches():
            lab, dist = kernels.assign_scored(x, centroids, rule, backend=backend)
            labels.append(lab)
            dists.append(dist)
        if not labels:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(labels), np.concatenate(dists)

    def assign_stats(self, centroids: np.ndarray, k: int, backend: str = "auto", rule=None):
        sums = np.zeros((k, 8 * self.bytes), dtype=np.int64)
        counts = np.zeros(k, dtype=np.int64)
        cost = 0
        for x in self._batches():
            s, c, d = block_stats(x, centroids, k, backend, rule)
            sums += s
            counts += c
            cost += d
        return sums, counts, cost


def open_layer_dataset(root: str, layer: int, shards: list[str], rows: list[int], width: int,
                       global_offset: int, memory_budget_mb: float | None,
                       site: str | None = None) -> MaskDataset:
    """This worker's block of a layer (of ``site`` in a version 2 directory): in memory when
    it fits ``memory_budget_mb`` (None: no limit), else streamed from Parquet."""
    row_bytes = mask_store.row_bytes(width)
    if memory_budget_mb is not None and sum(rows) * row_bytes > memory_budget_mb * 2**20:
        return ParquetDataset([mask_store.shard_path(root, layer, n, site) for n in shards],
                              rows, row_bytes, global_offset)
    return ArrayDataset(mask_store.read_shards(root, layer, shards, width, site), global_offset)
