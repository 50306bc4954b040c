// The acf_fast operator library: the module entry point, build metadata, and the schema
// of every op, all in the one TORCH_LIBRARY block below. Each op's kernels live in their
// own file with that file's TORCH_LIBRARY_IMPL(acf_fast, <dispatch key>, m): a CUDA
// implementation is a .cu file with TORCH_LIBRARY_IMPL(acf_fast, CUDA, m), no schema edit.
//   reduce_items, reduce_items_backward,     acf_cpu_reduce.cpp
//   reduce_gemm_available
//   acf_attention, acf_attention_backward    acf_cpu_attention.cpp
// Fake kernels and autograd are registered from Python (acf_fast/backends/cpu.py).
#include <Python.h>

#include <torch/library.h>

#include <string>

#ifndef ACF_SOURCE_HASH
#define ACF_SOURCE_HASH "unknown"
#endif

// Importing acf_fast._C runs the static TORCH_LIBRARY registrations; the module itself
// exports nothing, so it needs no pybind11.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace acf_fast {

// The hash of csrc/ this build was compiled from (acf_fast/backends/source_hash.py), which
// the loader compares with the checkout's to detect a stale build.
std::string source_hash() { return ACF_SOURCE_HASH; }

bool gemm_available_cpu(int64_t gemm);  // acf_cpu_reduce.cpp; no tensor to dispatch on

}  // namespace acf_fast

TORCH_LIBRARY(acf_fast, m) {
  m.def("source_hash() -> str");
  m.impl("source_hash", &acf_fast::source_hash);

  // R [K, M, D] = table[items] W_red^T + b_red per distinct item; backward -> (dW, db).
  // gemm: the forward's GEMM kind; grad_gemm: the kind its autograd backward uses.
  m.def("reduce_items(Tensor table, Tensor items, Tensor weight, Tensor bias, "
        "int gemm=0, int grad_gemm=0) -> Tensor");
  m.def("reduce_items_backward(Tensor grad, Tensor table, Tensor items, Tensor weight, "
        "int gemm=0) -> (Tensor, Tensor)");
  // whether GEMM kind `gemm` (0 fp32, 1 bf16 oneDNN, 2 MKL bf16) exists in this build
  m.def("reduce_gemm_available(int gemm) -> bool");
  m.impl("reduce_gemm_available", &acf_fast::gemm_available_cpu);

  // both attention levels and the user vector -> (user [B, D], alpha [B, P], beta [B, P, M])
  m.def("acf_attention(Tensor xy, Tensor uc, Tensor ut, Tensor pp, Tensor prof, "
        "Tensor slot_item, Tensor w2, Tensor c2, Tensor w1, Tensor c1) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("acf_attention_backward(Tensor g_user, Tensor g_alpha, Tensor g_beta, Tensor xy, "
        "Tensor uc, Tensor ut, Tensor pp, Tensor prof, Tensor slot_item, Tensor w2, "
        "Tensor w1, Tensor alpha, Tensor beta) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
