"""Training: config, the epoch walk, steps, CUDA graph, run folder, signals, validation, the loop.

    from acf_fast.training import TrainConfig, train
    summary = train(TrainConfig(data_dir="work/prep", out_dir="work/run", epochs=5))
"""

from .config import BEST, HISTORY, LAST, TrainConfig
from .run_folder import CheckpointWriteError, TrainingDiverged
from .run_lock import RunFolderInUse
from .signals import TrainingInterrupted
from .trainer import Trainer, train

__all__ = ["BEST", "HISTORY", "LAST", "CheckpointWriteError", "RunFolderInUse", "TrainConfig",
           "Trainer", "TrainingDiverged", "TrainingInterrupted", "train"]
