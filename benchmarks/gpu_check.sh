#!/usr/bin/env bash
# GPU check for the Triton backend, one command, under 8 minutes (the limits below cap it;
# through the device tool: timeout_s 600):
#   bash benchmarks/gpu_check.sh            (OUT=/some/dir to keep the logs and tables)
# 1. the Triton tests on CUDA tensors (no interpreter): outputs and every gradient vs the
#    reference, fp64 gradcheck; the fused step; the CUDA-graph step's capture and replay;
# 2. issue 14's table: the fused step at the Wikimedia shape (32,958 items, full profiles)
#    vs the GPU-resident reference and the tutorial's host-side way, B=128/1024, bf16/fp32,
#    x its roofline floor, and the profiler's kernels per step (benchmarks/fused_bench.py);
# 3. the training-step benchmark at the small shape (reference, GPU-resident and host-table
#    as the tutorial, vs triton, eager and replayed from a CUDA graph; fp32/bf16 features,
#    B=128/1024), the reduction A/B, kernel resources (benchmarks/gpu_bench.py).
# The phases run in order of importance: if the device time runs out, the last is lost.
# Works without installing anything (no network needed): PYTHONPATH points at this
# checkout, and acf_fast.backends.triton maps kernels/ to acf_fast.kernels itself.
# Each phase has its own time limit; a failing phase is reported and the next one runs.
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET                 # real kernels on the GPU
export TRITON_DEFAULT_FP_FUSION=1      # newer triton warns when unset; same default
PY="${PYTHON:-$(command -v python || command -v python3)}"
LOGS="${OUT:-${TMPDIR:-/tmp}/acf_gpu_check}"
mkdir -p "$LOGS"
TEST_LIMIT="${TEST_LIMIT:-120}"
FUSED_LIMIT="${FUSED_LIMIT:-240}"
BENCH_LIMIT="${BENCH_LIMIT:-120}"
status=0
start=$SECONDS

echo "== environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2
"$PY" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" \
  || { echo "torch/triton not importable"; exit 1; }

echo "== 1. Triton tests on CUDA (limit ${TEST_LIMIT}s)"
if "$PY" -c "import pytest" 2>/dev/null; then
  PYTHONPATH="$PWD/tests:${PYTHONPATH:-}" timeout "$TEST_LIMIT" "$PY" -m pytest -v -p no:cacheprovider --noconftest -o addopts="" -rfE --durations=5 \
      tests/training/test_fused_step.py tests/backends/test_triton_backend.py tests/backends/test_triton_gradcheck.py tests/training/test_cuda_graph.py 2>&1 | tee "$LOGS/gpu_tests.txt"
  rc=${PIPESTATUS[0]}
else
  echo "pytest is not installed here: running the built-in quick check instead"
  timeout "$TEST_LIMIT" "$PY" - <<'PYEOF' 2>&1 | tee "$LOGS/gpu_tests.txt"
import torch
from acf_fast.testing import random_batch, random_model, same_model
ok = True
for dtype, feat, tol in ((torch.float32, torch.float32, 1e-4), (torch.float64, torch.float32, 1e-9),
                         (torch.float32, torch.bfloat16, 1e-4)):
    ref = random_model(n_users=6, n_items=9, m=49, f=40, d=128, dtype=dtype,
                       feature_dtype=feat).cuda()
    tri = same_model(ref, "triton")
    batch = random_batch(ref, batch=7, seed=4, lengths=[9, 0, 3, 1, 9, 0, 5], duplicates=True)
    outs = []
    for m in (ref, tri):
        m.zero_grad()
        pos, neg = m(*batch)
        (pos.sum() - 2 * neg.sum()).backward()
        outs.append((pos, neg, {n: p.grad for n, p in m.named_parameters()}))
    err = max(float((a - b).abs().max()) for a, b in zip(outs[0][:2], outs[1][:2]))
    for n, g in outs[0][2].items():
        if g is not None:
            err = max(err, float((g - outs[1][2][n]).abs().max()) / max(1.0, float(g.abs().max())))
    print(f"{dtype} params, {feat} features: max error {err:.2e}", "ok" if err < tol else "FAIL")
    ok &= err < tol
raise SystemExit(0 if ok else 1)
PYEOF
  rc=${PIPESTATUS[0]}
fi
[ "$rc" -eq 0 ] || { echo "!! tests failed or timed out (exit $rc)"; status=1; }

echo "== 2. the fused step at the Wikimedia shape (limit ${FUSED_LIMIT}s)"
OUT="$LOGS" timeout "$FUSED_LIMIT" "$PY" benchmarks/fused_bench.py 2>&1 | tee "$LOGS/fused_bench_log.txt"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || { echo "!! fused benchmark failed or timed out (exit $rc)"; status=1; }

echo "== 3. training-step benchmark, small shape (limit ${BENCH_LIMIT}s)"
timeout "$BENCH_LIMIT" "$PY" benchmarks/gpu_bench.py 2>&1 | tee "$LOGS/gpu_bench_log.txt"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || { echo "!! benchmark failed or timed out (exit $rc)"; status=1; }

echo "== done in $((SECONDS - start)) s; logs in $LOGS; exit $status"
exit $status
