"""Low-pass filter of a map with a soft (raised-cosine) edge, applied to the half maps before subtraction.

cryoSPARC's Particle Subtraction offers the same ("lpf_volume": "Apply a lowpass
filter to the specified resolution in Angstroms to the input volume before
subtraction"). The edge follows RELION's ``lowPassFilterMap`` (``src/fftw.cpp``,
used by ``relion_image_handler --lowpass`` with ``--filter_edge_width 2``):
the transform is kept below ``(shell − w/2)/N`` cycles per voxel, zeroed above
``(shell + w/2)/N`` and multiplied by ``0.5 + 0.5·cos(π·(r − low)/(high − low))``
in between, where ``shell = N·voxel/resolution`` (not rounded to a whole shell
here) and ``w`` is the edge width in Fourier shells.
"""

from __future__ import annotations

#: RELION's default ``--filter_edge_width`` (Fourier shells).
EDGE_SHELLS = 2.0


def lowpass_weights(xp, shape, voxel_size_angstrom: float, resolution_angstrom: float,
                    edge_shells: float = EDGE_SHELLS):
    """Filter weights on the ``rfftn`` grid of a map of ``shape`` (float32, values in [0, 1]).

    ``voxel_size_angstrom`` and ``resolution_angstrom`` in Å; raises ValueError
    for non-positive values.
    """
    if not (voxel_size_angstrom > 0 and resolution_angstrom > 0 and edge_shells >= 0):
        raise ValueError("the voxel size, the low-pass resolution and the edge width must be positive")
    size = shape[0]
    shell = size * voxel_size_angstrom / resolution_angstrom
    low = max(0.0, shell - edge_shells / 2) / size  # cycles per voxel
    high = (shell + edge_shells / 2) / size
    axes = [xp.fft.fftfreq(n) for n in shape[:-1]] + [xp.fft.rfftfreq(shape[-1])]
    grids = xp.meshgrid(*axes, indexing="ij", sparse=True)
    radius = xp.sqrt(sum(g.astype(xp.float32) ** 2 for g in grids))
    if high <= low:  # no edge: a hard cut-off
        return (radius <= low).astype(xp.float32)
    across = xp.clip((radius - low) / (high - low), 0.0, 1.0)  # 0 below the edge, 1 above it
    return (0.5 + 0.5 * xp.cos(xp.pi * across)).astype(xp.float32)


def lowpass_map(xp, volume, voxel_size_angstrom: float, resolution_angstrom: float,
                edge_shells: float = EDGE_SHELLS):
    """``volume`` (3D, any real dtype, NumPy or CuPy) low-pass filtered to ``resolution_angstrom``; float32."""
    volume = xp.asarray(volume, dtype=xp.float32)
    weights = lowpass_weights(xp, volume.shape, voxel_size_angstrom, resolution_angstrom, edge_shells)
    axes = tuple(range(volume.ndim))
    filtered = xp.fft.irfftn(xp.fft.rfftn(volume, axes=axes) * weights, s=volume.shape, axes=axes)
    return filtered.astype(xp.float32)
