"""Output paths checked before the work that fills them, and files written whole or not at all.

Every command that writes (train's run folder, evaluate's report folder, recommend's and
explain's files, extract's .h5) checks its output first: a path of the wrong kind (a
file where a folder goes, a folder where a file goes, a parent that is a file), a
read-only or unwritable location, each refused with one ValueError naming the path and
the fix, before minutes of work. `atomic_write` then writes each file through a
temporary file in the same folder and a rename, so a full disk or an interruption leaves
the previous file (or none), never half of one.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path

FIXES = {
    errno.ENOSPC: "free some space on that disk or choose a folder on another one",
    errno.EDQUOT: "free some space (the disk quota is used up) or choose a folder on another disk",
    errno.EROFS: "choose a folder on a writable file system",
    errno.EACCES: "choose a folder you can write to",
    errno.EPERM: "choose a folder you can write to",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "give a file path, not a folder",
    errno.EEXIST: "something of the wrong kind is already there: choose another path",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def os_error_reason(exc: OSError) -> str:
    """'No space left on device' and the usual fix, for an OSError (or its errno alone)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    fix = FIXES.get(exc.errno)
    return f"{reason}; {fix}" if fix else reason


def check_output_folder(path, what: str = "output folder", keep: bool = True) -> Path | None:
    """Make sure `path` is (or can become) a writable folder. Returns the top-most folder
    this call created (None if it created none): the caller removes them again with
    `remove_if_empty(path, created)` if it fails before writing anything. With
    keep=False the folders created for the check are removed again at once."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder: give a folder path "
                         "(or move the file away)")
    created = None
    for folder in [path, *path.parents]:
        if os.path.lexists(folder):
            break
        created = folder
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create {what} {path}: {os_error_reason(exc)}") from None
    probe = path / f".acf-fast-write-test.{os.getpid()}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"\0")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        remove_if_empty(path, created)
        raise ValueError(f"{what} {path} is not writable: {os_error_reason(exc)}") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    if not keep:
        remove_if_empty(path, created)
    return created


def check_output_file(path, what: str = "output file", suffixes: tuple[str, ...] = ()) -> Path:
    """Make sure `path` can be written as a file: not a folder, a parent that is (or can
    become) a writable folder, and one of `suffixes` (lower case, with the dot) if given."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise ValueError(f"{what} {path} must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder, not a file: give a file path")
    try:
        check_output_folder(path.parent, "folder", keep=False)
    except ValueError as exc:
        raise ValueError(f"cannot write {what} {path}: {exc}") from None
    return path


def remove_if_empty(folder, created: Path | None) -> None:
    """Remove `folder` and its parents up to `created` (what check_output_folder made),
    as long as nothing was written into them."""
    if created is None:
        return
    folder, created = Path(folder), Path(created)
    for f in [folder, *folder.parents]:
        try:
            f.rmdir()
        except OSError:
            return
        if f == created:
            return


@contextmanager
def atomic_write(path, mode: str = "w", **open_kwargs):
    """`with atomic_write(path) as fh: ...`: the file appears complete at `path` when the
    block ends, and not at all if it raises (a full disk, an interruption)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode, **open_kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno is None or (exc.filename and exc.filename != str(tmp)):
            raise
        # a failed write names no file (or the temporary one): name the file being written
        raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass


def write_text_atomic(path, text: str) -> Path:
    with atomic_write(path) as fh:
        fh.write(text)
    return Path(path)
