"""The store's bookkeeping of finished chunks."""

from __future__ import annotations

import numpy as np

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
