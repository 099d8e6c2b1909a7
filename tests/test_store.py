"""The store's bookkeeping of finished chunks."""

from __future__ import annotations

import numpy as np
import pytest

from dsub.workflow import store


def test_finished_chunks_are_the_marked_ones_and_a_reset_unmarks(tmp_path):
    path = tmp_path / "subtracted.zarr"
    store.create_store(path, count=10, box=4, chunk_size=2, run_attrs={}, keep_images=False)
    assert store.finished_chunks(path).tolist() == [False] * 5
    marks = store.open_store(path, mode="r+")["chunk_done"]
    for index in (1, 4):
        marks[index] = 1
    assert store.finished_chunks(path).tolist() == [False, True, False, False, True]
    store.reset_chunks(path, [4])
    assert store.finished_chunks(path).tolist() == [False, True, False, False, False]
    assert np.array_equal(store.finished_chunks(path), np.asarray(marks[:], dtype=bool))


def test_whole_arrays_read_chunk_by_chunk_equal_zarrs_reading(tmp_path):
    path = tmp_path / "subtracted.zarr"
    store.create_store(path, count=10, box=4, chunk_size=4, run_attrs={}, keep_images=False)
    group = store.open_store(path, mode="r+")
    group["contrast"][0:4] = np.arange(4, dtype=np.float32)  # chunk 1 never written: NaN
    group["contrast"][8:10] = [8.5, -9.5]  # the last chunk, shorter than the others
    group["skipped"][4:8] = [0, 1, 0, 1]  # compressed, decoded by zarr
    del group["fit_correlation"]  # a store without it
    arrays = store.read_arrays(path, ("contrast", "skipped", "fit_correlation", "contrast_sigma"))
    assert sorted(arrays) == ["contrast", "contrast_sigma", "skipped"]
    for name, values in arrays.items():
        assert values.dtype == group[name].dtype
        np.testing.assert_array_equal(values, group[name][:])
    np.testing.assert_array_equal(arrays["skipped"], [0, 0, 0, 0, 0, 1, 0, 1, 0, 0])
    assert np.isnan(arrays["contrast"][4:8]).all() and arrays["contrast"][9] == -9.5


def test_statistics_flags_and_figures_read_chunk_by_chunk_equal_zarrs_reading(tmp_path):
    """The (n, 4) statistics (chunk files c/<i>/0), the skipped flags and the per-particle figures as zarr reads them."""
    path = tmp_path / "subtracted.zarr"
    store.create_store(path, count=10, box=4, chunk_size=4, run_attrs={}, keep_images=False)
    group = store.open_store(path, mode="r+")
    group[store.STATISTICS][0:4] = np.arange(16, dtype=np.float64).reshape(4, 4)  # chunk 1 never written: 0
    group[store.STATISTICS][8:10] = [[-1.0, 2.0, 3.5, 4.25], [5.0, 6.0, 7.0, 8.0]]  # the short last chunk
    group["skipped"][8:10] = [1, 0]
    group["contrast_sigma"][4:8] = [0.5, 0.25, 0.125, 1.0]
    del group["fit_correlation"]  # a store without it: NaN
    statistics = store.image_statistics(path)
    assert statistics.shape == (10, 4) and statistics.dtype == np.float64
    np.testing.assert_array_equal(statistics, group[store.STATISTICS][:])
    assert statistics[9].tolist() == [5.0, 6.0, 7.0, 8.0] and not statistics[4:8].any()
    assert store.skipped_particles(path).tolist() == [False] * 8 + [True, False]
    figures = store.per_particle(path)
    assert sorted(figures) == sorted(store.PER_PARTICLE)
    np.testing.assert_array_equal(figures["contrast_sigma"], group["contrast_sigma"][:])
    assert figures["fit_correlation"].dtype == np.float32 and np.isnan(figures["fit_correlation"]).all()


def test_chunk_marks_decoded_here_equal_zarrs_reading(tmp_path):
    """The zstd-compressed marks, each file decoded without zarr: the marks zarr reads, a reset mark included."""
    path = tmp_path / "subtracted.zarr"
    store.create_store(path, count=20, box=4, chunk_size=2, run_attrs={}, keep_images=False)
    group = store.open_store(path, mode="r+")
    for index in (0, 3, 4, 9):
        group["chunk_done"][index] = 1
    store.reset_chunks(path, [4])
    assert store.finished_chunks(path).tolist() == [i in (0, 3, 9) for i in range(10)]
    np.testing.assert_array_equal(store.finished_chunks(path), np.asarray(group["chunk_done"][:], dtype=bool))
    (path / "chunk_done" / "c" / "3").write_bytes(b"not a zstd frame")  # not this layout: zarr's reading decides
    with pytest.raises(Exception):
        np.asarray(group["chunk_done"][:])
    with pytest.raises(Exception):
        store.finished_chunks(path)


def chunk_result(index: int, start: int, count: int, skipped=()) -> store.ChunkResult:
    contrast = np.vstack([np.full(count, index + 0.5), np.full(count, 0.1), np.full(count, 0.3)]).astype(np.float32)
    bad = np.zeros(count, dtype=bool)
    bad[list(skipped)] = True
    statistics = np.tile([[-1.0, 1.0, 0.0, float(index)]], (count, 1))
    return store.ChunkResult(index, start, "cpu", contrast, bad, statistics)


def test_recorded_chunks_hold_their_figures_and_marks_in_any_order(tmp_path):
    path = tmp_path / "subtracted.zarr"
    store.create_store(path, count=10, box=4, chunk_size=4, run_attrs={}, keep_images=False)
    recorder = store.ChunkRecorder(path, interval_s=3600.0)
    assert recorder.add(chunk_result(2, 8, 2, skipped=[1])) == "cpu"  # the first is recorded at once
    assert store.finished_chunks(path).tolist() == [False, False, True]
    recorder.add(chunk_result(0, 0, 4))  # waits for the next write
    assert store.finished_chunks(path).tolist() == [False, False, True]
    recorder.close()
    assert store.finished_chunks(path).tolist() == [True, False, True]
    group = store.open_store(path)
    contrast = group["contrast"][:]
    assert np.array_equal(contrast[[0, 3, 8, 9]], [0.5, 0.5, 2.5, 2.5]) and np.isnan(contrast[4:8]).all()
    assert group["skipped"][:].tolist() == [0] * 9 + [1]
    assert group[store.STATISTICS][:, 3].tolist() == [0.0] * 4 + [0.0] * 4 + [2.0, 2.0]


def test_a_stop_while_recording_records_the_chunks_before_it_goes_on(tmp_path, monkeypatch):
    path = tmp_path / "subtracted.zarr"
    store.create_store(path, count=8, box=4, chunk_size=4, run_attrs={}, keep_images=False)
    recorder = store.ChunkRecorder(path, interval_s=3600.0)
    recorder.add(chunk_result(0, 0, 4))
    recorder.add(chunk_result(1, 4, 4))
    original, calls = store.record_chunks, []

    def interrupted_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C or SIGTERM while the write is under way
        original(*args)

    monkeypatch.setattr(store, "record_chunks", interrupted_once)
    with pytest.raises(KeyboardInterrupt):  # the stop goes on once the chunks are recorded
        recorder.close()
    assert store.finished_chunks(path).tolist() == [True, True] and len(calls) == 2


def test_a_store_is_taken_for_one_whose_creation_was_stopped_only_until_its_run_is_recorded(tmp_path):
    import zarr

    from dsub.workflow.store import create_store, creation_stopped, identity_written

    path = tmp_path / "subtracted.zarr"
    assert not creation_stopped(path)  # none there
    path.mkdir()
    (path / "zarr.0123abcd.partial").write_bytes(b"{")  # Zarr's metadata, stopped while written
    assert creation_stopped(path) and not identity_written(path)
    zarr.open_group(str(path), mode="w").create_array("contrast", shape=(4,), dtype="float32")
    assert creation_stopped(path) and not identity_written(path)
    create_store(path, 4, 8, 2, {"fingerprint": "f"}, keep_images=False)
    assert not creation_stopped(path) and identity_written(path)
    other = tmp_path / "other.zarr"
    other.mkdir()
    (other / "notes.txt").write_text("mine")  # not what Zarr writes: not taken for a stopped store
    assert not creation_stopped(other)
