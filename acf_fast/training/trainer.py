"""`train`: the tutorial's ACFTrainer, made resumable and vectorised.

Triplets are read once into tensors; a batch is `tensor[index]`, no per-row collation
and no DataLoader workers. The pieces of a run each have their module: the settings
(config), the epoch order (sampler), one optimizer step (steps: eager, DDP or CUDA
graph, chosen once), the output folder and checkpoints (run_folder), SIGINT/SIGTERM
(signals) and validation (validation). This module holds the loop that joins them.

Failure modes each end with one clear message and the files on disk intact:
- Divergence: the first non-finite batch loss (or non-finite validation numbers, or
  non-finite parameters about to be saved) stops training with `TrainingDiverged` (a
  ValueError) naming the epoch and step; nothing from that point on is written, so
  last.pt / best.pt keep the last good state. A non-finite criterion never counts as
  an improvement.
- SIGINT / SIGTERM: last.pt is written at the next step boundary, then
  `TrainingInterrupted` (acf_fast.training.signals).
- `train()` refuses an output folder that already holds a run unless it resumes it
  (`resume=True`) or `overwrite=True` replaces it (acf_fast.training.run_folder), and
  one that another run is using, or that is not a writable folder, before reading any
  data (acf_fast.training.run_lock); a disk without room for one checkpoint is refused
  before the first step, a write that fails later stops with `CheckpointWriteError`.
- Resuming on another dataset than the checkpoint's is refused unless
  `check_dataset=False` (`--any-dataset`).

Resuming re-decides whether the run is complete under the *current* config: it is
complete when `epochs` epochs are done, or when early stopping applies (patience > 0
and the epochs without improvement so far >= patience). So a finished run resumed with
a larger `epochs` trains on to the new total, exactly as an uninterrupted run with that
total would have (the state after epoch e does not depend on `epochs`); with
`epochs=None` (the CLI without --epochs) it keeps the target recorded in last.pt. An
early-stopped run is NOT revived by a larger `epochs` alone: early stopping means "the
criterion stopped improving", which more epochs do not change; resume it with a larger
`patience` (or 0 = off) to continue, and the count of epochs without improvement
carries on from where it was (again what an uninterrupted run with that patience
does). A complete run is left untouched (no checkpoint is rewritten) and one line says
why there is nothing to do.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from .. import distributed
from ..data.formats import TripletSet
from ..data.prepared import PreparedDataset
from ..model.acf import ACF, check_feature_count
from ..model.losses import get_loss
from ..utils import env
from ..utils.progress import bar as tqdm
from .config import BEST, DEFAULT_EPOCHS, DTYPES, LAST, TrainConfig, parameter_groups
from .run_folder import RunFolder, TrainState, build_checkpoint, restore
from .run_lock import claim_run_folder, run_lock
from .sampler import EpochBatches
from .signals import SignalWatch
from .steps import GraphedStep, TrainStep, make_step, plain_step
from .validation import LEGEND, LOG_NAMES, validate


class Trainer:
    """One training run: data, model, optimizer and step are set up here; `fit` trains."""

    def __init__(self, config: TrainConfig):
        config.validate()
        self.cfg = config
        self.out, self.legend_shown = Path(config.out_dir), False
        data = self.dataset = PreparedDataset(config.data_dir)
        self.manifest, self.dataset_fingerprint = data.manifest, data.fingerprint
        self.features = data.features(config.features)      # default: the one `prepare` used
        self.n_users, self.n_items = data.n_users, data.n_items
        self.train_set: TripletSet = data.triplets("train", config.max_profile_size)
        self.val_set: TripletSet | None = (data.triplets("validation", config.max_profile_size)
                                           if data.has_validation() else None)
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
        self.optimizer = torch.optim.Adam(parameter_groups(self.model, config), lr=config.lr,
                                          weight_decay=config.weight_decay,
                                          fused=self.device.type == "cuda" or None,
                                          capturable=bool(config.cuda_graph))
        self.loss_fn = get_loss(config.loss)
        self.folder = RunFolder(self.out, self.dist)
        self.batches = EpochBatches(len(self.train_set), config.batch_size, config.seed)
        self.train_step: TrainStep = make_step(self)   # eager, DDP or graphed: chosen once
        self.signals = SignalWatch(self.dist)
        self.state = TrainState()
        self.step_losses: list[float] = []             # every batch loss this process computed
        self.resumed = False                           # state loaded from a checkpoint
        self.resumed_from: Path | None = None          # ... and from which file
        self.complete_reason: str | None = None        # why the last fit() had nothing to do

    @property
    def graph_step(self):   # the GraphedTrainStep this run replays, if any
        return getattr(self.train_step, "graph", None)

    @graph_step.setter
    def graph_step(self, graph) -> None:   # train through it; None: the eager or DDP step
        self.train_step = GraphedStep(self, graph) if graph is not None else plain_step(self)

    # ------------------------------------------------------------------ the run folder
    def checkpoint(self) -> dict:
        return build_checkpoint(self.model, self.optimizer, self.state, self.cfg,
                                self.dataset_fingerprint)

    def save(self, name: str) -> Path:
        """Checkpoint `name` written by rank 0; TrainingDiverged instead if the parameters are
        not finite (a diverged model never replaces a good file)."""
        return self.folder.save(name, self.model, self.checkpoint, self.state, self.cfg.lr)

    def claim_output(self) -> None:
        """Before a fresh run: refuse a folder holding another run, or (overwrite) clear it."""
        self.folder.claim(self.cfg.overwrite)

    def resume(self, path=None) -> bool:
        """Load last.pt (or `path`); returns False when there is nothing to resume."""
        ckpt = self.folder.read_resumable(self.cfg, path, self.dataset)
        if ckpt is None:
            return False
        self.state = restore(ckpt, self.model, self.optimizer, path or self.out / LAST)
        self.train_step.reset()
        self.resumed = True
        self.resumed_from = Path(path) if path else self.out / LAST
        if self.cfg.epochs is None:      # no target asked for: the run's own one
            target = ckpt.get("train_config", {}).get("epochs") or DEFAULT_EPOCHS
            self.cfg = dataclasses.replace(self.cfg, epochs=int(target))
        return True

    def resume_line(self) -> str:
        """One line: the point a resumed run continues from, and up to where it trains."""
        st = self.state
        where = (f"epoch {st.epoch + 1}, step {st.step} of {self.steps_per_epoch()}" if st.step
                 else f"the start of epoch {st.epoch + 1}")
        return (f"resuming {self.resumed_from} at {where} (global step {st.global_step}); "
                f"training up to epoch {self.cfg.epochs}")

    # ------------------------------------------------------------------ training
    def steps_per_epoch(self) -> int:
        return len(self.batches)

    def validate(self) -> dict:
        cfg = self.cfg
        return validate(self.model, self.loss_fn, self.val_set, cfg.batch_size, cfg.val_rank_samples,
                        cfg.seed, self.n_items, self.dist, progress=cfg.progress and self.dist.is_main)

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
        if self.cfg.epochs is None:      # a fresh run without a target: the default
            self.cfg = dataclasses.replace(self.cfg, epochs=DEFAULT_EPOCHS)
        self.out.mkdir(parents=True, exist_ok=True)
        with run_lock(self.out, enabled=self.dist.is_main):   # train() may hold it already
            self.complete_reason = self.completion()
            if self.complete_reason is not None:
                # nothing to do: say so, and leave the checkpoints exactly as they are
                self.state.finished = True
                if self.cfg.progress and self.dist.is_main:
                    print(self.complete_reason, flush=True)
                return self.summary()
            self.folder.check_space(self.model)
            self.state.finished = False
            if self.resumed and self.cfg.progress and self.dist.is_main:
                print(self.resume_line(), flush=True)
            with self.signals.installed():
                return self._fit()

    def _fit(self) -> dict:
        cfg, st = self.cfg, self.state
        self.model.train()
        steps = self.steps_per_epoch()
        while not st.finished and st.epoch < cfg.epochs:
            bar = tqdm(total=steps, initial=st.step, desc=f"epoch {st.epoch + 1}/{cfg.epochs}",
                       unit="batch", disable=not cfg.progress or not self.dist.is_main,
                       dynamic_ncols=True)
            try:
                if not self._run_epoch(bar, steps):
                    return self.summary()                     # max_steps reached
                self._poll_signal(bar, steps)                 # all batches done, before validation
            finally:
                bar.close()
            self._end_epoch(steps)
        st.finished = True
        self.save(LAST)
        return self.summary()

    def _run_epoch(self, bar, steps: int) -> bool:
        """The rest of this epoch's steps; False when max_steps stopped it."""
        cfg, st = self.cfg, self.state
        t0, seen = time.perf_counter(), 0
        while st.step < steps:
            self._poll_signal(bar, steps)                     # a step boundary
            if cfg.max_steps is not None and st.global_step >= cfg.max_steps:
                self._drain(steps)
                if st.step:   # mid-epoch: keep the work, resumable like an interrupt
                    self.save(LAST)
                return False
            idx = self.batches.global_batch(st.epoch, st.step)
            value = self.train_step(idx)                      # the global value: same on all ranks
            st.step += 1
            st.global_step += 1
            self._account(value, steps, self.train_step.lag)
            seen += idx.numel()
            # postfix first and without its own redraw: update() redraws at the
            # bar's pace (see acf_fast.utils.progress), not at every step
            bar.set_postfix(loss=f"{st.loss_sum / max(st.step - self.train_step.lag, 1):.4f}",
                            trip_s=f"{seen / max(time.perf_counter() - t0, 1e-9):.0f}", refresh=False)
            bar.update()
            if cfg.checkpoint_every and st.global_step % cfg.checkpoint_every == 0 and st.step < steps:
                self._drain(steps)
                self.save(LAST)
        self._drain(steps)
        return True

    def _account(self, value: float | None, steps: int, lag: int) -> None:
        """Record the loss of the step `lag` steps back (None: nothing to record yet)."""
        st = self.state
        if value is not None and not math.isfinite(value):
            raise self.folder.diverged(
                f"the loss is {value} at epoch {st.epoch + 1}, step {st.step - lag} of {steps} "
                f"(global step {st.global_step - lag}); nothing was saved from this step on",
                self.cfg.lr)
        if value is not None:
            self.step_losses.append(value)
            st.loss_sum += value

    def _drain(self, steps: int) -> None:   # a loss still on its way back, before a save
        self._account(self.train_step.flush(), steps, 0)

    def _poll_signal(self, bar, steps: int) -> None:
        signum = self.signals.pending()
        if not signum:
            return
        st = self.state
        self._drain(steps)
        path = self.save(LAST)                      # the mid-epoch state, as checkpoint_every writes it
        bar.close()
        where = f"epoch {st.epoch + 1}, step {st.step} of {steps} (global step {st.global_step})"
        raise self.signals.interruption(signum, where, path)

    def _end_epoch(self, steps: int) -> None:
        cfg, st = self.cfg, self.state
        record = {"epoch": st.epoch + 1, "train_loss": st.loss_sum / steps}
        record.update(self.validate())
        bad = {k: v for k, v in record.items() if k != "epoch" and not math.isfinite(v)}
        if bad:   # the same numbers on every rank: all of them stop here
            raise self.folder.diverged(
                f"after epoch {record['epoch']} " + ", ".join(f"{k}={v}" for k, v in bad.items())
                + "; nothing from this epoch was saved", cfg.lr)
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
        self.folder.write_history(st.history)   # rank 0 writes and prints for all
        if cfg.progress and self.dist.is_main:
            if not self.legend_shown and "val_auc" in record:    # once: what val_auc measures
                print(LEGEND, flush=True)
                self.legend_shown = True
            parts = [f"{LOG_NAMES.get(k, k)}={v:.5f}" for k, v in record.items() if k != "epoch"]
            flag = " (best)" if improved else ""
            stop = (f"; early stop after {st.bad_epochs} epochs without improvement"
                    if st.finished and st.epoch < cfg.epochs else "")   # not at the last epoch
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
    status 130/143) on SIGINT/SIGTERM after saving last.pt, RunFolderInUse when another run
    holds the output folder, ValueError for an output path that is not a writable folder,
    CheckpointWriteError (an OSError) when a checkpoint cannot be written.
    """
    cfg = config or TrainConfig(**kwargs)
    cfg.validate()
    # OUT checked and locked before any data is read; under torchrun rank 0 holds the lock
    with claim_run_folder(cfg.out_dir, is_main=env.integer("RANK", 0) == 0):
        trainer = Trainer(cfg)
        if resume and trainer.resume():
            return trainer.fit()
        trainer.claim_output()
        if resume and cfg.progress and distributed.is_main():
            print(f"nothing to resume in {cfg.out_dir}; starting from scratch")
        return trainer.fit()
