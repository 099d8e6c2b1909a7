"""Re-centring and re-boxing of the subtracted particles (--recenter, --center, --new-box).

The expectations come from outside dsub's engine: the simulator's analytic
Gaussian phantom (its kept domain's exact centre of mass and exact
projections, with the simulator's own CTF), NumPy's ``roll`` and plain slicing
for the image geometry, and RELION's documented rules (``ROUND`` halves away
from zero; ``rlnImageSize``, origin priors dropped). Noise-free data, box 48.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from scipy import ndimage

from dsub.cli import main
from dsub.demo import PIXEL_SIZE, make_dataset
from dsub.formats import cs as cs_format
from dsub.formats import star as star_format
from dsub.formats.mrc import read_images, read_map, write_map
from dsub.simulate import GaussianPhantom, apply_ctf, ctf_full_plane, perturbed, two_domain_phantom
from dsub.conventions import relion_round
from dsub.physics.projector import extract_slices, prepare_volume, projector_kernel, shift_phases
from dsub.workflow.rebox import Reboxing, kept_region_centre, rebox_images, reboxed_table, translate_and_window
from test_projector import fourier_crop

BOX = 48
COUNT = 24
SEED = 7
KEPT_DOMAIN = 1  # make_dataset subtracts domain 2
STAR_OUT = "particles_subtracted.star"
CS_OUT = "particles_subtracted.cs"


# ----------------------------------------------------------------------------- helpers


def window_about_centre(image: np.ndarray, new_box: int) -> np.ndarray:
    """Pixels N//2 - B//2 ... of a square image (zeros where B > N), by plain slicing."""
    box = image.shape[-1]
    out = np.zeros(image.shape[:-2] + (new_box, new_box), dtype=image.dtype)
    first = box // 2 - new_box // 2  # input index of output pixel 0
    lo, hi = max(first, 0), min(first + new_box, box)
    out[..., lo - first : hi - first, lo - first : hi - first] = image[..., lo:hi, lo:hi]
    return out


def kept_mass_centre(halves) -> np.ndarray:
    """Exact centre of mass (x, y, z) of the kept domain of the half maps' average (Gaussian masses a·σ³)."""
    kept = [half.select(KEPT_DOMAIN) for half in halves]
    centres = np.concatenate([k.centres for k in kept])
    masses = np.concatenate([k.amplitudes * k.sigmas**3 for k in kept])
    return masses @ centres / masses.sum()


def recentred(phantom: GaussianPhantom, centre) -> GaussianPhantom:
    return GaussianPhantom(phantom.centres - np.asarray(centre), phantom.sigmas, phantom.amplitudes, phantom.domains)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Noise-free demo data and the analytic half phantoms it was made from."""
    folder = tmp_path_factory.mktemp("rebox_data")
    paths, sim = make_dataset(folder, count=COUNT, box=BOX, seed=SEED, snr=None)
    rng = np.random.default_rng(SEED)  # make_dataset's own sequence of draws
    phantom = two_domain_phantom(BOX, rng)
    halves = (perturbed(phantom, rng), perturbed(phantom, rng))
    for half, key in zip(halves, ("half_a", "half_b")):  # the phantoms are the ones in the files
        np.testing.assert_allclose(read_map(paths[key])[0], half.voxelize(BOX), atol=1e-6)
    return paths, sim, halves


def run(paths, outdir, *extra, particles=None, mask=None) -> int:
    return main([
        "subtract", str(particles or paths["star"]), "--half-a", str(paths["half_a"]),
        "--half-b", str(paths["half_b"]), "--mask", str(mask or paths["mask"]), "-o", str(outdir),
        "--chunk-size", "8", "--quiet", *map(str, extra),
        # Each simulated particle holds its own half map exactly, not a common truth plus noise: the fit
        # stays unweighted so the comparisons with the simulator are exact.
        "--fit-weighting", "none",
    ])


def output_images(outdir, reader=star_format, name=STAR_OUT):
    table = reader.read_particles(Path(outdir) / name)
    return table, read_images(table.image_paths, table.image_indices)


def summary(outdir) -> dict:
    return json.loads((Path(outdir) / "dsub_run.json").read_text())


# ----------------------------------------------------------------------------- units


def test_relion_round_takes_halves_away_from_zero():
    values = np.array([-2.5, -1.5, -0.5, -0.49, 0.0, 0.49, 0.5, 1.5, 2.5])
    np.testing.assert_array_equal(relion_round(values), [-3, -2, -1, 0, 0, 0, 1, 2, 3])


@pytest.mark.parametrize("box, new_box", [(8, 4), (8, 8), (8, 12), (9, 4), (10, 16)])
def test_translate_and_window_is_a_circular_shift_then_a_centred_window(box, new_box):
    rng = np.random.default_rng(box * 100 + new_box)
    images = rng.normal(size=(5, box, box)).astype(np.float32)
    shifts = rng.integers(-box, box, size=(5, 2))  # (x, y), beyond the box too
    result = translate_and_window(np, images, shifts, new_box)
    assert result.shape == (5, new_box, new_box) and result.dtype == np.float32
    for image, (tx, ty), got in zip(images, shifts, result):
        moved = np.roll(image, (ty, tx), axis=(0, 1))  # content moves by +t (RELION's selfTranslate, WRAP)
        np.testing.assert_array_equal(got, window_about_centre(moved, new_box))


def test_a_pixel_moves_to_the_new_centre():
    image = np.zeros((1, 10, 10), dtype=np.float32)
    image[0, 3, 7] = 1.0  # y = 3, x = 7: (+2, -2) from the centre pixel (5, 5)
    out = translate_and_window(np, image, np.array([[-2, 2]]), 6)
    assert out[0, 3, 3] == 1.0 and out.sum() == 1.0  # at the new centre, pixel 6//2


def test_kept_region_centre_of_a_blob_in_noisy_solvent():
    box = 40
    blob = GaussianPhantom(np.array([[6.0, -4.0, 3.0]]), np.array([2.0]), np.array([1.0]), np.array([1]))
    density = blob.voxelize(box) + np.random.default_rng(0).normal(0, 0.03, size=(box,) * 3)
    centre = kept_region_centre(density, np.ones_like(density))
    np.testing.assert_allclose(centre, [6.0, -4.0, 3.0], atol=0.1)
    # A mask that keeps only the half x > 0 of a blob at the centre: the centre moves into it.
    half = np.zeros((box,) * 3)
    half[:, :, box // 2 + 1 :] = 1.0
    middle = GaussianPhantom(np.zeros((1, 3)), np.array([3.0]), np.array([1.0]), np.array([1]))
    x, y, z = kept_region_centre(middle.voxelize(box), half)
    assert x > 2.0 and abs(y) < 1e-6 and abs(z) < 1e-6


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("new_box", [32, 64])
def test_kept_region_projects_within_half_a_pixel_of_the_new_centre(dataset, tmp_path, new_box):
    """--center on the kept domain's exact centre of mass: find each image's translation by matching
    the output against the true kept signal, then place the centre's projection with the input pose."""
    paths, sim, halves = dataset
    centre = kept_mass_centre(halves)
    outdir = tmp_path / "out"
    assert run(paths, outdir, "--center", *centre, "--new-box", new_box) == 0
    _, images = output_images(outdir)
    assert images.shape == (COUNT, new_box, new_box)
    truth = sim.images - sim.subtracted_signal  # what is left after a perfect subtraction
    candidates = [(tx, ty) for tx in range(-16, 17) for ty in range(-16, 17)]
    for i in range(COUNT):
        errors = [np.linalg.norm(images[i] - window_about_centre(np.roll(truth[i], (ty, tx), axis=(0, 1)), new_box))
                  for tx, ty in candidates]
        best = int(np.argmin(errors))
        assert errors[best] < 0.05 * np.linalg.norm(window_about_centre(truth[i], new_box))
        projected = (sim.rotations[i] @ centre)[:2] - sim.origins_pixels[i]  # from the box centre, pixels
        position = projected + np.array(candidates[best])  # after the image's translation
        assert np.all(np.abs(position) <= 0.5 + 1e-9), (i, position)
    if new_box > BOX:  # padded with zeros, as RELION's window does
        border = (new_box - BOX) // 2
        assert not images[:, :border].any() and not images[:, :, -border:].any()


@pytest.fixture(scope="module")
def recentred_run(dataset, tmp_path_factory):
    """--recenter --new-box 32 on the star input."""
    paths, _, _ = dataset
    outdir = tmp_path_factory.mktemp("recentred") / "out"
    assert run(paths, outdir, "--recenter", "--new-box", 32) == 0
    return outdir


def test_recenter_metadata_describe_the_reboxed_images(dataset, recentred_run):
    """A projection of the kept region, re-centred on the reported centre, with the new origins and the
    simulator's CTF on the field the particles were extracted from, cropped to the new box, matches the
    output images."""
    paths, sim, halves = dataset
    outdir = recentred_run
    report = summary(outdir)["rebox"]
    centre = np.array(report["center_voxels"])
    assert report["center_from"] == "centre of mass of the kept region" and report["new_box"] == 32
    np.testing.assert_allclose(centre, kept_mass_centre(halves), atol=0.05)
    assert summary(outdir)["box"] == 32

    table, images = output_images(outdir)
    assert images.shape == (COUNT, 32, 32)
    np.testing.assert_allclose(table.rotations, sim.rotations, atol=1e-8)
    origins_px = table.origins_pixels
    assert np.all(np.abs(origins_px) <= 0.5 + 1e-9)  # only the sub-pixel rest is left in the origins
    errors = []
    for i in range(COUNT):
        kept = recentred(halves[sim.half_set[i] - 1].select(KEPT_DOMAIN), centre)
        field = 3 * BOX  # as make_dataset extracts its particles: shift and CTF on a larger field, then the box
        ctf = ctf_full_plane(field, PIXEL_SIZE, sim.defocus_u[i], sim.defocus_v[i], sim.defocus_angle[i],
                             300.0, 2.7, 0.1)
        expected = sim.contrast[i] * apply_ctf(kept.project(sim.rotations[i], origins_px[i], field), ctf)
        expected = window_about_centre(expected, 32)
        # The whole-pixel translation wraps round the input box (as RELION's): compare the pixels that came
        # from inside it, where an extracted particle and its model agree.
        shift = np.rint(sim.origins_pixels[i] - (sim.rotations[i] @ centre)[:2] - origins_px[i]).astype(int)
        source = np.arange(32) + BOX // 2 - 16
        rows, cols = (((source - shift[axis]) >= 0) & ((source - shift[axis]) < BOX) for axis in (1, 0))
        inside = rows[:, None] & cols[None, :]
        errors.append(np.linalg.norm((images[i] - expected)[inside]) / np.linalg.norm(expected[inside]))
    assert max(errors) < 0.02, errors  # measured: about 0.1 %

    # Stacks carry the new box and the pixel size.
    stack = next((outdir / "Particles").glob("*.mrcs"))
    with mrcfile.open(stack, header_only=True) as mrc:
        assert (int(mrc.header.nx), int(mrc.header.ny)) == (32, 32)
        assert float(mrc.voxel_size.x) == pytest.approx(PIXEL_SIZE)


def test_star_and_cs_agree_on_the_new_origins_and_box(recentred_run):
    outdir = recentred_run
    blocks = starfile.read(outdir / STAR_OUT, always_dict=True)
    assert blocks["optics"]["rlnImageSize"].tolist() == [32]
    rows = blocks["particles"]
    written = np.load(outdir / CS_OUT, max_header_size=2**30)
    np.testing.assert_array_equal(written["blob/shape"], np.full((COUNT, 2), 32))
    origins = rows[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
    np.testing.assert_allclose(written["alignments3D/shift"] * written["alignments3D/psize_A"][:, None],
                               origins, atol=1e-5)
    star_table, star_images = output_images(outdir)
    cs_table, cs_images = output_images(outdir, cs_format, CS_OUT)
    np.testing.assert_array_equal(cs_images, star_images)
    assert set(star_table.box_size) == set(cs_table.box_size) == {32}


def test_cs_input_gets_new_shifts_and_shape_and_keeps_every_other_field(dataset, tmp_path):
    paths, sim, _ = dataset
    folder = tmp_path / "cs"
    folder.mkdir()
    stack = Path(shutil.copy2(paths["stack"], folder / "particles.mrcs"))
    table = star_format.read_particles(paths["star"])
    cs_path = folder / "J7_particles.cs"
    cs_format.write_particles(table, cs_path, [stack.name] * COUNT, table.image_indices, contrast=sim.contrast)
    outdir = tmp_path / "out"
    assert run(paths, outdir, "--recenter", "--new-box", 32, particles=cs_path) == 0
    given = np.load(cs_path, max_header_size=2**30)
    written = np.load(outdir / CS_OUT, max_header_size=2**30)
    assert [name for name in written.dtype.names if not name.startswith("dsub/")] == list(given.dtype.names)
    changed = ("blob/path", "blob/idx", "blob/shape", "alignments3D/alpha", "alignments3D/shift")
    for name in given.dtype.names:
        if name not in changed:
            np.testing.assert_array_equal(written[name], given[name], err_msg=name)
    np.testing.assert_array_equal(written["blob/shape"], np.full((COUNT, 2), 32))
    assert np.all(np.abs(written["alignments3D/shift"]) <= 0.5 + 1e-6)
    star_rows = starfile.read(outdir / STAR_OUT, always_dict=True)
    assert star_rows["optics"]["rlnImageSize"].tolist() == [32]
    np.testing.assert_allclose(star_rows["particles"][["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(),
                               written["alignments3D/shift"] * PIXEL_SIZE, atol=1e-5)


def test_new_box_alone_crops_about_the_centre_and_keeps_origins_and_priors(dataset, tmp_path):
    paths, _, _ = dataset
    folder = tmp_path / "priors"
    folder.mkdir()
    blocks = starfile.read(paths["star"], always_dict=True)
    rows = blocks["particles"].copy()
    rows["rlnOriginXPriorAngst"] = rows["rlnOriginXAngst"]
    rows["rlnOriginYPriorAngst"] = rows["rlnOriginYAngst"]
    star = folder / "particles.star"
    shutil.copy2(paths["stack"], folder / "particles.mrcs")
    starfile.write({"optics": blocks["optics"], "particles": rows}, star)
    rows = starfile.read(star, always_dict=True)["particles"]  # as written (6 decimals)

    assert run(paths, tmp_path / "plain", particles=star) == 0
    assert run(paths, tmp_path / "cropped", "--new-box", 40, particles=star) == 0
    assert run(paths, tmp_path / "centred", "--center", 0, 0, 0, particles=star) == 0
    _, plain = output_images(tmp_path / "plain")
    _, cropped = output_images(tmp_path / "cropped")
    np.testing.assert_array_equal(cropped, window_about_centre(plain, 40))
    cropped_rows = starfile.read(tmp_path / "cropped" / STAR_OUT, always_dict=True)["particles"]
    for label in ("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginXPriorAngst", "rlnOriginYPriorAngst"):
        np.testing.assert_allclose(cropped_rows[label], rows[label], atol=1e-9)

    # Re-centred: the priors no longer describe the images and go, as RELION drops them.
    centred_rows = starfile.read(tmp_path / "centred" / STAR_OUT, always_dict=True)["particles"]
    assert "rlnOriginXPriorAngst" not in centred_rows and "rlnOriginYPriorAngst" not in centred_rows
    # --center 0 0 0: the whole origin rounded (halves away from zero) moves into the image.
    old = rows[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / PIXEL_SIZE
    shifts = np.sign(old) * np.floor(np.abs(old) + 0.5)
    new = centred_rows[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / PIXEL_SIZE
    np.testing.assert_allclose(new, old - shifts, atol=1e-6)
    _, centred = output_images(tmp_path / "centred")
    for i, (tx, ty) in enumerate(shifts.astype(int)):
        np.testing.assert_array_equal(centred[i], np.roll(plain[i], (ty, tx), axis=(0, 1)))


def test_mask_keeps_with_the_inverted_mask_finds_the_same_centre(dataset, recentred_run, tmp_path):
    paths, _, _ = dataset
    inverted = tmp_path / "keep.mrc"
    write_map(inverted, 1.0 - read_map(paths["mask"])[0], PIXEL_SIZE)
    outdir = tmp_path / "out"
    assert run(paths, outdir, "--recenter", "--mask-keeps", mask=inverted) == 0
    np.testing.assert_allclose(summary(outdir)["rebox"]["center_voxels"],
                               summary(recentred_run)["rebox"]["center_voxels"], atol=1e-4)


def test_skipped_particles_keep_their_input_origins_and_box(dataset, tmp_path):
    paths, _, _ = dataset
    folder = tmp_path / "bad"
    folder.mkdir()
    star = Path(shutil.copy2(paths["star"], folder / "particles.star"))
    stack = Path(shutil.copy2(paths["stack"], folder / "particles.mrcs"))
    with mrcfile.open(stack, mode="r+") as mrc:
        mrc.data[3] = np.nan
    outdir = tmp_path / "out"
    assert run(paths, outdir, "--recenter", "--new-box", 32, "--skip-bad-particles", particles=star) == 0
    given = starfile.read(star, always_dict=True)
    skipped = starfile.read(outdir / "skipped_particles.star", always_dict=True)
    assert skipped["optics"]["rlnImageSize"].tolist() == [BOX]
    for label in ("rlnOriginXAngst", "rlnOriginYAngst"):
        assert skipped["particles"][label].tolist() == pytest.approx([given["particles"][label][3]], abs=1e-9)
    written = starfile.read(outdir / STAR_OUT, always_dict=True)
    assert written["optics"]["rlnImageSize"].tolist() == [32] and len(written["particles"]) == COUNT - 1


@pytest.mark.parametrize("name", ["rln_proj_64_centered", "rln_proj_64_shifted"])
def test_relion_projections_recentred_match_the_translated_map(shared_data, tmp_path, name):  # conventions!
    """RELION's own projections (relion_project; RELION 3.0 pixel origins up to 13 px) re-centred on an
    integer map point and re-boxed are the projections of the map translated by -c at the written
    origins (the projector reproduces relion_project at correlation > 0.9999, test_projector)."""
    folder = shared_data / "relion_projections"
    volume = fourier_crop(read_map(folder / "clean70SRibosome_vol_65p.mrc")[0].astype(np.float64), 64)
    table = star_format.read_particles(folder / f"{name}.star", require_ctf=False)
    centre = (4, -3, 2)
    reboxing = Reboxing(center_voxels=centre, map_pixel_size=1.0, new_box=48)
    images = rebox_images(np, read_images(table.image_paths, table.image_indices), table, reboxing)
    star_format.write_particles(reboxed_table(table, reboxing), tmp_path / "out.star",
                                [f"{i + 1}@out.mrcs" for i in range(len(table))])
    written = starfile.read(tmp_path / "out.star", always_dict=True)
    assert written["optics"]["rlnImageSize"].tolist() == [48]
    assert "rlnOriginX" not in written["particles"]  # RELION 3.1 origins in Å only
    origins = written["particles"][["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / 1.0
    assert np.all(np.abs(origins) <= 0.5)
    translated = np.roll(volume, (-centre[2], -centre[1], -centre[0]), axis=(0, 1, 2))
    for map_volume, lowest, highest in ((translated, 0.9995, 1.0), (volume, -1.0, 0.5)):  # measured 0.99991; control
        prepared = prepare_volume(np, map_volume, *projector_kernel("relion"))
        spectra = extract_slices(np, prepared, table.rotations, "zero") * shift_phases(np, 64, origins)
        expected = window_about_centre(np.fft.fftshift(np.fft.irfft2(spectra, s=(64, 64)), axes=(-2, -1)), 48)
        for ours, theirs in zip(expected, images):
            assert lowest <= np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] <= highest


def _model_atoms(pdb: Path):
    """Chain, coordinates (Å) and atomic mass of each atom of a PDB file."""
    masses = {"C": 12.0, "N": 14.0, "O": 16.0, "S": 32.0, "FE": 56.0}
    chains, xyz, mass = [], [], []
    for line in pdb.read_text().splitlines():
        if line.startswith(("ATOM", "HETATM")):
            chains.append(line[21])
            xyz.append([float(line[30:38]), float(line[38:46]), float(line[46:54])])
            mass.append(masses.get((line[76:78].strip() or line[12:14].strip()[:1]).upper(), 12.0))
    return np.array(chains), np.array(xyz), np.array(mass)


@pytest.mark.parametrize("noise, limit", [(0.0, 0.5), (0.5, 1.5)])
def test_kept_region_centre_of_a_real_map_matches_its_atomic_model(shared_data, noise, limit):
    """EMD-3488 (haemoglobin, 1.05 Å) with chain A of its fitted model 5ME2 subtracted: the kept region's
    centre is the model's centre of mass weighted by the kept share at each atom, also under solvent
    noise of half the mean protein density (measured 0.2 and 0.8 voxels; a plain centre of mass of
    the positive density, as for a mask, is off by 7 voxels under that noise)."""
    density, voxel = read_map(shared_data / "emd3488" / "emd_3488.mrc")
    box = density.shape[0]
    chains, xyz, mass = _model_atoms(shared_data / "emd3488" / "5me2.pdb")
    voxels = xyz / voxel  # the map's origin is voxel 0 (nxstart 0, origin 0)
    near_a = np.zeros(density.shape, dtype=bool)
    index = np.round(voxels[chains == "A"]).astype(int)
    near_a[index[:, 2], index[:, 1], index[:, 0]] = True
    distance = ndimage.distance_transform_edt(~near_a) * voxel
    mask = 0.5 * (1 - np.cos(np.pi * np.clip((11.0 - distance) / 6.0, 0, 1)))  # chain A, 6 Å soft edge
    kept_at_atoms = 1 - ndimage.map_coordinates(mask, voxels[:, ::-1].T, order=1)
    weights = mass * kept_at_atoms
    expected = weights @ (voxels - box // 2) / weights.sum()
    if noise:
        scale = noise * density[density > 0.05].mean()
        density = density + np.random.default_rng(1).normal(0, scale, density.shape).astype(np.float32)
    centre = kept_region_centre(density, 1 - mask)
    assert np.linalg.norm(centre - expected) < limit


def _all_ones_mask(paths, folder: Path) -> Path:
    mask = folder / "ones.mrc"
    write_map(mask, np.ones((BOX,) * 3, dtype=np.float32), PIXEL_SIZE)
    return mask


@pytest.mark.parametrize("extra, mask, expected", [
    (["--new-box", "33"], None, "--new-box 33 is odd"),
    (["--new-box", "0"], None, "--new-box must be a positive even number"),
    (["--center", "30", "0", "0"], None, "lies outside the 48-voxel map"),
    (["--recenter"], _all_ones_mask, "holds no density to recentre on"),
])
def test_bad_rebox_options_are_one_line_errors(dataset, tmp_path, capsys, extra, mask, expected):
    paths, _, _ = dataset
    outdir = tmp_path / "out"
    assert run(paths, outdir, *extra, mask=mask(paths, tmp_path) if mask else None) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("dsub: warning:")]
    assert len(err) == 1 and err[0].startswith("dsub: error:") and expected in err[0], err  # the all-ones mask is also warned about
    assert not (outdir / STAR_OUT).exists() and not (outdir / CS_OUT).exists()


def test_recenter_and_center_together_are_refused(dataset, tmp_path, capsys):
    paths, _, _ = dataset
    with pytest.raises(SystemExit) as stop:
        run(paths, tmp_path / "out", "--recenter", "--center", 0, 0, 0)
    assert stop.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_rebox_options_make_a_different_run(dataset, tmp_path, capsys):
    paths, _, _ = dataset
    outdir = tmp_path / "out"
    assert run(paths, outdir) == 0
    assert run(paths, outdir, "--new-box", 32) == 2  # other parameters: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert run(paths, outdir, "--new-box", 32, "--overwrite") == 0
    assert summary(outdir)["box"] == 32
