"""CSV plumbing shared by the readers in `formats`: opening with clear errors, chunked
numpy parsing of id columns, range checks, and atomic writes.

Every error names the file, the line, the column and the value, so a bad input is one
clear line for the user instead of a failure later inside the model.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

CHUNK_ROWS = 1 << 20


def open_csv(path, required: tuple[str, ...]):
    """(reader positioned after the header, {column: index}); clear errors for the usual faults."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"file not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, expected a CSV file")
    fh = open(path, newline="")
    reader = csv.reader(fh)
    try:
        header = next(reader)
    except StopIteration:
        fh.close()
        raise ValueError(f"{path}: empty file, expected a header with columns {list(required)}") from None
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        fh.close()
        raise ValueError(f"{path}: missing column(s) {missing}; the header has {header}, "
                         f"expected at least {list(required)}")
    return fh, reader, {name: header.index(name) for name in header}


def csv_chunks(reader, path, n_columns: int):
    """Lists of rows, CHUNK_ROWS at a time, with the file line number of each chunk's first row."""
    rows, first_line = [], 2
    for row in reader:
        if not row:
            continue
        if len(row) < n_columns:
            raise ValueError(f"{path}, line {reader.line_num}: expected {n_columns} fields, "
                             f"got {len(row)}: {row}")
        rows.append(row)
        if len(rows) == CHUNK_ROWS:
            yield first_line, rows
            first_line, rows = reader.line_num + 1, []
    if rows:
        yield first_line, rows


def _bad_value(values, path, column: str, first_line: int, kind: str):
    for i, v in enumerate(values):
        try:
            int(v) if kind == "integer" else float(v)
        except ValueError:
            return ValueError(f"{path}, line {first_line + i}: column {column!r} has {v!r}, "
                              f"expected an {kind}")
    return ValueError(f"{path}: column {column!r} has a value that is not an {kind}")


def parse_ints(values: list[str], path, column: str, first_line: int) -> np.ndarray:
    try:
        return np.array(values, dtype=np.str_).astype(np.int64)
    except (ValueError, OverflowError):
        raise _bad_value(values, path, column, first_line, "integer") from None


def parse_timestamps(values: list[str], path, first_line: int) -> np.ndarray:
    """Integers when they all are (the tutorial's Unix times), floats otherwise; nan and inf
    are refused (they would sort a user's oldest interactions into the held-out newest)."""
    arr = np.array(values, dtype=np.str_)
    try:
        return arr.astype(np.int64)
    except (ValueError, OverflowError):
        try:
            times = arr.astype(np.float64)
        except ValueError:
            raise _bad_value(values, path, "timestamp", first_line, "number") from None
    bad = np.flatnonzero(~np.isfinite(times))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{path}, line {first_line + i}: column 'timestamp' has {values[i]!r}, "
                         "expected a finite number (nan and inf cannot be ordered in time); "
                         "fix or drop the rows with such timestamps")
    return times


def parse_id_lists(values: list[str], path, column: str, first_line: int):
    """Space-separated id lists -> (flat int64 ids, lengths) without a per-row int() loop."""
    stripped = [v.strip() for v in values]
    lengths = np.fromiter((len(v.split()) for v in stripped), dtype=np.int64, count=len(stripped))
    flat = " ".join(stripped).split()
    try:
        ids = np.array(flat, dtype=np.str_).astype(np.int64) if flat else np.zeros(0, np.int64)
    except (ValueError, OverflowError):
        for i, v in enumerate(stripped):
            for tok in v.split():
                try:
                    int(tok)
                except ValueError:
                    raise ValueError(f"{path}, line {first_line + i}: column {column!r} has "
                                     f"{tok!r} in {v!r}, expected space-separated integer ids") from None
        raise
    return ids, lengths


def check_id_range(ids: np.ndarray, upper: int | None, path, column: str, what: str) -> None:
    """ids must lie in [0, upper); names the first offending value."""
    if ids.size == 0:
        return
    lo = int(ids.min())
    if lo < 0:
        raise ValueError(f"{path}: column {column!r} has negative {what} id {lo}")
    if upper is not None:
        hi = int(ids.max())
        if hi >= upper:
            raise ValueError(f"{path}: column {column!r} has unknown {what} id {hi}; "
                             f"expected ids in [0, {upper - 1}] ({upper} {what}s)")


def write_csv_atomic(path, header: list[str], rows) -> Path:
    """Write rows to path.tmp then rename, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def join_ids(ids) -> str:
    return " ".join(map(str, ids))
