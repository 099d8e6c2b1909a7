"""Optics groups and aberrations against an independent simulator of RELION's observation model.

The simulator below shares no code with dsub: it reads the star file with
``starfile``, builds RELION's matrix ``A`` from ``euler.cpp``'s formula, projects
the real EMD-3488 map by summing a spline-interpolated map along the beam in
real space (with the magnification matrix and the pixel-size ratio applied to
the image coordinates), and applies the origin, CTF and aberrations in Fourier
space from RELION's formulas written out by hand (``ctf.h``: astigmatism as a
bilinear form, ``-sin(gamma)``; Zernike terms as explicit Cartesian
polynomials; beam tilt as the coma phase ``-2π Cs λ² (θ·s)|s|²``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import starfile
from scipy import ndimage

from dsub.formats import cs as cs_format
from dsub.formats import star as star_format
from dsub.physics.optics import (
    even_zernike_index_to_mn, fit_map_to_box, map_extent_voxels, odd_zernike_index_to_mn, zernike_cartesian,
)
from dsub.physics.subtract import SubtractionSettings, prepare_half_map, subtract_batch

BOX = 64
MAP_PIXEL = 1.25  # EMD-3488 (100 voxels at 1.05 Å) Fourier-cropped to 84 voxels
SIX_GROUPS = "cryodrgn/relion31.6opticsgroups.star"


# ----------------------------------------------------------------------------- the independent simulator
def relion_matrix(rot, tilt, psi):
    """RELION's ``Euler_angles2matrix`` (euler.cpp), degrees -> A (map -> image)."""
    a, b, g = np.deg2rad([rot, tilt, psi])
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.array([
        [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
        [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
        [sc, ss, cb],
    ])


def odd_polynomials(x, y):
    """RELION's odd Zernike terms 0..5 written out: (m, n) = (-1,1) (1,1) (-3,3) (-1,3) (1,3) (3,3)."""
    r2 = x * x + y * y
    return [y, x, 3 * x * x * y - y ** 3, (3 * r2 - 2) * y, (3 * r2 - 2) * x, x ** 3 - 3 * x * y * y]


def even_polynomials(x, y):
    """RELION's even Zernike terms 0..8: (0,0) (-2,2) (0,2) (2,2) (-4,4) (-2,4) (0,4) (2,4) (4,4)."""
    r2 = x * x + y * y
    return [np.ones_like(x), 2 * x * y, 2 * r2 - 1, x * x - y * y, 4 * x * y * (x * x - y * y),
            (4 * r2 - 3) * 2 * x * y, 6 * r2 * r2 - 6 * r2 + 1, (4 * r2 - 3) * (x * x - y * y),
            x ** 4 - 6 * x * x * y * y + y ** 4]


def coefficients(text) -> list[float]:
    return [float(v) for v in str(text).strip("[]").split(",")] if isinstance(text, str) else []


#: Side of the micrograph field each simulated particle is extracted from, in boxes.
FIELD_BOXES = 3


def simulate(volume, row: pd.Series, map_pixel: float) -> np.ndarray:
    """One particle as RELION's ObservationModel predicts it, extracted from a larger field, from merged star columns ``row``."""
    box, pixel = int(row["rlnImageSize"]), float(row["rlnImagePixelSize"])
    mag = np.array([[row.get("rlnMagMat00", 1.0), row.get("rlnMagMat01", 0.0)],
                    [row.get("rlnMagMat10", 0.0), row.get("rlnMagMat11", 1.0)]], dtype=float)
    A = relion_matrix(row["rlnAngleRot"], row["rlnAngleTilt"], row["rlnAnglePsi"])
    # RELION samples the map's transform at index (S a / (B p)) M k (applyScaleDifference, applyAnisoMag);
    # it normalises the map's transform by (pad S)³ then multiplies by pad³ S (projector.cpp: normfft), and
    # the image's by B²: F_img(k) = (B/S)² F_P(S a/(B p) M k) in unnormalised transforms. In real space, with
    # c = a/p: img(r) = (B/S)² P(L r) / (c² det M), L = (c M)^-T, P the line sum through the map's voxels.
    ratio = map_pixel / pixel
    L = np.linalg.inv(ratio * mag).T
    offsets = np.arange(box) - box // 2
    ry, rx = np.meshgrid(offsets, offsets, indexing="ij")
    u = np.einsum("ij,jab->iab", L, np.stack([rx, ry]).astype(float))
    depth = np.arange(volume.shape[0]) - volume.shape[0] // 2
    points = (A[0][:, None, None, None] * u[0][None, :, :, None] + A[1][:, None, None, None] * u[1][None, :, :, None]
              + A[2][:, None, None, None] * depth[None, None, None, :])  # (xyz, y, x, depth) map voxels
    centre = volume.shape[0] // 2
    samples = ndimage.map_coordinates(volume, [points[2] + centre, points[1] + centre, points[0] + centre],
                                      order=3, mode="constant", cval=0.0)
    image = samples.sum(axis=-1) / (ratio * ratio * np.linalg.det(mag)) * (box / volume.shape[0]) ** 2

    # Extracted from a micrograph: shift and CTF act on a field larger than the box, then the box is cut
    # out (the map's projection lies inside the box, so zero-padding it to the field is exact).
    field = FIELD_BOXES * box
    start = field // 2 - box // 2
    image = np.pad(image, ((start, field - box - start),) * 2)
    k = np.fft.fftfreq(field) * field
    ky, kx = np.meshgrid(k, k, indexing="ij")
    origin = np.array([row["rlnOriginXAngst"], row["rlnOriginYAngst"]]) / pixel
    spectrum = np.fft.fft2(np.fft.ifftshift(image)) * np.exp(2j * np.pi * (kx * origin[0] + ky * origin[1]) / field)
    X0, Y0 = kx / (field * pixel), ky / (field * pixel)
    X, Y = mag[0, 0] * X0 + mag[0, 1] * Y0, mag[1, 0] * X0 + mag[1, 1] * Y0
    volts = row["rlnVoltage"] * 1e3
    lam = 12.2643247 / np.sqrt(volts * (1 + volts * 0.978466e-6))
    cs_angstrom = row["rlnSphericalAberration"] * 1e7
    q0 = row.get("rlnAmplitudeContrast", 0.0)
    az = np.deg2rad(row["rlnDefocusAngle"])
    Q = np.array([[np.cos(az), np.sin(az)], [-np.sin(az), np.cos(az)]])
    astig = Q.T @ np.diag([-row["rlnDefocusU"], -row["rlnDefocusV"]]) @ Q
    u2 = X * X + Y * Y
    gamma = (np.pi * lam * (astig[0, 0] * X * X + 2 * astig[0, 1] * X * Y + astig[1, 1] * Y * Y)
             + np.pi / 2 * cs_angstrom * lam ** 3 * u2 * u2 - np.deg2rad(row.get("rlnPhaseShift", 0.0))
             - np.arctan(q0 / np.sqrt(1 - q0 * q0)))
    gamma += sum(c * z for c, z in zip(coefficients(row.get("rlnEvenZernike")), even_polynomials(X, Y)))
    ctf = -np.sin(gamma) * np.exp(-row.get("rlnCtfBfactor", 0.0) / 4 * u2) * row.get("rlnCtfScalefactor", 1.0)
    odd = sum(c * z for c, z in zip(coefficients(row.get("rlnOddZernike")), odd_polynomials(X, Y)))
    tilt = np.array([row.get("rlnBeamTiltX", 0.0), row.get("rlnBeamTiltY", 0.0)]) * 1e-3
    odd = odd - 2 * np.pi * cs_angstrom * lam ** 2 * (tilt[0] * X + tilt[1] * Y) * u2
    extracted = np.fft.fftshift(np.fft.ifft2(spectrum * ctf * np.exp(1j * odd)).real)
    return extracted[start : start + box, start : start + box]


def merged_rows(star_path) -> pd.DataFrame:
    blocks = starfile.read(star_path, always_dict=True)
    return blocks["particles"].merge(blocks["optics"], on="rlnOpticsGroup", how="left", suffixes=("", "_optics"))


# ----------------------------------------------------------------------------- shared inputs
def soft_sphere(shape, centre, radius, edge):
    grid = np.indices(shape) - shape[0] // 2
    distance = np.sqrt(((grid - np.reshape(centre, (3, 1, 1, 1))) ** 2).sum(axis=0))
    return np.clip((radius - distance) / edge, 0, 1)


def read_emd3488(shared_data) -> np.ndarray:
    import mrcfile

    with mrcfile.open(shared_data / "emd3488/emd_3488.mrc", permissive=True) as mrc:
        return np.asarray(mrc.data, dtype=np.float64)


@pytest.fixture(scope="module")
def raw_map(shared_data):
    """EMD-3488 in its deposited voxels (100 at 1.05 Å) under the same soft spheres as ``maps``.

    Band-limited to the particles' Nyquist frequency (1/2.5 Å⁻¹, a Fourier crop to 84 voxels padded back):
    the real-space simulator samples the map at the particles' pixels, which would alias finer detail.
    """
    scale = MAP_PIXEL / 1.05
    spectrum = np.fft.fftshift(np.fft.fftn(read_emd3488(shared_data)))
    keep = np.zeros_like(spectrum)
    keep[8:92, 8:92, 8:92] = spectrum[8:92, 8:92, 8:92]
    band_limited = np.fft.ifftn(np.fft.ifftshift(keep)).real
    volume = band_limited * soft_sphere((100,) * 3, (0, 0, 0), 29 * scale, 3 * scale)
    mask = soft_sphere((100,) * 3, (0, 0, 10 * scale), 16 * scale, 4 * scale)
    return (volume / np.abs(volume).max()).astype(np.float32), mask.astype(np.float32), 1.05


@pytest.fixture(scope="module")
def maps(shared_data):
    """EMD-3488 at 1.25 Å in a 64 box (Fourier crop 100 -> 84, then a soft sphere and a real-space crop)."""
    full = read_emd3488(shared_data)
    spectrum = np.fft.fftshift(np.fft.fftn(full))
    lo = 50 - 42
    cropped = np.fft.ifftn(np.fft.ifftshift(spectrum[lo:lo + 84, lo:lo + 84, lo:lo + 84])).real
    start = 42 - BOX // 2
    volume = cropped[start:start + BOX, start:start + BOX, start:start + BOX] * soft_sphere((BOX,) * 3, (0, 0, 0), 29, 3)
    volume = (volume / np.abs(volume).max()).astype(np.float32)
    mask = soft_sphere((BOX,) * 3, (0, 0, 10), 16, 4).astype(np.float32)  # z, y, x: off-centre along x
    return volume, mask, MAP_PIXEL


def write_variant(shared_data, tmp_path, edit=None) -> tuple:
    """Two particles of each of the six real optics groups, re-boxed to BOX, origins shrunk."""
    blocks = starfile.read(shared_data / SIX_GROUPS, always_dict=True)
    particles = blocks["particles"].groupby("rlnOpticsGroup").head(2).reset_index(drop=True)
    particles[["rlnOriginXAngst", "rlnOriginYAngst"]] *= 0.2
    blocks["particles"], blocks["optics"] = particles, blocks["optics"].copy()
    blocks["optics"]["rlnImageSize"] = BOX
    if edit is not None:
        edit(blocks)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "particles.star"
    starfile.write(blocks, path, float_format="%.10g")
    return path


def masked_signal_left(maps, star_path, table=None, given=None) -> float:
    """Share of the masked region's signal that dsub leaves in the simulated particles.

    ``maps`` (volume, mask, voxel size) simulate the particles; dsub subtracts with
    ``given`` (the same three) when set, else with ``maps``.
    """
    volume, mask, voxel = maps
    table = star_format.read_particles(star_path) if table is None else table
    rows = merged_rows(star_path)
    images = np.stack([simulate(volume, row, voxel) for _, row in rows.iterrows()]).astype(np.float32)
    masked = np.stack([simulate(volume * mask, row, voxel) for _, row in rows.iterrows()])
    settings = SubtractionSettings(scale="none", padding=2)
    volume, mask, voxel = maps if given is None else given
    model = prepare_half_map(np, volume, mask, settings, pixel_size_angstrom=voxel)
    subtracted, _ = subtract_batch(np, images, table, model, settings)
    return float(np.linalg.norm(subtracted - (images - masked)) / np.linalg.norm(masked))


def without_optics(blocks):
    optics = blocks["optics"]
    optics["rlnImagePixelSize"] = MAP_PIXEL
    for label in ("rlnBeamTiltX", "rlnBeamTiltY", "rlnMagMat01", "rlnMagMat10"):
        optics[label] = 0.0
    optics["rlnMagMat00"] = optics["rlnMagMat11"] = 1.0
    optics["rlnOddZernike"] = "[0,0,0,0,0,0]"
    optics["rlnEvenZernike"] = "[0,0,0,0,0,0,0,0,0]"


def with_scale_factors(blocks):
    blocks["particles"]["rlnCtfScalefactor"] = np.linspace(0.5, 1.5, len(blocks["particles"]))


# ----------------------------------------------------------------------------- the tests
def test_six_real_optics_groups_subtract_to_the_no_aberration_level(maps, shared_data, tmp_path):
    plain = masked_signal_left(maps, write_variant(shared_data, tmp_path / "plain", without_optics))
    real_path = write_variant(shared_data, tmp_path / "real", with_scale_factors)
    real = masked_signal_left(maps, real_path)
    # The same particles subtracted as if the optics were absent: what dsub did before.
    stripped = star_format.read_particles(write_variant(shared_data, tmp_path / "stripped", without_optics))
    ignored = masked_signal_left(maps, real_path, table=stripped)
    print(f"masked signal left: no aberrations {plain:.4f}, six real groups {real:.4f}, optics ignored {ignored:.4f}")
    assert plain < 0.05
    assert real < 1.5 * plain + 0.01
    assert ignored > 5 * real


def test_two_pixel_sizes_subtract_at_the_single_pixel_size_level(maps, shared_data, tmp_path):
    def one_size(blocks):
        without_optics(blocks)

    def two_sizes(blocks):
        without_optics(blocks)
        blocks["optics"]["rlnImagePixelSize"] = np.where(blocks["optics"]["rlnOpticsGroup"] % 2, 1.25, 1.25 * 1.54 / 1.5)

    single = masked_signal_left(maps, write_variant(shared_data, tmp_path / "one", one_size))
    path = write_variant(shared_data, tmp_path / "two", two_sizes)
    mixed = masked_signal_left(maps, path)
    table = star_format.read_particles(path)
    table.pixel_size_angstrom = np.full(len(table), MAP_PIXEL)  # the old behaviour: one pixel size for all
    wrong = masked_signal_left(maps, path, table=table)
    print(f"masked signal left: one pixel size {single:.4f}, 1.50 and 1.54 Å {mixed:.4f}, not rescaled {wrong:.4f}")
    assert mixed < 1.5 * single + 0.01
    assert wrong > 3 * mixed


@pytest.mark.parametrize("index, expected", [
    (0, (-1, 1)), (1, (1, 1)), (2, (-3, 3)), (3, (-1, 3)), (4, (1, 3)), (5, (3, 3)),
])
def test_odd_zernike_terms_are_relions(index, expected):
    assert odd_zernike_index_to_mn(index) == expected
    x, y = np.meshgrid(np.linspace(-0.4, 0.4, 7), np.linspace(-0.3, 0.35, 5))
    m, n = expected
    np.testing.assert_allclose(zernike_cartesian(np, m, n, x, y), odd_polynomials(x, y)[index], atol=1e-12)


@pytest.mark.parametrize("index", range(9))
def test_even_zernike_terms_are_relions(index):
    x, y = np.meshgrid(np.linspace(-0.4, 0.4, 7), np.linspace(-0.3, 0.35, 5))
    m, n = even_zernike_index_to_mn(index)
    np.testing.assert_allclose(zernike_cartesian(np, m, n, x, y), even_polynomials(x, y)[index], atol=1e-12)


def test_missing_amplitude_contrast_is_relions_zero(shared_data, tmp_path):
    def drop(blocks):
        blocks["optics"] = blocks["optics"].drop(columns="rlnAmplitudeContrast")

    table = star_format.read_particles(write_variant(shared_data, tmp_path, drop))
    assert (table.amplitude_contrast == 0).all()  # ctf.cpp: readValue(EMDL_CTF_Q0, Q0, 0, ...)


def test_real_cryosparc_ctf_fields_convert_as_pyem_does(shared_data):
    path = shared_data / "cryodrgn/cryosparc_J2_particles_exported.cs"
    data = np.load(path)
    tilted = data.copy()
    tilted["ctf/tilt_A"][:, 0] = 150.0  # Å: 150 / (2.7 mm · 1e7) rad = 0.0055556 rad
    tilted["ctf/tilt_A"][:, 1] = -27.0
    tilted["ctf/scale"][:] = 0.8
    ctf = cs_format.ctf_from_fields(tilted, path)
    # pyem metadata/cryosparc2.py: rlnBeamTiltX = arcsin(tilt_A[0] / cs_mm * 1e-7) * 1e3
    np.testing.assert_allclose(ctf["beam_tilt_mrad"][0], [np.arcsin(150 / 2.7e7) * 1e3, np.arcsin(-27 / 2.7e7) * 1e3],
                               rtol=1e-6)
    np.testing.assert_allclose(ctf["ctf_scale"], 0.8, rtol=1e-6)
    # The real file: no tilt, scale 1, anisomag all zero (cryoSPARC's "none estimated") -> identity.
    real = cs_format.ctf_from_fields(data, path)
    assert not real["beam_tilt_mrad"].any() and (real["ctf_scale"] == 1).all()
    np.testing.assert_array_equal(real["mag_matrix"], np.broadcast_to(np.eye(2), (len(data), 2, 2)))
    np.testing.assert_allclose(real["defocus_u_angstrom"][0], 16412.178, rtol=1e-6)
    # pyem: rlnDefocusAngle = rad2deg(ctf/df_angle_rad) (parse_cryosparc_2_cs); row 0 holds 0.86163914 rad
    np.testing.assert_allclose(real["defocus_angle_degrees"][0], 49.368, atol=1e-3)
    np.testing.assert_allclose(real["amplitude_contrast"], 0.1, rtol=1e-6)


def test_unmodelled_cryosparc_aberrations_are_named_in_a_warning(shared_data):
    path = shared_data / "cryodrgn/cryosparc_J2_particles_exported.cs"
    data = np.load(path).copy()
    data["ctf/trefoil_A"][:, 0] = 40.0
    data["ctf/shift_A"][:, 1] = 2.0
    with pytest.warns(UserWarning, match=r"ctf/shift_A, ctf/trefoil_A are not zero but not modelled"):
        cs_format.ctf_from_fields(data, path)


def test_unmodelled_optics_columns_are_named_in_a_warning(shared_data, tmp_path):
    def one_mtf(blocks):  # RELION's subtraction divides by the average MTF: one MTF changes nothing
        blocks["optics"]["rlnMtfFileName"] = "mtf_k2_200kV.star"

    def two_mtfs(blocks):
        blocks["optics"]["rlnMtfFileName"] = ["mtf_k2_200kV.star", "mtf_k3_200kV.star"] * 3
        blocks["optics"]["rlnSomethingNew"] = 1.0

    star_format.read_particles(write_variant(shared_data, tmp_path / "one", one_mtf))  # no warning (errors here)
    with pytest.warns(UserWarning, match=r"rlnSomethingNew, rlnMtfFileName \(several MTFs.*are not modelled"):
        star_format.read_particles(write_variant(shared_data, tmp_path / "two", two_mtfs))


def test_cryosparc_tilt_and_magnification_reach_relions_optics_table(shared_data, tmp_path):
    table = star_format.read_particles(shared_data / "cryodrgn/relion31.star")
    table.beam_tilt_mrad = np.tile([0.4, -0.7], (len(table), 1))
    table.mag_matrix = np.tile([[1.01, 0.002], [-0.003, 0.995]], (len(table), 1, 1))
    table.ctf_scale = np.linspace(0.8, 1.2, len(table))
    cs_path = tmp_path / "J1_particles.cs"
    cs_format.write_particles(table, cs_path, ["stack.mrcs"] * len(table), table.image_indices)
    written = np.load(cs_path)
    # pyem's formula read backwards: tilt_A = sin(tilt mrad / 1e3) * cs_mm * 1e7
    np.testing.assert_allclose(written["ctf/tilt_A"][0], np.sin([0.4e-3, -0.7e-3]) * table.spherical_aberration_mm[0] * 1e7, rtol=1e-5)
    back = cs_format.read_particles(cs_path, cs_root=tmp_path)
    star_path = tmp_path / "back.star"
    star_format.write_particles(back, star_path, [f"{i + 1:06d}@stack.mrcs" for i in range(len(back))])
    optics = starfile.read(star_path, always_dict=True)["optics"].iloc[0]
    assert optics["rlnBeamTiltX"] == pytest.approx(0.4, rel=1e-4)
    assert optics["rlnBeamTiltY"] == pytest.approx(-0.7, rel=1e-4)
    assert [optics[f"rlnMagMat{r}{c}"] for r in range(2) for c in range(2)] == pytest.approx(
        [1.01, 0.002, -0.003, 0.995], abs=1e-6)
    particles = starfile.read(star_path, always_dict=True)["particles"]
    np.testing.assert_allclose(particles["rlnCtfScalefactor"], table.ctf_scale, rtol=1e-6)


def test_a_map_of_another_box_and_voxel_size_is_brought_to_the_particles(raw_map, maps, shared_data, tmp_path):
    """The deposited 100-voxel map at 1.05 Å, particles at 64 px and 1.24/1.25 Å with the six real optics."""
    path = write_variant(shared_data, tmp_path, with_scale_factors)
    volume, mask, voxel = raw_map
    extent = map_extent_voxels(volume.shape[0], BOX, 1.25, voxel)
    assert extent == 76  # 64 px of 1.25 Å span 76 voxels of 1.05 Å
    given = (fit_map_to_box(volume, extent, BOX), np.clip(fit_map_to_box(mask, extent, BOX, density=False), 0, 1),
             voxel * extent / BOX)
    reboxed = masked_signal_left(raw_map, path, given=given)
    same_box = masked_signal_left(maps, path)
    print(f"masked signal left: map at the particles' box {same_box:.4f}, re-boxed from 100 voxels at 1.05 Å "
          f"{reboxed:.4f}")
    assert reboxed < 1.5 * same_box + 0.01
