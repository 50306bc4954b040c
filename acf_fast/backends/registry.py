"""The one place that decides which implementation runs ACF.

Every backend is a module in `acf_fast.backends` exposing

    user_vectors(model, user_ids, profile_ids, profile_mask, return_attentions=False)
        -> (user [B, D], alpha [B, P] | None, beta [B, P, M] | None)
    pair_scores(model, user_ids, profile_ids, pos, neg, profile_mask)
        -> (pos_scores [B], neg_scores [B])

and reads the parameters through `acf_fast.model.weights.ACFWeights.of(model)`.
Nothing else in the package chooses between them.
"""

from __future__ import annotations

import importlib
import sys
from functools import lru_cache

import torch

from ..utils import env
from . import cpu, reference  # noqa: F401  (see get: torch.compile finds them imported)

BACKENDS = ("reference", "cpu", "triton")


def triton_interpreter_on() -> bool:
    return env.triton_interpreter()


@lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


@lru_cache(maxsize=None)
def cpu_extension_available() -> bool:
    from . import cpu
    return cpu.load(required=False) is not None


def _backend_module_exists(name: str) -> bool:
    return importlib.util.find_spec(f"acf_fast.backends.{name}") is not None


@lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    print(f"acf_fast: {message}", file=sys.stderr)


@lru_cache(maxsize=None)
def _cuda_capability(index: int | None) -> tuple[int, int]:
    # asked on every forward pass: cached, since a device's capability never changes
    return torch.cuda.get_device_capability(index)


def triton_supports(device: torch.device) -> bool:
    """Triton needs compute capability 7.5+ (so no GTX 1080 Ti); the interpreter runs anywhere."""
    if device.type == "cuda":
        return triton_available() and _cuda_capability(device.index) >= (7, 5)
    return triton_interpreter_on() and triton_available()


def resolve(requested: str, device: torch.device | str) -> str:
    """Turn "auto" or an explicit name into the backend that will actually run.

    An explicit name is what runs; ACF_FAST_BACKEND only says what "auto" means (so a
    script can switch every model it builds without overriding a caller's choice)."""
    device = torch.device(device)
    requested = requested or "auto"
    if requested == "auto" and env.auto_backend() is not None:
        requested = env.auto_backend()
        if requested not in BACKENDS:
            raise ValueError(f"{env.BACKEND}={requested!r} is not a backend; expected one of {BACKENDS}")
    if requested not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {requested!r}; expected one of {('auto',) + BACKENDS}")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        if _backend_module_exists("triton") and triton_supports(device):
            return "triton"
        _warn_once(f"Triton unsupported on {torch.cuda.get_device_name(device)}; "
                   "using the reference backend")
        return "reference"
    if device.type == "cpu" and _backend_module_exists("cpu"):
        if cpu_extension_available():
            return "cpu"
        from . import cpu
        _warn_once(f"native CPU backend unavailable ({cpu._load()[1]}); using the reference "
                   "backend, several times slower")
    return "reference"


def get(name: str):
    """The backend module for a resolved name."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    # an imported backend is looked up, not imported again: torch.compile traces a
    # lookup in sys.modules but breaks the graph at importlib (reference and cpu are
    # imported with this module, so even a first, compiled call finds them)
    module = sys.modules.get(f"acf_fast.backends.{name}")
    if module is not None:
        return module
    try:
        return importlib.import_module(f"acf_fast.backends.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"acf_fast.backends.{name}":
            raise RuntimeError(f"backend {name!r} is not part of this build of acf_fast") from exc
        raise
