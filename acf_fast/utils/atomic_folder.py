"""A folder written whole or not at all, and replaced only on request.

    with atomic_folder("work/prep", overwrite=False) as tmp:
        ...write every file into tmp...

The files are written into a hidden sibling folder (`.prep.tmp-<pid>-<token>`, on the same
file system), fsynced, and the folder is renamed into place when the block ends. A crash
or an exception before that leaves the old folder (or none) untouched, never a mix of old
and new files; the temporary folder is removed on an exception, and one left by a killed
process is removed by the next call for the same target.

An existing, non-empty target is replaced only with overwrite=True, and only if
`replaceable(path)` says it is one this kind of writer made (so `--overwrite` never
deletes a folder of someone else's files). Replacing swaps the two folders in one atomic
step where the OS can (Linux renameat2 RENAME_EXCHANGE), then deletes the old one.
Elsewhere the old folder is renamed away (`.prep.old-<pid>-<token>`), the new one renamed
in, and the old deleted: a crash between the two renames leaves no folder at the target,
and the next call for it puts the old one back before anything else.

FAULT_HOOK, when set, is called with the name of each step ("written", "moved-old",
"swapped"), so tests can crash there.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

FAULT_HOOK: Callable[[str], None] | None = None
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _fault(step: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(step)


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (this process counts as alive): a dead
    writer's temporaries may be removed, a live one's never."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True                      # exists, owned by someone else
    return True


def fsync_dir(path: Path) -> None:
    """Persist a rename or a new file's directory entry (POSIX); best effort where folders
    cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return                           # not supported here (e.g. Windows): best effort
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the OS or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):    # not here
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def leftovers(target) -> list:
    """(kind, pid, path) of the temporary / old folders earlier calls left next to target."""
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(\d+)-[0-9a-f]+$")
    if not target.parent.is_dir():
        return []
    found = []
    for entry in sorted(target.parent.iterdir()):
        m = pattern.match(entry.name)
        if m:
            found.append((m.group(1), int(m.group(2)), entry))
    return found


def recover(target) -> None:
    """Clean up after a writer that was killed: put back an old folder a crash left renamed
    away (the target is missing), and delete the temporary folders of dead processes."""
    target = Path(target)
    for kind, pid, path in leftovers(target):
        if process_alive(pid):
            continue
        if kind == "old" and not os.path.lexists(target):
            os.rename(path, target)
            print(f"acf_fast: restored {target} from {path.name}, left by an interrupted "
                  "replacement", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def check_target(target, overwrite: bool, replaceable: Callable[[Path], bool], what: str,
                 overwrite_hint: str = "overwrite=True", clean: bool = True) -> Path:
    """Refuse a target that must not be replaced; the path to write (a symlink resolved).
    clean: first `recover` what a killed writer left next to it."""
    target = Path(target)
    if target.is_symlink():
        target = target.resolve()
    if clean:
        recover(target)
    if os.path.lexists(target) and not target.is_dir():
        raise ValueError(f"{target} is a file, not a folder: give a folder path for the {what}")
    if target.is_dir() and any(target.iterdir()):
        if not replaceable(target):
            raise ValueError(f"{target} is not empty and is not a {what}: refusing to replace it "
                             f"(even with {overwrite_hint}); choose a new or empty folder")
        if not overwrite:
            raise ValueError(f"{target} already holds a {what}; pass {overwrite_hint} to replace "
                             "it, or choose another folder")
    return target


@contextmanager
def atomic_folder(target, overwrite: bool = False, replaceable: Callable[[Path], bool] = lambda p: False,
                  what: str = "folder", overwrite_hint: str = "overwrite=True"):
    """Yield a temporary folder; when the block ends, it becomes `target` (see the module doc)."""
    target = check_target(target, overwrite, replaceable, what, overwrite_hint)
    target.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = target.parent / f".{target.name}.tmp-{token}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        _fault("written")
        check_target(target, overwrite, replaceable, what, overwrite_hint, clean=False)  # still?
        if not os.path.lexists(target):
            os.rename(tmp, target)
        elif _exchange(tmp, target):      # tmp now holds the old folder
            _fault("swapped")
        else:
            old = target.parent / f".{target.name}.old-{token}"
            os.rename(target, old)
            try:
                _fault("moved-old")
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)          # put the old one back at once
                raise
            _fault("swapped")
            shutil.rmtree(old, ignore_errors=True)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
