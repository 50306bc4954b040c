"""Scale-out on torch.distributed: `torchrun` runs acf_fast unchanged.

What each piece is for, and the choices made:

- `init_distributed()` reads what torchrun exports (RANK, WORLD_SIZE, LOCAL_RANK,
  LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and starts the default process group:
  NCCL when the rank's device is a GPU (one GPU per LOCAL_RANK), gloo on CPU. With
  WORLD_SIZE unset or 1 it starts nothing and everything below degrades to the
  single-process behaviour, so callers need no `if distributed:` branches.

- Epoch semantics. Single-process training (acf_fast.training.trainer) walks a seeded
  permutation of ALL triplets in global batches of `batch_size`. Distributed
  training walks the very same permutation and the same global batches; global
  batch b is cut into `world_size` contiguous micro-batches (`torch.tensor_split`:
  sizes differ by at most one), rank r takes piece r. The union of the ranks'
  micro-batches is exactly single-process batch b, whatever the world size.
  Last-batch policy: nothing is padded or dropped. The last global batch keeps its
  true size (the tutorial's DataLoader has drop_last=False); it is split like the
  others, and a rank whose piece is empty (fewer examples than ranks) runs one
  zero-weight stand-in example so that every rank joins DDP's all-reduce.

- Loss equivalence. DDP averages gradients over ranks. A rank's loss is therefore
  `world_size * (sum of its per-example terms) / global_batch_size`: the average
  over ranks of that is the global mean, exactly the single-process loss, also when
  micro-batches have unequal sizes (a mean of per-rank means would not be). The
  tutorial's WARP weight log(V + 1) + 1 uses V, the number of violating pairs in the
  whole batch; V is all-reduced before weighting, so each example gets the weight
  single-process training gives it.

- DDP wrapping (`wrap_model`). ACF's buffers (the feature table and the catalogue
  ids) are inputs, identical on every rank by construction and never trained. They
  are put on DDP's ignore list: no broadcast at construction (the table can be
  13 GB, and on CPU it is a read-only memory map that a broadcast would write into)
  and none per step. The tutorial's `user_model.w_v` is created but never used, so it
  never gets a gradient; it is on the ignore list too, which keeps
  find_unused_parameters=False (no graph walk each step) and keeps w_v exactly as in
  single-process training. The alternative, find_unused_parameters=True, would
  all-reduce a zero gradient into w_v, and Adam's weight decay would then move a
  parameter that single-process training leaves alone. Being ignored, w_v is not
  synchronised by DDP, so `wrap_model` broadcasts it from rank 0 once.

- Feature table per node (`prepare_feature_cache`). Converting the tutorial's
  feature file into the memory-mappable cache is done once: global rank 0 first,
  then local rank 0 of each other node (a no-op on a shared filesystem, a build on
  node-local disks); the other ranks wait and then map the finished cache
  read-only, so a node's ranks share one copy in the page cache.

- Metrics (`gather_rows`, `gather_ordered`). Distributed evaluation gathers the
  per-group metric rows (and per-batch validation sums with their counts) into
  their single-process order, and the caller reduces them exactly as a single
  process does: the numbers are the same bits, not an average of per-rank averages.

- Checkpoints (`save_on_main`): only rank 0 writes (atomically), then all ranks meet
  at a barrier so nobody reads a checkpoint before it exists.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from .model.losses import get_loss, sigmoid_loss
from .utils import env

DEFAULT_TIMEOUT_S = 1800   # torch's own default; a long feature conversion may need more


# ---------------------------------------------------------------------------- process group
@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank, world size, local rank and its device."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None          # None: no process group

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CONTEXT: DistContext | None = None
_OWNS_GROUP = False


def env_world_size() -> int:
    """WORLD_SIZE as torchrun exports it (1 when not launched by torchrun)."""
    return env.world_size()


def launched_distributed() -> bool:
    return env.launched_distributed()


def _rank_device(requested: str | torch.device | None, local_rank: int, world: int) -> torch.device:
    """Under torchrun, one accelerator per local rank: 'cuda' (or 'cuda:k', whose index is
    overridden) becomes cuda:LOCAL_RANK. A single process keeps what it asked for.
    None picks CUDA when present; 'cpu' stays cpu."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type != "cuda" or world <= 1:
        return device
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs "
                           "are visible: use --nproc_per_node <= the number of GPUs")
    return torch.device("cuda", local_rank)


def init_distributed(device: str | torch.device | None = "cpu", backend: str | None = None,
                     timeout_s: float | None = None) -> DistContext:
    """Start the process group from torchrun's environment; returns this rank's context.

    device: the device the caller asked for ('cpu', 'cuda', None = CUDA if available);
    under torchrun a CUDA device becomes cuda:LOCAL_RANK. backend: None picks
    $ACF_FAST_DIST_BACKEND, else nccl for CUDA and gloo for CPU. timeout_s: collective
    timeout (default $ACF_FAST_DIST_TIMEOUT_S or 1800 s). Without torchrun (WORLD_SIZE
    unset or 1) nothing is started and the context is the single-process one. Calling
    it again reuses the process group (a train then an evaluate in one process).
    """
    global _CONTEXT, _OWNS_GROUP
    world = env_world_size()
    rank = env.integer("RANK", 0)
    local_rank = env.integer("LOCAL_RANK", 0)
    local_world = env.integer("LOCAL_WORLD_SIZE", world if world > 1 else 1)
    if _CONTEXT is not None:
        return replace(_CONTEXT, device=_rank_device(device, _CONTEXT.local_rank, _CONTEXT.world_size))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistContext(device=_rank_device(device, 0, 1))
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not env.is_set(name):
                raise RuntimeError(f"WORLD_SIZE={world} but {name} is not set; launch with torchrun "
                                   "(it sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")
    else:   # someone else started it (a notebook, a test harness): use theirs
        rank, world = dist.get_rank(), dist.get_world_size()
    dev = _rank_device(device, local_rank, world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)      # NCCL and all_gather_object use the current device
    if not dist.is_initialized():
        # ACF_FAST_DIST_BACKEND=gloo: several ranks sharing one GPU (tests), no NCCL
        backend = (backend or env.text(env.DIST_BACKEND)
                   or ("nccl" if dev.type == "cuda" else "gloo"))
        seconds = timeout_s if timeout_s is not None else env.number(
            env.DIST_TIMEOUT_S, DEFAULT_TIMEOUT_S)
        dist.init_process_group(backend=backend, init_method="env://", rank=rank,
                                world_size=world, timeout=timedelta(seconds=seconds))
        _OWNS_GROUP = True
    _CONTEXT = DistContext(rank=rank, world_size=world, local_rank=local_rank,
                           local_world_size=local_world, device=dev,
                           backend=dist.get_backend())
    return _CONTEXT


def context() -> DistContext:
    """The current context (single-process defaults before `init_distributed`)."""
    if _CONTEXT is not None:
        return _CONTEXT
    if dist.is_available() and dist.is_initialized():   # a group someone else started
        backend = dist.get_backend()
        device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                  else torch.device("cpu"))
        return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                           device=device, backend=backend)
    return DistContext()


def shutdown() -> None:
    """Destroy the process group if `init_distributed` created it."""
    global _CONTEXT, _OWNS_GROUP
    if _OWNS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _CONTEXT, _OWNS_GROUP = None, False


def is_main() -> bool:
    """True on rank 0 and in single-process runs: the process that prints and writes files."""
    return context().is_main


def barrier() -> None:
    ctx = context()
    if not ctx.is_distributed:
        return
    if ctx.backend == "nccl":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


def broadcast_object(obj=None, src: int = 0):
    """rank `src`'s `obj` on every rank (e.g. an early-stopping decision all ranks must share)."""
    if not context().is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    ctx = context()
    if not ctx.is_distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------- sampling
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


class DistributedBatchSampler:
    """The single-process epoch order, shared out by rank.

    Epoch e is `permutation(n, seed, e)` (default: acf_fast.training.trainer.epoch_permutation),
    cut into ceil(n / batch_size) global batches; `local(e, step)` is this rank's
    piece of global batch `step` (see `split_global_batch`). With one process it is
    the whole global batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None,
                 permutation: Callable[[int, int, int], torch.Tensor] | None = None):
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        ctx = context()
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.rank = ctx.rank if rank is None else int(rank)
        self.world_size = ctx.world_size if world_size is None else int(world_size)
        if permutation is None:
            from .training.trainer import epoch_permutation as permutation
        self.permutation = permutation
        self._perm_epoch, self._perm = None, None

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def _epoch_perm(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            self._perm, self._perm_epoch = self.permutation(self.n, self.seed, epoch), epoch
        return self._perm

    def global_batch(self, epoch: int, step: int) -> torch.Tensor:
        if not 0 <= step < len(self):
            raise IndexError(f"step {step} outside [0, {len(self)})")
        return self._epoch_perm(epoch)[step * self.batch_size:(step + 1) * self.batch_size]

    def local(self, epoch: int, step: int) -> tuple[torch.Tensor, int, int]:
        """(this rank's indices, n_real, global batch size)."""
        batch = self.global_batch(epoch, step)
        idx, n_real = split_global_batch(batch, self.rank, self.world_size)
        return idx, n_real, int(batch.numel())

    def epoch(self, epoch: int, start_step: int = 0):
        for step in range(start_step, len(self)):
            yield self.local(epoch, step)


def shard_blocks(n: int, block: int, rank: int | None = None, world_size: int | None = None):
    """The [start, stop) blocks of a single-process loop `range(0, n, block)` this rank owns
    (block i goes to rank i % world_size). Whole blocks are dealt out, not rows, so every
    block is computed with exactly the batch shape a single process uses."""
    ctx = context()
    rank = ctx.rank if rank is None else rank
    world_size = ctx.world_size if world_size is None else world_size
    return [(s, min(s + block, n)) for s in range(rank * block, n, block * world_size)]


# ---------------------------------------------------------------------------- losses
def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if context().is_distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def per_example_terms(loss: str, pos: torch.Tensor, neg: torch.Tensor, n_real: int | None = None,
                      ) -> torch.Tensor:
    """The per-example terms whose global-batch mean is the loss (stand-ins give 0).

    For `warp` the violation count V is the global batch's (all-reduced): every rank
    must call this at every step, including ranks holding only a stand-in.
    """
    get_loss(loss)
    n_real = pos.shape[0] if n_real is None else n_real
    real = torch.arange(pos.shape[0], device=pos.device) < n_real
    if loss == "warp":
        # losses.warp_loss with V counted over the global batch, not this rank's piece
        terms = sigmoid_loss(pos, neg, 1.0, collapse=False)
        violating = ((terms > 0.5) & real).to(terms.dtype)
        count = _all_reduce_sum(violating.sum().detach())
        return violating * (torch.log(count + 1) + 1) * terms
    terms = get_loss(loss)(pos, neg, collapse=False)
    return torch.where(real, terms, torch.zeros_like(terms))


def distributed_loss(loss: str, pos: torch.Tensor, neg: torch.Tensor, n_real: int,
                     global_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backward through DDP, this rank's detached sum of terms).

    The backward loss is world_size * sum(terms) / global_batch_size, so DDP's gradient
    average is the gradient of the single-process mean loss over the global batch.
    `global_loss_value` turns the detached sums into that mean for logging.
    """
    terms = per_example_terms(loss, pos, neg, n_real)
    local_sum = terms.sum()
    scale = context().world_size / float(global_batch_size)
    return local_sum * scale, local_sum.detach()


def global_loss_value(local_sum: torch.Tensor, global_batch_size: int) -> float:
    """The global batch's mean loss (one scalar all-reduce)."""
    total = _all_reduce_sum(local_sum.detach().clone().double())
    return float(total) / global_batch_size


# ---------------------------------------------------------------------------- DDP
def ignored_names(model) -> list[str]:
    """What DDP must leave alone in an ACF: every buffer (feature table, catalogue ids) and
    the never-used `user_model.w_v`."""
    names = [n for n, _ in model.named_buffers()]
    names += [n for n, _ in model.named_parameters() if n.startswith("user_model.w_v.")]
    return names


def wrap_model(model, ctx: DistContext | None = None, **ddp_kwargs):
    """`model` in DistributedDataParallel when distributed, else `model` itself.

    The model must already be on `ctx.device`. Train through the returned wrapper
    (its forward is ACF.forward); read and save parameters through `unwrap(...)`.
    """
    ctx = ctx or context()
    if not ctx.is_distributed:
        return model
    ignore = ignored_names(model)
    DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
    with torch.no_grad():   # w_v is ignored by DDP, so keep it equal across ranks here
        for name, p in model.named_parameters():
            if name in ignore:
                dist.broadcast(p.data, src=0)
    _check_same_inputs(model)
    kwargs = {"find_unused_parameters": False}
    # Buffers are ignored above, so neither the construction-time sync nor the per-step
    # sync touches them; say so explicitly too (the argument was renamed in torch 2.13).
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        kwargs["forward_sync_buffers"] = False
    else:
        kwargs["broadcast_buffers"] = False
    if ctx.device.type == "cuda":
        kwargs["device_ids"] = [ctx.device.index]
        kwargs["output_device"] = ctx.device.index
    kwargs.update(ddp_kwargs)
    return DDP(model, **kwargs)


def unwrap(model):
    return model.module if isinstance(model, DDP) else model


def _table_fingerprint(table: torch.Tensor) -> tuple:
    """Shape, dtype and the float64 sum of a few rows: cheap (reads <= 8 rows of the map)."""
    rows = torch.linspace(0, table.shape[0] - 1, steps=min(8, table.shape[0])).long().unique()
    sample = table[rows.to(table.device)].double().sum().item()
    return tuple(table.shape), str(table.dtype), round(sample, 6)


def _check_same_inputs(model) -> None:
    """Ranks must hold the same catalogue and feature table (a stale cache on one node
    would otherwise train silently on different inputs)."""
    mine = (_table_fingerprint(model.feature_table), int(model.all_items.numel()))
    every = all_gather_object(mine)
    if any(x != every[0] for x in every):
        raise RuntimeError(f"ranks disagree on the feature table / catalogue: {every}; "
                           "rebuild the feature cache (delete *.acf-cache-*) on every node")


# ---------------------------------------------------------------------------- features
def prepare_feature_cache(path, dtype: torch.dtype = torch.float32) -> None:
    """Make sure the memory-mappable cache of feature file `path` is built exactly once
    per filesystem before any rank maps it (ACF(feature_path=...) then maps it).

    Global rank 0 builds (or validates) first; then local rank 0 of every other node,
    which finds it current on a shared filesystem and builds it on node-local disks.
    Errors on the builder are re-raised on every rank instead of leaving the others
    waiting at a barrier until the timeout.
    """
    ctx = context()
    if not ctx.is_distributed:
        return
    from .model.features import load_feature_table

    def build() -> str | None:
        try:
            table = load_feature_table(path, dtype)
            del table
            return None
        except Exception as exc:  # reported on every rank below
            return f"{type(exc).__name__}: {exc}"

    error = build() if ctx.rank == 0 else None
    error = broadcast_object(error, src=0)
    if error is None and ctx.local_rank == 0 and ctx.rank != 0:
        error = build()
    errors = [e for e in all_gather_object(error) if e]
    if errors:
        raise RuntimeError(f"building the feature cache of {path} failed: {errors[0]}")


# ---------------------------------------------------------------------------- checkpoints
def save_on_main(checkpoint: dict | Callable[[], dict], path) -> Path:
    """Rank 0 writes `checkpoint` (a dict, or a function building it, so other ranks do not
    even copy the state) atomically to `path`; every rank then waits for it."""
    from .model.checkpoint import save_checkpoint

    path = Path(path)
    error = None
    if is_main():
        try:
            save_checkpoint(checkpoint() if callable(checkpoint) else checkpoint, path)
        except Exception as exc:
            error = exc
    if context().is_distributed:
        # the broadcast doubles as the barrier and tells the other ranks if it failed
        message = broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
        if error is None and message is not None:
            raise RuntimeError(f"rank 0 failed to write checkpoint {path}: {message}")
    if error is not None:
        raise error
    return path


# ---------------------------------------------------------------------------- metrics
def gather_rows(rows: dict[str, np.ndarray], positions: np.ndarray, total: int) -> dict[str, np.ndarray]:
    """Per-group rows computed by the ranks, reassembled into single-process order.

    rows: {name: array [n_local, ...]} for the groups at `positions` (indices into
    0..total-1). Returns {name: array [total, ...]} on every rank; every position must
    be covered exactly once. Callers then reduce (mean, by-size tables...) the full
    arrays exactly as a single process does, so the results are bitwise equal.
    """
    positions = np.asarray(positions, dtype=np.int64)
    for name, value in rows.items():
        if len(value) != len(positions):
            raise ValueError(f"rows[{name!r}] has {len(value)} rows for {len(positions)} positions")
    if not context().is_distributed:
        parts = [(positions, rows)]
    else:
        parts = all_gather_object((positions, {k: np.asarray(v) for k, v in rows.items()}))
    covered = np.zeros(total, dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    for pos, part in parts:
        np.add.at(covered, pos, 1)
        for name, value in part.items():
            value = np.asarray(value)
            if name not in out:
                out[name] = np.zeros((total, *value.shape[1:]), dtype=value.dtype)
            out[name][pos] = value
    if not np.all(covered == 1):
        raise RuntimeError(f"gathered rows cover positions unevenly (min {covered.min()}, "
                           f"max {covered.max()} times)")
    return out


def gather_ordered(values: list, positions: list[int], total: int) -> list:
    """Per-position Python values (e.g. per-batch loss sums) from every rank, in position order."""
    merged: list = [None] * total
    seen = 0
    for pos, vals in all_gather_object((list(positions), list(values))):
        for p, v in zip(pos, vals):
            merged[p] = v
            seen += 1
    if seen != total or any(v is None for v in merged):
        raise RuntimeError(f"gathered {seen} values for {total} positions")
    return merged


def all_reduce_sums(*values: float) -> list[float]:
    """Sums over ranks of float64 scalars (e.g. a metric sum and its count)."""
    t = torch.tensor(values, dtype=torch.float64,
                     device=context().device if context().backend == "nccl" else "cpu")
    return [float(x) for x in _all_reduce_sum(t)]
