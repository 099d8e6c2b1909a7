"""RELION / cryoSPARC conversions, checked against RELION's own matrix formula."""

import warnings

import numpy as np
from scipy.spatial.transform import Rotation

from dsub.conventions import (
    cryosparc_pose_to_matrix,
    cryosparc_shift_to_origin_angstrom,
    half_set_to_split,
    matrix_to_cryosparc_pose,
    matrix_to_relion_euler,
    origin_angstrom_to_cryosparc_shift,
    relion_euler_to_matrix,
    split_to_half_set,
)
from dsub.simulate import random_rotations


def relion_matrix(rot, tilt, psi):
    """RELION's ``Euler_angles2matrix`` (euler.cpp), written out element by element."""
    a, b, g = np.deg2rad([rot, tilt, psi])
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    return np.array([
        [cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
        [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
        [sb * ca, sb * sa, cb],
    ])


def test_euler_matches_relion_formula():  # conventions!
    rng = np.random.default_rng(0)
    angles = rng.uniform([-180, 0, -180], [180, 180, 180], size=(50, 3))
    A = relion_euler_to_matrix(*angles.T)
    expected = np.stack([relion_matrix(*a) for a in angles])
    np.testing.assert_allclose(A, expected, atol=1e-12)


def test_euler_matrices_equal_scipys_zyz_rotations_transposed():
    """An independent construction: SciPy's intrinsic ZYZ rotation, transposed (formats.md, 3.1)."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(4)
    angles = np.vstack([rng.uniform([-180, 0, -180], [180, 180, 180], size=(2000, 3)),
                        [[10.0, 0.0, 20.0], [-30.0, 180.0, 45.0], [0.0, 90.0, 0.0]]])  # gimbal-lock poses too
    expected = Rotation.from_euler("ZYZ", angles, degrees=True).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(relion_euler_to_matrix(*angles.T), expected, atol=1e-14)


def test_euler_round_trip_as_matrices():
    A = random_rotations(200, np.random.default_rng(1))
    np.testing.assert_allclose(relion_euler_to_matrix(*matrix_to_relion_euler(A)), A, atol=1e-12)
    _, tilt, _ = matrix_to_relion_euler(A)
    assert ((tilt >= 0) & (tilt <= 180)).all()


def test_scalar_angles_and_gimbal_lock_are_quiet():
    A = relion_euler_to_matrix(30.0, 0.0, 20.0)
    assert A.shape == (1, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = relion_euler_to_matrix(*matrix_to_relion_euler(A))
    np.testing.assert_allclose(back, A, atol=1e-12)


def test_cryosparc_pose_is_transposed_rodrigues():  # conventions!
    pose = np.array([[-1.0133039, -2.72435, -1.9319392]])  # |v| > pi, from P12_J24
    assert np.linalg.norm(pose) > np.pi
    A = cryosparc_pose_to_matrix(pose)
    np.testing.assert_allclose(A[0], Rotation.from_rotvec(pose[0]).as_matrix().T, atol=1e-15)
    again = matrix_to_cryosparc_pose(A)
    assert np.linalg.norm(again) <= np.pi + 1e-12
    np.testing.assert_allclose(cryosparc_pose_to_matrix(again), A, atol=1e-12)
    rot, tilt, psi = matrix_to_relion_euler(A)
    np.testing.assert_allclose([rot[0], tilt[0], psi[0]], [51.9525, 110.2111, 92.7572], atol=1e-4)


def test_shift_and_split_helpers():
    shift = np.array([[11.334375, -1.828125], [1.265625, -4.640625]])
    origin = cryosparc_shift_to_origin_angstrom(shift, np.array([2.95, 2.95]))
    np.testing.assert_allclose(origin, [[33.4364, -5.3930], [3.7336, -13.6898]], atol=1e-4)
    np.testing.assert_allclose(origin_angstrom_to_cryosparc_shift(origin, 2.95), shift)
    np.testing.assert_array_equal(split_to_half_set(np.array([1, 0, 0])), [2, 1, 1])
    np.testing.assert_array_equal(half_set_to_split(np.array([2, 1, 0])), [1, 0, 0])
    assert half_set_to_split(np.array([2])).dtype == np.dtype("<u4")
