"""Every Triton kernel, in every specialisation the launchers can use, compiles for real GPUs.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))` lowers to PTX and
a cubin with the ptxas shipped in the triton wheel: no GPU needed. This catches what
the interpreter cannot (layouts, block shapes, unsupported dtype combinations on a
given architecture), and we also check each kernel's shared memory against the
architecture's per-block limit. Each kernel's registers and spills (from `ptxas -v`)
are printed (`python tests/backends/test_triton_compile.py 90`); a spill on sm_90 (the
H100/H200 target) or sm_80 (A100) fails the test for the fp32-parameter variants that
training runs (the old spilling weight-gradient tile was the step's slowest kernel),
unless listed in KNOWN_SPILLS; the kernels that read back their own stores keep their
`tl.debug_barrier()`s (BARRIERS). Besides the tutorial's shapes (BASE), VARIANTS covers the integer
specialisations Triton's JIT makes at launch (an argument equal to 1 becomes a
constexpr, a multiple of 16 gets a divisibility hint) and the other tile sizes.

Kernels decorated under TRITON_INTERPRET=1 are interpreter objects, not compilable
JITFunctions, so the compilation runs in fresh subprocesses (one per architecture, in
parallel) with the variable removed: the result is the same with or without the flag. Run this file as a script to compile one target:
    python tests/backends/test_triton_compile.py 80
"""

from __future__ import annotations

import atexit
import itertools
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("triton")

CAPS = (75, 80, 90)
# the fused training step's own kernels (acf_fast.training.fused_step) target sm_80 and
# later (its _outer_sum_kernel is also the autograd backend's dW_red: compiled everywhere)
TRAINING_ONLY = {"_slot_forward_kernel", "_user_step_kernel", "_slot_backward_kernel",
                 "_row_sums_kernel", "_adam_kernel"}
# per-block shared memory limits (bytes) of the architectures, opt-in maximums
SHARED_LIMIT = {75: 65536, 80: 166912, 90: 232448}
D_VALUES = (64, 128, 256)   # model_dim values the checks cover
# The tutorial's shape: M = 49 grid cells, F = 2048 channels, P = 9 profile slots, and the
# U = 462 distinct items of a B = 128 batch (U * M = 22638 rows, not a multiple of 16).
BASE = dict(U=462, M=49, F=2048, P=9)
# the fused training step's shape: B users with P = 9 profile slots each
TRAIN = dict(B=128, M=49, F=2048, P=9)
# (compute dtype, feature-table dtypes launched with it); fp64 models keep 16-bit tables
COMPUTE_TABLE = {"fp32": ("fp32", "fp16", "bf16"), "fp64": ("fp64", "fp16", "bf16")}
# Launchable shapes that the JIT specialises differently from BASE (an integer argument
# equal to 1 becomes the constexpr 1, a multiple of 16 gets a divisibility hint, other
# values get neither) or that change a tile (BLOCK_M, BLOCK_P, BLOCK_D). Each of those
# values reaches every kernel argument it can in at least one entry; the entries combine
# them (rather than one entry per value) to keep the compile time down. Compiled for
# fp32 parameters with an fp32 and a bf16 table (tensor cores on sm_80+).
VARIANTS = {
    # U * M = 1 row, M, P, D, F and both table strides all the constexpr 1
    "all ones": dict(U=1, M=1, P=1, D=1, F=1),
    # U * M, M, P and the item stride M * F multiples of 16 (BLOCK_M 16, BLOCK_P 16);
    # F and D not (BLOCK_D 16)
    "multiples of 16, F=40, D=13": dict(U=3, M=16, P=16, D=13, F=40),
    # nothing aligned: U * M, M, F, M * F and P (BLOCK_P 32) plain
    "unaligned, P=20": dict(U=5, M=49, P=20, D=64, F=40),
    # the tensor-core tile (BLOCK_D 128) on unaligned rows; P a multiple of 16 in BLOCK_P 32
    "F=40, P=32, D=128": dict(U=5, M=49, P=32, D=128, F=40),
}
SPILL_GATED = (80, 90)   # the architectures on which a spill fails the test
# Register spills the gate tolerates, by (kernel, VARIANTS entry) -> the architectures
# where they spill: each one a kernel to fix in kernels/, then to delete here (an entry
# that no longer spills there fails the test).
KNOWN_SPILLS = {
    # the fused step's slot programs at D = 256 ([64, 256] fp32 tiles: r and its hidden
    # layer alone are 128 registers a thread on 8 warps): 24-124 bytes (forward), 108-300
    # (backward) on sm_90; the tutorial's D = 128 and D = 64 do not spill
    ("_slot_forward_kernel", "train step, B=128, D=256"): (80, 90),
    ("_slot_backward_kernel", "train step, B=128, D=256"): (80, 90),
    # the fp32 [64, 64] weight gradient of D = 64 (dW2x, no gather) with 3 stages: 56 bytes
    # on sm_80 (2 stages spill in other shapes instead); none on sm_90
    ("_outer_sum_kernel", "train step, B=128, D=64"): (80,),
    # rows of a feature width that is not a multiple of 16 (F = 40: unaligned): 8 bytes
    # with an fp32 table (BLOCK_D 64, 128 registers), 340 bytes (255 registers) with a
    # 16-bit table on tensor cores (BLOCK_D 128)
    ("_reduce_fwd_kernel", "unaligned, P=20"): (80, 90),
    ("_reduce_fwd_kernel", "F=40, P=32, D=128"): (80, 90),
}


def _ptr(dtype):
    return "*" + dtype


def _int_arg(value: int):
    """How Triton's JIT specialises an integer argument: 1 -> the constexpr 1; a multiple
    of 16 (0 too) -> the type with a divisibility-16 hint; i64 from 2**31 on."""
    if value == 1:
        return 1
    kind = "i32" if -2**31 <= value < 2**31 else "i64"
    return kind + "/16" if value % 16 == 0 else kind


def cases(cap: int = 90):
    """(kernel, signature, constexprs, attrs, options, shape) for every launch the wrappers
    can make on sm_<cap> (the reduction's tiles and tensor-core use depend on it); shape
    names the BASE model_dim or the VARIANTS entry that first needs the kernel."""
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    import triton
    from acf_fast.backends import triton as _backend  # noqa: F401  (resolves acf_fast.kernels)
    from acf_fast.kernels import component_attention as ca
    from acf_fast.kernels import item_attention as ia
    from acf_fast.kernels import outer_sum as osum
    from acf_fast.kernels import reduce as rd

    out = []
    shape_name = None

    def add(kernel, args: dict, constexprs: dict):
        """args: name -> type string, or the integer value the launcher passes (see
        _int_arg); a trailing '/16' marks a value divisible by 16 (as the JIT specialises
        it). Pointers from torch allocations are 16-byte aligned."""
        constexprs = dict(constexprs)
        options = {k: constexprs.pop(k) for k in ("num_warps", "num_stages") if k in constexprs}
        signature, attrs = {}, {}
        names = kernel.arg_names
        for name in names:
            kind = args.get(name)
            if isinstance(kind, int):
                kind = _int_arg(kind)
                if kind == 1:
                    constexprs[name] = 1
            if name in constexprs:
                signature[name] = "constexpr"
                continue
            div16 = kind.startswith("*") or kind.endswith("/16")
            signature[name] = kind.removesuffix("/16")
            if div16:
                attrs[(names.index(name),)] = [["tt.divisibility", 16]]
        out.append((kernel, signature, constexprs, attrs, options, shape_name))

    torch_dtype = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16,
                   "bf16": torch.bfloat16}

    def add_all(shape, compute, tables, precisions, flags=(False, True)):
        """Every kernel as its launcher calls it for `shape` (U, M, F, P, D)."""
        U, M, F, P, D = (shape[k] for k in ("U", "M", "F", "P", "D"))
        n_rows = U * M  # a contiguous table: strides M * F and F
        for table in tables:
            # what the launchers pick on this architecture (tensor cores or not)
            low = rd.use_tensor_cores(torch_dtype[table], torch_dtype[compute],
                                      torch.device("cuda"), cap)
            # count: None for exact batches (a constexpr: the live-count code is not
            # compiled in), an int32 pointer for static-shape (CUDA-graph) batches
            for precision, count in itertools.product(("ieee",) if low else precisions,
                                                      (None, "*i32")):
                counted = {} if count is None else dict(count_ptr=count)
                uncounted = dict(count_ptr=None) if count is None else {}
                add(rd._reduce_fwd_kernel,  # tensor cores: W_red in the table's dtype
                    dict(table_ptr=_ptr(table), ids_ptr="*i64",
                         w_ptr=_ptr(table if low else compute),
                         b_ptr=_ptr(compute), out_ptr=_ptr(compute), n_rows=n_rows, M=M,
                         F=F, D=D, stride_item=M * F, stride_comp=F, **counted),
                    dict(PRECISION=precision, LOW=low, **uncounted, **rd.fwd_blocks(D, low, cap)))
                # dW_red: kernels.outer_sum over the table's rows (reduce_weight_grad)
                wb = osum.blocks(D, F, low, cap)
                splits = osum.splits_for(n_rows, D, F, wb, 132)  # an H100's SMs
                block_r = wb["BLOCK_R"]
                rows_per_split = triton.cdiv(triton.cdiv(n_rows, splits), block_r) * block_r
                add(osum._outer_sum_kernel,
                    dict(a_ptr=_ptr(compute), x_ptr=_ptr(table), ids_ptr="*i64",
                         out_ptr=_ptr(compute), n_rows=n_rows, rows_per_split=rows_per_split,
                         NA=D, NB=F, GROUP=M, stride_id=M * F, stride_sub=F, **counted),
                    dict(PRECISION=precision, LOW=low, **uncounted, **wb))
        c = _ptr(compute)
        bl = ca.blocks(M, D)
        for store_beta in flags:
            add(ca._component_fwd_kernel,
                dict(r_ptr=c, xr_ptr=c, uu_ptr=c, w2_ptr=c, c2_ptr=c, slot_item_ptr="*i32",
                     xbar_ptr=c, beta_ptr=c, P=P, M=M, D=D),
                dict(STORE_BETA=store_beta, **bl))
        add(ca._component_bwd_slot_kernel,
            dict(r_ptr=c, xr_ptr=c, uu_ptr=c, w2_ptr=c, c2_ptr=c, slot_item_ptr="*i32",
                 dxbar_ptr=c, beta_ptr=c, de_ptr=c, duu_ptr=c, dw2_ptr=c,
                 P=P, M=M, D=D), bl)
        add(ca._component_bwd_item_kernel,
            dict(xr_ptr=c, uu_ptr=c, w2_ptr=c, beta_ptr=c, de_ptr=c, dxbar_ptr=c,
                 item_start_ptr="*i32", slot_order_ptr="*i32", dr_ptr=c, dxr_ptr=c,
                 P=P, M=M, D=D), bl)
        bl = ia.blocks(P, D)
        for with_scores in flags:
            add(ia._item_fwd_kernel,
                dict(pre_ptr=c, ut_ptr=c, w1_ptr=c, c1_ptr=c, slot_item_ptr="*i32",
                     profile_ids_ptr="*i64", pemb_ptr=c, iemb_ptr=c, pos_ptr="*i64",
                     neg_ptr="*i64", alpha_ptr=c, user_ptr=c, spos_ptr=c, sneg_ptr=c,
                     P=P, D=D),
                dict(WITH_SCORES=with_scores, **bl))
            add(ia._item_bwd_kernel,
                dict(guser_ptr=c, gpos_ptr=c, gneg_ptr=c, pre_ptr=c, ut_ptr=c, w1_ptr=c,
                     c1_ptr=c, alpha_ptr=c, user_ptr=c, slot_item_ptr="*i32",
                     profile_ids_ptr="*i64", pemb_ptr=c, iemb_ptr=c, pos_ptr="*i64",
                     neg_ptr="*i64", dut_ptr=c, dp_ptr=c, dz_ptr=c, dw1_ptr=c, dc1_ptr=c,
                     dvpos_ptr=c, dvneg_ptr=c, P=P, D=D),
                dict(WITH_SCORES=with_scores, **bl))

    def add_train_step(shape, compute, tables, precisions, losses=(0,)):
        """The fused training step's kernels (acf_fast.training.fused_step) for B users."""
        from acf_fast.kernels import adam, embedding_grad, outer_sum, train_step

        B, M, F, P, D = (shape[k] for k in ("B", "M", "F", "P", "D"))
        c = _ptr(compute)
        i64 = "*i64"
        names = ("item_emb", "prof_emb", "user_emb", "redw", "redb", "cwx", "cbx", "cwu",
                 "cbu", "cw", "cb", "iwu", "ibu", "iwp", "ibp", "iwx", "ibx", "iw", "ib")
        if cap < 80:   # training targets Ampere and later (bf16 tensor cores)
            return
        for table in tables:
            low = rd.use_tensor_cores(torch_dtype[table], torch_dtype[compute],
                                      torch.device("cuda"), cap)
            # the loss only changes a few scalar lines: every loss once, on an fp32 table
            variants = [(p, 0) for p in (("ieee",) if low else precisions)]
            if table == compute == "fp32":
                variants += [("ieee", loss) for loss in losses if loss]
            tb = train_step.blocks(P, M, D, low, cap)
            batch = dict(order_ptr=i64, cursor_ptr=i64, order_stride=B, users_ptr=i64,
                         profiles_ptr=i64, profile_stride=P)
            for precision, loss in variants:
                if loss == 0:   # the slot kernels have no loss code
                    add(train_step._slot_forward_kernel,
                        dict(batch, table_ptr=_ptr(table), stride_item=M * F, stride_comp=F,
                             **{f"{n}_ptr": c for n in ("user_emb", "redw", "redb", "cwx", "cbx",
                                                        "cwu", "cbu", "cw", "cb", "r", "xbar")},
                             P=P, M=M, F=F, D=D),
                        dict(PRECISION=precision, LOW=low, **tb["slot_forward"]))
                    add(train_step._slot_backward_kernel,
                        dict(batch, **{f"{n}_ptr": c for n in ("user_emb", "cwx", "cbx", "cwu",
                                                               "cbu", "cw", "cb", "iwx", "r", "dz",
                                                               "dr", "dxr", "duu", "svec",
                                                               "duser")},
                             user_ids_ptr=i64, B=B, P=P, M=M, D=D, VEC=2 * D + 1),
                        dict(PRECISION=precision, **tb["slot_backward"]))
                args = dict(batch, pos_ptr=i64, neg_ptr=i64,
                            **{f"{n}_ptr": c for n in ("item_emb", "prof_emb", "user_emb", "iwu",
                                                       "ibu", "iwp", "ibp", "iwx", "ibx", "iw",
                                                       "ib", "xbar")},
                            user_ids_ptr=i64, item_ids_ptr=i64, prof_ids_ptr=i64,
                            **{f"{n}_ptr": c for n in ("duser", "ditem", "dprof", "dz", "dut",
                                                       "vec", "terms", "flags", "scores")},
                            step_ptr="*fp32", B=B, P=P, D=D, VEC=2 * D + 1)
                add(train_step._user_step_kernel, args,
                    dict(LOSS=loss, PRECISION=precision, **tb["user"]))
                rows = B * P * M
                for NB, x, ids in ((F, table, i64), (D, compute, None), (D, compute, i64)):
                    xlow = low and x == table
                    bl = outer_sum.blocks(D, NB, xlow, cap)
                    splits = outer_sum.splits_for(rows, D, NB, bl, 132)
                    per = triton.cdiv(triton.cdiv(rows, splits), bl["BLOCK_R"]) * bl["BLOCK_R"]
                    extra = dict(count_ptr=None, **({} if ids else dict(ids_ptr=None)))
                    add(outer_sum._outer_sum_kernel,
                        dict(a_ptr=c, x_ptr=_ptr(x), out_ptr=c, n_rows=rows, rows_per_split=per,
                             NA=D, NB=NB, GROUP=M if NB == F else 1, stride_id=M * F if NB == F else D,
                             stride_sub=F if NB == F else 0, **({"ids_ptr": ids} if ids else {})),
                        dict(PRECISION="ieee" if xlow else precision, LOW=xlow, **extra, **bl))
        for warp, cursor in itertools.product((True, False), (i64, None)):
            add(adam._adam_kernel,
                dict(p_ptr=c, m_ptr=c, v_ptr=c, part_ptr=c, seg_ptr=i64, n_seg=19, emb_ptr=c,
                     terms_ptr=c, flags_ptr=c, B=B, loss_ptr=c, step_ptr="*fp32", hyper_ptr=c,
                     **({"cursor_ptr": cursor} if cursor else {})),
                dict(WARP=warp, N_FIELDS=len(adam.SEG_FIELDS),
                     **({} if cursor else dict(cursor_ptr=None)), **adam.blocks(cap)))
        for n_tables in (2, 3):   # tied / untied profile embedding
            add(embedding_grad._row_sums_kernel,
                dict(ids_ptr=i64, rows_ptr=c, spec_ptr=i64, n_tables=n_tables, out_ptr=c, D=D),
                dict(N_FIELDS=len(embedding_grad.TABLE_FIELDS), **embedding_grad.blocks(D, cap)))

    for compute, tables in COMPUTE_TABLE.items():
        precisions = ("ieee", "tf32") if compute == "fp32" else ("ieee",)
        for D in D_VALUES:
            shape_name = f"D={D}"
            add_all(dict(BASE, D=D), compute, tables, precisions)
        for D in D_VALUES:   # every loss at the tutorial's D; the others with WARP
            shape_name = f"train step, B=128, D={D}"
            add_train_step(dict(TRAIN, D=D), compute, tables[:1] if compute == "fp64" else tables,
                           precisions, losses=(0, 1, 2) if D == 128 else (0,))
    for shape_name, variant in VARIANTS.items():
        # the flags only add code (beta store, scores): the variants compile them on
        add_all(variant, "fp32", ("fp32", "bf16"), ("ieee",), flags=(True,))
    # the same constexprs for several shapes compile to the same kernel: keep one
    unique, seen = [], set()
    for case in out:
        kernel, sig, const, attrs, options, _ = case
        key = (kernel.__name__, tuple(sig.items()), tuple(sorted(const.items())),
               tuple(sorted((k, str(v)) for k, v in attrs.items())),
               tuple(sorted(options.items())))
        if key not in seen:
            seen.add(key)
            unique.append(case)
    return unique


def uncovered(todo) -> list[str]:
    """Kernels defined in acf_fast.kernels that no case compiles (a new kernel fails here)."""
    import importlib
    import pkgutil

    import acf_fast.kernels as pkg

    covered = {kernel.__name__ for kernel, *_ in todo}
    defined = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"acf_fast.kernels.{info.name}")
        defined |= {name for name, obj in vars(module).items()
                    if name.endswith("_kernel") and hasattr(obj, "arg_names")}
    return sorted(defined - covered)


def resources(compiled, cap: int):
    """(registers, spill-store bytes) of a compiled kernel, from `ptxas -v` on its PTX
    (the ptxas shipped with triton; `n_regs`/`n_spills` need a GPU driver to load it)."""
    import re
    import tempfile

    from triton.backends.nvidia import compiler as nv

    try:
        ptxas = nv.get_ptxas(cap).path      # triton >= 3.7
    except TypeError:
        ptxas = nv.get_ptxas().path         # triton 3.6
    # no fallback to "unknown": without these numbers the sm_90 spill gate would pass silently
    arch = f"sm_{cap}a" if cap == 90 else f"sm_{cap}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as fh:
        fh.write(compiled.asm["ptx"])
        fh.flush()
        res = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", fh.name, "-o", os.devnull],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    if res.returncode != 0 or not regs or not spills:
        raise RuntimeError(f"`{ptxas} -v` gave no register/spill counts (exit {res.returncode}): "
                           + " | ".join(text.strip().splitlines())[-500:])
    return int(regs.group(1)), int(spills.group(1))


# The kernels that store a tile and read it back in other threads' order (kernels.
# train_step: r, dz, dxr), and how many `tl.debug_barrier()`s order those accesses. The
# interpreter runs a program's threads as one, so a missing barrier shows only here.
BARRIERS = {"_slot_forward_kernel": 1, "_user_step_kernel": 1, "_slot_backward_kernel": 1}


def barrier_errors(kernel, compiled, label: str) -> list[str]:
    """The kernel's barriers reach the IR, as many as BARRIERS says (none elsewhere), and
    no load of a kernel with one takes the non-coherent path (ld.global.nc)."""
    wanted = BARRIERS.get(kernel.__name__, 0)
    found = sum("barrier" in line for line in compiled.asm["ttir"].splitlines())
    errors = []
    if found != wanted:
        errors.append(f"{label}: {found} barriers in the IR, expected {wanted} (BARRIERS)")
    if wanted and "ld.global.nc" in compiled.asm["ptx"]:
        errors.append(f"{label}: a non-coherent load (ld.global.nc) in a kernel that reads "
                      "back its own stores")
    return errors


def compile_all(cap: int) -> list[str]:
    """Compile every case for sm_<cap>; returns one error line per failure."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", cap, 32)
    todo = cases(cap)
    errors = [f"{name}: no compile case (add one to cases())" for name in uncovered(todo)
              if cap >= 80 or name not in TRAINING_ONLY]
    spilled_known = set()
    for kernel, sig, const, attrs, options, shape in todo:
        hinted = {kernel.arg_names[i] for (i,) in attrs}
        types = [v + ("/16" if n in hinted and not v.startswith("*") else "")
                 for n, v in sig.items() if v != "constexpr"]
        label = f"sm_{cap} {kernel.__name__} [{shape}] {const} {options} {types}"
        known = cap in KNOWN_SPILLS.get((kernel.__name__, shape), ())
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const,
                                                attrs=attrs), target=target, options=options)
            regs, spills = resources(compiled, cap)
            errors += barrier_errors(kernel, compiled, label)
            print(f"{label}: regs={regs} spills={spills} shared={compiled.metadata.shared}"
                  + (" (in KNOWN_SPILLS)" if known and spills else ""), file=sys.stderr)
            if not compiled.asm.get("cubin"):
                errors.append(f"{label}: no cubin")
            elif cap in SPILL_GATED and spills and "*fp64" not in sig.values() and not known:
                # the training targets, fp32 parameters: a spilling tile is a regression;
                # fp64 variants (gradcheck only) may spill a few bytes
                errors.append(f"{label}: {spills} bytes of register spills ({regs} registers)")
            elif compiled.metadata.shared > SHARED_LIMIT[cap]:
                errors.append(f"{label}: {compiled.metadata.shared} bytes of shared memory, "
                              f"limit {SHARED_LIMIT[cap]}")
            if cap in SPILL_GATED and spills and known:
                spilled_known.add((kernel.__name__, shape))
        except Exception as exc:  # report every failure, not just the first
            errors.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    if cap in SPILL_GATED:
        errors += [f"sm_{cap} {name} [{shape}]: no longer spills; remove it from KNOWN_SPILLS"
                   for name, shape in sorted(k for k, caps in KNOWN_SPILLS.items()
                                             if cap in caps and k not in spilled_known)]
    print(f"sm_{cap}: {len(todo)} kernels compiled, {len(errors)} failed", file=sys.stderr)
    return errors


def _start_compiles() -> dict:
    """One compiling subprocess per architecture, without the interpreter flag."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    procs = {cap: subprocess.Popen([sys.executable, os.path.abspath(__file__), str(cap)],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
             for cap in CAPS}

    def stop_leftovers():
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()

    atexit.register(stop_leftovers)
    return procs


# Started when pytest imports this module (collection), so the cold compilation (about
# a minute of CPU per architecture) overlaps the interpreter tests, which use one core.
_COMPILES = _start_compiles() if __name__ != "__main__" else None
_STARTED = time.time()


def test_every_kernel_compiles_for_sm75_sm80_sm90():
    failures = []
    for cap, proc in _COMPILES.items():
        out, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            failures.append(f"sm_{cap} (exit {proc.returncode}):\n{out}\n{err[-3000:]}")
    assert not failures, "\n".join(failures)
    print(f"compiled for {CAPS}; {time.time() - _STARTED:.0f} s since collection")


def test_integer_specialisation_rule_is_tritons():
    """_int_arg (which the compile cases use) agrees with the installed Triton's own rule."""
    try:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl
    except ImportError as exc:  # an internal API; the rule itself is what matters
        pytest.skip(f"this Triton has no native_specialize_impl ({exc})")
    for value in (1, 0, 2, 7, 16, 48, 1960, 100352, 2**31 - 16, 2**31, 2**31 + 3):
        kind, hint = native_specialize_impl(BaseBackend, value, False, True, True)[:2]
        ours = _int_arg(value)
        theirs = 1 if kind == "constexpr" else kind + ("/16" if hint == "D" else "")
        assert ours == theirs, (value, ours, (kind, hint))


if __name__ == "__main__":
    problems = compile_all(int(sys.argv[1]))
    for line in problems:
        print(line)
    sys.exit(1 if problems else 0)
