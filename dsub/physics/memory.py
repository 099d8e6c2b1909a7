"""How much memory the physics of one worker needs, from the box and the settings alone.

Two figures, both for the layout of ``subtract.prepare_half_map`` and
``subtract.subtract_batch`` (they change together with that code):

* ``prepared_map_bytes``: the prepared maps of both half sets, at their peak,
  i.e. while the last of the four transforms is being made;
* ``batch_bytes_per_particle``: the peak working memory of a batch, per particle.

The constants are counted from the code and checked against the peak that
``tracemalloc`` measures for NumPy (tests/test_memory.py: within a few per cent
on boxes 24 to 48). CuPy makes the same arrays, but cuFFT needs less scratch
than NumPy's pocketfft, so on a GPU the figures are an upper bound (by about a
quarter for the map preparation).
"""

from __future__ import annotations

COMPLEX64 = 8
FLOAT32 = 4

#: Peak of NumPy's ``rfftn`` of a real 3D array, in units of its own output: pocketfft
#: (NumPy 2.x) transforms axis by axis into fresh arrays, 6 outputs at the peak (measured).
RFFTN_PEAK_OUTPUTS = 6
#: Per slice coefficient (n, size, size//2+1) of the trilinear slice extraction: the 3D
#: coordinates, their floors as int64, the wrapped indices, eight gathered corners, the
#: weights, and the shift phases (``projector._extract_slices_trilinear``, ``shift_phases``).
SLICE_BYTES_PER_COEFFICIENT = 118
#: Per coefficient of the box's rfft2 grid: the CTF (computed in float64), the real-space
#: full and masked images, their spectra in the contrast fit, and the band weights.
BOX_BYTES_PER_COEFFICIENT = 26


def padded_size(box: int, settings) -> int:
    """Edge of the zero-padded map, ``padding * box`` voxels."""
    return int(box) * int(settings.padding)


def rfft_coefficients(size: int, dims: int) -> int:
    """Number of complex values in an rfft of a ``size``^dims real array."""
    return size ** (dims - 1) * (size // 2 + 1)


def prepared_map_bytes(box: int, settings) -> int:
    """Peak bytes of the prepared maps of BOTH half sets (whole and masked: four transforms).

    Resident: four complex64 rffts of (P, P, P), P = padding * box. The peak
    comes while the fourth is made: three resident transforms, the zero-padded
    float32 map and its ``ifftshift`` copy (P³ each), NumPy's ``rfftn`` scratch
    (``RFFTN_PEAK_OUTPUTS`` outputs), and box-sized float32 copies of the map
    (masked map, region weights, grid-corrected map).
    """
    size = padded_size(box, settings)
    transform = rfft_coefficients(size, 3) * COMPLEX64
    padded_copies = 2 * size**3 * FLOAT32
    box_copies = 3 * int(box) ** 3 * FLOAT32
    return 3 * transform + padded_copies + RFFTN_PEAK_OUTPUTS * transform + box_copies


def batch_bytes_per_particle(box: int, settings) -> int:
    """Peak working bytes per particle of ``subtract_batch``.

    The slice is sampled on the padded grid (``projector == "padded"``) or on
    the box grid (``"relion"``); every other array lives on the box grid.
    """
    size = padded_size(box, settings) if settings.projector == "padded" else int(box)
    return (SLICE_BYTES_PER_COEFFICIENT * rfft_coefficients(size, 2)
            + BOX_BYTES_PER_COEFFICIENT * rfft_coefficients(int(box), 2))
