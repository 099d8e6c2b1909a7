"""cryoSPARC .cs reading and writing, against cryoDRGN's parse and the worked values."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from dsub.conventions import matrix_to_relion_euler
from dsub.errors import InputFileError
from dsub.formats import cs, read_particles, star

P12 = "cryodrgn/cryosparc_P12_J24_001_particles.cs"


@pytest.fixture(scope="module")
def p12(shared_data):
    return read_particles(shared_data / P12)


def test_rotations_match_cryodrgn(p12, shared_data):  # conventions!
    with open(shared_data / "cryodrgn/pose.cs.pkl", "rb") as f:
        rots, trans = pickle.load(f)
    assert len(p12) == 2019
    np.testing.assert_allclose(p12.rotations, rots, atol=1e-5)
    # cryoDRGN's translations are the same shifts as a fraction of the box
    np.testing.assert_allclose(p12.origins_pixels / p12.box_size[:, None], trans, atol=1e-6)


def test_worked_values_formats_3_1(p12):  # conventions!
    rot, tilt, psi = matrix_to_relion_euler(p12.rotations[:3])
    expected = [[-157.8085, 118.7910, 34.6833], [51.9525, 110.2111, 92.7572],
                [26.6987, 42.3911, -142.7465]]
    np.testing.assert_allclose(np.stack([rot, tilt, psi], 1), expected, atol=1e-4)
    np.testing.assert_allclose(
        p12.origins_angstrom[:3], [[33.4364, -5.3930], [3.7336, -13.6898], [-21.9867, 32.6067]],
        atol=1e-4,
    )
    np.testing.assert_allclose(p12.defocus_angle_degrees[:3], -78.1311, atol=1e-4)
    np.testing.assert_array_equal(p12.half_set[:3], [2, 1, 1])
    assert (np.bincount(p12.half_set)[1:] == [1010, 1009]).all()
    assert p12.box_size[0] == 180 and p12.pixel_size_angstrom[0] == pytest.approx(2.95)
    np.testing.assert_array_equal(p12.image_indices[:3], [0, 1, 2])
    assert p12.input_contrast is not None and p12.input_contrast.min() > 0


def test_ctf_equals_star_import(shared_data):
    from_cs = cs.read_ctf(shared_data / "cryodrgn/empiar_10076_7.cs")
    from_star = star.read_ctf(shared_data / "cryodrgn/empiar_10076_7.star")
    for name in ("defocus_u_angstrom", "defocus_v_angstrom", "defocus_angle_degrees",
                 "voltage_kv", "spherical_aberration_mm", "amplitude_contrast"):
        np.testing.assert_allclose(from_cs[name], from_star[name], rtol=1e-6, atol=1e-4, err_msg=name)
    np.testing.assert_allclose(from_star["defocus_angle_degrees"], 5.28)


def test_cs_star_cs_round_trip(p12, tmp_path):
    names = [f"{i + 1:06d}@{p}" for i, p in zip(p12.image_indices, p12.image_paths)]
    star.write_particles(p12, tmp_path / "p12.star", names)
    back = read_particles(tmp_path / "p12.star")
    _assert_same_particles(back, p12)
    cs.write_particles(back, tmp_path / "p12.cs", back.image_paths, back.image_indices)
    again = read_particles(tmp_path / "p12.cs")
    _assert_same_particles(again, p12, atol=1e-4)


def test_star_from_cs_writes_optics_values_as_their_float32_decimals(p12, tmp_path):
    """The .cs holds 2.95 Å as float32 (2.9500000477): the optics table says 2.95, as typed in cryoSPARC."""
    names = [f"{i + 1:06d}@{p}" for i, p in zip(p12.image_indices, p12.image_paths)]
    star.write_particles(p12, tmp_path / "p12.star", names)
    text = (tmp_path / "p12.star").read_text()
    optics = text[text.index("data_optics"):text.index("data_particles")]
    psize = float(np.float32(p12.source["blob/psize_A"][0]))
    assert psize != 2.95 and f"{psize:.10g}" != "2.95"  # what %.10g of the float64 would write
    rows = [line.split() for line in optics.splitlines() if line.strip() and line.split()[0].isdigit()]
    header = [line.split()[0] for line in optics.splitlines() if line.startswith("_rln")]
    assert rows and rows[0][header.index("_rlnImagePixelSize")] == "2.95"
    assert rows[0][header.index("_rlnVoltage")] == f"{float(np.float32(p12.source['ctf/accel_kv'][0])):g}"


def test_star_from_cs_keeps_ctf_scale_where_the_input_has_it(p12, shared_data, tmp_path):
    """ctf/scale becomes rlnCtfScalefactor, also where it is 1 (as in every refinement output); none without it."""
    import starfile

    names = [f"{i + 1:06d}@{p}" for i, p in zip(p12.image_indices, p12.image_paths)]
    star.write_particles(p12, tmp_path / "p12.star", names)
    rows = starfile.read(tmp_path / "p12.star", always_dict=True)["particles"]
    np.testing.assert_array_equal(rows["rlnCtfScalefactor"], p12.source["ctf/scale"])
    assert (rows["rlnCtfScalefactor"] == 1).all()  # P12's values
    data = np.load(shared_data / P12, allow_pickle=False, max_header_size=2**30)[:40]
    data["ctf/scale"] = np.linspace(0.5, 1.5, 40)
    with open(tmp_path / "scaled.cs", "wb") as f:
        np.save(f, data, allow_pickle=False)
    scaled = read_particles(tmp_path / "scaled.cs", cs_root=shared_data / "cryodrgn")
    star.write_particles(scaled, tmp_path / "scaled.star", names[:40])
    back = read_particles(tmp_path / "scaled.star", require_ctf=True)
    np.testing.assert_allclose(back.ctf_scale, np.linspace(0.5, 1.5, 40), rtol=1e-6)
    without = data[[name for name in data.dtype.names if name != "ctf/scale"]]
    with open(tmp_path / "unscaled.cs", "wb") as f:
        np.save(f, without, allow_pickle=False)
    unscaled = read_particles(tmp_path / "unscaled.cs", cs_root=shared_data / "cryodrgn")
    star.write_particles(unscaled, tmp_path / "unscaled.star", names[:40])
    assert "rlnCtfScalefactor" not in starfile.read(tmp_path / "unscaled.star", always_dict=True)["particles"]


def _micrograph(path: Path, ny: int, nx: int) -> None:
    import mrcfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.zeros((ny, nx), dtype=np.float32))


def test_star_coordinates_become_cryosparc_locations(shared_data, tmp_path, monkeypatch):
    """rlnMicrographName + rlnCoordinateX/Y -> location/*: pyem's csparc2star gives the coordinates back."""
    import starfile

    blocks = starfile.read(shared_data / "cryodrgn/relion31.star", always_dict=True)
    particles = blocks["particles"].iloc[:4].copy()
    names = ["MotionCorr/job002/mic_a.mrc", "MotionCorr/job002/mic_b.mrc"]
    particles["rlnMicrographName"] = [names[i % 2] for i in range(4)]
    particles["rlnCoordinateX"] = [12.0, 2047.0, 3800.0, 0.0]
    particles["rlnCoordinateY"] = [40.0, 3071.0, 2900.0, 1.0]
    (tmp_path / "Select/job9").mkdir(parents=True)
    star_path = tmp_path / "Select/job9/particles.star"
    starfile.write({**blocks, "particles": particles}, star_path)
    _micrograph(tmp_path / names[0], 3000, 4000)  # ny, nx: a landscape micrograph
    _micrograph(tmp_path / names[1], 3072, 2048)
    monkeypatch.chdir(tmp_path)  # the RELION project folder: the names start here
    table = star.read_particles(star_path, require_ctf=True)
    cs.write_particles(table, tmp_path / "out.cs", table.image_paths, table.image_indices)
    out = np.load(tmp_path / "out.cs", allow_pickle=False)
    # No cryoSPARC project known: the micrographs found are written absolute, as blob/path would be.
    assert [path.decode() for path in out["location/micrograph_path"]] == [
        str(tmp_path / name) for name in particles["rlnMicrographName"]]
    # A project folder holding them (--cs-root, or the project above OUTDIR): relative to it, as cryoSPARC reads them.
    table.extra["project_folder"] = tmp_path / "MotionCorr"
    cs.write_particles(table, tmp_path / "in_project.cs", table.image_paths, table.image_indices)
    in_project = np.load(tmp_path / "in_project.cs", allow_pickle=False)
    assert [path.decode() for path in in_project["location/micrograph_path"]] == [
        f"job002/mic_{'ab'[i % 2]}.mrc" for i in range(4)]
    table.extra["project_folder"] = None
    assert out.dtype["location/micrograph_shape"] == np.dtype(("<u4", (2,)))
    np.testing.assert_array_equal(out["location/micrograph_shape"], [[3000, 4000], [3072, 2048]] * 2)
    assert out["location/center_x_frac"].dtype == np.float32 and out["location/center_y_frac"].dtype == np.float32
    # pyem's csparc2star (default swapxy and inverty): X = round(x_frac·nx), Y = round((1 − y_frac)·ny)
    ny, nx = out["location/micrograph_shape"][:, 0], out["location/micrograph_shape"][:, 1]
    np.testing.assert_array_equal(np.round(out["location/center_x_frac"] * nx), particles["rlnCoordinateX"])
    np.testing.assert_array_equal(np.round((1 - out["location/center_y_frac"]) * ny), particles["rlnCoordinateY"])
    assert out["location/center_y_frac"][0] == pytest.approx(1 - 40 / 3000)  # y counted from the other edge

    # A micrograph that cannot be found: its shape is unknown, so only the paths are written, for all.
    (tmp_path / names[1]).unlink()
    cs.write_particles(table, tmp_path / "partial.cs", table.image_paths, table.image_indices)
    partial = np.load(tmp_path / "partial.cs", allow_pickle=False)
    located = [name for name in partial.dtype.names if name.startswith("location/")]
    assert located == ["location/micrograph_path"]
    np.testing.assert_array_equal(partial["location/micrograph_path"], out["location/micrograph_path"])
    # No micrograph names at all: no location slot.
    table.source["particles"] = particles.drop(columns="rlnMicrographName")
    cs.write_particles(table, tmp_path / "none.cs", table.image_paths, table.image_indices)
    assert not [name for name in np.load(tmp_path / "none.cs").dtype.names if name.startswith("location/")]


def test_star_cs_round_trip(shared_data, tmp_path):
    table = read_particles(shared_data / "cryodrgn/relion31.6opticsgroups.star")
    alpha = np.linspace(0.5, 1.5, len(table))
    with pytest.warns(UserWarning, match="rlnOddZernike/rlnEvenZernike have no cryoSPARC field"):
        cs.write_particles(table, tmp_path / "out.cs", table.image_paths, table.image_indices, alpha)
    raw = np.load(tmp_path / "out.cs", allow_pickle=False)
    assert raw.dtype["blob/idx"] == np.dtype("<u4") and raw.dtype["blob/path"].kind == "S"
    assert len(np.unique(raw["uid"])) == len(table)
    back = read_particles(tmp_path / "out.cs")
    _assert_same_particles(back, table, atol=1e-4)
    np.testing.assert_allclose(back.input_contrast, alpha, rtol=1e-6)
    np.testing.assert_array_equal(back.optics_group, table.optics_group)
    again = tmp_path / "again.cs"
    with pytest.warns(UserWarning, match="rlnOddZernike"):
        cs.write_particles(table, again, table.image_paths, table.image_indices, alpha)
    np.testing.assert_array_equal(np.load(again)["uid"], raw["uid"])  # deterministic uids


def test_cs_output_passes_fields_through(p12, tmp_path):
    out = tmp_path / "sub.cs"
    new_paths = [f"dsub/stack_{i // 100:03d}.mrcs" for i in range(len(p12))]
    cs.write_particles(p12, out, new_paths, np.arange(len(p12)) % 100, np.full(len(p12), 2.0))
    raw = np.load(out, allow_pickle=False)
    source = p12.source
    assert raw.dtype.names == source.dtype.names
    for name in source.dtype.names:
        if name not in ("blob/path", "blob/idx", "alignments3D/alpha"):
            np.testing.assert_array_equal(raw[name], source[name], err_msg=name)
    assert raw["blob/path"][150] == b"dsub/stack_001.mrcs" and raw["blob/idx"][150] == 50
    assert (raw["alignments3D/alpha"] == 2.0).all()


def test_passthrough_join(shared_data, tmp_path):
    full = np.load(shared_data / P12, allow_pickle=False, max_header_size=2**30)[:50]
    main_fields = [n for n in full.dtype.names if not n.startswith("ctf/")]
    pass_fields = ["uid", "blob/psize_A"] + [n for n in full.dtype.names if n.startswith("ctf/")]
    passthrough = full[pass_fields][::-1].copy()  # reversed, plus a stranger
    passthrough["blob/psize_A"] = 99.0  # the main file's own field must win
    stranger = passthrough[:1].copy()
    stranger["uid"] = 12345
    _save(tmp_path / "J24_passthrough_particles.cs", np.concatenate([stranger, passthrough]))
    _save(tmp_path / "J24_005_particles.cs", full[main_fields][:40])
    _save(tmp_path / "J240_passthrough_particles.cs", full[:1])  # another job
    assert cs.passthrough_path(tmp_path / "J24_005_particles.cs").name == "J24_passthrough_particles.cs"
    table = read_particles(tmp_path / "J24_005_particles.cs")
    assert len(table) == 40
    np.testing.assert_array_equal(table.source["uid"], full["uid"][:40])
    np.testing.assert_allclose(table.defocus_u_angstrom, full["ctf/df1_A"][:40])
    assert (table.pixel_size_angstrom == np.float32(2.95)).all()


def test_blob_paths_resolve_against_project(shared_data, tmp_path):
    project = tmp_path / "P12"
    (project / "J19/extract").mkdir(parents=True)
    (project / "J24").mkdir()
    data = np.load(shared_data / P12, allow_pickle=False, max_header_size=2**30)[:3]
    Path(project / data["blob/path"][0].decode()).touch()
    _save(project / "J24/J24_001_particles.cs", data)
    table = read_particles(project / "J24/J24_001_particles.cs")
    assert Path(table.image_paths[0]) == project / data["blob/path"][0].decode()
    table = read_particles(project / "J24/J24_001_particles.cs", cs_root=tmp_path / "elsewhere")
    assert Path(table.image_paths[0]).parent.parent.parent == tmp_path / "elsewhere"
    exported = data.copy()
    exported["blob/path"] = b">J19/extract/x.mrc"
    (project / "J24/J19/extract").mkdir(parents=True)
    (project / "J24/J19/extract/x.mrc").touch()
    _save(project / "J24/exported.cs", exported)
    table = read_particles(project / "J24/exported.cs")
    assert Path(table.image_paths[0]) == project / "J24/J19/extract/x.mrc"


def test_csdat_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "J9_particles.cs"
    path.write_bytes(b"\x95CSDAT" + bytes(100))
    with pytest.raises(InputFileError, match="J9_particles.cs.*CSDAT.*NUMPY_FORMAT"):
        read_particles(path)


def test_not_a_cs_file(tmp_path):
    path = tmp_path / "junk.cs"
    path.write_text("hello")
    with pytest.raises(InputFileError, match="junk.cs.*not a cryoSPARC .cs file"):
        read_particles(path)


def test_cs_without_alignments(shared_data):
    with pytest.raises(InputFileError, match="empiar_10076_7.cs.*alignments3D/pose"):
        read_particles(shared_data / "cryodrgn/empiar_10076_7.cs")


def _save(path, data):
    with open(path, "wb") as f:  # np.save(name) would append ".npy"
        np.save(f, data)


def _assert_same_particles(a, b, atol=1e-6):
    np.testing.assert_allclose(a.rotations, b.rotations, atol=atol)
    np.testing.assert_allclose(a.origins_angstrom, b.origins_angstrom, atol=atol * 10)
    for name in ("defocus_u_angstrom", "defocus_v_angstrom", "defocus_angle_degrees",
                 "phase_shift_degrees", "voltage_kv", "spherical_aberration_mm",
                 "amplitude_contrast", "ctf_bfactor", "pixel_size_angstrom"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-6, atol=atol, err_msg=name)
    np.testing.assert_array_equal(a.half_set, b.half_set)
    np.testing.assert_array_equal(a.box_size, b.box_size)
    np.testing.assert_array_equal(a.image_indices, b.image_indices)
    assert [Path(p) for p in a.image_paths] == [Path(p) for p in b.image_paths]


def test_micrograph_codes_of_a_categorical_column_match_the_plain_coding():
    """The star reader's categorical name column is coded from its own codes (no string per row), giving
    every row the same micrograph as coding the text; a missing name takes the plain coding."""
    import pandas as pd

    from dsub.formats.location import micrograph_codes

    rng = np.random.default_rng(4)
    names = np.array([f"MotionCorr/job002/Movies/mic_{i:05d}.mrc" for i in range(50)], dtype=object)[
        rng.integers(0, 50, 2000)]
    for column in (pd.Series(names, dtype="category"), pd.Series(names)):
        codes, distinct = micrograph_codes(column)
        assert codes.dtype == np.int32 and np.array_equal(np.asarray(distinct, dtype=object)[codes], names)
    with_missing = pd.Series([names[0], None, names[1]], dtype="category")
    codes, distinct = micrograph_codes(with_missing)
    assert distinct[codes[0]] == names[0] and distinct[codes[2]] == names[1]
    assert len(set(codes.tolist())) == 3  # the missing name is a name of its own, as path_codes counts it


def test_truncated_cs_names_its_size_against_its_header_and_what_to_do(tmp_path):
    """A .cs cut short (an interrupted copy): its size against what its header promises, and to copy it again."""
    rows = np.zeros(1000, dtype=[("uid", "<u8"), ("blob/idx", "<u4"), ("blob/psize_A", "<f4")])
    rows["uid"] = np.arange(1000)
    whole = tmp_path / "whole.cs"
    _save(whole, rows)
    size = whole.stat().st_size
    path = tmp_path / "J15_particles.cs"
    path.write_bytes(whole.read_bytes()[: size - 1000])
    with pytest.raises(InputFileError) as caught:
        read_particles(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: is truncated: its header says 1000 particles of 16 bytes, {size} bytes, "
                              f"but the file holds only {size - 1000} bytes (937 whole particles)."), message
    assert "copy it again, or export the job's particles again from the cryoSPARC project" in message
    assert "\n" not in message and "Failed to read" not in message

    path.write_bytes(whole.read_bytes()[:30])  # cut inside its header
    with pytest.raises(InputFileError,
                       match=r"is truncated: 30 bytes, which end inside its header \(\d+ bytes\)\. .*copy it again"):
        read_particles(path)


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def test_original_image_fields_round_trip_and_keep_the_extracted_mrc_through_a_chain(p12, shared_data, tmp_path,
                                                                                     monkeypatch):
    """dsub/original_path / dsub/original_idx name the extracted .mrc stacks, from the project folder as blob/path
    does; a .cs or star dsub wrote gives them on to the next run's .cs and star (through Originals/ links)."""
    import starfile

    from dsub.formats.paths import StackRefs
    from dsub.workflow import export

    project = tmp_path / "P3"
    _touch(project / "project.json")
    source = np.load(shared_data / P12)
    for stack in np.unique(source["blob/path"]):
        _touch(project / stack.decode())
    (project / "J24").mkdir()
    _save(project / "J24" / "J24_001_particles.cs", source)
    monkeypatch.chdir(project)  # RELION's project folder: the star's names start here
    extracted = [os.path.normpath(project / p.decode()) for p in source["blob/path"]]

    def subtract(table, job, paths_mode="auto"):
        (project / job).mkdir()
        for relative, _, _ in export.stack_layout(len(table), 4096, table.pixel_size_angstrom):
            _touch(project / job / relative)
        export.write_metadata(table, project / job, 4096, np.full(len(table), 0.9), paths_mode=paths_mode)
        return np.load(project / job / export.CS_NAME), starfile.read(project / job / export.STAR_NAME)["particles"]

    def originals_in_star(rows, job):
        names = rows["rlnImageOriginalName"].str.split("@", n=1, expand=True)
        assert names[1].str.startswith(f"{job}/Originals/").all()  # below the folder the stacks share
        assert names[1].str.endswith("_particles.mrcs").all()
        return [os.path.realpath(n) for n in names[1]], names[0].astype(int).to_numpy() - 1

    # First run, from cryoSPARC's own .cs: the fields name its blob/path and blob/idx, as written there.
    first = cs.read_particles(project / "J24" / "J24_001_particles.cs")
    assert first.extra["dsub_output"] is None
    raw, rows = subtract(first, "J40")
    assert raw.dtype[cs.ORIGINAL_PATH_FIELD].kind == "S" and raw.dtype[cs.ORIGINAL_IDX_FIELD] == np.dtype("<u4")
    np.testing.assert_array_equal(raw[cs.ORIGINAL_PATH_FIELD], source["blob/path"])
    np.testing.assert_array_equal(raw[cs.ORIGINAL_IDX_FIELD], source["blob/idx"])
    assert raw["blob/path"][0] == b"J40/Particles/subtracted_0000.mrcs"
    assert originals_in_star(rows, "J40")[0] == [os.path.realpath(p) for p in extracted]

    # Read back: the originals resolve from the folder blob/path does, and a second run keeps them.
    again = cs.read_particles(project / "J40" / export.CS_NAME)
    assert again.extra["original_root"] == project and again.extra["dsub_output"] is not None
    refs = export.original_images(again)
    assert isinstance(refs, StackRefs) and len(refs) == len(source)
    np.testing.assert_array_equal(refs.paths[refs.codes], extracted)
    np.testing.assert_array_equal(refs.indices, source["blob/idx"])
    raw_2, rows_2 = subtract(again, "J41")
    np.testing.assert_array_equal(raw_2[cs.ORIGINAL_PATH_FIELD], source["blob/path"])
    np.testing.assert_array_equal(raw_2[cs.ORIGINAL_IDX_FIELD], source["blob/idx"])
    paths_2, indices_2 = originals_in_star(rows_2, "J41")  # this run's own links to the .mrc stacks
    assert paths_2 == [os.path.realpath(p) for p in extracted]
    np.testing.assert_array_equal(indices_2, source["blob/idx"])
    assert rows_2["rlnImageName"].str.contains("@J41/Particles/").all()

    # From the second run's star: its links are followed back to the .mrc stacks themselves.
    from_star = star.read_particles(project / "J41" / export.STAR_NAME)
    raw_3, _ = subtract(from_star, "J42", paths_mode="absolute")
    np.testing.assert_array_equal(raw_3[cs.ORIGINAL_PATH_FIELD].astype(str), extracted)  # --paths absolute
    np.testing.assert_array_equal(raw_3[cs.ORIGINAL_IDX_FIELD], source["blob/idx"])
    back = export.original_images(cs.read_particles(project / "J42" / export.CS_NAME))
    np.testing.assert_array_equal(back.paths[back.codes], extracted)


def test_one_original_image_field_without_the_other_is_refused(p12, shared_data, tmp_path):
    source = np.load(shared_data / P12)
    lone = np.empty(len(source), dtype=source.dtype.descr + [(cs.ORIGINAL_IDX_FIELD, "<u4")])
    for name in source.dtype.names:
        lone[name] = source[name]
    lone[cs.ORIGINAL_IDX_FIELD] = 0
    _save(tmp_path / "lone.cs", lone)
    with pytest.raises(InputFileError, match="dsub/original_idx but not dsub/original_path"):
        cs.read_particles(tmp_path / "lone.cs")


def test_an_earlier_runs_original_name_that_is_not_n_at_stack_is_refused(tmp_path):
    from dsub.workflow import export

    refs = export.star_original_images(["000002@a.mrcs", "000001@/b.mrcs"], tmp_path, tmp_path / "Originals")
    assert refs.paths[refs.codes].tolist() == [str(tmp_path / "a.mrcs"), "/b.mrcs"]
    assert refs.indices.tolist() == [1, 0]
    for bad in ("a.mrcs", "000000@a.mrcs", "x@a.mrcs"):
        with pytest.raises(InputFileError, match=f"sub.star: names the original image '{bad}'"):
            export.star_original_images(["000001@a.mrcs", bad], tmp_path, tmp_path / "Originals", "sub.star")
