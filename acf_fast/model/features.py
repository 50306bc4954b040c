"""Feature store: the tutorial's `.npy` / `.h5` ResNet50 layer4 grids as one table.

The table is [N+1, M, F] (M = 49 grid cells, row h*7+w; F = 2048 channels) with an
all-zero row 0 for padding, so item id i reads row i. Converting the tutorial's
files is slow and memory hungry, so it happens once into a memory-mappable `.npy`
cache next to the source, written to a temporary file and renamed (a crash never
leaves a half-written cache that looks valid). Later loads map the cache. Where the
source's folder cannot be written (a shared, read-only dataset), the cache goes to a
user folder ($ACF_FAST_CACHE_DIR, else $XDG_CACHE_HOME/acf_fast/features, else
~/.cache/acf_fast/features); where that fails too, the table is read into memory.
Either fallback prints a one-line notice.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..utils import env

GRID = 7
SUPPORTED_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# numpy has no bfloat16: its bits are stored as uint16 and viewed back in torch.
_NP_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
CACHE_VERSION = 2
CACHE_DIR = "ACF_FAST_CACHE_DIR"  # where caches of read-only feature folders go
# a folder the cache cannot be written to: read-only, not ours, or full
_UNWRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"feature_dtype must be one of {list(SUPPORTED_DTYPES)}, got {dtype}")
    return SUPPORTED_DTYPES[dtype]


def cache_path(source: str | os.PathLike, dtype: torch.dtype) -> Path:
    """The cache's first choice: next to the source."""
    source = Path(source)
    return source.with_name(f"{source.name}.acf-cache-{_dtype_name(dtype)}.npy")


def user_cache_dir() -> Path:
    """$ACF_FAST_CACHE_DIR, else $XDG_CACHE_HOME/acf_fast/features, else ~/.cache/..."""
    explicit = env.text(CACHE_DIR)
    if explicit:
        return Path(explicit).expanduser()
    base = env.text("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "acf_fast" / "features"


def user_cache_path(source: str | os.PathLike, dtype: torch.dtype) -> Path:
    """The cache's second choice, for sources in folders that cannot be written: in the
    user cache folder, named after the source's absolute path (two datasets' `features.npy`
    never share a cache)."""
    source = Path(source).resolve()
    key = hashlib.sha256(str(source).encode()).hexdigest()[:16]
    return user_cache_dir() / f"{key}-{cache_path(source, dtype).name}"


def existing_cache(source: str | os.PathLike, dtype: torch.dtype) -> Path | None:
    """Where the current cache of `source` is (next to it or in the user folder), if any."""
    for dest in (cache_path(source, dtype), user_cache_path(source, dtype)):
        if _cache_is_current(Path(source), dest, dtype):
            return dest
    return None


@lru_cache(maxsize=None)
def _notice(message: str) -> None:
    print(f"acf_fast: {message}", file=sys.stderr)


def _check_finite(block: torch.Tensor, first_item_row: int, source) -> None:
    bad = ~torch.isfinite(block).flatten(1).all(dim=1)
    if bad.any():
        row = first_item_row + int(bad.nonzero()[0, 0])
        raise ValueError(f"{source}: features of item row {row} (item id {row + 1}) "
                         "contain NaN or inf")


def _convert_checked(block: torch.Tensor, dtype: torch.dtype, first_item_row: int, source):
    """block.to(dtype), refusing values that overflow it (float16 tops out at 65504):
    an inf in the table would make every score that touches the item NaN."""
    out = block.to(dtype)
    if torch.finfo(dtype).max >= torch.finfo(block.dtype).max:
        return out  # cannot overflow (the block itself was checked finite): no second pass
    bad = ~torch.isfinite(out).flatten(1).all(dim=1)
    if bad.any():
        row = first_item_row + int(bad.nonzero()[0, 0])
        limit = torch.finfo(dtype).max
        raise ValueError(f"{source}: features of item row {row} (item id {row + 1}) exceed the "
                         f"{_dtype_name(dtype)} range (|x| <= {limit:.6g}); choose float32 or "
                         "bfloat16 features, or rescale them")
    return out


def grid_to_components(block: torch.Tensor, layout: str) -> torch.Tensor:
    """[n, F, 7, 7] ('channels_first'), [n, 7, 7, F] ('channels_last') or [n, M, F] -> [n, M, F]."""
    if layout == "channels_first":
        return block.flatten(2).transpose(1, 2)
    if layout == "channels_last":
        return block.flatten(1, 2)
    if layout == "components":
        return block
    raise ValueError(f"unknown feature layout {layout!r}")


def infer_layout(shape) -> str:
    """Which of the accepted in-memory layouts a [N, ...] feature tensor has."""
    if len(shape) == 3:
        return "components"
    if len(shape) == 4 and tuple(shape[2:]) == (GRID, GRID):
        return "channels_first"
    if len(shape) == 4 and tuple(shape[1:3]) == (GRID, GRID):
        return "channels_last"
    raise ValueError(f"features must have shape [N, 7, 7, F], [N, F, 7, 7] or [N, M, F]; got {tuple(shape)}")


def table_from_tensor(features: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An in-memory feature tensor (one row per item id 1..N) -> [N+1, M, F] with a zero row 0."""
    if not isinstance(features, torch.Tensor):
        features = torch.as_tensor(np.asarray(features))
    if not features.is_floating_point():
        raise TypeError(f"features must be a floating-point tensor, got {features.dtype}")
    comps = grid_to_components(features, infer_layout(features.shape))
    if comps.shape[0] == 0:
        raise ValueError("features has no items (shape "
                         f"{tuple(features.shape)}); expected one row per item id 1..N")
    dtype = dtype or (features.dtype if features.dtype in SUPPORTED_DTYPES else torch.float32)
    if dtype != torch.float64:
        _dtype_name(dtype)
    _check_finite(comps, 0, "features")
    table = comps.new_zeros((comps.shape[0] + 1, *comps.shape[1:]), dtype=dtype)
    table[1:] = _convert_checked(comps, dtype, 0, "features")
    return table


def _fill(view: torch.Tensor, blocks, dtype: torch.dtype, source) -> None:
    """blocks yields (first_row, float32 tensor [n, M, F]); written into rows 1.. of view."""
    for first, block in blocks:
        _check_finite(block, first, source)
        view[1 + first: 1 + first + block.shape[0]] = _convert_checked(block, dtype, first, source)


def _memory_table(dtype: torch.dtype, n_items: int, m: int, f: int, blocks, meta) -> torch.Tensor:
    """The table in memory, for a source whose cache cannot be written anywhere."""
    table = torch.zeros((n_items + 1, m, f), dtype=dtype)
    _fill(table, blocks, dtype, meta["source"])
    return table


def _write_cache(dest: Path, dtype: torch.dtype, n_items: int, m: int, f: int, blocks, meta) -> Path:
    """The table into the cache file `dest` (and its .json), atomically."""
    name = _dtype_name(dtype)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=_NP_STORAGE[name],
                                        shape=(n_items + 1, m, f))
        out[0] = 0
        view = torch.from_numpy(out)
        if name == "bfloat16":
            view = view.view(torch.bfloat16)
        _fill(view, blocks, dtype, meta["source"])
        out.flush()
        del out, view
        meta = {**meta, "cache_bytes": tmp.stat().st_size, "sha256": _file_sha256(tmp)}
        with open(tmp.with_suffix(".json.tmp"), "w") as fh:
            json.dump(meta, fh)
        os.replace(tmp.with_suffix(".json.tmp"), dest.with_suffix(".json"))
        os.replace(tmp, dest)
    finally:
        for leftover in (tmp, tmp.with_suffix(".json.tmp")):
            if leftover.exists():
                leftover.unlink()
    return dest


def _npy_blocks(arr, path, f):
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


def _convert_npy(path: Path, dtype: torch.dtype, sink):
    try:
        arr = np.load(path, allow_pickle=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable .npy feature file ({exc})") from exc
    if arr.dtype != object or arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{path}: expected the tutorial's object array of shape (N, 2) "
                         f"[name, array(F, 7, 7)], got dtype {arr.dtype} shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{path}: feature file has no items")
    first = np.asarray(arr[0, 1])
    if first.ndim != 3 or first.shape[1:] != (GRID, GRID):
        raise ValueError(f"{path}: expected feature arrays of shape (F, 7, 7), got {first.shape}")
    names = [str(x) for x in arr[:, 0]]
    meta = _meta(path, dtype, names)
    return sink(dtype, arr.shape[0], GRID * GRID, first.shape[0], _npy_blocks(arr, path, first.shape[0]), meta)


CHUNK_BYTES = 8 * 2**20  # .h5 rows read per step: bounded, whatever the table size


def _h5_names(fh, n: int) -> list[str]:
    if "image_filenames" not in fh:
        return [str(i) for i in range(n)]
    return [x.decode() if isinstance(x, bytes) else str(x) for x in fh["image_filenames"][:]]


def _convert_h5(path: Path, dtype: torch.dtype, sink):
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
        meta = _meta(path, dtype, _h5_names(fh, n))
        chunk = max(1, CHUNK_BYTES // (4 * ds.shape[1] * GRID * GRID))

        def blocks():
            for s in range(0, n, chunk):
                block = torch.from_numpy(np.asarray(ds[s:s + chunk], dtype=np.float32))
                yield s, grid_to_components(block, "channels_first")

        return sink(dtype, n, GRID * GRID, ds.shape[1], blocks(), meta)


def _meta(path: Path, dtype: torch.dtype, names) -> dict:
    st = path.stat()
    return {"version": CACHE_VERSION, "source": str(path), "source_size": st.st_size,
            "source_mtime_ns": st.st_mtime_ns, "dtype": _dtype_name(dtype), "names": names}


def _cache_is_current(path: Path, dest: Path, dtype: torch.dtype) -> bool:
    meta_path = dest.with_suffix(".json")
    if not dest.exists() or not meta_path.exists():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    st = path.stat()
    return (meta.get("version") == CACHE_VERSION and meta.get("dtype") == _dtype_name(dtype)
            and meta.get("source_size") == st.st_size
            and meta.get("source_mtime_ns") == st.st_mtime_ns)


def _file_sha256(path: Path, chunk: int = 16 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# Caches up to this size are hashed on every load (a fraction of a second per 100 MB);
# larger ones are checked for size, and hashed when verify=True or ACF_FAST_VERIFY_CACHE=1.
VERIFY_LIMIT_BYTES = 2**30


def _verify_cache(dest: Path, meta: dict, verify: bool | None) -> None:
    size = dest.stat().st_size
    if size != meta.get("cache_bytes"):
        raise ValueError(f"{dest}: corrupt feature cache (truncated: {size} bytes, expected "
                         f"{meta.get('cache_bytes')}); delete it to rebuild")
    if verify is None:
        verify = size <= VERIFY_LIMIT_BYTES or env.verify_every_cache()
    if verify and _file_sha256(dest) != meta.get("sha256"):
        raise ValueError(f"{dest}: corrupt feature cache (checksum mismatch); delete it to rebuild")


def _open_cache(dest: Path, dtype: torch.dtype, verify: bool | None = None) -> torch.Tensor:
    name = _dtype_name(dtype)
    try:
        meta = json.loads(dest.with_suffix(".json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{dest}: feature cache has no readable metadata ({exc}); "
                         "delete it to rebuild") from exc
    _verify_cache(dest, meta, verify)
    try:
        arr = np.load(dest, mmap_mode="r")
    except Exception as exc:
        raise ValueError(f"{dest}: corrupt feature cache ({exc}); delete it to rebuild") from exc
    if arr.dtype != _NP_STORAGE[name] or arr.ndim != 3:
        raise ValueError(f"{dest}: corrupt feature cache (dtype {arr.dtype}, shape {arr.shape}); "
                         "delete it to rebuild")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only mapping; we never write to it
        table = torch.from_numpy(arr)
    return table.view(torch.bfloat16) if name == "bfloat16" else table


def _converter(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _convert_npy
    if suffix in (".h5", ".hdf5"):
        return _convert_h5
    raise ValueError(f"{path}: unknown feature format {suffix!r}; expected .npy or .h5")


def _build_cache(path: Path, dtype: torch.dtype, convert) -> Path | None:
    """Convert `path` into its cache: next to it, else in the user cache folder. None when
    neither can be written (an error of the source itself is raised as it is)."""
    tried = []
    for dest in (cache_path(path, dtype), user_cache_path(path, dtype)):
        folder = next((p for p in dest.parents if p.exists()), dest.parent)
        if not os.access(folder, os.W_OK):   # read-only mount or not ours: skip the conversion
            tried.append(f"{dest.parent}: not writable")
            continue
        try:
            convert(path, dtype, lambda *args, dest=dest: _write_cache(dest, *args))
        except OSError as exc:
            if exc.errno not in _UNWRITABLE:
                raise
            tried.append(f"{dest.parent}: {exc.strerror}")
            continue
        if tried:
            _notice(f"feature cache of {path} written to {dest} ({tried[0]}; "
                    f"set {CACHE_DIR} to choose the folder)")
        return dest
    _notice(f"feature cache of {path} cannot be written ({'; '.join(tried)}); reading the "
            f"features into memory (set {CACHE_DIR} to a writable folder to cache them)")
    return None


def load_feature_table(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                       use_cache: bool = True, verify: bool | None = None) -> torch.Tensor:
    """Read a tutorial feature file (.npy object array or .h5) as a [N+1, M, F] table.

    The result is memory-mapped from the cache file (read-only); `.to(device)` copies it.
    The cache is next to the source, or in `user_cache_dir()` when the source's folder
    cannot be written; use_cache=False rebuilds it. A truncated cache is always refused;
    its checksum is verified when `verify` is True, or by default for caches up to
    VERIFY_LIMIT_BYTES.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"feature file not found: {path}")
    _dtype_name(dtype)
    dest = existing_cache(path, dtype) if use_cache else None
    if dest is None:
        convert = _converter(path)
        dest = _build_cache(path, dtype, convert)
        if dest is None:
            return convert(path, dtype, _memory_table)
    return _open_cache(dest, dtype, verify)


def _source_names(path: Path) -> list[str]:
    if path.suffix.lower() == ".npy":
        return [str(x) for x in np.load(path, allow_pickle=True)[:, 0]]
    import h5py

    with h5py.File(path, "r") as fh:
        return _h5_names(fh, fh["resnet50/layer4"].shape[0])


def feature_names(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> list[str]:
    """Item names (file names) stored with a feature file's cache, row i-1 for item id i
    (read from the source itself when it has no cache)."""
    dest = existing_cache(path, dtype)
    if dest is None:
        return _source_names(Path(path))
    return json.loads(dest.with_suffix(".json").read_text())["names"]
