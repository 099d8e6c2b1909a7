"""Project layouts of RELION and cryoSPARC: passthrough files, and the outputs opened as each program opens them.

The outputs are read with third-party readers from the program's own starting
folder: ``starfile`` + ``mrcfile`` from the RELION project folder (RELION opens
image names relative to the folder it runs in), and cryosparc-tools'
``Dataset.load`` with ``blob/path`` joined to the cryoSPARC project folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from dsub.cli import main
from dsub.demo import make_dataset
from dsub.errors import InputFileError, OptionError
from dsub.formats import cs as cs_format
from dsub.formats import read_particles
from dsub.formats import star as star_format
from dsub.formats.mrc import read_images
from dsub.formats.paths import cryosparc_project_folder, written_paths

BOX = 32
COUNT = 24
P12 = "cryodrgn/cryosparc_P12_J24_001_particles.cs"
#: What is left of the masked region at this small box with fitted contrast (about 4 %; 100 % unsubtracted).
LIMIT = 0.06


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A noise-free demo dataset (copy before editing)."""
    folder = tmp_path_factory.mktemp("layout_data")
    return make_dataset(folder, count=COUNT, box=BOX, snr=None)


def run(particles, paths, outdir, *extra) -> int:
    return main([
        "subtract", str(particles), "--half-a", str(paths["half_a"]), "--half-b", str(paths["half_b"]),
        "--mask", str(paths["mask"]), "-o", str(outdir), "--chunk-size", "8", "--quiet",
        *map(str, extra),
    ])


def expected_images(sim) -> np.ndarray:
    return sim.images - sim.subtracted_signal


def residual(images, sim, rows=slice(None)) -> float:
    """What is left of the masked region in ``images``, the subtracted images of particles ``rows``."""
    return float(np.linalg.norm(images - expected_images(sim)[rows]) / np.linalg.norm(sim.subtracted_signal[rows]))


def open_relion_names(names) -> np.ndarray:
    """Images named ``N@stack`` opened relative to the current folder, as RELION does."""
    images = []
    for name in names:
        number, stack = name.split("@", 1)
        with mrcfile.open(stack, permissive=False) as mrc:
            images.append(np.asarray(mrc.data[int(number) - 1]))
    return np.stack(images)


def _save(path: Path, data: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, data, allow_pickle=False)


# ----------------------------------------------------------------------------- RELION project


def relion_project(dataset, root: Path) -> dict:
    """A RELION project: stacks in Extract/job007, a star three folders down naming them project-relative."""
    paths, sim = dataset
    (root / "Extract/job007").mkdir(parents=True)
    shutil.copy2(paths["stack"], root / "Extract/job007/particles.mrcs")
    star_dir = root / "External/job020/select"
    star_dir.mkdir(parents=True)
    blocks = starfile.read(paths["star"], always_dict=True)
    blocks["particles"]["rlnImageName"] = [f"{i + 1:06d}@Extract/job007/particles.mrcs" for i in range(COUNT)]
    blocks["particles"]["rlnClassNumber"] = 1
    starfile.write(blocks, star_dir / "run_data.star")
    return {**paths, "star": star_dir / "run_data.star"}


def test_relion_project_output_opens_from_the_project_folder(dataset, tmp_path, monkeypatch):
    """Run from the project folder with -o Subtract/job011: RELION finds every image from there."""
    paths, sim = dataset
    project = tmp_path / "relion_project"
    files = relion_project(dataset, project)
    monkeypatch.chdir(project)
    # The star's image names are project-relative and the star sits three folders down:
    # only the current folder (RELION's rule) finds them.
    assert run(Path("External/job020/select/run_data.star"), files, "Subtract/job011") == 0

    rows = starfile.read("Subtract/job011/particles_subtracted.star", always_dict=True)["particles"]
    names = rows["rlnImageName"].tolist()
    assert all(name.split("@", 1)[1].startswith("Subtract/job011/Particles/") for name in names)
    assert rows["rlnImageOriginalName"].tolist()[0] == "000001@Extract/job007/particles.mrcs"
    assert residual(open_relion_names(names), sim) < LIMIT
    np.testing.assert_array_equal(open_relion_names(rows["rlnImageOriginalName"]), sim.images)

    # OUTDIR outside the current folder: absolute paths, which RELION opens from anywhere.
    assert run(files["star"], files, tmp_path / "outside") == 0
    rows = starfile.read(tmp_path / "outside/particles_subtracted.star", always_dict=True)["particles"]
    assert all(os.path.isabs(n.split("@", 1)[1]) for n in rows["rlnImageName"])
    monkeypatch.chdir(tmp_path)
    assert residual(open_relion_names(rows["rlnImageName"]), sim) < LIMIT


def refine_star(files: dict, project: Path) -> Path:
    """The project's star copied to ``Refine3D/job025/run_data.star``: two folders down, as RELION's own jobs."""
    star = project / "Refine3D/job025/run_data.star"
    star.parent.mkdir(parents=True)
    shutil.copy2(files["star"], star)
    return star


def star_base_line(project: Path) -> str:
    return (f"The input star's image names start from {project} (RELION's project folder): the output star's "
            "names are written from there too.")


def test_star_input_run_from_above_its_project_names_the_outputs_from_the_project(dataset, tmp_path, monkeypatch,
                                                                                   capsys):
    """``cd above && dsub subtract relproj/Refine3D/job025/run_data.star -o relproj/Subtract/job051``: the input's
    names start from relproj (found above the star), and so do the new names and the skipped particles' names."""
    from dsub.formats.mrc import read_images as read_stack_images

    paths, sim = dataset
    project = tmp_path / "relproj"
    files = relion_project(dataset, project)
    refine_star(files, project)
    with mrcfile.mmap(project / "Extract/job007/particles.mrcs", mode="r+") as mrc:
        mrc.data[5, 3, 5] = np.nan  # left out with --skip-bad-particles
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert run(Path("relproj/Refine3D/job025/run_data.star"), files, "relproj/Subtract/job051",
               "--skip-bad-particles") == 0
    assert [line for line in capsys.readouterr().out.splitlines() if "image names start" in line] == \
        [star_base_line(project)]
    outdir = project / "Subtract/job051"
    rows = starfile.read(outdir / "particles_subtracted.star", always_dict=True)["particles"]
    kept = np.arange(COUNT) != 5
    names = rows["rlnImageName"].tolist()
    assert names[0] == "000001@Subtract/job051/Particles/subtracted_0000.mrcs"
    assert rows["rlnImageOriginalName"].tolist()[0] == "000001@Extract/job007/particles.mrcs"
    skipped = starfile.read(outdir / "skipped_particles.star", always_dict=True)["particles"]
    assert skipped["rlnImageName"].tolist() == ["000006@Extract/job007/particles.mrcs"]
    summary = json.loads((outdir / "dsub_run.json").read_text())["outputs"]
    assert summary["star_root"] == str(project)
    assert summary["stack_names"]["star"] == "Subtract/job051/Particles/subtracted_0000.mrcs"

    monkeypatch.chdir(project)  # where RELION runs: every name of the three columns opens from here
    assert residual(open_relion_names(names), sim, kept) < LIMIT
    np.testing.assert_array_equal(open_relion_names(rows["rlnImageOriginalName"]), sim.images[kept])
    poisoned = sim.images[5].copy()
    poisoned[3, 5] = np.nan
    np.testing.assert_array_equal(open_relion_names(skipped["rlnImageName"])[0], poisoned)
    # And dsub reads the output star back from anywhere, as any star.
    monkeypatch.chdir(tmp_path)
    again = read_particles(outdir / "particles_subtracted.star")
    assert again.extra["star_base"] == project
    assert residual(read_stack_images(again.image_paths, again.image_indices), sim, kept) < LIMIT


def test_star_input_run_from_inside_its_project_and_rerun_from_elsewhere(dataset, tmp_path, monkeypatch, capsys):
    """Run from ``relproj/Refine3D``, then the finished run rerun with another --paths and from above the project:
    the star's names start from the project each time, and a rerun that would name them alike writes nothing."""
    paths, sim = dataset
    project = tmp_path / "relproj"
    files = relion_project(dataset, project)
    refine_star(files, project)
    outdir = project / "Subtract/job052"
    monkeypatch.chdir(project / "Refine3D")
    capsys.readouterr()
    assert run(Path("job025/run_data.star"), files, "../Subtract/job052", "--paths", "absolute") == 0
    assert "image names start" not in capsys.readouterr().out  # --paths absolute: no folder to name
    rows = starfile.read(outdir / "particles_subtracted.star", always_dict=True)["particles"]
    assert rows["rlnImageName"].iloc[0] == f"000001@{outdir}/Particles/subtracted_0000.mrcs"
    assert json.loads((outdir / "dsub_run.json").read_text())["outputs"]["star_root"] is None

    # The finished run rerun with --paths auto from the same subfolder: written again, from the project.
    assert run(Path("job025/run_data.star"), files, "../Subtract/job052") == 0
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if "image names start" in line] == [star_base_line(project)]
    said = [line for line in out if "already holds" in line]
    assert len(said) == 1 and f"written again with --paths auto, the star's names from {project} " in said[0], said
    rows = starfile.read(outdir / "particles_subtracted.star", always_dict=True)["particles"]
    names = rows["rlnImageName"].tolist()
    assert names[0] == "000001@Subtract/job052/Particles/subtracted_0000.mrcs"
    summary = json.loads((outdir / "dsub_run.json").read_text())["outputs"]
    assert summary["star_root"] == str(project)
    assert summary["stack_names"]["star"] == "Subtract/job052/Particles/subtracted_0000.mrcs"
    monkeypatch.chdir(project)
    assert residual(open_relion_names(names), sim) < LIMIT
    np.testing.assert_array_equal(open_relion_names(rows["rlnImageOriginalName"]), sim.images)

    # From above the project (the command the user gave): the names would be the same, so nothing is written.
    star = (outdir / "particles_subtracted.star").read_bytes()
    monkeypatch.chdir(tmp_path)
    assert run(Path("relproj/Refine3D/job025/run_data.star"), files, "relproj/Subtract/job052") == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out and star_base_line(project) in out
    assert (outdir / "particles_subtracted.star").read_bytes() == star

    # --paths relative with OUTDIR outside the project: from the project still, with ../
    assert run(Path("relproj/Refine3D/job025/run_data.star"), files, tmp_path / "side", "--paths", "relative") == 0
    rows = starfile.read(tmp_path / "side/particles_subtracted.star", always_dict=True)["particles"]
    assert rows["rlnImageName"].iloc[0] == "000001@../side/Particles/subtracted_0000.mrcs"
    monkeypatch.chdir(project)
    assert residual(open_relion_names(rows["rlnImageName"]), sim) < LIMIT


def test_star_with_absolute_image_names_is_written_from_the_current_folder(dataset, tmp_path, monkeypatch, capsys):
    """No name of the input starts anywhere: the current folder is RELION's, as before, and nothing is said."""
    paths, sim = dataset
    blocks = starfile.read(paths["star"], always_dict=True)
    blocks["particles"]["rlnImageName"] = [f"{i + 1:06d}@{paths['stack']}" for i in range(COUNT)]
    (tmp_path / "input").mkdir()
    starfile.write(blocks, tmp_path / "input/run_data.star")
    assert read_particles(tmp_path / "input/run_data.star").extra["star_base"] is None
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    capsys.readouterr()
    assert run(tmp_path / "input/run_data.star", paths, "Subtract/job1") == 0
    assert "image names start" not in capsys.readouterr().out
    rows = starfile.read("Subtract/job1/particles_subtracted.star", always_dict=True)["particles"]
    assert rows["rlnImageName"].iloc[0] == "000001@Subtract/job1/Particles/subtracted_0000.mrcs"
    assert residual(open_relion_names(rows["rlnImageName"]), sim) < LIMIT
    assert json.loads(Path("Subtract/job1/dsub_run.json").read_text())["outputs"]["star_root"] == str(tmp_path / "work")


def test_relion_coordinates_reach_the_cs_as_locations(dataset, tmp_path, monkeypatch):
    """A RELION project's particles with micrographs on disk: the output .cs places them on their micrographs."""
    paths, _ = dataset
    project = tmp_path / "relion_project"
    files = relion_project(dataset, project)
    blocks = starfile.read(files["star"], always_dict=True)
    blocks["particles"]["rlnMicrographName"] = [f"MotionCorr/job002/mic_{i % 3}.mrc" for i in range(COUNT)]
    blocks["particles"]["rlnCoordinateX"] = np.arange(COUNT) * 100.0 + 50
    blocks["particles"]["rlnCoordinateY"] = np.arange(COUNT) * 60.0 + 7
    starfile.write(blocks, files["star"])
    (project / "MotionCorr/job002").mkdir(parents=True)
    for i in range(3):
        with mrcfile.new(project / f"MotionCorr/job002/mic_{i}.mrc") as mrc:
            mrc.set_data(np.zeros((1500, 2500), dtype=np.float32))
    monkeypatch.chdir(project)
    assert run(Path("External/job020/select/run_data.star"), files, "Subtract/job011") == 0
    out = np.load("Subtract/job011/particles_subtracted.cs", max_header_size=2**30)
    # No cryoSPARC project known: absolute, as the stacks' blob/path.
    assert out["location/micrograph_path"][4].decode() == f"{project}/MotionCorr/job002/mic_1.mrc"
    assert out["blob/path"][0].decode().startswith(f"{project}/Subtract/job011/")
    # A cryoSPARC project folder holding the micrographs (--cs-root): relative to it, as cryoSPARC opens them.
    assert run(Path("External/job020/select/run_data.star"), files, "Subtract/job013", "--cs-root", "MotionCorr") == 0
    in_project = np.load("Subtract/job013/particles_subtracted.cs", max_header_size=2**30)
    assert in_project["location/micrograph_path"][4].decode() == "job002/mic_1.mrc"
    assert (out["location/micrograph_shape"] == [1500, 2500]).all()
    np.testing.assert_allclose(out["location/center_x_frac"], (np.arange(COUNT) * 100.0 + 50) / 2500, rtol=1e-6)
    np.testing.assert_allclose(out["location/center_y_frac"], 1 - (np.arange(COUNT) * 60.0 + 7) / 1500, rtol=1e-6)


def add_locations(files: dict, shapes: np.ndarray, seed: int = 3) -> dict:
    """cryoSPARC ``location/*`` fields for each particle of ``cryosparc_project``'s files, in its passthrough file.

    Each particle on one of ``len(shapes)`` micrographs ``J3/motioncorrected/..._mic_k.mrc`` of shape
    ``shapes[k]`` ([ny, nx]), its centre at random fractions kept away from half a pixel (where rounding
    would turn on the last bit). Returns the fields in the order of ``files["data"]`` (the main file's).
    """
    rng = np.random.default_rng(seed)
    micrograph = np.arange(COUNT) % len(shapes)
    shape = shapes[micrograph].astype("<u4")
    pixel = np.stack([rng.integers(10, shape[:, axis] - 10) for axis in (1, 0)], axis=1)  # (x, y)
    pixel = pixel + rng.uniform(0.1, 0.4, size=(COUNT, 2))  # never near x.5
    fields = {
        "location/micrograph_uid": (np.uint64(7_000_000_000_000_000_000) + micrograph.astype(np.uint64)),
        "location/micrograph_path": np.array(
            [f"J3/motioncorrected/00012345678901234567_mic_{k}_patch_aligned_doseweighted.mrc".encode()
             for k in micrograph]),
        "location/micrograph_shape": shape,
        "location/center_x_frac": (pixel[:, 0] / shape[:, 1]).astype("<f4"),
        "location/center_y_frac": (pixel[:, 1] / shape[:, 0]).astype("<f4"),
    }
    passthrough = files["cs"].parent / "J5_passthrough_particles_class_0.cs"
    rows = np.load(passthrough, max_header_size=2**30)
    order = {uid: row for row, uid in enumerate(files["data"]["uid"].tolist())}
    back = np.array([order[uid] for uid in rows["uid"].tolist()])  # the passthrough's own row order
    dtype = [(name, rows.dtype.fields[name][0]) for name in rows.dtype.names]
    dtype += [(name, np.dtype((values.dtype, values.shape[1:]))) for name, values in fields.items()]
    located = np.empty(len(rows), dtype=dtype)
    for name in rows.dtype.names:
        located[name] = rows[name]
    for name, values in fields.items():
        located[name] = values[back]
    _save(passthrough, located)
    return fields


def test_cryosparc_locations_reach_the_star(dataset, tmp_path, monkeypatch):
    """A .cs with location/* (in its passthrough file) through the command: the star places each particle on its
    micrograph as pyem's csparc2star does, the micrograph named from the folder RELION runs in."""
    paths, _ = dataset
    files = cryosparc_project(dataset, tmp_path / "P3", classes=False)
    shapes = np.array([[4092, 5760], [5760, 4092], [3838, 3710]])  # [ny, nx]: landscape, portrait, nearly square
    fields = add_locations(files, shapes)
    monkeypatch.chdir(tmp_path)  # RELION's project folder holds the cryoSPARC project P3
    assert run(files["cs"], paths, tmp_path / "P3/J30/dsub") == 0
    rows = starfile.read(tmp_path / "P3/J30/dsub/particles_subtracted.star", always_dict=True)["particles"]
    # pyem's csparc2star with its defaults (swapxy, inverty): COORDS = round([x_frac, 1 - y_frac] * shape[:, ::-1])
    shape = fields["location/micrograph_shape"].astype(np.float64)
    expected_x = np.round(fields["location/center_x_frac"].astype(np.float64) * shape[:, 1])
    expected_y = np.round((1 - fields["location/center_y_frac"].astype(np.float64)) * shape[:, 0])
    np.testing.assert_array_equal(rows["rlnCoordinateX"], expected_x)
    np.testing.assert_array_equal(rows["rlnCoordinateY"], expected_y)
    assert rows["rlnCoordinateX"].max() > 4092 and rows["rlnCoordinateY"].max() > 4092  # both axes' long sides used
    # The micrographs are not on this machine: their names start from the project folder above the .cs,
    # written from the current folder as RELION opens them.
    stored = [path.decode() for path in fields["location/micrograph_path"]]
    assert rows["rlnMicrographName"].tolist() == [os.path.join("P3", path) for path in stored]

    # Run from elsewhere: the names are absolute.
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert run(files["cs"], paths, tmp_path / "P3/J31/dsub") == 0
    rows = starfile.read(tmp_path / "P3/J31/dsub/particles_subtracted.star", always_dict=True)["particles"]
    assert rows["rlnMicrographName"].tolist() == [str(tmp_path / "P3" / path) for path in stored]

    # Without location/*, no location columns.
    plain = cryosparc_project(dataset, tmp_path / "P4", classes=False)
    assert run(plain["cs"], paths, tmp_path / "P4/J30/dsub") == 0
    rows = starfile.read(tmp_path / "P4/J30/dsub/particles_subtracted.star", always_dict=True)["particles"]
    assert not {"rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY"} & set(rows.columns)


def test_relion_locations_come_back_through_a_cs(dataset, tmp_path, monkeypatch):
    """star -> .cs -> star: micrograph names and (whole-pixel) coordinates come back unchanged."""
    paths, _ = dataset
    project = tmp_path / "relion_project"
    files = relion_project(dataset, project)
    blocks = starfile.read(files["star"], always_dict=True)
    names = [f"MotionCorr/job002/mic_{i % 3}.mrc" for i in range(COUNT)]
    blocks["particles"]["rlnMicrographName"] = names
    blocks["particles"]["rlnCoordinateX"] = np.arange(COUNT) * 211.0 + 13  # up to 4866: the long side is x
    blocks["particles"]["rlnCoordinateY"] = np.arange(COUNT) * 97.0 + 4
    starfile.write(blocks, files["star"])
    (project / "MotionCorr/job002").mkdir(parents=True)
    for i in range(3):
        with mrcfile.new(project / f"MotionCorr/job002/mic_{i}.mrc") as mrc:
            mrc.set_data(np.zeros((4092, 5760), dtype=np.float32))  # [ny, nx]
    monkeypatch.chdir(project)
    assert run(Path("External/job020/select/run_data.star"), files, "Subtract/job011") == 0
    assert run(Path("Subtract/job011/particles_subtracted.cs"), files, "Subtract/job012") == 0
    rows = starfile.read("Subtract/job012/particles_subtracted.star", always_dict=True)["particles"]
    assert rows["rlnMicrographName"].tolist() == names
    np.testing.assert_array_equal(rows["rlnCoordinateX"], blocks["particles"]["rlnCoordinateX"])
    np.testing.assert_array_equal(rows["rlnCoordinateY"], blocks["particles"]["rlnCoordinateY"])


def test_paths_option_writes_each_form(dataset, tmp_path, monkeypatch):
    paths, sim = dataset
    project = tmp_path / "p"
    files = relion_project(dataset, project)
    monkeypatch.chdir(project)
    for mode, expected in (("absolute", f"{project}/Subtract/job1/Particles/subtracted_0000.mrcs"),
                           ("outdir", "Particles/subtracted_0000.mrcs"),
                           ("relative", "Subtract/job1/Particles/subtracted_0000.mrcs")):
        assert run(files["star"], files, "Subtract/job1", "--paths", mode, "--overwrite") == 0
        rows = starfile.read("Subtract/job1/particles_subtracted.star", always_dict=True)["particles"]
        assert rows["rlnImageName"].iloc[0] == f"000001@{expected}", mode
    # relative to the current folder even for an OUTDIR outside it: with ../
    assert run(files["star"], files, tmp_path / "side", "--paths", "relative") == 0
    rows = starfile.read(tmp_path / "side/particles_subtracted.star", always_dict=True)["particles"]
    assert rows["rlnImageName"].iloc[0] == "000001@../side/Particles/subtracted_0000.mrcs"
    assert residual(open_relion_names(rows["rlnImageName"]), sim) < LIMIT


def test_paths_changed_on_a_finished_run_rewrites_its_metadata_only(dataset, tmp_path, monkeypatch, capsys):
    """--paths is no part of the run's identity: a finished run rerun with another --paths is not
    computed again, but its star and .cs name the stacks the new way."""
    paths, sim = dataset
    project = tmp_path / "p"
    files = relion_project(dataset, project)
    monkeypatch.chdir(project)
    outdir = Path("Subtract/job3")
    assert run(files["star"], files, outdir, "--paths", "relative") == 0
    stacks = sorted((outdir / "Particles").glob("*.mrcs"))
    before = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in stacks}
    relative = starfile.read(outdir / "particles_subtracted.star", always_dict=True)["particles"]
    assert relative["rlnImageName"].iloc[0] == "000001@Subtract/job3/Particles/subtracted_0000.mrcs"
    capsys.readouterr()

    assert run(files["star"], files, outdir, "--paths", "absolute") == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "already holds" in line]
    assert len(said) == 1 and "written again with --paths absolute" in said[0], said
    first = f"{project}/Subtract/job3/Particles/subtracted_0000.mrcs"
    rows = starfile.read(outdir / "particles_subtracted.star", always_dict=True)["particles"]
    assert rows["rlnImageName"].iloc[0] == f"000001@{first}"
    # Only the stack names changed: every other column as the first run wrote it; the originals absolute
    # too (both columns start from one folder), naming the same images.
    pd_testing = pytest.importorskip("pandas").testing
    names = ["rlnImageName", "rlnImageOriginalName"]
    pd_testing.assert_frame_equal(rows.drop(columns=names), relative.drop(columns=names))
    assert rows["rlnImageOriginalName"].tolist() == [
        f"{number}@{project / stack}" for number, stack in relative["rlnImageOriginalName"].str.split("@", n=1)]
    assert [name.split("@")[0] for name in rows["rlnImageName"]] == \
        [name.split("@")[0] for name in relative["rlnImageName"]]
    assert all(os.path.isabs(name.split("@", 1)[1]) for name in rows["rlnImageName"])
    assert np.load(outdir / "particles_subtracted.cs", max_header_size=2**30)["blob/path"][0].decode() == first
    assert {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in stacks} == before  # no image redone
    summary = json.loads((outdir / "dsub_run.json").read_text())
    assert summary["outputs"]["paths"] == "absolute" and summary["outputs"]["stack_names"]["star"] == first
    monkeypatch.chdir(tmp_path)
    assert residual(open_relion_names(rows["rlnImageName"]), sim) < LIMIT

    # The same command again: nothing left to do, nothing written.
    monkeypatch.chdir(project)
    star = (outdir / "particles_subtracted.star").read_bytes()
    capsys.readouterr()
    assert run(files["star"], files, outdir, "--paths", "absolute") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (outdir / "particles_subtracted.star").read_bytes() == star


def test_written_paths_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = np.array(["Particles/a.mrcs", "Particles/b.mrcs", "Particles/a.mrcs"], dtype=object)
    inside = written_paths(names, "Sub/job2", "auto", tmp_path)
    assert inside.tolist() == ["Sub/job2/Particles/a.mrcs", "Sub/job2/Particles/b.mrcs", "Sub/job2/Particles/a.mrcs"]
    outside = written_paths(names, tmp_path.parent / "x", "auto", tmp_path)
    assert outside[0] == str(tmp_path.parent / "x/Particles/a.mrcs")
    assert written_paths(names, "Sub", "auto", None)[1] == str(tmp_path / "Sub/Particles/b.mrcs")
    assert written_paths(names, "Sub", "outdir", tmp_path).tolist() == names.tolist()
    with pytest.raises(ValueError):
        written_paths(names, "Sub", "sideways", tmp_path)


def test_passthrough_option_refused_for_star_input(dataset, tmp_path, capsys):
    paths, _ = dataset
    assert run(paths["star"], paths, tmp_path / "o", "--passthrough", paths["star"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsub: error: --passthrough") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- cryoSPARC project


def cryosparc_project(dataset, root: Path, classes: bool = True) -> dict:
    """A cryoSPARC project: J19 extracted the stack, J5 is a heterogeneous refinement class output.

    ``J5_class_00_00262_particles.cs`` holds uid and alignments3D; blob and ctf are in
    ``J5_passthrough_particles_class_0.cs`` beside it, in another row order (as cryoSPARC writes them).
    """
    paths, sim = dataset
    (root / "J19/extract").mkdir(parents=True)
    (root / "J5").mkdir()
    (root / "project.json").write_text("{}")
    for job in ("J19", "J5"):
        (root / job / "job.json").write_text("{}")
    shutil.copy2(paths["stack"], root / "J19/extract/particles.mrc")
    table = star_format.read_particles(paths["star"])
    whole = root / "J5/whole.cs"
    cs_format.write_particles(table, whole, ["J19/extract/particles.mrc"] * COUNT, table.image_indices,
                              contrast=sim.contrast)
    data = np.load(whole, max_header_size=2**30)
    whole.unlink()
    main_fields = ["uid"] + [n for n in data.dtype.names if n.startswith("alignments3D/")]
    pass_fields = ["uid"] + [n for n in data.dtype.names if n.startswith(("blob/", "ctf/"))]
    main_file = root / "J5/J5_class_00_00262_particles.cs"
    _save(main_file, data[main_fields])
    _save(root / "J5/J5_passthrough_particles_class_0.cs", data[pass_fields][::-1].copy())
    if classes:  # another class's files beside it, which must not be picked
        other = data[:4].copy()
        other["uid"] += np.uint64(1)
        _save(root / "J5/J5_class_01_00262_particles.cs", other[main_fields])
        _save(root / "J5/J5_passthrough_particles_class_1.cs", other[pass_fields])
    return {**paths, "cs": main_file, "data": data}


def test_class_output_joined_with_its_passthrough(dataset, tmp_path):
    paths, sim = dataset
    files = cryosparc_project(dataset, tmp_path / "P3")
    table = read_particles(files["cs"])
    data = files["data"]
    assert len(table) == COUNT
    np.testing.assert_array_equal(table.source["uid"], data["uid"])
    np.testing.assert_allclose(table.defocus_u_angstrom, sim.defocus_u, rtol=1e-6)
    np.testing.assert_array_equal(table.image_indices, np.arange(COUNT))
    assert Path(table.image_paths[0]) == tmp_path / "P3/J19/extract/particles.mrc"
    assert table.extra["project_folder"] == tmp_path / "P3"
    assert [p.name for p in table.extra["passthrough"]] == ["J5_passthrough_particles_class_0.cs"]
    assert cryosparc_project_folder(files["cs"]) == tmp_path / "P3"


def test_a_joined_passthrough_file_is_said_with_its_rows_and_the_field_groups_it_adds(dataset, tmp_path, capsys):
    paths, _ = dataset
    files = cryosparc_project(dataset, tmp_path / "P3")
    assert run(files["cs"], paths, tmp_path / "P3/J30") == 0, capsys.readouterr().err
    joined = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Joined ")]
    assert joined == [f"Joined {tmp_path / 'P3/J5/J5_passthrough_particles_class_0.cs'} (found beside "
                      f"J5_class_00_00262_particles.cs) on uid: {COUNT} rows, adding the field groups blob and ctf."]

    # A file given with --passthrough that adds nothing the others have not (a copy of the same file).
    copy = tmp_path / "copy_pt.cs"
    shutil.copy2(tmp_path / "P3/J5/J5_passthrough_particles_class_0.cs", copy)
    table = read_particles(files["cs"], passthrough=[copy])
    assert [cs_format.joined_line(join, files["cs"]) for join in table.extra["passthrough_joins"]][1] == \
        f"Joined {copy} (--passthrough) on uid: {COUNT} rows, adding no field that the files before it lack."


def test_missing_passthrough_names_the_files_looked_for(dataset, tmp_path, capsys):
    paths, _ = dataset
    files = cryosparc_project(dataset, tmp_path / "P3", classes=False)
    moved = tmp_path / "elsewhere_pt.cs"
    shutil.move(tmp_path / "P3/J5/J5_passthrough_particles_class_0.cs", moved)
    with pytest.raises(InputFileError) as error:
        read_particles(files["cs"])
    message = str(error.value)
    assert "J5_passthrough_particles_class_0.cs" in message and "--passthrough" in message
    assert "blob/path" in message
    # The CLI: one line, exit 2; then --passthrough FILE gives it.
    assert run(files["cs"], paths, tmp_path / "P3/J30") == 2
    err = capsys.readouterr().err
    assert err.startswith("dsub: error: ") and err.count("\n") == 1 and "J5_passthrough_particles_class_0.cs" in err
    table = read_particles(files["cs"], passthrough=[moved])
    assert len(table) == COUNT and table.extra["passthrough"] == [moved]


def test_passthrough_missing_some_particles_warns(dataset, tmp_path):
    files = cryosparc_project(dataset, tmp_path / "P3", classes=False)
    pt = tmp_path / "P3/J5/J5_passthrough_particles_class_0.cs"
    _save(pt, np.load(pt, max_header_size=2**30)[:-3])
    with pytest.warns(UserWarning, match="3 of the 24 particles"):
        table = read_particles(files["cs"])
    assert len(table) == COUNT - 3


def test_cryosparc_project_output_loads_with_cryosparc_tools(dataset, tmp_path, monkeypatch):
    """OUTDIR inside the project: blob/path relative to the project folder, as cryoSPARC's own (J19/extract/...)."""
    dataset_cls = pytest.importorskip("cryosparc.dataset").Dataset
    paths, sim = dataset
    files = cryosparc_project(dataset, tmp_path / "P3")
    monkeypatch.chdir(tmp_path)  # not the project folder: the star gets absolute paths
    assert run(files["cs"], paths, tmp_path / "P3/J30/dsub") == 0
    out = dataset_cls.load(tmp_path / "P3/J30/dsub/particles_subtracted.cs")
    assert len(out) == COUNT
    blob_paths = list(out["blob/path"])
    assert all(p.startswith("J30/dsub/Particles/") for p in blob_paths)
    images = np.stack([
        mrcfile.open(tmp_path / "P3" / p).data[i] for p, i in zip(blob_paths, out["blob/idx"])
    ])
    assert residual(images, sim) < LIMIT
    np.testing.assert_array_equal(out["uid"], files["data"]["uid"])
    np.testing.assert_allclose(out["ctf/df1_A"], files["data"]["ctf/df1_A"])  # passthrough fields kept
    rows = starfile.read(tmp_path / "P3/J30/dsub/particles_subtracted.star", always_dict=True)["particles"]
    # A .cs input: the star's names start from the current folder, where RELION would run.
    assert rows["rlnImageName"].iloc[0] == "000001@P3/J30/dsub/Particles/subtracted_0000.mrcs"
    assert residual(open_relion_names(rows["rlnImageName"]), sim) < LIMIT
    # Outside the project: absolute blob/path.
    assert run(files["cs"], paths, tmp_path / "out") == 0
    out = dataset_cls.load(tmp_path / "out/particles_subtracted.cs")
    assert out["blob/path"][0] == str(tmp_path / "out/Particles/subtracted_0000.mrcs")


def test_cs_root_sets_the_project_of_a_star_inputs_cs(dataset, tmp_path, monkeypatch):
    dataset_cls = pytest.importorskip("cryosparc.dataset").Dataset
    paths, sim = dataset
    project = tmp_path / "P9"
    project.mkdir()
    monkeypatch.chdir(tmp_path)
    assert run(paths["star"], paths, project / "imports/dsub", "--cs-root", project) == 0
    out = dataset_cls.load(project / "imports/dsub/particles_subtracted.cs")
    assert out["blob/path"][0] == "imports/dsub/Particles/subtracted_0000.mrcs"
    images = np.stack([mrcfile.open(project / p).data[i] for p, i in zip(out["blob/path"], out["blob/idx"])])
    assert residual(images, sim) < LIMIT


def test_an_outdir_inside_a_cryosparc_project_makes_it_the_cs_root(dataset, tmp_path, monkeypatch, capsys):
    """Star input, ``-o P3/imports/dsub`` with ``P3/project.json``: the .cs names the stacks from P3, unasked."""
    paths, sim = dataset
    project = tmp_path / "P3"
    project.mkdir()
    (project / "project.json").write_text("{}")
    monkeypatch.chdir(project)  # from inside the project, as the trial ran it
    capsys.readouterr()
    assert run(paths["star"], paths, "imports/dsub") == 0
    out = capsys.readouterr().out.splitlines()
    said = [line for line in out if "cryoSPARC project" in line]
    assert said == [f"The output folder lies in the cryoSPARC project {project}: the .cs's blob/path are written "
                    "relative to it (--cs-root chooses another folder)."]
    assert [line for line in out if "image names start" in line] == [
        f"The input star's image names start from {paths['star'].parent} (RELION's project folder), which does "
        "not hold the output folder: the output star's names are absolute."]
    out = np.load(project / "imports/dsub/particles_subtracted.cs", max_header_size=2**30)
    assert out["blob/path"][0].decode() == "imports/dsub/Particles/subtracted_0000.mrcs"
    images = np.stack([mrcfile.open(project / p.decode()).data[i] for p, i in zip(out["blob/path"], out["blob/idx"])])
    assert residual(images, sim) < LIMIT
    # The star names them from where the input star's names start (the dataset's folder, which does not
    # hold OUTDIR): absolute.
    rows = starfile.read(project / "imports/dsub/particles_subtracted.star", always_dict=True)["particles"]
    assert rows["rlnImageName"].iloc[0] == f"000001@{project}/imports/dsub/Particles/subtracted_0000.mrcs"
    # A job folder's parent is the project too; a folder without project.json above it is not one.
    (tmp_path / "plain").mkdir()
    monkeypatch.chdir(tmp_path / "plain")
    capsys.readouterr()
    assert run(paths["star"], paths, tmp_path / "plain/out") == 0
    assert "cryoSPARC project" not in capsys.readouterr().out
    out = np.load(tmp_path / "plain/out/particles_subtracted.cs", max_header_size=2**30)
    assert out["blob/path"][0].decode() == str(tmp_path / "plain/out/Particles/subtracted_0000.mrcs")


def test_cs_root_added_to_a_finished_run_rewrites_its_cs_only(dataset, tmp_path, monkeypatch, capsys):
    """--cs-root, like --paths, only names the stacks: a finished run is not refused nor computed again."""
    from dsub.workflow import outdir as outdir_rules
    from dsub.workflow import store

    paths, sim = dataset
    project = tmp_path / "P9"  # no project.json: --cs-root alone says it is one
    project.mkdir()
    monkeypatch.chdir(tmp_path)
    outdir = project / "imports/dsub"
    assert run(paths["star"], paths, outdir) == 0
    first = str(outdir / "Particles/subtracted_0000.mrcs")
    assert np.load(outdir / "particles_subtracted.cs", max_header_size=2**30)["blob/path"][0].decode() == first
    # As a run of the version whose identity held --cs-root recorded it: that run resumes too.
    group = store.open_store(outdir / store.STORE_NAME, mode="r+")
    recorded = dict(group.attrs["run"])
    identity = {key: value for key, value in recorded.items() if key not in ("fingerprint", outdir_rules.AUTOMATIC_KEY)}
    group.attrs["run"] = {**recorded, "cs_root": None,
                          "fingerprint": outdir_rules.run_fingerprint({**identity, "cs_root": None})}
    stacks = sorted((outdir / "Particles").glob("*.mrcs"))
    before = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in stacks}
    star = starfile.read(outdir / "particles_subtracted.star", always_dict=True)["particles"]
    capsys.readouterr()

    assert run(paths["star"], paths, outdir, "--cs-root", project) == 0
    out, err = capsys.readouterr()
    said = [line for line in out.splitlines() if "already holds" in line]
    assert len(said) == 1 and f"and the .cs's from {project}" in said[0], said
    assert "imports/dsub/Particles/subtracted_0000.mrcs in the .cs" in said[0] and "holds the results" not in err
    cs = np.load(outdir / "particles_subtracted.cs", max_header_size=2**30)
    assert cs["blob/path"][0].decode() == "imports/dsub/Particles/subtracted_0000.mrcs"
    images = np.stack([mrcfile.open(project / p.decode()).data[i] for p, i in zip(cs["blob/path"], cs["blob/idx"])])
    assert residual(images, sim) < LIMIT
    pytest.importorskip("pandas").testing.assert_frame_equal(  # the star names them as before
        starfile.read(outdir / "particles_subtracted.star", always_dict=True)["particles"], star)
    assert {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in stacks} == before  # no image redone
    summary = json.loads((outdir / "dsub_run.json").read_text())
    assert summary["outputs"]["stack_names"]["cs"] == "imports/dsub/Particles/subtracted_0000.mrcs"
    assert summary["outputs"]["cs_root"] == str(project)

    elsewhere = tmp_path / "other"  # OUTDIR not inside it: the paths stay absolute, and the record says none
    elsewhere.mkdir()
    assert run(paths["star"], paths, outdir, "--cs-root", elsewhere) == 0
    said = [line for line in capsys.readouterr()[0].splitlines() if "already holds" in line]
    assert len(said) == 1 and "the .cs's from" not in said[0]
    cs = np.load(outdir / "particles_subtracted.cs", max_header_size=2**30)
    assert cs["blob/path"][0].decode() == first
    assert json.loads((outdir / "dsub_run.json").read_text())["outputs"]["cs_root"] is None


def test_real_cs_blob_paths_stay_project_relative(shared_data, tmp_path):
    """The real P12 .cs names J19/extract/...; in a project folder they resolve there and the project is found."""
    data = np.load(shared_data / P12, allow_pickle=False, max_header_size=2**30)[:3]
    project = tmp_path / "P12"
    stack = project / data["blob/path"][0].decode()
    stack.parent.mkdir(parents=True)
    stack.touch()
    (project / "J24").mkdir()
    (project / "J24/job.json").write_text("{}")
    deep = project / "J24/sub/deeper"
    deep.mkdir(parents=True)
    _save(deep / "J24_001_particles.cs", data)  # three folders down: only the project rule finds the stacks
    table = read_particles(deep / "J24_001_particles.cs")
    assert Path(table.image_paths[0]) == stack
    assert table.extra["project_folder"] == project


def test_exported_paths_do_not_make_the_export_folder_a_project(shared_data, tmp_path):
    """``>`` paths start from an export group folder; the output .cs must not be written relative to it."""
    data = np.load(shared_data / P12, allow_pickle=False, max_header_size=2**30)[:3]
    project = tmp_path / "P12"
    group = project / "exports/groups/P12_J24_particles"
    (group / "J19/extract").mkdir(parents=True)
    (group / "J19/extract/x.mrc").touch()
    data["blob/path"] = b">J19/extract/x.mrc"
    _save(group / "P12_J24_particles_exported.cs", data)
    table = read_particles(group / "P12_J24_particles_exported.cs")
    assert Path(table.image_paths[0]) == group / "J19/extract/x.mrc"
    assert table.extra["project_folder"] is None  # no project.json: unknown, so absolute paths are written
    (project / "project.json").write_text("{}")
    assert read_particles(group / "P12_J24_particles_exported.cs").extra["project_folder"] == project


def test_a_rerun_removes_the_temporary_metadata_files_of_a_killed_export(dataset, tmp_path, monkeypatch, capsys):
    from dsub.workflow import export

    paths, _ = dataset
    outdir = tmp_path / "out"

    def killed(*args, **kwargs):  # the export stopped before its files were renamed into place
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(export, "write_metadata", killed)
        assert run(paths["star"], paths, outdir, "--keep-store") == 130
    capsys.readouterr()
    # the stacks keep their temporary names while the metadata that points at them is written: none looks finished
    stacks = sorted(path.name for path in (outdir / export.STACK_FOLDER).iterdir())
    assert stacks and all(name.endswith(export.PARTIAL_SUFFIX) for name in stacks), stacks
    # what kill -9 during the export leaves: the dead writers' temporary files (their pids)
    stale = [f".{export.STAR_NAME}.23545.tmp", f".{export.STAR_NAME}.23721.tmp", f".{export.CS_NAME}.23545.tmp",
             f".{export.SKIPPED_NAME}.4242.tmp"]
    kept = [f".{export.STAR_NAME}.backup.tmp", ".my_particles.star.23545.tmp", "notes.tmp",
            f"{export.STAR_NAME}.23545.tmp"]
    for name in stale + kept:
        (outdir / name).write_text("data_\n")
    assert run(paths["star"], paths, outdir, "--keep-store") == 0
    left = {path.name for path in outdir.iterdir()}
    assert not left & set(stale), left & set(stale)
    assert set(kept) <= left
    assert len(starfile.read(outdir / export.STAR_NAME)["particles"]) == COUNT


def test_a_run_from_the_project_into_a_folder_outside_it_says_the_star_names_are_absolute(dataset, tmp_path,
                                                                                          monkeypatch, capsys):
    """From RELION's project folder, OUTDIR elsewhere: the star's names cannot start from the project, so they are
    absolute, and the run says so (as it does from any other folder); into the project it says nothing."""
    project = tmp_path / "relproj"
    files = relion_project(dataset, project)
    refine_star(files, project)
    monkeypatch.chdir(project)
    capsys.readouterr()
    outside = tmp_path / "elsewhere"
    assert run(Path("Refine3D/job025/run_data.star"), files, outside) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "image names start" in line]
    assert said == [f"The input star's image names start from this folder, {project} (RELION's project folder), "
                    "which does not hold the output folder: the output star's names are absolute."]
    rows = starfile.read(outside / "particles_subtracted.star", always_dict=True)["particles"]
    assert rows["rlnImageName"].iloc[0] == f"000001@{outside}/Particles/subtracted_0000.mrcs"
    assert run(Path("Refine3D/job025/run_data.star"), files, "Subtract/job053") == 0
    assert "image names start" not in capsys.readouterr().out
