"""The settings of a training run, checked before any work, and the files a run writes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..model.losses import get_loss
from ..utils.devices import check_device

LAST, BEST, HISTORY = "last.pt", "best.pt", "history.json"
RUN_FILES = (BEST, LAST, HISTORY)        # what a training run leaves in its output folder
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_EPOCHS = 10                      # a fresh run's target when epochs is None


@dataclass
class TrainConfig:
    data_dir: str
    out_dir: str
    features: str | None = None          # default: the one `prepare` used
    epochs: int | None = DEFAULT_EPOCHS  # None: a resumed run's own target (the one in its
                                         # last.pt), a fresh run's DEFAULT_EPOCHS
    batch_size: int = 128
    lr: float = 1e-3
    embedding_lr: float | None = None    # Adam rate of the user and item embeddings (None: lr).
                                         # Short runs (the demo) raise it alone: the N(0, 1)
                                         # embeddings need large steps to move in few of them,
                                         # the attention layers' ~0.2-scale weights do not
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
    cuda_graph: bool | None = None       # the fused step replayed from a CUDA graph (triton backend,
                                         # one GPU; acf_fast.training.fused_step). None: on exactly then
    check_dataset: bool = True           # resume: refuse a last.pt trained on another dataset

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "model_dim", "max_profile_size"):
            if name == "epochs" and self.epochs is None:
                continue
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.embedding_lr is not None and not (math.isfinite(self.embedding_lr) and self.embedding_lr > 0):
            raise ValueError(f"embedding_lr must be a finite number > 0 (or None for lr), "
                             f"got {self.embedding_lr}")
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


def parameter_groups(model, cfg: TrainConfig) -> list[dict]:
    """Adam's parameter groups: all at `lr` (the tutorial, and one group as before, so older
    runs resume), or the user, item and profile embeddings apart at `embedding_lr`."""
    if cfg.embedding_lr is None:
        return [{"params": list(model.parameters())}]
    emb = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return [{"params": [p for p in model.parameters() if id(p) in emb], "lr": cfg.embedding_lr},
            {"params": [p for p in model.parameters() if id(p) not in emb]}]
