"""Figures (matplotlib, a dependency of the package; an install without it skips them)."""

from __future__ import annotations

import math
from pathlib import Path

from ..utils.outputs import atomic_write

# A bin's mean over fewer groups than this moves by chance more than between neighbouring
# bins (one group's AUC alone spans 0.5-1), so such bins are drawn as lone hollow markers,
# not joined into a trend line that would make their noise look like a shape.
MIN_TREND_GROUPS = 10


class MissingPlotting(RuntimeError):
    """matplotlib is not importable (an install made with --no-deps)."""


def pyplot():
    """matplotlib.pyplot on the non-interactive backend, or a clear error when it is missing."""
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingPlotting("figures need matplotlib: pip install matplotlib pillow; "
                              "pass --no-plot to skip them") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def size_series(rows: list[dict], metric: str, min_groups: int = MIN_TREND_GROUPS) -> dict:
    """What one protocol's line in one panel of `plot_metrics_by_size` is drawn from.

    labels: every bin's tick label with its number of groups ("8\\nn=0" for an empty bin,
    which keeps its place on the axis); counts; trend: the means of bins with at least
    `min_groups` groups, NaN elsewhere (matplotlib breaks the line there); sparse: the
    means of bins with 1 to min_groups - 1 groups, NaN elsewhere (markers only)."""
    counts = [int(r["groups"]) for r in rows]
    means = [math.nan if r.get(metric) is None else float(r[metric]) for r in rows]
    return {
        "labels": [f"{r['bin']}\nn={n}" for r, n in zip(rows, counts)],
        "counts": counts,
        "trend": [v if n >= min_groups else math.nan for v, n in zip(means, counts)],
        "sparse": [v if 0 < n < min_groups else math.nan for v, n in zip(means, counts)],
    }


def plot_metrics_by_size(rows_by_protocol: dict, path, xlabel: str,
                         metrics=("AUC", "RR", "R@20", "P@20", "nDCG@20", "R@100", "P@100", "nDCG@100"),
                         min_groups: int = MIN_TREND_GROUPS):
    """One panel per metric, its mean per size bin, one line per protocol; every bin is on
    the axis with its number of groups, and bins of fewer than `min_groups` are not joined."""
    plt = pyplot()
    metrics = [m for m in metrics if any(m in r for rows in rows_by_protocol.values() for r in rows)]
    cols = 4
    nrows = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.3 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, m in zip(axes.flat, metrics):
        for (protocol, rows), color in zip(rows_by_protocol.items(), colors):
            s = size_series(rows, m, min_groups)
            x = range(len(rows))
            ax.plot(x, s["trend"], marker="o", color=color, label=protocol)
            ax.plot(x, s["sparse"], marker="o", linestyle="none", markerfacecolor="none", color=color)
            ax.set_xticks(list(x), s["labels"], fontsize=7)
        ax.set_title(m)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"n = groups in the bin; hollow, unjoined markers: bins of fewer than {min_groups} "
                 "groups (too few for a trend); n=0: no group of that size", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_write(path, "wb") as fh:     # whole or absent, also on a full disk
            fig.savefig(fh, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path
