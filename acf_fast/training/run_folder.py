"""The output folder of a training run: claiming it, checkpoints, the history, resuming.

- Checkpoints use the tutorial's keys {epoch, loss, model_args, state_dict, optimizer}
  (so `ACF.from_checkpoint` and the tutorial read them) plus `train_state` for resuming,
  and are written atomically (temp file + rename), by rank 0 only under torchrun:
  `last.pt` after every epoch (and every `checkpoint_every` steps), `best.pt` when the
  validation criterion improves; `history.json` holds the per-epoch records.
- The state that determines the rest of a run is: parameters, Adam's state, epoch,
  step within the epoch, and the running epoch statistics (`TrainState`); the epoch
  order needs no RNG state (acf_fast.training.sampler). All of it goes into the
  checkpoint, so a run resumed from any checkpoint (end of epoch, or mid-epoch with
  `checkpoint_every`) computes exactly the losses an uninterrupted run computes.
- A diverged model never replaces a good file: NaN/inf parameters about to be saved
  raise `TrainingDiverged` and nothing is written, so last.pt / best.pt keep the last
  good state.
- `claim` refuses a folder that already holds a run (best.pt, last.pt, history.json)
  unless `overwrite` replaces it. `train()` claims its folder; `Trainer` itself does
  not (the demo rebuilds its own folder).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import distributed
from ..model.checkpoint import make_checkpoint, read_checkpoint
from .config import BEST, HISTORY, LAST, RUN_FILES, TrainConfig

RESUME_MUST_MATCH = ("batch_size", "seed", "model_dim", "max_profile_size", "loss")


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


class TrainingDiverged(ValueError):
    """The loss, the validation numbers or the parameters became NaN/inf; nothing was saved
    from that point on (last.pt and best.pt hold the last good state)."""


def build_checkpoint(model, optimizer, state: TrainState, cfg: TrainConfig) -> dict:
    """The checkpoint of the run as it stands: the tutorial's keys and what resuming needs."""
    last = state.history[-1] if state.history else {}
    return make_checkpoint(
        model, optimizer, epoch=state.epoch, loss=last.get("val_loss", float("nan")),
        train_state=asdict(state), train_config=asdict(cfg),
        max_profile_size=cfg.max_profile_size, backend=model.resolved_backend(),
        torch_rng_state=torch.get_rng_state())


def restore(ckpt: dict, model, optimizer) -> TrainState:
    """Load a resumable checkpoint into `model` and `optimizer`; returns its TrainState."""
    model.load_state_dict(ckpt["state_dict"])
    # the implementation flags are this run's choice, not the saved run's (a GPU run's
    # fused/capturable Adam resumed on the CPU, or the other way round)
    flags = [{k: g.get(k) for k in ("fused", "capturable", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])
    for group, own in zip(optimizer.param_groups, flags):
        group.update(own)
        if group.get("fused") or group.get("capturable"):
            # load_state_dict placed the step counts by the *saved* flags: a CPU run's
            # stay on the host, where fused / capturable Adam cannot count them
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(p.device, torch.float32)
    state = TrainState(**ckpt["train_state"])
    if "torch_rng_state" in ckpt:
        torch.set_rng_state(ckpt["torch_rng_state"])
    return state


class RunFolder:
    """A run's output folder as every rank sees it (under torchrun, rank 0 writes)."""

    def __init__(self, out, ctx: distributed.DistContext):
        self.out, self.ctx = Path(out), ctx

    def existing_run_files(self) -> list[str]:
        """The files of a training run already in the folder (any rank's view)."""
        mine = [n for n in RUN_FILES if (self.out / n).exists()]
        seen = set().union(*map(set, distributed.all_gather_object(mine)))
        return [n for n in RUN_FILES if n in seen]

    def claim(self, overwrite: bool) -> None:
        """Before a fresh run: refuse a folder holding another run, or (overwrite) clear it."""
        found = self.existing_run_files()
        if not found:
            return
        if not overwrite:
            if LAST in found:
                hint = "pass --resume to continue it"
            else:
                hint = f"it has no {LAST} to resume from"
            raise ValueError(f"{self.out} already holds a training run ({', '.join(found)}): {hint}, "
                             "choose a new output folder, or pass --overwrite to replace it")
        if self.ctx.is_main:
            for name in found:
                (self.out / name).unlink(missing_ok=True)
        distributed.barrier()

    def kept(self) -> str:
        kept = [n for n in (LAST, BEST) if (self.out / n).exists()]
        return f" ({', '.join(kept)} in {self.out} keep the last good state)" if kept else ""

    def diverged(self, what: str, lr: float) -> TrainingDiverged:
        """The error for a run that diverged (`what` happened), saying which files stay."""
        return TrainingDiverged(f"training diverged: {what}{self.kept()}; lower the learning "
                                f"rate (lr={lr:g})")

    def save(self, name: str, model, build: Callable[[], dict], state: TrainState, lr: float) -> Path:
        """Write checkpoint `name` from `build()` (rank 0; the others wait), unless the
        parameters are NaN/inf: then TrainingDiverged, and the previous file stays."""
        params = [p.detach() for p in model.parameters()]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
            raise self.diverged(
                f"parameters {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} are NaN/inf at "
                f"epoch {state.epoch + 1}, step {state.step} (global step {state.global_step}); "
                f"{self.out / name} was not written", lr)
        return distributed.save_on_main(build, self.out / name)

    def write_history(self, history: list) -> None:
        """The whole history, rewritten atomically (rank 0): a resumed run never duplicates
        or loses a line."""
        if not self.ctx.is_main:
            return
        tmp = self.out / f".{HISTORY}.tmp"
        tmp.write_text(json.dumps(history, indent=1))
        tmp.replace(self.out / HISTORY)

    def read_resumable(self, cfg: TrainConfig, path=None) -> dict | None:
        """last.pt (or `path`) checked against this run's settings; None when there is none."""
        path = Path(path) if path else self.out / LAST
        seen = distributed.all_gather_object(path.exists())   # under torchrun: every rank's view
        if any(seen) and not all(seen):
            raise RuntimeError(f"{path} exists for some ranks only: put the output folder on a "
                               "filesystem every node shares to resume a multi-node run")
        if not path.exists():
            return None
        ckpt = read_checkpoint(path)
        if "train_state" not in ckpt:
            raise ValueError(f"{path} has no train_state: it is not a resumable acf_fast checkpoint")
        old = ckpt.get("train_config", {})
        for key in RESUME_MUST_MATCH:
            if key in old and old[key] != getattr(cfg, key):
                raise ValueError(f"cannot resume {path}: it was trained with {key}={old[key]!r}, "
                                 f"this run asks for {key}={getattr(cfg, key)!r}")
        return ckpt
