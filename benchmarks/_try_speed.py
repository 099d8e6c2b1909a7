"""Experiments: the slice kernel's weights; the box images written straight into the field's rows."""
import sys

import numpy as np

sys.path.insert(0, "benchmarks")
from gpu_throughput import scene, timed  # noqa: E402


def slice_weights(cupy, box, batch, rng, repeats):
    from dsub.physics import _slice_cuda, subtract

    settings = subtract.SubtractionSettings()
    volume, mask, _, table = scene(box, batch, rng)
    model = subtract.prepare_half_map(cupy, volume, mask, settings)
    rotations = cupy.asarray(subtract.slice_matrices(table, model.pixel_size_angstrom, box), dtype=cupy.float32)
    real = _slice_cuda._SOURCE
    bessel = "cyl_bessel_i0f(beta * sqrtf(fmaxf(1.f - r * r, 0.f))) - 1.f"
    assert bessel in real
    series = """kb_series(beta * beta * 0.25f * fmaxf(1.f - r * r, 0.f))"""
    helper = """
__device__ __forceinline__ float kb_series(float t)
{   // I0(2 sqrt(t)) - 1 = sum_k t^k / (k!)^2, k = 1..20, by Horner
    float s = 0.f;
#pragma unroll
    for (int k = 20; k >= 1; --k) s = (s + 1.f) * t / (float)(k * k);
    return s;
}
"""
    variants = {"now (cyl_bessel_i0f)": real, "no Bessel (bound)": real.replace(bessel, "fmaxf(1.f - r * r, 0.f)"),
                "power series, 20 terms": real.replace("// WIDTH and KIND", helper + "// WIDTH and KIND").replace(
                    bessel, series)}
    results = {}
    for label, text in variants.items():
        _slice_cuda._SOURCE = text
        _slice_cuda._kernels.clear()
        try:
            t = timed(cupy, lambda: _slice_cuda.extract_slice_pair_cuda((model.full, model.masked), rotations,
                                                                          "map", box), repeats)
            results[label] = _slice_cuda.extract_slice_pair_cuda((model.full, model.masked), rotations, "map",
                                                                 box).get()
        finally:
            _slice_cuda._SOURCE = real
            _slice_cuda._kernels.clear()
        reference = results["now (cyl_bessel_i0f)"]
        difference = np.linalg.norm(results[label] - reference) / np.linalg.norm(reference)
        print(f"slices box {box} batch {batch}, {label}: {1e3 * t:.3f} ms (difference {difference:.1e})", flush=True)


def rows_layout(cupy, box, batch, rng, repeats):
    """irfft2 to (2, n, box, box) then pad_rows, against one 2D C2R writing into the rows (y, image, x)."""
    from cupy.cuda import cufft

    import cupyx.scipy.fft as cufft_module
    from dsub.physics import _model_cuda

    size, half_box = 2 * box, box // 2 + 1
    count = 2 * batch
    spectra = cupy.asarray(rng.normal(size=(2, batch, box, half_box)) + 0j, dtype=cupy.complex64)
    work = cupy.empty_like(spectra)
    rows = cupy.empty((box, count, size), dtype=cupy.float32)

    def now():
        work[...] = spectra
        images = cufft_module.irfft2(work, s=(box, box), overwrite_x=True, norm="forward")
        grid, block = _model_cuda.launch_grid(box * count, size)
        _model_cuda._kernel("pad_rows")(grid, block, (images, rows, np.int32(count), np.int32(count),
                                                      np.int32(box), np.int32(size)))

    plan = cufft.PlanNd((box, box), (box, half_box), 1, box * half_box, (box, count * size), 1, size,
                        cufft.CUFFT_C2R, count, "C", -1, box)

    def direct():
        work[...] = spectra
        plan.fft(work, rows, cufft.CUFFT_INVERSE)
        rows[:, :, box:] = 0

    def copy_only():
        work[...] = spectra

    now()
    expected = rows.copy()
    direct()
    print(f"rows layout box {box}: max difference {float(cupy.abs(rows - expected).max() / cupy.abs(expected).max()):.1e}")
    for label, f in (("irfft2 + pad_rows", now), ("2D C2R into rows + zero tails", direct), ("the copy alone", copy_only)):
        print(f"  {label}: {1e3 * timed(cupy, f, repeats):.3f} ms", flush=True)


def main():
    import cupy

    rng = np.random.default_rng(0)
    for experiment in (slice_weights, rows_layout):
        try:
            experiment(cupy, 256, 1024, rng, 5)
        except Exception as error:  # noqa: BLE001 - an experiment
            print(f"{experiment.__name__}: {type(error).__name__}: {error}")


if __name__ == "__main__":
    main()
