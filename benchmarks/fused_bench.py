"""Issue 14's GPU table in one run: the fused training step at the Wikimedia shape.

    python benchmarks/fused_bench.py             (OUT=dir also writes fused_bench.txt/.json)
    TRITON_INTERPRET=1 python benchmarks/fused_bench.py --smoke   (a tiny CPU run of this script)

Shape: 32,958 items, M = 49, F = 2048, D = 128, 1,079 users, every profile full at 9
items (the tutorial's protocol), the feature table resident on the GPU (random, made on
the GPU: a 6.6 GB bf16 or 13.2 GB fp32 table), WARP loss, Adam (lr 1e-3, wd 1e-5),
torch's default "ieee" matmul precision (no TF32).

Rows, measured in the same run with CUDA events (median of REPS after WARMUP):
- reference: the reference backend through autograd, torch.optim.Adam(fused=True), the
  table on the GPU (the fast baseline);
- tutorial (B = 128, fp32 only): the reference as the tutorial runs it, each batch's
  [B, 9, 49, 2048] features gathered from a host table and copied to the GPU;
- fused: acf_fast.training.fused_step replayed from a CUDA graph and fed from the
  device, as the trainer runs it (`acf-fast train --device cuda`).
Columns: ms per step; the ratios; the roofline floor of benchmarks/fused_roofline.py on
this GPU and the step's multiple of it; a 10M-triplet epoch at this rate.

Then, for bf16 and B = 128: a profile of 5 fused steps, replayed and eager (the device
kernels per step as the profiler counts them, and each kernel's mean time), and an A/B
of the slot kernels' launch options (pipeline stages, warps), which were chosen on the
CPU from compile reports only: the first GPU run says which to keep in
kernels/train_step.blocks.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import fused_roofline  # noqa: E402
from harness import fused_training_step, median_step_seconds  # noqa: E402

from acf_fast.model.losses import warp_loss  # noqa: E402
from acf_fast.testing import random_batch, random_model  # noqa: E402

SMOKE = "--smoke" in sys.argv
SHAPE = (dict(n_users=12, n_items=40, m=5, f=24, d=16) if SMOKE
         else dict(n_users=1079, n_items=32_958, m=49, f=2048, d=128))
DEVICE = torch.device("cpu" if SMOKE else "cuda")
BATCHES = (8,) if SMOKE else (128, 1024)
FEATURES = {"bf16": torch.bfloat16, "fp32": torch.float32}
WARMUP = int(os.environ.get("BENCH_WARMUP", 1 if SMOKE else 3))
REPS = int(os.environ.get("BENCH_REPS", 2 if SMOKE else 10))
EPOCH = 10_000_000   # triplets


def gpu_key() -> str | None:
    """The fused_roofline.GPUS entry of this device (None: no floor to compare with)."""
    if SMOKE:
        return None
    name = torch.cuda.get_device_name()
    if "H200" in name:
        return "H200"
    if "H100" in name and "PCIe" not in name:
        return "H100 SXM"
    return None


def table_on_device(dtype: torch.dtype) -> torch.Tensor:
    """[items, M, F] non-negative random features made on the device (ReLU outputs, like
    ResNet's last block): generating 3.3e9 values on the host would take minutes."""
    g = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(SHAPE["n_items"], SHAPE["m"], SHAPE["f"], device=DEVICE, dtype=dtype,
                    generator=g)
    return x.relu_()


def model_and_batch(features: torch.Tensor, B: int, on_host: bool = False):
    s = SHAPE
    model = random_model(n_users=s["n_users"], n_items=s["n_items"], m=s["m"], f=s["f"],
                         d=s["d"], backend="reference", feature_dtype=features.dtype,
                         features=features.cpu() if on_host else features)
    if on_host:
        model.features_on_host = True
    model = model.to(DEVICE)
    return model, random_batch(model, batch=B, lengths=[9] * B)


def reference_step(model, batch):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5,
                           fused=DEVICE.type == "cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        warp_loss(*model(*batch)).backward()
        opt.step()
    return step


def step_seconds(step) -> float:
    return median_step_seconds(step, REPS, WARMUP, cuda=not SMOKE)[0]


def profile_fused(table: torch.Tensor) -> str:
    """Kernels per fused step and their mean times, replayed from the graph and eager."""
    if SMOKE:
        return "profile: skipped in the smoke run"
    from torch.profiler import ProfilerActivity, profile

    out = []
    for capture in (True, False):
        model, batch = model_and_batch(table, 128)
        run, step = fused_training_step(model, batch, sync=False)
        step.capture = capture
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                run()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        names: dict[str, list[float]] = {}
        for e in kernels:
            us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            names.setdefault(e.name, []).append(us)
        out.append(f"fused step, bf16, B=128, {'graph replay' if capture else 'eager'}: "
                   f"{len(kernels) / 5:.1f} device kernels a step")
        for name, us in sorted(names.items(), key=lambda kv: -sum(kv[1])):
            out.append(f"  {len(us) / 5:4.1f}/step  {statistics.mean(us):9.1f} us  {name[:70]}")
        del model, step
    return "\n".join(out)


# (slot kernels' num_stages, num_warps): the shipped choice first; each compiles for sm_90
# without spills with a bf16 table (4 warps spilled, so it is not tried)
TUNING = ((2, 8), (3, 8), (4, 8), (2, 16), (3, 16))


def tuning_ab(table: torch.Tensor) -> str:
    """ms per fused step with other launch options of both slot kernels (bf16, B = 128;
    the smoke run: its one batch size and the shipped options only)."""
    from acf_fast.kernels import train_step as ts

    shipped = ts.blocks
    B = BATCHES[0]
    rows = [f"slot kernels' launch options (fused step, bf16, B={B}; replayed):",
            f"  {'stages':>6s} {'warps':>5s} {'ms/step':>9s}"]
    for stages, warps in TUNING[:1] if SMOKE else TUNING:
        def blocks(*args, **kwargs):
            out = shipped(*args, **kwargs)
            for name in ("slot_forward", "slot_backward"):
                if "num_warps" in out[name]:
                    out[name] = dict(out[name], num_stages=stages, num_warps=warps)
            return out
        ts.blocks = blocks
        try:
            model, batch = model_and_batch(table, B)
            ms = f"{step_seconds(fused_training_step(model, batch, sync=False)[0]) * 1e3:9.3f}"
            del model, batch
        except Exception as exc:
            ms = f"FAILED: {type(exc).__name__}: {str(exc)[:100]}"
        finally:
            ts.blocks = shipped
        rows.append(f"  {stages:6d} {warps:5d} {ms}")
    return "\n".join(rows)


def main() -> int:
    if not (SMOKE or torch.cuda.is_available()):
        print("fused_bench: no CUDA device; nothing to do (--smoke runs a tiny CPU check)")
        return 0
    key = gpu_key()
    name = "CPU (smoke run)" if SMOKE else torch.cuda.get_device_name()
    lines = [f"device: {name}; torch {torch.__version__}; shape {SHAPE}, profiles full at 9; "
             f"warmup {WARMUP}, reps {REPS}; floor: fused_roofline for {key or 'no known GPU'}",
             f"{'features':8s} {'B':>5s} {'step':10s} {'ms/step':>9s} {'vs ref':>8s} "
             f"{'vs tut':>8s} {'floor ms':>9s} {'x floor':>8s} {'10M epoch s':>12s}"]
    print("\n".join(lines), flush=True)
    results = []
    torch.backends.cuda.matmul.allow_tf32 = False
    for fname, dtype in FEATURES.items():
        try:
            table = table_on_device(dtype)
        except Exception as exc:
            traceback.print_exc()
            lines.append(f"{fname:8s} table FAILED: {type(exc).__name__}: {exc}"[:200])
            continue
        for B in BATCHES:
            base = {}
            kinds = ["reference", "fused"]
            if B == BATCHES[0] and fname == "fp32":
                kinds.insert(1, "tutorial")
            for kind in kinds:
                row = dict(features=fname, batch=B, step=kind)
                try:
                    model, batch = model_and_batch(table, B, on_host=kind == "tutorial")
                    run = (fused_training_step(model, batch, sync=False)[0] if kind == "fused"
                           else reference_step(model, batch))
                    s = step_seconds(run)
                    base.setdefault(kind, s)
                    floor = (fused_roofline.floor_us(B, key, 2 if fname == "bf16" else 4) / 1e6
                             if key and kind == "fused" else float("nan"))
                    row.update(seconds=s, floor=floor)
                    line = (f"{fname:8s} {B:5d} {kind:10s} {s * 1e3:9.3f} "
                            f"{base.get('reference', float('nan')) / s:7.2f}x "
                            f"{base.get('tutorial', float('nan')) / s:7.2f}x "
                            f"{floor * 1e3:9.3f} {s / floor:8.2f} {EPOCH / B * s:12.1f}")
                    del model, batch, run
                except Exception as exc:   # one failing row must not hide the others
                    traceback.print_exc()
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    line = f"{fname:8s} {B:5d} {kind:10s} FAILED: {row['error'][:150]}"
                results.append(row)
                lines.append(line)
                print(line, flush=True)
                if not SMOKE:
                    torch.cuda.empty_cache()
        for section in ((profile_fused, tuning_ab) if fname == "bf16" else ()):
            try:
                text = section(table)
            except Exception as exc:
                traceback.print_exc()
                text = f"{section.__name__} failed: {type(exc).__name__}: {exc}"
            print(text, flush=True)
            lines += ["", text]
        del table
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "fused_bench.txt"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
        with open(os.path.join(out, "fused_bench.json"), "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
