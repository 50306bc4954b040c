"""One safe loader for every pickled format acf_fast reads: nothing in a file runs code.

A pickle names the Python callables that rebuild its objects (`GLOBAL module name`), and
an ordinary unpickler imports and calls whatever it names: `os.system`, `builtins.exec`.
acf_fast's files never need that. Two formats are pickled:

- checkpoints (`torch.save`): tensors, numbers, strings, containers and, in the
  tutorial's own files, numpy id arrays. They load with torch's `weights_only=True`
  unpickler, given `torch_safe_globals()` as the only extra globals.
- the tutorial's `.npy` feature file: an object array of [name, float32 array]. It loads
  with `load_npy`, whose unpickler admits only `npy_globals()`.

Both lists come from the same numpy allowlist: exactly what rebuilds plain ndarrays and
numpy scalars (`_reconstruct`, `ndarray`, `scalar`, `dtype` and the numeric dtype classes,
under their numpy 1.x and 2.x names). `numpy.dtype` is admitted only through a wrapper that
takes a plain type string ('<f4') of an allowed kind: numeric for checkpoints; numeric,
string and object (the outer array) for `.npy`. Anything else a file names is refused by
name with `Refused`, before anything from the file is called.
"""

from __future__ import annotations

import os
import pickle

import numpy as np

NUMERIC_KINDS = "biufc"          # bool, int, uint, float, complex
NPY_KINDS = NUMERIC_KINDS + "USO"  # + str, bytes, and object (the .npy's outer array only)


class Refused(ValueError):
    """A pickle named something outside the allowlist; nothing from it was called."""

    def __init__(self, name: str, message: str | None = None):
        super().__init__(message or f"refused {name}")
        self.name = name


def refusal_message(path, what: str, name: str, allowed: str) -> str:
    return (f"{path}: refused to load this {what}: it names {name}, which a {what} never "
            f"needs (only {allowed} are read). Unpickling it could run code from the file, "
            "so nothing in it was run; re-save it with plain values from code you trust")


def _dtype_classes() -> list[type]:
    codes = "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]
    return sorted({type(np.dtype(c)) for c in codes}, key=lambda t: t.__name__)


def _dtype_of_kinds(kinds: str):
    def dtype(obj, align=False, copy=False):
        """numpy.dtype as a pickle calls it, for plain type strings of the allowed kinds."""
        if not isinstance(obj, str):
            raise Refused(f"numpy.dtype({obj!r})")
        made = np.dtype(obj, align=bool(align), copy=bool(copy))
        if made.kind not in kinds or made.fields is not None or made.subdtype is not None:
            raise Refused(f"numpy.dtype({obj!r})")
        return made
    return dtype


def _numpy_globals(kinds: str) -> dict[str, object]:
    """Qualified name -> what the unpickler gets for it."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:
        from numpy.core import multiarray

    names = {}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x, 2.x
        names[f"{module}._reconstruct"] = multiarray._reconstruct
        names[f"{module}.scalar"] = multiarray.scalar
    names["numpy.ndarray"] = np.ndarray
    names["numpy.dtype"] = _dtype_of_kinds(kinds)
    for cls in _dtype_classes():  # BUILD on a dtype names its class (torch checks it)
        names[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return names


def torch_safe_globals() -> list[tuple[object, str]]:
    """For `torch.serialization.safe_globals`: numeric numpy arrays and scalars only."""
    return [(obj, name) for name, obj in _numpy_globals(NUMERIC_KINDS).items()]


def npy_globals() -> dict[str, object]:
    # _codecs.encode rebuilds bytes in protocol-2 pickles (torch admits it too)
    import _codecs

    return {**_numpy_globals(NPY_KINDS), "_codecs.encode": _codecs.encode}


class SafeUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only `allowed` names and no persistent ids."""

    def __init__(self, file, allowed: dict[str, object], **kwargs):
        super().__init__(file, **kwargs)
        self._allowed = allowed

    def find_class(self, module, name):
        full = f"{module}.{name}"
        if full in self._allowed:
            return self._allowed[full]
        raise Refused(full)

    def persistent_load(self, pid):
        raise Refused(f"persistent id {pid!r}")


NPY_ALLOWED = "strings and numeric arrays"


def load_npy(path: str | os.PathLike, what: str = "file") -> np.ndarray:
    """np.load(path, allow_pickle=True) that runs nothing from the file: an object array's
    pickle may hold strings, numbers and numeric arrays (the tutorial's [name, grid] rows);
    any other global it names raises `Refused` (a ValueError) naming the file and it."""
    fmt = np.lib.format
    with open(path, "rb") as fh:
        version = fmt.read_magic(fh)
        readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, _, dtype = readers[version](fh)
        if not dtype.hasobject:
            fh.seek(0)
            return fmt.read_array(fh, allow_pickle=False)
        try:
            arr = SafeUnpickler(fh, npy_globals(), encoding="latin1").load()
        except Refused as exc:
            raise Refused(exc.name, refusal_message(path, what, exc.name, NPY_ALLOWED)) from None
    if not isinstance(arr, np.ndarray) or arr.shape != shape:
        raise ValueError(f"the pickled content is a {type(arr).__name__}, not the array of shape "
                         f"{shape} the header announces")
    return arr


def check_numeric(value, path, what: str, allowed: str) -> None:
    """Refuse numpy values of other kinds than numeric anywhere in a loaded structure
    (torch's unpickler can make an ndarray of dtype object without naming one)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, (np.ndarray, np.generic)) and item.dtype.kind not in NUMERIC_KINDS:
            raise ValueError(refusal_message(path, what, f"a numpy value of dtype {item.dtype}",
                                             allowed))
