"""``--float16`` (MRC mode 12 stacks, a float16 store) and the store's images deleted after the export.

The truth for the float16 outputs is the float32 run of the same command rounded by NumPy to
float16 (IEEE 754 round-to-nearest-even): the engine computes in float32 either way, so the two
runs differ only by that rounding. Mode 12 is MRC2014's float16 mode, checked with mrcfile's own
validator. Small noisy demo data set (box 32) keep the runs quick.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import zarr

from dsub.cli import main
from dsub.demo import make_dataset
from dsub.formats import star as star_format
from dsub.formats.mrc import read_images, write_stack

BOX = 32
COUNT = 40
CHUNK = 16  # 3 chunks: 16, 16, 8
PER_STACK = 32  # 2 stacks: 32 and 8 particles
HEADER_BYTES = 1024  # an MRC header; dsub writes no extended header
STAR_OUT = "particles_subtracted.star"


def run_cli(paths, outdir, *extra) -> int:
    return main([
        "subtract", str(paths["star"]), "--half-a", str(paths["half_a"]), "--half-b", str(paths["half_b"]),
        "--mask", str(paths["mask"]), "-o", str(outdir), "--chunk-size", str(CHUNK),
        "--particles-per-stack", str(PER_STACK), "--padding", "2", "--quiet", *extra,
    ])


def stacks_of(outdir) -> list[Path]:
    return sorted((Path(outdir) / "Particles").glob("*.mrcs"))


def store_of(outdir):
    return zarr.open_group(str(Path(outdir) / "subtracted.zarr"), mode="r")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dataset")
    paths, _ = make_dataset(folder, count=COUNT, box=BOX, snr=1.0)
    return paths


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    """(float32 run with the default deletion of the store's images, float16 run with --keep-store)."""
    root = tmp_path_factory.mktemp("runs")
    assert run_cli(dataset, root / "f32") == 0
    assert run_cli(dataset, root / "f16", "--float16", "--keep-store") == 0
    return root / "f32", root / "f16"


def test_float16_stacks_are_mode_12_holding_the_float32_result_rounded(runs):
    single, half = runs
    assert [p.name for p in stacks_of(single)] == [p.name for p in stacks_of(half)] and len(stacks_of(half)) == 2
    for wide, narrow in zip(stacks_of(single), stacks_of(half)):
        assert mrcfile.validate(str(narrow), print_file=io.StringIO())
        with mrcfile.open(wide) as reference, mrcfile.open(narrow) as mrc:
            assert int(mrc.header.mode) == 12 and mrc.data.dtype == np.float16
            assert int(reference.header.mode) == 2
            assert float(mrc.voxel_size.x) == pytest.approx(float(reference.voxel_size.x))
            np.testing.assert_array_equal(mrc.data, reference.data.astype(np.float16))
            assert float(mrc.header.dmax) == pytest.approx(float(mrc.data.max()), rel=1e-6)
            assert float(mrc.header.dmean) == pytest.approx(float(mrc.data.astype(np.float64).mean()), abs=1e-4)
    # Read back through the star file (as RELION would), float32 in memory.
    table = star_format.read_particles(half / STAR_OUT)
    images = read_images(table.image_paths, table.image_indices)
    reference = star_format.read_particles(single / STAR_OUT)
    expected = read_images(reference.image_paths, reference.image_indices).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(images, expected)
    summary = json.loads((half / "dsub_run.json").read_text())
    assert summary["outputs"]["stack_dtype"] == "float16" and summary["outputs"]["store_images"] == "kept"


def test_float16_halves_the_bytes_of_the_stacks(runs):
    single, half = runs
    wide = sum(path.stat().st_size for path in stacks_of(single))
    narrow = sum(path.stat().st_size for path in stacks_of(half))
    headers = HEADER_BYTES * len(stacks_of(half))
    assert wide - headers == COUNT * BOX * BOX * 4
    assert narrow - headers == (wide - headers) // 2


def test_store_dtype_and_images_deleted_unless_keep_store(runs):
    single, half = runs
    kept = store_of(half)
    assert kept["images"].dtype == np.float16 and kept["images"].shape == (COUNT, BOX, BOX)
    table = star_format.read_particles(half / STAR_OUT)
    np.testing.assert_array_equal(np.asarray(kept["images"][:]).astype(np.float32),
                                  read_images(table.image_paths, table.image_indices))
    deleted = store_of(single)
    assert "images" not in deleted and not (single / "subtracted.zarr" / "images").exists()
    assert deleted.attrs["images_deleted"] is True
    # What the QC report and a rerun read stays.
    for name in ("contrast", "contrast_sigma", "fit_correlation", "skipped", "chunk_done"):
        assert name in deleted
    assert np.asarray(deleted["chunk_done"][:]).all() and np.isfinite(deleted["contrast"][:]).all()
    assert "fingerprint" in deleted.attrs["run"]
    assert json.loads((single / "dsub_run.json").read_text())["outputs"]["store_images"] == "deleted"


def test_report_of_a_run_whose_store_images_were_deleted(runs, tmp_path, capsys):
    single, _ = runs
    outdir = tmp_path / "copy"
    shutil.copytree(single, outdir)
    shutil.rmtree(outdir / "report")
    capsys.readouterr()
    assert main(["report", str(outdir)]) == 0
    assert (outdir / "report" / "index.html").is_file()
    assert "dsub: error" not in capsys.readouterr().err


def test_rerun_of_a_finished_run_says_so_and_leaves_it_alone(dataset, runs, tmp_path, capsys):
    single, _ = runs
    outdir = tmp_path / "out"
    shutil.copytree(single, outdir)
    before = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in stacks_of(outdir)}
    # The copy's star still names the first folder's stacks (absolute paths): the first rerun names its own.
    capsys.readouterr()
    assert run_cli(dataset, outdir) == 0
    assert "written again" in capsys.readouterr().out
    table = star_format.read_particles(outdir / STAR_OUT)
    assert {Path(path).parent for path in table.image_paths} == {outdir / "Particles"}
    star = (outdir / STAR_OUT).read_bytes()
    summary = (outdir / "dsub_run.json").read_text()
    assert run_cli(dataset, outdir) == 0
    out = capsys.readouterr().out
    assert "already holds the finished results of this run" in out and "--overwrite" in out
    assert "written again" not in out
    assert {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in stacks_of(outdir)} == before
    assert (outdir / STAR_OUT).read_bytes() == star and (outdir / "dsub_run.json").read_text() == summary
    log = (outdir / "dsub.log").read_text()
    assert log.count("==== ") == 3 and "already holds the finished results" in log

    # The metadata or a stack lost after the images were deleted: nothing to export from, so computed afresh.
    for lost in (outdir / STAR_OUT, stacks_of(outdir)[-1]):
        lost.unlink()
        assert run_cli(dataset, outdir) == 0
        assert json.loads((outdir / "dsub_run.json").read_text())["chunks_skipped"] == 0
        for path in before:
            with mrcfile.open(path) as mrc, mrcfile.open(single / "Particles" / path.name) as reference:
                np.testing.assert_array_equal(mrc.data, reference.data)


def test_rerun_with_another_float16_choice_needs_overwrite(dataset, runs, tmp_path, capsys):
    single, _ = runs
    outdir = tmp_path / "out"
    shutil.copytree(single, outdir)
    star = (outdir / STAR_OUT).read_bytes()
    capsys.readouterr()
    assert run_cli(dataset, outdir, "--float16") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsub: error:") and len(err.splitlines()) == 1
    assert "--float16 was off, now on" in err and "--overwrite" in err
    assert (outdir / STAR_OUT).read_bytes() == star

    assert run_cli(dataset, outdir, "--float16", "--overwrite") == 0
    assert all(mrcfile.open(path).header.mode == 12 for path in stacks_of(outdir))
    # ... and back: the float16 run is refused for a float32 rerun in the same words.
    assert run_cli(dataset, outdir) == 2
    assert "--float16 was on, now off" in capsys.readouterr().err


def test_values_beyond_float16_stop_the_run_with_one_error(dataset, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    paths = {key: Path(shutil.copy2(path, folder / Path(path).name)) for key, path in dataset.items()}
    with mrcfile.open(paths["stack"]) as mrc:
        images = np.asarray(mrc.data, dtype=np.float32) * 1e5  # unnormalised: far beyond ±65504
        voxel = float(mrc.voxel_size.x)
    with write_stack(paths["stack"], images, voxel):
        pass
    outdir = tmp_path / "out"
    capsys.readouterr()
    assert run_cli(paths, outdir, "--float16") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsub: error:") and len(err.splitlines()) == 1
    assert "65504" in err and "--float16" in err and "particles.mrcs" in err
    assert not (outdir / STAR_OUT).exists() and not list((outdir / "Particles").glob("*.mrcs"))
