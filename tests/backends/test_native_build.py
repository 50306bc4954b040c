"""The native extension: its ops' argument checks, stale/missing detection, the CMake build."""

import glob
import os
import subprocess
import sys

import pytest
import torch

from acf_fast.backends import cpu as _ext

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
built = _ext.load(required=False) is not None
needs_ext = pytest.mark.skipif(not built, reason="native extension not built (make build)")


@needs_ext
def test_op_errors_are_clear():
    table, weight, bias = torch.zeros(3, 2, 4), torch.zeros(5, 4), torch.zeros(5)
    with pytest.raises(RuntimeError, match="item id 3 out of range"):
        torch.ops.acf_fast.reduce_items(table, torch.tensor([1, 3]), weight, bias)
    with pytest.raises(RuntimeError, match="slot_item must be a \\[B, P\\] int64 tensor"):
        torch.ops.acf_fast.acf_attention(
            torch.zeros(2, 3, 8), torch.zeros(1, 4), torch.zeros(1, 4), torch.zeros(1, 2, 4),
            torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.int32), torch.zeros(4),
            torch.zeros(1), torch.zeros(4), torch.zeros(1))


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


def test_source_hash_needs_only_the_standard_library():
    """setup.py loads acf_fast/backends/source_hash.py by its path, before torch or acf_fast
    can be imported: without site-packages (-S) it gives the hash the loader checks."""
    path = os.path.join(ROOT, "acf_fast", "backends", "source_hash.py")
    code = ("import importlib.util, sys; "
            "spec = importlib.util.spec_from_file_location('h', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print(m.source_hash(sys.argv[2])); "
            "assert 'torch' not in sys.modules and 'acf_fast' not in sys.modules")
    out = subprocess.run([sys.executable, "-S", "-c", code, path, os.path.join(ROOT, "csrc")],
                         capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == _ext._checkout_source_hash()


def test_cmake_build_loads_and_registers_the_ops():
    libs = glob.glob(os.path.join(ROOT, "build", "cmake", "libacf_fast_ops*.so"))
    if not libs:
        pytest.skip("no CMake build (make cmake-build)")
    # a real op through the library's schema and CPU kernel: R = table[items] W^T + b
    code = ("import torch, sys; torch.ops.load_library(sys.argv[1]); "
            "t = torch.arange(24.0).view(3, 2, 4); w = torch.arange(20.0).view(5, 4) / 7; "
            "b = torch.arange(5.0); i = torch.tensor([2, 0]); "
            "r = torch.ops.acf_fast.reduce_items(t, i, w, b); "
            "torch.testing.assert_close(r, torch.nn.functional.linear(t[i], w, b)); "
            "print(torch.ops.acf_fast.source_hash())")
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

