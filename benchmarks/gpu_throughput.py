"""GPU check and throughput: CuPy path vs the NumPy twin, then particles/s and memory by box size.

Run on a machine with a GPU (CuPy installed):
    python benchmarks/gpu_throughput.py [--boxes 128 256 384 512] [--batch 256 1024]
    python benchmarks/gpu_throughput.py --boxes 256 --stages 256 1024   # time per stage
    python benchmarks/gpu_throughput.py --boxes 256 --variants 1024     # the engine's layouts side by side
    python benchmarks/gpu_throughput.py --boxes 256 --field-kernel 1024 # the field's column kernel, its parts
Prints one table; the figures go into BENCHMARKS.md. "resident GB" is the memory
pool's use with both half sets' prepared maps in place (four volumes), beside
``memory.prepared_map_bytes``; "pool peak GB" is the pool's total after a batch.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def timed(cupy, function, repeats, queued=1):
    """Median seconds of ``function()`` on the GPU, timed with CUDA events after one warm-up.

    ``queued`` > 1: that many calls queued one after another with no synchronisation
    between them (as a worker's consecutive batches run), seconds per call.
    """
    function()
    cupy.cuda.Device().synchronize()
    samples = []
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(queued):
            function()
        stop.record()
        stop.synchronize()
        samples.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3 / queued)
    return float(np.median(samples))


def scene(box, count, rng):
    from dsub.simulate import GaussianPhantom, SimulatedParticles, random_rotations, to_particle_table

    blobs = 40
    phantom = GaussianPhantom(
        centres=rng.uniform(-box / 5, box / 5, size=(blobs, 3)), sigmas=rng.uniform(1.5, 3, blobs),
        amplitudes=rng.uniform(0.5, 1, blobs), domains=np.where(np.arange(blobs) < blobs // 2, 1, 2),
    )
    volume = phantom.voxelize(box)
    mask = phantom.select(2).voxelize(box)
    mask = np.clip(mask / mask.max() * 4, 0, 1).astype(np.float32)
    images = rng.normal(size=(count, box, box)).astype(np.float32)
    sim = SimulatedParticles(
        images=images, kept_signal=None, subtracted_signal=None,
        rotations=random_rotations(count, rng),
        origins_pixels=rng.uniform(-3, 3, (count, 2)), defocus_u=rng.uniform(8e3, 2.5e4, count),
        defocus_v=rng.uniform(8e3, 2.5e4, count), defocus_angle=rng.uniform(0, 180, count),
        contrast=np.ones(count), half_set=np.ones(count, dtype=int), pixel_size=1.0,
    )
    return volume, mask, images, to_particle_table(sim)


#: Functions of the engine timed one by one by ``--stages`` (module, name); absent ones are skipped.
STAGE_FUNCTIONS = (
    ("dsub.physics.subtract", "slice_matrices"),
    ("dsub.physics.subtract", "ctf_delocalisation_pixels"),
    ("dsub.physics.subtract", "particle_ctfs"),
    ("dsub.physics.subtract", "premultiplied_ctfs"),
    ("dsub.physics.subtract", "shift_phases"),
    ("dsub.physics.subtract", "extract_slices"),
    ("dsub.physics.subtract", "project_images"),
    ("dsub.physics.subtract", "extract_in_field"),
    ("dsub.physics.subtract", "spectra_to_images"),
    ("dsub.physics.subtract", "image_spectra"),
    ("dsub.physics.subtract", "pad_images"),
    ("dsub.physics.subtract", "fit_contrast"),
    ("dsub.physics.subtract", "subtract_scaled"),
    ("dsub.physics.contrast", "band_weights"),
    ("dsub.physics.contrast", "fit_spectra"),
    ("dsub.physics._model_cuda", "extract_slices_cuda"),
    ("dsub.physics._model_cuda", "extract_slice_pair_cuda"),
    ("dsub.physics._model_cuda", "_field_plans"),
    ("dsub.physics._field_cuda", "transform_columns"),
    ("dsub.physics._model_cuda", "box_spectra_and_masked"),
    ("dsub.physics._model_cuda", "_slices"),
    ("cupy.fft", "rfft2"),
    ("cupy.fft", "irfft2"),
    ("cupy.fft", "fftshift"),
    ("cupy.fft", "ifftshift"),
    ("cupyx.scipy.fft", "rfft2"),
    ("cupyx.scipy.fft", "irfft2"),
)


class StageTimer:
    """Wraps the engine's functions to time each call with CUDA events (GPU) and the host clock.

    Nested calls are attributed to the outermost timed function and counted apart
    as ``outer/inner``. GPU time between a stage's two events includes any wait
    for the host, so a stage that is host-bound shows its launch time.
    """

    def __init__(self, cupy):
        import importlib

        self.cupy, self.records, self.stack, self.saved = cupy, [], [], []
        for module_name, name in STAGE_FUNCTIONS:
            try:
                module = importlib.import_module(module_name)
            except ImportError:  # an engine without that module
                continue
            if hasattr(module, name):
                self.saved.append((module, name, getattr(module, name)))
                setattr(module, name, self.wrap(name, getattr(module, name)))

    def wrap(self, name, function):
        def timed_call(*args, **kwargs):
            label = "/".join(self.stack + [name])
            self.stack.append(name)
            start, stop = self.cupy.cuda.Event(), self.cupy.cuda.Event()
            host = time.perf_counter()
            start.record()
            try:
                return function(*args, **kwargs)
            finally:
                stop.record()
                self.records.append((label, start, stop, time.perf_counter() - host))
                self.stack.pop()

        return timed_call

    def restore(self):
        for module, name, function in self.saved:
            setattr(module, name, function)

    def table(self, calls):
        """{label: (GPU ms per call, host ms per call)} after ``calls`` timed batches."""
        self.cupy.cuda.Device().synchronize()
        totals = {}
        for label, start, stop, host in self.records:
            gpu = self.cupy.cuda.get_elapsed_time(start, stop)
            previous = totals.get(label, (0.0, 0.0))
            totals[label] = (previous[0] + gpu / calls, previous[1] + 1e3 * host / calls)
        return totals


def stage_profile(cupy, box, batch, repeats, rng):
    """Per-stage GPU and host milliseconds of ``subtract_batch`` for both projectors (printed)."""
    from dsub.physics import subtract

    for projector in ("gridding", "relion"):
        settings = subtract.SubtractionSettings(projector=projector)
        volume, mask, images, table = scene(box, batch, rng)
        model = subtract.prepare_half_map(cupy, volume, mask, settings)
        on_gpu = cupy.asarray(images)
        total = timed(cupy, lambda: subtract.subtract_batch(cupy, on_gpu, table, model, settings), repeats)
        timer = StageTimer(cupy)
        try:
            subtract.subtract_batch(cupy, on_gpu, table, model, settings)  # warm-up of the wrappers
            timer.records.clear()
            for _ in range(repeats):
                subtract.subtract_batch(cupy, on_gpu, table, model, settings)
            stages = timer.table(repeats)
        finally:
            timer.restore()
        print(f"\nstages, box {box}, batch {batch}, {projector}: whole batch {1e3 * total:.2f} ms "
              f"({batch / total:,.0f} particles/s)")
        print("| stage | GPU ms per batch | host ms per batch | share of batch |")
        print("|---|---|---|---|")
        for label, (gpu_ms, host_ms) in stages.items():
            share = f"{gpu_ms / (1e3 * total):.0%}" if "/" not in label else "(inside)"
            print(f"| {label} | {gpu_ms:.3f} | {host_ms:.3f} | {share} |")
        del model, on_gpu
        cupy.get_default_memory_pool().free_all_blocks()


#: ``--variants``: the engine's layouts compared in one run (maps side by side or each alone; the field's
#: transforms pruned or whole; its rows and its columns in kernels of dsub's or through cuFFT).
VARIANTS = ("pair, pruned", "pair, pruned, cuFFT rows", "pair, pruned, cuFFT columns", "separate, pruned",
            "pair, whole", "separate, whole")


def variant_rates(cupy, box, batch, repeats, rng):
    """Whole-batch ms of ``subtract_batch`` for each of ``VARIANTS`` and both projectors (printed)."""
    import functools
    from dataclasses import replace

    from dsub.physics import _model_cuda, subtract
    from dsub.physics.projector import PreparedVolume

    pruned_field = _model_cuda.extract_in_field
    print(f"\nvariants, box {box}, batch {batch}")
    print("| projector | variant | ms per batch | particles/s |")
    print("|---|---|---|---|")
    for projector in ("gridding", "relion"):
        settings = subtract.SubtractionSettings(projector=projector)
        volume, mask, images, table = scene(box, batch, rng)
        paired = subtract.prepare_half_map(cupy, volume, mask, settings)
        separate = replace(paired, **{name: PreparedVolume(cupy.ascontiguousarray(getattr(paired, name).transform),
                                                           paired.full.box, paired.full.kernel)
                                      for name in ("full", "masked")})
        on_gpu = cupy.asarray(images)
        reference = None
        for variant in VARIANTS:
            model = paired if variant.startswith("pair") else separate
            _model_cuda.extract_in_field = functools.partial(
                pruned_field, pruned="pruned" in variant, columns="cufft" if "cuFFT columns" in variant else "fused",
                rows="cufft" if "cuFFT rows" in variant else "fused")
            try:
                seconds = timed(cupy, lambda: subtract.subtract_batch(cupy, on_gpu, table, model, settings), repeats)
                result = subtract.subtract_batch(cupy, on_gpu, table, model, settings)[0].get()
            finally:
                _model_cuda.extract_in_field = pruned_field
            reference = result if reference is None else reference
            difference = float(np.max(np.abs(result - reference)) / np.max(np.abs(reference)))
            print(f"| {projector} | {variant} | {1e3 * seconds:.2f} | {batch / seconds:,.0f} (diff {difference:.1e}) |",
                  flush=True)
        del paired, separate, on_gpu
        cupy.get_default_memory_pool().free_all_blocks()


def tile_rates(cupy, box, batch, repeats, rng, tiles):
    """Whole-batch ms (alone and back to back) and the slice kernel's ms for each ``_slice_cuda.TILE_X`` in
    ``tiles``, both projectors; the images of every tiling against the first (printed)."""
    from dsub.physics import _slice_cuda, subtract

    print(f"\nslice tiles, box {box}, batch {batch}")
    print("| projector | TILE_X | slices ms | batch ms alone | batch ms back to back (8) | particles/s back to back "
          "| max diff vs first |")
    print("|---|---|---|---|---|---|---|")
    kept = _slice_cuda.TILE_X
    for projector in ("gridding", "relion"):
        settings = subtract.SubtractionSettings(projector=projector)
        volume, mask, images, table = scene(box, batch, rng)
        model = subtract.prepare_half_map(cupy, volume, mask, settings)
        on_gpu = cupy.asarray(images)
        rotations = cupy.asarray(subtract.slice_matrices(table, model.pixel_size_angstrom, box), dtype=cupy.float32)
        reference = None
        try:
            for tile in tiles:
                _slice_cuda.TILE_X = tile
                slices = timed(cupy, lambda: _slice_cuda.extract_slice_pair_cuda(
                    (model.full, model.masked), rotations, "zero", box), repeats)
                alone = timed(cupy, lambda: subtract.subtract_batch(cupy, on_gpu, table, model, settings), repeats)
                queued = timed(cupy, lambda: subtract.subtract_batch(cupy, on_gpu, table, model, settings), repeats,
                               queued=8)
                result = subtract.subtract_batch(cupy, on_gpu, table, model, settings)[0].get()
                reference = result if reference is None else reference
                difference = float(np.max(np.abs(result - reference)) / np.max(np.abs(reference)))
                print(f"| {projector} | {tile} | {1e3 * slices:.2f} | {1e3 * alone:.2f} | {1e3 * queued:.2f} "
                      f"| {batch / queued:,.0f} | {difference:.1e} |", flush=True)
        finally:
            _slice_cuda.TILE_X = kept
        del model, on_gpu
        cupy.get_default_memory_pool().free_all_blocks()


def field_kernel_parts(cupy, box, batch, repeats, rng):
    """The field's columns at box ``box`` (field of 2 boxes, ``batch`` particles, both maps): the kernel
    (``_field_cuda.transform_columns``) against cuFFT's passes (zero rows, C2C along y, transfer, back),
    and the kernel without its transforms, without its transfer, and with neither (loads and stores);
    the last three are compiled from the kernel's source with those parts left out (printed)."""
    from dsub.physics import _field_cuda, _model_cuda
    from dsub.physics.subtract import ParticleTransfer

    size, maps = 2 * box, 2
    _, _, _, table = scene(box, batch, rng)
    parameters, given = ParticleTransfer(table, size).for_kernels(cupy)
    half, capacity = size // 2 + 1, maps * batch
    shape = (box, capacity, half)
    rows = cupy.asarray(rng.normal(size=shape) + 1j * rng.normal(size=shape), dtype=cupy.complex64)
    columns, threads = _field_cuda.device_block_shape(size, maps)
    scale = 1.0 / size**2

    def kernel():
        _field_cuda.transform_columns(rows, size, maps, batch, scale, parameters, given, columns=columns,
                                      threads=threads)

    whole = cupy.empty((size, capacity, half), dtype=cupy.complex64)

    def through_cufft():
        from cupy.cuda import cufft

        whole[box:].fill(0)
        plan = _model_cuda._column_plan(size, capacity)
        plan.fft(whole, whole, cufft.CUFFT_FORWARD)
        grid, block = _model_cuda.launch_grid(size, batch * half)
        _model_cuda._kernel("apply_transfer_to_columns")(grid, block, (
            whole, np.int32(maps), np.int32(batch), np.int32(capacity), np.int32(size), np.float32(scale),
            parameters, _model_cuda.pointer(given)))
        plan.fft(whole, whole, cufft.CUFFT_INVERSE)

    print(f"\nfield columns, box {box}, field {size}, batch {batch}, both maps ({columns} columns a block)")
    print("| step | GPU ms per batch |")
    print("|---|---|")
    print(f"| kernel | {1e3 * timed(cupy, kernel, repeats):.3f} |")
    print(f"| cuFFT: zero rows, C2C along y, transfer, C2C back | {1e3 * timed(cupy, through_cufft, repeats):.3f} |")
    real_transform, real_source = _field_cuda._transform, _field_cuda.source
    for label, no_transforms, no_transfer in (("kernel without its transforms", True, False),
                                              ("kernel without its transfer", False, True),
                                              ("kernel: loads and stores only", True, True)):
        def source(*args, no_transforms=no_transforms, no_transfer=no_transfer):
            if no_transforms:
                _field_cuda._transform = lambda size, sign, source, **_: ("", source)
            try:
                text = real_source(*args)
            finally:
                _field_cuda._transform = real_transform
            if no_transfer:
                text = text.replace("scale * particle_transfer(", "scale * unit_transfer(").replace(
                    'extern "C"', "__device__ __forceinline__ complex<float> unit_transfer(const double*, float, "
                    "float, int, const complex<float>*, long long) { return complex<float>(1.f, 0.f); }\n"
                    'extern "C"', 1)
            return text

        _field_cuda._kernels.clear()
        _field_cuda.source = source
        try:
            print(f"| {label} | {1e3 * timed(cupy, kernel, repeats):.3f} |", flush=True)
        finally:
            _field_cuda.source = real_source
            _field_cuda._kernels.clear()
    del rows, whole
    cupy.get_default_memory_pool().free_all_blocks()


def main():
    import cupy

    from dsub.physics.memory import prepared_map_bytes, texture_bytes
    from dsub.physics.subtract import SubtractionSettings, prepare_half_map, subtract_batch

    parser = argparse.ArgumentParser()
    parser.add_argument("--boxes", type=int, nargs="+", default=[128, 256, 384, 512])
    parser.add_argument("--check-up-to", type=int, default=256, help="compare with NumPy up to this box")
    parser.add_argument("--batch", type=int, nargs="+", default=[256], help="batch sizes to time (the first is checked)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stages", type=int, nargs="*", metavar="BATCH",
                        help="time each stage of subtract_batch at these batch sizes (each box of --boxes) and stop")
    parser.add_argument("--variants", type=int, nargs="*", metavar="BATCH",
                        help="compare the engine's layouts (VARIANTS) at these batch sizes (each box of --boxes) and stop")
    parser.add_argument("--tiles", type=int, nargs="*", metavar="TILE_X",
                        help="time the slice kernel's tilings (_slice_cuda.TILE_X; 0: rows) at --batch's first size "
                             "and each box of --boxes, alone and back to back, and stop")
    parser.add_argument("--field-kernel", type=int, nargs="*", metavar="BATCH",
                        help="time the field's column kernel and its parts against cuFFT's passes at these batch "
                             "sizes (each box of --boxes) and stop")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"GPU: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, CuPy {cupy.__version__}")
    if args.tiles is not None:
        for box in args.boxes:
            tile_rates(cupy, box, args.batch[0], args.repeats, rng, args.tiles or [0])
        return
    if args.field_kernel is not None:
        for box in args.boxes:
            for batch in args.field_kernel or args.batch:
                field_kernel_parts(cupy, box, batch, args.repeats, rng)
        return
    if args.variants is not None:
        for box in args.boxes:
            for batch in args.variants or args.batch:
                variant_rates(cupy, box, batch, args.repeats, rng)
        return
    if args.stages is not None:
        for box in args.boxes:
            for batch in args.stages or args.batch:
                stage_profile(cupy, box, batch, args.repeats, rng)
        return
    rows = []
    for box in args.boxes:
        for projector in ("gridding", "relion"):
            settings = SubtractionSettings(projector=projector)
            largest = max(args.batch)
            volume, mask, images, table = scene(box, largest, rng)
            pool = cupy.get_default_memory_pool()
            pool.free_all_blocks()
            before = pool.used_bytes()
            started = time.perf_counter()
            model = prepare_half_map(cupy, volume, mask, settings)
            cupy.cuda.Device().synchronize()
            prepare_s = time.perf_counter() - started
            other_half = prepare_half_map(cupy, volume, mask, settings)
            resident = pool.used_bytes() - before + texture_bytes((model, other_half))  # textures: outside the pool
            difference = alpha_difference = float("nan")
            if box <= args.check_up_to:  # correctness on a few particles against the NumPy twin
                few = np.arange(4)
                cpu, a_cpu = subtract_batch(np, images[few], table.subset(few),
                                            prepare_half_map(np, volume, mask, settings), settings)
                gpu, a_gpu = subtract_batch(cupy, images[few], table.subset(few), model, settings)
                difference = float(np.max(np.abs(gpu.get() - cpu)) / np.max(np.abs(cpu)))
                alpha_difference = float(np.max(np.abs(a_gpu.alpha.get() - a_cpu.alpha) / np.abs(a_cpu.alpha)))
            rates = []
            for batch in args.batch:
                subset = table.subset(np.arange(batch))
                on_gpu = cupy.asarray(images[:batch])
                compute_s = timed(cupy, lambda: subtract_batch(cupy, on_gpu, subset, model, settings), args.repeats)
                rates.append(batch / compute_s)
                del on_gpu
            on_gpu = cupy.asarray(images[:largest])
            queued = largest / timed(cupy, lambda: subtract_batch(cupy, on_gpu, table, model, settings),
                                     args.repeats, queued=8)
            del on_gpu
            first = args.batch[0]
            subset = table.subset(np.arange(first))
            transfer_s = timed(
                cupy, lambda: subtract_batch(cupy, cupy.asarray(images[:first]), subset, model, settings)[0].get(),
                args.repeats,
            )
            rows.append((box, projector, difference, alpha_difference, prepare_s, rates, queued,
                         first / transfer_s, resident / 1e9, prepared_map_bytes(box, settings, "gpu") / 1e9,
                         pool.total_bytes() / 1e9))
            print(f"box {box} {projector}: particles/s {[round(rate) for rate in rates]} at batches {args.batch}",
                  flush=True)
            del model, other_half
            pool.free_all_blocks()
    batches = " / ".join(str(batch) for batch in args.batch)
    print(f"| box | projector | max rel diff vs NumPy | α rel diff | prepare one half-map (s) "
          f"| particles/s, data on GPU, batch {batches} | batches of {max(args.batch)} back to back "
          f"| particles/s, host→GPU→host, batch {args.batch[0]} | resident GB (formula) | pool peak GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for box, projector, diff, adiff, prep, rates, queued, rate_io, resident, formula, peak in rows:
        rate = " / ".join(f"{value:,.0f}" for value in rates)
        print(f"| {box} | {projector} | {diff:.1e} | {adiff:.1e} | {prep:.2f} | {rate} | {queued:,.0f} | {rate_io:,.0f} "
              f"| {resident:.2f} ({formula:.2f}) | {peak:.2f} |")

if __name__ == "__main__":
    main()
