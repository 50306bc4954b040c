"""torch.distributed scale-out, checked with 2 gloo processes on loopback (CPU only).

One launch of 2 worker processes (this file run as a script, with the environment
torchrun would give it) does every distributed task and saves what it saw; the
tests compare that with single-process runs in this process:
  (a) one epoch of 2-process DDP training == single-process training over the same
      global batches (WARP, sigmoid and BPR losses; reference and fused CPU
      backends; a last batch too small to give both ranks an example);
  (b) distributed evaluation == single-process evaluation, bit for bit;
  checkpoints are written by rank 0 only; the feature cache is converted once.
Every join has a timeout: a hung collective fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from acf_fast import distributed as D
from acf_fast.training import sampler as S
from acf_fast.training.steps import distributed_loss, global_loss_value
from acf_fast.model.losses import get_loss, warp_loss
from acf_fast.testing import random_model

WORLD = 2
LAUNCH_TIMEOUT_S = 120
BATCH = 128
# (name, loss, backend, dtype, number of triplets). 257 = 2 full batches + a last batch
# of 1 (rank 1 runs a zero-weight stand-in); 259 leaves a last batch of 3 (pieces 2 + 1).
TRAIN_CONFIGS = [
    ("warp_ref64_257", "warp", "reference", "float64", 257),
    ("warp_ref64_259", "warp", "reference", "float64", 259),
    ("sigmoid_ref64_259", "sigmoid", "reference", "float64", 259),
    ("bpr_ref64_259", "bpr", "reference", "float64", 259),
    ("warp_cpu64_257", "warp", "cpu", "float64", 257),
    ("warp_cpu32_259", "warp", "cpu", "float32", 259),
]
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ---------------------------------------------------------------------------- shared inputs
def make_model(backend: str, dtype: str, seed: int = 0):
    return random_model(n_users=12, n_items=30, m=49, f=16, d=8, backend=backend,
                        dtype=DTYPES[dtype], seed=seed)


def make_triplets(n: int, n_users: int = 12, n_items: int = 30, seed: int = 1):
    """user [n], profile [n, 9] right-padded (lengths 0..9), pos [n], neg [n]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 10, (n,), generator=g)
    profile = torch.randint(1, n_items + 1, (n, 9), generator=g)
    profile[torch.arange(9)[None, :] >= lengths[:, None]] = 0
    return (torch.randint(0, n_users, (n,), generator=g), profile,
            torch.randint(1, n_items + 1, (n,), generator=g),
            torch.randint(1, n_items + 1, (n,), generator=g))


def permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The pipeline's epoch order when it is there, else the same recipe."""
    try:
        from acf_fast.training.sampler import epoch_permutation
    except ImportError:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=gen)
    return epoch_permutation(n, seed, epoch)


def backend_available(name: str) -> bool:
    from acf_fast.backends.registry import cpu_extension_available

    return name != "cpu" or cpu_extension_available()


def single_process_epoch(loss: str, backend: str, dtype: str, n: int):
    """The plain loop acf_fast.training.trainer runs: global batches of the epoch permutation, mean loss."""
    model = make_model(backend, dtype)
    data = make_triplets(n)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    perm, losses = permutation(n, 0, 0), []
    for s in range(0, n, BATCH):
        idx = perm[s:s + BATCH]
        opt.zero_grad(set_to_none=True)
        ps, ns = model(*(t[idx] for t in data))
        value = get_loss(loss)(ps, ns)
        value.backward()
        opt.step()
        losses.append(value.item())
    return model.state_dict(), losses


def distributed_epoch(loss: str, backend: str, dtype: str, n: int):
    """What every rank runs: DDP-wrapped model, this rank's piece of each global batch."""
    ctx = D.context()
    model = make_model(backend, dtype)
    data = make_triplets(n)
    ddp = D.wrap_model(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    sampler = S.DistributedBatchSampler(n, BATCH, seed=0, permutation=permutation)
    losses, sizes = [], []
    for idx, n_real, global_size in sampler.epoch(0):
        opt.zero_grad(set_to_none=True)
        ps, ns = ddp(*(t[idx] for t in data))
        backward, local_sum = distributed_loss(loss, ps, ns, n_real, global_size)
        backward.backward()
        opt.step()
        losses.append(global_loss_value(local_sum, global_size))
        sizes.append(n_real)
    reducer_params = None
    if ctx.is_distributed:   # what DDP actually all-reduces
        ids = {id(p) for p in ddp._module_parameters}
        reducer_params = sorted(name for name, p in model.named_parameters() if id(p) in ids)
    return model.state_dict(), losses, sizes, reducer_params


# ---------------------------------------------------------------------------- evaluation inputs
def make_eval_inputs(n_groups: int = 37, n_users: int = 12, n_items: int = 30, seed: int = 3):
    from acf_fast.data.formats import EvaluationGroups
    from acf_fast.data.history import UserHistory

    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n_groups)
    plen = rng.integers(1, 11, n_groups)
    profile = np.zeros((n_groups, 10), dtype=np.int64)
    for g, k in enumerate(plen):
        profile[g, :k] = rng.choice(np.arange(1, n_items + 1), k, replace=False)
    tlen = rng.integers(1, 5, n_groups)
    targets = np.concatenate([rng.choice(np.arange(1, n_items + 1), k, replace=False) for k in tlen])
    groups = EvaluationGroups(users, profile, targets, np.concatenate([[0], np.cumsum(tlen)]))
    hist_len = rng.integers(1, 8, n_users)
    train_items = np.concatenate([rng.choice(np.arange(1, n_items + 1), k, replace=False)
                                  for k in hist_len])
    ptr = np.concatenate([[0], np.cumsum(hist_len)])
    history = UserHistory(n_users, n_items, ptr, train_items, ptr, train_items)
    return groups, history


def run_evaluation():
    """evaluate_groups on a small memory budget, so the groups span several blocks."""
    from acf_fast.evaluation.evaluate import evaluate_groups

    model = make_model("reference", "float32", seed=5)
    groups, history = make_eval_inputs()
    memory_mb = 5 * 30 * 16 / 2**20          # blocks of 5 groups: 8 blocks over 2 ranks
    return evaluate_groups(model, groups, history, memory_mb=memory_mb, progress=False)


# ---------------------------------------------------------------------------- the worker
def worker(out: Path) -> None:
    torch.set_num_threads(1)
    ctx = D.init_distributed("cpu", timeout_s=60)
    assert ctx.world_size == WORLD and ctx.backend == "gloo", ctx
    rank = ctx.rank
    result: dict = {"rank": rank, "is_main": D.is_main()}

    # (a) training (configs whose backend is not built here are reported, not run)
    result["train"] = {name: distributed_epoch(loss, be, dt, n) if backend_available(be)
                       else f"backend {be!r} not available"
                       for name, loss, be, dt, n in TRAIN_CONFIGS}

    # checkpoints: rank 0 only builds and writes; everyone sees the file afterwards
    calls = out / f"checkpoint_built_by_rank{rank}"

    def build():
        calls.write_text("1")
        return {"state_dict": {"x": torch.arange(3)}, "epoch": 1}

    path = D.save_on_main(build, out / "ckpt" / "last.pt")
    result["ckpt_visible_after_save"] = path.exists()

    # the feature cache: converted once (by rank 0), mapped by everyone
    from acf_fast.model import features as F

    converted = []
    original = F._convert_npy
    F._convert_npy = lambda *a, **k: (converted.append(rank), original(*a, **k))[1]
    try:
        D.prepare_feature_cache(out / "features.npy")
    finally:
        F._convert_npy = original
    table = F.load_feature_table(out / "features.npy")
    result["features"] = {"converted_here": bool(converted), "sum": float(table.double().sum()),
                          "mmap": _is_memory_mapped(F.cache_path(out / "features.npy", torch.float32))}

    # (b) evaluation
    try:
        res = run_evaluation()
        result["evaluation"] = res
    except ImportError as exc:   # the pipeline's evaluate module not there
        result["evaluation"] = f"ImportError: {exc}"

    torch.save(result, out / f"rank{rank}.pt")
    D.barrier()
    D.shutdown()


def _is_memory_mapped(path: Path) -> bool:
    """Is `path` mapped into this process (the table is a view of the file, not a copy)?"""
    return str(Path(path).resolve()) in Path("/proc/self/maps").read_text()


# ---------------------------------------------------------------------------- launching
REPO = Path(__file__).resolve().parents[2]


def _child_env(**extra) -> dict:
    """The workers import acf_fast from this checkout directly, not through the editable
    install's finder (which is briefly absent while `pip install -e .` rebuilds)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT_TAKEN = ("EADDRINUSE", "address already in use")


def _port_race(text: str) -> bool:
    """The free port we picked was taken before the rendezvous bound it (rare): retry."""
    return any(m in text.lower() for m in (x.lower() for x in PORT_TAKEN))


def launch(argv: list[str], world: int, timeout: float, extra_env: dict | None = None,
           cwd=None, retries: int = 1) -> list[subprocess.CompletedProcess]:
    """Start `world` copies of `argv` with torchrun's environment on 127.0.0.1; kill them
    all if any fails or the timeout passes (a dead peer would leave the other waiting)."""
    try:
        return _launch_once(argv, world, timeout, extra_env, cwd)
    except AssertionError as exc:
        if retries and _port_race(str(exc)):
            return launch(argv, world, timeout, extra_env, cwd, retries - 1)
        raise


def _launch_once(argv, world, timeout, extra_env, cwd):
    port = _free_port()
    procs = []
    for rank in range(world):
        env = _child_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                         LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                         **(extra_env or {}))
        procs.append(subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = [subprocess.CompletedProcess(argv, p.wait(timeout=10), p.stdout.read(), None) for p in procs]
    bad = [(r, o) for r, o in enumerate(outs) if o.returncode != 0]
    if bad:
        why = "timed out" if time.monotonic() > deadline else "failed"
        detail = "\n".join(f"--- rank {r} (rc {o.returncode}):\n{o.stdout[-4000:]}" for r, o in bad)
        raise AssertionError(f"{world}-process run {why}:\n{detail}")
    return outs


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    feats = np.empty((6, 2), dtype=object)
    rng = np.random.default_rng(0)
    for i in range(6):
        feats[i] = [f"img{i}.jpg", rng.random((4, 7, 7), dtype=np.float32)]
    np.save(out / "features.npy", feats, allow_pickle=True)
    t0 = time.perf_counter()
    launch([sys.executable, __file__, "worker", str(out)], WORLD, LAUNCH_TIMEOUT_S)
    seconds = time.perf_counter() - t0
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], seconds


# ---------------------------------------------------------------------------- tests: no processes
def test_global_batch_split_is_exact_union():
    for world in (1, 2, 3, 5):
        for size in (1, 2, 3, 127, 128):
            batch = torch.randperm(1000)[:size]
            pieces = [S.split_global_batch(batch, r, world) for r in range(world)]
            real = torch.cat([idx[:n] for idx, n in pieces])
            assert torch.equal(real, batch)
            assert max(n for _, n in pieces) - min(n for _, n in pieces) <= 1
            assert all(idx.numel() >= 1 for idx, _ in pieces)   # every rank runs a step


def test_sampler_covers_every_triplet_once_per_epoch():
    n = 1000
    seen = []
    for rank in range(3):
        s = S.DistributedBatchSampler(n, BATCH, seed=7, rank=rank, world_size=3, permutation=permutation)
        assert len(s) == 8
        seen += [idx[:k] for idx, k, _ in s.epoch(2)]
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(n))
    single = S.DistributedBatchSampler(n, BATCH, seed=7, rank=0, world_size=1, permutation=permutation)
    assert torch.equal(torch.cat([idx for idx, _, _ in single.epoch(2)]), permutation(n, 7, 2))


@pytest.mark.parametrize("loss", ["warp", "sigmoid", "bpr"])
def test_single_process_terms_are_the_tutorial_losses(loss):
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    backward, local_sum = distributed_loss(loss, pos, neg, 50, 50)
    torch.testing.assert_close(backward, get_loss(loss)(pos, neg), rtol=1e-14, atol=0)
    # a stand-in (n_real = 0) contributes nothing and counts no violation
    stand_in, _ = distributed_loss(loss, pos[:1], neg[:1], 0, 50)
    assert float(stand_in) == 0.0


def test_warp_needs_the_global_violation_count():
    """Why the count is all-reduced: per-piece counts give a different loss."""
    g = torch.Generator().manual_seed(1)
    pos, neg = torch.randn(128, generator=g), torch.randn(128, generator=g)
    whole = warp_loss(pos, neg)
    halves = (warp_loss(pos[:64], neg[:64]) + warp_loss(pos[64:], neg[64:])) / 2
    assert not torch.isclose(whole, halves, rtol=1e-3)


def test_ddp_ignores_buffers_and_unused_w_v():
    model = make_model("reference", "float32")
    names = D.ignored_names(model)
    assert set(names) == {"feature_table", "all_items", "user_model.w_v.weight", "user_model.w_v.bias"}


def test_single_process_helpers_are_no_ops(tmp_path):
    assert D.context().world_size == 1 and D.is_main()
    model = make_model("reference", "float32")
    assert D.wrap_model(model) is model and D.unwrap(model) is model
    D.save_on_main({"state_dict": {}}, tmp_path / "c.pt")
    assert (tmp_path / "c.pt").exists()
    rows = D.gather_rows({"a": np.array([3.0, 1.0])}, np.array([1, 0]), 2)
    assert rows["a"].tolist() == [1.0, 3.0]
    assert D.shard_blocks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert D.shard_blocks(10, 4, rank=1, world_size=2) == [(4, 8)]


# ---------------------------------------------------------------------------- tests: 2 processes
@pytest.mark.parametrize("name,loss,backend,dtype,n", TRAIN_CONFIGS, ids=[c[0] for c in TRAIN_CONFIGS])
def test_two_process_epoch_equals_single_process(dist_run, name, loss, backend, dtype, n):
    _, results, _ = dist_run
    if isinstance(results[0]["train"][name], str):
        pytest.skip(results[0]["train"][name])
    if not backend_available(backend):
        pytest.skip(f"backend {backend!r} not available in this process")
    expected, expected_losses = single_process_epoch(loss, backend, dtype, n)
    # fp64: rounding only; fp32: Adam turns noise-level gradients of the softmax-invariant
    # attention biases (exactly zero in exact arithmetic) into updates of up to ~lr/10
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == "float64" else dict(rtol=1e-4, atol=5e-4)
    for r in results:
        state, losses, sizes, reducer_params = r["train"][name]
        for key in expected:
            torch.testing.assert_close(state[key], expected[key], **tol, msg=lambda m: f"{key}: {m}")
        np.testing.assert_allclose(losses, expected_losses, rtol=1e-9 if dtype == "float64" else 1e-5)
        assert sum(sizes) > 0
        assert not any(p.startswith("user_model.w_v.") for p in reducer_params)
        every = [k for k, _ in make_model(backend, dtype).named_parameters()]   # tied: counted once
        assert len(reducer_params) == len(every) - 2   # all but w_v.{weight,bias}
    # the ranks hold bitwise identical parameters (DDP all-reduced the same gradients)
    for key in expected:
        assert torch.equal(results[0]["train"][name][0][key], results[1]["train"][name][0][key])
    if n % BATCH < WORLD:   # a rank had only a stand-in in the last step
        assert 0 in results[1]["train"][name][2]


def test_two_process_w_v_untouched(dist_run):
    _, results, _ = dist_run
    fresh = make_model("reference", "float64").state_dict()
    for r in results:
        state = r["train"]["warp_ref64_257"][0]
        assert torch.equal(state["user_model.w_v.weight"], fresh["user_model.w_v.weight"])


def test_checkpoints_written_by_rank0_only(dist_run):
    out, results, _ = dist_run
    assert (out / "checkpoint_built_by_rank0").exists()
    assert not (out / "checkpoint_built_by_rank1").exists()
    assert all(r["ckpt_visible_after_save"] for r in results)
    assert torch.load(out / "ckpt" / "last.pt")["epoch"] == 1
    assert [p.name for p in (out / "ckpt").iterdir()] == ["last.pt"]   # no temp files left


def test_feature_cache_converted_once_and_mapped(dist_run):
    out, results, _ = dist_run
    assert [r["features"]["converted_here"] for r in results] == [True, False]
    assert results[0]["features"]["sum"] == results[1]["features"]["sum"]
    assert all(r["features"]["mmap"] for r in results)


def test_two_process_evaluation_equals_single_process_exactly(dist_run):
    _, results, _ = dist_run
    if isinstance(results[0]["evaluation"], str):
        pytest.skip(results[0]["evaluation"])
    expected = run_evaluation()
    for r in results:
        got = r["evaluation"]
        for protocol, metrics in expected["per_group"].items():
            for metric, values in metrics.items():
                assert np.array_equal(got["per_group"][protocol][metric], values), (protocol, metric)
                assert float(np.mean(got["per_group"][protocol][metric])) == float(np.mean(values))
        for key, values in expected["sizes"].items():
            assert np.array_equal(got["sizes"][key], values), key


def test_two_process_run_is_quick(dist_run):
    assert dist_run[2] < 60



# ---------------------------------------------------------------------------- the CLI under torchrun
def torchrun(args: list[str], cwd, timeout: float = LAUNCH_TIMEOUT_S, retry: bool = True) -> str:
    """`torchrun --nproc_per_node=2 -m acf_fast ARGS` on 127.0.0.1 (static rendezvous)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={WORLD}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "acf_fast", *args]
    env = _child_env()
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:   # run() kills the launcher; its workers die with it
        raise AssertionError(f"torchrun timed out: {exc.stdout}{exc.stderr}") from None
    if done.returncode and _port_race(done.stderr + done.stdout) and retry:
        return torchrun(args, cwd, timeout, retry=False)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def pipeline_data(tmp_path_factory):
    pytest.importorskip("acf_fast.pipeline.cli")
    from acf_fast.data.sampling import prepare
    from acf_fast.data.synth import synth

    root = tmp_path_factory.mktemp("pipeline")
    raw = synth(root / "raw", progress=False, n_users=40, n_items=80, feature_dim=8, n_concepts=4,
                images=False, formats=("npy",))
    # 320 triplets: batches of 128, 128, 64 -> pieces of 64 + 64 and 32 + 32 per rank
    prepare(raw["interactions"], raw["features_npy"], root / "data", n_train=300, n_validation=60,
            progress=False)
    return root


def test_torchrun_train_matches_single_process(pipeline_data):
    """`torchrun --nproc_per_node=2 -m acf_fast train` == `acf-fast train`: same losses, same
    validation metrics, same parameters up to fp32 rounding; rank 0 alone writes the files."""
    from acf_fast.training import TrainConfig, train

    root = pipeline_data
    common = dict(epochs=1, model_dim=8, backend="reference", val_rank_samples=50, seed=3)
    train(TrainConfig(data_dir=str(root / "data"), out_dir=str(root / "single"), progress=False, **common))
    torchrun(["train", str(root / "data"), str(root / "dist"), "--epochs", "1", "--model-dim", "8",
              "--backend", "reference", "--val-rank-samples", "50", "--seed", "3"], cwd=root)
    one, two = (torch.load(root / d / "last.pt", weights_only=False) for d in ("single", "dist"))
    for key, value in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][key], value, rtol=1e-4, atol=5e-4)
    (h1,), (h2,) = one["train_state"]["history"], two["train_state"]["history"]
    assert h1.keys() == h2.keys()
    for key in h1:
        assert h2[key] == pytest.approx(h1[key], rel=1e-5), key
    assert one["train_state"]["global_step"] == two["train_state"]["global_step"] == 3
    assert len(json.loads((root / "dist" / "history.json").read_text())) == 1
    # rank 0 alone wrote: no second rank's temporary files left behind
    assert sorted(p.name for p in (root / "dist").iterdir()) == ["best.pt", "history.json", "last.pt"]


def test_torchrun_evaluate_equals_single_process_exactly(pipeline_data):
    """`torchrun ... evaluate` writes the very metrics.json a single process writes."""
    from acf_fast.training import TrainConfig, train

    root = pipeline_data
    ckpt = root / "eval_model" / "last.pt"
    if not ckpt.exists():
        train(TrainConfig(data_dir=str(root / "data"), out_dir=str(ckpt.parent), epochs=1, model_dim=8,
                          backend="reference", val_rank_samples=10, progress=False))
    # a small memory budget makes several blocks of users, dealt out to the 2 ranks
    args = [str(ckpt), str(root / "data"), "--no-plot", "--backend", "reference", "--memory-mb", "0.01"]
    from acf_fast.pipeline.cli import main

    assert main(["evaluate", *args, "--out", str(root / "eval_single")]) == 0
    out = torchrun(["evaluate", *args, "--out", str(root / "eval_dist")], cwd=root)
    assert out.count("ACF (tutorial)") == 2                   # rank 0 prints (two tables), rank 1 not
    single = json.loads((root / "eval_single" / "metrics.json").read_text())
    dist = json.loads((root / "eval_dist" / "metrics.json").read_text())
    assert dist == single


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        worker(Path(sys.argv[2]))
    else:
        sys.exit(f"usage: {sys.argv[0]} worker OUT_DIR")
