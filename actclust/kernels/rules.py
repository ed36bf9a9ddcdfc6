"""The objective a clustering of bit masks minimises: its centroid rule and its assignment rule.

Two objectives (definitions in docs/method.md), each a pair of rules that makes Lloyd's
algorithm a descent:

- *theta mode* (``theta = p / q``, an exact fraction): a miss (mask bit set, centroid
  bit clear) costs ``1 - theta``, a false alarm costs ``theta``. Centroid bit = member
  frequency ``>= theta``; assignment ``argmin_j (theta |c_j| - m.c_j)``.
  ``theta = 1/2`` is plain Hamming distance.
- *density mode* (``density = D``): every centroid holds exactly
  ``n = floor(D * width + 1/2)`` bits, the n most frequent among its members (ties:
  lowest neuron index); the cost is the miss count ``|m| - m.c`` and assignment is
  ``argmax_j m.c_j``.

Both assignments are one integer score per (mask, centroid) pair,
``s_j = p |c_j| - q (m . c_j)`` (density mode: ``p = 0, q = 1``), minimised with ties
to the lowest index. The integer cost of a mask is ``(q - p) |m| + min_j s_j``;
multiplied by :attr:`AssignRule.cost_scale` it is the rule's cost in bits: the Hamming
distance at theta = 1/2, twice the weighted cost ``(1 - theta) misses + theta false
alarms`` for any theta, the miss count in density mode.

``cluster.json`` records the rule as :meth:`AssignRule.to_json`; readers rebuild it
with :meth:`AssignRule.from_json` and assign with
:func:`actclust.kernels.assign_scored`.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from actclust import kernels

THETA, DENSITY = "theta", "density"
# The objective when neither theta nor density is given: plain Hamming k-means.
DEFAULT_THETA = 0.5


# The one rule for each clustering parameter; configs (user errors) and the Python API
# (ValueError) both check with these.
def valid_k(value) -> bool:
    """A number of clusters: an integer of at least 1."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def valid_fraction(value) -> bool:
    """theta or a density: a real number in (0, 1]."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value <= 1


@dataclass(frozen=True)
class AssignRule:
    """One objective: ``kind`` "theta" (with ``theta``) or "density" (with ``density``)."""

    kind: str
    theta: Fraction | None = None
    density: float | None = None

    @classmethod
    def from_args(cls, theta=None, density=None) -> "AssignRule":
        """The rule for exactly one of ``theta`` in (0, 1] or ``density`` in (0, 1].

        Neither given means theta = DEFAULT_THETA (0.5). Raises ValueError on a bad value or
        both.
        """
        if theta is not None and density is not None:
            raise ValueError("give theta or density, not both (density fixes the number of "
                             "centroid bits, theta the member frequency that sets one)")
        if density is not None:
            if not valid_fraction(density):
                raise ValueError(f"density must be in (0, 1], got {density!r}")
            return cls(DENSITY, density=float(density))
        theta = DEFAULT_THETA if theta is None else theta
        if not valid_fraction(theta):
            raise ValueError(f"theta must be in (0, 1], got {theta!r}")
        return cls(THETA, theta=kernels.theta_fraction(theta))  # the centroid threshold's fraction

    @classmethod
    def hamming(cls) -> "AssignRule":
        return cls(THETA, theta=Fraction(1, 2))

    # ---- the integer score --------------------------------------------------

    @property
    def weights(self) -> tuple[int, int]:
        """(p, q): the score of centroid j is ``p |c_j| - q (m . c_j)``."""
        if self.kind == DENSITY:
            return 0, 1
        return self.theta.numerator, self.theta.denominator

    @property
    def cost_scale(self) -> float:
        """Integer cost -> cost in bits (Hamming at theta = 1/2, misses in density mode)."""
        return 1.0 if self.kind == DENSITY else 2.0 / self.theta.denominator

    @property
    def is_hamming(self) -> bool:
        return self.kind == THETA and self.theta == Fraction(1, 2)

    # ---- centroids -----------------------------------------------------------

    def centroid_bits(self, width: int) -> int | None:
        """Bits every centroid holds in density mode (None in theta mode)."""
        if self.kind != DENSITY:
            return None
        return int(math.floor(self.density * width + 0.5))

    def centroids(self, sums, counts, width: int) -> np.ndarray:
        """Packed centroids that minimise the rule's cost for fixed members.

        Args:
            sums: (k, d_bits) int64 members with each bit set (d_bits = 8 B >= width).
            counts: (k,) int64 members per cluster.
            width: real bits per mask; bits at positions >= width stay clear.
        Returns:
            (k, B) uint8 packed centroids. Theta mode: a cluster without members gets
            no bits. Density mode: exactly ``centroid_bits(width)`` bits each.
        """
        sums = np.asarray(sums, dtype=np.int64)
        if self.kind == THETA:
            return kernels.centroids_from_counts(sums, counts, float(self.theta), d=width)
        return top_bits(sums, self.centroid_bits(width), width)

    def centroids_of_rows(self, rows: np.ndarray, width: int) -> np.ndarray:
        """Each packed row as a one-member cluster's centroid: (m, B) uint8.

        Theta mode returns the rows (frequency 1 >= theta); density mode keeps the
        row's bits and fills up, or cuts down, to n bits by lowest neuron index.
        """
        rows = np.ascontiguousarray(rows, dtype=np.uint8)
        if self.kind == THETA:
            return rows.copy()
        bits = np.unpackbits(rows, axis=1, bitorder="little").astype(np.int64)
        return top_bits(bits, self.centroid_bits(width), width)

    # ---- the record in cluster.json -----------------------------------------

    def to_json(self) -> dict:
        p, q = self.weights
        if self.kind == DENSITY:
            return {"kind": DENSITY, "density": self.density, "score": [p, q],
                    "assign": "argmax_j m.c_j (ties: lowest j)"}
        return {"kind": THETA, "theta": float(self.theta), "theta_fraction": [p, q],
                "score": [p, q],
                "assign": "argmin_j (theta |c_j| - m.c_j) (ties: lowest j)"}

    @classmethod
    def from_json(cls, record: dict | None) -> "AssignRule":
        """Rule of a ``cluster.json``; a file without one (written before rules were
        recorded) was assigned by plain Hamming distance whatever its theta."""
        if record is None:
            return cls.hamming()
        if record.get("kind") == DENSITY:
            return cls.from_args(density=record["density"])
        if record.get("kind") == THETA:
            p, q = record.get("theta_fraction") or \
                kernels.theta_fraction(record["theta"]).as_integer_ratio()
            return cls(THETA, theta=Fraction(p, q))
        raise ValueError(f"unknown assignment rule {record!r}")

    def describe(self) -> str:
        if self.kind == DENSITY:
            return f"density {self.density:g}"
        return f"theta {float(self.theta):g}"


def top_bits(scores: np.ndarray, n: int, width: int) -> np.ndarray:
    """Packed masks with the n highest-scoring of the first ``width`` bits set per row.

    Ties go to the lowest bit index (a stable sort on the negated scores).

    Args:
        scores: (k, d_bits) integer scores, d_bits >= width.
        n: bits to set, 0 <= n <= width.
    Returns:
        (k, d_bits / 8) uint8.
    """
    k, d_bits = scores.shape
    if not 0 <= n <= width <= d_bits:
        raise ValueError(f"need 0 <= n <= width <= {d_bits}, got n={n}, width={width}")
    order = np.argsort(-scores[:, :width], axis=1, kind="stable")[:, :n]
    bits = np.zeros((k, d_bits), dtype=np.uint8)
    np.put_along_axis(bits, order, 1, axis=1)
    return np.packbits(bits, axis=1, bitorder="little")
