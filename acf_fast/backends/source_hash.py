"""The hash of the native sources in csrc/, the one recipe for both of its users.

setup.py compiles it into acf_fast._C (-DACF_SOURCE_HASH, read back by the op
acf_fast::source_hash); the loader in acf_fast.backends.cpu recomputes it from a
checkout's csrc/ and refuses a build whose hash differs (a stale build).

Standard library only: setup.py loads this file by its path, before torch or acf_fast
can be imported. (The CMake build compiles in "cmake" instead and is loaded with
torch.ops.load_library, which runs no stale check.)
"""

from __future__ import annotations

import glob
import hashlib
import os


def native_sources(csrc: str | os.PathLike) -> tuple[list[str], list[str], list[str]]:
    """(C++ sources, CUDA sources, headers) in csrc, each list sorted."""
    csrc = os.fspath(csrc)
    return tuple(sorted(glob.glob(os.path.join(csrc, pattern)))
                 for pattern in ("*.cpp", "*.cu", "*.h"))


def source_hash(csrc: str | os.PathLike) -> str:
    """16 hex digits of sha256 over every source's file name and bytes, in name order."""
    cpp, cu, headers = native_sources(csrc)
    h = hashlib.sha256()
    for path in sorted(cpp + cu + headers):
        with open(path, "rb") as fh:
            h.update(os.path.basename(path).encode() + fh.read())
    return h.hexdigest()[:16]
