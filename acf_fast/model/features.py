"""Feature store: the tutorial's `.npy` / `.h5` ResNet50 layer4 grids as one table.

Sources (read by `feature_sources`): the tutorial's `.npy` object array [name, (F, 7, 7)],
a plain float `.npy` array (N, F, 7, 7) (names in `STEM.names.txt` beside it, as `synth`
writes), and the `.h5` (`resnet50/layer4`, `image_filenames`).

The table is [N+1, M, F] (M = 49 grid cells, row h*7+w; F = 2048 channels) with an
all-zero row 0 for padding, so item id i reads row i. Converting the tutorial's
files is slow and memory hungry, so it happens once into a memory-mappable cache entry
next to the source: one file, keyed on the source's content and published with one
rename (`feature_cache`). Later loads map the cache. The `.npy` object array is read
with `utils.safe_pickle.load_npy`, which runs nothing from the file. Where the
source's folder cannot be written (a shared, read-only dataset), the cache goes to a
user folder ($ACF_FAST_CACHE_DIR, else $XDG_CACHE_HOME/acf_fast/features, else
~/.cache/acf_fast/features); where that fails too, the table is read into memory.
Either fallback prints a one-line notice.
"""

from __future__ import annotations

import errno
import hashlib
import os
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..utils import env
from ..utils.progress import bar as tqdm
from . import feature_cache as fc
from .feature_sources import convert_h5 as _convert_h5
from .feature_sources import convert_npy as _convert_npy
from .feature_sources import grid_to_components, source_names

__all__ = ["cache_path", "feature_names", "grid_to_components", "infer_layout", "load_feature_table",
           "table_from_tensor", "user_cache_dir"]

GRID = 7
SUPPORTED_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# numpy has no bfloat16: its bits are stored as uint16 and viewed back in torch.
_NP_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
CACHE_VERSION = fc.VERSION
CACHE_DIR = "ACF_FAST_CACHE_DIR"  # where caches of read-only feature folders go
PROGRESS_BYTES = 256 * 2**20      # sources from this size (as float32) show a bar while converted
# a folder the cache cannot be written to: read-only or not ours; or full
_UNWRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
_FULL = {errno.ENOSPC, errno.EDQUOT}


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


def existing_cache(source: str | os.PathLike, dtype: torch.dtype, key: str | None = None) -> Path | None:
    """Where the current cache of `source` is (next to it or in the user folder), if any.
    `key`: the source's `feature_cache.source_key`, when the caller has it already."""
    key = fc.source_key(source) if key is None else key
    for dest in (cache_path(source, dtype), user_cache_path(source, dtype)):
        entry = fc.read_entry(dest)
        if entry is not None and entry.meta.get("source_key") == key \
                and entry.meta.get("dtype") == _dtype_name(dtype):
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


def _converted(blocks, dtype: torch.dtype, source):
    """blocks yields (first item row, float32 tensor [n, M, F]); checked and converted."""
    for first, block in blocks:
        _check_finite(block, first, source)
        yield first, _convert_checked(block, dtype, first, source)


def _memory_table(dtype: torch.dtype, n_items: int, m: int, f: int, blocks, meta) -> torch.Tensor:
    """The table in memory, for a source whose cache cannot be written anywhere."""
    table = torch.zeros((n_items + 1, m, f), dtype=dtype)
    for first, block in _converted(blocks, dtype, meta["source"]):
        table[1 + first: 1 + first + block.shape[0]] = block
    return table


def _write_cache(dest: Path, key: str, dtype: torch.dtype, n_items: int, m: int, f: int, blocks,
                 meta) -> Path:
    """The table as one cache entry at `dest` (feature_cache.write_entry), keyed on `key`."""
    name = _dtype_name(dtype)
    source = Path(meta["source"])

    # converting the real 13 GB source takes minutes: say so (small tables stay quiet)
    quiet = n_items * m * f * 4 < PROGRESS_BYTES

    def rows():
        with tqdm(total=n_items, desc=f"feature cache ({name}) of {source.name}", unit="item",
                  disable=quiet, leave=False) as bar:
            for first, block in _converted(blocks, dtype, source):
                if name == "bfloat16":   # its bits, stored as uint16
                    yield first, block.contiguous().view(torch.int16).numpy().view(np.uint16)
                else:
                    yield first, block.contiguous().numpy()
                bar.update(len(block))

    return fc.write_entry(dest, (n_items + 1, m, f), np.dtype(_NP_STORAGE[name]), rows(),
                          {**meta, "dtype": name, "source_key": key},
                          still_current=lambda: fc.source_key(source) == key)


def _open_cache(dest: Path, dtype: torch.dtype, verify: bool | None = None) -> torch.Tensor:
    name = _dtype_name(dtype)
    entry = fc.read_entry(dest)
    if entry is None:
        raise ValueError(f"{dest}: feature cache has no readable metadata; delete it to rebuild")
    arr = fc.open_entry(dest, entry, verify)
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


def _build_cache(path: Path, dtype: torch.dtype, convert, key: str) -> Path | None:
    """Convert `path` into its cache: next to it, else in the user cache folder. None when
    neither can be written; OSError(ENOSPC) when one could but none had room for it (an
    error of the source itself is raised as it is)."""
    tried, full = [], []
    for dest in (cache_path(path, dtype), user_cache_path(path, dtype)):
        folder = next((p for p in dest.parents if p.exists()), dest.parent)
        if not os.access(folder, os.W_OK):   # read-only mount or not ours: skip the conversion
            tried.append(f"{dest.parent}: not writable")
            continue
        try:
            convert(path, dtype, lambda *args, dest=dest: _write_cache(dest, key, *args))
        except OSError as exc:
            if exc.errno not in _UNWRITABLE | _FULL:
                raise
            if exc.errno in _FULL:   # feature_cache names the folder and the size needed
                full.append(exc.strerror)
            tried.append(full[-1] if exc.errno in _FULL else f"{dest.parent}: {exc.strerror}")
            continue
        if tried:
            _notice(f"feature cache of {path} written to {dest} ({tried[0]}; "
                    f"set {CACHE_DIR} to choose the folder)")
        return dest
    if full:
        raise OSError(errno.ENOSPC, f"{'; '.join(full)}; free space there or set {CACHE_DIR} to a "
                                    "folder with room")
    _notice(f"feature cache of {path} cannot be written ({'; '.join(tried)}); reading the "
            f"features into memory (set {CACHE_DIR} to a writable folder to cache them)")
    return None


def load_feature_table(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                       use_cache: bool = True, verify: bool | None = None) -> torch.Tensor:
    """Read a tutorial feature file (.npy object array or .h5) as a [N+1, M, F] table.

    The result is memory-mapped from the cache file (read-only); `.to(device)` copies it.
    The cache is next to the source, or in `user_cache_dir()` when the source's folder
    cannot be written; it is used when it was made from the same content
    (`feature_cache.source_key`); use_cache=False rebuilds it. A truncated cache is always
    refused; its checksum is verified when `verify` is True, or by default for caches up
    to feature_cache.VERIFY_LIMIT_BYTES (1 GiB).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"feature file not found: {path}")
    _dtype_name(dtype)
    convert = _converter(path)
    key = fc.source_key(path)
    dest = existing_cache(path, dtype, key) if use_cache else None
    if dest is None:
        dest = _build_cache(path, dtype, convert, key)
        if dest is None:
            return convert(path, dtype, _memory_table)
    return _open_cache(dest, dtype, verify)


def feature_count(path: str | os.PathLike) -> int:
    """Items in a feature file, its layout checked (format, shape, names), without reading
    its rows or building a cache: the cache is built by the step that uses the table, in
    the dtype it uses (a bf16 workflow never writes the float32 one)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"feature file not found: {path}")
    return _converter(path)(path, torch.float32, lambda dtype, n, m, f, blocks, meta: n)


def feature_names(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> list[str]:
    """Item names (file names) stored with a feature file's cache, row i-1 for item id i
    (read from the source itself when it has no cache)."""
    dest = existing_cache(path, dtype)
    entry = None if dest is None else fc.read_entry(dest)
    if entry is None:
        return source_names(Path(path))
    return entry.meta["names"]
