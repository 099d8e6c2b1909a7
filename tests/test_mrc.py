"""MRC maps and stacks: written files are valid, every stack mode reads as float32."""

import os
import sys

import mrcfile
import numpy as np
import pytest

from dsub.errors import InputFileError, MissingInputError
from dsub.formats.mrc import read_images, read_map, stack_layout, write_map, write_stack


def test_write_stack_is_a_valid_stack(tmp_path, capsys):
    path = tmp_path / "stack.mrcs"
    data = np.random.default_rng(0).normal(size=(3, 16, 16)).astype(np.float32)
    with write_stack(path, data.shape, 1.31) as mrc:
        mrc.data[:] = data
        mrc.update_header_stats()
    with mrcfile.open(path) as mrc:
        assert mrc.header.mode == 2 and mrc.is_image_stack()
        assert mrc.voxel_size.x == pytest.approx(1.31) and mrc.voxel_size.z == pytest.approx(1.31)
        np.testing.assert_array_equal(mrc.data, data)
    assert mrcfile.validate(str(path))
    np.testing.assert_array_equal(read_images([path] * 2, [2, 0]), data[[2, 0]])


def test_write_stack_from_data_float16(tmp_path):
    path = tmp_path / "half.mrcs"
    data = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8) / 10
    write_stack(path, data, 2.0, mrc_mode=12).close()
    with mrcfile.open(path) as mrc:
        assert mrc.header.mode == 12 and mrc.voxel_size.x == pytest.approx(2.0)


@pytest.mark.parametrize("dtype, mode", [(np.float16, 12), (np.int16, 1), (np.int8, 0)])
def test_other_modes_read_as_float32(tmp_path, dtype, mode):
    path = tmp_path / f"mode{mode}.mrcs"
    data = (np.arange(4 * 6 * 6).reshape(4, 6, 6) % 100 - 50).astype(dtype)
    with mrcfile.new(path, data=data) as mrc:
        mrc.set_image_stack()
        assert mrc.header.mode == mode
    images = read_images(np.array([str(path)] * 4, dtype=object), [3, 1, 1, 2])  # runs 1-2-3 and 1
    assert images.dtype == np.float32
    np.testing.assert_array_equal(images, data[[3, 1, 1, 2]].astype(np.float32))


def test_single_image_file_is_a_stack_of_one(tmp_path):
    path = tmp_path / "one.mrc"
    mrcfile.write(path, np.ones((5, 5), dtype=np.float32))
    assert stack_layout(path).shape == (1, 5, 5)


def test_mixed_stacks_keep_particle_order(tmp_path):
    a, b = tmp_path / "a.mrcs", tmp_path / "b.mrcs"
    write_stack(a, np.zeros((2, 4, 4), np.float32), 1.0).close()
    write_stack(b, np.ones((3, 4, 4), np.float32) * np.arange(3)[:, None, None], 1.0).close()
    images = read_images([str(b), str(a), str(b)], [2, 1, 0])
    np.testing.assert_array_equal(images[:, 0, 0], [2, 0, 0])


def test_index_beyond_stack_and_missing_file(tmp_path):
    path = tmp_path / "short.mrcs"
    write_stack(path, np.zeros((2, 4, 4), np.float32), 1.0).close()
    with pytest.raises(InputFileError, match=r"short.mrcs: image index 3 \(1-based\) is beyond the stack's 2"):
        read_images([path], [2])
    with pytest.raises(MissingInputError, match="gone.mrcs"):
        read_images([tmp_path / "gone.mrcs"], [0])


def test_rewritten_stack_is_reopened(tmp_path):
    path = tmp_path / "s.mrcs"
    write_stack(path, np.zeros((1, 4, 4), np.float32), 1.0).close()
    assert read_images([path], [0]).max() == 0
    write_stack(path, np.ones((2, 4, 4), np.float32), 1.0).close()
    os.utime(path, ns=(0, 10**18))  # a different mtime even on coarse clocks
    assert read_images([path], [1]).max() == 1


def test_map_round_trip_and_errors(tmp_path):
    volume = np.random.default_rng(1).normal(size=(8, 8, 8)).astype(np.float32)
    write_map(tmp_path / "map.mrc", volume, 1.05)
    data, voxel = read_map(tmp_path / "map.mrc")
    np.testing.assert_array_equal(data, volume)
    assert voxel == pytest.approx(1.05)
    assert mrcfile.validate(str(tmp_path / "map.mrc"))
    write_map(tmp_path / "nosize.mrc", volume, 0.0)
    assert read_map(tmp_path / "nosize.mrc")[1] == 0.0
    write_map(tmp_path / "flat.mrc", volume[:4], 1.0)
    with pytest.raises(InputFileError, match="flat.mrc.*not a cubic 3D map"):
        read_map(tmp_path / "flat.mrc")
    (tmp_path / "text.mrc").write_text("not a map at all " * 100)
    with pytest.raises(InputFileError, match="text.mrc.*not a readable MRC file"):
        read_map(tmp_path / "text.mrc")
    with pytest.raises(MissingInputError, match="absent.mrc"):
        read_map(tmp_path / "absent.mrc")


def test_not_an_mrc_stack(tmp_path):
    path = tmp_path / "text.mrcs"
    path.write_text("not a stack " * 200)
    with pytest.raises(InputFileError, match="text.mrcs.*not a readable MRC image stack"):
        stack_layout(path)


def test_real_map_reads(shared_data):
    data, voxel = read_map(shared_data / "emd3488/emd_3488.mrc")
    assert data.shape == (100, 100, 100) and data.dtype == np.float32
    assert voxel == pytest.approx(1.05, abs=1e-3)


@pytest.mark.skipif(sys.platform != "linux", reason="/proc's address-space figures")
def test_reading_a_few_images_from_many_stacks_maps_none_of_them(tmp_path):
    """What a process maps counts against ``ulimit -v`` in full: the QC report's sample (a few images spread over
    every output stack) once had every stack mapped whole. The images are read, not mapped."""
    import psutil

    paths = []
    for k in range(24):  # 24 stacks of 16 MB
        path = tmp_path / f"s{k}.mrcs"
        with write_stack(path, (256, 128, 128), 1.0) as mrc:
            mrc.data[5] = k
        paths.append(str(path))
    before = psutil.Process().memory_info().vms
    images = read_images(np.array(paths, dtype=object), np.full(len(paths), 5))
    grew = psutil.Process().memory_info().vms - before
    np.testing.assert_array_equal(images[:, 0, 0], np.arange(24))
    assert grew < 64 * 2**20, grew  # mapped whole, the stacks would take 384 MiB
    assert stack_layout(paths[0]).shape == (256, 128, 128) and stack_layout(paths[0]).offset == 1024
