"""The Python API's name for the bit kernels (README, Python API): ``actclust.hamming.assign``.

The kernels live in :mod:`actclust.kernels`; this module re-exports them.
"""
from actclust.kernels import (BACKENDS, STAT_FIELDS, THETA_DENOMINATOR, assign,  # noqa: F401
                              assign_scored,
                              assignment_stats, available_backends, bit_sums, bitcount,
                              centroids_from_counts, distances_to, popcount, resolve_backend,
                              theta_fraction)
