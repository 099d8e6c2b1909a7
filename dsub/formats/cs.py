"""cryoSPARC particle ``.cs`` files (numpy structured arrays, fields ``slot/field``).

A job's particles are split over ``J<n>_<iter>_particles.cs`` (the slots the
job made) and ``J<n>_passthrough_particles.cs`` (slots copied from its
inputs); dsub joins the two on ``uid`` as cryoSPARC does. Only the numpy
format is read; cryosparc-tools' compressed CSDAT format is refused with the
command that converts it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from dsub.conventions import (
    beam_tilt_mrad_to_cryosparc_tilt,
    mag_matrix_to_cryosparc_anisomag,
    cryosparc_anisomag_to_mag_matrix,
    cryosparc_pose_to_matrix,
    cryosparc_tilt_to_beam_tilt_mrad,
    cryosparc_shift_to_origin_angstrom,
    half_set_to_split,
    matrix_to_cryosparc_pose,
    origin_angstrom_to_cryosparc_shift,
    split_to_half_set,
)
from dsub.errors import InputFileError, MissingInputError, warn
from dsub.particles import HALF_UNKNOWN, ParticleTable
from dsub.formats import atomic
from dsub.formats.location import star_locations
from dsub.formats.paths import StackRefs, cryosparc_project_folder, cs_roots, resolve_stack_names

MAGIC_NUMPY = b"\x93NUMPY"
MAGIC_CSDAT = b"\x95CSDAT"
BLOB_FIELDS = ("uid", "blob/path", "blob/idx", "blob/shape", "blob/psize_A")
POSE_FIELDS = ("alignments3D/pose", "alignments3D/shift")
CTF_FIELDS = (
    "ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad", "ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast"
)
#: ``ctf/*`` fields that dsub reads, or that do not change the images it models.
KNOWN_CTF_FIELDS = set(CTF_FIELDS) | {
    "ctf/type", "ctf/exp_group_id", "ctf/phase_shift_rad", "ctf/bfactor", "ctf/scale",
    "ctf/scale_const",  # a flag: 1 where ctf/scale is one constant (real refinement outputs: 1 with scale 1)
    "ctf/tilt_A", "ctf/anisomag", "ctf/cross_corr_ctffind4", "ctf/ctf_fit_to_A",
    "ctf/path", "ctf/fig_of_merit_gctf",
}
#: The fields dsub adds to the .cs files it writes (``workflow.export.FIT_FIELDS``) start so.
DSUB_FIELD_PREFIX = "dsub/"
#: ``blob/sign`` written for stacks that came from RELION. cryoSPARC's own import of
#: RELION stacks (``empiar_10076_7.cs``, ``cryosparc_J2_particles_exported.cs``) records -1,
#: as do its extracted stacks; the flag's exact meaning is unpublished.
STAR_IMPORT_BLOB_SIGN = -1.0


#: What to do with a .cs shorter than its header promises.
_TRUNCATED_FIX = ("The file is cut short (an interrupted copy or download): copy it again, or export the job's "
                  "particles again from the cryoSPARC project.")


def _truncation(path: Path) -> str | None:
    """How a numpy-format .cs is shorter than its header promises, in words; None if it is not.

    Reads only the header (numpy's ``.npy`` format: magic, version, header
    length, a dict of dtype, order and shape). A header that is itself cut
    short says so without a promised size.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = f.read(12)
    if len(start) < 10 or start[6:8] not in (b"\x01\x00", b"\x02\x00"):
        return None  # too short to say, or a later format: np.load judges it
    header_end = (10 + int.from_bytes(start[8:10], "little") if start[6] == 1
                  else 12 + int.from_bytes(start[8:12], "little"))
    if size < header_end:
        return f"{size} bytes, which end inside its header ({header_end} bytes)"
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(f, max_header_size=2**30)
            data_start = f.tell()
    except (ValueError, OSError, EOFError, SyntaxError):
        return None  # a header numpy cannot read: np.load says why
    rows = int(np.prod(shape))
    expected = data_start + rows * dtype.itemsize
    if size >= expected or dtype.hasobject:
        return None
    whole = max(0, size - data_start) // dtype.itemsize if dtype.itemsize else 0
    return (f"its header says {rows} particles of {dtype.itemsize} bytes, {expected} bytes, but the file "
            f"holds only {size} bytes ({whole} whole particles)")


def _load_one(path: Path) -> np.ndarray:
    """One numpy-format .cs file, after checking its magic bytes."""
    if not path.is_file():
        raise MissingInputError(path)
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == MAGIC_CSDAT:
        raise InputFileError(
            path, "is in cryosparc-tools' compressed CSDAT format, which dsub does not read.",
            "Convert it to numpy format with cryosparc-tools: `from cryosparc.dataset import "
            "Dataset, NUMPY_FORMAT; Dataset.load(path).save(out, format=NUMPY_FORMAT)`, or "
            "export the job's particles from cryoSPARC.",
        )
    if magic != MAGIC_NUMPY:
        raise InputFileError(
            path, "is not a cryoSPARC .cs file (no numpy header).",
            "Give a particles .cs from a cryoSPARC job folder, e.g. J24_005_particles.cs.",
        )
    truncated = _truncation(path)
    if truncated is not None:
        raise InputFileError(path, f"is truncated: {truncated}.", _TRUNCATED_FIX)
    try:
        data = np.load(path, allow_pickle=False, max_header_size=2**30)
    except (ValueError, OSError, EOFError) as exc:
        raise InputFileError(path, f"could not be read as a .cs file ({exc}).",
                             "A copy cut short or damaged reads so: copy it again, or export the job's particles "
                             "again from the cryoSPARC project.") from exc
    if data.dtype.names is None or data.ndim != 1:
        raise InputFileError(path, "is a numpy array but not a cryoSPARC dataset (no fields).")
    return data


_PARTICLES_NAME = re.compile(
    r"^(?P<prefix>.*?)(?P<job>J\d+)_(?:class_(?P<cls>\d+)_)?(?:\d+_)?particles(?P<suffix>\w*)\.cs$"
)


def passthrough_candidates(path: str | os.PathLike) -> list[Path]:
    """The passthrough files cryoSPARC writes beside a job's particles file, by name.

    ``J24_005_particles.cs`` -> ``J24_passthrough_particles.cs``;
    ``J12_particles_selected.cs`` -> ``J12_passthrough_particles_selected.cs``;
    a heterogeneous refinement's class output ``J5_class_00_00262_particles.cs``
    -> ``J5_passthrough_particles_class_0.cs``. A download prefix
    (``cryosparc_P12_``) is tried with and without.
    """
    path = Path(path)
    match = _PARTICLES_NAME.match(path.name)
    if match is None or "passthrough" in path.name:
        return []
    job, suffix, cls = match.group("job"), match.group("suffix"), match.group("cls")
    tails = [suffix] if cls is None else [f"{suffix}_class_{int(cls)}", f"{suffix}_class_{cls}"]
    prefixes = dict.fromkeys([match.group("prefix"), ""])
    names = dict.fromkeys(f"{prefix}{job}_passthrough_particles{tail}.cs" for prefix in prefixes for tail in tails)
    return [path.parent / name for name in names]


def passthrough_path(path: str | os.PathLike) -> Path | None:
    """The passthrough file beside a job's particles file, if one exists (see ``passthrough_candidates``)."""
    return next((p for p in passthrough_candidates(path) if p.is_file()), None)


def _join(main: np.ndarray, extra: np.ndarray, path: Path, extra_path: Path) -> np.ndarray:
    """Inner join on ``uid`` in ``main``'s row order; ``main``'s fields win.

    Particles of ``main`` without a row in ``extra`` are left out, with a warning.
    """
    for data, where in ((main, path), (extra, extra_path)):
        if "uid" not in data.dtype.names:
            raise InputFileError(where, "has no uid field, so its particles cannot be joined with "
                                 f"{(extra_path if where == path else path).name}.",
                                 "Give the particles and passthrough files of one cryoSPARC job.")
    order = np.argsort(extra["uid"], kind="stable")
    sorted_uid = extra["uid"][order]
    pos = np.minimum(np.searchsorted(sorted_uid, main["uid"]), len(sorted_uid) - 1)
    found = sorted_uid[pos] == main["uid"] if len(sorted_uid) else np.zeros(len(main), bool)
    if len(main) and not found.any():
        raise InputFileError(
            extra_path, f"shares no particle uid with {path.name}.",
            "Move it away, or give the passthrough file of the same job and class.",
        )
    if not found.all():
        warn(f"{extra_path}: {int((~found).sum())} of the {len(main)} particles of {path.name} have no row in "
             "it; they are left out of the subtraction and of the outputs")
    added = [n for n in extra.dtype.names if n not in main.dtype.names]
    dtype = [(n, main.dtype.fields[n][0]) for n in main.dtype.names]
    dtype += [(n, extra.dtype.fields[n][0]) for n in added]
    joined = np.empty(int(found.sum()), dtype=dtype)
    for name in main.dtype.names:
        joined[name] = main[name][found]
    rows = order[pos[found]]
    for name in added:
        joined[name] = extra[name][rows]
    return joined


def load_joined(path: str | os.PathLike, passthrough=()) -> tuple[np.ndarray, list[Path], list[Path], list[dict]]:
    """The particles of ``path`` joined on ``uid`` with the job's passthrough file and ``passthrough``.

    Returns (dataset, the files joined, the passthrough names looked for beside
    ``path``, one dict per file joined: ``path``, ``rows`` (its row count),
    ``groups`` (the field groups, ``slot`` of ``slot/field``, it added, in its
    order) and ``beside`` (True where found beside ``path``, not given)). Fields
    of ``path`` win over a passthrough's, an earlier passthrough's over a later
    one's (as cryoSPARC's newer slots replace inherited ones).
    """
    path = Path(path)
    data = _load_one(path)
    looked_for = passthrough_candidates(path)
    found = passthrough_path(path)
    files = ([found] if found is not None else []) + [Path(p) for p in passthrough]
    joined, joins = [], []
    for extra_path in files:
        if any(os.path.abspath(extra_path) == os.path.abspath(done) for done in joined):
            continue
        extra, before = _load_one(extra_path), set(data.dtype.names)
        data = _join(data, extra, path, extra_path)
        added = [name for name in data.dtype.names if name not in before]
        joins.append({"path": extra_path, "rows": len(extra), "beside": extra_path is found,
                      "groups": list(dict.fromkeys(name.split("/", 1)[0] for name in added))})
        joined.append(extra_path)
    return data, joined, looked_for, joins


def joined_line(join: dict, path) -> str:
    """The line saying one passthrough file was joined with the particles file ``path`` (``load_joined``'s dict).

    E.g. ``Joined /p/J15_passthrough_particles.cs (found beside J15_particles.cs) on uid: 12 000 rows, adding
    the field groups ctf, location and pick_stats.``
    """
    how = f"found beside {Path(path).name}" if join["beside"] else "--passthrough"
    groups = join["groups"]
    listed = ", ".join(groups[:-1]) + " and " + groups[-1] if len(groups) > 1 else "".join(groups)
    adds = (f"adding the field group{'s' if len(groups) > 1 else ''} {listed}" if groups
            else "adding no field that the files before it lack")
    rows = f"{join['rows']:,}".replace(",", " ")  # a space between thousands, as dsub's other lines count
    return f"Joined {join['path']} ({how}) on uid: {rows} row{'s' if join['rows'] != 1 else ''}, {adds}."


def load_dataset(path: str | os.PathLike, passthrough=()) -> np.ndarray:
    """The particles of ``path``, joined with the job's passthrough file(s) (see ``load_joined``)."""
    return load_joined(path, passthrough)[0]


def _missing(data: np.ndarray, fields, path: Path, why: str, joined=(), looked_for=()) -> None:
    missing = [f for f in fields if f not in data.dtype.names]
    if missing:
        if joined:
            where = f" (nor in the joined {', '.join(str(p) for p in joined)})"
        elif looked_for:
            where = f" and no passthrough file was found beside it (looked for {', '.join(p.name for p in looked_for)})"
        else:
            where = ""
        raise InputFileError(
            path, f"lacks the field(s) {', '.join(missing)}, needed for {why}{where}.",
            "Give the file that holds them with --passthrough FILE (e.g. the job's "
            "J<n>_passthrough_particles*.cs), or the particles output of a 3D refinement job "
            "(Homogeneous, Non-uniform or Local Refinement), which carries blob, ctf and alignments3D slots.",
        )


def ctf_from_fields(data: np.ndarray, path: Path, require_ctf: bool = True, joined=(), looked_for=()) -> dict:
    """CTF arrays named as ``ParticleTable`` fields, in RELION units (degrees).

    Without ``ctf/*`` fields and ``require_ctf`` False the CTF is exactly 1
    (defocus 0, Cs 0, amplitude contrast 1) and ``"ctf_absent"`` is True.
    """
    names = data.dtype.names
    n = len(data)
    absent = not require_ctf and "ctf/df1_A" not in names
    if not absent:
        _missing(data, CTF_FIELDS, path, "the CTF", joined, looked_for)

    def field(name: str, default: float) -> np.ndarray:
        return data[name].astype(np.float64) if name in names else np.full(n, default)

    return {
        **_optics_from_fields(data, path),
        "defocus_u_angstrom": field("ctf/df1_A", 0.0),
        "defocus_v_angstrom": field("ctf/df2_A", 0.0),
        "defocus_angle_degrees": np.rad2deg(field("ctf/df_angle_rad", 0.0)),
        "phase_shift_degrees": np.rad2deg(field("ctf/phase_shift_rad", 0.0)),
        "voltage_kv": field("ctf/accel_kv", 300.0),
        "spherical_aberration_mm": field("ctf/cs_mm", 0.0),
        "amplitude_contrast": field("ctf/amp_contrast", 1.0),
        "ctf_bfactor": field("ctf/bfactor", 0.0),
        "ctf_premultiplied": np.zeros(n, dtype=bool),
        "ctf_absent": absent,
    }


def _optics_from_fields(data: np.ndarray, path: Path) -> dict:
    """``ctf/scale``, ``ctf/tilt_A`` and ``ctf/anisomag`` as ``ParticleTable`` fields (see conventions).

    Every other ``ctf/*`` field that could change the images (``ctf/trefoil_A``,
    ``ctf/tetra_A``, ``ctf/shift_A`` and unknown ones) gets a warning naming it
    when any particle has a non-zero value there.
    """
    names = data.dtype.names
    n = len(data)
    tilt = np.zeros((n, 2))
    if "ctf/tilt_A" in names and np.any(data["ctf/tilt_A"]):
        cs_mm = data["ctf/cs_mm"].astype(np.float64) if "ctf/cs_mm" in names else np.zeros(n)
        tilted = np.any(data["ctf/tilt_A"] != 0, axis=1)
        if np.any(tilted & (cs_mm == 0)):
            raise InputFileError(
                path, "has ctf/tilt_A (beam tilt) on particles with ctf/cs_mm = 0, which cannot be "
                "converted to RELION's beam tilt.", "Fix ctf/cs_mm, or zero ctf/tilt_A knowingly.",
            )
        tilt[tilted] = cryosparc_tilt_to_beam_tilt_mrad(data["ctf/tilt_A"][tilted], cs_mm[tilted])
    mag = np.broadcast_to(np.eye(2), (n, 2, 2)).copy()
    if "ctf/anisomag" in names and np.any(data["ctf/anisomag"]):
        mag = cryosparc_anisomag_to_mag_matrix(data["ctf/anisomag"])
    ignored = [
        name for name in names
        if name.startswith("ctf/") and name not in KNOWN_CTF_FIELDS
        and data[name].dtype.kind in "biuf" and np.any(data[name])
    ]
    if ignored:
        warn(f"{path}: {', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} not zero but not "
             "modelled by dsub, and ignored in the subtraction")
    return {
        "ctf_scale": data["ctf/scale"].astype(np.float64) if "ctf/scale" in names else np.ones(n),
        "beam_tilt_mrad": tilt,
        "mag_matrix": mag,
    }


def read_ctf(path: str | os.PathLike, require_ctf: bool = True, passthrough=()) -> dict:
    """Only the CTF of each particle (see ``ctf_from_fields``); poses not needed."""
    data, joined, looked_for, _ = load_joined(path, passthrough)
    return ctf_from_fields(data, Path(path), require_ctf, joined, looked_for)


def resolve_blob_paths(raw, cs_path: Path, cs_root=None) -> tuple[np.ndarray, Path | None]:
    """Absolute stack paths from ``blob/path`` values (bytes or str), and the project folder (or None).

    One leading ``>`` (relative to an export folder) is stripped. Relative
    paths are joined to ``cs_root`` if given, else to the first of the
    cryoSPARC project folder above the .cs, the .cs folder, its parent and its
    grandparent in which the first relative stack exists, else to the .cs
    folder (see ``paths.cs_roots``).
    """
    raw = np.asarray(raw).reshape(-1)
    uniques, inverse = np.unique(raw, return_inverse=True)  # decode each stack name once
    texts = [u.decode() if isinstance(u, bytes) else str(u) for u in uniques]
    exported = any(t.startswith(">") for t in texts)
    texts = np.array([t[1:] if t.startswith(">") else t for t in texts], dtype=object)
    roots = cs_roots(cs_path, cs_root)
    fallback = roots[0] if cs_root is not None else Path(os.path.abspath(cs_path)).parent
    resolved, root = resolve_stack_names(texts[inverse.reshape(-1)], roots, fallback)
    if cs_root is None and exported:
        root = cryosparc_project_folder(cs_path)  # ">" paths start from an export folder, not the project
    return resolved, root


def read_particles(
    path: str | os.PathLike, cs_root=None, *, require_ctf: bool = True, passthrough=()
) -> ParticleTable:
    """Read a cryoSPARC particles .cs (plus its passthrough files) into a ``ParticleTable``.

    ``passthrough``: further files joined on ``uid`` (see ``load_joined``).
    ``extra["project_folder"]`` is the folder relative ``blob/path`` values were
    resolved against (the cryoSPARC project folder, or ``cs_root``),
    ``extra["passthrough"]`` the files joined (``extra["passthrough_joins"]``: what each
    added, see ``load_joined``), and ``extra["location_roots"]``
    where ``location/micrograph_path`` may start (``location.micrograph_base``),
    ``extra["dsub_output"]`` a ``dsub/...`` field where an earlier dsub run wrote
    the .cs (its ``alignments3D/alpha``: the contrast it subtracted with), else None.
    """
    path = Path(path)
    data, joined, looked_for, joins = load_joined(path, passthrough)
    if len(data) == 0:
        raise InputFileError(path, "holds no particles (the dataset is empty).")
    _missing(data, BLOB_FIELDS + POSE_FIELDS, path, "the particle images and poses", joined, looked_for)
    ctf = ctf_from_fields(data, path, require_ctf, joined, looked_for)
    ctf_absent = ctf.pop("ctf_absent")
    names = data.dtype.names
    pixel_size = data["blob/psize_A"].astype(np.float64)
    shape = data["blob/shape"].reshape(len(data), -1)
    if len(data) and (shape[:, 0] != shape[:, -1]).any():
        raise InputFileError(path, "holds non-square particle images (blob/shape).")
    align_psize = data["alignments3D/psize_A"] if "alignments3D/psize_A" in names else pixel_size
    groups, group_ids = np.unique(
        data["ctf/exp_group_id"] if "ctf/exp_group_id" in names else np.zeros(len(data)),
        return_inverse=True,
    )
    half = (
        split_to_half_set(data["alignments3D/split"]) if "alignments3D/split" in names
        else np.full(len(data), HALF_UNKNOWN, dtype=np.int8)
    )
    image_paths, project_folder = resolve_blob_paths(data["blob/path"], path, cs_root)
    return ParticleTable(
        rotations=cryosparc_pose_to_matrix(data["alignments3D/pose"]),
        origins_angstrom=cryosparc_shift_to_origin_angstrom(
            data["alignments3D/shift"], align_psize
        ),
        half_set=half,
        image_paths=image_paths,
        image_indices=data["blob/idx"].astype(np.int64),
        pixel_size_angstrom=pixel_size,
        box_size=shape[:, 0].astype(np.int64),
        optics_group=group_ids.reshape(-1).astype(np.int64) + 1,
        input_contrast=(
            data["alignments3D/alpha"].astype(np.float64) if "alignments3D/alpha" in names else None
        ),
        source_format="cs",
        source_path=path,
        source=data,
        extra={"ctf_absent": ctf_absent, "exp_group_ids": groups, "project_folder": project_folder,
               # a .cs an earlier dsub run wrote (its alignments3D/alpha: the contrast it subtracted with)
               "dsub_output": next((name for name in names if name.startswith(DSUB_FIELD_PREFIX)), None),
               "passthrough": joined, "passthrough_joins": joins,
               # where location/micrograph_path starts (location.micrograph_base): as blob/path does
               "location_roots": (cs_roots(path, cs_root),
                                  Path(os.path.abspath(cs_root)) if cs_root is not None
                                  else cryosparc_project_folder(path))},
        **ctf,
    )


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijection on uint64 that scatters consecutive numbers (SplitMix64's finaliser)."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def star_uids(source_path, n: int, first_row: int = 0) -> np.ndarray:
    """Deterministic uids for particles read from a star file: distinct within the file.

    ``splitmix64(seed + row)`` with the seed hashed from the star file's path:
    the same file gives the same uids on every run, other files other uids.
    Rows ``first_row:first_row + n``.
    """
    name = os.path.abspath(source_path or "").encode()
    seed = int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "little")
    return _splitmix64(np.uint64(seed) + np.arange(first_row, first_row + n, dtype=np.uint64))


def _fields_from_table(table: ParticleTable, first_row: int = 0) -> dict[str, np.ndarray]:
    """cryoSPARC fields built from the table (a star input); blob/path, idx, alpha set later.

    ``table`` may be rows ``first_row:first_row + len(table)`` of a larger table
    (the uids are those rows' of the whole table).
    """
    n = len(table)
    psize = table.pixel_size_angstrom
    return {
        "uid": star_uids(table.source_path, n, first_row),
        "blob/shape": np.stack([table.box_size, table.box_size], axis=1).astype("<u4"),
        "blob/psize_A": psize.astype("<f4"),
        "blob/sign": np.full(n, STAR_IMPORT_BLOB_SIGN, dtype="<f4"),
        "ctf/type": np.full(n, b"imported", dtype="S8"),
        "ctf/exp_group_id": table.optics_group.astype("<u4"),
        "ctf/accel_kv": table.voltage_kv.astype("<f4"),
        "ctf/cs_mm": table.spherical_aberration_mm.astype("<f4"),
        "ctf/amp_contrast": table.amplitude_contrast.astype("<f4"),
        "ctf/df1_A": table.defocus_u_angstrom.astype("<f4"),
        "ctf/df2_A": table.defocus_v_angstrom.astype("<f4"),
        "ctf/df_angle_rad": np.deg2rad(table.defocus_angle_degrees).astype("<f4"),
        "ctf/phase_shift_rad": np.deg2rad(table.phase_shift_degrees).astype("<f4"),
        "ctf/bfactor": table.ctf_bfactor.astype("<f4"),
        "ctf/scale": table.ctf_scale.astype("<f4"),
        "ctf/tilt_A": beam_tilt_mrad_to_cryosparc_tilt(
            table.beam_tilt_mrad, table.spherical_aberration_mm).astype("<f4"),
        "ctf/anisomag": mag_matrix_to_cryosparc_anisomag(table.mag_matrix).astype("<f4"),
        "alignments3D/pose": matrix_to_cryosparc_pose(table.rotations).astype("<f4"),
        "alignments3D/shift": origin_angstrom_to_cryosparc_shift(
            table.origins_angstrom, psize).astype("<f4"),
        "alignments3D/psize_A": psize.astype("<f4"),
        "alignments3D/split": half_set_to_split(table.half_set),
    }


def with_origins_and_box(data: np.ndarray, origins_angstrom: np.ndarray, box: int) -> np.ndarray:
    """A copy of a .cs input's records with new shifts and box (re-boxed particles).

    ``alignments3D/shift`` gets ``origins_angstrom`` in pixels of
    ``alignments3D/psize_A`` (or ``blob/psize_A``), ``blob/shape`` becomes
    ``(box, box)``; every other field is unchanged.
    """
    data = data.copy()
    names = data.dtype.names
    psize = data["alignments3D/psize_A"] if "alignments3D/psize_A" in names else data["blob/psize_A"]
    if "alignments3D/shift" in names:
        data["alignments3D/shift"] = origin_angstrom_to_cryosparc_shift(np.asarray(origins_angstrom), psize)
    data["blob/shape"] = box
    return data


#: Rows converted and written at once by ``write_particles`` (memory: one block of records).
WRITE_BLOCK_ROWS = 100_000


def write_particles(
    table: ParticleTable,
    path: str | os.PathLike,
    image_paths,
    image_indices=None,
    contrast=None,
    extra_fields: dict | None = None,
) -> None:
    """Write a numpy-format .cs with every input row in input order.

    ``blob/path`` (bytes), ``blob/idx`` (0-based) and ``alignments3D/alpha``
    (``contrast``; None keeps the input's alpha, or 1.0) are replaced; a .cs
    input passes every other field through, a star input gets its fields built
    from the table (see ``_fields_from_table``, ``star_uids``) and, with
    ``rlnMicrographName``, the ``location/*`` fields (``location.star_locations``:
    the fractions and shape only where every micrograph's header can be read).
    ``image_paths`` is (n,) paths with ``image_indices`` (n,), or a
    ``paths.StackRefs`` holding both (``image_indices`` None).
    ``extra_fields`` ({name: (n,) array}) are added or replace the input's.
    The records are built and written ``WRITE_BLOCK_ROWS`` at a time after the
    ``.npy`` header (as ``np.save`` writes it), into a temporary file beside
    ``path`` that is renamed into place.
    """
    n = len(table)
    if table.source_format == "cs" and len(table.source) != n:
        raise ValueError("write_particles needs the whole table, one row per input particle")
    refs = image_paths if isinstance(image_paths, StackRefs) else StackRefs.from_paths(
        [os.fspath(p) for p in image_paths], np.asarray(image_indices).reshape(-1))
    if len(refs) != n or (image_indices is not None and np.shape(image_indices) != (n,)):
        raise ValueError(f"need {n} image paths and indices")
    if table.source_format != "cs" and (table.odd_zernike.any() or table.even_zernike.any()):
        warn(f"{table.source_path}: rlnOddZernike/rlnEvenZernike have no cryoSPARC field dsub can write "
             "(ctf/trefoil_A and ctf/tetra_A use an unpublished convention); the .cs output leaves them out")
    width = refs.path_width()
    locations = star_locations(table)  # a star's micrographs and coordinates (location/*), read once

    def records(start: int, stop: int) -> dict[str, np.ndarray]:
        rows = slice(start, stop)
        if table.source_format == "cs":
            fields = {name: table.source[name][rows] for name in table.source.dtype.names}
        else:
            fields = _fields_from_table(table.subset(np.arange(start, stop)), start)
            if locations is not None:
                fields.update(locations.fields(start, stop))
        fields["blob/path"] = refs.path_bytes(start, stop).astype(f"S{width}")
        fields["blob/idx"] = refs.indices[rows].astype("<u4")
        if contrast is not None:
            fields["alignments3D/alpha"] = np.asarray(contrast, dtype="<f4").reshape(n)[rows]
        elif "alignments3D/alpha" not in fields:
            fields["alignments3D/alpha"] = np.ones(stop - start, dtype="<f4")
        else:
            fields["alignments3D/alpha"] = fields["alignments3D/alpha"].astype("<f4")
        for name, values in (extra_fields or {}).items():
            fields[name] = np.asarray(values).reshape(n)[rows]
        return fields

    first = records(0, min(n, WRITE_BLOCK_ROWS))
    dtype = np.dtype([(k, v.dtype, v.shape[1:]) for k, v in first.items()])
    path = Path(path)
    tmp = atomic.temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)}
            try:  # np.save's choice: format 1.0 unless the header does not fit in it
                np.lib.format.write_array_header_1_0(f, header)
            except ValueError:
                np.lib.format.write_array_header_2_0(f, header)
            for start in range(0, n, WRITE_BLOCK_ROWS):
                stop = min(start + WRITE_BLOCK_ROWS, n)
                fields = first if start == 0 else records(start, stop)
                block = np.empty(stop - start, dtype=dtype)
                for name, values in fields.items():
                    block[name] = values
                f.write(block.tobytes())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
