"""User and item id arguments as the tutorial passes them: id lists (or plain counts)."""

from __future__ import annotations

import numbers

import numpy as np
import torch


def positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value}")
    return int(value)


def is_count(ids) -> bool:
    return isinstance(ids, numbers.Integral) and not isinstance(ids, bool)


def id_tensor(ids, what: str) -> torch.Tensor:
    """An id list / array / tensor as an int64 tensor, refusing anything else by name."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
        raise TypeError(f"{what} must be a count (int) or a list/array/tensor of integer ids, "
                        f"got {type(ids).__name__} {ids!r}")
    if isinstance(ids, torch.Tensor):
        t = ids
    elif hasattr(ids, "__array__"):  # numpy / pandas: no per-element Python objects
        t = torch.as_tensor(np.asarray(ids))
    else:
        t = torch.as_tensor(list(ids))
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{what} must hold integer ids, got {t.dtype}")
    t = t.long().reshape(-1)
    if t.numel() == 0:
        raise ValueError(f"{what} must not be empty")
    if t.min() < 0:
        raise ValueError(f"{what} contains a negative id ({int(t.min())})")
    return t


def user_ids(users) -> list[int] | range:
    """The tutorial's `users`: ids as plain ints (a count n stands for ids 0..n-1).

    Plain Python values, so that a checkpoint holding them loads with
    torch.load(weights_only=True) and in the tutorial's `ACF.from_checkpoint`.
    """
    if is_count(users):
        return range(positive_int(users, "users"))
    return id_tensor(users, "users").tolist()


def item_ids(items) -> list[int] | range:
    """The tutorial's `items` (0- or 1-based ids; a count N stands for ids 1..N)."""
    if is_count(items):
        return range(1, positive_int(items, "items") + 1)
    return id_tensor(items, "items").tolist()


def catalogue(items) -> torch.Tensor:
    """The tutorial's `all_items`: item ids shifted to 1-based when they start at 0."""
    if isinstance(items, range):
        all_items = torch.arange(items.start, items.stop)
    else:
        all_items = torch.as_tensor(items, dtype=torch.long)
    return all_items + 1 if all_items.min() == 0 else all_items
