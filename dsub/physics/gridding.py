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
        """Kernel values at ``distance`` (grid units, any shape, float32); zero beyond width/2."""
        if self.kind == "trilinear":
            return xp.maximum(1.0 - xp.abs(distance), 0.0).astype("float32")
        ratio = 2.0 * distance / self.width
        inside = xp.maximum(1.0 - ratio * ratio, 0.0)
        values = bessel_i0(xp, self.beta * xp.sqrt(inside), self.beta) - 1.0
        return xp.where(xp.abs(ratio) <= 1.0, values, 0.0).astype("float32")

    def transform(self, frequency):
        """``K̂(ν)`` for NumPy frequencies ν in cycles per grid point (float64)."""
        frequency = np.asarray(frequency, dtype=np.float64)
        if self.kind == "trilinear":
            return np.sinc(frequency) ** 2
        root = np.sqrt(self.beta**2 - (np.pi * self.width * frequency) ** 2 + 0j)
        root = np.where(root == 0, 1e-12, root)
        return (self.width * np.sinh(root) / root).real - self.width * np.sinc(self.width * frequency)


def bessel_i0(xp, x, largest: float):
    """The modified Bessel function I0 of ``x`` in [0, largest], float64: its power series
    ``Σ (x²/4)^k / (k!)²`` (Abramowitz & Stegun 9.6.12) summed by Horner's rule.

    Enough terms that the first left out is below 1e-12 of the sum at ``largest``
    (a compiled ufunc such as SciPy's is several times slower on large arrays).
    """
    quarter = (xp.asarray(x, dtype="float64") ** 2) / 4.0
    terms = int(12 + 1.5 * largest)
    total = xp.ones_like(quarter)
    for k in range(terms, 0, -1):
        total = 1.0 + total * quarter / float(k * k)
    return total


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
