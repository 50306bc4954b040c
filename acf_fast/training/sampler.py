"""The epoch walk: which triplets each optimizer step trains on, in one process or many.

Epoch e is `randperm(T)` from a generator seeded with (seed, e), cut into
ceil(T / batch_size) global batches. Nothing else is random during training (ACF has
no dropout), and the order depends only on (seed, e), so resuming needs no RNG state.
The last global batch keeps its true size: nothing is padded or dropped (the
tutorial's DataLoader has drop_last=False).

Under torchrun every rank walks the very same permutation and the same global
batches. Global batch b is cut into `world_size` contiguous pieces
(`torch.tensor_split`: sizes differ by at most one) and rank r trains on piece r, so
the union of the ranks' pieces is exactly single-process batch b, whatever the world
size. A rank whose piece is empty (fewer examples than ranks) runs one zero-weight
stand-in example so that it still joins DDP's all-reduce
(docs/distributed.md#epochs-and-batches; the loss that makes this exact is in
acf_fast.training.steps).
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import distributed
from ..data.formats import TripletSet


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch `epoch`: depends only on (seed, epoch), so resuming needs no RNG state."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


class EpochBatches:
    """The global batches of every epoch: `permutation(n, seed, e)` in slices of `batch_size`
    (default permutation: `epoch_permutation`). One process trains on them whole."""

    def __init__(self, n: int, batch_size: int, seed: int = 0,
                 permutation: Callable[[int, int, int], torch.Tensor] | None = None):
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.permutation = permutation or epoch_permutation
        self._perm_epoch, self._perm = None, None

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Epoch `epoch`'s whole order; its global batch k is the k-th slice of batch_size."""
        if self._perm_epoch != epoch:
            self._perm, self._perm_epoch = self.permutation(self.n, self.seed, epoch), epoch
        return self._perm

    def global_batch(self, epoch: int, step: int) -> torch.Tensor:
        if not 0 <= step < len(self):
            raise IndexError(f"step {step} outside [0, {len(self)})")
        return self.epoch_order(epoch)[step * self.batch_size:(step + 1) * self.batch_size]


def batch_tensors(data: TripletSet, idx: torch.Tensor, device) -> tuple[torch.Tensor, ...]:
    """Triplets `idx` of `data` on `device`: (user, profile, pos, neg), with the profile's
    all-padding columns dropped (less work, the same result)."""
    prof = data.profile[idx]
    width = max(int((prof > 0).sum(1).max()), 1)
    return (data.user[idx].to(device), prof[:, :width].to(device), data.pos[idx].to(device),
            data.neg[idx].to(device))


def split_global_batch(batch_idx: torch.Tensor, rank: int, world_size: int) -> tuple[torch.Tensor, int]:
    """This rank's piece of one global batch: (indices, n_real).

    Pieces are contiguous, in rank order, sizes differing by at most one, so their
    concatenation over ranks is `batch_idx` itself. A rank whose piece is empty gets
    one stand-in index (the batch's first) and n_real = 0: it must still run forward
    and backward so that DDP's gradient all-reduce has every rank; its loss weight is 0.
    """
    if batch_idx.numel() == 0:
        raise ValueError("a global batch must not be empty")
    piece = torch.tensor_split(batch_idx, world_size)[rank]
    if piece.numel() == 0:
        return batch_idx[:1], 0
    return piece, int(piece.numel())


class DistributedBatchSampler(EpochBatches):
    """The single-process epoch order, shared out by rank.

    `local(e, step)` is this rank's piece of global batch `step` of epoch e (see
    `split_global_batch`). With one process it is the whole global batch. Rank and
    world size default to the current process group's.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None,
                 permutation: Callable[[int, int, int], torch.Tensor] | None = None):
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        super().__init__(n, batch_size, seed, permutation)
        ctx = distributed.context()
        self.rank = ctx.rank if rank is None else int(rank)
        self.world_size = ctx.world_size if world_size is None else int(world_size)

    def local(self, epoch: int, step: int) -> tuple[torch.Tensor, int, int]:
        """(this rank's indices, n_real, global batch size)."""
        batch = self.global_batch(epoch, step)
        idx, n_real = split_global_batch(batch, self.rank, self.world_size)
        return idx, n_real, int(batch.numel())

    def epoch(self, epoch: int, start_step: int = 0):
        for step in range(start_step, len(self)):
            yield self.local(epoch, step)
