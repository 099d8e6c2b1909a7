"""Subtraction of a batch of particles with the half-map of their own half set.

For each particle: model the full half-map and the masked half-map as the
particle was extracted (``model_images``), choose its contrast scale α, and
subtract ``α · model_masked`` from the image.

The default model follows extraction from a micrograph: the projection (box-grid
slice, ``projector.py``) is placed in a zero field of ``extension · box``
pixels, shifted by its origin and multiplied by its CTF on that field, and
cropped back to the box, so signal the CTF delocalises beyond the box leaves it
instead of wrapping round to the other side. CTF-premultiplied images were
multiplied by the CTF after extraction, on the box: their model is
``CTF_box · crop(CTF_field · P)``. ``projector="relion"`` keeps RELION's model
(``relion_particle_subtract``): trilinear box-grid slice, shift and CTF (CTF²
when premultiplied) on the box grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .contrast import SCALE_MODES, ContrastFit, ContrastResult, fit_contrast
from .ctf import electron_wavelength_angstrom
from .fsc import wiener_filter
from .optics import particle_transfer, slice_matrices
from .gridding import grid_size
from .projector import (
    CORNERS,
    PROJECTORS,
    PreparedVolume,
    extract_slices,
    image_spectra,
    pad_images,
    prepare_volume,
    projector_kernel,
    shift_phases,
    spectra_to_images,
)

#: Default size of the extraction field, in boxes (see benchmarks/README.md for the measurement).
EXTENSION = 2.0


@dataclass(frozen=True)
class SubtractionSettings:
    """Everything about the physics that a run can choose.

    ``padding``: oversampling of the prepared maps (None: 1.25 for "gridding",
    RELION's 2 for "relion"). ``corners``: what the spectrum's corners beyond the
    Nyquist circle hold ("map" or "zero"; "relion" always uses "zero").
    ``extension``: least size of the extraction field in boxes (≥ 2; grown
    for the CTF's delocalisation, ``field_size``; "relion" does not use one).
    ``field_slice``: sample the slice on the field's grid itself instead of
    zero-padding the box's projection (exact for a map whose projection
    overflows the box, four times the taps; see benchmarks/README.md).
    """

    projector: str = "gridding"
    padding: float | None = None
    scale: str = "fit"
    mask_keeps: bool = False
    fit: ContrastFit = field(default_factory=ContrastFit)
    #: low-pass both half maps to this resolution (Å, soft edge: ``lowpass.py``) before preparation; None = off
    lowpass_angstrom: float | None = None
    corners: str = "map"
    extension: float = EXTENSION
    field_slice: bool = False

    def __post_init__(self):
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS}, not {self.projector!r}")
        if self.scale not in SCALE_MODES:
            raise ValueError(f"scale must be one of {SCALE_MODES}, not {self.scale!r}")
        if self.padding is not None and not self.padding >= 1:
            raise ValueError(f"--padding must be at least 1, not {self.padding!r}")
        if self.lowpass_angstrom is not None and not self.lowpass_angstrom > 0:
            raise ValueError(f"--lowpass must be a resolution in Å above 0, not {self.lowpass_angstrom:g}")
        if self.corners not in CORNERS:
            raise ValueError(f"corners must be one of {CORNERS}, not {self.corners!r}")
        if not self.extension >= 2:
            raise ValueError(f"--extension must be at least 2 (boxes), not {self.extension!r}")

    def field_size(self, box: int, delocalisation_pixels: float = 0.0) -> int:
        """Side of the extraction field in pixels (the box itself for "relion").

        At least ``extension`` boxes, and at least the box plus the CTF's
        delocalisation at Nyquist (``ctf_delocalisation_pixels``), half of it on
        each side; then the next even 2-3-5-smooth size.
        """
        if self.projector == "relion":
            return box
        return grid_size(box, max(self.extension, 1.0 + float(delocalisation_pixels) / box))


@dataclass
class HalfMapModel:
    """One half-map prepared twice: whole, and restricted to the region to subtract."""

    full: PreparedVolume  # Wiener-filtered by the half maps' FSC unless the fit's weighting is "none"
    masked: PreparedVolume
    fsc: object = None  # fsc.ShellCurve of the two half maps; None: treat the map as exact
    pixel_size_angstrom: float | None = None  # the map's voxel size; None: each particle's own


def subtraction_region(xp, mask, mask_keeps: bool):
    """Weights of the region to subtract: the mask itself, or 1 - mask under RELION's convention."""
    mask = xp.asarray(mask, dtype="float32")
    return 1.0 - mask if mask_keeps else mask


def prepare_half_map(xp, half_map, mask, settings: SubtractionSettings, fsc=None,
                     pixel_size_angstrom=None) -> HalfMapModel:
    """Prepare a half-map for projection, whole and masked (done once per worker).

    ``fsc``: the two half maps' ``fsc.ShellCurve``. With the default
    ``settings.fit.weighting`` ("fsc") the whole map, which only serves the
    contrast fit, is Wiener-filtered by it in 3D (see ``contrast.py``); the
    masked map, which is subtracted, never is. ``pixel_size_angstrom`` is the
    map's voxel size: each particle's projection is then sampled at its own
    pixel size (``optics.slice_matrices``).
    """
    half_map = xp.asarray(half_map, dtype="float32")
    region = subtraction_region(xp, mask, settings.mask_keeps)
    kernel, oversampling = projector_kernel(settings.projector, settings.padding)
    fit_map = half_map if fsc is None or settings.fit.weighting != "fsc" else wiener_filter(xp, half_map, fsc)
    return HalfMapModel(
        full=prepare_volume(xp, fit_map, kernel, oversampling),
        masked=prepare_volume(xp, half_map * region, kernel, oversampling),
        fsc=fsc,
        pixel_size_angstrom=pixel_size_angstrom,
    )


def particle_ctfs(xp, particles, size: int):
    """What multiplies each projection on an rfft2 grid of ``size``: complex64 (n, size, size//2+1).

    ``scale · CTF`` with every aberration (``optics.particle_transfer``), at each
    particle's pixel size: frequencies ``k / (size · pixel size)``, so ``size``
    may exceed the box (the extraction field). Callers multiply by it (never
    assume it real); premultiplication is handled by ``model_images``.
    """
    return particle_transfer(xp, particles, size, square_premultiplied=False)


def premultiplied_ctfs(xp, particles, size: int):
    """The real ``scale · CTF`` that CTF-premultiplied images were multiplied by on the box grid (n, size, size//2+1)."""
    return particle_transfer(xp, particles, size, square_premultiplied=False, aberration_phase=False)
def ctf_delocalisation_pixels(particles) -> float:
    """Largest distance (pixels) the batch's CTFs move signal at Nyquist: ``|λ Δf s - Cs λ³ s³| / pixel``.

    The gradient of the CTF phase ``χ/2π`` with respect to ``s`` (Å⁻¹) at
    ``s = 1/(2 · pixel size)``, with ``Δf`` the larger defocus (U or V); host
    NumPy arithmetic on the metadata, 0 for an empty batch.
    """
    pixel = np.asarray(particles.pixel_size_angstrom, dtype=float)
    if pixel.size == 0:
        return 0.0
    wavelength = electron_wavelength_angstrom(np.asarray(particles.voltage_kv, dtype=float))
    defocus = np.maximum(np.abs(particles.defocus_u_angstrom), np.abs(particles.defocus_v_angstrom))
    nyquist = 0.5 / pixel
    cs_angstrom = np.asarray(particles.spherical_aberration_mm, dtype=float) * 1e7
    shift = np.abs(wavelength * defocus * nyquist - cs_angstrom * wavelength**3 * nyquist**3)
    return float(np.max(shift / pixel))


def _premultiplied(xp, particles):
    return xp.asarray(particles.ctf_premultiplied, dtype=bool).reshape(-1, 1, 1)


def model_images(xp, model: HalfMapModel, particles, box: int, settings: SubtractionSettings):
    """Models of the particles from the full and the masked map: real float32 (n, box, box) each.

    "relion": box-grid slice, shift and transfer (times the real CTF again for
    premultiplied images, as RELION) on the box grid. Otherwise the projection
    lies in a zero field, is shifted and multiplied by its transfer there and
    cropped to the box, then multiplied by the box-grid real CTF where the images
    are CTF-premultiplied. Slices are sampled through ``optics.slice_matrices``
    (each particle's pixel size and magnification against the map's).
    """
    volumes = (model.full, model.masked)
    matrices = slice_matrices(particles, model.pixel_size_angstrom, model.full.box)
    premultiplied = _premultiplied(xp, particles)
    box_ctf = None
    if bool(premultiplied.any()):
        box_ctf = xp.where(premultiplied, premultiplied_ctfs(xp, particles, box), 1)
    if settings.projector == "relion":
        ctf = particle_ctfs(xp, particles, box) * shift_phases(xp, box, particles.origins_pixels)
        if box_ctf is not None:
            ctf = ctf * box_ctf
        return tuple(
            spectra_to_images(xp, extract_slices(xp, volume, matrices, "zero") * ctf, box) for volume in volumes
        )
    size = settings.field_size(box, ctf_delocalisation_pixels(particles))
    field_ctf = particle_ctfs(xp, particles, size) * shift_phases(xp, size, particles.origins_pixels)
    return tuple(_extracted(xp, volume, matrices, box, size, field_ctf, box_ctf, settings) for volume in volumes)


def _extracted(xp, volume: PreparedVolume, matrices, box: int, size: int, field_ctf, box_ctf, settings):
    """One map's model as extracted from a ``size``² field (see ``model_images``)."""
    if settings.field_slice:
        spectra = extract_slices(xp, volume, matrices, settings.corners, size)
    else:
        projections = spectra_to_images(xp, extract_slices(xp, volume, matrices, settings.corners), box)
        spectra = image_spectra(xp, pad_images(xp, projections, size))
    extracted = spectra_to_images(xp, spectra * field_ctf, box)
    if box_ctf is not None:
        extracted = spectra_to_images(xp, image_spectra(xp, extracted) * box_ctf, box)
    return extracted


def subtract_batch(xp, images, particles, model: HalfMapModel, settings: SubtractionSettings):
    """Subtract the masked projection from each image; returns (subtracted, ``ContrastResult``).

    ``particles`` is a ``ParticleTable`` of the batch, all of one half set, and
    ``model`` that half set's prepared half-map. The result holds the α used, its
    fitted uncertainty (NaN unless fitted) and the fit correlation (always).
    """
    images = xp.asarray(images, dtype="float32")
    box = images.shape[-1]
    if model.full.box != box:
        raise ValueError(f"map box {model.full.box} differs from particle box {box}")
    full, masked = model_images(xp, model, particles, box, settings)
    fitted = fit_contrast(xp, images, full, particles.pixel_size_angstrom, settings.fit)
    if settings.scale == "fit":
        alpha = fitted.alpha
    elif settings.scale == "input":
        if particles.input_contrast is None:
            raise ValueError("scale 'input' needs each particle's contrast in the input metadata")
        alpha = xp.asarray(particles.input_contrast, dtype="float32")
    else:
        alpha = xp.ones(images.shape[0], dtype="float32")
    subtracted = images - alpha[:, None, None] * masked
    sigma = fitted.sigma if settings.scale == "fit" else xp.full(alpha.shape, xp.nan, dtype="float32")
    return subtracted, ContrastResult(alpha, sigma, fitted.correlation)
