"""`explain`: one user's recommendation and attentions as a PNG, like the tutorial's notebook.

Rows: the held-out ground truth; the profile (consumed items the model attends to)
with each item's alpha and its beta (component attention, 7x7) drawn as a
translucent heat map upsampled over the image; the top-k recommendations with
hits (held-out items) and already consumed items marked. Without an image folder
the beta grid itself is drawn, and items are tiles with their id.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..data.history import UserHistory
from ..data.prepared import PreparedDataset
from ..evaluation.plots import pyplot
from ..model.acf import load_model
from ..model.features import feature_names
from ..utils.outputs import atomic_write, check_output_file, write_text_atomic

GRID = 7
HIT, CONSUMED, OTHER = "#1a9850", "#7f7f7f", "#4575b4"


@torch.no_grad()
def user_explanation(model, history: UserHistory, user: int, k: int = 10,
                     exclude: str = "profile", max_profile_size: int = 9) -> dict:
    """alpha, beta and top-k for one user (item ids 1-based, the model's; `explain` writes
    and returns them 0-based, as in the input files).

    exclude: "profile" (the items shown, as the tutorial protocol does), "train" (every
    training item) or "none"; older consumed items that remain are marked in the figure.
    """
    if exclude not in ("profile", "train", "none"):
        raise ValueError(f"exclude must be 'profile', 'train' or 'none', got {exclude!r}")
    users = history.check_users([user])
    device = model.item_model.weight.device
    prof = torch.from_numpy(history.last_profiles(users, max_profile_size)).to(device)
    excl = (prof if exclude == "profile" else None if exclude == "none"
            else torch.from_numpy(history.padded(users, "train")).to(device))
    u = torch.from_numpy(users).to(device)
    (scores, items), beta, alpha = model.recommend_batch(u, prof, return_attentions=True, k=k, exclude=excl)
    mask = prof[0] > 0
    found = torch.isfinite(scores[0])  # exclusions can leave fewer than k items
    scores, items = scores[:, found], items[:, found]
    train = set(history.train_of(user).tolist())
    held = sorted(set(history.consumed_of(user).tolist()) - train)
    m = beta.shape[-1]
    return {
        "user": int(user),
        "profile": prof[0][mask].tolist(),
        "alpha": alpha[0][mask].tolist(),
        "beta": beta[0][mask].reshape(-1, m).tolist(),
        "top_k": items[0].tolist(), "scores": scores[0].tolist(),
        "held_out": held,
        "hits": [int(i) for i in items[0].tolist() if i in set(held)],
        "consumed_in_top_k": [int(i) for i in items[0].tolist() if i in train],
    }


ITEM_KEYS = ("profile", "top_k", "held_out", "hits", "consumed_in_top_k")


def zero_based(exp: dict) -> dict:
    """`exp` with every item id 0-based (as in the input files and recommend's output)."""
    out = {k: ([int(i) - 1 for i in v] if k in ITEM_KEYS else v) for k, v in exp.items()}
    out["item_ids"] = "0-based, as in the input files"
    return out


def _load_image(images_dir: Path | None, names, item: int):
    if images_dir is None or names is None:
        return None
    path = images_dir / names[item - 1]
    if not path.exists():
        return None
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def _tile(ax, text: str, color: str):
    ax.add_patch(__import__("matplotlib").patches.Rectangle((0, 0), 1, 1, color=color, alpha=0.25))
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9)
    ax.set_xlim(0, 1), ax.set_ylim(0, 1)


def _frame(ax, color: str, width: float = 3.0):
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(width)
        spine.set_visible(True)
    ax.set_xticks([]), ax.set_yticks([])


def draw_explanation(exp: dict, path, images_dir=None, names=None, planted=None):
    """Write the figure; `planted` ([N, 49] bool) outlines ground-truth concept cells (synthetic data)."""
    plt = pyplot()
    images_dir = Path(images_dir) if images_dir else None
    n_cols = max(len(exp["profile"]), len(exp["top_k"]), min(len(exp["held_out"]), 10), 1)
    fig, axes = plt.subplots(3, n_cols, figsize=(1.7 * n_cols, 6.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    held = exp["held_out"][:n_cols]
    axes[0, 0].set_title(f"Ground truth (n={len(exp['held_out'])})", loc="left", fontsize=10, pad=14)
    for c, item in enumerate(held):
        ax = axes[0, c]
        img = _load_image(images_dir, names, item)
        ax.axis("on")
        if img is not None:
            ax.imshow(img)
        else:
            _tile(ax, f"item {item - 1}", HIT)
        _frame(ax, HIT)
        hit = item in exp["hits"]
        ax.set_xlabel(f"{item - 1}" + (" (hit)" if hit else ""), fontsize=8)

    axes[1, 0].set_title(f"Consumed (n={len(exp['profile'])}): item attention alpha; component "
                         "attention beta as heat map (one colour scale for all)"
                         + ("; planted cells outlined" if planted is not None else ""),
                         loc="left", fontsize=10, pad=14)
    # one colour scale for the whole row, starting at 0: a flat beta looks flat instead of
    # having its tiny differences stretched over the full colour map
    vmax = max([max(b) for b in exp["beta"]] + [2.0 / (GRID * GRID)])
    for c, (item, a, b) in enumerate(zip(exp["profile"], exp["alpha"], exp["beta"])):
        ax = axes[1, c]
        ax.axis("on")
        beta = np.asarray(b).reshape(GRID, GRID)
        img = _load_image(images_dir, names, item)
        if img is not None:
            h, w = img.shape[:2]
            ax.imshow(img.mean(axis=2), cmap="gray", vmin=0, vmax=255)
            ax.imshow(beta, cmap="inferno", alpha=0.45, extent=(0, w, h, 0), interpolation="bilinear",
                      vmin=0, vmax=vmax)
        else:
            ax.imshow(beta, cmap="inferno", interpolation="nearest", vmin=0, vmax=vmax)
        if planted is not None:
            cells = np.flatnonzero(planted[item - 1])
            scale = (img.shape[1] / GRID) if img is not None else 1.0
            off = 0.0 if img is not None else -0.5
            for cell in cells:
                r, q = divmod(int(cell), GRID)
                ax.add_patch(__import__("matplotlib").patches.Rectangle(
                    (q * scale + off, r * scale + off), scale, scale, fill=False, edgecolor="cyan", lw=0.8))
        _frame(ax, CONSUMED, 1.0)
        ax.set_xlabel(f"{item - 1}  attn={a:.3f}\nmax beta={beta.max():.2f}", fontsize=8)

    axes[2, 0].set_title(f"Recommendation (n={len(exp['top_k'])}): green = hit, grey = consumed",
                         loc="left", fontsize=10, pad=14)
    consumed = set(exp["consumed_in_top_k"])
    for c, (item, s) in enumerate(zip(exp["top_k"], exp["scores"])):
        ax = axes[2, c]
        ax.axis("on")
        color = HIT if item in exp["hits"] else CONSUMED if item in consumed else OTHER
        img = _load_image(images_dir, names, item)
        if img is not None:
            ax.imshow(img)
        else:
            _tile(ax, f"item {item - 1}", color)
        _frame(ax, color)
        mark = " hit" if item in exp["hits"] else " consumed" if item in consumed else ""
        ax.set_xlabel(f"{item - 1} ({s:.2f}){mark}", fontsize=8)
    fig.suptitle(f"user {exp['user']}", fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.subplots_adjust(wspace=0.35, hspace=0.6)
    try:
        with atomic_write(path, "wb") as fh:     # whole or absent, also on a full disk
            fig.savefig(fh, format=path.suffix[1:].lower() or "png", dpi=90, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def explain(checkpoint, data_dir, user: int, out, k: int = 10, images_dir=None, features=None,
            exclude: str = "profile", planted=None, backend: str = "auto",
            device: str = "cpu", check_dataset: bool = True, feature_dtype=None) -> dict:
    """Write `out` (PNG) and `out` with .json (the numbers drawn); returns that dict. Item
    ids there and in the figure are 0-based, as in the input files and `recommend`'s output.

    `out` is checked before any work; a checkpoint trained on another dataset is refused
    unless check_dataset=False. The features are read in the dtype the checkpoint was
    trained with, or `feature_dtype`."""
    check_output_file(out, "--out")
    data = PreparedDataset(data_dir)
    features = data.features(features)
    history = data.history()
    model = load_model(checkpoint, features, backend, device, data.n_users, data.n_items,
                       dataset=data, check_dataset=check_dataset, feature_dtype=feature_dtype)
    exp = user_explanation(model, history, int(user), k, exclude,
                           getattr(model, "max_profile_size", 9))
    names = None
    if images_dir is not None:
        if not Path(images_dir).is_dir():
            raise FileNotFoundError(f"image folder not found: {images_dir}")
        names = feature_names(features, model.feature_table.dtype)   # the cache just used
        if len(names) < data.n_items:     # a truncated name list would fail mid-figure
            raise ValueError(f"{features} lists {len(names)} image names for its {data.n_items} "
                             "items: the file is truncated or damaged; extract the features again "
                             "(acf-fast extract), or leave out --images")
    if planted is not None and not isinstance(planted, np.ndarray):
        from ..data.synth import load_planted

        planted = load_planted(planted)["planted_cells"]
    path = draw_explanation(exp, out, images_dir, names, planted)   # labels 0-based ids itself
    exp = zero_based(exp)
    exp["png"] = str(path)
    write_text_atomic(Path(path).with_suffix(".json"), json.dumps(exp, indent=1))
    return exp
