"""Small disks for the fault tests: a tmpfs of a chosen size, filled up or made read-only.

Mounting needs root (CAP_SYS_ADMIN): elsewhere the tests that use these skip. Every
mount is undone in a `finally`, whatever the test does.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest


def can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None


needs_root = pytest.mark.skipif(not can_mount(), reason="mounting a tmpfs needs root")


def _run(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"{' '.join(cmd)} failed: {done.stderr.strip()}")


@contextmanager
def tmpfs(folder: Path, size: str = "1m"):
    """`folder` as a fresh tmpfs of `size` bytes (k/m suffixes) for the block."""
    folder.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
    try:
        yield folder
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(folder)], capture_output=True)
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def make_read_only(folder: Path) -> None:
    _run("mount", "-o", "remount,ro", str(folder))


def fill(folder: Path) -> Path:
    """Write a filler file into `folder` until its disk is full; returns the filler."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as fh:   # unbuffered: nothing left to flush on close
        chunk = b"\0" * 4096
        try:
            while True:
                fh.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler
