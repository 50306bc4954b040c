"""A batch's plan for the fused backends: its distinct real items and which slots hold each.

Both fused backends reduce every distinct item once (R = W_red x + b_red) and attend per
(user, slot) through an index into those items; this is the one place that finds them.
`acf_fast.kernels.fused_acf` (the triton backend) uses the whole `Batch`; the cpu backend
uses item_ids and slot_item. Plain torch ops, so it runs on any device; it runs before
the backends' custom ops, so none of those has a data-dependent output shape.

The exact plan (capacity=None) has a data-dependent size U, which torch.compile cannot
trace through torch.unique (a graph break). It is therefore itself the custom op
`acf_fast::distinct_items`, whose fake gives U as a new symbolic size: a compiled step
keeps the plan inside its graph and never recompiles for another U.
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
    if capacity is None:
        return Batch(*torch.ops.acf_fast.distinct_items(profile_ids, profile_mask.bool()))
    B, P = profile_ids.shape
    ids = _with_padding_first(profile_ids, profile_mask)
    sorted_ids, order = torch.sort(ids, stable=True)
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    group = first.cumsum(0) - 1                  # distinct-item number, 0 = padding
    inverse = torch.empty_like(group).scatter_(0, order, group)
    # every element of a group holds the same id: whichever write lands, it is right
    unique = ids.new_zeros(capacity + 1).scatter_(0, group, sorted_ids)
    counts = torch.zeros(capacity + 1, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(0, group, torch.ones_like(group, dtype=torch.int32))
    return Batch(item_ids=unique[1:],
                 slot_item=(inverse[1:] - 1).to(torch.int32).view(B, P),
                 item_start=counts.cumsum(0).to(torch.int32),
                 slot_order=(order - 1).to(torch.int32),
                 item_count=group[-1:].to(torch.int32))


def _with_padding_first(profile_ids: torch.Tensor, profile_mask: torch.Tensor) -> torch.Tensor:
    ids = torch.where(profile_mask.bool(), profile_ids, 0).reshape(-1)
    return torch.cat([ids.new_zeros(1), ids])


# Defined with torch.library.Library rather than torch.library.custom_op, whose wrapper
# imports torch._dynamo (a second of start-up) at the first eager call.
_LIB = torch.library.Library("acf_fast", "FRAGMENT")
_LIB.define("distinct_items(Tensor profile_ids, Tensor profile_mask) -> (Tensor, Tensor, Tensor, Tensor)")


def _exact_plan_impl(profile_ids: torch.Tensor, profile_mask: torch.Tensor):
    """(item_ids [U], slot_item [B, P], item_start [U + 1], slot_order [B * P + 1]): the
    exact plan, U read back to the host by torch.unique. Any device (plain torch ops)."""
    B, P = profile_ids.shape
    ids = _with_padding_first(profile_ids, profile_mask)
    unique, inverse, counts = torch.unique(ids, sorted=True, return_inverse=True,
                                           return_counts=True)
    order = torch.argsort(inverse, stable=True)
    # a tensor of its own, as the fake describes it (the view unique[1:] has an offset)
    return (unique[1:].clone(), (inverse[1:] - 1).to(torch.int32).view(B, P),
            counts.cumsum(0).to(torch.int32), (order - 1).to(torch.int32))


_LIB.impl("distinct_items", _exact_plan_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("acf_fast::distinct_items", lib=_LIB)
def _(profile_ids, profile_mask):
    B, P = profile_ids.shape
    u = _item_count_symbol(torch.library.get_ctx(), B * P)
    return (profile_ids.new_empty((u,), dtype=torch.int64),
            profile_ids.new_empty((B, P), dtype=torch.int32),
            profile_ids.new_empty((u + 1,), dtype=torch.int32),
            profile_ids.new_empty((B * P + 1,), dtype=torch.int32))


def _item_count_symbol(ctx, most: int):
    """A symbolic size for U, the number of distinct real items (0 to B * P), known only
    once the ids are read.

    The public ctx.new_dynamic_size() refuses unless the caller compiles with
    fullgraph=True or sets torch._dynamo.config.capture_dynamic_output_shape_ops, a
    process-wide switch; without either, the plan would be a graph break in every step.
    The op's own size is safe to allow here: every consumer of U (the backends' custom
    ops, linear layers) takes any size. So the symbol is made the way torch's own
    device-mesh ops make theirs; with a torch that lacks that path, the public call.
    """
    most = most if isinstance(most, int) else None   # a bound must be a plain int
    shape_env = getattr(ctx, "_shape_env", None)
    try:
        from torch._library.fake_impl import allocate_size
    except ImportError:
        allocate_size = None
    if shape_env is None or allocate_size is None:
        return ctx.new_dynamic_size(min=0, max=most)
    return allocate_size(shape_env, 0, most)
