"""`synth`'s feature files, written a block of items at a time, in the formats asked for.

    features.h5          image_filenames, resnet50/layer4 float32 (N, F, 7, 7)  (the tutorial's)
    features.npy         float32 (N, F, 7, 7), a plain array (no pickle)
    features.names.txt   the item names of features.npy, one a line

At the Wikimedia sizes one file is 13.2 GB, so no step may hold the table: each block is
written as soon as it is generated. The .npy gets its header and then its rows with write()
into a file whose whole size was reserved first, not through np.lib.format.open_memmap:
a full disk would make a write through a memory map a SIGBUS, here it is one ENOSPC error
naming the folder and the size. The .h5's dataset is chunked in whole write blocks, so no
HDF5 chunk is written twice. Every file goes to a temporary name in the same folder
(`.features.h5.tmp-PID`) and is renamed into place only once it is complete and fsynced:
a crash or a full disk leaves the previous file, or none, under the final name, and the
next `synth` into the folder removes the temporaries of writers that are no longer alive.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np

from ..model.feature_cache import no_space, npy_header, reserve
from ..utils.atomic_folder import fsync_dir, process_alive

GRID = 7
FORMATS = ("h5", "npy")
FILES = {"h5": "features.h5", "npy": "features.npy"}
NAMES_FILE = "features.names.txt"        # beside features.npy: its item names
WRITE_BYTES = 4 * 2**20                  # float32 bytes of one write (and one .h5 chunk), at most
MAX_WRITE_ITEMS = 512                    # ... and items; a power of two, see rows_per_write
_TEMP = re.compile(r"^\.(features\.h5|features\.npy|features\.names\.txt)\.tmp-(\d+)$")


def parse_formats(value) -> tuple[str, ...]:
    """'h5', 'npy', 'h5,npy' or a sequence of those -> the formats, in FORMATS order."""
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [str(v).strip().lower().lstrip(".") for v in items if str(v).strip()]
    unknown = [v for v in items if v not in FORMATS]
    if unknown or not items:
        raise ValueError(f"feature formats must be one or more of {', '.join(FORMATS)} "
                         f"(comma-separated), got {value!r}")
    return tuple(f for f in FORMATS if f in items)


def rows_per_write(dim: int) -> int:
    """Items per write: the largest power of two up to MAX_WRITE_ITEMS whose float32 rows fit
    WRITE_BYTES (at least 1). A power of two divides the generator's 512-item blocks, so
    writes, and the .h5 chunks they fill, never straddle a block."""
    row = dim * GRID * GRID * 4
    n = 1
    while n * 2 <= MAX_WRITE_ITEMS and n * 2 * row <= WRITE_BYTES:
        n *= 2
    return n


def clean_stale(folder: Path) -> None:
    """Remove the temporary feature files of `synth` runs that died in `folder` (13 GB each
    at the real scale)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m and int(m.group(2)) != os.getpid() and not process_alive(int(m.group(2))):
            try:
                os.unlink(entry.path)
            except OSError:
                pass


def table_bytes(n_items: int, dim: int) -> int:
    return n_items * dim * GRID * GRID * 4


def check_space(folder: Path, n_items: int, dim: int, formats) -> None:
    """Refuse at once, before minutes of work, a folder without room for the files asked for."""
    need = table_bytes(n_items, dim) * len(formats)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if need > free:
        raise no_space(folder, need, f"the feature files ({', '.join(FILES[f] for f in formats)})")


def _temp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FeatureFiles:
    """`with FeatureFiles(folder, names, dim, formats) as files: files.write(first, block)`;
    the files are published when the block ends without an exception (`paths`), and their
    temporaries removed when it ends with one."""

    def __init__(self, folder, names, dim: int, formats):
        self.folder, self.names, self.dim = Path(folder), list(names), int(dim)
        self.formats = parse_formats(formats)
        self.n = len(self.names)
        self.shape = (self.n, self.dim, GRID, GRID)
        self.temps: dict[Path, Path] = {}       # final path -> temporary path
        self.paths: dict[str, Path] = {}        # format -> published path
        self._npy = self._h5 = None
        self._done = 0

    def __enter__(self) -> "FeatureFiles":
        try:
            if "npy" in self.formats:
                self._open_npy()
            if "h5" in self.formats:
                self._open_h5()
        except BaseException:
            self._abort()
            raise
        return self

    def _open_npy(self) -> None:
        final = self.folder / FILES["npy"]
        tmp = self.temps[final] = _temp(final)
        header = npy_header(np.dtype(np.float32), self.shape)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._npy = open(fd, "wb")
        reserve(fd, len(header) + table_bytes(self.n, self.dim), self.folder,
                f"the synthetic features ({final.name})")
        self._npy.write(header)

    def _open_h5(self) -> None:
        import h5py

        final = self.folder / FILES["h5"]
        tmp = self.temps[final] = _temp(final)
        self._h5 = h5py.File(tmp, "w")
        self._h5.create_dataset("image_filenames", data=np.array(self.names, dtype="S"))
        rows = min(rows_per_write(self.dim), self.n)
        self._h5.create_dataset("resnet50/layer4", shape=self.shape, dtype=np.float32,
                                chunks=(rows, *self.shape[1:]))

    def write(self, first: int, block: np.ndarray) -> None:
        """Items first .. first + len(block) - 1: float32 [b, F, 7, 7], in order."""
        if first != self._done or block.shape[1:] != self.shape[1:] or block.dtype != np.float32:
            raise RuntimeError(f"feature block {first} {block.dtype} {block.shape} after "
                               f"{self._done} items of {self.shape}")
        if self._npy is not None:
            self._npy.write(memoryview(np.ascontiguousarray(block)).cast("B"))
        if self._h5 is not None:
            self._h5["resnet50/layer4"][first:first + len(block)] = block
        self._done += len(block)

    def _close(self) -> None:
        for fh in (self._npy, self._h5):
            if fh is not None:
                fh.close()
        self._npy = self._h5 = None

    def _abort(self) -> None:
        try:
            self._close()
        finally:
            for tmp in self.temps.values():
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            if self._done != self.n:
                raise RuntimeError(f"{self._done} feature rows written, {self.n} expected")
            self._close()
            if "npy" in self.formats:     # names first: a published .npy always has its names
                names = self.folder / NAMES_FILE
                self.temps[names] = _temp(names)
                self.temps[names].write_text("".join(f"{name}\n" for name in self.names))
            order = sorted(self.temps.items(), key=lambda kv: kv[0].name != NAMES_FILE)
            for final, tmp in order:
                _fsync(tmp)
            for final, tmp in order:
                os.replace(tmp, final)
            fsync_dir(self.folder)
        except BaseException:
            self._abort()
            raise
        self.paths = {f: self.folder / FILES[f] for f in self.formats}

    def remove_others(self) -> list[Path]:
        """Delete the feature files of the formats *not* written this time, left by an earlier
        synth into the folder: they describe other data and would be read as this one's."""
        stale = [self.folder / FILES[f] for f in FORMATS if f not in self.formats]
        if "npy" not in self.formats:
            stale.append(self.folder / NAMES_FILE)
        removed = []
        for path in stale:
            if path.is_file():
                path.unlink()
                removed.append(path)
        return removed
