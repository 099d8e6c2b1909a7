"""Diagnostics that speak up: silent on a good input, one clear warning line each on a bad one.

Data from ``dsub.demo.make_dataset`` (independent simulator, SNR 0.1, box 48),
then broken as users break it: poses scrambled in a .cs, maps of another
object, input contrast on another scale, a quarter of the images brighter.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import zarr

from dsub.cli import main
from dsub.demo import PIXEL_SIZE, make_dataset
from dsub.formats import cs as cs_format
from dsub.formats import star as star_format
from dsub.formats.mrc import write_map
from dsub.simulate import GaussianPhantom
from dsub.workflow.diagnostics import contrast_spread

COUNT, BOX = 64, 48
EXPLAINS_NOTHING = "the maps explain almost nothing of the images"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The demo's files plus a .cs of the same particles with the true contrast in alignments3D/alpha."""
    folder = tmp_path_factory.mktemp("diag")
    paths, sim = make_dataset(folder, count=COUNT, box=BOX, snr=0.1)
    table = star_format.read_particles(paths["star"])
    paths["cs"] = folder / "particles.cs"
    cs_format.write_particles(table, paths["cs"], [paths["stack"].name] * COUNT, table.image_indices,
                              contrast=sim.contrast)
    return paths, sim, table


def run(paths, outdir, particles=None, half_a=None, half_b=None, *extra):
    return main(["subtract", str(particles or paths["star"]), "--half-a", str(half_a or paths["half_a"]),
                 "--half-b", str(half_b or paths["half_b"]), "--mask", str(paths["mask"]), "-o", str(outdir),
                 "--padding", "2", "--chunk-size", "32", "--quiet", *extra])


def warnings_and_figures(capsys, outdir):
    lines = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("dsub: warning: ") for line in lines), lines
    return lines, json.loads((Path(outdir) / "dsub_run.json").read_text())["diagnostics"]


def test_good_input_is_silent_and_its_figures_are_recorded(dataset, tmp_path, capsys):
    paths, sim, _ = dataset
    for scale, particles in (("fit", paths["star"]), ("input", paths["cs"])):
        outdir = tmp_path / scale
        assert run(paths, outdir, particles, None, None, "--scale", scale) == 0
        lines, figures = warnings_and_figures(capsys, outdir)
        assert lines == [], lines
        sample, every = figures["sample"], figures["all"]
        assert sample["particles"] == COUNT and sample["maps_explain_images"]
        assert sample["median_abs_fit_correlation"] > 3 * sample["median_abs_control_correlation"]
        assert sample["negative_fraction"] == 0 and sample["outlier_fraction"] == 0
        assert every["particles"] == COUNT
        assert every["median_fit_correlation"] > 0.1
        if scale == "input":
            assert 0.9 < sample["median_ratio_fitted_to_input"] < 1.15  # true contrast given
        else:
            assert every["negative_fraction"] == 0 and every["outlier_fraction"] == 0
            assert every["median_contrast"] == pytest.approx(np.median(sim.contrast), rel=0.1)
        check_fit_outputs(outdir, sim, fitted=scale == "fit")


def check_fit_outputs(outdir, sim, fitted: bool):
    """Store arrays, star columns and .cs fields of the fit agree; σ is NaN unless α was fitted."""
    stored = zarr.open_group(str(outdir / "subtracted.zarr"), mode="r")
    sigma, correlation = np.asarray(stored["contrast_sigma"][:]), np.asarray(stored["fit_correlation"][:])
    assert sigma.dtype == correlation.dtype == np.float32 and sigma.shape == correlation.shape == (COUNT,)
    rows = starfile.read(outdir / "particles_subtracted.star", always_dict=True)["particles"]
    cs = np.load(outdir / "particles_subtracted.cs", max_header_size=2**30)
    np.testing.assert_allclose(rows["rlnDsubContrastSigma"].to_numpy(), sigma, rtol=1e-6)
    np.testing.assert_allclose(rows["rlnDsubFitCorrelation"].to_numpy(), correlation, rtol=1e-6)
    np.testing.assert_allclose(rows["rlnDsubContrast"].to_numpy(), stored["contrast"][:], rtol=1e-6)
    np.testing.assert_array_equal(cs["dsub/contrast_sigma"], sigma)
    np.testing.assert_array_equal(cs["dsub/fit_correlation"], correlation)
    assert np.all((correlation > 0) & (correlation < 1))
    if fitted:  # α errors of about σ: the true contrast lies within a few σ of each fit
        assert np.all(sigma > 0)
        assert np.mean(np.abs(stored["contrast"][:] - sim.contrast) / sigma) < 3
    else:
        assert np.all(np.isnan(sigma))


def test_cs_with_scrambled_poses_is_reported_before_the_run(dataset, tmp_path, capsys):
    paths, sim, table = dataset
    order = np.random.default_rng(1).permutation(COUNT)
    scrambled = tmp_path / "scrambled.cs"
    cs_format.write_particles(dataclasses.replace(table, rotations=table.rotations[order]), scrambled, [str(paths["stack"])] * COUNT, table.image_indices,
                              contrast=sim.contrast)
    outdir = tmp_path / "out"
    assert run(paths, outdir, scrambled, None, None, "--scale", "input") == 0
    lines, figures = warnings_and_figures(capsys, outdir)
    assert not figures["sample"]["maps_explain_images"]
    assert figures["sample"]["median_ratio_fitted_to_input"] < 0.5
    assert any(EXPLAINS_NOTHING in line and "poses, CTF or maps" in line for line in lines), lines
    assert any("times the input contrast" in line for line in lines), lines


def test_maps_of_another_object_are_reported(dataset, tmp_path, capsys):
    paths, _, _ = dataset
    rng = np.random.default_rng(99)
    other = GaussianPhantom(rng.uniform(-14, 14, (20, 3)), rng.uniform(1.5, 2.4, 20), rng.uniform(0.6, 1, 20),
                            np.ones(20, int)).voxelize(BOX)
    maps = []
    for name in ("other_A.mrc", "other_B.mrc"):
        write_map(tmp_path / name, other + rng.normal(0, 0.01, other.shape).astype(np.float32), PIXEL_SIZE)
        maps.append(tmp_path / name)
    outdir = tmp_path / "out"
    assert run(paths, outdir, None, *maps) == 0
    lines, figures = warnings_and_figures(capsys, outdir)
    assert any(EXPLAINS_NOTHING in line for line in lines), lines
    assert abs(figures["all"]["median_contrast"]) < 0.3


def test_input_contrast_on_another_scale_is_reported(dataset, tmp_path, capsys):
    paths, sim, table = dataset
    tripled = tmp_path / "tripled.cs"
    cs_format.write_particles(table, tripled, [str(paths["stack"])] * COUNT, table.image_indices,
                              contrast=3 * sim.contrast)
    outdir = tmp_path / "out"
    assert run(paths, outdir, tripled, None, None, "--scale", "input") == 0
    lines, figures = warnings_and_figures(capsys, outdir)
    assert len(lines) == 1 and "0.3" in lines[0] and "times the input contrast" in lines[0], lines
    assert figures["sample"]["median_ratio_fitted_to_input"] == pytest.approx(1 / 3, rel=0.1)


def test_scale_none_with_maps_on_another_scale_is_reported(dataset, tmp_path, capsys):
    """--scale none subtracts with α = 1: maps four times the images' scale would subtract 4× the signal."""
    paths, sim, _ = dataset
    maps = []
    for key in ("half_a", "half_b"):
        maps.append(tmp_path / f"{key}_x4.mrc")
        write_map(maps[-1], 4 * mrcfile.read(paths[key]).astype(np.float32), PIXEL_SIZE)
    outdir = tmp_path / "out"
    assert run(paths, outdir, None, *maps, "--scale", "none") == 0
    lines, figures = warnings_and_figures(capsys, outdir)
    assert len(lines) == 1 and "--scale none subtracts every particle with 1" in lines[0], lines
    expected = float(np.median(sim.contrast)) / 4
    assert figures["sample"]["median_ratio_fitted_to_input"] == pytest.approx(expected, rel=0.15)
    assert f"{1 / figures['sample']['median_ratio_fitted_to_input']:.2f}× the masked signal" in lines[0]
    # On the images' own scale (the simulated contrasts lie about 1): nothing to say.
    assert run(paths, tmp_path / "same", None, None, None, "--scale", "none") == 0
    lines, _ = warnings_and_figures(capsys, tmp_path / "same")
    assert not [line for line in lines if "--scale none" in line], lines


def test_many_outlying_contrasts_are_reported(dataset, tmp_path, capsys):
    paths, _, _ = dataset
    data = tmp_path / "data"
    data.mkdir()
    copied = {key: Path(shutil.copy2(path, data / Path(path).name)) for key, path in paths.items()}
    with mrcfile.mmap(copied["stack"], mode="r+") as mrc:
        mrc.data[::4] *= 6.0  # a quarter of the particles six times brighter than the rest
    outdir = tmp_path / "out"
    assert run(copied, outdir) == 0
    lines, figures = warnings_and_figures(capsys, outdir)
    assert figures["all"]["outlier_fraction"] == pytest.approx(0.25, abs=0.02)
    assert any("25% of the fitted contrast scales of all particles are outliers" in line for line in lines), lines


def test_contrast_spread_counts_negatives_beyond_the_noise():
    alpha = np.concatenate([np.linspace(0.8, 1.2, 20), [-1.0, -1.0, 9.0, 9.0, np.nan]])
    figures = contrast_spread(alpha, np.full(alpha.size, 0.1))
    assert figures["negative_fraction"] == pytest.approx(2 / 24)
    assert figures["outlier_fraction"] == pytest.approx(4 / 24)  # the -1s and 9s, far beyond 4 robust SD
    assert figures["expected_negative_fraction"] < 1e-6  # 10 sigma from zero
    noisy = contrast_spread(np.array([1.0, 0.5, 1.5, -0.2]), np.full(4, 1.0))
    # Median 0.75, sigma 1: P(alpha < 0) = Phi(-0.75) for every particle.
    assert noisy["expected_negative_fraction"] == pytest.approx(0.5 * (1 + math.erf(-0.75 / math.sqrt(2))))


def test_sample_figures_are_strict_json_and_few_particles_skip_the_pose_check(recwarn):
    from dsub.physics.contrast import ContrastResult
    from dsub.workflow.diagnostics import check_sample

    lines = []
    ones = np.ones(12, dtype=np.float32)
    # Every gain equal (t infinite), one image unusable (NaN): figures still strict JSON.
    fit = ContrastResult(ones.copy(), 0.05 * ones, 0.5 * ones)
    fit.alpha[3] = np.nan
    figures = check_sample(None, np.arange(12), (fit, 0.1 * ones), "fit", lines.append)
    json.dumps(figures, allow_nan=False)
    assert figures["particles"] == 11 and figures["maps_explain_images"] and figures["own_pose_t"] is None
    few = check_sample(None, np.arange(4), (ContrastResult(ones[:4], ones[:4], ones[:4]), ones[:4]), "fit",
                       lines.append)
    assert "maps_explain_images" not in few  # too few particles to judge
    assert not [w for w in recwarn.list if "dsub" in type(w.message).__module__]


def test_an_opposite_sign_after_this_region_was_subtracted_names_that_not_the_polarity():
    """A fit that finds the input's contrast with the other sign, on particles whose region an earlier run
    already subtracted: the refusal names that subtraction, not the stacks' contrast inversion."""
    from types import SimpleNamespace

    from dsub.errors import InputFileError
    from dsub.workflow.diagnostics import check_input_contrast

    rows = np.arange(8)
    table = SimpleNamespace(input_contrast=np.ones(8), source_path="particles_subtracted.star")
    fitted, sigma = -0.3 * np.ones(8), 0.05 * np.ones(8)
    with pytest.raises(InputFileError) as repeated:
        check_input_contrast(table, rows, fitted, sigma, print, check_ratio=False, region_subtracted_before=True)
    assert "region was already subtracted from these images" in str(repeated.value)
    assert "polarity" not in str(repeated.value) and "mask of the region still to be removed" in str(repeated.value)
    with pytest.raises(InputFileError) as inverted:
        check_input_contrast(table, rows, fitted, sigma, print, check_ratio=False)
    assert "opposite polarity" in str(inverted.value)


def with_header_voxel_size(paths, folder: Path, voxel: float) -> dict:
    """Copies of the half maps and mask whose header says ``voxel`` Å; the data unchanged (a wrong header)."""
    copies = {}
    for key in ("half_a", "half_b", "mask"):
        copies[key] = Path(shutil.copy2(paths[key], folder / paths[key].name))
        with mrcfile.open(copies[key], mode="r+") as mrc:
            mrc.voxel_size = voxel
    return copies


def test_maps_off_every_pixel_size_are_refused_before_any_work_unless_rescale_maps(dataset, tmp_path, capsys):
    """The demo's maps with a header saying 1.2 × their voxel size: refused at once, naming the map, its voxel
    size and the particles' pixel size, with both ways out; with --rescale-maps the run goes on and warns.

    At the default fit band the stretched maps still explain something of the images (the smooth blobs
    correlate at low resolution), so the sample fit alone would let this wrong header through.
    """
    paths, _, _ = dataset
    wrong = with_header_voxel_size(paths, tmp_path, 1.2 * PIXEL_SIZE)
    command = ["subtract", str(paths["star"]), "--half-a", str(wrong["half_a"]), "--half-b", str(wrong["half_b"]),
               "--mask", str(wrong["mask"]), "--padding", "2", "--chunk-size", "32", "--quiet"]
    refused = tmp_path / "refused"
    code = main([*command, "-o", str(refused)])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    line = err[0]
    assert line.startswith(f"dsub: error: {wrong['half_a']}: the maps' voxel size {1.2 * PIXEL_SIZE:.4f} Å is more "
                           f"than 1 % from every optics group's pixel size ({PIXEL_SIZE:g} Å)."), line
    assert "add --rescale-maps to project the maps at their own voxel size" in line, line
    assert (f"relion_image_handler --i {wrong['half_a'].name} --o {wrong['half_a'].stem}_fixed.mrc "
            f"--angpix {PIXEL_SIZE:g} --force_header_angpix {PIXEL_SIZE:g} for each") in line, line
    assert "chunk" not in captured.out  # before the sample fit and any chunk
    assert not refused.exists() or not any(refused.iterdir()), list(refused.iterdir())

    outdir = tmp_path / "rescaled"
    assert main([*command, "-o", str(outdir), "--rescale-maps"]) == 0
    lines, figures = warnings_and_figures(capsys, outdir)
    assert figures["sample"]["maps_explain_images"], figures["sample"]  # why the sample fit alone does not refuse
    assert any(f"the maps' voxel size {1.2 * PIXEL_SIZE:.4f} Å is more than 1 % from every optics group's pixel size"
               in line for line in lines), lines
    assert (outdir / "particles_subtracted.star").exists()


def test_maps_whose_header_voxel_size_is_wrong_are_refused_before_the_run(dataset, tmp_path, capsys):
    """Off every optics group by more than 1 % and explaining almost nothing: the header is likely wrong.

    With --rescale-maps (without it such maps are refused before the sample fit).

    The fit is limited to 8–3.5 Å, where real maps hold their detail (the demo's smooth blobs still correlate
    at low resolution when stretched by 20 %); there the right header explains the images and the wrong one not.
    """
    paths, _, _ = dataset
    band = ("--fit-lowres", "8", "--fit-highres", "3.5")
    assert run(paths, tmp_path / "right", None, None, None, *band) == 0
    _, figures = warnings_and_figures(capsys, tmp_path / "right")
    assert figures["sample"]["maps_explain_images"], figures["sample"]

    wrong = with_header_voxel_size(paths, tmp_path, 1.2 * PIXEL_SIZE)
    outdir = tmp_path / "out"
    code = main(["subtract", str(paths["star"]), "--half-a", str(wrong["half_a"]), "--half-b", str(wrong["half_b"]),
                 "--mask", str(wrong["mask"]), "-o", str(outdir), "--padding", "2", "--chunk-size", "32", "--quiet",
                 "--rescale-maps", *band])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    errors = [line for line in err if not line.startswith("dsub: warning: ")]
    assert len(errors) == 1 and errors[0].startswith(f"dsub: error: {wrong['half_a']}: "), err
    line = errors[0]
    assert f"header voxel size {1.2 * PIXEL_SIZE:.4f} Å is more than 1 % from the particles' pixel size " \
           f"({PIXEL_SIZE:g} Å)" in line and "the maps explain almost nothing of the images" in line, line
    assert "likely wrong" in line and f"--angpix {PIXEL_SIZE:g} --force_header_angpix {PIXEL_SIZE:g}" in line
    assert not any(EXPLAINS_NOTHING in warning for warning in err if warning.startswith("dsub: warning: "))
    assert not (outdir / "subtracted.zarr").exists() and not (outdir / "particles_subtracted.star").exists()


def test_maps_at_another_voxel_size_that_explain_the_images_are_accepted(dataset, tmp_path, capsys):
    """The same phantom sampled at 1.2× the particles' pixel size, with that voxel size in the header: rescaled
    with --rescale-maps."""
    from dsub.simulate import perturbed, soft_sphere_mask, two_domain_phantom

    paths, _, _ = dataset
    rng = np.random.default_rng(2026)  # make_dataset's draws: its phantom and half maps
    phantom = two_domain_phantom(BOX, rng)
    halves = (perturbed(phantom, rng), perturbed(phantom, rng))
    voxel = 1.2 * PIXEL_SIZE

    def coarser(half):  # positions and widths in voxels of ``voxel`` Å
        return GaussianPhantom(half.centres / 1.2, half.sigmas / 1.2, half.amplitudes, half.domains)

    maps = {"half_a": tmp_path / "coarse_A.mrc", "half_b": tmp_path / "coarse_B.mrc", "mask": tmp_path / "mask.mrc"}
    for key, half in zip(("half_a", "half_b"), halves):
        write_map(maps[key], coarser(half).voxelize(BOX), voxel)
    write_map(maps["mask"], soft_sphere_mask(coarser(phantom), 2, BOX), voxel)
    outdir = tmp_path / "out"
    code = main(["subtract", str(paths["star"]), "--half-a", str(maps["half_a"]), "--half-b", str(maps["half_b"]),
                 "--mask", str(maps["mask"]), "-o", str(outdir), "--padding", "2", "--chunk-size", "32", "--quiet",
                 "--rescale-maps"])
    lines, figures = warnings_and_figures(capsys, outdir)
    assert code == 0, lines
    assert figures["sample"]["maps_explain_images"], figures["sample"]
    assert any("more than 1 % from every optics group's pixel size" in line for line in lines), lines
