"""RELION .star reading and writing on real RELION 3.0 / 3.1 files."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from dsub.errors import InputFileError
from dsub.formats import read_particles, star
from dsub.formats.mrc import read_images


def test_relion31(shared_data):
    table = read_particles(shared_data / "cryodrgn/relion31.star")
    assert len(table) == 5 and table.source_format == "star"
    np.testing.assert_allclose(table.pixel_size_angstrom, 2.806)  # the MRC header says 1.0
    np.testing.assert_array_equal(table.image_indices, np.arange(5))
    assert {Path(p) for p in table.image_paths} == {shared_data / "cryodrgn/relion31.mrcs"}
    assert (table.box_size == 256).all() and (table.half_set == 1).all()
    np.testing.assert_allclose(table.origins_angstrom[0], [0.019324, -0.64686])
    np.testing.assert_allclose(table.defocus_u_angstrom[0], 13108.082418)
    np.testing.assert_allclose(table.defocus_angle_degrees[0], -160.39)
    np.testing.assert_allclose(table.spherical_aberration_mm, 0.01)  # from data_optics
    np.testing.assert_allclose(table.amplitude_contrast, 0.1)
    np.testing.assert_allclose(table.input_contrast, 1.0)  # rlnCtfScalefactor
    assert not table.ctf_premultiplied.any()
    images = read_images(table.image_paths, table.image_indices)
    assert images.shape == (5, 256, 256) and images.dtype == np.float32


def test_six_optics_groups(shared_data):
    table = read_particles(shared_data / "cryodrgn/relion31.6opticsgroups.star")
    assert len(table) == 139
    np.testing.assert_array_equal(np.unique(table.optics_group), np.arange(1, 7))
    assert set(np.unique(table.half_set)) == {1, 2}
    assert (table.box_size == 196).all()
    optics = table.source["optics"].set_index("rlnOpticsGroup")
    for group in range(1, 7):
        rows = table.optics_group == group
        assert np.allclose(table.pixel_size_angstrom[rows], optics.loc[group, "rlnImagePixelSize"])
        assert np.allclose(table.spherical_aberration_mm[rows],
                           optics.loc[group, "rlnSphericalAberration"])
    assert table.input_contrast is None


def test_relion30_pixel_origins(shared_data, tmp_path):
    path = shared_data / "relion_projections/rln_proj_64_shifted.star"
    with pytest.raises(InputFileError, match="rln_proj_64_shifted.star.*rlnDefocusU"):
        read_particles(path)
    table = read_particles(path, require_ctf=False)
    assert table.extra["ctf_absent"]
    np.testing.assert_allclose(table.origins_angstrom, [[6, 10], [10, -5], [-8, 11], [-13, -3]])
    blocks = starfile.read(path, always_dict=True)
    blocks["optics"]["rlnImagePixelSize"] = 2.0
    starfile.write(blocks, tmp_path / "shifted.star")
    table = read_particles(tmp_path / "shifted.star", require_ctf=False)
    np.testing.assert_allclose(table.origins_angstrom[0], [12.0, 20.0])
    np.testing.assert_allclose(table.origins_pixels[0], [6.0, 10.0])
    star.write_particles(table, tmp_path / "out.star", table.image_paths.astype(str))
    written = starfile.read(tmp_path / "out.star")["particles"]
    assert "rlnOriginX" not in written and "rlnOriginXAngst" in written
    np.testing.assert_allclose(read_particles(tmp_path / "out.star", require_ctf=False)
                               .origins_angstrom, table.origins_angstrom)


def test_relion30_detector_pixel_size_and_box_from_stack(shared_data, tmp_path):
    df = starfile.read(shared_data / "cryodrgn/empiar_10076_7.star",
                       parse_as_string=["rlnImageName", "rlnMicrographName"])
    stack = shared_data / "cryodrgn/empiar_10076_7.mrc"
    df["rlnImageName"] = [f"{i + 1}@{stack}" for i in range(len(df))]
    df["rlnAngleRot"], df["rlnAngleTilt"], df["rlnAnglePsi"] = 10.0, 20.0, 30.0
    df["rlnOriginX"], df["rlnOriginY"] = 2.0, -1.0
    starfile.write(df, tmp_path / "v30.star")
    table = read_particles(tmp_path / "v30.star")
    np.testing.assert_allclose(table.pixel_size_angstrom, 5e4 / 38168)
    assert (table.box_size == 320).all() and (table.optics_group == 1).all()
    assert (table.half_set == 0).all()
    np.testing.assert_allclose(table.origins_angstrom[0], [2 * 5e4 / 38168, -5e4 / 38168])
    star.write_particles(table, tmp_path / "v31.star", df["rlnImageName"])
    blocks = starfile.read(tmp_path / "v31.star")
    assert blocks["optics"]["rlnImageSize"].tolist() == [320]
    back = read_particles(tmp_path / "v31.star")
    np.testing.assert_allclose(back.pixel_size_angstrom, table.pixel_size_angstrom)
    np.testing.assert_allclose(back.origins_angstrom, table.origins_angstrom)
    np.testing.assert_allclose(back.rotations, table.rotations)


def test_write_passes_every_column_through(shared_data, tmp_path):
    src = shared_data / "cryodrgn/relion31.6opticsgroups.star"
    table = read_particles(src)
    names = [f"{i + 1:06d}@Subtract/stack.mrcs" for i in range(len(table))]
    out = tmp_path / "particles_subtracted.star"
    star.write_particles(table, out, names)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary left behind
    before = starfile.read(src, always_dict=True, parse_as_string=star.NAME_COLUMNS)
    after = starfile.read(out, always_dict=True, parse_as_string=star.NAME_COLUMNS)
    # "%.10g" writes 200.0 as 200, which reads back as an int: same values, other dtype
    pd.testing.assert_frame_equal(after["optics"], before["optics"], check_dtype=False)
    assert after["optics"]["rlnMagMat01"][0] == pytest.approx(0.004231, abs=0)
    assert after["particles"]["rlnImageName"].tolist() == names
    assert (after["particles"]["rlnImageOriginalName"] == before["particles"]["rlnImageName"]).all()
    kept = before["particles"].columns
    pd.testing.assert_frame_equal(
        after["particles"][kept].drop(columns="rlnImageName"),
        before["particles"].drop(columns="rlnImageName"),
        check_dtype=False,
    )
    back = read_particles(out)
    np.testing.assert_allclose(back.rotations, table.rotations)
    np.testing.assert_array_equal(back.half_set, table.half_set)


def test_not_a_star_file(tmp_path):
    path = tmp_path / "notes.star"
    path.write_text("hello\nthis is not a star file\n")
    with pytest.raises(InputFileError, match="notes.star.*not a particle STAR file"):
        read_particles(path)
    other = tmp_path / "notes.txt"
    other.write_text("hello\n")
    with pytest.raises(InputFileError, match="notes.txt.*neither a RELION .star nor"):
        read_particles(other)


def test_missing_angle_column(shared_data, tmp_path):
    blocks = starfile.read(shared_data / "cryodrgn/relion31.star", always_dict=True)
    blocks["particles"] = blocks["particles"].drop(columns="rlnAngleRot")
    starfile.write(blocks, tmp_path / "no_rot.star")
    with pytest.raises(InputFileError, match="no_rot.star.*rlnAngleRot"):
        read_particles(tmp_path / "no_rot.star")


def test_a_star_without_image_names_is_refused_naming_the_column(tmp_path):
    from dsub.demo import make_dataset

    paths, _ = make_dataset(tmp_path / "data", count=8, box=24)
    blocks = starfile.read(paths["star"], always_dict=True)
    blocks["particles"] = blocks["particles"].drop(columns="rlnImageName")
    starfile.write(blocks, tmp_path / "no_names.star")
    with pytest.raises(InputFileError, match=r"no_names.star.*lacks the column\(s\) rlnImageName, needed for the "
                                             r"particle images"):
        read_particles(tmp_path / "no_names.star")


def test_no_pixel_size(shared_data):
    with pytest.raises(InputFileError, match="rln_proj_64.star.*pixel size"):
        read_particles(shared_data / "relion_projections/rln_proj_64.star", require_ctf=False)


def test_undefined_optics_group(shared_data, tmp_path):
    blocks = starfile.read(shared_data / "cryodrgn/relion31.star", always_dict=True)
    blocks["particles"]["rlnOpticsGroup"] = 3
    starfile.write(blocks, tmp_path / "bad_group.star")
    with pytest.raises(InputFileError, match=r"bad_group.star.*optics groups \[3\]"):
        read_particles(tmp_path / "bad_group.star")


def test_image_paths_relative_to_relion_project_folder(shared_data, tmp_path):
    """A job's star sits two folders below the project; its image names are project-relative."""
    project = tmp_path / "project"
    stacks = project / "Extract" / "job007"
    stacks.mkdir(parents=True)
    (stacks / "relion31.mrcs").write_bytes((shared_data / "cryodrgn" / "relion31.mrcs").read_bytes())
    blocks = starfile.read(shared_data / "cryodrgn" / "relion31.star", always_dict=True)
    blocks["particles"]["rlnImageName"] = [f"{i + 1:06d}@Extract/job007/relion31.mrcs" for i in range(5)]
    job = project / "Refine3D" / "job012"
    job.mkdir(parents=True)
    starfile.write(blocks, job / "run_data.star")
    table = read_particles(job / "run_data.star")
    assert set(table.image_paths) == {str(stacks / "relion31.mrcs")}
    np.testing.assert_array_equal(table.image_indices, np.arange(5))


def test_a_star_cut_short_in_its_last_row_is_refused_naming_the_row(tmp_path):

    text = ("data_particles\n\nloop_\n_rlnImageName #1\n_rlnAngleRot #2\n_rlnAngleTilt #3\n_rlnAnglePsi #4\n"
            "_rlnRandomSubset #5\n1@a.mrcs 1 2 3 1\n2@a.mrcs 1 2 3 2\n3@a.mrcs 1 2\n")
    path = tmp_path / "cut.star"
    path.write_text(text)
    with pytest.raises(InputFileError, match=r"particle row 3 \(1-based, line 11 of the file\) has 3 values "
                                             r"but the loop has 5 columns: the file looks cut short"):
        star.read_particles(path)


@pytest.fixture(params=["starfile", "fast"])
def reader(request, monkeypatch) -> str:
    """Each test with it runs with both star readers: ``starfile``, and the fast block reader that large files
    get (``FAST_READ_BYTES`` 0: every file)."""
    if request.param == "fast":
        monkeypatch.setattr(star, "FAST_READ_BYTES", 0)
    return request.param


def _star_with_a_bad_row(bad_row: str, original_names: bool = False) -> tuple[str, int]:
    """A RELION 3.1 star (header comments, an optics block, blank and comment lines among the rows)
    with ``bad_row`` as its fifth particle; and the file line (1-based) of that row. ``original_names``:
    with a last column of text, rlnImageOriginalName (``bad_row`` gives its value or not)."""
    lines = ["", "# version 30001", "", "data_optics", "", "loop_", "_rlnOpticsGroup #1",
             "_rlnOpticsGroupName #2", "_rlnAmplitudeContrast #3", "_rlnSphericalAberration #4", "_rlnVoltage #5",
             "_rlnImagePixelSize #6", "_rlnImageSize #7", "_rlnImageDimensionality #8",
             "1 opticsGroup1 0.1 2.7 300.0 1.5 32 2", "", "", "# version 30001", "", "data_particles", "",
             "loop_", "_rlnImageName #1", "_rlnDefocusU #2", "_rlnDefocusV #3", "_rlnDefocusAngle #4",
             "_rlnOpticsGroup #5", "",
             "000001@a.mrcs 10000 10000 0 1", "000002@a.mrcs 10000 10000 0 1", "",
             "000003@a.mrcs 10000 10000 0 1", "# a comment among the rows", "000004@a.mrcs 10000 10000 0 1",
             bad_row, "000006@a.mrcs 10000 10000 0 1", "000007@a.mrcs 10000 10000 0 1", ""]
    if original_names:
        at = lines.index("_rlnOpticsGroup #5")
        lines.insert(at + 1, "_rlnImageOriginalName #6")
        lines = [f"{line} {line[:6]}@b.mrcs" if line.startswith("00000") and line != bad_row else line
                 for line in lines]
    return "\n".join(lines), lines.index(bad_row) + 1


def test_a_row_with_too_many_values_is_named_by_its_line_in_the_file(tmp_path, monkeypatch, reader):
    text, line = _star_with_a_bad_row("000005@a.mrcs 10000 10000 0 1 7")
    assert line == 35
    if reader == "fast":
        monkeypatch.setattr(star.star_reader, "PIECE_ROWS", 2)  # the bad row in a later piece
    path = tmp_path / "bad.star"
    path.write_text(text)
    with pytest.raises(InputFileError) as raised:
        star.read_particles(path, require_ctf=False)
    message = str(raised.value)
    assert f"particle row 5 (1-based, line {line} of the file) has 6 values but the loop has 5 columns." in message
    assert "\n" not in message


def test_a_row_with_too_few_values_is_named_by_its_line_in_the_file(tmp_path, monkeypatch, reader):
    text, line = _star_with_a_bad_row("000005@a.mrcs 10000 10000 0")
    path = tmp_path / "short.star"
    path.write_text(text)
    with pytest.raises(InputFileError, match=rf"particle row 5 \(1-based, line {line} of the file\) has 4 values "
                                             r"but the loop has 5 columns\. Fix or remove that row"):
        star.read_particles(path, require_ctf=False)


def test_a_word_in_a_numeric_particle_column_is_named_by_row_line_and_column(tmp_path, monkeypatch, reader):
    text, line = _star_with_a_bad_row("000005@a.mrcs abc 10000 0 1")
    path = tmp_path / "word.star"
    path.write_text(text)
    for read in (star.read_particles, star.read_ctf):
        with pytest.raises(InputFileError) as raised:
            read(path, require_ctf=False)
        message = str(raised.value)
        assert message.startswith(f"{path}: particle row 5 (1-based, line {line} of the file) has rlnDefocusU = "
                                  "'abc', not a number"), message
        assert "\n" not in message


def test_a_word_in_a_numeric_optics_column_is_named_by_its_optics_row(tmp_path, monkeypatch, reader):
    text, _ = _star_with_a_bad_row("000005@a.mrcs 10000 10000 0 1")
    text = text.replace("1 opticsGroup1 0.1 2.7 300.0", "1 opticsGroup1 0.1 2.7 3OO")
    path = tmp_path / "word.star"
    path.write_text(text)
    with pytest.raises(InputFileError) as raised:
        star.read_particles(path, require_ctf=False)
    message = str(raised.value)
    assert f"{path}: optics row 1 (1-based, line 15 of the file) has rlnVoltage = '3OO', not a number" in message


@pytest.mark.parametrize("original_names, values",
                         [(False, 1), (False, 3), (False, 4), (True, 1), (True, 4), (True, 5)],
                         ids=["numbers-last-1", "numbers-last-3", "numbers-last-4", "text-last-1", "text-last-4",
                              "text-last-5"])
def test_a_last_row_cut_short_is_refused_as_a_truncated_file(tmp_path, monkeypatch, reader, original_names, values):
    columns = 6 if original_names else 5
    full = "000005@a.mrcs 10000 10000 0 1 000005@b.mrcs".split()
    text, line = _star_with_a_bad_row(" ".join(full[:values]), original_names)
    text = text[: text.index(" ".join(full[:values])) + len(" ".join(full[:values]))]  # cut there, no newline
    path = tmp_path / "cut.star"
    path.write_text(text)
    with pytest.raises(InputFileError) as raised:
        star.read_particles(path, require_ctf=False)
    message = str(raised.value)
    assert message.startswith(f"{path}: particle row 5 (1-based, line {line} of the file) has {values} "
                              f"value{'s' if values != 1 else ''} but "
                              f"the loop has {columns} columns: the file looks cut short (truncated"), message
    assert "Copy it again" in message and "\n" not in message


@pytest.mark.parametrize("last_value", ['""', "nan", "<NA>"])
def test_a_whole_last_row_with_an_empty_or_missing_last_value_is_not_taken_for_a_cut_one(
        tmp_path, monkeypatch, reader, last_value):
    text, line = _star_with_a_bad_row(f"000005@a.mrcs 10000 10000 0 1 {last_value}", original_names=True)
    path = tmp_path / "whole.star"
    path.write_text(text)
    _, particles, _ = star._read_blocks(path)
    star.check_complete_rows(particles, path)  # what read_particles checks first
    ctf = star.read_ctf(path, require_ctf=False)
    np.testing.assert_array_equal(ctf["defocus_u_angstrom"], 10000)
    assert ctf["defocus_u_angstrom"].shape == (7,)


@pytest.mark.parametrize("first_row, values", [("1@a.mrcs 1 2 3 1 9", 6), ("1@a.mrcs 1 2 3", 4)])
def test_a_first_row_of_another_length_is_named_by_both_readers(tmp_path, monkeypatch, reader, first_row, values):
    # pandas takes a first row of one value too many as an index column, and sizes the table from a short one
    text = ("data_particles\n\nloop_\n_rlnImageName #1\n_rlnAngleRot #2\n_rlnAngleTilt #3\n_rlnAnglePsi #4\n"
            f"_rlnRandomSubset #5\n{first_row}\n2@a.mrcs 1 2 3 2\n3@a.mrcs 1 2 3 1\n")
    path = tmp_path / "first.star"
    path.write_text(text)
    with pytest.raises(InputFileError, match=rf"particle row 1 \(1-based, line 9 of the file\) has {values} values "
                                             r"but the loop has 5 columns\. Fix or remove that row"):
        star.read_particles(path, require_ctf=False)


def test_a_star_cut_inside_its_last_value_is_read_with_a_warning(tmp_path, monkeypatch, reader):
    """A whole row's count of values, the last one cut: only the missing line break at the end tells."""
    import warnings

    from dsub.errors import DsubWarning

    text, _ = _star_with_a_bad_row("000005@a.mrcs 10000 10000 0 1")
    whole, cut = tmp_path / "whole.star", tmp_path / "cut.star"
    whole.write_text(text)
    cut.write_text(text.rstrip("\n"))  # cut before its last line break: all values there, the last maybe short
    # (the file has no poses: reading stops after the rows are checked, which is where the warning comes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DsubWarning)  # a warning would be raised instead of the poses' error
        with pytest.raises(InputFileError, match="rlnAngleRot"):
            star.read_particles(whole, require_ctf=False)  # ends with a line break: no warning
    with pytest.warns(DsubWarning, match="does not end with a line break"), \
            pytest.raises(InputFileError, match="rlnAngleRot"):
        star.read_particles(cut, require_ctf=False)
