"""Every Triton kernel, in every specialisation the launchers can use, compiles for real GPUs.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))` lowers to PTX and
a cubin with the ptxas shipped in the triton wheel: no GPU needed. This catches what
the interpreter cannot (layouts, block shapes, unsupported dtype combinations on a
given architecture), and we also check each kernel's shared memory against the
architecture's per-block limit. Each kernel's registers and spills (from `ptxas -v`)
are printed (`python tests/test_triton_compile.py 90`); a spill on sm_90, the
H100/H200 target, fails the test for the fp32-parameter variants that training runs
(the old spilling weight-gradient tile was the step's slowest kernel).

Kernels decorated under TRITON_INTERPRET=1 are interpreter objects, not compilable
JITFunctions, so the compilation runs in fresh subprocesses (one per architecture, in
parallel) with the variable removed: the result is the same with or without the flag. Run this file as a script to compile one target:
    python tests/test_triton_compile.py 80
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("triton")

CAPS = (75, 80, 90)
# per-block shared memory limits (bytes) of the architectures, opt-in maximums
SHARED_LIMIT = {75: 65536, 80: 166912, 90: 232448}
D_VALUES = (64, 128, 256)   # model_dim values the checks cover
M, F, P = 49, 2048, 9       # grid cells, channels, profile slots (as in the tutorial)
# (compute dtype, feature-table dtypes launched with it); fp64 models keep 16-bit tables
COMPUTE_TABLE = {"fp32": ("fp32", "fp16", "bf16"), "fp64": ("fp64", "fp16", "bf16")}


def _ptr(dtype):
    return "*" + dtype


def cases(cap: int = 90):
    """(kernel, signature, constexprs, attrs, options) for every launch the wrappers can
    make on sm_<cap> (the reduction's tiles and tensor-core use depend on it)."""
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    from acf_fast.backends import triton as _backend  # noqa: F401  (resolves acf_fast.kernels)
    from acf_fast.kernels import component_attention as ca
    from acf_fast.kernels import item_attention as ia
    from acf_fast.kernels import reduce as rd

    out = []

    def add(kernel, args: dict, constexprs: dict):
        constexprs = dict(constexprs)
        options = {k: constexprs.pop(k) for k in ("num_warps", "num_stages") if k in constexprs}
        """args: name -> type string; a trailing '/16' marks a value divisible by 16 (as the
        JIT specialises it). Pointers from torch allocations are 16-byte aligned."""
        signature, attrs = {}, {}
        names = kernel.arg_names
        for name in names:
            if name in constexprs:
                signature[name] = "constexpr"
                continue
            kind = args[name]
            div16 = kind.startswith("*") or kind.endswith("/16")
            signature[name] = kind.removesuffix("/16")
            if div16:
                attrs[(names.index(name),)] = [["tt.divisibility", 16]]
        out.append((kernel, signature, constexprs, attrs, options))

    torch_dtype = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16,
                   "bf16": torch.bfloat16}
    for compute, tables in COMPUTE_TABLE.items():
        precisions = ("ieee", "tf32") if compute == "fp32" else ("ieee",)
        for D in D_VALUES:
            for table in tables:
                # what the launchers pick on this architecture (tensor cores or not)
                low = rd.use_tensor_cores(torch_dtype[table], torch_dtype[compute],
                                          torch.device("cuda"), cap)
                for precision in (("ieee",) if low else precisions):
                    add(rd._reduce_fwd_kernel,  # tensor cores: W_red in the table's dtype
                        dict(table_ptr=_ptr(table), ids_ptr="*i64",
                             w_ptr=_ptr(table if low else compute),
                             b_ptr=_ptr(compute), out_ptr=_ptr(compute), n_rows="i32", M="i32",
                             F="i32/16", D="i32/16", stride_item="i32/16", stride_comp="i32/16"),
                        dict(PRECISION=precision, LOW=low, **rd.fwd_blocks(D, low, cap)))
                    add(rd._reduce_wgrad_kernel,
                        dict(table_ptr=_ptr(table), ids_ptr="*i64", dr_ptr=_ptr(compute),
                             out_ptr=_ptr(compute), n_rows="i32", rows_per_split="i32/16",
                             M="i32", F="i32/16", D="i32/16", stride_item="i32/16",
                             stride_comp="i32/16"),
                        dict(PRECISION=precision, LOW=low, **rd.wgrad_blocks(D, low, cap)))
        c = _ptr(compute)
        for D in D_VALUES:
            bl = ca.blocks(M, D)
            for store_beta in (False, True):
                add(ca._component_fwd_kernel,
                    dict(r_ptr=c, xr_ptr=c, uu_ptr=c, w2_ptr=c, c2_ptr=c, slot_item_ptr="*i32",
                         xbar_ptr=c, lse_ptr=c, beta_ptr=c, P="i32", M="i32", D="i32/16"),
                    dict(STORE_BETA=store_beta, **bl))
            add(ca._component_bwd_slot_kernel,
                dict(r_ptr=c, xr_ptr=c, uu_ptr=c, w2_ptr=c, c2_ptr=c, slot_item_ptr="*i32",
                     lse_ptr=c, dxbar_ptr=c, beta_ptr=c, de_ptr=c, duu_ptr=c, dw2_ptr=c,
                     P="i32", M="i32", D="i32/16"), bl)
            add(ca._component_bwd_item_kernel,
                dict(xr_ptr=c, uu_ptr=c, w2_ptr=c, beta_ptr=c, de_ptr=c, dxbar_ptr=c,
                     item_start_ptr="*i32", slot_order_ptr="*i32", dr_ptr=c, dxr_ptr=c,
                     P="i32", M="i32", D="i32/16"), bl)
            bl = ia.blocks(P, D)
            for with_scores in (False, True):
                add(ia._item_fwd_kernel,
                    dict(pre_ptr=c, ut_ptr=c, w1_ptr=c, c1_ptr=c, slot_item_ptr="*i32",
                         profile_ids_ptr="*i64", pemb_ptr=c, iemb_ptr=c, pos_ptr="*i64",
                         neg_ptr="*i64", alpha_ptr=c, user_ptr=c, spos_ptr=c, sneg_ptr=c,
                         P="i32", D="i32/16"),
                    dict(WITH_SCORES=with_scores, **bl))
                add(ia._item_bwd_kernel,
                    dict(guser_ptr=c, gpos_ptr=c, gneg_ptr=c, pre_ptr=c, ut_ptr=c, w1_ptr=c,
                         c1_ptr=c, alpha_ptr=c, user_ptr=c, slot_item_ptr="*i32",
                         profile_ids_ptr="*i64", pemb_ptr=c, iemb_ptr=c, pos_ptr="*i64",
                         neg_ptr="*i64", dut_ptr=c, dp_ptr=c, dz_ptr=c, dw1_ptr=c, dc1_ptr=c,
                         dvpos_ptr=c, dvneg_ptr=c, P="i32", D="i32/16"),
                    dict(WITH_SCORES=with_scores, **bl))
    # the same constexprs for several D values compile to the same kernel: keep one
    unique, seen = [], set()
    for kernel, sig, const, attrs, options in out:
        key = (kernel.__name__, tuple(sig.items()), tuple(sorted(const.items())),
               tuple(sorted(options.items())))
        if key not in seen:
            seen.add(key)
            unique.append((kernel, sig, const, attrs, options))
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
    except Exception:
        return None, None
    arch = f"sm_{cap}a" if cap == 90 else f"sm_{cap}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as fh:
        fh.write(compiled.asm["ptx"])
        fh.flush()
        res = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", fh.name, "-o", os.devnull],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    return (int(regs.group(1)) if regs else None), (int(spills.group(1)) if spills else None)


def compile_all(cap: int) -> list[str]:
    """Compile every case for sm_<cap>; returns one error line per failure."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", cap, 32)
    todo = cases(cap)
    errors = [f"{name}: no compile case (add one to cases())" for name in uncovered(todo)]
    for kernel, sig, const, attrs, options in todo:
        label = (f"sm_{cap} {kernel.__name__} {const} {options} "
                 f"{[v for v in sig.values() if v != 'constexpr']}")
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const,
                                                attrs=attrs), target=target, options=options)
            regs, spills = resources(compiled, cap)
            print(f"{label}: regs={regs} spills={spills} shared={compiled.metadata.shared}",
                  file=sys.stderr)
            if not compiled.asm.get("cubin"):
                errors.append(f"{label}: no cubin")
            elif cap == 90 and spills and "*fp64" not in sig.values():
                # the H100/H200 target, fp32 parameters (training): a spilling tile is a
                # regression; fp64 variants (gradcheck only) may spill a few bytes
                errors.append(f"{label}: {spills} bytes of register spills ({regs} registers)")
            elif compiled.metadata.shared > SHARED_LIMIT[cap]:
                errors.append(f"{label}: {compiled.metadata.shared} bytes of shared memory, "
                              f"limit {SHARED_LIMIT[cap]}")
        except Exception as exc:  # report every failure, not just the first
            errors.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
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


if __name__ == "__main__":
    problems = compile_all(int(sys.argv[1]))
    for line in problems:
        print(line)
    sys.exit(1 if problems else 0)
