"""Checks of a batch's ids and mask, shared by every entry point of `ACF` (a mixin)."""

from __future__ import annotations

import torch

PAD = 0
MASK_MISMATCH = ("profile_mask disagrees with profile_ids: a slot must be masked exactly when "
                 "its id is the padding id 0")


class BatchChecks:
    """Needs `item_model`, `num_users` and `num_items` on the class it is mixed into."""

    def profile_mask_for(self, profile_ids: torch.Tensor) -> torch.Tensor:
        return profile_ids != PAD

    def _check_ids(self, ids: torch.Tensor, name: str, ndim: int, device=None) -> torch.Tensor:
        """Type, dtype and rank; the range is checked for the whole batch at once."""
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an int64 or int32 tensor, got {ids.dtype}")
        if ids.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(ids.shape)}")
        return ids.to(device or self.item_model.weight.device, torch.long)

    @staticmethod
    def _check_ranges(checks, mask_mismatch=None) -> None:
        """All id ranges (and the mask's agreement) in one device->host sync: on a GPU every
        sync stalls the launch queue, and a step has up to nine such checks."""
        if torch.compiler.is_compiling():
            return _assert_ranges(checks, mask_mismatch)
        flags = [((ids < lowest) | (ids >= upper)).any() for _, ids, lowest, upper in checks]
        if mask_mismatch is not None:
            flags.append(mask_mismatch)
        if not flags or not torch.stack(flags).any():
            return
        for name, ids, lowest, upper in checks:  # error path only: find the offender
            lo, hi = int(ids.min()), int(ids.max())
            if lo < lowest or hi >= upper:
                raise ValueError(f"{name} contains id {lo if lo < lowest else hi}, "
                                 f"expected ids in [{lowest}, {upper - 1}]")
        raise ValueError(MASK_MISMATCH)

    def _check_batch(self, user_ids, profile_ids, profile_mask, pos=None, neg=None, device=None):
        """Checked ids (int64) and mask on `device` (default: the parameters' device; a
        CUDA-graph step checks host batches on the CPU, so the GPU never waits)."""
        user_ids = self._check_ids(user_ids, "user_ids", 1, device)
        profile_ids = self._check_ids(profile_ids, "profile_ids", 2, device)
        if profile_ids.shape[0] != user_ids.shape[0]:
            raise ValueError(f"profile_ids has {profile_ids.shape[0]} rows but user_ids has "
                             f"{user_ids.shape[0]}")
        n_ids = self.num_items + 1
        checks = [("user_ids", user_ids, 0, self.num_users), ("profile_ids", profile_ids, 0, n_ids)]
        if pos is not None:
            pos = self._check_ids(pos, "pos", 1, device)
            neg = self._check_ids(neg, "neg", 1, device)
            if not (pos.shape[0] == neg.shape[0] == user_ids.shape[0]):
                raise ValueError(f"user_ids, pos and neg must have the same length, got "
                                 f"{user_ids.shape[0]}, {pos.shape[0]}, {neg.shape[0]}")
            # the padding id 0 is no item: scoring it would silently give 0
            checks += [("pos", pos, 1, n_ids), ("neg", neg, 1, n_ids)]
        derived = self.profile_mask_for(profile_ids)
        mismatch = None
        if profile_mask is None:
            profile_mask = derived
        else:
            if not isinstance(profile_mask, torch.Tensor):
                raise TypeError("profile_mask must be a torch.Tensor")
            if profile_mask.shape != profile_ids.shape:
                raise ValueError(f"profile_mask has shape {tuple(profile_mask.shape)}, expected "
                                 f"{tuple(profile_ids.shape)} like profile_ids")
            if profile_mask.dtype != torch.bool:
                if profile_mask.is_floating_point() or profile_mask.is_complex():
                    raise TypeError(f"profile_mask must be bool or integer 0/1, got {profile_mask.dtype}")
                profile_mask = profile_mask != 0
            profile_mask = profile_mask.to(profile_ids.device)
            mismatch = (profile_mask != derived).any()
        self._check_ranges(checks, mismatch)
        return user_ids, profile_ids, profile_mask, pos, neg


def _assert_ranges(checks, mask_mismatch) -> None:
    """The same checks inside a torch.compile graph, where reading a flag back to branch
    on it would break the graph: each one is an assertion the graph itself runs, a
    RuntimeError with the same wording, less the offending id (which would need that
    read-back)."""
    for name, ids, lowest, upper in checks:
        torch._assert_async(((ids >= lowest) & (ids < upper)).all(),
                            f"{name} contains an id outside the expected ids in [{lowest}, {upper - 1}]")
    if mask_mismatch is not None:
        torch._assert_async(~mask_mismatch, MASK_MISMATCH)
