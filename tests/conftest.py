"""Test-wide settings: a derandomized hypothesis profile for CI, seeds, thread count, no
backend override from the environment, and ACF_FAST_REQUIRE_BACKENDS."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI (and `make test`) must be reproducible: same examples every run. Set
# HYPOTHESIS_PROFILE=explore locally to search with fresh randomness and more examples.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.function_scoped_fixture])
settings.register_profile("explore", deadline=None, max_examples=300,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.manual_seed(0)

# ACF_FAST_BACKEND sets what backend="auto" means (acf_fast.backends.registry.resolve): left in
# the environment, every test that builds an "auto" model would run another backend.
BACKEND_OVERRIDE = "ACF_FAST_BACKEND"

# ACF_FAST_REQUIRE_BACKENDS=1 (set by `make test`): the fused backends' tests must run.
# A missing or stale native extension, or a missing triton, fails the session instead of
# silently skipping the cpu and triton tests.
REQUIRE_BACKENDS = "ACF_FAST_REQUIRE_BACKENDS"


def backends_required() -> bool:
    return os.environ.get(REQUIRE_BACKENDS, "0") not in ("", "0")


def missing_backends() -> list[str]:
    """Why a fused backend's tests would skip here (empty when both can run)."""
    from acf_fast.backends import cpu as _ext

    problems = []
    ops, reason = _ext._load()
    if ops is None:
        problems.append(reason)
    else:  # ACF_FAST_ALLOW_STALE loads a stale build; a required backend must be current
        built, expected = ops.source_hash(), _ext._checkout_source_hash()
        if expected is not None and built != expected:
            problems.append(f"the native extension acf_fast._C is stale (built from csrc/ "
                            f"{built}, sources now {expected}); ACF_FAST_ALLOW_STALE is set")
    try:
        import triton  # noqa: F401
    except Exception as exc:  # what makes pytest.importorskip("triton") skip
        problems.append(f"triton does not import ({type(exc).__name__}: {exc})")
    return problems


def require_triton_runnable() -> None:
    """At the top of a Triton test module: skip it where Triton cannot run (no CUDA
    device, no TRITON_INTERPRET=1), or fail it when ACF_FAST_REQUIRE_BACKENDS is set."""
    from acf_fast.backends.registry import triton_interpreter_on

    if torch.cuda.is_available() or triton_interpreter_on():
        return
    if backends_required():
        pytest.fail(f"{REQUIRE_BACKENDS} is set but the Triton tests cannot run: no CUDA "
                    "device and TRITON_INTERPRET is not 1", pytrace=False)
    pytest.skip("needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)


def pytest_sessionstart(session):
    if not backends_required():
        return
    problems = missing_backends()
    if problems:
        pytest.exit(f"{REQUIRE_BACKENDS} is set, but the fused backends' tests would skip: "
                    + "; ".join(problems) + " (make build)", returncode=1)


@pytest.fixture(scope="session", autouse=True)
def _no_backend_override_in_session():
    """Also for module- and session-scoped fixtures, which run before the per-test one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(BACKEND_OVERRIDE, raising=False)
        yield


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """Every test starts without ACF_FAST_BACKEND; a test that means to use it sets it
    itself (monkeypatch.setenv in the test, or a subprocess's env=), which this cannot
    undo since it runs first."""
    monkeypatch.delenv(BACKEND_OVERRIDE, raising=False)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train faster on one thread than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_prepared_dataset(root):
    """40 users x 60 items, F = 16, prepared into root/prep with 640 training triplets
    (5 steps of 128): the dataset of the training-loop tests."""
    from acf_fast.data.sampling import prepare
    from acf_fast.data.synth import synth

    s = synth(root / "data", n_users=40, n_items=60, n_concepts=4, feature_dim=16, images=False,
              heavy_users=1, median_interactions=30, progress=False)
    prepare(s["interactions"], s["features_h5"], root / "prep", n_train=640, n_validation=64,
            progress=False)
    return root


def tiny_train_config(root, out, **overrides):
    """A TrainConfig for tiny_prepared_dataset(root): 5 steps per epoch of 128, 2 epochs,
    the reference backend, no early stopping, no progress bars."""
    from acf_fast.training import TrainConfig

    base = dict(data_dir=str(root / "prep"), out_dir=str(out), epochs=2, model_dim=16, lr=1e-2,
                patience=0, progress=False, backend="reference", val_rank_samples=32)
    return TrainConfig(**{**base, **overrides})


def resave(src, dst=None, **changes):
    """A copy of checkpoint `src` at `dst` (default: over `src`) with keys changed (None:
    removed) and its checksum redone: how the fault tests make older or damaged files."""
    from acf_fast.model.checkpoint import CHECKSUM_KEY, checksum, read_checkpoint

    ckpt = read_checkpoint(src)
    for key, value in changes.items():
        if value is None:
            ckpt.pop(key, None)
        else:
            ckpt[key] = value
    ckpt[CHECKSUM_KEY] = checksum(ckpt)
    dst = src if dst is None else dst
    torch.save(ckpt, dst)
    return dst


def cli_error(capsys, argv) -> str:
    """Run the CLI, expect exit status 2 and exactly one `acf-fast: error:` line (progress
    bars aside); return it."""
    from acf_fast.pipeline.cli import main as cli_main

    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("acf-fast:")]
    assert len(lines) == 1 and lines[0].startswith("acf-fast: error: "), err[-3000:]
    assert "Traceback" not in err
    return lines[0]


def wait_for_marker(proc, marker, what: str, timeout_s: float = 120) -> None:
    """Wait until a subprocess driver writes `marker` (the point a fault test acts at);
    fail with its stderr if it exits or times out first."""
    import time

    deadline = time.time() + timeout_s
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert marker.exists(), f"{what}:\n{proc.communicate()[1][-3000:]}"

