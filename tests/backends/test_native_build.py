"""The native extension: its small op against the reference, stale/missing detection, CMake build."""

import glob
import os
import subprocess
import sys

import pytest
import torch

from acf_fast.backends import cpu_extension as _ext

from acf_fast.model import reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
built = _ext.load(required=False) is not None
needs_ext = pytest.mark.skipif(not built, reason="native extension not built (make build)")


@needs_ext
@pytest.mark.parametrize("shape", [(4, 5), (3, 2, 49), (1, 1)])
def test_masked_softmax_matches_reference(shape):
    from acf_fast.backends.ops import masked_softmax

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 50).requires_grad_()
    mask = torch.rand(shape, generator=g) > 0.3
    mask.view(-1, shape[-1])[0] = False  # an empty row
    torch.testing.assert_close(masked_softmax(x, mask), reference.masked_softmax(x, mask, -1))
    assert torch.autograd.gradcheck(lambda t: masked_softmax(t, mask), (x,))
    torch.library.opcheck(torch.ops.acf_fast.masked_softmax.default, (x, mask))


@needs_ext
def test_op_errors_are_clear():
    with pytest.raises(RuntimeError, match="must have the same shape"):
        torch.ops.acf_fast.masked_softmax(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))


def test_stale_or_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_ext, "_checkout_source_hash", lambda: "0000000000000000")
    monkeypatch.delenv("ACF_FAST_ALLOW_STALE", raising=False)  # the escape hatch: below
    _ext._load.cache_clear()
    try:
        assert _ext.load(required=False) is None
        with pytest.raises(_ext.ExtensionError, match="make build"):
            _ext.load()
        if built:  # ACF_FAST_ALLOW_STALE=1 loads a stale build anyway
            monkeypatch.setenv("ACF_FAST_ALLOW_STALE", "1")
            _ext._load.cache_clear()
            assert _ext.load(required=False) is not None
    finally:
        monkeypatch.undo()
        _ext._load.cache_clear()


def test_cmake_build_loads_and_registers_the_ops():
    libs = glob.glob(os.path.join(ROOT, "build", "cmake", "libacf_fast_ops*.so"))
    if not libs:
        pytest.skip("no CMake build (make cmake-build)")
    code = ("import torch, sys; torch.ops.load_library(sys.argv[1]); "
            "x = torch.ops.acf_fast.masked_softmax(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)); "
            "assert torch.allclose(x, torch.full((2, 3), 1 / 3)); print(torch.ops.acf_fast.source_hash())")
    out = subprocess.run([sys.executable, "-c", code, libs[0]], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "cmake"


@needs_ext
def test_release_build_carries_no_debug_info():
    """The wheel ships the extension as built: -g0 and a stripping link keep it ~0.2 MB
    (Python's CFLAGS carry -g, which made it 6.6 MB of DWARF)."""
    from acf_fast import _C

    with open(_C.__file__, "rb") as fh:
        image = fh.read()
    assert b".debug_info" not in image, f"{_C.__file__} carries debug info ({len(image)} bytes)"
    assert _C.__file__.endswith(".abi3.so")

