"""Memory a worker needs for the physics: the prepared maps, and a batch's working arrays.

Prepared maps: each half set keeps two prepared volumes (the whole half-map and
its masked region), each the oversampled rfft of ``projector.prepare_volume``:
complex64 of shape (P, P, P//2 + 1 + 2·reach), P = ``grid_size(box,
oversampling)``; on a GPU the default projector's are stored in float16, half
that, and a complex64 pair of 256 MiB to 4 GiB is also copied into a 3D
texture, twice that (``projector.prepare_volumes``). Both half sets are
resident, so four volumes.

Batch: the peak of ``subtract_batch`` per particle, measured with tracemalloc
on NumPy (tests/test_subtract.py checks it within 25 %): the larger of the
slices' working arrays (44 bytes per element of the rfft2 half plane they are
sampled on: both maps' slices, sampled in one pass and multiplied by the
transfer in place, and their inverse transforms; 52·width more where numba is
missing and the NumPy gather keeps coordinates, taps and weights per axis) and
the extraction field's (24 bytes per element of its half plane E·(E//2 + 1):
both maps' field spectra, multiplied by the compiled transfer in place, and
their pruned transforms; 96 where numba is missing and the transfer is NumPy
arrays, its CTF in float64, ``optics.particle_transfer``), plus 4 bytes per
element of the box's half plane (images, models; 24 where numba is missing
and the contrast fit's sums are NumPy arrays). The GPU's
slice kernel keeps no per-tap arrays either. (On NumPy the field is transformed
for at most 16 MiB of particles at once, ``subtract.FIELD_GROUP_BYTES``: at large
boxes the figure is an upper bound.) Measured at box 48 and 96 (NumPy
2.4, SciPy 1.17): within 21 % with numba (relion +21 %, the default at box 96 -19 %), above
the measured peak without it.
"""

from __future__ import annotations

from importlib.util import find_spec

from .gridding import grid_size
from .projector import FLOAT16_PROJECTORS, pair_in_texture, prepared_shape, projector_kernel

#: Bytes per element of an rfft2 half plane (measured): the slices' (plus per kernel width without numba),
#: the field's (with the compiled transfer, and with NumPy's arrays), the box's (with the compiled contrast fit,
#: and with NumPy's arrays).
SLICE_BYTES_PER_ELEMENT = 44
SLICE_BYTES_PER_ELEMENT_AND_WIDTH = 52
FIELD_BYTES_PER_ELEMENT = 24
FIELD_BYTES_PER_ELEMENT_NUMPY_TRANSFER = 96
BOX_BYTES_PER_ELEMENT = 4
BOX_BYTES_PER_ELEMENT_NUMPY_FIT = 24
#: Host memory of the compiled CPU kernels in a worker (slice gather, transfer, contrast fit): numba, LLVM
#: and the kernels. Peak resident size of a process before and after its first batch of each projector
#: (NumPy 2.4, numba 0.68): 74 -> 218 MiB with the kernels in numba's cache, 74 -> 266 MiB when they are
#: compiled (the first run on a machine).
COMPILED_GATHER_HOST_BYTES = 240 * 2**20
#: Prepared volumes resident per worker: (whole, masked) for each of the two half sets.
PREPARED_VOLUMES = 4


def prepared_volume_bytes(box: int, settings, device: str = "cpu") -> int:
    """Bytes of one prepared volume: complex64, or half that on a GPU for a projector whose maps are stored
    in float16 there (``projector.FLOAT16_PROJECTORS``); twice that on a GPU where the complex64 pair is
    also kept in a 3D texture (``projector.pair_in_texture``)."""
    kernel, oversampling = projector_kernel(settings.projector, settings.padding)
    z, y, x = prepared_shape(box, kernel, oversampling)
    if device == "gpu" and settings.projector in FLOAT16_PROJECTORS:
        return 4 * z * y * x
    volume = 8 * z * y * x
    return 2 * volume if device == "gpu" and pair_in_texture(2 * volume) else volume


def prepared_map_bytes(box: int, settings, device: str = "cpu") -> int:
    """Resident bytes of the prepared maps of both half sets (four volumes) on ``device`` ("cpu" or "gpu")."""
    return PREPARED_VOLUMES * prepared_volume_bytes(box, settings, device)


#: Peak of preparing one volume beyond the three already resident, on a GPU, in units of its plain
#: rfft (P²·(P/2+1) complex64): CuPy's pool also keeps cuFFT's work areas and the freed blocks of each
#: axis's transform; an upper bound from tests/test_gpu.py (8.5 when the whole padded grid was
#: transformed, which needed more).
PREPARATION_PEAK_PLAIN_RFFTS_GPU = 8.0


def preparation_peak_bytes(box: int, settings, device: str = "gpu") -> int:
    """Peak bytes while the last of the four volumes is prepared: the other three and its scratch.

    ``device`` "cpu" gives NumPy's figure: the volume being made (``prepare_volume``
    transforms inside it) and the masked map (box³ float32) beside the three
    (tracemalloc, NumPy 2.4 / SciPy 1.17, within 10 %; tests/test_memory.py).
    Anything else gives the GPU's, the larger, which bounds both.
    """
    if device == "cpu":
        return int(4 * prepared_volume_bytes(box, settings) + 4 * box**3)
    # the GPU's figure counts complex64 volumes: a pair is stored in float16 only once it is prepared; one kept
    # in a texture as well counts twice
    _, oversampling = projector_kernel(settings.projector, settings.padding)
    size = grid_size(box, oversampling)
    plain_rfft = 8 * size * size * (size // 2 + 1)
    volume = max(prepared_volume_bytes(box, settings), prepared_volume_bytes(box, settings, "gpu"))
    return int(3 * volume + PREPARATION_PEAK_PLAIN_RFFTS_GPU * plain_rfft)


def texture_bytes(models) -> int:
    """Bytes of the 3D textures that half-map models keep outside CuPy's memory pool (``projector.pair_in_texture``),
    each counted once."""
    textures = {id(v.texture): v.texture for model in models for v in (model.full, model.masked)
                if v.texture is not None}
    return sum(texture.nbytes for texture in textures.values())


def compiled_gather_installed() -> bool:
    """Whether numba is installed, so NumPy slices are gathered by ``_slice_cpu`` (found, not imported)."""
    return find_spec("numba") is not None


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
    compiled = compiled_gather_installed()  # numba compiles the slice gather, the transfer and the fit alike
    per_tap = 0 if compiled else SLICE_BYTES_PER_ELEMENT_AND_WIDTH * kernel.width
    slice_bytes = (SLICE_BYTES_PER_ELEMENT + per_tap) * half_plane(sliced)
    field_bytes = (FIELD_BYTES_PER_ELEMENT if compiled else FIELD_BYTES_PER_ELEMENT_NUMPY_TRANSFER) * half_plane(field)
    box_bytes = (BOX_BYTES_PER_ELEMENT if compiled else BOX_BYTES_PER_ELEMENT_NUMPY_FIT) * half_plane(box)
    return max(slice_bytes, field_bytes) + box_bytes
