"""A fast reader for large particle ``.star`` files (millions of rows, as after symmetry expansion).

``starfile`` keeps every line of a file as a Python string before pandas parses
them: about 8× the file in memory and most of the time at a million rows. Here
the particle loop is handed straight to pandas' C parser from its offset in the
file, and text columns are read as categories (unique strings plus integer
codes), so an image or micrograph name repeated a million times is held once.
The blocks before the particle loop (the optics table) are small and still read
by ``starfile``. Values come out as ``starfile`` gives them, with the same
numeric inference, except that the ``strings`` columns are categorical.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import starfile


def _particle_loop(f, image_label: str, block_name: str | None = None) -> tuple[str, int, int, list[str]] | None:
    """(block name, offset of the block's ``data_`` line, offset of its first row, labels) of the first loop
    of the open file ``f`` that has ``image_label`` (or, given ``block_name``, the loop of ``data_<block_name>``);
    None when the file has none."""
    block, block_at = None, 0
    position = f.tell()
    line = f.readline()
    while line:
        stripped = line.strip()
        if stripped.startswith(b"data_"):
            block, block_at = stripped[5:].decode(), position
        elif stripped.startswith(b"loop_") and block is not None:
            labels = []
            position, line = f.tell(), f.readline()
            while line:
                stripped = line.strip()
                if stripped.startswith(b"_"):
                    labels.append(stripped.split()[0][1:].decode())
                elif stripped and not stripped.startswith(b"#"):
                    break
                position, line = f.tell(), f.readline()
            if (block == block_name) if block_name is not None else (image_label in labels):
                return block, block_at, position, labels
            continue
        position, line = f.tell(), f.readline()
    return None


#: What the fast reader leaves to ``starfile`` when it follows the particle rows: a quote, or a line
#: that starts a block or a loop (indented or not). The line's newline comes first in the pattern, so
#: the regular expression engine jumps from newline to newline (0.12 s for 239 MB, against 5.6 s for
#: the same search written as one alternation with the quotes); quotes are found with ``in``.
_QUOTES = (b"'", b'"')
_BLOCK_OR_LOOP = re.compile(rb"\n[ \t]*(?:data_|loop_)")


def _found_after(f, start: int, block: int = 1 << 24, overlap: int = 256) -> bool:
    """Whether a quote, or a line starting a block or loop, follows in the file from byte ``start``
    (a line start) on. Read in blocks, not mapped: a mapping would count the whole file in this
    process's resident memory. Blocks overlap by ``overlap`` bytes, more than a match spans (a
    line's newline, indentation and keyword)."""
    f.seek(start)
    tail = b"\n"  # ``start`` begins a line
    while True:
        data = f.read(block)
        if not data:
            return False
        window = tail + data
        if any(quote in data for quote in _QUOTES) or _BLOCK_OR_LOOP.search(window):
            return True
        tail = window[-overlap:]


def read_star(path: str | os.PathLike, strings, image_label: str = "rlnImageName") -> dict | None:
    """Every block of a particle star file, as ``starfile.read(path, always_dict=True)`` gives them.

    The particle loop (the first loop with ``image_label``) is parsed by pandas'
    C reader with ``strings`` columns as categories. Returns None when this
    reader cannot be sure to read the file as ``starfile`` does (quotes in the
    particle rows, blocks after the particle loop, no particle loop, no rows):
    read it with ``starfile`` then.
    """
    path = Path(path)
    with open(path, "rb") as f:
        found = _particle_loop(f, image_label)
        if found is None:
            return None
        name, block_at, rows_at, labels = found
        if _found_after(f, rows_at):
            return None
        f.seek(0)
        header = f.read(block_at)
    blocks = _read_header(header, strings) if header.strip() else {}
    try:
        table = _read_rows(path, rows_at, labels, [label for label in strings if label in labels])
    except _MixedColumn:
        return None
    except pd.errors.ParserError as exc:  # its line counts from the loop's first row: the file's instead
        with open(path, "rb") as f:
            first_row_line = f.read(rows_at).count(b"\n") + 1
        raise pd.errors.ParserError(in_file_lines(path, str(exc), first_row_line)) from exc
    if table.empty:
        return None
    for label in table.columns:  # starfile's inference: a text column that is all numbers becomes numeric
        if label not in strings and table[label].dtype == object:
            try:
                numeric = pd.to_numeric(table[label])
            except (ValueError, TypeError):
                continue
            if not numeric.isna().all():
                table[label] = numeric
    blocks[name] = table
    return blocks


#: Rows parsed at once; each column's pieces are joined (and freed) one column at a time, so reading
#: holds the table about once, not twice as one ``pd.read_csv`` of the whole loop does.
PIECE_ROWS = 1 << 18


def _read_rows(path: Path, rows_at: int, labels: list[str], strings: list[str]) -> pd.DataFrame:
    """The particle rows from byte ``rows_at`` on, as ``pd.read_csv`` of them in one go would give them."""
    options = dict(sep=r"\s+", header=None, names=labels, comment="#", engine="c",
                   dtype={label: "category" for label in strings},
                   keep_default_na=False, na_values=["nan", "NaN", "<NA>"])
    pieces: dict[str, list] = {label: [] for label in labels}
    with open(path, "rb") as f:
        f.seek(rows_at)
        for piece in pd.read_csv(f, chunksize=PIECE_ROWS, **options):
            if not isinstance(piece.index, pd.RangeIndex):  # pandas takes a first row of one value too many
                raise pd.errors.ParserError(f"Expected {len(labels)} fields in line 1, saw {len(labels) + 1}")
            for label in labels:  # copied out, so each piece's memory goes with its columns
                column = piece[label]
                pieces[label].append(column.array.copy() if label in strings else column.to_numpy(copy=True))
            del piece, column
            return_free_memory()  # the parser's buffers for this piece: not held while the next is read
    columns = {}
    for label in labels:
        parts = pieces.pop(label)
        if label in strings:
            # One piece (a file of fewer than ``PIECE_ROWS`` rows) is already the column: no union to compute.
            joined = parts[0] if len(parts) == 1 else pd.api.types.union_categoricals(parts)
            columns[label] = pd.Series(joined, copy=False)
            continue
        if len({part.dtype for part in parts}) > 1 and not {part.dtype.kind for part in parts} <= set("iuf"):
            raise _MixedColumn(label)  # text in some pieces, numbers in others: one read_csv would differ
        columns[label] = np.concatenate(parts) if len(parts) > 1 else parts[0]  # ints with floats: floats
        del parts
    return pd.DataFrame(columns, copy=False)


#: pandas' C parser's words for a row whose number of values differs from the loop's.
_FIELDS_ERROR = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")
_IN_THE_FILE = " of the file"
#: One value of a star row: quoted (with spaces inside) or not.
_VALUE = re.compile(rb"\"[^\"]*\"|'[^']*'|\S+")


def in_file_lines(path: str | os.PathLike, message: str, first_row_line: int | None = None) -> str:
    """A pandas parser error's ``message`` with its line counted in the file (1-based, as an editor shows it).

    pandas counts the lines of the text it is handed (blank and comment lines
    too) from 1: a loop's rows. ``first_row_line``: the file line of that loop's
    first row, when known (``read_star``). Else (``starfile``, which hands pandas
    each loop's lines from the first non-blank one after its labels) the loop
    is the first whose line at that count holds as many values as pandas saw.
    The message comes back stripped, and otherwise unchanged when it names no
    line or no loop fits.
    """
    message = message.strip()
    match = _FIELDS_ERROR.search(message)
    if match is None or _IN_THE_FILE in message:
        return message
    expected, line, saw = (int(value) for value in match.groups())
    if first_row_line is None:
        first_row_line = _loop_first_row_with(path, line, saw)
        if first_row_line is None:
            return message
    return (f"{message[:match.start()]}Expected {expected} fields in line {first_row_line + line - 1}"
            f"{_IN_THE_FILE}, saw {saw}{message[match.end():]}")


def _loop_first_row_with(path, line: int, saw: int) -> int | None:
    """The file line of the first row of the first loop whose ``line``-th line (from its first row) holds ``saw`` values.

    A loop's rows start, as ``starfile`` starts them, at the first non-blank
    line after its labels; a ``#`` starts a comment.
    """
    targets: dict[int, int] = {}  # file line to look at: the file line of its loop's first row
    in_labels = False
    with open(path, "rb") as f:
        for number, text in enumerate(f, 1):
            if number in targets and len(_VALUE.findall(text.split(b"#")[0])) == saw:
                return targets[number]
            stripped = text.strip()
            if in_labels and not stripped.startswith(b"_") and stripped:
                in_labels = False
                targets[number + line - 1] = number
                if line == 1 and len(_VALUE.findall(text.split(b"#")[0])) == saw:
                    return number
            elif stripped.startswith(b"loop_"):
                in_labels = True
    return None


def row_line(path: str | os.PathLike, row: int, image_label: str = "rlnImageName",
             block_name: str | None = None) -> int | None:
    """The file line (1-based) of particle row ``row`` (0-based) of the first loop with ``image_label``; None if none.

    ``block_name``: the row of the loop of ``data_<block_name>`` instead (e.g. ``"optics"``). Blank and
    comment lines between rows are not rows. For error messages: reads up to that row.
    """
    found = row_texts(path, [row], image_label, block_name)
    return found[row][0] if row in found else None


def row_texts(path: str | os.PathLike, rows, image_label: str = "rlnImageName",
              block_name: str | None = None) -> dict[int, tuple[int, bytes]]:
    """{row: (file line, 1-based; the line's bytes)} of the particle rows ``rows`` (0-based) of the loop ``row_line``
    finds; rows the file does not hold (or a file without that loop) are left out. Reads up to the last of ``rows``."""
    wanted = set(int(row) for row in rows)
    found: dict[int, tuple[int, bytes]] = {}
    if not wanted:
        return found
    last = max(wanted)
    with open(path, "rb") as f:
        loop = _particle_loop(f, image_label, block_name)
        if loop is None:
            return found
        rows_at = loop[2]
        f.seek(0)
        number = f.read(rows_at).count(b"\n")
        row = 0
        for number, text in enumerate(f, number + 1):
            stripped = text.strip()
            if stripped.startswith((b"data_", b"loop_")):  # the next block: the loop's rows have ended
                break
            if stripped and not stripped.startswith(b"#"):
                if row in wanted:
                    found[row] = (number, text)
                if row == last:
                    break
                row += 1
    return found


def first_uneven_row(path: str | os.PathLike,
                     image_label: str = "rlnImageName") -> tuple[int, int, int, int, bool] | None:
    """(row, 0-based; file line, 1-based; its values; the loop's labels; whether it is the loop's last row) of the
    first row of the first loop with ``image_label`` whose number of values differs from its labels'; None if none.

    For error messages: reads the whole loop line by line.
    """
    with open(path, "rb") as f:
        loop = _particle_loop(f, image_label)
        if loop is None:
            return None
        rows_at, columns = loop[2], len(loop[3])
        f.seek(0)
        number = f.read(rows_at).count(b"\n")
        row, uneven = 0, None
        for number, text in enumerate(f, number + 1):
            stripped = text.strip()
            if stripped.startswith((b"data_", b"loop_")):
                break
            if not stripped or stripped.startswith(b"#"):
                continue
            if uneven is not None:  # a row follows the uneven one
                return (*uneven, False)
            count = count_values(text)
            if count != columns:
                uneven = (row, number, count, columns)
            row += 1
    return None if uneven is None else (*uneven, True)


def count_values(text: bytes) -> int:
    """How many values a row's text holds, as the readers split it (a quoted value with spaces counts once;
    ``#`` starts a comment)."""
    return len(_VALUE.findall(text.split(b"#")[0]))


class _MixedColumn(ValueError):
    """A column read as text in some pieces and as numbers in others."""


def _read_header(header: bytes, strings) -> dict:
    """The blocks before the particle loop, read by ``starfile`` from a temporary file."""
    with tempfile.NamedTemporaryFile("wb", suffix=".star", delete=False) as f:
        f.write(header)
    try:
        return dict(starfile.read(f.name, always_dict=True, parse_as_string=list(strings)))
    finally:
        os.unlink(f.name)


def return_free_memory() -> None:
    """Give the memory the C allocator keeps after frees back to the system (glibc ``malloc_trim``; elsewhere nothing).

    Parsing a large star file frees many buffers of a few MB, which glibc keeps
    for reuse: without this the process would hold about a third more than the
    table it read.
    """
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc
        pass
