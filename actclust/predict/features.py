"""Training data of the predictors: FFN inputs and true masks of the fitting windows.

Why on disk: the frozen model's forward pass costs about fifty times a predictor's
step, so it runs once, not once per epoch. Each shard of ``shard_windows`` windows
is one Parquet object committed by its own record (:mod:`actclust.io.predictor_store`,
local directory or object store): a rerun (or a restarted worker) writes only the
shards without a record, and training streams shard by shard (memory flat in the corpus).

Shard columns: ``seq`` int64, ``pos`` int32, then per clustered layer ``l``:
``h<l>`` fixed_size_binary(2 * d_model), the FFN input as little-endian float16, and
``m<l>`` fixed_size_binary(ceil(width / 8)), the true mask in the store's bit order.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import numpy as np

from actclust import kernels
from actclust.capture.hooks import captured, captured_modules, mask_of
from actclust.io import mask_store as store
from actclust.io import predictor_store
from actclust.io.models import ffn_input_modules, load_model

VALIDATION_EVERY = 10  # shard i is a validation shard iff i % 10 == 9


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """What a feature directory holds; travels from the driver to the workers."""

    root: str  # local path or object-store URI
    model: str
    site: str
    layers: tuple
    thresholds: tuple
    d_model: int
    width: int
    shard_windows: int
    trust_remote_code: bool = False


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def is_validation(index: int, n_shards: int) -> bool:
    """Every 10th shard validates; with 2..10 shards, the last one does."""
    if n_shards < 2:
        return False
    if n_shards < VALIDATION_EVERY:
        return index == n_shards - 1
    return index % VALIDATION_EVERY == VALIDATION_EVERY - 1


def shard_count(n_windows: int, shard_windows: int) -> int:
    return -(-n_windows // shard_windows)


def schema(spec: FeatureSpec):
    import pyarrow as pa

    fields = [("seq", pa.int64()), ("pos", pa.int32())]
    for layer in spec.layers:
        fields.append((f"h{layer}", pa.binary(2 * spec.d_model)))
        fields.append((f"m{layer}", pa.binary(store.row_bytes(spec.width))))
    return pa.schema(fields)


@contextlib.contextmanager
def ffn_inputs(model) -> Iterator[list]:
    """Yield a list whose entry ``l`` is the latest FFN input of layer ``l`` (..., d_model)."""
    with captured_modules(ffn_input_modules(model), reads_input=True) as out:
        yield out


def compute_shard(model, spec: FeatureSpec, seq: np.ndarray, ids: np.ndarray,
                  batch_windows: int = 4, device: str = "cpu"):
    """The feature table of windows ``ids`` (W, T) with numbers ``seq`` (W,)."""
    import pyarrow as pa
    import torch

    h_parts: list[list[np.ndarray]] = [[] for _ in spec.layers]
    m_parts: list[list[np.ndarray]] = [[] for _ in spec.layers]
    with torch.inference_mode(), ffn_inputs(model) as hs, captured(model, spec.site) as acts:
        for start in range(0, len(ids), batch_windows):
            model(torch.tensor(ids[start:start + batch_windows], device=device))
            for i, (layer, tau) in enumerate(zip(spec.layers, spec.thresholds)):
                h = hs[layer].reshape(-1, spec.d_model)
                a = acts[layer].reshape(-1, spec.width)
                h_parts[i].append(h.to(torch.float16).cpu().numpy())
                m_parts[i].append(store.pack(mask_of(a, tau).cpu().numpy()))
    w, t = ids.shape
    columns = {"seq": pa.array(np.repeat(seq.astype(np.int64), t)),
               "pos": pa.array(np.tile(np.arange(t, dtype=np.int32), w))}
    for i, layer in enumerate(spec.layers):
        h = np.ascontiguousarray(np.concatenate(h_parts[i]).astype("<f2")).view(np.uint8)
        columns[f"h{layer}"] = store.bits_array(h)
        columns[f"m{layer}"] = store.bits_array(np.concatenate(m_parts[i]))
    return pa.table(columns, schema=schema(spec))


def write_missing(spec: FeatureSpec, seq: np.ndarray, ids: np.ndarray, rank: int = 0,
                  world: int = 1, device: str = "cpu") -> int:
    """Write this rank's share (shard i with i % world == rank) of the missing shards.

    Loads the model only when something is missing; returns the number written.
    """
    n = shard_count(len(seq), spec.shard_windows)
    todo = [i for i in range(rank, n, world)
            if not predictor_store.shard_complete(spec.root, shard_name(i))]
    if not todo:
        return 0
    model = load_model(spec.model, trust_remote_code=spec.trust_remote_code).model.to(device)
    for i in todo:
        part = slice(i * spec.shard_windows, (i + 1) * spec.shard_windows)
        table = compute_shard(model, spec, seq[part], ids[part], device=device)
        predictor_store.write_shard(spec.root, shard_name(i), table)
    return len(todo)


def read_shard(spec: FeatureSpec, index: int) -> tuple[np.ndarray, np.ndarray]:
    """FFN inputs (N, L, d_model) float32 and packed true masks (N, L, B) uint8 of a shard."""
    h, bits = read_shard_f16(spec, index)
    return h.astype(np.float32), bits


def read_shard_f16(spec: FeatureSpec, index: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_shard` with the FFN inputs as stored, float16."""
    table = predictor_store.read_shard(spec.root, shard_name(index))
    h = np.stack([store.bits_to_numpy(table.column(f"h{l}")).view("<f2")
                  for l in spec.layers], axis=1)
    bits = np.stack([store.bits_to_numpy(table.column(f"m{l}")) for l in spec.layers], axis=1)
    return h, bits


def split_shards(n_shards: int) -> tuple[list[int], list[int]]:
    train = [i for i in range(n_shards) if not is_validation(i, n_shards)]
    return train, [i for i in range(n_shards) if is_validation(i, n_shards)]


class Targets:
    """Training targets of one shard, from its packed true masks (N, L, B)."""

    def __init__(self, kind: str, centroids: list[np.ndarray], width: int, rule=None):
        self.kind, self.centroids, self.width = kind, centroids, width
        self.rule = rule  # cluster.json's assignment rule (None: Hamming)

    def labels(self, bits: np.ndarray) -> np.ndarray:
        """The clustering's own assignment of each true mask: (N, L) int64."""
        return np.stack([kernels.assign_scored(np.ascontiguousarray(bits[:, i]), c, self.rule)[0]
                         for i, c in enumerate(self.centroids)], axis=1)

    def __call__(self, bits: np.ndarray):
        return self.select(self.prepare(bits), slice(None))

    def prepare(self, bits: np.ndarray):
        """A shard's targets in their compact form: cluster labels (N, L) int64, or the
        packed masks themselves (N, L, B) uint8, unpacked a batch at a time."""
        import torch

        return torch.from_numpy(self.labels(bits) if self.kind == "cluster" else bits)

    def select(self, prepared, rows):
        """The targets of ``rows`` (an index tensor or a slice) of a prepared shard:
        (n, L) int64 labels, or (n, L, width) float32 true masks."""
        import torch

        part = prepared[rows]
        if self.kind == "cluster":
            return part
        n, L, b = part.shape
        return torch.from_numpy(store.unpack(part.numpy().reshape(n * L, b), self.width)
                                .reshape(n, L, self.width).astype(np.float32))


# Decoded shards a training worker keeps between epochs; past it, shards are read again.
CACHE_BYTES = 4 << 30


class ShardCache:
    """A worker's decoded shards: FFN inputs as float16 tensors and prepared targets.

    Each epoch used to read and decode every shard again and recompute its targets (the
    clustering's assignment of every mask), which cost far more than the training steps.
    Shards are kept until ``budget`` bytes are held, so memory stays bounded on any corpus.
    """

    def __init__(self, spec: FeatureSpec, targets: Targets, budget: int = CACHE_BYTES):
        self.spec, self.targets, self.budget = spec, targets, budget
        self.held: dict[int, tuple] = {}
        self.bytes = 0

    def get(self, index: int):
        """(h (N, L, d_model) float16 tensor, prepared targets) of shard ``index``."""
        import torch

        if index in self.held:
            return self.held[index]
        h, bits = read_shard_f16(self.spec, index)
        entry = (torch.from_numpy(h), self.targets.prepare(bits))
        size = entry[0].nbytes + entry[1].nbytes
        if self.bytes + size <= self.budget:
            self.held[index] = entry
            self.bytes += size
        return entry
