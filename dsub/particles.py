"""The particle table: everything dsub needs to know about each particle.

Both readers (RELION ``.star`` and cryoSPARC ``.cs``) produce this one table in
RELION's geometry, so the physics never sees a format. The raw metadata the
table came from is kept alongside, so the writers can pass every input column
or field through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Half sets as stored in ``ParticleTable.half_set``: RELION's ``rlnRandomSubset``.
HALF_A = 1
HALF_B = 2
HALF_UNKNOWN = 0


def same_for_all(row, count: int) -> np.ndarray:
    """``row`` (a scalar or an array) repeated ``count`` times as a read-only view: shape (count, *row.shape).

    Ten million particles of one optics group share their voltage, pixel size or
    magnification matrix; such a column costs one row of memory. Indexing it
    (``ParticleTable.subset``) gives an ordinary array.
    """
    row = np.asarray(row, dtype=np.float64)
    return np.broadcast_to(row, (count, *row.shape))


def is_same_for_all(values: np.ndarray) -> bool:
    """Whether ``values`` is a ``same_for_all`` view (its rows share their memory)."""
    return values.ndim > 0 and values.shape[0] > 1 and values.strides[0] == 0


def shared_if_constant(values: np.ndarray) -> np.ndarray:
    """``values`` (n, ...) as a ``same_for_all`` view when every row equals the first (NaN never does)."""
    values = np.asarray(values)
    if values.shape[0] > 1 and not is_same_for_all(values) and (values == values[:1]).all():
        return np.broadcast_to(values[0], values.shape)
    return values


@dataclass
class ParticleTable:
    """Per-particle arrays, all of length ``n``, in RELION conventions.

    Geometry: a map point ``c`` (voxels from the map centre ``N//2``, ordered
    x, y, z) lands at image position ``(rotations[i] @ c)[:2] - origin_px``
    where ``origin_px = origins_angstrom[i] / pixel_size_angstrom[i]``.
    """

    rotations: np.ndarray  # (n, 3, 3) float64: RELION's A, map frame -> image frame
    origins_angstrom: np.ndarray  # (n, 2) float64: rlnOriginX/YAngst
    defocus_u_angstrom: np.ndarray  # (n,)
    defocus_v_angstrom: np.ndarray  # (n,)
    defocus_angle_degrees: np.ndarray  # (n,)
    phase_shift_degrees: np.ndarray  # (n,)
    voltage_kv: np.ndarray  # (n,)
    spherical_aberration_mm: np.ndarray  # (n,)
    amplitude_contrast: np.ndarray  # (n,)
    ctf_bfactor: np.ndarray  # (n,) Å², envelope exp(-B s²/4)
    ctf_premultiplied: np.ndarray  # (n,) bool: images already multiplied by their CTF
    half_set: np.ndarray  # (n,) int8: HALF_A, HALF_B or HALF_UNKNOWN
    image_paths: np.ndarray  # (n,) object: resolved path of each particle's stack
    image_indices: np.ndarray  # (n,) int64: 0-based index within that stack
    pixel_size_angstrom: np.ndarray  # (n,)
    box_size: np.ndarray  # (n,) int64
    optics_group: np.ndarray  # (n,) int64, 1-based
    input_contrast: np.ndarray | None = None  # (n,) contrast scale from the input, if any
    # Optics beyond the plain CTF (see ``dsub.physics.optics``); None means "none given" and
    # becomes the neutral value in ``__post_init__``.
    ctf_scale: np.ndarray | None = None  # (n,) rlnCtfScalefactor / ctf/scale: multiplies the CTF
    beam_tilt_mrad: np.ndarray | None = None  # (n, 2) rlnBeamTiltX/Y
    odd_zernike: np.ndarray | None = None  # (n, k) rlnOddZernike, rad, RELION's order
    even_zernike: np.ndarray | None = None  # (n, k) rlnEvenZernike, rad, RELION's order
    mag_matrix: np.ndarray | None = None  # (n, 2, 2) rlnMagMat00..11 (identity: none)
    source_format: str = ""  # "star" or "cs"
    source_path: Path | None = None
    source: Any = None  # raw metadata: {"optics": DataFrame, "particles": DataFrame} or a structured array
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        # The neutral values are read-only views of one row (``same_for_all``): no memory per particle.
        n = len(self)
        if self.ctf_scale is None:
            self.ctf_scale = same_for_all(1.0, n)
        if self.beam_tilt_mrad is None:
            self.beam_tilt_mrad = same_for_all(np.zeros(2), n)
        if self.odd_zernike is None:
            self.odd_zernike = np.zeros((n, 0))
        if self.even_zernike is None:
            self.even_zernike = np.zeros((n, 0))
        if self.mag_matrix is None:
            self.mag_matrix = same_for_all(np.eye(2), n)

    def __len__(self) -> int:
        return int(self.rotations.shape[0])

    @property
    def origins_pixels(self) -> np.ndarray:
        """Origins in pixels of each particle's own images, shape (n, 2)."""
        return self.origins_angstrom / self.pixel_size_angstrom[:, None]

    def image_path_codes(self) -> tuple[np.ndarray, list]:
        """``formats.paths.path_codes`` of ``image_paths``: (codes int32 (n,), read-only; the distinct paths).

        Computed once per table and kept: hashing the paths takes about 0.09 s
        per million rows, and the checks, the run's identity, the tasks' table
        and the QC report all need them. Computed again when ``image_paths`` is
        another array than the one they were computed from (changing its values
        in place is not seen: nothing does). A ``subset`` computes its own.
        """
        from .formats.paths import path_codes  # formats imports this module

        cached = self.__dict__.get("_image_path_codes")
        if cached is None or cached[0] is not self.image_paths:
            codes, uniques = path_codes(self.image_paths)
            codes.flags.writeable = False
            cached = (self.image_paths, codes, uniques)
            self.__dict__["_image_path_codes"] = cached
        return cached[1], list(cached[2])

    def subset(self, index) -> "ParticleTable":
        """Rows ``index`` of every per-particle array (metadata source kept whole)."""
        values = {}
        for name, value in self.__dict__.items():
            if name.startswith("_"):  # what ``image_path_codes`` keeps: the subset's differ
                continue
            if isinstance(value, np.ndarray) and value.shape[:1] == (len(self),):
                values[name] = value[index]
            else:
                values[name] = value
        return ParticleTable(**values)
