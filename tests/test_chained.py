"""A second subtraction on dsub's own output: region 1 removed first, then region 2 from what is left.

Data from ``dsub.demo.make_dataset`` (independent simulator, noise-free, box 48):
region 1 is the demo's masked domain (52 % of the phantom's density), region 2
the other domain. Judged against the simulation's truth: the second run must
leave as little of region 2 as a single run on the original particles leaves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from dsub.cli import main
from dsub.demo import PIXEL_SIZE, make_dataset
from dsub.formats import cs as cs_format
from dsub.formats import star as star_format
from dsub.formats.mrc import read_images, write_map
from dsub.simulate import soft_sphere_mask, two_domain_phantom
from dsub.workflow.export import FIT_COLUMNS, FIT_FIELDS, original_images

COUNT, BOX, SEED = 96, 48, 2026
STAR_OUT, CS_OUT = "particles_subtracted.star", "particles_subtracted.cs"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The dataset, the mask of region 2, and the first run (region 1, --scale fit) on the star."""
    folder = tmp_path_factory.mktemp("chain")
    paths, sim = make_dataset(folder / "data", count=COUNT, box=BOX, seed=SEED, snr=None)
    phantom = two_domain_phantom(BOX, np.random.default_rng(SEED))  # make_dataset's first draw: the same phantom
    paths["mask_2"] = folder / "data" / "mask_2.mrc"
    write_map(paths["mask_2"], soft_sphere_mask(phantom, 1, BOX), PIXEL_SIZE)
    first = folder / "job030"
    assert run(paths, paths["star"], paths["mask"], first) == 0
    return paths, sim, first


def run(paths, particles, mask, outdir, *extra):
    # Noise-free particles made each from its own half map: no FSC weighting (as tests/test_end_to_end.py).
    return main(["subtract", str(particles), "--half-a", str(paths["half_a"]), "--half-b", str(paths["half_b"]),
                 "--mask", str(mask), "-o", str(outdir), "--chunk-size", "32", "--quiet",
                 "--fit-weighting", "none", *map(str, extra)])


def images_of(star) -> np.ndarray:
    table = star_format.read_particles(star)
    return read_images(table.image_paths, table.image_indices)


def left_of_region_2(after: np.ndarray, before: np.ndarray, sim) -> float:
    """What is left of region 2 (the simulation's kept domain) after removing it from ``before``, relative to it."""
    return float(np.linalg.norm(after - (before - sim.kept_signal)) / np.linalg.norm(sim.kept_signal))


def expected_ratio(sim) -> float:
    """Median over particles of what a least-squares fit against both regions finds on images holding region 2
    alone, relative to the true contrast: <region 2, both> / |both|², from the simulator's own images."""
    both = sim.images.reshape(COUNT, -1).astype(np.float64)  # noise-free: the signal of both regions
    region_2 = sim.kept_signal.reshape(COUNT, -1)
    return float(np.median(np.einsum("ij,ij->i", region_2, both) / np.einsum("ij,ij->i", both, both)))


def diagnostics(outdir) -> dict:
    return json.loads((Path(outdir) / "dsub_run.json").read_text())["diagnostics"]["sample"]


@pytest.fixture(scope="module")
def single_stage(chain):
    """Region 2 removed from the original particles in one run: the level a chained run must reach."""
    paths, sim, first = chain
    outdir = first.parent / "single"
    assert run(paths, paths["star"], paths["mask_2"], outdir) == 0
    left = left_of_region_2(images_of(outdir / STAR_OUT), sim.images, sim)
    assert left < 0.02  # the projector's and the fit's error on noise-free data
    return left


def test_dsub_output_is_recognised_and_its_contrast_read_before_rlnCtfScalefactor(chain):
    paths, sim, first = chain
    assert FIT_COLUMNS["contrast"] == star_format.DSUB_CONTRAST_LABEL
    assert all(label.startswith(star_format.DSUB_LABEL_PREFIX) for label in FIT_COLUMNS.values())
    assert all(name.startswith(cs_format.DSUB_FIELD_PREFIX) for name in FIT_FIELDS.values())
    blocks = starfile.read(first / STAR_OUT, always_dict=True)
    rows = blocks["particles"]
    table = star_format.read_particles(first / STAR_OUT)
    assert table.extra["dsub_output"] is not None
    np.testing.assert_array_equal(table.input_contrast, rows["rlnDsubContrast"].to_numpy())
    np.testing.assert_allclose(table.input_contrast, sim.contrast, rtol=0.03)  # the first run's fit
    # With rlnCtfScalefactor too (in the CTF, so RELION's further contrast is 1): rlnDsubContrast wins.
    blocks["particles"]["rlnCtfScalefactor"] = 0.8
    starfile.write(blocks, first / "with_scalefactor.star")
    both = star_format.read_particles(first / "with_scalefactor.star")
    np.testing.assert_allclose(both.input_contrast, rows["rlnDsubContrast"].to_numpy(), rtol=1e-5)  # %.6f
    np.testing.assert_allclose(both.ctf_scale, 0.8)
    del blocks["particles"]["rlnDsubContrast"]
    starfile.write(blocks, first / "scalefactor_only.star")
    np.testing.assert_array_equal(star_format.read_particles(first / "scalefactor_only.star").input_contrast, 1.0)
    assert cs_format.read_particles(first / CS_OUT).extra["dsub_output"] is not None
    assert star_format.read_particles(paths["star"]).extra["dsub_output"] is None  # not dsub's


def test_second_run_with_scale_input_removes_region_2_as_a_single_run_does(chain, single_stage, capsys):
    paths, sim, first = chain
    second = first.parent / "job031"
    capsys.readouterr()
    assert run(paths, first / STAR_OUT, paths["mask_2"], second, "--scale", "input") == 0
    assert capsys.readouterr().err == ""  # no "does not match these maps" advice to use --scale fit
    before = images_of(first / STAR_OUT)
    left = left_of_region_2(images_of(second / STAR_OUT), before, sim)
    assert left < 1.25 * single_stage + 0.003, (left, single_stage)
    # The sample fit against the full maps finds the share of region 1 missing: recorded, not warned about.
    ratio = diagnostics(second)["median_ratio_fitted_to_earlier"]
    assert ratio == pytest.approx(expected_ratio(sim), abs=0.05), (ratio, expected_ratio(sim))
    # The contrast reused is the first run's; the originals are still the extracted particles.
    written = starfile.read(second / STAR_OUT, always_dict=True)["particles"]
    earlier = starfile.read(first / STAR_OUT, always_dict=True)["particles"]
    np.testing.assert_array_equal(written["rlnDsubContrast"], earlier["rlnDsubContrast"])
    # OUTDIR lies outside the folder the input's names start from: both columns absolute, the originals found.
    extracted = star_format.read_particles(paths["star"])
    wanted = [f"{index + 1:06d}@{os.path.normpath(path)}" for path, index in zip(extracted.image_paths,
                                                                                 extracted.image_indices)]
    assert written["rlnImageOriginalName"].tolist() == wanted
    assert written["rlnImageName"].str.contains("job031").all()


def test_second_run_with_scale_fit_on_the_first_runs_maps_is_warned_with_the_fix(chain, single_stage, capsys):
    """The fit against the full half maps, which still hold region 1, is biased low by its share: said before the
    run, with --scale input as the fix and the share of region 2 that would stay."""
    paths, sim, first = chain
    outdir = first.parent / "fit"
    capsys.readouterr()
    assert run(paths, first / STAR_OUT, paths["mask_2"], outdir) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    left = left_of_region_2(images_of(outdir / STAR_OUT), images_of(first / STAR_OUT), sim)
    ratio = diagnostics(outdir)["median_ratio_fitted_to_earlier"]
    assert left > 0.3 and left == pytest.approx(1 - ratio, abs=0.1), (left, ratio)  # the bias the warning names
    assert len(lines) == 1 and "dsub: warning:" in lines[0] and "Use --scale input" in lines[0], lines
    assert f"{1 - ratio:.0%} of this mask's region" in lines[0]


def test_second_run_from_the_cs_with_scale_input_matches_the_star_chain(chain, single_stage, capsys):
    paths, sim, first = chain
    outdir = first.parent / "from_cs"
    capsys.readouterr()
    assert run(paths, first / CS_OUT, paths["mask_2"], outdir, "--scale", "input") == 0
    assert capsys.readouterr().err == ""  # no "times the input contrast ... use --scale fit" warning
    left = left_of_region_2(images_of(outdir / STAR_OUT), images_of(first / STAR_OUT), sim)
    assert left < 1.25 * single_stage + 0.003, (left, single_stage)
    written = np.load(outdir / CS_OUT, max_header_size=2**30)
    earlier = np.load(first / CS_OUT, max_header_size=2**30)
    np.testing.assert_array_equal(written["alignments3D/alpha"], earlier["alignments3D/alpha"])
    # The originals are still the extracted particles, in the star and in the .cs alike, as in the star chain.
    extracted = star_format.read_particles(paths["star"])
    wanted = [(os.path.normpath(path), int(index)) for path, index in zip(extracted.image_paths,
                                                                           extracted.image_indices)]
    for cs_out in (first / CS_OUT, outdir / CS_OUT):
        refs = original_images(cs_format.read_particles(cs_out))
        assert list(zip(refs.paths[refs.codes], refs.indices.tolist())) == wanted, cs_out
    np.testing.assert_array_equal(written[cs_format.ORIGINAL_PATH_FIELD], earlier[cs_format.ORIGINAL_PATH_FIELD])
    np.testing.assert_array_equal(written[cs_format.ORIGINAL_IDX_FIELD], extracted.image_indices)
    names = starfile.read(outdir / STAR_OUT, always_dict=True)["particles"]["rlnImageOriginalName"]
    named = [(os.path.normpath(stack), int(number) - 1) for number, stack in names.str.split("@", n=1)]
    assert named == wanted
    assert not any(stack.startswith(str(first)) for stack, _ in named)  # not the first run's stacks


def test_maps_of_the_subtracted_particles_fit_without_a_warning(chain, capsys):
    """Maps that lack region 1 as the images do (refined from the subtracted particles): --scale fit is right."""
    paths, sim, first = chain
    phantom_maps = {}
    mask_1 = mrcfile.read(paths["mask"]).astype(np.float32)
    for key in ("half_a", "half_b"):
        volume = mrcfile.read(paths[key]).astype(np.float32) * (1 - mask_1)
        phantom_maps[key] = first.parent / f"without_region_1_{key}.mrc"
        write_map(phantom_maps[key], volume, PIXEL_SIZE)
    outdir = first.parent / "refined_maps"
    capsys.readouterr()
    assert run({**paths, **phantom_maps}, first / STAR_OUT, paths["mask_2"], outdir) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    # Only that the mask holds all these maps' density (they hold region 2 alone): nothing about the contrast.
    assert all("the subtracted region holds 100.0% of the map's density" in line for line in lines), lines
    assert diagnostics(outdir)["median_ratio_fitted_to_earlier"] == pytest.approx(1.0, abs=0.05)
    left = left_of_region_2(images_of(outdir / STAR_OUT), images_of(first / STAR_OUT), sim)
    assert left < 0.03


def outputs_of(outdir) -> dict:
    """Every file of a run's OUTDIR: {relative path: (size, modification time)}."""
    return {str(path.relative_to(outdir)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(Path(outdir).rglob("*")) if path.is_file()}


@pytest.mark.parametrize("output", [STAR_OUT, CS_OUT])
@pytest.mark.parametrize("overwrite", [True, False])
def test_a_run_on_an_earlier_runs_results_into_its_outdir_is_refused_before_removing_them(chain, capsys, output,
                                                                                          overwrite):
    """--overwrite would delete the first run's star/.cs and stacks, this run's own input, before reading them."""
    paths, _, first = chain
    kept = outputs_of(first)
    capsys.readouterr()
    code = run(paths, first / output, paths["mask_2"], first, "--scale", "input",
               *(["--overwrite"] if overwrite else []))
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("dsub: error:"), err
    assert f"the particles ({first / output})" in err[0]
    assert f"the stacks {output} names ({first / 'Particles' / 'subtracted_0000.mrcs'}" in err[0]
    assert "another output folder with -o" in err[0] and "Nothing was removed" in err[0]
    assert ("--overwrite removes" in err[0]) == overwrite
    assert outputs_of(first) == kept  # the first run whole: nothing removed, nothing written
    assert (first / STAR_OUT).is_file() and (first / "Particles" / "subtracted_0000.mrcs").is_file()


def test_a_mask_among_the_results_that_overwrite_removes_is_refused(chain, capsys):
    paths, _, first = chain
    mask = first / "report" / "mask_2.mrc"
    mask.write_bytes(Path(paths["mask_2"]).read_bytes())
    try:
        kept = outputs_of(first)
        capsys.readouterr()
        assert run(paths, paths["star"], mask, first, "--overwrite") != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--mask ({mask})" in err[0] and "the particles" not in err[0], err
        assert outputs_of(first) == kept
    finally:
        mask.unlink()


def test_a_rerun_of_a_finished_chained_run_whose_input_is_gone_says_it_is_finished(chain, capsys):
    """The first run's folder deleted after the second run finished: the same command again is told that OUTDIR
    holds its finished results, not only that its input is not found."""
    import shutil

    paths, _, first = chain
    earlier, second = first.parent / "gone" / "job030", first.parent / "after_gone"
    assert run(paths, paths["star"], paths["mask"], earlier) == 0
    assert run(paths, earlier / STAR_OUT, paths["mask_2"], second, "--scale", "input") == 0
    kept = outputs_of(second)
    shutil.rmtree(earlier.parent)
    capsys.readouterr()
    assert run(paths, earlier / STAR_OUT, paths["mask_2"], second, "--scale", "input") == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and f"{earlier / STAR_OUT} (the particles) is gone" in out[0], out
    assert f"{second} holds the finished results of this same command" in out[0] and "nothing to do" in out[0]
    assert outputs_of(second) == kept
    # Another command (another --scale) on the missing file: the missing input, as before.
    assert run(paths, earlier / STAR_OUT, paths["mask_2"], second) == 2
    assert "file not found (given as the particles)" in capsys.readouterr().err


# Chains whose first star names its stacks from another folder than the input's project folder.

EXTRACTED = "Extract/job1/particles.mrcs"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A RELION project folder P: the extraction's stack in Extract/job1, P/particles.star naming it from P."""
    root = tmp_path_factory.mktemp("layouts")
    data = root / "P" / "Extract" / "job1"
    paths, _ = make_dataset(data, count=32, box=BOX, seed=SEED, snr=None)
    phantom = two_domain_phantom(BOX, np.random.default_rng(SEED))  # make_dataset's first draw: the same phantom
    paths["mask_2"] = data / "mask_2.mrc"
    write_map(paths["mask_2"], soft_sphere_mask(phantom, 1, BOX), PIXEL_SIZE)
    blocks = starfile.read(paths["star"], always_dict=True)
    rows = blocks["particles"].drop(columns=["rlnImageOriginalName"])
    rows["rlnImageName"] = [f"{i + 1:06d}@{EXTRACTED}" for i in range(len(rows))]
    blocks["particles"] = rows
    starfile.write(blocks, root / "P" / "particles.star")
    return root, paths


def star_originals_resolved(star, cwd: Path) -> list:
    """Each row's rlnImageOriginalName as (absolute stack, 0-based index), relative names read from the folder
    the star's rlnImageName are found from (as a run on it reads them; the current folder where all absolute)."""
    base = star_format.read_particles(star).extra["star_base"] or cwd
    names = starfile.read(star, always_dict=True)["particles"]["rlnImageOriginalName"]
    return [(os.path.normpath(os.path.join(base, stack)), int(number) - 1)
            for number, stack in names.str.split("@", n=1)]


@pytest.mark.parametrize("paths_mode, from_project", [("auto", False), ("absolute", True), ("absolute", False),
                                                      ("outdir", True), ("outdir", False), ("auto", True)])
def test_chained_originals_name_the_extracted_stack_whatever_the_paths(project, paths_mode, from_project,
                                                                        monkeypatch, capsys):
    root, paths = project
    folder = root / "P" if from_project else root
    monkeypatch.chdir(folder)
    # From elsewhere, OUTDIR outside the project (the --paths auto case that writes absolute names).
    outdirs = [Path(f"{'Subtract' if from_project else 'X'}/{paths_mode}{n}") for n in (1, 2, 3)]
    star = Path("particles.star") if from_project else Path("P/particles.star")
    extracted = str(root / "P" / EXTRACTED)
    wanted = [(extracted, i) for i in range(32)]
    for number, outdir in enumerate(outdirs):
        capsys.readouterr()
        # Region 1, then region 2 with the first run's contrast, then nothing new (--scale none: no fit).
        mask, scale = [(paths["mask"], "fit"), (paths["mask_2"], "input"), (paths["mask"], "none")][number]
        assert run(paths, star, mask, outdir, "--paths", paths_mode, "--scale", scale) == 0
        captured = capsys.readouterr()
        assert "rlnImageOriginalName" not in captured.err, captured.err  # (the third run: images now blank)
        assert "Subtract/" + outdirs[0].name + " (RELION's project folder)" not in captured.out
        assert star_originals_resolved(outdir / STAR_OUT, folder) == wanted, (outdir, number)
        refs = original_images(cs_format.read_particles(outdir / CS_OUT))
        assert [(os.path.normpath(p), int(i)) for p, i in zip(refs.paths[refs.codes], refs.indices)] == wanted
        assert os.path.isfile(refs.paths[0])
        star = outdir / STAR_OUT
    if paths_mode == "auto" and from_project:  # the plain RELION layout: the extraction's own names, relative
        names = starfile.read(star, always_dict=True)["particles"]
        assert names["rlnImageOriginalName"].tolist() == [f"{i + 1:06d}@{EXTRACTED}" for i in range(32)]
        assert names["rlnImageName"].str.contains(f"@Subtract/{outdirs[-1].name}/Particles/").all()
    if paths_mode == "outdir" and from_project:  # not job7's folder as RELION's project folder: names from P
        names = starfile.read(star, always_dict=True)["particles"]["rlnImageName"]
        assert names.str.contains("@Particles/").all()  # --paths outdir: relative to the OUTDIR


def test_chained_originals_not_found_are_warned_about_and_written_as_given(project, monkeypatch, capsys):
    root, paths = project
    monkeypatch.chdir(root / "P")
    assert run(paths, "particles.star", paths["mask"], "Subtract/lost1") == 0
    first = root / "P" / "Subtract" / "lost1" / STAR_OUT
    blocks = starfile.read(first, always_dict=True)
    blocks["particles"]["rlnImageOriginalName"] = blocks["particles"]["rlnImageOriginalName"].str.replace(
        "Extract/job1", "Gone/job1")
    starfile.write(blocks, first)
    capsys.readouterr()
    assert run(paths, first, paths["mask"], "Subtract/lost2", "--scale", "input") == 0
    err = capsys.readouterr().err
    assert "dsub: warning" in err and "Gone/job1/particles.mrcs" in err and "trail" in err, err
    written = starfile.read(root / "P" / "Subtract" / "lost2" / STAR_OUT, always_dict=True)["particles"]
    assert written["rlnImageOriginalName"].tolist() == [f"{i + 1:06d}@Gone/job1/particles.mrcs" for i in range(32)]
    cs_paths = np.load(root / "P" / "Subtract" / "lost2" / CS_OUT, max_header_size=2**30)
    assert set(cs_paths[cs_format.ORIGINAL_PATH_FIELD].tolist()) == {b"Gone/job1/particles.mrcs"}


# What the earlier run's record (dsub_run.json beside its star and .cs) tells a run on its output.

FITTED_LOW = "the contrast --scale input would reuse was fitted low"


@pytest.fixture(scope="module")
def region_2_again(chain):
    """Region 2's mask with a wider soft edge: another mask's content, for a third run on region 2's remains."""
    paths, _, first = chain
    phantom = two_domain_phantom(BOX, np.random.default_rng(SEED))
    mask = first.parent / "data" / "mask_2_wide.mrc"
    write_map(mask, soft_sphere_mask(phantom, 1, BOX, edge=5.0), PIXEL_SIZE)
    return mask


@pytest.fixture(scope="module")
def warned_second(chain):
    """Run 2 from run 1's .cs with --scale fit against the full maps: warned, and its contrast fitted low."""
    paths, _, first = chain
    outdir = first.parent / "warned_fit"
    assert run(paths, first / CS_OUT, paths["mask_2"], outdir) == 0
    assert diagnostics(outdir)["fit_below_earlier"] is True  # what the warning with --scale input's advice says
    return outdir


def warnings_of(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("dsub: warning:")]


def test_a_scale_input_run_on_a_warned_fit_is_told_its_contrast_was_fitted_low(chain, warned_second,
                                                                               region_2_again, capsys):
    paths, _, first = chain
    ratio = diagnostics(warned_second)["median_ratio_fitted_to_earlier"]
    assert ratio < 0.8
    third, fourth = first.parent / "third_on_warned", first.parent / "fourth_on_warned"
    capsys.readouterr()
    assert run(paths, warned_second / STAR_OUT, region_2_again, third, "--scale", "input") == 0
    said = [line for line in warnings_of(capsys) if FITTED_LOW in line]
    record = warned_second.resolve() / "dsub_run.json"
    assert len(said) == 1 and str(record) in said[0] and f"at {ratio:.2f} times" in said[0], said
    assert f"about {1 - ratio:.0%} of this mask's region" in said[0] and "Rerun that step with --scale input" in said[0]
    written = json.loads((third / "dsub_run.json").read_text())["chain"]
    assert written["earlier_record"] == str(record)
    assert written["contrast_fitted_low"] == {"record": str(record), "ratio": ratio}
    # Region 2 again, on particles that run 2 removed it from: its whole density was subtracted there.
    assert written["region_already_subtracted_share"] > 0.99
    assert written["region_already_subtracted_record"] == str(record)
    # A further --scale input run reuses the same contrast again: told too, of the run that fitted it.
    assert run(paths, third / STAR_OUT, paths["mask_2"], fourth, "--scale", "input") == 0
    said = [line for line in warnings_of(capsys) if FITTED_LOW in line]
    assert len(said) == 1 and str(record) in said[0] and f"at {ratio:.2f} times" in said[0], said


def test_a_clean_chain_gives_no_fitted_low_warning(chain, region_2_again, capsys):
    paths, _, first = chain
    second, third = first.parent / "clean_second", first.parent / "clean_third"
    assert run(paths, first / CS_OUT, paths["mask_2"], second, "--scale", "input") == 0
    assert diagnostics(second)["fit_below_earlier"] is True  # the full maps fit low: no matter with --scale input
    capsys.readouterr()
    assert run(paths, second / STAR_OUT, region_2_again, third, "--scale", "input") == 0
    said = warnings_of(capsys)
    assert not [line for line in said if FITTED_LOW in line or "already subtracted by that run" in line], said
    assert "contrast_fitted_low" not in json.loads((third / "dsub_run.json").read_text())["chain"]
    # Region 2's wider mask on what run 2 left of region 2: another file, the same region, said as an overlap.
    overlap = [line for line in said if "lies in the region an earlier run already subtracted" in line]
    assert len(overlap) == 1 and overlap[0].startswith("dsub: warning: 100% of the density"), said
    assert f"({paths['mask_2']}, per {second.resolve() / 'dsub_run.json'})" in overlap[0]


def test_the_same_mask_as_the_earlier_run_is_named_as_already_subtracted(chain, capsys):
    """Run 1's mask again on run 1's output, copied elsewhere (the same content): that region was subtracted."""
    paths, _, first = chain
    copy = first.parent / "data" / "mask_1_copy.mrc"
    copy.write_bytes(Path(paths["mask"]).read_bytes())
    capsys.readouterr()
    assert run(paths, first / STAR_OUT, copy, first.parent / "same_mask", "--scale", "input") == 0
    said = [line for line in warnings_of(capsys) if "already subtracted by that run" in line]
    assert len(said) == 1, said
    assert f"this mask ({copy})" in said[0] and str(Path(paths["mask"]).resolve()) in said[0]
    assert str(first.resolve() / "dsub_run.json") in said[0]
    # Region 2's mask on the same output: not said.
    assert run(paths, first / STAR_OUT, paths["mask_2"], first.parent / "other_mask", "--scale", "input") == 0
    assert not [line for line in warnings_of(capsys) if "already subtracted by that run" in line]


@pytest.mark.parametrize("damage", ["removed", "unreadable"])
def test_a_missing_or_unreadable_record_gives_no_warning_and_no_error(chain, warned_second, region_2_again, capsys,
                                                                      damage):
    paths, _, first = chain
    record = warned_second / "dsub_run.json"
    kept = record.read_bytes()
    try:
        if damage == "removed":
            record.unlink()
        else:
            record.write_text('{"scale": "fit", "outputs": ')
        capsys.readouterr()
        assert run(paths, warned_second / STAR_OUT, region_2_again, first.parent / f"no_record_{damage}",
                   "--scale", "input") == 0
        said = warnings_of(capsys)
        assert not [line for line in said if FITTED_LOW in line or "already subtracted by that run" in line], said
    finally:
        record.write_bytes(kept)


def test_overlap_with_every_earlier_region_is_measured_and_only_a_real_overlap_is_warned(chain, capsys):
    """Run 1 removed region 1; run 2 (on run 1's output) region 2. A third run on run 2's output with a mask
    of both regions is told that the region run 1 removed (two records back) is in it, in the share of the
    density that region holds; region 2's own mask on run 1's output is neighbouring, not overlapping."""
    paths, _, first = chain
    second, third = first.parent / "overlap_second", first.parent / "overlap_third"
    capsys.readouterr()
    assert run(paths, first / STAR_OUT, paths["mask_2"], second, "--scale", "input") == 0
    assert not [line for line in warnings_of(capsys) if "already subtracted" in line]
    neighbours = json.loads((second / "dsub_run.json").read_text())["chain"]["region_already_subtracted_share"]
    assert neighbours < 0.05  # the two domains' masks share only their soft edges
    with mrcfile.open(paths["mask"]) as one, mrcfile.open(paths["mask_2"]) as two:
        union = np.maximum(one.data, two.data)
    both = first.parent / "data" / "mask_both.mrc"
    write_map(both, union, PIXEL_SIZE)
    assert run(paths, second / STAR_OUT, both, third, "--scale", "input") == 0
    said = [line for line in warnings_of(capsys) if "lies in the region an earlier run already subtracted" in line]
    assert len(said) == 1, said
    record = json.loads((third / "dsub_run.json").read_text())
    share = record["chain"]["region_already_subtracted_share"]
    # Both regions were removed by the two runs before; the larger share is named: every run compared.
    assert share > 0.45 and f"{share:.0%} of the density in this mask's region ({both})" in said[0]
    assert record["chain"]["region_already_subtracted_record"] in (str(first.resolve() / "dsub_run.json"),
                                                                   str(second.resolve() / "dsub_run.json"))


def test_the_mask_of_a_run_two_steps_back_is_named_as_already_subtracted(chain, capsys):
    """Run 1's mask (a copy) on the output of run 2, which ran on run 1's output: the records are followed back."""
    paths, _, first = chain
    second, third = first.parent / "back_second", first.parent / "back_third"
    assert run(paths, first / STAR_OUT, paths["mask_2"], second, "--scale", "input") == 0
    copy = first.parent / "data" / "mask_1_again.mrc"
    copy.write_bytes(Path(paths["mask"]).read_bytes())
    capsys.readouterr()
    assert run(paths, second / STAR_OUT, copy, third, "--scale", "input") == 0
    said = [line for line in warnings_of(capsys) if "already subtracted by that run" in line]
    assert len(said) == 1 and "is the one an earlier run subtracted with" in said[0], said
    assert str(first.resolve() / "dsub_run.json") in said[0]
