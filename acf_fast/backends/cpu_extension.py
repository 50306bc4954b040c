"""Loading the native extension acf_fast._C, with a useful message when it is absent or stale.

Import of acf_fast never needs the extension; only the "cpu" backend (and the ops in
acf_fast.backends.ops) do, and they ask here at call time.
"""

from __future__ import annotations

import glob
import hashlib
import os
from functools import lru_cache
from pathlib import Path

from ..utils import env

BUILD_HINT = ("build it with `make build` (or `pip install --no-build-isolation -e .` in the "
              "repository), or choose backend='reference'")

_CSRC = Path(__file__).resolve().parents[2] / "csrc"


def _checkout_source_hash() -> str | None:
    """Hash of csrc/ in a source checkout (same recipe as setup.py); None when installed."""
    if not _CSRC.is_dir():
        return None
    paths = sorted(glob.glob(str(_CSRC / "*.cpp")) + glob.glob(str(_CSRC / "*.cu"))
                   + glob.glob(str(_CSRC / "*.h")))
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as fh:
            h.update(os.path.basename(p).encode() + fh.read())
    return h.hexdigest()[:16]


class ExtensionError(RuntimeError):
    pass


@lru_cache(maxsize=None)
def _load():
    """(ops namespace, None) on success, (None, reason) on failure."""
    try:
        import torch
        from .. import _C  # noqa: F401  (registers torch.ops.acf_fast.*)
    except ImportError as exc:
        return None, f"the native extension acf_fast._C is not built ({exc})"
    except OSError as exc:  # e.g. undefined symbol after a torch upgrade
        return None, f"the native extension acf_fast._C failed to load ({exc})"
    built = torch.ops.acf_fast.source_hash()
    expected = _checkout_source_hash()
    if expected is not None and built != expected and not env.allow_stale_extension():
        return None, (f"the native extension acf_fast._C is stale (built from csrc/ {built}, "
                      f"sources now {expected})")
    return torch.ops.acf_fast, None


def load(required: bool = True):
    """The `torch.ops.acf_fast` namespace, or None (required=False) / ExtensionError."""
    ops, reason = _load()
    if ops is None and required:
        raise ExtensionError(f"{reason}; {BUILD_HINT}")
    return ops
