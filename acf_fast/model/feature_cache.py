"""One feature-cache entry: one file, keyed on the source's content, published by one rename.

Layout (version 3), all in `SOURCE.acf-cache-DTYPE.npy`:

    [NPY header][table rows][metadata JSON][JSON length: 8 bytes, little endian][b"ACFCACHE"]

The NPY part is an ordinary `.npy` file (numpy ignores the bytes after the table), so the
table is memory-mapped as it is. The metadata names the source's content key, so a reader
either sees a whole entry for a given source or none: the entry is written under a
per-process temporary name, fsynced and renamed into place once. Space for the whole file
is reserved first (posix_fallocate), and the rows are written with write(), never through a
memory map: a full disk is an ENOSPC error naming the folder and the size, not a SIGBUS.
Temporary files of conversions that were killed are removed by the next conversion that
writes into the same folder.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import re
import secrets
import shutil
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..utils import env
from ..utils.atomic_folder import fsync_dir, process_alive

VERSION = 3
MAGIC = b"ACFCACHE"
_TAIL = struct.Struct("<Q8s")
# Sources up to this size are keyed on a sha256 of all their bytes; larger ones on samples.
FULL_HASH_BYTES = 256 * 2**20
SAMPLES, SAMPLE_BYTES = 64, 64 * 2**10
# Caches up to this size are hashed on every load (a fraction of a second per 100 MB);
# larger ones are checked for their layout, and hashed when verify=True or ACF_FAST_VERIFY_CACHE=1.
VERIFY_LIMIT_BYTES = 2**30
# A temporary file is stale when its writer is dead (same machine and pid namespace) or,
# whoever wrote it, when nothing was written to it for this long (a live writer appends
# rows continuously).
STALE_TEMP_S = 24 * 3600
FAULT = None  # tests: FAULT(point, path) at "create", "row", "before_rename", "published"


def _fault(point: str, path: Path) -> None:
    if FAULT is not None:
        FAULT(point, path)


# ---------------------------------------------------------------------------- the key
def source_key(path: str | os.PathLike) -> str:
    """What an entry is keyed on: the source's content, not its size and mtime.

    Up to FULL_HASH_BYTES: sha256 of the whole file, so any change at all is caught.
    Larger (the tutorial's 13 GB .npy), reading it all on every load would take a minute:
    sha256 of the size, the mtime and SAMPLES blocks of SAMPLE_BYTES at evenly spaced
    offsets, first and last included (4 MiB read). That catches any rewrite with other
    features (re-extracted features differ in every block) even with the same size and
    mtime, and any edit that changes the size or the mtime. It misses an in-place edit of
    bytes between the sampled blocks whose writer also restored the mtime; after such an
    edit, load with use_cache=False or delete the cache. A `touch` of a large source
    rebuilds its cache.
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        if st.st_size <= max(FULL_HASH_BYTES, SAMPLES * SAMPLE_BYTES):
            while block := fh.read(16 * 2**20):
                h.update(block)
            return "sha256:" + h.hexdigest()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        step = (st.st_size - SAMPLE_BYTES) / (SAMPLES - 1)
        for i in range(SAMPLES):
            fh.seek(round(i * step))
            h.update(fh.read(SAMPLE_BYTES))
    return "sampled-sha256:" + h.hexdigest()


# ---------------------------------------------------------------------------- reading
@dataclass
class Entry:
    meta: dict
    offset: int            # where the table starts
    shape: tuple
    storage: np.dtype
    data_end: int          # where the table ends (the sha256 covers bytes [0, data_end))


def read_entry(dest: Path) -> Entry | None:
    """The entry at `dest`; None when there is none or it cannot be used (not an NPY file,
    a version-2 cache, unreadable metadata: rebuilt). A file cut short inside its table is
    refused: the disk lost data."""
    try:
        fh = open(dest, "rb")
    except FileNotFoundError:
        return None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        fmt = np.lib.format
        try:
            readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
            shape, fortran, storage = readers[fmt.read_magic(fh)](fh)
        except Exception:
            return None
        offset = fh.tell()
        data_end = offset + math.prod(shape) * storage.itemsize
        if size == data_end:  # a version-2 cache: the table alone, its metadata beside it
            return None
        if size < data_end + _TAIL.size:
            raise ValueError(f"{dest}: corrupt feature cache (truncated: {size} bytes, the table "
                             f"alone needs {data_end}); delete it to rebuild")
        fh.seek(size - _TAIL.size)
        length, magic = _TAIL.unpack(fh.read(_TAIL.size))
        if magic != MAGIC or data_end + length + _TAIL.size != size:
            return None
        fh.seek(data_end)
        try:
            meta = json.loads(fh.read(length))
        except ValueError:
            return None
    if (not isinstance(meta, dict) or meta.get("version") != VERSION or fortran
            or meta.get("shape") != list(shape) or meta.get("storage") != storage.str):
        return None
    return Entry(meta, offset, tuple(shape), storage, data_end)


def file_sha256(path: Path, end: int | None = None, chunk: int = 16 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        left = os.fstat(fh.fileno()).st_size if end is None else end
        while left > 0 and (block := fh.read(min(chunk, left))):
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def open_entry(dest: Path, entry: Entry, verify: bool | None) -> np.memmap:
    """The entry's table, memory-mapped read-only; its sha256 checked when `verify` is True,
    or by default for tables up to VERIFY_LIMIT_BYTES."""
    if verify is None:
        verify = entry.data_end <= VERIFY_LIMIT_BYTES or env.verify_every_cache()
    if verify and file_sha256(dest, entry.data_end) != entry.meta.get("sha256"):
        raise ValueError(f"{dest}: corrupt feature cache (checksum mismatch); delete it to rebuild")
    return np.memmap(dest, dtype=entry.storage, mode="r", offset=entry.offset, shape=entry.shape)


# ---------------------------------------------------------------------------- writing
def _where() -> str:
    """This machine's boot and pid namespace: a pid in a temporary name means something
    only where these match (another node, or another container, has its own pids)."""
    parts = [socket.gethostname()]
    for source in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(Path(source).read_text().strip() if "boot" in source else os.readlink(source))
        except OSError:
            parts.append("")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]


_WHERE = _where()
_TEMP = re.compile(r"^\..+\.acf-cache-\w+\.npy\.tmp-(?P<where>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}$")
_VERSION2_TEMP = re.compile(r"^.+\.acf-cache-\w+\.npy(\.tmp\d+|\.json\.tmp)$")


def temp_path(dest: Path) -> Path:
    """A name no other process uses: this machine, this pid, 32 random bits."""
    return dest.with_name(f".{dest.name}.tmp-{_WHERE}-{os.getpid()}-{secrets.token_hex(4)}")


def clean_stale_temps(folder: Path, now: float | None = None) -> list[str]:
    """Remove the temporary files of cache conversions that died in `folder`; their names."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for item in entries:
        ours = _TEMP.match(item.name)
        if ours is None and not _VERSION2_TEMP.match(item.name):
            continue
        try:
            age = now - item.stat(follow_symlinks=False).st_mtime
            dead = ours is not None and ours["where"] == _WHERE and not process_alive(int(ours["pid"]))
            if dead or age > STALE_TEMP_S:
                os.unlink(item.path)
                removed.append(item.name)
        except OSError:
            continue  # gone already, or not ours to remove
    return removed


def _human(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def no_space(folder: Path, size: int, what: str = "the feature cache") -> OSError:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    return OSError(errno.ENOSPC, f"no space for {what} in {folder}: it needs "
                                 f"{_human(size)} ({size} bytes), {_human(free)} free")


_FULL = (errno.ENOSPC, errno.EDQUOT)


def reserve(fd: int, size: int, folder: Path, what: str = "the feature cache") -> None:
    """Allocate the whole file before writing: a full disk fails here, at once."""
    if not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in _FULL:
            raise no_space(folder, size, what) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        # this file system cannot reserve: a full disk still fails write() with ENOSPC


def npy_header(storage: np.dtype, shape: tuple) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(storage),
                                               "fortran_order": False, "shape": shape})
    return out.getvalue()


def _trailer(meta: dict, sha256: str) -> bytes:
    text = json.dumps({**meta, "sha256": sha256}).encode()
    return text + _TAIL.pack(len(text), MAGIC)


def write_entry(dest: Path, shape: tuple, storage: np.dtype, rows, meta: dict,
                still_current=None) -> Path:
    """Write one entry at `dest`: row 0 zero, then `rows` ((first item row, C-contiguous
    array of `storage` [n, ...]) in order, item row r being table row r + 1).

    `still_current()` is asked before publishing (the source may have changed meanwhile).
    On any error, or an interruption, the temporary file is removed and `dest` is as it was.
    """
    storage = np.dtype(storage)
    folder = dest.parent
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(folder)  # before reserving: frees the space dead conversions held
    header = npy_header(storage, shape)
    row_bytes = math.prod(shape[1:]) * storage.itemsize
    data_end = len(header) + shape[0] * row_bytes
    meta = {**meta, "version": VERSION, "shape": list(shape), "storage": storage.str}
    size = data_end + len(_trailer(meta, "0" * 64))
    tmp = temp_path(dest)
    created = False
    try:
        _fault("create", tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        created = True
        with open(fd, "wb") as fh:
            reserve(fd, size, folder)
            h = hashlib.sha256()
            for chunk in (header, bytes(row_bytes)):
                h.update(chunk)
                fh.write(chunk)
            done = 1
            for first, block in rows:
                if first + 1 != done:
                    raise RuntimeError(f"feature rows out of order: {first} after {done - 1}")
                block = np.ascontiguousarray(block)
                if block.dtype != storage or block.shape[1:] != tuple(shape[1:]):
                    raise TypeError(f"feature rows of {block.dtype} {block.shape[1:]}, the "
                                    f"table holds {storage} {tuple(shape[1:])}")
                data = memoryview(block).cast("B")
                h.update(data)
                fh.write(data)
                done += len(block)
                _fault("row", tmp)
            if done != shape[0]:
                raise RuntimeError(f"{done} table rows written, {shape[0]} expected")
            fh.write(_trailer(meta, h.hexdigest()))
            fh.flush()
            os.fsync(fd)
        if still_current is not None and not still_current():
            raise ValueError(f"{meta.get('source')} changed while it was being converted; "
                             "run again")
        _fault("before_rename", tmp)
        os.replace(tmp, dest)
        _fault("published", dest)
    except BaseException as exc:
        if created:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if isinstance(exc, OSError) and exc.errno in _FULL and "feature cache" not in str(exc):
            raise no_space(folder, size) from None
        raise
    fsync_dir(folder)
    try:
        os.unlink(dest.with_suffix(".json"))  # a version-2 cache's metadata
    except OSError:
        pass
    return dest
