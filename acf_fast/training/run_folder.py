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
  not (the demo rebuilds its own folder). Two runs never share a folder at the same
  time: acf_fast.training.run_lock.
- Every checkpoint records the fingerprint of the dataset it was trained on
  (`dataset_fingerprint`); resuming on another dataset is refused unless
  `check_dataset=False` (`--any-dataset`), as evaluate / recommend / explain refuse it.
- A checkpoint whose train_state lacks fields (an older format) is not resumed: filling
  them with defaults would silently reset the best score and drop the history.
- A write that fails (a full disk, a folder made read-only) raises `CheckpointWriteError`
  naming the file, the reason and the fix; no temporary file is left and the previous
  file stays. Before training, `check_space` refuses a disk without room for one
  checkpoint.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from .. import distributed
from ..model.acf import DATASET_KEY, check_checkpoint_dataset
from ..model.checkpoint import make_checkpoint, read_checkpoint
from ..utils.outputs import os_error_reason, write_text_atomic
from .config import BEST, HISTORY, LAST, RUN_FILES, TrainConfig

RESUME_MUST_MATCH = ("batch_size", "seed", "model_dim", "max_profile_size", "loss", "feature_dtype")


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


class CheckpointWriteError(OSError):
    """A checkpoint or the history could not be written (full disk, read-only folder...);
    the message names the file and the fix, and the previous file is intact."""


def build_checkpoint(model, optimizer, state: TrainState, cfg: TrainConfig,
                     dataset_fingerprint: str | None = None) -> dict:
    """The checkpoint of the run as it stands: the tutorial's keys, what resuming needs,
    and the fingerprint of the dataset it is trained on."""
    last = state.history[-1] if state.history else {}
    extra = {DATASET_KEY: dataset_fingerprint} if dataset_fingerprint is not None else {}
    return make_checkpoint(
        model, optimizer, epoch=state.epoch, loss=last.get("val_loss", float("nan")),
        train_state=asdict(state), train_config=asdict(cfg),
        max_profile_size=cfg.max_profile_size, backend=model.resolved_backend(),
        torch_rng_state=torch.get_rng_state(), **extra)


def checkpoint_bytes(model) -> int:
    """About the size of one checkpoint: parameters, Adam's two moments, the id lists."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return 3 * params + 8 * (len(model.users) + len(model.items))


def check_train_state(ckpt: dict, path) -> None:
    """Resumable means every field of TrainState is there (no silent defaults) and the
    optimizer's state too."""
    st = ckpt.get("train_state")
    if not isinstance(st, dict):
        raise ValueError(f"{path} has no train_state: it is not a resumable acf_fast checkpoint")
    names = {f.name for f in fields(TrainState)}
    missing, unknown = sorted(names - st.keys()), sorted(st.keys() - names)
    if missing:
        raise ValueError(f"cannot resume {path}: its train_state (an older format) lacks "
                         f"{', '.join(missing)}, and resuming would silently reset them (the best "
                         "score, the history); start a new run (another folder, or --overwrite); "
                         "evaluate and recommend still read this checkpoint")
    if unknown:
        raise ValueError(f"cannot resume {path}: its train_state has {', '.join(unknown)}, which this "
                         "acf_fast does not know (a newer version wrote it); resume with that version")
    if not isinstance(ckpt.get("optimizer"), dict):
        raise ValueError(f"cannot resume {path}: it holds no optimizer state; start a new run "
                         "(another folder, or --overwrite)")


def _one_line(exc: BaseException, limit: int = 400) -> str:
    return " ".join(str(exc).split())[:limit]


def restore(ckpt: dict, model, optimizer, name="the checkpoint") -> TrainState:
    """Load a resumable checkpoint into `model` and `optimizer`; returns its TrainState."""
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot resume {name}: its state_dict does not fit this run's model "
                         f"({_one_line(exc)}); the file is damaged or from another model") from None
    # the implementation flags are this run's choice, not the saved run's (a GPU run's
    # fused/capturable Adam resumed on the CPU, or the other way round)
    flags = [{k: g.get(k) for k in ("fused", "capturable", "foreach")} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"cannot resume {name}: its optimizer state does not fit this run's "
                         f"model ({_one_line(exc)}); the file is damaged or from another model") from None
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

    def write_failed(self, path: Path, exc: BaseException, need: int | None = None) -> CheckpointWriteError:
        """The error for a file that could not be written: the reason, the fix, what stays."""
        if isinstance(exc, OSError):
            reason = os_error_reason(exc)
        else:   # torch.save reports a full disk as a RuntimeError about stream positions
            free = _free_bytes(path.parent)
            if need is not None and free is not None and free < need:
                reason = (f"No space left on device ({_mb(free)} free, a checkpoint needs about "
                          f"{_mb(need)}); free some space on that disk or choose a folder on another one")
            else:
                reason = f"{type(exc).__name__}: {_one_line(exc)}"
        resume = "; --resume continues from last.pt" if (self.out / LAST).exists() else ""
        return CheckpointWriteError(f"cannot write {path}: {reason}{resume}{self.kept()}")

    def check_space(self, model) -> None:
        """Before training: room for one checkpoint, instead of failing after an epoch."""
        need, free = checkpoint_bytes(model), _free_bytes(self.out)
        if self.ctx.is_main and free is not None and free < need:
            raise ValueError(f"{self.out} has {_mb(free)} free, but one checkpoint of this model "
                             f"needs about {_mb(need)}: free some space or train into a folder on "
                             "another disk")

    def save(self, name: str, model, build: Callable[[], dict], state: TrainState, lr: float) -> Path:
        """Write checkpoint `name` from `build()` (rank 0; the others wait), unless the
        parameters are NaN/inf: then TrainingDiverged, and the previous file stays. A failed
        write raises CheckpointWriteError (the previous file stays too)."""
        params = [p.detach() for p in model.parameters()]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
            raise self.diverged(
                f"parameters {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} are NaN/inf at "
                f"epoch {state.epoch + 1}, step {state.step} (global step {state.global_step}); "
                f"{self.out / name} was not written", lr)
        built = []

        def checkpoint() -> dict:
            built.append(build())     # an error here is not a write error: raised as it is
            return built[-1]

        try:
            return distributed.save_on_main(checkpoint, self.out / name)
        except (OSError, RuntimeError) as exc:
            if self.ctx.is_main and not built:
                raise
            raise self.write_failed(self.out / name, exc, checkpoint_bytes(model)) from exc

    def write_history(self, history: list) -> None:
        """The whole history, rewritten atomically (rank 0): a resumed run never duplicates
        or loses a line."""
        if not self.ctx.is_main:
            return
        try:
            write_text_atomic(self.out / HISTORY, json.dumps(history, indent=1))
        except OSError as exc:
            raise self.write_failed(self.out / HISTORY, exc) from exc

    def read_resumable(self, cfg: TrainConfig, path=None, dataset=None) -> dict | None:
        """last.pt (or `path`) checked against this run's settings and dataset (a
        PreparedDataset; unless cfg.check_dataset is off); None when there is none."""
        path = Path(path) if path else self.out / LAST
        seen = distributed.all_gather_object(path.exists())   # under torchrun: every rank's view
        if any(seen) and not all(seen):
            raise RuntimeError(f"{path} exists for some ranks only: put the output folder on a "
                               "filesystem every node shares to resume a multi-node run")
        if not path.exists():
            return None
        ckpt = read_checkpoint(path)
        check_train_state(ckpt, path)
        if cfg.check_dataset:
            check_checkpoint_dataset(ckpt, dataset, path)
        old = ckpt.get("train_config", {})
        for key in RESUME_MUST_MATCH:
            if key in old and old[key] != getattr(cfg, key):
                raise ValueError(f"cannot resume {path}: it was trained with {key}={old[key]!r}, "
                                 f"this run asks for {key}={getattr(cfg, key)!r}")
        return ckpt


def _free_bytes(folder) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"
