"""Shared pieces of the benchmarks: the Wikimedia-shaped workload, one training step,
peak-memory measurement, and the same-run ratio table.

Baselines come from acf_fast.testing (the same builders the tests use), never rewritten.
"""

from __future__ import annotations

import platform
import statistics
import time

import torch
from report import LoadProbe, Row, cores, render

from acf_fast.model.losses import warp_loss
from acf_fast.testing import random_features, random_model, wikimedia_batch

# docs/model.md#cost-per-batch: B = 128, P <= 9 (lengths 0..9), M = 49, F = 2048, D = 128; 1,000 items.
WIKIMEDIA = dict(n_users=1079, n_items=1000, m=49, f=2048, d=128)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def machine() -> str:
    """CPU model, cores, torch version and threads (and the GPU on a CUDA run)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(l.split(":", 1)[1].strip() for l in fh if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    host = (f"{cpu}, {cores()} cores; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")
    return f"{torch.cuda.get_device_name()}; {host}" if torch.cuda.is_available() else host


_FEATURES: dict = {}


def wikimedia_model(backend: str, feature_dtype: torch.dtype, dev=None, **shape):
    """The benchmark model; the random feature tensor is built once per process."""
    s = {**WIKIMEDIA, **shape}
    key = (s["n_items"], s["m"], s["f"])
    if key not in _FEATURES:
        _FEATURES[key] = random_features(s["n_items"], s["m"], s["f"], seed=1)
    model = random_model(n_users=s["n_users"], n_items=s["n_items"], m=s["m"], f=s["f"], d=s["d"],
                         backend=backend, feature_dtype=feature_dtype, features=_FEATURES[key])
    return model.to(dev or device())


def fused_training_step(model, data, sync: bool = True):
    """(step, its FusedTrainStep): the triton model's fused step on the batch `data`, fed as
    the trainer feeds it (an epoch order on the device: the batch's rows, repeated)."""
    from acf_fast.training.fused_step import FusedTrainStep

    model.backend = "triton"
    B = data.user_ids.numel()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    fused = FusedTrainStep(model, opt, "warp")
    prof = torch.where(data.profile_mask, data.profile_ids, 0)
    order = torch.arange(B, device=data.user_ids.device).repeat(4096)
    fused.bind_epoch(data.user_ids, prof, data.pos, data.neg, order, batch_size=B)

    def step():
        loss = fused.epoch_step(B)
        if sync and data.user_ids.is_cuda:
            torch.cuda.synchronize()
        return loss

    return step, fused


def median_step_seconds(step, reps: int, warmup: int, cuda: bool = True) -> tuple[float, float]:
    """(median seconds a step, median host seconds to issue one) after `warmup` steps: CUDA
    events around each step on a GPU, the wall clock otherwise (both medians the same)."""
    for _ in range(warmup):
        step()
    if not cuda:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), statistics.median(times)
    torch.cuda.synchronize()
    times, host = [], []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        step()
        host.append(time.perf_counter() - t0)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), statistics.median(host)


def training_setup(backend: str, feature_dtype: torch.dtype, batch: int = 128,
                   compile: bool = False, dev=None, features_on_host: bool = False,
                   sync: bool = True, cuda_graph: bool = False, fused: bool = False, **shape):
    """(model, batch, step): step runs forward, WARP loss, backward and Adam on a fixed batch.

    features_on_host keeps the table in host memory (the tutorial's way). sync=True ends
    each CUDA step with a synchronize, for wall-clock timers; CUDA-event timing wants False.
    cuda_graph (triton backend, CUDA): the step is acf_fast.training.cuda_graph.GraphedTrainStep,
    fed with host copies of the batch as a training loop would (one eager warm-up call,
    then the second call captures; later calls replay).
    fused (triton backend): acf_fast.training.fused_step, the whole step in 11 launches, fed
    from the device as the trainer feeds it (the batch bound as an epoch order; on CUDA the
    second call captures, later calls replay).
    """
    dev = dev or device()
    if features_on_host:
        model = wikimedia_model(backend, feature_dtype, torch.device("cpu"), **shape)
        model.features_on_host = True
        model.to(dev)
    else:
        model = wikimedia_model(backend, feature_dtype, dev, **shape)
    data = wikimedia_batch(model, batch=batch)
    if fused:
        return model, data, fused_training_step(model, data, sync)[0]
    if cuda_graph:
        from acf_fast.training.cuda_graph import GraphedTrainStep

        opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5, fused=True,
                               capturable=True)
        graphed = GraphedTrainStep(model, opt, warp_loss, warmup=1)
        host = data.to("cpu")

        def graph_step():
            loss = graphed(host.user_ids, host.profile_ids, host.pos, host.neg, host.profile_mask)
            if sync:
                torch.cuda.synchronize()
            return loss

        return model, data, graph_step
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    fwd = torch.compile(model) if compile else model

    def step():
        opt.zero_grad(set_to_none=True)
        pos, neg = fwd(*data)
        loss = warp_loss(pos, neg)
        loss.backward()
        opt.step()
        if sync and data.user_ids.is_cuda:
            torch.cuda.synchronize()
        return loss

    return model, data, step


def make_training_step(backend: str, feature_dtype: torch.dtype, batch: int = 128,
                       compile: bool = False, dev=None):
    """A closure running forward, WARP loss, backward and Adam on a fixed batch."""
    return training_setup(backend, feature_dtype, batch, compile=compile, dev=dev)[2]


# ---------------------------------------------------------------- peak memory
def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def cpu_step_peak_bytes(step) -> int | None:
    """Peak resident memory one (already warmed-up) step adds, from Linux's VmHWM.

    Writing 5 to /proc/self/clear_refs resets the high-water mark to the current RSS, so
    the setup's own peak (building features, compiling) does not hide the step's. glibc's
    free heap is handed back first: otherwise memory an earlier step freed stays resident
    and is reused, and a step made of allocations under glibc's mmap threshold (up to
    32 MB) shows ~0 while one with big (mmap'd) tensors shows its full peak.
    Returns None where /proc is not Linux's.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        ctypes.CDLL(libc_name).malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _status_kb("VmRSS")
    except OSError:
        return None
    step()
    return max(_status_kb("VmHWM") - before, 0) * 1024


def step_peak_bytes(step) -> int | None:
    """Peak memory added by one step on the benchmark device (step must be warmed up)."""
    return cuda_step_peak_bytes(step) if device().type == "cuda" else cpu_step_peak_bytes(step)


def cuda_step_peak_bytes(step) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


# ---------------------------------------------------------------- results table
ROWS: list[Row] = []
PROBE: LoadProbe | None = None   # started by conftest.py when the session starts


def record(group: str, name: str, benchmark=None, seconds: float | None = None,
           peak_bytes: int | None = None, **extra) -> None:
    """Add a row; `benchmark` is pytest-benchmark's fixture after it has run. Each note
    in `extra` (key=value) needs its explanation in report.NOTES."""
    if seconds is None:
        seconds = benchmark.stats.stats.median
    others = PROBE.since_last() if PROBE is not None else None
    ROWS.append(Row(group, name, seconds, peak_bytes, extra, others))


def table() -> str:
    if PROBE is not None and PROBE.end_load is None:
        PROBE.finish()
    return render(ROWS, machine(), PROBE or LoadProbe(), cores())
