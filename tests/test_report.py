"""The QC report (``dsub report OUTDIR``, also written at the end of every run).

Checked against what the run wrote (the star file read with ``starfile``, the Zarr
store read with ``zarr``), against the simulator's truth (half sets, the signal
that was subtracted), and, for the image measures, against analytic results. The
report prepared from the particle table while a run goes, the one read back from
the store and the one read from the star of a run without report columns agree.
"""

from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import zarr

from dsub.cli import main
from dsub.demo import PIXEL_SIZE, make_dataset
from dsub.formats import cs as cs_format
from dsub.formats import star as star_format
from dsub.report import start_preparation, write_report
from dsub.report.columns import FOLDER, ReportColumns
from dsub.report import gather as gather_module
from dsub.report.gather import gather, prepare, sample_spectra
from dsub.report.imaging import bin_images, image_spectra, low_pass, radial_power_spectrum
from dsub.workflow.transcript import LOG_NAME

BOX = 48
COUNT = 40
FIGURES = ("examples.png", "power_spectra.png", "contrast.png", "fit_quality.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Links(HTMLParser):
    """Every src/href in a page, and the text of its table cells in order."""

    def __init__(self):
        super().__init__()
        self.links, self.cells, self._cell = [], [], None

    def handle_starttag(self, tag, attrs):
        self.links += [value for name, value in attrs if name in ("src", "href")]
        if tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def parse(page: Path) -> Links:
    parser = Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def cell_after(cells: list[str], label: str) -> str:
    """The table cell right of the first cell reading ``label``."""
    return cells[cells.index(label) + 1]


def subtract(paths, outdir, *extra, particles=None) -> int:
    return main([
        "subtract", str(particles or paths["star"]), "--half-a", str(paths["half_a"]), "--half-b",
        str(paths["half_b"]), "--mask", str(paths["mask"]), "-o", str(outdir), "--chunk-size", "16", "--quiet",
        *extra,
    ])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """``dsub demo`` at a small size: noisy particles, report written at the end of the run."""
    folder = tmp_path_factory.mktemp("demo")
    assert main(["demo", "-o", str(folder), "--particles", str(COUNT), "--box", "32"]) == 0
    return folder / "subtracted"


@pytest.fixture(scope="module")
def clean_dataset(tmp_path_factory):
    """Noise-free particles, so the subtracted model can be compared with the simulator's signal."""
    folder = tmp_path_factory.mktemp("clean")
    paths, sim = make_dataset(folder, count=COUNT, box=BOX, snr=None)
    return paths, sim


def test_demo_run_writes_every_figure_and_links_only_files_it_has(demo_run):
    report = demo_run / "report"
    for name in FIGURES:
        assert (report / name).read_bytes()[:8] == PNG_SIGNATURE, name
    page = parse(report / "index.html")
    assert sorted(page.links) == sorted(FIGURES)
    for link in page.links:
        assert not link.startswith(("/", "file:", "http")) and ".." not in link  # relative: the folder travels
        assert (report / link).is_file()
    assert "Not recorded by this run." not in (report / "index.html").read_text(encoding="utf-8")
    assert sorted(p.name for p in report.iterdir()) == sorted(FIGURES + ("index.html",))


def test_runs_without_fit_quality_say_so(clean_dataset, tmp_path):
    paths, _ = clean_dataset
    outdir = tmp_path / "out"
    assert subtract(paths, outdir) == 0
    store = zarr.open_group(str(outdir / "subtracted.zarr"), mode="r+")
    for name in ("fit_correlation", "contrast_sigma"):  # as a store written before dsub recorded them
        del store[name]
    page_path = write_report(outdir)
    assert "Not recorded by this run." in page_path.read_text(encoding="utf-8")
    assert sorted(parse(page_path).links) == sorted(name for name in FIGURES if name != "fit_quality.png")


def test_report_numbers_match_the_star_file_and_the_store(demo_run):
    cells = parse(demo_run / "report" / "index.html").cells
    rows = starfile.read(demo_run / "particles_subtracted.star", always_dict=True)["particles"]
    store = zarr.open_group(str(demo_run / "subtracted.zarr"), mode="r")
    contrast = np.asarray(store["contrast"][:])
    assert cell_after(cells, "particles subtracted") == f"{len(rows)} of {COUNT}"
    for half, name in ((1, "A (rlnRandomSubset 1)"), (2, "B (rlnRandomSubset 2)")):
        assert int(cell_after(cells, name)) == int((rows["rlnRandomSubset"] == half).sum())
    assert cell_after(cells, "median contrast α") == f"{np.median(contrast):.4f}"
    optics_row = cells.index("opticsGroup1")
    assert int(cells[optics_row + 1]) == len(rows)
    assert float(cells[optics_row + 2]) == PIXEL_SIZE
    assert cell_after(cells, "scale") == "fit"
    assert cell_after(cells, "chunk_size") == "64"  # the demo's chunks, from the store's run record


def test_report_command_rewrites_the_folder_and_prints_where(demo_run, capsys):
    (demo_run / "report" / "stale.png").write_bytes(b"old")
    assert main(["report", str(demo_run)]) == 0
    assert capsys.readouterr().out.strip() == f"Report: {demo_run / 'report' / 'index.html'}"
    assert not (demo_run / "report" / "stale.png").exists()


@pytest.mark.parametrize("state", ["missing", "empty", "unfinished"])
def test_report_without_a_finished_run_is_one_error_line(state, demo_run, tmp_path, capsys):
    outdir = tmp_path / "out"
    if state != "missing":
        outdir.mkdir()
    if state == "unfinished":  # a run stopped before its export: the store, but no star file
        shutil.copytree(demo_run / "subtracted.zarr", outdir / "subtracted.zarr")
    assert main(["report", str(outdir)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"dsub: error: {outdir}")
    assert "Traceback" not in err
    if state == "unfinished":
        assert "particles_subtracted.star" in err and "dsub_run.json" in err
    assert not (outdir / "report").exists()


def test_subtracted_model_is_the_simulated_signal_and_spectra_are_ordered(clean_dataset, tmp_path):
    paths, sim = clean_dataset
    outdir = tmp_path / "out"
    # Each simulated particle holds its own half map exactly, not a common truth: the FSC weighting
    # (made for half maps = truth + noise) would scale the model by about 2 %.
    assert subtract(paths, outdir, "--fit-weighting", "none") == 0
    data = gather(outdir)
    halves = [example.half_set for example in data.examples]
    assert halves.count(1) == 3 and halves.count(2) == 3
    for example in data.examples:
        truth = low_pass(sim.subtracted_signal[example.row][None], PIXEL_SIZE, data.display_resolution_angstrom)[0]
        error = np.linalg.norm(example.model - truth) / np.linalg.norm(truth)
        assert error < 0.02, (example.row, error)
        assert example.half_set == sim.half_set[example.row]
        assert example.defocus_angstrom == pytest.approx((sim.defocus_u[example.row] + sim.defocus_v[example.row]) / 2)
    # Noise-free: the input holds exactly the kept and the subtracted signal, so its power exceeds the result's
    # at low resolution, where the masked domain's signal is.
    spectra = data.spectra
    low = spectra.frequency_per_angstrom < 1 / 15
    assert (spectra.input[low] > spectra.result[low]).all()
    assert spectra.sample_size == COUNT


def test_fit_quality_and_contrast_outliers_recorded_in_the_store(clean_dataset, tmp_path):
    paths, _ = clean_dataset
    outdir = tmp_path / "out"
    assert subtract(paths, outdir) == 0
    store = zarr.open_group(str(outdir / "subtracted.zarr"), mode="r+")
    correlation = np.linspace(0.2, 0.9, COUNT).astype(np.float32)
    for name, values in (("fit_correlation", correlation), ("contrast_sigma", np.full(COUNT, 0.05, np.float32))):
        store[name][:] = values
    contrast = np.asarray(store["contrast"][:])
    planted = [3, 17]  # one far too strong, one of the wrong sign
    contrast[planted] = [10.0, -1.0]
    store["contrast"][:] = contrast

    page_path = write_report(outdir)
    page = parse(page_path)
    assert "fit_quality.png" in page.links and (page_path.parent / "fit_quality.png").is_file()
    assert "Not recorded by this run." not in page_path.read_text(encoding="utf-8")
    np.testing.assert_array_equal(gather(outdir).quality["fit_correlation"], correlation)
    assert cell_after(page.cells, "median fit correlation") == f"{np.median(correlation):.3f}"
    assert cell_after(page.cells, "contrast outliers") == "2"
    listed = page.cells[page.cells.index("α") + 1:]
    names = starfile.read(outdir / "particles_subtracted.star", always_dict=True)["particles"]["rlnImageOriginalName"]
    assert [listed[0], same_image_key(listed[1]), listed[2], listed[3], same_image_key(listed[4]), listed[5]] == [
        "4", same_image_key(names[3]), "10.0000", "18", same_image_key(names[17]), "-1.0000"]  # farthest first


def test_cs_input_with_input_scale_shows_fitted_against_input(clean_dataset, tmp_path):
    paths, sim = clean_dataset
    table = star_format.read_particles(paths["star"])
    cs_path = tmp_path / "J9_particles.cs"
    cs_format.write_particles(table, cs_path, [str(paths["stack"])] * COUNT, table.image_indices,
                              contrast=sim.contrast)
    outdir = tmp_path / "out"
    assert subtract(paths, outdir, "--scale", "input", particles=cs_path) == 0
    data = gather(outdir)
    assert data.scale == "input" and data.sample_fit is not None
    # Noise-free particles: the fit finds the simulator's contrast, which is also the input's.
    np.testing.assert_allclose(data.sample_fit["input"], sim.contrast[: data.sample_fit["input"].size], rtol=1e-6)
    np.testing.assert_allclose(data.sample_fit["fitted"], data.sample_fit["input"], rtol=0.03)
    assert all(example.input is not None for example in data.examples)  # input stacks found from the .cs names
    page = parse(outdir / "report" / "index.html")
    assert "contrast.png" in page.links
    ratio = float(cell_after(page.cells, "fitted / input α (sample median)"))
    assert ratio == pytest.approx(1.0, abs=0.03)


def test_report_without_the_input_stacks_shows_the_results(clean_dataset, tmp_path):
    paths, _ = clean_dataset
    data_copy = tmp_path / "data"
    data_copy.mkdir()
    copied = {key: Path(shutil.copy2(path, data_copy / Path(path).name)) for key, path in paths.items()}
    outdir = tmp_path / "out"
    assert subtract(copied, outdir) == 0
    copied["stack"].unlink()  # the report is drawn later, on a machine without the inputs
    page_path = write_report(outdir)
    text = page_path.read_text(encoding="utf-8")
    assert "The input images could not be read here" in text and str(copied["stack"]) in text
    assert sorted(parse(page_path).links) == sorted(FIGURES)


def test_a_failing_report_only_warns(clean_dataset, tmp_path, capsys, monkeypatch):
    import dsub.report

    def broken(outdir, preparation=None):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(dsub.report, "write_report", broken)
    paths, _ = clean_dataset
    assert subtract(paths, tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert re.search(r"dsub: warning: the QC report could not be written \(RuntimeError: no fonts\)", err)
    assert (tmp_path / "out" / "particles_subtracted.star").is_file()


# ----------------------------------------------------------------------------- image measures, analytic


def test_white_noise_has_flat_power_equal_to_its_variance():
    rng = np.random.default_rng(0)
    images = rng.normal(0.0, 2.0, size=(800, 64, 64)).astype(np.float32)
    frequency, power = radial_power_spectrum(image_spectra(images), 1.5)
    assert frequency.size == 32
    np.testing.assert_allclose(frequency[[0, -1]], [1 / 96, 1 / 3.0])  # first shell, Nyquist of 1.5 Å pixels
    np.testing.assert_allclose(power, 4.0, rtol=0.06)  # Parseval: σ² per pixel at every shell


def test_a_plane_wave_puts_its_power_in_its_own_shell():
    box, k = 64, 10
    y, x = np.mgrid[:box, :box]
    wave = np.cos(2 * np.pi * (k * x / box)).astype(np.float32)[None]
    _, power = radial_power_spectrum(image_spectra(wave), 1.0)
    assert np.argmax(power) == k - 1
    # Parseval: mean of cos² is 1/2, all of it in shell k, averaged over that shell's coefficients
    shell = np.rint(np.hypot(*np.meshgrid(np.fft.fftfreq(box, 1 / box), np.fft.fftfreq(box, 1 / box)))) == k
    assert power[k - 1] == pytest.approx(0.5 * box**2 / shell.sum(), rel=1e-5)


def test_low_pass_halves_a_wave_at_its_resolution():
    box, pixel = 64, 1.5
    k = 8  # a wave of period box·pixel/k = 12 Å
    x = np.arange(box)
    wave = np.tile(np.cos(2 * np.pi * k * x / box), (box, 1)).astype(np.float32)[None]
    filtered = low_pass(wave, pixel, resolution_angstrom=box * pixel / k)
    np.testing.assert_allclose(filtered, 0.5 * wave, atol=1e-5)
    np.testing.assert_allclose(low_pass(np.ones((1, box, box)), pixel, 12.0), 1.0, atol=1e-6)  # DC kept


def test_binning_for_display_averages_pixel_blocks():
    small = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    np.testing.assert_array_equal(bin_images(np.kron(small, np.ones((3, 3), np.float32)), 3), small)
    np.testing.assert_array_equal(bin_images(small, 1), small)


def test_a_rerun_that_fails_leaves_no_report_of_the_old_run(tmp_path, capsys):
    """--overwrite with a bad image: met by the sample fit, the run is refused before the old run's outputs
    are touched (its report stays, whole); met by a chunk, after they were cleared: no old report is left."""
    from dsub.workflow.diagnostics import SAMPLE_SIZE, sample_rows

    count = 2 * SAMPLE_SIZE + 2
    paths, _ = make_dataset(tmp_path / "data", count=count, box=32, snr=None)
    outdir = tmp_path / "out"
    assert subtract(paths, outdir) == 0
    kept = {name: (outdir / name).read_bytes() for name in ("report/index.html", "dsub_run.json")}
    copied_folder = tmp_path / "copy"
    copied_folder.mkdir()
    copied = {key: Path(shutil.copy2(path, copied_folder / Path(path).name)) for key, path in paths.items()}
    sampled = set(sample_rows(count).tolist())
    with mrcfile.open(copied["stack"], mode="r+") as mrc:
        mrc.data[min(sampled)] = np.nan  # in the sample: refused before any change
    capsys.readouterr()
    assert subtract(copied, outdir, "--overwrite") == 2
    assert "NaN" in capsys.readouterr().err
    assert {name: (outdir / name).read_bytes() for name in kept} == kept
    with mrcfile.open(paths["stack"]) as original, mrcfile.open(copied["stack"], mode="r+") as mrc:
        mrc.data[min(sampled)] = original.data[min(sampled)]
        mrc.data[max(set(range(count)) - sampled)] = np.nan  # met by its chunk, after the old outputs were cleared
    assert subtract(copied, outdir, "--overwrite") == 2
    assert "NaN" in capsys.readouterr().err
    assert not (outdir / "report").exists()


def test_skipped_particles_are_counted_and_left_out_of_the_figures(clean_dataset, tmp_path):
    paths, sim = clean_dataset
    data_copy = tmp_path / "data"
    data_copy.mkdir()
    copied = {key: Path(shutil.copy2(path, data_copy / Path(path).name)) for key, path in paths.items()}
    with mrcfile.open(copied["stack"], mode="r+") as mrc:
        mrc.data[7] = np.inf
    outdir = tmp_path / "out"
    assert subtract(copied, outdir, "--skip-bad-particles") == 0
    cells = parse(outdir / "report" / "index.html").cells
    assert cell_after(cells, "particles subtracted") == f"{COUNT - 1} of {COUNT}"
    assert cell_after(cells, "left out (bad images)") == "1"
    contrast = np.asarray(zarr.open_group(str(outdir / "subtracted.zarr"), mode="r")["contrast"][:])
    assert np.isnan(contrast[7])
    assert cell_after(cells, "median contrast α") == f"{np.nanmedian(contrast):.4f}"
    data = gather(outdir)
    assert 7 not in data.exported_rows and data.contrast.size == COUNT - 1
    for example in data.examples:  # star rows map back to input rows past the skipped one
        source = data.exported_rows[example.row]
        assert example.half_set == sim.half_set[source]
        assert example.contrast == pytest.approx(contrast[source])


def test_report_of_a_run_copied_elsewhere_finds_its_stacks(clean_dataset, tmp_path):
    """Copied off the cluster, the star's stack paths (absolute here) no longer exist: OUTDIR/Particles does."""
    paths, _ = clean_dataset
    outdir = tmp_path / "cluster" / "out"
    assert subtract(paths, outdir) == 0
    copy = tmp_path / "laptop" / "job"
    shutil.copytree(outdir, copy)
    shutil.rmtree(outdir)
    page_path = write_report(copy)
    assert "examples.png" in parse(page_path).links
    assert all(example.result is not None for example in gather(copy).examples)


def test_the_runs_warnings_head_the_report(clean_dataset, tmp_path):
    from dsub.formats.mrc import write_map

    paths, _ = clean_dataset
    ones = tmp_path / "ones.mrc"
    write_map(ones, np.ones((BOX,) * 3, np.float32), PIXEL_SIZE)  # subtracts the whole map: warned about
    outdir = tmp_path / "out"
    assert subtract({**paths, "mask": ones}, outdir) == 0
    warnings = gather(outdir).warnings
    assert warnings and any("density" in warning for warning in warnings)
    text = (outdir / "report" / "index.html").read_text(encoding="utf-8")
    assert text.count('class="warn"') == len(warnings)


def test_the_report_of_a_rerun_keeps_the_warnings_of_the_attempt_that_computed(clean_dataset, tmp_path):
    """The sample fit's warnings are said by the attempt that fits the sample; a rerun that finds the run
    finished and draws its lost report fits none: the page keeps the warnings of every attempt."""
    from dsub.formats.mrc import write_map

    paths, _ = clean_dataset
    unrelated = np.random.default_rng(3).normal(size=(BOX,) * 3).astype(np.float32)
    noise = {name: tmp_path / f"{name}.mrc" for name in ("half_a", "half_b")}
    for path in noise.values():  # two files of one map unrelated to the particles: it explains nothing of them
        write_map(path, unrelated, PIXEL_SIZE)
    outdir = tmp_path / "out"
    assert subtract({**paths, **noise}, outdir) == 0
    warnings = gather(outdir).warnings
    assert any("explain almost nothing" in warning for warning in warnings), warnings
    shutil.rmtree(outdir / "report")
    assert subtract({**paths, **noise}, outdir) == 0
    log = (outdir / LOG_NAME).read_text()
    assert log.count("==== ") == 2 and "explain almost nothing" not in log.rsplit("==== ", 1)[1]  # not refitted
    assert gather(outdir).warnings == warnings
    assert (outdir / "report" / "index.html").read_text(encoding="utf-8").count('class="warn"') == len(warnings)


# ------------------------------------------------------- prepared during the run, from the store, from the star


def same_image_key(name: str) -> tuple:
    """``N@path`` as (N, the stack's file name): the same image whichever folder its path starts from."""
    number, _, path = name.partition("@")
    return int(number), Path(path).name


def assert_same_report(one, other):
    np.testing.assert_array_equal(one.exported_rows, other.exported_rows)
    np.testing.assert_array_equal(one.contrast, other.contrast)
    np.testing.assert_array_equal(one.half_set, other.half_set)
    assert one.optics == other.optics and one.box == other.box
    assert one.pixel_size_angstrom == other.pixel_size_angstrom
    # the same image; the star's rlnImageOriginalName may name its stack from another folder than the input
    assert [(e.row, same_image_key(e.image_name), e.half_set) for e in one.examples] == \
        [(e.row, same_image_key(e.image_name), e.half_set) for e in other.examples]
    for a, b in zip(one.examples, other.examples):
        assert a.defocus_angstrom == pytest.approx(b.defocus_angstrom)
        for key in ("input", "model", "result"):
            np.testing.assert_allclose(getattr(a, key), getattr(b, key), rtol=1e-5, atol=1e-6)
    for key in ("frequency_per_angstrom", "input", "model", "result"):
        np.testing.assert_allclose(getattr(one.spectra, key), getattr(other.spectra, key), rtol=1e-5)
    assert one.spectra.sample_size == other.spectra.sample_size
    assert [same_image_key(one.image_names[i]) for i in range(len(one.image_names))] == \
        [same_image_key(other.image_names[i]) for i in range(len(other.image_names))]


def test_prepared_report_agrees_with_the_store_and_the_star_and_replaces_a_skipped_example(clean_dataset, tmp_path):
    paths, sim = clean_dataset
    data_copy = tmp_path / "data"
    data_copy.mkdir()
    copied = {key: Path(shutil.copy2(path, data_copy / Path(path).name)) for key, path in paths.items()}
    first_of_a = int(np.flatnonzero(sim.half_set == 1)[0])  # an example row, chosen before the run's results
    with mrcfile.open(copied["stack"], mode="r+") as mrc:
        mrc.data[first_of_a] = np.inf
    outdir = tmp_path / "out"
    assert subtract(copied, outdir, "--skip-bad-particles") == 0
    table = star_format.read_particles(copied["star"])

    prepared = prepare(outdir, table, particles_per_stack=4096)  # as the run does while its chunks go
    assert first_of_a in prepared.example_rows and (outdir / "subtracted.zarr" / FOLDER / "columns.json").is_file()
    during_run = gather(outdir, prepared)
    from_store = gather(outdir)
    shutil.rmtree(outdir / "subtracted.zarr" / FOLDER)  # as a store written before the report kept columns
    from_star = gather(outdir)
    assert_same_report(during_run, from_store)
    assert_same_report(during_run, from_star)

    rows = during_run.exported_rows[[example.row for example in during_run.examples]]
    assert first_of_a not in rows and len(rows) == 6  # replaced by its nearest neighbour of half A
    assert [sim.half_set[row] for row in rows].count(1) == 3
    names = starfile.read(outdir / "particles_subtracted.star", always_dict=True)["particles"]["rlnImageOriginalName"]
    assert [same_image_key(example.image_name) for example in during_run.examples] == [
        same_image_key(names[example.row]) for example in during_run.examples]
    assert all(example.model is not None for example in during_run.examples)
    assert during_run.spectra.sample_size == COUNT - 1
    assert int(during_run.half_set.size) == COUNT - 1


def test_columns_of_another_run_are_not_used(clean_dataset, tmp_path):
    paths, _ = clean_dataset
    outdir = tmp_path / "out"
    assert subtract(paths, outdir) == 0
    table = star_format.read_particles(paths["star"])
    table.half_set[:] = 3 - table.half_set  # what another run's table would say
    ReportColumns.from_table(table, outdir, 4096, fingerprint="another run").write(
        outdir / "subtracted.zarr" / FOLDER)
    rows = starfile.read(outdir / "particles_subtracted.star", always_dict=True)["particles"]
    data = gather(outdir)
    assert int((data.half_set == 1).sum()) == int((rows["rlnRandomSubset"] == 1).sum())


def test_preparation_in_the_background_and_its_failure(clean_dataset, tmp_path):
    paths, _ = clean_dataset
    outdir = tmp_path / "out"
    assert subtract(paths, outdir) == 0
    table = star_format.read_particles(paths["star"])
    shutil.rmtree(outdir / "report")
    preparation = start_preparation(outdir, table, 4096)
    page_path = write_report(outdir, preparation)
    assert preparation.error is None and preparation.prepared is not None
    assert sorted(parse(page_path).links) == sorted(FIGURES)

    failing = start_preparation(outdir / "elsewhere", table, 4096)  # no store there: it fails in the thread
    page_path = write_report(outdir, failing)  # and the report is read from the folder instead
    assert failing.error is not None and failing.result() is None
    assert sorted(parse(page_path).links) == sorted(FIGURES)


def test_spectra_read_in_blocks_equal_the_whole_samples_and_hold_a_block_at_a_time(clean_dataset, tmp_path,
                                                                                    monkeypatch):
    """``sample_spectra`` reduces the sample a block at a time: the same spectra as the whole sample's images
    read at once (the model's from input - result in real space), while it holds less than one copy of them."""
    import tracemalloc

    from dsub.formats.mrc import read_images

    paths, _ = clean_dataset
    outdir = tmp_path / "out"
    assert subtract(paths, outdir) == 0
    columns = ReportColumns.read(outdir / "subtracted.zarr" / FOLDER, outdir)
    rows, pixel = np.arange(COUNT), columns.pixel_size_angstrom
    results, inputs = read_images(*columns.images.results(rows)), read_images(*columns.images.inputs(rows))
    whole = {"result": radial_power_spectrum(image_spectra(results), pixel),
             "input": radial_power_spectrum(image_spectra(inputs), pixel),
             "model": radial_power_spectrum(image_spectra(inputs - results), pixel)}
    sample_bytes = results.nbytes
    del results, inputs
    monkeypatch.setattr(gather_module, "SPECTRUM_BLOCK_BYTES", 3 * BOX * BOX * 4)  # 14 blocks, the last of 1
    tracemalloc.start()
    try:
        spectra, note = sample_spectra(columns, rows, BOX, pixel, with_inputs=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert note is None and spectra.sample_size == COUNT
    for key, (frequency, power) in whole.items():
        np.testing.assert_allclose(spectra.frequency_per_angstrom, frequency, rtol=1e-12)
        np.testing.assert_allclose(getattr(spectra, key), power, rtol=1e-5)
    assert peak < sample_bytes, (peak, sample_bytes)

    results_only, _ = sample_spectra(columns, rows, BOX, pixel, with_inputs=False)
    assert results_only.input is None and results_only.model is None
    np.testing.assert_allclose(results_only.result, whole["result"][1], rtol=1e-5)


def test_report_columns_take_a_few_bytes_per_particle(clean_dataset, tmp_path):
    paths, _ = clean_dataset
    table = star_format.read_particles(paths["star"])
    folder = ReportColumns.from_table(table, tmp_path, 16).write(tmp_path / FOLDER)
    columns = ReportColumns.read(folder, tmp_path)
    assert len(columns) == COUNT
    np.testing.assert_array_equal(columns.half_set, table.half_set)
    stacks, indices = columns.images.inputs(np.array([0, COUNT - 1]))
    assert list(stacks) == [str(paths["stack"].resolve())] * 2 and list(indices) == [0, COUNT - 1]
    stacks, indices = columns.images.results(np.array([15, 16]))  # 16 particles per exported stack
    assert [Path(s).name for s in stacks] == ["subtracted_0000.mrcs", "subtracted_0001.mrcs"]
    assert list(indices) == [15, 0]
    per_particle = sum((folder / f"{name}.npy").stat().st_size for name in
                       ("half_set", "optics_group", "defocus_angstrom", "input_codes", "input_indices",
                        "result_codes", "result_indices"))
    assert per_particle < COUNT * 26 + 7 * 128  # 25 bytes a particle, and each .npy's header


REPORT_PEAK = """
import sys
sys.path.insert(0, sys.argv[2])
from peak_memory import PeakMemory
from dsub.report import warm_up_drawing, write_report
from dsub.workflow import store
outdir = sys.argv[1]
warm_up_drawing()  # a run loads the drawing library early; resources.DRAWING_LIBRARY_BYTES counts it apart
store.read_arrays(outdir + "/subtracted.zarr", ("skipped",))  # Zarr's threads: a run has them running already
with PeakMemory() as peak:
    write_report(outdir)
print(peak.mapped, peak.resident)
"""
#: Where ``peak_memory.py`` (shared with ``benchmarks/report_memory.py``) lies.
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="psutil's address-space figures on Linux")
def test_the_reports_memory_is_within_what_the_run_plans_for_it(tmp_path):
    """``resources.report_bytes``, which a run under ``ulimit -v`` counts before any work, covers what drawing the
    report adds, mapped and resident, as the run draws it (two malloc arenas: ``MALLOC_ARENA_MAX=2``), for a
    sample of box-128 images spread over 18 output stacks. ``benchmarks/report_memory.py`` measures it against
    the box."""
    import os
    import subprocess
    import sys

    from dsub.workflow import resources

    count, box = 280, 128
    paths, _ = make_dataset(tmp_path / "data", count=count, box=box, seed=11)
    outdir = tmp_path / "out"
    assert main(["subtract", str(paths["star"]), "--half-a", str(paths["half_a"]), "--half-b", str(paths["half_b"]),
                 "--mask", str(paths["mask"]), "-o", str(outdir), "--chunk-size", "16", "--particles-per-stack", "16",
                 "--quiet", "--keep-store"]) == 0
    environment = {**os.environ, "MALLOC_ARENA_MAX": "2", "ARROW_DEFAULT_MEMORY_POOL": "system",
                   "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", REPORT_PEAK, str(outdir), str(BENCHMARKS)], capture_output=True,
                          text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stderr
    mapped, resident = (int(word) for word in done.stdout.split())
    planned = resources.report_bytes(count, box)
    assert resident > gather_module.SPECTRUM_BLOCK_BYTES  # the measure sees the report's arrays
    assert mapped <= planned and resident <= planned, (mapped, resident, planned)
