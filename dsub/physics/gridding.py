"""Interpolation kernels for reading a 3D Fourier transform off-grid, with their corrections.

Reading the oversampled transform ``G`` of a map at a point ``q`` (grid units) as
``Σ_u K(q - u) G[u]`` (``u`` the ``width`` grid points nearest ``q`` on each
axis) equals the exact transform of the map multiplied, in real space, by the
kernel's own transform ``K̂(x / P)`` (P the grid size, x the voxel's offset from
the centre), up to aliases ``K̂(x / P + m)`` that a good kernel makes small.
Dividing the map by ``K̂(x / P)`` beforehand ("gridding correction",
deapodisation) cancels the first part; the aliases are the error left.

Two kernels (separable in x, y, z):

* ``trilinear``: the tent ``1 - |u|`` (width 2), ``K̂(ν) = sinc²(ν)``: RELION's
  interpolator (``Projector::project``, ``TRILINEAR``) with its gridding
  correction (``Projector::griddingCorrect``, sinc² for trilinear).
* ``kaiser-bessel``: ``I0(β √(1 - (2u/w)²)) - 1`` for ``|u| ≤ w/2``, with
  ``K̂(ν) = w sinh(√(β² - (π w ν)²)) / √(β² - (π w ν)²) - w sinc(w ν)``
  (Jackson et al. 1991, IEEE TMI 10:473, eq. 3, less the transform of the
  constant 1 that makes the kernel fall to zero at its edge, so a point on the
  lattice reads its taps symmetrically) and the shape
  ``β = π √((w/σ)² (σ - 1/2)² - 0.8)`` for oversampling σ (Beatty, Nishimura &
  Pauly 2005, IEEE TMI 24:799, eq. 5), scaled as the projector measured best.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

KERNELS = ("trilinear", "kaiser-bessel")


@dataclass(frozen=True)
class GriddingKernel:
    """A separable interpolation kernel: its kind, width (grid points per axis) and shape β."""

    kind: str
    width: int
    beta: float = 0.0

    def __post_init__(self):
        if self.kind not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, not {self.kind!r}")
        if self.kind == "trilinear" and self.width != 2:
            raise ValueError("the trilinear kernel has width 2")
        if not 2 <= self.width <= 8:
            raise ValueError(f"kernel width must be 2..8 grid points, not {self.width}")

    @property
    def reach(self) -> int:
        """How many grid points the kernel reaches beyond a point on either side: ceil(width / 2)."""
        return (self.width + 1) // 2

    def weights(self, xp, distance):
        """Kernel values at ``distance`` (grid units, any shape), float32; zero beyond width/2.

        Kaiser-Bessel: ``I0(β √u) - 1`` for u = 1 - (2·distance/width)², as the
        polynomial in u of ``kaiser_bessel_series`` summed by Horner's rule in float32
        (no square root): the same arithmetic, in the same order, as the compiled CPU
        gather (``_slice_cpu``); the GPU's slice kernel sums it with fused multiply-adds.
        """
        distance = xp.asarray(distance, dtype="float32")
        if self.kind == "trilinear":
            return xp.maximum(np.float32(1.0) - xp.abs(distance), np.float32(0.0))
        ratio = np.float32(2.0) * distance / np.float32(self.width)
        unit = xp.maximum(np.float32(1.0) - ratio * ratio, np.float32(0.0))  # 0 at and beyond the edge
        coefficients = kaiser_bessel_series(self.beta)
        total = xp.full_like(unit, coefficients[0])
        for coefficient in coefficients[1:]:
            total = total * unit + coefficient
        return total * unit

    def transform(self, frequency):
        """``K̂(ν)`` for NumPy frequencies ν in cycles per grid point (float64)."""
        frequency = np.asarray(frequency, dtype=np.float64)
        if self.kind == "trilinear":
            return np.sinc(frequency) ** 2
        root = np.sqrt(self.beta**2 - (np.pi * self.width * frequency) ** 2 + 0j)
        root = np.where(root == 0, 1e-12, root)
        return (self.width * np.sinh(root) / root).real - self.width * np.sinc(self.width * frequency)


#: ``kaiser_bessel_series`` leaves out the terms below this fraction of the largest weight, I0(β) - 1.
SERIES_TOLERANCE = 1e-9


@lru_cache(maxsize=16)
def kaiser_bessel_series(beta: float) -> tuple:
    """Coefficients (float32), highest power first, of the polynomial in u = 1 - r² whose value times u is the
    Kaiser-Bessel weight I0(β √u) - 1, from I0's power series Σ (x²/4)^k / (k!)² (Abramowitz & Stegun
    9.6.12): (β²/4)^k / (k!)² for k = K, ..., 1, with K the first power whose term at u = 1 falls below
    ``SERIES_TOLERANCE`` of the sum. Summed in float32 by Horner's rule it is within 1e-6 of the largest
    weight of I0 in float64 on [0, 1] (tests/test_field_kernel.py)."""
    quarter = beta * beta / 4.0
    largest = float(np.i0(beta)) - 1.0
    coefficients, term, k = [], 1.0, 0
    while True:
        k += 1
        term *= quarter / (k * k)
        coefficients.append(np.float32(term))
        if term < SERIES_TOLERANCE * largest or k >= 60:
            return tuple(coefficients[::-1])


def kaiser_bessel(width: int, oversampling: float) -> GriddingKernel:
    """The Kaiser-Bessel kernel of ``width`` with Beatty's β for ``oversampling``."""
    shape = (width / oversampling) ** 2 * (oversampling - 0.5) ** 2 - 0.8
    if shape <= 0:
        raise ValueError(f"no Kaiser-Bessel kernel of width {width} at oversampling {oversampling:g}")
    return GriddingKernel("kaiser-bessel", width, math.pi * math.sqrt(shape))


def grid_size(box: int, oversampling: float) -> int:
    """The smallest even size ≥ oversampling · box whose only prime factors are 2, 3 and 5."""
    size = max(int(math.ceil(oversampling * box - 1e-9)), box)
    while True:
        if size % 2 == 0:
            rest = size
            for prime in (2, 3, 5):
                while rest % prime == 0:
                    rest //= prime
            if rest == 1:
                return size
        size += 1


def gridding_profile(kernel: GriddingKernel, box: int, size: int) -> np.ndarray:
    """``K̂(x / size)`` along one axis of a box³ map padded to ``size`` (x: offset of a voxel from
    voxel box//2), float64 (box,): the map is divided by its outer product (gridding correction)."""
    return kernel.transform((np.arange(box) - box // 2) / float(size))
