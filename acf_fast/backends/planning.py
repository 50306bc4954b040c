"""A batch's plan for the fused backends: its distinct real items and which slots hold each.

Both fused backends reduce every distinct item once (R = W_red x + b_red) and attend per
(user, slot) through an index into those items; this is the one place that finds them.
`acf_fast.kernels.fused_acf` (the triton backend) uses the whole `Batch`; the cpu backend
uses item_ids and slot_item. Plain torch ops, so it runs on any device, before any custom
op (no op has a data-dependent output shape).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Batch(NamedTuple):
    item_ids: torch.Tensor    # [U] int64: the distinct real item ids of the profiles
    slot_item: torch.Tensor   # [B, P] int32: index into item_ids, -1 on padded slots
    item_start: torch.Tensor  # [U + 1] int32: item k's slots are slot_order[start[k]:start[k+1]]
    slot_order: torch.Tensor  # [B * P + 1] int32: flat slot indices (i * P + l), grouped by item
    # static-shape batches only: int32 [1], how many of item_ids are live (the rest are
    # id 0 with no slots); None when item_ids holds exactly the distinct items
    item_count: torch.Tensor | None = None


def distinct_items(profile_ids: torch.Tensor, profile_mask: torch.Tensor,
                   capacity: int | None = None) -> Batch:
    """The distinct real items of a batch and, for backward, which slots hold each one.

    A padding id 0 is prepended so that 0 is always distinct item number 0 and the real
    items come after it; padded slots (masked, whatever their id) map to -1. The stable
    sort of the prepended array puts that extra 0 and the padded slots first, then each
    real item's slots in order.

    capacity=None: exactly the U distinct items (torch.unique: one host sync for U).
    capacity=C (at least the number of distinct items; B * P always is): item_ids has C
    entries, the live ones first in the same order, then id 0; item_start stays flat
    past the live items (no slots), and item_count holds the live count on the device.
    Built from a sort and prefix sums, which read nothing back to the host.
    """
    B, P = profile_ids.shape
    ids = torch.where(profile_mask.bool(), profile_ids, 0).reshape(-1)
    ids = torch.cat([ids.new_zeros(1), ids])
    if capacity is None:
        unique, inverse, counts = torch.unique(ids, sorted=True, return_inverse=True,
                                               return_counts=True)
        order = torch.argsort(inverse, stable=True)
        live = None
    else:
        sorted_ids, order = torch.sort(ids, stable=True)
        first = torch.ones_like(sorted_ids, dtype=torch.bool)
        first[1:] = sorted_ids[1:] != sorted_ids[:-1]
        group = first.cumsum(0) - 1                  # distinct-item number, 0 = padding
        inverse = torch.empty_like(group).scatter_(0, order, group)
        # every element of a group holds the same id: whichever write lands, it is right
        unique = ids.new_zeros(capacity + 1).scatter_(0, group, sorted_ids)
        counts = torch.zeros(capacity + 1, dtype=torch.int32, device=ids.device)
        counts.scatter_add_(0, group, torch.ones_like(group, dtype=torch.int32))
        live = group[-1:].to(torch.int32)
    return Batch(item_ids=unique[1:],
                 slot_item=(inverse[1:] - 1).to(torch.int32).view(B, P),
                 item_start=counts.cumsum(0).to(torch.int32),
                 slot_order=(order - 1).to(torch.int32),
                 item_count=live)
