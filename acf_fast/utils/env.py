"""Every environment variable acf_fast reads, in one place.

Each knob is a function so that it is read when used (tests and launchers set them
after import). Names and meanings:

    ACF_FAST_BACKEND          what backend="auto" means ("reference", "cpu", "triton");
                              an explicit backend= argument is never overridden
    ACF_FAST_GEMM             the cpu backend's W_red GEMM where 16-bit GEMMs are allowed:
                              auto (measure once per machine; default), fp32, bf16 (oneDNN),
                              mkl-bf16 (acf_fast.backends.gemm_choice)
    ACF_FAST_ALLOW_STALE=1    load a native extension built from other sources than csrc/
    ACF_FAST_VERIFY_CACHE=1   hash-check feature caches of any size (default: up to 1 GiB)
    ACF_FAST_CACHE_DIR        where the caches of read-only feature folders go
                              (default $XDG_CACHE_HOME/acf_fast/features, else ~/.cache/...)
    ACF_FAST_DETERMINISTIC=1  deterministic kernels (set by acf_fast.utils.determinism)
    ACF_FAST_DIST_BACKEND     torch.distributed backend override (e.g. gloo on one GPU)
    ACF_FAST_DIST_TIMEOUT_S   collective timeout in seconds
    WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT
                              as torchrun exports them
    TRITON_INTERPRET=1        Triton kernels run on the CPU interpreter
"""

from __future__ import annotations

import os

BACKEND = "ACF_FAST_BACKEND"
GEMM = "ACF_FAST_GEMM"
ALLOW_STALE = "ACF_FAST_ALLOW_STALE"
VERIFY_CACHE = "ACF_FAST_VERIFY_CACHE"
DETERMINISTIC = "ACF_FAST_DETERMINISTIC"
DIST_BACKEND = "ACF_FAST_DIST_BACKEND"
DIST_TIMEOUT_S = "ACF_FAST_DIST_TIMEOUT_S"


def flag(name: str) -> bool:
    """A switch: set to anything but "" or "0"."""
    return os.environ.get(name, "0") not in ("", "0")


def text(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def _converted(name: str, default, convert, kind: str):
    value = text(name)
    if value is None:
        return default
    try:
        return convert(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not {kind}") from None


def integer(name: str, default: int) -> int:
    return _converted(name, default, int, "an integer")


def number(name: str, default: float) -> float:
    return _converted(name, default, float, "a number")


def is_set(name: str) -> bool:
    return name in os.environ


def auto_backend() -> str | None:
    """The backend "auto" stands for, when ACF_FAST_BACKEND names one."""
    return text(BACKEND)


def gemm_kind() -> str | None:
    return text(GEMM)


def allow_stale_extension() -> bool:
    return flag(ALLOW_STALE)


def verify_every_cache() -> bool:
    return flag(VERIFY_CACHE)


def deterministic() -> bool:
    return flag(DETERMINISTIC)


def set_deterministic(on: bool) -> None:
    # an environment variable, not a Python global: the Triton kernels (acf_fast.kernels)
    # and torchrun's worker processes read it too
    if on:
        os.environ[DETERMINISTIC] = "1"
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        os.environ.pop(DETERMINISTIC, None)


def triton_interpreter() -> bool:
    return flag("TRITON_INTERPRET")


def world_size() -> int:
    """WORLD_SIZE as torchrun exports it (1 when not launched by torchrun)."""
    return integer("WORLD_SIZE", 1)


def launched_distributed() -> bool:
    return world_size() > 1
