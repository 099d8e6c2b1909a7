"""Compiled CPU rounding of float32 values to the nearest float16, kept in float32 (numba).

``projector.rounded_to_float16`` rounds the default projector's prepared maps as
a GPU stores them: scaled by a power of two, cast to float16 (IEEE 754
round to nearest, ties to even, as CuPy's cast) and scaled back. NumPy's cast
runs about 3.5 ns a value here (no vector instructions for float16 on this
path): 2.8 s of a worker's 4.4 s set-up at box 256. This kernel rounds in
float32 arithmetic, one pass, the same values (tests/test_projector.py
compares it with NumPy's cast over every range):

- where float16 is normal (|x| ≥ 2⁻¹⁴), keep 11 significant bits: add
  0x0FFF plus the lowest kept bit to the float32 bits and clear the 13 below
  (a carry moves into the exponent, as a rounding up to the next power of two
  does);
- where float16 is subnormal (|x| < 2⁻¹⁴, steps of 2⁻²⁴), ``(x + 0.75) - 0.75``:
  float32 values in [0.5, 1) are 2⁻²⁴ apart, so the sum rounds x to that
  step, ties to even (0.75 is an even multiple of 2⁻²⁴).

Values must lie within float16's range (|x| < 65 520), which the scaling by
``projector.float16_exponent`` ensures; NaN and infinity are not expected.
"""

from __future__ import annotations

import llvmlite.ir as llvm_ir
import numba
import numpy as np
from numba.extending import intrinsic

#: Smallest normal float16, 2⁻¹⁴.
_SMALLEST_NORMAL = np.float32(2.0**-14)
#: A float32 in [0.5, 1), whose neighbours are float16's subnormal step (2⁻²⁴) apart, and an even multiple of it.
_SUBNORMAL_SHIFT = np.float32(0.75)


@intrinsic
def _bits_of(typing_context, value):
    """The bits of a float32 as a uint32 (LLVM's bitcast)."""
    def codegen(context, builder, signature, arguments):
        return builder.bitcast(arguments[0], llvm_ir.IntType(32))

    return numba.types.uint32(numba.types.float32), codegen


@intrinsic
def _float_of(typing_context, bits):
    """The float32 whose bits a uint32 holds (LLVM's bitcast)."""
    def codegen(context, builder, signature, arguments):
        return builder.bitcast(arguments[0], llvm_ir.FloatType())

    return numba.types.float32(numba.types.uint32), codegen


@numba.njit(nogil=True, cache=True, inline="always")
def _rounded(value, scale, unscale):
    scaled = value * scale
    if abs(scaled) < _SMALLEST_NORMAL:
        rounded = (scaled + _SUBNORMAL_SHIFT) - _SUBNORMAL_SHIFT
    else:
        bits = _bits_of(scaled)
        rounded = _float_of((bits + np.uint32(0x0FFF) + ((bits >> np.uint32(13)) & np.uint32(1)))
                            & np.uint32(0xFFFFE000))
    return np.copysign(rounded * unscale, value)  # a value rounded to zero keeps its sign, as the cast


@numba.njit(nogil=True, cache=True)
def _round_columns(parts, first, count, scale, unscale):
    """Round ``parts[..., first : first + count]`` (a 4-D float32 array) in place."""
    for z in range(parts.shape[0]):
        for y in range(parts.shape[1]):
            for x in range(parts.shape[2]):
                for c in range(first, first + count):
                    parts[z, y, x, c] = _rounded(parts[z, y, x, c], scale, unscale)


def round_to_float16_in_place(parts: np.ndarray, columns: slice, exponent: int) -> None:
    """``parts[..., columns]`` ← ``float32(float16(parts · 2**exponent)) / 2**exponent``, in place.

    ``parts``: float32, 4-D (P, P, C, k), C-contiguous (a prepared map's real and
    imaginary parts, k = 2, or two maps' side by side, k = 4); ``columns`` a
    slice of its last axis with step 1. Raises ValueError for another array.
    """
    if parts.dtype != np.float32 or parts.ndim != 4 or not parts.flags.c_contiguous:
        raise ValueError(f"parts must be a C-contiguous 4-D float32 array, got {parts.dtype} {parts.shape}")
    first, stop, step = columns.indices(parts.shape[3])
    if step != 1:
        raise ValueError("columns must be a slice of step 1")
    _round_columns(parts, first, max(0, stop - first), np.float32(2.0**exponent), np.float32(2.0**-exponent))
