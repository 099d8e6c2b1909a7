"""The CUDA kernels' parts that run on any machine: the field kernel's plan (``_field_cuda``: its radices
cover every field size a run can choose, its small DFTs are exact, and a block falls back to fewer columns,
then to cuFFT, where shared memory is short) and the slice kernel's Kaiser-Bessel polynomial
(``gridding.kaiser_bessel_series``). The kernels themselves are checked against NumPy on a GPU
(tests/test_gpu.py)."""

import numpy as np
import pytest

from dsub.physics import _field_cuda
from dsub.physics.subtract import SubtractionSettings


@pytest.mark.parametrize("size, stages", [(512, (8, 8, 8)), (100, (4, 5, 5)), (96, (8, 4, 3)), (90, (2, 3, 3, 5)),
                                          (540, (4, 3, 3, 3, 5)), (98, None), (1, None)])
def test_radices(size, stages):
    assert _field_cuda.radices(size) == stages


def test_every_field_size_has_radices():
    settings = SubtractionSettings()
    for box in range(16, 1025, 2):
        for delocalisation in (0.0, 0.7 * box, 1.9 * box):
            size = settings.field_size(box, delocalisation)
            assert _field_cuda.radices(size) is not None, (box, delocalisation, size)


def test_stockham_plan_is_a_dft():
    """The stages as the kernel runs them (twiddle, R-point DFT, write Ns apart), in NumPy, against np.fft."""
    rng = np.random.default_rng(0)
    for size in (512, 540, 90, 144):
        x = rng.normal(size=size) + 1j * rng.normal(size=size)
        for sign in (-1, 1):
            data, span = x.copy(), 1
            twiddles = np.exp(sign * 2j * np.pi * np.arange(size) / size)
            for radix in _field_cuda.radices(size):
                out = np.empty_like(data)
                butterflies, step = size // radix, size // (span * radix)
                for j in range(butterflies):
                    k = j % span
                    v = np.array([data[j + r * butterflies] * twiddles[k * r * step] for r in range(radix)])
                    v = np.exp(sign * 2j * np.pi * np.outer(np.arange(radix), np.arange(radix)) / radix) @ v
                    first = (j // span) * span * radix + k
                    out[first + np.arange(radix) * span] = v
                data, span = out, span * radix
            expected = np.fft.fft(x) if sign < 0 else np.fft.ifft(x) * size
            np.testing.assert_allclose(data, expected, atol=1e-9 * size)


def test_block_shape_falls_back_where_shared_memory_is_short():
    h200 = 227 * 2**10
    assert _field_cuda.block_shape(512, 2, h200) == (8, 256)
    assert _field_cuda.block_shape(2048, 2, h200) == (4, 128)  # 8 columns of 2 048 points: 278 KB
    assert _field_cuda.block_shape(2048, 2, 48 * 2**10) is None  # 2 columns need 82 KB: cuFFT instead
    assert _field_cuda.block_shape(1024, 1, 48 * 2**10) == (2, 64)
    assert _field_cuda.block_shape(98, 2, h200) is None
    for size in (512, 2048):
        columns, threads = _field_cuda.block_shape(size, 2, h200)
        assert _field_cuda.shared_bytes(size, columns) <= h200 and threads == _field_cuda.LANES * columns


@pytest.mark.parametrize("oversampling", [1.25, 1.5, 2.0, 3.0])
def test_kaiser_bessel_series_of_the_slice_kernel_matches_i0(oversampling):
    """The slice kernels' weights: the polynomial in u = 1 - r² summed by Horner's rule in float32, as the
    kernels sum it, against NumPy's I0 (float64), within 1e-6 of the largest weight everywhere on [0, 1];
    ``GriddingKernel.weights`` (the NumPy gather's) gives the same float32 values."""
    from dsub.physics.gridding import kaiser_bessel_series
    from dsub.physics.projector import projector_kernel

    kernel, _ = projector_kernel("gridding", oversampling)
    coefficients = np.float32(kaiser_bessel_series(kernel.beta))
    u = np.linspace(0, 1, 2001, dtype=np.float32)
    total = np.full_like(u, coefficients[0])
    for coefficient in coefficients[1:]:
        total = total * u + coefficient  # float32 throughout
    weights = total * u
    expected = np.i0(kernel.beta * np.sqrt(u.astype(np.float64))) - 1.0
    largest = np.i0(kernel.beta) - 1.0
    assert np.abs(weights - expected).max() <= 1e-6 * largest
    assert 12 <= len(coefficients) <= 30 and np.all(coefficients > 0)
    distance = np.sqrt(1.0 - u) * np.float32(kernel.width / 2.0)
    ours = kernel.weights(np, np.concatenate([distance, -distance, [kernel.width / 2.0 + 0.25]]))
    assert ours.dtype == np.float32 and ours[-1] == 0
    assert np.abs(ours[:-1] - np.concatenate([expected, expected])).max() <= 1e-6 * largest
