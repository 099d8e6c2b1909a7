"""Subtraction of a batch of particles with the half-map of their own half set.

For each particle: project the full half-map and the masked half-map in the
particle's pose, shift by its origin, multiply by its CTF (CTF² when the images
are CTF-premultiplied), choose its contrast scale α, and subtract
``α · CTF · P_masked`` from the image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .contrast import SCALE_MODES, ContrastFit, ContrastResult, fit_contrast
from .fsc import wiener_filter
from .optics import particle_transfer, slice_matrices
from .projector import PROJECTORS, PreparedVolume, prepare_volume, project


@dataclass(frozen=True)
class SubtractionSettings:
    """Everything about the physics that a run can choose."""

    projector: str = "padded"
    padding: int = 3
    scale: str = "fit"
    mask_keeps: bool = False
    fit: ContrastFit = field(default_factory=ContrastFit)
    #: low-pass both half maps to this resolution (Å, soft edge: ``lowpass.py``) before preparation; None = off
    lowpass_angstrom: float | None = None

    def __post_init__(self):
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS}, not {self.projector!r}")
        if self.scale not in SCALE_MODES:
            raise ValueError(f"scale must be one of {SCALE_MODES}, not {self.scale!r}")
        if int(self.padding) != self.padding or self.padding < 1:
            raise ValueError(f"padding must be a positive integer, not {self.padding!r}")
        if self.lowpass_angstrom is not None and not self.lowpass_angstrom > 0:
            raise ValueError(f"--lowpass must be a resolution in Å above 0, not {self.lowpass_angstrom:g}")


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
    fit_map = half_map if fsc is None or settings.fit.weighting != "fsc" else wiener_filter(xp, half_map, fsc)
    return HalfMapModel(
        full=prepare_volume(xp, fit_map, settings.padding),
        masked=prepare_volume(xp, half_map * region, settings.padding),
        fsc=fsc,
        pixel_size_angstrom=pixel_size_angstrom,
    )


def particle_ctfs(xp, particles, size: int):
    """Complex64 (n, size, size//2+1): what multiplies each projection on an rfft2 grid of ``size``.

    Scaled CTF (squared for premultiplied images) with every aberration; see
    ``optics.particle_transfer``.
    """
    return particle_transfer(xp, particles, size)


def model_images(xp, model: HalfMapModel, particles, box: int, settings: SubtractionSettings):
    """CTF-modulated, shifted projections (full, masked) as real images (n, box, box)."""
    ctf = particle_ctfs(xp, particles, box)
    images = []
    for volume in (model.full, model.masked):
        spectra = project(xp, volume, slice_matrices(particles, model.pixel_size_angstrom, volume.box),
                          particles.origins_pixels, settings.projector)
        images.append(
            xp.fft.fftshift(xp.fft.irfft2(spectra * ctf, s=(box, box)), axes=(-2, -1)).astype("float32")
        )
    return images[0], images[1]


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
