"""One training run per output folder at a time: an exclusive lock held for the run's life.

`claim_run_folder(out)` (what `train()` does first) checks that OUT is, or can become, a
writable folder, then takes an exclusive `flock` on OUT/.acf-fast-train.lock and writes
the holder into it (pid, host, start time, command). A second run into the same folder
is refused with one line naming that holder (`RunFolderInUse`), whatever stage the
first run is at. The kernel drops the lock when the holder exits, however it exits
(SIGKILL included), so a lock file left behind by a killed run never blocks the next
one; a run that ends normally removes the file, leaving only its checkpoints and
history. `Trainer.fit` takes the same lock (re-entrantly, so `train()` holding it
already costs nothing), so library runs are covered too.

Under torchrun only rank 0 (the rank that writes) holds the lock. Where the file system
refuses `flock` (an NFS mount without a lock daemon) the run goes ahead after one
notice; where Python has no `fcntl` (Windows) it goes ahead unlocked.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from ..utils.outputs import check_output_folder, remove_if_empty

try:
    import fcntl
except ImportError:          # Windows: no flock
    fcntl = None

LOCK_NAME = ".acf-fast-train.lock"
_CONTENDED = {errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK}
_HELD: dict[str, int | None] = {}   # lock files this process holds -> their descriptors


class RunFolderInUse(RuntimeError):
    """Another training run holds the output folder."""


def _holder_text(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "holder unknown: it has not written its pid yet"
    text = f"pid {info['pid']} on host {info.get('host', '?')}"
    if info.get("started"):
        text += f", started {info['started']}"
    if info.get("command"):
        text += f": {info['command']}"
    return text


def _command() -> str:
    program = os.path.basename(sys.argv[0] or "python")
    program = "python -m acf_fast" if program == "__main__.py" else program
    return " ".join([program] + sys.argv[1:])


def _acquire(folder: Path) -> int | None:
    """The locked file descriptor; None where this file system cannot lock."""
    path = folder / LOCK_NAME
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in _CONTENDED:
                os.close(fd)
                print(f"acf-fast: note: cannot lock {folder} ({exc.strerror}); nothing stops a "
                      "second run from writing into it", file=sys.stderr)
                return None
            holder = _holder_text(fd)
            os.close(fd)
            raise RunFolderInUse(
                f"{folder} is in use by another training run ({holder}); wait for it to end "
                "(or stop it), or train into another folder") from None
        try:       # the previous holder may have removed the file between open and flock
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": _command()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            return fd
        os.close(fd)
    raise RunFolderInUse(f"{folder} is in use by another training run (its lock keeps changing "
                         "hands); train into another folder")


def _release(folder: Path, fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.unlink(folder / LOCK_NAME)    # while still holding it: see the samestat check
    except OSError:
        pass
    os.close(fd)                         # closing drops the flock


@contextmanager
def run_lock(folder, enabled: bool = True):
    """Hold the folder's lock for the block (re-entrant within a process)."""
    folder = Path(folder)
    key = os.path.realpath(folder / LOCK_NAME)
    if not enabled or fcntl is None or key in _HELD:
        yield
        return
    fd = _acquire(folder)
    _HELD[key] = fd
    try:
        yield
    finally:
        _HELD.pop(key, None)
        _release(folder, fd)


@contextmanager
def claim_run_folder(out, is_main: bool = True):
    """Before anything is read or trained: OUT checked (a writable folder) and locked for
    the block. A folder this call created is removed again if the block leaves it empty."""
    out = Path(out)
    if not is_main:
        yield
        return
    created = check_output_folder(out, "output folder")
    try:
        with run_lock(out):
            yield
    finally:
        remove_if_empty(out, created)
