"""Builds acf_fast and its native extension acf_fast._C from csrc/.

CPU-only (CppExtension) where there is no CUDA toolkit, CUDAExtension with the .cu
sources where there is. Knobs:
  FORCE_CUDA=1            build the CUDA sources even without a visible GPU
  ACF_FAST_SKIP_EXT=1     pure-Python install (the cpu backend is then unavailable)
  TORCH_CUDA_ARCH_LIST    as usual for torch extensions (default here: 8.0;9.0)
  DEBUG=1                 -O0 -g (release builds carry no debug info: -g0, stripped at link)
  MAX_JOBS                parallel compile jobs (default: number of cores)
"""

import importlib.util
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The extension uses only the stable C API (PyModule_Create; the ops go through the torch
# dispatcher), so one abi3 build serves every CPython from this version on; the wheel's
# tag says the same (bdist_wheel py_limited_api below).
LIMITED_API = (3, 10)


def _source_hash_module():
    """acf_fast/backends/source_hash.py, loaded by path: the loader's own recipe for the
    hash it checks, without importing acf_fast (or torch) here."""
    path = os.path.join(ROOT, "acf_fast", "backends", "source_hash.py")
    spec = importlib.util.spec_from_file_location("_acf_fast_source_hash", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ext_modules():
    if os.environ.get("ACF_FAST_SKIP_EXT") == "1":
        return [], {}
    from torch.utils import cpp_extension as ce

    hashing = _source_hash_module()
    cpp, cu, _headers = hashing.native_sources("csrc")
    if not cpp:
        return [], {}
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    debug = os.environ.get("DEBUG") == "1"
    # compiled in, so that a stale build is detected at load time (acf_fast.backends.cpu)
    digest = hashing.source_hash("csrc")
    # Python's own CFLAGS often carry -g: without -g0 and a stripping link the extension is
    # 6.6 MB of debug info around 0.2 MB of code.
    cxx = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    link = ["-fopenmp"] if debug else ["-fopenmp", "-Wl,--strip-debug"]
    api = "0x{:02x}{:02x}0000".format(*LIMITED_API)
    cxx += ["-fopenmp", f"-DACF_SOURCE_HASH=\"{digest}\"", f"-DPy_LIMITED_API={api}"]
    use_cuda = bool(cu) and (os.environ.get("FORCE_CUDA") == "1" or
                             (ce.CUDA_HOME is not None and _torch_has_cuda()))
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = ce.CUDAExtension(
            "acf_fast._C", cpp + cu,
            extra_compile_args={"cxx": cxx + ["-DACF_WITH_CUDA"],
                                "nvcc": ["-O3", "-DACF_WITH_CUDA", f"-DACF_SOURCE_HASH=\"{digest}\""]},
            extra_link_args=link, py_limited_api=True)
    else:
        ext = ce.CppExtension("acf_fast._C", cpp, extra_compile_args={"cxx": cxx},
                              extra_link_args=link, py_limited_api=True)
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


def _torch_has_cuda():
    import torch
    return torch.version.cuda is not None


modules, cmdclass = ext_modules()

setup(
    name="acf_fast",
    version="0.1.0",
    description="Attentive Collaborative Filtering (VisRec tutorial) with fused Triton/C++ kernels",
    packages=find_packages(include=["acf_fast", "acf_fast.*"]) + ["acf_fast.kernels"],
    package_dir={"acf_fast.kernels": "kernels"},
    python_requires=">=%d.%d" % LIMITED_API,
    # matplotlib and Pillow: the README's commands (demo, synth, evaluate, explain) draw
    # figures and item images, so a plain `pip install` must be able to run them.
    install_requires=["torch>=2.4", "numpy", "h5py", "tqdm", "matplotlib", "pillow"],
    extras_require={
        "triton": ["triton"],
        "extract": ["torchvision"],
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
    },
    entry_points={"console_scripts": ["acf-fast=acf_fast.pipeline.cli:main"]},
    ext_modules=modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp%d%d" % LIMITED_API}} if modules else {},
)
