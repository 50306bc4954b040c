"""Reading the feature files' rows: the tutorial's `.npy` object array, a plain `.npy`
array, and the `.h5`, each as blocks of [n, M, F] float32 rows for `features` to convert.

Every reader holds a block at a time (CHUNK_BYTES of rows), never the whole table, except
the tutorial's object `.npy`, which is one pickle: it is read whole (with
`utils.safe_pickle.load_npy`, which runs nothing from the file) and each row dropped as
soon as it is copied.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..utils.safe_pickle import Refused, load_npy

GRID = 7
CHUNK_BYTES = 8 * 2**20  # rows read per step: bounded, whatever the table size


def grid_to_components(block: torch.Tensor, layout: str) -> torch.Tensor:
    """[n, F, 7, 7] ('channels_first'), [n, 7, 7, F] ('channels_last') or [n, M, F] -> [n, M, F]."""
    if layout == "channels_first":
        return block.flatten(2).transpose(1, 2)
    if layout == "channels_last":
        return block.flatten(1, 2)
    if layout == "components":
        return block
    raise ValueError(f"unknown feature layout {layout!r}")


def npy_blocks(arr, path, f):
    for i in range(arr.shape[0]):
        try:
            grid = np.asarray(arr[i, 1], dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: feature row {i} (item id {i + 1}) is not numeric "
                             f"({exc})") from None
        arr[i, 1] = None  # drop the source row as soon as it is copied: one copy at a time
        if grid.shape != (f, GRID, GRID):
            raise ValueError(f"{path}: feature row {i} (item id {i + 1}): expected an array of "
                             f"shape ({f}, 7, 7) like row 0, got {grid.shape}")
        yield i, grid_to_components(torch.from_numpy(grid)[None], "channels_first")


def load_npy_file(path: Path) -> np.ndarray:
    try:
        return load_npy(path, "feature file")
    except Refused:
        raise
    except Exception as exc:
        raise ValueError(f"{path}: not a readable .npy feature file ({exc})") from exc


def npy_layout(path: Path):
    """(shape, fortran_order, dtype, data offset) from a .npy header; ValueError if none."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as fh:
            readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
            shape, fortran, dtype = readers[fmt.read_magic(fh)](fh)
            return shape, fortran, dtype, fh.tell()
    except (ValueError, KeyError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable .npy feature file ({exc})") from None


def convert_npy(path: Path, dtype: torch.dtype, sink):
    shape, fortran, stored, offset = npy_layout(path)
    if stored != object:
        return convert_plain_npy(path, dtype, sink, shape, fortran, stored, offset)
    arr = load_npy_file(path)
    if arr.dtype != object or arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{path}: expected the tutorial's object array of shape (N, 2) "
                         f"[name, array(F, 7, 7)], got dtype {arr.dtype} shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{path}: feature file has no items")
    first = np.asarray(arr[0, 1])
    if first.ndim != 3 or first.shape[1:] != (GRID, GRID):
        raise ValueError(f"{path}: expected feature arrays of shape (F, 7, 7), got {first.shape}")
    names = [str(x) for x in arr[:, 0]]
    meta = source_meta(path, names)
    return sink(dtype, arr.shape[0], GRID * GRID, first.shape[0], npy_blocks(arr, path, first.shape[0]), meta)


def plain_npy_names(path: Path, n: int) -> list[str]:
    """A plain .npy's item names: `STEM.names.txt` beside it (one a line, as `synth` writes),
    else the row numbers."""
    names_path = path.with_name(f"{path.stem}.names.txt")
    if not names_path.is_file():
        return [str(i) for i in range(n)]
    names = names_path.read_text().splitlines()
    if len(names) != n:
        raise ValueError(f"{names_path} lists {len(names)} names for the {n} items of {path}; "
                         "write it again (or delete it to name items by their row)")
    return names


def convert_plain_npy(path: Path, dtype: torch.dtype, sink, shape, fortran, stored, offset):
    """A plain float array (N, F, 7, 7), read CHUNK_BYTES at a time with file reads (no
    memory map: the whole table is never resident)."""
    if stored.kind != "f" or len(shape) != 4 or tuple(shape[2:]) != (GRID, GRID) or fortran:
        raise ValueError(f"{path}: expected the tutorial's object array (N, 2) or a C-ordered "
                         f"float array (N, F, 7, 7), got dtype {stored} shape {shape}"
                         + (" in Fortran order" if fortran else ""))
    n, f = shape[0], shape[1]
    if n == 0:
        raise ValueError(f"{path}: feature file has no items")
    row = f * GRID * GRID
    if path.stat().st_size < offset + n * row * stored.itemsize:
        raise ValueError(f"{path}: truncated .npy feature file (its header says {shape} "
                         f"{stored}); write it again")
    chunk = max(1, CHUNK_BYTES // (4 * row))
    meta = source_meta(path, plain_npy_names(path, n))

    def blocks():
        with open(path, "rb") as fh:
            fh.seek(offset)
            for s in range(0, n, chunk):
                k = min(chunk, n - s)
                block = np.fromfile(fh, dtype=stored, count=k * row).astype(np.float32, copy=False)
                yield s, grid_to_components(torch.from_numpy(block.reshape(k, f, GRID, GRID)),
                                            "channels_first")

    return sink(dtype, n, GRID * GRID, f, blocks(), meta)


def h5_names(fh, n: int) -> list[str]:
    if "image_filenames" not in fh:
        return [str(i) for i in range(n)]
    return [x.decode() if isinstance(x, bytes) else str(x) for x in fh["image_filenames"][:]]


def convert_h5(path: Path, dtype: torch.dtype, sink):
    import h5py

    try:
        fh = h5py.File(path, "r")
    except Exception as exc:
        raise ValueError(f"{path}: not a readable HDF5 feature file ({exc})") from exc
    with fh:
        if "resnet50/layer4" not in fh:
            raise ValueError(f"{path}: missing dataset 'resnet50/layer4' (expected shape (N, F, 7, 7))")
        ds = fh["resnet50/layer4"]
        if ds.ndim != 4 or ds.shape[2:] != (GRID, GRID):
            raise ValueError(f"{path}: 'resnet50/layer4' must have shape (N, F, 7, 7), got {ds.shape}")
        n = ds.shape[0]
        meta = source_meta(path, h5_names(fh, n))
        chunk = max(1, CHUNK_BYTES // (4 * ds.shape[1] * GRID * GRID))

        def blocks():
            for s in range(0, n, chunk):
                block = torch.from_numpy(np.asarray(ds[s:s + chunk], dtype=np.float32))
                yield s, grid_to_components(block, "channels_first")

        return sink(dtype, n, GRID * GRID, ds.shape[1], blocks(), meta)


def source_meta(path: Path, names) -> dict:
    """What a cache entry records of its source (features adds the dtype)."""
    return {"source": str(path), "source_size": path.stat().st_size, "names": names}


def source_names(path: Path) -> list[str]:
    if path.suffix.lower() == ".npy":
        shape, _, stored, _ = npy_layout(path)
        if stored != object:
            return plain_npy_names(path, shape[0])
        return [str(x) for x in load_npy_file(path)[:, 0]]
    import h5py

    with h5py.File(path, "r") as fh:
        return h5_names(fh, fh["resnet50/layer4"].shape[0])
