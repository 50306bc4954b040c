// W_red applied once per distinct real item of a batch (docs/model.md#feature-reduction, eq. (1)), forward and
// backward. This is where almost all of ACF's FLOPs are, so it is all GEMM, by MKL.
// Forward: the items' [M, F] grids are gathered a chunk at a time into a small
// per-thread buffer (the whole gather, up to 460 MB in float32, is never materialised)
// and multiplied; one item's 49 rows alone are too few rows for an efficient GEMM.
// Backward: W_red's gradient is accumulated item by item straight from the table, with
// no gather (there the long side of the GEMM is the output, which stays in cache).
// A 16-bit table is read as 16-bit (half the memory traffic) and widened to the compute
// dtype in cache, before an fp32 GEMM: on this project's AVX512-BF16 Xeon (no AMX) MKL's
// bf16 x bf16 -> fp32 GEMM is slower than its fp32 one (182 against 225 GFLOP/s on two
// cores), so widening is both faster and exact. With bf16_gemm=True a bfloat16 table
// goes through that bf16 GEMM instead (fp32 accumulation and output; W_red and dL/dR
// rounded to bf16), for CPUs where it is the faster unit (AMX).
//
// Threads work on whole chunks (items, in the backward), each with a single-threaded
// GEMM, inside one parallel region per op: on a busy 2-core machine every fork/join of
// a threaded GEMM can cost a scheduler quantum. It also makes the results independent
// of the thread count: chunk boundaries are fixed, each output row comes from one
// sequential GEMM, and W_red's gradient is summed from a fixed number of partial sums
// in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "acf_cpu.h"

// MKL's mixed-precision GEMM, exported by libtorch_cpu when torch is built with MKL.
// Weak, so a torch without MKL still loads us and takes the float32 fallback.
extern "C" void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k,
                                       float alpha, const uint16_t* a, int lda,
                                       const uint16_t* b, int ldb, float beta, float* c,
                                       int ldc) __attribute__((weak));
// Per-thread MKL thread count (returns the previous one; 0 = back to the global setting).
// MKL's C entry point; the lower-case symbol is the Fortran one, taking a pointer.
extern "C" int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));

namespace acf_fast {
namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// Items per gather chunk: 32 x 49 x 2048 is 12.8 MB in fp32 (the widened buffer), big
// enough for GEMM efficiency and small enough to stay in the last-level cache between
// gather and GEMM; 8 to 64 measured the same within noise at the benchmark shape.
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

// One thread's view of a chunk of the gather: table[ids[0:n]] as an [n * M, F] matrix
// in the GEMM's input dtype, built in buffers reused from chunk to chunk.
class ChunkLoader {
 public:
  ChunkLoader(const at::Tensor& table, int64_t chunk, at::ScalarType gemm_dtype)
      : table_(table), M_(table.size(1)), F_(table.size(2)),
        buf_(at::empty({chunk, M_, F_}, table.options())) {
    if (gemm_dtype != table.scalar_type())
      wide_ = at::empty({chunk * M_, F_}, table.options().dtype(gemm_dtype));
  }

  at::Tensor load(const int64_t* ids, int64_t n) {
    if (wide_.defined() && table_.scalar_type() == at::kBFloat16 &&
        wide_.scalar_type() == at::kFloat)
      return load_bf16_widened(ids, n);
    const int64_t row_bytes = M_ * F_ * table_.element_size();
    const char* src = static_cast<const char*>(table_.const_data_ptr());
    char* dst = static_cast<char*>(buf_.data_ptr());
    for (int64_t j = 0; j < n; ++j) std::memcpy(dst + j * row_bytes, src + ids[j] * row_bytes, row_bytes);
    auto x = buf_.narrow(0, 0, n).view({n * M_, F_});
    return wide_.defined() ? wide_.narrow(0, 0, n * M_).copy_(x) : x;
  }

 private:
  // bf16 -> fp32 is a 16-bit shift: done while gathering, one pass instead of two.
  at::Tensor load_bf16_widened(const int64_t* ids, int64_t n) {
    const int64_t row = M_ * F_;
    const auto* src = static_cast<const uint16_t*>(table_.const_data_ptr());
    auto* dst = static_cast<uint32_t*>(wide_.data_ptr());
    for (int64_t j = 0; j < n; ++j) {
      const uint16_t* __restrict s = src + ids[j] * row;
      uint32_t* __restrict d = dst + j * row;
      for (int64_t e = 0; e < row; ++e) d[e] = uint32_t(s[e]) << 16;
    }
    return wide_.narrow(0, 0, n * M_);
  }

  const at::Tensor& table_;
  int64_t M_, F_;
  at::Tensor buf_, wide_;
};

void check_ids(const int64_t* ids, int64_t n, int64_t rows) {
  for (int64_t j = 0; j < n; ++j)
    TORCH_CHECK(ids[j] >= 0 && ids[j] < rows, "reduce_items: item id ", ids[j], " out of range");
}

// At most this many partial sums of W_red's gradient (1 MB each at the benchmark shape);
// fixed, not the thread count, so the sum's order never depends on it.
constexpr int64_t kMaxPartials = 16;

// Inside our parallel region each GEMM must run on its own thread only: MKL would
// otherwise start nested threads, oversubscribing the cores and splitting reductions
// differently with the thread count.
struct SequentialBlas {
  int previous = 0;
  SequentialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous);
  }
};

bool use_mkl_bf16(const at::Tensor& table, const at::Tensor& weight, bool bf16_gemm) {
  return bf16_gemm && table.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kFloat &&
         cblas_gemm_bf16bf16f32 != nullptr;
}

}  // namespace

at::Tensor reduce_items_cpu(const at::Tensor& table, const at::Tensor& items,
                            const at::Tensor& weight, const at::Tensor& bias, bool bf16_gemm) {
  check_inputs(table, items, weight);
  const int64_t K = items.size(0), M = table.size(1), F = table.size(2), D = weight.size(0);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == D, "reduce_items: bias must be [", D, "]");
  auto out = at::empty({K, M, D}, weight.options());
  if (K == 0) return out;
  const auto ids_t = items.contiguous();
  const int64_t* ids = ids_t.const_data_ptr<int64_t>();
  check_ids(ids, K, table.size(0));
  const bool mkl = use_mkl_bf16(table, weight, bf16_gemm);
  const bool widen = !mkl && table.scalar_type() != weight.scalar_type();
  // detached: worker threads do not inherit this thread's below-autograd dispatch state
  const auto w = (mkl ? weight.to(at::kBFloat16) : weight).detach().contiguous();
  const auto b = bias.to(weight.scalar_type()).detach();
  const int64_t chunk = std::min(chunk_items(), K);
  const int64_t chunks = (K + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(chunks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    SequentialBlas sequential;
    ChunkLoader loader(table, chunk, widen ? weight.scalar_type() : table.scalar_type());
    // chunks handed out one at a time (see parallel_tasks in acf_cpu.h)
    for (int64_t c = next++; c < chunks; c = next++) {
      const int64_t start = c * chunk, n = std::min(chunk, K - start);
      auto x = loader.load(ids + start, n);
      auto r = out.narrow(0, start, n).view({n * M, D});
      if (mkl) {
        cblas_gemm_bf16bf16f32(kRowMajor, kNoTrans, kTrans, int(n * M), int(D), int(F), 1.0f,
                               reinterpret_cast<const uint16_t*>(x.const_data_ptr()), int(F),
                               reinterpret_cast<const uint16_t*>(w.const_data_ptr()), int(F),
                               0.0f, r.data_ptr<float>(), int(D));
      } else {
        at::mm_out(r, x, w.t());
      }
      r.add_(b);  // while the chunk's output is still in cache
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> reduce_items_backward_cpu(const at::Tensor& grad,
                                                             const at::Tensor& table,
                                                             const at::Tensor& items,
                                                             const at::Tensor& weight,
                                                             bool bf16_gemm) {
  check_inputs(table, items, weight);
  const int64_t K = items.size(0), M = table.size(1), F = table.size(2), D = weight.size(0);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({K, M, D}), "reduce_items_backward: grad ",
              grad.sizes(), " expected [", K, ", ", M, ", ", D, "]");
  // detached: worker threads do not inherit this thread's below-autograd dispatch state
  auto g = grad.to(weight.scalar_type()).detach().contiguous().view({K * M, D});
  auto dw = at::zeros({D, F}, weight.options());
  auto db = at::zeros({D}, weight.options());
  if (K == 0) return {dw, db};

  const auto ids_t = items.contiguous();
  const int64_t* ids = ids_t.const_data_ptr<int64_t>();
  check_ids(ids, K, table.size(0));
  const bool mkl = use_mkl_bf16(table, weight, bf16_gemm);
  const bool widen = !mkl && table.scalar_type() != weight.scalar_type();
  // bf16 x bf16 -> fp32: dL/dR is rounded to bf16 like the features; accumulation and
  // dW stay float32.
  const auto g16 = mkl ? g.to(at::kBFloat16) : at::Tensor();
  // Item by item, straight from the table: dW += g_k^T [D, M] x table[items[k]] [M, F].
  // Unlike the forward (M = 49 rows is too few for a good GEMM there), this GEMM's long
  // side is the 2048-wide output, which stays in cache across items; it ran at 174
  // GFLOP/s per core against 131 for 32-item chunks, and needs no gather: the rows are
  // read once, in place (a 16-bit table is widened one item at a time, in L2).
  // Task t sums items [t * per, (t + 1) * per) into partial t.
  const int64_t per = (K + kMaxPartials - 1) / kMaxPartials;
  const int64_t tasks = (K + per - 1) / per;
  auto partial = at::empty({tasks, D, F}, weight.options());
  const char* base = static_cast<const char*>(table.const_data_ptr());
  const int64_t row_bytes = M * F * table.element_size();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(tasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    SequentialBlas sequential;
    ChunkLoader loader(table, 1, widen ? weight.scalar_type() : table.scalar_type());
    // tasks handed out one at a time (see parallel_tasks in acf_cpu.h)
    for (int64_t t = next++; t < tasks; t = next++) {
      auto part = partial[t];
      for (int64_t k = t * per; k < std::min(K, (t + 1) * per); ++k) {
        const bool first = k == t * per;
        if (mkl) {
          const auto* x = reinterpret_cast<const uint16_t*>(base + ids[k] * row_bytes);
          const auto* gs = reinterpret_cast<const uint16_t*>(g16.const_data_ptr()) + k * M * D;
          cblas_gemm_bf16bf16f32(kRowMajor, kTrans, kNoTrans, int(D), int(F), int(M), 1.0f, gs,
                                 int(D), x, int(F), first ? 0.0f : 1.0f, part.data_ptr<float>(),
                                 int(F));
          continue;
        }
        auto x = widen ? loader.load(ids + k, 1) : table[ids[k]];
        auto gs = g.narrow(0, k * M, M).t();
        if (first) at::mm_out(part, gs, x);
        else part.addmm_(gs, x);
      }
    }
  });

  // dW = partials summed in task order; db = column sums of g in row order. Both split
  // over columns only, so every thread count gives the same bits.
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "reduce_items_sums", [&] {
    const scalar_t* pp = partial.const_data_ptr<scalar_t>();
    scalar_t* dwp = dw.data_ptr<scalar_t>();
    at::parallel_for(0, D, 1, [&](int64_t d0, int64_t d1) {
      for (int64_t t = 0; t < tasks; ++t)
        for (int64_t d = d0; d < d1; ++d) {
          const scalar_t* src = pp + (t * D + d) * F;
          scalar_t* dst = dwp + d * F;
          for (int64_t f = 0; f < F; ++f) dst[f] += src[f];
        }
    });
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* out = db.data_ptr<scalar_t>();
    const int64_t rows = K * M;
    at::parallel_for(0, D, 16, [&](int64_t b, int64_t e) {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t d = b; d < e; ++d) out[d] += gp[r * D + d];
    });
  });
  return {dw, db};
}

}  // namespace acf_fast

// The schemas are in acf_library.cpp.
TORCH_LIBRARY_IMPL(acf_fast, CPU, m) {
  m.impl("reduce_items", &acf_fast::reduce_items_cpu);
  m.impl("reduce_items_backward", &acf_fast::reduce_items_backward_cpu);
}
