"""Optics groups through a whole run: one stack per pixel size with that size in its header,
and --scale none keeping the input's alpha."""

from __future__ import annotations

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import zarr

from dsub.cli import main
from dsub.demo import PIXEL_SIZE, make_dataset
from dsub.formats import cs as cs_format
from dsub.formats import star as star_format

COUNT, BOX = 20, 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    paths, sim = make_dataset(tmp_path_factory.mktemp("data"), count=COUNT, box=BOX, snr=None)
    return paths, sim


def run(paths, particles, outdir, *extra):
    return main(["subtract", str(particles), "--half-a", str(paths["half_a"]), "--half-b", str(paths["half_b"]),
                 "--mask", str(paths["mask"]), "-o", str(outdir), "--chunk-size", "8", "--padding", "2",
                 "--particles-per-stack", "8", "--quiet", *extra])


def test_two_pixel_sizes_get_one_stack_each_with_its_own_header(dataset, tmp_path):
    paths, _ = dataset
    blocks = starfile.read(paths["star"], always_dict=True)
    optics = blocks["optics"]
    second = optics.copy()
    second["rlnOpticsGroup"], second["rlnImagePixelSize"] = 2, 1.54
    blocks["optics"] = pd.concat([optics, second], ignore_index=True)
    group = np.where(np.arange(COUNT) % 3 == 1, 2, 1)  # interleaved, as merged data sets are
    blocks["particles"]["rlnOpticsGroup"] = group
    star = paths["star"].with_name("two_groups.star")
    starfile.write(blocks, star)
    outdir = tmp_path / "out"
    assert run(paths, star, outdir, "--keep-store") == 0  # the store's images, to compare the stacks with

    expected = np.where(group == 2, 1.54, PIXEL_SIZE)
    table = star_format.read_particles(outdir / "particles_subtracted.star")
    np.testing.assert_allclose(table.pixel_size_angstrom, expected)
    stored = np.asarray(zarr.open_group(str(outdir / "subtracted.zarr"), mode="r")["images"][:])
    for row in range(COUNT):  # each particle in a stack of its own pixel size, at its input row's image
        with mrcfile.open(table.image_paths[row], permissive=True) as mrc:
            assert float(mrc.voxel_size.x) == pytest.approx(expected[row], abs=1e-4)
            np.testing.assert_array_equal(mrc.data[table.image_indices[row]], stored[row])
    stacks = {path: np.unique(expected[table.image_paths == path]) for path in np.unique(table.image_paths)}
    assert all(sizes.size == 1 for sizes in stacks.values())
    assert len(stacks) == 2 + 1  # 13 particles at 1.5 Å in stacks of up to 8, and 7 at 1.54 Å
    written = np.load(outdir / "particles_subtracted.cs")
    np.testing.assert_allclose(written["blob/psize_A"], expected, rtol=1e-6)


def test_scale_none_keeps_the_input_alpha(dataset, tmp_path):
    paths, sim = dataset
    table = star_format.read_particles(paths["star"])
    cs_path = paths["star"].with_name("J3_particles.cs")
    alpha = np.linspace(0.6, 1.4, COUNT)
    cs_format.write_particles(table, cs_path, [paths["stack"].name] * COUNT, table.image_indices, contrast=alpha)
    outdir = tmp_path / "out"
    assert run(paths, cs_path, outdir, "--scale", "none") == 0
    written = np.load(outdir / "particles_subtracted.cs")
    np.testing.assert_allclose(written["alignments3D/alpha"], alpha, rtol=1e-6)
    stored = zarr.open_group(str(outdir / "subtracted.zarr"), mode="r")
    np.testing.assert_array_equal(np.asarray(stored["contrast"][:]), 1.0)  # what it was subtracted with


def pad_maps(paths, folder, size, shift=(0, 0, 0)):
    """The dataset's maps zero-padded to ``size`` voxels (same voxel size), the mask moved by ``shift``."""
    from dsub.formats.mrc import read_map, write_map

    padded = {}
    for key in ("half_a", "half_b", "mask"):
        volume, voxel = read_map(paths[key])
        out = np.zeros((size,) * 3, dtype=np.float32)
        start = size // 2 - volume.shape[0] // 2
        out[start:start + volume.shape[0], start:start + volume.shape[0], start:start + volume.shape[0]] = volume
        if key == "mask":
            out = np.roll(out, shift, axis=(0, 1, 2))
        padded[key] = folder / f"{key}_{size}.mrc"
        write_map(padded[key], out, voxel)
    return padded


def test_maps_of_a_larger_box_are_brought_to_the_particles_box(dataset, tmp_path, capsys):
    from dsub.demo import residual_of_masked_region

    paths, sim = dataset
    assert run(paths, paths["star"], tmp_path / "same") == 0
    same = residual_of_masked_region(tmp_path / "same", sim)
    padded = pad_maps(paths, tmp_path, BOX + 10)
    assert run({**paths, **padded}, paths["star"], tmp_path / "padded") == 0
    reboxed = residual_of_masked_region(tmp_path / "padded", sim)
    print(f"masked signal left: maps at the box {same:.4f}, maps at box {BOX + 10} {reboxed:.4f}")
    assert reboxed < 1.2 * same + 0.005


def test_a_mask_beyond_the_particles_box_is_refused(dataset, tmp_path, capsys):
    paths, _ = dataset
    padded = pad_maps(paths, tmp_path, BOX + 16, shift=(0, 0, 14))
    assert run({**paths, **padded}, paths["star"], tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "dsub: error:" in err and str(padded["mask"]) in err and "outside the 32-voxel cube" in err
