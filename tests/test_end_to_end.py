"""End-to-end runs of ``dsub subtract``: simulated files in, exported files out, checked against the truth.

Every run goes through the command line (``dsub.cli.main`` in-process, once a real
subprocess) on a small noise-free dataset from ``dsub.demo.make_dataset``, whose
simulator shares no code with dsub's engine. Box 48 is the smallest box at which
the phantom's blobs are sampled finely enough for sub-percent accuracy (at box 32
the voxelised half-maps alone leave ~5 % of the masked signal).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import zarr

import dsub
from dsub.cli import main
from dsub.demo import PIXEL_SIZE, make_dataset
from dsub.formats import cs as cs_format
from dsub.formats import star as star_format
from dsub.formats.mrc import read_images, read_map, write_map, write_stack

BOX = 48
COUNT = 60
CHUNK = 16  # 4 chunks of 16, 16, 16, 12
PER_STACK = 32  # 2 output stacks: particles 0-31 and 32-59
STAR_OUT = "particles_subtracted.star"
CS_OUT = "particles_subtracted.cs"


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A noise-free demo dataset (read-only for the tests: copy it before editing anything)."""
    folder = tmp_path_factory.mktemp("dataset")
    paths, sim = make_dataset(folder, count=COUNT, box=BOX, snr=None)
    return paths, sim


def subtract_args(particles, half_a, half_b, mask, outdir, *extra):
    # The demo makes each particle from its own half map exactly (so that half-set routing shows): the
    # halves' difference is not noise the particles lack, as in real half maps, so the FSC weighting
    # would raise α by about 2 % here. tests/test_contrast.py tests it on noisy half maps.
    return [
        "subtract", str(particles), "--half-a", str(half_a), "--half-b", str(half_b), "--mask", str(mask),
        "-o", str(outdir), "--chunk-size", str(CHUNK), "--particles-per-stack", str(PER_STACK), "--quiet",
        "--fit-weighting", "none", *map(str, extra),
    ]


def run_cli(paths, outdir, *extra, particles=None, half_a=None, half_b=None, mask=None):
    """``dsub subtract`` in-process on the dataset ``paths`` (any file replaceable); returns the exit code."""
    return main(subtract_args(
        particles or paths["star"], half_a or paths["half_a"], half_b or paths["half_b"],
        mask or paths["mask"], outdir, *extra,
    ))


def images_via_star(outdir) -> np.ndarray:
    table = star_format.read_particles(Path(outdir) / STAR_OUT)
    return read_images(table.image_paths, table.image_indices)


def images_via_cs(outdir) -> np.ndarray:
    table = cs_format.read_particles(Path(outdir) / CS_OUT)
    return read_images(table.image_paths, table.image_indices)


def residual(images, sim) -> float:
    """What is left of the masked domain, relative to the signal that should have gone (as ``dsub demo``)."""
    truth = sim.images - sim.subtracted_signal
    return float(np.linalg.norm(images - truth) / np.linalg.norm(sim.subtracted_signal))


def relative_to_truth(images, sim) -> float:
    truth = sim.images - sim.subtracted_signal
    return float(np.linalg.norm(images - truth) / np.linalg.norm(truth))


def run_summary(outdir) -> dict:
    return json.loads((Path(outdir) / "dsub_run.json").read_text())


def split_image_name(name: str) -> tuple[int, str]:
    number, stack = name.split("@", 1)
    return int(number), stack


def copy_dataset(paths, folder: Path) -> dict:
    """The dataset's files copied into ``folder``, for tests that edit them."""
    folder.mkdir(parents=True, exist_ok=True)
    return {key: Path(shutil.copy2(path, folder / Path(path).name)) for key, path in paths.items()}


@pytest.fixture(scope="module")
def base_run(dataset, tmp_path_factory):
    """The default run (star input, --scale fit) that several tests compare with."""
    paths, sim = dataset
    outdir = tmp_path_factory.mktemp("base") / "out"
    assert run_cli(paths, outdir, "--scale", "fit") == 0
    return outdir


# ----------------------------------------------------------------------------- 1. star in, everything out


def test_star_input_fit_writes_complete_consistent_outputs(dataset, base_run):
    paths, sim = dataset
    outdir = base_run

    for name in (STAR_OUT, CS_OUT, "subtracted.zarr", "dsub_run.json"):
        assert (outdir / name).exists(), name
    stacks = sorted((outdir / "Particles").glob("*.mrcs"))
    assert [s.name for s in stacks] == ["subtracted_0000.mrcs", "subtracted_0001.mrcs"]
    assert not list((outdir / "Particles").glob("*.partial"))

    # The run summary.
    summary = run_summary(outdir)
    assert summary["particles"] == COUNT
    assert summary["box"] == BOX
    assert summary["chunks_total"] == 4
    assert summary["chunks_skipped"] == 0
    assert summary["scale"] == "fit"

    # The star: every input row, in input order, pointing at the new stacks.
    given = starfile.read(paths["star"], always_dict=True)
    written = starfile.read(outdir / STAR_OUT, always_dict=True)
    assert set(written) == {"optics", "particles"}
    pd.testing.assert_frame_equal(written["optics"], given["optics"])
    rows, source = written["particles"], given["particles"]
    assert len(rows) == COUNT
    # The originals from the same folder as the new names: absolute here, as OUTDIR lies outside the star's.
    assert rows["rlnImageOriginalName"].tolist() == [
        f"{number}@{paths['star'].parent / stack}" for number, stack in source["rlnImageName"].str.split("@", n=1)]
    for column in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                   "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnRandomSubset", "rlnOpticsGroup"):
        np.testing.assert_array_equal(rows[column].to_numpy(), source[column].to_numpy(), err_msg=column)
    # OUTDIR is outside the current folder (and no cryoSPARC project is known): absolute paths.
    expected_names = [
        f"{i % PER_STACK + 1:06d}@{os.path.abspath(outdir)}/Particles/subtracted_{i // PER_STACK:04d}.mrcs"
        for i in range(COUNT)
    ]
    assert rows["rlnImageName"].tolist() == expected_names
    stack_lengths = {}
    for name in rows["rlnImageName"]:
        number, stack = split_image_name(name)
        target = Path(stack)
        assert target.is_file(), name
        if stack not in stack_lengths:
            with mrcfile.open(target, permissive=False) as mrc:
                stack_lengths[stack] = mrc.data.shape[0]
        assert 1 <= number <= stack_lengths[stack], name
    assert sum(stack_lengths.values()) == COUNT

    # The stacks: valid MRC2014, float32 (mode 2), pixel size in the header.
    for stack in stacks:
        log = io.StringIO()
        assert mrcfile.validate(str(stack), print_file=log), log.getvalue()
        with mrcfile.open(stack) as mrc:
            assert int(mrc.header.mode) == 2
            assert mrc.data.dtype == np.float32
            assert mrc.data.shape[1:] == (BOX, BOX)
            assert mrc.is_image_stack()
            for axis in "xy":
                assert float(getattr(mrc.voxel_size, axis)) == pytest.approx(PIXEL_SIZE, rel=1e-6)

    # The .cs: the same stack paths, 0-based indices, the contrast used.
    data = np.load(outdir / CS_OUT, max_header_size=2**30)
    assert len(data) == COUNT
    blob_paths = [p.decode() for p in data["blob/path"]]
    assert blob_paths == [name.split("@", 1)[1] for name in expected_names]
    for path in set(blob_paths):
        assert Path(path).is_file()
    np.testing.assert_array_equal(data["blob/idx"], np.arange(COUNT) % PER_STACK)
    np.testing.assert_array_equal(data["alignments3D/split"], sim.half_set - 1)
    alpha = data["alignments3D/alpha"]
    assert np.isfinite(alpha).all()
    np.testing.assert_allclose(alpha, sim.contrast, rtol=0.01)
    stored = zarr.open_group(str(outdir / "subtracted.zarr"), mode="r")
    np.testing.assert_array_equal(alpha, stored["contrast"][:])
    assert summary["contrast_median"] == pytest.approx(float(np.median(alpha)), rel=1e-6)

    # The images, read back through either metadata file, are the truth.
    via_star = images_via_star(outdir)
    assert residual(via_star, sim) < 0.01
    assert relative_to_truth(via_star, sim) < 0.015
    np.testing.assert_array_equal(images_via_cs(outdir), via_star)
    assert "images" not in stored  # deleted after the export: the stacks hold them


# ----------------------------------------------------------------------------- 2. .cs in, --scale input


@pytest.fixture(scope="module")
def cs_dataset(dataset, tmp_path_factory):
    """The dataset as a cryoSPARC .cs (blob/path relative to the .cs folder, alpha = true contrast)."""
    paths, sim = dataset
    folder = tmp_path_factory.mktemp("csdata")
    copied = copy_dataset(paths, folder)
    table = star_format.read_particles(copied["star"])
    cs_path = folder / "J7_particles.cs"
    cs_format.write_particles(
        table, cs_path, [copied["stack"].name] * len(table), table.image_indices, contrast=sim.contrast
    )
    return {**copied, "cs": cs_path}, sim


def test_cs_input_with_input_scale(cs_dataset, tmp_path):
    paths, sim = cs_dataset
    given = np.load(paths["cs"], max_header_size=2**30)
    assert all(p == b"particles.mrcs" for p in given["blob/path"])  # relative, as cryoSPARC writes them
    outdir = tmp_path / "out"
    assert run_cli(paths, outdir, "--scale", "input", particles=paths["cs"]) == 0
    assert run_summary(outdir)["scale"] == "input"

    # Subtracted with the given contrast: only the projector's error is left.
    images = images_via_star(outdir)
    assert residual(images, sim) < 0.01
    np.testing.assert_array_equal(images_via_cs(outdir), images)

    # The .cs passes every field through; blob/* point at the new stacks; alpha is the input's.
    written = np.load(outdir / CS_OUT, max_header_size=2**30)
    assert written.dtype.names == given.dtype.names + ("dsub/original_path", "dsub/original_idx",
                                                       "dsub/contrast_sigma", "dsub/fit_correlation")
    # the images subtracted from: the input's stack (absolute, OUTDIR being outside its folder) and index
    assert set(written["dsub/original_path"]) == {os.fsencode(paths["cs"].parent / "particles.mrcs")}
    np.testing.assert_array_equal(written["dsub/original_idx"], given["blob/idx"])
    np.testing.assert_array_equal(written["alignments3D/alpha"], given["alignments3D/alpha"])
    for name in given.dtype.names:
        if name not in ("blob/path", "blob/idx", "alignments3D/alpha"):
            np.testing.assert_array_equal(written[name], given[name], err_msg=name)
    np.testing.assert_array_equal(written["blob/idx"], np.arange(COUNT) % PER_STACK)
    for relative in {p.decode() for p in written["blob/path"]}:
        assert (outdir / relative).is_file()

    # The star built from the .cs reads back to the same geometry, CTF and half sets.
    source = cs_format.read_particles(paths["cs"])
    table = star_format.read_particles(outdir / STAR_OUT)
    np.testing.assert_allclose(table.rotations, source.rotations, atol=1e-8)
    np.testing.assert_allclose(table.rotations, sim.rotations, atol=1e-5)  # .cs poses are float32
    np.testing.assert_allclose(table.origins_angstrom, source.origins_angstrom, atol=1e-6)
    np.testing.assert_allclose(table.origins_pixels, sim.origins_pixels, atol=1e-5)
    np.testing.assert_allclose(table.defocus_u_angstrom, sim.defocus_u, rtol=1e-6)
    np.testing.assert_allclose(table.defocus_v_angstrom, sim.defocus_v, rtol=1e-6)
    angle_error = (table.defocus_angle_degrees - sim.defocus_angle + 180) % 360 - 180
    np.testing.assert_allclose(angle_error, 0, atol=1e-3)
    np.testing.assert_array_equal(table.half_set, sim.half_set)
    np.testing.assert_allclose(table.pixel_size_angstrom, PIXEL_SIZE, rtol=1e-6)
    np.testing.assert_allclose(table.voltage_kv, sim.voltage_kv)
    np.testing.assert_allclose(table.spherical_aberration_mm, sim.cs_mm, rtol=1e-6)
    np.testing.assert_allclose(table.amplitude_contrast, sim.amplitude_contrast, rtol=1e-6)
    rows = starfile.read(outdir / STAR_OUT, always_dict=True)["particles"]
    assert rows["rlnImageOriginalName"].tolist() == [
        f"{i + 1:06d}@{paths['stack']}" for i in range(COUNT)
    ]


def relion_reads_as_a_stack(name: str) -> bool:
    """RELION's rule for ``N@file`` outside ``--revert``'s box-size read (``Image::_read`` in src/image.h, the format
    from the text after the last dot): ``.mrcs`` is a stack, ``N@...mrc`` is refused as a map."""
    number, stack = name.split("@", 1)
    return int(number) >= 1 and stack.rsplit(".", 1)[-1].lower() == "mrcs"


def test_cs_mrc_stacks_are_named_for_relion_through_mrcs_links(dataset, tmp_path, monkeypatch):
    """cryoSPARC names its stacks ``.mrc``, which RELION refuses as particle stacks: rlnImageOriginalName names
    ``.mrcs`` links beside the output, one per input stack (two of one name in two jobs stay apart), so the star
    that ``relion_particle_subtract --revert`` makes from the output names images a refinement reads."""
    paths, sim = dataset
    project = tmp_path / "P3"
    table = star_format.read_particles(paths["star"])
    halves = {"J5/extract/batch_0_particles.mrc": slice(0, 30), "J6/extract/batch_0_particles.mrc": slice(30, COUNT)}
    blob_paths, indices = [], []
    for relative, rows in halves.items():
        (project / relative).parent.mkdir(parents=True)
        with write_stack(project / relative, sim.images[rows], PIXEL_SIZE):
            pass
        blob_paths += [relative] * (rows.stop - rows.start)
        indices += list(range(rows.stop - rows.start))
    cs_path = project / "J7" / "J7_particles.cs"
    cs_path.parent.mkdir()
    cs_format.write_particles(table, cs_path, blob_paths, np.array(indices), contrast=sim.contrast)
    monkeypatch.chdir(tmp_path)  # RELION runs in its project folder; the names start from the current folder
    outdir = tmp_path / "out"
    assert run_cli(paths, outdir, "--scale", "input", particles=cs_path) == 0

    rows = starfile.read(outdir / STAR_OUT, always_dict=True)["particles"]
    originals = rows["rlnImageOriginalName"].tolist()
    assert all(relion_reads_as_a_stack(name) for name in originals), originals[:2]
    assert all(relion_reads_as_a_stack(name) for name in rows["rlnImageName"])
    links = {name.split("@", 1)[1] for name in originals}
    assert links == {"out/Originals/J5/extract/batch_0_particles.mrcs",
                     "out/Originals/J6/extract/batch_0_particles.mrcs"}
    for link in links:  # relative links: the project folder can move as a whole
        assert Path(link).is_symlink() and not os.path.isabs(os.readlink(link))
        assert Path(link).resolve() == project / link.replace("out/Originals/", "")[:-1]
    # --revert swaps the names: the images it names are the input's, in input order.
    opened = []
    for name in originals:
        number, stack = name.split("@", 1)
        with mrcfile.open(stack, permissive=False) as mrc:
            opened.append(np.asarray(mrc.data[int(number) - 1]))
    np.testing.assert_array_equal(np.stack(opened), sim.images)
    # the QC report, drawn later from another folder, finds the input images through the links in OUTDIR
    from dsub.report.columns import linked_originals

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    relative = np.array(sorted(links), dtype=object)
    assert [Path(p).resolve() for p in linked_originals(outdir, relative)] == [
        project / "J5/extract/batch_0_particles.mrc", project / "J6/extract/batch_0_particles.mrc"]
    monkeypatch.chdir(tmp_path)
    # a rerun that writes the metadata again keeps the links as they are
    before = {link: os.lstat(link).st_ino for link in links}
    assert run_cli(paths, outdir, "--scale", "input", "--paths", "absolute", particles=cs_path) == 0
    assert {link: os.lstat(link).st_ino for link in links} == before
    rows = starfile.read(outdir / STAR_OUT, always_dict=True)["particles"]
    assert rows["rlnImageOriginalName"].iloc[0] == f"000001@{tmp_path / 'out/Originals/J5/extract/batch_0_particles.mrcs'}"
    # moved as a whole, the project's links still reach the stacks
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(str(project), moved / "P3")
    shutil.move(str(outdir), moved / "out")
    for link in links:
        assert (moved / link).exists(), link
    # the same output folder for another input (--overwrite): the links to the earlier input's stacks go
    shutil.move(str(moved / "P3"), project)
    shutil.move(str(moved / "out"), outdir)
    one_job = project / "J8" / "J8_particles.cs"
    one_job.parent.mkdir()
    cs_format.write_particles(table.subset(np.arange(30)), one_job, blob_paths[:30], np.array(indices[:30]),
                              contrast=sim.contrast[:30])
    assert run_cli(paths, outdir, "--scale", "input", "--overwrite", particles=one_job) == 0
    left = sorted(str(p.relative_to(tmp_path)) for p in (outdir / "Originals").rglob("*") if p.is_symlink())
    assert left == ["out/Originals/batch_0_particles.mrcs"], left


def test_cs_blob_paths_outside_the_job_tree_need_cs_root(cs_dataset, tmp_path, capsys):
    """blob/path is looked up beside the .cs and two folders up; elsewhere --cs-root says where."""
    paths, sim = cs_dataset
    job = tmp_path / "project" / "J9" / "deeper"
    job.mkdir(parents=True)
    cs_path = shutil.copy2(paths["cs"], job / "J9_particles.cs")
    outdir = tmp_path / "out"
    capsys.readouterr()
    assert run_cli(paths, outdir, "--padding", "2", particles=cs_path) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsub: error: ") and f"{job / 'particles.mrcs'}: file not found" in err
    assert "--cs-root" in err and len(err.strip().splitlines()) == 1  # the fix is named
    assert not (outdir / STAR_OUT).exists()

    assert run_cli(paths, outdir, "--padding", "2", "--cs-root", paths["stack"].parent, particles=cs_path) == 0
    assert residual(images_via_star(outdir), sim) < 0.05


# ----------------------------------------------------------------------------- 3. half-set routing


def test_swapped_half_maps_are_measurably_worse(dataset, base_run, tmp_path):
    paths, sim = dataset
    outdir = tmp_path / "swapped"
    assert run_cli(paths, outdir, "--scale", "fit", half_a=paths["half_b"], half_b=paths["half_a"]) == 0
    right = residual(images_via_star(base_run), sim)
    wrong = residual(images_via_star(outdir), sim)
    assert wrong > 3 * right, (right, wrong)


# ----------------------------------------------------------------------------- 4. mask conventions


def test_mask_keeps_with_inverted_mask_matches_default(dataset, base_run, tmp_path):
    paths, sim = dataset
    mask, voxel = read_map(paths["mask"])
    inverted = tmp_path / "keep_mask.mrc"
    write_map(inverted, 1.0 - mask, voxel)
    outdir = tmp_path / "keeps"
    assert run_cli(paths, outdir, "--scale", "fit", "--mask-keeps", mask=inverted) == 0
    default = images_via_star(base_run)
    keeps = images_via_star(outdir)
    assert np.max(np.abs(keeps - default)) < 1e-4 * np.max(np.abs(default))
    np.testing.assert_allclose(
        np.load(outdir / CS_OUT, max_header_size=2**30)["alignments3D/alpha"],
        np.load(base_run / CS_OUT, max_header_size=2**30)["alignments3D/alpha"], rtol=1e-5,
    )


# ----------------------------------------------------------------------------- 5. resume and overwrite


def test_rerun_resumes_and_other_parameters_need_overwrite(dataset, tmp_path, capsys):
    paths, sim = dataset
    outdir = tmp_path / "out"
    assert run_cli(paths, outdir, "--keep-store") == 0
    first = images_via_star(outdir)
    assert run_summary(outdir)["chunks_skipped"] == 0

    # The same command again (the store's images kept): every chunk is kept, the outputs are the same.
    assert run_cli(paths, outdir) == 0
    summary = run_summary(outdir)
    assert summary["chunks_skipped"] == summary["chunks_total"] == 4
    np.testing.assert_array_equal(images_via_star(outdir), first)

    # Other parameters into the same folder: refused, previous results left intact.
    capsys.readouterr()
    assert run_cli(paths, outdir, "--scale", "none") == 2
    err = capsys.readouterr().err
    assert err.startswith("dsub: error:") and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    np.testing.assert_array_equal(images_via_star(outdir), first)

    # ... and accepted with --overwrite: everything recomputed with the new parameters.
    assert run_cli(paths, outdir, "--scale", "none", "--overwrite") == 0
    summary = run_summary(outdir)
    assert summary["chunks_skipped"] == 0 and summary["scale"] == "none"
    np.testing.assert_array_equal(np.load(outdir / CS_OUT, max_header_size=2**30)["alignments3D/alpha"], 1.0)
    assert not np.allclose(images_via_star(outdir), first)


def test_resume_keeps_finished_chunks_and_redoes_the_rest(dataset, tmp_path):
    paths, sim = dataset
    outdir = tmp_path / "out"
    assert run_cli(paths, outdir, "--padding", "2") == 0
    first = images_via_star(outdir)

    # As if the run had been stopped: stacks under their temporary names, no metadata, the store not
    # marked finished; chunk 2 unfinished (its slots zero), chunk 0 finished with marked images.
    for name in (STAR_OUT, CS_OUT, "dsub_run.json"):
        (outdir / name).unlink()
    group = zarr.open_group(str(outdir / "subtracted.zarr"), mode="r+")
    group["chunk_done"][2] = 0
    del group.attrs["images_deleted"]
    stack = outdir / "Particles" / "subtracted_0000.mrcs"  # particles 0-31: chunks 0 and 1
    with mrcfile.mmap(stack, mode="r+") as mrc:
        mrc.data[:CHUNK] = 7.0
    later = outdir / "Particles" / "subtracted_0001.mrcs"  # particles 32-59: chunks 2 and 3
    with mrcfile.mmap(later, mode="r+") as mrc:
        mrc.data[:CHUNK] = 0.0
    later.rename(later.with_name(later.name + ".partial"))

    assert run_cli(paths, outdir, "--padding", "2") == 0
    summary = run_summary(outdir)
    assert summary["chunks_skipped"] == 3
    again = images_via_star(outdir)
    assert np.all(again[:CHUNK] == 7.0)  # finished chunks are not recomputed
    np.testing.assert_array_equal(again[CHUNK:], first[CHUNK:])  # the unfinished one is, identically
    assert not list((outdir / "Particles").glob("*.partial"))


def test_lost_stack_is_recomputed_or_copied_from_a_kept_store(dataset, tmp_path):
    """A stack lost from a stopped run: its chunks are computed again, or copied from the store's images."""
    paths, _ = dataset
    for kept in ((), ("--keep-store",)):
        outdir = tmp_path / f"out{len(kept)}"
        assert run_cli(paths, outdir, *kept) == 0
        first = images_via_star(outdir)
        for name in (STAR_OUT, CS_OUT, "dsub_run.json"):
            (outdir / name).unlink()
        group = zarr.open_group(str(outdir / "subtracted.zarr"), mode="r+")
        if "images_deleted" in group.attrs:
            del group.attrs["images_deleted"]
        (outdir / "Particles" / "subtracted_0001.mrcs").unlink()

        assert run_cli(paths, outdir, *kept) == 0
        recomputed = run_summary(outdir)["attempts"][-1]["chunks_done"]
        assert recomputed == (0 if kept else 2)  # particles 32-59 are chunks 2 and 3
        np.testing.assert_array_equal(images_via_star(outdir), first)


def test_rerun_after_stacks_changed_does_not_reuse_old_results(dataset, tmp_path):
    paths, sim = dataset
    data = copy_dataset(paths, tmp_path / "data")
    outdir = tmp_path / "out"
    assert run_cli(data, outdir, "--padding", "2") == 0

    # Re-extracted particles under the same names: the star file is untouched.
    with write_stack(data["stack"], np.ascontiguousarray(sim.images[::-1]), PIXEL_SIZE):
        pass
    code = run_cli(data, outdir, "--padding", "2")
    if code == 0:  # either refuse (other inputs need --overwrite) or subtract the new images
        new_truth = (sim.images - sim.subtracted_signal)[::-1]
        stale = images_via_star(outdir)
        assert np.linalg.norm(stale - new_truth) < 0.05 * np.linalg.norm(new_truth)
    else:
        assert code == 2


def test_outputs_without_store_are_refused_whatever_the_directory_order(dataset, tmp_path, monkeypatch, capsys):
    paths, _ = dataset
    outdir = tmp_path / "out"
    outdir.mkdir()
    for name in ("a_notes.txt", "b_notes.txt", "c_notes.txt"):
        (outdir / name).write_text("mine\n")
    (outdir / STAR_OUT).write_text("results of an earlier run\n")
    # Directory order is the file system's; sorted order is one a file system may give.
    original = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(sorted(original(self))))
    assert run_cli(paths, outdir, "--padding", "2") == 2
    assert (outdir / STAR_OUT).read_text() == "results of an earlier run\n"


# ----------------------------------------------------------------------------- 6. bad inputs


def _half_map_of_other_box(data):
    volume, voxel = read_map(data["half_a"])
    write_map(data["half_a"], np.pad(volume, 4), voxel)
    return data["half_a"]


def _mask_up_to_two(data):
    volume, voxel = read_map(data["mask"])
    write_map(data["mask"], 2.0 * volume, voxel)
    return data["mask"]


def _edit_star(data, edit):
    blocks = starfile.read(data["star"], always_dict=True, parse_as_string=star_format.NAME_COLUMNS)
    blocks["particles"] = edit(blocks["particles"].copy())
    starfile.write(blocks, data["star"], float_format="%.10g")


def _missing_stack(data):
    def edit(rows):
        rows.loc[5, "rlnImageName"] = "000006@Extract/job007/missing.mrcs"
        return rows
    _edit_star(data, edit)
    return "missing.mrcs"


def _index_beyond_stack(data):
    def edit(rows):
        rows.loc[7, "rlnImageName"] = f"{COUNT + 5:06d}@particles.mrcs"
        return rows
    _edit_star(data, edit)
    return data["stack"]


def _no_random_subset(data):
    _edit_star(data, lambda rows: rows.drop(columns="rlnRandomSubset"))
    return data["star"]


def _not_a_particle_file(data):
    text = data["star"].with_name("particles.txt")
    text.write_text("these are my notes, not particles\n")
    data["star"] = text
    return text


@pytest.mark.parametrize("spoil", [
    pytest.param(_half_map_of_other_box, id="half-map-other-box"),
    pytest.param(_mask_up_to_two, id="mask-above-one"),
    pytest.param(_missing_stack, id="missing-stack"),
    pytest.param(_index_beyond_stack, id="index-beyond-stack"),
    pytest.param(_no_random_subset, id="no-half-sets"),
    pytest.param(_not_a_particle_file, id="plain-text"),
])
def test_bad_input_is_one_line_error_naming_the_file(spoil, dataset, tmp_path, capsys):
    paths, _ = dataset
    data = copy_dataset(paths, tmp_path / "data")
    culprit = spoil(data)
    outdir = tmp_path / "out"
    capsys.readouterr()
    assert run_cli(data, outdir, "--padding", "2") == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dsub: error: ")
    assert str(culprit) in lines[0]
    assert "Traceback" not in err
    assert not (outdir / STAR_OUT).exists()
    assert not (outdir / CS_OUT).exists()


# ----------------------------------------------------------------------------- 7. the real command


def test_console_entry_in_a_subprocess(dataset, tmp_path):
    paths, sim = dataset
    outdir = tmp_path / "out"
    command = [sys.executable, "-m", "dsub.cli", *subtract_args(
        paths["star"], paths["half_a"], paths["half_b"], paths["mask"], outdir, "--padding", "2"
    )]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"Outputs in {outdir}" in done.stdout
    for name in (STAR_OUT, CS_OUT, "Particles/", "subtracted.zarr", "dsub_run.json"):
        assert name in done.stdout
        assert (outdir / name).exists()
    assert residual(images_via_star(outdir), sim) < 0.05

    # An error in a real process: exit status 2 and one clean line on stderr.
    failed = subprocess.run(
        [sys.executable, "-m", "dsub.cli", *subtract_args(
            tmp_path / "nothing.star", paths["half_a"], paths["half_b"], paths["mask"], tmp_path / "out2")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert failed.returncode == 2
    assert failed.stderr.strip() == (f"dsub: error: {tmp_path / 'nothing.star'}: file not found (given as the "
                                     f"particles). Check the path: a relative one starts from the current folder, "
                                     f"{tmp_path}")


def test_installed_dsub_script_reports_its_version():
    script = Path(sys.executable).with_name("dsub")
    if not script.is_file():
        pytest.skip("no dsub console script next to this interpreter")
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout.startswith("dsub ")


# ----------------------------------------------------------------------------- process hygiene


def test_main_leaves_the_warnings_module_as_it_found_it(tmp_path):
    before = warnings.formatwarning, warnings.showwarning
    assert main(subtract_args(tmp_path / "none.star", "a.mrc", "b.mrc", "m.mrc", tmp_path / "out")) == 2
    assert (warnings.formatwarning, warnings.showwarning) == before


def test_interrupted_export_is_redone_cleanly(dataset, tmp_path):
    """An export killed part-way (a half-written stack, no metadata) is redone by rerunning the command."""
    paths, _ = dataset
    outdir = tmp_path / "out"
    assert run_cli(paths, outdir, "--keep-store") == 0  # the store's images go only after a complete export
    first = images_via_star(outdir)
    stacks = sorted((outdir / "Particles").glob("*.mrcs"))
    # What a kill during export leaves: the metadata not yet written, one stack still partial.
    for name in (STAR_OUT, CS_OUT, "dsub_run.json"):
        (outdir / name).unlink()
    stacks[-1].rename(stacks[-1].with_name(stacks[-1].name + ".partial"))
    stacks[-1].with_name(stacks[-1].name + ".partial").write_bytes(b"half-written")

    assert run_cli(paths, outdir) == 0
    summary = run_summary(outdir)
    assert summary["chunks_skipped"] == summary["chunks_total"]  # nothing recomputed, only exported
    np.testing.assert_array_equal(images_via_star(outdir), first)
    for stack in stacks:
        assert mrcfile.validate(str(stack), print_file=io.StringIO())
    assert not list((outdir / "Particles").glob("*.partial"))


def test_inputs_are_only_read(dataset, tmp_path):
    """Stacks named inside the metadata, the metadata and the maps are never modified."""
    import hashlib

    paths, _ = dataset
    data = copy_dataset(paths, tmp_path / "data")

    def fingerprints():
        return {name: (hashlib.sha256(Path(p).read_bytes()).hexdigest(), os.stat(p).st_mtime_ns)
                for name, p in data.items()}

    before = fingerprints()
    assert run_cli(data, tmp_path / "out") == 0
    assert fingerprints() == before
    written = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()} - {
        Path(p).relative_to(tmp_path) for p in data.values()}
    assert all(path.parts[0] == "out" for path in written)  # nothing written outside OUTDIR


def test_library_deprecation_notices_do_not_reach_the_user(dataset, tmp_path, capsys, monkeypatch):
    """Only dsub's own warnings are printed, whatever a newer library deprecates."""
    import dsub.workflow.validate as validate

    original = validate.check_images

    def noisy(*args, **kwargs):
        warnings.warn("some library feature is deprecated", DeprecationWarning)
        warnings.warn("some library changes in the future", FutureWarning)
        return original(*args, **kwargs)

    monkeypatch.setattr(validate, "check_images", noisy)
    paths, _ = dataset
    assert run_cli(paths, tmp_path / "out") == 0
    assert "warning" not in capsys.readouterr().err


def test_small_set_on_threads_gives_every_thread_a_chunk_and_a_resume_keeps_them(dataset, tmp_path):
    paths, _ = dataset
    count = len(starfile.read(paths["star"])["particles"])
    outdir = tmp_path / "out"
    args = ["subtract", str(paths["star"]), "--half-a", str(paths["half_a"]), "--half-b", str(paths["half_b"]),
            "--mask", str(paths["mask"]), "-o", str(outdir), "--quiet", "--fit-weighting", "none",
            "--scheduler", "threads"]
    assert main([*args, "--workers", "2", "--keep-store"]) == 0
    summary = run_summary(outdir)
    assert count < 2 * 256 and summary["chunks_total"] == 2  # one chunk per thread, not one chunk of all
    first = images_via_star(outdir)
    # Another thread count would cut the set otherwise: the rerun keeps the earlier chunks and resumes.
    assert main([*args, "--workers", "3"]) == 0
    summary = run_summary(outdir)
    assert summary["chunks_total"] == summary["chunks_skipped"] == 2
    np.testing.assert_array_equal(images_via_star(outdir), first)


def test_overwrite_removes_the_earlier_runs_stacks_and_a_cut_stack_is_not_finished(dataset, tmp_path, capsys):
    paths, _ = dataset
    outdir = tmp_path / "out"
    assert run_cli(paths, outdir, "--particles-per-stack", "16") == 0  # 4 stacks of 16, 16, 16, 12
    assert len(list((outdir / "Particles").iterdir())) == 4
    assert run_cli(paths, outdir, "--particles-per-stack", "64", "--overwrite") == 0
    assert sorted(path.name for path in (outdir / "Particles").iterdir()) == ["subtracted_0000.mrcs"]
    first = images_via_star(outdir)

    # A stack cut short after the run finished: the rerun computes again instead of calling it finished.
    stack = outdir / "Particles" / "subtracted_0000.mrcs"
    with open(stack, "r+b") as handle:
        handle.truncate(stack.stat().st_size // 2)
    capsys.readouterr()
    assert run_cli(paths, outdir, "--particles-per-stack", "64") == 0
    assert "already holds the finished results" not in capsys.readouterr().out
    np.testing.assert_array_equal(images_via_star(outdir), first)


def test_a_resumed_run_writes_the_same_bytes_as_an_uninterrupted_one(dataset, tmp_path, capsys, ctrl_c_after_chunks):
    """Stacks, star and .cs of a run stopped after two chunks and resumed equal an uninterrupted run's, byte for
    byte: no time of writing in the MRC headers' label or the star's first line."""
    from dsub.workflow import store

    paths, _ = dataset
    outdir = tmp_path / "out"  # both runs write here: the star's and .cs's stack names are the same

    def outputs() -> dict:
        files = [outdir / STAR_OUT, outdir / CS_OUT, *sorted((outdir / "Particles").iterdir())]
        return {path.relative_to(outdir): path.read_bytes() for path in files}

    assert run_cli(paths, outdir) == 0
    uninterrupted = outputs()
    shutil.rmtree(outdir)

    with ctrl_c_after_chunks(2):
        assert run_cli(paths, outdir) == 130
    assert not (outdir / STAR_OUT).exists() and sorted(store.finished_chunks(outdir / "subtracted.zarr")) == [0, 0, 1, 1]
    capsys.readouterr()
    assert run_cli(paths, outdir) == 0
    assert run_summary(outdir)["chunks_skipped"] == 2
    resumed = outputs()
    assert list(resumed) == list(uninterrupted)
    for name, content in uninterrupted.items():
        assert resumed[name] == content, name
    with mrcfile.open(outdir / "Particles" / "subtracted_0000.mrcs", header_only=True) as mrc:
        assert mrc.get_labels() == [f"Created by dsub (version {dsub.__version__})"]
    assert (outdir / STAR_OUT).read_text().startswith(f"# Created by dsub (version {dsub.__version__})\n")
