// W_red applied once per distinct real item of a batch (SPEC step 1), forward and
// backward. This is where almost all of ACF's FLOPs are, so it is all GEMM: the items'
// [M, F] grids are gathered a chunk at a time into a small buffer (the whole gather,
// up to 460 MB in float32, is never materialised, in either direction) and multiplied
// by MKL/oneDNN through ATen. A 16-bit table stays 16-bit: bfloat16 goes through MKL's
// bf16 x bf16 -> fp32 GEMM, which accumulates and writes in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "acf_cpu.h"

// MKL's mixed-precision GEMM, exported by libtorch_cpu when torch is built with MKL.
// Weak, so a torch without MKL still loads us and takes the float32 fallback.
extern "C" void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k,
                                       float alpha, const uint16_t* a, int lda,
                                       const uint16_t* b, int ldb, float beta, float* c,
                                       int ldc) __attribute__((weak));

namespace acf_fast {
namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// Items per gather chunk: 32 x 49 x 2048 is 6 MB in bf16, big enough for GEMM
// efficiency and small enough to stay in the last-level cache between gather and GEMM.
int64_t chunk_items() {
  static const int64_t n = [] {
    const char* env = std::getenv("ACF_FAST_REDUCE_CHUNK");
    const int64_t v = env ? std::atoll(env) : 0;
    return v > 0 ? v : int64_t(32);
  }();
  return n;
}

void check_inputs(const at::Tensor& table, const at::Tensor& items, const at::Tensor& weight) {
  TORCH_CHECK(table.dim() == 3, "reduce_items: table must be [N+1, M, F], got ", table.sizes());
  TORCH_CHECK(table.is_contiguous(), "reduce_items: table must be contiguous");
  TORCH_CHECK(items.dim() == 1 && items.scalar_type() == at::kLong,
              "reduce_items: items must be a 1-d int64 tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == table.size(2), "reduce_items: weight ",
              weight.sizes(), " does not match F = ", table.size(2));
  const auto wt = weight.scalar_type();
  TORCH_CHECK(wt == at::kFloat || wt == at::kDouble,
              "reduce_items: compute dtype must be float32 or float64, got ", wt);
  const auto tt = table.scalar_type();
  TORCH_CHECK(tt == at::kFloat || tt == at::kDouble || tt == at::kBFloat16 || tt == at::kHalf,
              "reduce_items: feature table dtype ", tt, " is not supported");
}

// table[items[first : first + n]] -> buf[:n] ([n, M, F], the table's dtype).
at::Tensor gather_rows(const at::Tensor& table, const int64_t* ids, int64_t n, at::Tensor& buf) {
  const int64_t row_bytes = table.stride(0) * table.element_size();
  const int64_t rows = table.size(0);
  const char* src = static_cast<const char*>(table.const_data_ptr());
  char* dst = static_cast<char*>(buf.data_ptr());
  for (int64_t j = 0; j < n; ++j)
    TORCH_CHECK(ids[j] >= 0 && ids[j] < rows, "reduce_items: item id ", ids[j], " out of range");
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) std::memcpy(dst + j * row_bytes, src + ids[j] * row_bytes, row_bytes);
  });
  return buf.narrow(0, 0, n);
}

bool use_mkl_bf16(const at::Tensor& table, const at::Tensor& weight) {
  return table.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kFloat &&
         cblas_gemm_bf16bf16f32 != nullptr;
}

}  // namespace

at::Tensor reduce_items_cpu(const at::Tensor& table, const at::Tensor& items,
                            const at::Tensor& weight, const at::Tensor& bias) {
  check_inputs(table, items, weight);
  const int64_t K = items.size(0), M = table.size(1), F = table.size(2), D = weight.size(0);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == D, "reduce_items: bias must be [", D, "]");
  auto out = at::empty({K, M, D}, weight.options());
  if (K == 0) return out;
  const auto ids_t = items.contiguous();
  const int64_t* ids = ids_t.const_data_ptr<int64_t>();
  const bool mkl = use_mkl_bf16(table, weight);
  const auto w = mkl ? weight.to(at::kBFloat16).contiguous() : weight.contiguous();
  const int64_t chunk = std::min(chunk_items(), K);
  auto buf = at::empty({chunk, M, F}, table.options());
  for (int64_t start = 0; start < K; start += chunk) {
    const int64_t n = std::min(chunk, K - start);
    auto x = gather_rows(table, ids + start, n, buf).view({n * M, F});
    auto r = out.narrow(0, start, n).view({n * M, D});
    if (mkl) {
      cblas_gemm_bf16bf16f32(kRowMajor, kNoTrans, kTrans, int(n * M), int(D), int(F), 1.0f,
                             reinterpret_cast<const uint16_t*>(x.const_data_ptr()), int(F),
                             reinterpret_cast<const uint16_t*>(w.const_data_ptr()), int(F), 0.0f,
                             r.data_ptr<float>(), int(D));
    } else {
      at::mm_out(r, x.scalar_type() == w.scalar_type() ? x : x.to(w.scalar_type()), w.t());
    }
  }
  out.add_(bias.to(out.scalar_type()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> reduce_items_backward_cpu(const at::Tensor& grad,
                                                             const at::Tensor& table,
                                                             const at::Tensor& items,
                                                             const at::Tensor& weight) {
  check_inputs(table, items, weight);
  const int64_t K = items.size(0), M = table.size(1), F = table.size(2), D = weight.size(0);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({K, M, D}), "reduce_items_backward: grad ",
              grad.sizes(), " expected [", K, ", ", M, ", ", D, "]");
  auto g = grad.to(weight.scalar_type()).contiguous().view({K * M, D});
  auto dw = at::zeros({D, F}, weight.options());
  auto db = at::zeros({D}, weight.options());
  if (K == 0) return {dw, db};

  // db = column sums of g, summed row by row in a fixed order so every thread count
  // gives the same bits.
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "reduce_items_db", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* out = db.data_ptr<scalar_t>();
    const int64_t rows = K * M;
    at::parallel_for(0, D, 16, [&](int64_t b, int64_t e) {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t d = b; d < e; ++d) out[d] += gp[r * D + d];
    });
  });

  const auto ids_t = items.contiguous();
  const int64_t* ids = ids_t.const_data_ptr<int64_t>();
  const bool mkl = use_mkl_bf16(table, weight);
  // bf16 x bf16 -> fp32: dL/dR is rounded to bf16 like the features; accumulation and
  // dW stay float32.
  const auto g16 = mkl ? g.to(at::kBFloat16) : at::Tensor();
  const int64_t chunk = std::min(chunk_items(), K);
  auto buf = at::empty({chunk, M, F}, table.options());
  for (int64_t start = 0; start < K; start += chunk) {
    const int64_t n = std::min(chunk, K - start);
    auto x = gather_rows(table, ids + start, n, buf).view({n * M, F});
    if (mkl) {
      auto gs = g16.narrow(0, start * M, n * M);
      cblas_gemm_bf16bf16f32(kRowMajor, kTrans, kNoTrans, int(D), int(F), int(n * M), 1.0f,
                             reinterpret_cast<const uint16_t*>(gs.const_data_ptr()), int(D),
                             reinterpret_cast<const uint16_t*>(x.const_data_ptr()), int(F),
                             1.0f, dw.data_ptr<float>(), int(F));
    } else {
      auto gs = g.narrow(0, start * M, n * M);
      dw.addmm_(gs.t(), x.scalar_type() == g.scalar_type() ? x : x.to(g.scalar_type()));
    }
  }
  return {dw, db};
}

}  // namespace acf_fast

TORCH_LIBRARY_FRAGMENT(acf_fast, m) {
  m.def("reduce_items(Tensor table, Tensor items, Tensor weight, Tensor bias) -> Tensor");
  m.def("reduce_items_backward(Tensor grad, Tensor table, Tensor items, Tensor weight) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(acf_fast, CPU, m) {
  m.impl("reduce_items", &acf_fast::reduce_items_cpu);
  m.impl("reduce_items_backward", &acf_fast::reduce_items_backward_cpu);
}
