"""What an evaluation writes: metrics.json / .csv / .txt and the figures by history and
profile size (skipped with one line when matplotlib is missing). Each file is written
whole or not at all (acf_fast.utils.outputs.atomic_write)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from ..utils.outputs import atomic_write, write_text_atomic
from .metrics import metric_names


def write_report(report: dict, out: Path, plot: bool = True) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "metrics.json", json.dumps(report, indent=2))
    names = metric_names(report["ks"])
    with atomic_write(out / "metrics.csv", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["protocol"] + names)
        for p, values in report["metrics"].items():
            w.writerow([p] + [f"{values[n]:.6f}" for n in names])
    write_text_atomic(out / "metrics.txt", report["table"] + "\n" + report.get("table_extra", "") + "\n"
                       + report.get("protocols_note", "") + "\n")
    paths = {"json": str(out / "metrics.json"), "csv": str(out / "metrics.csv")}
    if plot and report["by_history_size"]:
        from .plots import MissingPlotting, plot_metrics_by_size

        try:
            paths["png"] = str(plot_metrics_by_size(report["by_history_size"],
                                                    out / "metrics_by_history_size.png",
                                                    "training-history size (items)"))
            paths["png_profile"] = str(plot_metrics_by_size(report["by_profile_size"],
                                                            out / "metrics_by_profile_size.png",
                                                            "profile size (items)"))
        except MissingPlotting as exc:
            # the metrics are written; the figures are a convenience, not a reason to fail
            print(f"acf-fast: figures skipped ({exc})", file=sys.stderr)
    report["files"] = paths
    return paths
