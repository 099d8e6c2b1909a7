"""Memory a worker needs for the physics: the prepared maps, and a batch's working arrays.

Prepared maps: each half set keeps two prepared volumes (the whole half-map and
its masked region), each the oversampled rfft of ``projector.prepare_volume``:
complex64 of shape (P, P, P//2 + 1 + 2·reach), P = ``grid_size(box,
oversampling)``. Both half sets are resident, so four volumes.

Batch: the peak of ``subtract_batch`` per particle, measured with tracemalloc
on NumPy (tests/test_subtract.py checks it within 25 %): the larger of the
slice's working arrays (8 + 52·width bytes per element of the rfft2 half plane
it is sampled on: coordinates, taps and weights per axis, gathered values) and
the extraction field's (80 bytes per element of its half plane E·(E//2 + 1):
the CTF is computed there in float64, ``ctf.ctf_2d``, beside the shift phases
and the spectra), plus 24 bytes per element of the box's half plane (images,
models, contrast fit). The GPU's slice kernel keeps no per-tap arrays, so this
bounds the GPU's batch too.
"""

from __future__ import annotations

from .gridding import grid_size
from .projector import prepared_shape, projector_kernel

#: Bytes per element of an rfft2 half plane (measured): the slice's (plus per kernel width), the field's, the box's.
SLICE_BYTES_PER_ELEMENT = 8
SLICE_BYTES_PER_ELEMENT_AND_WIDTH = 52
FIELD_BYTES_PER_ELEMENT = 80
BOX_BYTES_PER_ELEMENT = 24
#: Prepared volumes resident per worker: (whole, masked) for each of the two half sets.
PREPARED_VOLUMES = 4


def prepared_volume_bytes(box: int, settings) -> int:
    """Bytes of one prepared volume (complex64)."""
    kernel, oversampling = projector_kernel(settings.projector, settings.padding)
    z, y, x = prepared_shape(box, kernel, oversampling)
    return 8 * z * y * x


def prepared_map_bytes(box: int, settings) -> int:
    """Resident bytes of the prepared maps of both half sets (four volumes)."""
    return PREPARED_VOLUMES * prepared_volume_bytes(box, settings)


#: Peak of preparing one volume beyond the three already resident, in units of its plain rfft
#: (P²·(P/2+1) complex64): NumPy's pocketfft transforms axis by axis into fresh arrays, beside the padded
#: map, its shifted copy and the extended transform (tracemalloc, NumPy 2.x: 8.1-9.7; tests/test_memory.py).
#: cuFFT needs less scratch, so on a GPU this is an upper bound.
PREPARATION_PEAK_PLAIN_RFFTS = 8.5


def preparation_peak_bytes(box: int, settings) -> int:
    """Peak bytes while the last of the four volumes is prepared: the other three and its scratch."""
    _, oversampling = projector_kernel(settings.projector, settings.padding)
    size = grid_size(box, oversampling)
    plain_rfft = 8 * size * size * (size // 2 + 1)
    return int(3 * prepared_volume_bytes(box, settings) + PREPARATION_PEAK_PLAIN_RFFTS * plain_rfft)


def batch_bytes_per_particle(box: int, settings, delocalisation_pixels: float = 0.0) -> int:
    """Peak working bytes per particle of a batch in ``subtract_batch`` (beyond the prepared maps).

    The extraction field grows with the CTF's delocalisation (pass
    ``subtract.ctf_delocalisation_pixels(particles)`` of the data set; 0 gives
    the field of ``settings.extension`` boxes).
    """
    def half_plane(size):
        return size * (size // 2 + 1)

    kernel, _ = projector_kernel(settings.projector, settings.padding)
    field = settings.field_size(box, delocalisation_pixels)
    sliced = field if settings.field_slice and settings.projector != "relion" else box
    slice_bytes = (SLICE_BYTES_PER_ELEMENT + SLICE_BYTES_PER_ELEMENT_AND_WIDTH * kernel.width) * half_plane(sliced)
    field_bytes = FIELD_BYTES_PER_ELEMENT * half_plane(field)
    return max(slice_bytes, field_bytes) + BOX_BYTES_PER_ELEMENT * half_plane(box)
