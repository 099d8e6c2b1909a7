"""The compiled CPU contrast fit (numba) against its NumPy twin, which tests/test_contrast.py checks
against independent truth (the compiled fit serves those tests too where numba is installed)."""

import numpy as np
import pytest

from dsub.physics.contrast import ContrastFit, _fit_spectra_arrays, fit_spectra

pytest.importorskip("numba")


@pytest.mark.parametrize("box", [32, 33, 64])
@pytest.mark.parametrize("low, high", [(None, None), (40.0, None), (None, 6.0), (30.0, 5.0)])
def test_compiled_fit_matches_numpy_arrays(box, low, high):
    rng = np.random.default_rng(box)
    count = 6
    shape = (count, box, box // 2 + 1)
    model = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    image = (rng.uniform(-2, 2, (count, 1, 1)) * model
             + 0.5 * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))).astype(np.complex64)
    model[2] = 0  # no power in the band: α 0, σ NaN, correlation 0
    pixel = rng.uniform(0.8, 1.6, count).astype(np.float32)
    fit = ContrastFit(low_resolution_angstrom=low, high_resolution_angstrom=high)
    compiled = fit_spectra(np, image, model, box, pixel, fit)
    reference = _fit_spectra_arrays(np, image, model, box, pixel, fit)
    for name in ("alpha", "sigma", "correlation"):
        got, expected = getattr(compiled, name), getattr(reference, name)
        assert got.dtype == np.float32 and got.shape == (count,)
        assert np.array_equal(np.isnan(got), np.isnan(expected)), name
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-7, equal_nan=True, err_msg=name)
    assert compiled.alpha[2] == 0 and np.isnan(compiled.sigma[2]) and compiled.correlation[2] == 0


def test_compiled_fit_takes_one_pixel_size_for_all():
    rng = np.random.default_rng(1)
    shape = (3, 48, 25)
    model = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    fit = ContrastFit(high_resolution_angstrom=4.0)
    compiled = fit_spectra(np, 1.5 * model, model, 48, 1.1, fit)
    reference = _fit_spectra_arrays(np, 1.5 * model, model, 48, 1.1, fit)
    np.testing.assert_allclose(compiled.alpha, 1.5, rtol=1e-6)
    np.testing.assert_allclose(compiled.correlation, reference.correlation, rtol=1e-6)
