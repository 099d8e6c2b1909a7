"""RELION particle ``.star`` files: RELION 3.1+ (optics + particles) and 3.0.

Reading merges each particle's optics-group values into its row (a value in
the particles table wins, as in RELION's ``CTF::readValue``). Writing starts
from the input's own tables, so every column passes through unchanged, and
only the image names (and, for a RELION 3.0 input, the optics table and the
origins in Å) are changed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from dsub import __version__ as dsub_version
from dsub.conventions import matrix_to_relion_euler, relion_euler_to_matrix
from dsub.errors import InputFileError, MissingInputError, warn
from dsub.formats import atomic, star_reader
from dsub.formats.location import cs_star_columns
from dsub.formats.mrc import stack_layout
from dsub.formats.paths import StackRefs, resolve_stack_names, star_roots
from dsub.particles import HALF_UNKNOWN, ParticleTable, same_for_all, shared_if_constant

#: Columns read as text, never numericised (a micrograph named ``1`` stays "1").
NAME_COLUMNS = [
    "rlnImageName", "rlnImageOriginalName", "rlnMicrographName", "rlnMicrographOriginalName",
    "rlnMicrographMovieName", "rlnOpticsGroupName", "rlnGroupName", "rlnCtfImage",
    "rlnReferenceImage",
]
ANGLE_LABELS = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
#: Columns dsub reads as numbers, in the particles or the optics table (``check_numeric_columns``).
NUMERIC_LABELS = {
    *ANGLE_LABELS, "rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginX", "rlnOriginY", "rlnDefocusU",
    "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnVoltage", "rlnSphericalAberration",
    "rlnAmplitudeContrast", "rlnCtfBfactor", "rlnCtfScalefactor", "rlnCtfDataAreCtfPremultiplied",
    "rlnBeamTiltX", "rlnBeamTiltY", "rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11",
    "rlnImagePixelSize", "rlnMicrographPixelSize", "rlnDetectorPixelSize", "rlnMagnification", "rlnImageSize",
    "rlnOpticsGroup", "rlnRandomSubset",
}
#: RELION's amplitude contrast when a file gives none: 0, as ``CTF::readByGroup`` reads it
#: (``ctf.cpp: readValue(EMDL_CTF_Q0, Q0, 0, ...)``; see ``dsub.conventions``).
DEFAULT_AMPLITUDE_CONTRAST = 0.0
#: Optics columns dsub reads (or that do not change the images it models).
KNOWN_OPTICS_LABELS = {
    "rlnOpticsGroup", "rlnOpticsGroupName", "rlnAmplitudeContrast", "rlnSphericalAberration",
    "rlnVoltage", "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality",
    "rlnCtfDataAreCtfPremultiplied", "rlnBeamTiltX", "rlnBeamTiltY", "rlnOddZernike",
    "rlnEvenZernike", "rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11",
    "rlnMicrographPixelSize", "rlnMicrographOriginalPixelSize", "rlnCtfBfactor",
    "rlnCtfScalefactor", "rlnPhaseShift", "rlnDetectorPixelSize", "rlnMagnification",
    "rlnMicrographBinning",
    # RELION's subtraction multiplies each group's prediction by its MTF over the groups' average
    # (particle_subtractor.cpp: divideByMtf(..., true); obs_model.cpp skips it for a single MTF file)
    "rlnMtfFileName",
}
#: Star files of this size or more are read by ``star_reader`` (``starfile`` reads smaller ones). 1 MiB (about
#: 6 000 rows): ``starfile`` walks a file line by line in Python, and holding the interpreter that long slows
#: whatever runs beside the reading (a local cluster starting); at 98 304 rows (16.0 MB, under the 16 MiB this
#: was before) reading the particles took 0.59-0.82 CPU s and 149 MB of peak memory with it against 0.47-0.53 s
#: and 92 MB (BENCHMARKS.md, "The command's fixed part").
FAST_READ_BYTES = 2**20
_FIX = "dsub reads RELION 3.0 and 3.1+ particle .star files (e.g. run_data.star of a Refine3D job)."


def _read_blocks(path: Path) -> tuple[pd.DataFrame | None, pd.DataFrame, dict]:
    """(optics table or None, particles table, other blocks) of a star file.

    Files of ``FAST_READ_BYTES`` or more are read by ``star_reader.read_star``
    (its particle loop parsed by pandas' C reader, names as categories),
    smaller ones by ``starfile``.
    """
    if not path.is_file():
        raise MissingInputError(path)
    try:
        blocks = None
        if path.stat().st_size >= FAST_READ_BYTES:
            blocks = star_reader.read_star(path, NAME_COLUMNS)
        if blocks is None:
            blocks = starfile.read(path, always_dict=True, parse_as_string=NAME_COLUMNS)
    except Exception as exc:  # starfile/pandas raise many types on malformed text
        uneven = star_reader.first_uneven_row(path)
        if uneven is not None:  # a row with too many values, or a first row too short (later ones read as NaN)
            raise _uneven_row_error(path, *uneven) from exc
        detail = star_reader.in_file_lines(path, str(exc)) if isinstance(exc, pd.errors.ParserError) else exc
        raise InputFileError(path, f"could not be parsed as a STAR file ({detail}).", _FIX) from exc
    tables = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    name = "particles" if "particles" in tables else next(
        (k for k, v in tables.items() if "rlnImageName" in v.columns), None
    )
    if name is None:
        found = ", ".join(f"data_{k}" for k in blocks) or "no data_ blocks"
        raise InputFileError(
            path, f"is not a particle STAR file: no table with rlnImageName ({found}).", _FIX
        )
    optics = tables.get("optics") if name != "optics" else None
    other = {k: v for k, v in blocks.items() if k not in (name, "optics")}
    return optics, tables[name], other


def _per_group(values: pd.Series, group_of_row: np.ndarray) -> pd.Categorical:
    """``values`` (one per optics group) for every row, as a categorical: a byte or two per row, not a float."""
    groups = pd.Categorical(values.to_numpy())
    return pd.Categorical.from_codes(np.asarray(groups.codes)[group_of_row], dtype=groups.dtype)


def _merge_optics(particles: pd.DataFrame, optics: pd.DataFrame | None, path: Path) -> pd.DataFrame:
    """Particles with every optics column not already per particle added to each row.

    The added columns are categoricals (each group's value once, a small code
    per row): ten million rows of one optics group do not get ten million copies.
    """
    merged = particles.reset_index(drop=True)  # copy-on-write: added columns leave ``particles`` alone
    if optics is None or optics.empty:
        return merged
    extra = [c for c in optics.columns if c not in merged.columns]
    if "rlnOpticsGroup" not in merged.columns:
        if len(optics) != 1:
            raise InputFileError(
                path, f"defines {len(optics)} optics groups but its particles have no "
                "rlnOpticsGroup column.", "Add rlnOpticsGroup to the particles table."
            )
        first = np.zeros(len(merged), dtype=np.int8)
        for c in extra:
            merged[c] = _per_group(optics[c].iloc[:1], first)
        return merged
    if "rlnOpticsGroup" not in optics.columns or optics["rlnOpticsGroup"].duplicated().any():
        raise InputFileError(
            path, "its data_optics table lacks unique rlnOpticsGroup numbers.",
            "Number the optics groups 1..K, one row each.",
        )
    table = optics.set_index("rlnOpticsGroup")
    groups = merged["rlnOpticsGroup"].to_numpy()
    undefined = sorted(set(groups.tolist()) - set(table.index.tolist()))
    if undefined:
        raise InputFileError(
            path, f"its particles use optics groups {undefined} that data_optics does not "
            "define.", "Add those groups to the optics table."
        )
    group_of_row = table.index.get_indexer(groups)  # hashing: linear in the rows
    for c in extra:
        merged[c] = _per_group(table[c], group_of_row)
    return merged


def _column(df: pd.DataFrame, label: str, default=None, dtype=np.float64) -> np.ndarray | None:
    """Column ``label`` as an array, or ``default`` broadcast (None: absent).

    A column of one value (an optics group's) is a read-only view of that value
    (``particles.shared_if_constant``): no memory per row.
    """
    if label in df.columns:
        return shared_if_constant(df[label].to_numpy(dtype=dtype))
    return None if default is None else np.broadcast_to(np.asarray(default, dtype=dtype), (len(df),))


def _require(df: pd.DataFrame, labels: list[str], path: Path, why: str, fix: str = _FIX) -> None:
    missing = [label for label in labels if label not in df.columns]
    if missing:
        raise InputFileError(
            path, f"lacks the column(s) {', '.join(missing)}, needed for {why}.", fix
        )


def _pixel_size(df: pd.DataFrame, path: Path) -> np.ndarray:
    """Image pixel size in Å: rlnImagePixelSize, rlnMicrographPixelSize, or 3.0 detector/mag."""
    for label in ("rlnImagePixelSize", "rlnMicrographPixelSize"):
        if label in df.columns:
            return _column(df, label)
    if {"rlnDetectorPixelSize", "rlnMagnification"} <= set(df.columns):
        detector_um = df["rlnDetectorPixelSize"].to_numpy(dtype=np.float64)
        return detector_um * 1e4 / df["rlnMagnification"].to_numpy(dtype=np.float64)
    raise InputFileError(
        path, "gives no pixel size (no rlnImagePixelSize, rlnMicrographPixelSize, or "
        "rlnDetectorPixelSize with rlnMagnification).",
        "Add rlnImagePixelSize (Å) to the optics table, e.g. with relion_star_handler.",
    )


def ctf_from_columns(df: pd.DataFrame, path: Path, require_ctf: bool = True) -> dict:
    """CTF arrays named as ``ParticleTable`` fields, from merged particle columns.

    Defaults as RELION's: defocus V = U, angle 0, phase shift 0, B-factor 0,
    amplitude contrast 0.1. Without any defocus column and ``require_ctf``
    False, the particles have no CTF: the values returned (defocus 0, Cs 0,
    amplitude contrast 1) make RELION's CTF formula exactly 1, and
    ``"ctf_absent"`` is True.
    """
    n = len(df)
    absent = "rlnDefocusU" not in df.columns and not require_ctf
    if not absent:
        _require(
            df, ["rlnDefocusU", "rlnVoltage", "rlnSphericalAberration"], path, "the CTF",
            _FIX,
        )
    defocus_u = _column(df, "rlnDefocusU", 0.0)
    return {
        **_optics_from_columns(df, path),
        "defocus_u_angstrom": defocus_u,
        "defocus_v_angstrom": _column(df, "rlnDefocusV") if "rlnDefocusV" in df else defocus_u,
        "defocus_angle_degrees": _column(df, "rlnDefocusAngle", 0.0),
        "phase_shift_degrees": _column(df, "rlnPhaseShift", 0.0),
        "voltage_kv": _column(df, "rlnVoltage", 300.0),
        "spherical_aberration_mm": np.zeros(n) if absent else _column(df, "rlnSphericalAberration"),
        "amplitude_contrast": np.ones(n) if absent
        else _column(df, "rlnAmplitudeContrast", DEFAULT_AMPLITUDE_CONTRAST),
        "ctf_bfactor": _column(df, "rlnCtfBfactor", 0.0),
        "ctf_premultiplied": _column(df, "rlnCtfDataAreCtfPremultiplied", 0, np.int64) != 0,
        "ctf_absent": absent,
    }


def _zernike_column(df: pd.DataFrame, label: str, path: Path) -> np.ndarray:
    """``rlnOddZernike``/``rlnEvenZernike`` (text ``[c0,c1,...]`` per row) as (n, k) float64."""
    if label not in df.columns:
        return np.zeros((len(df), 0))
    texts = df[label].astype(str).to_numpy()
    parsed = {}
    for text in np.unique(texts):
        try:
            parsed[text] = [float(v) for v in text.strip().strip("[]").split(",") if v.strip()]
        except ValueError as exc:
            raise InputFileError(
                path, f"has {label} = {text!r}, not a list of numbers like [0.1,0.2].",
                "Fix the optics table.",
            ) from exc
    width = max(len(v) for v in parsed.values())
    out = np.zeros((len(df), width))
    for text, values in parsed.items():
        out[texts == text, : len(values)] = values
    return out


def _optics_from_columns(df: pd.DataFrame, path: Path) -> dict:
    """Scale factor, beam tilt, Zernike terms and magnification matrices, as ``ParticleTable`` fields.

    Defaults as RELION's ``ObservationModel`` and ``CTF::readByGroup``: scale 1,
    no tilt, no Zernike terms, identity matrix (a missing element keeps its
    identity value).
    """
    n = len(df)
    mag, tilt = same_for_all(np.eye(2), n), same_for_all(np.zeros(2), n)  # neutral: one row of memory
    if any(f"rlnMagMat{row}{col}" in df.columns for row in range(2) for col in range(2)):
        mag = np.broadcast_to(np.eye(2), (n, 2, 2)).copy()
        for row in range(2):
            for col in range(2):
                label = f"rlnMagMat{row}{col}"
                if label in df.columns:
                    mag[:, row, col] = _column(df, label)
    if "rlnBeamTiltX" in df.columns or "rlnBeamTiltY" in df.columns:
        tilt = np.zeros((n, 2))
        for axis, xy in enumerate("XY"):
            if f"rlnBeamTilt{xy}" in df.columns:
                tilt[:, axis] = _column(df, f"rlnBeamTilt{xy}")
    return {
        "ctf_scale": _column(df, "rlnCtfScalefactor") if "rlnCtfScalefactor" in df.columns else same_for_all(1.0, n),
        "beam_tilt_mrad": tilt,
        "odd_zernike": _zernike_column(df, "rlnOddZernike", path),
        "even_zernike": _zernike_column(df, "rlnEvenZernike", path),
        "mag_matrix": mag,
    }


def warn_unmodelled_optics(optics: pd.DataFrame | None, path: Path) -> None:
    """A ``dsub: warning:`` naming every optics column that dsub does not model."""
    if optics is None:
        return
    unknown = [c for c in optics.columns if c not in KNOWN_OPTICS_LABELS]
    if "rlnMtfFileName" in optics.columns and optics["rlnMtfFileName"].nunique() > 1:
        unknown.append("rlnMtfFileName (several MTFs: RELION weights each group by its MTF over their average)")
    if unknown:
        warn(f"{path}: the optics table's {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} "
             "not modelled by dsub and ignored in the subtraction")


def read_ctf(path: str | os.PathLike, require_ctf: bool = True) -> dict:
    """Only the CTF of each particle (see ``ctf_from_columns``); angles not needed."""
    path = Path(path)
    optics, particles, _ = _read_blocks(path)
    check_complete_rows(particles, path)
    check_numeric_columns(optics, particles, path)
    return ctf_from_columns(_merge_optics(particles, optics, path), path, require_ctf)


def _image_names(df: pd.DataFrame, star_path: Path) -> tuple[np.ndarray, np.ndarray, Path | None, dict]:
    """``N@stack`` -> (resolved stack paths, 0-based indices, the folder relative names start from, the stacks
    named without ``N@``).

    A name without ``@`` is the whole file, as RELION reads it: image 1 here, and
    right only for a file of one image, which ``validate.check_images`` checks
    once it has the stack's header. The last item maps each such stack (its
    resolved path, str) to the first row naming it so, 0-based.

    Stacks are looked up from the current folder (RELION's rule), then the star
    file's folder and its parents (see ``paths``); the folder is the one chosen,
    None where every name is absolute.
    """
    column = df["rlnImageName"]
    if isinstance(column.dtype, pd.CategoricalDtype):  # each distinct name split once
        codes = column.cat.codes.to_numpy()
        names = pd.Series(column.cat.categories.astype(str))
        if (codes < 0).any():  # a missing name: split it as the text "nan", as astype(str) gives it
            names = pd.concat([names, pd.Series(["nan"])], ignore_index=True)
            codes = np.where(codes < 0, len(names) - 1, codes)
    else:
        names, codes = column.astype(str).reset_index(drop=True), None
    parts = names.str.split("@", n=1, expand=True)
    if parts.shape[1] == 1:
        parts[1] = None
    has_at = parts[1].notna().to_numpy()
    numbers = pd.to_numeric(parts[0].where(has_at, "1"), errors="coerce")
    stacks = parts[1].where(has_at, parts[0]).to_numpy(dtype=object)
    bad = np.flatnonzero(numbers.isna().to_numpy() | (numbers.to_numpy() < 1))
    if bad.size:
        row = int(bad[0]) if codes is None else int(np.flatnonzero(np.isin(codes, bad))[0])
        raise InputFileError(
            star_path, f"particle {row + 1} has the image name {str(column.iloc[row])!r}, not "
            "N@stack with N >= 1.", "Image names look like 000012@Extract/job007/stack.mrcs."
        )
    first = 0 if codes is None else int(codes[0])  # the first row's stack is probed first, as for plain names
    order = np.concatenate([[first], np.arange(len(stacks))])
    resolved, base = resolve_stack_names(stacks[order], star_roots(star_path), Path(os.path.abspath(star_path)).parent)
    if all(os.path.isabs(str(stack)) for stack in pd.unique(stacks)):
        base = None  # no name starts anywhere
    resolved, indices = resolved[1:], numbers.to_numpy(dtype=np.int64) - 1
    if codes is not None:
        resolved, indices, has_at = resolved[codes], indices[codes], has_at[codes]
    without_index = np.flatnonzero(~has_at)  # usually none
    named_whole = pd.Series(resolved[without_index].astype(str), index=without_index).drop_duplicates()
    return resolved, indices, base, {stack: int(row) for row, stack in named_whole.items()}


def _box_sizes(df: pd.DataFrame, groups: np.ndarray, paths: np.ndarray, star_path: Path):
    """rlnImageSize, or the size of the first stack of each optics group."""
    if "rlnImageSize" in df.columns:
        return _column(df, "rlnImageSize", dtype=np.int64)
    box = np.zeros(len(df), dtype=np.int64)
    for group in np.unique(groups):
        rows = groups == group
        stack = paths[np.argmax(rows)]
        if not os.path.isfile(stack):
            raise MissingInputError(stack, referenced_from=star_path)
        box[rows] = stack_layout(stack).shape[-1]
    return box


def _optics_groups(df: pd.DataFrame, pixel_size: np.ndarray, ctf: dict) -> np.ndarray:
    """rlnOpticsGroup, or (RELION 3.0) one group per distinct pixel size and optics."""
    if "rlnOpticsGroup" in df.columns:
        return _column(df, "rlnOpticsGroup", dtype=np.int64)
    keys = pd.MultiIndex.from_arrays([
        pixel_size, ctf["voltage_kv"], ctf["spherical_aberration_mm"], ctf["amplitude_contrast"]
    ])
    return pd.factorize(keys)[0].astype(np.int64) + 1


def _rotations(df: pd.DataFrame, block: int = 1 << 18) -> np.ndarray:
    """RELION's matrices ``A`` (n, 3, 3) from the angle columns, converted in row blocks (bounded temporaries)."""
    rotations = np.empty((len(df), 3, 3))
    angles = [df[label].to_numpy(np.float64) for label in ANGLE_LABELS]
    for start in range(0, len(df), block):
        rotations[start : start + block] = relion_euler_to_matrix(*(a[start : start + block] for a in angles))
    return rotations


#: How the readers may hold the value a short row lacks in a text column (a number column: NaN).
_ABSENT_TEXT = ["", "nan", "NaN", "<NA>"]


def _maybe_absent(column: pd.Series) -> np.ndarray:
    """(n,) bool: where ``column`` holds what a reader puts in place of a value a row lacks.

    NaN, or in a text column an empty or missing string, whichever the reader
    and pandas version give; a whole row may hold these too (``nan``, ``""``).
    """
    if isinstance(column.dtype, pd.CategoricalDtype):
        absent = np.flatnonzero(column.cat.categories.isin(_ABSENT_TEXT))
        codes = column.cat.codes.to_numpy()
        return (codes < 0) | np.isin(codes, absent)
    if isinstance(column.dtype, np.dtype) and column.dtype.kind in "biuf":
        return column.isna().to_numpy()
    return (column.isna() | column.isin(_ABSENT_TEXT)).to_numpy(dtype=bool)


def check_complete_rows(particles: pd.DataFrame, path: Path) -> None:
    """Refuse a particle row with fewer values than the loop has columns (a last row cut short: a truncated file).

    The readers fill the values a short row lacks (at its end) with NaN or an
    empty text, so a short row ends in one of those; each such row's values are
    counted in the file, so a whole row that holds ``nan`` or ``""`` is taken as
    it is. Rows with too many values are refused by the parsers themselves.
    """
    rows = np.flatnonzero(_maybe_absent(particles.iloc[:, -1]))
    if not rows.size:
        return
    columns = particles.shape[1]
    texts = star_reader.row_texts(path, rows.tolist())
    counts = {row: star_reader.count_values(texts[row][1]) if row in texts else None for row in rows.tolist()}
    short = [row for row, count in counts.items() if count is None or count < columns]
    if not short:
        return
    row = short[0]
    raise _uneven_row_error(path, row, texts[row][0] if row in texts else None, counts[row], columns,
                            row == len(particles) - 1, len(short))


def _uneven_row_error(path: Path, row: int, line: int | None, count: int | None, columns: int, last: bool,
                      rows: int = 1) -> InputFileError:
    """The error for particle ``row`` (0-based) holding ``count`` values where the loop has ``columns`` labels:
    a truncated file when it is the last row and short of values."""
    where = f"particle row {row + 1} (1-based{f', line {line} of the file' if line else ''})"
    values = f"has {count} value{'s' if count != 1 else ''}" if count is not None else "has fewer values"
    more = f" ({rows} such rows)" if rows > 1 else ""
    if last and (count is None or count < columns):
        return InputFileError(
            path, f"{where} {values} but the loop has {columns} columns{more}: the file looks cut short "
            "(truncated, as a copy or a write that did not finish leaves it).",
            "Copy it again from where it was written, or write it again (rerun the job or export that made it).",
        )
    return InputFileError(
        path, f"{where} {values} but the loop has {columns} columns{more}.",
        "Fix or remove that row: every row needs one value per column.",
    )


def check_numeric_columns(optics: pd.DataFrame | None, particles: pd.DataFrame, path: Path) -> None:
    """Refuse a value that is not a number in a column dsub reads as numbers (``NUMERIC_LABELS``).

    Both readers leave such a column as text (``starfile``'s inference: a column
    becomes numeric only when every value is a number); this names the first
    row that stops it, in the table and line of the file where it is.
    """
    for name, table in (("optics", optics), ("particle", particles)):
        if table is None:
            continue
        for label in table.columns:
            column = table[label]
            if label not in NUMERIC_LABELS or pd.api.types.is_numeric_dtype(column.dtype):
                continue
            values = column.astype(object)
            words = (pd.to_numeric(values, errors="coerce").isna() & values.notna()).to_numpy()
            if not words.any():
                continue
            row = int(np.argmax(words))
            line = star_reader.row_line(path, row, block_name="optics" if name == "optics" else None)
            count = int(words.sum())
            raise InputFileError(
                path,
                f"{name} row {row + 1} (1-based{f', line {line} of the file' if line else ''}) has {label} = "
                f"{str(values.iloc[row])!r}, not a number{f' ({count} such rows)' if count > 1 else ''}.",
                f"Write a number there (RELION reads {label} as one) or remove the row; a file edited or "
                "exported by another program may need exporting again.",
            )


def warn_unterminated(path: Path) -> None:
    """Warn when the star file does not end with a line break (RELION's and dsub's writers end each row with one).

    A file cut inside its last value still has a whole row's count of values
    (``check_complete_rows`` cannot see it): the value is shorter, and wrong.
    """
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
    if last not in (b"\n", b"\r"):
        warn(f"{path} does not end with a line break, as the files RELION writes do: if it was cut short (a "
             "copy that did not finish), the last value of its last row is cut too. Compare it with the file "
             "it was copied from.")


def read_particles(path: str | os.PathLike, *, require_ctf: bool = True) -> ParticleTable:
    """Read a RELION particle star file into a ``ParticleTable``.

    Stack paths in ``rlnImageName`` are resolved against the current folder,
    then the star file's folder and its parents (``paths.star_roots``); the
    folder chosen, where relative names start (RELION's project folder), is
    ``extra["star_base"]`` (None where every name is absolute), and the output
    star's names start there too (``export.star_names_base``).
    ``require_ctf=False`` accepts files without defocus (simulated projections):
    their CTF is exactly 1 (see ``ctf_from_columns``). ``extra["dsub_output"]``:
    a label only dsub writes (``dsub_output_mark``) where an earlier dsub run
    wrote the star, else None; ``input_contrast`` is ``input_contrast``'s.
    """
    path = Path(path)
    optics, particles, other = _read_blocks(path)
    if len(particles) == 0:
        raise InputFileError(path, "holds no particles (its particle table is empty).")
    check_complete_rows(particles, path)
    check_numeric_columns(optics, particles, path)
    warn_unterminated(path)
    df = _merge_optics(particles, optics, path)
    warn_unmodelled_optics(optics, path)
    _require(df, ANGLE_LABELS, path, "the particle poses")
    ctf = ctf_from_columns(df, path, require_ctf)
    ctf_absent = ctf.pop("ctf_absent")
    pixel_size = _pixel_size(df, path)
    origins = np.zeros((len(df), 2))
    for axis, xy in enumerate("XY"):
        if f"rlnOrigin{xy}Angst" in df.columns:
            origins[:, axis] = _column(df, f"rlnOrigin{xy}Angst")
        elif f"rlnOrigin{xy}" in df.columns:  # RELION 3.0: pixels
            origins[:, axis] = _column(df, f"rlnOrigin{xy}") * pixel_size
    half = _column(df, "rlnRandomSubset", HALF_UNKNOWN, np.int64)
    if "rlnRandomSubset" in df.columns and not np.isin(half, (1, 2)).all():
        first = int(np.flatnonzero(~np.isin(half, (1, 2)))[0])
        line = star_reader.row_line(path, first)
        raise InputFileError(
            path, "rlnRandomSubset holds values other than 1 and 2 "
            f"({sorted(set(half.tolist()) - {1, 2})}; the first in particle row {first + 1}"
            f"{f', line {line} of the file' if line is not None else ''}).",
            "RELION accepts only 1 and 2; fix or remove the column.",
        )
    _require(df, ["rlnImageName"], path, "the particle images (N@stack)",
             "Give the particles' star of a Refine3D or Extract job (run_data.star, particles.star), whose rows "
             "name each particle's image; a star of poses without images cannot be subtracted.")
    paths, indices, base, named_whole = _image_names(df, path)
    groups = _optics_groups(df, pixel_size, ctf)
    for name in ("voltage_kv", "spherical_aberration_mm", "amplitude_contrast", "ctf_bfactor", "phase_shift_degrees",
                 "ctf_scale", "mag_matrix", "beam_tilt_mrad"):  # one optics group's values: one row of memory
        ctf[name] = shared_if_constant(ctf[name])
    return ParticleTable(
        rotations=_rotations(df),
        origins_angstrom=origins,
        half_set=half.astype(np.int8),
        image_paths=paths,
        image_indices=indices,
        pixel_size_angstrom=shared_if_constant(pixel_size),
        box_size=shared_if_constant(_box_sizes(df, groups, paths, path)),
        optics_group=groups,
        input_contrast=input_contrast(df),
        source_format="star",
        source_path=path,
        source={"optics": optics, "particles": particles, "other": other},
        extra={"ctf_absent": ctf_absent, "star_base": base, "named_whole": named_whole,
               "dsub_output": dsub_output_mark(df.columns)},
        **ctf,
    )


#: The labels dsub adds to the stars it writes (``workflow.export.FIT_COLUMNS``) start so.
DSUB_LABEL_PREFIX = "rlnDsub"
#: The contrast dsub subtracted each particle with (``workflow.export.FIT_COLUMNS["contrast"]``).
DSUB_CONTRAST_LABEL = "rlnDsubContrast"


def dsub_output_mark(labels) -> str | None:
    """A label of ``labels`` that only dsub writes (``rlnDsub...``; ``rlnDsubContrast`` where there): a star of an
    earlier dsub run; else None."""
    labels = [str(label) for label in labels]
    if DSUB_CONTRAST_LABEL in labels:
        return DSUB_CONTRAST_LABEL
    return next((label for label in labels if label.startswith(DSUB_LABEL_PREFIX)), None)


def input_contrast(df: pd.DataFrame) -> np.ndarray | None:
    """Each particle's contrast on top of its CTF for ``--scale input``, (n,) float64; None: the star has none.

    ``rlnDsubContrast`` first: the contrast an earlier dsub run subtracted these
    particles with (fitted, or taken from its own input), measured on top of the
    CTF that already carries ``rlnCtfScalefactor``, so using it with that CTF
    counts nothing twice; it is what ``--scale input`` reuses on dsub's own
    output. Else 1 where the star has ``rlnCtfScalefactor``: that factor is in
    the CTF (``ctf_scale``) and RELION has no further per-particle contrast.
    """
    if DSUB_CONTRAST_LABEL in df.columns:
        return _column(df, DSUB_CONTRAST_LABEL)
    return same_for_all(1.0, len(df)) if "rlnCtfScalefactor" in df.columns else None


def _optics_from_table(table: ParticleTable) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """A RELION 3.1 optics table, one row per ``optics_group``.

    Returns the table and the CTF columns that vary within a group and must
    therefore also be written per particle (RELION reads those first).
    """
    uniq, first, inverse = np.unique(table.optics_group, return_index=True, return_inverse=True)

    def varies(values: np.ndarray) -> bool:
        return bool((values != values[first][inverse]).any())

    optics = pd.DataFrame({
        "rlnOpticsGroup": uniq.astype(np.int64),
        "rlnOpticsGroupName": [f"opticsGroup{g}" for g in uniq],
    })
    per_particle = {}
    for label, values in (
        ("rlnAmplitudeContrast", table.amplitude_contrast),
        ("rlnSphericalAberration", table.spherical_aberration_mm),
        ("rlnVoltage", table.voltage_kv),
    ):
        optics[label] = values[first]
        if varies(values):
            per_particle[label] = values
    optics_terms = [("rlnBeamTiltX", table.beam_tilt_mrad[:, 0]), ("rlnBeamTiltY", table.beam_tilt_mrad[:, 1])]
    optics_terms += [(f"rlnMagMat{r}{c}", table.mag_matrix[:, r, c]) for r in range(2) for c in range(2)]
    if table.beam_tilt_mrad.any() or not np.array_equal(table.mag_matrix, np.broadcast_to(np.eye(2), table.mag_matrix.shape)):
        for label, values in optics_terms:
            if varies(values):
                warn(f"{label} differs between particles of one optics group; the star file gets each "
                     "group's first value (RELION reads it per optics group)")
            optics[label] = values[first]
    if (table.ctf_scale != 1).any() or _input_has_ctf_scale(table):
        per_particle["rlnCtfScalefactor"] = table.ctf_scale
    for label, values in (
        ("rlnImagePixelSize", table.pixel_size_angstrom),
        ("rlnImageSize", table.box_size),
        ("rlnCtfDataAreCtfPremultiplied", table.ctf_premultiplied.astype(np.int64)),
    ):
        if varies(values):
            raise ValueError(f"{label} differs between particles of one optics group")
        if label != "rlnCtfDataAreCtfPremultiplied" or table.ctf_premultiplied.any():
            optics[label] = values[first]
        if label == "rlnImageSize":
            optics["rlnImageDimensionality"] = 2
    if table.source_format == "cs":  # a .cs holds these as float32: 1.05 Å, not 1.049999952
        for label in optics.columns:
            if optics[label].dtype.kind == "f":
                optics[label] = float32_decimals(optics[label].to_numpy())
    return optics, per_particle


def float32_decimals(values: np.ndarray) -> np.ndarray:
    """float32 values (n,) as the float64 of their shortest decimal (NumPy's float32 repr), float64 (n,)."""
    return np.asarray(values, dtype=np.float32).astype(str).astype(np.float64)


def _input_has_ctf_scale(table: ParticleTable) -> bool:
    """Whether a .cs input holds ``ctf/scale``: then the star gets ``rlnCtfScalefactor``, even where it is 1.

    Both scale the CTF linearly: RELION's label is "Linear scale-factor on the
    CTF" (``metadata_label.h``; ``CTF::getCTF`` multiplies by it), cryoSPARC's
    ``ctf/scale`` is the CTF's amplitude scale (1.0 in every refinement output
    read for the reference notes, formats.md §1.3 and §3.4; pyem's csparc2star
    drops it). dsub reads either into ``ParticleTable.ctf_scale`` and writes
    ``ctf/scale`` from ``rlnCtfScalefactor``, so the way back keeps it too.
    """
    source = table.source
    return table.source_format == "cs" and source is not None and "ctf/scale" in (source.dtype.names or ())


def _blocks_from_star(table: ParticleTable) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The input's own tables; a RELION 3.0 input gets an optics table and origins in Å."""
    particles = table.source["particles"].reset_index(drop=True)  # copy-on-write: changes below copy
    if len(particles) != len(table):
        raise ValueError("write_particles needs the whole table, one row per input particle")
    optics = table.source["optics"]
    if optics is None:
        optics, _ = _optics_from_table(table)  # 3.0 rows carry their own CTF columns
    elif "rlnImageSize" not in optics.columns:
        optics = optics.copy()
        _, first = np.unique(table.optics_group, return_index=True)
        box = dict(zip(table.optics_group[first].tolist(), table.box_size[first].tolist()))
        optics["rlnImageSize"] = optics["rlnOpticsGroup"].map(box).fillna(table.box_size[0])
        optics["rlnImageSize"] = optics["rlnImageSize"].astype(np.int64)
    if "rlnOpticsGroup" not in particles.columns:
        particles["rlnOpticsGroup"] = table.optics_group
    for axis, xy in enumerate("XY"):  # RELION 3.1 ignores pixel origins next to an optics table
        if f"rlnOrigin{xy}Angst" not in particles.columns and f"rlnOrigin{xy}" in particles.columns:
            particles[f"rlnOrigin{xy}Angst"] = table.origins_angstrom[:, axis]
            particles = particles.drop(columns=f"rlnOrigin{xy}")
    return optics, particles


def with_origins_and_box(source: dict, origins_angstrom: np.ndarray, box: int, drop_priors: bool) -> dict:
    """A star input's raw tables with new ``rlnOriginX/YAngst`` and ``rlnImageSize`` (re-boxed particles).

    As ``relion_particle_subtract`` writes re-centred particles: origins in Å
    (RELION 3.0 pixel origins are replaced), ``rlnImageSize`` = ``box`` in every
    optics group, and with ``drop_priors`` the ``rlnOriginX/YPriorAngst``
    columns removed (``ParticleSubtractor::saveStarFile``).
    """
    particles = source["particles"].reset_index(drop=True).copy()
    for axis, xy in enumerate("XY"):
        particles = particles.drop(columns=[f"rlnOrigin{xy}"], errors="ignore")
        particles[f"rlnOrigin{xy}Angst"] = np.asarray(origins_angstrom, dtype=np.float64)[:, axis]
        if drop_priors:
            particles = particles.drop(columns=[f"rlnOrigin{xy}PriorAngst"], errors="ignore")
    optics = source["optics"]
    if optics is not None:
        optics = optics.copy()
        optics["rlnImageSize"] = np.int64(box)
    return {**source, "optics": optics, "particles": particles}


def _blocks_from_table(table: ParticleTable) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Optics and particles tables built from the particle table (a .cs input), with the particles' micrographs
    and coordinates where the .cs has ``location/*`` (``location.cs_star_columns``)."""
    optics, per_particle = _optics_from_table(table)
    rot, tilt, psi = matrix_to_relion_euler(table.rotations)
    columns = {
        "rlnImageName": np.full(len(table), "", dtype=object),
        **cs_star_columns(table),  # rlnMicrographName, rlnCoordinateX/Y from location/* where the .cs has them
        "rlnAngleRot": rot, "rlnAngleTilt": tilt, "rlnAnglePsi": psi,
        "rlnOriginXAngst": table.origins_angstrom[:, 0],
        "rlnOriginYAngst": table.origins_angstrom[:, 1],
        "rlnDefocusU": table.defocus_u_angstrom,
        "rlnDefocusV": table.defocus_v_angstrom,
        "rlnDefocusAngle": table.defocus_angle_degrees,
        "rlnPhaseShift": table.phase_shift_degrees,
        "rlnCtfBfactor": table.ctf_bfactor,
        "rlnOpticsGroup": table.optics_group.astype(np.int64),
        **per_particle,
    }
    if (table.half_set != HALF_UNKNOWN).all():  # RELION rejects any value but 1 and 2
        columns["rlnRandomSubset"] = table.half_set.astype(np.int64)
    return optics, pd.DataFrame(columns)


#: Rows formatted at once when a particle table is written (memory: one block's text).
WRITE_BLOCK_ROWS = 50_000
#: As ``starfile.write`` with dsub's options: its default "%.6f" would round away small values
#: (e.g. rlnMagMat01).
FLOAT_FORMAT = "%.10g"


def write_particles(
    table: ParticleTable,
    path: str | os.PathLike,
    image_names,
    original_names=None,
    extra_columns: dict | None = None,
) -> None:
    """Write a RELION 3.1 star file: optics + particles, every input row in input order.

    ``image_names`` (``N@stack``: (n,) str, or a ``paths.StackRefs``) become
    ``rlnImageName``; ``rlnImageOriginalName`` gets ``original_names`` (the same
    kinds), by default the input's image names (as ``relion_particle_subtract``
    does, so ``--revert`` works), or for a star an earlier dsub run wrote
    (``extra["dsub_output"]``) its ``rlnImageOriginalName``, so that a second
    subtraction still names the extracted images. A star input passes every column through; a
    .cs input gets columns built from the table. ``extra_columns`` ({label: (n,)
    values}) are added or replace the input's. The text is ``starfile.write``'s,
    written a block of rows at a time (``write_star``), to a temporary file
    beside ``path`` that is renamed into place.
    """
    if table.source_format == "star":
        optics, particles = _blocks_from_star(table)
        # An earlier dsub run's star: its rlnImageOriginalName names the extraction's images, which stay the originals.
        chained = table.extra.get("dsub_output") is not None and "rlnImageOriginalName" in particles
        default_original = particles["rlnImageOriginalName" if chained else "rlnImageName"]
    else:
        optics, particles = _blocks_from_table(table)
        codes, uniques = table.image_path_codes()
        default_original = StackRefs([str(path) for path in uniques], codes, np.asarray(table.image_indices, np.int64))
    if len(image_names) != len(table) or (not isinstance(image_names, StackRefs) and np.ndim(image_names) != 1):
        raise ValueError(f"need {len(table)} image names, got {np.shape(image_names)}")
    columns = {
        "rlnImageOriginalName": default_original if original_names is None else original_names,
        "rlnImageName": image_names,
        **(extra_columns or {}),
    }
    write_star(path, {"optics": optics, "particles": particles}, columns)


def _column_block(values, start: int, stop: int):
    """Rows ``start:stop`` of a column given as a Series, an array or a ``StackRefs`` (as names)."""
    if isinstance(values, StackRefs):
        return values.names(start, stop)
    if isinstance(values, pd.Series):
        return values.iloc[start:stop].reset_index(drop=True)
    return np.asarray(values)[start:stop]


def _names_as_text(refs: StackRefs, start: int, stop: int) -> tuple[str, list]:
    """``N@path`` of rows ``start:stop`` as ``_as_text`` gives them: quoted only where the path holds a space,
    which is decided once per distinct path (a name is never empty)."""
    names = refs.names(start, stop).tolist()
    if any(" " in str(path) for path in refs.paths):
        names = [f'"{name}"' if " " in name else name for name in names]
    return "%s", names


def _quoted(column: pd.Series) -> pd.Series:
    """``starfile``'s quoting of text values: in double quotes when empty or holding a space."""
    def quote(value):
        return f'"{value}"' if isinstance(value, str) and (" " in value or not value) else value

    if isinstance(column.dtype, pd.CategoricalDtype):  # ``tolist``: iterating arrow-backed categories is slow
        return column.cat.rename_categories([quote(c) for c in column.cat.categories.tolist()])
    if column.dtype == object or pd.api.types.is_string_dtype(column.dtype):
        return column.map(quote)
    return column


def _as_text(column: pd.Series) -> tuple[str, list]:
    """The column's values as ``starfile.write`` puts them in the text: (a ``%`` conversion, the values it takes).

    Floats ``FLOAT_FORMAT % value`` (the values themselves: each row is
    formatted with one ``%`` of all its values, ``write_star``), text quoted
    (``_quoted``), everything else ``str(value)``, a missing value ``<NA>``
    (these as text, under ``%s``): what pandas' ``to_csv`` writes value by
    value, without its per-value overhead (most of the time of writing
    millions of rows).
    """
    if isinstance(column.dtype, np.dtype) and column.dtype.kind in "biuf":
        values = column.to_numpy()
        if values.dtype.kind in "iu":  # ``%d`` of an int is its ``str``
            return "%d", values.tolist()
        if values.dtype.kind != "f":
            return "%s", [str(value) for value in values.tolist()]
        missing = np.flatnonzero(np.isnan(values)).tolist()
        if not missing:
            return FLOAT_FORMAT, values.tolist()
        text = [FLOAT_FORMAT % value for value in values.tolist()]
        for row in missing:
            text[row] = "<NA>"
        return "%s", text
    column = _quoted(column)
    if isinstance(column.dtype, pd.CategoricalDtype):
        categories = np.array([str(value) for value in column.cat.categories.tolist()] + ["<NA>"], dtype=object)
        return "%s", categories[column.cat.codes.to_numpy()].tolist()  # code -1 (missing): the last
    missing = column.isna().to_numpy()
    return "%s", ["<NA>" if absent else str(value) for value, absent in zip(column.tolist(), missing.tolist())]


#: The star's first line. starfile's own (``starfile.writer.package_info``) carries the time of writing, so two
#: runs of the same command (or a run and its resumption) would not write the same bytes; this one does.
CREATED_BY = f"# Created by dsub (version {dsub_version})"


def write_star(path: str | os.PathLike, blocks: dict, columns: dict | None = None) -> None:
    """Write ``blocks`` ({name: DataFrame}) as ``starfile.write(blocks, path, float_format=FLOAT_FORMAT)`` does.

    ``columns`` ({label: (n,) values, a Series or a ``paths.StackRefs``}) are
    set in the last block (replacing a column of that label in place, else
    added at the end); they and that block's rows are formatted
    ``WRITE_BLOCK_ROWS`` at a time. Written to a temporary file beside ``path``,
    then renamed: never a half-written file. The first line names dsub
    (``CREATED_BY``), without a time: the same blocks give the same bytes.
    """
    path = Path(path)
    names = list(blocks)
    *head, last = names
    table = blocks[last]
    columns = columns or {}
    labels = list(table.columns) + [label for label in columns if label not in table.columns]
    tmp = atomic.temporary_name(path)
    try:
        with open(tmp, "w") as f:
            f.write(CREATED_BY + "\n\n\n")
            if head:  # the optics table: small, written by starfile itself (less its time-stamped first line)
                text = starfile.to_string({name: blocks[name] for name in head}, float_format=FLOAT_FORMAT)
                f.write(text[text.index("data_"):])
            f.write(f"data_{last}\n\nloop_\n")
            f.write("".join(f"_{label} #{number}\n" for number, label in enumerate(labels, 1)))
            for start in range(0, len(table), WRITE_BLOCK_ROWS):
                stop = min(start + WRITE_BLOCK_ROWS, len(table))
                rows = table.iloc[start:stop].reset_index(drop=True)
                texts = {}
                for label, values in columns.items():
                    if isinstance(values, StackRefs):  # names built here: no Series of them to quote value by value
                        texts[label] = _names_as_text(values, start, stop)
                    else:
                        rows[label] = _column_block(values, start, stop)
                formats, values = zip(*(texts[label] if label in texts else _as_text(rows[label]) for label in labels))
                line = "\t".join(formats)  # one ``%`` a row: a conversion per value costs a third more
                f.write("\n".join([line % row for row in zip(*values)]) + "\n")
            f.write("\n\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
