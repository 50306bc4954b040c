// The acf_fast operator library: the module entry point, build metadata, and the
// masked softmax used by both attention levels. Fused ops live in their own files
// and add themselves with TORCH_LIBRARY_FRAGMENT(acf_fast, m).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>

#ifndef ACF_SOURCE_HASH
#define ACF_SOURCE_HASH "unknown"
#endif

// Importing acf_fast._C runs the static TORCH_LIBRARY registrations below; the
// module itself exports nothing, so it needs no pybind11.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace acf_fast {

std::string source_hash() { return ACF_SOURCE_HASH; }

bool with_cuda() {
#ifdef ACF_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Softmax over the last dim restricted to mask; a row with no valid entry is all zeros
// (an empty profile must give alpha = 0, not NaN).
at::Tensor masked_softmax_cpu(const at::Tensor& logits, const at::Tensor& mask) {
  TORCH_CHECK(logits.sizes() == mask.sizes(), "masked_softmax: logits ", logits.sizes(),
              " and mask ", mask.sizes(), " must have the same shape");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "masked_softmax: mask must be bool, got ",
              mask.scalar_type());
  TORCH_CHECK(logits.dim() >= 1, "masked_softmax: logits must have at least one dimension");
  auto x = logits.contiguous();
  auto m = mask.contiguous();
  auto out = at::empty_like(x);
  const int64_t n = x.size(-1);
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "masked_softmax_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const bool* mp = m.data_ptr<bool>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + r * n;
        const bool* mr = mp + r * n;
        scalar_t* orow = op + r * n;
        scalar_t mx = -std::numeric_limits<scalar_t>::infinity();
        for (int64_t i = 0; i < n; ++i)
          if (mr[i] && xr[i] > mx) mx = xr[i];
        scalar_t sum = 0;
        for (int64_t i = 0; i < n; ++i) {
          orow[i] = mr[i] ? std::exp(xr[i] - mx) : scalar_t(0);
          sum += orow[i];
        }
        const scalar_t inv = sum > 0 ? scalar_t(1) / sum : scalar_t(0);
        for (int64_t i = 0; i < n; ++i) orow[i] *= inv;
      }
    });
  });
  return out;
}

// d logits = out * (grad - sum(grad * out)); masked entries have out = 0 and get 0.
at::Tensor masked_softmax_backward_cpu(const at::Tensor& grad, const at::Tensor& out) {
  auto inner = (grad * out).sum(-1, /*keepdim=*/true);
  return out * (grad - inner);
}

}  // namespace acf_fast

TORCH_LIBRARY(acf_fast, m) {
  m.def("source_hash() -> str");
  m.def("with_cuda() -> bool");
  m.def("masked_softmax(Tensor logits, Tensor mask) -> Tensor");
  m.def("masked_softmax_backward(Tensor grad, Tensor out) -> Tensor");
  m.impl("source_hash", &acf_fast::source_hash);
  m.impl("with_cuda", &acf_fast::with_cuda);
}

TORCH_LIBRARY_IMPL(acf_fast, CPU, m) {
  m.impl("masked_softmax", &acf_fast::masked_softmax_cpu);
  m.impl("masked_softmax_backward", &acf_fast::masked_softmax_backward_cpu);
}
