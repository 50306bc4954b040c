"""Figures (matplotlib, a dependency of the package; an install without it skips them)."""

from __future__ import annotations

from pathlib import Path

from ..utils.outputs import atomic_write


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


def plot_metrics_by_size(rows_by_protocol: dict, path, xlabel: str,
                         metrics=("AUC", "RR", "R@20", "P@20", "nDCG@20", "R@100", "P@100", "nDCG@100")):
    """One panel per metric, its mean per size bin, one line per protocol."""
    plt = pyplot()
    metrics = [m for m in metrics if any(m in r for rows in rows_by_protocol.values() for r in rows)]
    cols = 4
    nrows = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        for protocol, rows in rows_by_protocol.items():
            ax.plot([r["bin"] for r in rows], [r[m] for r in rows], marker="o", label=protocol)
        ax.set_title(m)
        ax.set_xlabel(xlabel)
        ax.tick_params(axis="x", labelrotation=45)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_write(path, "wb") as fh:     # whole or absent, also on a full disk
            fig.savefig(fh, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path
