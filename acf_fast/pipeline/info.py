"""`acf-fast info`: the machine, its ISA extensions, and which GEMM the cpu backend runs
(acf_fast.backends.gemm_choice) with the measured GFLOP/s of every candidate."""

from __future__ import annotations

import os
import platform

import torch

# the extensions that decide which GEMM unit is fastest (x86 flags, ARM features)
ISA_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                   "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16", "asimd", "bf16", "i8mm",
                   "sve", "sve2", "sme", "sme2")
SHAPE = (49, 2048, 128)   # M, F, D of the Wikimedia model


def isa_extensions() -> list[str]:
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
    except OSError:
        pass
    return [f for f in ISA_OF_INTEREST if f in flags]


def _describe(choice, label: str) -> list[str]:
    lines = [f"  {label}: [{choice.source}]"]
    for direction, kind in (("forward", choice.forward), ("weight-grad", choice.weight_grad)):
        rates = choice.gflops.get(direction, {})
        others = ", ".join(f"{k} {v:.3g}" for k, v in rates.items())
        lines.append(f"    {direction:12s} {kind:9s}" + (f" GFLOP/s per core: {others}" if rates else ""))
    return lines


def report() -> str:
    from ..backends import cpu, gemm_choice as gc

    lines = [f"machine: {gc.cpu_model()}, {os.cpu_count()} logical CPUs, {platform.machine()}",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, ATen CPU capability "
             f"{torch.backends.cpu.get_cpu_capability()}, MKL {torch.backends.mkl.is_available()}, "
             f"oneDNN {torch.backends.mkldnn.is_available()}",
             f"ISA extensions: {' '.join(isa_extensions()) or '(none of interest found)'}"]
    ops = cpu.load(required=False)
    if ops is None:
        lines.append(f"cpu backend: unavailable ({cpu._load()[1]})")
        return "\n".join(lines)
    cpu.register()
    m, f, d = SHAPE
    lines.append(f"cpu backend GEMM for W_red (M={m} F={f} D={d}; cache {gc.cache_path()}):")
    lines += _describe(gc.choose("bf16-table", m, f, d), "bf16 table")
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        lines += _describe(gc.choose("fp32-table", m, f, d), 'fp32 table, precision "medium"')
    finally:
        torch.set_float32_matmul_precision(saved)
    lines.append("  fp32 table, default precision: fp32 (exact)")
    return "\n".join(lines)
