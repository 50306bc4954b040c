"""The fused training step's roofline budget, kernel by kernel (computed, not measured).

    python benchmarks/fused_roofline.py            # markdown table for RESULTS.md

For each launch of acf_fast.training.fused_step: the bytes it must move through HBM and
the FLOPs it must do, at the Wikimedia shape (32,958 items, M = 49, F = 2048, D = 128,
every profile full at 9 items, a bf16 feature table, fp32 parameters), and the time
each implies on an H100 SXM / H200: max(bytes / HBM bandwidth, FLOPs / peak of the unit
that does them). The reduction GEMMs run on bf16 tensor cores; the attention's small
[49, 128] x [128, 128] products run in fp32 on CUDA cores ("ieee", torch's default;
TF32 when allowed). Weight reads that hit L2 (W_red, the [D, D] matrices, re-read per
slot) are not HBM bytes. The step does not de-duplicate items: each of the B * 9
slots reduces its own item (a B = 128 batch repeats ~4% of its profile items at this
catalogue size, measured in RESULTS; B = 1024 about a quarter).
"""

from __future__ import annotations

ITEMS, M, F, D, P = 32_958, 49, 2048, 128, 9
TABLE, ACC = 2, 4                        # bf16 table, fp32 everything else
GPUS = {"H100 SXM": (3.35e12, 989e12, 67e12), "H200": (4.8e12, 989e12, 67e12)}  # HBM, bf16 TC, fp32
N_PARAMS = ITEMS * D + 1079 * D + D * F + 5 * D * D + 8 * D   # tied profile embedding
EMB_PARAMS = (ITEMS + 1 + 1079) * D                          # the dense embedding gradient


def entries(B: int) -> int:
    """The embedding lists' (id, row) entries: users 1 + P a user, pos and neg, profiles."""
    return B * (1 + P) + 2 * B + B * P


def kernels(B: int, table: int = TABLE) -> list[tuple[str, float, float, float]]:
    """(launch, HBM bytes, tensor-core FLOPs, CUDA-core FLOPs); `table`: bytes per feature
    (2: bf16, whose reduction GEMMs run on tensor cores; 4: fp32, on CUDA cores unless TF32)."""
    S = B * P                 # profile slots
    R = S * M                 # (slot, component) rows
    rows_f32 = R * D * ACC    # one [R, D] fp32 buffer (r, dr or dxr)
    splits = 16               # dW_red split-K partials (kernels.outer_sum.splits_for, B = 128)
    return [
        ("slot_forward (r, beta, xbar; per slot)", R * F * table + rows_f32 + S * D * ACC,
         2 * R * F * D, 2 * R * D * D),
        ("user_step (item attention, loss, dz; per user)", 4 * S * D * ACC, 0, 3 * 2 * S * D * D),
        ("slot_backward (dxr, dr; per slot)", 3 * rows_f32 + S * D * ACC, 0, 2 * 2 * R * D * D),
        ("outer_sum dW_red = dr^T x", rows_f32 + R * F * table + splits * D * F * ACC,
         2 * R * F * D, 0),
        ("outer_sum dW2x = dxr^T r", 2 * rows_f32, 0, 2 * R * D * D),
        ("outer_sum dW1p, dW1x (2 launches)", 2 * (2 * S * D * ACC), 0, 2 * 2 * S * D * D),
        # dW1u over the B users' rows, dW2u over the B * P slots' (duu is per slot)
        ("outer_sum dW1u, dW2u (2 launches)", 2 * (B + S) * D * ACC, 0, 2 * (B + S) * D * D),
        ("embedding_grad (rows summed per id)", 2 * entries(B) * D * ACC, 0, 0),
        ("adam (all parameters, one launch)",
         6 * N_PARAMS * ACC + splits * D * F * ACC + EMB_PARAMS * ACC, 0, 12 * N_PARAMS),
    ]


def slot_l2_bytes(B: int) -> float:
    """W_red (bf16) and the [D, D] fp32 weights each slot program reads from L2: every
    one of the B * P programs streams the whole W_red, which is the step's largest L2
    traffic (not HBM: the weights stay resident)."""
    return B * P * (D * F * TABLE + 6 * D * D * ACC)   # W2x 3x, W2u 2x, W1x once


def floor_us(B: int, gpu: str, table: int = TABLE) -> float:
    """The step's floor on `gpu` (a GPUS key): the sum over launches of max(bytes /
    bandwidth, FLOPs / peak), an fp32 table's reduction GEMMs at the fp32 rate."""
    bw, tc_peak, fp_peak = GPUS[gpu]
    total = 0.0
    for _, nbytes, tc, fp in kernels(B, table):
        if table == 4:
            tc, fp = 0.0, fp + tc
        total += max(nbytes / bw, tc / tc_peak + fp / fp_peak)
    return total * 1e6


def table(B: int) -> str:
    lines = [f"B = {B} ({B * P} slots, {B * P * M:,} rows)", "",
             "| launch | HBM MB | TC GFLOP | fp32 GFLOP | " +
             " | ".join(f"{g} us" for g in GPUS) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(GPUS)]
    totals = dict.fromkeys(GPUS, 0.0)
    for name, nbytes, tc, fp in kernels(B):
        times = []
        for gpu, (bw, tc_peak, fp_peak) in GPUS.items():
            t = max(nbytes / bw, tc / tc_peak + fp / fp_peak) * 1e6
            totals[gpu] += t
            times.append(f"{t:.0f}")
        lines.append(f"| {name} | {nbytes / 1e6:.0f} | {tc / 1e9:.1f} | {fp / 1e9:.2f} | "
                     + " | ".join(times) + " |")
    lines.append("| **step (11 launches)** | | | | "
                 + " | ".join(f"**{totals[g]:.0f}**" for g in GPUS) + " |")
    lines.append(f"\nplus the slot kernels' L2 reads of the weights: {slot_l2_bytes(B) / 1e6:.0f} MB")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(128))
    print()
    print(table(1024))
