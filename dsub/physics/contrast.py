"""Per-particle contrast scale: a least-squares fit against the full half-map.

Particles differ in contrast (ice thickness, dose). dsub fits one scale per
particle against the CTF-modulated projection of the *full* half-map, because
the image holds the whole particle: fitting against the masked projection
alone is biased by the kept region and several times noisier. With the image
and the model both multiplied by the same soft real-space window (as the
refinement did) and transformed, over a frequency band B:

    α = Σ_B h Re(X · conj(M)) / Σ_B h |M|²

where h counts each rfft half-plane coefficient as often as it appears in the
full plane (1 on the kx = 0 and Nyquist columns, 2 elsewhere).

The window is optional and off by default. cryoSPARC fits inside a soft circle
(0.85–0.99 of the box half-width); on particles simulated from a real map
(EMD-3488, box 128, defocus up to 2.5 µm, SNR 0.1) that window made the fitted
contrast about 25 % noisier (what is left of the masked region: 2.97 % with
it, 2.37 % without), because the CTF spreads the particle's signal into the
box edges and corners that the window cuts. Neighbouring particles and
background there are uncorrelated with the model, so leaving them in adds
noise but no bias.

Noisy half maps. A half map is the true map S plus its own noise N, so
E|M|² = |C|²(S² + N²) while the image only holds α·C·S: the plain fit above is
biased low by S²/(S² + N²) shell by shell. That factor is what the FSC f of the
two half maps estimates (``fsc.py``), so dsub fits against the projection M_w
of the half map Wiener-filtered in 3D, f·(S + N) shell by shell, which by the
central-slice theorem is f·M at the same frequency in 1/Å (map voxel size and
particle pixel size may differ):

    α = Σ_B h Re(X · conj(M_w)) / Σ_B h |M_w|²

E[X · conj(M_w)] = α f |C|² S² and E|M_w|² = f² |C|² (S² + N²) = f |C|² S², so
the fit is unbiased; M_w is the least-squares estimate of the true signal, so
shells where the maps are mostly noise weigh little. The filter is applied to
the map, not to the 2D model: the padded projector crops each projection to the
box, which spreads every frequency's noise over the others, so noise beyond the
maps' resolution must be gone before the projection (measured on EMD-3488 with
half maps whose FSC crosses 0.143 at 7.5 Å: −15 % bias when filtering the 2D
model, +1 % when filtering the map; see benchmarks/README.md).

Its uncertainty is the heteroscedasticity-consistent ("sandwich") standard
error of a least-squares slope, with the residual R = X − α M_w as the noise of
each coefficient:

    σ_α² = Σ_B h |M_w|² |R|² / (Σ_B h |M_w|²)²

(White 1980, Econometrica 48:817), which holds for coloured noise as for white.
The fit quality is the correlation of image and model over the band,
Σ h Re(X conj M_w) / sqrt(Σ h |X|² · Σ h |M_w|²).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .backend import fft_module
from .ctf import frequency_grid

SCALE_MODES = ("fit", "input", "none")
#: "fsc": fit against the half map Wiener-filtered by the half maps' FSC; "none": the plain map.
WEIGHTINGS = ("fsc", "none")


@dataclass(frozen=True)
class ContrastFit:
    """How the contrast scale is fitted; radii are fractions of the box half-width."""

    window_inner: float | None = None  # cryoSPARC: 0.85
    window_outer: float | None = None  # cryoSPARC: 0.99
    low_resolution_angstrom: float | None = 100.0
    high_resolution_angstrom: float | None = None  # None: up to Nyquist
    weighting: str = "fsc"

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"--fit-weighting must be one of {', '.join(WEIGHTINGS)}, not {self.weighting!r}")
        inner, outer = self.window_inner, self.window_outer
        if (inner is None) != (outer is None):
            raise ValueError("give both --window-inner and --window-outer, or neither to fit without a window")
        if inner is not None and not 0 < inner <= outer <= 1.5:
            raise ValueError(
                f"--window-inner and --window-outer (fractions of half the box) must satisfy 0 < inner <= outer "
                f"<= 1.5, not {inner:g} and {outer:g}"
            )
        low, high = self.low_resolution_angstrom, self.high_resolution_angstrom
        if low is not None and high is not None and high >= low:
            raise ValueError(
                f"the fit's band is empty: --fit-highres {high:g} Å must be finer (smaller) "
                f"than --fit-lowres {low:g} Å"
            )


def soft_window(xp, box: int, inner: float, outer: float):
    """Circular window: 1 inside ``inner``, raised-cosine fall to 0 at ``outer`` (fractions of box/2)."""
    offsets = np.arange(box) - box // 2
    radius = np.hypot(offsets[:, None], offsets[None, :]) / (box / 2.0)
    if outer > inner:
        ramp = np.clip((radius - inner) / (outer - inner), 0.0, 1.0)
        window = 0.5 * (1.0 + np.cos(np.pi * ramp))
    else:
        window = (radius <= inner).astype(float)
    return xp.asarray(window, dtype="float32")


def band_weights(xp, box: int, pixel_size_angstrom, fit: ContrastFit):
    """Hermitian-weighted band mask per particle, shape (n, box, box//2 + 1); DC always excluded."""
    kx, ky = frequency_grid(xp, box)
    hermitian = xp.full(kx.shape, 2.0, dtype="float32")
    hermitian[:, 0] = 1.0
    if box % 2 == 0:
        hermitian[:, -1] = 1.0
    radius = xp.sqrt(kx * kx + ky * ky)[None]  # cycles per box
    psize = xp.asarray(pixel_size_angstrom, dtype="float32").reshape(-1, 1, 1)
    resolution_inverse = radius / (box * psize)  # 1/Å
    keep = (radius > 0) & (radius <= box / 2.0) & (resolution_inverse >= 0)
    if fit.low_resolution_angstrom is not None:
        keep = keep & (resolution_inverse >= 1.0 / fit.low_resolution_angstrom)
    if fit.high_resolution_angstrom is not None:
        keep = keep & (resolution_inverse <= 1.0 / fit.high_resolution_angstrom)
    return xp.where(keep, hermitian[None], 0.0).astype("float32")


@dataclass
class ContrastResult:
    """Per-particle contrast and how well it is determined; arrays (n,) float32 (NumPy or CuPy).

    ``alpha``: the contrast scale; ``sigma``: its standard error (NaN where not
    fitted); ``correlation``: of the image and the model over the fit band.
    """

    alpha: object
    sigma: object
    correlation: object


def fit_contrast(xp, images, models, pixel_size_angstrom, fit: ContrastFit) -> ContrastResult:
    """Least-squares scale of each model image to its particle image, with its uncertainty.

    ``images`` and ``models`` are real (n, box, box) arrays (the models
    projected from the Wiener-filtered map, see the module docstring); the
    window and the band come from ``fit``; ``pixel_size_angstrom`` is a scalar
    or (n,) array. A model with no power in the band gets α = 0, σ = NaN and
    correlation 0.
    """
    box = images.shape[-1]
    if fit.window_inner is not None:
        window = soft_window(xp, box, fit.window_inner, fit.window_outer)
        images = images * window
        models = models * window
    return fit_spectra(xp, _rfft2(xp, images), _rfft2(xp, models), box, pixel_size_angstrom, fit)


def _rfft2(xp, images):
    """``rfft2`` of real images; on CuPy, images that are a view (the extraction field's models) are read where
    they lie (``_model_cuda.rfft2_of_view``) instead of copied first."""
    if xp.__name__ == "cupy" and not images.flags.c_contiguous:
        from ._model_cuda import rfft2_of_view

        spectra = rfft2_of_view(images)
        if spectra is not None:
            return spectra
    return fft_module(xp).rfft2(images)


def fit_spectra(xp, image_ft, model_ft, box: int, pixel_size_angstrom, fit: ContrastFit) -> ContrastResult:
    """``fit_contrast`` on the rfft2 of the (windowed) images and models, complex (n, box, box//2 + 1).

    On CuPy one CUDA kernel computes the sums (``_contrast_cuda.py``), on NumPy its
    numba twin where numba imports (``_contrast_cpu.py``); both accumulate in float64.
    """
    if xp.__name__ == "cupy":
        from ._contrast_cuda import fit_spectra_cuda

        low, high = fit.low_resolution_angstrom, fit.high_resolution_angstrom
        alpha, sigma, correlation = fit_spectra_cuda(
            image_ft, model_ft, box, pixel_size_angstrom,
            None if low is None else np.float32(1.0 / low), None if high is None else np.float32(1.0 / high),
        )
        return ContrastResult(alpha, sigma, correlation)
    compiled = compiled_cpu_fit() if xp.__name__ == "numpy" else None
    if compiled is not None:
        low, high = fit.low_resolution_angstrom, fit.high_resolution_angstrom
        return ContrastResult(*compiled(image_ft, model_ft, box, pixel_size_angstrom,
                                        None if low is None else np.float32(1.0 / low),
                                        None if high is None else np.float32(1.0 / high)))
    return _fit_spectra_arrays(xp, image_ft, model_ft, box, pixel_size_angstrom, fit)


def _fit_spectra_arrays(xp, image_ft, model_ft, box: int, pixel_size_angstrom, fit: ContrastFit) -> ContrastResult:
    """``fit_spectra`` from whole arrays (NumPy without numba; the twin the kernels are tested against)."""
    weights = band_weights(xp, box, pixel_size_angstrom, fit)
    cross = (weights * (image_ft * xp.conj(model_ft)).real).sum(axis=(-2, -1))
    model_power = (weights * _power(xp, model_ft)).sum(axis=(-2, -1))
    image_power = (weights * _power(xp, image_ft)).sum(axis=(-2, -1))
    fitted = model_power > 0
    safe = xp.where(fitted, model_power, 1.0)
    alpha = xp.where(fitted, cross / safe, 0.0)
    residual_ft = image_ft - alpha[:, None, None] * model_ft
    spread = (weights * _power(xp, model_ft) * _power(xp, residual_ft)).sum(axis=(-2, -1))
    sigma = xp.where(fitted, xp.sqrt(spread) / safe, xp.nan)
    norm = xp.sqrt(model_power * image_power)
    correlation = xp.where(norm > 0, cross / xp.where(norm > 0, norm, 1.0), 0.0)
    return ContrastResult(alpha.astype("float32"), sigma.astype("float32"), correlation.astype("float32"))


@lru_cache(maxsize=1)
def compiled_cpu_fit():
    """``_contrast_cpu.fit_spectra_numba`` where numba imports, else None (then NumPy arrays serve)."""
    try:
        from ._contrast_cpu import fit_spectra_numba
    except (ImportError, RuntimeError):  # as projector.compiled_cpu_gather
        return None
    return fit_spectra_numba


def _power(xp, spectra):
    return (spectra * xp.conj(spectra)).real
