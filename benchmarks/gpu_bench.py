"""Training-step benchmark on a CUDA GPU: reference vs triton backend.

One step = forward (pair scores), WARP loss, backward, Adam (lr 1e-3, wd 1e-5), on the
The benchmarks' workload (cost model: docs/model.md#cost-per-batch): 1,000-item catalogue, M = 49, F = 2048, D = 128, P <= 9 with lengths
drawn from 0..9, B = 128 and 1024, feature table resident on the GPU in fp32 or bf16.
Matmul precision: "ieee" (torch default, no TF32) and "tf32" (allow_tf32 for both
backends). Timing: CUDA events around each step, median of REPS after WARMUP.

Prints a table (and writes it, plus JSON, under $OUT when set). Every configuration is
wrapped in try/except: a failure is printed and the rest still runs.

Roofline: the triton step's essential work is the reduction of the batch's U distinct
items, forward and W_red's gradient: 2 x (2 U M F D) FLOPs and 2 x U M F bytes of the
table, plus the per-item projection GEMMs; "roof" is max(bytes / HBM bandwidth,
FLOPs / peak) with the peaks of the detected GPU (datasheet numbers, dense; the bf16
tensor-core rate for 16-bit tables, whose reduction runs on tensor cores). At B = 128
the roof is tens of microseconds, below the launch and Python cost of a step (see
"host ms"), so "x roof" there measures the host, not the kernels.

Baselines, both measured in the same run ("speedup" and "vs tut" columns):
- "reference": the reference backend with the feature table resident on the GPU (a
  faster baseline than the tutorial's);
- "ref-host": the reference as the tutorial runs it, `ACF(..., features_on_host=True)`:
  each batch's [B, P, M, F] features gathered on the host and copied to the GPU
  (B = 128, ieee only: the issue's target; B = 1024 would copy ~2 GB per step).
"tri-host" is the triton backend on the same host-resident table (it copies only the
batch's distinct items, pinned and non-blocking). "host ms" is how long the CPU takes
to issue one step (until step() returns, before the final synchronize): when it is
close to ms/step, the step is bound by Python/launch overhead, not by the GPU.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from harness import (WIKIMEDIA, cuda_step_peak_bytes, median_step_seconds, training_setup,  # noqa: E402
                     wikimedia_model)

from acf_fast.testing import wikimedia_batch  # noqa: E402

# --smoke: a tiny CPU run (TRITON_INTERPRET=1) that checks this script end to end
SMOKE = "--smoke" in sys.argv
SHAPE = dict(n_items=20, m=4, f=16, d=16) if SMOKE else {}
DEVICE = torch.device("cpu" if SMOKE else "cuda")
WARMUP = int(os.environ.get("BENCH_WARMUP", 1 if SMOKE else 3))
REPS = int(os.environ.get("BENCH_REPS", 2 if SMOKE else 10))  # 22 configs in ~2 min
BATCHES = (8,) if SMOKE else (128, 1024)
FEATURES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # bf16 first: the issue's target
PRECISIONS = ("ieee", "tf32")
# name fragment -> (HBM bytes/s, fp32 FLOP/s, tf32 tensor FLOP/s, bf16 tensor FLOP/s),
# dense datasheet peaks (16-bit tables run the reduction on bf16/fp16 tensor cores)
PEAKS = {"H200": (4.8e12, 67e12, 495e12, 989e12), "H100 PCIe": (2.0e12, 51e12, 378e12, 756e12),
         "H100": (3.35e12, 67e12, 495e12, 989e12), "A100": (2.0e12, 19.5e12, 156e12, 312e12),
         "L4": (0.3e12, 30e12, 120e12, 121e12), "A10": (0.6e12, 31e12, 62e12, 125e12)}


def device_name():
    return "CPU (smoke run)" if SMOKE else torch.cuda.get_device_name()


def peaks():
    name = device_name()
    for key, val in PEAKS.items():
        if key in name:
            return key, val
    return None, None


def build(backend, feature_dtype, batch_size, on_host=False, cuda_graph=False, fused=False):
    model, data, step = training_setup(backend, feature_dtype, batch_size, dev=DEVICE,
                                       features_on_host=on_host, sync=False,
                                       cuda_graph=cuda_graph, fused=fused, **SHAPE)
    if on_host:
        assert model.feature_table.device.type == "cpu"
    return model, data, step


def time_step(step, reps=REPS, warmup=WARMUP):
    """-> (median seconds per step, median host seconds to issue one step)."""
    return median_step_seconds(step, reps, warmup, cuda=not SMOKE)


def essential_work(data, feature_dtype):
    """(FLOPs, bytes) of the fused step's unavoidable part, for the batch's distinct items."""
    U = int(torch.unique(data.profile_ids[data.profile_mask]).numel())
    shape = {**WIKIMEDIA, **SHAPE}
    M, F, D = shape["m"], shape["f"], shape["d"]
    elem = torch.finfo(feature_dtype).bits // 8
    flops = 2 * (2 * U * M * F * D) + 4 * (2 * U * M * D * D)  # reduce fwd+dW, xr fwd/bwd GEMMs
    bytes_ = 2 * U * M * F * elem + 8 * U * M * D * 4          # table twice, r/xr/dr/dxr traffic
    return U, flops, bytes_


def run_config(backend, fname, batch_size, precision):
    """backend: reference | ref-host | triton | tri-host (-host: table in host memory) |
    tri-graph (the triton step replayed from a CUDA graph) | tri-fused (the fused 11-launch
    step, acf_fast.training.fused_step, replayed from a CUDA graph: the trainer's default)."""
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    if not SMOKE:
        torch.cuda.empty_cache()
    on_host = backend.endswith("-host")
    graph = backend in ("tri-graph", "tri-fused")
    name = {"ref-host": "reference", "tri-host": "triton", "tri-graph": "triton",
            "tri-fused": "triton"}.get(backend, backend)
    model, data, step = build(name, FEATURES[fname], batch_size, on_host,
                              graph and backend == "tri-graph", fused=backend == "tri-fused")
    if graph and not SMOKE:
        # the peak of the capturing call: a replay allocates nothing (its memory was set
        # aside at capture), and the capture allocates what one static step needs
        step()
        peak = cuda_step_peak_bytes(step)
        # two steps done already: one warm-up fewer keeps the step count of every row
        # the same (max|dpos| compares parameters after equally many Adam steps)
        seconds, host = time_step(step, warmup=WARMUP - 1)
    else:
        seconds, host = time_step(step)  # same number of steps everywhere: max|dpos| compares
        peak = 0 if SMOKE else cuda_step_peak_bytes(step)
    with torch.no_grad():
        pos, _ = model(*data)
    return seconds, host, peak, pos.float().cpu(), data


def main():
    if not (SMOKE or torch.cuda.is_available()):
        print("gpu_bench: no CUDA device; nothing to do (--smoke runs a tiny CPU check)")
        return 0
    gpu, peak_rates = peaks()
    header = (f"device: {device_name()} (peaks used: {gpu or 'unknown'}); "
              f"torch {torch.__version__}; triton {_triton_version()}; warmup {WARMUP}, reps {REPS}")
    lines = [header,
             f"{'features':8s} {'B':>5s} {'matmul':6s} {'backend':10s} {'ms/step':>9s} {'host ms':>8s} "
             f"{'speedup':>8s} {'vs tut':>8s} {'peak MB':>9s} {'mem/ref':>8s} {'U':>5s} {'GB/s':>8s} "
             f"{'TFLOP/s':>8s} {'roof ms':>8s} {'x roof':>7s} {'max|dpos|':>10s}"]
    print("\n".join(lines), flush=True)
    results = []
    for fname in FEATURES:
        for batch_size in BATCHES:
            # TF32 at the first batch size only: the B = 1024 rows are the slowest, and
            # the tri-graph rows had to fit in the same time limit
            for precision in (PRECISIONS if batch_size == BATCHES[0] else PRECISIONS[:1]):
                base, tutorial = {}, {}
                backends = ["reference", "triton", "tri-graph", "tri-fused"]
                if batch_size == BATCHES[0] and precision == "ieee":
                    backends = ["reference", "ref-host", "triton", "tri-host", "tri-graph",
                                "tri-fused"]
                for backend in backends:
                    row = dict(features=fname, batch=batch_size, matmul=precision, backend=backend)
                    try:
                        t0 = time.time()
                        seconds, host, peak, pos, data = run_config(backend, fname, batch_size,
                                                                    precision)
                        row.update(seconds=seconds, host_seconds=host, peak_bytes=peak,
                                   wall=time.time() - t0)
                        U, flops, bytes_ = essential_work(data, FEATURES[fname])
                        row.update(distinct_items=U, flops=flops, bytes=bytes_)
                        if backend == "reference":
                            base = dict(seconds=seconds, peak=peak, pos=pos)
                        elif backend == "ref-host":
                            tutorial = dict(seconds=seconds, peak=peak)
                        line = format_row(row, base, tutorial, pos, peak_rates, precision)
                    except Exception as exc:  # keep going: one broken config must not hide the rest
                        traceback.print_exc()
                        row["error"] = f"{type(exc).__name__}: {exc}"
                        line = (f"{fname:8s} {batch_size:5d} {precision:6s} {backend:10s} "
                                f"FAILED: {row['error'][:150]}")
                    results.append(row)
                    lines.append(line)
                    print(line, flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    for section in (reduction_ab, kernel_resources, profile_triton_step):
        try:
            text = section()
        except Exception as exc:
            traceback.print_exc()
            text = f"{section.__name__} failed: {type(exc).__name__}: {exc}"
        print(text, flush=True)
        lines += ["", text]
    write_out("\n".join(lines), results)
    return 0


def _median_seconds(fn, reps=20):
    for _ in range(3):
        fn()
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _peak_bytes(fn):
    if SMOKE:
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def reduction_ab():
    """The measurement behind kernels/reduce.py's choice: r = W_red x + b and dW_red for the
    distinct items of a B = 128 batch, Triton gather-GEMM vs gather + cuBLAS.

    "cuBLAS ms": the gathered rows widened to the parameters' dtype (fp32 GEMMs).
    "cuBLAS16 ms" (16-bit tables): the gathered 16-bit rows times W_red in 16 bits and
    bf16 dr times the rows, the same mixed precision as the Triton tensor-core kernels.
    max|dr|, max|dW|: Triton vs the fp32 "cuBLAS" path (for 16-bit tables this is the
    rounding of W_red and dr to 16 bits, about 1e-3 relative)."""
    from acf_fast.kernels.reduce import reduce_items, reduce_weight_grad

    rows = ["reduction alone (forward + dW_red), distinct items of a B=128 batch: "
            "Triton gather-GEMM vs gather + cuBLAS",
            f"  {'features':8s} {'matmul':6s} {'U':>5s} {'triton ms':>10s} {'cuBLAS ms':>10s} "
            f"{'cuBLAS16 ms':>11s} {'triton MB':>10s} {'cuBLAS MB':>10s} {'max|dr|':>9s} "
            f"{'max|dW|':>9s}"]
    for fname, dtype in FEATURES.items():
        model = wikimedia_model("triton", dtype, DEVICE, **SHAPE)
        data = wikimedia_batch(model, batch=128)
        ids = torch.unique(data.profile_ids[data.profile_mask])
        layer = model.user_model.feats.dim_reductor
        W, b, table = layer.weight.detach(), layer.bias.detach(), model.feature_table
        U, (M, F), D = ids.numel(), table.shape[1:], W.shape[0]
        dr = torch.randn(U, M, D, device=W.device)

        def fused():
            return reduce_items(table, ids, W, b), reduce_weight_grad(table, ids, dr)

        def gathered():
            x = table[ids].to(W.dtype).reshape(-1, F)
            return torch.addmm(b, x, W.T).view(U, M, D), dr.reshape(-1, D).T @ x

        def gathered16():
            x = table[ids].reshape(-1, F)
            r = torch.addmm(b.to(x.dtype), x, W.to(x.dtype).T).float().view(U, M, D)
            g = (dr.reshape(-1, D).to(torch.bfloat16).T @ x.to(torch.bfloat16)).float()
            return r, g

        low = dtype in (torch.float16, torch.bfloat16)
        for precision in PRECISIONS:
            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
            (r1, g1), (r2, g2) = fused(), gathered()
            t16 = _median_seconds(gathered16) * 1e3 if low else float("nan")
            rows.append(f"  {fname:8s} {precision:6s} {U:5d} {_median_seconds(fused) * 1e3:10.3f} "
                        f"{_median_seconds(gathered) * 1e3:10.3f} {t16:11.3f} "
                        f"{_peak_bytes(fused) / 2**20:10.1f} {_peak_bytes(gathered) / 2**20:10.1f} "
                        f"{float((r1 - r2).abs().max()):9.2e} {float((g1 - g2).abs().max()):9.2e}")
        del model
    torch.backends.cuda.matmul.allow_tf32 = False
    return "\n".join(rows)


def kernel_resources():
    """Registers, spills and shared memory of every compiled kernel variant (real GPUs only)."""
    import importlib
    rows = ["kernel variants compiled in this run: name, warps, shared bytes, registers, spills"]
    for mod in ("reduce", "component_attention", "item_attention"):
        module = importlib.import_module(f"acf_fast.kernels.{mod}")
        for name, fn in sorted(vars(module).items()):
            caches = getattr(fn, "device_caches", None)
            if not name.endswith("_kernel") or caches is None:
                continue
            for cache in caches.values():
                kernels = cache[0] if isinstance(cache, tuple) else cache
                for compiled in kernels.values():
                    if hasattr(compiled, "_init_handles"):
                        compiled._init_handles()
                    meta = compiled.metadata
                    rows.append(f"  {name:30s} warps={getattr(meta, 'num_warps', '?')} "
                                f"shared={getattr(meta, 'shared', '?')} "
                                f"regs={getattr(compiled, 'n_regs', '?')} "
                                f"spills={getattr(compiled, 'n_spills', '?')}")
    return "\n".join(rows)


def profile_triton_step():
    """Where the fused step's GPU time goes (bf16 features, B = 128, no TF32)."""
    if SMOKE:
        return "profile: skipped in the smoke run"
    from torch.profiler import ProfilerActivity, profile
    torch.backends.cuda.matmul.allow_tf32 = False
    _, _, step = build("triton", torch.bfloat16, 128)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    for key in ("self_cuda_time_total", "self_device_time_total"):
        try:
            return ("profile of 5 triton steps (bf16, B=128):\n"
                    + averages.table(sort_by=key, row_limit=18, max_name_column_width=60))
        except Exception:
            continue
    return averages.table(row_limit=18)


def format_row(row, base, tutorial, pos, peak_rates, precision):
    s = row["seconds"]
    speed = base["seconds"] / s if base else float("nan")
    vs_tut = tutorial["seconds"] / s if tutorial else float("nan")
    mem = row["peak_bytes"] / base["peak"] if base and base.get("peak") else float("nan")
    gbs = row["bytes"] / s / 1e9
    tfs = row["flops"] / s / 1e12
    roof_ms, x_roof = float("nan"), float("nan")
    if peak_rates and row["backend"].startswith("tri"):
        bw, fp32, tf32, bf16 = peak_rates
        rate = (bf16 if row["features"] in ("bf16", "fp16")
                else tf32 if precision == "tf32" else fp32)
        roof = max(row["bytes"] / bw, row["flops"] / rate)
        roof_ms, x_roof = roof * 1e3, s / roof
    dpos = float((pos - base["pos"]).abs().max()) if base and "pos" in base else float("nan")
    return (f"{row['features']:8s} {row['batch']:5d} {precision:6s} {row['backend']:10s} "
            f"{s * 1e3:9.3f} {row['host_seconds'] * 1e3:8.3f} {speed:7.2f}x {vs_tut:7.2f}x "
            f"{row['peak_bytes'] / 2**20:9.1f} {mem:8.3f} "
            f"{row['distinct_items']:5d} {gbs:8.1f} {tfs:8.2f} {roof_ms:8.3f} {x_roof:7.2f} "
            f"{dpos:10.2e}")


def _triton_version():
    try:
        import triton
        return triton.__version__
    except Exception:
        return "missing"


def write_out(text, results):
    out = os.environ.get("OUT")
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_bench.txt"), "w") as fh:
        fh.write(text + "\n")
    with open(os.path.join(out, "gpu_bench.json"), "w") as fh:
        json.dump(results, fh, indent=1, default=str)


if __name__ == "__main__":
    sys.exit(main())
