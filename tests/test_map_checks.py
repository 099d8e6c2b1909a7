"""Map options and checks: --lowpass, --resolution (mask edge), the region line, and maps that are refused or warned about."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import starfile

from dsub.cli import main
from dsub.demo import make_dataset
from dsub.formats import read_particles
from dsub.formats.mrc import read_images, read_map, write_map
from dsub.physics.lowpass import lowpass_map
from dsub.workflow import region, validate

BOX = 32
COUNT = 24


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("maps_data")
    return make_dataset(folder, count=COUNT, box=BOX, snr=None)


def run(paths, outdir, *extra, **replace) -> int:
    files = {**paths, **replace}
    return main([
        "subtract", str(files["star"]), "--half-a", str(files["half_a"]), "--half-b", str(files["half_b"]),
        "--mask", str(files["mask"]), "-o", str(outdir), "--chunk-size", "8", "--quiet", *map(str, extra),
    ])


def sphere(box: int, radius: float, edge: float) -> np.ndarray:
    """A centred sphere of ``radius`` px with a raised-cosine edge ``edge`` px wide outside it (0 = hard)."""
    grid = np.arange(box) - box // 2
    z, y, x = np.meshgrid(grid, grid, grid, indexing="ij")
    distance = np.sqrt(x**2 + y**2 + z**2)
    if edge == 0:
        return (distance <= radius).astype(np.float32)
    ramp = np.clip((distance - radius) / edge, 0, 1)
    return (0.5 + 0.5 * np.cos(np.pi * ramp)).astype(np.float32)


# ----------------------------------------------------------------------------- --lowpass


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_lowpass_keeps_passes_and_halves_plane_waves(axis):
    """cos(2πkx/N): kept below the edge, removed above it, halved at its middle (raised cosine, 2 shells)."""
    n, voxel = 32, 1.5
    resolution = n * voxel / 8  # the edge spans shells 7 to 9
    coordinate = np.arange(n).reshape([-1 if a == axis else 1 for a in range(3)])
    for shell, gain in ((5, 1.0), (7, 1.0), (8, 0.5), (9, 0.0), (12, 0.0)):
        wave = np.broadcast_to(np.cos(2 * np.pi * shell * coordinate / n), (n, n, n)).astype(np.float32)
        filtered = lowpass_map(np, wave, voxel, resolution)
        np.testing.assert_allclose(filtered, gain * wave, atol=1e-5, err_msg=f"shell {shell}")


def test_lowpass_leaves_only_the_high_frequencies_of_the_masked_signal(dataset, tmp_path):
    """Subtracting with low-passed maps removes the masked signal below the cut-off and leaves it above."""
    paths, sim = dataset
    resolution = 8.0  # Å; the pixel is 1.5 Å, so the edge spans about 1/8.4 to 1/7.6 Å⁻¹
    assert run(paths, tmp_path / "o", "--lowpass", resolution) == 0
    table = read_particles(tmp_path / "o/particles_subtracted.star")
    left = read_images(table.image_paths, table.image_indices) - (sim.images - sim.subtracted_signal)
    frequency = np.hypot(*np.meshgrid(np.fft.fftfreq(BOX), np.fft.rfftfreq(BOX), indexing="ij")) / sim.pixel_size
    left_power = np.abs(np.fft.rfft2(left)) ** 2
    signal_power = np.abs(np.fft.rfft2(sim.subtracted_signal)) ** 2
    below = (frequency > 0) & (frequency < 0.8 / resolution)
    above = frequency > 1.25 / resolution
    assert left_power[:, below].sum() / signal_power[:, below].sum() < 0.01
    # Above the cut-off most of it is left. Not all: the particles were extracted from a larger field, so the
    # box edge cuts the CTF-spread signal, which spreads low-resolution signal above the cut-off, and the
    # model (extracted the same way) removes that part too.
    assert left_power[:, above].sum() / signal_power[:, above].sum() > 0.5


def test_lowpass_beyond_nyquist_is_refused(dataset, tmp_path, capsys):
    paths, _ = dataset
    assert run(paths, tmp_path / "o", "--lowpass", 2.5) == 2  # Nyquist is 3 Å at 1.5 Å per voxel
    err = capsys.readouterr().err
    assert err.startswith("dsub: error: --lowpass 2.5 Å") and "Nyquist" in err
    assert run(paths, tmp_path / "o", "--lowpass", -4) == 2
    assert not (tmp_path / "o/particles_subtracted.star").exists()


def test_lowpass_at_nyquist_of_a_voxel_size_read_as_float32_is_refused():
    """An MRC header holds 1.05 Å as 1.0499999523: --lowpass 2.1 is Nyquist, not beyond it."""
    from dsub.errors import OptionError
    from dsub.workflow.validate import check_lowpass

    with pytest.raises(OptionError, match="at or beyond the maps' Nyquist"):
        check_lowpass(2.1, np.float32(1.05))
    check_lowpass(2.11, np.float32(1.05))  # just coarser: accepted


# ----------------------------------------------------------------------------- the mask's soft edge


@pytest.mark.parametrize("resolution, warned", [(3.0, True), (1.5, False)])
def test_soft_edge_checked_against_five_times_resolution(tmp_path, resolution, warned):
    """An edge of 10 px at 1 Å per pixel: narrower than 5 × 3 Å / 1 Å = 15 px, wider than 7.5 px."""
    mask = sphere(64, 14, 10)
    if warned:
        with pytest.warns(UserWarning, match=r"soft edge is about .* px wide, narrower than the 15.0 px"):
            validate.check_mask(tmp_path / "m.mrc", mask, 1.0, resolution)
    else:
        validate.check_mask(tmp_path / "m.mrc", mask, 1.0, resolution)  # warnings are errors in the tests


def test_hard_edge_warning_quotes_the_resolution_minimum(tmp_path):
    with pytest.warns(UserWarning, match=r"hard edge .* at least 15 px \(5 × resolution / pixel size\)"):
        validate.check_mask(tmp_path / "m.mrc", sphere(64, 14, 0), 1.0, 3.0)


# ----------------------------------------------------------------------------- the region line


def gaussian(box: int, centre, sigma: float) -> np.ndarray:
    grid = np.arange(box) - box // 2
    z, y, x = np.meshgrid(grid, grid, grid, indexing="ij")
    return np.exp(-((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) / (2 * sigma**2))


def test_density_share_of_two_blobs():
    """Blobs of masses 1 : 3 far apart, the mask over the first: 25 % inside, 75 % outside (--mask-keeps)."""
    box = 48
    small, large = gaussian(box, (0, 0, -12), 2.0), gaussian(box, (0, 0, 12), 2.0)
    half = small + 3 * large
    mask = (np.abs(np.arange(box) - box // 2 + 12) <= 8)[None, None, :] * np.ones((box, box, box), np.float32)
    assert region.density_share([half, half], mask, False) == pytest.approx(0.25, abs=1e-4)  # tails beyond 4σ
    assert region.density_share([half, half], mask, True) == pytest.approx(0.75, abs=1e-4)
    line = region.region_line("m.mrc", True, 0.75)
    assert "outside the mask" in line and "75.0%" in line


def region_line(printed: str) -> list[str]:
    """The region line, printed once, after the set-up steps' lines."""
    lines = [line for line in printed.splitlines() if line.startswith("Subtracting the region")]
    assert len(lines) == 1, printed
    return lines


def test_region_line_printed_and_extremes_warned(dataset, tmp_path, capsys):
    paths, _ = dataset
    assert run(paths, tmp_path / "a") == 0
    out = region_line(capsys.readouterr().out)
    assert out[0].startswith("Subtracting the region inside the mask")
    inside = float(out[0].rsplit(": ", 1)[1].split("%")[0])
    summary = json.loads((tmp_path / "a/dsub_run.json").read_text())["subtracted_region"]
    assert summary == {"mask_keeps": False, "density_share": pytest.approx(inside / 100, abs=6e-4)}
    assert run(paths, tmp_path / "b", "--mask-keeps") == 0
    out = region_line(capsys.readouterr().out)
    assert out[0].startswith("Subtracting the region outside the mask")
    assert inside + float(out[0].rsplit(": ", 1)[1].split("%")[0]) == pytest.approx(100.0, abs=0.11)

    ones = tmp_path / "ones.mrc"
    write_map(ones, np.ones((BOX,) * 3, np.float32), 1.5)
    assert run(paths, tmp_path / "c", mask=ones) == 0
    captured = capsys.readouterr()
    assert "100.0% of the map's density" in captured.out
    assert "dsub: warning:" in captured.err and "(almost) the whole particle" in captured.err
    assert run(paths, tmp_path / "d", "--mask-keeps", mask=ones) == 0
    assert "(almost) nothing" in capsys.readouterr().err


# ----------------------------------------------------------------------------- maps refused or warned about


def test_voxel_size_zero_is_refused(dataset, tmp_path, capsys):
    paths, _ = dataset
    volume, _ = read_map(paths["half_a"])
    unset = tmp_path / "unset.mrc"
    write_map(unset, volume, 0.0)
    assert run(paths, tmp_path / "o", half_a=unset) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dsub: error: {unset}: half map A has a voxel size of 0") and err.count("\n") == 1
    assert not (tmp_path / "o/particles_subtracted.star").exists()


def test_voxel_size_off_every_optics_group_is_refused_unless_rescale_maps():
    """Two optics groups (1.24, 1.5 Å): maps within 1 % of either pass; maps at 1.8 Å are refused naming both sizes
    and the two ways out, or warned about with rescale_maps; a re-boxed voxel size is named beside the header's."""
    from types import SimpleNamespace

    from dsub.errors import DsubWarning, InputFileError

    table = SimpleNamespace(pixel_size_angstrom=np.array([1.24, 1.5, 1.5, 1.24]))
    for voxel in (1.24, 1.2525, 1.49, 1.5):
        validate.check_voxel_size("half_A.mrc", voxel, voxel, table, rescale_maps=False)
    with pytest.raises(InputFileError) as refused:
        validate.check_voxel_size("maps/half_A.mrc", 1.8, 1.8, table, rescale_maps=False)
    line = str(refused.value)
    assert line.startswith("maps/half_A.mrc: the maps' voxel size 1.8000 Å is more than 1 % from every optics "
                           "group's pixel size (1.24, 1.5 Å)."), line
    assert "add --rescale-maps" in line and "relion_image_handler --i half_A.mrc --o half_A_fixed.mrc --angpix X " \
        "--force_header_angpix X (X: the pixel size the maps were refined at) for each" in line, line
    with pytest.raises(InputFileError, match=r"voxel size 1\.8000 Å \(1\.7500 Å once brought to the particles' box\)"):
        validate.check_voxel_size("half_A.mrc", 1.8, 1.75, table, rescale_maps=False)
    with pytest.warns(DsubWarning, match=r"voxel size 1\.8000 Å is more than 1 % from every optics group"):
        validate.check_voxel_size("half_A.mrc", 1.8, 1.8, table, rescale_maps=True)


def test_one_file_as_both_half_maps_is_warned(dataset, tmp_path, capsys):
    paths, _ = dataset
    assert run(paths, tmp_path / "o", half_b=paths["half_a"]) == 0
    assert "given as both half maps" in capsys.readouterr().err
    copy = shutil.copy2(paths["half_a"], tmp_path / "copy.mrc")  # the same map under another name
    assert run(paths, tmp_path / "p", half_b=copy) == 0
    assert "given as both half maps" in capsys.readouterr().err
    assert run(paths, tmp_path / "q", "--single-map") == 0  # asked for: only the --single-map warning
    assert "given as both half maps" not in capsys.readouterr().err


def test_several_classes_with_one_map_pair_are_warned(dataset, tmp_path, capsys):
    paths, _ = dataset
    blocks = starfile.read(paths["star"], always_dict=True)
    blocks["particles"]["rlnClassNumber"] = np.arange(COUNT) % 3 + 1
    classes = tmp_path / "classes.star"
    starfile.write(blocks, classes)
    shutil.copy2(paths["stack"], tmp_path / paths["stack"].name)
    assert run(paths, tmp_path / "o", star=classes) == 0
    assert "belong to 3 3D classes (rlnClassNumber 1, 2, 3)" in capsys.readouterr().err
    blocks["particles"]["rlnClassNumber"] = 2  # one class: nothing to say
    starfile.write(blocks, classes)
    assert run(paths, tmp_path / "p", star=classes) == 0
    assert "classes" not in capsys.readouterr().err


def test_several_cryosparc_classes_are_warned(shared_data):
    table = read_particles(shared_data / "cryodrgn/cryosparc_P12_J24_001_particles.cs")
    data = table.source.copy()
    if "alignments3D/class" not in data.dtype.names:
        pytest.skip("no alignments3D/class in this file")
    data["alignments3D/class"] = np.arange(len(data)) % 2
    table.source = data
    with pytest.warns(UserWarning, match=r"2 3D classes \(alignments3D/class 0, 1\)"):
        validate.check_classes(table)


def test_premultiplied_star_warns_that_the_cs_cannot_say_so(dataset, tmp_path, capsys):
    paths, _ = dataset
    blocks = starfile.read(paths["star"], always_dict=True)
    blocks["optics"]["rlnCtfDataAreCtfPremultiplied"] = 1
    premultiplied = tmp_path / "premultiplied.star"
    starfile.write(blocks, premultiplied)
    shutil.copy2(paths["stack"], tmp_path / paths["stack"].name)
    assert run(paths, tmp_path / "o", star=premultiplied) == 0
    assert "CTF-premultiplied" in capsys.readouterr().err
    written = starfile.read(tmp_path / "o/particles_subtracted.star", always_dict=True)["optics"]
    assert isinstance(written, pd.DataFrame) and (written["rlnCtfDataAreCtfPremultiplied"] == 1).all()


def test_maps_smaller_than_the_particles_box_are_warned_with_the_contrast_factor(dataset, tmp_path, capsys):
    """Maps spanning less than the particles: one warning whose factor is the fitted contrasts' measured ratio."""
    from dsub.physics.optics import crop_or_pad

    paths, _ = dataset
    small = 26
    cropped = {}
    for key in ("half_a", "half_b", "mask"):
        volume, voxel = read_map(paths[key])
        kept = crop_or_pad(volume, small)
        assert np.abs(kept).sum() > 0.999 * np.abs(volume).sum()  # the whole particle is inside the smaller box
        cropped[key] = tmp_path / f"{key}_{small}.mrc"
        write_map(cropped[key], kept, voxel)
    assert run(paths, tmp_path / "same", "--scheduler", "sync") == 0
    assert "span" not in capsys.readouterr().err
    assert run({**paths, **cropped}, tmp_path / "small", "--scheduler", "sync") == 0
    captured = capsys.readouterr()
    warned = [line for line in captured.err.splitlines() if line.startswith("dsub: warning:")]
    assert len(warned) == 1, warned
    pixel = read_map(paths["half_a"])[1]
    # At the particles' pixel size: padded to their box, nothing resampled (and no line saying it is).
    assert (f"Maps of {small} voxels at {pixel:.4f} Å brought to the particles' {BOX} px box: zero-padded about "
            f"their centre to the {BOX} voxels that the particles' box spans, at their own voxel size "
            "(no resampling).") in captured.out.splitlines()
    assert warned[0].startswith(f"dsub: warning: {cropped['half_a']}: the maps span {small} voxels × {pixel:.4f} Å")
    assert f"the particles' {BOX} px × {pixel:.4f} Å" in warned[0] and f"--new_box {BOX}" in warned[0]
    factor = float(warned[0].split("predict the particles ")[1].split("×")[0])
    contrast = {name: json.loads((tmp_path / name / "dsub_run.json").read_text())["contrast_median"]
                for name in ("same", "small")}
    assert contrast["same"] / contrast["small"] == pytest.approx(factor, rel=0.01)
    assert factor == pytest.approx((BOX / small) ** 2, abs=0.005)


def test_maps_smaller_than_the_particles_box_are_refused_where_the_contrast_is_not_fitted(dataset, tmp_path,
                                                                                           capsys):
    """``--scale none``/``input`` with maps spanning less than the box would over-subtract: one error, nothing written."""
    from dsub.physics.optics import crop_or_pad

    paths, _ = dataset
    small = 26
    cropped = {}
    for key in ("half_a", "half_b", "mask"):
        volume, voxel = read_map(paths[key])
        cropped[key] = tmp_path / f"{key}_{small}.mrc"
        write_map(cropped[key], crop_or_pad(volume, small), voxel)
    assert run({**paths, **cropped}, tmp_path / "none", "--scheduler", "sync", "--scale", "none") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dsub: error: {cropped['half_a']}: the maps span {small} voxels")
    assert f"--scale none would subtract {(BOX / small) ** 2:.2f}× the masked signal" in err[0]
    assert f"--new_box {BOX}" in err[0] and err[0].endswith("or use --scale fit.")
    assert not (tmp_path / "none").exists()
    # The same maps at the particles' box are subtracted with --scale none.
    assert run(paths, tmp_path / "whole", "--scheduler", "sync", "--scale", "none") == 0


def test_half_maps_that_share_no_signal_are_refused_before_the_chunks(dataset, tmp_path, capsys):
    """Two unrelated maps given as half maps: their FSC is nowhere significant, the FSC-weighted fit would see an
    empty model and give every particle a contrast of 0 (said before as "blank images"); refused in one line
    naming both maps, nothing written. ``--fit-weighting none`` fits against them as they are; the refinement's
    own half maps, noisy or not, pass."""
    paths, _ = dataset
    rng = np.random.default_rng(11)
    unrelated = {name: tmp_path / f"{name}.mrc" for name in ("half_a", "half_b")}
    for path in unrelated.values():
        write_map(path, rng.normal(size=(BOX,) * 3).astype(np.float32), read_map(paths["half_a"])[1])
    outdir = tmp_path / "out"
    assert run(paths, outdir, **unrelated) == 2
    err = capsys.readouterr().err
    assert (f"dsub: error: {unrelated['half_a']}: shares no signal with {unrelated['half_b']}, the other half map: "
            "their Fourier shell correlation is nowhere above its noise") in err
    assert "--fit-weighting none" in err and "blank" not in err and err.count("dsub: error:") == 1
    assert not (outdir / "particles_subtracted.star").exists() and not (outdir / "subtracted.zarr").exists()
    assert run(paths, tmp_path / "plain", "--fit-weighting", "none", **unrelated) == 0
    noisy = {name: tmp_path / f"noisy_{name}.mrc" for name in ("half_a", "half_b")}
    for name, path in noisy.items():  # the refinement's maps, each with noise of its own twice its signal
        volume, voxel = read_map(paths[name])
        write_map(path, volume + rng.normal(0, 2 * volume.std(), volume.shape).astype(np.float32), voxel)
    assert run(paths, tmp_path / "noisy", **noisy) == 0
