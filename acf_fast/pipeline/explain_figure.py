"""The figure `explain` writes: what the model attends to for one user, drawn so that a
reader can check it against the ground truth.

Rows: the held-out ground truth; the profile (the consumed items the model attends to),
highest item attention alpha first, each with its component attention beta (7x7) as a
heat map over the image; the top-k recommendations. Every frame colour that is drawn has
a legend entry, beta has a colour bar, and a row that cannot show all its items says how
many it shows. Without an image folder the beta grid itself is drawn and items are tiles
with their id.

`figure_plan` decides all of that from the explanation's numbers alone (no matplotlib),
so the figure's honesty can be tested on data; `draw_explanation` only draws the plan.
Item ids in `exp` are the model's (1-based); the figure labels them 0-based, as in the
input files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..evaluation.plots import pyplot
from ..utils.outputs import atomic_write

GRID = 7
M = GRID * GRID
MAX_COLUMNS = 10
HIT, MISSED, PROFILE, CONSUMED, OTHER = "#1a9850", "#d73027", "#7f7f7f", "#000000", "#4575b4"
PLANTED = "cyan"
MEANING = {
    HIT: "hit: held out and recommended",
    MISSED: "held out, not in the top k",
    PROFILE: "profile: consumed, attended to by the model",
    CONSUMED: "recommended, consumed before (not in the profile)",
    OTHER: "recommended, not consumed",
    PLANTED: "planted concept cells (synthetic ground truth)",
}


def _beta_on(beta: np.ndarray, cells) -> float | None:
    """The share of an item's component attention on its planted cells (None: none planted)."""
    cells = np.asarray(cells, dtype=bool)
    return float(beta[cells].sum()) if cells.any() else None


def figure_plan(exp: dict, planted=None, max_columns: int = MAX_COLUMNS) -> dict:
    """Everything the figure shows, as data: per row the items (1-based ids), their frame
    colours and labels; the row titles; the legend (one entry per colour drawn); the
    colour bar's range; and per profile item the share of beta on its planted cells."""
    held, hits = list(exp["held_out"]), set(exp["hits"])
    consumed = set(exp["consumed_in_top_k"])
    n_cols = max(min(len(held), max_columns), len(exp["top_k"]), len(exp["profile"]), 1)
    # hits first: they connect the ground truth to the recommendations below it
    truth = sorted(held, key=lambda i: (i not in hits, i))[:n_cols]
    shown = (f"n={len(held)}" if len(truth) == len(held)
             else f"n={len(held)}, showing {len(truth)} of {len(held)}, hits first")
    betas = np.asarray(exp["beta"], dtype=np.float64).reshape(-1, M)
    order = sorted(range(len(exp["profile"])), key=lambda s: -exp["alpha"][s])
    on_planted = [None] * len(order)
    if planted is not None:
        on_planted = [_beta_on(betas[s], planted[exp["profile"][s] - 1]) for s in range(len(order))]
    profile = []
    for s in order:
        item, a = exp["profile"][s], exp["alpha"][s]
        share = on_planted[s]
        detail = (f"beta on planted {share:.0%}" if share is not None
                  else f"max beta={betas[s].max():.2f}")
        profile.append({"item": item, "slot": s, "color": PROFILE,
                        "label": f"{item - 1}  alpha={a:.3f}\n{detail}"})
    recs = []
    for item, score in zip(exp["top_k"], exp["scores"]):
        color = HIT if item in hits else CONSUMED if item in consumed else OTHER
        mark = " hit" if item in hits else " consumed" if item in consumed else ""
        recs.append({"item": item, "color": color, "label": f"{item - 1} ({score:.2f}){mark}"})
    truth_row = [{"item": i, "color": HIT if i in hits else MISSED,
                  "label": f"{i - 1}" + (" (hit)" if i in hits else "")} for i in truth]
    drawn = [c["color"] for row in (truth_row, profile, recs) for c in row]
    if planted is not None and any(s is not None for s in on_planted):
        drawn.append(PLANTED)
    legend = [(c, MEANING[c]) for c in MEANING if c in drawn]
    uniform = 1.0 / M
    return {
        "columns": n_cols,
        "rows": {"truth": truth_row, "profile": profile, "recommendations": recs},
        "titles": {
            "truth": f"Ground truth: held-out items ({shown})",
            "profile": (f"Profile (n={len(profile)}), highest item attention alpha first; heat map: "
                        "component attention beta" + (", planted cells outlined"
                                                      if PLANTED in drawn else "")),
            "recommendations": f"Recommendation (top {len(recs)})",
        },
        "legend": legend,
        "beta_range": (0.0, float(max(betas.max(initial=0.0), 2 * uniform))),
        "uniform_beta": uniform,
        "beta_on_planted": on_planted,     # per profile slot, in exp["profile"] order
    }


def summary(plan: dict) -> dict:
    """The plan's checkable facts, for the explanation's JSON (no item ids: those are in
    the JSON already, 0-based)."""
    return {"ground_truth_shown": len(plan["rows"]["truth"]), "titles": plan["titles"],
            "legend": [{"color": c, "meaning": m} for c, m in plan["legend"]],
            "frame_colors": sorted({c["color"] for row in plan["rows"].values() for c in row}),
            "beta_on_planted": plan["beta_on_planted"], "beta_range": list(plan["beta_range"])}


def _load_image(images_dir: Path | None, names, item: int):
    if images_dir is None or names is None:
        return None
    path = images_dir / names[item - 1]
    if not path.exists():
        return None
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def _frame(ax, color: str, width: float):
    ax.axis("on")
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(width)
        spine.set_visible(True)
    ax.set_xticks([]), ax.set_yticks([])


def _item(ax, cell: dict, img, width: float = 3.0):
    if img is not None:
        ax.imshow(img)
    else:
        from matplotlib.patches import Rectangle

        ax.add_patch(Rectangle((0, 0), 1, 1, color=cell["color"], alpha=0.2))
        ax.text(0.5, 0.5, f"item {cell['item'] - 1}", ha="center", va="center", fontsize=9)
        ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    _frame(ax, cell["color"], width)
    ax.set_xlabel(cell["label"], fontsize=8)


def _attention(ax, cell: dict, beta: np.ndarray, img, cells, plan: dict):
    """beta over the image (or alone), one cell per grid cell: nearest-neighbour, so the
    heat map lines up with the 7x7 grid and the planted outlines instead of smearing a
    cell's weight over its neighbours. Component m is grid row m // 7, column m % 7."""
    from matplotlib.colors import PowerNorm
    from matplotlib.patches import Rectangle

    lo, hi = plan["beta_range"]
    # square-root colour scale (the colour bar shows it): a beta spread over a few cells
    # (0.1-0.3 each) stays visible beside another item's single 0.9
    norm = PowerNorm(0.5, vmin=lo, vmax=hi)
    grid = beta.reshape(GRID, GRID)
    if img is not None:
        h, w = img.shape[:2]
        ax.imshow(img.mean(axis=2), cmap="gray", vmin=0, vmax=255)
        # opacity grows with beta: cells the model ignores leave the image readable
        opacity = 0.3 + 0.6 * np.clip(norm(grid), 0, 1)
        mesh = ax.imshow(grid, cmap="inferno", alpha=opacity, extent=(0, w, h, 0),
                         interpolation="nearest", norm=norm)
        scale, off = w / GRID, 0.0
    else:
        mesh = ax.imshow(grid, cmap="inferno", interpolation="nearest", norm=norm)
        scale, off = 1.0, -0.5
    for c in np.flatnonzero(cells) if cells is not None else ():
        r, q = divmod(int(c), GRID)
        ax.add_patch(Rectangle((q * scale + off, r * scale + off), scale, scale, fill=False,
                                       edgecolor=PLANTED, lw=1.2))
    _frame(ax, cell["color"], 1.5)
    ax.set_xlabel(cell["label"], fontsize=8)
    return mesh


def draw_explanation(exp: dict, path, images_dir=None, names=None, planted=None):
    """Write the figure; `planted` ([N, 49] bool) outlines the ground-truth concept cells
    (synthetic data). Returns (path, summary(plan))."""
    plt = pyplot()
    from matplotlib.patches import Patch

    plan = figure_plan(exp, planted)
    images_dir = Path(images_dir) if images_dir else None
    n_cols = plan["columns"]
    fig, axes = plt.subplots(3, n_cols, figsize=(1.7 * n_cols + 1.2, 7.0), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, key in enumerate(("truth", "profile", "recommendations")):
        axes[r, 0].set_title(plan["titles"][key], loc="left", fontsize=10, pad=14)
    for c, cell in enumerate(plan["rows"]["truth"]):
        _item(axes[0, c], cell, _load_image(images_dir, names, cell["item"]))
    mesh = None
    for c, cell in enumerate(plan["rows"]["profile"]):
        beta = np.asarray(exp["beta"][cell["slot"]], dtype=np.float64)
        cells = planted[cell["item"] - 1] if planted is not None else None
        mesh = _attention(axes[1, c], cell, beta, _load_image(images_dir, names, cell["item"]), cells, plan)
    for c, cell in enumerate(plan["rows"]["recommendations"]):
        _item(axes[2, c], cell, _load_image(images_dir, names, cell["item"]))
    if mesh is not None:
        # over all rows, shrunk to the middle one: the columns keep one width in every row
        bar = fig.colorbar(mesh, ax=axes.ravel().tolist(), fraction=0.015, pad=0.01, shrink=0.3)
        bar.set_label(f"beta (uniform: 1/{M} = {plan['uniform_beta']:.3f}, white line)", fontsize=8)
        bar.ax.axhline(plan["uniform_beta"], color="white", lw=1.5)
        bar.ax.tick_params(labelsize=7)
    fig.legend(handles=[Patch(facecolor="none", edgecolor=c, lw=2, label=m) for c, m in plan["legend"]],
               loc="lower center", ncol=3, fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"user {exp['user']}", fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.subplots_adjust(wspace=0.35, hspace=0.7, bottom=0.1)
    try:
        with atomic_write(path, "wb") as fh:     # whole or absent, also on a full disk
            fig.savefig(fh, format=path.suffix[1:].lower() or "png", dpi=90, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path, summary(plan)
