"""Millions of particles: the columnar table tasks read, bounded task waves, the fast star reader and
the block-wise star and .cs writers (each checked against the plain way it replaces)."""

import threading

import dask
import numpy as np
import pytest
import starfile

from dsub.cluster.runner import ClusterSpec, ThreadRunner
from dsub.formats import cs, read_particles, star
from dsub.formats.paths import StackRefs
from dsub.particles import ParticleTable, is_same_for_all
from dsub.workflow import metadata


def _per_particle(table):
    return {name: value for name, value in vars(table).items()
            if isinstance(value, np.ndarray) and value.shape[:1] == (len(table),)}


@pytest.fixture
def relion(shared_data):
    return read_particles(shared_data / "cryodrgn/relion31.6opticsgroups.star")


@pytest.fixture
def p12(shared_data):
    return read_particles(shared_data / "cryodrgn/cryosparc_P12_J24_001_particles.cs")


# ---------------------------------------------------------------- the columnar table
@pytest.mark.parametrize("name", ["relion", "p12"])
def test_a_row_range_gives_exactly_those_rows(name, request, tmp_path):
    table = request.getfixturevalue(name)
    folder = metadata.write_table(table, tmp_path / metadata.FOLDER)
    for start, stop in [(0, 1), (3, 17), (len(table) - 5, len(table)), (0, len(table))]:
        rows = metadata.load_particles(metadata.table_rows(folder, start, stop))
        expected = table.subset(np.arange(start, stop))
        assert len(rows) == stop - start
        for field, values in _per_particle(expected).items():
            np.testing.assert_array_equal(getattr(rows, field), values, err_msg=field)
            assert getattr(rows, field).dtype == values.dtype, field
        assert rows.source_format == table.source_format and rows.source_path == table.source_path


def test_same_for_all_columns_are_stored_as_one_row(shared_data, tmp_path):
    relion = read_particles(shared_data / "cryodrgn/relion31.star")  # one optics group
    assert is_same_for_all(relion.mag_matrix)  # no rlnMagMat columns: the identity, one row of memory
    assert is_same_for_all(relion.voltage_kv) and not is_same_for_all(relion.defocus_u_angstrom)
    folder = metadata.write_table(relion, tmp_path / metadata.FOLDER)
    assert np.load(folder / "mag_matrix.npy").shape == (1, 2, 2)
    rows = metadata.load_particles(metadata.table_rows(folder, 1, 4))
    np.testing.assert_array_equal(rows.mag_matrix, np.broadcast_to(np.eye(2), (3, 2, 2)))
    rows.mag_matrix[0, 0, 0] = 2.0  # a task gets ordinary arrays


def test_rows_beyond_the_table_are_refused(relion, tmp_path):
    folder = metadata.write_table(relion, tmp_path / metadata.FOLDER)
    with pytest.raises(IndexError, match="outside the table"):
        metadata.load_particles(metadata.table_rows(folder, len(relion) - 1, len(relion) + 1))


def test_a_table_written_anew_in_the_same_folder_is_read_anew(relion, p12, tmp_path):
    folder = tmp_path / metadata.FOLDER
    metadata.write_table(relion, folder)
    first = metadata.load_particles(metadata.table_rows(folder, 0, 3))
    np.testing.assert_array_equal(first.defocus_u_angstrom, relion.defocus_u_angstrom[:3])
    metadata.write_table(p12, folder)  # the next run's table, in a process that read the first one
    again = metadata.load_particles(metadata.table_rows(folder, 0, 3))
    np.testing.assert_array_equal(again.defocus_u_angstrom, p12.defocus_u_angstrom[:3])
    assert again.source_format == p12.source_format


def test_a_table_passes_through_unread(relion):
    assert metadata.load_particles(relion) is relion


def test_a_task_reference_is_small(relion, tmp_path):
    import cloudpickle

    folder = metadata.write_table(relion, tmp_path / metadata.FOLDER)
    reference = metadata.table_rows(folder, 0, 128)
    assert len(cloudpickle.dumps(reference)) < 500
    assert isinstance(metadata.load_particles(reference), ParticleTable)


# ---------------------------------------------------------------- bounded waves
class Counter:
    """Counts tasks built (taken from the generator) and finished; records the most in flight."""

    def __init__(self):
        self.built = self.finished = self.most = 0
        self.lock = threading.Lock()

    def tasks(self, count):
        for index in range(count):
            with self.lock:
                self.built += 1
                self.most = max(self.most, self.built - self.finished)
            yield dask.delayed(lambda i: i * i, pure=False)(index, dask_key_name=f"square-{index}")

    def done(self, result):
        with self.lock:
            self.finished += 1
        return result  # what the runner keeps in the result's place


@pytest.mark.parametrize("scheduler,workers", [("threads", 2), ("threads", 3), ("sync", 1)])
def test_never_more_tasks_in_flight_than_the_bound(scheduler, workers):
    runner = ThreadRunner(ClusterSpec(scheduler=scheduler, workers=workers, progress=False))
    counter = Counter()
    results = runner.compute(counter.tasks(100), "squares", [1] * 100, on_result=counter.done)
    assert results == [i * i for i in range(100)]  # in the order of the tasks
    assert counter.finished == 100
    assert 1 <= counter.most <= runner.in_flight_limit() < 100
    assert runner.in_flight_peak == counter.most or scheduler == "sync"


def test_distributed_waves_are_bounded():
    distributed = pytest.importorskip("distributed")
    from dsub.cluster.runner import DistributedRunner

    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
        runner = DistributedRunner(client, cluster, ClusterSpec(scheduler="local", progress=False), "test")
        counter = Counter()
        results = runner.compute(counter.tasks(60), "squares", [1] * 60, on_result=counter.done)
        assert results == [i * i for i in range(60)]
        assert runner.in_flight_limit() == 8  # 4 per thread, 2 threads
        assert counter.most <= 8 and runner.in_flight_peak <= 8


def test_a_failing_task_stops_the_phase():
    runner = ThreadRunner(ClusterSpec(scheduler="threads", workers=2, progress=False))

    def fail(i):
        if i == 5:
            raise ValueError("task 5 failed")
        return i

    tasks = (dask.delayed(fail, pure=False)(i) for i in range(40))
    with pytest.raises(ValueError, match="task 5 failed"):
        runner.compute(tasks, "failing", [1] * 40)


# ---------------------------------------------------------------- the fast star reader
@pytest.mark.parametrize("name", ["relion31.star", "relion31.6opticsgroups.star", "empiar_10076_7.star"])
@pytest.mark.parametrize("piece_rows", [7, 1 << 18])
def test_fast_reader_gives_starfiles_tables(shared_data, name, piece_rows, monkeypatch):
    monkeypatch.setattr(star.star_reader, "PIECE_ROWS", piece_rows)  # rows parsed at once
    path = shared_data / "cryodrgn" / name
    fast = star.star_reader.read_star(path, star.NAME_COLUMNS)
    plain = starfile.read(path, always_dict=True, parse_as_string=star.NAME_COLUMNS)
    assert list(fast) == list(plain)
    for block, expected in plain.items():
        got = fast[block].copy()
        for label in got.columns:
            if str(got[label].dtype) == "category":
                got[label] = got[label].astype(expected[label].dtype)
        starfile_dtypes = expected.dtypes.to_dict()
        assert got.dtypes.to_dict() == starfile_dtypes
        np.testing.assert_array_equal(got.to_numpy(), expected.to_numpy())


def test_large_star_is_read_into_the_same_table(shared_data, monkeypatch):
    path = shared_data / "cryodrgn/relion31.6opticsgroups.star"
    plain = read_particles(path)
    monkeypatch.setattr(star, "FAST_READ_BYTES", 0)
    fast = read_particles(path)
    assert str(fast.source["particles"]["rlnImageName"].dtype) == "category"
    for field, values in _per_particle(plain).items():
        np.testing.assert_array_equal(getattr(fast, field), values, err_msg=field)


def test_a_column_of_numbers_then_text_is_left_to_starfile(tmp_path, monkeypatch):
    monkeypatch.setattr(star.star_reader, "PIECE_ROWS", 2)
    path = tmp_path / "mixed.star"
    path.write_text("data_particles\n\nloop_\n_rlnImageName #1\n_rlnMyLabel #2\n"
                    "1@a.mrcs 1\n2@a.mrcs 2\n3@a.mrcs x3\n")
    assert star.star_reader.read_star(path, star.NAME_COLUMNS) is None


def test_quoted_rows_are_left_to_starfile(tmp_path):
    path = tmp_path / "quoted.star"
    path.write_text("data_particles\n\nloop_\n_rlnImageName #1\n_rlnMicrographName #2\n"
                    "1@a.mrcs 'mic one.mrc'\n2@a.mrcs 'mic two.mrc'\n")
    assert star.star_reader.read_star(path, star.NAME_COLUMNS) is None


@pytest.mark.parametrize("indent", ["", "  ", "\t"])
def test_a_block_after_the_particle_loop_is_left_to_starfile_however_indented(tmp_path, indent):
    path = tmp_path / "after.star"
    path.write_text("data_particles\n\nloop_\n_rlnImageName #1\n_rlnMicrographName #2\n"
                    "1@a.mrcs data_001/mic.mrc\n2@a.mrcs data_001/mic.mrc\n"
                    f"\n{indent}data_extra\n\n{indent}loop_\n_rlnSomething #1\n5\n")
    assert star.star_reader.read_star(path, star.NAME_COLUMNS) is None


@pytest.mark.parametrize("block", [7, 16, 64, 1 << 20])
def test_a_block_keyword_is_found_across_read_blocks_and_on_the_first_line(tmp_path, block):
    rows = b"1@a.mrcs data_001/mic.mrc\n" * 5
    for text, found in ((rows, False), (rows + b"  loop_\n", True), (b"data_x\n" + rows, True),
                        (rows + b"1@a.mrcs 'b'\n", True)):
        path = tmp_path / "rows.star"
        path.write_bytes(b"header\n" + text)
        with open(path, "rb") as f:
            assert star.star_reader._found_after(f, len(b"header\n"), block=block, overlap=16) is found


def test_data_in_a_file_name_is_not_a_block(tmp_path):
    path = tmp_path / "names.star"
    path.write_text("data_particles\n\nloop_\n_rlnImageName #1\n_rlnMicrographName #2\n"
                    "1@a.mrcs data_001/mic.mrc\n2@a.mrcs data_001/mic.mrc\n")
    table = star.star_reader.read_star(path, star.NAME_COLUMNS)
    assert table is not None and list(table["particles"]["rlnMicrographName"]) == ["data_001/mic.mrc"] * 2


# ---------------------------------------------------------------- block-wise writers
def _starfile_text(table, names, extra):
    """The star text as ``starfile.write`` of whole tables gives it (the way dsub wrote it before)."""
    if table.source_format == "star":
        optics, particles = star._blocks_from_star(table)
        original = particles["rlnImageName"].astype(str).to_numpy(dtype=object)
    else:
        optics, particles = star._blocks_from_table(table)
        original = np.array([f"{i + 1:06d}@{p}" for i, p in zip(table.image_indices, table.image_paths)], dtype=object)
    particles = particles.copy()
    particles["rlnImageOriginalName"] = original
    particles["rlnImageName"] = names
    for label, values in extra.items():
        particles[label] = values
    return starfile.to_string({"optics": optics, "particles": particles}, float_format=star.FLOAT_FORMAT)


@pytest.mark.parametrize("name", ["relion", "p12"])
def test_star_written_in_blocks_is_starfiles_text(name, request, tmp_path, monkeypatch):
    table = request.getfixturevalue(name)
    n = len(table)
    # Paths with and without a space: only the names with one are quoted.
    refs = StackRefs(["Subtract/stack 0.mrcs", "Subtract/stack_1.mrcs", "Subtract/stack 2.mrcs"], np.arange(n) % 3,
                     np.arange(n) // 3)
    extra = {"rlnDsubContrast": np.linspace(-1, 1, n).astype(np.float32),
             "rlnDsubFitCorrelation": np.where(np.arange(n) % 7 == 0, np.nan, 1e-7 * np.arange(n))}
    monkeypatch.setattr(star, "WRITE_BLOCK_ROWS", 13)
    star.write_particles(table, tmp_path / "blocks.star", refs, extra_columns=extra)
    written = (tmp_path / "blocks.star").read_text().split("\n")
    expected = _starfile_text(table, refs.names(), extra).split("\n")
    assert written[1:] == expected[1:]  # the first line is starfile's time stamp
    rows = [line for line in written if "@Subtract/" in line]
    assert '"000001@Subtract/stack 0.mrcs"' in rows[0] and '"Subtract/stack 0.mrcs"' not in rows[0]  # quoted whole
    assert "000001@Subtract/stack_1.mrcs" in rows[1].split("\t")  # no space: not quoted
    back = starfile.read(tmp_path / "blocks.star")["particles"]
    assert back["rlnImageName"].tolist() == refs.names().tolist()


@pytest.mark.parametrize("name", ["relion", "p12"])
def test_cs_written_in_blocks_equals_one_block(name, request, tmp_path, monkeypatch):
    table = request.getfixturevalue(name)
    n = len(table)
    paths = np.array([f"J1/stack_{k % 4}.mrcs" for k in range(n)], dtype=object)
    contrast = np.linspace(0.5, 1.5, n)
    if name == "relion":  # its Zernike terms have no .cs field: a warning, tested in test_cs
        monkeypatch.setattr(table, "odd_zernike", np.zeros((n, 0)))
        monkeypatch.setattr(table, "even_zernike", np.zeros((n, 0)))
    cs.write_particles(table, tmp_path / "one.cs", paths, np.arange(n), contrast)
    monkeypatch.setattr(cs, "WRITE_BLOCK_ROWS", 11)
    cs.write_particles(table, tmp_path / "blocks.cs", StackRefs.from_paths(paths, np.arange(n)), None, contrast)
    one, blocks = np.load(tmp_path / "one.cs"), np.load(tmp_path / "blocks.cs")
    assert blocks.dtype == one.dtype and blocks.tobytes() == one.tobytes()
    assert blocks["blob/path"][5] == paths[5].encode() and blocks["blob/idx"][5] == 5
    dataset = pytest.importorskip("cryosparc.dataset")
    assert len(dataset.Dataset.load(tmp_path / "blocks.cs")) == n


# ---------------------------------------------------------------- a whole run
def test_chunk_tasks_carry_row_ranges_and_the_table_goes_afterwards(tmp_path, monkeypatch):
    from dsub.cli import main
    from dsub.demo import make_dataset
    from dsub.workflow import store, tasks

    paths, _ = make_dataset(tmp_path / "data", count=48, box=32, snr=None)
    given = []
    original = tasks.load_particles

    def recording(particles):
        given.append(particles)
        return original(particles)

    monkeypatch.setattr(tasks, "load_particles", recording)
    outdir = tmp_path / "out"
    assert main(["subtract", str(paths["star"]), "--half-a", str(paths["half_a"]), "--half-b", str(paths["half_b"]),
                 "--mask", str(paths["mask"]), "-o", str(outdir), "--chunk-size", "10", "--quiet"]) == 0
    chunks = [p for p in given if isinstance(p, metadata.ParticleRows)]
    assert sorted((p.start, p.stop) for p in chunks) == [(0, 10), (10, 20), (20, 30), (30, 40), (40, 48)]
    assert not (outdir / store.STORE_NAME / metadata.FOLDER).exists()
    back = read_particles(outdir / "particles_subtracted.star")
    np.testing.assert_allclose(back.rotations, read_particles(paths["star"]).rotations, atol=1e-9)


def test_path_codes_hashed_in_blocks_match_one_factorize(monkeypatch):
    import pandas as pd

    from dsub.formats import paths as paths_module

    rng = np.random.default_rng(3)
    names = np.array([f"Extract/job{j:03d}/stack_{j}.mrcs" for j in range(7)], dtype=object)
    given = names[rng.integers(0, 7, 1000)]
    monkeypatch.setattr(paths_module, "PATH_CODE_ROWS", 64)  # 16 blocks, each with its own first appearances
    codes, distinct = paths_module.path_codes(given)
    expected_codes, expected_distinct = pd.factorize(given)
    assert codes.dtype == np.int32 and np.array_equal(codes, expected_codes)
    assert distinct == list(expected_distinct)


def _count_path_codes(monkeypatch) -> list:
    """Wrap ``path_codes`` wherever dsub imported it; returns the list of each call's row count."""
    import sys

    from dsub.formats import paths as paths_module

    original, calls = paths_module.path_codes, []

    def counted(values):
        calls.append(len(values))
        return original(values)

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("dsub") and getattr(module, "path_codes", None) is original:
            monkeypatch.setattr(module, "path_codes", counted)
    return calls


def test_image_path_codes_are_hashed_once_per_table(relion, monkeypatch):
    from dsub.formats.paths import path_codes

    expected_codes, expected_paths = path_codes(relion.image_paths)
    calls = _count_path_codes(monkeypatch)
    for _ in range(3):
        codes, distinct = relion.image_path_codes()
        np.testing.assert_array_equal(codes, expected_codes)
        assert distinct == expected_paths
    assert calls == [len(relion)]
    assert not codes.flags.writeable  # shared by every caller
    distinct.append("not kept")  # each caller gets its own list
    assert relion.image_path_codes()[1] == expected_paths and calls == [len(relion)]

    rows = np.arange(len(relion))[::-7]  # a subset hashes its own paths
    part = relion.subset(rows)
    part_codes, part_paths = part.image_path_codes()
    np.testing.assert_array_equal(np.asarray(part_paths, dtype=object)[part_codes], relion.image_paths[rows])
    assert calls == [len(relion), rows.size]

    relion.image_paths = np.array(["other.mrcs"] * len(relion), dtype=object)  # another array: hashed again
    assert relion.image_path_codes()[1] == ["other.mrcs"] and len(calls) == 3


def test_a_run_hashes_the_image_paths_of_its_table_once(tmp_path, monkeypatch):
    from dsub.cli import main
    from dsub.demo import make_dataset

    count = 40
    paths, _ = make_dataset(tmp_path / "data", count=count, box=32, snr=None)
    calls = _count_path_codes(monkeypatch)
    outdir = tmp_path / "out"
    assert main(["subtract", str(paths["star"]), "--half-a", str(paths["half_a"]), "--half-b", str(paths["half_b"]),
                 "--mask", str(paths["mask"]), "-o", str(outdir), "--chunk-size", "10", "--quiet"]) == 0
    assert calls.count(count) == 1, calls  # checks, run identity, the tasks' table, the QC report: one hashing
    assert (outdir / "report" / "index.html").is_file()
