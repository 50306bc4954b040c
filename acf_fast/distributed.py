"""torch.distributed plumbing: `torchrun` runs acf_fast unchanged.

The process group, collectives, DDP wrapping, the feature cache built once per node,
rank-0 checkpoint writes, and per-rank results gathered back into single-process order.
With WORLD_SIZE unset or 1 nothing is started and every helper degrades to the
single-process behaviour, so callers need no `if distributed:` branches. The design is
in docs/distributed.md; its training parts live with the training code: the epoch walk
every rank shares (acf_fast.training.sampler) and the loss scaled for DDP's gradient
average (acf_fast.training.steps). Imports only torch, numpy, acf_fast.model and utils.
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

    Reads what torchrun exports (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT): NCCL when the rank's device is a GPU (one GPU per
    LOCAL_RANK), gloo on CPU (docs/distributed.md#process-group).

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


def shutdown(clean: bool = False) -> None:
    """Destroy the process group if `init_distributed` created it. clean=True (every rank
    finished normally): meet at a barrier first, so that no rank tears its gloo pairs
    down while a peer is still talking to it (seen once as a rank aborting with
    "terminate called without an active exception" at the end of a run). After an
    error the peers may never arrive, so no barrier then."""
    global _CONTEXT, _OWNS_GROUP
    if _OWNS_GROUP and dist.is_initialized():
        if clean:
            dist.barrier()
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


def _collective_device(ctx: DistContext) -> torch.device:
    return ctx.device if ctx.backend == "nccl" else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over ranks, in place (a no-op in one process)."""
    if context().is_distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_sums(*values: float) -> list[float]:
    """Sums over ranks of float64 scalars (e.g. a metric sum and its count)."""
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device(context()))
    return [float(x) for x in all_reduce_sum(t)]


def all_reduce_max(value: int, ctx: DistContext | None = None) -> int:
    """The largest of the ranks' `value`s (one tiny all-reduce), e.g. a signal that one
    rank received, so that every rank acts on it at the same step."""
    ctx = ctx or context()
    if not ctx.is_distributed:
        return value
    flag = torch.tensor([value], dtype=torch.int64, device=_collective_device(ctx))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


# ---------------------------------------------------------------------------- DDP
def ignored_names(model) -> list[str]:
    """What DDP must leave alone in an ACF (docs/distributed.md#ddp-wrapping).

    Every buffer: the feature table and the catalogue ids are inputs, identical on every
    rank by construction and never trained, so they are never broadcast, neither at
    construction (the table can be 13 GB, and on CPU it is a read-only memory map that a
    broadcast would write into) nor per step. And the tutorial's `user_model.w_v`, created
    but never used: ignoring it keeps find_unused_parameters=False (no graph walk each
    step) and keeps w_v exactly as one process leaves it, where find_unused_parameters=True
    would all-reduce a zero gradient into it that Adam's weight decay then acts on.
    """
    names = [n for n, _ in model.named_buffers()]
    names += [n for n, _ in model.named_parameters() if n.startswith("user_model.w_v.")]
    return names


def wrap_model(model, ctx: DistContext | None = None, **ddp_kwargs):
    """`model` in DistributedDataParallel when distributed, else `model` itself.

    The model must already be on `ctx.device`. Train through the returned wrapper
    (its forward is ACF.forward); read and save parameters through `unwrap(...)`. DDP
    leaves `ignored_names(model)` alone, so w_v is broadcast from rank 0 once here, and
    the ranks check that they hold the same feature table and catalogue.
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
    The other ranks wait, then map the finished cache read-only: a node's ranks share
    one copy in the page cache. Errors on the builder are re-raised on every rank
    instead of leaving the others waiting at a barrier until the timeout.
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
    arrays exactly as a single process does, so the results are bitwise equal, not an
    average of per-rank averages.
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


def shard_blocks(n: int, block: int, rank: int | None = None, world_size: int | None = None):
    """The [start, stop) blocks of a single-process loop `range(0, n, block)` this rank owns
    (block i goes to rank i % world_size). Whole blocks are dealt out, not rows, so every
    block is computed with exactly the batch shape a single process uses."""
    ctx = context()
    rank = ctx.rank if rank is None else rank
    world_size = ctx.world_size if world_size is None else world_size
    return [(s, min(s + block, n)) for s in range(rank * block, n, block * world_size)]
