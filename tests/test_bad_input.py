"""Bad input: one clear line naming the file, exit status 2, and no metadata that looks complete."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from dsub.cli import main
from dsub.demo import PIXEL_SIZE, make_dataset
from dsub.formats.mrc import read_map, write_map, write_stack

COUNT, BOX = 24, 48


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    paths, _ = make_dataset(tmp_path_factory.mktemp("data"), count=COUNT, box=BOX, snr=None)
    return paths


@pytest.fixture
def data(pristine, tmp_path):
    """A private copy of the dataset, free to break."""
    folder = tmp_path / "data"
    folder.mkdir()
    return {key: Path(shutil.copy2(path, folder / Path(path).name)) for key, path in pristine.items()}


def run(data, outdir, *extra, **replace):
    files = {**data, **replace}
    args = ["subtract", str(files["star"]), "--half-a", str(files["half_a"]), "--mask", str(files["mask"]),
            "-o", str(outdir), "--chunk-size", "8", "--padding", "2", "--quiet"]
    if files.get("half_b") is not None:
        args += ["--half-b", str(files["half_b"])]
    return main(args + list(extra))


def assert_refused(code, capsys, outdir, *names):
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsub: error:"), err
    for name in names:
        assert str(name) in lines[0], lines[0]
    assert not (Path(outdir) / "particles_subtracted.star").exists()
    assert not (Path(outdir) / "particles_subtracted.cs").exists()
    return lines[0]


def test_half_maps_of_different_shapes(data, tmp_path, capsys):
    volume, _ = read_map(data["half_b"])
    write_map(data["half_b"], volume[4:-4, 4:-4, 4:-4], PIXEL_SIZE)  # 40³ against half A's 48³
    line = assert_refused(run(data, tmp_path / "out"), capsys, tmp_path / "out", data["half_b"])
    assert "half map B has a box of 40 voxels" in line


def test_pixel_sizes_that_disagree(data, tmp_path, capsys):
    volume, _ = read_map(data["half_a"])
    write_map(data["half_a"], volume, PIXEL_SIZE * 1.2)
    line = assert_refused(run(data, tmp_path / "out"), capsys, tmp_path / "out", data["half_a"])
    assert "half map A has a voxel size of 1.8000 Å but the other maps 1.5000 Å" in line


def test_particles_with_several_box_sizes_name_their_optics_groups(data, tmp_path, capsys):
    def second_optics_group(blocks):
        optics = pd.concat([blocks["optics"]] * 2, ignore_index=True)
        optics.loc[1, ["rlnOpticsGroup", "rlnImageSize"]] = [2, 64]
        blocks["optics"] = optics
        particles = blocks["particles"]
        particles.loc[: COUNT // 2, "rlnOpticsGroup"] = 2

    edit_particles(data["star"], second_optics_group)
    line = assert_refused(run(data, tmp_path / "out"), capsys, tmp_path / "out", data["star"])
    assert "several box sizes" in line and "optics group 1: 48 px" in line and "optics group 2: 64 px" in line


def test_hard_edged_mask_warns_with_a_soft_edge_width(data, tmp_path, capsys):
    mask, _ = read_map(data["mask"])
    write_map(data["mask"], (mask > 0.5).astype(np.float32), PIXEL_SIZE)
    assert run(data, tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "dsub: warning:" in err and "hard edge" in err and str(data["mask"]) in err
    assert "at least 4 px (about 6 Å)" in err  # 6 Å at 1.5 Å/px
    assert (tmp_path / "out" / "particles_subtracted.star").exists()


def test_soft_mask_gives_no_warning(data, tmp_path, capsys):
    assert run(data, tmp_path / "out") == 0
    assert "warning" not in capsys.readouterr().err


def set_half_sets(star_path, values):
    blocks = starfile.read(star_path, always_dict=True)
    if values is None:
        blocks["particles"] = blocks["particles"].drop(columns="rlnRandomSubset")
    else:
        blocks["particles"]["rlnRandomSubset"] = values
    starfile.write(blocks, star_path)


def test_all_particles_in_one_half_are_refused_unless_single_map(data, tmp_path, capsys):
    set_half_sets(data["star"], 1)
    line = assert_refused(run(data, tmp_path / "out"), capsys, tmp_path / "out", data["star"])
    assert "--single-map" in line
    assert run(data, tmp_path / "single", "--single-map", half_b=None) == 0
    err = capsys.readouterr().err
    assert "dsub: warning:" in err and "gold-standard independence" in err
    assert len(starfile.read(tmp_path / "single" / "particles_subtracted.star")["particles"]) == COUNT
    assert run(data, tmp_path / "both", "--single-map") == 0  # --half-b given too: said to be unused
    assert "--half-b is not used" in capsys.readouterr().err


def test_missing_half_sets_mention_single_map(data, tmp_path, capsys):
    set_half_sets(data["star"], None)
    line = assert_refused(run(data, tmp_path / "out"), capsys, tmp_path / "out", data["star"])
    assert "no half set" in line and "--single-map" in line


def test_half_b_is_required_without_single_map(data, tmp_path, capsys):
    line = assert_refused(run(data, tmp_path / "out", half_b=None), capsys, tmp_path / "out")
    assert "--half-b" in line


def test_truncated_stack(data, tmp_path, capsys):
    size = os.path.getsize(data["stack"])
    os.truncate(data["stack"], size - 3 * BOX * BOX * 4)
    line = assert_refused(run(data, tmp_path / "out"), capsys, tmp_path / "out", data["stack"])
    assert f"truncated: its header says {COUNT} images of {BOX}x{BOX} px" in line
    assert f"holds only {size - 3 * BOX * BOX * 4} bytes ({COUNT - 3} whole images)" in line
    assert not (tmp_path / "out" / "subtracted.zarr").exists()  # refused before any chunk


def test_truncated_map(data, tmp_path, capsys):
    os.truncate(data["mask"], os.path.getsize(data["mask"]) - 4 * BOX * BOX)
    line = assert_refused(run(data, tmp_path / "out"), capsys, tmp_path / "out", data["mask"])
    assert f"truncated: its header says a map of {BOX}x{BOX}x{BOX} voxels" in line


def test_stack_that_is_a_folder(data, tmp_path, capsys):
    data["stack"].unlink()
    data["stack"].mkdir()
    line = assert_refused(run(data, tmp_path / "out"), capsys, tmp_path / "out", data["stack"])
    assert "is a folder, not a file" in line and "file not found" not in line


def test_missing_stacks_are_counted_in_one_line(data, tmp_path, capsys):
    """Rows naming two missing stacks: the line names the first, then the next, and says how many stacks and
    how many particles are missing, what to check and how to go on without them (it named only the first)."""
    star = starfile.read(data["star"], always_dict=True)
    names = list(star["particles"]["rlnImageName"])
    names[3] = names[3].replace("particles.mrcs", "mic002_particles.mrcs")
    names[4] = names[4].replace("particles.mrcs", "mic003_particles.mrcs")
    names[9] = names[9].replace("particles.mrcs", "mic002_particles.mrcs")
    star["particles"]["rlnImageName"] = names
    starfile.write(star, data["star"], overwrite=True)
    folder = data["star"].parent
    line = assert_refused(run(data, tmp_path / "out"), capsys, tmp_path / "out", data["star"])
    assert line.startswith(f"dsub: error: {folder / 'mic002_particles.mrcs'}: file not found, nor is "
                           f"{folder / 'mic003_particles.mrcs'} (2 stack files missing, named by 3 of the {COUNT} "
                           f"particles of {data['star']}). Check that the stacks are where"), line
    assert "leave them out of the particle file" in line


def test_many_missing_stacks_name_two_and_count_the_rest():
    from dsub.errors import MissingInputError

    error = MissingInputError("a.mrcs", referenced_from="p.star", others=["b.mrcs", "c.mrcs", "d.mrcs"],
                              rows=(40, 1000))
    assert str(error).startswith("a.mrcs: file not found, nor are b.mrcs and 2 more (4 stack files "
                                 "missing, named by 40 of the 1000 particles of p.star). ")
    assert str(error).endswith("and run on that."), str(error)  # a whole sentence
    assert "current folder (RELION's project folder)" in str(error) and "--cs-root" not in str(error)
    import pickle

    assert str(pickle.loads(pickle.dumps(error))) == str(error)  # intact from a worker


def test_missing_stacks_of_a_cs_say_where_cryosparc_names_start():
    """A .cs's relative blob/path start from the cryoSPARC project folder, not the current folder."""
    from dsub.errors import MissingInputError

    for error in (MissingInputError("a.mrc", referenced_from="P1/J5/particles.cs", others=["b.mrc"], rows=(4, 9)),
                  MissingInputError("a.mrc", referenced_from="P1/J5/particles.cs")):
        text = str(error)
        assert "cryoSPARC project folder" in text and "--cs-root" in text, text
        assert "current folder" not in text and "RELION" not in text, text
        assert text.endswith("."), text


def test_stack_that_is_not_mrc(data, tmp_path, capsys):
    data["stack"].write_text("these are not images\n" * 100)
    line = assert_refused(run(data, tmp_path / "out"), capsys, tmp_path / "out", data["stack"])
    assert "not a readable MRC image stack" in line and "no MRC header" in line


def poison(stack_path, index, value):
    with mrcfile.mmap(stack_path, mode="r+") as mrc:
        mrc.data[index, 3, 5] = value


def test_nan_image_stops_with_file_and_index(data, tmp_path, capsys):
    poison(data["stack"], 9, np.nan)
    line = assert_refused(run(data, tmp_path / "out"), capsys, tmp_path / "out", data["stack"])
    assert "image 10 (1-based)" in line and "--skip-bad-particles" in line


def test_a_bad_image_in_the_sample_stops_the_run_before_any_chunk(data, tmp_path, capsys):
    """The sample fit meets it (24 particles: all in the sample): refused before the store and the stacks."""
    poison(data["stack"], 1, np.nan)
    outdir = tmp_path / "out"
    line = assert_refused(run(data, outdir, "--scheduler", "sync"), capsys, outdir, data["stack"])
    assert "image 2 (1-based) contains NaN or infinite values" in line and "--skip-bad-particles" in line
    assert not (outdir / "subtracted.zarr").exists() and not (outdir / "Particles").exists()
    assert run(data, outdir, "--scheduler", "sync", "--skip-bad-particles") == 0  # as the message says
    assert json.loads((outdir / "dsub_run.json").read_text())["skipped_particles"]["count"] == 1
    assert len(starfile.read(outdir / "particles_subtracted.star")["particles"]) == COUNT - 1


def test_skip_bad_particles_resumes_the_run_a_bad_image_stopped(tmp_path, capsys):
    """A bad image outside the sample stops the run at its chunk; --skip-bad-particles resumes the chunks done."""
    from dsub.workflow.diagnostics import SAMPLE_SIZE, sample_rows
    from dsub.workflow.store import finished_chunks

    count = 2 * SAMPLE_SIZE + 2
    paths, _ = make_dataset(tmp_path / "data", count=count, box=32, snr=None)
    sampled = set(sample_rows(count).tolist())
    bad = max(set(range(count)) - sampled)
    poison(paths["stack"], bad, np.nan)
    outdir = tmp_path / "out"
    assert_refused(run(paths, outdir, "--scheduler", "sync", "--chunk-size", "16"), capsys, outdir, paths["stack"])
    finished = int(finished_chunks(outdir / "subtracted.zarr").sum())
    assert finished >= 1  # chunks before the bad one's
    assert run(paths, outdir, "--scheduler", "sync", "--chunk-size", "16", "--skip-bad-particles") == 0
    summary = json.loads((outdir / "dsub_run.json").read_text())
    assert summary["skipped_particles"]["count"] == 1 and summary["chunks_skipped"] == finished
    assert len(starfile.read(outdir / "particles_subtracted.star")["particles"]) == count - 1
    capsys.readouterr()
    assert run(paths, outdir, "--scheduler", "sync", "--chunk-size", "16") == 2  # without the flag: another run
    assert "holds the results of a different run" in capsys.readouterr().err


def test_skip_bad_particles_leaves_them_out_and_lists_them(data, tmp_path, capsys):
    poison(data["stack"], 9, np.nan)
    poison(data["stack"], 17, np.inf)
    outdir = tmp_path / "out"
    assert run(data, outdir, "--skip-bad-particles") == 0
    star = starfile.read(outdir / "particles_subtracted.star")["particles"]
    assert len(star) == COUNT - 2
    originals = {f"{number}@{os.path.basename(stack)}" for number, stack in star["rlnImageOriginalName"].str.split("@", n=1)}
    assert len(originals) == COUNT - 2
    assert "000010@particles.mrcs" not in originals and "000018@particles.mrcs" not in originals
    skipped = starfile.read(outdir / "skipped_particles.star")["particles"]
    assert list(skipped["rlnImageName"]) == ["000010@particles.mrcs", "000018@particles.mrcs"]
    cs = np.load(outdir / "particles_subtracted.cs", max_header_size=2**30)
    assert len(cs) == COUNT - 2 and np.all(np.isfinite(cs["alignments3D/alpha"]))
    report = json.loads((outdir / "dsub_run.json").read_text())["skipped_particles"]
    assert report["count"] == 2 and [entry["index"] for entry in report["listed"]] == [9, 17]
    out, err = capsys.readouterr()
    assert f"Subtracted {COUNT - 2} of {COUNT} particles" in out
    assert "dsub: warning: 2 particles with NaN or infinite values were left out" in err


def blank_stack(stack_path, rows=None):
    """Zero the images ``rows`` (all by default) of a stack, as a failed extraction leaves them."""
    with mrcfile.mmap(stack_path, mode="r+") as mrc:
        mrc.data[slice(None) if rows is None else rows] = 0


def test_a_blank_sample_is_refused_before_the_run(data, tmp_path, capsys):
    """A stack of zeros with good poses: every fit is 0 and so is the control, so the checks comparing them
    saw nothing wrong and the run subtracted nothing from every image, exit 0. It is refused after the sample
    fit, before any output, naming the particle file and the stack."""
    blank_stack(data["stack"])
    outdir = tmp_path / "out"
    line = assert_refused(run(data, outdir), capsys, outdir, data["star"], data["stack"])
    assert f"all {COUNT} sample particle images" in line and "are blank" in line and "re-extract" in line
    assert not (outdir / "subtracted.zarr").exists()


def test_one_blank_stack_of_several_is_named_in_a_warning(data, tmp_path, capsys):
    """One stack of two all zero: the run goes on (the sample's other images are fine), and one warning names
    that stack and how many of its particles are blank; the record counts them."""
    second = data["stack"].with_name("particles_b.mrcs")
    shutil.copy2(data["stack"], second)
    blank_stack(second)
    star = starfile.read(data["star"], always_dict=True)
    moved = np.arange(COUNT) >= COUNT - 6  # the last 6 particles' images are in the blank stack
    star["particles"].loc[moved, "rlnImageName"] = [name.replace("particles.mrcs", "particles_b.mrcs")
                                                    for name in star["particles"].loc[moved, "rlnImageName"]]
    starfile.write(star, data["star"], overwrite=True)
    outdir = tmp_path / "out"
    assert run(data, outdir, "--scheduler", "sync") == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if "blank" in line]
    assert len(warned) == 1 and warned[0].startswith("dsub: warning: 6 of 24 particle images are blank"), err
    assert f"{second} (all its 6)" in warned[0] and str(data["stack"]) + " " not in warned[0]
    assert "the maps explain almost nothing" not in err  # the blank ones are kept out of the sample's checks
    record = json.loads((outdir / "dsub_run.json").read_text())
    assert record["diagnostics"]["all"]["blank_particles"] == 6


def test_a_few_blank_images_in_a_stack_are_counted(data, tmp_path, capsys):
    blank_stack(data["stack"], [2, 5])
    outdir = tmp_path / "out"
    assert run(data, outdir) == 0
    err = capsys.readouterr().err
    assert f"2 of {COUNT} particle images are blank" in err and f"{data['stack']} (2 of its {COUNT})" in err


def test_good_images_give_no_blank_warning(data, tmp_path, capsys):
    assert run(data, tmp_path / "out") == 0
    assert "blank" not in capsys.readouterr().err
    record = json.loads((tmp_path / "out" / "dsub_run.json").read_text())
    assert record["diagnostics"]["all"]["blank_particles"] == 0


def test_output_folder_that_cannot_be_created(data, tmp_path, capsys, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    line = assert_refused(run(data, tmp_path / "out"), capsys, tmp_path / "out", tmp_path / "out")
    assert "cannot create the output folder" in line


def test_existing_output_folder_on_a_read_only_file_system(data, tmp_path, capsys, monkeypatch):
    import dsub.workflow.options as options_module

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    outdir = tmp_path / "out"
    outdir.mkdir()
    monkeypatch.setattr(options_module.tempfile, "mkstemp", read_only)
    line = assert_refused(run(data, outdir), capsys, outdir, outdir)
    assert "cannot write in the output folder (Read-only file system)" in line and "-o" in line


def test_output_folder_that_is_not_writable(data, tmp_path, capsys, monkeypatch):
    import dsub.workflow.outdir as outdir_module

    monkeypatch.setattr(outdir_module.os, "access", lambda path, mode: False)
    line = assert_refused(run(data, tmp_path / "out"), capsys, tmp_path / "out", tmp_path / "out")
    assert "not writable" in line


def test_permission_denied_inside_the_output_folder(data, tmp_path, capsys, monkeypatch):
    import dsub.workflow.store as store

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(store, "create_store", refuse)
    outdir = tmp_path / "out"
    line = assert_refused(run(data, outdir), capsys, outdir, outdir / "subtracted.zarr")
    assert "cannot write there (Permission denied)" in line and "-o" in line


def test_input_that_cannot_be_read(data, tmp_path, capsys, monkeypatch):
    import dsub.workflow.pipeline as pipeline

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(pipeline, "read_particles", refuse)
    line = assert_refused(run(data, tmp_path / "out"), capsys, tmp_path / "out", data["star"])
    assert "cannot be opened (Permission denied)" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_output_folder_in_a_read_only_parent(data, tmp_path, capsys):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        assert_refused(run(data, parent / "out"), capsys, parent / "out", parent / "out")
    finally:
        parent.chmod(0o700)


@pytest.mark.parametrize("scheduler", ["threads", "sync"])
@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on device"),
                                         (errno.EDQUOT, "disk quota exceeded")])
def test_disk_full_while_writing(data, tmp_path, capsys, monkeypatch, scheduler, code, words):
    import dsub.workflow.store as store

    def full(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(store, "record_chunks", full)
    line = assert_refused(run(data, tmp_path / "out", "--scheduler", scheduler), capsys, tmp_path / "out",
                          tmp_path / "out")
    assert words in line and "rerun the same command: finished chunks are kept" in line


def test_disk_full_while_writing_stacks(data, tmp_path, capsys, monkeypatch):
    import dsub.workflow.export as export

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "Particles" / "x"))

    monkeypatch.setattr(export, "write_pieces", full)
    line = assert_refused(run(data, tmp_path / "out", "--scheduler", "sync"), capsys, tmp_path / "out",
                          tmp_path / "out" / "Particles")
    assert "no space left on device" in line


def test_disk_full_while_writing_metadata_leaves_none_and_the_rerun_resumes(data, tmp_path, capsys, monkeypatch):
    import dsub.formats.cs as cs_format

    def full(table, path, *args, **kwargs):  # the star is written by then
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    outdir = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(cs_format, "write_particles", full)
        line = assert_refused(run(data, outdir), capsys, outdir, outdir / "particles_subtracted.cs")
    assert "no space left on device" in line and not (outdir / "dsub_run.json").exists()
    assert run(data, outdir) == 0  # space freed: the same command finishes without redoing a chunk
    assert json.loads((outdir / "dsub_run.json").read_text())["chunks_skipped"] == COUNT // 8


def test_negative_resolution_limit_is_refused(data, tmp_path, capsys):
    line = assert_refused(run(data, tmp_path / "out", "--fit-lowres", "-5"), capsys, tmp_path / "out")
    assert "--fit-lowres must be a resolution in Å" in line


def test_errors_survive_the_trip_from_a_worker():
    import pickle

    from dsub.errors import InputFileError, MissingInputError

    for error in (InputFileError("/data/x.mrcs", "image 3 is bad.", "Fix it."), MissingInputError("/d/y", "a.star")):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error) and again.path == error.path


def edit_particles(star_path, edit):
    blocks = starfile.read(star_path, always_dict=True)
    edit(blocks)
    starfile.write(blocks, star_path)


def nan_defocus(blocks):
    particles = blocks["particles"]
    particles.loc[3, "rlnDefocusU"] = np.nan


def nan_angle(blocks):
    particles = blocks["particles"]
    particles.loc[2, "rlnAngleTilt"] = np.nan


def zero_pixel_size(blocks):
    optics = blocks["optics"]
    optics.loc[:, "rlnImagePixelSize"] = 0.0


def no_rows(blocks):
    blocks["particles"] = blocks["particles"].iloc[:0]


@pytest.mark.parametrize(
    "edit, words",
    [(nan_defocus, "rlnDefocusU"), (nan_angle, "angles"), (zero_pixel_size, "pixel size"),
     (no_rows, "holds no particles")],
)
def test_broken_particle_metadata(data, tmp_path, capsys, edit, words):
    edit_particles(data["star"], edit)
    line = assert_refused(run(data, tmp_path / "out"), capsys, tmp_path / "out", data["star"])
    assert words in line


def test_a_missing_angle_names_the_particle_and_its_line_in_the_star(data, tmp_path, capsys):
    edit_particles(data["star"], nan_angle)  # the third particle's tilt
    lines = data["star"].read_text().splitlines()
    third = next(number for number, text in enumerate(lines, 1) if text.split()[:1] == ["000003@particles.mrcs"])
    line = assert_refused(run(data, tmp_path / "out"), capsys, tmp_path / "out", data["star"])
    assert f"particle 3 (line {third} of the file) has a missing or non-numeric value in" in line


def test_a_half_set_other_than_1_or_2_names_its_first_row_and_line(data, tmp_path, capsys):
    def third_half_set(blocks):
        blocks["particles"].loc[3, "rlnRandomSubset"] = 3

    edit_particles(data["star"], third_half_set)
    lines = data["star"].read_text().splitlines()
    fourth = next(number for number, text in enumerate(lines, 1) if text.split()[:1] == ["000004@particles.mrcs"])
    line = assert_refused(run(data, tmp_path / "out"), capsys, tmp_path / "out", data["star"])
    assert f"rlnRandomSubset holds values other than 1 and 2 ([3]; the first in particle row 4, line {fourth} " in line


def test_particles_that_are_a_folder(data, tmp_path, capsys):
    folder = tmp_path / "particles.star"
    folder.mkdir()
    line = assert_refused(run(data, tmp_path / "out", star=folder), capsys, tmp_path / "out", folder)
    assert "is a folder" in line


def test_a_real_process_prints_a_warning_and_an_error_line_and_no_traceback(data, tmp_path):
    mask, _ = read_map(data["mask"])
    write_map(data["mask"], (mask > 0.5).astype(np.float32), PIXEL_SIZE)
    poison(data["stack"], 5, np.inf)
    args = ["subtract", str(data["star"]), "--half-a", str(data["half_a"]), "--half-b", str(data["half_b"]),
            "--mask", str(data["mask"]), "-o", str(tmp_path / "out"), "--chunk-size", "8", "--quiet"]
    done = subprocess.run([sys.executable, "-m", "dsub.cli", *args], capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 2, done.stderr
    assert lines[0].startswith(f"dsub: warning: {data['mask']}: the mask has a hard edge")
    assert lines[1].startswith(f"dsub: error: {data['stack']}: image 6 (1-based)")
    assert not (tmp_path / "out" / "particles_subtracted.star").exists()


def test_map_that_is_a_folder(data, tmp_path, capsys):
    folder = tmp_path / "maps"
    folder.mkdir()
    line = assert_refused(run(data, tmp_path / "out", half_a=folder), capsys, tmp_path / "out", folder)
    assert "is a folder" in line


def test_output_path_that_is_a_file(data, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("not a folder\n")
    line = assert_refused(run(data, target), capsys, target, target)
    assert "cannot create the output folder" in line and "is a file, not a folder" in line
    assert "File exists" not in line


def test_empty_half_map(data, tmp_path, capsys):
    volume, _ = read_map(data["half_b"])
    write_map(data["half_b"], np.zeros_like(volume), PIXEL_SIZE)
    line = assert_refused(run(data, tmp_path / "out"), capsys, tmp_path / "out", data["half_b"])
    assert "empty" in line


def test_empty_mask(data, tmp_path, capsys):
    volume, _ = read_map(data["mask"])
    write_map(data["mask"], np.zeros_like(volume), PIXEL_SIZE)
    line = assert_refused(run(data, tmp_path / "out"), capsys, tmp_path / "out", data["mask"])
    assert "empty" in line


def invert_stack(stack_path):
    with mrcfile.mmap(stack_path, mode="r+") as mrc:
        mrc.data[...] *= -1


def test_input_contrast_with_the_wrong_polarity_is_refused_before_the_run(data, tmp_path, capsys):
    def unit_contrast(blocks):
        particles = blocks["particles"]
        particles["rlnCtfScalefactor"] = 1.0

    edit_particles(data["star"], unit_contrast)
    outdir = tmp_path / "out"
    assert run(data, outdir, "--scale", "input") == 0  # right polarity: accepted
    assert "Polarity check: input contrast has the sign of a fit" in capsys.readouterr().out
    invert_stack(data["stack"])
    line = assert_refused(run(data, tmp_path / "inverted", "--scale", "input"), capsys, tmp_path / "inverted",
                          data["star"])
    assert "opposite polarity" in line and "--scale fit" in line
    assert not (tmp_path / "inverted" / "subtracted.zarr").exists()  # refused before any chunk


def test_fitted_contrast_mostly_negative_is_reported_plainly(data, tmp_path, capsys):
    invert_stack(data["stack"])
    assert run(data, tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "dsub: warning: 100% of the fitted contrast scales of all particles are negative" in err
    assert "explain almost nothing" not in err  # inverted images are explained, with the opposite sign
    summary = json.loads((tmp_path / "out" / "dsub_run.json").read_text())
    assert summary["contrast_negative_fraction"] == 1.0


def test_an_output_folder_in_use_by_another_run_is_refused(data, tmp_path, capsys):
    from dsub.workflow.outdir import OutdirLock

    outdir = tmp_path / "out"
    other = OutdirLock(outdir)
    other.acquire()  # as a run of the same job submitted twice would hold it
    try:
        line = assert_refused(run(data, outdir), capsys, outdir, outdir)
        assert "another dsub run is using this output folder" in line and f"pid {os.getpid()}" in line
        assert not (outdir / "subtracted.zarr").exists()
    finally:
        other.release()
    assert run(data, outdir) == 0  # once it is free, the folder is used as usual


def test_a_missing_map_names_its_option(data, tmp_path, capsys):
    missing = tmp_path / "no_such_half.mrc"
    line = assert_refused(run(data, tmp_path / "out", half_b=missing), capsys, tmp_path / "out", missing)
    assert "file not found (given as --half-b)" in line and "current folder" in line


def test_memory_and_system_errors_reaching_the_command_line_are_one_line(data, tmp_path, capsys, monkeypatch):
    import errno as errno_codes

    import dsub.report as report_module
    from dsub.workflow import region

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 32.0 MiB for an array with shape (128, 128, 128)")

    monkeypatch.setattr(region, "density_share", no_memory)
    assert run(data, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsub: error: out of memory (Unable to allocate 32.0 MiB")
    assert "ulimit -v" in err[0] and "fewer tasks at once (--workers)" in err[0]
    assert run(data, tmp_path / "one", "--workers", "1") == 2  # one task at a time: no fewer to run
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ulimit -v" in err[0] and "--workers" not in err[0]

    def no_thread(*args, **kwargs):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(region, "density_share", no_thread)
    assert run(data, tmp_path / "threads") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsub: error: the system refused another thread")
    assert "ulimit -v" in err[0] and "ulimit -u" in err[0]

    def no_room(*args, **kwargs):
        raise ImportError("/venv/scipy/spatial/_rotation.so: failed to map segment from shared object")

    monkeypatch.setattr(region, "density_share", no_room)
    assert run(data, tmp_path / "room") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsub: error: out of address space while loading a library")

    def disk_full(outdir):
        raise OSError(errno_codes.ENOSPC, "No space left on device", str(outdir / "report" / "contrast.png"))

    monkeypatch.setattr(report_module, "write_report", disk_full)
    assert main(["report", str(tmp_path / "somewhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dsub: error: {tmp_path / 'somewhere' / 'report' / 'contrast.png'}: No space left on device. "
                   "Free space there, or write elsewhere (-o)."]


def test_a_rerun_with_other_stacks_is_refused_naming_the_option(data, tmp_path, capsys):
    outdir = tmp_path / "out"
    assert run(data, outdir, "--particles-per-stack", "16") == 0
    star = (outdir / "particles_subtracted.star").read_bytes()
    capsys.readouterr()
    for other in ("24", "4096"):  # another value, and the default given (4096 in chunks of 8)
        code = run(data, outdir, "--particles-per-stack", other)
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("dsub: error:") and len(err.splitlines()) == 1, err
        assert f"--particles-per-stack was 16, now {other}" in err and "--overwrite" in err
        assert (outdir / "particles_subtracted.star").read_bytes() == star
    assert sorted(p.name for p in (outdir / "Particles").iterdir()) == [
        f"subtracted_{k:04d}.mrcs" for k in range(-(-COUNT // 16))]
    for same in (("--particles-per-stack", "16"), ()):  # the same run, and the option left out (kept, as chunks)
        assert run(data, outdir, *same) == 0
        assert "nothing to do" in capsys.readouterr().out
    # other chunks make another run: the stacks left out are the default again, and said as changed too
    assert run(data, outdir, "--chunk-size", "4") == 2
    err = capsys.readouterr().err
    assert "--chunk-size was 8, now 4" in err, err
    assert "--particles-per-stack was 16, now 4096 (the default for these chunks)" in err, err
    # a value that is not whole chunks is said as rounded
    assert run(data, tmp_path / "rounded", "--particles-per-stack", "20") == 0
    assert "--particles-per-stack 20: stacks of 16 particles, whole chunks of 8." in capsys.readouterr().out


def test_a_resumed_run_keeps_its_stacks_without_the_option(data, tmp_path, capsys, ctrl_c_after_chunks):
    """A run with --particles-per-stack stopped after its first chunks, resumed by the command without it: the
    stacks of the first command, as a resume keeps its chunks."""
    outdir = tmp_path / "out"
    with ctrl_c_after_chunks(2):
        assert run(data, outdir, "--particles-per-stack", "16", "--scheduler", "sync") == 130
    capsys.readouterr()
    assert run(data, outdir, "--scheduler", "sync") == 0
    assert json.loads((outdir / "dsub_run.json").read_text())["chunks_skipped"] == 2
    assert sorted(p.name for p in (outdir / "Particles").iterdir()) == [
        f"subtracted_{k:04d}.mrcs" for k in range(-(-COUNT // 16))]


def test_an_output_folder_that_cannot_be_made_is_refused_before_the_inputs_are_read(data, tmp_path, capsys,
                                                                                      monkeypatch):
    import dsub.workflow.pipeline as pipeline

    def read_particles(*args, **kwargs):
        raise AssertionError("the particles were read before the output folder was checked")

    monkeypatch.setattr(pipeline, "read_particles", read_particles)
    blocking = tmp_path / "a_file"
    blocking.write_text("not a folder")
    line = assert_refused(run(data, blocking / "out"), capsys, blocking / "out", blocking)
    assert "is a file, not a folder" in line


def test_a_run_refused_at_its_inputs_leaves_no_output_folder(data, tmp_path, capsys):
    """The output folder is tried early (made and removed again), so a bad input later leaves nothing."""
    garbage = tmp_path / "particles.star"
    garbage.write_text("this is not a STAR file\n")
    outdir = tmp_path / "new" / "out"
    assert_refused(run(data, outdir, star=garbage), capsys, outdir, garbage)
    assert not (tmp_path / "new").exists()


def test_a_word_in_a_numeric_column_is_one_line_naming_the_column_and_row(data, tmp_path, capsys):
    text = data["star"].read_text().splitlines()
    first_row = next(number for number, line in enumerate(text) if "@" in line)
    values = text[first_row + 3].split()
    labels = [line.split()[0] for line in text[:first_row] if line.startswith("_rln")]
    values[labels[-len(values):].index("_rlnDefocusU")] = "abc"
    text[first_row + 3] = "\t".join(values)
    data["star"].write_text("\n".join(text) + "\n")
    line = assert_refused(run(data, tmp_path / "out"), capsys, tmp_path / "out", data["star"])
    assert f"particle row 4 (1-based, line {first_row + 4} of the file) has rlnDefocusU = 'abc', not a number" in line


@pytest.mark.parametrize("keep", [13, 7], ids=["all-but-the-last-value", "mid-row"])
def test_a_star_cut_short_in_its_last_row_is_refused_as_truncated(data, tmp_path, capsys, keep):
    text = data["star"].read_text().rstrip("\n").splitlines()
    labels = sum(line.startswith("_rln") for line in text[text.index("data_particles"):])
    text[-1] = "\t".join(text[-1].split("\t")[:keep])
    data["star"].write_text("\n".join(text))  # no newline: a copy stopped there
    line = assert_refused(run(data, tmp_path / "out"), capsys, tmp_path / "out", data["star"])
    assert (f"particle row {COUNT} (1-based, line {len(text)} of the file) has {keep} values but the loop has "
            f"{labels} columns: the file looks cut short (truncated") in line
    assert not (tmp_path / "out").exists()


def unused_port() -> int:
    """A port of 127.0.0.1 that nothing listens on, below the range the system draws connections' own ports
    from: a connection to a free port in that range can get that very port as its own and connect to itself
    (TCP's simultaneous open), which looks like a scheduler that answers."""
    import random
    import socket

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    for port in random.sample(range(1024, low), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port of 127.0.0.1 below {low}")


@pytest.mark.parametrize("existing", [False, True], ids=["new-outdir", "existing-outdir"])
def test_unreachable_scheduler_leaves_outdir_as_it_was(data, tmp_path, capsys, existing):
    """A run that cannot reach its scheduler leaves no lock file, no log and no new folder."""
    outdir = tmp_path / "runs" / "out"
    if existing:
        outdir.mkdir(parents=True)
        (outdir / "notes.txt").write_text("the user's own file\n")
    address = f"tcp://127.0.0.1:{unused_port()}"
    code = run(data, outdir, "--scheduler", address, "--worker-timeout", "1")
    line = assert_refused(code, capsys, outdir, address)
    assert "cannot reach the Dask scheduler" in line and "Check that it is running" in line
    if existing:
        assert sorted(path.name for path in outdir.iterdir()) == ["notes.txt"]
    else:
        assert not (tmp_path / "runs").exists()


def test_failed_run_keeps_what_was_there_before(data, tmp_path, capsys):
    """An OUTDIR with an earlier attempt's lock file and log keeps both; the log records the new attempt."""
    outdir = tmp_path / "out"
    outdir.mkdir()
    (outdir / ".dsub.lock").write_text("pid 1 on elsewhere, started 2026-11-29 10:00:00")
    (outdir / "dsub.log").write_text("==== an earlier attempt\n")
    address = f"tcp://127.0.0.1:{unused_port()}"
    assert_refused(run(data, outdir, "--scheduler", address, "--worker-timeout", "1"), capsys, outdir, address)
    assert sorted(path.name for path in outdir.iterdir()) == [".dsub.lock", "dsub.log"]
    log = (outdir / "dsub.log").read_text()
    assert log.startswith("==== an earlier attempt\n") and f"cannot reach the Dask scheduler at {address}" in log


@pytest.mark.parametrize("device, figures", [
    ("auto", ["of GPU memory if it computes on a GPU (batches of ", "of host memory on its CPU alone (batches of "]),
    ("cpu", ["of host memory (no GPU, batches of "]),
    ("gpu", ["of GPU memory (on a GPU, batches of "]),
])
def test_refused_scheduler_port_is_one_line_at_once_after_a_true_memory_line(data, tmp_path, capsys, device,
                                                                             figures):
    """Nothing listens there: Dask's client would retry for 30 s; the port's refusal is the error at once.

    An existing scheduler's workers are not known before they answer: the memory line does not assume a GPU.
    """
    outdir = tmp_path / "out"
    address = f"tcp://127.0.0.1:{unused_port()}"
    code = run(data, outdir, "--scheduler", address, "--device", device)  # --worker-timeout: 300 s
    out, err = capsys.readouterr()
    assert code == 2, err
    port = address.rsplit(":", 1)[1]
    assert err.splitlines() == [f"dsub: error: cannot reach the Dask scheduler at {address}: nothing listens on "
                                f"port {port} of 127.0.0.1 (connection refused). Check that it is running and that "
                                "this machine can reach that address and port (dask scheduler prints it as it "
                                "starts)."]
    (memory,) = [line for line in out.splitlines() if line.startswith("Memory:")]
    assert memory.startswith(f"Memory: each worker of the scheduler at {address} needs about ")
    assert memory.endswith(", with one task at a time; each is checked against its own device, memory limit and "
                           "threads as it joins.")
    for words in figures:
        assert words in memory, memory
    assert ("GPU memory" in memory) == (device != "cpu")


def test_cluster_options_a_threaded_run_does_not_use_are_named_in_a_warning(data, tmp_path, capsys):
    assert run(data, tmp_path / "out", "--interface", "nosuchif", "--dashboard-address", "nonsense") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dsub: warning:")]
    assert len(warnings) == 1
    assert "--interface nosuchif and --dashboard-address nonsense: not used by --scheduler threads" in warnings[0]


def name_image(star_path, row, name):
    def edit(blocks):
        blocks["particles"]["rlnImageName"] = blocks["particles"]["rlnImageName"].astype(object)
        blocks["particles"].loc[row, "rlnImageName"] = name
    edit_particles(star_path, edit)


def test_an_image_name_without_its_number_for_a_stack_of_several_images_is_refused(data, tmp_path, capsys):
    """RELION reads a name without N@ as the whole file: right for a particle only where the file holds one image."""
    name_image(data["star"], 3, "particles.mrcs")
    lines = data["star"].read_text().splitlines()
    fourth = next(number for number, text in enumerate(lines, 1) if text.split()[:1] == ["particles.mrcs"])
    line = assert_refused(run(data, tmp_path / "out"), capsys, tmp_path / "out", data["star"], data["stack"])
    assert f"particle 4 (line {fourth} of the file) has the image name 'particles.mrcs', without N@" in line
    assert f"holds {COUNT} images" in line and "000001@particles.mrcs" in line
    assert not (tmp_path / "out" / "subtracted.zarr").exists()  # refused before any chunk


def test_an_image_name_without_its_number_for_a_file_of_one_image_is_that_image(data, tmp_path, capsys):
    from dsub.formats import read_particles
    from dsub.formats.mrc import read_images

    def subtracted(outdir):
        table = read_particles(outdir / "particles_subtracted.star")
        return read_images(table.image_paths, table.image_indices)

    assert run(data, tmp_path / "reference") == 0
    with mrcfile.open(data["stack"]) as mrc:
        fourth = np.array(mrc.data[3])
    with write_stack(data["stack"].parent / "single.mrcs", fourth[None], PIXEL_SIZE):
        pass
    name_image(data["star"], 3, "single.mrcs")
    outdir = tmp_path / "out"
    assert run(data, outdir) == 0, capsys.readouterr().err
    reference = subtracted(tmp_path / "reference")  # the same images, in another order of reading: to rounding
    np.testing.assert_allclose(subtracted(outdir), reference, rtol=0, atol=1e-4 * np.abs(reference).max())


def test_a_different_particle_file_is_named_in_a_grammatical_line(data, tmp_path, capsys):
    """Another particle file in a finished run's OUTDIR: refused naming both files ('the particles was' before)."""
    import shutil

    outdir = tmp_path / "out"
    assert run(data, outdir) == 0
    other = data["star"].with_name("other.star")
    shutil.copy2(data["star"], other)
    capsys.readouterr()
    assert run(data, outdir, star=other) == 2
    err = capsys.readouterr().err
    assert f"the particle file was {data['star'].resolve()}, now {other.resolve()}" in err, err
    assert "the particles was" not in err


def test_nan_images_shared_by_symmetry_expanded_rows_are_counted_as_images_and_particles():
    """Three rows of one image (symmetry expansion) are one bad image used by three particles."""
    from types import SimpleNamespace

    from dsub.errors import InputFileError
    from dsub.workflow.tasks import refuse_nonfinite

    def refused(bad, paths, indices):
        particles = SimpleNamespace(image_paths=np.array(paths), image_indices=np.array(indices))
        with pytest.raises(InputFileError) as error:
            refuse_nonfinite(np.array(bad), particles, skip=False)
        return str(error.value)

    one_image = refused([False, True, True, True], ["a.mrcs"] * 4, [0, 4, 4, 4])
    assert "image 5 (1-based) contains NaN or infinite values (3 particles of this chunk use it)." in one_image
    two = refused([True, True, True], ["a.mrcs", "a.mrcs", "b.mrcs"], [1, 1, 1])
    assert "(3 particles of this chunk use 2 such images)" in two
    assert "(2 such images in this chunk)" in refused([True, True], ["a.mrcs", "a.mrcs"], [1, 2])
    assert "contains NaN or infinite values." in refused([True, False], ["a.mrcs", "a.mrcs"], [1, 2])
    particles = SimpleNamespace(image_paths=np.array(["a.mrcs"]), image_indices=np.array([0]))
    assert refuse_nonfinite(np.array([True]), particles, skip=True).tolist() == [True]
