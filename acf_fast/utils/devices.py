"""The one place a requested device ("cpu", "cuda", "cuda:1", ...) is checked.

Every entry point (train, evaluate, recommend, explain, extract, demo, the ACF loader)
resolves its device here, so a device this machine cannot use is one ValueError naming
the device and the fix (the CLI prints it as one `acf-fast: error:` line) instead of a
torch assertion from deep inside the first `.to(device)`.
"""

from __future__ import annotations

import torch

from .env import launched_distributed


def check_device(device) -> torch.device | None:
    """`device` as a torch.device (None stays None: "CUDA if available", see
    acf_fast.distributed), or ValueError when this machine cannot use it."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"invalid device {device!r} ({exc}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise ValueError(f"device {device!r} requested but this torch ({torch.__version__}) has no "
                             "CUDA support; use --device cpu or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but no GPU is visible (torch.cuda.is_available() "
                             "is False: check the driver and CUDA_VISIBLE_DEVICES); use --device cpu")
        count = torch.cuda.device_count()
        # under torchrun the index is replaced by LOCAL_RANK (acf_fast.distributed)
        if dev.index is not None and dev.index >= count and not launched_distributed():
            raise ValueError(f"device {device!r} requested but only {count} GPU(s) are visible")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except Exception as exc:
            raise ValueError(f"device {device!r} is not usable here ({type(exc).__name__}: {exc})") from None
    return dev
