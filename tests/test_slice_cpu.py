"""The compiled CPU slice gather (numba) against its NumPy twin, which tests/test_projector.py checks
against independent references (and runs those references on the compiled gather too)."""

import mmap
import os

import numpy as np
import pytest

from dsub.physics.gridding import GriddingKernel, kaiser_bessel
from dsub.physics.projector import (
    _extract_slices_numpy,
    extract_slices,
    extract_slices_of,
    prepare_volume,
    prepare_volumes,
    projector_kernel,
    small_page_zeros,
)
from dsub.simulate import random_rotations

pytest.importorskip("numba")


@pytest.mark.parametrize("kernel, oversampling", [(GriddingKernel("trilinear", 2), 2.0),
                                                  projector_kernel("gridding"), (kaiser_bessel(3, 2.0), 2.0),
                                                  (kaiser_bessel(6, 1.5), 1.5)])
@pytest.mark.parametrize("box, size", [(64, None), (65, None), (48, 100), (32, 64)])
@pytest.mark.parametrize("corners", ["map", "zero"])
def test_compiled_gather_matches_numpy_gather(kernel, oversampling, box, size, corners):
    rng = np.random.default_rng(box)
    volume = rng.standard_normal((box,) * 3).astype(np.float32)
    prepared = prepare_volume(np, volume, kernel, oversampling)
    magnified = random_rotations(3, rng)
    magnified[:, :2] = np.einsum("ij,njk->nik", [[1.03, 0.02], [-0.01, 0.98]], magnified[:, :2])
    lattice = np.stack([np.eye(3), np.diag([-1.0, 1.0, -1.0])])  # every point on a grid point or none
    matrices = np.concatenate([random_rotations(4, rng), magnified, lattice])
    compiled = extract_slices(np, prepared, matrices, corners, size)
    reference = _extract_slices_numpy(np, prepared, matrices, corners, size or box)
    assert compiled.dtype == np.complex64 and compiled.shape == reference.shape
    assert np.array_equal(compiled == 0, reference == 0)
    np.testing.assert_allclose(compiled, reference, rtol=0, atol=1e-6 * np.abs(reference).max())


@pytest.mark.parametrize("kernel, oversampling", [(GriddingKernel("trilinear", 2), 2.0), projector_kernel("gridding"),
                                                  (kaiser_bessel(3, 2.0), 2.0)])
@pytest.mark.parametrize("corners", ["map", "zero"])
def test_maps_prepared_side_by_side_slice_as_maps_prepared_alone(kernel, oversampling, corners):
    """Two maps in one array (P, P, C, 2), gathered together, give each map's own slices to the bit."""
    box = 40
    rng = np.random.default_rng(7)
    maps = [rng.standard_normal((box,) * 3).astype(np.float32) for _ in range(2)]
    together = prepare_volumes(np, maps, kernel, oversampling)
    alone = [prepare_volume(np, volume, kernel, oversampling) for volume in maps]
    assert together[0].transform.base is together[1].transform.base  # the side-by-side layout is in use
    for shared, own in zip(together, alone):
        assert np.array_equal(shared.transform, own.transform)
    matrices = np.concatenate([random_rotations(5, rng), np.eye(3)[None]])
    sliced = extract_slices_of(np, together, matrices, corners)
    for index, own in enumerate(alone):
        reference = _extract_slices_numpy(np, own, matrices, corners, box)
        assert np.array_equal(sliced[index], extract_slices(np, own, matrices, corners))
        np.testing.assert_allclose(sliced[index], reference, rtol=0, atol=1e-6 * np.abs(reference).max())


def mapping_kilobytes(array: np.ndarray, field: str) -> int:
    """``field`` (kB: "Anonymous", "AnonHugePages") of the memory mapping that holds the middle of ``array``
    (Linux's /proc/self/smaps; NumPy's hint for huge pages splits off the first page of its allocations, which
    holds malloc's header)."""
    address, found = array.__array_interface__["data"][0] + array.nbytes // 2, None
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            start, end = (int(part, 16) for part in fields[0].split("-"))
            found = start <= address < end
        elif found and fields[0] == f"{field}:":
            return int(fields[1])
    raise AssertionError("no mapping holds the array")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux's /proc/self/smaps")
def test_maps_prepared_side_by_side_lie_on_small_pages():
    """The pair is zeros on 4 kB pages (``small_page_zeros``) where NumPy's own arrays get huge pages."""
    shape = (64, 64, 512, 2)  # 32 MiB
    ours, numpys = small_page_zeros(shape, np.complex64), np.zeros(shape, np.complex64)
    assert ours.dtype == np.complex64 and ours.shape == shape and ours.flags.c_contiguous and ours.flags.writeable
    assert not ours.any()
    volumes = prepare_volumes(np, [np.ones((16,) * 3, np.float32)] * 2, *projector_kernel("relion"))
    pair = volumes[0].transform.base
    assert volumes[1].transform.base is pair and isinstance(pair.base, mmap.mmap)
    ours[...], numpys[...] = 1, 1  # touched: the kernel backs both now
    # private to this process, as NumPy's (a shared map has none); a neighbouring private map may share its entry
    assert mapping_kilobytes(ours, "Anonymous") >= ours.nbytes // 1024
    assert mapping_kilobytes(ours, "AnonHugePages") == 0
    if mapping_kilobytes(numpys, "AnonHugePages") == 0:
        pytest.skip("this kernel gives no transparent huge pages: nothing to tell apart")
