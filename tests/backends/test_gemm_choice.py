"""The GEMM choice by measurement (acf_fast.backends.gemm_choice): the selection from
timings (injected, so no verdict depends on this CPU), the precision policy, forcing, the
cache file's robustness, and that the real measurement is cheap and runs once."""

import json
import os
import time

import pytest
import torch

from acf_fast.backends import gemm_choice as gc
from acf_fast.backends.registry import cpu_extension_available

pytestmark = pytest.mark.skipif(not cpu_extension_available(),
                                reason="the native extension is not built")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Each test has its own cache folder, no forced kind and no choices from earlier."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("ACF_FAST_GEMM", raising=False)
    from acf_fast.backends import cpu

    cpu.register()
    gc.forget()
    yield
    gc.forget()


def fake_measure(seconds, calls):
    """A measure_fn returning fixed timings and counting its calls."""
    def measure(cls, m, f, d, kinds):
        calls.append((cls, m, f, d, tuple(kinds)))
        return {dr: {k: seconds[dr][k] for k in kinds} for dr in gc.DIRECTIONS}
    return measure


FAST_BF16 = {"forward": {"fp32": 1.0, "bf16": 0.2, "mkl-bf16": 0.9},
             "weight-grad": {"fp32": 1.0, "bf16": 0.35, "mkl-bf16": 1.2}}
SLOW_BF16 = {"forward": {"fp32": 1.0, "bf16": 1.3, "mkl-bf16": 1.4},
             "weight-grad": {"fp32": 1.0, "bf16": 0.95, "mkl-bf16": 1.1}}


@pytest.mark.parametrize("seconds,expected", [
    ({"fp32": 1.0, "bf16": 0.2}, "bf16"),
    ({"fp32": 1.0, "bf16": 1.5, "mkl-bf16": 2.0}, "fp32"),
    ({"fp32": 1.0, "bf16": 0.95}, "fp32"),            # within the margin: exactness wins
    ({"fp32": 1.0, "bf16": 0.5, "mkl-bf16": 0.3}, "mkl-bf16"),
    ({"bf16": 0.5, "mkl-bf16": 0.6}, "bf16"),
])
def test_select_fastest_with_margin_for_fp32(seconds, expected):
    assert gc.select(seconds) == expected


def test_precision_policy():
    assert gc.precision_class(torch.bfloat16, torch.float32) == "bf16-table"
    assert gc.precision_class(torch.float16, torch.float32) is None
    assert gc.precision_class(torch.bfloat16, torch.float64) is None
    saved = torch.get_float32_matmul_precision()
    try:
        for precision in ("highest", "high"):
            torch.set_float32_matmul_precision(precision)
            assert gc.precision_class(torch.float32, torch.float32) is None
        torch.set_float32_matmul_precision("medium")
        assert gc.precision_class(torch.float32, torch.float32) == "fp32-table"
    finally:
        torch.set_float32_matmul_precision(saved)


def test_exact_fp32_table_never_measures_or_forces(monkeypatch):
    monkeypatch.setenv("ACF_FAST_GEMM", "bf16")
    table, weight = torch.zeros(3, 4, 8), torch.zeros(5, 8)
    assert gc.for_tensors(table, weight) == gc.EXACT
    assert not os.path.exists(gc.cache_path())


@pytest.mark.parametrize("seconds,forward,weight_grad", [(FAST_BF16, "bf16", "bf16"),
                                                        (SLOW_BF16, "fp32", "fp32")])
def test_measured_once_then_cached(seconds, forward, weight_grad):
    calls = []
    choice = gc.choose("bf16-table", 49, 2048, 128, measure_fn=fake_measure(seconds, calls))
    assert (choice.forward, choice.weight_grad, choice.source) == (forward, weight_grad, "measured")
    assert choice.gflops["forward"]["fp32"] == pytest.approx(2 * 32 * 49 * 2048 * 128 / 1e9, rel=1e-2)
    # same process: no second measurement
    assert gc.choose("bf16-table", 49, 2048, 128, measure_fn=fake_measure(seconds, calls)) == choice
    assert len(calls) == 1
    # a new process (forget the in-memory choice): read from the file, not measured
    gc.forget()
    again = gc.choose("bf16-table", 49, 2048, 128, measure_fn=fake_measure(seconds, calls))
    assert len(calls) == 1 and again.source == "cache"
    assert (again.forward, again.weight_grad) == (forward, weight_grad)
    # another shape class is another entry
    gc.choose("bf16-table", 49, 1024, 128, measure_fn=fake_measure(seconds, calls))
    assert len(calls) == 2
    assert len(json.load(open(gc.cache_path()))["entries"]) == 2


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00", b"[1, 2]",
                                     b'{"version": 1, "entries": {"k": "v"}}',
                                     b'{"version": 99, "entries": {}}',
                                     b"__import__('os').system('touch /tmp/acf_pwned')"])
def test_corrupt_cache_is_ignored_and_replaced(content):
    path = gc.cache_path()
    os.makedirs(os.path.dirname(path))
    key = gc.cache_key("bf16-table", 49, 2048, 128)
    with open(path, "wb") as fh:
        fh.write(content.replace(b'"k"', json.dumps(key).encode()))
    calls = []
    choice = gc.choose("bf16-table", 49, 2048, 128, measure_fn=fake_measure(FAST_BF16, calls))
    assert choice.source == "measured" and len(calls) == 1
    assert gc.read_cache()[key]["forward"] == "bf16"   # rewritten as valid JSON
    assert not os.path.exists("/tmp/acf_pwned")


def test_cache_entry_with_unknown_kind_is_ignored():
    key = gc.cache_key("bf16-table", 49, 2048, 128)
    assert gc.write_cache(key, {"forward": "tf32", "weight-grad": "fp32", "gflops": {}})
    calls = []
    assert gc.choose("bf16-table", 49, 2048, 128,
                     measure_fn=fake_measure(FAST_BF16, calls)).source == "measured"


def test_unwritable_cache_measures_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    calls = []
    choice = gc.choose("bf16-table", 49, 2048, 128, measure_fn=fake_measure(FAST_BF16, calls))
    assert choice.forward == "bf16" and len(calls) == 1
    gc.choose("bf16-table", 49, 2048, 128, measure_fn=fake_measure(FAST_BF16, calls))
    assert len(calls) == 1                              # kept for the process
    assert blocker.read_text().startswith("a file")


def test_cache_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gc.cache_path() == str(tmp_path / "xdg" / "acf_fast" / "gemm_choice.json")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert gc.cache_path().startswith(os.path.expanduser("~"))


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_forced_kind_skips_measurement(kind, monkeypatch):
    monkeypatch.setenv("ACF_FAST_GEMM", kind)
    calls = []
    choice = gc.choose("bf16-table", 49, 2048, 128, measure_fn=fake_measure(FAST_BF16, calls))
    assert (choice.forward, choice.weight_grad, choice.source) == (kind, kind, "forced")
    assert calls == [] and not os.path.exists(gc.cache_path())


def test_bad_forced_kind_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("ACF_FAST_GEMM", "tf32")
    with pytest.raises(ValueError, match=r"ACF_FAST_GEMM='tf32' is not one of auto, fp32, bf16, mkl-bf16"):
        gc.choose("bf16-table", 49, 2048, 128)
    monkeypatch.setenv("ACF_FAST_GEMM", "mkl-bf16")
    with pytest.raises(ValueError, match="ACF_FAST_GEMM=mkl-bf16: not available here for a fp32-table"):
        gc.choose("fp32-table", 49, 2048, 128)


def test_model_follows_the_choice(monkeypatch):
    """The cpu backend passes the chosen kinds to its op: forced bf16 changes a bf16-table
    model's scores (a different rounding), forced fp32 reproduces the exact widening path."""
    from acf_fast.testing import random_batch, random_model

    model = random_model(n_users=6, n_items=20, m=5, f=64, d=8, backend="cpu",
                         feature_dtype=torch.bfloat16)
    batch = random_batch(model, batch=5, seed=3)
    ref = random_model(n_users=6, n_items=20, m=5, f=64, d=8, backend="reference",
                       feature_dtype=torch.bfloat16)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        exact = ref(*batch)[0]
        monkeypatch.setenv("ACF_FAST_GEMM", "fp32")
        fp32 = model(*batch)[0]
        monkeypatch.setenv("ACF_FAST_GEMM", "bf16")
        bf16 = model(*batch)[0]
    torch.testing.assert_close(fp32, exact, rtol=1e-5, atol=1e-5)
    assert not torch.equal(bf16, fp32)
    torch.testing.assert_close(bf16, exact, rtol=3e-2, atol=3e-2)


def test_real_measurement_is_cheap_and_sane():
    """The measurement on this machine: every candidate timed, positive rates, and a cost
    that is the probe's fixed work at the measured rates (a 32-item problem, 4 runs per
    kind and direction: ~0.3 s on a Zen 5 core), paid once: the next lookup is free. The
    bounds follow from the measured rates, so no verdict depends on this CPU's speed."""
    start = time.thread_time()
    choice = gc.choose("bf16-table", 49, 2048, 128)
    spent = time.thread_time() - start
    assert choice.source == "measured"
    assert set(choice.gflops["forward"]) == set(gc.candidates("bf16-table"))
    assert all(v > 0 for per in choice.gflops.values() for v in per.values())
    flop = 2.0 * gc.PROBE_ITEMS * 49 * 2048 * 128
    assert 4 * len(gc.candidates("bf16-table")) * 2 * flop <= 30e9      # the probe's work
    predicted = sum(4 * flop / (rate * 1e9) for per in choice.gflops.values() for rate in per.values())
    assert spent < 2 * predicted + 1.0, f"measuring took {spent:.2f} s, predicted {predicted:.2f} s"
    start = time.thread_time()
    for _ in range(100):
        assert gc.choose("bf16-table", 49, 2048, 128) is choice
    assert time.thread_time() - start < 0.1


def test_info_subcommand_reports_the_choice(capsys):
    from acf_fast.pipeline.cli import main

    calls = []
    # pre-seed both classes so the command reads them instead of measuring
    for cls in ("bf16-table", "fp32-table"):
        gc.choose(cls, 49, 2048, 128, measure_fn=fake_measure(FAST_BF16, calls))
    gc.forget()
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "ISA extensions:" in out and f"torch {torch.__version__}" in out
    assert "bf16 table: [cache]" in out and 'fp32 table, precision "medium": [cache]' in out
    assert "forward      bf16      GFLOP/s per core: fp32 0.822, bf16 4.11" in out
    assert "fp32 table, default precision: fp32 (exact)" in out
    assert torch.get_float32_matmul_precision() == "highest"


def test_info_bad_forced_kind_is_one_line(capsys, monkeypatch):
    from acf_fast.pipeline.cli import main

    monkeypatch.setenv("ACF_FAST_GEMM", "fast")
    assert main(["info"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["acf-fast: error: environment variable ACF_FAST_GEMM='fast' is not one of "
                   "auto, fp32, bf16, mkl-bf16"]


def test_compiled_model_runs_the_chosen_bf16_gemm(monkeypatch):
    """Under torch.compile the choice is a constant of the trace (it reads a file and may
    time GEMMs, which must not be traced): a bf16 table with the bf16 kind gives the eager
    numbers, scores and W_red's gradient."""
    from acf_fast.testing import random_batch, random_model

    monkeypatch.setenv("ACF_FAST_GEMM", "bf16")
    model = random_model(n_users=6, n_items=20, m=5, f=32, d=8, backend="cpu",
                         feature_dtype=torch.bfloat16)
    batch = random_batch(model, batch=5, seed=4)

    def scores_and_grad(fn):
        model.zero_grad(set_to_none=True)
        pos, neg = fn(*batch)
        (pos.sum() - neg.sum()).backward()
        return pos.detach(), model.user_model.feats.dim_reductor.weight.grad.clone()

    eager = scores_and_grad(model)
    compiled = scores_and_grad(torch.compile(model))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("ACF_FAST_GEMM", "fp32")
    exact = scores_and_grad(model)
    assert not torch.equal(exact[0], compiled[0])   # the compiled run did use bf16
