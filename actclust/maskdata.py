"""A k-means dataset that streams one layer's masks from Parquet (bounded memory).

Same interface as :class:`actclust.kmeans.ArrayDataset`; used by a worker whose
share of a layer is larger than its memory budget. Every pass over the data
reads the shard files batch by batch; random access (init sample, mini-batches)
reads one file at a time.
"""

from __future__ import annotations

import numpy as np

from actclust import hamming, store


class ParquetDataset:
    """Packed masks of one layer in ``files`` (rows in order), never all in memory.

    Args:
        files: this worker's shard files of the layer, in global row order.
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
        import pyarrow.parquet as pq

        for path in self.files:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=self.batch_rows,
                                                            columns=["bits"]):
                yield store.bits_to_numpy(batch.column(0))

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """(m,) local indices -> (m, B) rows, reading only the files that hold them."""
        import pyarrow.parquet as pq

        indices = np.asarray(indices, dtype=np.int64)
        out = np.zeros((len(indices), self.bytes), dtype=np.uint8)
        which = np.searchsorted(self.starts, indices, side="right") - 1
        for f in np.unique(which):
            pick = np.flatnonzero(which == f)
            bits = store.bits_to_numpy(pq.read_table(self.files[f], columns=["bits"])
                                       .column("bits"))
            out[pick] = bits[indices[pick] - self.starts[f]]
        return out

    def batch(self, rng: np.random.Generator, size: int, total: int) -> np.ndarray:
        idx = rng.integers(0, total, size=size)
        lo = self.global_offset
        mine = (idx >= lo) & (idx < lo + self.count())
        return self.rows(idx[mine] - lo)

    def assign(self, centroids: np.ndarray, backend: str = "auto"):
        labels, dists = [], []
        for x in self._batches():
            lab, dist = hamming.assign(x, centroids, backend=backend)
            labels.append(lab)
            dists.append(dist)
        if not labels:
            return np.zeros(0, np.int64), np.zeros(0, np.int32)
        return np.concatenate(labels), np.concatenate(dists)

    def assign_stats(self, centroids: np.ndarray, k: int, backend: str = "auto"):
        sums = np.zeros((k, 8 * self.bytes), dtype=np.int64)
        counts = np.zeros(k, dtype=np.int64)
        cost = 0
        for x in self._batches():
            labels, dists = hamming.assign(x, centroids, backend=backend)
            s, c = hamming.bit_sums(x, labels, k, backend=backend)
            sums += s
            counts += c
            cost += int(dists.sum(dtype=np.int64))
        return sums, counts, cost
