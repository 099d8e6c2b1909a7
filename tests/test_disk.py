"""The disk a run writes: refused before any work where OUTDIR's file system cannot hold what is left to write."""

from __future__ import annotations

import errno
import json
import os
import re

import pytest

from dsub.cli import main
from dsub.demo import make_dataset
from dsub.workflow import disk, export

COUNT, BOX, CHUNK = 24, 32, 8
#: One stack per chunk (--particles-per-stack 8): three stacks of a float32 MRC header and 8 images of 32².
STACK_BYTES = 1024 + CHUNK * BOX * BOX * 4


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    paths, _ = make_dataset(tmp_path_factory.mktemp("data"), count=COUNT, box=BOX, seed=3)
    return paths


def subtract_args(paths, outdir, *extra):
    return ["subtract", str(paths["star"]), "--half-a", str(paths["half_a"]), "--half-b", str(paths["half_b"]),
            "--mask", str(paths["mask"]), "-o", str(outdir), "--chunk-size", str(CHUNK),
            "--particles-per-stack", str(CHUNK), "--scheduler", "sync", *extra]


def free_space(monkeypatch, free: int) -> None:
    """OUTDIR's file system reports ``free`` bytes free."""
    monkeypatch.setattr(disk, "free_bytes", lambda folder: free)


def metadata_estimate(paths) -> int:
    return disk.metadata_bytes(COUNT, [paths["star"]])


def test_stacks_that_do_not_fit_are_refused_before_any_work(small, tmp_path, monkeypatch, capsys):
    outdir = tmp_path / "out"
    free_space(monkeypatch, 60_000)
    assert main(subtract_args(small, outdir, "--quiet")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dsub: error: {outdir}: this run writes about "), err
    need = 3 * STACK_BYTES + metadata_estimate(small)
    assert f"about {disk.size_text(need)} (stacks {disk.size_text(3 * STACK_BYTES)}, metadata " in err[0]
    assert "its file system has 60.0 kB free" in err[0]
    assert "write elsewhere with -o" in err[0] and "--float16, which halves the stacks" in err[0]
    assert "starts over" not in err[0]  # nothing finished to leave behind
    assert not outdir.exists()  # nothing made, no lock file or log left


def test_a_refusal_leaves_an_existing_folder_as_it_was(small, tmp_path, monkeypatch, capsys):
    outdir = tmp_path / "out"
    outdir.mkdir()
    (outdir / "notes.txt").write_text("mine")
    free_space(monkeypatch, 1000)
    assert main(subtract_args(small, outdir, "--quiet", "--float16", "--overwrite")) == 2
    line = capsys.readouterr().err.strip()
    assert line.count("\n") == 0 and "1.00 kB free" in line and "--float16" not in line
    assert sorted(os.listdir(outdir)) == ["notes.txt"]


def test_a_file_system_that_reports_no_size_is_not_checked(small, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "statvfs", lambda folder: os.statvfs_result((4096,) * 2 + (0,) * 8))
    assert disk.free_bytes(tmp_path) is None
    monkeypatch.undo()
    assert disk.free_bytes(tmp_path) > 0


def test_a_resume_needs_room_only_for_what_is_left(small, tmp_path, monkeypatch, capsys):
    """A run stopped by a full disk after its first chunk resumes where only the two chunks left fit; the
    same free space refuses the whole run in a new folder."""
    outdir = tmp_path / "out"
    written = export.write_pieces

    def full_after_first_chunk(images, pieces):
        if any(not piece.path.endswith("subtracted_0000.mrcs.partial") for piece in pieces):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), pieces[0].path)
        written(images, pieces)

    with monkeypatch.context() as patch:
        patch.setattr(export, "write_pieces", full_after_first_chunk)
        assert main(subtract_args(small, outdir, "--quiet")) == 2
    line = capsys.readouterr().err.strip()
    assert "no space left on device while writing the results" in line and line.count("\n") == 0
    # Freeing space and rerunning resumes; another folder would start over, the finished chunk left here.
    assert "rerun the same command: finished chunks are kept and the run resumes" in line
    assert f"A new output folder (-o) starts over: the finished chunks stay in {outdir}." in line

    free_space(monkeypatch, 1000)  # the rerun finds too little room for the two chunks left
    assert main(subtract_args(small, outdir, "--quiet")) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"dsub: error: {outdir}: this run still has to write about ") and line.count("\n") == 0
    assert ("write elsewhere with -o (a new output folder starts over: the finished chunks stay in this one, where "
            "freeing space resumes the run)") in line

    free = metadata_estimate(small) + 2 * STACK_BYTES + 1  # the whole run needs one stack more
    free_space(monkeypatch, free)
    assert main(subtract_args(small, tmp_path / "new", "--quiet")) == 2
    assert "this run writes about" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()

    import dsub.workflow.pipeline as pipeline

    monkeypatch.setattr(pipeline, "DISK_STATED_BYTES", 1)
    assert main(subtract_args(small, outdir)) == 0, capsys.readouterr().err
    summary = json.loads((outdir / "dsub_run.json").read_text())
    assert summary["chunks_skipped"] == 1 and summary["attempts"][-1]["chunks_done"] == 2
    memory = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Memory:")]
    whole = 3 * STACK_BYTES + metadata_estimate(small)
    said = re.search(r"; the outputs take about (.+) \(stacks .+\) of disk, ([\d.]+) (kB|MB) of it still to write\.$",
                     memory[0])
    assert said and said[1] == disk.size_text(whole), memory[0]
    left = float(said[2]) * {"kB": 1e3, "MB": 1e6}[said[3]]  # the first chunk's stack is written: two left
    assert whole - STACK_BYTES - 0.03e6 <= left < whole - 0.5 * STACK_BYTES, memory[0]  # (the store's part kept too)


def test_overwrite_counts_the_room_of_the_results_it_replaces(small, tmp_path, monkeypatch, capsys):
    outdir = tmp_path / "out"
    assert main(subtract_args(small, outdir, "--quiet")) == 0
    free_space(monkeypatch, metadata_estimate(small) + STACK_BYTES)  # two stacks short of a whole run
    assert main(subtract_args(small, tmp_path / "new", "--quiet")) == 2
    assert main(subtract_args(small, outdir, "--quiet", "--overwrite")) == 0, capsys.readouterr().err


def test_a_large_run_states_its_disk_in_the_memory_line(small, tmp_path, monkeypatch, capsys):
    import dsub.workflow.pipeline as pipeline

    monkeypatch.setattr(pipeline, "DISK_STATED_BYTES", 1)
    free_space(monkeypatch, 1000)
    assert main(subtract_args(small, tmp_path / "out")) == 2
    memory = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Memory:")]
    assert len(memory) == 1
    assert memory[0].endswith(f"; the outputs take about {disk.size_text(3 * STACK_BYTES + metadata_estimate(small))} "
                              f"(stacks {disk.size_text(3 * STACK_BYTES)}, metadata "
                              f"{disk.size_text(metadata_estimate(small))}) of disk."), memory[0]


def test_sizes_for_people():
    assert [disk.size_text(n) for n in (512, 60_000, 393_216_000, 1.25e12, 2.5e15)] == [
        "512 bytes", "60.0 kB", "393 MB", "1.25 TB", "2500 TB"]
