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

from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

from ._transfer_cuda import plain_optics
from .contrast import SCALE_MODES, ContrastFit, ContrastResult, fit_contrast, fit_spectra
from .ctf import electron_wavelength_angstrom
from .fsc import wiener_filter
from .backend import fft_module
from .optics import particle_transfer, slice_matrices
from .gridding import grid_size
from .projector import (
    CORNERS,
    FLOAT16_PROJECTORS,
    PROJECTORS,
    PreparedVolume,
    extract_slices_of,
    image_spectra,
    prepare_volumes,
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
            raise ValueError(f"--extension must be at least 2 (boxes), not {self.extension:g}")

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
    pixel size (``optics.slice_matrices``). The default projector's maps are
    rounded to float16 (``projector.FLOAT16_PROJECTORS``): stored so on a GPU,
    at half the memory and with faster slices, and rounded the same on NumPy.
    """
    half_map = xp.asarray(half_map, dtype="float32")
    region = subtraction_region(xp, mask, settings.mask_keeps)
    kernel, oversampling = projector_kernel(settings.projector, settings.padding)
    fit_map = half_map if fsc is None or settings.fit.weighting != "fsc" else wiener_filter(xp, half_map, fsc)
    full, masked = prepare_volumes(xp, (fit_map, half_map * region), kernel, oversampling,
                                   float16=settings.projector in FLOAT16_PROJECTORS)
    return HalfMapModel(full=full, masked=masked, fsc=fsc, pixel_size_angstrom=pixel_size_angstrom)


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


@dataclass(frozen=True)
class ParticleTransfer:
    """What multiplies each particle's projection on an rfft2 grid of ``size``: its transfer
    (``particle_ctfs``) times the shift phases (``shift_phases``), and where ``squared`` is True
    (CTF-premultiplied images under RELION's model) times the real CTF again (``premultiplied_ctfs``).

    ``values`` gives it as an array; the GPU's kernels evaluate it where they use it
    (``_transfer_cuda.py``), so it is computed once per batch for both maps.
    """

    particles: object
    size: int
    squared: np.ndarray | None = None  # (n,) bool, or None: no particle's CTF is squared

    def ctf(self, xp):
        """The transfer without the shift phases, complex64 (n, size, size//2 + 1)."""
        transfer = particle_ctfs(xp, self.particles, self.size)
        if self.squared is not None and self.squared.any():
            squared = xp.asarray(self.squared, dtype=bool).reshape(-1, 1, 1)
            transfer = transfer * xp.where(squared, premultiplied_ctfs(xp, self.particles, self.size), 1)
        return transfer

    def values(self, xp):
        """The whole transfer, complex64 (n, size, size//2 + 1)."""
        return self.ctf(xp) * shift_phases(xp, self.size, self.particles.origins_pixels)

    def multiply(self, xp, spectra):
        """``spectra`` (m, n, size, size//2 + 1) complex64 times the transfer, the same for each of the m.

        On NumPy with plain optics (``_transfer_cuda.plain_optics``) the compiled
        kernel evaluates it where it multiplies, in place
        (``_transfer_cpu.multiply_by_transfer``); otherwise ``spectra * values``.
        """
        compiled = compiled_cpu_transfer() if xp.__name__ == "numpy" else None
        if (compiled is not None and spectra.dtype == np.complex64 and spectra.flags.c_contiguous
                and plain_optics(self.particles)):
            return compiled(spectra, self.particles, self.squared)
        return spectra * self.values(xp)

    def for_kernels(self, cupy):
        """(parameters, CTF array or None) for the GPU's kernels: the CTF is evaluated in them unless there are optics."""
        from ._transfer_cuda import plain_optics, transfer_parameters

        if plain_optics(self.particles):
            return cupy.asarray(transfer_parameters(self.particles, self.squared)), None
        return cupy.asarray(transfer_parameters(self.particles)), self.ctf(cupy)


@lru_cache(maxsize=1)
def compiled_cpu_transfer():
    """``_transfer_cpu.multiply_by_transfer`` where numba imports, else None (then NumPy arrays serve)."""
    try:
        from ._transfer_cpu import multiply_by_transfer
    except (ImportError, RuntimeError):  # as projector.compiled_cpu_gather
        return None
    return multiply_by_transfer


def project_spectra(xp, volumes, matrices, corners: str, size: int, transfer: ParticleTransfer | None = None):
    """Each prepared volume's slices on an rfft2 grid of ``size``, times ``transfer`` (None: nothing):
    complex64 (len(volumes), n, size, size//2 + 1), centred on pixel size//2 once transformed back.

    All volumes are sliced in one pass (``projector.extract_slices_of``) and share one evaluation
    of the transfer.
    """
    spectra = extract_slices_of(xp, volumes, matrices, corners, size)
    return spectra if transfer is None else transfer.multiply(xp, spectra)


def project_images(xp, volumes, matrices, corners: str, box: int, size: int | None = None,
                   transfer: ParticleTransfer | None = None):
    """Centred images of each prepared volume's slices: float32 (len(volumes), n, box, box).

    The slices are sampled on an rfft2 grid of ``size`` (default the box;
    ``projector.extract_slices``), multiplied by ``transfer`` (for that grid; None:
    nothing), transformed to real space and cropped to ``box`` about the centre
    (``projector.spectra_to_images``). On CuPy one kernel launch per volume
    samples and applies the transfer, and one batched inverse FFT follows
    (``_model_cuda.project_images``).
    """
    size = box if size is None else int(size)
    if xp.__name__ == "cupy":
        from ._model_cuda import project_images as project_on_gpu

        table, given = transfer.for_kernels(xp) if transfer is not None else (None, None)
        return project_on_gpu(volumes, matrices, corners, box, size, table, given)
    return spectra_to_images(xp, project_spectra(xp, volumes, matrices, corners, size, transfer), box)


def extract_in_field(xp, images, size: int, transfer: ParticleTransfer):
    """Images (m, n, box, box) as extracted from a ``size``² field: placed in its middle, multiplied by
    ``transfer`` there and cropped back to the box; float32 (m, n, box, box).

    On CuPy with an even ``size``: ``_model_cuda.extract_in_field`` (the result may be a view).
    """
    if xp.__name__ == "cupy" and size % 2 == 0:
        from ._model_cuda import extract_in_field as extract_on_gpu

        return extract_on_gpu(images, size, *transfer.for_kernels(xp))
    return _extract_in_field_numpy(xp, images, size, transfer)


def _extract_in_field_numpy(xp, images, size: int, transfer: ParticleTransfer):
    """``extract_in_field`` on NumPy, with the transforms pruned to where the field is not zero.

    The box lies in the field's first ``box`` rows and columns instead of its
    middle: that moves the field by ``box//2`` pixels, which multiplies its
    spectrum by ``exp(-2πi k·(box//2)/size)``, and reading the box back from the
    same corner undoes it exactly (``exp(+2πi k·(box//2)/size)``), so neither
    phase is applied. Forward: the box's rows along x (zero-padded to ``size``),
    then every column along y; inverse: every column along y, then only the box's
    rows along x. Three quarters of the row transforms of a 2-box field are skipped.
    On NumPy the particles go through in groups whose field spectra stay within
    ``FIELD_GROUP_BYTES``: the allocator then reuses the same memory from group to
    group instead of the kernel handing over fresh pages for every batch.
    """
    count = images.shape[1]
    per_particle = images.shape[0] * size * (size // 2 + 1) * 8  # both maps' field spectra, complex64
    group = max(1, FIELD_GROUP_BYTES // per_particle) if xp.__name__ == "numpy" else count
    if group >= count:
        return _extract_group_in_field(xp, images, size, transfer)
    out = xp.empty(images.shape, dtype="float32")
    for first in range(0, count, group):
        rows = slice(first, min(first + group, count))
        squared = None if transfer.squared is None else transfer.squared[rows]
        part = replace(transfer, particles=transfer.particles.subset(rows), squared=squared)
        out[:, rows] = _extract_group_in_field(xp, images[:, rows], size, part)
    return out


#: Largest field spectra (bytes) that ``_extract_in_field_numpy`` transforms at once: below glibc's
#: largest mmap threshold (32 MiB), so the blocks are reused rather than mapped afresh for each batch.
FIELD_GROUP_BYTES = 16 * 2**20


def _extract_group_in_field(xp, images, size: int, transfer: ParticleTransfer):
    """The pruned transforms of ``_extract_in_field_numpy`` for one group of particles."""
    box = images.shape[-1]
    fft = fft_module(xp)
    spectra = fft.fft(fft.rfft(images, n=size, axis=-1), n=size, axis=-2, overwrite_x=True)
    spectra = transfer.multiply(xp, xp.ascontiguousarray(spectra))
    rows = fft.ifft(spectra, axis=-2, overwrite_x=True)[..., :box, :]
    return fft.irfft(rows, n=size, axis=-1)[..., :box].astype("float32")


def subtract_scaled(xp, images, alpha, models):
    """``images - alpha · models`` per particle, float32 (n, box, box); one fused pass on CuPy."""
    if xp.__name__ == "cupy":
        from ._model_cuda import subtract_scaled as subtract_on_gpu

        return subtract_on_gpu(images, alpha, models)
    return images - alpha[:, None, None] * models


def model_images(xp, model: HalfMapModel, particles, box: int, settings: SubtractionSettings):
    """Models of the particles from the full and the masked map: real float32 (n, box, box) each.

    "relion": box-grid slice, shift and transfer (times the real CTF again for
    premultiplied images, as RELION) on the box grid. Otherwise the projection
    lies in a zero field, is shifted and multiplied by its transfer there and
    cropped to the box, then multiplied by the box-grid real CTF where the images
    are CTF-premultiplied. Slices are sampled through ``optics.slice_matrices``
    (each particle's pixel size and magnification against the map's). Both maps
    go through each step together, with one transfer (``ParticleTransfer``).
    """
    volumes = (model.full, model.masked)
    matrices = slice_matrices(particles, model.pixel_size_angstrom, model.full.box)
    premultiplied = np.asarray(particles.ctf_premultiplied, dtype=bool).reshape(-1)
    if settings.projector == "relion":
        images = project_images(xp, volumes, matrices, "zero", box, transfer=_relion_transfer(particles, box))
        return images[0], images[1]
    size = settings.field_size(box, ctf_delocalisation_pixels(particles))
    transfer = ParticleTransfer(particles, size)
    if settings.field_slice:
        images = project_images(xp, volumes, matrices, settings.corners, box, size, transfer)
    else:
        images = extract_in_field(xp, project_images(xp, volumes, matrices, settings.corners, box), size, transfer)
    if premultiplied.any():
        box_ctf = xp.where(xp.asarray(premultiplied).reshape(-1, 1, 1), premultiplied_ctfs(xp, particles, box), 1)
        images = spectra_to_images(xp, image_spectra(xp, images) * box_ctf, box)
    return images[0], images[1]


def _relion_transfer(particles, box: int) -> ParticleTransfer:
    """RELION's transfer on the box grid: the CTF squared for CTF-premultiplied images."""
    premultiplied = np.asarray(particles.ctf_premultiplied, dtype=bool).reshape(-1)
    return ParticleTransfer(particles, box, premultiplied if premultiplied.any() else None)


def relion_model_spectra(xp, model: HalfMapModel, particles, box: int):
    """RELION's model of the full and the masked map as spectra: complex64 (2, n, box, box//2 + 1).

    ``model_images`` with ``projector="relion"`` is ``spectra_to_images`` of these.
    """
    matrices = slice_matrices(particles, model.pixel_size_angstrom, model.full.box)
    return project_spectra(xp, (model.full, model.masked), matrices, "zero", box, _relion_transfer(particles, box))


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
    if settings.projector == "relion" and settings.fit.window_inner is None and (xp.__name__ == "numpy"
                                                                                 or box % 2 == 0):
        # RELION's model lives on the box grid: fit against the full map's spectrum itself (what the
        # real-space fit transforms back to), so only the masked model is transformed
        if xp.__name__ == "cupy":
            from ._model_cuda import box_spectra_and_masked

            matrices = slice_matrices(particles, model.pixel_size_angstrom, model.full.box)
            spectra, masked = box_spectra_and_masked((model.full, model.masked), matrices, "zero", box,
                                                     *_relion_transfer(particles, box).for_kernels(xp))
            image_ft = fft_module(xp).rfft2(images)  # both carry (-1)^(kx+ky): the fit's products are unchanged
        else:
            spectra = relion_model_spectra(xp, model, particles, box)
            masked = spectra_to_images(xp, spectra[1], box)
            image_ft = image_spectra(xp, images)
        fitted = fit_spectra(xp, image_ft, spectra[0], box, particles.pixel_size_angstrom, settings.fit)
    else:
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
    subtracted = subtract_scaled(xp, images, alpha, masked)
    sigma = fitted.sigma if settings.scale == "fit" else xp.full(alpha.shape, xp.nan, dtype="float32")
    return subtracted, ContrastResult(alpha, sigma, fitted.correlation)
