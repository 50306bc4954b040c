"""`train`: the tutorial's ACFTrainer, made resumable and vectorised.

Why it is built this way:
- Triplets are read once into tensors; a batch is `tensor[index]`, no per-row
  collation and no DataLoader workers.
- The order of epoch e is `randperm(T)` from a generator seeded with (seed, e).
  Nothing else is random during training (ACF has no dropout), so the state that
  determines the rest of a run is: parameters, Adam's state, epoch, step within
  the epoch, and the running epoch statistics. All of it goes into the
  checkpoint, so a run resumed from any checkpoint (end of epoch, or mid-epoch with
  `checkpoint_every`) computes exactly the losses an uninterrupted run computes.
  A distributed sampler can take `perm[rank::world]` of the same permutation.
- Checkpoints use the tutorial's keys {epoch, loss, model_args, state_dict,
  optimizer} (so `ACF.from_checkpoint` and the tutorial read them) plus
  `train_state` for resuming, and are written atomically (temp file + rename):
  `last.pt` after every epoch (and every `checkpoint_every` steps), `best.pt` when
  the validation criterion improves; `history.json` holds the per-epoch records.
- Failure modes, each ending with one clear message and the files on disk intact:
  * Divergence: the first non-finite batch loss (or non-finite validation numbers, or
    non-finite parameters about to be saved) stops training with `TrainingDiverged`
    (a ValueError) naming the epoch and step; nothing from that point on is written,
    so last.pt / best.pt keep the last good state. A non-finite criterion never
    counts as an improvement.
  * SIGINT / SIGTERM: the handler only sets a flag; at the next step boundary last.pt
    is written with the mid-epoch state (what `checkpoint_every` writes, so a resume
    is bit-identical) and `TrainingInterrupted` (a SystemExit with status 130 / 143)
    ends the process after a one-line message. A second signal stops at once (the
    previous last.pt stays: writes are atomic). The previous handlers are restored
    when `fit` returns.
  * `train()` refuses an output folder that already holds a run (best.pt, last.pt,
    history.json) unless it resumes it (`resume=True`) or `overwrite=True` replaces
    it. (`Trainer` itself does not check: the demo rebuilds its own folder.)
- Resuming re-decides whether the run is complete under the *current* config: it is
  complete when `epochs` epochs are done, or when early stopping applies
  (patience > 0 and the epochs without improvement so far >= patience). So a finished
  run resumed with a larger `epochs` trains on to the new total, exactly as an
  uninterrupted run with that total would have (the state after epoch e does not
  depend on `epochs`). An early-stopped run is NOT revived by a larger `epochs` alone:
  early stopping means "the criterion stopped improving", which more epochs do not
  change; resume it with a larger `patience` (or 0 = off) to continue, and the count
  of epochs without improvement carries on from where it was (again what an
  uninterrupted run with that patience does). A complete run is left untouched (no
  checkpoint is rewritten) and one line says why there is nothing to do.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from ..utils.progress import bar as tqdm

from .. import distributed
from ..model.checkpoint import make_checkpoint, read_checkpoint
from ..data.formats import TripletSet, read_triplets
from ..data.sampling import load_manifest
from ..utils.devices import check_device
from ..model.losses import get_loss
from ..evaluation.metrics import ranking_metrics
from ..model.acf import ACF, check_feature_count

LAST, BEST, HISTORY = "last.pt", "best.pt", "history.json"
RUN_FILES = (BEST, LAST, HISTORY)        # what a training run leaves in its output folder
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    data_dir: str
    out_dir: str
    features: str | None = None          # default: the one `prepare` used
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-5
    loss: str = "warp"
    model_dim: int = 128
    max_profile_size: int = 9
    seed: int = 0
    patience: int = 3                    # epochs without improvement before stopping (0 = never)
    select_by: str = "loss"              # "loss" (validation loss, the tutorial) or "auc"
    val_rank_samples: int = 1000         # validation triplets ranked against the catalogue per epoch
    checkpoint_every: int = 0            # also write last.pt every N steps (0 = per epoch only)
    backend: str = "auto"
    device: str = "cpu"
    feature_dtype: str = "float32"
    max_steps: int | None = None         # stop after this many optimizer steps in total (tests, smoke runs)
    num_threads: int | None = None       # torch CPU threads (None or 0: torch's default). On a busy or
                                         # small machine 1 thread is often faster for small models.
    progress: bool = True
    overwrite: bool = False              # train(): replace a run already in out_dir instead of refusing
    cuda_graph: bool = False             # replay each full batch's step from a CUDA graph (triton
                                         # backend on one GPU; see acf_fast.training.cuda_graph)

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "model_dim", "max_profile_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        get_loss(self.loss)
        if self.select_by not in ("loss", "auc"):
            raise ValueError(f"select_by must be 'loss' or 'auc', got {self.select_by!r}")
        if self.feature_dtype not in DTYPES:
            raise ValueError(f"feature_dtype must be one of {list(DTYPES)}, got {self.feature_dtype!r}")
        if self.checkpoint_every < 0 or self.patience < 0:
            raise ValueError(f"checkpoint_every and patience must be >= 0, got {self.checkpoint_every}, "
                             f"{self.patience}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (or None for no limit), got {self.max_steps}")
        if self.val_rank_samples < 0:
            raise ValueError(f"val_rank_samples must be >= 0 (0: no validation AUC/RR), "
                             f"got {self.val_rank_samples}")
        if self.select_by == "auc" and self.val_rank_samples == 0:
            raise ValueError("select_by='auc' needs val_rank_samples >= 1 (the AUC is computed on them)")
        if self.num_threads is not None and self.num_threads < 0:
            raise ValueError(f"threads must be >= 1 (or 0 / unset for torch's default), "
                             f"got {self.num_threads}")
        dev = check_device(self.device)
        if self.cuda_graph and (dev.type if dev is not None else
                                "cuda" if torch.cuda.is_available() else "cpu") != "cuda":
            raise ValueError(f"cuda_graph needs a CUDA device, got device={self.device!r}")


class TrainingDiverged(ValueError):
    """The loss, the validation numbers or the parameters became NaN/inf; nothing was saved
    from that point on (last.pt and best.pt hold the last good state)."""


class TrainingInterrupted(SystemExit):
    """SIGINT/SIGTERM stopped training at a step boundary after last.pt was written.

    A SystemExit whose status is 128 + the signal number (130 for SIGINT, 143 for
    SIGTERM), so that a command line exits with the conventional status without a
    traceback; `message` (also str()) is the one line printed, `path` the checkpoint.
    """

    def __init__(self, signum: int, message: str, path: Path):
        super().__init__(128 + int(signum))
        self.signum, self.message, self.path = int(signum), message, path

    def __str__(self) -> str:
        return self.message


@dataclass
class TrainState:
    epoch: int = 0                 # the epoch in progress (or next to start)
    step: int = 0                  # batches of that epoch already done
    global_step: int = 0
    loss_sum: float = 0.0          # running sum of this epoch's batch losses
    best: float | None = None      # best validation criterion so far (lower is better)
    best_epoch: int = -1
    bad_epochs: int = 0
    finished: bool = False
    history: list = field(default_factory=list)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch `epoch`: depends only on (seed, epoch), so resuming needs no RNG state."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


class Trainer:
    def __init__(self, config: TrainConfig):
        config.validate()
        self.cfg = config
        self.out = Path(config.out_dir)
        self.manifest = load_manifest(config.data_dir)
        self.features = config.features or self.manifest["features"]
        self.n_users, self.n_items = self.manifest["n_users"], self.manifest["n_items"]
        data = Path(config.data_dir)
        files = self.manifest["files"]
        read = lambda name: read_triplets(data / files[name], config.max_profile_size,
                                          n_users=self.n_users, n_items=self.n_items)
        self.train_set: TripletSet = read("train")
        self.val_set: TripletSet | None = read("validation") if self.manifest.get(
            "n_validation_triplets", 1) else None
        # under torchrun: the process group, and this rank's device (cuda:LOCAL_RANK on GPUs)
        self.dist = distributed.init_distributed(config.device)
        self.device = self.dist.device
        distributed.prepare_feature_cache(self.features, DTYPES[config.feature_dtype])
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(config.seed)                   # parameter init is reproducible
        self.model = ACF(self.n_users, self.n_items, feature_path=self.features,
                         model_dim=config.model_dim, backend=config.backend,
                         feature_dtype=DTYPES[config.feature_dtype],
                         max_profile_size=config.max_profile_size).to(self.device)
        self.net = distributed.wrap_model(self.model)   # DDP under torchrun, else self.model
        check_feature_count(self.model, self.n_items, self.features)
        # fused on CUDA: one kernel for all parameters instead of a dozen per step (the
        # fused step is host-bound there); the CPU keeps the default, whose results
        # the resume tests pin down
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr,
                                          weight_decay=config.weight_decay,
                                          fused=self.device.type == "cuda" or None,
                                          capturable=config.cuda_graph)
        self.loss_fn = get_loss(config.loss)
        self.graph_step = None
        if config.cuda_graph:
            if self.dist.is_distributed:
                raise ValueError("cuda_graph runs on one GPU; it cannot be combined with torchrun")
            from .cuda_graph import GraphedTrainStep
            self.graph_step = GraphedTrainStep(self.model, self.optimizer, self.loss_fn)
        self.state = TrainState()
        self.step_losses: list[float] = []             # every batch loss this process computed
        self.resumed = False                           # state loaded from a checkpoint
        self.complete_reason: str | None = None        # why the last fit() had nothing to do
        self._signal = 0                               # signal received, acted on at a step boundary

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> dict:
        last = self.state.history[-1] if self.state.history else {}
        return make_checkpoint(
            self.model, self.optimizer, epoch=self.state.epoch,
            loss=last.get("val_loss", float("nan")),
            train_state=asdict(self.state), train_config=asdict(self.cfg),
            max_profile_size=self.cfg.max_profile_size, backend=self.model.resolved_backend(),
            torch_rng_state=torch.get_rng_state())

    def save(self, name: str) -> Path:
        self._check_parameters_finite(name)        # a diverged model never replaces a good file
        return distributed.save_on_main(self.checkpoint, self.out / name)   # rank 0 writes

    def _check_parameters_finite(self, name: str) -> None:
        params = [p.detach() for p in self.model.parameters()]
        if not params or bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            return
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        st = self.state
        raise TrainingDiverged(
            f"training diverged: parameters {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} are "
            f"NaN/inf at epoch {st.epoch + 1}, step {st.step} (global step {st.global_step}); "
            f"{self.out / name} was not written{self._kept()}; lower the learning rate "
            f"(lr={self.cfg.lr:g})")

    def _kept(self) -> str:
        kept = [n for n in (LAST, BEST) if (self.out / n).exists()]
        return f" ({', '.join(kept)} in {self.out} keep the last good state)" if kept else ""

    # ------------------------------------------------------------------ the output folder
    def existing_run_files(self) -> list[str]:
        """The files of a training run already in the output folder (any rank's view)."""
        mine = [n for n in RUN_FILES if (self.out / n).exists()]
        seen = set().union(*map(set, distributed.all_gather_object(mine)))
        return [n for n in RUN_FILES if n in seen]

    def claim_output(self) -> None:
        """Before a fresh run: refuse a folder holding another run, or (overwrite) clear it."""
        found = self.existing_run_files()
        if not found:
            return
        if not self.cfg.overwrite:
            if LAST in found:
                hint = "pass --resume to continue it"
            else:
                hint = f"it has no {LAST} to resume from"
            raise ValueError(f"{self.out} already holds a training run ({', '.join(found)}): {hint}, "
                             "choose a new output folder, or pass --overwrite to replace it")
        if self.dist.is_main:
            for name in found:
                (self.out / name).unlink(missing_ok=True)
        distributed.barrier()

    def resume(self, path=None) -> bool:
        """Load last.pt (or `path`); returns False when there is nothing to resume."""
        path = Path(path) if path else self.out / LAST
        seen = distributed.all_gather_object(path.exists())   # under torchrun: every rank's view
        if any(seen) and not all(seen):
            raise RuntimeError(f"{path} exists for some ranks only: put the output folder on a "
                               "filesystem every node shares to resume a multi-node run")
        if not path.exists():
            return False
        ckpt = read_checkpoint(path)
        if "train_state" not in ckpt:
            raise ValueError(f"{path} has no train_state: it is not a resumable acf_fast checkpoint")
        old = ckpt.get("train_config", {})
        for key in ("batch_size", "seed", "model_dim", "max_profile_size", "loss"):
            if key in old and old[key] != getattr(self.cfg, key):
                raise ValueError(f"cannot resume {path}: it was trained with {key}={old[key]!r}, "
                                 f"this run asks for {key}={getattr(self.cfg, key)!r}")
        self.model.load_state_dict(ckpt["state_dict"])
        # the implementation flags are this run's choice, not the saved run's (a GPU run's
        # fused/capturable Adam resumed on the CPU, or the other way round)
        flags = [{k: g.get(k) for k in ("fused", "capturable", "foreach")}
                 for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group, own in zip(self.optimizer.param_groups, flags):
            group.update(own)
            if group.get("fused") or group.get("capturable"):
                # load_state_dict placed the step counts by the *saved* flags: a CPU run's
                # stay on the host, where fused / capturable Adam cannot count them
                for p in group["params"]:
                    state = self.optimizer.state.get(p, {})
                    if torch.is_tensor(state.get("step")):
                        state["step"] = state["step"].to(p.device, torch.float32)
        if self.graph_step is not None:
            self.graph_step.reset()
        self.state = TrainState(**ckpt["train_state"])
        if "torch_rng_state" in ckpt:
            torch.set_rng_state(ckpt["torch_rng_state"])
        self.resumed = True
        return True

    # ------------------------------------------------------------------ batches
    def _batch(self, data: TripletSet, idx: torch.Tensor):
        dev = self.device
        prof = data.profile[idx]
        width = max(int((prof > 0).sum(1).max()), 1)   # drop all-padding columns: less work, same result
        return (data.user[idx].to(dev), prof[:, :width].to(dev), data.pos[idx].to(dev),
                data.neg[idx].to(dev))

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_set) / self.cfg.batch_size)

    def _loss(self, idx: torch.Tensor):
        """(loss to backward, None) for global batch `idx`. Under torchrun: this rank's piece
        of it through DDP, the loss scaled so that DDP's gradient average is the
        single-process gradient, and the global batch's loss value (acf_fast.distributed)."""
        if not self.dist.is_distributed:
            ps, ns = self.model(*self._batch(self.train_set, idx))
            return self.loss_fn(ps, ns), None
        local, n_real = distributed.split_global_batch(idx, self.dist.rank, self.dist.world_size)
        ps, ns = self.net(*self._batch(self.train_set, local))
        loss, local_sum = distributed.distributed_loss(self.cfg.loss, ps, ns, n_real, idx.numel())
        return loss, distributed.global_loss_value(local_sum, idx.numel())

    def _graphed_step(self, idx: torch.Tensor) -> torch.Tensor:
        """One whole step (forward, loss, backward, Adam) through the CUDA graph, fed with
        host tensors (checked on the host, so the GPU never waits for a check)."""
        data = self.train_set
        return self.graph_step(data.user[idx], data.profile[idx], data.pos[idx], data.neg[idx])

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> dict:
        if self.val_set is None or len(self.val_set) == 0:
            return {}
        self.model.eval()
        starts = range(0, len(self.val_set), self.cfg.batch_size)
        mine = range(self.dist.rank, len(starts), self.dist.world_size)   # whole batches per rank
        sums = []
        for b in mine:
            idx = torch.arange(starts[b], min(starts[b] + self.cfg.batch_size, len(self.val_set)))
            u, p, pos, neg = self._batch(self.val_set, idx)
            ps, ns = self.model(u, p, pos, neg)
            sums.append(float(self.loss_fn(ps, ns)) * idx.numel())
        # summed in batch order, as one process does: the same value on every rank
        total = sum(distributed.gather_ordered(sums, list(mine), len(starts)))
        out = {"val_loss": total / len(self.val_set)}
        out.update(self._validation_ranking())
        self.model.train()
        return out

    def _validation_ranking(self) -> dict:
        """AUC and RR of pi among all items (profile excluded) on a fixed subset of validation triplets."""
        n = min(self.cfg.val_rank_samples, len(self.val_set))
        if n == 0:
            return {}
        gen = torch.Generator().manual_seed(self.cfg.seed + 17)
        pick = torch.randperm(len(self.val_set), generator=gen)[:n]
        from ..model.scoring import rank_targets, score_catalogue

        model = self.model
        ranks, positions = [np.zeros((0, 1), dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
        finite = [np.zeros(0, dtype=bool)]
        for s, e in distributed.shard_blocks(n, 256):       # blocks dealt to ranks, then gathered
            u, p, pos, _ = self._batch(self.val_set, pick[s:e])
            # the scores model.recommend_all gives, without its exception for non-finite user
            # vectors: a rank that raised alone would leave the others waiting in gather_rows
            user = model.user_vectors(u, p)[0]
            scores = score_catalogue(user, model.item_model.weight, model.all_items, model.model_dim)
            # a NaN score compares false with everything: it would rank first (AUC 1)
            finite.append(torch.isfinite(scores).all(1).cpu().numpy())
            ranks.append(rank_targets(scores, model.all_items, pos[:, None], exclude=p).cpu().numpy())
            positions.append(np.arange(s, e))
        rows = distributed.gather_rows({"rank": np.concatenate(ranks), "finite": np.concatenate(finite)},
                                       np.concatenate(positions), n)
        if not rows["finite"].all():
            return {"val_auc": float("nan"), "val_rr": float("nan")}
        m = ranking_metrics(rows["rank"], np.ones(n), self.n_items, ks=(20,))
        return {"val_auc": float(m["AUC"].mean()), "val_rr": float(m["RR"].mean())}

    # ------------------------------------------------------------------ training
    def completion(self) -> str | None:
        """Why the run is complete under the current config (None: there is training to do)."""
        cfg, st = self.cfg, self.state
        stopped = cfg.patience > 0 and st.bad_epochs >= cfg.patience
        done = st.epoch >= cfg.epochs
        if not (stopped or done):
            return None
        best = f"best epoch {st.best_epoch}"
        if stopped:
            why = (f"early-stopped after epoch {st.epoch}: {st.bad_epochs} epochs without improvement "
                   f"(patience {cfg.patience}; {best})")
            more = "pass a larger --patience (or 0 = off)" + (" and a larger --epochs" if done else "")
        else:
            why = f"{st.epoch} of {cfg.epochs} epochs done ({best})"
            more = "pass a larger --epochs"
        return f"the run in {self.out} is already complete: {why}; {more} to train further"

    def fit(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        self.complete_reason = self.completion()
        if self.complete_reason is not None:
            # nothing to do: say so, and leave the checkpoints exactly as they are
            self.state.finished = True
            if self.cfg.progress and self.dist.is_main:
                print(self.complete_reason, flush=True)
            return self.summary()
        self.state.finished = False
        with self._signal_handlers():
            return self._fit()

    def _fit(self) -> dict:
        cfg, st = self.cfg, self.state
        self.model.train()
        n, bs = len(self.train_set), cfg.batch_size
        steps = self.steps_per_epoch()
        while not st.finished and st.epoch < cfg.epochs:
            perm = epoch_permutation(n, cfg.seed, st.epoch)
            bar = tqdm(total=steps, initial=st.step, desc=f"epoch {st.epoch + 1}/{cfg.epochs}",
                       unit="batch", disable=not cfg.progress or not self.dist.is_main,
                       dynamic_ncols=True)
            t0, seen = time.perf_counter(), 0
            try:
                while st.step < steps:
                    self._poll_signal(bar, steps)             # a step boundary
                    if cfg.max_steps is not None and st.global_step >= cfg.max_steps:
                        if st.step:   # mid-epoch: keep the work, resumable like an interrupt
                            self.save(LAST)
                        return self.summary()
                    idx = perm[st.step * bs:(st.step + 1) * bs]
                    if self.graph_step is not None:
                        loss, value = self._graphed_step(idx), None
                    else:
                        self.optimizer.zero_grad(set_to_none=True)
                        loss, value = self._loss(idx)
                        loss.backward()
                        self.optimizer.step()
                    value = loss.item() if value is None else value   # the global value: same on all ranks
                    if not math.isfinite(value):
                        raise TrainingDiverged(
                            f"training diverged: the loss is {value} at epoch {st.epoch + 1}, step "
                            f"{st.step + 1} of {steps} (global step {st.global_step + 1}); nothing was "
                            f"saved from this step on{self._kept()}; lower the learning rate "
                            f"(lr={cfg.lr:g})")
                    self.step_losses.append(value)
                    st.loss_sum += value
                    st.step += 1
                    st.global_step += 1
                    seen += idx.numel()
                    # postfix first and without its own redraw: update() redraws at the
                    # bar's pace (see acf_fast.utils.progress), not at every step
                    bar.set_postfix(loss=f"{st.loss_sum / st.step:.4f}",
                                    trip_s=f"{seen / max(time.perf_counter() - t0, 1e-9):.0f}",
                                    refresh=False)
                    bar.update()
                    if cfg.checkpoint_every and st.global_step % cfg.checkpoint_every == 0 and st.step < steps:
                        self.save(LAST)
                self._poll_signal(bar, steps)                 # all batches done, before validation
            finally:
                bar.close()
            self._end_epoch(steps)
        st.finished = True
        self.save(LAST)
        return self.summary()

    # ------------------------------------------------------------------ signals
    @contextmanager
    def _signal_handlers(self):
        """SIGINT/SIGTERM set a flag that the loop acts on at the next step boundary; a second
        signal stops at once. Only the main thread can install handlers: elsewhere, none;
        ignored signals (SIG_IGN) are left ignored. The previous handlers come back on exit."""
        self._signal = 0
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        wanted = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
        previous = {s: signal.getsignal(s) for s in wanted}
        # a signal the process was told to ignore (a background job's SIGINT) stays ignored
        previous = {s: h for s, h in previous.items() if h is not signal.SIG_IGN}
        wanted = list(previous)

        def handler(signum, frame):
            if self._signal:                 # asked twice: stop now, the last checkpoint stays
                for s, h in previous.items():
                    signal.signal(s, h if h is not None else signal.SIG_DFL)
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                raise SystemExit(128 + signum)
            self._signal = signum

        try:
            for s in wanted:
                signal.signal(s, handler)
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)

    def _pending_signal(self) -> int:
        """The signal to act on now; under torchrun every rank agrees (one tiny all-reduce), so
        all of them stop at the same step."""
        if not self.dist.is_distributed:
            return self._signal
        import torch.distributed as dist

        dev = self.device if self.dist.backend == "nccl" else torch.device("cpu")
        flag = torch.tensor([self._signal], dtype=torch.int64, device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def _poll_signal(self, bar, steps: int) -> None:
        signum = self._pending_signal()
        if not signum:
            return
        st = self.state
        path = self.save(LAST)                      # the mid-epoch state, as checkpoint_every writes it
        bar.close()
        name = signal.Signals(signum).name
        message = (f"training interrupted by {name} at epoch {st.epoch + 1}, step {st.step} of {steps} "
                   f"(global step {st.global_step}); saved {path}; to continue, run the same train "
                   f"command with --resume")
        if self.dist.is_main:
            print(message, file=sys.stderr, flush=True)
        raise TrainingInterrupted(signum, message, path)

    def _end_epoch(self, steps: int) -> None:
        cfg, st = self.cfg, self.state
        record = {"epoch": st.epoch + 1, "train_loss": st.loss_sum / steps}
        record.update(self.validate())
        bad = {k: v for k, v in record.items() if k != "epoch" and not math.isfinite(v)}
        if bad:   # the same numbers on every rank: all of them stop here
            raise TrainingDiverged(
                f"training diverged: after epoch {record['epoch']} "
                + ", ".join(f"{k}={v}" for k, v in bad.items())
                + f"; nothing from this epoch was saved{self._kept()}; lower the learning rate "
                f"(lr={cfg.lr:g})")
        key = "val_loss" if cfg.select_by == "loss" else "val_auc"
        if key in record:
            crit = record[key] if key == "val_loss" else -record[key]
        else:                                  # no validation set: the training loss decides
            crit = record["train_loss"]
        improved = math.isfinite(crit) and (st.best is None or crit < st.best)   # NaN never wins
        st.history.append(record)
        st.epoch, st.step, st.loss_sum = st.epoch + 1, 0, 0.0
        if improved:
            st.best, st.best_epoch, st.bad_epochs = float(crit), record["epoch"], 0
        else:
            st.bad_epochs += 1
        if cfg.patience and st.bad_epochs >= cfg.patience:
            st.finished = True
        if improved:
            self.save(BEST)
        self.save(LAST)
        if not self.dist.is_main:    # rank 0 writes and prints for all
            return
        # the whole history, rewritten atomically: a resumed run never duplicates or loses a line
        tmp = self.out / f".{HISTORY}.tmp"
        tmp.write_text(json.dumps(st.history, indent=1))
        tmp.replace(self.out / HISTORY)
        if cfg.progress:
            parts = [f"{k}={v:.5f}" for k, v in record.items() if k != "epoch"]
            flag = " (best)" if improved else ""
            stop = f"; early stop after {st.bad_epochs} epochs without improvement" if st.finished else ""
            print(f"epoch {record['epoch']}: " + " ".join(parts) + flag + stop, flush=True)

    def summary(self) -> dict:
        st = self.state
        return {"epochs_done": st.epoch, "global_step": st.global_step, "best_epoch": st.best_epoch,
                "best": st.best, "history": st.history, "finished": st.finished,
                "last": str(self.out / LAST), "best_checkpoint": str(self.out / BEST),
                "backend": self.model.resolved_backend(), "already_complete": self.complete_reason}


def train(config: TrainConfig | None = None, resume: bool = False, **kwargs) -> dict:
    """Train (or resume) and return a summary; kwargs fill a TrainConfig.

    Without `resume`, an output folder that already holds a run is refused (ValueError)
    unless `config.overwrite`, which deletes that run's files first. With `resume` and no
    last.pt, training starts from scratch (the same check applies to leftover files).
    Raises TrainingDiverged (a ValueError) on NaN/inf, TrainingInterrupted (a SystemExit,
    status 130/143) on SIGINT/SIGTERM after saving last.pt.
    """
    cfg = config or TrainConfig(**kwargs)
    trainer = Trainer(cfg)
    if resume and trainer.resume():
        return trainer.fit()
    trainer.claim_output()
    if resume and cfg.progress and distributed.is_main():
        print(f"nothing to resume in {cfg.out_dir}; starting from scratch")
    return trainer.fit()
