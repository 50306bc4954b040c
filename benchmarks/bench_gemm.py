"""Issue 17: the cpu backend's training step against the tutorial's eager step (the
reference backend, fp32 table, as the tutorial runs it), measured in the same run, at
three shapes, with the GEMM choice of this machine:

    bench       1,000 items, profile lengths uniform in 0..9 (the other benchmarks' shape)
    realistic   8,000 items, every profile full at 9 items (the tutorial's protocol)
    wikimedia   32,958 items, full profiles, a 6.6 GB bf16 table memory-mapped from a file
                generated in chunks (--wikimedia; the file is deleted afterwards). The
                tutorial's step there runs on the same bf16 table (its fp32 table would be
                13.2 GB): the reference widens the gathered rows and multiplies in fp32.

    .venv/bin/python benchmarks/bench_gemm.py [--wikimedia] [--rounds 5] [--out FILE]

Each step is timed two ways: wall-clock min over rounds on all threads, and the min of
the process CPU time on one thread (robust to other jobs on a shared machine; on an idle
2-core machine the 2-thread step is about half of it). The load average is printed with
every row. B = 128, M = 49, F = 2048, D = 128.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from acf_fast.backends import cpu, gemm_choice  # noqa: E402
from acf_fast.model.losses import warp_loss  # noqa: E402
from acf_fast.model.weights import ACFWeights  # noqa: E402
from acf_fast.testing import random_batch, random_features, random_model  # noqa: E402

M, F, D, B = 49, 2048, 128, 128
BASE_ITEMS = 1000            # distinct feature grids, recycled over larger catalogues
EPOCH_TRIPLETS = 10_000_000


def base_features() -> torch.Tensor:
    return random_features(BASE_ITEMS, M, F, seed=1)


def tiled_table(n_items: int, dtype, base: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """[n_items + 1, M, F] (row 0 = padding) filled with the base grids in turn, in RAM or
    (path) in a memory-mapped file written chunk by chunk."""
    if path is None:
        table = torch.empty((n_items + 1, M, F), dtype=dtype)
        table[0] = 0
        for s in range(1, n_items + 1, BASE_ITEMS):
            n = min(BASE_ITEMS, n_items + 1 - s)
            table[s:s + n] = base[:n].to(dtype)
        return table
    chunk = base.to(dtype).contiguous()
    with open(path, "wb") as fh:
        fh.write(torch.zeros((1, M, F), dtype=dtype).view(torch.int16).numpy().tobytes())
        for s in range(1, n_items + 1, BASE_ITEMS):
            n = min(BASE_ITEMS, n_items + 1 - s)
            fh.write(chunk[:n].view(torch.int16).numpy().tobytes())
    numel = (n_items + 1) * M * F
    return torch.from_file(path, shared=False, size=numel, dtype=dtype).view(n_items + 1, M, F)


def model_on(table: torch.Tensor, backend: str, base: torch.Tensor):
    """The benchmark model (1,079 users, D = 128) over `table`'s catalogue."""
    n_items = table.shape[0] - 1
    model = random_model(n_users=1079, n_items=BASE_ITEMS, m=M, f=F, d=D, backend=backend,
                         feature_dtype=table.dtype, features=base)
    torch.manual_seed(1)
    emb = torch.nn.Embedding(n_items + 1, D, padding_idx=0)
    model.item_model = emb
    model.user_model.profile_embedding = emb      # tied, as in the tutorial
    model.all_items = torch.arange(1, n_items + 1)
    model.feature_table = table
    return model


def step_of(model, full: bool):
    lengths = [9] * B if full else None
    data = random_batch(model, batch=B, max_profile=9, seed=0, lengths=lengths)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        pos, neg = model(*data)
        warp_loss(pos, neg).backward()
        opt.step()
    return step, data


def timings(step, rounds: int) -> tuple[float, float]:
    """(wall-clock min on all threads, process CPU-time min on one thread)."""
    step()
    wall = min(_timed(step, time.perf_counter) for _ in range(rounds))
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step()
        cpu_1t = min(_timed(step, time.process_time) for _ in range(max(2, rounds // 2)))
    finally:
        torch.set_num_threads(saved)
    return wall, cpu_1t


def _timed(fn, clock) -> float:
    start = clock()
    fn()
    return clock() - start


def reduce_gflop(data, n_items_distinct: int) -> float:
    """W_red forward + weight gradient FLOPs of one step (the GEMM floor's work)."""
    return 2 * 2 * n_items_distinct * M * F * D / 1e9


def run_shape(name, n_items, full, rounds, base, rows, mmap_dir=None):
    path = os.path.join(mmap_dir, "acf_bench_table.bf16") if mmap_dir else None
    configs = [("tutorial", "reference", torch.float32, "highest"),
               ("cpu bf16", "cpu", torch.bfloat16, "highest"),
               ("cpu fp32", "cpu", torch.float32, "highest"),
               ("cpu fp32 medium", "cpu", torch.float32, "medium")]
    if path:   # one bf16 table on disk for everything (an fp32 one would be 13.2 GB)
        configs = [("tutorial (bf16 table)", "reference", torch.bfloat16, "highest"),
                   ("cpu bf16", "cpu", torch.bfloat16, "highest")]
    tables = {}
    try:
        base_time = None
        for label, backend, dtype, precision in configs:
            if dtype not in tables:
                tables[dtype] = tiled_table(n_items, dtype, base, path)
            torch.set_float32_matmul_precision(precision)
            try:
                model = model_on(tables[dtype], backend, base)
                step, data = step_of(model, full)
                distinct = int(data.profile_ids[data.profile_mask].unique().numel())
                wall, cpu_1t = timings(step, rounds)
                choice = gemm_choice.for_tensors(model.feature_table, ACFWeights.of(model).red_w) \
                    if backend == "cpu" else None
            finally:
                torch.set_float32_matmul_precision("highest")
            base_time = base_time or (wall, cpu_1t)
            rows.append(dict(shape=name, config=label, wall=wall, cpu_1t=cpu_1t,
                             vs_wall=base_time[0] / wall, vs_cpu=base_time[1] / cpu_1t,
                             slots=int(data.profile_mask.sum()), distinct=distinct,
                             gflop=reduce_gflop(data, distinct),
                             gemm=f"{choice.forward}/{choice.weight_grad}" if choice else "-",
                             load=os.getloadavg()[0]))
            print(format_row(rows[-1]), flush=True)
            del model, step
    finally:
        tables.clear()
        if path and os.path.exists(path):
            os.unlink(path)


def format_row(r) -> str:
    return (f"{r['shape']:10s} {r['config']:22s} {r['wall'] * 1e3:9.1f} {r['vs_wall']:6.2f}x "
            f"{r['cpu_1t'] * 1e3:9.1f} {r['vs_cpu']:6.2f}x {r['slots']:6d} {r['distinct']:6d} "
            f"{r['gflop']:6.1f} {r['gemm']:10s} {r['load']:5.2f}")


HEADER = (f"{'shape':10s} {'config':22s} {'wall ms':>9s} {'vs tut':>7s} {'1t cpu ms':>9s} "
          f"{'vs tut':>7s} {'slots':>6s} {'items':>6s} {'GFLOP':>6s} {'gemm f/wg':10s} {'load1':>5s}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--wikimedia", action="store_true", help="also the 32,958-item memory-mapped table")
    ap.add_argument("--mmap-dir", default=tempfile.gettempdir(), help="where the 6.6 GB file goes")
    ap.add_argument("--shapes", default="bench,realistic", help="comma-separated: bench,realistic")
    args = ap.parse_args(argv)
    cpu.register()
    from acf_fast.pipeline.info import report

    print(report(), flush=True)
    print(f"load average at start: {os.getloadavg()}; torch threads {torch.get_num_threads()}")
    print(HEADER)
    base = base_features()
    rows: list[dict] = []
    shapes = args.shapes.split(",")
    if "bench" in shapes:
        run_shape("bench", 1000, False, args.rounds, base, rows)
    if "realistic" in shapes:
        run_shape("realistic", 8000, True, args.rounds, base, rows)
    if args.wikimedia:
        run_shape("wikimedia", 32_958, True, max(3, args.rounds // 2), base, rows,
                  mmap_dir=args.mmap_dir)
    steps = EPOCH_TRIPLETS / B
    for r in rows:
        if r["config"] == "cpu bf16":
            print(f"{r['shape']}: 10M-triplet epoch, cpu bf16: {steps * r['wall'] / 3600:.2f} h at "
                  f"this run's wall step, {steps * r['cpu_1t'] / 2 / 3600:.2f} h at half the "
                  f"1-thread CPU time (2 idle cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
