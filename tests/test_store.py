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
