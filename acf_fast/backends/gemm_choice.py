"""Which unit runs the cpu backend's W_red GEMMs, chosen by measuring, once per machine.

The fastest way to multiply the feature grids by W_red is a property of the CPU, not of
the code: on an AVX512-BF16 Xeon without AMX, MKL's bf16 GEMM is slower than its fp32
one; on an AMD Zen 5, oneDNN's bf16 GEMM (torch's bf16 matmul) is 4-5x faster; Intel AMX
and ARM BF16/SME units differ again. So for each shape class (the forward GEMM and W_red's
weight-gradient GEMM) the candidates of acf_fast::reduce_items (csrc/acf_cpu_reduce.cpp)
are timed on a 32-item problem on first use and the fastest is kept:

    fp32      widen to fp32, MKL sgemm (exact; today's path)
    bf16      rows, W_red and dL/dR rounded to bf16, oneDNN bf16 GEMM, fp32 accumulation
    mkl-bf16  MKL's cblas_gemm_bf16bf16f32 (bf16 table only, where torch links MKL)

Precision decides which candidates may run at all (`precision_class`): a bf16 table is
already 16-bit, so its GEMMs may be too (within the 16-bit bound the tests hold it to);
an fp32 table is exact unless the user set torch.set_float32_matmul_precision("medium"),
as torch's own CPU matmul then uses bf16 (docs/performance.md#gemm-choice has the bound).

The choice is kept per process and in $XDG_CACHE_HOME/acf_fast/gemm_choice.json (else
~/.cache/...), keyed by CPU model, torch version, precision class and (M, F, D). The file
is JSON, read defensively: a corrupt or foreign file is ignored, an unwritable folder only
means measuring once per process. ACF_FAST_GEMM=fp32|bf16|mkl-bf16 forces a kind wherever
16-bit GEMMs are allowed (never for an exact fp32 table); `auto` (default) measures.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from ..utils import env

KINDS = ("fp32", "bf16", "mkl-bf16")          # index = the ops' `gemm` code
DIRECTIONS = ("forward", "weight-grad")
# A 16-bit kind must beat fp32 by this factor: near a tie, exactness wins.
MARGIN = 1.10
CACHE_VERSION = 1
PROBE_ITEMS = 32                                # one forward chunk (csrc: chunk_items)


@dataclass(frozen=True)
class Choice:
    forward: str
    weight_grad: str
    source: str                                 # measured | cache | forced | exact
    gflops: dict = field(default_factory=dict)  # {direction: {kind: GFLOP/s}}

    def codes(self) -> tuple[int, int]:
        return KINDS.index(self.forward), KINDS.index(self.weight_grad)


EXACT = Choice("fp32", "fp32", "exact")


def precision_class(table_dtype: torch.dtype, weight_dtype: torch.dtype) -> str | None:
    """The class whose choice applies, or None where only the exact fp32 GEMM may run."""
    if weight_dtype != torch.float32:
        return None
    if table_dtype == torch.bfloat16:
        return "bf16-table"
    if table_dtype == torch.float32 and torch.get_float32_matmul_precision() == "medium":
        return "fp32-table"
    return None


def candidates(cls: str) -> tuple[str, ...]:
    """The kinds this build can run for cls (the extension must be loaded: backends.cpu)."""
    ops = torch.ops.acf_fast
    kinds = ("fp32", "bf16", "mkl-bf16") if cls == "bf16-table" else ("fp32", "bf16")
    return tuple(k for k in kinds if ops.reduce_gemm_available(KINDS.index(k)))


def select(seconds: dict[str, float]) -> str:
    """The fastest kind of {kind: seconds}; fp32 unless another beats it by MARGIN."""
    best = min(seconds, key=seconds.get)
    if "fp32" in seconds and best != "fp32" and seconds[best] * MARGIN > seconds["fp32"]:
        return "fp32"
    return best


def forced_kind() -> str | None:
    value = (env.gemm_kind() or "auto").strip().lower()
    if value == "auto":
        return None
    if value not in KINDS:
        raise ValueError(f"environment variable {env.GEMM}={value!r} is not one of auto, "
                         f"{', '.join(KINDS)}")
    return value


# ------------------------------------------------------------------ measuring
def _time(fn, rounds: int) -> float:
    """Min over rounds of this thread's CPU time: other processes' load does not count."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return max(best, 1e-9)


def measure(cls: str, m: int, f: int, d: int, kinds, rounds: int = 3) -> dict:
    """{direction: {kind: seconds}} for a PROBE_ITEMS-item problem, on one thread (the ops
    run one single-threaded GEMM per thread, so that is the speed that matters)."""
    ops = torch.ops.acf_fast
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if cls == "bf16-table" else torch.float32
    table = torch.randn(PROBE_ITEMS + 1, m, f, generator=g).to(dtype)
    items = torch.arange(1, PROBE_ITEMS + 1)
    weight = torch.randn(d, f, generator=g) / f ** 0.5
    bias = torch.zeros(d)
    grad = torch.randn(PROBE_ITEMS, m, d, generator=g)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {"forward": {}, "weight-grad": {}}
        for kind in kinds:
            code = KINDS.index(kind)
            out["forward"][kind] = _time(
                lambda: ops.reduce_items(table, items, weight, bias, code, code), rounds)
            out["weight-grad"][kind] = _time(
                lambda: ops.reduce_items_backward(grad, table, items, weight, code), rounds)
        return out
    finally:
        torch.set_num_threads(saved)


def gflops(seconds: dict, m: int, f: int, d: int) -> dict:
    flop = 2.0 * PROBE_ITEMS * m * f * d
    return {dr: {k: float(f"{flop / s / 1e9:.4g}") for k, s in per.items()} for dr, per in seconds.items()}


# ------------------------------------------------------------------ the cache file
def cache_path() -> str:
    base = env.text("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "acf_fast", "gemm_choice.json")


@lru_cache(maxsize=None)
def cpu_model() -> str:
    # cached: every forward looks its choice up, and /proc/cpuinfo is long on big machines
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cache_key(cls: str, m: int, f: int, d: int) -> str:
    return f"{cpu_model()} | torch {torch.__version__} | {cls} | M={m} F={f} D={d}"


def _valid_entry(entry) -> bool:
    if not isinstance(entry, dict) or entry.get("forward") not in KINDS \
            or entry.get("weight-grad") not in KINDS or not isinstance(entry.get("gflops", {}), dict):
        return False
    return all(isinstance(per, dict) and all(isinstance(v, (int, float)) for v in per.values())
               for per in entry.get("gflops", {}).values())


def read_cache(path: str | None = None) -> dict:
    """The file's valid entries; {} for a missing, unreadable, corrupt or foreign file."""
    try:
        with open(path or cache_path(), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION \
            or not isinstance(data.get("entries"), dict):
        return {}
    return {k: v for k, v in data["entries"].items() if isinstance(k, str) and _valid_entry(v)}


def write_cache(key: str, entry: dict, path: str | None = None) -> bool:
    """Merge one entry into the file atomically; False (and nothing raised) if it cannot."""
    path = path or cache_path()
    entries = read_cache(path)
    entries[key] = entry
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".gemm_choice.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"version": CACHE_VERSION, "entries": entries}, fh, indent=1)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        return False
    return True


# ------------------------------------------------------------------ choosing
_CHOSEN: dict[str, Choice] = {}


def choose(cls: str, m: int, f: int, d: int, measure_fn=None) -> Choice:
    """The choice for a precision class at (M, F, D): forced, this process's, the cache
    file's, or measured now (then written to the file)."""
    forced = forced_kind()
    if forced is not None:
        if forced not in candidates(cls):
            raise ValueError(f"{env.GEMM}={forced}: not available here for a {cls} "
                             f"(available: {', '.join(candidates(cls))})")
        return Choice(forced, forced, "forced")
    key = cache_key(cls, m, f, d)
    if key in _CHOSEN:
        return _CHOSEN[key]
    entry = read_cache().get(key)
    if entry is not None and {entry["forward"], entry["weight-grad"]} <= set(candidates(cls)):
        choice = Choice(entry["forward"], entry["weight-grad"], "cache", entry.get("gflops", {}))
    else:
        seconds = (measure_fn or measure)(cls, m, f, d, candidates(cls))
        rates = gflops(seconds, m, f, d)
        choice = Choice(select(seconds["forward"]), select(seconds["weight-grad"]), "measured",
                        rates)
        write_cache(key, {"forward": choice.forward, "weight-grad": choice.weight_grad,
                          "gflops": rates})
    _CHOSEN[key] = choice
    return choice


def for_shape(table_dtype: torch.dtype, weight_dtype: torch.dtype, m: int, f: int, d: int) -> Choice:
    """The choice for a [N, M, F] table of table_dtype times a [D, F] weight: the exact
    fp32 GEMM where 16-bit GEMMs are not allowed, else `choose`'s."""
    cls = precision_class(table_dtype, weight_dtype)
    return EXACT if cls is None else choose(cls, m, f, d)


def for_tensors(table: torch.Tensor, weight: torch.Tensor) -> Choice:
    return for_shape(table.dtype, weight.dtype, table.shape[1], table.shape[2], weight.shape[0])


def forget() -> None:
    """Drop this process's choices (tests; a changed ACF_FAST_GEMM is read anyway)."""
    _CHOSEN.clear()
