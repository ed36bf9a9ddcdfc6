"""Packed bit masks: validation, array-library detection, 64-bit words and popcounts.

A packed mask set is a ``(N, B)`` uint8 array, neuron ``i`` being bit ``i % 8``
(least significant first) of byte ``i // 8``. These helpers are shared by every
backend; they import numpy only.
"""
from __future__ import annotations

import numpy as np

_HAS_BITWISE_COUNT = hasattr(np, "bitwise_count")
_BYTE_POPCOUNT = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)


def _check_packed(x, name: str):
    """Check that ``x`` is a 2-D uint8 array-like (numpy, cupy or torch)."""
    if getattr(x, "ndim", None) != 2:
        shape = getattr(x, "shape", None)
        raise ValueError(f"{name} must be a 2-D (rows, bytes) uint8 array, got shape {shape}")
    if str(x.dtype) not in ("uint8", "torch.uint8"):
        raise ValueError(f"{name} must have dtype uint8 (packed bits), got {x.dtype}")
    return x


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _is_cupy(x) -> bool:
    return type(x).__module__.startswith("cupy")


def _to_numpy(a) -> np.ndarray:
    """numpy view or copy of a numpy, cupy or torch array."""
    if _is_cupy(a):
        return a.get()
    return a.cpu().numpy() if _is_torch(a) else np.asarray(a)


def _is_device_array(x) -> bool:
    return _is_cupy(x) or (_is_torch(x) and x.device.type != "cpu")


def _as_words(x, xp=np):
    """(N, B) uint8 -> (N, ceil(B/8)) uint64, zero-padded, C-contiguous (numpy or cupy ``xp``)."""
    n, b = x.shape
    w = -(-b // 8)
    if b != 8 * w or not x.flags.c_contiguous:
        padded = xp.zeros((n, 8 * w), dtype=xp.uint8)
        padded[:, :b] = x
        x = padded
    return x.view(xp.uint64)


def bitcount(words: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Per-element popcount of a uint64 array -> uint8 array of the same shape.

    ``numpy.bitwise_count`` (numpy >= 2), else a byte lookup table.
    """
    if _HAS_BITWISE_COUNT:
        return np.bitwise_count(words, out=out)
    counts = _BYTE_POPCOUNT[words.view(np.uint8)].reshape(*words.shape, 8).sum(axis=-1, dtype=np.uint8)
    if out is None:
        return counts
    out[...] = counts
    return out


def popcount(x) -> np.ndarray:
    """Number of set bits per row.

    Args:
        x: (N, B) uint8 packed masks.
    Returns:
        (N,) int32.
    """
    x = _check_packed(np.asarray(x), "x")
    return bitcount(_as_words(x)).sum(axis=1, dtype=np.int32)


def distances_to(x, y) -> np.ndarray:
    """Hamming distance of every row of ``x`` to the single mask ``y``.

    Args:
        x: (N, B) uint8 packed masks (no copy is made when B % 8 == 0).
        y: (B,) uint8 packed mask.
    Returns:
        (N,) int32.
    """
    x = _check_packed(np.asarray(x), "x")
    y = np.asarray(y, dtype=np.uint8).reshape(1, -1)
    if y.shape[1] != x.shape[1]:
        raise ValueError(f"y must have {x.shape[1]} bytes, got {y.shape[1]}")
    return bitcount(_as_words(x) ^ _as_words(y)).sum(axis=1, dtype=np.int32)

