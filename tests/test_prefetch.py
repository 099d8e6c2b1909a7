"""Reading the stacks ahead (workflow.prefetch) and the image reads it serves (formats.mrc.read_images)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest

from dsub.formats.mrc import read_images, write_stack
from dsub.workflow import prefetch


@pytest.fixture
def stacks(tmp_path):
    rng = np.random.default_rng(3)
    made = {}
    for name, count in (("a.mrcs", 40), ("b.mrcs", 25)):
        images = rng.normal(size=(count, 16, 16)).astype(np.float32)
        with write_stack(tmp_path / name, images, 1.0):
            pass
        made[str(tmp_path / name)] = images
    return made


def test_byte_ranges_follow_the_reading_order(stacks):
    a, b = sorted(stacks)
    image, header = 16 * 16 * 4, 1024
    # b's 2-3, a's 3-5, a's 3-5 again (symmetry expansion), a's 9.
    paths = np.array([b, b, a, a, a, a, a, a, a], dtype=object)
    indices = np.array([2, 3, 3, 4, 5, 3, 4, 5, 9])
    ranges = list(prefetch.byte_ranges(paths, indices))
    assert ranges == [(b, header + 2 * image, 2 * image), (a, header + 3 * image, 3 * image),
                      (a, header + 9 * image, image)]
    # What the ranges name is the bytes of those images.
    for path, offset, count in ranges:
        with open(path, "rb") as f:
            f.seek(offset)
            got = np.frombuffer(f.read(count), dtype="<f4").reshape(-1, 16, 16)
        first = (offset - header) // image
        np.testing.assert_array_equal(got, stacks[path][first : first + got.shape[0]])
    # In the order the run reads the rows (its chunks round-robin over output stacks).
    order = np.array([8, 2, 3, 4, 0, 1])
    assert list(prefetch.byte_ranges(paths, indices, order)) == [
        (a, header + 9 * image, image), (a, header + 3 * image, 3 * image), (b, header + 2 * image, 2 * image)]


def test_large_runs_are_cut_into_pieces(stacks, monkeypatch):
    monkeypatch.setattr(prefetch, "PIECE_BYTES", 3 * 16 * 16 * 4)
    a = sorted(stacks)[0]
    ranges = list(prefetch.byte_ranges(np.array([a] * 10, dtype=object), np.arange(10)))
    assert [count for _, _, count in ranges] == [3072, 3072, 3072, 1024]
    assert [offset for _, offset, _ in ranges] == [1024 + 3072 * k for k in range(4)]


def table_of(paths, indices):
    return SimpleNamespace(image_paths=np.asarray(paths, dtype=object), image_indices=np.asarray(indices))


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_read_ahead_stays_within_its_budget_and_ignores_broken_stacks(stacks, tmp_path):
    a, b = sorted(stacks)
    image = 16 * 16 * 4
    table = table_of([a] * 40 + [b] * 25, list(range(40)) + list(range(25)))
    whole = prefetch.start(table, "threads", available_bytes=10**9)
    whole._thread.join(10)
    assert whole.requested_bytes == 65 * image
    half = prefetch.start(table, "local", available_bytes=2 * 45 * image)  # room for 45 images
    half._thread.join(10)
    assert half.requested_bytes == 40 * image  # a's run fits, b's does not
    broken = tmp_path / "broken.mrcs"
    broken.write_text("not a stack")
    failed = prefetch.start(table_of([str(broken)], [0]), "threads", available_bytes=10**9)
    failed._thread.join(10)
    assert failed.requested_bytes == 0 and not failed._thread.is_alive()


def test_no_read_ahead_for_tasks_on_other_machines(stacks):
    a = sorted(stacks)[0]
    for scheduler in ("slurm", "pbs", "tcp://10.0.0.1:8786"):
        assert prefetch.start(table_of([a], [0]), scheduler).requested_bytes == 0


def test_read_images_in_runs_equals_the_stacks_in_any_order(stacks):
    a, b = sorted(stacks)
    rng = np.random.default_rng(0)
    paths = np.array([a] * 12 + [b] * 6, dtype=object)
    indices = np.concatenate([[7, 8, 9, 10, 2, 3, 30, 31, 32, 0, 39, 8], [24, 0, 1, 2, 10, 11]])
    order = rng.permutation(paths.size)
    got = read_images(paths[order], indices[order])
    expected = np.stack([stacks[p][i] for p, i in zip(paths[order], indices[order])])
    np.testing.assert_array_equal(got, expected)


def test_gpu_batches_are_padded_to_a_few_sizes():
    from dsub.workflow.tasks import quantum_padded

    batch = np.array([4, 9, 10, 17, 30])
    padded = quantum_padded(batch, 4)
    assert padded.tolist() == [4, 9, 10, 17, 30, 30, 30, 30]
    assert quantum_padded(batch[:4], 4) is not None and quantum_padded(batch[:4], 4).tolist() == [4, 9, 10, 17]
    assert quantum_padded(batch, 1).tolist() == batch.tolist()


def test_chunks_run_round_robin_over_the_stacks_they_write():
    from dsub.workflow import export, store

    bounds = store.chunk_bounds(1000, 100)  # 10 chunks, stacks of 400: 4 + 4 + 2 chunks
    order = export.chunk_run_order(bounds, export.stack_layout(1000, 400))
    assert order.tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 3, 7]
    # Optics groups of two pixel sizes split the stacks; every chunk still comes once.
    sizes = np.r_[np.full(550, 1.0), np.full(450, 1.3)]
    order = export.chunk_run_order(bounds, export.stack_layout(1000, 200, sizes))
    assert order.tolist() == [0, 2, 4, 6, 8, 1, 3, 5, 7, 9]  # chunk 5 (rows 500-599) starts in the third stack


def test_blocks_of_rows_cover_the_same_images(stacks, monkeypatch):
    a, b = sorted(stacks)
    paths = np.array([a] * 9 + [b] * 5, dtype=object)
    indices = np.r_[np.arange(9), [4, 0, 1, 2, 3]]
    image, header = 16 * 16 * 4, 1024

    def images(ranges):
        return sorted({(path, (offset - header) // image + k) for path, offset, count in ranges
                       for k in range(count // image)})

    whole = images(prefetch.byte_ranges(paths, indices))
    monkeypatch.setattr(prefetch, "BLOCK_ROWS", 4)
    assert images(prefetch.byte_ranges(paths, indices)) == whole
    assert len(whole) == 14
