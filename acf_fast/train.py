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
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import make_checkpoint, read_checkpoint
from .data.formats import TripletSet, read_triplets
from .data.sampling import load_manifest
from .losses import get_loss
from .metrics import ranking_metrics
from .model import ACF

LAST, BEST = "last.pt", "best.pt"
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
    num_threads: int | None = None       # torch CPU threads (None: torch's default). On a busy or
                                         # small machine 1 thread is often faster for small models.
    progress: bool = True

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "model_dim", "max_profile_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        get_loss(self.loss)
        if self.select_by not in ("loss", "auc"):
            raise ValueError(f"select_by must be 'loss' or 'auc', got {self.select_by!r}")
        if self.feature_dtype not in DTYPES:
            raise ValueError(f"feature_dtype must be one of {list(DTYPES)}, got {self.feature_dtype!r}")
        if self.checkpoint_every < 0 or self.patience < 0:
            raise ValueError("checkpoint_every and patience must be >= 0")


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


def check_feature_count(model: ACF, n_items: int, features) -> None:
    """The feature file must describe exactly the catalogue the data was prepared with."""
    have = int(model.feature_table.shape[0]) - 1
    if have != n_items:
        raise ValueError(f"feature file {features} has {have} items but the prepared data has "
                         f"{n_items}; use the feature file given to `prepare`")


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
                                          fused=self.device.type == "cuda" or None)
        self.loss_fn = get_loss(config.loss)
        self.state = TrainState()
        self.step_losses: list[float] = []             # every batch loss this process computed

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
        return distributed.save_on_main(self.checkpoint, self.out / name)   # rank 0 writes

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
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.state = TrainState(**ckpt["train_state"])
        if "torch_rng_state" in ckpt:
            torch.set_rng_state(ckpt["torch_rng_state"])
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
        ranks, positions = [np.zeros((0, 1), dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
        for s, e in distributed.shard_blocks(n, 256):       # blocks dealt to ranks, then gathered
            u, p, pos, _ = self._batch(self.val_set, pick[s:e])
            ranks.append(profile_excluded_ranks(self.model, u, p, pos[:, None]).cpu().numpy())
            positions.append(np.arange(s, e))
        r = distributed.gather_rows({"rank": np.concatenate(ranks)}, np.concatenate(positions), n)["rank"]
        m = ranking_metrics(r, np.ones(n), self.n_items, ks=(20,))
        return {"val_auc": float(m["AUC"].mean()), "val_rr": float(m["RR"].mean())}

    # ------------------------------------------------------------------ training
    def fit(self) -> dict:
        cfg, st = self.cfg, self.state
        self.out.mkdir(parents=True, exist_ok=True)
        self.model.train()
        n, bs = len(self.train_set), cfg.batch_size
        steps = self.steps_per_epoch()
        while not st.finished and st.epoch < cfg.epochs:
            perm = epoch_permutation(n, cfg.seed, st.epoch)
            bar = tqdm(total=steps, initial=st.step, desc=f"epoch {st.epoch + 1}/{cfg.epochs}",
                       unit="batch", disable=not cfg.progress or not self.dist.is_main,
                       dynamic_ncols=True)
            t0, seen = time.perf_counter(), 0
            while st.step < steps:
                if cfg.max_steps is not None and st.global_step >= cfg.max_steps:
                    bar.close()
                    return self.summary()
                idx = perm[st.step * bs:(st.step + 1) * bs]
                self.optimizer.zero_grad(set_to_none=True)
                loss, value = self._loss(idx)
                loss.backward()
                self.optimizer.step()
                value = loss.item() if value is None else value
                self.step_losses.append(value)
                st.loss_sum += value
                st.step += 1
                st.global_step += 1
                seen += idx.numel()
                bar.update()
                bar.set_postfix(loss=f"{st.loss_sum / st.step:.4f}",
                                trip_s=f"{seen / max(time.perf_counter() - t0, 1e-9):.0f}")
                if cfg.checkpoint_every and st.global_step % cfg.checkpoint_every == 0 and st.step < steps:
                    self.save(LAST)
            bar.close()
            self._end_epoch(steps)
        st.finished = True
        self.save(LAST)
        return self.summary()

    def _end_epoch(self, steps: int) -> None:
        cfg, st = self.cfg, self.state
        record = {"epoch": st.epoch + 1, "train_loss": st.loss_sum / steps}
        record.update(self.validate())
        crit = record.get("val_loss") if cfg.select_by == "loss" else -record.get("val_auc", np.nan)
        if crit is None:
            crit = record["train_loss"]
        improved = st.best is None or crit < st.best
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
        tmp = self.out / ".history.json.tmp"
        tmp.write_text(json.dumps(st.history, indent=1))
        tmp.replace(self.out / "history.json")
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
                "backend": self.model.resolved_backend()}


@torch.no_grad()
def profile_excluded_ranks(model: ACF, users, profiles, targets) -> torch.Tensor:
    """0-based rank of each target among all catalogue items, less the profile items ranked above it
    (the tutorial protocol). users [B], profiles [B, P], targets [B, L] (0 = padding -> rank -1)."""
    from .evaluate import rank_targets

    return rank_targets(model, users, profiles, targets, exclude=profiles)


def train(config: TrainConfig | None = None, resume: bool = False, **kwargs) -> dict:
    """Train (or resume) and return a summary; kwargs fill a TrainConfig."""
    cfg = config or TrainConfig(**kwargs)
    trainer = Trainer(cfg)
    if resume and not trainer.resume():
        if cfg.progress and distributed.is_main():
            print(f"nothing to resume in {cfg.out_dir}; starting from scratch")
    return trainer.fit()
