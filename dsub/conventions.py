"""RELION <-> cryoSPARC conventions, written once.

dsub works in RELION's geometry (see ``ParticleTable``). Every conversion from
or to cryoSPARC's conventions happens through the functions here, so a sign or
transpose lives in exactly one place.

Rotations
---------
RELION's matrix ``A`` (``euler.cpp: Euler_angles2matrix``) maps map
coordinates to image coordinates, ``r_img = A @ r_map``::

    A = Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True).as_matrix().T

cryoSPARC's ``alignments3D/pose`` is an axis-angle (Rodrigues) vector in
radians whose standard matrix ``R_cs`` maps image to map, so ``A = R_cs.T``.
Its length may exceed pi; a round trip returns an equivalent vector of length
<= pi, so compare matrices, never vectors.

Shifts and half sets
--------------------
``alignments3D/shift`` is in pixels at ``alignments3D/psize_A`` with the same
sign as RELION's origin: ``rlnOriginXAngst = shift_x * psize``.
``alignments3D/split`` 0/1 is ``rlnRandomSubset`` 1/2 (half A / half B).

Optics (RELION 3.1+; dsub.physics.optics implements them)
--------------------------------------------------------
* Frequencies ``s = k / (box · pixel size)`` in 1/Å, mapped by the optics group's
  ``rlnMagMat00..11`` as ``s' = M s`` before the CTF and the aberrations see them
  (``ctf.h: CTF::getCTF``; ``obs_model.cpp: getPhaseCorrection, getGammaOffset``).
* Projection: RELION projects with ``applyScaleDifference(applyAnisoMag(A))`` =
  ``M⁻¹ A · (B p) / (S a)`` and its projector reads the map at ``A⁻¹ (x, y, 0)``
  (``projector.cpp``), i.e. at ``Aᵀ M s · S a / (B p)``: each particle is sampled
  at its own pixel size ``p`` and box ``B`` from a map of voxel ``a``, box ``S``.
* Amplitude: RELION normalises the map's transform by ``(pad·S)³`` and multiplies it
  by ``normfft = pad³·S`` (``Projector::computeFourierTransformMap``), the images' by
  ``B²``: a map of box ``S`` predicts ``(B/S)²`` times the line sum through its voxels
  in an image of box ``B`` (``physics.optics.fit_map_to_box``).
* ``rlnOddZernike`` / ``rlnEvenZernike``: coefficients (radians) of RELION's
  unnormalised Zernike polynomials ``Z(m, n)`` at ``s'`` (``Zernike.cpp``), index
  ``i`` -> (m, n) by ``oddIndexToMN`` / ``evenIndexToMN`` (odd: (-1,1) (1,1) (-3,3)
  (-1,3) (1,3) (3,3)...; even: (0,0) (-2,2) (0,2) (2,2) (-4,4)...). The odd phase
  multiplies the CTF-modulated projection by ``exp(+i φ)`` (``demodulatePhase(...,
  true)`` in ``particle_subtractor.cpp``); the even phase is added to RELION's
  ``gamma`` (CTF = ``-sin(gamma)``).
* ``rlnBeamTiltX/Y`` (mrad) are added to the odd coefficients by
  ``TiltHelper::insertTilt``: ``Z3 = -π Cs[mm] λ² 2e4 tilt / 3``, twice into the
  linear terms (index 1: x, 0: y) and once into coma (4: x, 3: y).
* ``rlnCtfScalefactor`` multiplies the CTF (``getCTF``: ``retval *= scale``); a
  CTF-premultiplied image gets ``(scale · CTF)²`` (``particle_subtractor.cpp``
  squares ``Fctf``). A missing ``rlnAmplitudeContrast`` is 0 (``CTF::readByGroup``:
  ``readValue(EMDL_CTF_Q0, Q0, 0, ...)``), a missing scale factor 1.
* cryoSPARC: ``ctf/scale`` multiplies the CTF as ``rlnCtfScalefactor`` does;
  ``alignments3D/alpha`` is a further per-particle contrast. ``ctf/tilt_A`` (Å) is
  the beam tilt times Cs: ``rlnBeamTiltX = asin(tilt_A[0] / (cs_mm · 1e7)) · 1e3``
  (pyem ``metadata/cryosparc2.py: cryosparc_2_cs_ctf_parameters``), and likewise Y.
  ``ctf/anisomag`` (4 values, pyem's order 00, 01, 10, 11): pyem copies them into
  ``rlnMagMat``; cryoSPARC writes 0 0 0 0 where it estimated none, so dsub reads
  ``M = I + anisomag`` (an inference: no public source states it).
  ``ctf/trefoil_A``, ``ctf/tetra_A`` and ``ctf/shift_A`` have no public
  conversion (pyem leaves them out); dsub warns when they are not zero.
"""

from __future__ import annotations

import warnings

import numpy as np

from dsub.particles import HALF_UNKNOWN


def _rotation_class():
    """SciPy's ``Rotation``, imported where it is used: the workers, which only read the
    closed-form matrices, need not load ``scipy.spatial`` (0.3 s of every worker's start)."""
    from scipy.spatial.transform import Rotation

    return Rotation


def _matrices(A: np.ndarray) -> np.ndarray:
    """``A`` as an (n, 3, 3) float64 array (a single 3x3 matrix becomes n=1)."""
    A = np.asarray(A, dtype=np.float64)
    return A.reshape(-1, 3, 3)


def _as_euler_zyz(rotation) -> np.ndarray:
    """ZYZ Euler angles in degrees, (n, 3), without scipy's gimbal-lock warning.

    At tilt 0 or 180 only rot+psi (or rot-psi) is defined; scipy then sets the
    third angle to zero and warns. The matrix is reproduced exactly either way,
    so the warning carries no information for dsub.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Gg]imbal lock.*")
        return np.atleast_2d(rotation.as_euler("ZYZ", degrees=True))


def relion_euler_to_matrix(rot, tilt, psi) -> np.ndarray:
    """RELION Euler angles (degrees, ZYZ) -> matrices ``A``, shape (n, 3, 3) float64.

    RELION's own closed form (``euler.cpp: Euler_angles2matrix``, α = rot, β = tilt,
    γ = psi), equal to ``Rotation.from_euler("ZYZ", ..., degrees=True).as_matrix().T``
    (tests/test_conventions.py); about 40× faster than SciPy's general path, which
    took 12 s for a 10 M-row star.
    """
    alpha, beta, gamma = (np.radians(np.atleast_1d(np.asarray(a, dtype=np.float64))) for a in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = np.cos(alpha), np.sin(alpha), np.cos(beta), np.sin(beta), np.cos(gamma), np.sin(gamma)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    A = np.empty(alpha.shape + (3, 3))
    A[:, 0, 0] = cg * cc - sg * sa
    A[:, 0, 1] = cg * cs + sg * ca
    A[:, 0, 2] = -cg * sb
    A[:, 1, 0] = -sg * cc - cg * sa
    A[:, 1, 1] = -sg * cs + cg * ca
    A[:, 1, 2] = sg * sb
    A[:, 2, 0] = sc
    A[:, 2, 1] = ss
    A[:, 2, 2] = cb
    return A


def matrix_to_relion_euler(A: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Matrices ``A`` (n, 3, 3) -> RELION (rot, tilt, psi) in degrees, tilt in [0, 180]."""
    angles = _as_euler_zyz(_rotation_class().from_matrix(_matrices(A).transpose(0, 2, 1)))
    return angles[:, 0], angles[:, 1], angles[:, 2]


def cryosparc_pose_to_matrix(pose: np.ndarray) -> np.ndarray:
    """cryoSPARC ``alignments3D/pose`` (n, 3) axis-angle radians -> ``A`` (n, 3, 3)."""
    pose = np.asarray(pose, dtype=np.float64).reshape(-1, 3)
    return _rotation_class().from_rotvec(pose).as_matrix().transpose(0, 2, 1)


def matrix_to_cryosparc_pose(A: np.ndarray) -> np.ndarray:
    """Matrices ``A`` (n, 3, 3) -> cryoSPARC axis-angle vectors (n, 3), length <= pi."""
    return _rotation_class().from_matrix(_matrices(A).transpose(0, 2, 1)).as_rotvec().reshape(-1, 3)


def cryosparc_shift_to_origin_angstrom(shift_px: np.ndarray, psize_angstrom) -> np.ndarray:
    """``alignments3D/shift`` (n, 2) pixels at ``psize`` -> RELION origin in Å (same sign)."""
    shift = np.asarray(shift_px, dtype=np.float64).reshape(-1, 2)
    psize = np.asarray(psize_angstrom, dtype=np.float64)
    return shift * (psize[:, None] if psize.ndim else psize)


def origin_angstrom_to_cryosparc_shift(origin_angstrom: np.ndarray, psize_angstrom) -> np.ndarray:
    """RELION origin in Å (n, 2) -> ``alignments3D/shift`` in pixels at ``psize``."""
    origin = np.asarray(origin_angstrom, dtype=np.float64).reshape(-1, 2)
    psize = np.asarray(psize_angstrom, dtype=np.float64)
    return origin / (psize[:, None] if psize.ndim else psize)


def cryosparc_tilt_to_beam_tilt_mrad(tilt_A, cs_mm) -> np.ndarray:
    """``ctf/tilt_A`` (n, 2) and ``ctf/cs_mm`` (n,) -> ``rlnBeamTiltX/Y`` in mrad (pyem's formula)."""
    tilt = np.asarray(tilt_A, dtype=np.float64).reshape(-1, 2)
    cs_angstrom = np.asarray(cs_mm, dtype=np.float64).reshape(-1, 1) * 1e7
    return np.arcsin(tilt / cs_angstrom) * 1e3


def beam_tilt_mrad_to_cryosparc_tilt(beam_tilt_mrad, cs_mm) -> np.ndarray:
    """Inverse of ``cryosparc_tilt_to_beam_tilt_mrad``: (n, 2) Å."""
    tilt = np.asarray(beam_tilt_mrad, dtype=np.float64).reshape(-1, 2)
    return np.sin(tilt * 1e-3) * np.asarray(cs_mm, dtype=np.float64).reshape(-1, 1) * 1e7


def cryosparc_anisomag_to_mag_matrix(anisomag) -> np.ndarray:
    """``ctf/anisomag`` (n, 4) -> RELION magnification matrices (n, 2, 2): identity + values."""
    values = np.asarray(anisomag, dtype=np.float64).reshape(-1, 2, 2)
    return values + np.eye(2)


def mag_matrix_to_cryosparc_anisomag(mag_matrix) -> np.ndarray:
    """Inverse of ``cryosparc_anisomag_to_mag_matrix``: (n, 4)."""
    return (np.asarray(mag_matrix, dtype=np.float64).reshape(-1, 2, 2) - np.eye(2)).reshape(-1, 4)


def split_to_half_set(split: np.ndarray) -> np.ndarray:
    """cryoSPARC ``alignments3D/split`` 0/1 -> half set 1/2 (``rlnRandomSubset``), int8."""
    split = np.asarray(split)
    half = np.full(split.shape, HALF_UNKNOWN, dtype=np.int8)
    half[split == 0] = 1
    half[split == 1] = 2
    return half


def half_set_to_split(half_set: np.ndarray) -> np.ndarray:
    """Half set 1/2 -> cryoSPARC ``alignments3D/split`` 0/1 (``<u4``); unknown -> 0."""
    half_set = np.asarray(half_set)
    return np.where(half_set == 2, 1, 0).astype("<u4")


def relion_round(values) -> np.ndarray:
    """RELION's ``ROUND`` (``src/macros.h``): to the nearest integer, halves away from zero.

    ``relion_particle_subtract`` re-centres a particle by translating its image
    by ``ROUND(o - A c)`` whole pixels and keeps the rest in the origin; NumPy's
    ``round`` (halves to even) would differ at exact halves. Returns float64.
    """
    values = np.asarray(values, dtype=np.float64)
    return np.sign(values) * np.floor(np.abs(values) + 0.5)
