"""Re-centring and re-boxing of the subtracted particles, as ``relion_particle_subtract`` does.

RELION's options ``--recenter_on_mask``, ``--center_x/y/z`` and ``--new_box``
(``src/particle_subtractor.cpp``, single-body branch of ``subtractOneParticle``):

* a 3D point ``c`` (voxels from the map centre ``N//2``, ordered x, y, z: the
  unit is the pixel, the origin the centre of the box, per RELION's GUI help)
  lands in a particle image at ``(A c)_xy - o`` (see ``ParticleTable``);
  ``c`` is scaled from map voxels to the particle's pixels first
  (``new_center * mymodel.pixel_size / my_pixel_size``);
* ``r = o - (A c)_xy`` is split into an integer part ``t = ROUND(r)`` (half
  away from zero, RELION's ``ROUND``) and the sub-pixel rest ``r - t``;
* the subtracted image is translated by ``+t`` pixels with wrap-around
  (``selfTranslate(img, t, WRAP)``), which brings ``c``'s projection to within
  half a pixel of the centre, and ``rlnOriginX/YAngst`` become ``(r - t)·pixel size``;
* the image is then windowed about its centre to the new box, keeping pixels
  ``N//2 - B//2 ... N//2 - B//2 + B - 1`` and filling with zeros where the new
  box is larger (``MultidimArray::window``, which pads with 0);
* ``rlnImageSize`` of every optics group becomes the new box, and the
  ``rlnOriginX/YPriorAngst`` columns are dropped when the particles were
  re-centred; ``rlnCoordinateX/Y`` are left as they are.

The new metadata describe the images of the map translated so that ``c`` is
at its centre: a local refinement of the re-centred particles needs a
reference and mask re-centred on ``c`` (and re-boxed to the new box).

With only a new box (no centre) the image is windowed about its centre and the
origins are kept. Everything here is written once against an array module
``xp`` (NumPy or CuPy).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..conventions import relion_round
from ..errors import InputFileError, OptionError
from ..formats import cs as cs_format
from ..formats import star as star_format

#: Robust noise level of a map's solvent: voxels under median + this many robust σ carry no weight.
SOLVENT_SIGMAS = 3.0
#: Width (σ, voxels) of the Gaussian that smooths the kept density before it is thresholded.
SMOOTHING_VOXELS = 2.0


@dataclass(frozen=True)
class Reboxing:
    """Where to centre the subtracted particles and in what box.

    ``center_voxels``: the 3D point (x, y, z) in map voxels from the map's
    centre voxel ``N//2``, or None to keep each particle's centre;
    ``map_pixel_size``: the maps' voxel size in Å; ``new_box``: the output box
    in pixels, or None to keep the particles' box.
    """

    center_voxels: tuple[float, float, float] | None
    map_pixel_size: float
    new_box: int | None = None

    def output_box(self, box: int) -> int:
        return int(self.new_box) if self.new_box else int(box)


def check_center(center_voxels, map_box: int) -> None:
    """``--center X Y Z`` must be finite and inside the ``map_box``-voxel map, else ``OptionError``."""
    center = np.asarray(center_voxels, dtype=np.float64)
    low, high = -(map_box // 2), map_box - map_box // 2 - 1
    if not np.all(np.isfinite(center)) or np.any(center < low) or np.any(center > high):
        shown = " ".join(f"{value:g}" for value in center)
        raise OptionError(
            f"--center {shown} lies outside the {map_box}-voxel map: it is in voxels from the map's centre "
            f"voxel {map_box // 2} (RELION's --center_x/y/z), each between {low} and {high}. For the voxel at "
            f"index (i, j, k) counted from the map's corner give i-{map_box // 2} j-{map_box // 2} "
            f"k-{map_box // 2}"
        )


def kept_weight(mask: np.ndarray, mask_keeps: bool) -> np.ndarray:
    """The weight of the region that is kept: ``mask`` with --mask-keeps, else ``1 - mask``."""
    return mask if mask_keeps else 1.0 - mask


def kept_region_centre(density: np.ndarray, kept: np.ndarray, path=None) -> np.ndarray:
    """Centre of mass (x, y, z) of ``density · kept``, in voxels from the centre voxel ``N//2``.

    ``density`` and ``kept`` are (z, y, x) arrays of one cubic box. The kept
    region's density is smoothed with a Gaussian of ``SMOOTHING_VOXELS`` (which
    leaves a centre of mass where it is) and only voxels above its solvent level
    (median + ``SOLVENT_SIGMAS`` robust σ, σ = 1.4826·MAD) count, so the noise of a
    large unmasked solvent does not pull the centre away. As in RELION's
    ``MultidimArray::centerOfMass`` the weights are the values. Measured on
    EMD-3488 with chain A of 5ME2 subtracted, against the model's centre of mass
    (tests/test_rebox.py): 0.2 voxel off, 0.8 with solvent noise of half the mean
    protein density (the positive density's plain centre of mass: 0.6 and 7.0).
    Raises ``InputFileError`` (naming ``path``) when nothing is left to weigh.
    """
    region = np.asarray(density, dtype=np.float32) * np.asarray(kept, dtype=np.float32)
    from scipy import ndimage  # here: every run imports this module, few re-centre

    smooth = ndimage.gaussian_filter(region, SMOOTHING_VOXELS, mode="constant")
    median = float(np.median(smooth))
    level = max(median + SOLVENT_SIGMAS * 1.4826 * float(np.median(np.abs(smooth - median))), 0.0)
    weight = np.where(smooth > level, smooth, np.float32(0.0))
    total = float(weight.sum(dtype=np.float64))
    if not total > 0:
        raise InputFileError(
            path, "the region that is kept (outside the subtracted region) holds no density to recentre on.",
            "Check the mask and --mask-keeps, or give the point with --center X Y Z.",
        )
    box = region.shape[0]
    grid = np.arange(box, dtype=np.float64) - box // 2
    z, y, x = (float(weight.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.float64) @ grid) / total
               for axis in range(3))
    return np.array([x, y, z])


def centring_shifts(particles, reboxing: Reboxing) -> tuple[np.ndarray, np.ndarray]:
    """Integer image translations and the new origins of ``particles`` (a ``ParticleTable``).

    Returns ``(shifts, origins_angstrom)``: ``shifts`` (n, 2) int64, pixels
    (x, y) by which each subtracted image is translated; ``origins_angstrom``
    (n, 2) float64, the new ``rlnOriginX/YAngst``. Without a centre the shifts
    are 0 and the origins unchanged.
    """
    count = len(particles)
    if reboxing.center_voxels is None:
        return np.zeros((count, 2), dtype=np.int64), particles.origins_angstrom.copy()
    pixel_size = particles.pixel_size_angstrom
    centre = np.asarray(reboxing.center_voxels, dtype=np.float64)
    centre_px = centre[None, :] * (reboxing.map_pixel_size / pixel_size)[:, None]  # (n, 3)
    projected = np.einsum("nij,nj->ni", particles.rotations, centre_px)[:, :2]
    offset = particles.origins_pixels - projected  # RELION's my_residual_offset before rounding
    shifts = relion_round(offset)
    return shifts.astype(np.int64), (offset - shifts) * pixel_size[:, None]


def translate_and_window(xp, images, shifts, new_box: int):
    """Translate each image by whole pixels (with wrap-around), then window it to ``new_box``.

    ``images``: (n, N, N) array (axes y, x); ``shifts``: (n, 2) integers (x, y),
    the content moves by ``+shift``; returns (n, B, B) float32 with output pixel
    ``B//2`` at input pixel ``N//2 - shift`` and zeros outside the input box.
    Reproduces RELION's ``selfTranslate(..., WRAP)`` followed by ``window``.
    """
    images = xp.asarray(images)
    count, box = images.shape[0], images.shape[-1]
    shifts = xp.asarray(np.asarray(shifts, dtype=np.int64))
    window = xp.arange(new_box) + (box // 2 - new_box // 2)  # rows/columns of the translated image
    inside = (window >= 0) & (window < box)
    rows = (window[None, :] - shifts[:, 1:2]) % box  # (n, B): source row of each output row
    cols = (window[None, :] - shifts[:, 0:1]) % box
    picked = images[xp.arange(count)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return (picked * (inside[:, None] & inside[None, :])).astype(xp.float32)


def rebox_images(xp, images, particles, reboxing: Reboxing):
    """The subtracted images of ``particles`` re-centred and re-boxed: (n, B, B) float32."""
    shifts, _ = centring_shifts(particles, reboxing)
    return translate_and_window(xp, images, shifts, reboxing.output_box(images.shape[-1]))


def reboxed_table(table, reboxing: Reboxing):
    """``table`` with the new origins and box, in the table and in its raw star/.cs metadata."""
    _, origins = centring_shifts(table, reboxing)
    box = np.full(len(table), reboxing.output_box(int(table.box_size[0])), dtype=np.int64)
    recentred = reboxing.center_voxels is not None
    source = table.source
    if table.source_format == "star" and source is not None:
        source = star_format.with_origins_and_box(source, origins, int(box[0]), drop_priors=recentred)
    elif table.source_format == "cs" and source is not None:
        source = cs_format.with_origins_and_box(source, origins, int(box[0]))
    return dataclasses.replace(table, origins_angstrom=origins, box_size=box, source=source)


def describe(reboxing: Reboxing, how: str, box: int) -> str:
    """One line for the user: which point the particles are centred on, and the box."""
    parts = []
    if reboxing.center_voxels is not None:
        x, y, z = reboxing.center_voxels
        parts.append(f"re-centred on the projections of map point ({x:.2f}, {y:.2f}, {z:.2f}) voxels from the "
                     f"map centre ({how})")
    parts.append(f"in a box of {reboxing.output_box(box)} px (input {box} px)")
    return "dsub: the subtracted particles are " + ", ".join(parts) + "."
