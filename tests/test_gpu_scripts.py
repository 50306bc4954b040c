"""The GPU session's prepared scripts run end to end before a GPU is ever lent: a GPU
session has 15 minutes, and a script that fails on its first line wastes them.

`benchmarks/fused_bench.py --smoke` (issue 14's table) runs its every row and section at
a tiny shape on the CPU under the Triton interpreter; `gpu_check.sh` is checked for shell
syntax and for calling each script it names.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def test_fused_bench_smoke_runs_every_row(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", OUT=str(tmp_path))
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fused_bench.py"), "--smoke"],
                         capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line.split() for line in res.stdout.splitlines()
            if line.startswith(("bf16 ", "fp32 "))]
    assert "FAILED" not in res.stdout, res.stdout + res.stderr[-2000:]
    # bf16: reference, fused; fp32: reference, tutorial, fused (B = 8 in the smoke run)
    assert [(r[0], r[2]) for r in rows] == [("bf16", "reference"), ("bf16", "fused"),
                                            ("fp32", "reference"), ("fp32", "tutorial"),
                                            ("fp32", "fused")]
    assert all(float(r[3]) > 0 for r in rows)
    assert "slot kernels' launch options (fused step, bf16, B=8; replayed)" in res.stdout
    assert (tmp_path / "fused_bench.txt").read_text().startswith("device: CPU (smoke run)")
    assert (tmp_path / "fused_bench.json").stat().st_size > 0


def test_gpu_check_script_parses_and_names_existing_scripts():
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for name in ("benchmarks/fused_bench.py", "benchmarks/gpu_bench.py",
                 "tests/training/test_fused_step.py"):
        assert name in text
        assert (ROOT / name).exists(), name
