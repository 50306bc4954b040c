// Shared pieces of the CPU backend: the W_red reduction per distinct item
// (acf_cpu_reduce.cpp) and the fused two-level attention (acf_cpu_attention.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <tuple>

// The extension is compiled for the baseline ISA (it must load on any x86-64), where
// GCC vectorises with 128-bit SSE2 only. Hot element-wise loops get clones for wider
// units, picked once at load time by the dynamic linker (ifunc); elsewhere a no-op.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define ACF_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define ACF_VECTOR_CLONES
#endif

namespace acf_fast {

// body(t) for every task t in [0, n), on the intra-op threads, each thread taking the
// next task when it finishes one. at::parallel_for alone hands each thread a fixed half:
// on a shared machine, where one of two threads can lose its core for a while, the op
// then waits for the slow half. Which thread runs a task never changes its result.
template <typename Body>
void parallel_tasks(int64_t n, const Body& body) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t t = next++; t < n; t = next++) body(t);
  });
}

// R[k] = table[items[k]] @ W^T + b for each distinct item: [K, M, D] in W's dtype.
// gemm: 0 fp32 (exact), 1 bf16 through oneDNN, 2 MKL's bf16 (acf_cpu_reduce.cpp).
at::Tensor reduce_items_cpu(const at::Tensor& table, const at::Tensor& items,
                            const at::Tensor& weight, const at::Tensor& bias, int64_t gemm,
                            int64_t grad_gemm);

// Whether this build can run GEMM kind `gemm` at all (MKL's bf16 needs MKL).
bool gemm_available_cpu(int64_t gemm);

// (dW [D, F], db [D]) for grad = dL/dR [K, M, D].
std::tuple<at::Tensor, at::Tensor> reduce_items_backward_cpu(const at::Tensor& grad,
                                                             const at::Tensor& table,
                                                             const at::Tensor& items,
                                                             const at::Tensor& weight,
                                                             int64_t gemm);

// Both attention levels and the user vector, per (user, slot), without materialising
// [B, P, M, H]. xy [K, M, H + D] holds per distinct item W2x r (first H columns) and
// W1x r (last D columns); the biases b2x and b1x come in through uc and pp. Returns (user [B, D], alpha [B, P], beta [B, P, M]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_cpu(
    const at::Tensor& xy, const at::Tensor& uc, const at::Tensor& ut, const at::Tensor& pp,
    const at::Tensor& prof, const at::Tensor& slot_item, const at::Tensor& w2,
    const at::Tensor& c2, const at::Tensor& w1, const at::Tensor& c1);

// Gradients of attention_cpu's inputs (xy, uc, ut, pp, prof, w2, c2, w1, c1) from
// gradients of its three outputs, recomputed from the saved softmaxes alpha and beta.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
attention_backward_cpu(const at::Tensor& g_user, const at::Tensor& g_alpha,
                       const at::Tensor& g_beta, const at::Tensor& xy, const at::Tensor& uc,
                       const at::Tensor& ut, const at::Tensor& pp, const at::Tensor& prof,
                       const at::Tensor& slot_item, const at::Tensor& w2, const at::Tensor& w1,
                       const at::Tensor& alpha, const at::Tensor& beta);

}  // namespace acf_fast
