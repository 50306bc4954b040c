"""Baselines: the reference ACF, eager and under torch.compile, at the Wikimedia shape."""

import pytest
import torch

import harness

BATCH = 128


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_train_step_reference(benchmark, dtype, compiled):
    step = harness.make_training_step("reference", harness.DTYPES[dtype], BATCH, compile=compiled)
    step()  # warm-up (and compilation)
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    peak = harness.step_peak_bytes(step)
    harness.record(f"train step {dtype} B={BATCH}",
                   "reference+compile" if compiled else "reference", benchmark, peak_bytes=peak)


@pytest.mark.parametrize("dtype", ["fp32"])
def test_recommend_all_reference(benchmark, dtype):
    model = harness.wikimedia_model("reference", harness.DTYPES[dtype])
    from acf_fast.testing import wikimedia_batch
    data = wikimedia_batch(model, batch=BATCH)

    def run():
        scores = model.recommend_batch(data.user_ids, data.profile_ids)
        if scores.is_cuda:
            torch.cuda.synchronize()
        return scores

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    harness.record(f"recommend_all {dtype} B={BATCH} N=1000", "reference", benchmark)
