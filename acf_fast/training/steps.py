"""One optimizer step on one global batch, three ways behind one interface.

The trainer picks its step once (`make_step`) and calls it for every global batch of
the epoch walk (acf_fast.training.sampler): `step(idx)` runs forward, loss, backward
and the optimizer on global batch `idx` and returns that batch's mean loss, the same
float on every rank. A step reads the trainer's model, optimizer, loss function and
training triplets when it runs.

- `EagerStep`: one process, plain autograd: `loss_fn(model(batch))`.
- `DDPStep`: under torchrun, this rank's piece of the global batch through
  DistributedDataParallel. DDP averages gradients over ranks, so a rank's loss is
  `world_size * (sum of its per-example terms) / global_batch_size`: the average over
  ranks of that is the mean over the global batch, exactly the single-process loss,
  also when pieces have unequal sizes (a mean of per-rank means would not be). WARP's
  weight log(V + 1) + 1 uses V, the violations of the whole global batch: V is
  all-reduced before weighting, so each example gets the weight one process gives it.
  The terms are acf_fast.model.losses.per_example_terms
  (docs/distributed.md#loss-equivalence).
- `FusedStep`: one GPU and the triton backend (the default there): eleven Triton
  launches a step (acf_fast.training.fused_step) replayed from a CUDA graph, the
  epoch's triplets on the device, the loss read one step late.
- `GraphedStep`: any loss function and torch optimizer under autograd, replayed from a
  CUDA graph (acf_fast.training.cuda_graph), fed with host tensors (checked on the
  host, so the GPU never waits for a check); the trainer uses it through `graph_step`.
"""

from __future__ import annotations

import torch

from .. import distributed
from ..model.losses import per_example_terms
from .sampler import batch_tensors, split_global_batch


class TrainStep:
    """The interface: `step(idx) -> float | None`, `flush() -> float | None` and `reset()`
    after the optimizer's state was replaced (a resume).

    `lag` is how many steps late a step's loss comes back: 0, or 1 for a step that does
    not wait for the GPU (its call returns the previous step's loss, None for the
    first, and `flush()` returns the last one)."""

    lag = 0

    def __init__(self, trainer):
        self.trainer = trainer

    def __call__(self, idx: torch.Tensor) -> float | None:
        raise NotImplementedError

    def flush(self) -> float | None:
        return None

    def reset(self) -> None:
        pass


class EagerStep(TrainStep):
    def __call__(self, idx: torch.Tensor) -> float:
        t = self.trainer
        t.optimizer.zero_grad(set_to_none=True)
        ps, ns = t.model(*batch_tensors(t.train_set, idx, t.device))
        loss = t.loss_fn(ps, ns)
        loss.backward()
        t.optimizer.step()
        return loss.item()


class DDPStep(TrainStep):
    def __call__(self, idx: torch.Tensor) -> float:
        t = self.trainer
        t.optimizer.zero_grad(set_to_none=True)
        local, n_real = split_global_batch(idx, t.dist.rank, t.dist.world_size)
        ps, ns = t.net(*batch_tensors(t.train_set, local, t.device))
        loss, local_sum = distributed_loss(t.cfg.loss, ps, ns, n_real, idx.numel())
        value = global_loss_value(local_sum, idx.numel())
        loss.backward()
        t.optimizer.step()
        return value


class GraphedStep(TrainStep):
    def __init__(self, trainer, graph):
        super().__init__(trainer)
        self.graph = graph              # a GraphedTrainStep

    def __call__(self, idx: torch.Tensor) -> float:
        data = self.trainer.train_set
        return self.graph(data.user[idx], data.profile[idx], data.pos[idx], data.neg[idx]).item()

    def reset(self) -> None:
        self.graph.reset()


class FusedStep(TrainStep):
    """One GPU, the triton backend: the whole step in eleven launches replayed from one CUDA
    graph (acf_fast.training.fused_step), the training triplets and each epoch's order
    on the device (copied once, not per step), and the loss read one step late, so the
    host never waits for the GPU inside an epoch."""

    lag = 1

    def __init__(self, trainer, capture: bool | None = None):
        super().__init__(trainer)
        from .fused_step import FusedTrainStep

        self.fused = FusedTrainStep(trainer.model, trainer.optimizer, trainer.cfg.loss,
                                    capture=capture)
        data, dev = trainer.train_set, trainer.device
        width = max(int((data.profile > 0).sum(1).max()), 1) if len(data) else 1
        self.data = (data.user.to(dev), data.profile[:, :width].contiguous().to(dev),
                     data.pos.to(dev), data.neg.to(dev))
        self._next = None       # the (epoch, step) the bound order's cursor is at
        self._pending = None    # the last step's loss: (host copy, its copy's event)

    def __call__(self, idx: torch.Tensor) -> float | None:
        t = self.trainer
        at = (t.state.epoch, t.state.step)
        if self._next != at:    # a new epoch, or a resume mid-epoch
            self.fused.bind_epoch(*self.data, t.batches.epoch_order(at[0]),
                                  batch_size=t.cfg.batch_size, start=at[1])
        loss = self.fused.epoch_step(idx.numel())
        self._next = (at[0], at[1] + 1)
        previous = self.flush()
        if loss.device.type == "cuda":
            host = torch.empty((), dtype=loss.dtype, pin_memory=True)
            host.copy_(loss, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, event)
        else:
            self._pending = (loss.detach().clone(), None)
        return previous

    def flush(self) -> float | None:
        if self._pending is None:
            return None
        host, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        return float(host)

    def reset(self) -> None:
        self.fused.reset()
        self._next, self._pending = None, None


def make_step(trainer) -> TrainStep:
    """The step for this run: fused and graphed (config.cuda_graph; by default on for one
    CUDA device with the triton backend), DDP (under torchrun) or eager."""
    want = trainer.cfg.cuda_graph
    if want is None:   # one learning rate for all (embedding_lr unset): fused Adam's case
        want = (trainer.device.type == "cuda" and not trainer.dist.is_distributed
                and trainer.model.resolved_backend() == "triton"
                and len(trainer.optimizer.param_groups) == 1)
    if want:
        if trainer.dist.is_distributed:
            raise ValueError("cuda_graph runs on one GPU; it cannot be combined with torchrun")
        return FusedStep(trainer)
    return plain_step(trainer)


def plain_step(trainer) -> TrainStep:
    """The step without a CUDA graph: DDP under torchrun, else eager."""
    return DDPStep(trainer) if trainer.dist.is_distributed else EagerStep(trainer)


def distributed_loss(loss: str, pos: torch.Tensor, neg: torch.Tensor, n_real: int,
                     global_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backward through DDP, this rank's detached sum of terms).

    The backward loss is world_size * sum(terms) / global_batch_size, so DDP's gradient
    average is the gradient of the single-process mean loss over the global batch. For
    WARP every rank must call this at every step, including ranks holding only a
    stand-in (n_real = 0): the violation count is all-reduced. `global_loss_value`
    turns the detached sums into that mean for logging.
    """
    terms = per_example_terms(loss, pos, neg, n_real, total=distributed.all_reduce_sum)
    local_sum = terms.sum()
    scale = distributed.context().world_size / float(global_batch_size)
    return local_sum * scale, local_sum.detach()


def global_loss_value(local_sum: torch.Tensor, global_batch_size: int) -> float:
    """The global batch's mean loss (one scalar all-reduce)."""
    total = distributed.all_reduce_sum(local_sum.detach().clone().double())
    return float(total) / global_batch_size
