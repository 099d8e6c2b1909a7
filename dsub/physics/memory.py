"""Memory a worker needs for the physics: the prepared maps, and a batch's working arrays.

Prepared maps: each half set keeps two prepared volumes (the whole half-map and
its masked region), each the oversampled rfft of ``projector.prepare_volume``:
complex64 of shape (P, P, P//2 + 1 + 2·reach), P = ``grid_size(box,
oversampling)``. Both half sets are resident, so four volumes.

Batch: the peak of ``subtract_batch`` per particle, measured with tracemalloc
on NumPy (tests/test_subtract.py checks it): about 80 bytes per element of the
extraction field's rfft2 half plane (E·(E//2 + 1); the CTF is computed there in
float64, ``ctf.ctf_2d``, beside the shift phases and the spectra) and 24 bytes
per element of the box's half plane (the images, models and contrast fit).
"""

from __future__ import annotations

from .gridding import grid_size
from .projector import prepared_shape, projector_kernel

#: Bytes per element of the extraction field's rfft2 half plane, and of the box's (measured).
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


def preparation_peak_bytes(box: int, settings) -> int:
    """Peak bytes while the last volume is prepared: the other three, it, and its plain rfft and padded map."""
    kernel, oversampling = projector_kernel(settings.projector, settings.padding)
    size = grid_size(box, oversampling)
    plain_rfft = 8 * size * size * (size // 2 + 1)
    padded_map = 4 * size**3
    return prepared_map_bytes(box, settings) + max(plain_rfft, 2 * padded_map)


def batch_bytes_per_particle(box: int, settings) -> int:
    """Peak working bytes per particle of a batch in ``subtract_batch`` (beyond the prepared maps)."""
    field = settings.field_size(box)
    return FIELD_BYTES_PER_ELEMENT * field * (field // 2 + 1) + BOX_BYTES_PER_ELEMENT * box * (box // 2 + 1)
