"""`demo`: synth -> prepare -> train -> evaluate -> explain, end to end on a small dataset.

The demo's sizes are chosen so the whole run takes under a minute on a 2-core CPU
(`make demo`); they are not the tutorial's. Differences from the tutorial
defaults, and why:
- feature_dim 64 instead of ResNet50's 2048 channels and model_dim 64 instead of
  128: the cost of ACF is dominated by the F x D reduction of every profile item's
  49 cells, so this is 60x less work per step;
- the tutorial's Adam (lr 1e-3, weight decay 1e-5) for every parameter but the user and
  item embeddings, which get 1e-2 (`embedding_lr`), with 40k triplets per epoch instead
  of 10M: the embeddings start from N(0, 1) and Adam moves a parameter about lr per step,
  so ~1,500 steps need a larger rate to get anywhere (1e-3 for all: AUC 0.58). The
  attention layers' weights are ~0.2 in scale and their gradient is mostly noise (the
  ranking barely depends on beta); a large rate for them turned that noise into steps
  of a sizeable part of their size: at 3e-2 for all (the demo's earlier setting) the
  component logits spread by ~100 over an item's cells, so beta was one-hot, for half
  the explained users on a cell with nothing planted; at 1e-2 for all, or with weight
  decay 1e-4, beta came out flat. With the tutorial's rate the logits spread by ~0.3-1,
  beta stays soft and leans to the planted cells, and the AUC is ~0.80 against ~0.785
  (docs/demo.md has the measurements). `acf-fast train` keeps 1e-3 for all parameters.
- the best checkpoint is chosen by the validation ranking AUC, not the validation loss:
  at this learning rate the WARP loss of a small validation set is noisy.
Everything else (protocol, losses, batch 128, profiles of 9, metrics) is the tutorial's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.prepared import PreparedDataset
from ..data.sampling import prepare
from ..data.synth import SynthConfig, load_planted, synth
from ..evaluation.evaluate import evaluate
from ..model.acf import load_model
from ..training import TrainConfig, Trainer
from ..utils.outputs import check_output_folder
from .explain import explain


def demo_synth_config(**overrides) -> SynthConfig:
    """The default synthetic dataset (400 users, 400 items, F = 64), optionally changed."""
    cfg = SynthConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ValueError(f"unknown synth option {k!r}")
        setattr(cfg, k, v)
    return cfg


@dataclass
class DemoConfig:
    out: str = "demo_out"
    n_train: int = 40_000
    n_validation: int = 2_000
    epochs: int = 5
    model_dim: int = 64
    lr: float = 1e-3                  # the tutorial's, for all but the embeddings
    embedding_lr: float = 1e-2
    weight_decay: float = 1e-5        # the tutorial's (the slides: it avoids flat attention)
    loss: str = "warp"
    backend: str = "auto"
    device: str = "cpu"
    seed: int = 0
    explain_users: int = 2
    threads: int | None = None       # torch CPU threads for training (the CLI's demo uses 1)
    progress: bool = True
    synth: dict = field(default_factory=dict)


@torch.no_grad()
def planted_attention_ratio(model, groups, planted_cells: np.ndarray, max_profile_size: int = 9) -> float:
    """Mean component attention per planted cell, relative to the uniform 1/M, over the
    profile items of the evaluation groups (1 = no preference, 2 = twice the uniform share)."""
    from ..evaluation.evaluate import model_profiles

    device = model.item_model.weight.device
    prof = torch.from_numpy(model_profiles(groups.profile, max_profile_size)).to(device)
    _, _, beta = model.user_vectors(torch.from_numpy(groups.user).to(device), prof,
                                    return_attentions=True)
    planted = torch.from_numpy(planted_cells).to(device)[(prof - 1).clamp(min=0)]
    m = beta.shape[-1]
    per_cell = (beta * planted).sum(-1) / planted.sum(-1).clamp(min=1) * m
    real = (prof > 0) & (planted.sum(-1) > 0)
    return float(per_cell[real].mean())


def explained_attention(exp: dict, planted_cells: np.ndarray) -> dict:
    """How much of one explanation's component attention lies on the planted cells: over its
    profile items weighted by alpha (the items that explain the recommendation), the share
    of beta on each item's planted cells, against the share a uniform beta (1/49 per cell)
    would put there. `exp` is `explain`'s result (0-based item ids)."""
    prof = np.asarray(exp["profile"], dtype=np.int64)
    alpha, beta = np.asarray(exp["alpha"]), np.asarray(exp["beta"])
    cells = planted_cells[prof]
    on, uniform = float(alpha @ (beta * cells).sum(1)), float(alpha @ cells.mean(1))
    return {"user": exp["user"], "beta_on_planted": on, "uniform_share": uniform,
            "ratio": on / uniform if uniform > 0 else float("nan"),
            "max_alpha": float(alpha.max(initial=0.0)), "max_beta": float(beta.max(initial=0.0))}


def run_demo(config: DemoConfig | None = None, **kwargs) -> dict:
    cfg = config or DemoConfig(**kwargs)
    out = Path(cfg.out)
    check_output_folder(out, "demo folder")      # a file there, or read-only: one line, at once
    t0 = time.perf_counter()
    timings = {}

    def lap(name):
        timings[name] = round(time.perf_counter() - t0 - sum(timings.values()), 2)
        if cfg.progress:
            print(f"[demo] {name} done in {timings[name]:.1f} s", flush=True)

    syn = synth(out / "data", demo_synth_config(seed=cfg.seed, **cfg.synth), progress=cfg.progress)
    lap("synth")
    # the demo's folders are its own: a second `make demo` replaces them instead of refusing
    prepare(syn["interactions"], syn["features_h5"], out / "prepared", n_train=cfg.n_train,
            n_validation=cfg.n_validation, seed=cfg.seed, progress=cfg.progress, overwrite=True)
    lap("prepare")
    trainer = Trainer(TrainConfig(data_dir=str(out / "prepared"), out_dir=str(out / "run"),
                                  epochs=cfg.epochs, model_dim=cfg.model_dim, lr=cfg.lr, loss=cfg.loss,
                                  embedding_lr=cfg.embedding_lr, weight_decay=cfg.weight_decay,
                                  backend=cfg.backend, device=cfg.device, seed=cfg.seed, patience=2,
                                  select_by="auc", progress=cfg.progress, num_threads=cfg.threads,
                                  overwrite=True))
    trainer.claim_output()
    summary = trainer.fit()
    lap("train")
    best = out / "run" / "best.pt"
    report = evaluate(best, out / "prepared", out / "eval", backend=cfg.backend, device=cfg.device,
                      progress=cfg.progress, print_table=False)
    lap("evaluate")
    figures = [report["files"].get("png"), report["files"].get("png_profile")]
    prepared = PreparedDataset(out / "prepared")
    groups = prepared.evaluation()
    model = load_model(best, syn["features_h5"], cfg.backend, cfg.device)
    planted = load_planted(syn["planted"])["planted_cells"]
    ratio = planted_attention_ratio(model, groups, planted)
    history = prepared.history()
    # explain users with a full profile: the most informative pictures
    full = [int(u) for u in groups.user if len(history.train_of(int(u))) >= 9][:cfg.explain_users]
    explained = []
    for i, user in enumerate(full):
        images = syn["images"] if i % 2 == 0 else None     # one with images, one as grids
        suffix = "images" if images else "grid"
        exp = explain(best, out / "prepared", user, out / "explain" / f"user_{user}_{suffix}.png",
                      images_dir=images, planted=planted, backend=cfg.backend, device=cfg.device)
        figures.append(exp["png"])
        explained.append({**explained_attention(exp, planted), "figure": exp["png"]})
    lap("explain")
    total = round(time.perf_counter() - t0, 1)
    result = {"metrics": report["metrics"], "planted_attention_ratio": ratio,
              "explained": explained, "table": report["table"], "figures": [f for f in figures if f],
              "timings_s": timings, "total_s": total, "train": {k: summary[k] for k in
                                                               ("epochs_done", "best_epoch", "backend")},
              "files": report["files"]}
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    print("\nACF on the synthetic dataset (best checkpoint, "
          f"epoch {summary['best_epoch']}, backend {summary['backend']}):")
    print(report["table"])
    print(report["protocols_note"])
    print(f"\ncomponent attention on the planted cells: {ratio:.2f}x the uniform share (1/49 per cell)")
    for e in explained:
        print(f"user {e['user']}: {e['beta_on_planted']:.0%} of beta on the planted cells (alpha-weighted; "
              f"uniform: {e['uniform_share']:.0%}) in {e['figure']}")
    print(f"metrics: {report['files']['json']}, {report['files']['csv']}")
    print("figures:\n  " + "\n  ".join(result["figures"]))
    print(f"demo finished in {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")
    return result
