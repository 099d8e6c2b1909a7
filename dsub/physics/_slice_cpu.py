"""Compiled CPU kernel for Fourier-slice extraction: the numba twin of
``projector._extract_slices_numpy``, one loop iteration per output coefficient.

Each coefficient's 3D point is computed, flipped into the stored half space
(x ≥ 0) by Hermitian symmetry, given its separable kernel weights (tent, or
Kaiser-Bessel through the same float32 polynomial as ``GriddingKernel.weights``),
and its ``width³`` taps are summed straight from the prepared transform, row by
row along x in the NumPy gather's order, so the values are the same to the
bit on every case tested. A row's taps of two maps side by side are summed as
4-wide vectors (``_add_pair_row``), in the same order with each product
rounded. Per output row: the in-band points' coordinates, their weights and
their rows' addresses (loops over the points, which the compiler vectorises),
then the sums, with each point's rows prefetched a few points ahead (they lie far
apart in a volume much larger than the caches: the first and the last tap of
each row, which often lie in two cache lines). Several volumes of one grid
(a half map whole and masked) are sliced in one pass, sharing the points'
coordinates and weights (``extract_slices_of_numba``); two prepared side by
side (``projector.prepare_volumes``) have their values at each grid point next
to each other, so a point's taps of both come from the same cache lines (the
trilinear gather is bound by memory latency). Nothing per tap is stored, so
a batch needs no working memory beyond its output, and the loop runs without
the GIL (``nogil``): threads of one process slice their own batches at once.

``projector.extract_slices`` imports this module on first use; where numba
is not installed it uses the NumPy gather. tests/test_slice_cpu.py compares
the two; tests/test_projector.py runs its independent references on both.
"""

from __future__ import annotations

import llvmlite.ir as llvm_ir
import numba
import numpy as np
from numba.core import cgutils
from numba.extending import intrinsic

from .ctf import frequency_grid
from .gridding import kaiser_bessel_series


@numba.njit(nogil=True, cache=True, inline="always")
def _wrap(index, grid):
    """``index % grid`` for an index less than one grid away from [0, grid)."""
    if index < 0:
        return index + grid
    if index >= grid:
        return index - grid
    return index


#: Points ahead of the one being summed whose taps are prefetched. With the CPU's batches small enough for the
#: model's other passes to stay in cache (``resources.BATCH_CAP_BYTES``), 12-24 ran best (one core, box 256: the
#: whole default model 226-244 particles/s against 208-217 with 6; box 128 667-722 against 637-647).
PREFETCH_AHEAD = 16


@intrinsic
def _prefetch(typing_context, array, index):
    """Ask the processor to bring ``array[index]`` into cache (LLVM's ``llvm.prefetch``: read, keep)."""
    signature = numba.types.void(array, index)

    def codegen(context, builder, signature, arguments):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, arguments[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, view, [arguments[1]], wraparound=False)
        byte_pointer = builder.bitcast(pointer, llvm_ir.IntType(8).as_pointer())
        word = llvm_ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, llvm_ir.FunctionType(llvm_ir.VoidType(), [byte_pointer.type, word, word, word]),
            "llvm.prefetch.p0i8")
        builder.call(function, [byte_pointer, word(0), word(3), word(1)])  # read, high locality, data
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def _add_pair_row(typing_context, sums, volume, start, row_weights, weight):
    """``sums`` plus ``weight`` times one row's weighted taps of two maps side by side, as 4-wide vectors.

    The row is the ``4·width`` float32 at ``volume[start:]`` (``width`` =
    ``len(row_weights)``): tap j's (real, imaginary) of the first map, then of the
    second. Returns (real₀, imag₀, real₁, imag₁) + weight · Σ_j row_weights[j] ·
    tap j, the sum over j taken left to right with each product rounded, as the
    scalar code's ``v₀w₀ + v₁w₁ + ...`` (no fused multiply-add): the same float32
    values, four lanes per instruction where the compiler had made one.
    """
    lanes = numba.types.UniTuple(numba.types.float32, 4)
    signature = lanes(sums, volume, start, row_weights, weight)
    width = len(row_weights)

    def codegen(context, builder, signature, arguments):
        sums_value, array, index, taps_weights, row_weight = arguments
        f32, i32 = llvm_ir.FloatType(), llvm_ir.IntType(32)
        quad = llvm_ir.VectorType(f32, 4)
        array_type = signature.args[1]
        view = context.make_array(array_type)(context, builder, array)
        pointer = cgutils.get_item_pointer(context, builder, array_type, view, [index], wraparound=False)
        row = builder.load(builder.bitcast(pointer, llvm_ir.VectorType(f32, 4 * width).as_pointer()), align=4)
        undefined = llvm_ir.Constant(row.type, llvm_ir.Undefined)

        def tap(j):
            return builder.shuffle_vector(row, undefined, llvm_ir.Constant(llvm_ir.VectorType(i32, 4),
                                                                           [i32(4 * j + lane) for lane in range(4)]))

        def splat(value):
            one = builder.insert_element(llvm_ir.Constant(quad, llvm_ir.Undefined), value, i32(0))
            return builder.shuffle_vector(one, llvm_ir.Constant(quad, llvm_ir.Undefined),
                                          llvm_ir.Constant(llvm_ir.VectorType(i32, 4), [i32(0)] * 4))

        total = builder.fmul(tap(0), splat(builder.extract_value(taps_weights, 0)))
        for j in range(1, width):
            total = builder.fadd(total, builder.fmul(tap(j), splat(builder.extract_value(taps_weights, j))))
        before = llvm_ir.Constant(quad, llvm_ir.Undefined)
        for lane in range(4):
            before = builder.insert_element(before, builder.extract_value(sums_value, lane), i32(lane))
        total = builder.fadd(before, builder.fmul(total, splat(row_weight)))
        return context.make_tuple(builder, signature.return_type,
                                  [builder.extract_element(total, i32(lane)) for lane in range(4)])

    return signature, codegen


@numba.njit(nogil=True, cache=True)
def _row_starts(firsts, count, width, grid, columns, reach, floats, starts):
    """``starts[a·width + b, c]``: where point c's row (z tap a, y tap b) of taps along x begins in the
    flattened volume (``floats`` float32 per grid point), its first tap clamped into the stored columns;
    a loop over the points innermost (vectorised), once for the prefetches and the sums alike."""
    for a in range(width):
        for b in range(width):
            row = starts[a * width + b]
            for c in range(count):
                plane = _wrap(firsts[2, c] + a, grid)
                x0 = min(max(firsts[0, c] + reach, 0), columns - width)
                row[c] = floats * ((plane * grid + _wrap(firsts[1, c] + b, grid)) * columns + x0)


@numba.njit(nogil=True, cache=True, inline="always")
def _prefetch_taps(volume, starts, c, width, floats):
    """Prefetch the first and the last tap of each of point c's width² rows (``_row_starts``)."""
    for k in range(width * width):
        _prefetch(volume, starts[k, c])
        _prefetch(volume, starts[k, c] + floats * width - 1)  # the row's end may lie in the next cache line


@numba.njit(nogil=True, cache=True)
def _row_weights(coordinates, count, width, kind, series, firsts, weights, first_taps, units):
    """First taps and kernel weights of ``count`` points' coordinates (grid units), as ``_axis_taps``.

    ``coordinates[axis, c]`` is point c's coordinate; ``firsts[axis, c]`` gets its
    first tap and ``weights[axis, j, c]`` (float32) the weight of tap ``first + j``:
    the tent, or the Kaiser-Bessel polynomial in u = 1 - r² whose coefficients are
    ``series`` (``gridding.kaiser_bessel_series``), in ``GriddingKernel.weights``'
    float32 arithmetic and order. Each loop runs over the points (or every tap of
    the row) innermost, so the compiler vectorises it. ``first_taps`` and ``units``
    are scratch.
    """
    for axis in range(3):
        for c in range(count):
            first = np.float32(np.ceil(coordinates[axis, c] - np.float32(0.5 * width)))
            firsts[axis, c] = np.int64(first)
            first_taps[c] = first
        for j in range(width):
            for c in range(count):
                distance = coordinates[axis, c] - (first_taps[c] + np.float32(j))
                if kind == 0:
                    weights[axis, j, c] = max(np.float32(1.0) - abs(distance), np.float32(0.0))
                else:
                    ratio = np.float32(2.0) * distance / np.float32(width)
                    units[axis, j, c] = max(np.float32(1.0) - ratio * ratio, np.float32(0.0))
    if kind == 0:
        return
    # One flat loop over every tap of the row (entries past ``count`` hold finite leftovers, unused).
    flat_weights, flat_units = weights.reshape(-1), units.reshape(-1)
    for i in range(flat_weights.shape[0]):
        flat_weights[i] = series[0]
    for k in range(1, series.shape[0]):  # Horner's rule, highest power first
        coefficient = series[k]
        for i in range(flat_weights.shape[0]):
            flat_weights[i] = flat_weights[i] * flat_units[i] + coefficient
    for i in range(flat_weights.shape[0]):
        flat_weights[i] = flat_weights[i] * flat_units[i]


@numba.njit(nogil=True, cache=True)
def _gather(volumes, interleaved, rotations, kx, ky, out, box, grid, reach, step, width, kind, series, cube):
    """Fill ``out`` (m, n, size, size//2 + 1) with the kernel sums of each of the m volumes at each slice point.

    ``volumes`` is a tuple of arrays of one shape (P, P, C, ``interleaved``) complex64,
    each seen as float32 pairs, flattened: ``interleaved`` prepared transforms side by
    side at each grid point (1 or 2), volume ``g·interleaved + i`` of ``out`` being the
    i-th of array g. Each output row is done in three passes: its in-band points'
    coordinates, their weights (shared by every volume), then the taps of each array in
    turn, all of its volumes at once (their values at a tap share cache lines). Each
    volume's sum runs in the same order whether interleaved or not.
    """
    floats = 2 * interleaved  # float32 per grid point
    columns = (volumes[0].shape[0] // (grid * grid)) // floats
    size, half = out.shape[2], out.shape[3]
    radius2 = np.float32((size / 2.0) ** 2)
    limit = np.float32(box / 2.0)
    coordinates = np.empty((3, half), dtype=np.float32)
    points = np.empty(half, dtype=np.int64)
    flipped = np.empty(half, dtype=np.bool_)
    firsts = np.empty((3, half), dtype=np.int64)
    weights = np.empty((3, width, half), dtype=np.float32)
    row_starts = np.empty((width * width, half), dtype=np.int64)
    first_taps = np.empty(half, dtype=np.float32)
    units = np.zeros((3, width, half), dtype=np.float32)
    for p in range(out.shape[1]):
        r = rotations[p]
        for iy in range(size):
            fy = ky[iy]
            count = 0
            for ix in range(half):
                fx = kx[ix]
                qx = fx * r[0, 0] + fy * r[1, 0]
                qy = fx * r[0, 1] + fy * r[1, 1]
                qz = fx * r[0, 2] + fy * r[1, 2]
                if cube:
                    inside = abs(qx) <= limit and abs(qy) <= limit and abs(qz) <= limit
                else:
                    inside = fx * fx + fy * fy <= radius2
                if not inside:
                    for m in range(out.shape[0]):
                        out[m, p, iy, ix] = 0
                    continue
                qx, qy, qz = qx * step, qy * step, qz * step
                negative = qx < np.float32(0.0)
                if negative:  # F(-q) = conj(F(q)): read the stored half space
                    qx, qy, qz = -qx, -qy, -qz
                coordinates[0, count], coordinates[1, count], coordinates[2, count] = qx, qy, qz
                points[count] = ix
                flipped[count] = negative
                count += 1
            _row_weights(coordinates, count, width, kind, series, firsts, weights, first_taps, units)
            _row_starts(firsts, count, width, grid, columns, reach, floats, row_starts)
            for g in range(len(volumes)):
                volume = volumes[g]
                for c in range(min(PREFETCH_AHEAD, count)):
                    _prefetch_taps(volume, row_starts, c, width, floats)
                for c in range(count):
                    if c + PREFETCH_AHEAD < count:  # the taps' rows are far apart: ask for them early
                        _prefetch_taps(volume, row_starts, c + PREFETCH_AHEAD, width, floats)
                    if interleaved == 2:
                        first, second = _tap_sums_of_two(volume, weights, row_starts, c, width)
                        out[2 * g, p, iy, points[c]] = np.conj(first) if flipped[c] else first
                        out[2 * g + 1, p, iy, points[c]] = np.conj(second) if flipped[c] else second
                    else:
                        value = _tap_sum(volume, weights, row_starts, c, width)
                        out[g, p, iy, points[c]] = np.conj(value) if flipped[c] else value


@numba.njit(nogil=True, cache=True, inline="always")
def _tap_sum(volume, weights, starts, c, width):
    """Point c's kernel sum over one volume stored alone (one complex64 per grid point)."""
    wx, wy, wz = weights[0, :, c], weights[1, :, c], weights[2, :, c]
    real = np.float32(0.0)
    imag = np.float32(0.0)
    for a in range(width):
        for b in range(width):
            start = starts[a * width + b, c]
            # the row's taps along x, contiguous (real, imag) pairs, summed in order
            if width == 4:  # the default kernel, unrolled
                row_real = (volume[start] * wx[0] + volume[start + 2] * wx[1]
                            + volume[start + 4] * wx[2] + volume[start + 6] * wx[3])
                row_imag = (volume[start + 1] * wx[0] + volume[start + 3] * wx[1]
                            + volume[start + 5] * wx[2] + volume[start + 7] * wx[3])
            elif width == 2:  # trilinear
                row_real = volume[start] * wx[0] + volume[start + 2] * wx[1]
                row_imag = volume[start + 1] * wx[0] + volume[start + 3] * wx[1]
            else:
                row_real = np.float32(0.0)
                row_imag = np.float32(0.0)
                for j in range(width):
                    row_real += volume[start + 2 * j] * wx[j]
                    row_imag += volume[start + 2 * j + 1] * wx[j]
            weight = wz[a] * wy[b]
            real += row_real * weight
            imag += row_imag * weight
    return complex(real, imag)


@numba.njit(nogil=True, cache=True, inline="always")
def _tap_sums_of_two(volume, weights, starts, c, width):
    """Point c's kernel sums over two volumes stored side by side (two complex64 per grid point),
    each in ``_tap_sum``'s order; rows of 4 and 2 taps (the default's and ``relion``'s kernels) summed as
    vectors (``_add_pair_row``)."""
    wx, wy, wz = weights[0, :, c], weights[1, :, c], weights[2, :, c]
    zero = np.float32(0.0)
    if width == 4:
        sums = (zero, zero, zero, zero)  # real and imaginary part of each volume's sum
        for a in range(width):
            for b in range(width):
                s = starts[a * width + b, c]
                # the row's weights read here: held in a tuple made before the loops, they stay on the stack (slower)
                sums = _add_pair_row(sums, volume, s, (wx[0], wx[1], wx[2], wx[3]), wz[a] * wy[b])
        return complex(sums[0], sums[1]), complex(sums[2], sums[3])
    if width == 2:  # relion's trilinear kernel: a loop of its own (one loop branching on the width was slower)
        sums = (zero, zero, zero, zero)
        for a in range(width):
            for b in range(width):
                sums = _add_pair_row(sums, volume, starts[a * width + b, c], (wx[0], wx[1]), wz[a] * wy[b])
        return complex(sums[0], sums[1]), complex(sums[2], sums[3])
    real0, imag0, real1, imag1 = zero, zero, zero, zero
    for a in range(width):
        for b in range(width):
            s = starts[a * width + b, c]
            row_real0, row_imag0, row_real1, row_imag1 = zero, zero, zero, zero
            for j in range(width):
                row_real0 += volume[s + 4 * j] * wx[j]
                row_imag0 += volume[s + 4 * j + 1] * wx[j]
                row_real1 += volume[s + 4 * j + 2] * wx[j]
                row_imag1 += volume[s + 4 * j + 3] * wx[j]
            weight = wz[a] * wy[b]
            real0 += row_real0 * weight
            imag0 += row_imag0 * weight
            real1 += row_real1 * weight
            imag1 += row_imag1 * weight
    return complex(real0, imag0), complex(real1, imag1)


def _series(kernel) -> np.ndarray:
    """The Kaiser-Bessel polynomial's coefficients (``gridding.kaiser_bessel_series``), float32; [0] for the tent."""
    if kernel.kind != "kaiser-bessel":
        return np.zeros(1, dtype=np.float32)
    return np.asarray(kaiser_bessel_series(kernel.beta), dtype=np.float32)


def extract_slices_numba(prepared, rotations, corners: str, size: int):
    """Central slices on the CPU, compiled; same contract as ``projector.extract_slices``.

    The first call in a process compiles the kernel (a few seconds, cached on
    disk by numba afterwards).
    """
    return extract_slices_of_numba((prepared,), rotations, corners, size)[0]


def extract_slices_of_numba(volumes, rotations, corners: str, size: int):
    """The slices of several prepared volumes of one grid and kernel, in one pass: complex64
    (len(volumes), n, size, size//2 + 1).

    Each point's coordinates and kernel weights are computed once for all the
    volumes. Two volumes prepared side by side (``projector.prepare_volumes``: their
    transforms are the two halves of one array (P, P, C, 2)) are read together, each
    point's taps of both from the same cache lines. Raises ValueError for volumes of
    different boxes, kernels or grids.
    """
    first = volumes[0]
    box, kernel = first.box, first.kernel
    if any(v.box != box or v.kernel != kernel or v.transform.shape != first.transform.shape for v in volumes):
        raise ValueError("volumes sliced together must share their box, kernel and grid")
    pair = _side_by_side(volumes)
    if pair is not None:
        flat, interleaved = (pair.view(np.float32).reshape(-1),), 2
    else:
        flat = tuple(np.ascontiguousarray(v.transform, dtype=np.complex64).view(np.float32).reshape(-1)
                     for v in volumes)
        interleaved = 1
    # the same float32 arithmetic as projector.slice_coordinates
    rot = np.ascontiguousarray(np.asarray(rotations, dtype=np.float32).reshape(-1, 3, 3) * np.float32(box / float(size)))
    kx, ky = frequency_grid(np, size)
    out = np.empty((len(volumes), rot.shape[0], size, size // 2 + 1), dtype=np.complex64)
    if out.size == 0:
        return out
    _gather(flat, interleaved, rot, np.ascontiguousarray(kx[0]), np.ascontiguousarray(ky[:, 0]), out, box,
            first.grid_size, kernel.reach, np.float32(first.grid_size / float(box)), kernel.width,
            0 if kernel.kind == "trilinear" else 1, _series(kernel), corners == "map")
    return out


def _side_by_side(volumes):
    """The array (P, P, C, 2) complex64 whose two halves are the two volumes' transforms, in order, or None."""
    if len(volumes) != 2:
        return None
    pair = volumes[0].transform.base
    if (not isinstance(pair, np.ndarray) or pair.dtype != np.complex64 or pair.ndim != 4 or pair.shape[3] != 2
            or not pair.flags.c_contiguous or volumes[1].transform.base is not pair):
        return None
    address = pair.__array_interface__["data"][0]
    if any(v.transform.__array_interface__["data"][0] != address + 8 * i or v.transform.strides != pair.strides[:3]
           for i, v in enumerate(volumes)):
        return None
    return pair
