// W_red applied once per distinct real item of a batch (docs/model.md#feature-reduction, eq. (1)), forward and
// backward. This is where almost all of ACF's FLOPs are, so it is all GEMM.
// Forward: the items' [M, F] grids are gathered a chunk at a time into a small
// per-thread buffer (the whole gather, up to 460 MB in float32, is never materialised)
// and multiplied; one item's 49 rows alone are too few rows for an efficient GEMM.
// Backward (fp32 GEMM): W_red's gradient is accumulated item by item straight from the
// table, with no gather (there the long side of the GEMM is the output, which stays in
// cache); with a bf16 GEMM it is accumulated chunk by chunk, since a bf16 GEMM over
// one item's 49 rows runs at a fraction of its speed over a chunk's 1,568.
//
// Which unit multiplies is the caller's choice (`gemm`, see GemmKind), made by measuring
// on the machine (acf_fast/backends/gemm_choice.py): the fastest unit differs between
// CPUs. On an AVX512-BF16 Xeon without AMX, MKL's bf16 GEMM was slower than its fp32 one
// (182 against 225 GFLOP/s on two cores); on an AVX512-BF16 AMD Zen 5, oneDNN's bf16
// GEMM (torch's bf16 matmul) is 4-5x its fp32 one.
//   kFp32:    a 16-bit table is read as 16-bit (half the memory traffic) and widened to
//             the compute dtype in cache, then an fp32 (or fp64) GEMM: exact.
//   kBf16:    rows (and W_red, dL/dR) rounded to bf16, oneDNN bf16 GEMM with fp32
//             accumulation. Its output is bf16 (torch's bf16 matmul has no fp32-output
//             form on the CPU), widened at once: R and each chunk's share of dW carry one
//             more bf16 rounding (relative 2^-9), summed in fp32.
//   kMklBf16: MKL's cblas_gemm_bf16bf16f32, fp32 accumulation and output (bf16 table only).
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

// bf16 -> fp32 is a 16-bit shift: done while gathering, one pass instead of two.
ACF_VECTOR_CLONES
void widen_bf16(const uint16_t* __restrict s, uint32_t* __restrict d, int64_t n) {
  for (int64_t e = 0; e < n; ++e) d[e] = uint32_t(s[e]) << 16;
}

// fp32 -> bf16 while gathering (the bf16 GEMM of an fp32 table, precision "medium"):
// round to nearest even, as torch's own conversion; NaN stays NaN.
ACF_VECTOR_CLONES
void round_to_bf16(const uint32_t* __restrict s, uint16_t* __restrict d, int64_t n) {
  for (int64_t e = 0; e < n; ++e) {
    const uint32_t b = s[e];
    const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    d[e] = uint16_t((b & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
  }
}

// One thread's view of a chunk of the gather: table[ids[0:n]] as an [n * M, F] matrix
// in the GEMM's input dtype, built in buffers reused from chunk to chunk.
class ChunkLoader {
 public:
  ChunkLoader(const at::Tensor& table, int64_t chunk, at::ScalarType gemm_dtype)
      : table_(table), M_(table.size(1)), F_(table.size(2)) {
    const auto tt = table.scalar_type();
    one_pass_ = (tt == at::kBFloat16 && gemm_dtype == at::kFloat) ||
                (tt == at::kFloat && gemm_dtype == at::kBFloat16);
    if (gemm_dtype != tt) wide_ = at::empty({chunk * M_, F_}, table.options().dtype(gemm_dtype));
    if (!one_pass_) buf_ = at::empty({chunk, M_, F_}, table.options());
  }

  at::Tensor load(const int64_t* ids, int64_t n) {
    if (one_pass_) {
      if (table_.scalar_type() == at::kBFloat16) return load_bf16_widened(ids, n);
      return load_f32_rounded(ids, n);
    }
    const int64_t row_bytes = M_ * F_ * table_.element_size();
    const char* src = static_cast<const char*>(table_.const_data_ptr());
    char* dst = static_cast<char*>(buf_.data_ptr());
    for (int64_t j = 0; j < n; ++j) std::memcpy(dst + j * row_bytes, src + ids[j] * row_bytes, row_bytes);
    auto x = buf_.narrow(0, 0, n).view({n * M_, F_});
    return wide_.defined() ? wide_.narrow(0, 0, n * M_).copy_(x) : x;
  }

 private:
  at::Tensor load_bf16_widened(const int64_t* ids, int64_t n) {
    const int64_t row = M_ * F_;
    const auto* src = static_cast<const uint16_t*>(table_.const_data_ptr());
    auto* dst = static_cast<uint32_t*>(wide_.data_ptr());
    for (int64_t j = 0; j < n; ++j) widen_bf16(src + ids[j] * row, dst + j * row, row);
    return wide_.narrow(0, 0, n * M_);
  }

  at::Tensor load_f32_rounded(const int64_t* ids, int64_t n) {
    const int64_t row = M_ * F_;
    const auto* src = static_cast<const uint32_t*>(table_.const_data_ptr());
    auto* dst = static_cast<uint16_t*>(wide_.data_ptr());
    for (int64_t j = 0; j < n; ++j) round_to_bf16(src + ids[j] * row, dst + j * row, row);
    return wide_.narrow(0, 0, n * M_);
  }

  const at::Tensor& table_;
  int64_t M_, F_;
  bool one_pass_ = false;
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

// The GEMM kinds of the ops' `gemm` argument (acf_fast/backends/gemm_choice.py names them).
enum GemmKind : int64_t { kFp32 = 0, kBf16 = 1, kMklBf16 = 2 };

// The kind actually run: a 16-bit kind applies only to float32 weights, MKL's only to a
// bf16 table (and where MKL is linked), oneDNN's to a bf16 or float32 table; anything
// else runs the exact fp32 path. Which kind a caller may ask for (precision) is the
// caller's policy, not this file's.
GemmKind resolve(const at::Tensor& table, const at::Tensor& weight, int64_t gemm) {
  TORCH_CHECK(gemm >= kFp32 && gemm <= kMklBf16,
              "reduce_items: gemm must be 0 (fp32), 1 (bf16) or 2 (mkl-bf16), got ", gemm);
  const auto tt = table.scalar_type();
  if (weight.scalar_type() != at::kFloat) return kFp32;
  if (gemm == kMklBf16 && tt == at::kBFloat16 && cblas_gemm_bf16bf16f32 != nullptr) return kMklBf16;
  if (gemm == kBf16 && (tt == at::kBFloat16 || tt == at::kFloat)) return kBf16;
  return kFp32;
}

}  // namespace

bool gemm_available_cpu(int64_t gemm) {
  if (gemm == kMklBf16) return cblas_gemm_bf16bf16f32 != nullptr;
  return gemm == kFp32 || gemm == kBf16;
}

at::Tensor reduce_items_cpu(const at::Tensor& table, const at::Tensor& items,
                            const at::Tensor& weight, const at::Tensor& bias, int64_t gemm,
                            int64_t /*grad_gemm: read by the autograd backward*/) {
  check_inputs(table, items, weight);
  const int64_t K = items.size(0), M = table.size(1), F = table.size(2), D = weight.size(0);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == D, "reduce_items: bias must be [", D, "]");
  const GemmKind kind = resolve(table, weight, gemm);
  auto out = at::empty({K, M, D}, weight.options());
  if (K == 0) return out;
  const auto ids_t = items.contiguous();
  const int64_t* ids = ids_t.const_data_ptr<int64_t>();
  check_ids(ids, K, table.size(0));
  const auto gemm_dtype = kind == kFp32 ? weight.scalar_type() : at::kBFloat16;
  // detached: worker threads do not inherit this thread's below-autograd dispatch state
  const auto w = weight.to(gemm_dtype).detach().contiguous();
  const auto b = bias.to(weight.scalar_type()).detach();
  const int64_t chunk = std::min(chunk_items(), K);
  const int64_t chunks = (K + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(chunks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    SequentialBlas sequential;
    ChunkLoader loader(table, chunk, gemm_dtype);
    // oneDNN's bf16 GEMM writes bf16: a chunk-sized staging buffer, widened with the bias
    auto staged = kind == kBf16 ? at::empty({chunk * M, D}, w.options()) : at::Tensor();
    // chunks handed out one at a time (see parallel_tasks in acf_cpu.h)
    for (int64_t c = next++; c < chunks; c = next++) {
      const int64_t start = c * chunk, n = std::min(chunk, K - start);
      auto x = loader.load(ids + start, n);
      auto r = out.narrow(0, start, n).view({n * M, D});
      if (kind == kMklBf16) {
        cblas_gemm_bf16bf16f32(kRowMajor, kNoTrans, kTrans, int(n * M), int(D), int(F), 1.0f,
                               reinterpret_cast<const uint16_t*>(x.const_data_ptr()), int(F),
                               reinterpret_cast<const uint16_t*>(w.const_data_ptr()), int(F),
                               0.0f, r.data_ptr<float>(), int(D));
      } else if (kind == kBf16) {
        auto s16 = staged.narrow(0, 0, n * M);
        at::mm_out(s16, x, w.t());
        at::add_out(r, s16, b);
        continue;
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
                                                             int64_t gemm) {
  check_inputs(table, items, weight);
  const int64_t K = items.size(0), M = table.size(1), F = table.size(2), D = weight.size(0);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({K, M, D}), "reduce_items_backward: grad ",
              grad.sizes(), " expected [", K, ", ", M, ", ", D, "]");
  const GemmKind kind = resolve(table, weight, gemm);
  // detached: worker threads do not inherit this thread's below-autograd dispatch state
  auto g = grad.to(weight.scalar_type()).detach().contiguous().view({K * M, D});
  auto dw = at::zeros({D, F}, weight.options());
  auto db = at::zeros({D}, weight.options());
  if (K == 0) return {dw, db};

  const auto ids_t = items.contiguous();
  const int64_t* ids = ids_t.const_data_ptr<int64_t>();
  check_ids(ids, K, table.size(0));
  const bool widen = kind == kFp32 && table.scalar_type() != weight.scalar_type();
  // 16-bit GEMMs: dL/dR is rounded to bf16 like the features; accumulation and dW stay
  // float32.
  const auto g16 = kind != kFp32 ? g.to(at::kBFloat16) : at::Tensor();
  // fp32: item by item, straight from the table: dW += g_k^T [D, M] x table[items[k]]
  // [M, F]. Unlike the forward (M = 49 rows is too few for a good GEMM there), this
  // GEMM's long side is the 2048-wide output, which stays in cache across items; it ran
  // at 174 GFLOP/s per core against 131 for 32-item chunks, and needs no gather: the rows
  // are read once, in place (a 16-bit table is widened one item at a time, in L2).
  // bf16 (oneDNN): gathered sub-chunks of the task's items, each one GEMM over up to
  // chunk_items() x M rows (a 49-row bf16 GEMM runs at 2/3 of that speed).
  // Task t sums items [t * per, (t + 1) * per) into partial t.
  const int64_t per = (K + kMaxPartials - 1) / kMaxPartials;
  const int64_t tasks = (K + per - 1) / per;
  auto partial = at::empty({tasks, D, F}, weight.options());
  const char* base = static_cast<const char*>(table.const_data_ptr());
  const int64_t row_bytes = M * F * table.element_size();
  const int64_t sub = std::min(chunk_items(), per);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(tasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    SequentialBlas sequential;
    ChunkLoader loader(table, kind == kBf16 ? sub : 1,
                       kind == kBf16 ? at::kBFloat16 : widen ? weight.scalar_type()
                                                             : table.scalar_type());
    auto staged = kind == kBf16 ? at::empty({D, F}, g16.options()) : at::Tensor();
    // tasks handed out one at a time (see parallel_tasks in acf_cpu.h)
    for (int64_t t = next++; t < tasks; t = next++) {
      auto part = partial[t];
      const int64_t k0 = t * per, k1 = std::min(K, (t + 1) * per);
      if (kind == kBf16) {
        // equal sub-chunks: a fixed split of the task, whatever thread runs it
        const int64_t pieces = (k1 - k0 + sub - 1) / sub, size = (k1 - k0 + pieces - 1) / pieces;
        for (int64_t s = k0; s < k1; s += size) {
          const int64_t n = std::min(size, k1 - s);
          auto x = loader.load(ids + s, n);
          at::mm_out(staged, g16.narrow(0, s * M, n * M).t(), x);
          if (s == k0) part.copy_(staged);
          else part.add_(staged);
        }
        continue;
      }
      for (int64_t k = k0; k < k1; ++k) {
        const bool first = k == k0;
        if (kind == kMklBf16) {
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
