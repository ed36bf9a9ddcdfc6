"""Property-based checks: the Parquet round trip of packed masks at any width and size."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from actclust.io import mask_store as store


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 300), rows=st.integers(0, 40), density=st.floats(0, 1),
       seed=st.integers(0, 2**31 - 1))
def test_masks_survive_the_parquet_round_trip(tmp_path_factory, width, rows, density, seed):
    rng = np.random.default_rng(seed)
    masks = rng.random((rows, width)) < density
    packed = store.pack(masks)
    assert packed.shape == (rows, store.row_bytes(width))
    # Bits beyond the width are zero, as the contract's bit order requires.
    if width % 8:
        assert not np.any(packed[:, -1] >> (width % 8))
    seq = np.arange(rows, dtype=np.int64) // 4
    pos = (np.arange(rows) % 4).astype(np.int32)
    token = rng.integers(0, 50_000, rows).astype(np.int32)
    path = tmp_path_factory.mktemp("rt") / "shard.parquet"
    digest = store.write_table_atomic(store.mask_table(seq, pos, token, packed, width), path)
    assert digest == store.sha256_file(path)
    table = pq.read_table(path)
    assert table.schema.equals(store.mask_schema(width))
    back = store.bits_to_numpy(table.column("bits"))
    np.testing.assert_array_equal(back, packed)
    np.testing.assert_array_equal(store.unpack(back, width), masks)
    np.testing.assert_array_equal(table.column("token").to_numpy(), token)
    assert [p.name for p in path.parent.iterdir()] == ["shard.parquet"]  # no temporaries left


@settings(max_examples=30, deadline=None)
@given(width=st.integers(1, 200), rows=st.integers(1, 30), seed=st.integers(0, 2**31 - 1))
def test_bit_order_is_little_endian_within_bytes(width, rows, seed):
    masks = np.random.default_rng(seed).random((rows, width)) < 0.5
    packed = store.pack(masks)
    for i in range(width):
        np.testing.assert_array_equal((packed[:, i // 8] >> (i % 8)) & 1, masks[:, i])
