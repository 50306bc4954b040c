"""Each embedding table's gradient rows summed per id, deterministically, into a dense
buffer for the optimizer (acf_fast.training.fused_step, then kernels.adam).

The step's kernels write an embedding table's gradient as a list of (id, row) pairs: a
user's row from the user step and one from each of its profile slots (through the
component attention's uu); the positive, negative and profile items. Adam wants one
gradient per table row. Letting every optimizer program scan the whole list for its
rows costs (table elements x list length) compares, about 6e9 at B = 128 on the
33k-item catalogue, in a loop whose every step waits on a load and a block reduction.

Here each list entry looks through its table's list once: the first entry of an id
(its owner) adds the rows of the later entries with that id, in list order, to its
own, and writes the sum to the id's row of a dense buffer. The buffer is zero before
the step and kernels.adam clears what it reads, so it is zero again for the next. One
writer per row and a fixed order of the sums: no atomics, bit-identical reruns. The
cost is (list length)^2 / BLOCK_E id compares (2.6e5 at B = 128, 8e6 at B = 1024) and
a read of each row; a batch repeats few ids (RESULTS: 4% of the profile items at
B = 128, a quarter at B = 1024), so the rows of later duplicates are rarely loaded.

Table spec, one int64 row per embedding table (`TABLE_FIELDS`): its first program, where
its entries start in the id / row lists and how many there are, its offset in the
dense buffer, and whether id 0 is the padding row (nn.Embedding(padding_idx=0): never
trained, so its sum is not written).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import segment_row

TABLE_FIELDS = ("first_block", "start", "count", "out_offset", "skip_zero")


@triton.jit
def _row_sums_kernel(ids_ptr, rows_ptr, spec_ptr, n_tables, out_ptr, D,
                     N_FIELDS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    spec = segment_row(pid, spec_ptr, n_tables, N_FIELDS)   # the table it sums
    first = tl.load(spec)
    start = tl.load(spec + 1)
    count = tl.load(spec + 2)
    out_offset = tl.load(spec + 3)
    skip_zero = tl.load(spec + 4)

    offs_e = (pid - first) * BLOCK_E + tl.arange(0, BLOCK_E)   # this program's entries
    e_ok = offs_e < count
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    ids = tl.load(ids_ptr + start + offs_e, mask=e_ok, other=-1)
    acc = tl.load(rows_ptr + (start + offs_e)[:, None] * D + offs_d[None, :],
                  mask=e_ok[:, None] & d_ok[None, :], other=0.0)
    owner = e_ok
    offs_c = tl.arange(0, BLOCK_C)
    for c0 in range(0, count, BLOCK_C):
        c = c0 + offs_c
        c_ok = c < count
        other = tl.load(ids_ptr + start + c, mask=c_ok, other=-2)
        same = (ids[:, None] == other[None, :]) & c_ok[None, :]
        before = same & (c[None, :] < offs_e[:, None])
        owner = owner & (tl.sum(before.to(tl.int32), axis=1) == 0)
        later = same & (c[None, :] > offs_e[:, None])
        if tl.max(tl.max(later.to(tl.int32), axis=1), axis=0) > 0:
            # a later duplicate (rare): the chunk again in pieces of BLOCK_S entries, each
            # piece's duplicate rows (masked lanes read nothing) selected per entry and
            # added in a fixed order. Selected, not multiplied by a 0/1 matrix: 0 * inf is
            # NaN, and one non-finite row would spoil every sum of the program
            for s0 in range(c0, c0 + BLOCK_C, BLOCK_S):
                cs = s0 + tl.arange(0, BLOCK_S)
                cs_ok = cs < count
                piece = tl.load(ids_ptr + start + cs, mask=cs_ok, other=-2)
                dup = ((ids[:, None] == piece[None, :]) & cs_ok[None, :]
                       & (cs[None, :] > offs_e[:, None]))
                used = tl.max(dup.to(tl.int32), axis=0) > 0
                rows = tl.load(rows_ptr + (start + cs)[:, None] * D + offs_d[None, :],
                               mask=used[:, None] & d_ok[None, :], other=0.0)
                acc += tl.sum(tl.where(dup[:, :, None], rows[None, :, :], 0.0), axis=1)
    # the scalar flag as a vector (the interpreter mishandles scalar & vector masks)
    keep = owner & ((ids != 0) | ((ids * 0 + skip_zero) == 0))
    tl.store(out_ptr + out_offset + ids[:, None] * D + offs_d[None, :], acc,
             mask=keep[:, None] & d_ok[None, :])


def blocks(D: int, cap: int = 90) -> dict:
    """Constexprs and launch options of `_row_sums_kernel` (shared with the compile test):
    16 entries a program, the list compared 64 ids at a time (32 under the interpreter,
    so that its tests cross a chunk), duplicates added 4 rows at a time (a [16, 4, D]
    selection); one stage: the loop's loads are few and pipelining them cost registers."""
    from ._common import interpreting, next_pow2

    block_d = max(16, next_pow2(D))
    out = dict(BLOCK_E=16, BLOCK_C=32 if interpreting() else 64, BLOCK_S=4, BLOCK_D=block_d)
    if interpreting():
        return out
    return dict(out, num_warps=8 if block_d > 128 else 4, num_stages=1)
