"""Checks made before any long work starts, each failing with one clear message."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputFileError, MissingInputError, OptionError, warn
from ..formats.mrc import read_map, stack_layout
from ..particles import HALF_A, HALF_B, is_same_for_all
from ..physics.optics import crop_or_pad, map_extent_voxels

#: Relative disagreement between pixel sizes that is still accepted.
PIXEL_SIZE_TOLERANCE = 0.01


def _groups_text(table, rows) -> str:
    """``optics group 2`` / ``optics groups 1, 3``: the groups of the particles ``rows``."""
    groups = np.unique(np.asarray(table.optics_group)[rows]).tolist()
    return f"optics group{'s' if len(groups) > 1 else ''} {', '.join(map(str, groups))}"


def particle_box(table) -> int:
    """The one box size of all particles (dsub needs a single box)."""
    boxes = np.unique(table.box_size)
    if boxes.size != 1:
        by_box = "; ".join(f"{_groups_text(table, table.box_size == box)}: {box} px" for box in boxes)
        raise InputFileError(
            table.source_path,
            f"particles come in several box sizes ({by_box}).",
            "Subtract each box size separately (split the file by optics group), each with maps at that box.",
        )
    return int(boxes[0])


def map_pixel_size(table, maps: dict) -> float:
    """The maps' one voxel size in Å; each map file must agree within 1 %.

    ``maps`` is {label: (path, voxel size from the header)}. Particles of any pixel
    size are subtracted at their own scale (``physics.optics.slice_matrices``), as
    RELION does for merged data sets; a map whose voxel size is within 1 % of no
    optics group's pixel size is refused unless asked for (``check_voxel_size``).
    A header without a voxel size is taken to be at the particles' pixel size when
    they all share one, and refused otherwise.
    """
    known = {label: voxel for label, (_, voxel) in maps.items() if voxel > 0}
    sizes = np.asarray(table.pixel_size_angstrom, dtype=np.float64)
    groups = np.unique(np.round(sizes, 4))
    if known:
        reference = float(np.median(list(known.values())))
        for label, voxel in known.items():
            if abs(voxel - reference) > PIXEL_SIZE_TOLERANCE * reference:
                others = [v for other, v in known.items() if other != label]
                raise InputFileError(
                    maps[label][0],
                    f"{label} has a voxel size of {voxel:.4f} Å but the other maps {np.median(others):.4f} Å.",
                    "Use half maps and a mask at one voxel size (or fix the header if only it is wrong).",
                )
    for label, (path, voxel) in maps.items():
        if voxel <= 0:
            if not known and groups.size > 1:
                raise InputFileError(
                    path, f"{label} has no voxel size in its header, and the particles come with several "
                    f"pixel sizes ({', '.join(f'{g:g}' for g in groups)} Å).",
                    "Set the maps' voxel size (e.g. relion_image_handler --angpix ... --force_header_angpix).",
                )
            fallback = float(np.median(list(known.values()))) if known else float(groups[0])
            warn(f"{path}: no voxel size in the header; assuming {fallback:.4f} Å")
    return float(np.median(list(known.values()))) if known else float(groups[0])


def group_pixel_sizes(table) -> np.ndarray:
    """The particles' distinct pixel sizes (Å, float64, rounded to 0.1 mÅ): one per optics group, as a refusal names them."""
    return np.unique(np.round(np.asarray(table.pixel_size_angstrom, dtype=np.float64), 4))


def far_from_every_group(table, pixel: float) -> bool:
    """Whether the maps' (possibly re-boxed) voxel size ``pixel`` (Å) is within 1 % of no optics group's pixel size."""
    groups = group_pixel_sizes(table)
    return not np.any(np.abs(groups - pixel) <= PIXEL_SIZE_TOLERANCE * pixel)


def _fix_header_text(path, table) -> str:
    """The ``relion_image_handler`` command that sets the voxel size of ``path``'s header (for each map and the mask)."""
    groups = group_pixel_sizes(table)
    name = Path(path).name
    fixed = f"{Path(name).stem}_fixed{Path(name).suffix or '.mrc'}"
    angpix = f"{groups[0]:g}" if groups.size == 1 else "X"
    which = "" if groups.size == 1 else " (X: the pixel size the maps were refined at)"
    return f"relion_image_handler --i {name} --o {fixed} --angpix {angpix} --force_header_angpix {angpix}{which}"


def check_voxel_size(path, voxel: float, pixel: float, table, rescale_maps: bool) -> None:
    """Maps whose voxel size is within 1 % of no optics group's pixel size: refused, or with ``rescale_maps`` a warning.

    ``voxel``: the maps' header voxel size (Å), named in the refusal with ``path``
    (half map A); ``pixel``: the voxel size they are projected at, ``voxel`` or,
    for maps of another box, the re-boxed one (``physics.optics.map_extent_voxels``).
    Such maps are rescaled to each particle's pixel size (``physics.optics.slice_matrices``),
    which is right only when the header is: a header off by 20 % subtracts most of
    the region wrongly and may still explain something of the images, so only
    ``--rescale-maps`` (``rescale_maps``) lets them through. Raises ``InputFileError``.
    """
    if not far_from_every_group(table, pixel):
        return
    if rescale_maps:
        warn_far_pixel_size(table, pixel)
        return
    groups = group_pixel_sizes(table)
    reboxed = f" ({pixel:.4f} Å once brought to the particles' box)" if abs(pixel - voxel) > 1e-6 * voxel else ""
    raise InputFileError(
        path, f"the maps' voxel size {voxel:.4f} Å{reboxed} is more than 1 % from every optics group's pixel size "
        f"({', '.join(f'{g:g}' for g in groups)} Å).",
        "If the map header is right, add --rescale-maps to project the maps at their own voxel size, rescaled to "
        "each particle's pixel size; if it is wrong, fix it in the half maps and the mask, e.g. "
        f"{_fix_header_text(path, table)} for each, and give the fixed files.",
    )


def warn_far_pixel_size(table, pixel: float) -> None:
    """A warning when the maps' (possibly re-boxed) voxel size is within 1 % of no optics group's pixel size."""
    if far_from_every_group(table, pixel):
        groups = group_pixel_sizes(table)
        warn(f"the maps' voxel size {pixel:.4f} Å is more than 1 % from every optics group's pixel size "
             f"({', '.join(f'{g:g}' for g in groups)} Å); each particle's projection is rescaled to its own "
             "pixel size, which is right only if the map header's voxel size is right: check it (e.g. against the "
             "refinement's rlnImagePixelSize), and fix it with relion_image_handler --angpix if it is wrong")


def wrong_voxel_size(path, voxel: float, table, evidence: str) -> InputFileError:
    """The refusal of maps whose header's voxel size is far from every optics group's and that explain almost
    nothing of the images (``evidence``: the sample fit's figures, in words): the header is likely wrong.

    Only reached with ``--rescale-maps`` (``check_voxel_size`` refuses such maps
    without it); maps that explain little of low-SNR images with a small masked
    region only get a warning (``diagnostics.check_sample``). dsub has no option to
    set a map's voxel size; the fix rewrites the header (RELION's
    ``relion_image_handler --force_header_angpix``).
    """
    groups = group_pixel_sizes(table)
    sizes = ", ".join(f"{g:g}" for g in groups)
    return InputFileError(
        path, f"the maps' header voxel size {voxel:.4f} Å is more than 1 % from the particles' pixel "
        f"size{'s' if groups.size > 1 else ''} ({sizes} Å), and {evidence}: the map header's voxel size is "
        "likely wrong.",
        f"Set it in the half maps and the mask to the pixel size they were refined at, e.g. "
        f"{_fix_header_text(path, table)} for each, and give the fixed files.",
    )


#: Per-particle values that must be finite, with the names users know them by.
_FINITE = {
    "rotations": "the angles (rlnAngleRot/Tilt/Psi or alignments3D/pose)",
    "origins_angstrom": "the origins (rlnOriginX/YAngst or alignments3D/shift)",
    "defocus_u_angstrom": "rlnDefocusU (ctf/df1_A)",
    "defocus_v_angstrom": "rlnDefocusV (ctf/df2_A)",
    "defocus_angle_degrees": "rlnDefocusAngle (ctf/df_angle_rad)",
    "phase_shift_degrees": "rlnPhaseShift (ctf/phase_shift_rad)",
    "voltage_kv": "rlnVoltage (ctf/accel_kv)",
    "spherical_aberration_mm": "rlnSphericalAberration (ctf/cs_mm)",
    "amplitude_contrast": "rlnAmplitudeContrast (ctf/amp_contrast)",
    "ctf_bfactor": "rlnCtfBfactor (ctf/bfactor)",
    "pixel_size_angstrom": "the pixel size (rlnImagePixelSize or blob/psize_A)",
    "ctf_scale": "rlnCtfScalefactor (ctf/scale)",
    "beam_tilt_mrad": "rlnBeamTiltX/Y (ctf/tilt_A)",
    "mag_matrix": "rlnMagMat00..11 (ctf/anisomag)",
}


def particle_named(table, row: int) -> str:
    """``particle 12`` (1-based), with its line in the file for a star (``star_reader.row_line``): for errors."""
    line = None
    if table.source_format == "star" and table.source_path is not None:
        from ..formats.star_reader import row_line

        try:
            line = row_line(table.source_path, row)
        except OSError:  # the message goes without it
            line = None
    return f"particle {row + 1}" + (f" (line {line} of the file)" if line is not None else "")


def check_metadata(table) -> None:
    """Per-particle numbers must be finite and physical, or the subtraction silently makes NaNs."""
    for name, label in _FINITE.items():
        values = getattr(table, name)
        if is_same_for_all(values):  # one row shared by all: check it once
            values = np.broadcast_to(np.isfinite(values[:1]).all(), (len(table), 1))
            bad = ~values[:, 0]
        else:
            bad = ~np.isfinite(values.reshape(len(table), -1)).all(axis=1)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise InputFileError(
                table.source_path,
                f"{particle_named(table, first)} (and {int(bad.sum()) - 1} more) has a missing or non-numeric value "
                f"in {label}." if bad.sum() > 1
                else f"{particle_named(table, first)} has a missing or non-numeric value in {label}.",
                "Fix or remove those rows.",
            )
    for name, label, low, high in (
        ("pixel_size_angstrom", "the pixel size (rlnImagePixelSize or blob/psize_A)", 0.0, np.inf),
        ("voltage_kv", "rlnVoltage (ctf/accel_kv)", 0.0, np.inf),
        ("amplitude_contrast", "rlnAmplitudeContrast (ctf/amp_contrast)", -1e-9, 1.0),
    ):
        values = getattr(table, name)
        bad = ~((values > low) & (values < high))
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise InputFileError(
                table.source_path, f"{particle_named(table, first)} has {label} = {values[first]:g}, which is not "
                "physical.",
                "Fix the optics table or the particle rows.",
            )
    if table.input_contrast is not None and not np.isfinite(table.input_contrast).all():
        first = int(np.flatnonzero(~np.isfinite(table.input_contrast))[0])
        raise InputFileError(
            table.source_path, f"{particle_named(table, first)} has a missing or non-numeric contrast "
            "(alignments3D/alpha or rlnCtfScalefactor).", "Fix those rows, or use --scale fit.",
        )


def check_half_sets(table) -> None:
    """Every particle must belong to half set A or B, and both must be present."""
    known = np.isin(table.half_set, (HALF_A, HALF_B))
    if not known.all():
        raise InputFileError(
            table.source_path,
            f"{int((~known).sum())} of {len(table)} particles have no half set "
            "(rlnRandomSubset 1/2 or alignments3D/split 0/1).",
            "Use the particles of a gold-standard refinement, whose half sets decide which half-map "
            "subtracts each particle, or add --single-map to subtract all with --half-a knowingly.",
        )
    present = set(np.unique(table.half_set).tolist())
    if len(table) > 1 and present != {HALF_A, HALF_B}:
        only = "A (rlnRandomSubset 1 / split 0)" if present == {HALF_A} else "B (rlnRandomSubset 2 / split 1)"
        raise InputFileError(
            table.source_path,
            f"all {len(table)} particles are in half set {only}, so one half-map would subtract them all.",
            "Use the whole particle set of the refinement, or add --single-map to subtract all with "
            "--half-a knowingly.",
        )


#: A mask edge narrower than this (in pixels) counts as hard.
HARD_EDGE_PIXELS = 1.5


def mask_edge_width(mask: np.ndarray) -> float:
    """Approximate width in voxels of the mask's soft edge (0 for a binary mask).

    Voxels strictly between 0 and 1, per face of the 0.5 surface; a ramp of
    width w crosses the surface obliquely on average and yields about 2w/3 of
    them per face, hence the factor 1.5.
    """
    inside = mask > 0.5
    faces = sum(int(np.count_nonzero(np.diff(inside, axis=axis))) for axis in range(3))
    if faces == 0:
        return float("inf")
    soft = int(np.count_nonzero((mask > 0.01) & (mask < 0.99)))
    return 1.5 * soft / faces


def recommended_edge_pixels(pixel_size: float) -> int:
    """A soft edge of about 6 Å, and never under 3 px."""
    return int(max(3, np.ceil(6.0 / pixel_size)))


#: The guide's minimum soft-edge width of a subtraction mask: this many times resolution / pixel size.
EDGE_RESOLUTIONS = 5.0


def minimum_edge_pixels(pixel_size: float, resolution_angstrom: float | None) -> float:
    """The soft edge a mask needs: 6 Å and at least 3 px; with a resolution, also 5 × resolution / pixel size."""
    minimum = float(recommended_edge_pixels(pixel_size))
    if resolution_angstrom:
        minimum = max(minimum, EDGE_RESOLUTIONS * resolution_angstrom / pixel_size)
    return minimum


def check_mask(path, volume: np.ndarray, pixel_size: float, resolution_angstrom: float | None = None) -> None:
    """Mask values in [0, 1], not empty; a warning for a narrow soft edge.

    A mask of ones everywhere is warned about by ``region.report_region``
    (the subtracted region then holds all or none of the density).
    """
    low, high = float(volume.min()), float(volume.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise InputFileError(
            path,
            f"mask values span [{low:.3g}, {high:.3g}] but must lie in [0, 1].",
            "Use a soft mask from relion_mask_create or cryoSPARC's Volume Tools.",
        )
    if high <= 0:
        raise InputFileError(path, "the mask is empty (all zeros).", "Check the mask file.")
    width = mask_edge_width(volume)
    minimum = minimum_edge_pixels(pixel_size, resolution_angstrom)
    if width < HARD_EDGE_PIXELS:
        warn(
            f"{path}: the mask has a hard edge (about {width:.1f} px soft), which rings in the "
            f"subtracted images. A soft edge of at least {np.ceil(minimum):.0f} px "
            f"({'5 × resolution / pixel size' if resolution_angstrom else 'about 6 Å'}) is recommended, "
            "e.g. relion_mask_create --width_soft_edge."
        )
    elif resolution_angstrom and width < minimum:
        warn(
            f"{path}: the mask's soft edge is about {width:.1f} px wide, narrower than the {minimum:.1f} px "
            f"(5 × {resolution_angstrom:g} Å / {pixel_size:.4g} Å) recommended at that resolution; "
            "widen it (relion_mask_create --width_soft_edge, or the soft padding width in cryoSPARC's Volume Tools)."
        )


def check_lowpass(lowpass_angstrom: float | None, voxel_size: float) -> None:
    """--lowpass must be coarser than the maps' Nyquist resolution, or it would change nothing.

    ``voxel_size`` comes from an MRC header (float32: 1.05 is 1.0499999523): a
    ``lowpass_angstrom`` within a millionth of Nyquist counts as at it.
    """
    if lowpass_angstrom and lowpass_angstrom <= 2 * float(voxel_size) * (1 + 1e-6):
        raise OptionError(
            f"--lowpass {lowpass_angstrom:g} Å is at or beyond the maps' Nyquist resolution "
            f"({2 * voxel_size:.4g} Å at {voxel_size:.4g} Å per voxel), so it would change nothing; "
            "give a coarser resolution or leave it out"
        )


def check_maps(half_a: str, half_b: str, mask: str, box: int, table, *,
               resolution_angstrom: float | None = None, lowpass_angstrom: float | None = None,
               single_map: bool = False, scale: str = "fit") -> tuple[float, int, dict]:
    """Half maps and mask: readable, one cubic shape and voxel size, mask in [0, 1].

    Returns (the maps' voxel size in Å, their box, the volumes read keyed
    "half map A", "half map B", "mask", float32 z, y, x). Maps of another box
    than the particles are re-boxed by the workers (``physics.optics.fit_map_to_box``);
    refused here when the mask, or warned when more than 1 % of a half map's
    density, lies outside the part of the map that the particles' box spans.
    Errors (``InputFileError``) for a voxel size of 0, maps of different shapes
    or voxel sizes, NaN or infinite values, an all-zero half map, a mask outside
    [0, 1] or empty; warnings for one file (or identical maps) given as both half
    maps and a soft edge narrower than ``minimum_edge_pixels``. Maps spanning
    less than the particles' box: a warning with ``scale`` "fit", an error with
    "input" or "none" (``check_smaller_map_extent``).
    """
    voxels, shape, volumes = {}, None, {}
    largest_pixel = float(np.max(table.pixel_size_angstrom))
    for label, path in (("half map A", half_a), ("half map B", half_b), ("mask", mask)):
        volume, voxel = read_map(path)
        if not voxel > 0:
            raise InputFileError(
                path, f"{label} has a voxel size of {voxel:g} Å in its header.",
                f"Set it to the map's real voxel size (the particles' pixel size is "
                f"{float(np.median(table.pixel_size_angstrom)):.4f} Å), e.g. "
                "relion_image_handler --i MAP --o FIXED --angpix SIZE, or mrcfile's voxel_size.",
            )
        voxels[label] = (path, voxel)
        if shape is not None and volume.shape != shape[0]:
            this, first = (path, label, volume.shape[0]), (voxels[shape[1]][0], shape[1], shape[0][0])
            odd, other = (first, this) if first[2] != box and this[2] == box else (this, first)
            raise InputFileError(  # names the map whose box is not the particles'
                odd[0], f"{odd[1]} has a box of {odd[2]} voxels but {other[1]} {other[2]}.",
                "Use half maps and a mask of one box (e.g. relion_image_handler --new_box).",
            )
        shape = shape or (volume.shape, label)
        if volume.shape[0] != box:
            extent = map_extent_voxels(volume.shape[0], box, largest_pixel, voxel)
            check_map_reboxing(path, label, volume, extent, table, box)
        if not np.all(np.isfinite(volume)):
            raise InputFileError(path, f"{label} contains NaN or infinite values.", "Use a valid map.")
        if label != "mask" and not np.any(volume):
            raise InputFileError(path, f"{label} is empty (all zeros).", "Check the half-map file.")
        if label == "mask":
            check_mask(path, volume, voxel, resolution_angstrom)
        else:
            check_lowpass(lowpass_angstrom, voxel)
        volumes[label] = volume
    map_box, map_voxel = int(shape[0][0]), voxels["half map A"][1]
    if map_box != box:
        check_smaller_map_extent(half_a, map_box, map_voxel, box, largest_pixel, scale)
    if not single_map and same_half_maps(half_a, half_b, volumes["half map A"], volumes["half map B"]):
        warn(f"{half_a} is given as both half maps (--half-a and --half-b hold the same map): every particle is "
             "subtracted with a map its own half set helped to make, which breaks gold-standard independence. "
             "Give the refinement's two half maps, or --single-map to do this knowingly.")
    return map_pixel_size(table, voxels), int(shape[0][0]), volumes


def check_map_reboxing(path, label: str, volume: np.ndarray, extent: int, table, box: int) -> None:
    """What a crop to the ``extent`` voxels the particles' box spans would cut from the map."""
    if extent >= volume.shape[0]:
        return
    kept = np.abs(crop_or_pad(volume, extent)).sum()
    cut = 1.0 - float(kept / max(np.abs(volume).sum(), 1e-30))
    groups = ", ".join(map(str, np.unique(table.optics_group)))
    if label == "mask" and cut > 1e-3:
        raise InputFileError(
            path, f"{100 * cut:.1f} % of the mask lies outside the {extent}-voxel cube that the particles' "
            f"{box} px box spans (optics groups {groups}), so that region cannot be subtracted.",
            "Re-extract the particles in a larger box, or use a mask within the particles' box.",
        )
    if cut > 0.01:
        warn(f"{path}: {100 * cut:.1f} % of {label}'s density lies outside the {extent}-voxel cube that the "
             f"particles' {box} px box spans and is left out of their projections")


def check_smaller_map_extent(path, map_box: int, map_voxel: float, box: int, largest_pixel: float,
                             scale: str = "fit") -> None:
    """A warning when the maps span less than the particles' box (``map_box`` · voxel < ``box`` · pixel);
    with ``scale`` "input" or "none" an ``InputFileError`` naming ``path`` instead.

    The workers then zero-pad the maps to the ``E`` voxels the particles' box
    spans (``physics.optics.fit_map_to_box``) and, as RELION's projector
    normalises a map of box ``S`` (``normfft``), predict the particles ``(E/S)²``
    times as strongly as from the same maps padded to ``E`` voxels beforehand:
    fitted contrasts come out ``(S/E)²`` of what those maps give (measured: 0.5625
    for a 48-voxel map against 64 px particles at one pixel size), while the
    subtraction with ``--scale fit`` is the same; ``--scale input`` and ``none``
    subtract ``(E/S)²`` times the masked signal. Nothing beyond the maps' box can
    be in the model. Those two modes would write over-subtracted particles, so
    they are refused: the maps padded beforehand, or ``--scale fit``, give the
    right subtraction.
    """
    extent = map_extent_voxels(map_box, box, largest_pixel, map_voxel)
    if extent <= map_box:
        return
    factor = (extent / map_box) ** 2
    padded = extent + extent % 2  # relion_image_handler --new_box takes even boxes
    if scale != "fit":
        raise InputFileError(
            path, f"the maps span {map_box} voxels × {map_voxel:.4f} Å = {map_box * map_voxel:.1f} Å, less than "
            f"the particles' {box} px × {largest_pixel:.4f} Å = {box * largest_pixel:.1f} Å; with RELION's "
            f"projector normalisation for a map of box {map_box}, --scale {scale} would subtract {factor:.2f}× "
            "the masked signal.",
            f"Give the half maps and mask at the particles' extent (e.g. relion_image_handler --i MAP "
            f"--o MAP_{padded}.mrc --new_box {padded} for each), or use --scale fit.",
        )
    warn(f"{path}: the maps span {map_box} voxels × {map_voxel:.4f} Å = {map_box * map_voxel:.1f} Å, less than the "
         f"particles' {box} px × {largest_pixel:.4f} Å = {box * largest_pixel:.1f} Å; they are zero-padded to "
         f"{extent} voxels and, with RELION's projector normalisation for a map of box {map_box}, predict the "
         f"particles {factor:.2f}× as strongly as the same maps given at {extent} voxels: fitted contrasts come out "
         f"about {1 / factor:.2f}× (the subtraction with --scale fit is the same; --scale input or none subtract "
         f"{factor:.2f}× the masked signal), and no density beyond the maps' box is in the model. Give the half maps "
         f"and mask at the particles' extent, e.g. relion_image_handler --i MAP --o MAP_{padded}.mrc "
         f"--new_box {padded} for each")


def same_half_maps(half_a, half_b, volume_a: np.ndarray, volume_b: np.ndarray) -> bool:
    """One file named twice, or two files holding the same map."""
    return Path(half_a).resolve() == Path(half_b).resolve() or np.array_equal(volume_a, volume_b)


def check_classes(table) -> None:
    """Warn when the particles come from several 3D classes (rlnClassNumber, alignments3D/class)."""
    source, classes = table.source, None
    if table.source_format == "star" and source is not None and "rlnClassNumber" in source["particles"]:
        classes, label = source["particles"]["rlnClassNumber"].to_numpy(), "rlnClassNumber"
    elif table.source_format == "cs" and source is not None and "alignments3D/class" in source.dtype.names:
        classes, label = source["alignments3D/class"], "alignments3D/class"
    if classes is None:
        return
    distinct = np.unique(classes)
    if distinct.size > 1:
        listed = ", ".join(str(c) for c in distinct[:8]) + (", ..." if distinct.size > 8 else "")
        warn(f"{table.source_path}: the particles belong to {distinct.size} 3D classes ({label} {listed}), but "
             "one pair of half maps subtracts them all. Subtract each class with its own class's half maps "
             "(split the particles by class) unless the classes share this map.")


def check_images(table, box: int) -> None:
    """Each stack exists, is an image stack of the particles' box and holds every referenced index.

    Opening a stack first checks its 1024-byte header against the file's size
    (``formats.mrc.check_mrc_file``): a text file or a truncated stack is refused here.
    A star's image name without ``N@`` (``table.extra["named_whole"]``) is the
    whole file, as RELION reads it: refused for a stack of more than one image.
    """
    named_whole = table.extra.get("named_whole") or {}
    codes, stacks = table.image_path_codes()  # hashing: linear in the particles, once per table
    highest_index = np.full(len(stacks), -1, dtype=np.int64)
    np.maximum.at(highest_index, codes, np.asarray(table.image_indices, dtype=np.int64))
    in_order = sorted(range(len(stacks)), key=lambda code: str(stacks[code]))
    missing = [code for code in in_order if not Path(stacks[code]).is_file()]
    if missing:  # all of them in one line: how many stacks and particles, not only the first file
        rows = int(np.isin(codes, missing).sum())
        raise MissingInputError(stacks[missing[0]], referenced_from=table.source_path,
                                others=[stacks[code] for code in missing[1:]], rows=(rows, len(table)))
    for code in in_order:
        path = stacks[code]
        stack = stack_layout(path)
        if stack.shape[-1] != box or stack.shape[-2] != box:
            raise InputFileError(
                path, f"images are {stack.shape[-1]}x{stack.shape[-2]} px but the metadata says {box} px.",
                "Check rlnImageSize / blob/shape against the stacks.",
            )
        row = named_whole.get(str(path))
        if row is not None and stack.shape[0] > 1:
            name = table.source["particles"]["rlnImageName"].iloc[row]
            raise InputFileError(
                table.source_path,
                f"{particle_named(table, row)} has the image name {str(name)!r}, without N@, which RELION reads as "
                f"the whole file, but the stack {path} holds {stack.shape[0]} images.",
                f"Name each particle's image as N@stack, e.g. 000001@{name} for its first image.",
            )
        highest = int(highest_index[code])
        if highest >= stack.shape[0]:
            raise InputFileError(
                path,
                f"image {highest + 1} (1-based) is referenced by {table.source_path} but the stack holds "
                f"{stack.shape[0]} images.",
                "The stack is truncated or the metadata belongs to other stacks.",
            )
